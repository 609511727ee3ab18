/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * btree.h - persistent copy-on-write B+trees of u64 keys.
 *
 * Owns: node layout (format.h), lookup, insert, remove, range remove,
 * ordered iteration and multi-level keys (a level's values are the roots of
 * the next level's trees).  Every change shadows the path from the root
 * through the transaction manager, so the caller gets a new root and must
 * store it.  Nodes may be shared between trees (snapshots): shadowing a
 * shared node increments its children's counts (tfs_tm_inc for child nodes,
 * the value type's inc for leaf values), and releasing a node whose count
 * drops to 0 decrements them (value type's dec for leaf values).
 *
 * Layout invariants kept (thin_check enforces them): keys strictly
 * increasing; an internal key is the first key of its child; every non-root
 * node holds at least max_entries / 3 entries; all leaves at one depth; an
 * empty tree is one empty leaf.
 *
 * Never: holds state between calls (no cursors outliving a call), or
 * touches a block except through the transaction manager.
 *
 * Costs: lookup O(depth) block reads; insert/remove O(depth) shadows (on
 * insert, a full node on the path also reads its neighbours and may shadow
 * one of them and make one new node; shared neighbours are only read).
 * Errors: -ENODATA key not found; -ENOSPC metadata full; -EUCLEAN corrupt
 * node (logged by the block manager); -EIO.
 *
 * When insert, remove, remove_range or del fail with anything but -ENODATA
 * or -EINVAL, the tree may be half changed and *new_root means nothing: the
 * caller aborts the transaction (tfs_tm_abort) instead of using the tree
 * again.  Read-only calls change nothing.  -EINVAL means a bad info
 * (levels outside 1..TFS_BTREE_MAX_LEVELS, value size 0 or too big for
 * three values per node) and nothing was touched.
 *
 * Not thread-safe: the caller serialises every call on one transaction
 * manager (the pool's metadata lock), as for the block manager.
 *
 * Callbacks (value type hooks, walk functions) run while the btree holds
 * read or write locks on the nodes of the current path.  They may use the
 * transaction manager and other trees (the thin top level's dec deletes a
 * device tree with tfs_btree_del) but must not change the tree being
 * operated on.
 *
 * Nodes written by other tools with a max_entries smaller than the formula
 * (legal in the format, never produced by the kernel or thin_restore) are
 * read as they are and re-laid out at the formula's capacity when written.
 */
#ifndef TFS_META_BTREE_H
#define TFS_META_BTREE_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_tm;

#define TFS_BTREE_MAX_LEVELS 4

/*
 * Leaf value type of the last level.  inc/dec may be NULL (plain data).
 * inc: a value gained one more referencing leaf (a shared leaf was copied).
 * dec: a referencing leaf lost the value (removed, overwritten with a
 *      different value, or its leaf was freed).
 */
struct tfs_btree_value_type {
	void *context;
	uint32_t size;
	int (*inc)(void *context, const void *value);
	int (*dec)(void *context, const void *value);
	bool (*equal)(void *context, const void *a, const void *b);
};

struct tfs_btree_info {
	struct tfs_tm *tm;
	unsigned levels; /* 1 .. TFS_BTREE_MAX_LEVELS */
	struct tfs_btree_value_type value_type;
};

/* A new empty tree (one empty leaf for the first level). */
int tfs_btree_empty(const struct tfs_btree_info *info, uint64_t *root);

/* Release a whole tree (dec its root; a count reaching 0 releases children and values). */
int tfs_btree_del(const struct tfs_btree_info *info, uint64_t root);

/* keys has info->levels entries. -ENODATA when absent. */
int tfs_btree_lookup(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     void *value);

/*
 * Insert or overwrite.  *inserted (may be NULL) is true when the key was new.
 * Missing lower-level trees are created empty on the way down.
 */
int tfs_btree_insert(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     const void *value, uint64_t *new_root, bool *inserted);

/*
 * Remove one key; -ENODATA (and *new_root = root, nothing shadowed) when
 * absent.  The value type's dec is called on the removed value.  An emptied
 * lower-level tree stays (an empty leaf): only last-level keys are removed.
 * Cost: a lookup, then O(depth) shadows plus rebalancing next to the key.
 */
int tfs_btree_remove(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     uint64_t *new_root);

/*
 * Remove every last-level key in [begin, end) of the tree selected by the
 * first levels-1 keys of keys (keys[levels-1] is ignored).  *nr_removed may
 * be NULL.  A missing subtree removes nothing.  When nothing is in the range
 * the tree is not touched and *new_root = root.  Subtrees wholly inside the
 * range are released without being copied (dec on each value of a node
 * whose count drops to 0; a still-shared node is only read, to count its
 * entries), so the cost is O(leaves in the range) reads plus O(depth^2)
 * shadows at the two edges.
 */
int tfs_btree_remove_range(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			   uint64_t begin, uint64_t end, uint64_t *new_root, uint64_t *nr_removed);

/*
 * Up to max entries with last-level key in [begin, end), in key order, from
 * the tree selected by the first levels-1 keys.  Returns how many were
 * stored in keys_out/values_out (values packed at value_type.size), 0 when
 * none (or the subtree is missing), or -errno.  Reads leaves in sequence, so
 * a run costs one descent.  keys_out or values_out may be NULL when only
 * the other (or only the count) is wanted.  max above INT_MAX is clamped.
 */
int tfs_btree_lookup_range(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			   uint64_t begin, uint64_t end, unsigned max, uint64_t *keys_out,
			   void *values_out);

/*
 * Visit every (keys, value) in key order; fn returning non-zero stops the
 * walk with that value.  keys has info->levels entries; keys and value are
 * valid only during the call.
 */
typedef int (*tfs_btree_walk_fn)(void *ctx, const uint64_t *keys, const void *value);
int tfs_btree_walk(const struct tfs_btree_info *info, uint64_t root, tfs_btree_walk_fn fn,
		   void *ctx);

/* Number of entries in the last level (walks every leaf of a one-level tree). */
int tfs_btree_count(const struct tfs_btree_info *info, uint64_t root, uint64_t *count);

/* How full a last-level tree is: what a commit after random inserts rewrites. */
struct tfs_btree_shape {
	uint64_t leaves;
	uint64_t entries;	 /* in the leaves */
	uint64_t internal_nodes;
	uint32_t leaf_capacity; /* max_entries of a leaf of this value size */
	unsigned depth;		 /* 1 for a lone leaf; 0 when the subtree is missing */
};

/*
 * The shape of the last-level tree selected by the first levels-1 keys
 * (keys[levels-1] is ignored; all zero when the subtree is missing).
 * Cost: reads every node of that tree.  Errors as for lookup (-EUCLEAN,
 * -EIO, -EINVAL for a bad info); nothing is changed.
 */
int tfs_btree_shape(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		    struct tfs_btree_shape *out);

/*
 * The differences between two last-level trees of info (roots a_root and
 * b_root; 0 for an empty side), in key order, walked together: every key
 * present in only one of them or with different value bytes is given to
 * fn(ctx, key, a_value, b_value), a missing side as NULL (values valid
 * during the call only).  A subtree that is one block in both trees is
 * skipped without being read, so the cost is the nodes on the paths to
 * what differs plus the two trees' heights (read once at begin), not
 * their size; equal roots read nothing.
 *
 * Incremental: begin (reads each tree's leftmost path), then step until it
 * returns 0 (done) instead of 1 (more to do); each step reads about
 * max_reads nodes.  No block stays locked between calls: the caller
 * serialises each call with the transaction manager's other users and
 * keeps both trees unchanged from begin to end (held: tfs_tm_inc on a
 * root makes every later change shadow instead of writing in place).
 * Errors: -ENOMEM; -EUCLEAN (logged) a corrupt node, leaves at different
 * depths, keys out of order; -EIO; fn's non-zero return stops the step
 * and is returned (the walk may not go on after that).
 */
struct tfs_btree_diff;
typedef int (*tfs_btree_diff_fn)(void *ctx, uint64_t key, const void *a_value,
				 const void *b_value);
int tfs_btree_diff_begin(const struct tfs_btree_info *info, uint64_t a_root, uint64_t b_root,
			 struct tfs_btree_diff **out);
int tfs_btree_diff_step(struct tfs_btree_diff *d, unsigned max_reads, tfs_btree_diff_fn fn,
			void *ctx);
/* Nodes read so far (begin's included): the walk's cost, whatever the cache held. */
uint64_t tfs_btree_diff_nodes_read(const struct tfs_btree_diff *d);
/* Every key below this has been compared (for progress). */
uint64_t tfs_btree_diff_position(const struct tfs_btree_diff *d);
void tfs_btree_diff_end(struct tfs_btree_diff *d);

#endif
