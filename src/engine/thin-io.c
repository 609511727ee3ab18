/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The thin target's devices (target.h, kind "thin"): read, write,
 * discard, provision, zero range, clone range, truncate, seek, flush,
 * allocated space and status, behind the ops table at the end.
 *
 * Every request takes one prison cell over its whole block range (shared
 * for reads; a clone takes one on each device, see clone_lock), then works in chunks of up to TFS_POOL_CHUNK blocks: one
 * lookup_range and any allocations under the metadata lock; the data I/O
 * with no lock held; then the new mappings inserted under the lock again.
 * Neighbouring blocks whose data blocks are neighbours too go to the data
 * device as one read or write.
 *
 * Per block, a write goes in place (mapped, not shared), to a new block
 * (unmapped: the rest of the block zeroed unless skip_block_zeroing), or
 * to a new block holding a copy of the old one (mapped but shared with a
 * snapshot).  "Shared" is the metadata's time test alone: a data block
 * count of 1 does not prove a mapping exclusive, because a snapshot shares
 * whole leaves, and the blocks of a leaf nobody has written since the
 * snapshot keep count 1 while two devices map them.  With detect_zeroes,
 * a block the write covers whole with zeros is unmapped instead.
 */
#include "pool-internal.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "scratch.h"

/* Largest piece of a block staged in memory; bigger blocks are copied piecewise. */
#define BOUNCE_MAX (1u << 20)

/*
 * New blocks up to this size are written whole (zeros around the data)
 * even into a preallocated chunk.  Each write into the unwritten rest of a
 * block would be an extent conversion for the host file system, and the
 * data file's extents would split two or three per block: on ext4 that
 * cost the daemon a quarter to a third of its CPU per 4 KiB request and
 * doubled the long allocating job's p99.9 (bench/README.md, "Issue 10's
 * 4 KiB rows, thin4k branch").  Written whole, the block is one conversion,
 * merged with its neighbours, and later writes to it are plain overwrites;
 * the price is the block's bytes on its first write, 16 times 4 KiB at
 * 64 KiB, which grows with the block, so larger blocks keep partial writes.
 */
#define WHOLE_NEW_MAX (64u << 10)

/*
 * The source of every zero written to the data device; never written
 * itself.  Page-aligned, like every buffer here, so that an O_DIRECT data
 * device takes it as it is.
 */
static _Alignas(4096) uint8_t zero_buf[BOUNCE_MAX];

enum act {
	ACT_SKIP,    /* leave the block alone */
	ACT_INPLACE, /* write into the block already mapped */
	ACT_NEW,     /* allocate, fill around the data with zeros, map */
	ACT_COPY,    /* allocate, fill around the data from the shared block, map */
};

enum how {
	HOW_DATA,        /* a write */
	HOW_PROVISION,   /* map zeroed blocks where none are mapped */
	HOW_ZERO_MAPPED, /* zero part of blocks, only where mapped (edges of a punch) */
};

struct plan {
	enum act act;
	uint64_t target; /* data block written */
	uint64_t old;    /* ACT_COPY: the shared block copied */
	bool ready;      /* ACT_NEW/ACT_COPY: target lies in a preallocated chunk (prealloc.h) */
};

/* One chunk of a write-like request: blocks [b0, b0 + nr), bytes [off, end). */
struct chunk {
	struct tfs_thin_dev *vol;
	struct tfs_pool *pool;
	const uint8_t *buf; /* the data for [off, end); NULL = zeros */
	uint64_t off, end;
	uint64_t b0;
	unsigned nr;
	enum how how;
	unsigned nr_alloc;  /* blocks allocated for ACT_NEW / ACT_COPY */
	struct tfs_pool_allocs allocs; /* them, known to the pool until inserted or freed */
	uint64_t abort_gen; /* when they were allocated */
	bool free_zero;     /* when they were allocated: new blocks read as zeros already */
	uint8_t *bounce;    /* lazily taken, the thread's scratch of bounce_len bytes */
	bool any_zero;      /* detect_zeroes found a block below */
	bool zero[TFS_POOL_CHUNK]; /* the request writes block i whole, all zeros */
	struct plan plan[TFS_POOL_CHUNK];
};

/* A run of neighbouring bytes on the data device and in memory. */
struct run {
	uint64_t dev_off;
	const uint8_t *src; /* writes: NULL = zeros */
	uint8_t *dst;       /* reads */
	size_t len;
};

static int check_write(const struct tfs_thin_dev *vol)
{
	return vol->read_only || vol->pool->opened_read_only ? -EROFS : 0;
}

/* Blocks [*b0, *b1) that bytes [off, off + len) touch; len > 0. */
static int block_range(const struct tfs_thin_dev *vol, uint64_t off, uint64_t len, uint64_t *b0,
		       uint64_t *b1)
{
	uint64_t bs = vol->pool->block_size;

	if (off + len < off) {
		tfs_err("thin device %u: range of %llu bytes at %llu wraps around", vol->id,
			(unsigned long long)len, (unsigned long long)off);
		return -EINVAL;
	}
	*b0 = off / bs;
	*b1 = (off + len - 1) / bs + 1;
	return 0;
}

/* Where the chunk that starts at cur ends: at most TFS_POOL_CHUNK blocks, and never past end. */
static uint64_t chunk_end(uint64_t bs, uint64_t cur, uint64_t end)
{
	uint64_t next = cur / bs + TFS_POOL_CHUNK;

	return next > (end - 1) / bs ? end : next * bs;
}

static int lookup_failed(const struct tfs_thin_dev *vol, uint64_t b0, uint64_t b1, int err)
{
	tfs_err("thin device %u: looking up blocks %llu-%llu failed: %s", vol->id,
		(unsigned long long)b0, (unsigned long long)(b1 - 1), strerror(-err));
	return err == -ENODEV ? err : -EIO;
}

/* ---- data device I/O ------------------------------------------------------------ */

