/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Validators for every block type of the thin and cache formats: what a block must
 * look like before any code is allowed to trust its fields, and how it is
 * sealed before it is written.
 */
#include <errno.h>
#include <stdio.h>

#include "block-manager.h"
#include "crc32c.h"
#include "format.h"

static int check_csum(const void *data, uint32_t salt, char *why, size_t why_len)
{
	uint32_t want = tfs_block_csum(data, salt);
	uint32_t got = tfs_le32(data);

	if (want == got)
		return 0;
	snprintf(why, why_len, "bad checksum (stored %#x, computed %#x)", got, want);
	return -EUCLEAN;
}

static int check_location(const void *data, size_t off, uint64_t blocknr, char *why,
			  size_t why_len)
{
	uint64_t stored = tfs_le64((const uint8_t *)data + off);

	if (stored == blocknr)
		return 0;
	snprintf(why, why_len, "block claims to be block %llu", (unsigned long long)stored);
	return -EUCLEAN;
}

/* Checksum, then the block's own location at loc_off. */
static int check_sealed(const void *data, uint32_t salt, size_t loc_off, uint64_t blocknr,
			char *why, size_t why_len)
{
	int r = check_csum(data, salt, why, why_len);

	return r ? r : check_location(data, loc_off, blocknr, why, why_len);
}

/* A superblock's u64 magic at off. */
static int check_magic(const void *data, size_t off, uint64_t want, char *why, size_t why_len)
{
	uint64_t got = tfs_le64((const uint8_t *)data + off);

	if (got == want)
		return 0;
	snprintf(why, why_len, "bad magic %llu (want %llu)", (unsigned long long)got,
		 (unsigned long long)want);
	return -EUCLEAN;
}

/* A block of max entries (bytes in all when full) holding nr of them. */
static int check_capacity(uint32_t max, uint32_t nr, uint32_t vsize, uint64_t bytes, char *why,
			  size_t why_len)
{
	if (max == 0 || bytes > TFS_BLOCK_SIZE) {
		snprintf(why, why_len, "bad max_entries %u for value_size %u", max, vsize);
		return -EUCLEAN;
	}
	if (nr > max) {
		snprintf(why, why_len, "nr_entries %u > max_entries %u", nr, max);
		return -EUCLEAN;
	}
	return 0;
}

static void seal(void *data, size_t loc_off, uint64_t blocknr, uint32_t salt)
{
	tfs_put_le64((uint8_t *)data + loc_off, blocknr);
	tfs_put_le32(data, tfs_block_csum(data, salt));
}

/* ---- btree nodes ---- */

static int btree_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
		       char *why, size_t why_len)
{
	const uint8_t *b = data;
	uint32_t flags, nr, max, vsize;
	int r;

	(void)v;
	r = check_csum(data, TFS_SALT_BTREE, why, why_len);
	if (!r)
		r = check_location(data, offsetof(struct tfs_disk_node_header, blocknr), blocknr,
				   why, why_len);
	if (r)
		return r;
	flags = tfs_le32(b + offsetof(struct tfs_disk_node_header, flags));
	nr = tfs_le32(b + offsetof(struct tfs_disk_node_header, nr_entries));
	max = tfs_le32(b + offsetof(struct tfs_disk_node_header, max_entries));
	vsize = tfs_le32(b + offsetof(struct tfs_disk_node_header, value_size));
	if (flags != TFS_BTREE_INTERNAL && flags != TFS_BTREE_LEAF) {
		snprintf(why, why_len, "unknown node type (flags %#x)", flags);
		return -EUCLEAN;
	}
	if (vsize == 0 || vsize > TFS_BLOCK_SIZE) {
		snprintf(why, why_len, "bad value_size %u", vsize);
		return -EUCLEAN;
	}
	if (flags == TFS_BTREE_INTERNAL && vsize != 8) {
		snprintf(why, why_len, "internal node with value_size %u", vsize);
		return -EUCLEAN;
	}
	if (max % 3) {
		snprintf(why, why_len, "bad max_entries %u for value_size %u", max, vsize);
		return -EUCLEAN;
	}
	return check_capacity(max, nr, vsize,
			      TFS_BTREE_HEADER_SIZE + (uint64_t)max * (8 + vsize), why, why_len);
}

static void btree_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_node_header, blocknr), blocknr, TFS_SALT_BTREE);
}

