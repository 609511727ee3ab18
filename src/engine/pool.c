/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The thin pool: opening and closing, the commit (timer and FLUSH), modes
 * after failures, creating, snapshotting and deleting thin devices, and
 * status.  The volume I/O paths are in thin-io.c.
 *
 * A commit must never record an allocated data block that no mapping
 * references yet (the checker rightly calls that a leak).  It does not
 * wait for requests to map the blocks they allocated: it leaves those
 * blocks (pool->pending) out of the state it writes and counts them in the
 * next transaction instead (commit_metadata).
 */
#include "pool-internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "format.h"
#include "log.h"

static const char *const mode_names[] = {
	[TFS_POOL_WRITE] = "write",
	[TFS_POOL_OUT_OF_DATA_SPACE] = "out_of_data_space",
	[TFS_POOL_READ_ONLY] = "read_only",
	[TFS_POOL_FAIL] = "fail",
};

/* ---- extents ------------------------------------------------------------ */

int tfs_extents_add(struct tfs_extents *x, uint64_t begin, uint64_t len)
{
	struct tfs_extent *v;

	if (x->nr && x->v[x->nr - 1].begin + x->v[x->nr - 1].len == begin) {
		x->v[x->nr - 1].len += len;
		return 0;
	}
	if (x->nr == x->cap) {
		size_t cap = x->cap ? x->cap * 2 : 16;

		v = realloc(x->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		x->v = v;
		x->cap = cap;
	}
	x->v[x->nr++] = (struct tfs_extent){ begin, len };
	return 0;
}

void tfs_extents_free(struct tfs_extents *x)
{
	free(x->v);
	*x = (struct tfs_extents){ 0 };
}

static int cmp_extent(const void *a, const void *b)
{
	const struct tfs_extent *x = a, *y = b;

	return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Sort and merge touching extents in place. */
static void extents_normalise(struct tfs_extents *x)
{
	size_t out = 0;

	if (!x->nr)
		return;
	qsort(x->v, x->nr, sizeof(*x->v), cmp_extent);
	for (size_t i = 1; i < x->nr; i++) {
		struct tfs_extent *last = &x->v[out];

		if (x->v[i].begin <= last->begin + last->len) {
			uint64_t end = x->v[i].begin + x->v[i].len;

			if (end > last->begin + last->len)
				last->len = end - last->begin;
		} else {
			x->v[++out] = x->v[i];
		}
	}
	x->nr = out + 1;
}

/* ---- modes ---------------------------------------------------------------- */

static void set_mode(struct tfs_pool *pool, enum tfs_pool_mode mode, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void set_mode(struct tfs_pool *pool, enum tfs_pool_mode mode, const char *fmt, ...)
{
	enum tfs_pool_mode old = pool->mode;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(pool->reason, sizeof(pool->reason), fmt, ap);
	va_end(ap);
	pool->mode = mode;
	if (old == mode)
		return;
	if (mode == TFS_POOL_OUT_OF_DATA_SPACE)
		clock_gettime(CLOCK_MONOTONIC, &pool->oods_since);
	/* Held writes retry in write mode and fail in read_only or fail mode. */
	pthread_cond_broadcast(&pool->space_cv);
	/* The daemon turns mode changes into events (src/fs), told by notify. */
	pool->nr_transitions++;
	pool->transitions[pool->nr_transitions % TFS_POOL_TRANSITIONS] =
		(struct tfs_pool_transition){ .seq = pool->nr_transitions,
					      .old_mode = mode_names[old],
					      .new_mode = mode_names[mode] };
	snprintf(pool->transitions[pool->nr_transitions % TFS_POOL_TRANSITIONS].reason,
		 sizeof(pool->reason), "%s", pool->reason);
	tfs_log(mode == TFS_POOL_WRITE ? TFS_LOG_INFO
		: mode == TFS_POOL_OUT_OF_DATA_SPACE ? TFS_LOG_WARN : TFS_LOG_ERR,
		"%s: pool mode %s -> %s: %s", pool->cfg.metadata, mode_names[old], mode_names[mode],
		pool->reason);
	if (pool->notify)
		pool->notify(pool->notify_arg);
}

/*
 * A change failed while a commit's metadata I/O ran, and waits for it to
 * end before aborting (tfs_pool_meta_failed): until then nothing may look
 * at the half-made change.
 */
static void wait_abort(struct tfs_pool *pool)
{
	while (pool->abort_pending)
		pthread_cond_wait(&pool->commit_io_cv, &pool->lock);
}

int tfs_pool_may_io(struct tfs_pool *pool)
{
	wait_abort(pool);
	return pool->mode == TFS_POOL_FAIL ? -EIO : 0;
}

/*
 * While a commit's metadata I/O runs (pool.c, run_commit) the next
 * transaction goes on, but an abort must wait: it drops the whole cache,
 * and the commit's blocks are pinned until its end.
 */
static void wait_commit_io(struct tfs_pool *pool)
{
	while (pool->commit_io)
		pthread_cond_wait(&pool->commit_io_cv, &pool->lock);
}

int tfs_pool_may_change(struct tfs_pool *pool)
{
	wait_abort(pool);
	if (pool->opened_read_only)
		return -EROFS;
	if (pool->mode == TFS_POOL_READ_ONLY || pool->mode == TFS_POOL_FAIL)
		return -EIO;
	return 0;
}

int tfs_pool_meta_failed(struct tfs_pool *pool, int err, const char *what)
{
	char io[160], cause[200];
	int r;

	if (pool->mode == TFS_POOL_FAIL)
		return -EIO;
	if (pool->commit_io) {
		tfs_info("%s: %s failed (%s) during a commit's metadata I/O: aborting when it ends",
			 pool->cfg.metadata, what, strerror(-err));
		pool->abort_pending = true;
		wait_commit_io(pool);
		pool->abort_pending = false;
		pthread_cond_broadcast(&pool->commit_io_cv);
		/* That commit failed: its abort took this change's transaction with it. */
		if (pool->mode == TFS_POOL_READ_ONLY || pool->mode == TFS_POOL_FAIL)
			return -EIO;
	}
	/* Name the block when a write of one was the cause (before abort/needs_check write again). */
	tfs_pmd_take_write_error(pool->pmd, io, sizeof(io));
	snprintf(cause, sizeof(cause), "%s", io[0] ? io : strerror(-err));
	/* In-flight requests must neither map nor free what they allocated before this. */
	pool->abort_gen++;
	while (pool->pending.next != &pool->pending)
		tfs_pool_alloc_done(pool, pool->pending.next);
	/* What they wrote stays in blocks that are free again, unpunched, until the next open. */
	tfs_pool_free_not_zero(pool, "a transaction was aborted");
	r = tfs_pmd_abort(pool->pmd);
	if (r) {
		/* Only tfs_pmd_close is safe now: the maps could not be reloaded. */
		set_mode(pool, TFS_POOL_FAIL, "%s failed (%s), then aborting the transaction failed (%s)",
			 what, cause, strerror(-r));
		return -EIO;
	}
	/* Whatever was allocated, freed or queued since the last commit is gone. */
	pool->dirty = false;
	pool->passdown.nr = 0;
	r = tfs_pmd_set_needs_check(pool->pmd, true);
	if (r) {
		set_mode(pool, TFS_POOL_FAIL, "%s failed (%s), then setting needs_check failed (%s)",
			 what, cause, strerror(-r));
		return -EIO;
	}
	set_mode(pool, TFS_POOL_READ_ONLY, "%s failed: %s", what, cause);
	return err == -ENOSPC ? -ENOSPC : -EIO;
}

/* ---- low-water marks ------------------------------------------------------------ */

static uint64_t low_water(const struct tfs_pool_config *cfg, uint64_t total)
{
	if (cfg->low_water_is_percent)
		return total * cfg->low_water_percent / 100;
	return cfg->low_water_blocks < total ? cfg->low_water_blocks : total;
}

/* The kernel's rule for metadata: the smaller of 4 MiB and a quarter of the device. */
static uint64_t meta_low_water(uint64_t total)
{
	return total / 4 < 1024 ? total / 4 : 1024;
}

/*
 * One mark: a crossing is counted once when free space falls below it,
 * and the mark is re-armed only when free space rises above it plus a
 * margin (1% of the device, at least a block), so usage hovering at the
 * mark cannot flood the log and the hook.
 */
static void low_water_step(struct tfs_pool_low_water *lw, uint64_t free, uint64_t total,
			   uint64_t mark)
{
	uint64_t margin = total / 100 ? total / 100 : 1;

	if (!total)
		return;
	if (!lw->disarmed && free < mark) {
		lw->crossings++;
		lw->free_then = free;
		lw->disarmed = true;
	} else if (lw->disarmed && free > mark + margin) {
		lw->disarmed = false;
	}
}

/*
 * Checked where space changes (allocations, commits, resizes), as dm-thin
 * does at each allocation, so a dip shorter than the daemon's housekeeping
 * tick is still counted.
 */
void tfs_pool_check_low_water(struct tfs_pool *pool)
{
	uint64_t before = pool->lw_data.crossings + pool->lw_meta.crossings;
	struct tfs_pmd_space sp;

	if (pool->mode == TFS_POOL_FAIL)
		return;
	tfs_pmd_space(pool->pmd, &sp);
	low_water_step(&pool->lw_data, sp.data_free, sp.data_total,
		       low_water(&pool->cfg, sp.data_total));
	low_water_step(&pool->lw_meta, sp.meta_free, sp.meta_total, meta_low_water(sp.meta_total));
	if (pool->notify && pool->lw_data.crossings + pool->lw_meta.crossings != before)
		pool->notify(pool->notify_arg);
}

void tfs_pool_rearm_low_water(struct tfs_pool *pool)
{
	pool->lw_data.disarmed = pool->lw_meta.disarmed = false;
	tfs_pool_check_low_water(pool);
}

/* ---- allocation and passdown ------------------------------------------------ */

int tfs_pool_alloc(struct tfs_pool *pool, struct tfs_pool_allocs *a, unsigned n)
{
	unsigned i;
	int r = 0;

	a->prev = a->next = a;
	a->n = 0;
	r = tfs_pool_may_change(pool);
	if (r)
		return r;
	for (i = 0; i < n; i++) {
		r = tfs_pmd_alloc_data_block(pool->pmd, &a->blocks[i]);
		if (r)
			break;
	}
	if (i)
		pool->dirty = true;
	if (!r) {
		a->n = n;
		a->prev = pool->pending.prev;
		a->next = &pool->pending;
		a->prev->next = a;
		pool->pending.prev = a;
		tfs_pool_check_low_water(pool);
		return 0;
	}
	/* All or nothing: a request never writes part of a chunk for want of space. */
	while (i--) {
		int r2 = tfs_pmd_free_data_block(pool->pmd, a->blocks[i]);

		if (r2)
			return tfs_pool_meta_failed(pool, r2, "releasing an unused data block");
	}
	if (r != -ENOSPC)
		return tfs_pool_meta_failed(pool, r, "allocating a data block");
	return -ENOSPC;
}

void tfs_pool_alloc_done(struct tfs_pool *pool, struct tfs_pool_allocs *a)
{
	(void)pool;
	a->prev->next = a->next;
	a->next->prev = a->prev;
	a->prev = a->next = a;
}

void tfs_pool_passdown_if_free(struct tfs_pool *pool, uint64_t block)
{
	uint32_t count;

	if (!pool->cfg.discard_passdown)
		return;
	/*
	 * A failed lookup or a full queue costs host space, never data: the
	 * block is zeroed when it is next allocated.
	 */
	if (tfs_pmd_data_block_count(pool->pmd, block, &count)) {
		tfs_pool_free_not_zero(pool, "looking up a freed block's count failed");
		return;
	}
	if (count)
		return;
	if (tfs_extents_add(&pool->passdown, block, 1)) {
		tfs_warn("%s: out of memory queueing a discard of data block %llu", pool->cfg.data,
			 (unsigned long long)block);
		tfs_pool_free_not_zero(pool, "a freed block could not be queued for discard");
	}
}

void tfs_pool_free_not_zero(struct tfs_pool *pool, const char *why)
{
	if (atomic_exchange(&pool->free_zero, false))
		tfs_info("%s: new data blocks are zeroed from now on: %s", pool->cfg.data, why);
}

static int punch_free_run(void *arg, uint64_t begin, uint64_t len)
{
	struct tfs_pool *pool = arg;

	return tfs_bdev_discard(pool->data, begin * pool->block_size, len * pool->block_size);
}

/*
 * A read-write open of a pool on a data file with discard_passdown: punch
 * every free block, so that all free blocks read as zeros and new blocks
 * need no zeroing (free_zero).  Blocks freed before a crash and never
 * punched, or allocated and written in a transaction that never
 * committed, are among them.  A block device is left alone: a discard
 * there does not promise zeros.
 */
static void punch_free_blocks(struct tfs_pool *pool)
{
	int r;

	if (!pool->cfg.discard_passdown || pool->cfg.skip_block_zeroing ||
	    tfs_bdev_is_blockdev(pool->data))
		return;
	r = tfs_pmd_walk_free_data(pool->pmd, punch_free_run, pool);
	if (r) {
		tfs_info("%s: punching the free data blocks failed (%s): new blocks are zeroed",
			 pool->cfg.data, strerror(-r));
		return;
	}
	atomic_store(&pool->free_zero, true);
	tfs_info("%s: free data blocks punched: new blocks need no zeroing", pool->cfg.data);
}

/* Give freed blocks back to the host; a device that cannot discard is told once. */
static void discard_extents(struct tfs_pool *pool, struct tfs_extents *x)
{
	extents_normalise(x);
	for (size_t i = 0; i < x->nr; i++) {
		int r = tfs_bdev_discard(pool->data, x->v[i].begin * pool->block_size,
					 x->v[i].len * pool->block_size);

		/* Holes again (or maybe, if it failed): the next allocation there fills them. */
		tfs_prealloc_forget(pool->prealloc, x->v[i].begin, x->v[i].len);
		if (r)
			tfs_pool_free_not_zero(pool, "discarding freed blocks failed");
		if (r && !pool->discard_warned) {
			pool->discard_warned = true;
			tfs_warn("%s: discarding freed blocks failed: %s (space is not returned "
				 "to the host)", pool->cfg.data, strerror(-r));
		}
	}
}

/* ---- commit --------------------------------------------------------------------- */

typedef int (*commit_fn)(struct tfs_pmd *pmd);

/*
 * After a commit: blocks freed in it are allocatable now.  Only more free
 * blocks than when the pool ran out count: a request needing more blocks
 * than were left is what ran it out, and flipping back to write for those
 * would only bounce the mode (and the events) on every commit.
 */
static void leave_out_of_space(struct tfs_pool *pool)
{
	struct tfs_pmd_space sp;

	if (pool->mode != TFS_POOL_OUT_OF_DATA_SPACE)
		return;
	tfs_pmd_space(pool->pmd, &sp);
	if (sp.data_free > pool->oods_free)
		set_mode(pool, TFS_POOL_WRITE, "%llu data blocks free again",
			 (unsigned long long)sp.data_free);
}

static int flush_data(struct tfs_pool *pool)
{
	int r = tfs_bdev_flush(pool->data);

	if (r)
		tfs_err("%s: flushing the data device failed: %s", pool->cfg.data, strerror(-r));
	return r;
}

/* A commit's data flush, run beside its metadata block writes. */
struct data_flush {
	struct tfs_pool *pool;
	int r;
};

static void *data_flush_run(void *arg)
{
	struct data_flush *d = arg;

	d->r = flush_data(d->pool);
	return NULL;
}

/*
 * A commit's I/O, with no lock held: the data flush and the metadata
 * blocks side by side (the blocks land where no committed state looks,
 * so their order does not matter), then the superblock, only once both
 * are on stable storage.  Without a thread for the flush they go one
 * after the other.  *what names a failed data flush, unless a metadata
 * write failed too (a power cut fails both; the block is more to say).
 */
static int write_commit(struct tfs_pool *pool, struct tfs_pmd_commit *c, const char **what)
{
	struct data_flush d = { .pool = pool };
	bool beside;
	pthread_t th;
	int r = 0;

	beside = !pthread_create(&th, NULL, data_flush_run, &d);
	if (!beside)
		data_flush_run(&d);
	if (beside || !d.r)
		r = tfs_pmd_commit_write_blocks(c);
	if (beside)
		pthread_join(th, NULL);
	if (r)
		return r; /* the metadata layer names the block (meta_failed's reason) */
	if (d.r) {
		*what = "flushing the data device for a commit";
		return d.r;
	}
	return tfs_pmd_commit_write_super(c);
}

/* With the lock held: what was changed and freed so far belongs to the commit. */
static void start_next_transaction(struct tfs_pool *pool, struct tfs_extents *punch)
{
	pool->dirty = false;
	*punch = pool->passdown;
	pool->passdown = (struct tfs_extents){ 0 };
}

/*
 * Around a commit's in-memory part, under the lock: the blocks requests
 * have allocated but not mapped or freed yet (pending) are counted out of
 * the committing transaction (count 0, so the state written leaks none of
 * them) and back into the next one, where their requests map or free
 * them.  Nobody else can take them meanwhile: a block in use at any moment
 * of the committing transaction stays unallocatable until that commit is
 * durable (the data space map's held blocks), and then it is counted again.
 */
static int count_pending(struct tfs_pool *pool, bool in)
{
	for (struct tfs_pool_allocs *a = pool->pending.next; a != &pool->pending; a = a->next) {
		for (unsigned i = 0; i < a->n; i++) {
			int r = in ? tfs_pmd_data_block_inc(pool->pmd, a->blocks[i])
				   : tfs_pmd_free_data_block(pool->pmd, a->blocks[i]);

			if (r)
				return r;
		}
	}
	/*
	 * Not dirty for this alone: the request's insert makes it so, and a
	 * block it frees instead is as free as the committed state says (its
	 * passdown waits for the next commit, and it stays unallocatable till
	 * then).  So a write held in flight does not make every tick commit.
	 */
	return 0;
}

/*
 * The metadata commit, entered with the lock held.  Only its in-memory
 * part holds the lock: the blocks in flight counted out, the rest sealed
 * and pinned (tfs_pmd_commit_begin), the blocks in flight counted into the
 * next transaction.  Then, with the lock dropped: the data flush beside
 * the metadata blocks and their flush, then the superblock and a flush
 * (write_commit).  Every mapping in the committed state was inserted
 * after its data write had completed, so that one data flush makes all
 * the data it maps durable before its superblock is written.  Meanwhile
 * lookups and changes, and allocations too, go on into the next
 * transaction; only an abort waits (commit_io).  A failed data flush
 * fails the commit as a failed metadata write does.  fn (which commits
 * itself) runs wholly under the lock, after a data flush under the lock.
 * Returns with the lock held; on success the passdown queue of the
 * committed transaction is in *punch.
 */
static int commit_metadata(struct tfs_pool *pool, commit_fn fn, struct tfs_extents *punch)
{
	const char *what = "committing the metadata";
	struct tfs_pmd_commit *c;
	int refused, r = tfs_pool_may_change(pool);

	if (r)
		return r;
	if (fn) {
		r = flush_data(pool);
		if (r)
			return r; /* nothing changed yet: the pool stays writable */
		r = count_pending(pool, false);
		if (r)
			goto out;
		r = fn(pool->pmd);
		/* -EBUSY, -EINVAL: refused before changing anything (logged by the metadata layer). */
		if (r && r != -EBUSY && r != -EINVAL)
			goto out;
		if (!r)
			start_next_transaction(pool, punch);
		refused = r;
		r = count_pending(pool, true);
		if (r) {
			what = "counting the blocks in flight into the next transaction";
			goto out;
		}
		return refused;
	}
	r = count_pending(pool, false);
	if (!r)
		r = tfs_pmd_commit_begin(pool->pmd, &c);
	if (r)
		goto out;
	start_next_transaction(pool, punch);
	r = count_pending(pool, true);
	if (r) {
		what = "counting the blocks in flight into the next transaction";
		r = tfs_pmd_commit_end(pool->pmd, c, r);
		goto out;
	}
	pool->commit_io = true;
	pthread_mutex_unlock(&pool->lock);
	r = write_commit(pool, c, &what);
	pthread_mutex_lock(&pool->lock);
	r = tfs_pmd_commit_end(pool->pmd, c, r);
	pool->commit_io = false;
	pthread_cond_broadcast(&pool->commit_io_cv);
out:
	if (r) {
		/* The state on disk still maps what this commit freed: discard none of it. */
		tfs_extents_free(punch);
		return tfs_pool_meta_failed(pool, r, what);
	}
	return 0;
}

/*
 * One commit (or FLUSH) at a time, under commit_mutex.  FLUSH requests
 * take a ticket first; a flush whose snapshot of the tickets (covers) was
 * taken after a request's ticket began after that request arrived, so
 * when it succeeds every request up to covers is done, and those waiting
 * behind it return at once instead of flushing again.
 *
 * The commit order: (1) under the lock, the in-memory part of the
 * metadata commit: from here on every change goes into the next
 * transaction.  (2) With the lock dropped, flush the data device (every
 * mapping committed points at data on stable storage) while the metadata
 * blocks are written, then the superblock (commit_metadata).  Reads,
 * writes, allocations and other changes go on meanwhile.  (3) Discard the
 * data blocks freed in the committed transaction (not earlier: until (2)
 * the last committed mappings still point at them).  (4) Only then may an
 * allocation hand them out again (tfs_pmd_release_freed_data).  With
 * nothing to commit, a FLUSH is only the data flush.
 */
static int run_commit(struct tfs_pool *pool, bool flush_always, commit_fn fn)
{
	struct tfs_extents punch = { 0 };
	uint64_t ticket = 0, covers;
	bool want;
	int r;

	if (flush_always) {
		pthread_mutex_lock(&pool->lock);
		ticket = ++pool->flush_ticket;
		pthread_mutex_unlock(&pool->lock);
	}
	pthread_mutex_lock(&pool->commit_mutex);
	/* FLUSH batching: a flush that began after this request arrived has done its work. */
	if (flush_always && !fn && pool->flush_done >= ticket) {
		pthread_mutex_unlock(&pool->commit_mutex);
		return 0;
	}
	pthread_mutex_lock(&pool->lock);
	r = fn ? tfs_pool_may_change(pool) : tfs_pool_may_io(pool);
	want = fn || (pool->dirty && !tfs_pool_may_change(pool));
	covers = pool->flush_ticket;
	pthread_mutex_unlock(&pool->lock);
	/* Overwrites in place change no metadata but are flushed on the same timer. */
	if (atomic_exchange(&pool->data_unflushed, false))
		flush_always = true;
	if (r || (!want && !flush_always) || pool->opened_read_only)
		goto out;

	if (!want) {
		r = flush_data(pool);
		if (r)
			atomic_store(&pool->data_unflushed, true); /* try again next time */
		else
			pool->flush_done = covers;
		goto out;
	}
	pthread_mutex_lock(&pool->lock);
	r = commit_metadata(pool, fn, &punch);
	if (r)
		atomic_store(&pool->data_unflushed, true);
	else
		pool->flush_done = covers;
	/* fn has made the freed blocks allocatable already: discard them before anyone may. */
	if (fn)
		discard_extents(pool, &punch);
	pthread_mutex_unlock(&pool->lock);

	if (!fn)
		discard_extents(pool, &punch);
	tfs_extents_free(&punch);

	pthread_mutex_lock(&pool->lock);
	if (!r && pool->mode != TFS_POOL_FAIL) {
		tfs_pmd_release_freed_data(pool->pmd);
		leave_out_of_space(pool);
		tfs_pool_check_low_water(pool);
	}
	pthread_mutex_unlock(&pool->lock);
out:
	pthread_mutex_unlock(&pool->commit_mutex);
	return r;
}

int tfs_pool_commit_now(struct tfs_pool *pool, bool flush_data_always)
{
	return run_commit(pool, flush_data_always, NULL);
}

int tfs_pool_commit(struct tfs_pool *pool)
{
	return run_commit(pool, false, NULL);
}

/*
 * Commit a change made while abort_gen was gen; -EIO when an abort has
 * rolled it back meanwhile (another request's metadata failure).
 */
static int commit_change(struct tfs_pool *pool, uint64_t gen)
{
	int r = run_commit(pool, false, NULL);

	pthread_mutex_lock(&pool->lock);
	if (!r && pool->abort_gen != gen)
		r = -EIO;
	pthread_mutex_unlock(&pool->lock);
	return r;
}

int tfs_pool_space_exhausted(struct tfs_pool *pool, unsigned attempt)
{
	struct tfs_pmd_space sp;
	bool hold;
	int r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_change(pool);
	if (!r)
		tfs_pmd_space(pool->pmd, &sp);
	pthread_mutex_unlock(&pool->lock);
	/* No longer writable: the allocation itself ran out of metadata space and failed the pool. */
	if (r)
		return -ENOSPC;
	/* Blocks freed in this transaction become allocatable only once it is committed. */
	if (attempt == 0 && sp.data_free > 0)
		return tfs_pool_commit_now(pool, false);
	pthread_mutex_lock(&pool->lock);
	if (pool->mode == TFS_POOL_WRITE) {
		set_mode(pool, TFS_POOL_OUT_OF_DATA_SPACE, sp.data_free ?
			 "%llu data blocks free, fewer than a write needs" :
			 "no free data block (%llu in use)", (unsigned long long)
			 (sp.data_free ? sp.data_free : sp.data_total));
		pool->oods_free = sp.data_free;
	} else if (sp.data_free < pool->oods_free) {
		pool->oods_free = sp.data_free; /* a smaller request ran out too */
	}
	hold = pool->mode == TFS_POOL_OUT_OF_DATA_SPACE && !pool->cfg.error_if_no_space &&
	       !pool->no_space_error && !pool->closing;
	pthread_mutex_unlock(&pool->lock);
	return hold ? TFS_POOL_HOLD : -ENOSPC;
}

struct timespec tfs_timespec_add_ms(struct timespec t, uint64_t ms)
{
	t.tv_sec += (time_t)(ms / 1000);
	t.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000L;
	}
	return t;
}

struct timespec tfs_deadline_in(uint64_t ms)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return tfs_timespec_add_ms(now, ms);
}

/* oods_since + no_space_timeout, for pthread_cond_timedwait on space_cv. */
static struct timespec no_space_deadline(const struct tfs_pool *pool)
{
	return tfs_timespec_add_ms(pool->oods_since, pool->cfg.no_space_timeout_ms);
}

/*
 * The timeout counts from when the pool ran out, not from when each write
 * arrived (as dm-thin): once it passes, every held write fails and so do
 * later ones, until a resize gives the pool space it can count on again.
 */
int tfs_pool_hold_for_space(struct tfs_pool *pool, struct tfs_core_io *io)
{
	struct timespec deadline;
	int r = 0;

	pthread_mutex_lock(&pool->lock);
	deadline = no_space_deadline(pool);
	pool->held++;
	for (;;) {
		/* Under the lock a suspend broadcasts space_cv with: no wake-up is lost. */
		r = tfs_core_hold_check(pool->core, io);
		if (r)
			break;
		if (pool->closing || pool->mode == TFS_POOL_READ_ONLY || pool->mode == TFS_POOL_FAIL) {
			r = -EIO;
			break;
		}
		if (pool->mode != TFS_POOL_OUT_OF_DATA_SPACE)
			break; /* space again: retry */
		if (pool->no_space_error) {
			r = -ENOSPC;
			break;
		}
		if (!pool->cfg.no_space_timeout_ms) {
			pthread_cond_wait(&pool->space_cv, &pool->lock);
		} else if (pthread_cond_timedwait(&pool->space_cv, &pool->lock, &deadline) ==
			   ETIMEDOUT && pool->mode == TFS_POOL_OUT_OF_DATA_SPACE &&
			   !pool->no_space_error) {
			pool->no_space_error = true;
			snprintf(pool->reason, sizeof(pool->reason),
				 "no free data block for %llu ms (no_space_timeout): writes needing "
				 "a new block fail with ENOSPC until the data device is resized",
				 (unsigned long long)pool->cfg.no_space_timeout_ms);
			tfs_warn("%s: %s", pool->cfg.metadata, pool->reason);
			pthread_cond_broadcast(&pool->space_cv);
		}
	}
	pool->held--;
	pthread_mutex_unlock(&pool->lock);
	return r;
}

/* The timer measures intervals, so it must not jump with the wall clock. */
static void init_timer_cv(struct tfs_pool *pool)
{
	pthread_condattr_t attr;

	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&pool->timer_cv, &attr);
	pthread_cond_init(&pool->space_cv, &attr);
	pthread_condattr_destroy(&attr);
}