static int write_src(struct tfs_pool *pool, const uint8_t *src, size_t len, uint64_t dev_off)
{
	int r = 0;

	if (src)
		return tfs_bdev_write(pool->data, src, len, dev_off);
	while (len && !r) {
		size_t n = len < BOUNCE_MAX ? len : BOUNCE_MAX;

		r = tfs_bdev_write(pool->data, zero_buf, n, dev_off);
		len -= n;
		dev_off += n;
	}
	return r;
}

static int run_write(struct tfs_pool *pool, struct run *run)
{
	int r = run->len ? write_src(pool, run->src, run->len, run->dev_off) : 0;

	run->len = 0;
	return r;
}

/* Extend the pending write with the next piece, or write it out and start anew. */
static int run_add_write(struct tfs_pool *pool, struct run *run, uint64_t dev_off,
			 const uint8_t *src, size_t len)
{
	bool joins = run->len && run->dev_off + run->len == dev_off &&
		     (src ? run->src && run->src + run->len == src : !run->src);
	int r = 0;

	if (joins) {
		run->len += len;
		return 0;
	}
	r = run_write(pool, run);
	*run = (struct run){ .dev_off = dev_off, .src = src, .len = len };
	return r;
}

static int run_read(struct tfs_pool *pool, struct run *run)
{
	int r = run->len ? tfs_bdev_read(pool->data, run->dst, run->len, run->dev_off) : 0;

	run->len = 0;
	return r;
}

/* ---- writes ------------------------------------------------------------------------ */

/* The bytes of block i the chunk writes, as offsets [*s, *e) within the block. */
static void block_span(const struct chunk *c, unsigned i, uint64_t *s, uint64_t *e)
{
	uint64_t bs = c->pool->block_size, start = (c->b0 + i) * bs;

	if (c->how == HOW_PROVISION) { /* a provisioned block is zeroed whole */
		*s = 0;
		*e = bs;
		return;
	}
	*s = c->off > start ? c->off - start : 0;
	*e = c->end - start < bs ? c->end - start : bs;
}

static enum act classify(enum how how, const struct tfs_thin_mapping *m)
{
	if (!m)
		return how == HOW_ZERO_MAPPED ? ACT_SKIP : ACT_NEW;
	if (how == HOW_PROVISION)
		return ACT_SKIP;
	return m->shared ? ACT_COPY : ACT_INPLACE;
}

/*
 * detect_zeroes = unmap, no lock held: which blocks the chunk writes
 * whole with zeros.  It costs a read of every whole block written; a
 * block found nonzero stops at its first nonzero byte.
 */
static void find_zero_blocks(struct chunk *c)
{
	uint64_t bs = c->pool->block_size;

	for (unsigned i = 0; i < c->nr; i++) {
		uint64_t start = (c->b0 + i) * bs, done = 0;

		c->zero[i] = false;
		if (start < c->off || start + bs > c->end)
			continue;
		while (done < bs) {
			uint64_t n = bs - done < BOUNCE_MAX ? bs - done : BOUNCE_MAX;

			if (memcmp(c->buf + (start - c->off) + done, zero_buf, n))
				break;
			done += n;
		}
		c->zero[i] = done == bs;
		c->any_zero |= c->zero[i];
	}
}

/*
 * With the lock held: the zero blocks of the plan (find_zero_blocks).  An
 * unmapped one stays so; a mapped one is unmapped now, as a discard would
 * (its data block passed down if nobody maps it), unless metadata cannot
 * change (read_only mode): then the zeros are written as any data.
 */
static int plan_zero_blocks(struct chunk *c, const struct tfs_thin_mapping *const *m)
{
	struct tfs_pool *pool = c->pool;
	bool mapped = false;
	int r;

	for (unsigned i = 0; i < c->nr; i++) {
		if (!c->zero[i])
			continue;
		mapped |= m[i] != NULL;
		if (!m[i])
			c->plan[i].act = ACT_SKIP;
	}
	if (!mapped || tfs_pool_may_change(pool))
		return 0;
	for (unsigned i = 0; i < c->nr; i++) {
		if (!c->zero[i] || !m[i])
			continue;
		r = tfs_thin_remove(c->vol->ref->td, c->b0 + i);
		if (r)
			return tfs_pool_meta_failed(pool, r, "unmapping a block written with zeros");
		tfs_pool_passdown_if_free(pool, m[i]->data_block);
		c->plan[i].act = ACT_SKIP;
		pool->dirty = true;
	}
	return 0;
}

/* With the lock held: look the chunk up in one call, plan each block, allocate what is new. */
static int plan_chunk(struct chunk *c)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	const struct tfs_thin_mapping *m[TFS_POOL_CHUNK];
	struct tfs_pool *pool = c->pool;
	unsigned j = 0, k = 0;
	int n, r;

	r = tfs_pool_may_io(pool);
	if (r)
		return r;
	n = tfs_thin_lookup_range(c->vol->ref->td, c->b0, c->b0 + c->nr, c->nr, maps);
	if (n < 0)
		return lookup_failed(c->vol, c->b0, c->b0 + c->nr, n);
	for (unsigned i = 0; i < c->nr; i++) {
		struct plan *p = &c->plan[i];

		m[i] = j < (unsigned)n && maps[j].vblock == c->b0 + i ? &maps[j++] : NULL;
		p->act = classify(c->how, m[i]);
		p->old = m[i] ? m[i]->data_block : 0;
		p->target = p->old;
	}
	if (c->any_zero) {
		r = plan_zero_blocks(c, m);
		if (r)
			return r;
	}
	c->nr_alloc = 0;
	for (unsigned i = 0; i < c->nr; i++)
		if (c->plan[i].act == ACT_NEW || c->plan[i].act == ACT_COPY)
			c->nr_alloc++;
	if (!c->nr_alloc)
		return 0;
	r = tfs_pool_alloc(pool, &c->allocs, c->nr_alloc);
	if (r) {
		c->nr_alloc = 0;
		return r;
	}
	c->abort_gen = pool->abort_gen;
	c->free_zero = atomic_load(&pool->free_zero);
	for (unsigned i = 0; i < c->nr; i++) {
		struct plan *p = &c->plan[i];

		if (p->act != ACT_NEW && p->act != ACT_COPY)
			continue;
		p->target = c->allocs.blocks[k++];
		p->ready = false; /* prepare_targets asks, with the lock dropped */
	}
	return 0;
}

