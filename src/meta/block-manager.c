/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Block cache: a hash table of 4 KiB blocks with an LRU list of the
 * unlocked ones.  Locked blocks are pinned; unlocked dirty blocks may be
 * written early when evicted (they are always shadows that neither the
 * committed state, nor one being committed, nor the one before it
 * references: space-map.h, so writing them early is safe).
 *
 * Blocks come from slabs of SLAB_BLOCKS, their data mapped with mmap, and
 * an evicted block goes back to a free list rather than to malloc.  A
 * page-aligned 4 KiB from posix_memalign costs glibc up to twice that, and
 * blocks freed among long-lived ones fragment the heap (and every arena of
 * the threads that happened to evict), which then cannot shrink: the
 * daemon's RSS reached several times the cache size under load.  Slabs are
 * kept until the cache is destroyed: the cache only grows to its budget
 * (plus the blocks locked at once), and stays there.
 */
#include "block-manager.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bdev.h"
#include "format.h"
#include "log.h"

struct tfs_block {
	uint64_t blocknr;
	struct tfs_bm *bm;
	const struct tfs_block_validator *v; /* the type it was last checked or written as */
	unsigned lock_count;
	bool dirty;
	bool in_lru;
	bool unchecked; /* read ahead, v still NULL: the first lock with a validator checks it */
	struct tfs_block *hash_next;
	struct tfs_block *lru_prev, *lru_next;     /* unlocked blocks only */
	struct tfs_block *dirty_prev, *dirty_next; /* dirty blocks only */
	uint8_t *data;                             /* in its slab, for the block's lifetime */
};

/* A free block's data stays poisoned under ASan, so a use after eviction is still caught. */
#if defined(__SANITIZE_ADDRESS__)
#define TFS_BM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TFS_BM_ASAN 1
#endif
#endif
#ifdef TFS_BM_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define SLAB_BLOCKS 64u /* 256 KiB of data per mmap */

struct slab {
	struct slab *next;
	uint8_t *data; /* SLAB_BLOCKS * TFS_BLOCK_SIZE, mmap'ed */
	struct tfs_block blocks[SLAB_BLOCKS];
};

struct list {
	struct tfs_block *head, *tail;
};

struct tfs_bm {
	struct tfs_bdev *dev;
	uint64_t nr_blocks; /* device size as last seen; re-read only when exceeded */
	size_t cache_blocks;
	struct tfs_block **hash;
	size_t hash_mask;
	size_t nr_cached, nr_dirty, nr_locked;
	struct tfs_block *lru_head, *lru_tail; /* head = most recently used */
	struct tfs_block *dirty_head;
	struct slab *slabs;
	size_t nr_slabs;
	struct tfs_block *free_blocks; /* unused, chained through hash_next */
	struct prefetch_pool *prefetch_pool; /* read-ahead threads, once a read-ahead needed them */
	uint8_t *prefetch_staging;           /* the owner's thread's, for the same */
	struct tfs_bm_stats stats;
	char write_error[160]; /* the last failed write, until taken */
};

static size_t hash_of(const struct tfs_bm *bm, uint64_t b)
{
	return (size_t)((b * 0x9E3779B97F4A7C15ull) >> 20) & bm->hash_mask;
}

static struct tfs_block *find(struct tfs_bm *bm, uint64_t blocknr)
{
	for (struct tfs_block *b = bm->hash[hash_of(bm, blocknr)]; b; b = b->hash_next)
		if (b->blocknr == blocknr)
			return b;
	return NULL;
}

static void hash_remove(struct tfs_bm *bm, struct tfs_block *b)
{
	struct tfs_block **pp = &bm->hash[hash_of(bm, b->blocknr)];

	while (*pp != b)
		pp = &(*pp)->hash_next;
	*pp = b->hash_next;
}

static void lru_unlink(struct tfs_bm *bm, struct tfs_block *b)
{
	if (!b->in_lru)
		return;
	b->in_lru = false;
	if (b->lru_prev)
		b->lru_prev->lru_next = b->lru_next;
	else
		bm->lru_head = b->lru_next;
	if (b->lru_next)
		b->lru_next->lru_prev = b->lru_prev;
	else
		bm->lru_tail = b->lru_prev;
	b->lru_prev = b->lru_next = NULL;
}

