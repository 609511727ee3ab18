/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-policy.h - the cache target's in-memory mapping and the smq
 * policy's bookkeeping (private to cache.c).
 *
 * Owns: which origin block each cache block holds (and the reverse, by
 * hash), dirty bits, hit counts of cached blocks, and a hotspot table of
 * hit counts for origin blocks not cached (direct-mapped, so its memory is
 * bounded by the cache's size, not the origin's).  Counts age: every so
 * many accesses all of them are halved, so that yesterday's hot set does
 * not hold the cache for ever.  An origin block seen PROMOTE_HITS times
 * while uncached becomes a promotion candidate; the worker promotes it,
 * demoting the coldest clean block first when no block is free and that
 * one is colder.  The cleaner policy uses the same state and asks only
 * next_dirty.
 *
 * Never: does I/O or touches metadata.  Not thread-safe: the caller's
 * lock (struct tfs_cache's) covers every call.  Costs: lookup, access,
 * insert, remove O(1) expected; coldest_clean and next_dirty O(cache blocks).
 */
#ifndef TFS_ENGINE_CACHE_POLICY_H
#define TFS_ENGINE_CACHE_POLICY_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_cache_policy_state;

/* -ENOMEM. */
int tfs_cache_policy_create(uint32_t nr_cblocks, struct tfs_cache_policy_state **out);
void tfs_cache_policy_destroy(struct tfs_cache_policy_state *p);

/* The cache block holding ob, or UINT32_MAX. */
uint32_t tfs_cache_policy_lookup(struct tfs_cache_policy_state *p, uint64_t ob);
/* The origin block cb holds, or UINT64_MAX (free or reserved). */
uint64_t tfs_cache_policy_oblock(struct tfs_cache_policy_state *p, uint32_t cb);
bool tfs_cache_policy_dirty(struct tfs_cache_policy_state *p, uint32_t cb);
void tfs_cache_policy_set_dirty(struct tfs_cache_policy_state *p, uint32_t cb, bool dirty);
uint32_t tfs_cache_policy_hits(struct tfs_cache_policy_state *p, uint32_t cb);
uint32_t tfs_cache_policy_nr_free(struct tfs_cache_policy_state *p);
uint32_t tfs_cache_policy_nr_dirty(struct tfs_cache_policy_state *p);

/* Reserve a free block for a promotion (UINT32_MAX: none); put_free gives it back. */
uint32_t tfs_cache_policy_take_free(struct tfs_cache_policy_state *p);
void tfs_cache_policy_put_free(struct tfs_cache_policy_state *p, uint32_t cb);
/* Map cb (free or reserved) to ob. */
void tfs_cache_policy_insert(struct tfs_cache_policy_state *p, uint32_t cb, uint64_t ob,
			     bool dirty, uint32_t hits);
/* Unmap cb (it becomes free). */
void tfs_cache_policy_remove(struct tfs_cache_policy_state *p, uint32_t cb);

/*
 * Count an access to ob (cached in cb, or cb == UINT32_MAX).  With
 * may_promote, an uncached block used repeatedly is queued for promotion:
 * returns true when it was (wake the worker).
 */
bool tfs_cache_policy_access(struct tfs_cache_policy_state *p, uint64_t ob, uint32_t cb,
			     bool may_promote);
/* The next promotion candidate (oldest first); false when none is queued. */
bool tfs_cache_policy_pop_candidate(struct tfs_cache_policy_state *p, uint64_t *ob);
/* How hot an uncached block is (0 when the hotspot table has forgotten it). */
uint32_t tfs_cache_policy_candidate_hits(struct tfs_cache_policy_state *p, uint64_t ob);
/* The clean cached block with the fewest hits, if fewer than hotter_than; else UINT32_MAX. */
uint32_t tfs_cache_policy_coldest_clean(struct tfs_cache_policy_state *p, uint32_t hotter_than);
/* A dirty block to write back, in origin block order round the origin; UINT32_MAX: none. */
uint32_t tfs_cache_policy_next_dirty(struct tfs_cache_policy_state *p);

#endif
