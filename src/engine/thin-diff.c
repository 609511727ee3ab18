/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Changed blocks between two thin devices of a live pool (pool.h,
 * tfs_pool_diff).  In a pool that cannot change (read_only mode, opened
 * read-only) the walk drops the lock between steps just the same.
 *
 * Why hold the trees rather than the lock: the walk of a big diff reads
 * thousands of nodes, and holding the pool's lock (or stopping commits)
 * for that long would stall every write and every fsync.  Holding the
 * roots costs one metadata block and two reference counts, changed in
 * memory: after it every change to the held trees shadows them, so they
 * stay as they were, whatever the writers do and however often the pool
 * commits, and the walk can drop the lock between steps.  A commit during
 * the walk writes the hold to disk (the format's metadata snapshot, which
 * thin_check accepts, tagged as a diff's so that an open after a crash
 * drops it); a diff with no commit in between changes nothing.
 * The cost is the slot: while a user holds a metadata snapshot
 * (reserve-metadata-snap) a diff is refused rather than served from that
 * older snapshot, which would not show the writes made since.
 */
#include "pool-internal.h"

#include <errno.h>
#include <sched.h>

#include "log.h"

static int diff_walk(struct tfs_pool *pool, struct tfs_thin_diff *d,
		     int (*fn)(void *ctx, uint64_t vblock, uint64_t len, bool zero),
		     int (*progress)(void *ctx, uint64_t vblock), void *ctx)
{
	int r;

	while ((r = tfs_thin_diff_step(d, TFS_POOL_DIFF_STEP, fn, ctx)) == 1) {
		uint64_t at = tfs_thin_diff_position(d);
		bool stop;

		pthread_mutex_unlock(&pool->lock);
		stop = progress && progress(ctx, at);
		/* The mutex is not fair: let requests waiting for it in first. */
		sched_yield();
		pthread_mutex_lock(&pool->lock);
		if (stop)
			return -EINTR;
	}
	return r;
}

int tfs_pool_diff(struct tfs_pool *pool, const uint32_t *from, const uint32_t *to,
		  int (*fn)(void *ctx, uint64_t vblock, uint64_t len, bool zero),
		  int (*progress)(void *ctx, uint64_t vblock), void *ctx,
		  struct tfs_pool_diff_stats *stats)
{
	struct tfs_thin_diff *d = NULL;
	uint64_t commits = 0, gen = 0;
	bool hold;
	int r, r2;

	*stats = (struct tfs_pool_diff_stats){ 0 };
	pthread_mutex_lock(&pool->diff_mutex);
	pthread_mutex_lock(&pool->lock);
	r = tfs_pool_may_io(pool);
	if (r)
		goto out_unlock;
	/* Nothing changes the metadata of a read-only pool: nothing to hold. */
	hold = !tfs_pool_may_change(pool);
	if (hold) {
		r = tfs_pmd_hold_roots(pool->pmd);
		if (r == -EBUSY || r == -ENOSPC)
			goto out_unlock;
		if (r) {
			r = tfs_pool_meta_failed(pool, r, "holding the mapping trees for a diff");
			goto out_unlock;
		}
		commits = tfs_pmd_commit_count(pool->pmd);
		gen = pool->abort_gen;
		stats->held = true;
	}
	r = tfs_thin_diff_begin(pool->pmd, from, to, &d);
	if (!r) {
		r = diff_walk(pool, d, fn, progress, ctx);
		stats->nodes_read = tfs_thin_diff_nodes_read(d);
		tfs_thin_diff_end(d);
	}
	if (hold && pool->abort_gen == gen && !tfs_pool_may_change(pool)) {
		r2 = tfs_pmd_drop_held_roots(pool->pmd);
		if (r2)
			r = tfs_pool_meta_failed(pool, r2, "releasing the trees a diff held");
		else if (tfs_pmd_commit_count(pool->pmd) != commits)
			pool->dirty = true; /* the hold is on disk: so must its end be */
	} else if (hold && tfs_pmd_held_root(pool->pmd)) {
		/* An abort kept the hold only if a commit had written it: it stays, as a user's would. */
		tfs_warn("%s: the metadata snapshot a diff held (block %llu) outlived an abort: "
			 "release-metadata-snap drops it", pool->cfg.metadata,
			 (unsigned long long)tfs_pmd_held_root(pool->pmd));
	}
out_unlock:
	pthread_mutex_unlock(&pool->lock);
	pthread_mutex_unlock(&pool->diff_mutex);
	return r;
}