static void lru_push(struct tfs_bm *bm, struct tfs_block *b)
{
	b->in_lru = true;
	b->lru_prev = NULL;
	b->lru_next = bm->lru_head;
	if (bm->lru_head)
		bm->lru_head->lru_prev = b;
	bm->lru_head = b;
	if (!bm->lru_tail)
		bm->lru_tail = b;
}

static void mark_dirty(struct tfs_bm *bm, struct tfs_block *b)
{
	if (b->dirty)
		return;
	b->dirty = true;
	b->dirty_prev = NULL;
	b->dirty_next = bm->dirty_head;
	if (bm->dirty_head)
		bm->dirty_head->dirty_prev = b;
	bm->dirty_head = b;
	bm->nr_dirty++;
}

static void clear_dirty(struct tfs_bm *bm, struct tfs_block *b)
{
	if (!b->dirty)
		return;
	if (b->dirty_prev)
		b->dirty_prev->dirty_next = b->dirty_next;
	else
		bm->dirty_head = b->dirty_next;
	if (b->dirty_next)
		b->dirty_next->dirty_prev = b->dirty_prev;
	b->dirty_prev = b->dirty_next = NULL;
	b->dirty = false;
	bm->nr_dirty--;
}

/* Logged, and put in words into msg for the pool's status reason. */
static void write_failed(struct tfs_bdev *dev, const struct tfs_block *b, int r, char *msg,
			 size_t len)
{
	tfs_err("%s: writing metadata block %llu (%s) failed: %s", dev->name,
		(unsigned long long)b->blocknr, b->v ? b->v->name : "untyped", strerror(-r));
	snprintf(msg, len, "metadata write failed at block %llu (%s): %s",
		 (unsigned long long)b->blocknr, b->v ? b->v->name : "untyped", strerror(-r));
}

static int write_block(struct tfs_bm *bm, struct tfs_block *b)
{
	int r;

	if (b->v && b->v->prepare)
		b->v->prepare(b->v, b->data, b->blocknr);
	r = tfs_bdev_write(bm->dev, b->data, TFS_BLOCK_SIZE, b->blocknr * TFS_BLOCK_SIZE);
	if (r) {
		write_failed(bm->dev, b, r, bm->write_error, sizeof(bm->write_error));
		return r;
	}
	bm->stats.writes++;
	clear_dirty(bm, b);
	return 0;
}

void tfs_bm_take_write_error(struct tfs_bm *bm, char *buf, size_t len)
{
	snprintf(buf, len, "%s", bm->write_error);
	bm->write_error[0] = '\0';
}

static void free_block(struct tfs_bm *bm, struct tfs_block *b)
{
	uint8_t *data = b->data;

	hash_remove(bm, b);
	clear_dirty(bm, b);
	bm->nr_cached--;
	memset(b, 0, sizeof(*b));
	b->data = data;
	b->hash_next = bm->free_blocks;
	bm->free_blocks = b;
	POISON(data, TFS_BLOCK_SIZE);
}

static int add_slab(struct tfs_bm *bm)
{
	struct slab *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->data = mmap(NULL, (size_t)SLAB_BLOCKS * TFS_BLOCK_SIZE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s->data == MAP_FAILED) {
		free(s);
		return -ENOMEM;
	}
	for (unsigned i = SLAB_BLOCKS; i-- > 0;) {
		s->blocks[i].data = s->data + (size_t)i * TFS_BLOCK_SIZE;
		s->blocks[i].hash_next = bm->free_blocks;
		bm->free_blocks = &s->blocks[i];
	}
	POISON(s->data, (size_t)SLAB_BLOCKS * TFS_BLOCK_SIZE);
	s->next = bm->slabs;
	bm->slabs = s;
	bm->nr_slabs++;
	return 0;
}

