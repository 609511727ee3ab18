/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * transaction-manager.h - copy-on-write transactions over metadata blocks.
 *
 * Owns: the only way to get a writable metadata block.  A block that the
 * last committed state references is never written in place: it is
 * shadowed (copied to a newly allocated block, old count decremented).  A
 * block allocated in this transaction with count 1 is written in place.
 * Commit order (one function, tfs_tm_commit):
 *     space maps write their own blocks -> every dirty block written ->
 *     flush -> superblock written -> flush.
 * Abort drops all in-memory changes; the caller re-reads the superblock.
 *
 * Never: interprets block contents beyond what shadowing needs.
 */
#ifndef TFS_META_TRANSACTION_MANAGER_H
#define TFS_META_TRANSACTION_MANAGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_bm;
struct tfs_sm;
struct tfs_tm;
struct tfs_block;
struct tfs_block_validator;

/* sm must be a metadata space map (space-map-metadata.h); the tm does not own bm or sm. */
int tfs_tm_create(struct tfs_bm *bm, struct tfs_sm *sm, struct tfs_tm **out);
void tfs_tm_destroy(struct tfs_tm *tm);
struct tfs_bm *tfs_tm_bm(struct tfs_tm *tm);
struct tfs_sm *tfs_tm_sm(struct tfs_tm *tm);

/* Allocate a block (count 1) and lock it zero-filled for writing. -ENOSPC when metadata is full. */
int tfs_tm_new_block(struct tfs_tm *tm, const struct tfs_block_validator *v, struct tfs_block **out);

/*
 * Get a writable version of block orig.  *inc_children is set when orig was
 * shared (count > 1): the copy's children now have one more parent and the
 * caller must increment their counts.  The result may live at a new block
 * number (tfs_block_location); the caller updates its parent.
 */
int tfs_tm_shadow(struct tfs_tm *tm, uint64_t orig, const struct tfs_block_validator *v,
		  struct tfs_block **out, bool *inc_children);

int tfs_tm_read_lock(struct tfs_tm *tm, uint64_t b, const struct tfs_block_validator *v,
		     struct tfs_block **out);
void tfs_tm_unlock(struct tfs_tm *tm, struct tfs_block *b);
/* Read ahead blocks about to be read-locked (tfs_bm_prefetch): how many were read, or -ENOMEM. */
int tfs_tm_prefetch(struct tfs_tm *tm, const uint64_t *blocks, size_t n);

/* Reference counts in the metadata space map.  dec to 0 frees the block. */
int tfs_tm_inc(struct tfs_tm *tm, uint64_t b);
int tfs_tm_dec(struct tfs_tm *tm, uint64_t b);
int tfs_tm_ref(struct tfs_tm *tm, uint64_t b, uint32_t *count);

/*
 * Commit.  Before calling, the caller has committed the data space map and
 * filled sb (write-locked block 0) except for the metadata space map root,
 * which fill_sm_root is asked to place once the metadata space map has
 * written itself.  Order: metadata SM commit -> fill_sm_root(sb) -> write
 * dirty blocks -> flush -> write sb -> flush.  sb is unlocked on return.
 */
int tfs_tm_commit(struct tfs_tm *tm, struct tfs_block *sb,
		  void (*fill_sm_root)(void *ctx, void *sb_data), void *ctx);

/*
 * The same commit in three steps, so that its I/O can run outside the
 * owner's lock.  begin (under the lock): steps 1-2 in memory and the
 * blocks to write taken (block-manager.h, batches), the superblock
 * still locked; from here on the transaction manager treats every block
 * of the committed state as committed (a change shadows it again).
 * write (no lock needed; device I/O): the blocks, flush, superblock,
 * flush.  end (under the lock again): the blocks are clean if write
 * returned 0 (r), sb is unlocked, c freed, and the metadata blocks freed
 * in the committed transaction become allocatable; returns r.
 *
 * Between begin and end the next transaction runs: the owner may change
 * metadata (under its lock) while write runs without it.  Its changes
 * shadow the committing blocks (they count as committed), never write
 * them; the space map hands out no block the committing transaction or
 * the state on disk before it used; so a dirty block of the next
 * transaction written early (evicted) lands where neither state looks.
 * A failed write leaves only tfs_tm_abort, which drops the next
 * transaction too, and only after end (no block may be locked).  begin
 * failing leaves nothing to end (sb unlocked) and the transaction to
 * abort.
 */
struct tfs_tm_commit;
int tfs_tm_commit_begin(struct tfs_tm *tm, struct tfs_block *sb,
			void (*fill_sm_root)(void *ctx, void *sb_data), void *ctx,
			struct tfs_tm_commit **out);
int tfs_tm_commit_write(struct tfs_tm_commit *c);
/*
 * write in two halves, for an owner that must do something between them
 * (a data flush the superblock must follow): the blocks and a flush, then
 * the superblock and a flush.  _super only after _blocks returned 0.
 */
int tfs_tm_commit_write_blocks(struct tfs_tm_commit *c);
int tfs_tm_commit_write_super(struct tfs_tm_commit *c);
int tfs_tm_commit_end(struct tfs_tm *tm, struct tfs_tm_commit *c, int r);

/* Drop all uncommitted changes (metadata space map rolled back, cache invalidated). */
void tfs_tm_abort(struct tfs_tm *tm);

#endif