/* The staging buffer build_block needs: a block, or a piece of one. */
static size_t bounce_len(const struct tfs_pool *pool)
{
	return pool->block_size < BOUNCE_MAX ? (size_t)pool->block_size : BOUNCE_MAX;
}

/*
 * A new block only part of which the request writes: stage it piece by
 * piece (one piece for blocks up to BOUNCE_MAX), each filled from the old
 * block (copy) or with zeros, the new data laid over it, then written.
 * Pieces the data covers whole are written straight from it.
 */
static int build_block(struct chunk *c, const struct plan *p, uint64_t s, uint64_t e,
		       const uint8_t *src)
{
	uint64_t bs = c->pool->block_size;
	uint64_t piece = bounce_len(c->pool);
	int r = 0;

	for (uint64_t ps = 0; ps < bs && !r; ps += piece) {
		uint64_t pe = ps + piece < bs ? ps + piece : bs;
		uint64_t os = s > ps ? s : ps, oe = e < pe ? e : pe;
		uint64_t dev_off = p->target * bs + ps;

		if (s <= ps && pe <= e) {
			r = write_src(c->pool, src ? src + (ps - s) : NULL, pe - ps, dev_off);
			continue;
		}
		if (!c->bounce) {
			c->bounce = tfs_scratch_get(bounce_len(c->pool));
			if (!c->bounce)
				return -ENOMEM;
		}
		if (p->act == ACT_COPY)
			r = tfs_bdev_read(c->pool->data, c->bounce, pe - ps, p->old * bs + ps);
		else
			memset(c->bounce, 0, pe - ps);
		if (r)
			break;
		if (os < oe && src)
			memcpy(c->bounce + (os - ps), src + (os - s), oe - os);
		else if (os < oe)
			memset(c->bounce + (os - ps), 0, oe - os);
		r = tfs_bdev_write(c->pool->data, c->bounce, pe - ps, dev_off);
	}
	return r;
}

/*
 * No lock held: fallocate the chunks of the data file the new blocks lie
 * in where that was not done yet, so that writing them is an overwrite for
 * the host file system, not an allocation.  Once per chunk of the data
 * file (a chunk marked already costs one mutex round trip, here rather
 * than under the pool lock, which every other request needs); a failure
 * leaves the rest as they are for this request, which then fills its
 * blocks whole.
 */
static void prepare_targets(struct chunk *c)
{
	struct tfs_prealloc *pa = c->pool->prealloc;

	if (!pa)
		return;
	for (unsigned i = 0; i < c->nr; i++) {
		struct plan *p = &c->plan[i];

		if (p->act != ACT_NEW && p->act != ACT_COPY)
			continue;
		if (tfs_prealloc_fill(pa, p->target))
			return;
		p->ready = true;
	}
}

/* No lock held: the chunk's data I/O. */
static int write_chunk_data(struct chunk *c)
{
	struct tfs_pool *pool = c->pool;
	uint64_t bs = pool->block_size;
	struct run run = { 0 };
	bool in_place = false;
	int r = 0;

	if (c->nr_alloc)
		prepare_targets(c);

	for (unsigned i = 0; i < c->nr && !r; i++) {
		const struct plan *p = &c->plan[i];
		uint64_t s, e;
		const uint8_t *src;
		bool plain;

		if (p->act == ACT_SKIP)
			continue;
		/* A provisioned block is all zeros, and a free block reads as that already. */
		if (p->act == ACT_NEW && c->how == HOW_PROVISION && c->free_zero)
			continue;
		in_place |= p->act == ACT_INPLACE;
		block_span(c, i, &s, &e);
		src = c->buf ? c->buf + ((c->b0 + i) * bs + s - c->off) : NULL;
		/*
		 * A partial write to a new block writes only its bytes when free
		 * blocks read as zeros, the block is preallocated and larger than
		 * WHOLE_NEW_MAX.  Into a hole of a sparse data file every 4 KiB
		 * written would be an allocation of the host file system, which
		 * serialises direct I/O to the file (measured: 4 KiB random
		 * allocating writes 12k IOPS writing 4 KiB, 39k writing the
		 * block); the block is then written whole instead.
		 */
		plain = p->act == ACT_INPLACE || (s == 0 && e == bs) ||
			(p->act == ACT_NEW && c->how == HOW_DATA &&
			 (pool->cfg.skip_block_zeroing ||
			  (c->free_zero && p->ready && bs > WHOLE_NEW_MAX)));
		if (p->act != ACT_INPLACE && (s || e < bs))
			atomic_fetch_add(plain ? &pool->new_written_partly : &pool->new_filled_whole, 1);
		if (plain)
			r = run_add_write(pool, &run, p->target * bs + s, src, e - s);
		else
			r = build_block(c, p, s, e, src);
	}
	if (!r)
		r = run_write(pool, &run);
	if (r)
		tfs_err("thin device %u: writing data blocks failed: %s", c->vol->id, strerror(-r));
	/* No metadata changes for these, so no commit would flush them. */
	if (in_place)
		atomic_store(&pool->data_unflushed, true);
	return r;
}

/* With the lock held: map the new blocks; a copied block nobody maps any more is freed. */
static int insert_blocks(struct chunk *c)
{
	struct tfs_pool *pool = c->pool;
	int r;

	for (unsigned i = 0; i < c->nr; i++) {
		const struct plan *p = &c->plan[i];

		if (p->act != ACT_NEW && p->act != ACT_COPY)
			continue;
		r = tfs_thin_insert(c->vol->ref->td, c->b0 + i, p->target);
		if (r)
			return tfs_pool_meta_failed(pool, r, "inserting a mapping");
		/* A snapshot deleted since the mapping was made leaves the old block to us alone. */
		if (p->act == ACT_COPY)
			tfs_pool_passdown_if_free(pool, p->old);
	}
	pool->dirty = true;
	return 0;
}

