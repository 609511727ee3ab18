/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * format.h - every on-disk structure of the dm-thin metadata format.
 *
 * Owns: the byte layouts, magic numbers, checksum salts and size limits of
 * the persistent-data layer, the thin-pool schema and the dm-cache schema
 * (docs/format.md and docs/cache-format.md tell the story in prose).  All multi-byte fields are little-endian on disk; use
 * the le helpers below, never host-order access to a struct field.
 *
 * Never: holds behaviour.  Nothing here reads or writes a device.
 */
#ifndef TFS_META_FORMAT_H
#define TFS_META_FORMAT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TFS_BLOCK_SIZE 4096u
#define TFS_SECTOR_SHIFT 9

/* Checksum salts, XORed into CRC32C_raw(block[4..4095]). */
#define TFS_SALT_THIN_SB 160774u
#define TFS_SALT_BTREE 121107u
#define TFS_SALT_BITMAP 240779u
#define TFS_SALT_INDEX 160478u

#define TFS_THIN_MAGIC 27022010ull
#define TFS_THIN_VERSION 2u
#define TFS_THIN_FLAG_NEEDS_CHECK 1u

/* Data block size in sectors: 64 KiB .. 1 GiB, multiple of 64 KiB. */
#define TFS_DATA_BLOCK_MIN_SECTORS 128u
#define TFS_DATA_BLOCK_MAX_SECTORS 2097152u

#define TFS_MAX_DEV_ID ((1u << 24) - 1)
#define TFS_TIME_MASK 0xFFFFFFu
#define TFS_MAX_DATA_BLOCK ((1ull << 40) - 1)

/* Bitmaps: 2 bits per entry after a 16-byte header. */
#define TFS_ENTRIES_PER_BITMAP 16320u
#define TFS_ENTRIES_PER_WORD 32u
#define TFS_BITMAP_WORDS 510u
/* The metadata space map index block holds 255 index entries. */
#define TFS_MAX_METADATA_BITMAPS 255u
#define TFS_MAX_METADATA_BLOCKS (TFS_MAX_METADATA_BITMAPS * TFS_ENTRIES_PER_BITMAP)

/* btree node flags */
#define TFS_BTREE_INTERNAL 1u
#define TFS_BTREE_LEAF 2u
#define TFS_BTREE_HEADER_SIZE 32u

static inline uint32_t tfs_le32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
	       (uint32_t)b[3] << 24;
}

static inline uint64_t tfs_le64(const void *p)
{
	const uint8_t *b = p;
	return (uint64_t)tfs_le32(b) | (uint64_t)tfs_le32(b + 4) << 32;
}

static inline void tfs_put_le32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
	b[2] = (uint8_t)(v >> 16);
	b[3] = (uint8_t)(v >> 24);
}

static inline void tfs_put_le64(void *p, uint64_t v)
{
	tfs_put_le32(p, (uint32_t)v);
	tfs_put_le32((uint8_t *)p + 4, (uint32_t)(v >> 32));
}

/*
 * The structs below document layouts and give offsets through offsetof.
 * Fields are stored little-endian; this code only runs on little-endian
 * hosts (checked in meson.build), but accessors go through tfs_le* anyway
 * so that unaligned access is never a question.
 */

/* Space map root, 32 bytes inside a 128-byte superblock field. */
struct tfs_disk_sm_root {
	uint64_t nr_blocks;
	uint64_t nr_allocated;
	uint64_t bitmap_root; /* metadata SM: index block; data SM: index btree root */
	uint64_t ref_count_root;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_sm_root) == 32, "sm root size");
#define TFS_SM_ROOT_FIELD 128u

/* Index entry, 16 bytes: one per bitmap. */
struct tfs_disk_index_entry {
	uint64_t blocknr;
	uint32_t nr_free;
	uint32_t none_free_before;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_index_entry) == 16, "index entry size");

/* Bitmap block header; 510 u64 words follow. */
struct tfs_disk_bitmap_header {
	uint32_t csum;
	uint32_t not_used;
	uint64_t blocknr;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_bitmap_header) == 16, "bitmap header");

