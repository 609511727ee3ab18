/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Bulk reads of a thin device (pool.h, tfs_thin_bulk_*): many ranges at
 * once, for a reader that moves a lot of data (send) rather than one
 * request's worth.
 *
 * Why not tfs_dev_read per range: a request looks up and reads one range
 * at a time, so scattered blocks become one small device read each, one
 * after the other, in the order of the virtual blocks.  Here every range
 * of a batch is looked up first, the pieces are sorted by where they lie
 * on the data device (neighbours on the device and in memory become one
 * read, up to TFS_THIN_BULK_READ bytes), and the reads are spread over
 * reader threads, so the device sees its blocks in order with several
 * reads in flight.
 *
 * A batch is one request as far as suspend and the range locks go: it
 * enters the core for the device and takes one shared cell over the
 * blocks from its first range to its last, so a write, discard or
 * snapshot of those blocks waits for the batch and the batch for them,
 * exactly as for a read.  One cell per batch, never two held at once, is
 * what keeps it deadlock-free (prison.h).
 */
#include "pool-internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* One device read: len bytes at dev_off into dst. */
struct bulk_read {
	uint64_t dev_off;
	uint8_t *dst;
	size_t len;
};

struct tfs_thin_bulk {
	struct tfs_thin_dev *vol;
	pthread_t *threads;
	unsigned nr_threads;

	pthread_mutex_t lock;
	pthread_cond_t work;     /* a batch was posted, or stop */
	pthread_cond_t done;     /* the batch's last read finished */
	struct bulk_read *reads; /* the batch: planned by the caller while nr_reads is 0 */
	size_t nr_plan, cap;     /* the caller's: reads planned, room */
	size_t nr_reads;         /* lock: reads of the batch posted */
	size_t next;             /* lock: the next read to claim */
	size_t busy;             /* lock: reads claimed and not finished */
	uint64_t batch;          /* lock: bumped per batch */
	int err;                 /* lock: the batch's first error */
	bool stop;               /* lock */
};

/* Claim and do reads of the current batch until none is left; lock held on entry and exit. */
static void read_some(struct tfs_thin_bulk *b)
{
	struct tfs_bdev *data = b->vol->pool->data;

	while (b->next < b->nr_reads) {
		struct bulk_read rd = b->reads[b->next++];
		int r;

		b->busy++;
		pthread_mutex_unlock(&b->lock);
		r = tfs_bdev_read(data, rd.dst, rd.len, rd.dev_off);
		pthread_mutex_lock(&b->lock);
		if (r && !b->err)
			b->err = r;
		if (--b->busy == 0 && b->next == b->nr_reads)
			pthread_cond_broadcast(&b->done);
	}
}

static void *reader(void *arg)
{
	struct tfs_thin_bulk *b = arg;
	uint64_t seen = 0;

	pthread_mutex_lock(&b->lock);
	while (!b->stop) {
		if (b->batch == seen || b->next == b->nr_reads) {
			seen = b->batch;
			pthread_cond_wait(&b->work, &b->lock);
			continue;
		}
		read_some(b);
	}
	pthread_mutex_unlock(&b->lock);
	return NULL;
}

int tfs_thin_bulk_open(struct tfs_dev *dev, unsigned readers, struct tfs_thin_bulk **out)
{
	struct tfs_thin_dev *vol = tfs_thin_dev_of(dev);
	struct tfs_thin_bulk *b;
	int r = 0;

	if (!vol)
		return -EOPNOTSUPP;
	if (!vol->ref)
		return -EBADF;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->vol = vol;
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->work, NULL);
	pthread_cond_init(&b->done, NULL);
	b->threads = calloc(readers ? readers : 1, sizeof(*b->threads));
	if (!b->threads) {
		tfs_thin_bulk_close(b);
		return -ENOMEM;
	}
	/* The caller reads too: readers - 1 threads of our own. */
	for (; b->nr_threads + 1 < readers; b->nr_threads++) {
		r = -pthread_create(&b->threads[b->nr_threads], NULL, reader, b);
		if (r)
			break;
	}
	if (r && !b->nr_threads) {
		tfs_thin_bulk_close(b);
		return r;
	}
	*out = b;
	return 0;
}

void tfs_thin_bulk_close(struct tfs_thin_bulk *b)
{
	if (!b)
		return;
	pthread_mutex_lock(&b->lock);
	b->stop = true;
	pthread_cond_broadcast(&b->work);
	pthread_mutex_unlock(&b->lock);
	while (b->nr_threads)
		pthread_join(b->threads[--b->nr_threads], NULL);
	free(b->threads);
	free(b->reads);
	pthread_cond_destroy(&b->done);
	pthread_cond_destroy(&b->work);
	pthread_mutex_destroy(&b->lock);
	free(b);
}