static int release_blocks(struct chunk *c)
{
	for (unsigned i = 0; i < c->nr; i++) {
		const struct plan *p = &c->plan[i];
		int r;

		if (p->act != ACT_NEW && p->act != ACT_COPY)
			continue;
		r = tfs_pmd_free_data_block(c->pool->pmd, p->target);
		if (r)
			return tfs_pool_meta_failed(c->pool, r, "releasing an unused data block");
		/* Part of it may be written: punched before reuse, it reads as zeros again. */
		tfs_pool_passdown_if_free(c->pool, p->target);
	}
	return 0;
}

static int finish_chunk(struct chunk *c, int io_err)
{
	struct tfs_pool *pool = c->pool;
	int r;

	pthread_mutex_lock(&pool->lock);
	if (pool->abort_gen != c->abort_gen)
		r = -EIO; /* an abort rolled the allocations back: nothing to map or free */
	else if (io_err)
		r = release_blocks(c) ? -EIO : io_err;
	else
		r = insert_blocks(c);
	tfs_pool_alloc_done(pool, &c->allocs);
	pthread_mutex_unlock(&pool->lock);
	return r;
}

/* The prison cell a write-like request holds: blocks [b0, b1) of its device. */
struct cell {
	uint64_t b0, b1;
	struct tfs_core_io *io; /* the request, as the core knows it */
	bool nowait;            /* -EAGAIN rather than wait for space */
};

/*
 * Out of data space with error_if_no_space=false: wait for space with the
 * request's cell released, so snapshots, discards and other writes to
 * these blocks are not blocked behind a write that may wait for minutes.
 * The cell is retaken before returning, because the caller releases it,
 * except for TFS_POOL_PUSHBACK: the request then leaves the pool holding
 * nothing, so the suspend that pushed it back owes it nothing.  The plan
 * is rebuilt afterwards: the mappings may have changed meanwhile.
 */
static int hold_for_space(struct tfs_thin_dev *vol, const struct cell *cell)
{
	int r;

	tfs_prison_unlock(vol->pool->prison, vol->id, cell->b0, cell->b1);
	r = tfs_pool_hold_for_space(vol->pool, cell->io);
	if (r == TFS_POOL_PUSHBACK)
		return r;
	/*
	 * The caller unlocks the cell, so it must be held again; the only
	 * failure is -ENOMEM, which passes (a range was valid a moment ago).
	 */
	for (bool told = false;
	     tfs_prison_lock(vol->pool->prison, vol->id, cell->b0, cell->b1); told = true) {
		if (!told)
			tfs_err("thin device %u: out of memory retaking a range lock; retrying",
				vol->id);
		usleep(10000);
	}
	return r;
}

/* Bytes [off, end) of one chunk (chunk_end), under the request's cell. */
static int write_chunk(struct tfs_thin_dev *vol, const struct cell *cell, const uint8_t *buf,
		       uint64_t off, uint64_t end, enum how how)
{
	struct tfs_pool *pool = vol->pool;
	struct chunk c = { .vol = vol, .pool = pool, .buf = buf, .off = off, .end = end,
			   .how = how, .b0 = off / pool->block_size };
	int r;

	c.nr = (unsigned)((end - 1) / pool->block_size + 1 - c.b0);
	if (how == HOW_DATA && buf && pool->cfg.detect_zeroes)
		find_zero_blocks(&c);
	for (unsigned attempt = 0;; attempt++) {
		pthread_mutex_lock(&pool->lock);
		r = plan_chunk(&c);
		pthread_mutex_unlock(&pool->lock);
		if (r != -ENOSPC)
			break;
		r = tfs_pool_space_exhausted(pool, attempt);
		if (r == TFS_POOL_HOLD && cell->nowait)
			r = -EAGAIN;
		if (r == TFS_POOL_HOLD) {
			r = hold_for_space(vol, cell);
			attempt = UINT_MAX; /* wraps to 0: a fresh start after the wait */
		}
		if (r)
			break;
	}
	if (r)
		return r;
	r = write_chunk_data(&c);
	if (c.nr_alloc)
		r = finish_chunk(&c, r);
	tfs_scratch_put(c.bounce, bounce_len(pool));
	return r;
}

/* Bytes [off, end), end > off, under a cell covering them. */
static int write_range(struct tfs_thin_dev *vol, const struct cell *cell, const uint8_t *buf,
		       uint64_t off, uint64_t end, enum how how)
{
	uint64_t bs = vol->pool->block_size;
	int r = 0;

	for (uint64_t cur = off, cend; cur < end && !r; cur = cend) {
		cend = chunk_end(bs, cur, end);
		r = write_chunk(vol, cell, buf ? buf + (cur - off) : NULL, cur, cend, how);
	}
	return r;
}

/* A write-path request (data or provisioning) under one cell over its block range. */
static int locked_write(struct tfs_thin_dev *vol, struct tfs_core_io *io, const void *buf,
			uint64_t off, uint64_t len, enum how how, bool nowait)
{
	uint64_t b0, b1;
	int r;

	if (!len)
		return 0;
	r = check_write(vol);
	if (!r)
		r = block_range(vol, off, len, &b0, &b1);
	if (!r)
		r = tfs_prison_lock(vol->pool->prison, vol->id, b0, b1);
	if (r)
		return r;
	r = write_range(vol, &(struct cell){ b0, b1, io, nowait }, buf, off, off + len, how);
	if (r != TFS_POOL_PUSHBACK) /* a pushed-back request left its cell already */
		tfs_prison_unlock(vol->pool->prison, vol->id, b0, b1);
	return r;
}

/* ---- reads ---------------------------------------------------------------------------- */

int tfs_thin_lookup_chunk(struct tfs_thin_dev *vol, uint64_t b0, unsigned nr,
			  struct tfs_thin_mapping *maps)
{
	struct tfs_pool *pool = vol->pool;
	int n, r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	n = r ? r : tfs_thin_lookup_range(vol->ref->td, b0, b0 + nr, nr, maps);
	pthread_mutex_unlock(&pool->lock);
	if (r)
		return r;
	return n < 0 ? lookup_failed(vol, b0, b0 + nr, n) : n;
}