/*
 * A suspended pool does no background work: between the suspend's own
 * commit and the end of the resume nothing may change on disk.
 */
static void *commit_thread(void *arg)
{
	struct tfs_pool *pool = arg;

	pthread_mutex_lock(&pool->timer_lock);
	while (!pool->stopping) {
		/* Re-read each round: a reload may change it (under timer_lock). */
		uint64_t ms = pool->cfg.commit_interval_ms ? pool->cfg.commit_interval_ms : 1000;
		struct timespec deadline = tfs_deadline_in(ms);
		int w = 0;

		while (!pool->stopping && w != ETIMEDOUT)
			w = pthread_cond_timedwait(&pool->timer_cv, &pool->timer_lock, &deadline);
		if (pool->stopping)
			break;
		pthread_mutex_unlock(&pool->timer_lock);
		/* Failures change the mode and are logged there. */
		if (!tfs_core_suspended(pool->core, TFS_CORE_POOL))
			run_commit(pool, false, NULL);
		pthread_mutex_lock(&pool->timer_lock);
	}
	pthread_mutex_unlock(&pool->timer_lock);
	return NULL;
}

static int start_commit_thread(struct tfs_pool *pool)
{
	int r = pthread_create(&pool->commit_thread, NULL, commit_thread, pool);
	if (r) {
		tfs_err("cannot start the commit thread: %s", strerror(r));
		return -r;
	}
	pool->thread_started = true;
	return 0;
}