/* Add a piece, joining it to the last read when both its device and memory bytes follow on. */
static int add_piece(struct tfs_thin_bulk *b, uint64_t dev_off, uint8_t *dst, size_t len)
{
	struct bulk_read *last = b->nr_plan ? &b->reads[b->nr_plan - 1] : NULL;

	if (last && last->dev_off + last->len == dev_off && last->dst + last->len == dst &&
	    last->len + len <= TFS_THIN_BULK_READ) {
		last->len += len;
		return 0;
	}
	if (b->nr_plan == b->cap) {
		size_t cap = b->cap ? 2 * b->cap : 256;
		struct bulk_read *v = realloc(b->reads, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		b->reads = v;
		b->cap = cap;
	}
	b->reads[b->nr_plan++] = (struct bulk_read){ dev_off, dst, len };
	return 0;
}

/* The pieces of one range: mapped blocks become reads, unmapped ones zeros. */
static int plan_range(struct tfs_thin_bulk *b, const struct tfs_thin_range *x)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	struct tfs_thin_dev *vol = b->vol;
	struct tfs_pool *pool = vol->pool;
	uint64_t bs = pool->block_size, end = x->off + x->len;

	for (uint64_t cur = x->off; cur < end;) {
		uint64_t b0 = cur / bs, b1 = (end - 1) / bs + 1;
		unsigned nr = b1 - b0 < TFS_POOL_CHUNK ? (unsigned)(b1 - b0) : TFS_POOL_CHUNK;
		unsigned j = 0;
		int n = tfs_thin_lookup_chunk(vol, b0, nr, maps), r;

		if (n < 0)
			return n;
		for (unsigned i = 0; i < nr && cur < end; i++) {
			uint64_t start = (b0 + i) * bs;
			uint64_t e = end - start < bs ? end - start : bs, s = cur - start;
			uint8_t *dst = x->buf + (cur - x->off);

			if (j < (unsigned)n && maps[j].vblock == b0 + i) {
				r = add_piece(b, maps[j++].data_block * bs + s, dst, e - s);
				if (r)
					return r;
			} else {
				memset(dst, 0, e - s);
			}
			cur = start + e;
		}
	}
	return 0;
}

static int by_dev_off(const void *a, const void *b)
{
	const struct bulk_read *x = a, *y = b;

	return x->dev_off < y->dev_off ? -1 : x->dev_off > y->dev_off;
}

int tfs_thin_bulk_read(struct tfs_thin_bulk *b, const struct tfs_thin_range *ranges, unsigned nr)
{
	struct tfs_thin_dev *vol = b->vol;
	struct tfs_pool *pool = vol->pool;
	uint64_t bs = pool->block_size, b0, b1;
	struct tfs_core_io io;
	int r = 0;

	if (!nr)
		return 0;
	for (unsigned i = 0; i < nr; i++) {
		if (!ranges[i].len || ranges[i].off + ranges[i].len < ranges[i].off ||
		    (i && ranges[i].off < ranges[i - 1].off + ranges[i - 1].len)) {
			tfs_err("thin device %u: bulk read: range %u is empty, wraps or is out of "
				"order", vol->id, i);
			return -EINVAL;
		}
	}
	b0 = ranges[0].off / bs;
	b1 = (ranges[nr - 1].off + ranges[nr - 1].len - 1) / bs + 1;
	tfs_core_enter(pool->core, &io, vol->id);
	r = tfs_prison_lock_shared(pool->prison, vol->id, b0, b1);
	if (r)
		goto out_exit;
	b->nr_plan = 0;
	for (unsigned i = 0; i < nr && !r; i++)
		r = plan_range(b, &ranges[i]);
	if (r)
		goto out_unlock;
	qsort(b->reads, b->nr_plan, sizeof(*b->reads), by_dev_off);

	pthread_mutex_lock(&b->lock);
	b->nr_reads = b->nr_plan;
	b->next = 0;
	b->err = 0;
	b->batch++;
	pthread_cond_broadcast(&b->work);
	read_some(b);
	while (b->busy)
		pthread_cond_wait(&b->done, &b->lock);
	r = b->err;
	b->nr_reads = 0;
	b->next = 0;
	pthread_mutex_unlock(&b->lock);
	if (r)
		tfs_err("thin device %u: reading data blocks failed: %s", vol->id, strerror(-r));
out_unlock:
	tfs_prison_unlock_shared(pool->prison, vol->id, b0, b1);
out_exit:
	tfs_core_exit(pool->core, &io);
	return r;
}