static void free_slabs(struct tfs_bm *bm)
{
	while (bm->slabs) {
		struct slab *s = bm->slabs;

		bm->slabs = s->next;
		UNPOISON(s->data, (size_t)SLAB_BLOCKS * TFS_BLOCK_SIZE);
		munmap(s->data, (size_t)SLAB_BLOCKS * TFS_BLOCK_SIZE);
		free(s);
	}
	bm->free_blocks = NULL;
	bm->nr_slabs = 0;
}

/* Make room for one more block by evicting unlocked blocks beyond the budget. */
static int evict(struct tfs_bm *bm)
{
	while (bm->nr_cached - bm->nr_locked >= bm->cache_blocks && bm->lru_tail) {
		struct tfs_block *b = bm->lru_tail;
		if (b->dirty) {
			int r = write_block(bm, b);
			if (r)
				return r;
		}
		lru_unlink(bm, b);
		free_block(bm, b);
		bm->stats.evictions++;
	}
	return 0;
}

/* A free slot holding blocknr, in the hash table but on no list. */
static int new_slot(struct tfs_bm *bm, uint64_t blocknr, struct tfs_block **out)
{
	struct tfs_block *b;
	size_t h;
	int r;

	if (!bm->free_blocks) {
		r = add_slab(bm);
		if (r)
			return r;
	}
	b = bm->free_blocks;
	bm->free_blocks = b->hash_next;
	UNPOISON(b->data, TFS_BLOCK_SIZE);
	b->blocknr = blocknr;
	b->bm = bm;
	h = hash_of(bm, blocknr);
	b->hash_next = bm->hash[h];
	bm->hash[h] = b;
	bm->nr_cached++;
	*out = b;
	return 0;
}

static int alloc_block(struct tfs_bm *bm, uint64_t blocknr, struct tfs_block **out)
{
	int r = evict(bm);

	return r ? r : new_slot(bm, blocknr, out);
}

static int validate(struct tfs_bm *bm, struct tfs_block *b, const struct tfs_block_validator *v)
{
	char why[160] = "";
	int r;

	if (!v || !v->check)
		return 0;
	r = v->check(v, b->data, b->blocknr, why, sizeof(why));
	if (r) {
		tfs_err("%s: metadata block %llu is not a valid %s: %s", bm->dev->name,
			(unsigned long long)b->blocknr, v->name, why);
		return r;
	}
	b->v = v;
	return 0;
}

static void pin(struct tfs_bm *bm, struct tfs_block *b)
{
	if (b->lock_count++ == 0) {
		lru_unlink(bm, b);
		bm->nr_locked++;
	}
}

static int get_block(struct tfs_bm *bm, uint64_t blocknr, const struct tfs_block_validator *v,
		     bool zero, struct tfs_block **out)
{
	struct tfs_block *b;
	int r;

	if (blocknr >= bm->nr_blocks && blocknr >= tfs_bm_nr_blocks(bm)) {
		tfs_err("%s: metadata block %llu is past the end of the device (%llu blocks)",
			bm->dev->name, (unsigned long long)blocknr,
			(unsigned long long)tfs_bm_nr_blocks(bm));
		return -EINVAL;
	}
	b = find(bm, blocknr);
	if (b) {
		bm->stats.hits++;
		if (zero) {
			memset(b->data, 0, TFS_BLOCK_SIZE);
			b->v = v;
			b->unchecked = false;
		} else if (b->v != v) {
			/* A block read ahead has no validator yet: it is checked here, once. */
			r = validate(bm, b, v);
			/* Read ahead and corrupt: gone, as if read now, so the next lock rereads it. */
			if (r && b->unchecked && !b->lock_count) {
				lru_unlink(bm, b);
				free_block(bm, b);
			}
			if (r)
				return r;
			b->unchecked = false;
		}
		pin(bm, b);
		*out = b;
		return 0;
	}

	bm->stats.misses++;
	r = alloc_block(bm, blocknr, &b);
	if (r)
		return r;
	if (zero) {
		memset(b->data, 0, TFS_BLOCK_SIZE);
		b->v = v;
	} else {
		r = tfs_bdev_read(bm->dev, b->data, TFS_BLOCK_SIZE, blocknr * TFS_BLOCK_SIZE);
		bm->stats.reads++;
		if (r) {
			tfs_err("%s: reading metadata block %llu failed: %s", bm->dev->name,
				(unsigned long long)blocknr, strerror(-r));
			goto err_free;
		}
		r = validate(bm, b, v);
		if (r)
			goto err_free;
	}
	pin(bm, b);
	*out = b;
	return 0;

err_free:
	free_block(bm, b);
	return r;
}

