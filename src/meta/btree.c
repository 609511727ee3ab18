/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Copy-on-write B+trees in the dm-thin node format (format.h, docs 1.3).
 *
 * How the operations keep the invariants thin_check enforces:
 *
 * Insert shadows the path from the root down and makes room in any full
 * node *before* stepping into it, so the parent always has room for a new
 * separator and nothing ever has to walk back up.  Room comes from moving
 * entries into a sibling that has some, else from splitting the node and a
 * full sibling into three, else from splitting the node alone (make_room
 * says when which); siblings shared with another tree are left alone.  A
 * full leaf that already holds the key needs no room.  A full root is split
 * in place: its entries move into two new children and the root block
 * becomes an internal node with two entries, so the root keeps its block.
 * A key below everything in the tree lowers keys[0] of each internal node
 * on the way down, keeping parent keys equal to their child's first key.
 *
 * Removal (one key or a range; one key is the range [k, k]) works in two
 * passes.  The first walks down the tree once: children wholly inside the
 * range are released without being shadowed (for big discards that is
 * almost every node), the at most two children straddling an edge are
 * shadowed and trimmed recursively, and emptied nodes are freed.  Only
 * nodes next to the hole can now be under max_entries / 3.  The second pass
 * (fix_tree) visits just those, top down: an underfull child is merged
 * with a sibling when both fit in one node, otherwise the two share their
 * entries evenly (each then holds more than max/2).  A merge can leave the
 * parent underfull, which the level above repairs on its next round; an
 * internal root left with one child is replaced by that child.
 *
 * Reference counts follow docs 1.6: a node shadowed while shared gets its
 * children's counts raised (child blocks, subtree roots of upper-level
 * leaves, or the value type's inc for last-level values); a node released
 * with count 1 releases everything it points to before its own count drops.
 * Moving entries between two nodes we hold exclusively moves references,
 * so merges, splits and moves into a sibling change no counts except that
 * of a freed node.
 *
 * Depth is bounded (MAX_DEPTH per level) so that a corrupt image with a
 * cycle ends in -EUCLEAN instead of a stack overflow.
 */
#include "btree.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "block-manager.h"
#include "format.h"
#include "log.h"
#include "transaction-manager.h"

/*
 * Deepest tree accepted, per level.  Non-root internal nodes hold at least
 * 84 children, so even the largest metadata device (4,161,600 blocks) gives
 * trees at most 5 deep; anything deeper is corruption.
 */
#define MAX_DEPTH 16
#define MAX_TOTAL_DEPTH (MAX_DEPTH * TFS_BTREE_MAX_LEVELS)

/* Rounds of the removal fix-up before we call the tree corrupt (never hit on a sane tree). */
#define MAX_FIX_ROUNDS 100000u

#define OFF_FLAGS offsetof(struct tfs_disk_node_header, flags)
#define OFF_BLOCKNR offsetof(struct tfs_disk_node_header, blocknr)
#define OFF_NR offsetof(struct tfs_disk_node_header, nr_entries)
#define OFF_MAX offsetof(struct tfs_disk_node_header, max_entries)
#define OFF_VSIZE offsetof(struct tfs_disk_node_header, value_size)

/* ---- raw node access ------------------------------------------------------ */

static inline uint32_t node_flags(const uint8_t *n)
{
	return tfs_le32(n + OFF_FLAGS);
}

static inline bool is_leaf(const uint8_t *n)
{
	return node_flags(n) == TFS_BTREE_LEAF;
}

static inline uint32_t node_nr(const uint8_t *n)
{
	return tfs_le32(n + OFF_NR);
}

static inline void set_nr(uint8_t *n, uint32_t nr)
{
	tfs_put_le32(n + OFF_NR, nr);
}

static inline uint32_t node_max(const uint8_t *n)
{
	return tfs_le32(n + OFF_MAX);
}

static inline uint32_t node_vsize(const uint8_t *n)
{
	return tfs_le32(n + OFF_VSIZE);
}

/* Non-root nodes must hold at least this many entries. */
static inline uint32_t node_min(const uint8_t *n)
{
	return node_max(n) / 3;
}

static inline uint8_t *key_ptr(const uint8_t *n, uint32_t i)
{
	return (uint8_t *)n + TFS_BTREE_HEADER_SIZE + 8u * i;
}

static inline uint64_t key_at(const uint8_t *n, uint32_t i)
{
	return tfs_le64(key_ptr(n, i));
}

static inline void set_key(uint8_t *n, uint32_t i, uint64_t k)
{
	tfs_put_le64(key_ptr(n, i), k);
}

static inline uint8_t *value_ptr(const uint8_t *n, uint32_t i)
{
	return (uint8_t *)n + TFS_BTREE_HEADER_SIZE + 8u * node_max(n) + node_vsize(n) * i;
}

static inline uint64_t value64(const uint8_t *n, uint32_t i)
{
	return tfs_le64(value_ptr(n, i));
}

static inline void set_value64(uint8_t *n, uint32_t i, uint64_t v)
{
	tfs_put_le64(value_ptr(n, i), v);
}

static void init_node(uint8_t *n, uint64_t blocknr, uint32_t flags, uint32_t vsize)
{
	memset(n, 0, TFS_BLOCK_SIZE);
	tfs_put_le32(n + OFF_FLAGS, flags);
	tfs_put_le64(n + OFF_BLOCKNR, blocknr);
	tfs_put_le32(n + OFF_MAX, tfs_btree_max_entries(vsize));
	tfs_put_le32(n + OFF_VSIZE, vsize);
}

