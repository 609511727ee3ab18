/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Preallocation of a data file's chunks (prealloc.h).
 *
 * One bit per chunk.  A mark is set after a fallocate of the whole chunk
 * succeeded and cleared when a block in it is punched, so a chunk whose
 * freed blocks went back to the host is filled again the next time a
 * block in it is allocated.  Two threads may fill one chunk at once: the
 * second fallocate finds no holes and changes nothing.
 */
#include "prealloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

struct tfs_prealloc {
	struct tfs_bdev *dev;
	uint64_t block_size;
	uint64_t chunk_blocks;
	pthread_mutex_t lock;
	uint64_t nr_blocks;   /* [lock] the device's size */
	uint64_t nr_chunks;   /* [lock] chunks the map has bits for */
	uint8_t *map;         /* [lock] */
	uint64_t marked;      /* [lock] bits set */
	uint64_t fallocates;  /* [lock] */
	uint64_t failures;    /* [lock] */
	bool off;             /* [lock] the device refused: never try again */
};

static uint64_t chunks_for(const struct tfs_prealloc *p, uint64_t nr_blocks)
{
	return (nr_blocks + p->chunk_blocks - 1) / p->chunk_blocks;
}

static bool test_bit(const uint8_t *map, uint64_t i)
{
	return map[i / 8] & (1u << (i % 8));
}

/* Set (on) or clear bit i, keeping the count of marks. */
static void put_bit(struct tfs_prealloc *p, uint64_t i, bool on)
{
	uint8_t m = (uint8_t)(1u << (i % 8));

	if (test_bit(p->map, i) == on)
		return;
	p->map[i / 8] ^= m;
	if (on)
		p->marked++;
	else
		p->marked--;
}

int tfs_prealloc_create(struct tfs_bdev *dev, uint64_t block_size, uint64_t chunk_bytes,
			uint64_t nr_blocks, struct tfs_prealloc **out)
{
	struct tfs_prealloc *p;

	*out = NULL;
	if (!chunk_bytes || tfs_bdev_is_blockdev(dev))
		return 0;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->dev = dev;
	p->block_size = block_size;
	p->chunk_blocks = (chunk_bytes + block_size - 1) / block_size;
	p->nr_blocks = nr_blocks;
	p->nr_chunks = chunks_for(p, nr_blocks);
	p->map = calloc(p->nr_chunks / 8 + 1, 1);
	if (!p->map) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	*out = p;
	return 0;
}

void tfs_prealloc_destroy(struct tfs_prealloc *p)
{
	if (!p)
		return;
	pthread_mutex_destroy(&p->lock);
	free(p->map);
	free(p);
}

bool tfs_prealloc_ready(struct tfs_prealloc *p, uint64_t block)
{
	uint64_t i;
	bool r;

	if (!p)
		return false;
	i = block / p->chunk_blocks;
	pthread_mutex_lock(&p->lock);
	r = i < p->nr_chunks && test_bit(p->map, i);
	pthread_mutex_unlock(&p->lock);
	return r;
}

int tfs_prealloc_fill(struct tfs_prealloc *p, uint64_t block)
{
	uint64_t i = block / p->chunk_blocks, begin = i * p->chunk_blocks, end;
	int r;

	pthread_mutex_lock(&p->lock);
	end = begin + p->chunk_blocks < p->nr_blocks ? begin + p->chunk_blocks : p->nr_blocks;
	if (p->off || i >= p->nr_chunks || begin >= end) {
		pthread_mutex_unlock(&p->lock);
		return -EOPNOTSUPP;
	}
	pthread_mutex_unlock(&p->lock);
	r = tfs_bdev_preallocate(p->dev, begin * p->block_size, (end - begin) * p->block_size);
	pthread_mutex_lock(&p->lock);
	if (!r) {
		p->fallocates++;
		/* A resize meanwhile may have cut the map, or moved the end into this chunk. */
		if (i < p->nr_chunks && end <= p->nr_blocks)
			put_bit(p, i, true);
	} else {
		p->failures++;
		if (r == -EOPNOTSUPP && !p->off) {
			p->off = true;
			tfs_info("%s: cannot preallocate the data file (%s): partial writes to new "
				 "blocks write the whole block", tfs_bdev_name(p->dev), strerror(-r));
		}
	}
	pthread_mutex_unlock(&p->lock);
	return r;
}

void tfs_prealloc_forget(struct tfs_prealloc *p, uint64_t begin, uint64_t len)
{
	if (!p || !len)
		return;
	pthread_mutex_lock(&p->lock);
	for (uint64_t i = begin / p->chunk_blocks;
	     i <= (begin + len - 1) / p->chunk_blocks && i < p->nr_chunks; i++)
		put_bit(p, i, false);
	pthread_mutex_unlock(&p->lock);
}

int tfs_prealloc_resize(struct tfs_prealloc *p, uint64_t nr_blocks)
{
	uint64_t n;
	uint8_t *map;
	int r = 0;

	if (!p)
		return 0;
	pthread_mutex_lock(&p->lock);
	if (nr_blocks > p->nr_blocks && p->nr_blocks % p->chunk_blocks &&
	    p->nr_blocks / p->chunk_blocks < p->nr_chunks)
		put_bit(p, p->nr_blocks / p->chunk_blocks, false);
	p->nr_blocks = nr_blocks;
	n = chunks_for(p, nr_blocks);
	/* Shrunk: what lay past the end is gone from the file (the map keeps its length). */
	for (uint64_t i = n; i < p->nr_chunks; i++)
		put_bit(p, i, false);
	if (n > p->nr_chunks) {
		map = realloc(p->map, n / 8 + 1);
		if (map) {
			memset(map + p->nr_chunks / 8 + 1, 0, n / 8 - p->nr_chunks / 8);
			p->map = map;
			p->nr_chunks = n;
		} else {
			r = -ENOMEM;
		}
	}
	pthread_mutex_unlock(&p->lock);
	return r;
}

void tfs_prealloc_counts(struct tfs_prealloc *p, struct tfs_prealloc_counts *out)
{
	memset(out, 0, sizeof(*out));
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	out->chunk_bytes = p->chunk_blocks * p->block_size;
	out->chunks = p->marked;
	out->fallocates = p->fallocates;
	out->failures = p->failures;
	out->active = !p->off;
	pthread_mutex_unlock(&p->lock);
}
