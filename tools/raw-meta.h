/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * raw-meta.h - an independent, read-only reader of dm-thin metadata for the
 * offline tools (check, dump).
 *
 * Owns: reading 4 KiB blocks straight from a backing device, decoding the
 * superblock, validating btree nodes structurally (checksum, location,
 * flags, sizes) and an in-order btree iterator that is safe on any input.
 *
 * Never: uses the block manager, btree or space-map code of src/meta.  The
 * checker must not share bugs with the code whose output it judges, so this
 * reader is written from docs/ondisk-formats.md alone.  Never writes.
 *
 * Nothing here logs: problems are returned as -errno plus a reason string,
 * and the caller decides how to report them.
 */
#ifndef TFS_TOOLS_RAW_META_H
#define TFS_TOOLS_RAW_META_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"

struct tfs_bdev;

/*
 * No btree handled by the tools is deeper than this.  A tree over 2^64 keys
 * with the minimum fill of a non-root node (84 entries) has height 11, so
 * deeper means a cycle or garbage; the limit also bounds recursion.
 */
#define TFS_RAW_MAX_DEPTH 16

#define TFS_RAW_WHY_LEN 160

/* Value sizes of the trees in a thin pool's metadata. */
#define TFS_RAW_VSIZE_U64 8u      /* mapping trees, internal nodes */
#define TFS_RAW_VSIZE_DETAILS 24u /* device details */
#define TFS_RAW_VSIZE_INDEX 16u   /* data space map index */
#define TFS_RAW_VSIZE_COUNT 4u    /* ref-count (overflow) trees */

struct tfs_raw_sm_root {
	uint64_t nr_blocks;
	uint64_t nr_allocated;
	uint64_t bitmap_root;
	uint64_t ref_count_root;
};

/* The thin superblock, decoded to host order. */
struct tfs_raw_sb {
	uint32_t csum;
	uint32_t flags;
	uint64_t blocknr;
	uint64_t magic;
	uint32_t version;
	uint32_t time;
	uint64_t trans_id;
	uint64_t held_root;
	struct tfs_raw_sm_root data_sm;
	struct tfs_raw_sm_root meta_sm;
	uint64_t mapping_root;
	uint64_t details_root;
	uint32_t data_block_size;
	uint32_t metadata_block_size;
	uint64_t metadata_nr_blocks;
	uint32_t compat_flags;
	uint32_t compat_ro_flags;
	uint32_t incompat_flags;
	bool sm_fields_zero; /* both 128-byte space-map root fields are all zero */
};

void tfs_raw_sb_decode(const void *block, struct tfs_raw_sb *out);

/* A metadata device opened for raw block reads. */
struct tfs_raw_dev {
	struct tfs_bdev *bdev;
	uint64_t nr_blocks; /* whole 4 KiB blocks on the device */
};

/* Reads the device size.  Returns 0 or -errno. */
int tfs_raw_dev_init(struct tfs_raw_dev *d, struct tfs_bdev *bdev);

/*
 * Read block b into buf (4096 bytes).  -ERANGE when b is past the end of
 * the device (the bdev would quietly return zeros), -EIO etc. from below.
 */
int tfs_raw_read(const struct tfs_raw_dev *d, uint64_t b, void *buf);

/* A validated btree node: a view into the caller's block buffer. */
struct tfs_raw_node {
	const uint8_t *data;
	uint64_t blocknr;
	uint32_t flags;
	uint32_t nr_entries;
	uint32_t max_entries;
	uint32_t value_size;
	bool max_unusual; /* fits and is a multiple of 3, but not the usual formula */
};

/*
 * Validate the node in block (read from location where) for a tree whose
 * leaves hold leaf_vsize-byte values: checksum, self location, exactly one
 * of INTERNAL/LEAF, value size (8 in internal nodes), max_entries fits the
 * block and is a multiple of 3, nr_entries <= max_entries.  Keys are not
 * looked at.  Returns 0, or -EUCLEAN with the reason in why.  O(block).
 */
int tfs_raw_node_check(const void *block, uint64_t where, uint32_t leaf_vsize,
		       struct tfs_raw_node *out, char *why, size_t why_len);

static inline bool tfs_raw_node_is_leaf(const struct tfs_raw_node *n)
{
	return n->flags == TFS_BTREE_LEAF;
}

static inline uint64_t tfs_raw_node_key(const struct tfs_raw_node *n, uint32_t i)
{
	return tfs_le64(n->data + TFS_BTREE_HEADER_SIZE + 8u * i);
}

static inline const uint8_t *tfs_raw_node_value(const struct tfs_raw_node *n, uint32_t i)
{
	return n->data + TFS_BTREE_HEADER_SIZE + 8u * n->max_entries + (size_t)n->value_size * i;
}

/* Non-root nodes must be at least a third full. */
static inline uint32_t tfs_raw_node_min_entries(const struct tfs_raw_node *n)
{
	return n->max_entries / 3u;
}

/* Bitmap and index blocks: checksum with the type's salt and self location. */
int tfs_raw_bitmap_check(const void *block, uint64_t where, char *why, size_t why_len);
int tfs_raw_index_check(const void *block, uint64_t where, char *why, size_t why_len);

/* Entry i (0..16319) of a space-map bitmap block: 0, 1, 2 or 3 (= look in the ref-count tree). */
static inline unsigned tfs_raw_bitmap_entry(const void *block, uint32_t i)
{
	const uint8_t *words = (const uint8_t *)block + sizeof(struct tfs_disk_bitmap_header);
	uint64_t w = tfs_le64(words + 8u * (i / TFS_ENTRIES_PER_WORD));
	unsigned shift = 2u * (i % TFS_ENTRIES_PER_WORD);
	/* The lower bit of the pair carries the value 2, the higher one 1. */
	return (unsigned)((w >> shift) & 1u) << 1 | (unsigned)((w >> (shift + 1)) & 1u);
}

/*
 * In-order iteration over the leaf entries of one (level of a) btree.
 *
 * Safe on any input: every node is validated when read, keys must rise
 * strictly across the whole walk and lie inside the range their parent
 * gives them, non-root nodes must be a third full, all leaves must sit at
 * one depth, and depth is limited.  Together these make every leaf
 * reachable at most once, so a cyclic or self-sharing "tree" ends in an
 * error instead of a loop.  Memory: TFS_RAW_MAX_DEPTH blocks (64 KiB),
 * heap-allocated by tfs_raw_iter_open.
 */
struct tfs_raw_iter;

/*
 * Position before the first entry with key >= start_key.  Returns 0,
 * -ENOMEM, or an error from reading the root (reason in tfs_raw_iter_why).
 * The iterator must be closed even after an error.
 */
int tfs_raw_iter_open(const struct tfs_raw_dev *d, uint64_t root, uint32_t leaf_vsize,
		      uint64_t start_key, struct tfs_raw_iter **out);
/*
 * Next entry: returns 1 with *key and *value (valid until the next call),
 * 0 at the end, or a negative errno (-EUCLEAN, -ERANGE, -EIO) with the
 * reason in tfs_raw_iter_why(); after an error it keeps returning it.
 * O(1) amortised, one block read per node entered.
 */
int tfs_raw_iter_next(struct tfs_raw_iter *it, uint64_t *key, const uint8_t **value);
const char *tfs_raw_iter_why(const struct tfs_raw_iter *it);
/* Block number where the last error was found (0 if none). */
uint64_t tfs_raw_iter_error_block(const struct tfs_raw_iter *it);
void tfs_raw_iter_close(struct tfs_raw_iter *it);

#endif