static int read_chunk(struct tfs_thin_dev *vol, uint8_t *buf, uint64_t off, uint64_t end)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	struct tfs_pool *pool = vol->pool;
	uint64_t bs = pool->block_size, b0 = off / bs;
	unsigned nr = (unsigned)((end - 1) / bs + 1 - b0), j = 0;
	struct run run = { 0 };
	int n, r = 0;

	n = tfs_thin_lookup_chunk(vol, b0, nr, maps);
	if (n < 0)
		return n;

	for (unsigned i = 0; i < nr && !r; i++) {
		uint64_t start = (b0 + i) * bs;
		uint64_t s = off > start ? off - start : 0;
		uint64_t e = end - start < bs ? end - start : bs;
		uint8_t *dst = buf + (start + s - off);

		if (j < (unsigned)n && maps[j].vblock == b0 + i) {
			uint64_t dev_off = maps[j++].data_block * bs + s;

			if (run.len && run.dev_off + run.len == dev_off && run.dst + run.len == dst) {
				run.len += e - s;
				continue;
			}
			r = run_read(pool, &run);
			run = (struct run){ .dev_off = dev_off, .dst = dst, .len = e - s };
		} else {
			memset(dst, 0, e - s);
		}
	}
	r = run_read(pool, &run);
	if (r)
		tfs_err("thin device %u: reading data blocks failed: %s", vol->id, strerror(-r));
	return r;
}

static int read_range(struct tfs_thin_dev *vol, void *buf, size_t len, uint64_t off)
{
	uint64_t bs = vol->pool->block_size, end = off + len, b0, b1;
	int r;

	if (!len)
		return 0;
	r = block_range(vol, off, len, &b0, &b1);
	if (!r)
		r = tfs_prison_lock_shared(vol->pool->prison, vol->id, b0, b1);
	if (r)
		return r;
	for (uint64_t cur = off, cend; cur < end && !r; cur = cend) {
		cend = chunk_end(bs, cur, end);
		r = read_chunk(vol, (uint8_t *)buf + (cur - off), cur, cend);
	}
	tfs_prison_unlock_shared(vol->pool->prison, vol->id, b0, b1);
	return r;
}

/* ---- unmapping -------------------------------------------------------------------------- */

/*
 * With the lock held: unmap the next chunk of mappings in [*next, end) in
 * one remove_range; their data blocks that nobody maps any more are
 * queued for passdown.  Returns how many were unmapped, or -errno.
 */
static int unmap_chunk(struct tfs_thin_dev *vol, uint64_t *next, uint64_t end)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	struct tfs_pool *pool = vol->pool;
	int n, r;

	r = tfs_pool_may_change(pool);
	if (r)
		return r;
	n = tfs_thin_lookup_range(vol->ref->td, *next, end, TFS_POOL_CHUNK, maps);
	if (n <= 0)
		return n < 0 ? lookup_failed(vol, *next, end, n) : 0;
	r = tfs_thin_remove_range(vol->ref->td, maps[0].vblock, maps[n - 1].vblock + 1, NULL);
	if (r)
		return tfs_pool_meta_failed(pool, r, "unmapping blocks");
	pool->dirty = true;
	for (int i = 0; i < n; i++)
		tfs_pool_passdown_if_free(pool, maps[i].data_block);
	*next = maps[n - 1].vblock + 1;
	return n;
}

/* Unmap whole blocks [b, end) under the request's cell, a chunk per lock hold. */
static int unmap_blocks(struct tfs_thin_dev *vol, uint64_t b, uint64_t end)
{
	struct tfs_pool *pool = vol->pool;
	int n;

	do {
		pthread_mutex_lock(&pool->lock);
		n = unmap_chunk(vol, &b, end);
		pthread_mutex_unlock(&pool->lock);
	} while (n == TFS_POOL_CHUNK);
	return n < 0 ? n : 0;
}

/*
 * Bytes [off, off + len) (to the end of the device when to_end) read as
 * zeros afterwards: whole blocks unmapped, partial ones zeroed where they
 * are mapped (copying a block shared with a snapshot first).
 */
static int punch(struct tfs_thin_dev *vol, struct tfs_core_io *io, uint64_t off, uint64_t len,
		 bool to_end)
{
	uint64_t bs = vol->pool->block_size;
	uint64_t end, b0, b1, whole0, whole1, head = off % bs;
	int r;

	if (!len && !to_end)
		return 0;
	r = check_write(vol);
	if (!r && !to_end)
		r = block_range(vol, off, len, &b0, &b1);
	if (r)
		return r;
	end = to_end ? UINT64_MAX : off + len;
	b0 = off / bs;
	b1 = to_end ? UINT64_MAX : b1;
	whole0 = head ? b0 + 1 : b0;
	whole1 = to_end ? UINT64_MAX : end / bs;

	r = tfs_prison_lock(vol->pool->prison, vol->id, b0, b1);
	if (r)
		return r;
	if (whole0 < whole1)
		r = unmap_blocks(vol, whole0, whole1);
	if (!r && head)
		r = write_range(vol, &(struct cell){ b0, b1, io, false }, NULL, off,
				off + (end - off < bs - head ? end - off : bs - head), HOW_ZERO_MAPPED);
	/* The tail block, unless it is the head block just done. */
	if (!r && !to_end && end % bs && !(head && end - end % bs <= off))
		r = write_range(vol, &(struct cell){ b0, b1, io, false }, NULL,
				end - end % bs > off ? end - end % bs : off, end, HOW_ZERO_MAPPED);
	if (r != TFS_POOL_PUSHBACK) /* a pushed-back request left its cell already */
		tfs_prison_unlock(vol->pool->prison, vol->id, b0, b1);
	return r;
}

/* ---- clones ---------------------------------------------------------------------------- */

/* Whole blocks [s0, s0 + nr) of src shared into [d0, d0 + nr) of dst, a chunk at a time. */
struct clone {
	struct tfs_thin_dev *src, *dst;
	uint64_t s0, d0, nr;
};