const struct tfs_block_validator tfs_btree_validator = {
	.name = "btree node",
	.check = btree_check,
	.prepare = btree_prepare,
};

/* ---- space map bitmaps ---- */

static int bitmap_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
			char *why, size_t why_len)
{
	int r;

	(void)v;
	r = check_csum(data, TFS_SALT_BITMAP, why, why_len);
	if (!r)
		r = check_location(data, offsetof(struct tfs_disk_bitmap_header, blocknr), blocknr,
				   why, why_len);
	return r;
}

static void bitmap_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_bitmap_header, blocknr), blocknr, TFS_SALT_BITMAP);
}

const struct tfs_block_validator tfs_bitmap_validator = {
	.name = "space map bitmap",
	.check = bitmap_check,
	.prepare = bitmap_prepare,
};

/* ---- metadata space map index block ---- */

static int index_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
		       char *why, size_t why_len)
{
	int r;

	(void)v;
	r = check_csum(data, TFS_SALT_INDEX, why, why_len);
	if (!r)
		r = check_location(data, offsetof(struct tfs_disk_metadata_index, blocknr), blocknr,
				   why, why_len);
	return r;
}

static void index_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_metadata_index, blocknr), blocknr, TFS_SALT_INDEX);
}

const struct tfs_block_validator tfs_index_validator = {
	.name = "space map index block",
	.check = index_check,
	.prepare = index_prepare,
};

/* ---- thin superblock ---- */

static int thin_sb_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
			 char *why, size_t why_len)
{
	int r;

	(void)v;
	r = check_sealed(data, TFS_SALT_THIN_SB, offsetof(struct tfs_disk_thin_sb, blocknr), blocknr,
			 why, why_len);
	return r ? r : check_magic(data, offsetof(struct tfs_disk_thin_sb, magic), TFS_THIN_MAGIC,
				   why, why_len);
}

static void thin_sb_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_thin_sb, blocknr), blocknr, TFS_SALT_THIN_SB);
}

const struct tfs_block_validator tfs_thin_sb_validator = {
	.name = "superblock",
	.check = thin_sb_check,
	.prepare = thin_sb_prepare,
};

/* ---- dm-array blocks ---- */

static int array_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
		       char *why, size_t why_len)
{
	const uint8_t *b = data;
	uint32_t max, nr, vsize;
	int r;

	(void)v;
	r = check_sealed(data, TFS_SALT_ARRAY, offsetof(struct tfs_disk_array_header, blocknr),
			 blocknr, why, why_len);
	if (r)
		return r;
	max = tfs_le32(b + offsetof(struct tfs_disk_array_header, max_entries));
	nr = tfs_le32(b + offsetof(struct tfs_disk_array_header, nr_entries));
	vsize = tfs_le32(b + offsetof(struct tfs_disk_array_header, value_size));
	if (vsize == 0 || vsize > TFS_BLOCK_SIZE - TFS_ARRAY_HEADER_SIZE) {
		snprintf(why, why_len, "bad value_size %u", vsize);
		return -EUCLEAN;
	}
	return check_capacity(max, nr, vsize, TFS_ARRAY_HEADER_SIZE + (uint64_t)max * vsize, why,
			      why_len);
}

static void array_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_array_header, blocknr), blocknr, TFS_SALT_ARRAY);
}

const struct tfs_block_validator tfs_array_validator = {
	.name = "array block",
	.check = array_check,
	.prepare = array_prepare,
};

/* ---- cache superblock ---- */

static int cache_sb_check(const struct tfs_block_validator *v, const void *data, uint64_t blocknr,
			  char *why, size_t why_len)
{
	int r;

	(void)v;
	r = check_sealed(data, TFS_SALT_CACHE_SB, offsetof(struct tfs_disk_cache_sb, blocknr),
			 blocknr, why, why_len);
	return r ? r : check_magic(data, offsetof(struct tfs_disk_cache_sb, magic), TFS_CACHE_MAGIC,
				   why, why_len);
}

static void cache_sb_prepare(const struct tfs_block_validator *v, void *data, uint64_t blocknr)
{
	(void)v;
	seal(data, offsetof(struct tfs_disk_cache_sb, blocknr), blocknr, TFS_SALT_CACHE_SB);
}

const struct tfs_block_validator tfs_cache_sb_validator = {
	.name = "cache superblock",
	.check = cache_sb_check,
	.prepare = cache_sb_prepare,
};
