/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Persistent arrays (docs/cache-format.md, "Arrays and bitsets").
 *
 * The btree's values are array block numbers, so its value type counts
 * references to array blocks in the metadata space map: a shared btree
 * leaf copied by a shadow gives each of its blocks one more parent, and a
 * dropped entry takes one away.  An array block is shadowed through the
 * transaction manager like any node; when that moves it, the btree entry
 * is overwritten with the new location.
 */
#include "array.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block-manager.h"
#include "format.h"
#include "log.h"
#include "transaction-manager.h"

#define OFF_MAX offsetof(struct tfs_disk_array_header, max_entries)
#define OFF_NR offsetof(struct tfs_disk_array_header, nr_entries)
#define OFF_VSIZE offsetof(struct tfs_disk_array_header, value_size)

static int block_inc(void *ctx, const void *value)
{
	return tfs_tm_inc(ctx, tfs_le64(value));
}

static int block_dec(void *ctx, const void *value)
{
	return tfs_tm_dec(ctx, tfs_le64(value));
}

int tfs_array_info_init(struct tfs_array_info *info, struct tfs_tm *tm, uint32_t value_size)
{
	if (value_size == 0 || value_size > TFS_BLOCK_SIZE - TFS_ARRAY_HEADER_SIZE)
		return -EINVAL;
	*info = (struct tfs_array_info){
		.tm = tm,
		.value_size = value_size,
		.per_block = tfs_array_block_entries(value_size),
		.btree = { .tm = tm, .levels = 1,
			   .value_type = { .context = tm, .size = 8, .inc = block_inc, .dec = block_dec } },
	};
	return 0;
}

int tfs_array_empty(const struct tfs_array_info *info, uint64_t *root)
{
	return tfs_btree_empty(&info->btree, root);
}

int tfs_array_del(const struct tfs_array_info *info, uint64_t root)
{
	return tfs_btree_del(&info->btree, root);
}

/* ---- blocks ---------------------------------------------------------------- */

static inline uint8_t *slot(const struct tfs_array_info *info, void *data, uint32_t i)
{
	return (uint8_t *)data + TFS_ARRAY_HEADER_SIZE + (size_t)i * info->value_size;
}

static inline uint32_t block_nr(const void *data)
{
	return tfs_le32((const uint8_t *)data + OFF_NR);
}

/* What the validator cannot know: this array's value size and block capacity. */
static int check_block(const struct tfs_array_info *info, struct tfs_block *b)
{
	const uint8_t *d = tfs_block_data(b);
	uint32_t vsize = tfs_le32(d + OFF_VSIZE), max = tfs_le32(d + OFF_MAX);

	if (vsize == info->value_size && max == info->per_block)
		return 0;
	tfs_err("array block %llu holds %u values of %u bytes, not %u of %u: corrupt array",
		(unsigned long long)tfs_block_location(b), max, vsize, info->per_block,
		info->value_size);
	return -EUCLEAN;
}

/* A new block holding n copies of fill, unlocked; its count (1) is the caller's. */
static int new_block(const struct tfs_array_info *info, uint32_t n, const void *fill, uint64_t *out)
{
	struct tfs_block *b;
	uint8_t *d;
	int r;

	r = tfs_tm_new_block(info->tm, &tfs_array_validator, &b);
	if (r)
		return r;
	d = tfs_block_data(b);
	tfs_put_le32(d + OFF_MAX, info->per_block);
	tfs_put_le32(d + OFF_NR, n);
	tfs_put_le32(d + OFF_VSIZE, info->value_size);
	for (uint32_t i = 0; i < n; i++)
		memcpy(slot(info, d, i), fill, info->value_size);
	*out = tfs_block_location(b);
	tfs_tm_unlock(info->tm, b);
	return 0;
}

static int insert_block(const struct tfs_array_info *info, uint64_t root, uint64_t index,
			uint64_t blocknr, uint64_t *new_root)
{
	uint8_t v[8];

	tfs_put_le64(v, blocknr);
	return tfs_btree_insert(&info->btree, root, &index, v, new_root, NULL);
}

static int lookup_block(const struct tfs_array_info *info, uint64_t root, uint64_t index,
			uint64_t *blocknr)
{
	uint8_t v[8];
	int r = tfs_btree_lookup(&info->btree, root, &index, v);

	if (!r)
		*blocknr = tfs_le64(v);
	return r;
}