/*
 * With the lock held: blocks [i, i + n) of the clone, whole in one hold,
 * so a commit sees all of a chunk or none of it.  A mapped source block
 * gets one more reference and is mapped in dst too (the block dst mapped
 * there is released, and passed down if nobody maps it now); an unmapped
 * one unmaps dst's block.
 *
 * The time test (not the count) is what makes a later write to either
 * side copy the block first, here as in the kernel, which knows only that
 * test.  A cloned mapping keeps its source mapping's time, which must be
 * older than both devices' snapshotted_time; when one is not (written
 * since the devices were last marked), both are marked shared now, which
 * moves the pool time on.  So a run of clones between two devices, as cp
 * makes one per extent, moves it once, not once per call: it is 24 bits,
 * shared with snapshots, and wraps.
 */
static int clone_chunk(struct clone *c, uint64_t i, unsigned n)
{
	struct tfs_thin_mapping sm[TFS_POOL_CHUNK], dm[TFS_POOL_CHUNK];
	struct tfs_pool *pool = c->dst->pool;
	struct tfs_td *std = c->src->ref->td, *dtd = c->dst->ref->td;
	uint64_t s = c->s0 + i, d = c->d0 + i;
	struct tfs_thin_details dd;
	unsigned js = 0, jd = 0;
	bool mark = false;
	int ns, nd, r;

	r = tfs_pool_may_change(pool);
	if (r)
		return r;
	ns = tfs_thin_lookup_range(std, s, s + n, n, sm);
	if (ns < 0)
		return lookup_failed(c->src, s, s + n, ns);
	nd = tfs_thin_lookup_range(dtd, d, d + n, n, dm);
	if (nd < 0)
		return lookup_failed(c->dst, d, d + n, nd);
	r = tfs_pmd_device_details(pool->pmd, c->dst->id, &dd);
	if (r)
		return lookup_failed(c->dst, d, d + n, r);
	for (int k = 0; k < ns; k++)
		mark |= !sm[k].shared || sm[k].time >= dd.snapshotted_time;
	r = mark ? tfs_thin_mark_shared(std, dtd) : 0;
	if (r)
		return tfs_pool_meta_failed(pool, r, "marking cloned blocks shared");
	for (unsigned k = 0; k < n; k++) {
		const struct tfs_thin_mapping *from =
			js < (unsigned)ns && sm[js].vblock == s + k ? &sm[js++] : NULL;
		const struct tfs_thin_mapping *old =
			jd < (unsigned)nd && dm[jd].vblock == d + k ? &dm[jd++] : NULL;

		if (from) {
			r = tfs_pmd_data_block_inc(pool->pmd, from->data_block);
			if (!r)
				r = tfs_thin_insert_timed(dtd, d + k, from->data_block, from->time);
		} else if (old) {
			r = tfs_thin_remove(dtd, d + k);
		} else {
			continue;
		}
		if (r)
			return tfs_pool_meta_failed(pool, r, from ? "mapping a cloned block" :
							      "unmapping a block for a clone");
		if (old)
			tfs_pool_passdown_if_free(pool, old->data_block);
	}
	/* The mappings point at data a commit flushes first, as for a new block's. */
	pool->dirty = true;
	return 0;
}

/*
 * Cells over both ranges, taken in (device, block) order as snapshot
 * creation takes its own, so two multi-cell requests never wait for each
 * other in a circle.  In one device one cell spans both ranges: a request
 * that overlaps both and arrived between two cells would otherwise wait
 * for the first while holding back the second.  src's cell is shared when
 * it has one of its own: reads of it go on.
 */
static int clone_lock(const struct clone *c, bool lock)
{
	struct tfs_prison *pr = c->dst->pool->prison;
	uint64_t s1 = c->s0 + c->nr, d1 = c->d0 + c->nr;
	bool src_first = c->src->id < c->dst->id;
	int r;

	if (c->src->id == c->dst->id) {
		uint64_t b0 = c->s0 < c->d0 ? c->s0 : c->d0, b1 = s1 > d1 ? s1 : d1;

		if (!lock) {
			tfs_prison_unlock(pr, c->dst->id, b0, b1);
			return 0;
		}
		return tfs_prison_lock(pr, c->dst->id, b0, b1);
	}
	if (!lock) {
		tfs_prison_unlock_shared(pr, c->src->id, c->s0, s1);
		tfs_prison_unlock(pr, c->dst->id, c->d0, d1);
		return 0;
	}
	r = src_first ? tfs_prison_lock_shared(pr, c->src->id, c->s0, s1) :
			tfs_prison_lock(pr, c->dst->id, c->d0, d1);
	if (r)
		return r;
	r = src_first ? tfs_prison_lock(pr, c->dst->id, c->d0, d1) :
			tfs_prison_lock_shared(pr, c->src->id, c->s0, s1);
	if (r && src_first)
		tfs_prison_unlock_shared(pr, c->src->id, c->s0, s1);
	else if (r)
		tfs_prison_unlock(pr, c->dst->id, c->d0, d1);
	return r;
}

static int clone_blocks(struct tfs_thin_dev *dst, struct tfs_thin_dev *src, uint64_t s0,
			uint64_t d0, uint64_t nr)
{
	struct clone c = { .src = src, .dst = dst, .s0 = s0, .d0 = d0, .nr = nr };
	struct tfs_pool *pool = dst->pool;
	int r;

	r = check_write(dst);
	if (!r)
		r = clone_lock(&c, true);
	if (r)
		return r;
	for (uint64_t i = 0; i < nr && !r;) {
		unsigned n = nr - i < TFS_POOL_CHUNK ? (unsigned)(nr - i) : TFS_POOL_CHUNK;

		pthread_mutex_lock(&pool->lock);
		r = clone_chunk(&c, i, n);
		pthread_mutex_unlock(&pool->lock);
		i += n;
	}
	clone_lock(&c, false);
	return r;
}

/* ---- requests through the core ------------------------------------------------------- */

enum req_op { REQ_READ, REQ_WRITE, REQ_PROVISION, REQ_PUNCH, REQ_TRUNCATE, REQ_FLUSH, REQ_CLONE };

struct req {
	enum req_op op;
	void *buf;          /* REQ_READ: filled; REQ_WRITE: the data */
	uint64_t off, len;  /* REQ_CLONE: whole blocks of the device, from block src_off of src */
	struct tfs_thin_dev *src;
	uint64_t src_off;
	bool nowait;        /* REQ_WRITE: -EAGAIN where it would be held */
};