/* Metadata space map index block: header then 255 index entries. */
struct tfs_disk_metadata_index {
	uint32_t csum;
	uint32_t padding;
	uint64_t blocknr;
	struct tfs_disk_index_entry index[TFS_MAX_METADATA_BITMAPS];
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_metadata_index) == TFS_BLOCK_SIZE, "index block");

/* btree node header; keys[max_entries] (u64) then values follow. */
struct tfs_disk_node_header {
	uint32_t csum;
	uint32_t flags;
	uint64_t blocknr;
	uint32_t nr_entries;
	uint32_t max_entries;
	uint32_t value_size;
	uint32_t padding;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_node_header) == TFS_BTREE_HEADER_SIZE, "node header");

/* Thin pool superblock, block 0; 364 bytes used. */
struct tfs_disk_thin_sb {
	uint32_t csum;
	uint32_t flags;
	uint64_t blocknr;
	uint8_t uuid[16];
	uint64_t magic;
	uint32_t version;
	uint32_t time;
	uint64_t trans_id;
	uint64_t held_root;
	uint8_t data_space_map_root[TFS_SM_ROOT_FIELD];
	uint8_t metadata_space_map_root[TFS_SM_ROOT_FIELD];
	uint64_t data_mapping_root;
	uint64_t device_details_root;
	uint32_t data_block_size;     /* sectors */
	uint32_t metadata_block_size; /* sectors, always 8 */
	uint64_t metadata_nr_blocks;
	uint32_t compat_flags;
	uint32_t compat_ro_flags;
	uint32_t incompat_flags;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_thin_sb) == 364, "thin superblock size");
_Static_assert(offsetof(struct tfs_disk_thin_sb, magic) == 32, "sb magic");
_Static_assert(offsetof(struct tfs_disk_thin_sb, held_root) == 56, "sb held_root");
_Static_assert(offsetof(struct tfs_disk_thin_sb, data_space_map_root) == 64, "sb data sm");
_Static_assert(offsetof(struct tfs_disk_thin_sb, metadata_space_map_root) == 192, "sb meta sm");
_Static_assert(offsetof(struct tfs_disk_thin_sb, data_mapping_root) == 320, "sb mapping root");
_Static_assert(offsetof(struct tfs_disk_thin_sb, data_block_size) == 336, "sb data block size");
_Static_assert(offsetof(struct tfs_disk_thin_sb, metadata_nr_blocks) == 344, "sb md nr blocks");

/* Device details value, 24 bytes. */
struct tfs_disk_device_details {
	uint64_t mapped_blocks;
	uint64_t transaction_id;
	uint32_t creation_time;
	uint32_t snapshotted_time;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_device_details) == 24, "device details size");

/* Level-1 mapping value: data block in the high 40 bits, time in the low 24. */
static inline uint64_t tfs_pack_block_time(uint64_t data_block, uint32_t time)
{
	return data_block << 24 | (time & TFS_TIME_MASK);
}

static inline void tfs_unpack_block_time(uint64_t v, uint64_t *data_block, uint32_t *time)
{
	*data_block = v >> 24;
	*time = (uint32_t)(v & TFS_TIME_MASK);
}

/* max_entries for a node whose values are value_size bytes. */
static inline uint32_t tfs_btree_max_entries(uint32_t value_size)
{
	uint32_t n = (TFS_BLOCK_SIZE - TFS_BTREE_HEADER_SIZE) / (8u + value_size);
	return n - n % 3u;
}

/* ---- dm-array blocks (persistent-data arrays; used by the cache schema) ---- */

#define TFS_SALT_ARRAY 595846735u

/* Array block header; value_size-byte values packed after it. */
struct tfs_disk_array_header {
	uint32_t csum;
	uint32_t max_entries;
	uint32_t nr_entries;
	uint32_t value_size;
	uint64_t blocknr;
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_array_header) == 24, "array block header");
#define TFS_ARRAY_HEADER_SIZE 24u