static void stop_commit_thread(struct tfs_pool *pool)
{
	if (!pool->thread_started)
		return;
	pthread_mutex_lock(&pool->timer_lock);
	pool->stopping = true;
	pthread_cond_signal(&pool->timer_cv);
	pthread_mutex_unlock(&pool->timer_lock);
	pthread_join(pool->commit_thread, NULL);
	pool->thread_started = false;
}

/* ---- format, open, close ------------------------------------------------------ */

static size_t cache_blocks(const struct tfs_pool_config *cfg)
{
	return (size_t)(cfg->metadata_cache_bytes / TFS_BLOCK_SIZE); /* 0 = the default */
}

static int data_blocks_of(struct tfs_bdev *data, uint64_t block_size, uint64_t *nr)
{
	uint64_t bytes;
	int r = tfs_bdev_size(data, &bytes);

	if (r) {
		tfs_err("%s: cannot get its size: %s", tfs_bdev_name(data), strerror(-r));
		return r;
	}
	*nr = bytes / block_size;
	return 0;
}

int tfs_pool_format(const struct tfs_pool_config *cfg)
{
	struct tfs_pmd_options opt = { .data_block_sectors = (uint32_t)(cfg->block_size >> 9),
				       .cache_blocks = cache_blocks(cfg) };
	struct tfs_bdev *meta, *data;
	struct tfs_pmd *pmd;
	int r;

	r = tfs_bdev_open(cfg->metadata, false, &meta);
	if (r)
		return r;
	r = tfs_bdev_open(cfg->data, false, &data);
	if (r)
		goto out_close_meta;
	r = data_blocks_of(data, cfg->block_size, &opt.nr_data_blocks);
	if (r)
		goto out_close_data;
	if (!opt.nr_data_blocks) {
		tfs_err("%s: the data device is smaller than one data block (%llu bytes)", cfg->data,
			(unsigned long long)cfg->block_size);
		r = -EINVAL;
		goto out_close_data;
	}
	r = tfs_pmd_format(meta, &opt, &pmd);
	if (!r)
		tfs_pmd_close(pmd);
out_close_data:
	tfs_bdev_close(data);
out_close_meta:
	tfs_bdev_close(meta);
	return r;
}