static int run_req(struct tfs_thin_dev *vol, struct tfs_core_io *io, const struct req *q)
{
	switch (q->op) {
	case REQ_READ:
		return read_range(vol, q->buf, q->len, q->off);
	case REQ_WRITE:
		return locked_write(vol, io, q->buf, q->off, q->len, HOW_DATA, q->nowait);
	case REQ_PROVISION:
		return locked_write(vol, io, NULL, q->off, q->len, HOW_PROVISION, false);
	case REQ_PUNCH:
		return punch(vol, io, q->off, q->len, false);
	case REQ_TRUNCATE:
		return punch(vol, io, q->off, 0, true);
	case REQ_FLUSH:
		return tfs_pool_commit_now(vol->pool, true);
	case REQ_CLONE:
		return clone_blocks(vol, q->src, q->src_off, q->off, q->len);
	}
	return -EINVAL;
}

/*
 * Every request goes in through the core, which holds it while its device
 * is suspended; one pushed back by a noflush suspend has left the pool
 * without changing anything (its chunk had allocated nothing yet), so it
 * is simply run again, whole, when the core lets it in again.
 */
static int submit(struct tfs_thin_dev *vol, const struct req *q)
{
	struct tfs_core *core = vol->pool->core;
	struct tfs_core_io io;
	int r;

	if (!vol->ref)
		return -EBADF; /* a status handle */
	if (!q->nowait)
		tfs_core_enter(core, &io, vol->id);
	else if (tfs_core_try_enter(core, &io, vol->id))
		return -EAGAIN;
	while ((r = run_req(vol, &io, q)) == TFS_POOL_PUSHBACK)
		tfs_core_reissue(core, &io);
	tfs_core_exit(core, &io);
	return r;
}

static struct tfs_thin_dev *thin_of(struct tfs_dev *dev)
{
	return (struct tfs_thin_dev *)dev;
}

static int thin_read(struct tfs_dev *dev, void *buf, size_t len, uint64_t off)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_READ, .buf = buf, .off = off,
						   .len = len });
}

static int thin_write(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_WRITE, .buf = (void *)buf, .off = off,
						   .len = len });
}

static int thin_write_nowait(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_WRITE, .buf = (void *)buf, .off = off,
						   .len = len, .nowait = true });
}

static int thin_provision(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_PROVISION, .off = off, .len = len });
}

/* Discard and zero range are one punch: unmapped blocks read as zeros. */
static int thin_punch(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_PUNCH, .off = off, .len = len });
}

static int thin_truncate(struct tfs_dev *dev, uint64_t new_size)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_TRUNCATE, .off = new_size });
}

static int thin_flush(struct tfs_dev *dev)
{
	return submit(thin_of(dev), &(struct req){ .op = REQ_FLUSH });
}

/* Bytes [src_off, src_off + len) of src written to dst at dst_off, through both devices' I/O. */
static int copy_bytes(struct tfs_dev *dst, struct tfs_dev *src, uint64_t src_off,
		      uint64_t dst_off, uint64_t len)
{
	size_t piece = len < BOUNCE_MAX ? (size_t)len : BOUNCE_MAX;
	uint8_t *buf;
	int r = 0;

	if (!len)
		return 0;
	buf = tfs_scratch_get(piece);
	if (!buf)
		return -ENOMEM;
	for (uint64_t done = 0; done < len && !r;) {
		size_t n = len - done < piece ? (size_t)(len - done) : piece;

		r = tfs_dev_read(src, buf, n, src_off + done);
		if (!r)
			r = tfs_dev_write(dst, buf, n, dst_off + done);
		done += n;
	}
	tfs_scratch_put(buf, piece);
	return r;
}

/*
 * The whole blocks of the range are shared, the head and tail before and
 * after them copied.  The device is entered in the core for the sharing
 * (a write to it); src only for the copies, through its own reads: the
 * sharing reads nothing of src but its mappings, under a cell, and
 * entering a second device while holding the first could hold up a
 * suspend of both for as long as its drain waits.
 */
static int thin_clone_range(struct tfs_dev *dev, struct tfs_dev *src_dev, uint64_t src_off,
			    uint64_t dst_off, uint64_t len)
{
	struct tfs_thin_dev *dst = thin_of(dev), *src;
	uint64_t bs = dst->pool->block_size, head, whole, b;
	int r;

	/* Only a thin device of this pool shares blocks with this one. */
	if (src_dev->ops != dev->ops || thin_of(src_dev)->pool != dst->pool)
		return -EXDEV;
	src = thin_of(src_dev);
	if (!dst->ref || !src->ref)
		return -EBADF;
	if (!len)
		return 0;
	r = check_write(dst);
	if (!r)
		r = block_range(src, src_off, len, &b, &b);
	if (!r)
		r = block_range(dst, dst_off, len, &b, &b);
	if (r)
		return r;
	if (src->id == dst->id && src_off < dst_off + len && dst_off < src_off + len) {
		tfs_err("thin device %u: clone of %llu bytes from %llu to %llu: the ranges overlap",
			dst->id, (unsigned long long)len, (unsigned long long)src_off,
			(unsigned long long)dst_off);
		return -EINVAL;
	}
	if (src_off % bs != dst_off % bs)
		return -EOPNOTSUPP; /* no block of one lines up with a block of the other */
	head = (bs - src_off % bs) % bs;
	if (head > len)
		head = len;
	whole = (len - head) / bs;
	r = copy_bytes(dev, src_dev, src_off, dst_off, head);
	if (!r && whole)
		r = submit(dst, &(struct req){ .op = REQ_CLONE, .off = (dst_off + head) / bs,
					       .len = whole, .src = src,
					       .src_off = (src_off + head) / bs });
	if (!r)
		r = copy_bytes(dev, src_dev, src_off + head + whole * bs,
			       dst_off + head + whole * bs, len - head - whole * bs);
	return r;
}

/* ---- the rest ---------------------------------------------------------------------------- */