int tfs_bm_create(struct tfs_bdev *dev, size_t cache_blocks, struct tfs_bm **out)
{
	struct tfs_bm *bm = calloc(1, sizeof(*bm));
	size_t buckets = 1024;

	if (!bm)
		return -ENOMEM;
	if (cache_blocks < 16)
		cache_blocks = 16;
	while (buckets < cache_blocks)
		buckets <<= 1;
	bm->hash = calloc(buckets, sizeof(*bm->hash));
	if (!bm->hash) {
		free(bm);
		return -ENOMEM;
	}
	bm->hash_mask = buckets - 1;
	bm->dev = dev;
	bm->cache_blocks = cache_blocks;
	tfs_bm_nr_blocks(bm);
	*out = bm;
	return 0;
}

static void drop_all(struct tfs_bm *bm)
{
	for (size_t i = 0; i <= bm->hash_mask; i++) {
		while (bm->hash[i]) {
			struct tfs_block *b = bm->hash[i];
			if (b->lock_count)
				bm->nr_locked--;
			else
				lru_unlink(bm, b);
			free_block(bm, b);
		}
	}
}

static void prefetch_pool_stop(struct prefetch_pool *pool); /* with the read-ahead, below */

void tfs_bm_destroy(struct tfs_bm *bm)
{
	if (!bm)
		return;
	if (bm->nr_locked)
		tfs_warn("%s: block manager destroyed with %zu blocks locked", bm->dev->name,
			 bm->nr_locked);
	prefetch_pool_stop(bm->prefetch_pool);
	free(bm->prefetch_staging);
	drop_all(bm);
	free_slabs(bm);
	free(bm->hash);
	free(bm);
}

uint64_t tfs_bm_nr_blocks(struct tfs_bm *bm)
{
	uint64_t bytes = 0;

	if (tfs_bdev_size(bm->dev, &bytes))
		return 0;
	bm->nr_blocks = bytes / TFS_BLOCK_SIZE;
	return bm->nr_blocks;
}

struct tfs_bdev *tfs_bm_bdev(struct tfs_bm *bm)
{
	return bm->dev;
}

int tfs_bm_read_lock(struct tfs_bm *bm, uint64_t blocknr, const struct tfs_block_validator *v,
		     struct tfs_block **out)
{
	return get_block(bm, blocknr, v, false, out);
}

int tfs_bm_write_lock(struct tfs_bm *bm, uint64_t blocknr, const struct tfs_block_validator *v,
		      struct tfs_block **out)
{
	int r = get_block(bm, blocknr, v, false, out);

	if (!r)
		mark_dirty(bm, *out);
	return r;
}

int tfs_bm_write_lock_zero(struct tfs_bm *bm, uint64_t blocknr,
			   const struct tfs_block_validator *v, struct tfs_block **out)
{
	int r = get_block(bm, blocknr, v, true, out);

	if (!r)
		mark_dirty(bm, *out);
	return r;
}

void tfs_bm_unlock(struct tfs_block *b)
{
	struct tfs_bm *bm = b->bm;

	/* A double unlock would put the block on the LRU list twice. */
	assert(b->lock_count > 0);
	if (--b->lock_count == 0) {
		bm->nr_locked--;
		lru_push(bm, b);
	}
}

void *tfs_block_data(struct tfs_block *b)
{
	return b->data;
}

uint64_t tfs_block_location(const struct tfs_block *b)
{
	return b->blocknr;
}

static int cmp_blocknr(const void *a, const void *b)
{
	uint64_t x = (*(struct tfs_block *const *)a)->blocknr;
	uint64_t y = (*(struct tfs_block *const *)b)->blocknr;
	return x < y ? -1 : x > y;
}

int tfs_bm_write_now(struct tfs_bm *bm, struct tfs_block *b)
{
	return write_block(bm, b);
}

