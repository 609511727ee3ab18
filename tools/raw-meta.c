/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Independent metadata reader for the offline tools: see raw-meta.h for why
 * it does not reuse the library's btree and space-map code.
 */
#include "raw-meta.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "bdev.h"
#include "crc32c.h"

void tfs_raw_sb_decode(const void *block, struct tfs_raw_sb *out)
{
	const uint8_t *p = block;
	const uint8_t *dsm = p + offsetof(struct tfs_disk_thin_sb, data_space_map_root);
	const uint8_t *msm = p + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root);

	out->csum = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, csum));
	out->flags = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, flags));
	out->blocknr = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, blocknr));
	out->magic = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, magic));
	out->version = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, version));
	out->time = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, time));
	out->trans_id = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, trans_id));
	out->held_root = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, held_root));
	out->data_sm.nr_blocks = tfs_le64(dsm + offsetof(struct tfs_disk_sm_root, nr_blocks));
	out->data_sm.nr_allocated = tfs_le64(dsm + offsetof(struct tfs_disk_sm_root, nr_allocated));
	out->data_sm.bitmap_root = tfs_le64(dsm + offsetof(struct tfs_disk_sm_root, bitmap_root));
	out->data_sm.ref_count_root = tfs_le64(dsm + offsetof(struct tfs_disk_sm_root, ref_count_root));
	out->meta_sm.nr_blocks = tfs_le64(msm + offsetof(struct tfs_disk_sm_root, nr_blocks));
	out->meta_sm.nr_allocated = tfs_le64(msm + offsetof(struct tfs_disk_sm_root, nr_allocated));
	out->meta_sm.bitmap_root = tfs_le64(msm + offsetof(struct tfs_disk_sm_root, bitmap_root));
	out->meta_sm.ref_count_root = tfs_le64(msm + offsetof(struct tfs_disk_sm_root, ref_count_root));
	out->mapping_root = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, data_mapping_root));
	out->details_root = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, device_details_root));
	out->data_block_size = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, data_block_size));
	out->metadata_block_size = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, metadata_block_size));
	out->metadata_nr_blocks = tfs_le64(p + offsetof(struct tfs_disk_thin_sb, metadata_nr_blocks));
	out->compat_flags = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, compat_flags));
	out->compat_ro_flags = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, compat_ro_flags));
	out->incompat_flags = tfs_le32(p + offsetof(struct tfs_disk_thin_sb, incompat_flags));

	out->sm_fields_zero = true;
	for (size_t i = 0; i < 2 * TFS_SM_ROOT_FIELD; i++)
		if (dsm[i]) {
			out->sm_fields_zero = false;
			break;
		}
}

int tfs_raw_dev_init(struct tfs_raw_dev *d, struct tfs_bdev *bdev)
{
	uint64_t bytes;
	int r = tfs_bdev_size(bdev, &bytes);

	if (r < 0)
		return r;
	d->bdev = bdev;
	d->nr_blocks = bytes / TFS_BLOCK_SIZE;
	return 0;
}

int tfs_raw_read(const struct tfs_raw_dev *d, uint64_t b, void *buf)
{
	if (b >= d->nr_blocks)
		return -ERANGE;
	return tfs_bdev_read(d->bdev, buf, TFS_BLOCK_SIZE, b * TFS_BLOCK_SIZE);
}

/* Checksum and self location, shared by every block type but the superblock. */
static int check_csum_and_location(const void *block, uint64_t where, uint32_t salt,
				   char *why, size_t why_len)
{
	uint32_t stored = tfs_le32(block);
	uint32_t computed = tfs_block_csum(block, salt);
	uint64_t self = tfs_le64((const uint8_t *)block + 8);

	if (stored != computed) {
		snprintf(why, why_len, "bad checksum (stored 0x%08" PRIx32 ", computed 0x%08" PRIx32 ")",
			 stored, computed);
		return -EUCLEAN;
	}
	if (self != where) {
		snprintf(why, why_len, "wrong block number %" PRIu64 " in its header", self);
		return -EUCLEAN;
	}
	return 0;
}

int tfs_raw_bitmap_check(const void *block, uint64_t where, char *why, size_t why_len)
{
	return check_csum_and_location(block, where, TFS_SALT_BITMAP, why, why_len);
}

int tfs_raw_index_check(const void *block, uint64_t where, char *why, size_t why_len)
{
	return check_csum_and_location(block, where, TFS_SALT_INDEX, why, why_len);
}

