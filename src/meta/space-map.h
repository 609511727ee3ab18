/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * space-map.h - reference counts for a domain of blocks.
 *
 * Owns: the interface shared by the two space maps of a pool: the metadata
 * space map (domain: metadata blocks; bitmaps behind a single index block,
 * held in memory) and the disk space map (domain: data blocks; bitmaps behind
 * an index btree).  Count 0 means free.  Counts >= 3 live in an overflow
 * btree, as the format requires.
 *
 * Rule both keep: a block freed in the current transaction is not handed out
 * again before commit (it must be free in the committed state too), so the
 * last committed metadata and data stay intact.  And since the next
 * transaction may begin while a commit's blocks and superblock are still
 * being written: a block in use at any moment of the committing transaction
 * (so also in the state on disk before it) stays unallocatable until the
 * owner says that commit is durable (commit_durable).
 *
 * Never: flushes or commits the transaction itself; commit() only writes the
 * space map's own blocks into the transaction.
 */
#ifndef TFS_META_SPACE_MAP_H
#define TFS_META_SPACE_MAP_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_sm;

struct tfs_sm_ops {
	void (*destroy)(struct tfs_sm *sm);
	uint64_t (*nr_blocks)(struct tfs_sm *sm);
	uint64_t (*nr_free)(struct tfs_sm *sm);
	int (*get_count)(struct tfs_sm *sm, uint64_t b, uint32_t *count);
	int (*inc)(struct tfs_sm *sm, uint64_t b, uint32_t n);
	int (*dec)(struct tfs_sm *sm, uint64_t b, uint32_t n);
	/* Allocate a block free now and at the last commit; count becomes 1. -ENOSPC if none. */
	int (*new_block)(struct tfs_sm *sm, uint64_t *b);
	/* Grow the domain by extra blocks. */
	int (*extend)(struct tfs_sm *sm, uint64_t extra);
	/*
	 * Write the map's own dirty state into the transaction, which becomes
	 * the committing one; the map goes on as the next transaction.
	 */
	int (*commit)(struct tfs_sm *sm);
	/*
	 * The last commit()'s transaction is on disk (its superblock flushed):
	 * blocks freed in it may be handed out again.  O(bitmaps).
	 */
	void (*commit_durable)(struct tfs_sm *sm);
	/* The 32-byte root (struct tfs_disk_sm_root) as of the last commit(). */
	void (*copy_root)(struct tfs_sm *sm, void *root32);
	/*
	 * Metadata maps only (NULL otherwise): true iff b is not referenced by
	 * the last committed state, so the transaction manager may write it in
	 * place.
	 */
	bool (*is_new)(struct tfs_sm *sm, uint64_t b);
	/* Metadata maps only: forget uncommitted changes (transaction abort). */
	void (*rollback)(struct tfs_sm *sm);
};

struct tfs_sm {
	const struct tfs_sm_ops *ops;
};

static inline void tfs_sm_destroy(struct tfs_sm *sm) { if (sm) sm->ops->destroy(sm); }
static inline uint64_t tfs_sm_nr_blocks(struct tfs_sm *sm) { return sm->ops->nr_blocks(sm); }
static inline uint64_t tfs_sm_nr_free(struct tfs_sm *sm) { return sm->ops->nr_free(sm); }
static inline int tfs_sm_get_count(struct tfs_sm *sm, uint64_t b, uint32_t *c)
{
	return sm->ops->get_count(sm, b, c);
}
static inline int tfs_sm_inc(struct tfs_sm *sm, uint64_t b) { return sm->ops->inc(sm, b, 1); }
static inline int tfs_sm_dec(struct tfs_sm *sm, uint64_t b) { return sm->ops->dec(sm, b, 1); }
static inline int tfs_sm_new_block(struct tfs_sm *sm, uint64_t *b) { return sm->ops->new_block(sm, b); }
static inline int tfs_sm_extend(struct tfs_sm *sm, uint64_t extra) { return sm->ops->extend(sm, extra); }
static inline int tfs_sm_commit(struct tfs_sm *sm) { return sm->ops->commit(sm); }
static inline void tfs_sm_commit_durable(struct tfs_sm *sm) { sm->ops->commit_durable(sm); }
static inline void tfs_sm_copy_root(struct tfs_sm *sm, void *root) { sm->ops->copy_root(sm, root); }

#endif