/*
 * Array block index, writable, write-locked in *out; *root follows the
 * btree if the block moved.  The shadow already dropped the old block's
 * count for the entry that now names the copy, and the overwrite in the
 * btree drops it again, so it is raised once in between.
 */
static int shadow_block(const struct tfs_array_info *info, uint64_t *root, uint64_t index,
			struct tfs_block **out)
{
	struct tfs_block *b;
	uint64_t orig;
	bool inc_children;
	int r;

	r = lookup_block(info, *root, index, &orig);
	if (r)
		return r;
	r = tfs_tm_shadow(info->tm, orig, &tfs_array_validator, &b, &inc_children);
	if (r)
		return r;
	r = check_block(info, b);
	if (!r && tfs_block_location(b) != orig) {
		r = tfs_tm_inc(info->tm, orig);
		if (!r)
			r = insert_block(info, *root, index, tfs_block_location(b), root);
	}
	if (r) {
		tfs_tm_unlock(info->tm, b);
		return r;
	}
	*out = b;
	return 0;
}

static int read_block(const struct tfs_array_info *info, uint64_t root, uint64_t index,
		      struct tfs_block **out)
{
	uint64_t blocknr;
	int r;

	r = lookup_block(info, root, index, &blocknr);
	if (r)
		return r;
	r = tfs_tm_read_lock(info->tm, blocknr, &tfs_array_validator, out);
	if (r)
		return r;
	r = check_block(info, *out);
	if (r)
		tfs_tm_unlock(info->tm, *out);
	return r;
}

/* ---- resize ---------------------------------------------------------------- */

static uint64_t blocks_for(const struct tfs_array_info *info, uint64_t size)
{
	return (size + info->per_block - 1) / info->per_block;
}

/* Block index holds n entries now: fill the slots up to want with fill, or drop those past it. */
static int set_block_entries(const struct tfs_array_info *info, uint64_t *root, uint64_t index,
			     uint32_t want, const void *fill)
{
	struct tfs_block *b;
	uint8_t *d;
	uint32_t n;
	int r;

	r = shadow_block(info, root, index, &b);
	if (r)
		return r;
	d = tfs_block_data(b);
	n = block_nr(d);
	for (uint32_t i = n; i < want; i++)
		memcpy(slot(info, d, i), fill, info->value_size);
	if (want < n)
		memset(slot(info, d, want), 0, (size_t)(n - want) * info->value_size);
	tfs_put_le32(d + OFF_NR, want);
	tfs_tm_unlock(info->tm, b);
	return 0;
}

static int grow(const struct tfs_array_info *info, uint64_t *root, uint64_t old_size,
		uint64_t new_size, const void *fill)
{
	uint64_t old_blocks = blocks_for(info, old_size), new_blocks = blocks_for(info, new_size);
	uint64_t full_end = new_size / info->per_block, shared = 0;
	uint32_t tail = (uint32_t)(new_size % info->per_block);
	int r;

	/* The old last block is topped up first, so every block but the last stays full. */
	if (old_size % info->per_block) {
		uint32_t want = new_blocks == old_blocks && tail ? tail : info->per_block;
		r = set_block_entries(info, root, old_blocks - 1, want, fill);
		if (r)
			return r;
	}
	for (uint64_t i = old_blocks; i < full_end; i++) {
		if (shared) {
			r = tfs_tm_inc(info->tm, shared);
		} else {
			r = new_block(info, info->per_block, fill, &shared);
		}
		if (!r)
			r = insert_block(info, *root, i, shared, root);
		if (r)
			return r;
	}
	if (tail && new_blocks > old_blocks) {
		uint64_t b;
		r = new_block(info, tail, fill, &b);
		if (!r)
			r = insert_block(info, *root, new_blocks - 1, b, root);
		if (r)
			return r;
	}
	return 0;
}

static int shrink(const struct tfs_array_info *info, uint64_t *root, uint64_t old_size,
		  uint64_t new_size)
{
	uint64_t old_blocks = blocks_for(info, old_size), new_blocks = blocks_for(info, new_size);
	uint32_t tail = (uint32_t)(new_size % info->per_block);
	uint64_t key = 0;
	int r;

	if (new_blocks < old_blocks) {
		r = tfs_btree_remove_range(&info->btree, *root, &key, new_blocks, old_blocks, root,
					   NULL);
		if (r)
			return r;
	}
	return tail ? set_block_entries(info, root, new_blocks - 1, tail, NULL) : 0;
}