/*
 * Open path read-write or read-only, with O_DIRECT unless host_cache,
 * inside a fault wrapper (I/O counters, faults).  With fault injection
 * allowed the wrapper also holds writes until a flush, so that a simulated
 * power cut really drops unflushed writes; otherwise writes go straight
 * down (no copy, no memory held).
 */
static int open_wrapped(const struct tfs_pool_config *cfg, const char *path, bool read_only,
			struct tfs_bdev **out)
{
	bool volatile_cache = cfg->allow_faults;
	struct tfs_bdev *raw;
	int r = tfs_bdev_open_direct(path, read_only, !cfg->host_cache, &raw);

	if (r)
		return r;
	r = tfs_bdev_fault_wrap(raw, volatile_cache, out);
	if (r)
		tfs_bdev_close(raw);
	return r;
}

static int open_metadata(struct tfs_pool *pool)
{
	struct tfs_pmd_options opt = { .data_block_sectors = (uint32_t)(pool->block_size >> 9),
				       .nr_data_blocks = 0, /* a grown data device waits for resize */
				       .cache_blocks = cache_blocks(&pool->cfg),
				       .read_only = pool->opened_read_only };
	uint64_t have;
	int r;

	r = tfs_pmd_open(pool->meta, &opt, &pool->pmd);
	if (r)
		return r;
	/* The mode a pool starts in is no transition: only needs_check is worth a warning. */
	if (tfs_pmd_needs_check(pool->pmd)) {
		if (!pool->opened_read_only) {
			tfs_err("%s: metadata needs checking: run thinfs check --repair",
				pool->cfg.metadata);
			return -EROFS;
		}
		tfs_warn("%s: metadata needs checking: opened read-only", pool->cfg.metadata);
		pool->mode = TFS_POOL_READ_ONLY;
		snprintf(pool->reason, sizeof(pool->reason), "metadata needs checking");
	} else if (pool->opened_read_only) {
		pool->mode = TFS_POOL_READ_ONLY;
		snprintf(pool->reason, sizeof(pool->reason), "opened read-only");
	}
	/* A diff's hold outlives only a crash in its middle: nothing uses it any more. */
	if (!pool->opened_read_only && !tfs_pmd_needs_check(pool->pmd) &&
	    tfs_pmd_held_for_diff(pool->pmd)) {
		tfs_info("%s: dropping the metadata snapshot (block %llu) a diff held when the "
			 "daemon stopped", pool->cfg.metadata,
			 (unsigned long long)tfs_pmd_held_root(pool->pmd));
		r = tfs_pmd_drop_held_roots(pool->pmd);
		if (!r)
			r = tfs_pmd_commit(pool->pmd);
		if (r) {
			tfs_err("%s: dropping a diff's metadata snapshot failed: %s",
				pool->cfg.metadata, strerror(-r));
			return r;
		}
	}
	tfs_pmd_space(pool->pmd, &pool->space);
	if (!data_blocks_of(pool->data, pool->block_size, &have) && have < pool->space.data_total)
		tfs_warn("%s: the data device holds %llu blocks but the metadata says %llu",
			 pool->cfg.data, (unsigned long long)have,
			 (unsigned long long)pool->space.data_total);
	return 0;
}

static void free_pool(struct tfs_pool *pool)
{
	tfs_pmd_close(pool->pmd);
	tfs_prealloc_destroy(pool->prealloc);
	tfs_bdev_close(pool->data);
	tfs_bdev_close(pool->meta);
	tfs_prison_destroy(pool->prison);
	tfs_extents_free(&pool->passdown);
	tfs_core_destroy(pool->core);
	free(pool->staged);
	pthread_mutex_destroy(&pool->suspend_mutex);
	pthread_mutex_destroy(&pool->lock);
	pthread_mutex_destroy(&pool->commit_mutex);
	pthread_mutex_destroy(&pool->timer_lock);
	pthread_mutex_destroy(&pool->resize_mutex);
	pthread_mutex_destroy(&pool->diff_mutex);
	pthread_cond_destroy(&pool->commit_io_cv);
	pthread_cond_destroy(&pool->timer_cv);
	pthread_cond_destroy(&pool->space_cv);
	free(pool);
}

