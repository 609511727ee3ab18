/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-metadata.h - the dm-cache metadata schema (format versions 1 and 2).
 *
 * Owns: the cache superblock and what hangs from it: the mapping array
 * (cache block -> origin block, valid, and in version 1 dirty), the dirty
 * bitset (version 2), the hint array (opaque per-cache-block policy data),
 * the discard bitset (origin ranges known discarded), the metadata space
 * map, the hit/miss counters, the policy's name, version and hint size, the
 * CLEAN_SHUTDOWN and NEEDS_CHECK flags; format, open, commit and abort.
 * docs/cache-format.md describes the bytes.
 *
 * Clean shutdown: a read-write open clears CLEAN_SHUTDOWN on disk at once
 * (in place, flushed), so that a crash from then on is seen by the next
 * open; tfs_cmd_commit(cmd, true) sets it again, for the last commit of
 * an orderly stop.  When the flag was clear at open
 * (tfs_cmd_clean_when_opened false), tfs_cmd_load_mappings reports every
 * mapped block dirty and no hints, and tfs_cmd_load_discards reports no
 * discards, as the kernel does: the stored bits may be older than the data.
 *
 * Never: touches cache or origin data, decides what to promote, demote or
 * write back (policy), or keeps a reverse (origin -> cache block) index: the
 * caller maps an origin block at most once (cache_check rejects duplicates).
 * Demotion and promotion counts are not part of the format and not kept.
 * Not thread-safe: the caller serialises every call with one lock.
 *
 * Errors: -ENODATA cache block not mapped; -EINVAL bad argument (logged,
 * nothing changed); -ENOSPC metadata full; -EUCLEAN corrupt metadata;
 * -EIO device error; -EROFS opened read-only.  After any other error from a
 * call that changes metadata, the transaction must be aborted
 * (tfs_cmd_abort).
 */
#ifndef TFS_META_CACHE_METADATA_H
#define TFS_META_CACHE_METADATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"

struct tfs_bdev;
struct tfs_cmd;

struct tfs_cache_policy {
	char name[TFS_CACHE_POLICY_NAME_SIZE]; /* NUL-terminated, at most 15 characters */
	uint32_t version[3];		       /* major, minor, patch */
	uint32_t hint_size;		       /* bytes per hint: 0, or 4 .. 128 in steps of 4 */
};

struct tfs_cmd_format_options {
	uint32_t block_sectors;	   /* cache block size: 64 .. 2097152 sectors, multiple of 64 */
	uint32_t nr_cache_blocks;  /* may be 0 (resize later) */
	uint32_t metadata_version; /* 1 or 2 */
	struct tfs_cache_policy policy;
	size_t bm_cache_blocks; /* block manager cache; 0 = default */
};

struct tfs_cmd_open_options {
	uint32_t block_sectors; /* must match the stored size; 0 = accept it */
	bool read_only;
	size_t bm_cache_blocks;
};

/* Write empty metadata over meta (whatever block 0 held is lost) and commit it. */
int tfs_cmd_format(struct tfs_bdev *meta, const struct tfs_cmd_format_options *opt,
		   struct tfs_cmd **out);
/*
 * Open existing metadata.  Refuses, with one logged line naming what is
 * wrong: a zero block 0 (-EINVAL), a bad magic (-EINVAL), a bad superblock
 * checksum or location (-EUCLEAN), a version other than 1 or 2 (-EINVAL),
 * unknown flag, compat_ro (unless read-only) or incompat bits (-EINVAL), a
 * bad block size or one other than opt->block_sectors (-EINVAL), a policy
 * name or hint size out of range, or block counts no array on this device
 * could hold (-EUCLEAN).  NEEDS_CHECK is not refused
 * here: tfs_cmd_needs_check tells, and the caller decides.  Read-write, in
 * version 2, the dirty bits of unmapped blocks are cleared in the new
 * transaction (older tools set them); O(nr_cache_blocks / 64) memory.
 */
int tfs_cmd_open(struct tfs_bdev *meta, const struct tfs_cmd_open_options *opt,
		 struct tfs_cmd **out);
/* Close without committing (commit first to keep changes). */
void tfs_cmd_close(struct tfs_cmd *cmd);

/*
 * Commit the transaction: metadata space map, every changed block, flush,
 * superblock (flags: NEEDS_CHECK as now, CLEAN_SHUTDOWN iff clean_shutdown;
 * the counters, the policy, the roots), flush.  Blocks (device I/O).
 */
int tfs_cmd_commit(struct tfs_cmd *cmd, bool clean_shutdown);
/* Drop every change since the last commit and reload from the superblock on disk. */
int tfs_cmd_abort(struct tfs_cmd *cmd);

