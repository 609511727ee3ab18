/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * space-map-metadata.h - reference counts of metadata blocks.
 *
 * Owns: the counts of every metadata block, held in memory for the whole
 * life of the pool (the format caps the domain at 255 bitmaps, so this is at
 * most ~1 MiB for the bitmaps plus the overflow counts, and three times that
 * with the committed copy and the allocation barrier).  At commit it writes
 * shadowed bitmaps, the overflow ref-count btree and a new index block,
 * allocating their locations from itself until the counts are stable.
 *
 * Never: lets a block that was in use at any moment since the last commit
 * be allocated again before the next one (committed blocks that were freed,
 * and blocks born and freed in this transaction alike).
 *
 * Costs (ops table, space-map.h): get_count, inc, dec, is_new O(1) in
 * memory, never block; new_block scans from a rolling hint, O(1) amortised,
 * O(nr_blocks / 32) word operations when the map is nearly full; once a scan
 * finds nothing, -ENOSPC is immediate until the next commit, rollback or
 * extend.  commit: one btree update per changed count >= 3, one block per
 * changed bitmap, one index block; nothing is written when nothing changed.
 * Errors: -EINVAL block past nr_blocks, dec below zero (logged), extend past
 * TFS_MAX_METADATA_BLOCKS; -EOVERFLOW inc past 2^32 - 1; -ENOSPC; -ENOMEM;
 * commit also the btree's and block manager's errors.
 *
 * Commit and failure: commit() makes the in-memory committed state the new
 * one before the transaction manager has flushed and written the
 * superblock.  If tfs_tm_commit fails after commit() returned, rollback()
 * goes back to that unwritten state, not to what is on disk: the owner must
 * then destroy this map and tfs_smm_open it again from the superblock on
 * disk.  A failed commit() itself is undone by rollback().
 *
 * Summary fields written: nr_allocated exact; per bitmap nr_free = zero
 * entries among all 16320 and none_free_before = first free in-range entry
 * (space-map-common.h).  open() recomputes them from the bitmaps and only
 * trusts the bitmaps and the ref-count tree.
 */
#ifndef TFS_META_SPACE_MAP_METADATA_H
#define TFS_META_SPACE_MAP_METADATA_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_bm;
struct tfs_sm;
struct tfs_tm;

/*
 * A fresh map for nr_blocks (capped at TFS_MAX_METADATA_BLOCKS by the
 * caller) in which the blocks [0, reserved) are already counted 1 (the
 * superblock).  Nothing is written until the first commit.  Every block is
 * is_new until then; a rollback before the first commit returns to this
 * state.  -EINVAL for 0 or too many blocks.
 */
int tfs_smm_create(struct tfs_bm *bm, uint64_t nr_blocks, uint64_t reserved, struct tfs_sm **out);
/*
 * Load from a committed root (32 bytes as stored in the superblock): reads
 * the index block, every bitmap and the ref-count btree (through a
 * short-lived transaction manager of its own, as the pool's does not exist
 * yet).  -EUCLEAN (logged once, naming the block) when the root, index,
 * a bitmap or the ref-count tree is corrupt or they disagree; a tree entry
 * for a block whose bitmap says < 3 is only warned about and dropped at the
 * next commit.  Call tfs_smm_bind before any commit.
 */
int tfs_smm_open(struct tfs_bm *bm, const void *root32, struct tfs_sm **out);
/*
 * The transaction manager this map writes its blocks through (set once,
 * after tm creation); commit() is -EINVAL without it.
 */
void tfs_smm_bind(struct tfs_sm *sm, struct tfs_tm *tm);
/* is_new and rollback are provided through the ops table (space-map.h). */

#endif