int tfs_pool_open(const struct tfs_pool_config *cfg, bool read_only, struct tfs_pool **out)
{
	struct tfs_pool *pool = calloc(1, sizeof(*pool));
	int r;

	if (!pool)
		return -ENOMEM;
	pool->cfg = *cfg;
	pool->block_size = cfg->block_size;
	pool->opened_read_only = read_only;
	pthread_mutex_init(&pool->lock, NULL);
	pthread_mutex_init(&pool->commit_mutex, NULL);
	pthread_mutex_init(&pool->timer_lock, NULL);
	pthread_mutex_init(&pool->resize_mutex, NULL);
	pthread_mutex_init(&pool->diff_mutex, NULL);
	pthread_mutex_init(&pool->suspend_mutex, NULL);
	pool->pending.prev = pool->pending.next = &pool->pending;
	pthread_cond_init(&pool->commit_io_cv, NULL);
	init_timer_cv(pool);

	r = tfs_prison_create(&pool->prison);
	if (!r)
		r = tfs_core_create(&pool->core);
	if (r)
		goto err_free;
	r = open_wrapped(cfg, cfg->metadata, read_only, &pool->meta);
	if (r)
		goto err_free;
	r = open_wrapped(cfg, cfg->data, read_only, &pool->data);
	if (r)
		goto err_free;
	tfs_info("%s: data and metadata devices opened %s", cfg->metadata,
		 pool->data->direct && pool->meta->direct ? "with O_DIRECT (host_cache = off)"
		 : pool->data->direct || pool->meta->direct ? "partly with O_DIRECT"
		 : "through the host page cache");
	r = open_metadata(pool);
	if (!r)
		tfs_pool_check_low_water(pool); /* already short of space: said at once */
	if (r)
		goto err_free;
	if (!read_only && pool->mode == TFS_POOL_WRITE)
		punch_free_blocks(pool);
	if (!read_only)
		r = tfs_prealloc_create(pool->data, pool->block_size, cfg->preallocate_bytes,
					pool->space.data_total,
					"partial writes to new blocks write the whole block",
					&pool->prealloc);
	if (r)
		goto err_free;
	if (!read_only) {
		r = start_commit_thread(pool);
		if (r)
			goto err_free;
	}
	*out = pool;
	return 0;

err_free:
	free_pool(pool);
	return r;
}

unsigned tfs_pool_transitions(struct tfs_pool *pool, uint64_t after,
			      struct tfs_pool_transition *out, unsigned max)
{
	unsigned n = 0;

	pthread_mutex_lock(&pool->lock);
	if (pool->nr_transitions > TFS_POOL_TRANSITIONS &&
	    after < pool->nr_transitions - TFS_POOL_TRANSITIONS)
		after = pool->nr_transitions - TFS_POOL_TRANSITIONS;
	for (uint64_t seq = after + 1; seq <= pool->nr_transitions && n < max; seq++)
		out[n++] = pool->transitions[seq % TFS_POOL_TRANSITIONS];
	pthread_mutex_unlock(&pool->lock);
	return n;
}

/* Nothing will resize a pool that is going away. */
void tfs_pool_stop_holding(struct tfs_pool *pool)
{
	tfs_core_close(pool->core);
	pthread_mutex_lock(&pool->lock);
	pool->closing = true;
	pthread_cond_broadcast(&pool->space_cv);
	pthread_mutex_unlock(&pool->lock);
}

void tfs_pool_set_event_notify(struct tfs_pool *pool, void (*fn)(void *arg), void *arg)
{
	pthread_mutex_lock(&pool->lock);
	pool->notify = fn;
	pool->notify_arg = arg;
	pthread_mutex_unlock(&pool->lock);
}

int tfs_pool_shutdown(struct tfs_pool *pool)
{
	bool failed;
	int r;

	if (pool->shut_down)
		return 0;
	pool->shut_down = true;
	tfs_pool_stop_holding(pool);
	stop_commit_thread(pool);
	pthread_mutex_lock(&pool->lock);
	failed = pool->mode == TFS_POOL_READ_ONLY || pool->mode == TFS_POOL_FAIL;
	pthread_mutex_unlock(&pool->lock);
	/* FLUSH semantics: overwrites in place reach stable storage too. */
	r = run_commit(pool, true, NULL);
	if (r == -EIO && failed)
		r = 0; /* nothing to commit, already reported; a failure of this commit is news */
	return r;
}

int tfs_pool_close(struct tfs_pool *pool)
{
	int r;

	if (!pool)
		return 0;
	r = tfs_pool_shutdown(pool);
	while (pool->thins) {
		tfs_err("thin device %u still open at pool close", pool->thins->id);
		pool->thins->refs = 1;
		tfs_pool_put_thin(pool, pool->thins);
	}
	free_pool(pool);
	return r;
}

uint64_t tfs_pool_block_size(struct tfs_pool *pool)
{
	return pool->block_size;
}

struct tfs_bdev *tfs_pool_bdev(struct tfs_pool *pool, bool data)
{
	return data ? pool->data : pool->meta;
}

/* ---- open device handles ---------------------------------------------------------- */

int tfs_pool_get_thin(struct tfs_pool *pool, uint32_t id, struct tfs_thin_ref **out)
{
	struct tfs_thin_ref *ref;
	int r;

	r = tfs_pool_may_io(pool);
	if (r)
		return r;
	for (ref = pool->thins; ref; ref = ref->next) {
		if (ref->id == id) {
			ref->refs++;
			*out = ref;
			return 0;
		}
	}
	ref = calloc(1, sizeof(*ref));
	if (!ref)
		return -ENOMEM;
	r = tfs_pmd_open_thin(pool->pmd, id, &ref->td);
	if (r) {
		free(ref);
		return r;
	}
	ref->id = id;
	ref->refs = 1;
	ref->next = pool->thins;
	pool->thins = ref;
	*out = ref;
	return 0;
}

void tfs_pool_put_thin(struct tfs_pool *pool, struct tfs_thin_ref *ref)
{
	struct tfs_thin_ref **pp = &pool->thins;

	if (--ref->refs)
		return;
	while (*pp != ref)
		pp = &(*pp)->next;
	*pp = ref->next;
	/*
	 * Closing may write the handle's details; in fail mode the metadata
	 * layer must not be called at all, and tfs_pmd_close frees the handle.
	 * No wait for a commit's I/O (commit_io): the commit saved the
	 * details first, and a change now goes into the next transaction.  A
	 * close must not wait: the daemon closes under its namespace lock.
	 */
	if (pool->mode != TFS_POOL_FAIL)
		tfs_pmd_close_thin(ref->td);
	free(ref);
}

/* ---- pool-level changes ------------------------------------------------------ */

/*
 * Every change to the pool's devices or superblock is a request of the
 * core's too: a suspend waits for one in progress, and while the pool is
 * suspended they are refused (-EBUSY) rather than held, because their
 * callers hold the daemon's namespace lock, which status and resume need.
 */
static int admin_begin(struct tfs_pool *pool, struct tfs_core_io *io, const char *what)
{
	int r = tfs_core_enter_admin(pool->core, io);

	if (r)
		tfs_info("%s: %s refused: the pool is suspended", pool->cfg.metadata, what);
	return r;
}

static int admin_end(struct tfs_pool *pool, struct tfs_core_io *io, int r)
{
	tfs_core_exit(pool->core, io);
	return r;
}

static bool is_open(struct tfs_pool *pool, uint32_t id)
{
	for (struct tfs_thin_ref *ref = pool->thins; ref; ref = ref->next)
		if (ref->id == id)
			return true;
	return false;
}

/* ---- devices ------------------------------------------------------------------------ */

/* The n lowest ids no device uses, ascending. */
static int free_ids(struct tfs_pool *pool, unsigned n, uint32_t *out)
{
	uint32_t *ids = NULL;
	unsigned found = 0, i = 0;
	uint64_t c = 0;
	int total;

	total = tfs_pmd_list_devices(pool->pmd, NULL, 0);
	if (total < 0)
		return total;
	if (total) {
		ids = malloc((size_t)total * sizeof(*ids));
		if (!ids)
			return -ENOMEM;
		total = tfs_pmd_list_devices(pool->pmd, ids, (unsigned)total);
		if (total < 0)
			goto out;
	}
	for (; found < n && c <= TFS_MAX_DEV_ID; c++) {
		if (i < (unsigned)total && ids[i] == c)
			i++;
		else
			out[found++] = (uint32_t)c;
	}
	if (found < n) {
		tfs_err("%s: no free thin device id left (the limit is %u)", pool->cfg.metadata,
			TFS_MAX_DEV_ID);
		total = -ENOSPC;
	}
out:
	free(ids);
	return total < 0 ? total : 0;
}