int tfs_raw_node_check(const void *block, uint64_t where, uint32_t leaf_vsize,
		       struct tfs_raw_node *out, char *why, size_t why_len)
{
	const uint8_t *p = block;
	struct tfs_raw_node n;
	uint32_t want_vsize;
	uint64_t need;
	int r;

	r = check_csum_and_location(block, where, TFS_SALT_BTREE, why, why_len);
	if (r < 0)
		return r;

	n.data = p;
	n.blocknr = where;
	n.flags = tfs_le32(p + offsetof(struct tfs_disk_node_header, flags));
	n.nr_entries = tfs_le32(p + offsetof(struct tfs_disk_node_header, nr_entries));
	n.max_entries = tfs_le32(p + offsetof(struct tfs_disk_node_header, max_entries));
	n.value_size = tfs_le32(p + offsetof(struct tfs_disk_node_header, value_size));

	if (n.flags != TFS_BTREE_INTERNAL && n.flags != TFS_BTREE_LEAF) {
		snprintf(why, why_len, "unknown node flags 0x%" PRIx32, n.flags);
		return -EUCLEAN;
	}
	want_vsize = n.flags == TFS_BTREE_INTERNAL ? TFS_RAW_VSIZE_U64 : leaf_vsize;
	if (n.value_size != want_vsize) {
		snprintf(why, why_len, "value size %" PRIu32 " in %s node, expected %" PRIu32,
			 n.value_size, n.flags == TFS_BTREE_INTERNAL ? "internal" : "leaf",
			 want_vsize);
		return -EUCLEAN;
	}
	need = TFS_BTREE_HEADER_SIZE + (uint64_t)n.max_entries * (8u + n.value_size);
	if (need > TFS_BLOCK_SIZE) {
		snprintf(why, why_len, "max_entries %" PRIu32 " does not fit in a block",
			 n.max_entries);
		return -EUCLEAN;
	}
	/* A node that cannot hold 3 entries cannot be a third full either. */
	if (n.max_entries < 3 || n.max_entries % 3) {
		snprintf(why, why_len, "max_entries %" PRIu32 " is not a positive multiple of 3",
			 n.max_entries);
		return -EUCLEAN;
	}
	if (n.nr_entries > n.max_entries) {
		snprintf(why, why_len, "nr_entries %" PRIu32 " > max_entries %" PRIu32,
			 n.nr_entries, n.max_entries);
		return -EUCLEAN;
	}
	n.max_unusual = n.max_entries != tfs_btree_max_entries(n.value_size);
	*out = n;
	return 0;
}

/* ---- iterator ------------------------------------------------------------ */

struct iter_level {
	uint8_t block[TFS_BLOCK_SIZE];
	struct tfs_raw_node node;
	uint32_t idx;
	uint64_t lo; /* every key in this subtree is >= lo ... */
	uint64_t hi; /* ... and < hi when has_hi */
	bool has_hi;
};

struct tfs_raw_iter {
	const struct tfs_raw_dev *dev;
	uint32_t leaf_vsize;
	uint64_t start_key;
	int top;        /* index of the deepest level in use, -1 when done */
	int leaf_depth; /* depth of the first leaf seen, -1 before */
	bool have_last;
	uint64_t last_key;
	int err;
	uint64_t err_block;
	char why[TFS_RAW_WHY_LEN + 64];
	struct iter_level lv[TFS_RAW_MAX_DEPTH];
};

static int iter_fail(struct tfs_raw_iter *it, int err, uint64_t b, const char *what)
{
	it->err = err;
	it->err_block = b;
	snprintf(it->why, sizeof(it->why), "block %" PRIu64 ": %s", b, what);
	return err;
}

/* Keys strictly increasing and inside [lo, hi). */
static int iter_check_keys(struct tfs_raw_iter *it, const struct iter_level *l)
{
	char why[TFS_RAW_WHY_LEN];

	for (uint32_t i = 0; i < l->node.nr_entries; i++) {
		uint64_t k = tfs_raw_node_key(&l->node, i);

		if (i > 0 && k <= tfs_raw_node_key(&l->node, i - 1)) {
			snprintf(why, sizeof(why), "keys out of order at entry %" PRIu32, i);
			return iter_fail(it, -EUCLEAN, l->node.blocknr, why);
		}
		if (k < l->lo || (l->has_hi && k >= l->hi)) {
			snprintf(why, sizeof(why), "key %" PRIu64 " outside the range its parent gives",
				 k);
			return iter_fail(it, -EUCLEAN, l->node.blocknr, why);
		}
	}
	return 0;
}

