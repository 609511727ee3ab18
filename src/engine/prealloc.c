/*
 * Preallocation of a data file's chunks (prealloc.h).
 *
 * One state byte per chunk.  A chunk is READY after a fallocate of the
 * whole chunk succeeded, and goes back to NONE when a block in it is
 * punched, so a chunk whose freed blocks went back to the host is filled
 * again the next time a block in it is allocated.  One thread fills a
 * chunk at a time (FILLING); the others that need it wait for that fill
 * rather than issue their own: on ext4 every fallocate waits for the
 * direct I/O in flight to the file and then holds the inode lock, so
 * requests crowding into a new chunk would otherwise stall everyone once
 * each.  A punch during a fill (FILLING_STALE) keeps the chunk from being
 * marked READY by it.
 */
#include "prealloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

enum chunk_state { NONE, FILLING, FILLING_STALE, READY };

struct tfs_prealloc {
	struct tfs_bdev *dev;
	uint64_t block_size;
	uint64_t chunk_blocks;
	pthread_mutex_t lock;
	pthread_cond_t filled; /* a fill ended */
	uint64_t nr_blocks;   /* [lock] the device's size */
	uint64_t nr_chunks;   /* [lock] chunks the map has room for */
	uint8_t *state;       /* [lock] enum chunk_state per chunk */
	uint64_t ready;       /* [lock] chunks READY */
	uint64_t fallocates;  /* [lock] */
	uint64_t failures;    /* [lock] */
	bool off;             /* [lock] the device refused: never try again */
	const char *off_note; /* logged when the device refuses: what that costs */
	tfs_prealloc_then_fn then; /* set before the first fill, then read-only */
	void *then_arg;
};

static uint64_t chunks_for(const struct tfs_prealloc *p, uint64_t nr_blocks)
{
	return (nr_blocks + p->chunk_blocks - 1) / p->chunk_blocks;
}

/* Chunk i to state st, keeping the count of READY ones. */
static void set_state(struct tfs_prealloc *p, uint64_t i, enum chunk_state st)
{
	if (p->state[i] == READY)
		p->ready--;
	if (st == READY)
		p->ready++;
	p->state[i] = (uint8_t)st;
}

/* A punch or a shrink: the chunk may hold holes again. */
static void forget_chunk(struct tfs_prealloc *p, uint64_t i)
{
	if (p->state[i] == READY)
		set_state(p, i, NONE);
	else if (p->state[i] == FILLING)
		set_state(p, i, FILLING_STALE);
}

int tfs_prealloc_create(struct tfs_bdev *dev, uint64_t block_size, uint64_t chunk_bytes,
			uint64_t nr_blocks, const char *off_note, struct tfs_prealloc **out)
{
	struct tfs_prealloc *p;

	*out = NULL;
	if (!chunk_bytes || tfs_bdev_is_blockdev(dev))
		return 0;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->dev = dev;
	p->off_note = off_note;
	p->block_size = block_size;
	p->chunk_blocks = (chunk_bytes + block_size - 1) / block_size;
	p->nr_blocks = nr_blocks;
	p->nr_chunks = chunks_for(p, nr_blocks);
	p->state = calloc(p->nr_chunks + 1, 1);
	if (!p->state) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->filled, NULL);
	*out = p;
	return 0;
}

void tfs_prealloc_destroy(struct tfs_prealloc *p)
{
	if (!p)
		return;
	pthread_cond_destroy(&p->filled);
	pthread_mutex_destroy(&p->lock);
	free(p->state);
	free(p);
}

void tfs_prealloc_set_then(struct tfs_prealloc *p, tfs_prealloc_then_fn fn, void *arg)
{
	if (!p)
		return;
	p->then = fn;
	p->then_arg = arg;
}

bool tfs_prealloc_ready(struct tfs_prealloc *p, uint64_t block)
{
	uint64_t i;
	bool r;

	if (!p)
		return false;
	i = block / p->chunk_blocks;
	pthread_mutex_lock(&p->lock);
	r = i < p->nr_chunks && p->state[i] == READY;
	pthread_mutex_unlock(&p->lock);
	return r;
}