static int create_thin(struct tfs_pool *pool, uint32_t *id_out)
{
	uint64_t gen;
	uint32_t id;
	int r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_change(pool);
	if (!r)
		r = free_ids(pool, 1, &id);
	if (!r) {
		r = tfs_pmd_create_thin(pool->pmd, id);
		if (r)
			r = tfs_pool_meta_failed(pool, r, "creating a thin device");
		else
			pool->dirty = true;
	}
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	if (!r)
		r = commit_change(pool, gen);
	if (!r)
		*id_out = id;
	return r;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* Origins sorted and deduplicated: the order whole-device cells are taken in. */
static int unique_sorted(const uint32_t *ids, unsigned nr, uint32_t **out, unsigned *nr_out)
{
	uint32_t *v = malloc(nr * sizeof(*v));
	unsigned n = 0;

	if (!v)
		return -ENOMEM;
	memcpy(v, ids, nr * sizeof(*v));
	qsort(v, nr, sizeof(*v), cmp_u32);
	for (unsigned i = 0; i < nr; i++)
		if (!n || v[n - 1] != v[i])
			v[n++] = v[i];
	*out = v;
	*nr_out = n;
	return 0;
}

/*
 * With the origins quiesced and the lock held: all snapshots in the running
 * transaction, as ids (chosen by the caller when given, else the lowest free).
 */
static int make_snaps(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
		      const uint32_t *given, uint32_t *ids)
{
	struct tfs_thin_details d;
	int r;

	r = tfs_pool_may_change(pool);
	if (r)
		return r;
	for (unsigned i = 0; i < nr; i++) {
		r = tfs_pmd_device_details(pool->pmd, origins[i], &d);
		if (r == -ENODATA)
			tfs_err("snapshot: no thin device %u", origins[i]);
		if (r)
			return r;
	}
	if (given) {
		for (unsigned i = 0; i < nr; i++) {
			r = tfs_pmd_device_details(pool->pmd, given[i], &d);
			if (r != -ENODATA) {
				if (!r)
					tfs_err("snapshot: thin device %u exists already", given[i]);
				return r ? r : -EEXIST;
			}
		}
		memcpy(ids, given, nr * sizeof(*ids));
	} else {
		r = free_ids(pool, nr, ids);
		if (r)
			return r;
	}
	for (unsigned i = 0; i < nr; i++) {
		r = tfs_pmd_create_snap(pool->pmd, ids[i], origins[i]);
		if (r)
			return tfs_pool_meta_failed(pool, r, "creating a snapshot");
		pool->dirty = true;
	}
	return 0;
}

/*
 * Each origin is quiesced with a cell over its whole range: requests in
 * flight on it finish first (their lookups predate the snapshot, so an
 * overwrite in place must not land after it) and new ones wait.
 */
static int create_snaps(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
			const uint32_t *given, uint32_t *ids_out)
{
	uint32_t *locked, *ids;
	unsigned nr_locked, held = 0;
	uint64_t gen = 0;
	int r;

	if (!nr)
		return -EINVAL;
	ids = malloc(nr * sizeof(*ids));
	if (!ids)
		return -ENOMEM;
	r = unique_sorted(origins, nr, &locked, &nr_locked);
	if (r)
		goto out_free_ids;
	for (; held < nr_locked && !r; held++)
		r = tfs_prison_lock(pool->prison, locked[held], 0, UINT64_MAX);
	if (r) {
		held--;
		goto out_unlock;
	}
	pthread_mutex_lock(&pool->lock);
	r = make_snaps(pool, origins, nr, given, ids);
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
out_unlock:
	while (held--)
		tfs_prison_unlock(pool->prison, locked[held], 0, UINT64_MAX);
	free(locked);
	if (!r)
		r = commit_change(pool, gen);
	if (!r)
		memcpy(ids_out, ids, nr * sizeof(*ids));
out_free_ids:
	free(ids);
	return r;
}

/* The data blocks id maps, as extents (they are mostly contiguous). */
static int collect_blocks(struct tfs_pool *pool, uint32_t id, struct tfs_extents *x)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	struct tfs_td *td;
	uint64_t next = 0;
	int n, r;

	r = tfs_pmd_open_thin(pool->pmd, id, &td);
	if (r)
		return r;
	do {
		n = tfs_thin_lookup_range(td, next, UINT64_MAX, TFS_POOL_CHUNK, maps);
		for (int i = 0; i < n && !r; i++)
			r = tfs_extents_add(x, maps[i].data_block, 1);
		if (n > 0)
			next = maps[n - 1].vblock + 1;
	} while (n == TFS_POOL_CHUNK && !r);
	tfs_pmd_close_thin(td);
	return n < 0 ? n : r;
}

static int delete_locked(struct tfs_pool *pool, uint32_t id)
{
	struct tfs_extents blocks = { 0 };
	int r;

	r = tfs_pool_may_change(pool);
	if (r)
		return r;
	if (is_open(pool, id)) {
		tfs_err("thin device %u is open and cannot be deleted", id);
		return -EBUSY;
	}
	/* Which blocks to pass down is known only before the tree goes. */
	if (pool->cfg.discard_passdown) {
		r = collect_blocks(pool, id, &blocks);
		if (r == -ENODATA)
			tfs_err("no thin device %u to delete", id);
		if (r)
			goto out;
	}
	r = tfs_pmd_delete_thin(pool->pmd, id);
	if (r == -ENODATA)
		goto out; /* logged by the metadata layer; nothing changed */
	if (r) {
		r = tfs_pool_meta_failed(pool, r, "deleting a thin device");
		goto out;
	}
	pool->dirty = true;
	for (size_t i = 0; i < blocks.nr; i++)
		for (uint64_t b = blocks.v[i].begin; b < blocks.v[i].begin + blocks.v[i].len; b++)
			tfs_pool_passdown_if_free(pool, b);
out:
	tfs_extents_free(&blocks);
	return r;
}

static int delete_device(struct tfs_pool *pool, uint32_t id)
{
	uint64_t gen;
	int r;

	pthread_mutex_lock(&pool->lock);
	r = delete_locked(pool, id);
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	return r ? r : commit_change(pool, gen);
}

/* Those of ids that exist, in one transaction; the rest are skipped quietly. */
static int delete_devices(struct tfs_pool *pool, const uint32_t *ids, unsigned nr)
{
	struct tfs_thin_details d;
	uint64_t gen;
	int r = 0;

	pthread_mutex_lock(&pool->lock);
	/* Refuse before deleting any: a later refusal would leave the first ones deleted. */
	for (unsigned i = 0; !r && i < nr; i++)
		if (is_open(pool, ids[i])) {
			tfs_err("thin device %u is open and cannot be deleted", ids[i]);
			r = -EBUSY;
		}
	for (unsigned i = 0; !r && i < nr; i++) {
		r = tfs_pmd_device_details(pool->pmd, ids[i], &d);
		if (r == -ENODATA) {
			r = 0;
			continue;
		}
		if (!r)
			r = delete_locked(pool, ids[i]);
	}
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	/* A metadata failure midway aborts the transaction: nothing is half done. */
	return r ? r : commit_change(pool, gen);
}

int tfs_pool_list(struct tfs_pool *pool, uint32_t *ids, unsigned max)
{
	int r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	if (!r)
		r = tfs_pmd_list_devices(pool->pmd, ids, max);
	pthread_mutex_unlock(&pool->lock);
	return r;
}

static int set_transaction_id(struct tfs_pool *pool, uint64_t old_id, uint64_t new_id)
{
	uint64_t gen;
	int r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_change(pool);
	if (!r)
		r = tfs_pmd_set_transaction_id(pool->pmd, old_id, new_id); /* -EINVAL changes nothing */
	if (!r)
		pool->dirty = true;
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	return r ? r : commit_change(pool, gen);
}

int tfs_pool_create_thin(struct tfs_pool *pool, uint32_t *id_out)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "creating a thin device");

	return r ? r : admin_end(pool, &io, create_thin(pool, id_out));
}

int tfs_pool_create_snaps(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
			  uint32_t *ids_out)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "creating snapshots");

	return r ? r : admin_end(pool, &io, create_snaps(pool, origins, nr, NULL, ids_out));
}

int tfs_pool_create_snaps_as(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
			     const uint32_t *ids)
{
	struct tfs_core_io io;
	uint32_t *made;
	int r;

	made = malloc((nr ? nr : 1) * sizeof(*made));
	if (!made)
		return -ENOMEM;
	r = admin_begin(pool, &io, "creating snapshots");
	if (!r)
		r = admin_end(pool, &io, create_snaps(pool, origins, nr, ids, made));
	free(made);
	return r;
}

int tfs_pool_free_ids(struct tfs_pool *pool, unsigned n, uint32_t *ids_out)
{
	int r;

	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	if (!r)
		r = free_ids(pool, n, ids_out);
	pthread_mutex_unlock(&pool->lock);
	return r;
}

int tfs_pool_delete_devices(struct tfs_pool *pool, const uint32_t *ids, unsigned nr)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "deleting thin devices");

	return r ? r : admin_end(pool, &io, delete_devices(pool, ids, nr));
}

int tfs_pool_delete(struct tfs_pool *pool, uint32_t id)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "deleting a thin device");

	return r ? r : admin_end(pool, &io, delete_device(pool, id));
}

int tfs_pool_set_transaction_id(struct tfs_pool *pool, uint64_t old_id, uint64_t new_id)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "setting the transaction id");

	return r ? r : admin_end(pool, &io, set_transaction_id(pool, old_id, new_id));
}