struct tfs_bm_batch {
	struct tfs_bdev *dev;
	size_t nr;
	char write_error[160]; /* the failed write, for tfs_bm_take_write_error */
	struct tfs_block *v[];
};

static struct tfs_bm_batch *batch_alloc(struct tfs_bm *bm, size_t nr)
{
	struct tfs_bm_batch *batch = malloc(sizeof(*batch) + nr * sizeof(batch->v[0]));

	if (batch) {
		batch->dev = bm->dev;
		batch->nr = 0;
		batch->write_error[0] = '\0';
	}
	return batch;
}

/*
 * Pinned only: the seal (a checksum of the whole block) is computed later,
 * on the copy batch_write writes, with no lock held.  Sealing here cost
 * about 0.7 us a block under the owner's lock, which for the pool is the
 * lock every request takes: 1-2 ms per commit once a second with 1,500
 * dirty blocks, every request queued behind it (bench/README.md, "The
 * long job's tail: commits' seals out of the pool lock").  The cached
 * block itself is never sealed by a batch, so readers of the cache, and a
 * shadow copied from it, never see its header change under them.
 */
static void batch_add(struct tfs_bm *bm, struct tfs_bm_batch *batch, struct tfs_block *b)
{
	pin(bm, b);
	batch->v[batch->nr++] = b;
}

int tfs_bm_batch_dirty(struct tfs_bm *bm, struct tfs_bm_batch **out)
{
	struct tfs_bm_batch *batch = batch_alloc(bm, bm->nr_dirty);
	struct tfs_block *b;

	if (!batch)
		return -ENOMEM;
	for (b = bm->dirty_head; b; b = b->dirty_next)
		if (!b->lock_count)
			batch_add(bm, batch, b);
	/* Written in block order: metadata devices are mostly sequential that way. */
	qsort(batch->v, batch->nr, sizeof(batch->v[0]), cmp_blocknr);
	*out = batch;
	return 0;
}

int tfs_bm_batch_one(struct tfs_bm *bm, struct tfs_block *b, struct tfs_bm_batch **out)
{
	struct tfs_bm_batch *batch = batch_alloc(bm, 1);

	if (!batch)
		return -ENOMEM;
	batch_add(bm, batch, b);
	*out = batch;
	return 0;
}

/*
 * Blocks [i, i + n) of the batch, neighbours on the device, in one write
 * through staging (aligned, room for n blocks): a commit allocates its
 * blocks mostly in order, and one write per block costs a device round
 * trip each on an O_DIRECT device.  Each block is sealed in its staged
 * copy (batch_add says why).
 */
#define BATCH_RUN (256 * TFS_BLOCK_SIZE)

static int write_run(struct tfs_bm_batch *batch, size_t i, size_t n, uint8_t *staging)
{
	struct tfs_block *first = batch->v[i];
	int r;

	for (size_t k = 0; k < n; k++) {
		const struct tfs_block *b = batch->v[i + k];
		uint8_t *copy = staging + k * TFS_BLOCK_SIZE;

		memcpy(copy, b->data, TFS_BLOCK_SIZE);
		if (b->v && b->v->prepare)
			b->v->prepare(b->v, copy, b->blocknr);
	}
	r = tfs_bdev_write(batch->dev, staging, n * TFS_BLOCK_SIZE, first->blocknr * TFS_BLOCK_SIZE);
	if (r)
		write_failed(batch->dev, first, r, batch->write_error, sizeof(batch->write_error));
	return r;
}

int tfs_bm_batch_write(struct tfs_bm_batch *batch)
{
	_Alignas(TFS_BLOCK_SIZE) uint8_t one[TFS_BLOCK_SIZE];
	uint8_t *staging = NULL;
	size_t i, n, run_max = BATCH_RUN / TFS_BLOCK_SIZE;
	int r = 0;

	/* Without staging memory the blocks go one by one through one on the stack: slower, same result. */
	if (batch->nr > 1 && posix_memalign((void **)&staging, TFS_BLOCK_SIZE, BATCH_RUN))
		staging = NULL;
	if (!staging)
		run_max = 1;
	for (i = 0; i < batch->nr && !r; i += n) {
		n = 1;
		while (i + n < batch->nr && n < run_max &&
		       batch->v[i + n]->blocknr == batch->v[i]->blocknr + n)
			n++;
		r = write_run(batch, i, n, staging ? staging : one);
	}
	free(staging);
	if (r)
		return r;
	r = tfs_bdev_flush(batch->dev);
	if (r)
		tfs_err("%s: flushing metadata device failed: %s", batch->dev->name, strerror(-r));
	return r;
}