/* Where to start in a node so that entries below start_key are skipped. */
static uint32_t iter_first_index(const struct tfs_raw_iter *it, const struct tfs_raw_node *n)
{
	uint32_t i = 0;

	if (tfs_raw_node_is_leaf(n)) {
		while (i < n->nr_entries && tfs_raw_node_key(n, i) < it->start_key)
			i++;
		return i;
	}
	/* Internal: the last child whose lower bound is <= start_key. */
	while (i + 1 < n->nr_entries && tfs_raw_node_key(n, i + 1) <= it->start_key)
		i++;
	return i;
}

static int iter_push(struct tfs_raw_iter *it, uint64_t b, uint64_t lo, uint64_t hi, bool has_hi)
{
	int depth = it->top + 1;
	struct iter_level *l;
	char why[TFS_RAW_WHY_LEN];
	int r;

	if (depth >= TFS_RAW_MAX_DEPTH)
		return iter_fail(it, -EUCLEAN, b, "tree deeper than any valid btree (cycle?)");
	l = &it->lv[depth];
	r = tfs_raw_read(it->dev, b, l->block);
	if (r == -ERANGE)
		return iter_fail(it, r, b, "beyond the end of the metadata device");
	if (r < 0)
		return iter_fail(it, r, b, "read error");
	r = tfs_raw_node_check(l->block, b, it->leaf_vsize, &l->node, why, sizeof(why));
	if (r < 0)
		return iter_fail(it, r, b, why);
	if (depth > 0 && l->node.nr_entries < tfs_raw_node_min_entries(&l->node)) {
		snprintf(why, sizeof(why), "non-root node with only %" PRIu32 " entries",
			 l->node.nr_entries);
		return iter_fail(it, -EUCLEAN, b, why);
	}
	if (!tfs_raw_node_is_leaf(&l->node) && l->node.nr_entries == 0)
		return iter_fail(it, -EUCLEAN, b, "internal node with no entries");
	if (tfs_raw_node_is_leaf(&l->node)) {
		if (it->leaf_depth < 0)
			it->leaf_depth = depth;
		else if (it->leaf_depth != depth)
			return iter_fail(it, -EUCLEAN, b, "leaves at different depths");
	}
	l->lo = lo;
	l->hi = hi;
	l->has_hi = has_hi;
	r = iter_check_keys(it, l);
	if (r < 0)
		return r;
	l->idx = iter_first_index(it, &l->node);
	it->top = depth;
	return 0;
}

int tfs_raw_iter_open(const struct tfs_raw_dev *d, uint64_t root, uint32_t leaf_vsize,
		      uint64_t start_key, struct tfs_raw_iter **out)
{
	struct tfs_raw_iter *it = calloc(1, sizeof(*it));

	*out = it;
	if (!it)
		return -ENOMEM;
	it->dev = d;
	it->leaf_vsize = leaf_vsize;
	it->start_key = start_key;
	it->top = -1;
	it->leaf_depth = -1;
	return iter_push(it, root, 0, 0, false);
}

int tfs_raw_iter_next(struct tfs_raw_iter *it, uint64_t *key, const uint8_t **value)
{
	while (!it->err && it->top >= 0) {
		struct iter_level *l = &it->lv[it->top];
		uint32_t i = l->idx;
		uint64_t k, hi;
		bool has_hi;
		int r;

		if (i >= l->node.nr_entries) {
			it->top--;
			if (it->top >= 0)
				it->lv[it->top].idx++;
			continue;
		}
		k = tfs_raw_node_key(&l->node, i);
		if (tfs_raw_node_is_leaf(&l->node)) {
			l->idx++;
			/* Also what stops a leaf reachable twice from being yielded twice. */
			if (it->have_last && k <= it->last_key)
				return iter_fail(it, -EUCLEAN, l->node.blocknr,
						 "keys out of order across nodes");
			it->have_last = true;
			it->last_key = k;
			*key = k;
			*value = tfs_raw_node_value(&l->node, i);
			return 1;
		}
		has_hi = i + 1 < l->node.nr_entries || l->has_hi;
		hi = i + 1 < l->node.nr_entries ? tfs_raw_node_key(&l->node, i + 1) : l->hi;
		r = iter_push(it, tfs_le64(tfs_raw_node_value(&l->node, i)), k, hi, has_hi);
		if (r < 0)
			return r;
	}
	return it->err;
}

const char *tfs_raw_iter_why(const struct tfs_raw_iter *it)
{
	return it->why;
}

uint64_t tfs_raw_iter_error_block(const struct tfs_raw_iter *it)
{
	return it->err_block;
}

void tfs_raw_iter_close(struct tfs_raw_iter *it)
{
	free(it);
}