/* With the lock held: the first unmapped block in [b, end), or end. */
static int find_hole(struct tfs_thin_dev *vol, uint64_t b, uint64_t end, uint64_t *hole)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	int n;

	do {
		n = tfs_thin_lookup_range(vol->ref->td, b, end, TFS_POOL_CHUNK, maps);
		if (n < 0)
			return lookup_failed(vol, b, end, n);
		for (int i = 0; i < n; i++, b++)
			if (maps[i].vblock != b)
				goto out;
	} while (n == TFS_POOL_CHUNK);
out:
	*hole = b < end ? b : end;
	return 0;
}

static int seek_locked(struct tfs_thin_dev *vol, uint64_t off, int whence, uint64_t size,
		       uint64_t *out)
{
	uint64_t bs = vol->pool->block_size, b = off / bs, end = (size - 1) / bs + 1, pos;
	struct tfs_thin_mapping m;
	int n;

	if (whence == SEEK_DATA) {
		n = tfs_thin_lookup_range(vol->ref->td, b, end, 1, &m);
		if (n < 0)
			return lookup_failed(vol, b, end, n);
		if (n == 0)
			return -ENXIO;
		pos = m.vblock * bs > off ? m.vblock * bs : off;
		if (pos >= size)
			return -ENXIO;
	} else {
		n = find_hole(vol, b, end, &pos);
		if (n)
			return n;
		pos = pos * bs > off ? pos * bs : off;
		if (pos > size)
			pos = size; /* the end of the volume is a hole */
	}
	*out = pos;
	return 0;
}

static int thin_seek(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size,
		     uint64_t *out)
{
	struct tfs_thin_dev *vol = thin_of(dev);
	int r;

	if (!vol->ref)
		return -EBADF;
	if (whence != SEEK_DATA && whence != SEEK_HOLE)
		return -EINVAL;
	if (off >= size)
		return -ENXIO;
	pthread_mutex_lock(&vol->pool->lock);
	r = tfs_pool_may_io(vol->pool);
	if (!r)
		r = seek_locked(vol, off, whence, size, out);
	pthread_mutex_unlock(&vol->pool->lock);
	return r;
}

static int thin_get_size(struct tfs_dev *dev, uint64_t *bytes)
{
	(void)dev;
	(void)bytes;
	return -ENOTSUP; /* the namespace sizes a thin volume; truncate shrinks it */
}

/*
 * An open device keeps its mapped count; a status handle has no metadata
 * handle and walks the tree instead (tfs_pool_dev_usage).
 */
static int thin_allocated(struct tfs_dev *dev, uint64_t *bytes)
{
	struct tfs_thin_dev *vol = thin_of(dev);
	struct tfs_dev_usage u;
	uint64_t n;
	int r;

	if (!vol->ref) {
		r = tfs_pool_dev_usage(vol->pool, vol->id, &u);
		if (r)
			return r;
		*bytes = u.mapped_blocks * vol->pool->block_size;
		return 0;
	}
	pthread_mutex_lock(&vol->pool->lock);
	n = tfs_td_mapped_blocks(vol->ref->td);
	pthread_mutex_unlock(&vol->pool->lock);
	*bytes = n * vol->pool->block_size;
	return 0;
}

/* O(mappings) (tfs_pool_dev_usage): status is for people and scripts, not hot paths. */
static void thin_status(struct tfs_dev *dev, struct tfs_status_sink *sink)
{
	struct tfs_thin_dev *vol = thin_of(dev);
	struct tfs_dev_usage u = { 0, 0 };

	if (tfs_pool_dev_usage(vol->pool, vol->id, &u) < 0)
		tfs_warn("status: no usage for device %" PRIu32, vol->id);
	tfs_status_u64(sink, "mapped_blocks", u.mapped_blocks);
	tfs_status_u64(sink, "exclusive_blocks", u.exclusive_blocks);
	tfs_status_flag(sink, "suspended", tfs_pool_dev_suspended(vol->pool, vol->id));
	tfs_status_u64(sink, "held_in_core", tfs_pool_dev_held(vol->pool, vol->id));
}

static void thin_close(struct tfs_dev *dev)
{
	struct tfs_thin_dev *vol = thin_of(dev);

	if (vol->ref) {
		pthread_mutex_lock(&vol->pool->lock);
		tfs_pool_put_thin(vol->pool, vol->ref);
		pthread_mutex_unlock(&vol->pool->lock);
	}
	free(vol);
}

static const struct tfs_dev_ops thin_ops = {
	.kind = "thin",
	.read = thin_read,
	.write = thin_write,
	.flush = thin_flush,
	.discard = thin_punch,
	.zero_range = thin_punch,
	.provision = thin_provision,
	.clone_range = thin_clone_range,
	.seek = thin_seek,
	.get_size = thin_get_size,
	.truncate = thin_truncate,
	.allocated = thin_allocated,
	.status = thin_status,
	.close = thin_close,
	.write_nowait = thin_write_nowait,
};

struct tfs_thin_dev *tfs_thin_dev_of(struct tfs_dev *dev)
{
	return dev && dev->ops == &thin_ops ? thin_of(dev) : NULL;
}

int tfs_thin_open(struct tfs_pool *pool, uint32_t id, unsigned flags, struct tfs_dev **out)
{
	struct tfs_thin_dev *vol = calloc(1, sizeof(*vol));
	int r = 0;

	if (!vol)
		return -ENOMEM;
	vol->dev.ops = &thin_ops;
	vol->pool = pool;
	vol->id = id;
	vol->read_only = flags & TFS_DEV_READ_ONLY;
	if (flags & TFS_DEV_STATUS_ONLY)
		goto out;
	pthread_mutex_lock(&pool->lock);
	if (pool->mode == TFS_POOL_FAIL) {
		tfs_err("thin device %u cannot be opened: the pool is in fail mode (%s)", id,
			pool->reason);
		r = -EIO;
	} else {
		r = tfs_pool_get_thin(pool, id, &vol->ref);
	}
	pthread_mutex_unlock(&pool->lock);
	if (r) {
		free(vol);
		return r;
	}
out:
	*out = &vol->dev;
	return 0;
}