void tfs_bm_batch_end(struct tfs_bm *bm, struct tfs_bm_batch *batch, bool written)
{
	for (size_t i = 0; i < batch->nr; i++) {
		struct tfs_block *b = batch->v[i];

		if (written) {
			clear_dirty(bm, b);
			bm->stats.writes++;
		}
		tfs_bm_unlock(b);
	}
	if (batch->write_error[0])
		snprintf(bm->write_error, sizeof(bm->write_error), "%s", batch->write_error);
	free(batch);
}

int tfs_bm_flush(struct tfs_bm *bm)
{
	struct tfs_bm_batch *batch;
	int r = tfs_bm_batch_dirty(bm, &batch);

	if (r)
		return r;
	r = tfs_bm_batch_write(batch);
	tfs_bm_batch_end(bm, batch, !r);
	return r;
}

void tfs_bm_invalidate(struct tfs_bm *bm)
{
	assert(bm->nr_locked == 0);
	drop_all(bm);
}

void tfs_bm_forget(struct tfs_bm *bm, uint64_t blocknr)
{
	struct tfs_block *b = find(bm, blocknr);

	if (!b || b->lock_count)
		return;
	lru_unlink(bm, b);
	free_block(bm, b);
}

void tfs_bm_drop_clean(struct tfs_bm *bm, uint64_t blocknr)
{
	struct tfs_block *b = find(bm, blocknr);

	if (!b || b->lock_count || b->dirty)
		return;
	lru_unlink(bm, b);
	free_block(bm, b);
}

void tfs_bm_stats(struct tfs_bm *bm, struct tfs_bm_stats *out)
{
	*out = bm->stats;
	out->cached = bm->nr_cached;
	out->dirty = bm->nr_dirty;
	out->locked = bm->nr_locked;
	out->allocated = bm->nr_slabs * SLAB_BLOCKS;
}

/*
 * Read-ahead.  Runs of neighbouring blocks go in one read each (a metadata
 * device is opened O_DIRECT, so the host reads ahead nothing, and one
 * 4 KiB round trip per btree node is what made a cold walk slow), and up
 * to PREFETCH_THREADS runs are in flight at once: the blocks a walk is
 * about to visit are mostly scattered, and a device (or the host below a
 * virtual disk) serves many requests at once far faster than one after
 * another.  Plain threads calling tfs_bdev_read rather than io_uring, so
 * that every backing device, the fault-injecting one included, serves the
 * reads.  The threads are started at the first read-ahead that has
 * PREFETCH_POOL_RUNS runs or more and kept (idle, waiting for work) until
 * tfs_bm_destroy: starting them for each call cost more than the reads
 * from a fast device.
 */
#define PREFETCH_RUN 32u    /* blocks in one read: 128 KiB */
#define PREFETCH_THREADS 8u /* the caller's thread included */
#define PREFETCH_MAX 1024u  /* blocks in one call, whatever the cache size */
#define PREFETCH_STACK (256u * 1024)
/* Fewer runs are read by the caller alone: a lookup of a few leaves starts no thread. */
#define PREFETCH_POOL_RUNS 4u

struct prefetch_run {
	struct tfs_block **v; /* PREFETCH_RUN at most, neighbours on the device */
	unsigned n;
	int r;
};

struct prefetch_job {
	struct tfs_bdev *dev;
	struct prefetch_run *runs;
	size_t nr_runs;
	atomic_size_t next; /* the first run no thread has taken */
};