/*
 * Both commit inside the metadata layer, so they run as the commit step
 * itself.  A diff holds the same slot for a moment (thin-diff.c): wait for it.
 */
static int metadata_snap(struct tfs_pool *pool, bool reserve)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, reserve ? "reserving a metadata snapshot"
					       : "releasing the metadata snapshot");

	if (r)
		return r;
	pthread_mutex_lock(&pool->diff_mutex);
	r = run_commit(pool, false, reserve ? tfs_pmd_reserve_metadata_snap
					    : tfs_pmd_release_metadata_snap);
	pthread_mutex_unlock(&pool->diff_mutex);
	return admin_end(pool, &io, r);
}

int tfs_pool_reserve_metadata_snap(struct tfs_pool *pool)
{
	return metadata_snap(pool, true);
}

int tfs_pool_release_metadata_snap(struct tfs_pool *pool)
{
	return metadata_snap(pool, false);
}

/* ---- resize ------------------------------------------------------------------------- */

static int refuse(char *why, size_t why_len, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int refuse(char *why, size_t why_len, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, why_len, fmt, ap);
	va_end(ap);
	/* Mostly the caller's mistake, answered to the caller: not an error of the pool. */
	tfs_info("resize refused: %s", why);
	return err;
}

/* With the lock held: why the pool cannot be resized now, or 0. */
static int may_resize(struct tfs_pool *pool, char *why, size_t why_len)
{
	wait_commit_io(pool);
	if (pool->opened_read_only && tfs_pmd_needs_check(pool->pmd))
		return refuse(why, why_len, -EROFS,
			      "metadata needs checking: run thinfs check --repair");
	if (pool->opened_read_only)
		return refuse(why, why_len, -EROFS, "the pool is open read-only");
	if (pool->mode == TFS_POOL_READ_ONLY || pool->mode == TFS_POOL_FAIL)
		return refuse(why, why_len, -EIO, "the pool is in %s mode (%s)%s",
			      mode_names[pool->mode], pool->reason,
			      tfs_pmd_needs_check(pool->pmd) ?
			      ": metadata needs checking: run thinfs check --repair" : "");
	return 0;
}

/*
 * The data device down to want blocks (< now): the space map shrinks under
 * the lock (refused, nothing changed, while a block at or past the end is
 * in use: allocated, mapped, or held by the metadata snapshot), then the
 * change is committed like any other, then a file is cut to the new size.
 * Not before the commit: until it is on disk the last committed mappings
 * may still point past the end (blocks freed in this transaction).  A
 * block device is left as it is.
 */
static int shrink_data(struct tfs_pool *pool, uint64_t now, uint64_t want, char *why,
		       size_t why_len)
{
	uint64_t highest = UINT64_MAX, have, gen;
	int r;

	if (want == 0)
		return refuse(why, why_len, -EINVAL, "cannot shrink the data device to 0 blocks: "
			      "a pool needs at least one");
	pthread_mutex_lock(&pool->lock);
	r = may_resize(pool, why, why_len);
	if (!r)
		r = tfs_pmd_shrink_data(pool->pmd, want, &highest);
	if (r == -EINVAL && highest != UINT64_MAX && highest >= want) {
		r = refuse(why, why_len, -EINVAL,
			   "cannot shrink the data device to %llu blocks: block %llu is in use "
			   "(highest used); the smallest possible size is %llu blocks",
			   (unsigned long long)want, (unsigned long long)highest,
			   (unsigned long long)highest + 1);
	} else if (r && !why[0]) {
		r = tfs_pool_meta_failed(pool, r, "shrinking the data space map");
		snprintf(why, why_len, "%s", pool->reason);
	} else if (!r) {
		pool->dirty = true;
	}
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	if (r)
		return r;
	/* Leaves out_of_data_space (if space is left) and counts low water, as any commit. */
	r = commit_change(pool, gen);
	if (r) {
		snprintf(why, why_len, "committing the new size failed: %s", strerror(-r));
		return r;
	}
	tfs_info("%s: data device shrunk from %llu to %llu blocks", pool->cfg.metadata,
		 (unsigned long long)now, (unsigned long long)want);
	tfs_prealloc_resize(pool->prealloc, want); /* only forgets: cannot fail */
	if (tfs_bdev_size(pool->data, &have) || have <= want * pool->block_size)
		return 0;
	r = tfs_bdev_shrink(pool->data, want * pool->block_size);
	/* The pool is smaller already; only the space past its end is not given back. */
	if (r && r != -ENOTSUP) /* -ENOTSUP: a block device */
		tfs_warn("%s: truncating %s to %llu bytes failed: %s", pool->cfg.metadata,
			 tfs_bdev_name(pool->data), (unsigned long long)(want * pool->block_size),
			 strerror(-r));
	return 0;
}

int tfs_pool_grow(struct tfs_pool *pool, bool data, uint64_t bytes, char *why, size_t why_len)
{
	struct tfs_bdev *dev = data ? pool->data : pool->meta;
	const char *what = data ? "data" : "metadata";
	uint64_t unit = data ? pool->block_size : TFS_BLOCK_SIZE;
	uint64_t want = bytes / unit, now, have;
	struct tfs_pmd_space sp;
	uint64_t gen;
	int r;

	why[0] = '\0';
	pthread_mutex_lock(&pool->resize_mutex);
	pthread_mutex_lock(&pool->lock);
	r = may_resize(pool, why, why_len);
	if (!r)
		tfs_pmd_space(pool->pmd, &sp);
	pthread_mutex_unlock(&pool->lock);
	if (r)
		goto out;
	now = data ? sp.data_total : sp.meta_total;
	if (want < now && !data) {
		/* Metadata blocks may be anywhere below the end, and nothing moves them. */
		r = refuse(why, why_len, -EINVAL,
			   "cannot shrink the metadata device from %llu to %llu blocks: shrinking "
			   "the metadata device is not supported", (unsigned long long)now,
			   (unsigned long long)want);
		goto out;
	}
	if (want < now) {
		r = shrink_data(pool, now, want, why, why_len);
		goto out;
	}
	if (!data && want > TFS_MAX_METADATA_BLOCKS) {
		/* As mkpool with an oversized device: only what the format can use, and say so. */
		if (now == TFS_MAX_METADATA_BLOCKS) {
			r = refuse(why, why_len, -EINVAL,
				   "cannot grow the metadata device to %llu blocks: the format uses at "
				   "most %u metadata blocks (about 15.9 GiB), and it has that many "
				   "already", (unsigned long long)want, TFS_MAX_METADATA_BLOCKS);
			goto out;
		}
		snprintf(why, why_len, "grown to %u blocks, not %llu: the format uses at most %u "
			 "metadata blocks (about 15.9 GiB)", TFS_MAX_METADATA_BLOCKS,
			 (unsigned long long)want, TFS_MAX_METADATA_BLOCKS);
		want = TFS_MAX_METADATA_BLOCKS;
	}
	if (want == now)
		goto out;
	r = tfs_bdev_size(dev, &have);
	if (!r && have < want * unit)
		r = tfs_bdev_grow(dev, want * unit);
	if (r) {
		r = refuse(why, why_len, r, "cannot grow %s to %llu bytes: %s", tfs_bdev_name(dev),
			   (unsigned long long)(want * unit), strerror(-r));
		goto out;
	}
	/* The new blocks are free: they must read as zeros too (a file may hold old data there). */
	if (data && atomic_load(&pool->free_zero) &&
	    tfs_bdev_discard(dev, now * unit, (want - now) * unit))
		tfs_pool_free_not_zero(pool, "discarding the grown part of the data device failed");
	pthread_mutex_lock(&pool->lock);
	r = may_resize(pool, why, why_len);
	if (!r) {
		r = data ? tfs_pmd_resize_data(pool->pmd, want)
			 : tfs_pmd_resize_metadata(pool->pmd, want);
		if (r) {
			r = tfs_pool_meta_failed(pool, r, data ? "growing the data space map"
							       : "growing the metadata space map");
			snprintf(why, why_len, "%s", pool->reason);
		} else {
			pool->dirty = true;
			/* New space the pool can count on: hold writes again when it runs out. */
			if (data)
				pool->no_space_error = false;
		}
	}
	gen = pool->abort_gen;
	pthread_mutex_unlock(&pool->lock);
	if (!r) {
		/* The commit returns an out_of_data_space pool to write mode and wakes held writes. */
		r = commit_change(pool, gen);
		if (r)
			snprintf(why, why_len, "committing the new size failed: %s", strerror(-r));
	}
	if (!r)
		tfs_info("%s: %s device grown from %llu to %llu blocks", pool->cfg.metadata, what,
			 (unsigned long long)now, (unsigned long long)want);
	/* Without memory for a longer map, the new chunks are only never preallocated. */
	if (!r && data && tfs_prealloc_resize(pool->prealloc, want))
		tfs_warn("%s: out of memory: the grown part of the data device is not preallocated",
			 pool->cfg.data);
out:
	pthread_mutex_unlock(&pool->resize_mutex);
	return r;
}