/* Largest i with keys[i] <= key, or -1 when key is below every key. */
static int lower_bound(const uint8_t *n, uint64_t key)
{
	int lo = -1, hi = (int)node_nr(n);

	while (hi - lo > 1) {
		int mid = lo + (hi - lo) / 2;
		if (key_at(n, (uint32_t)mid) <= key)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Number of keys below key, i.e. the index of the first key >= key. */
static uint32_t first_at_least(const uint8_t *n, uint64_t key)
{
	return key ? (uint32_t)(lower_bound(n, key - 1) + 1) : 0;
}

/* Index of key in n, or -1. */
static int find_exact(const uint8_t *n, uint64_t key)
{
	int i = lower_bound(n, key);

	return i >= 0 && key_at(n, (uint32_t)i) == key ? i : -1;
}

/* Copy count entries from src[si..] to dst[di..] (different nodes, same value size). */
static void copy_entries(uint8_t *dst, uint32_t di, const uint8_t *src, uint32_t si,
			 uint32_t count)
{
	memcpy(key_ptr(dst, di), key_ptr(src, si), 8u * count);
	memcpy(value_ptr(dst, di), value_ptr(src, si), (size_t)node_vsize(src) * count);
}

/* Open a gap of count entries at i; the caller fills it. */
static void open_gap(uint8_t *n, uint32_t i, uint32_t count)
{
	uint32_t nr = node_nr(n), vs = node_vsize(n);

	memmove(key_ptr(n, i + count), key_ptr(n, i), 8u * (nr - i));
	memmove(value_ptr(n, i + count), value_ptr(n, i), (size_t)vs * (nr - i));
	set_nr(n, nr + count);
}

/*
 * Drop count entries at i.  The slots freed at the end are zeroed so that
 * images stay byte-identical for identical contents (tools write zeros).
 */
static void delete_entries(uint8_t *n, uint32_t i, uint32_t count)
{
	uint32_t nr = node_nr(n), vs = node_vsize(n);

	if (!count)
		return;
	memmove(key_ptr(n, i), key_ptr(n, i + count), 8u * (nr - i - count));
	memmove(value_ptr(n, i), value_ptr(n, i + count), (size_t)vs * (nr - i - count));
	memset(key_ptr(n, nr - count), 0, 8u * count);
	memset(value_ptr(n, nr - count), 0, (size_t)vs * count);
	set_nr(n, nr - count);
}

static void truncate_node(uint8_t *n, uint32_t nr)
{
	delete_entries(n, nr, node_nr(n) - nr);
}

static void insert_entry(uint8_t *n, uint32_t i, uint64_t key, const void *value)
{
	open_gap(n, i, 1);
	set_key(n, i, key);
	memcpy(value_ptr(n, i), value, node_vsize(n));
}

/*
 * A node written with a smaller max_entries than the formula (legal in the
 * format, never produced by the kernel or the tools) is re-laid out to the
 * formula's capacity when we first write it, so that split and merge
 * arithmetic can assume one capacity per value size.
 */
static void relayout(uint8_t *n)
{
	uint32_t vs = node_vsize(n), nr = node_nr(n), max = tfs_btree_max_entries(vs);
	uint8_t values[TFS_BLOCK_SIZE];

	if (node_max(n) == max)
		return;
	memcpy(values, value_ptr(n, 0), (size_t)vs * nr);
	memset(key_ptr(n, nr), 0, TFS_BLOCK_SIZE - TFS_BTREE_HEADER_SIZE - 8u * nr);
	tfs_put_le32(n + OFF_MAX, max);
	memcpy(value_ptr(n, 0), values, (size_t)vs * nr);
}

/* ---- tree context ---------------------------------------------------------- */

static inline unsigned last_level(const struct tfs_btree_info *info)
{
	return info->levels - 1;
}

/* Leaves of upper levels hold subtree roots; only the last level holds user values. */
static inline uint32_t leaf_vsize(const struct tfs_btree_info *info, unsigned level)
{
	return level == last_level(info) ? info->value_type.size : 8u;
}

static int check_info(const struct tfs_btree_info *info)
{
	if (!info || !info->tm || info->levels < 1 || info->levels > TFS_BTREE_MAX_LEVELS ||
	    info->value_type.size == 0 || info->value_type.size > TFS_BLOCK_SIZE ||
	    tfs_btree_max_entries(info->value_type.size) < 3)
		return -EINVAL;
	return 0;
}

static int corrupt(uint64_t b, const char *why)
{
	tfs_err("btree node %llu: %s", (unsigned long long)b, why);
	return -EUCLEAN;
}

/*
 * What the validator cannot know: the value size this tree expects here,
 * and that an internal node is never empty.
 */
static int check_node(const struct tfs_btree_info *info, unsigned level, const uint8_t *n,
		      uint64_t b)
{
	uint32_t flags = node_flags(n), vs = node_vsize(n);

	if (flags == TFS_BTREE_INTERNAL) {
		if (vs != 8)
			return corrupt(b, "internal node value size is not 8");
		if (node_nr(n) == 0)
			return corrupt(b, "empty internal node");
	} else if (flags == TFS_BTREE_LEAF) {
		if (vs != leaf_vsize(info, level)) {
			tfs_err("btree node %llu: value size mismatch: expected %u, got %u",
				(unsigned long long)b, leaf_vsize(info, level), vs);
			return -EUCLEAN;
		}
	} else {
		return corrupt(b, "unknown node type");
	}
	if (node_nr(n) > node_max(n))
		return corrupt(b, "nr_entries > max_entries");
	return 0;
}

static int read_node(const struct tfs_btree_info *info, unsigned level, uint64_t b,
		     struct tfs_block **out)
{
	int r = tfs_tm_read_lock(info->tm, b, &tfs_btree_validator, out);

	if (r)
		return r;
	r = check_node(info, level, tfs_block_data(*out), b);
	if (r)
		tfs_tm_unlock(info->tm, *out);
	return r;
}

static inline uint8_t *bdata(struct tfs_block *b)
{
	return tfs_block_data(b);
}

/* The copy of a shared node is one more parent for everything it points at. */
static int inc_children(const struct tfs_btree_info *info, unsigned level, const uint8_t *n)
{
	uint32_t nr = node_nr(n);
	int r = 0;

	if (!is_leaf(n) || level < last_level(info)) {
		for (uint32_t i = 0; i < nr && !r; i++)
			r = tfs_tm_inc(info->tm, value64(n, i));
	} else if (info->value_type.inc) {
		for (uint32_t i = 0; i < nr && !r; i++)
			r = info->value_type.inc(info->value_type.context, value_ptr(n, i));
	}
	return r;
}

/*
 * A writable version of node b (level says which tree's value size applies).
 * The caller stores tfs_block_location(*out) in the parent if it changed.
 */
static int shadow_node(const struct tfs_btree_info *info, unsigned level, uint64_t b,
		       struct tfs_block **out)
{
	struct tfs_block *blk;
	bool inc = false;
	uint8_t *n;
	int r;

	r = tfs_tm_shadow(info->tm, b, &tfs_btree_validator, &blk, &inc);
	if (r)
		return r;
	n = bdata(blk);
	r = check_node(info, level, n, b);
	if (r)
		goto err_unlock;
	relayout(n);
	/* The validator seals the location too; setting it here keeps the cached copy honest. */
	tfs_put_le64(n + OFF_BLOCKNR, tfs_block_location(blk));
	if (inc) {
		r = inc_children(info, level, n);
		if (r)
			goto err_unlock;
	}
	*out = blk;
	return 0;

err_unlock:
	tfs_tm_unlock(info->tm, blk);
	return r;
}

static int new_node(const struct tfs_btree_info *info, uint32_t flags, uint32_t vsize,
		    struct tfs_block **out)
{
	int r = tfs_tm_new_block(info->tm, &tfs_btree_validator, out);

	if (r)
		return r;
	init_node(bdata(*out), tfs_block_location(*out), flags, vsize);
	return 0;
}

/* Give back a node we just emptied or unwrapped: its entries went elsewhere. */
static int free_node(const struct tfs_btree_info *info, struct tfs_block *blk)
{
	uint64_t b = tfs_block_location(blk);

	/* Unlock first: a block freed in its own transaction is dropped from the cache. */
	tfs_tm_unlock(info->tm, blk);
	return tfs_tm_dec(info->tm, b);
}

/*
 * Read ahead what a walk is about to visit: the nodes that entries
 * [from, from + max) of n point at (children, or the subtree roots an
 * upper level's leaf holds).  One node alone is left to the read that
 * needs it.  Best effort: the walk reads and checks each node itself.
 */
static void prefetch_children(const struct tfs_btree_info *info, const uint8_t *n, uint32_t from,
			      uint32_t max)
{
	uint64_t blocks[TFS_BLOCK_SIZE / 16];
	uint32_t nr = node_nr(n), count = 0;

	for (uint32_t i = from; i < nr && count < max && count < sizeof(blocks) / sizeof(blocks[0]); i++)
		blocks[count++] = value64(n, i);
	if (count > 1)
		(void)tfs_tm_prefetch(info->tm, blocks, count);
}

/* ---- counting and releasing ------------------------------------------------- */

/* Add the number of last-level entries under node n to *count. */
static int count_node(const struct tfs_btree_info *info, unsigned level, const uint8_t *n,
		      unsigned depth, uint64_t *count)
{
	uint32_t nr = node_nr(n);
	int r = 0;

	if (is_leaf(n) && level == last_level(info)) {
		*count += nr;
		return 0;
	}
	if (depth >= MAX_TOTAL_DEPTH)
		return corrupt(tfs_le64(n + OFF_BLOCKNR), "tree too deep (cycle?)");
	prefetch_children(info, n, 0, nr);
	for (uint32_t i = 0; i < nr && !r; i++) {
		unsigned child_level = is_leaf(n) ? level + 1 : level;
		struct tfs_block *cb;

		r = read_node(info, child_level, value64(n, i), &cb);
		if (r)
			break;
		r = count_node(info, child_level, bdata(cb), depth + 1, count);
		tfs_tm_unlock(info->tm, cb);
	}
	return r;
}

/*
 * Drop one reference to node b.  When it was the last one the node is
 * about to be freed, so first release what it references: child nodes,
 * subtree roots (upper-level leaves) or values (last-level leaves).
 * count, when not NULL, gets the number of last-level entries under b
 * added (nr_removed of remove_range), even when b stays alive.
 */
static int release(const struct tfs_btree_info *info, unsigned level, uint64_t b,
		   unsigned depth, uint64_t *count)
{
	struct tfs_block *blk;
	uint32_t refs = 0, nr;
	uint8_t *n;
	int r;

	if (depth >= MAX_TOTAL_DEPTH)
		return corrupt(b, "tree too deep (cycle?)");
	r = tfs_tm_ref(info->tm, b, &refs);
	if (r)
		return r;
	if (refs == 0)
		return corrupt(b, "referenced node has reference count 0");
	if (refs == 1 || count) {
		r = read_node(info, level, b, &blk);
		if (r)
			return r;
		n = bdata(blk);
		nr = node_nr(n);
		if (refs > 1) {
			r = count_node(info, level, n, depth, count);
		} else if (!is_leaf(n)) {
			for (uint32_t i = 0; i < nr && !r; i++)
				r = release(info, level, value64(n, i), depth + 1, count);
		} else if (level < last_level(info)) {
			for (uint32_t i = 0; i < nr && !r; i++)
				r = release(info, level + 1, value64(n, i), depth + 1, count);
		} else {
			if (count)
				*count += nr;
			if (info->value_type.dec)
				for (uint32_t i = 0; i < nr && !r; i++)
					r = info->value_type.dec(info->value_type.context,
								 value_ptr(n, i));
		}
		tfs_tm_unlock(info->tm, blk);
		if (r)
			return r;
	}
	return tfs_tm_dec(info->tm, b);
}

/* ---- lookup ------------------------------------------------------------------ */

/* Read-locked leaf of the level-`level` tree at root b that would hold key. */
static int find_leaf(const struct tfs_btree_info *info, unsigned level, uint64_t b, uint64_t key,
		     struct tfs_block **out)
{
	for (unsigned depth = 0;; depth++) {
		struct tfs_block *blk;
		const uint8_t *n;
		int i, r;

		if (depth >= MAX_DEPTH)
			return corrupt(b, "tree too deep (cycle?)");
		r = read_node(info, level, b, &blk);
		if (r)
			return r;
		n = bdata(blk);
		if (is_leaf(n)) {
			*out = blk;
			return 0;
		}
		i = lower_bound(n, key);
		if (i >= 0)
			b = value64(n, (uint32_t)i);
		tfs_tm_unlock(info->tm, blk);
		if (i < 0)
			return -ENODATA;
	}
}

/* Root of the last-level tree selected by keys[0 .. levels-2]. */
static int find_subtree(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			uint64_t *sub)
{
	for (unsigned level = 0; level < last_level(info); level++) {
		struct tfs_block *leaf;
		int i, r;

		r = find_leaf(info, level, root, keys[level], &leaf);
		if (r)
			return r;
		i = find_exact(bdata(leaf), keys[level]);
		if (i >= 0)
			root = value64(bdata(leaf), (uint32_t)i);
		tfs_tm_unlock(info->tm, leaf);
		if (i < 0)
			return -ENODATA;
	}
	*sub = root;
	return 0;
}

int tfs_btree_lookup(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     void *value)
{
	struct tfs_block *leaf;
	uint64_t sub;
	int i, r;

	r = check_info(info);
	if (r)
		return r;
	r = find_subtree(info, root, keys, &sub);
	if (r)
		return r;
	r = find_leaf(info, last_level(info), sub, keys[last_level(info)], &leaf);
	if (r)
		return r;
	i = find_exact(bdata(leaf), keys[last_level(info)]);
	if (i >= 0 && value)
		memcpy(value, value_ptr(bdata(leaf), (uint32_t)i), info->value_type.size);
	tfs_tm_unlock(info->tm, leaf);
	return i >= 0 ? 0 : -ENODATA;
}

/* Children of internal node n from i on that hold keys below end, up to span of them. */
static uint32_t range_children(const uint8_t *n, uint32_t i, uint64_t end, uint32_t span)
{
	uint32_t count = 0;

	while (i + count < node_nr(n) && count < span && key_at(n, i + count) < end)
		count++;
	return count;
}

/*
 * One descent to the leaf holding begin, then leaf to leaf: the path of
 * internal nodes stays read-locked, so the next leaf is one step up and
 * one step down from the deepest ancestor that has a next child.
 */
int tfs_btree_lookup_range(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			   uint64_t begin, uint64_t end, unsigned max, uint64_t *keys_out,
			   void *values_out)
{
	struct tfs_block *path[MAX_DEPTH], *leaf = NULL;
	uint32_t pos[MAX_DEPTH], idx, vs, min, span;
	unsigned depth = 0, count = 0;
	uint8_t *vout = values_out;
	uint64_t b;
	int r;

	r = check_info(info);
	if (r)
		return r;
	if (begin >= end || max == 0)
		return 0;
	if (max > INT_MAX)
		max = INT_MAX;
	vs = info->value_type.size;
	/*
	 * Leaves that max entries fill, each holding a third of its capacity
	 * or more: what the walk reads ahead at most (one more, when begin
	 * lies past the first leaf's last key, is read when needed), so a
	 * lookup of one entry reads nothing ahead.
	 */
	min = tfs_btree_max_entries(vs) / 3;
	span = (max + min - 1) / min;
	r = find_subtree(info, root, keys, &b);
	if (r)
		return r == -ENODATA ? 0 : r;

	/* Descend towards begin. */
	for (;;) {
		struct tfs_block *blk;
		const uint8_t *n;
		int i;

		r = read_node(info, last_level(info), b, &blk);
		if (r)
			goto out;
		n = bdata(blk);
		if (is_leaf(n)) {
			leaf = blk;
			break;
		}
		if (depth == MAX_DEPTH) {
			tfs_tm_unlock(info->tm, blk);
			r = corrupt(b, "tree too deep (cycle?)");
			goto out;
		}
		i = lower_bound(n, begin);
		if (i < 0)
			i = 0;
		prefetch_children(info, n, (uint32_t)i, range_children(n, (uint32_t)i, end, span));
		path[depth] = blk;
		pos[depth++] = (uint32_t)i;
		b = value64(n, (uint32_t)i);
	}
	idx = first_at_least(bdata(leaf), begin);

	for (;;) {
		const uint8_t *n = bdata(leaf);
		uint32_t nr = node_nr(n);

		for (; idx < nr && count < max; idx++, count++) {
			uint64_t k = key_at(n, idx);

			if (k >= end)
				goto out;
			if (keys_out)
				keys_out[count] = k;
			if (vout)
				memcpy(vout + (size_t)count * vs, value_ptr(n, idx), vs);
		}
		if (count == max)
			goto out;

		/* Next leaf: climb to the deepest ancestor with a next child. */
		tfs_tm_unlock(info->tm, leaf);
		leaf = NULL;
		while (depth && pos[depth - 1] + 1 >= node_nr(bdata(path[depth - 1])))
			tfs_tm_unlock(info->tm, path[--depth]);
		if (!depth)
			goto out;
		pos[depth - 1]++;
		if (key_at(bdata(path[depth - 1]), pos[depth - 1]) >= end)
			goto out;
		b = value64(bdata(path[depth - 1]), pos[depth - 1]);
		for (;;) {
			struct tfs_block *blk;

			r = read_node(info, last_level(info), b, &blk);
			if (r)
				goto out;
			if (is_leaf(bdata(blk))) {
				leaf = blk;
				break;
			}
			if (depth == MAX_DEPTH) {
				tfs_tm_unlock(info->tm, blk);
				r = corrupt(b, "tree too deep (cycle?)");
				goto out;
			}
			path[depth] = blk;
			pos[depth++] = 0;
			b = value64(bdata(blk), 0);
		}
		idx = 0;
	}

out:
	if (leaf)
		tfs_tm_unlock(info->tm, leaf);
	while (depth)
		tfs_tm_unlock(info->tm, path[--depth]);
	return r ? r : (int)count;
}

/* ---- insert ------------------------------------------------------------------ */

/*
 * Where to cut a full node that key is about to go into.  Appends (key past
 * the last entry) keep two thirds on the left and the minimum on the right,
 * so the node left behind a run of appends is 2/3 full rather than half
 * (and make_room later tops it up from the run's node); descending runs
 * mirror that; anything else splits evenly.
 */
static uint32_t split_point(const uint8_t *n, uint64_t key)
{
	uint32_t nr = node_nr(n), min = node_min(n);

	if (key > key_at(n, nr - 1))
		return nr - min;
	if (key < key_at(n, 0))
		return min;
	return nr / 2;
}

/*
 * Whether n must get a free entry before key goes in or below it.  A leaf
 * that already holds key is only overwritten (or, in an upper level,
 * descended through), so a full one need not be split for it.
 */
static bool needs_room(const uint8_t *n, uint64_t key)
{
	return node_nr(n) == node_max(n) && !(is_leaf(n) && find_exact(n, key) >= 0);
}

/*
 * Free entries a sibling must have for moving entries into it to beat a
 * split.  With less, each move would buy room for only a few inserts and
 * the next ones would pay for a move again.  At least 2, so that both
 * nodes end with room.
 */
static uint32_t sibling_room(const uint8_t *n)
{
	uint32_t room = node_max(n) / 32;

	return room < 2 ? 2 : room;
}

/*
 * Move entries between adjacent nodes l and r (l's keys below r's) so that
 * l ends with target entries.  Both are writable and held by this tree
 * alone, so the references move with the entries and no count changes.
 */
static void shift_entries(uint8_t *l, uint8_t *r, uint32_t target)
{
	uint32_t ln = node_nr(l);

	if (ln > target) {
		uint32_t m = ln - target;

		open_gap(r, 0, m);
		copy_entries(r, 0, l, target, m);
		truncate_node(l, target);
	} else if (ln < target) {
		uint32_t m = target - ln;

		copy_entries(l, ln, r, 0, m);
		set_nr(l, ln + m);
		delete_entries(r, 0, m);
	}
}

/*
 * Look at child s of p, a sibling of c: *usable is false when it is shared
 * (count > 1), since copying a shared node breaks sharing with a snapshot:
 * a block plus one reference per entry, more than a split costs.  *room is
 * its free entries at the capacity it will have once shadowed.
 */
static int probe_sibling(const struct tfs_btree_info *info, unsigned level, const uint8_t *p,
			 uint32_t s, const uint8_t *c, bool *usable, uint32_t *room)
{
	uint64_t b = value64(p, s);
	struct tfs_block *blk;
	uint32_t refs = 0;
	const uint8_t *n;
	int r;

	*usable = false;
	*room = 0;
	r = tfs_tm_ref(info->tm, b, &refs);
	if (r)
		return r;
	if (refs == 0)
		return corrupt(b, "referenced node has reference count 0");
	if (refs > 1)
		return 0;
	r = read_node(info, level, b, &blk);
	if (r)
		return r;
	n = bdata(blk);
	if (node_flags(n) != node_flags(c)) {
		r = corrupt(tfs_le64(p + OFF_BLOCKNR), "children at different depths");
	} else {
		*usable = true;
		*room = tfs_btree_max_entries(node_vsize(n)) - node_nr(n);
	}
	tfs_tm_unlock(info->tm, blk);
	return r;
}

/*
 * Children li and li + 1 of writable parent p share their entries evenly,
 * or, when three, among themselves and a new child between them.  One of
 * the two is c (writable; c_left says which), the other is shadowed here.
 * The parent keys of the nodes whose first entry changed are updated; the
 * left node's first entry stays, so a parent key lowered for a key below
 * everything (descend_for_insert) stays lowered.  *chosen gets the node key
 * belongs in, still locked; the others are unlocked.  On error c is
 * unlocked.
 */
static int spread(const struct tfs_btree_info *info, unsigned level, uint8_t *p, uint32_t li,
		  struct tfs_block *c, bool c_left, bool three, uint64_t key,
		  struct tfs_block **chosen)
{
	struct tfs_block *s, *lb, *rb, *mb = NULL;
	uint32_t si = c_left ? li + 1 : li, total;
	uint8_t *l, *rt, *m, loc[8];
	int r;

	r = shadow_node(info, level, value64(p, si), &s);
	if (r) {
		tfs_tm_unlock(info->tm, c);
		return r;
	}
	set_value64(p, si, tfs_block_location(s));
	if (three) {
		r = new_node(info, node_flags(bdata(c)), node_vsize(bdata(c)), &mb);
		if (r) {
			tfs_tm_unlock(info->tm, s);
			tfs_tm_unlock(info->tm, c);
			return r;
		}
	}
	lb = c_left ? c : s;
	rb = c_left ? s : c;
	l = bdata(lb);
	rt = bdata(rb);
	total = node_nr(l) + node_nr(rt);
	if (!three) {
		shift_entries(l, rt, total / 2);
		set_key(p, li + 1, key_at(rt, 0));
	} else {
		uint32_t tl = total / 3, tm = (total - tl) / 2;

		m = bdata(mb);
		/* l is full or nearly so: its surplus goes into the empty middle node. */
		shift_entries(l, m, tl);
		shift_entries(m, rt, tm);
		tfs_put_le64(loc, tfs_block_location(mb));
		insert_entry(p, li + 1, key_at(m, 0), loc);
		set_key(p, li + 2, key_at(rt, 0));
	}

	if (key >= key_at(rt, 0))
		*chosen = rb;
	else if (mb && key >= key_at(bdata(mb), 0))
		*chosen = mb;
	else
		*chosen = lb;
	if (lb != *chosen)
		tfs_tm_unlock(info->tm, lb);
	if (mb && mb != *chosen)
		tfs_tm_unlock(info->tm, mb);
	if (rb != *chosen)
		tfs_tm_unlock(info->tm, rb);
	return 0;
}

/*
 * Child c (full, writable, at index i of writable parent p) is split into c
 * and a new right sibling.  *chosen gets whichever of the two key belongs
 * in, still locked; the other is unlocked.  On error c is unlocked.
 */
static int split_child(const struct tfs_btree_info *info, uint8_t *p, uint32_t i,
		       struct tfs_block *c, uint64_t key, struct tfs_block **chosen)
{
	uint8_t *cn = bdata(c), *sn, loc[8];
	uint32_t nr = node_nr(cn), left = split_point(cn, key);
	struct tfs_block *s;
	int r;

	r = new_node(info, node_flags(cn), node_vsize(cn), &s);
	if (r) {
		tfs_tm_unlock(info->tm, c);
		return r;
	}
	sn = bdata(s);
	copy_entries(sn, 0, cn, left, nr - left);
	set_nr(sn, nr - left);
	truncate_node(cn, left);
	tfs_put_le64(loc, tfs_block_location(s));
	insert_entry(p, i + 1, key_at(sn, 0), loc);
	if (key >= key_at(sn, 0)) {
		tfs_tm_unlock(info->tm, c);
		*chosen = s;
	} else {
		tfs_tm_unlock(info->tm, s);
		*chosen = c;
	}
	return 0;
}

/*
 * Child c (full, writable, at index i of writable parent p, which has room
 * for one more entry) must get room for key.  In order of preference:
 * move entries into an unshared sibling that has room (left first); split
 * c and a full unshared sibling into three nodes two thirds full; split c
 * alone.  The first child and the last always split alone when their
 * siblings are full, as that is where ascending and descending runs of
 * keys arrive, and split_point then keeps the nodes behind the run full.
 * Random inserts so fill nodes to about 87% instead of 70% (ln 2), which
 * means fewer nodes for a commit to write.  *chosen gets the node key
 * belongs in, writable with room; the others are unlocked.  On error c is
 * unlocked.
 */
static int make_room(const struct tfs_btree_info *info, unsigned level, uint8_t *p, uint32_t i,
		     struct tfs_block *c, uint64_t key, struct tfs_block **chosen)
{
	uint32_t nr = node_nr(p), want = sibling_room(bdata(c)), lroom = 0, rroom = 0;
	bool left = false, right = false;
	int r;

	if (i > 0) {
		r = probe_sibling(info, level, p, i - 1, bdata(c), &left, &lroom);
		if (r)
			goto err_unlock;
		if (left && lroom >= want)
			return spread(info, level, p, i - 1, c, false, false, key, chosen);
	}
	if (i + 1 < nr) {
		r = probe_sibling(info, level, p, i + 1, bdata(c), &right, &rroom);
		if (r)
			goto err_unlock;
		if (right && rroom >= want)
			return spread(info, level, p, i, c, true, false, key, chosen);
	}
	if (i > 0 && i + 1 < nr && (left || right))
		return spread(info, level, p, left ? i - 1 : i, c, !left, true, key, chosen);
	return split_child(info, p, i, c, key, chosen);

err_unlock:
	tfs_tm_unlock(info->tm, c);
	return r;
}

/* The root is full: move its entries into two new children and make it their parent. */
static int split_root(const struct tfs_btree_info *info, struct tfs_block *root, uint64_t key)
{
	uint8_t *n = bdata(root), *ln, *rn;
	uint32_t nr = node_nr(n), left = split_point(n, key);
	uint32_t flags = node_flags(n), vs = node_vsize(n);
	struct tfs_block *lb, *rb;
	int r;

	r = new_node(info, flags, vs, &lb);
	if (r)
		return r;
	r = new_node(info, flags, vs, &rb);
	if (r) {
		free_node(info, lb);
		return r;
	}
	ln = bdata(lb);
	rn = bdata(rb);
	copy_entries(ln, 0, n, 0, left);
	set_nr(ln, left);
	copy_entries(rn, 0, n, left, nr - left);
	set_nr(rn, nr - left);

	init_node(n, tfs_block_location(root), TFS_BTREE_INTERNAL, 8);
	set_nr(n, 2);
	set_key(n, 0, key_at(ln, 0));
	set_value64(n, 0, tfs_block_location(lb));
	set_key(n, 1, key_at(rn, 0));
	set_value64(n, 1, tfs_block_location(rb));
	tfs_tm_unlock(info->tm, lb);
	tfs_tm_unlock(info->tm, rb);
	return 0;
}

/*
 * From the writable root blk of a level's tree down to the leaf for key,
 * shadowing and splitting full nodes on the way.  Returns the leaf locked
 * and writable with room for one more entry, the index of key (or where it
 * goes) and whether it is present.  blk is consumed.
 */
static int descend_for_insert(const struct tfs_btree_info *info, unsigned level,
			      struct tfs_block *blk, uint64_t key, struct tfs_block **leaf,
			      uint32_t *idx, bool *found)
{
	struct tfs_block *node = blk;
	int r;

	if (needs_room(bdata(node), key)) {
		r = split_root(info, node, key);
		if (r)
			goto err_unlock;
	}
	for (unsigned depth = 0;; depth++) {
		uint8_t *n = bdata(node);
		struct tfs_block *cb;
		uint64_t child;
		int i;

		if (is_leaf(n)) {
			*idx = first_at_least(n, key);
			*found = *idx < node_nr(n) && key_at(n, *idx) == key;
			*leaf = node;
			return 0;
		}
		if (depth >= MAX_DEPTH) {
			r = corrupt(tfs_block_location(node), "tree too deep (cycle?)");
			goto err_unlock;
		}
		i = lower_bound(n, key);
		if (i < 0) {
			/* key becomes the smallest in this subtree; keep keys[0] equal to it. */
			i = 0;
			set_key(n, 0, key);
		}
		child = value64(n, (uint32_t)i);
		r = shadow_node(info, level, child, &cb);
		if (r)
			goto err_unlock;
		if (tfs_block_location(cb) != child)
			set_value64(n, (uint32_t)i, tfs_block_location(cb));
		if (needs_room(bdata(cb), key)) {
			r = make_room(info, level, n, (uint32_t)i, cb, key, &cb);
			if (r)
				goto err_unlock;
		}
		tfs_tm_unlock(info->tm, node);
		node = cb;
	}

err_unlock:
	tfs_tm_unlock(info->tm, node);
	return r;
}

int tfs_btree_insert(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     const void *value, uint64_t *new_root, bool *inserted)
{
	const struct tfs_btree_value_type *vt;
	struct tfs_block *blk, *leaf;
	uint64_t top;
	unsigned level;
	int r;

	r = check_info(info);
	if (r)
		return r;
	vt = &info->value_type;
	r = shadow_node(info, 0, root, &blk);
	if (r)
		return r;
	top = tfs_block_location(blk);

	for (level = 0;; level++) {
		uint64_t key = keys[level];
		uint8_t *n;
		uint32_t idx;
		bool found;

		r = descend_for_insert(info, level, blk, key, &leaf, &idx, &found);
		if (r)
			return r;
		n = bdata(leaf);
		if (level == last_level(info)) {
			if (!found) {
				insert_entry(n, idx, key, value);
			} else {
				uint8_t *old = value_ptr(n, idx);

				/* The caller's reference replaces the old value's. */
				if (vt->dec && !(vt->equal && vt->equal(vt->context, old, value)))
					r = vt->dec(vt->context, old);
				if (!r)
					memcpy(old, value, vt->size);
			}
			tfs_tm_unlock(info->tm, leaf);
			if (r)
				return r;
			if (inserted)
				*inserted = !found;
			break;
		}

		if (found) {
			uint64_t sub = value64(n, idx);

			r = shadow_node(info, level + 1, sub, &blk);
			if (!r && tfs_block_location(blk) != sub)
				set_value64(n, idx, tfs_block_location(blk));
		} else {
			uint8_t loc[8];

			r = new_node(info, TFS_BTREE_LEAF, leaf_vsize(info, level + 1), &blk);
			if (!r) {
				tfs_put_le64(loc, tfs_block_location(blk));
				insert_entry(n, idx, key, loc);
			}
		}
		tfs_tm_unlock(info->tm, leaf);
		if (r)
			return r;
	}
	*new_root = top;
	return 0;
}

int tfs_btree_empty(const struct tfs_btree_info *info, uint64_t *root)
{
	struct tfs_block *blk;
	int r;

	r = check_info(info);
	if (r)
		return r;
	r = new_node(info, TFS_BTREE_LEAF, leaf_vsize(info, 0), &blk);
	if (r)
		return r;
	*root = tfs_block_location(blk);
	tfs_tm_unlock(info->tm, blk);
	return 0;
}

int tfs_btree_del(const struct tfs_btree_info *info, uint64_t root)
{
	int r = check_info(info);

	return r ? r : release(info, 0, root, 0, NULL);
}

/* ---- removal ------------------------------------------------------------------ */

/*
 * Remove every key in [lo, hi] (inclusive, so that hi may be UINT64_MAX)
 * under the writable node blk of the last level.  Children wholly inside
 * the range are released unshadowed; straddling ones are trimmed
 * recursively and freed if that empties them.  Keys of survivors are
 * refreshed from their (possibly new) first entries.  *underfull is set
 * when any node touched ends below the minimum fill.  removed may be NULL,
 * which spares reading shared subtrees that are only being let go of.
 */
static int remove_node_range(const struct tfs_btree_info *info, unsigned level,
			     struct tfs_block *blk, uint64_t lo, uint64_t hi, unsigned depth,
			     uint64_t *removed, bool *underfull)
{
	uint8_t *n = bdata(blk);
	uint32_t nr = node_nr(n), w;
	int i0, i1, r = 0;

	if (is_leaf(n)) {
		uint32_t a = first_at_least(n, lo);
		uint32_t b = hi == UINT64_MAX ? nr : first_at_least(n, hi + 1);
		const struct tfs_btree_value_type *vt = &info->value_type;

		if (b <= a)
			return 0;
		if (vt->dec)
			for (uint32_t i = a; i < b && !r; i++)
				r = vt->dec(vt->context, value_ptr(n, i));
		if (r)
			return r;
		delete_entries(n, a, b - a);
		if (removed)
			*removed += b - a;
		if (node_nr(n) < node_min(n))
			*underfull = true;
		return 0;
	}

	if (depth >= MAX_DEPTH)
		return corrupt(tfs_block_location(blk), "tree too deep (cycle?)");
	i1 = lower_bound(n, hi);
	if (i1 < 0)
		return 0; /* the whole range lies below this subtree */
	i0 = lower_bound(n, lo);
	if (i0 < 0)
		i0 = 0;

	/* Survivors among children i0..i1 are packed down to index w. */
	w = (uint32_t)i0;
	for (uint32_t i = (uint32_t)i0; i <= (uint32_t)i1; i++) {
		uint64_t child = value64(n, i), ck = key_at(n, i);
		bool covered = lo <= ck &&
			       (i + 1 < nr ? key_at(n, i + 1) - 1 <= hi : hi == UINT64_MAX);
		struct tfs_block *cb;
		uint8_t *cn;

		if (covered) {
			r = release(info, level, child, depth + 1, removed);
			if (r)
				return r;
			continue;
		}
		r = shadow_node(info, level, child, &cb);
		if (r)
			return r;
		set_value64(n, i, tfs_block_location(cb));
		r = remove_node_range(info, level, cb, lo, hi, depth + 1, removed, underfull);
		if (r) {
			tfs_tm_unlock(info->tm, cb);
			return r;
		}
		cn = bdata(cb);
		if (node_nr(cn) == 0) {
			r = free_node(info, cb);
			if (r)
				return r;
			continue;
		}
		set_key(n, w, key_at(cn, 0));
		set_value64(n, w, tfs_block_location(cb));
		tfs_tm_unlock(info->tm, cb);
		w++;
	}
	delete_entries(n, w, (uint32_t)i1 + 1 - w);
	if (node_nr(n) < node_min(n))
		*underfull = true;
	return 0;
}

/* Children of n next to where hint was: the last one below it and the first at or above it. */
static void hole_neighbours(const uint8_t *n, uint64_t hint, uint32_t *first, uint32_t *last)
{
	uint32_t below = first_at_least(n, hint), nr = node_nr(n);

	*first = below ? below - 1 : 0;
	*last = below < nr ? below : nr - 1;
}

/* Whether a node next to the hole, anywhere under internal node n, is underfull. */
static int needs_fix(const struct tfs_btree_info *info, unsigned level, const uint8_t *n,
		     uint64_t hint, unsigned depth, bool *need)
{
	uint32_t first, last;

	*need = false;
	if (depth >= MAX_DEPTH)
		return corrupt(tfs_le64(n + OFF_BLOCKNR), "tree too deep (cycle?)");
	hole_neighbours(n, hint, &first, &last);
	for (uint32_t k = first; k <= last; k++) {
		struct tfs_block *cb;
		const uint8_t *cn;
		int r;

		r = read_node(info, level, value64(n, k), &cb);
		if (r)
			return r;
		cn = bdata(cb);
		if (node_nr(cn) < node_min(cn))
			*need = true;
		else if (!is_leaf(cn))
			r = needs_fix(info, level, cn, hint, depth + 1, need);
		tfs_tm_unlock(info->tm, cb);
		if (r || *need)
			return r;
	}
	return 0;
}

/*
 * Child k of writable internal node x is underfull.  Pair it with a
 * neighbour (the right one when there is one): merge the two when they
 * fit in one node, else split their entries evenly, so that each ends with
 * more than max/2.  x must have at least two entries.
 */
static int rebalance(const struct tfs_btree_info *info, unsigned level, uint8_t *x, uint32_t k)
{
	uint32_t li = k + 1 < node_nr(x) ? k : k - 1;
	struct tfs_block *lb, *rb;
	uint32_t ln, rn, max;
	uint8_t *l, *rt;
	int r;

	r = shadow_node(info, level, value64(x, li), &lb);
	if (r)
		return r;
	set_value64(x, li, tfs_block_location(lb));
	r = shadow_node(info, level, value64(x, li + 1), &rb);
	if (r) {
		tfs_tm_unlock(info->tm, lb);
		return r;
	}
	set_value64(x, li + 1, tfs_block_location(rb));
	l = bdata(lb);
	rt = bdata(rb);
	if (node_flags(l) != node_flags(rt)) {
		r = corrupt(tfs_le64(x + OFF_BLOCKNR), "children at different depths");
		tfs_tm_unlock(info->tm, lb);
		tfs_tm_unlock(info->tm, rb);
		return r;
	}
	ln = node_nr(l);
	rn = node_nr(rt);
	max = node_max(l);

	if (ln + rn <= max) {
		copy_entries(l, ln, rt, 0, rn);
		set_nr(l, ln + rn);
		delete_entries(x, li + 1, 1);
		set_key(x, li, key_at(l, 0));
		tfs_tm_unlock(info->tm, lb);
		/* rt's references now live in l; only the block itself goes. */
		return free_node(info, rb);
	}

	shift_entries(l, rt, (ln + rn) / 2);
	set_key(x, li, key_at(l, 0));
	set_key(x, li + 1, key_at(rt, 0));
	tfs_tm_unlock(info->tm, lb);
	tfs_tm_unlock(info->tm, rb);
	return 0;
}

/*
 * Make every node next to the hole under writable internal node xb full
 * enough.  Loops because a merge below can leave a child of x underfull
 * again, which x then repairs with its own neighbours.  Returns with x
 * possibly underfull; x's parent deals with that.
 */
static int fix_subtree(const struct tfs_btree_info *info, unsigned level, struct tfs_block *xb,
		       uint64_t hint, unsigned depth, unsigned *rounds)
{
	uint8_t *x = bdata(xb);

	if (depth >= MAX_DEPTH)
		return corrupt(tfs_block_location(xb), "tree too deep (cycle?)");
	for (;;) {
		uint32_t first, last;
		bool progress = false;
		int r = 0;

		if (++*rounds > MAX_FIX_ROUNDS)
			return corrupt(tfs_block_location(xb), "rebalancing does not converge");
		if (node_nr(x) <= 1)
			return 0;
		hole_neighbours(x, hint, &first, &last);
		for (uint32_t k = first; k <= last && !progress; k++) {
			struct tfs_block *cb;
			bool under;

			r = read_node(info, level, value64(x, k), &cb);
			if (r)
				return r;
			under = node_nr(bdata(cb)) < node_min(bdata(cb));
			tfs_tm_unlock(info->tm, cb);
			if (under) {
				r = rebalance(info, level, x, k);
				if (r)
					return r;
				progress = true;
			}
		}
		for (uint32_t k = first; k <= last && !progress; k++) {
			struct tfs_block *cb;
			bool need = false;

			r = read_node(info, level, value64(x, k), &cb);
			if (r)
				return r;
			if (!is_leaf(bdata(cb)))
				r = needs_fix(info, level, bdata(cb), hint, depth + 1, &need);
			tfs_tm_unlock(info->tm, cb);
			if (r)
				return r;
			if (!need)
				continue;
			r = shadow_node(info, level, value64(x, k), &cb);
			if (r)
				return r;
			set_value64(x, k, tfs_block_location(cb));
			r = fix_subtree(info, level, cb, hint, depth + 1, rounds);
			tfs_tm_unlock(info->tm, cb);
			if (r)
				return r;
			progress = true;
		}
		if (!progress)
			return 0;
	}
}

/*
 * Second removal pass from root (any state but not an empty internal
 * node): collapse an internal root with one child into that child, and fix
 * underfull nodes next to hint.  Nodes that need no change are only read.
 */
static int fix_tree(const struct tfs_btree_info *info, unsigned level, uint64_t root,
		    uint64_t hint, uint64_t *new_root)
{
	unsigned rounds = 0;

	for (;;) {
		struct tfs_block *blk;
		bool need = false;
		uint32_t refs = 0;
		uint8_t *n;
		int r;

		if (++rounds > MAX_FIX_ROUNDS)
			return corrupt(root, "rebalancing does not converge");
		r = read_node(info, level, root, &blk);
		if (r)
			return r;
		n = bdata(blk);
		if (is_leaf(n)) {
			tfs_tm_unlock(info->tm, blk);
			break;
		}
		if (node_nr(n) == 1) {
			uint64_t child = value64(n, 0);

			tfs_tm_unlock(info->tm, blk);
			/*
			 * The child replaces the root.  Our shadowed root had count 1 and
			 * hands its reference on; a shared one keeps its own, so the child
			 * needs one more for us.
			 */
			r = tfs_tm_ref(info->tm, root, &refs);
			if (!r && refs > 1)
				r = tfs_tm_inc(info->tm, child);
			if (!r)
				r = tfs_tm_dec(info->tm, root);
			if (r)
				return r;
			root = child;
			continue;
		}
		r = needs_fix(info, level, n, hint, 0, &need);
		tfs_tm_unlock(info->tm, blk);
		if (r)
			return r;
		if (!need)
			break;
		r = shadow_node(info, level, root, &blk);
		if (r)
			return r;
		root = tfs_block_location(blk);
		r = fix_subtree(info, level, blk, hint, 0, &rounds);
		tfs_tm_unlock(info->tm, blk);
		if (r)
			return r;
	}
	*new_root = root;
	return 0;
}

/* Both passes of a removal from the last-level tree whose writable root is blk (consumed). */
static int remove_from_tree(const struct tfs_btree_info *info, struct tfs_block *blk,
			    uint64_t lo, uint64_t hi, uint64_t *new_root, uint64_t *removed)
{
	unsigned level = last_level(info);
	bool underfull = false;
	uint64_t root = tfs_block_location(blk);
	uint8_t *n = bdata(blk);
	int r;

	r = remove_node_range(info, level, blk, lo, hi, 0, removed, &underfull);
	if (r) {
		tfs_tm_unlock(info->tm, blk);
		return r;
	}
	if (!is_leaf(n) && node_nr(n) == 0)
		init_node(n, root, TFS_BTREE_LEAF, leaf_vsize(info, level));
	else if (!is_leaf(n) && node_nr(n) == 1)
		underfull = true; /* the root must collapse */
	tfs_tm_unlock(info->tm, blk);
	if (!underfull) {
		*new_root = root;
		return 0;
	}
	return fix_tree(info, level, root, lo, new_root);
}

/*
 * Shadow the upper levels down to the last-level tree selected by keys and
 * remove [lo, hi] from it.  The caller made sure there is something to
 * remove, so every upper-level key exists.
 */
static int remove_common(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			 uint64_t lo, uint64_t hi, uint64_t *new_root, uint64_t *removed)
{
	struct tfs_block *blk, *leaf = NULL;
	uint32_t idx = 0;
	uint64_t top, sub;
	int r;

	r = shadow_node(info, 0, root, &blk);
	if (r)
		return r;
	top = tfs_block_location(blk);
	for (unsigned level = 0; level < last_level(info); level++) {
		uint64_t key = keys[level];

		/* Upper levels only get new child pointers, so plain shadowing suffices. */
		for (unsigned depth = 0;; depth++) {
			uint8_t *n = bdata(blk);
			struct tfs_block *cb;
			int i;

			if (is_leaf(n)) {
				i = find_exact(n, key);
				if (i < 0) {
					tfs_tm_unlock(info->tm, blk);
					return corrupt(tfs_block_location(blk), "subtree vanished");
				}
				leaf = blk;
				idx = (uint32_t)i;
				break;
			}
			i = lower_bound(n, key);
			if (i < 0 || depth >= MAX_DEPTH) {
				tfs_tm_unlock(info->tm, blk);
				return corrupt(tfs_block_location(blk), "subtree vanished");
			}
			r = shadow_node(info, level, value64(n, (uint32_t)i), &cb);
			if (!r)
				set_value64(n, (uint32_t)i, tfs_block_location(cb));
			tfs_tm_unlock(info->tm, blk);
			if (r)
				return r;
			blk = cb;
		}
		sub = value64(bdata(leaf), idx);
		r = shadow_node(info, level + 1, sub, &blk);
		if (!r)
			set_value64(bdata(leaf), idx, tfs_block_location(blk));
		if (r || level + 1 < last_level(info)) {
			tfs_tm_unlock(info->tm, leaf);
			leaf = NULL;
		}
		if (r)
			return r;
	}

	r = remove_from_tree(info, blk, lo, hi, &sub, removed);
	if (leaf) {
		if (!r)
			set_value64(bdata(leaf), idx, sub);
		tfs_tm_unlock(info->tm, leaf);
	} else {
		top = sub;
	}
	if (r)
		return r;
	*new_root = top;
	return 0;
}

int tfs_btree_remove(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		     uint64_t *new_root)
{
	uint64_t key;
	int r;

	r = check_info(info);
	if (r)
		return r;
	/* Look first: an absent key must leave the tree (and root) untouched. */
	r = tfs_btree_lookup(info, root, keys, NULL);
	if (r == -ENODATA)
		*new_root = root;
	if (r)
		return r;
	key = keys[last_level(info)];
	return remove_common(info, root, keys, key, key, new_root, NULL);
}

int tfs_btree_remove_range(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
			   uint64_t begin, uint64_t end, uint64_t *new_root, uint64_t *nr_removed)
{
	uint64_t removed = 0;
	int r;

	if (nr_removed)
		*nr_removed = 0;
	r = check_info(info);
	if (r)
		return r;
	*new_root = root;
	/* Nothing to remove means nothing to shadow (and no missing subtree to create). */
	r = tfs_btree_lookup_range(info, root, keys, begin, end, 1, NULL, NULL);
	if (r <= 0)
		return r;
	r = remove_common(info, root, keys, begin, end - 1, new_root, nr_removed ? &removed : NULL);
	if (nr_removed)
		*nr_removed = removed;
	return r;
}

/* ---- walking ------------------------------------------------------------------ */

static int walk_node(const struct tfs_btree_info *info, unsigned level, uint64_t b,
		     unsigned depth, uint64_t *keys, tfs_btree_walk_fn fn, void *ctx)
{
	struct tfs_block *blk;
	const uint8_t *n;
	uint32_t nr;
	int r;

	if (depth >= MAX_TOTAL_DEPTH)
		return corrupt(b, "tree too deep (cycle?)");
	r = read_node(info, level, b, &blk);
	if (r)
		return r;
	n = bdata(blk);
	nr = node_nr(n);
	if (!is_leaf(n) || level != last_level(info))
		prefetch_children(info, n, 0, nr);
	for (uint32_t i = 0; i < nr && !r; i++) {
		if (!is_leaf(n)) {
			r = walk_node(info, level, value64(n, i), depth + 1, keys, fn, ctx);
			continue;
		}
		keys[level] = key_at(n, i);
		if (level == last_level(info))
			r = fn(ctx, keys, value_ptr(n, i));
		else
			r = walk_node(info, level + 1, value64(n, i), depth + 1, keys, fn, ctx);
	}
	tfs_tm_unlock(info->tm, blk);
	return r;
}

int tfs_btree_walk(const struct tfs_btree_info *info, uint64_t root, tfs_btree_walk_fn fn,
		   void *ctx)
{
	uint64_t keys[TFS_BTREE_MAX_LEVELS] = { 0 };
	int r = check_info(info);

	return r ? r : walk_node(info, 0, root, 0, keys, fn, ctx);
}

int tfs_btree_count(const struct tfs_btree_info *info, uint64_t root, uint64_t *count)
{
	struct tfs_block *blk;
	int r;

	*count = 0;
	r = check_info(info);
	if (r)
		return r;
	r = read_node(info, 0, root, &blk);
	if (r)
		return r;
	r = count_node(info, 0, bdata(blk), 0, count);
	tfs_tm_unlock(info->tm, blk);
	return r;
}

static int shape_node(const struct tfs_btree_info *info, uint64_t b, unsigned depth,
		      struct tfs_btree_shape *out)
{
	struct tfs_block *blk;
	const uint8_t *n;
	int r;

	if (depth >= MAX_DEPTH)
		return corrupt(b, "tree too deep (cycle?)");
	r = read_node(info, last_level(info), b, &blk);
	if (r)
		return r;
	n = bdata(blk);
	if (is_leaf(n)) {
		out->leaves++;
		out->entries += node_nr(n);
		if (depth + 1 > out->depth)
			out->depth = depth + 1;
	} else {
		out->internal_nodes++;
		prefetch_children(info, n, 0, node_nr(n));
		for (uint32_t i = 0; i < node_nr(n) && !r; i++)
			r = shape_node(info, value64(n, i), depth + 1, out);
	}
	tfs_tm_unlock(info->tm, blk);
	return r;
}

int tfs_btree_shape(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys,
		    struct tfs_btree_shape *out)
{
	uint64_t sub;
	int r;

	memset(out, 0, sizeof(*out));
	r = check_info(info);
	if (r)
		return r;
	r = find_subtree(info, root, keys, &sub);
	if (r)
		return r == -ENODATA ? 0 : r;
	out->leaf_capacity = tfs_btree_max_entries(info->value_type.size);
	return shape_node(info, sub, 0, out);
}

/* ---- diff of two trees ----------------------------------------------------------- */

/*
 * Two cursors go through the trees in key order, merge-join style.  Each
 * side's next item (its front) is either an entry of a leaf already read
 * or a whole subtree not read yet, known by its block number, the lowest
 * key it can hold (its parent's separator) and its height.  A subtree that
 * is the front of both sides at once is the same block in both trees, so
 * the same entries: both skip it unread.  Otherwise the front with the
 * lowest key is opened (read); of two subtrees starting at one key, the
 * taller one first, so that after a root split on one side the two sides
 * meet again at equal heights, where their shared children are.
 *
 * Nodes are copied out of the block manager when read and no block stays
 * locked between calls: the caller only has to keep both trees unchanged
 * (held) between steps, and may drop its locks.
 */
struct diff_side {
	uint8_t *node[MAX_DEPTH]; /* copies of the nodes on the path; [0] the root */
	uint32_t pos[MAX_DEPTH];
	unsigned depth;           /* nodes on the path */
	unsigned height;          /* the tree's: 1 when the root is a leaf */
	uint64_t root;            /* not opened yet; 0 = opened, or an empty side */
	bool any_key;             /* an entry was consumed: last_key is valid */
	uint64_t last_key;
};

/* Children of two nodes: what one read-ahead of the diff names at most. */
#define DIFF_PREFETCH_MAX (2 * TFS_BLOCK_SIZE / 16)

struct tfs_btree_diff {
	struct tfs_btree_info info;
	struct diff_side side[2];
	uint64_t prefetch[DIFF_PREFETCH_MAX];
	uint64_t reads;
	uint64_t position;
	bool done;
};

enum front_kind { FRONT_END, FRONT_NODE, FRONT_ENTRY };

struct front {
	enum front_kind kind;
	uint64_t key; /* an entry's key, a subtree's lowest possible key */
	uint64_t block;
	unsigned height;
	const uint8_t *value;
};

static int diff_read(struct tfs_btree_diff *d, uint64_t b, uint8_t *copy)
{
	struct tfs_block *blk;
	int r = read_node(&d->info, last_level(&d->info), b, &blk);

	if (r)
		return r;
	memcpy(copy, bdata(blk), TFS_BLOCK_SIZE);
	tfs_tm_unlock(d->info.tm, blk);
	d->reads++;
	return 0;
}

/* Height of the tree at b: the length of its leftmost path. */
static int diff_height(struct tfs_btree_diff *d, uint64_t b, uint8_t *scratch, unsigned *height)
{
	for (unsigned h = 1; h <= MAX_DEPTH; h++) {
		int r = diff_read(d, b, scratch);

		if (r)
			return r;
		if (is_leaf(scratch)) {
			*height = h;
			return 0;
		}
		b = value64(scratch, 0);
	}
	return corrupt(b, "tree too deep (cycle?)");
}

int tfs_btree_diff_begin(const struct tfs_btree_info *info, uint64_t a_root, uint64_t b_root,
			 struct tfs_btree_diff **out)
{
	struct tfs_btree_diff *d;
	uint64_t roots[2] = { a_root, b_root };
	int r = check_info(info);

	if (r)
		return r;
	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->info = *info;
	/* Equal roots: equal trees, nothing to read at all. */
	if (a_root == b_root)
		roots[0] = roots[1] = 0;
	for (unsigned i = 0; i < 2; i++) {
		struct diff_side *s = &d->side[i];

		if (!roots[i])
			continue;
		s->node[0] = malloc(TFS_BLOCK_SIZE);
		if (!s->node[0]) {
			r = -ENOMEM;
			goto err;
		}
		r = diff_height(d, roots[i], s->node[0], &s->height);
		if (r)
			goto err;
		s->root = roots[i];
	}
	*out = d;
	return 0;

err:
	tfs_btree_diff_end(d);
	return r;
}

void tfs_btree_diff_end(struct tfs_btree_diff *d)
{
	if (!d)
		return;
	for (unsigned i = 0; i < 2; i++)
		for (unsigned j = 0; j < MAX_DEPTH; j++)
			free(d->side[i].node[j]);
	free(d);
}

uint64_t tfs_btree_diff_nodes_read(const struct tfs_btree_diff *d)
{
	return d->reads;
}

uint64_t tfs_btree_diff_position(const struct tfs_btree_diff *d)
{
	return d->position;
}

static void front_of(struct diff_side *s, struct front *f)
{
	const uint8_t *n;
	uint32_t p;

	/* A node whose entries are all consumed is done: its parent moves on. */
	while (s->depth && s->pos[s->depth - 1] >= node_nr(s->node[s->depth - 1]))
		if (--s->depth)
			s->pos[s->depth - 1]++;
	if (!s->depth) {
		*f = (struct front){ .kind = s->root ? FRONT_NODE : FRONT_END, .key = 0,
				     .block = s->root, .height = s->height };
		return;
	}
	n = s->node[s->depth - 1];
	p = s->pos[s->depth - 1];
	if (is_leaf(n))
		*f = (struct front){ .kind = FRONT_ENTRY, .key = key_at(n, p), .value = value_ptr(n, p) };
	else
		*f = (struct front){ .kind = FRONT_NODE, .key = key_at(n, p), .block = value64(n, p),
				     .height = s->height - s->depth };
}

static void advance(struct diff_side *s)
{
	if (s->depth)
		s->pos[s->depth - 1]++;
	else
		s->root = 0;
}

/*
 * The first key past the subtree open at path index j of side s: the next
 * separator of the nearest ancestor that has one (an ancestor's pos is
 * the child open below it), UINT64_MAX when none has.
 */
static uint64_t path_end(const struct diff_side *s, unsigned j)
{
	while (j-- > 0)
		if (s->pos[j] + 1 < node_nr(s->node[j]))
			return key_at(s->node[j], s->pos[j] + 1);
	return UINT64_MAX;
}

/*
 * Read ahead the children of the internal node just opened on side s that
 * the walk is going to open: those the other side does not share.  The
 * other side's node at the same height, if it has come down that far,
 * is merged with this one on the keys: a child at one key in both is one
 * subtree, skipped unread; every other child of either node, as far as
 * the other node reaches, will be read.  If the other side has not come
 * down to this height yet, only the children before its front are
 * certain; the rest waits until it opens its node, which plans again with
 * both known.  A wrong guess costs a wasted or a synchronous read, never
 * a wrong answer: the walk still reads (and validates) every node itself.
 */
static void diff_prefetch(struct tfs_btree_diff *d, struct diff_side *s)
{
	struct diff_side *o = s == &d->side[0] ? &d->side[1] : &d->side[0];
	unsigned j = s->depth - 1, h = s->height - j;
	const uint8_t *n = s->node[j], *m = NULL;
	uint32_t i = s->pos[j], k = 0, nn = node_nr(n), nm = 0;
	uint64_t n_end = path_end(s, j), m_end = UINT64_MAX;
	struct front fo;
	size_t count = 0;

	if (h < 2)
		return;
	front_of(o, &fo);
	if (o->height >= h && o->depth > o->height - h) {
		unsigned jo = o->height - h;

		m = o->node[jo];
		k = o->pos[jo];
		nm = node_nr(m);
		m_end = path_end(o, jo);
	} else if (fo.kind == FRONT_NODE && fo.height >= h) {
		m_end = fo.key;
	}
	while ((i < nn || k < nm) && count < DIFF_PREFETCH_MAX) {
		uint64_t kn = i < nn ? key_at(n, i) : UINT64_MAX;
		uint64_t km = k < nm ? key_at(m, k) : UINT64_MAX;

		if (i < nn && k < nm && kn == km && value64(n, i) == value64(m, k)) {
			i++;
			k++;
		} else if (k >= nm || (i < nn && kn <= km)) {
			if (kn >= m_end)
				i = nn;
			else
				d->prefetch[count++] = value64(n, i++);
		} else {
			if (km >= n_end)
				k = nm;
			else
				d->prefetch[count++] = value64(m, k++);
		}
	}
	if (count)
		(void)tfs_tm_prefetch(d->info.tm, d->prefetch, count);
}

/* Read the subtree at the side's front onto its path. */
static int open_front(struct tfs_btree_diff *d, struct diff_side *s, const struct front *f)
{
	uint8_t *n;
	int r;

	if (s->depth >= MAX_DEPTH || f->height == 0)
		return corrupt(f->block, "tree too deep (cycle?)");
	if (!s->node[s->depth]) {
		s->node[s->depth] = malloc(TFS_BLOCK_SIZE);
		if (!s->node[s->depth])
			return -ENOMEM;
	}
	n = s->node[s->depth];
	r = diff_read(d, f->block, n);
	if (r)
		return r;
	/* All leaves of a tree are at one depth: anything else is corruption. */
	if (is_leaf(n) != (f->height == 1))
		return corrupt(f->block, is_leaf(n) ? "leaf above the leaf level"
						   : "internal node at the leaf level");
	if (!s->depth)
		s->root = 0;
	s->pos[s->depth++] = 0;
	diff_prefetch(d, s);
	return 0;
}

/* Take the entry at the side's front, checking that keys only go up. */
static int take_entry(struct diff_side *s, const struct front *f)
{
	if (s->any_key && f->key <= s->last_key) {
		tfs_err("btree: key %llu comes after key %llu: keys out of order",
			(unsigned long long)f->key, (unsigned long long)s->last_key);
		return -EUCLEAN;
	}
	s->any_key = true;
	s->last_key = f->key;
	advance(s);
	return 0;
}

/* -1, 0, 1 as a's key is below, equal to or above b's; the end is above everything. */
static int cmp_fronts(const struct front *a, const struct front *b)
{
	if (a->kind == FRONT_END || b->kind == FRONT_END)
		return (a->kind == FRONT_END) - (b->kind == FRONT_END);
	return a->key < b->key ? -1 : a->key > b->key;
}

int tfs_btree_diff_step(struct tfs_btree_diff *d, unsigned max_reads, tfs_btree_diff_fn fn,
			void *ctx)
{
	struct diff_side *a = &d->side[0], *b = &d->side[1];
	uint64_t limit = d->reads + (max_reads ? max_reads : 1);
	uint32_t vs = d->info.value_type.size;
	int r = 0;

	while (!d->done && !r && d->reads < limit) {
		struct front fa, fb;
		int c;

		front_of(a, &fa);
		front_of(b, &fb);
		c = cmp_fronts(&fa, &fb);
		if (fa.kind == FRONT_END && fb.kind == FRONT_END) {
			d->done = true;
			break;
		}
		d->position = c <= 0 ? fa.key : fb.key;
		if (fa.kind == FRONT_NODE && fb.kind == FRONT_NODE && fa.block == fb.block) {
			advance(a);
			advance(b);
		} else if (fa.kind == FRONT_NODE &&
			   (c < 0 || (c == 0 && (fb.kind != FRONT_NODE || fa.height >= fb.height)))) {
			r = open_front(d, a, &fa);
		} else if (fb.kind == FRONT_NODE && c >= 0) {
			r = open_front(d, b, &fb);
		} else if (c == 0) {
			bool same = !memcmp(fa.value, fb.value, vs);

			r = take_entry(a, &fa);
			if (!r)
				r = take_entry(b, &fb);
			if (!r && !same)
				r = fn(ctx, fa.key, fa.value, fb.value);
		} else if (c < 0) {
			r = take_entry(a, &fa);
			if (!r)
				r = fn(ctx, fa.key, fa.value, NULL);
		} else {
			r = take_entry(b, &fb);
			if (!r)
				r = fn(ctx, fb.key, NULL, fb.value);
		}
	}
	return r ? r : !d->done;
}