/* NEEDS_CHECK as stored / set it or clear it now, in place, outside any transaction. */
bool tfs_cmd_needs_check(struct tfs_cmd *cmd);
int tfs_cmd_set_needs_check(struct tfs_cmd *cmd, bool on);
/* CLEAN_SHUTDOWN as found when opened (true right after format). */
bool tfs_cmd_clean_when_opened(struct tfs_cmd *cmd);

struct tfs_cmd_info {
	uint32_t version;
	uint32_t block_sectors;
	uint32_t nr_cache_blocks;
	uint64_t discard_block_sectors;
	uint64_t discard_nr_blocks;
	struct tfs_cache_policy policy;
	uint64_t meta_total, meta_free; /* metadata blocks */
};
void tfs_cmd_info(struct tfs_cmd *cmd, struct tfs_cmd_info *out);

/* The superblock's counters (u32, wrapping), written at the next commit. */
struct tfs_cache_stats {
	uint32_t read_hits, read_misses, write_hits, write_misses;
};
void tfs_cmd_get_stats(struct tfs_cmd *cmd, struct tfs_cache_stats *out);
int tfs_cmd_set_stats(struct tfs_cmd *cmd, const struct tfs_cache_stats *in);

/* ---- mappings (cblock < nr_cache_blocks, else -EINVAL) ---- */

struct tfs_cache_mapping {
	uint64_t oblock;
	bool dirty; /* as stored in this transaction */
};
/* O(depth). -ENODATA when cblock is not mapped. */
int tfs_cmd_lookup(struct tfs_cmd *cmd, uint32_t cblock, struct tfs_cache_mapping *out);
/* Map cblock -> oblock (< 2^48), clean; replaces any previous mapping of cblock. */
int tfs_cmd_insert(struct tfs_cmd *cmd, uint32_t cblock, uint64_t oblock);
/* Unmap cblock (and clear its dirty bit).  -ENODATA when not mapped. */
int tfs_cmd_remove(struct tfs_cmd *cmd, uint32_t cblock);
/* Mark a mapped block dirty or clean.  -ENODATA when not mapped (nothing changed). */
int tfs_cmd_set_dirty(struct tfs_cmd *cmd, uint32_t cblock, bool dirty);

/*
 * Every mapped block in cache block order, as a restart sees it: dirty is
 * the stored bit, or true for every block after an unclean shutdown; hint
 * points at hint_size bytes when the hints are usable (clean shutdown, a
 * hint array, and policy given with the stored name, major version and
 * hint size), else NULL.  fn must not change the metadata; non-zero stops
 * the walk with that value.  O(nr_cache_blocks) plus a lookup per hint.
 */
typedef int (*tfs_cmd_load_fn)(void *ctx, uint32_t cblock, uint64_t oblock, bool dirty,
			       const void *hint);
int tfs_cmd_load_mappings(struct tfs_cmd *cmd, const struct tfs_cache_policy *policy,
			  tfs_cmd_load_fn fn, void *ctx);

/* ---- policy and hints ---- */

/*
 * Record the running policy.  When its name, major version or hint size
 * differs from the stored one, the stored hints mean nothing to it: the
 * hint array is replaced by one of zero hints (none for hint size 0).
 */
int tfs_cmd_set_policy(struct tfs_cmd *cmd, const struct tfs_cache_policy *policy);
/* hint_size bytes; -EINVAL when the policy has no hints. */
int tfs_cmd_set_hint(struct tfs_cmd *cmd, uint32_t cblock, const void *hint);
int tfs_cmd_get_hint(struct tfs_cmd *cmd, uint32_t cblock, void *hint);

/* ---- size ---- */

/*
 * Change the number of cache blocks.  Growing adds unmapped blocks;
 * shrinking drops the mappings of blocks past the new end, and is refused
 * (-EINVAL, logged, nothing changed, *dirty_cblock = the first dirty block
 * there; may be NULL) when any of them is dirty.
 */
int tfs_cmd_resize(struct tfs_cmd *cmd, uint32_t nr_cache_blocks, uint32_t *dirty_cblock);

/* ---- discards ---- */

/*
 * Discard bitset of nr_blocks bits of block_sectors sectors each (the
 * origin's size / block_sectors).  Bits of a kept block size keep their
 * values, new ones start clear; a new block size clears every bit.
 */
int tfs_cmd_resize_discard(struct tfs_cmd *cmd, uint64_t block_sectors, uint64_t nr_blocks);
int tfs_cmd_set_discard(struct tfs_cmd *cmd, uint64_t dblock, bool discarded);
int tfs_cmd_test_discard(struct tfs_cmd *cmd, uint64_t dblock, bool *discarded);
/* Each discard block in order with its bit (all false after an unclean shutdown). */
typedef int (*tfs_cmd_discard_fn)(void *ctx, uint64_t dblock, bool discarded);
int tfs_cmd_load_discards(struct tfs_cmd *cmd, tfs_cmd_discard_fn fn, void *ctx);

#endif