int tfs_array_resize(const struct tfs_array_info *info, uint64_t root, uint64_t old_size,
		     uint64_t new_size, const void *fill, uint64_t *new_root)
{
	int r = 0;

	*new_root = root;
	if (new_size > old_size)
		r = grow(info, new_root, old_size, new_size, fill);
	else if (new_size < old_size)
		r = shrink(info, new_root, old_size, new_size);
	return r;
}

/* ---- elements -------------------------------------------------------------- */

/* -ENODATA unless slot i of the locked block is a live entry. */
static int check_slot(struct tfs_block *b, uint32_t i)
{
	return i < block_nr(tfs_block_data(b)) ? 0 : -ENODATA;
}

int tfs_array_get(const struct tfs_array_info *info, uint64_t root, uint64_t index, void *value)
{
	struct tfs_block *b;
	uint32_t i = (uint32_t)(index % info->per_block);
	int r;

	r = read_block(info, root, index / info->per_block, &b);
	if (r)
		return r;
	r = check_slot(b, i);
	if (!r)
		memcpy(value, slot(info, tfs_block_data(b), i), info->value_size);
	tfs_tm_unlock(info->tm, b);
	return r;
}

int tfs_array_set(const struct tfs_array_info *info, uint64_t root, uint64_t index,
		  const void *value, uint64_t *new_root)
{
	uint8_t old[TFS_BLOCK_SIZE];
	struct tfs_block *b;
	int r;

	*new_root = root;
	/* Read first, so an index past the end changes nothing, and an equal value costs no shadow. */
	r = tfs_array_get(info, root, index, old);
	if (r || memcmp(old, value, info->value_size) == 0)
		return r;
	r = shadow_block(info, new_root, index / info->per_block, &b);
	if (r)
		return r;
	memcpy(slot(info, tfs_block_data(b), (uint32_t)(index % info->per_block)), value,
	       info->value_size);
	tfs_tm_unlock(info->tm, b);
	return 0;
}

/* ---- walk ------------------------------------------------------------------ */

int tfs_array_walk(const struct tfs_array_info *info, uint64_t root, uint64_t begin, uint64_t end,
		   tfs_array_walk_fn fn, void *ctx)
{
	enum { CHUNK = 64 };
	uint64_t keys[CHUNK], key = 0;
	uint8_t vals[CHUNK * 8];
	uint64_t bi = begin / info->per_block, bend = blocks_for(info, end);
	int r = 0;

	if (begin >= end)
		return 0;
	while (bi < bend) {
		int n = tfs_btree_lookup_range(&info->btree, root, &key, bi, bend, CHUNK, keys, vals);
		if (n < 0)
			return n;
		for (int k = 0; k < n && !r; k++) {
			struct tfs_block *b;
			uint64_t first = keys[k] * info->per_block, e;
			uint32_t nr;

			if (keys[k] != bi) {
				tfs_err("array block %llu is missing: corrupt array",
					(unsigned long long)bi);
				return -EUCLEAN;
			}
			r = tfs_tm_read_lock(info->tm, tfs_le64(vals + 8 * k), &tfs_array_validator, &b);
			if (r)
				return r;
			r = check_block(info, b);
			nr = block_nr(tfs_block_data(b));
			e = first + nr < end ? first + nr : end;
			if (!r && e < end && nr < info->per_block) {
				tfs_err("array block %llu holds %u entries where more were expected: corrupt array",
					(unsigned long long)tfs_block_location(b), nr);
				r = -EUCLEAN;
			}
			for (uint64_t x = first > begin ? first : begin; x < e && !r; x++)
				r = fn(ctx, x, slot(info, tfs_block_data(b), (uint32_t)(x - first)));
			tfs_tm_unlock(info->tm, b);
			bi++;
		}
		if (r)
			return r;
		if (n < CHUNK && bi < bend) {
			tfs_err("array block %llu is missing: corrupt array", (unsigned long long)bi);
			return -EUCLEAN;
		}
	}
	return 0;
}
