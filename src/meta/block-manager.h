/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * block-manager.h - 4 KiB metadata blocks: cache, validation, write-back.
 *
 * Owns: a bounded cache of metadata blocks over one backing device, block
 * validation on every read from disk (checksum with the type's salt, the
 * block's own location, type-specific limits) and sealing (checksum) before
 * every write.  Dirty blocks are written when evicted or at flush time.
 *
 * Never: decides which blocks may be written.  That is the transaction
 * manager's job; the block manager writes whatever it is told to.
 *
 * Not thread-safe: the owner serialises calls (the pool's metadata lock),
 * except tfs_bm_batch_write, which is meant to run outside it.
 * Memory: at most cache_blocks blocks, plus those locked at once (a btree
 * operation locks a handful), rounded up to a slab of 64 blocks; memory
 * once taken is kept until tfs_bm_destroy.  Threads: none, until the
 * first read-ahead of more than a few scattered blocks (tfs_bm_prefetch)
 * starts 7 readers, idle between read-aheads, kept until tfs_bm_destroy.
 */
#ifndef TFS_META_BLOCK_MANAGER_H
#define TFS_META_BLOCK_MANAGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_bdev;
struct tfs_bm;
struct tfs_block;

/*
 * Per-type validation.  check() returns 0 or -EUCLEAN after writing a reason
 * ("bad checksum", "nr_entries 300 > max_entries 252") into why.
 * prepare() seals the block (location, checksum) just before it is written.
 */
struct tfs_block_validator {
	const char *name; /* "btree node", "superblock", ... */
	int (*check)(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
		     char *why, size_t why_len);
	void (*prepare)(const struct tfs_block_validator *v, void *data, uint64_t blocknr);
};

#define TFS_BM_DEFAULT_CACHE_BLOCKS 16384u /* 64 MiB */

/* Cache at most cache_blocks unlocked blocks (minimum 16). */
int tfs_bm_create(struct tfs_bdev *dev, size_t cache_blocks, struct tfs_bm **out);
/* Drops everything, dirty blocks included (call tfs_bm_flush first). */
void tfs_bm_destroy(struct tfs_bm *bm);

/* Device size in 4 KiB blocks (re-read from the device on each call). */
uint64_t tfs_bm_nr_blocks(struct tfs_bm *bm);
struct tfs_bdev *tfs_bm_bdev(struct tfs_bm *bm);

/*
 * Lock a block for reading: from cache, or read and validated with v.
 * A block already cached under another validator is re-checked with v.
 * Errors: -EUCLEAN (corrupt: logged with block number and reason), -EIO,
 * -EINVAL (blocknr past the end of the device).
 */
int tfs_bm_read_lock(struct tfs_bm *bm, uint64_t blocknr, const struct tfs_block_validator *v,
		     struct tfs_block **out);
/* Like read_lock, and the block becomes dirty (sealed with v when written). */
int tfs_bm_write_lock(struct tfs_bm *bm, uint64_t blocknr, const struct tfs_block_validator *v,
		      struct tfs_block **out);
/* A block whose old contents do not matter: zero-filled, dirty, no read. */
int tfs_bm_write_lock_zero(struct tfs_bm *bm, uint64_t blocknr,
			   const struct tfs_block_validator *v, struct tfs_block **out);
void tfs_bm_unlock(struct tfs_block *b);

void *tfs_block_data(struct tfs_block *b);
uint64_t tfs_block_location(const struct tfs_block *b);

/*
 * Read ahead the blocks of blocknrs[0..n) that are not cached: sorted,
 * neighbours in one read (up to 128 KiB), up to 8 reads in flight at once
 * (the block manager's reader threads), then cached unlocked and not yet
 * validated: the first lock of each validates it with its own validator,
 * as if it were read then (a corrupt one fails that lock with -EUCLEAN
 * and leaves the cache).  Bounded: only the first tfs_bm_prefetch_window
 * blocks that are missing (in the order given: put the soonest needed
 * first), and only as far as there is free room or clean unlocked blocks
 * to drop; nothing locked or dirty is evicted (nor written).  Blocks past
 * the end of the device are skipped.  Best effort: a failed read is not
 * reported here; its blocks stay out of the cache and the lock that wants
 * one reads it and reports.  Returns how many blocks were read, or
 * -ENOMEM.  Blocks (device I/O), under the owner's lock like every call.
 */
int tfs_bm_prefetch(struct tfs_bm *bm, const uint64_t *blocknrs, size_t n);
/* Blocks one tfs_bm_prefetch reads at most: a quarter of the cache, up to 1,024. */
size_t tfs_bm_prefetch_window(const struct tfs_bm *bm);

/*
 * Write every dirty block that is not locked (sealed), then flush the device.
 * Locked dirty blocks are left to their holder: during a commit that is the
 * superblock, which must reach the disk only after this flush.
 */
int tfs_bm_flush(struct tfs_bm *bm);
/* Write one locked dirty block now (sealed) without flushing; for the superblock. */
int tfs_bm_write_now(struct tfs_bm *bm, struct tfs_block *b);
/*
 * A commit's blocks written with no lock held, while the owner goes on
 * reading through the cache.  tfs_bm_batch_dirty takes every dirty block
 * that is not locked, tfs_bm_batch_one the one locked dirty block b (the
 * superblock, last): each is pinned, so it cannot be evicted
 * (nor reread from a device that does not hold it yet) until the batch
 * ends.  The owner must not write-lock a block of a batch until it ends:
 * the transaction manager never does, as such blocks belong to the state
 * being committed and are shadowed.  O(dirty blocks); -ENOMEM.
 */
struct tfs_bm_batch;
int tfs_bm_batch_dirty(struct tfs_bm *bm, struct tfs_bm_batch **out);
int tfs_bm_batch_one(struct tfs_bm *bm, struct tfs_block *b, struct tfs_bm_batch **out);
/*
 * Write the batch's blocks (in block order; neighbours on the device go
 * in one write of up to 1 MiB), each sealed in the copy written, not in
 * the cache, then flush the device.  Takes
 * no lock and touches no cache state, so it may run outside the owner's
 * lock; blocks (device I/O).  -errno of the first failed write or flush.
 */
int tfs_bm_batch_write(struct tfs_bm_batch *batch);
/*
 * Back under the owner's lock: the blocks are clean if written (the
 * batch_write returned 0), unpinned, and the batch freed.  A failed write
 * becomes what tfs_bm_take_write_error reports.
 */
void tfs_bm_batch_end(struct tfs_bm *bm, struct tfs_bm_batch *batch, bool written);

/* Forget every cached block, dirty ones unwritten (transaction abort). No block may be locked. */
void tfs_bm_invalidate(struct tfs_bm *bm);
/* Forget one cached block, dirty or not (it was freed). It must not be locked. */
void tfs_bm_forget(struct tfs_bm *bm, uint64_t blocknr);
/*
 * Forget one cached block if it is clean and unlocked, so its disk copy is
 * what a later read finds; otherwise do nothing.  For a committed block the
 * transaction has freed: nothing reads it again unless the transaction
 * aborts, and its slot serves live blocks instead.
 */
void tfs_bm_drop_clean(struct tfs_bm *bm, uint64_t blocknr);

struct tfs_bm_stats {
	uint64_t hits, misses, reads, writes, evictions;
	uint64_t prefetched; /* blocks read by tfs_bm_prefetch (counted in reads too) */
	size_t cached, dirty, locked;
	size_t allocated; /* blocks the cache holds memory for: cached ones and free slab slots */
};
void tfs_bm_stats(struct tfs_bm *bm, struct tfs_bm_stats *out);
/*
 * The last failed block write in words ("metadata write failed at block
 * 21 (space map bitmap): Input/output error") copied into buf, then
 * forgotten; "" when none failed since the last call.  For a pool's
 * status reason.
 */
void tfs_bm_take_write_error(struct tfs_bm *bm, char *buf, size_t len);

/* Validators shared by every user of the persistent-data layer. */
extern const struct tfs_block_validator tfs_btree_validator;
extern const struct tfs_block_validator tfs_bitmap_validator;
extern const struct tfs_block_validator tfs_index_validator;
extern const struct tfs_block_validator tfs_thin_sb_validator;
extern const struct tfs_block_validator tfs_array_validator;    /* dm-array blocks (array.h) */
extern const struct tfs_block_validator tfs_cache_sb_validator; /* cache superblock */

#endif
