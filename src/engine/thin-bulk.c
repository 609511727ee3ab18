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
 * read, up to TFS_THIN_BULK_READ bytes), and the reads go to the data
 * device as one batch (tfs_bdev_read_batch_bounded: native AIO on a
 * direct device), so the device sees its blocks in order with several
 * reads in flight, and no thread waits per read.  Not too many bytes in
 * flight (TFS_THIN_BULK_IN_FLIGHT): the disk measured read 1 MiB pieces a
 * quarter slower with 16 or 32 MiB in flight than with 2 to 4.
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

struct tfs_thin_bulk {
	struct tfs_thin_dev *vol;
	struct tfs_bdev_req *reads; /* the batch's device reads */
	size_t nr_reads, cap;
};

int tfs_thin_bulk_open(struct tfs_dev *dev, struct tfs_thin_bulk **out)
{
	struct tfs_thin_dev *vol = tfs_thin_dev_of(dev);
	struct tfs_thin_bulk *b;

	if (!vol)
		return -EOPNOTSUPP;
	if (!vol->ref)
		return -EBADF;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->vol = vol;
	*out = b;
	return 0;
}

void tfs_thin_bulk_close(struct tfs_thin_bulk *b)
{
	if (!b)
		return;
	free(b->reads);
	free(b);
}

/* Whether a piece can join read last: its device and memory bytes follow on, within the size. */
static bool follows_on(const struct tfs_bdev_req *last, uint64_t dev_off, const void *dst,
		       size_t len)
{
	return last && last->off + last->len == dev_off &&
	       (const uint8_t *)last->buf + last->len == (const uint8_t *)dst &&
	       last->len + len <= TFS_THIN_BULK_READ;
}

/* Add a piece, joining it to the last read when it follows on. */
static int add_piece(struct tfs_thin_bulk *b, uint64_t dev_off, uint8_t *dst, size_t len)
{
	struct tfs_bdev_req *last = b->nr_reads ? &b->reads[b->nr_reads - 1] : NULL;

	if (follows_on(last, dev_off, dst, len)) {
		last->len += len;
		return 0;
	}
	if (b->nr_reads == b->cap) {
		size_t cap = b->cap ? 2 * b->cap : 256;
		struct tfs_bdev_req *v = realloc(b->reads, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		b->reads = v;
		b->cap = cap;
	}
	b->reads[b->nr_reads++] = (struct tfs_bdev_req){ .buf = dst, .len = len, .off = dev_off };
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

int tfs_thin_bulk_locate(struct tfs_thin_bulk *b, uint64_t off, uint64_t len,
			 int (*fn)(void *ctx, uint64_t off, uint64_t len, uint64_t dev_off), void *ctx)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	struct tfs_thin_dev *vol = b->vol;
	struct tfs_pool *pool = vol->pool;
	uint64_t bs = pool->block_size, end = off + len, b0, b1;
	uint64_t run_off = off, run_len = 0, run_dev = TFS_THIN_UNMAPPED;
	struct tfs_core_io io;
	int r = 0;

	if (!len)
		return 0;
	if (end < off)
		return -EINVAL;
	b0 = off / bs;
	b1 = (end - 1) / bs + 1;
	tfs_core_enter(pool->core, &io, vol->id);
	r = tfs_prison_lock_shared(pool->prison, vol->id, b0, b1);
	if (r)
		goto out_exit;
	for (uint64_t cur = off; cur < end && !r;) {
		uint64_t c0 = cur / bs;
		unsigned nr = b1 - c0 < TFS_POOL_CHUNK ? (unsigned)(b1 - c0) : TFS_POOL_CHUNK, j = 0;
		int n = tfs_thin_lookup_chunk(vol, c0, nr, maps);

		if (n < 0) {
			r = n;
			break;
		}
		for (unsigned i = 0; i < nr && cur < end && !r; i++) {
			uint64_t start = (c0 + i) * bs, s = cur - start;
			uint64_t e = end - start < bs ? end - start : bs;
			uint64_t dev = TFS_THIN_UNMAPPED;

			if (j < (unsigned)n && maps[j].vblock == c0 + i)
				dev = maps[j++].data_block * bs + s;
			/* A run goes on while both the volume's and the device's bytes follow on. */
			if (run_len && (run_dev == TFS_THIN_UNMAPPED ? dev == TFS_THIN_UNMAPPED :
					dev == run_dev + run_len)) {
				run_len += e - s;
			} else {
				if (run_len)
					r = fn(ctx, run_off, run_len, run_dev);
				run_off = cur;
				run_len = e - s;
				run_dev = dev;
			}
			cur = start + e;
		}
	}
	if (!r && run_len)
		r = fn(ctx, run_off, run_len, run_dev);
	tfs_prison_unlock_shared(pool->prison, vol->id, b0, b1);
out_exit:
	tfs_core_exit(pool->core, &io);
	return r;
}

static int by_dev_off(const void *a, const void *b)
{
	const struct tfs_bdev_req *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

/*
 * Pieces that became neighbours on the device and in memory only once
 * sorted (a batch whose buffers were laid out in device order) join too.
 */
static void merge_sorted(struct tfs_thin_bulk *b)
{
	size_t n = 0;

	for (size_t i = 0; i < b->nr_reads; i++) {
		struct tfs_bdev_req *last = n ? &b->reads[n - 1] : NULL, *x = &b->reads[i];

		if (follows_on(last, x->off, x->buf, x->len))
			last->len += x->len;
		else
			b->reads[n++] = *x;
	}
	b->nr_reads = n;
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
	b->nr_reads = 0;
	for (unsigned i = 0; i < nr && !r; i++)
		r = plan_range(b, &ranges[i]);
	if (r)
		goto out_unlock;
	qsort(b->reads, b->nr_reads, sizeof(*b->reads), by_dev_off);
	merge_sorted(b);
	r = tfs_bdev_read_batch_bounded(pool->data, b->reads, (unsigned)b->nr_reads,
					TFS_THIN_BULK_IN_FLIGHT);
	if (r)
		tfs_err("thin device %u: reading data blocks failed: %s", vol->id, strerror(-r));
out_unlock:
	tfs_prison_unlock_shared(pool->prison, vol->id, b0, b1);
out_exit:
	tfs_core_exit(pool->core, &io);
	return r;
}