/* Values an array block of value_size-byte values holds (509 for 8, 1018 for 4). */
static inline uint32_t tfs_array_block_entries(uint32_t value_size)
{
	return (TFS_BLOCK_SIZE - TFS_ARRAY_HEADER_SIZE) / value_size;
}

/* ---- dm-cache schema ---- */

#define TFS_SALT_CACHE_SB 9031977u
#define TFS_CACHE_MAGIC 1623043ull /* octal 06142003 */
#define TFS_CACHE_VERSION_MIN 1u
#define TFS_CACHE_VERSION_MAX 2u

#define TFS_CACHE_FLAG_CLEAN_SHUTDOWN 1u
#define TFS_CACHE_FLAG_NEEDS_CHECK 2u

/* Mapping value: origin block << 16 | flags. DIRTY is used by version 1 only. */
#define TFS_CACHE_MAPPING_VALID 1u
#define TFS_CACHE_MAPPING_DIRTY 2u
#define TFS_CACHE_MAX_OBLOCK ((1ull << 48) - 1)

/* Cache block size in sectors: 32 KiB .. 1 GiB, multiple of 32 KiB. */
#define TFS_CACHE_BLOCK_MIN_SECTORS 64u
#define TFS_CACHE_BLOCK_MAX_SECTORS 2097152u

#define TFS_CACHE_POLICY_NAME_SIZE 16u
#define TFS_CACHE_MAX_HINT_SIZE 128u

/* Cache superblock, block 0; 292 bytes used (284 in version 1, which has no dirty_root). */
struct tfs_disk_cache_sb {
	uint32_t csum;
	uint32_t flags;
	uint64_t blocknr;
	uint8_t uuid[16];
	uint64_t magic;
	uint32_t version;
	uint8_t policy_name[TFS_CACHE_POLICY_NAME_SIZE];
	uint32_t policy_hint_size;
	uint8_t metadata_space_map_root[TFS_SM_ROOT_FIELD];
	uint64_t mapping_root;
	uint64_t hint_root;
	uint64_t discard_root;
	uint64_t discard_block_size; /* sectors */
	uint64_t discard_nr_blocks;
	uint32_t data_block_size;     /* sectors */
	uint32_t metadata_block_size; /* sectors, always 8 */
	uint32_t cache_blocks;
	uint32_t compat_flags;
	uint32_t compat_ro_flags;
	uint32_t incompat_flags;
	uint32_t read_hits;
	uint32_t read_misses;
	uint32_t write_hits;
	uint32_t write_misses;
	uint32_t policy_version[3];
	uint64_t dirty_root; /* version 2 only */
} __attribute__((packed));
_Static_assert(sizeof(struct tfs_disk_cache_sb) == 292, "cache superblock size");
_Static_assert(offsetof(struct tfs_disk_cache_sb, magic) == 32, "cache sb magic");
_Static_assert(offsetof(struct tfs_disk_cache_sb, policy_name) == 44, "cache sb policy name");
_Static_assert(offsetof(struct tfs_disk_cache_sb, policy_hint_size) == 60, "cache sb hint size");
_Static_assert(offsetof(struct tfs_disk_cache_sb, metadata_space_map_root) == 64, "cache sb sm");
_Static_assert(offsetof(struct tfs_disk_cache_sb, mapping_root) == 192, "cache sb mapping root");
_Static_assert(offsetof(struct tfs_disk_cache_sb, discard_block_size) == 216, "cache sb discard");
_Static_assert(offsetof(struct tfs_disk_cache_sb, data_block_size) == 232, "cache sb block size");
_Static_assert(offsetof(struct tfs_disk_cache_sb, cache_blocks) == 240, "cache sb cache blocks");
_Static_assert(offsetof(struct tfs_disk_cache_sb, read_hits) == 256, "cache sb stats");
_Static_assert(offsetof(struct tfs_disk_cache_sb, policy_version) == 272, "cache sb policy version");
_Static_assert(offsetof(struct tfs_disk_cache_sb, dirty_root) == 284, "cache sb dirty root");

#endif
