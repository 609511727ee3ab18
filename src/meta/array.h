/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * array.h - persistent arrays of fixed-size values (the dm-array format).
 *
 * Owns: an array of value_size-byte values kept as a one-level btree whose
 * key i leads to array block i (format.h: a header, then the values
 * packed).  Every block but the last is full, so element e lives in block
 * e / per_block, slot e % per_block; the array's length is not stored in
 * it, the owner keeps it (the cache superblock's cache_blocks) and passes
 * it in where it matters.  Changes shadow the array block and the btree
 * path to it, so the caller gets a new root and must store it; the old root
 * stays readable until the transaction commits.  Growing fills whole new
 * blocks by sharing one block among all their btree entries (its count is
 * the number of entries), so a large array costs one block until written;
 * a set into a shared block copies it first.
 *
 * Never: holds state between calls, knows what the values mean, or keeps
 * reference-counted values (values are plain bytes; the cache schema
 * needs no more).  An array root is never shared by two trees: nothing here
 * clones one, and shadowing relies on that (a block written in place in
 * this transaction has one parent).
 *
 * Costs: get O(depth) reads; set O(depth) plus, the first time a block is
 * changed in a transaction, one block copy and a btree insert; resize
 * O(changed blocks) (O(1) new blocks when growing); walk one read per block.
 * Errors: -ENODATA index past the blocks the tree holds; -EUCLEAN corrupt
 * array (logged, naming the block); -ENOSPC metadata full; -EIO; -EINVAL a
 * bad value size (0, or more than a block holds).  After an error from a
 * call that changes the array the caller aborts the transaction.
 *
 * Not thread-safe: the owner serialises calls on one transaction manager.
 */
#ifndef TFS_META_ARRAY_H
#define TFS_META_ARRAY_H

#include <stdint.h>

#include "btree.h"

struct tfs_tm;

struct tfs_array_info {
	struct tfs_tm *tm;
	uint32_t value_size;
	uint32_t per_block;	     /* values in one array block */
	struct tfs_btree_info btree; /* block index -> array block number */
};

/* -EINVAL when value_size is 0 or more than one block can hold. */
int tfs_array_info_init(struct tfs_array_info *info, struct tfs_tm *tm, uint32_t value_size);

/* A new array of length 0 (an empty btree leaf). */
int tfs_array_empty(const struct tfs_array_info *info, uint64_t *root);
/* Release a whole array (blocks whose count reaches 0 are freed). */
int tfs_array_del(const struct tfs_array_info *info, uint64_t root);

/*
 * Change the length from old_size to new_size.  New elements hold fill
 * (value_size bytes); elements past new_size are dropped, their blocks
 * released.  old_size must be the length the array has.
 */
int tfs_array_resize(const struct tfs_array_info *info, uint64_t root, uint64_t old_size,
		     uint64_t new_size, const void *fill, uint64_t *new_root);

/* Element index into value (value_size bytes).  -ENODATA past the end. */
int tfs_array_get(const struct tfs_array_info *info, uint64_t root, uint64_t index, void *value);
/* Overwrite element index.  -ENODATA past the end (nothing changed). */
int tfs_array_set(const struct tfs_array_info *info, uint64_t root, uint64_t index,
		  const void *value, uint64_t *new_root);

/*
 * Visit elements [begin, end) in order; value is valid during the call
 * only.  fn returning non-zero stops the walk with that value.  A block
 * missing or short inside the range is -EUCLEAN (the array is shorter than
 * its owner says).
 */
typedef int (*tfs_array_walk_fn)(void *ctx, uint64_t index, const void *value);
int tfs_array_walk(const struct tfs_array_info *info, uint64_t root, uint64_t begin, uint64_t end,
		   tfs_array_walk_fn fn, void *ctx);

#endif