static int fill(struct tfs_prealloc *p, uint64_t block, bool wait)
{
	uint64_t i = block / p->chunk_blocks, begin = i * p->chunk_blocks, end;
	bool waited = false;
	int r;

	pthread_mutex_lock(&p->lock);
	while (i < p->nr_chunks && (p->state[i] == FILLING || p->state[i] == FILLING_STALE)) {
		if (!wait) {
			pthread_mutex_unlock(&p->lock);
			return -EAGAIN;
		}
		pthread_cond_wait(&p->filled, &p->lock);
		waited = true;
	}
	end = begin + p->chunk_blocks < p->nr_blocks ? begin + p->chunk_blocks : p->nr_blocks;
	if (i < p->nr_chunks && p->state[i] == READY) {
		pthread_mutex_unlock(&p->lock);
		return 0;
	}
	/* The fill waited for failed (or was forgotten): not retried at once by every waiter. */
	if (waited) {
		pthread_mutex_unlock(&p->lock);
		return -EAGAIN;
	}
	if (p->off || i >= p->nr_chunks || begin >= end) {
		pthread_mutex_unlock(&p->lock);
		return -EOPNOTSUPP;
	}
	set_state(p, i, FILLING);
	pthread_mutex_unlock(&p->lock);
	r = tfs_bdev_preallocate(p->dev, begin * p->block_size, (end - begin) * p->block_size);
	if (!r && p->then)
		r = p->then(p->then_arg, begin, end - begin);
	pthread_mutex_lock(&p->lock);
	if (!r) {
		p->fallocates++;
	} else {
		p->failures++;
		if (r == -EOPNOTSUPP && !p->off) {
			p->off = true;
			tfs_info("%s: cannot preallocate (%s): %s", tfs_bdev_name(p->dev),
				 strerror(-r), p->off_note);
		}
	}
	/* A resize meanwhile may have cut the map, or moved the end into this chunk. */
	if (i < p->nr_chunks)
		set_state(p, i, !r && p->state[i] == FILLING && end <= p->nr_blocks ? READY : NONE);
	pthread_cond_broadcast(&p->filled);
	pthread_mutex_unlock(&p->lock);
	return r;
}

int tfs_prealloc_fill(struct tfs_prealloc *p, uint64_t block)
{
	return fill(p, block, true);
}

int tfs_prealloc_fill_ahead(struct tfs_prealloc *p, uint64_t block)
{
	return p ? fill(p, block, false) : 0;
}

void tfs_prealloc_forget(struct tfs_prealloc *p, uint64_t begin, uint64_t len)
{
	if (!p || !len)
		return;
	pthread_mutex_lock(&p->lock);
	for (uint64_t i = begin / p->chunk_blocks;
	     i <= (begin + len - 1) / p->chunk_blocks && i < p->nr_chunks; i++)
		forget_chunk(p, i);
	pthread_mutex_unlock(&p->lock);
}

int tfs_prealloc_resize(struct tfs_prealloc *p, uint64_t nr_blocks)
{
	uint64_t n;
	uint8_t *state;
	int r = 0;

	if (!p)
		return 0;
	pthread_mutex_lock(&p->lock);
	if (nr_blocks > p->nr_blocks && p->nr_blocks % p->chunk_blocks &&
	    p->nr_blocks / p->chunk_blocks < p->nr_chunks)
		forget_chunk(p, p->nr_blocks / p->chunk_blocks);
	p->nr_blocks = nr_blocks;
	n = chunks_for(p, nr_blocks);
	/* Shrunk: what lay past the end is gone from the file (the map keeps its length). */
	for (uint64_t i = n; i < p->nr_chunks; i++)
		forget_chunk(p, i);
	if (n > p->nr_chunks) {
		state = realloc(p->state, n + 1);
		if (state) {
			memset(state + p->nr_chunks + 1, 0, n - p->nr_chunks);
			p->state = state;
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
	out->chunks = p->ready;
	out->fallocates = p->fallocates;
	out->failures = p->failures;
	out->active = !p->off;
	pthread_mutex_unlock(&p->lock);
}