int tfs_pool_resize(struct tfs_pool *pool, bool data, uint64_t bytes, char *why, size_t why_len)
{
	struct tfs_core_io io;
	int r = admin_begin(pool, &io, "resizing");

	if (r) {
		snprintf(why, why_len, "the pool is suspended: stage the new size with reload, "
			 "then resume");
		return r;
	}
	return admin_end(pool, &io, tfs_pool_grow(pool, data, bytes, why, why_len));
}

/* ---- status ------------------------------------------------------------------------- */

static void copy_counts(struct tfs_bdev *dev, struct tfs_io_counts *out)
{
	struct tfs_bdev_io_counts c;

	tfs_bdev_fault_counts(dev, &c);
	*out = (struct tfs_io_counts){ c.reads, c.writes, c.flushes, c.discards, c.read_bytes,
				       c.write_bytes, dev->direct };
}

void tfs_pool_status(struct tfs_pool *pool, struct tfs_pool_status *out)
{
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&pool->lock);
	out->mode = mode_names[pool->mode];
	snprintf(out->reason, sizeof(out->reason), "%s", pool->reason);
	out->needs_check = tfs_pmd_needs_check(pool->pmd);
	/* In fail mode the metadata layer may hold no maps: report the last known figures. */
	if (pool->mode != TFS_POOL_FAIL) {
		tfs_pmd_space(pool->pmd, &pool->space);
		out->transaction_id = tfs_pmd_transaction_id(pool->pmd);
		out->held_root = tfs_pmd_held_root(pool->pmd);
	}
	out->data_block_size = pool->block_size;
	out->data_total = pool->space.data_total;
	out->data_used = pool->space.data_total - pool->space.data_free;
	out->meta_total = pool->space.meta_total;
	out->meta_used = pool->space.meta_total - pool->space.meta_free;
	out->low_water_blocks = low_water(&pool->cfg, out->data_total);
	out->meta_low_water_blocks = meta_low_water(out->meta_total);
	out->low_water_data = pool->lw_data;
	out->low_water_meta = pool->lw_meta;
	out->held_writes = pool->held;
	out->no_space_error = pool->no_space_error;
	out->reload_staged = pool->reload_staged;
	out->error_if_no_space = pool->cfg.error_if_no_space;
	out->discard_passdown = pool->cfg.discard_passdown;
	out->free_blocks_read_zero = atomic_load(&pool->free_zero);
	pthread_mutex_unlock(&pool->lock);
	tfs_prealloc_counts(pool->prealloc, &out->prealloc);
	out->new_written_partly = atomic_load(&pool->new_written_partly);
	out->new_filled_whole = atomic_load(&pool->new_filled_whole);
	out->suspended = tfs_core_suspended(pool->core, TFS_CORE_POOL);
	out->held_in_core = tfs_core_nr_held(pool->core, TFS_CORE_POOL);
	copy_counts(pool->meta, &out->io_meta);
	copy_counts(pool->data, &out->io_data);
}

/* Clear excl[i] where other maps maps[i]'s vblock to the same data block; both sorted. */
static void clear_matches(const struct tfs_thin_mapping *maps, int n, bool *excl,
			  const struct tfs_thin_mapping *other, int m)
{
	for (int i = 0, j = 0; i < n && j < m;) {
		if (maps[i].vblock < other[j].vblock) {
			i++;
		} else if (maps[i].vblock > other[j].vblock) {
			j++;
		} else {
			if (maps[i].data_block == other[j].data_block)
				excl[i] = false;
			i++;
			j++;
		}
	}
}

/* With the lock held: clear excl[i] for mappings device other_id shares. */
static int match_device(struct tfs_pool *pool, uint32_t other_id,
			const struct tfs_thin_mapping *maps, int n, bool *excl)
{
	struct tfs_thin_mapping other[TFS_POOL_CHUNK];
	struct tfs_thin_ref *ref;
	struct tfs_td *td = NULL, *temp = NULL;
	uint64_t next = maps[0].vblock, end = maps[n - 1].vblock + 1;
	int m, r;

	for (ref = pool->thins; ref && !td; ref = ref->next)
		if (ref->id == other_id)
			td = ref->td;
	if (!td) {
		r = tfs_pmd_open_thin(pool->pmd, other_id, &temp);
		if (r)
			return r == -ENODATA ? 0 : r;
		td = temp;
	}
	do {
		m = tfs_thin_lookup_range(td, next, end, TFS_POOL_CHUNK, other);
		if (m > 0) {
			clear_matches(maps, n, excl, other, m);
			next = other[m - 1].vblock + 1;
		}
	} while (m == TFS_POOL_CHUNK);
	if (temp)
		tfs_pmd_close_thin(temp);
	return m < 0 ? m : 0;
}

/*
 * With the lock held: which of the chunk's mappings no other device maps.
 * Count 1 and not shared (mapped since the last snapshot) settles it at
 * once; count 1 but "shared" may mean a leaf still shared with a snapshot
 * or one whose snapshot is gone.  Count 1 means one leaf holds the block,
 * so another device can map it only through that leaf, at the same
 * vblock: those are looked up in every other device.
 */
static int exclusive_in_chunk(struct tfs_pool *pool, uint32_t id,
			      const struct tfs_thin_mapping *maps, int n, bool *excl)
{
	uint32_t *ids = NULL;
	bool ambiguous = false;
	uint32_t count;
	int nr_ids, r = 0;

	for (int i = 0; i < n && !r; i++) {
		r = tfs_pmd_data_block_count(pool->pmd, maps[i].data_block, &count);
		excl[i] = !r && count == 1;
		ambiguous |= excl[i] && maps[i].shared;
	}
	if (r || !ambiguous)
		return r;
	nr_ids = tfs_pmd_list_devices(pool->pmd, NULL, 0);
	if (nr_ids > 0 && !(ids = malloc((size_t)nr_ids * sizeof(*ids))))
		return -ENOMEM;
	if (nr_ids > 0)
		nr_ids = tfs_pmd_list_devices(pool->pmd, ids, (unsigned)nr_ids);
	for (int d = 0; d < nr_ids && !r; d++)
		if (ids[d] != id)
			r = match_device(pool, ids[d], maps, n, excl);
	free(ids);
	return nr_ids < 0 ? nr_ids : r;
}

/* One chunk of the walk; *next is where the following one starts. */
static int usage_chunk(struct tfs_pool *pool, struct tfs_thin_ref *ref, uint64_t *next,
		       struct tfs_dev_usage *u)
{
	struct tfs_thin_mapping maps[TFS_POOL_CHUNK];
	bool excl[TFS_POOL_CHUNK];
	int n, r;

	n = tfs_thin_lookup_range(ref->td, *next, UINT64_MAX, TFS_POOL_CHUNK, maps);
	if (n <= 0)
		return n;
	r = exclusive_in_chunk(pool, ref->id, maps, n, excl);
	if (r)
		return r;
	u->mapped_blocks += (uint64_t)n;
	for (int i = 0; i < n; i++)
		u->exclusive_blocks += excl[i];
	*next = maps[n - 1].vblock + 1;
	return n;
}

int tfs_pool_dev_end(struct tfs_pool *pool, uint32_t id, uint64_t *blocks)
{
	struct tfs_thin_mapping m;
	struct tfs_thin_ref *ref;
	uint64_t lo, hi = UINT64_MAX;
	int n, r;

	*blocks = 0;
	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	if (!r)
		r = tfs_pool_get_thin(pool, id, &ref); /* shared with open volumes */
	if (r)
		goto out_unlock;
	n = tfs_thin_lookup_range(ref->td, 0, hi, 1, &m);
	lo = n > 0 ? m.vblock : 0;
	/*
	 * Bisect on "is anything mapped in [mid, hi)": lo is always mapped,
	 * nothing is mapped at or past hi.  About 64 lookups, whatever the size.
	 */
	while (n > 0 && hi - lo > 1) {
		uint64_t mid = lo + (hi - lo) / 2;
		int k = tfs_thin_lookup_range(ref->td, mid, hi, 1, &m);

		if (k < 0)
			n = k;
		else if (k > 0)
			lo = m.vblock;
		else
			hi = mid;
	}
	if (n < 0)
		r = n;
	else if (n > 0)
		*blocks = lo + 1;
	tfs_pool_put_thin(pool, ref);
out_unlock:
	pthread_mutex_unlock(&pool->lock);
	return r;
}

int tfs_pool_dev_usage(struct tfs_pool *pool, uint32_t id, struct tfs_dev_usage *out)
{
	struct tfs_thin_ref *ref;
	uint64_t next = 0;
	int n, r;

	*out = (struct tfs_dev_usage){ 0 };
	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	if (!r)
		r = tfs_pool_get_thin(pool, id, &ref); /* also keeps it from being deleted */
	pthread_mutex_unlock(&pool->lock);
	if (r)
		return r;
	do {
		pthread_mutex_lock(&pool->lock);
		n = tfs_pool_may_io(pool);
		if (!n)
			n = usage_chunk(pool, ref, &next, out);
		pthread_mutex_unlock(&pool->lock);
	} while (n == TFS_POOL_CHUNK);
	pthread_mutex_lock(&pool->lock);
	tfs_pool_put_thin(pool, ref);
	pthread_mutex_unlock(&pool->lock);
	return n < 0 ? n : 0;
}