/* The workers of one block manager; every field under lock. */
struct prefetch_pool {
	pthread_mutex_t lock;
	pthread_cond_t work, idle;
	struct prefetch_job *job; /* the call in progress, NULL between calls */
	uint64_t gen;             /* calls so far: a worker joins each call once */
	unsigned busy;            /* workers inside job */
	unsigned nr_threads;
	bool stop;
	pthread_t threads[PREFETCH_THREADS - 1];
};

static int read_run(struct tfs_bdev *dev, struct prefetch_run *run, uint8_t *staging)
{
	int r;

	if (run->n == 1 || !staging)
		for (unsigned k = 0; k < run->n; k++) {
			r = tfs_bdev_read(dev, run->v[k]->data, TFS_BLOCK_SIZE,
					  run->v[k]->blocknr * TFS_BLOCK_SIZE);
			if (r)
				return r;
		}
	else {
		r = tfs_bdev_read(dev, staging, (size_t)run->n * TFS_BLOCK_SIZE,
				  run->v[0]->blocknr * TFS_BLOCK_SIZE);
		if (r)
			return r;
		for (unsigned k = 0; k < run->n; k++)
			memcpy(run->v[k]->data, staging + (size_t)k * TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	}
	return 0;
}

static void run_job(struct prefetch_job *job, uint8_t *staging)
{
	size_t i;

	while ((i = atomic_fetch_add(&job->next, 1)) < job->nr_runs)
		job->runs[i].r = read_run(job->dev, &job->runs[i], staging);
}

/* Without staging memory a run goes block by block: slower, same result. */
static uint8_t *alloc_staging(void)
{
	void *p;

	return posix_memalign(&p, TFS_BLOCK_SIZE, PREFETCH_RUN * TFS_BLOCK_SIZE) ? NULL : p;
}

static void *prefetch_worker(void *arg)
{
	struct prefetch_pool *pool = arg;
	uint8_t *staging = alloc_staging();
	uint64_t seen = 0;

	pthread_mutex_lock(&pool->lock);
	for (;;) {
		struct prefetch_job *job;

		while (!pool->stop && (!pool->job || seen == pool->gen))
			pthread_cond_wait(&pool->work, &pool->lock);
		if (pool->stop)
			break;
		seen = pool->gen;
		job = pool->job;
		pool->busy++;
		pthread_mutex_unlock(&pool->lock);
		run_job(job, staging);
		pthread_mutex_lock(&pool->lock);
		if (--pool->busy == 0)
			pthread_cond_signal(&pool->idle);
	}
	pthread_mutex_unlock(&pool->lock);
	free(staging);
	return NULL;
}

/* The pool with its threads, or NULL (then the caller reads alone). */
static struct prefetch_pool *prefetch_pool_start(void)
{
	struct prefetch_pool *pool = calloc(1, sizeof(*pool));
	pthread_attr_t attr;

	if (!pool)
		return NULL;
	pthread_mutex_init(&pool->lock, NULL);
	pthread_cond_init(&pool->work, NULL);
	pthread_cond_init(&pool->idle, NULL);
	if (pthread_attr_init(&attr))
		goto err_free;
	pthread_attr_setstacksize(&attr, PREFETCH_STACK);
	while (pool->nr_threads < PREFETCH_THREADS - 1 &&
	       !pthread_create(&pool->threads[pool->nr_threads], &attr, prefetch_worker, pool))
		pool->nr_threads++;
	pthread_attr_destroy(&attr);
	if (pool->nr_threads)
		return pool;
err_free:
	pthread_cond_destroy(&pool->idle);
	pthread_cond_destroy(&pool->work);
	pthread_mutex_destroy(&pool->lock);
	free(pool);
	return NULL;
}

static void prefetch_pool_stop(struct prefetch_pool *pool)
{
	if (!pool)
		return;
	pthread_mutex_lock(&pool->lock);
	pool->stop = true;
	pthread_cond_broadcast(&pool->work);
	pthread_mutex_unlock(&pool->lock);
	for (unsigned t = 0; t < pool->nr_threads; t++)
		pthread_join(pool->threads[t], NULL);
	pthread_cond_destroy(&pool->idle);
	pthread_cond_destroy(&pool->work);
	pthread_mutex_destroy(&pool->lock);
	free(pool);
}

/* Every run read when this returns: the caller's thread reads too. */
static void prefetch_read(struct tfs_bm *bm, struct prefetch_job *job)
{
	struct prefetch_pool *pool;

	if (job->nr_runs >= PREFETCH_POOL_RUNS && !bm->prefetch_pool)
		bm->prefetch_pool = prefetch_pool_start();
	if (!bm->prefetch_staging)
		bm->prefetch_staging = alloc_staging();
	pool = job->nr_runs >= PREFETCH_POOL_RUNS ? bm->prefetch_pool : NULL;
	if (pool) {
		pthread_mutex_lock(&pool->lock);
		pool->job = job;
		pool->gen++;
		for (size_t t = 1; t < job->nr_runs && t <= pool->nr_threads; t++)
			pthread_cond_signal(&pool->work);
		pthread_mutex_unlock(&pool->lock);
	}
	run_job(job, bm->prefetch_staging);
	if (pool) {
		pthread_mutex_lock(&pool->lock);
		pool->job = NULL;
		while (pool->busy)
			pthread_cond_wait(&pool->idle, &pool->lock);
		pthread_mutex_unlock(&pool->lock);
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

size_t tfs_bm_prefetch_window(const struct tfs_bm *bm)
{
	size_t w = bm->cache_blocks / 4;

	return w < PREFETCH_MAX ? w : PREFETCH_MAX;
}

/*
 * Room for one more unlocked block, made only by dropping clean unlocked
 * ones: a read-ahead never writes a dirty block early, nor unpins one.
 */
static bool clean_room(struct tfs_bm *bm)
{
	while (bm->nr_cached - bm->nr_locked >= bm->cache_blocks) {
		struct tfs_block *b = bm->lru_tail;

		if (!b || b->dirty)
			return false;
		lru_unlink(bm, b);
		free_block(bm, b);
		bm->stats.evictions++;
	}
	return true;
}

int tfs_bm_prefetch(struct tfs_bm *bm, const uint64_t *blocknrs, size_t n)
{
	size_t window = tfs_bm_prefetch_window(bm), want = 0, got = 0;
	struct prefetch_job job = { .dev = bm->dev };
	struct tfs_block **blocks = NULL;
	uint64_t *todo = NULL;
	int r = 0;

	/* The first window of blocks the cache lacks, in the caller's order (its priority). */
	for (size_t i = 0; i < n && want < window; i++) {
		if (blocknrs[i] >= bm->nr_blocks || find(bm, blocknrs[i]))
			continue;
		if (!todo) {
			todo = malloc(window * sizeof(*todo));
			if (!todo)
				return -ENOMEM;
		}
		todo[want++] = blocknrs[i];
	}
	if (!want)
		return 0;
	qsort(todo, want, sizeof(*todo), cmp_u64);
	blocks = malloc(want * sizeof(*blocks));
	job.runs = malloc(want * sizeof(*job.runs));
	if (!blocks || !job.runs) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < want; i++) {
		if (i && todo[i] == todo[i - 1])
			continue;
		if (!clean_room(bm) || new_slot(bm, todo[i], &blocks[got]))
			break;
		if (job.nr_runs && job.runs[job.nr_runs - 1].n < PREFETCH_RUN &&
		    blocks[got - 1]->blocknr + 1 == todo[i])
			job.runs[job.nr_runs - 1].n++;
		else
			job.runs[job.nr_runs++] = (struct prefetch_run){ .v = &blocks[got], .n = 1 };
		got++;
	}
	prefetch_read(bm, &job);

	/* A failed read leaves its blocks out; the lock that needs one reads it and reports. */
	for (size_t i = 0; i < job.nr_runs; i++) {
		struct prefetch_run *run = &job.runs[i];

		for (unsigned k = 0; k < run->n; k++) {
			struct tfs_block *b = run->v[k];

			if (run->r) {
				free_block(bm, b);
				continue;
			}
			b->v = NULL;
			b->unchecked = true;
			lru_push(bm, b);
			bm->stats.reads++;
			bm->stats.prefetched++;
			r++;
		}
	}
out:
	free(job.runs);
	free(blocks);
	free(todo);
	return r;
}
