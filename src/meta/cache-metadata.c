/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dm-cache schema on top of arrays, bitsets and the metadata space map.
 *
 * Versions 1 and 2 differ in one thing: where a block's dirty bit lives
 * (the mapping's DIRTY flag in 1, a bitset of its own in 2).  dirty_get and
 * dirty_set hide that; everything else is shared.
 */
#include "cache-metadata.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "array.h"
#include "bdev.h"
#include "bitset.h"
#include "block-manager.h"
#include "crc32c.h"
#include "log.h"
#include "space-map-metadata.h"
#include "space-map.h"
#include "transaction-manager.h"

#define SB_OFF(field) offsetof(struct tfs_disk_cache_sb, field)
#define KNOWN_FLAGS (TFS_CACHE_FLAG_CLEAN_SHUTDOWN | TFS_CACHE_FLAG_NEEDS_CHECK)
/* Hint size a superblock with policy_hint_size 0 but a hint array means (older tools). */
#define DEFAULT_HINT_SIZE 4u

struct tfs_cmd {
	struct tfs_bdev *meta;
	struct tfs_bm *bm;
	struct tfs_sm *msm;
	struct tfs_tm *tm;

	struct tfs_array_info mapping_info; /* u64 mapping values */
	struct tfs_array_info hint_info;    /* policy.hint_size bytes; unset for size 0 */
	struct tfs_bitset_info bitset_info; /* dirty (v2) and discard bitsets */

	/* Superblock fields of the current transaction. */
	uint32_t version;
	uint32_t flags; /* NEEDS_CHECK only; CLEAN_SHUTDOWN is the commit's argument */
	uint32_t block_sectors;
	uint32_t nr_cache_blocks;
	uint64_t mapping_root, hint_root, dirty_root, discard_root;
	uint64_t discard_block_sectors, discard_nr_blocks;
	struct tfs_cache_policy policy;
	struct tfs_cache_stats stats;

	bool read_only;
	bool clean_when_opened;
};

/* ---- checks ------------------------------------------------------------ */

static int check_block_size(uint32_t sectors)
{
	if (sectors < TFS_CACHE_BLOCK_MIN_SECTORS || sectors > TFS_CACHE_BLOCK_MAX_SECTORS ||
	    sectors % TFS_CACHE_BLOCK_MIN_SECTORS) {
		tfs_err("cache block size %u sectors is invalid: it must be a multiple of 32 KiB "
			"between 32 KiB and 1 GiB", sectors);
		return -EINVAL;
	}
	return 0;
}

static bool hint_size_ok(uint32_t size)
{
	return size % 4 == 0 && size <= TFS_CACHE_MAX_HINT_SIZE;
}

static int check_policy(const struct tfs_cache_policy *p)
{
	if (!memchr(p->name, 0, sizeof(p->name)) || !p->name[0]) {
		tfs_err("cache policy name must be 1 to %u characters",
			TFS_CACHE_POLICY_NAME_SIZE - 1);
		return -EINVAL;
	}
	if (!hint_size_ok(p->hint_size)) {
		tfs_err("cache policy hint size %u is invalid: a multiple of 4 up to %u",
			p->hint_size, TFS_CACHE_MAX_HINT_SIZE);
		return -EINVAL;
	}
	return 0;
}

/* Changes are refused read-only, and while the metadata is nearly full (see thin-metadata.c). */
static int may_change(struct tfs_cmd *cmd)
{
	uint64_t total = tfs_sm_nr_blocks(cmd->msm);
	uint64_t reserve = total / TFS_ENTRIES_PER_BITMAP + 1 + 64;

	if (cmd->read_only)
		return -EROFS;
	if (reserve > total / 4)
		reserve = total / 4;
	return tfs_sm_nr_free(cmd->msm) <= reserve ? -ENOSPC : 0;
}

static int check_cblock(struct tfs_cmd *cmd, uint32_t cblock)
{
	if (cblock < cmd->nr_cache_blocks)
		return 0;
	tfs_err("cache block %u is past the end of the cache (%u blocks)", cblock,
		cmd->nr_cache_blocks);
	return -EINVAL;
}

static bool has_hints(const struct tfs_cmd *cmd)
{
	return cmd->policy.hint_size > 0;
}

static void setup_infos(struct tfs_cmd *cmd)
{
	/* Value sizes are fixed or checked already, so these cannot fail. */
	tfs_array_info_init(&cmd->mapping_info, cmd->tm, 8);
	tfs_bitset_info_init(&cmd->bitset_info, cmd->tm);
	if (has_hints(cmd))
		tfs_array_info_init(&cmd->hint_info, cmd->tm, cmd->policy.hint_size);
}

/* ---- mapping values and dirty bits ------------------------------------- */

static uint64_t pack_mapping(uint64_t oblock, uint32_t flags)
{
	return oblock << 16 | flags;
}

static int get_mapping(struct tfs_cmd *cmd, uint32_t cblock, uint64_t *oblock, uint32_t *flags)
{
	uint8_t v[8];
	int r = tfs_array_get(&cmd->mapping_info, cmd->mapping_root, cblock, v);

	if (r == -ENODATA) {
		tfs_err("cache block %u is missing from the mapping array: corrupt metadata",
			cblock);
		r = -EUCLEAN;
	}
	if (!r) {
		*oblock = tfs_le64(v) >> 16;
		*flags = (uint32_t)(tfs_le64(v) & 0xffff);
	}
	return r;
}

static int put_mapping(struct tfs_cmd *cmd, uint32_t cblock, uint64_t oblock, uint32_t flags)
{
	uint8_t v[8];

	tfs_put_le64(v, pack_mapping(oblock, flags));
	return tfs_array_set(&cmd->mapping_info, cmd->mapping_root, cblock, v, &cmd->mapping_root);
}

/* The version 2 dirty bit (version 1 keeps it in the mapping's flags). */
static int dirty_bit_set(struct tfs_cmd *cmd, uint32_t cblock, bool dirty)
{
	return tfs_bitset_set(&cmd->bitset_info, cmd->dirty_root, cblock, dirty, &cmd->dirty_root);
}

static int is_dirty(struct tfs_cmd *cmd, uint32_t cblock, uint32_t flags, bool *dirty)
{
	if (cmd->version == 1) {
		*dirty = flags & TFS_CACHE_MAPPING_DIRTY;
		return 0;
	}
	return tfs_bitset_test(&cmd->bitset_info, cmd->dirty_root, cblock, dirty);
}

/* ---- superblock -------------------------------------------------------- */

static void fill_superblock(struct tfs_cmd *cmd, uint8_t *sb, bool clean_shutdown)
{
	uint32_t flags = cmd->flags & TFS_CACHE_FLAG_NEEDS_CHECK;

	if (clean_shutdown)
		flags |= TFS_CACHE_FLAG_CLEAN_SHUTDOWN;
	memset(sb + 4, 0, TFS_BLOCK_SIZE - 4);
	tfs_put_le32(sb + SB_OFF(flags), flags);
	tfs_put_le64(sb + SB_OFF(magic), TFS_CACHE_MAGIC);
	tfs_put_le32(sb + SB_OFF(version), cmd->version);
	memcpy(sb + SB_OFF(policy_name), cmd->policy.name, TFS_CACHE_POLICY_NAME_SIZE);
	tfs_put_le32(sb + SB_OFF(policy_hint_size), cmd->policy.hint_size);
	tfs_put_le64(sb + SB_OFF(mapping_root), cmd->mapping_root);
	tfs_put_le64(sb + SB_OFF(hint_root), cmd->hint_root);
	tfs_put_le64(sb + SB_OFF(discard_root), cmd->discard_root);
	tfs_put_le64(sb + SB_OFF(discard_block_size), cmd->discard_block_sectors);
	tfs_put_le64(sb + SB_OFF(discard_nr_blocks), cmd->discard_nr_blocks);
	tfs_put_le32(sb + SB_OFF(data_block_size), cmd->block_sectors);
	tfs_put_le32(sb + SB_OFF(metadata_block_size), 8);
	tfs_put_le32(sb + SB_OFF(cache_blocks), cmd->nr_cache_blocks);
	tfs_put_le32(sb + SB_OFF(read_hits), cmd->stats.read_hits);
	tfs_put_le32(sb + SB_OFF(read_misses), cmd->stats.read_misses);
	tfs_put_le32(sb + SB_OFF(write_hits), cmd->stats.write_hits);
	tfs_put_le32(sb + SB_OFF(write_misses), cmd->stats.write_misses);
	for (int i = 0; i < 3; i++)
		tfs_put_le32(sb + SB_OFF(policy_version) + 4 * i, cmd->policy.version[i]);
	if (cmd->version >= 2)
		tfs_put_le64(sb + SB_OFF(dirty_root), cmd->dirty_root);
}

static void fill_metadata_sm_root(void *ctx, void *sb_data)
{
	struct tfs_cmd *cmd = ctx;
	uint8_t *sb = sb_data;

	memset(sb + SB_OFF(metadata_space_map_root), 0, TFS_SM_ROOT_FIELD);
	tfs_sm_copy_root(cmd->msm, sb + SB_OFF(metadata_space_map_root));
}

static int commit(struct tfs_cmd *cmd, bool first, bool clean_shutdown)
{
	struct tfs_block *sb;
	int r;

	if (cmd->read_only)
		return -EROFS;
	/*
	 * The bitsets and arrays keep nothing in memory, so unlike the kernel
	 * there are no dirty or discard words to flush first: the superblock
	 * and the metadata space map are all that is left (transaction-manager.c
	 * has the order).
	 */
	if (first)
		r = tfs_bm_write_lock_zero(cmd->bm, 0, &tfs_cache_sb_validator, &sb);
	else
		r = tfs_bm_write_lock(cmd->bm, 0, &tfs_cache_sb_validator, &sb);
	if (r)
		return r;
	fill_superblock(cmd, tfs_block_data(sb), clean_shutdown);
	return tfs_tm_commit(cmd->tm, sb, fill_metadata_sm_root, cmd);
}

int tfs_cmd_commit(struct tfs_cmd *cmd, bool clean_shutdown)
{
	return commit(cmd, false, clean_shutdown);
}

/*
 * Flags written in place on the committed superblock, outside any
 * transaction: NEEDS_CHECK when the transaction can no longer be trusted,
 * and CLEAN_SHUTDOWN cleared at open.
 */
static int rewrite_flags(struct tfs_cmd *cmd, uint32_t set, uint32_t clear)
{
	uint8_t *sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	uint32_t flags;
	int r;

	if (!sb)
		return -ENOMEM;
	r = tfs_bdev_read(cmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (r)
		goto out;
	flags = (tfs_le32(sb + SB_OFF(flags)) | set) & ~clear;
	tfs_put_le32(sb + SB_OFF(flags), flags);
	tfs_put_le32(sb, tfs_block_csum(sb, TFS_SALT_CACHE_SB));
	tfs_bm_forget(cmd->bm, 0);
	r = tfs_bdev_write(cmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (!r)
		r = tfs_bdev_flush(cmd->meta);
out:
	if (r)
		tfs_err("%s: writing the cache superblock's flags failed: %s",
			tfs_bdev_name(cmd->meta), strerror(-r));
	free(sb);
	return r;
}

/* ---- open / format / close --------------------------------------------- */

static int alloc_cmd(struct tfs_bdev *meta, size_t bm_cache_blocks, bool read_only,
		     struct tfs_cmd **out)
{
	struct tfs_cmd *cmd = calloc(1, sizeof(*cmd));
	int r;

	if (!cmd)
		return -ENOMEM;
	cmd->meta = meta;
	cmd->read_only = read_only;
	r = tfs_bm_create(meta, bm_cache_blocks ? bm_cache_blocks : (size_t)TFS_BM_DEFAULT_CACHE_BLOCKS,
			  &cmd->bm);
	if (r) {
		free(cmd);
		return r;
	}
	*out = cmd;
	return 0;
}

static void drop_maps(struct tfs_cmd *cmd)
{
	tfs_tm_destroy(cmd->tm);
	tfs_sm_destroy(cmd->msm);
	cmd->tm = NULL;
	cmd->msm = NULL;
}

void tfs_cmd_close(struct tfs_cmd *cmd)
{
	if (!cmd)
		return;
	drop_maps(cmd);
	tfs_bm_destroy(cmd->bm);
	free(cmd);
}

/* An empty array or bitset of n entries. */
static int new_array(const struct tfs_array_info *info, uint64_t n, const void *fill,
		     uint64_t *root)
{
	int r = tfs_array_empty(info, root);

	return r ? r : tfs_array_resize(info, *root, 0, n, fill, root);
}

static int new_hints(struct tfs_cmd *cmd)
{
	uint8_t zero[TFS_CACHE_MAX_HINT_SIZE] = { 0 };

	cmd->hint_root = 0;
	if (!has_hints(cmd))
		return 0;
	return new_array(&cmd->hint_info, cmd->nr_cache_blocks, zero, &cmd->hint_root);
}

int tfs_cmd_format(struct tfs_bdev *meta, const struct tfs_cmd_format_options *opt,
		   struct tfs_cmd **out)
{
	uint8_t zero[8] = { 0 };
	uint64_t nr_blocks;
	struct tfs_cmd *cmd;
	int r;

	r = check_block_size(opt->block_sectors);
	if (!r)
		r = check_policy(&opt->policy);
	if (r)
		return r;
	if (opt->metadata_version < TFS_CACHE_VERSION_MIN ||
	    opt->metadata_version > TFS_CACHE_VERSION_MAX) {
		tfs_err("cache metadata version %u is unknown: it must be 1 or 2",
			opt->metadata_version);
		return -EINVAL;
	}
	r = alloc_cmd(meta, opt->bm_cache_blocks, false, &cmd);
	if (r)
		return r;
	cmd->version = opt->metadata_version;
	cmd->block_sectors = opt->block_sectors;
	cmd->nr_cache_blocks = opt->nr_cache_blocks;
	cmd->policy = opt->policy;
	cmd->clean_when_opened = true;
	nr_blocks = tfs_bm_nr_blocks(cmd->bm);
	if (nr_blocks > TFS_MAX_METADATA_BLOCKS) {
		tfs_warn("%s: metadata device has %llu blocks; only the first %u are used "
			 "(the format's maximum)", tfs_bdev_name(meta),
			 (unsigned long long)nr_blocks, TFS_MAX_METADATA_BLOCKS);
		nr_blocks = TFS_MAX_METADATA_BLOCKS;
	}
	if (nr_blocks < 16) {
		tfs_err("%s: cache metadata device too small (%llu blocks of 4 KiB)",
			tfs_bdev_name(meta), (unsigned long long)nr_blocks);
		r = -ENOSPC;
		goto err;
	}
	r = tfs_smm_create(cmd->bm, nr_blocks, 1, &cmd->msm);
	if (r)
		goto err;
	r = tfs_tm_create(cmd->bm, cmd->msm, &cmd->tm);
	if (r)
		goto err;
	tfs_smm_bind(cmd->msm, cmd->tm);
	setup_infos(cmd);
	r = new_array(&cmd->mapping_info, cmd->nr_cache_blocks, zero, &cmd->mapping_root);
	if (!r && cmd->version >= 2)
		r = tfs_bitset_empty(&cmd->bitset_info, &cmd->dirty_root);
	if (!r && cmd->version >= 2)
		r = tfs_bitset_resize(&cmd->bitset_info, cmd->dirty_root, 0, cmd->nr_cache_blocks,
				      false, &cmd->dirty_root);
	if (!r)
		r = new_hints(cmd);
	if (!r)
		r = tfs_bitset_empty(&cmd->bitset_info, &cmd->discard_root);
	if (!r)
		r = commit(cmd, true, true);
	if (r)
		goto err;
	*out = cmd;
	return 0;

err:
	tfs_cmd_close(cmd);
	return r;
}

static bool all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/* Read block 0 raw and refuse what we cannot or must not open, saying why. */
static int check_superblock(struct tfs_cmd *cmd, const struct tfs_cmd_open_options *opt,
			    uint8_t *sb)
{
	const char *name = tfs_bdev_name(cmd->meta);
	uint32_t v, hint_size;
	uint64_t u;
	int r;

	r = tfs_bdev_read(cmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (r) {
		tfs_err("%s: reading the cache superblock failed: %s", name, strerror(-r));
		return r;
	}
	if (all_zero(sb, TFS_BLOCK_SIZE)) {
		tfs_err("%s: no cache metadata here (block 0 is zero): format it first", name);
		return -EINVAL;
	}
	u = tfs_le64(sb + SB_OFF(magic));
	if (u != TFS_CACHE_MAGIC) {
		tfs_err("%s: not dm-cache metadata (superblock magic %llu, want %llu)", name,
			(unsigned long long)u, TFS_CACHE_MAGIC);
		return -EINVAL;
	}
	if (tfs_le32(sb) != tfs_block_csum(sb, TFS_SALT_CACHE_SB)) {
		tfs_err("%s: cache superblock checksum is wrong (stored %#x, computed %#x): "
			"the metadata is corrupt", name, tfs_le32(sb),
			tfs_block_csum(sb, TFS_SALT_CACHE_SB));
		return -EUCLEAN;
	}
	u = tfs_le64(sb + SB_OFF(blocknr));
	if (u != 0) {
		tfs_err("%s: cache superblock claims to be block %llu: the metadata is corrupt",
			name, (unsigned long long)u);
		return -EUCLEAN;
	}
	v = tfs_le32(sb + SB_OFF(version));
	if (v < TFS_CACHE_VERSION_MIN || v > TFS_CACHE_VERSION_MAX) {
		tfs_err("%s: unsupported cache metadata version %u (versions 1 and 2 are known)",
			name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + SB_OFF(flags));
	if (v & ~KNOWN_FLAGS) {
		tfs_err("%s: cache superblock has unknown flags %#x", name, v & ~KNOWN_FLAGS);
		return -EINVAL;
	}
	v = tfs_le32(sb + SB_OFF(incompat_flags));
	if (v) {
		tfs_err("%s: cache metadata uses unknown incompatible features (%#x)", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + SB_OFF(compat_ro_flags));
	if (v && !opt->read_only) {
		tfs_err("%s: cache metadata uses features (%#x) that allow only read-only use",
			name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + SB_OFF(metadata_block_size));
	if (v != 8) {
		tfs_err("%s: metadata block size %u sectors is not 8", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + SB_OFF(data_block_size));
	r = check_block_size(v);
	if (r)
		return r;
	if (opt->block_sectors && v != opt->block_sectors) {
		tfs_err("%s: cache metadata has block size %u sectors but %u was configured", name,
			v, opt->block_sectors);
		return -EINVAL;
	}
	if (!memchr(sb + SB_OFF(policy_name), 0, TFS_CACHE_POLICY_NAME_SIZE)) {
		tfs_err("%s: cache policy name is not terminated: the metadata is corrupt", name);
		return -EUCLEAN;
	}
	hint_size = tfs_le32(sb + SB_OFF(policy_hint_size));
	if (!hint_size_ok(hint_size)) {
		tfs_err("%s: cache policy hint size %u is invalid: the metadata is corrupt", name,
			hint_size);
		return -EUCLEAN;
	}
	if (!tfs_le64(sb + SB_OFF(mapping_root)) || !tfs_le64(sb + SB_OFF(discard_root)) ||
	    (tfs_le32(sb + SB_OFF(version)) >= 2 && !tfs_le64(sb + SB_OFF(dirty_root)))) {
		tfs_err("%s: cache superblock lacks a mapping, discard or dirty root: "
			"the metadata is corrupt", name);
		return -EUCLEAN;
	}
	return 0;
}

/*
 * Leaves a btree needs at least to index an array of n values of
 * per_block to a block (full leaves of 8-byte values).
 */
static uint64_t min_leaves(uint64_t n, uint32_t per_block)
{
	uint64_t blocks = (n + per_block - 1) / per_block;
	uint32_t per_leaf = tfs_btree_max_entries(8);

	return (blocks + per_leaf - 1) / per_leaf;
}

/*
 * Array lengths the metadata device could not hold are corruption, and
 * are refused before anything sizes a buffer by them.
 */
static int check_lengths(struct tfs_cmd *cmd)
{
	uint64_t blocks = tfs_sm_nr_blocks(cmd->msm);

	if (min_leaves(cmd->nr_cache_blocks, tfs_array_block_entries(8)) <= blocks &&
	    min_leaves(cmd->discard_nr_blocks, tfs_array_block_entries(8) * 64) <= blocks)
		return 0;
	tfs_err("%s: %u cache blocks or %llu discard blocks cannot fit a metadata device of "
		"%llu blocks: the metadata is corrupt", tfs_bdev_name(cmd->meta),
		cmd->nr_cache_blocks, (unsigned long long)cmd->discard_nr_blocks,
		(unsigned long long)blocks);
	return -EUCLEAN;
}

/* Load roots and the metadata space map from a checked superblock image. */
static int load(struct tfs_cmd *cmd, const uint8_t *sb)
{
	int r;

	cmd->version = tfs_le32(sb + SB_OFF(version));
	cmd->flags = tfs_le32(sb + SB_OFF(flags)) & TFS_CACHE_FLAG_NEEDS_CHECK;
	cmd->block_sectors = tfs_le32(sb + SB_OFF(data_block_size));
	cmd->nr_cache_blocks = tfs_le32(sb + SB_OFF(cache_blocks));
	cmd->mapping_root = tfs_le64(sb + SB_OFF(mapping_root));
	cmd->hint_root = tfs_le64(sb + SB_OFF(hint_root));
	cmd->discard_root = tfs_le64(sb + SB_OFF(discard_root));
	cmd->discard_block_sectors = tfs_le64(sb + SB_OFF(discard_block_size));
	cmd->discard_nr_blocks = tfs_le64(sb + SB_OFF(discard_nr_blocks));
	cmd->dirty_root = cmd->version >= 2 ? tfs_le64(sb + SB_OFF(dirty_root)) : 0;
	memset(&cmd->policy, 0, sizeof(cmd->policy));
	memcpy(cmd->policy.name, sb + SB_OFF(policy_name), TFS_CACHE_POLICY_NAME_SIZE);
	for (int i = 0; i < 3; i++)
		cmd->policy.version[i] = tfs_le32(sb + SB_OFF(policy_version) + 4 * i);
	/* Older tools store 0 for a 4-byte hint; the kernel stores the size. */
	cmd->policy.hint_size = tfs_le32(sb + SB_OFF(policy_hint_size));
	if (!cmd->policy.hint_size && cmd->hint_root)
		cmd->policy.hint_size = DEFAULT_HINT_SIZE;
	if (!cmd->policy.hint_size)
		cmd->hint_root = 0;
	cmd->stats = (struct tfs_cache_stats){
		.read_hits = tfs_le32(sb + SB_OFF(read_hits)),
		.read_misses = tfs_le32(sb + SB_OFF(read_misses)),
		.write_hits = tfs_le32(sb + SB_OFF(write_hits)),
		.write_misses = tfs_le32(sb + SB_OFF(write_misses)),
	};

	r = tfs_smm_open(cmd->bm, sb + SB_OFF(metadata_space_map_root), &cmd->msm);
	if (r)
		return r;
	r = check_lengths(cmd);
	if (r)
		return r;
	r = tfs_tm_create(cmd->bm, cmd->msm, &cmd->tm);
	if (r)
		return r;
	tfs_smm_bind(cmd->msm, cmd->tm);
	setup_infos(cmd);
	return 0;
}

static int note_mapped(void *ctx, uint64_t index, const void *value)
{
	uint64_t *mapped = ctx;

	if (tfs_le64(value) & TFS_CACHE_MAPPING_VALID)
		mapped[index / 64] |= 1ull << (index % 64);
	return 0;
}

static int copy_word(void *ctx, uint64_t index, const void *value)
{
	uint64_t *words = ctx;

	words[index] = tfs_le64(value);
	return 0;
}

/*
 * Version 2 dirty bits of unmapped blocks are cleared in the first
 * transaction: cache_restore 0.9.0 writes every bit set, the kernel assumes
 * them clear, and cache_check 1.x rejects them.  Whole words, so that this
 * costs one array set per word that needs it.
 */
static int clear_stray_dirty_bits(struct tfs_cmd *cmd)
{
	uint64_t nr_words = ((uint64_t)cmd->nr_cache_blocks + 63) / 64;
	uint64_t *mapped = calloc(nr_words + 1, sizeof(uint64_t));
	uint64_t *words = calloc(nr_words + 1, sizeof(uint64_t));
	int r = -ENOMEM;

	if (!mapped || !words)
		goto out;
	r = tfs_array_walk(&cmd->mapping_info, cmd->mapping_root, 0, cmd->nr_cache_blocks,
			   note_mapped, mapped);
	if (!r)
		r = tfs_array_walk(&cmd->bitset_info.array, cmd->dirty_root, 0, nr_words, copy_word,
				   words);
	for (uint64_t w = 0; w < nr_words && !r; w++) {
		uint8_t v[8];
		if (!(words[w] & ~mapped[w]))
			continue;
		tfs_put_le64(v, words[w] & mapped[w]);
		r = tfs_array_set(&cmd->bitset_info.array, cmd->dirty_root, w, v, &cmd->dirty_root);
	}
out:
	free(mapped);
	free(words);
	return r;
}

int tfs_cmd_open(struct tfs_bdev *meta, const struct tfs_cmd_open_options *opt,
		 struct tfs_cmd **out)
{
	struct tfs_cmd *cmd;
	uint8_t *sb;
	int r;

	sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	if (!sb)
		return -ENOMEM;
	r = alloc_cmd(meta, opt->bm_cache_blocks, opt->read_only, &cmd);
	if (r)
		goto out_free_sb;
	r = check_superblock(cmd, opt, sb);
	if (!r)
		r = load(cmd, sb);
	if (!r) {
		cmd->clean_when_opened = tfs_le32(sb + SB_OFF(flags)) & TFS_CACHE_FLAG_CLEAN_SHUTDOWN;
		/* From here a crash must be seen as unclean by the next open. */
		if (!opt->read_only && cmd->clean_when_opened)
			r = rewrite_flags(cmd, 0, TFS_CACHE_FLAG_CLEAN_SHUTDOWN);
		if (!r && !opt->read_only && cmd->version >= 2)
			r = clear_stray_dirty_bits(cmd);
	}
	if (r) {
		tfs_cmd_close(cmd);
		goto out_free_sb;
	}
	*out = cmd;
out_free_sb:
	free(sb);
	return r;
}

/* After a failed abort only tfs_cmd_close is safe: the maps could not be reloaded. */
int tfs_cmd_abort(struct tfs_cmd *cmd)
{
	struct tfs_cmd_open_options opt = { .read_only = true };
	uint8_t *sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	int r;

	if (!sb)
		return -ENOMEM;
	tfs_tm_abort(cmd->tm);
	/* As in tfs_pmd_abort: a commit that failed late has moved the map past the disk. */
	drop_maps(cmd);
	r = check_superblock(cmd, &opt, sb);
	if (!r)
		r = load(cmd, sb);
	free(sb);
	return r;
}

/* ---- superblock fields ------------------------------------------------- */

bool tfs_cmd_needs_check(struct tfs_cmd *cmd)
{
	return cmd->flags & TFS_CACHE_FLAG_NEEDS_CHECK;
}

int tfs_cmd_set_needs_check(struct tfs_cmd *cmd, bool on)
{
	int r;

	if (cmd->read_only)
		return -EROFS;
	r = on ? rewrite_flags(cmd, TFS_CACHE_FLAG_NEEDS_CHECK, 0)
	       : rewrite_flags(cmd, 0, TFS_CACHE_FLAG_NEEDS_CHECK);
	if (!r)
		cmd->flags = on ? cmd->flags | TFS_CACHE_FLAG_NEEDS_CHECK
				: cmd->flags & ~TFS_CACHE_FLAG_NEEDS_CHECK;
	return r;
}

bool tfs_cmd_clean_when_opened(struct tfs_cmd *cmd)
{
	return cmd->clean_when_opened;
}

void tfs_cmd_info(struct tfs_cmd *cmd, struct tfs_cmd_info *out)
{
	*out = (struct tfs_cmd_info){
		.version = cmd->version,
		.block_sectors = cmd->block_sectors,
		.nr_cache_blocks = cmd->nr_cache_blocks,
		.discard_block_sectors = cmd->discard_block_sectors,
		.discard_nr_blocks = cmd->discard_nr_blocks,
		.policy = cmd->policy,
		.meta_total = tfs_sm_nr_blocks(cmd->msm),
		.meta_free = tfs_sm_nr_free(cmd->msm),
	};
}

void tfs_cmd_get_stats(struct tfs_cmd *cmd, struct tfs_cache_stats *out)
{
	*out = cmd->stats;
}

int tfs_cmd_set_stats(struct tfs_cmd *cmd, const struct tfs_cache_stats *in)
{
	if (cmd->read_only)
		return -EROFS;
	cmd->stats = *in;
	return 0;
}

/* ---- mappings ---------------------------------------------------------- */

int tfs_cmd_lookup(struct tfs_cmd *cmd, uint32_t cblock, struct tfs_cache_mapping *out)
{
	uint64_t oblock;
	uint32_t flags;
	bool dirty;
	int r;

	r = check_cblock(cmd, cblock);
	if (!r)
		r = get_mapping(cmd, cblock, &oblock, &flags);
	if (r)
		return r;
	if (!(flags & TFS_CACHE_MAPPING_VALID))
		return -ENODATA;
	r = is_dirty(cmd, cblock, flags, &dirty);
	if (!r)
		*out = (struct tfs_cache_mapping){ .oblock = oblock, .dirty = dirty };
	return r;
}

int tfs_cmd_insert(struct tfs_cmd *cmd, uint32_t cblock, uint64_t oblock)
{
	int r;

	r = may_change(cmd);
	if (!r)
		r = check_cblock(cmd, cblock);
	if (r)
		return r;
	if (oblock > TFS_CACHE_MAX_OBLOCK) {
		tfs_err("origin block %llu is beyond the format's 48-bit limit",
			(unsigned long long)oblock);
		return -EINVAL;
	}
	r = put_mapping(cmd, cblock, oblock, TFS_CACHE_MAPPING_VALID);
	if (!r && cmd->version >= 2)
		r = dirty_bit_set(cmd, cblock, false);
	return r;
}

int tfs_cmd_remove(struct tfs_cmd *cmd, uint32_t cblock)
{
	struct tfs_cache_mapping m;
	int r;

	/* No space check: removing shadows a handful of blocks and is how a full cache recovers. */
	if (cmd->read_only)
		return -EROFS;
	r = tfs_cmd_lookup(cmd, cblock, &m);
	if (r)
		return r;
	r = put_mapping(cmd, cblock, 0, 0);
	if (!r && cmd->version >= 2)
		r = dirty_bit_set(cmd, cblock, false);
	return r;
}

int tfs_cmd_set_dirty(struct tfs_cmd *cmd, uint32_t cblock, bool dirty)
{
	struct tfs_cache_mapping m;
	int r;

	r = may_change(cmd);
	if (!r)
		r = tfs_cmd_lookup(cmd, cblock, &m);
	if (r)
		return r;
	if (m.dirty == dirty)
		return 0;
	if (cmd->version == 1)
		return put_mapping(cmd, cblock, m.oblock,
				   TFS_CACHE_MAPPING_VALID | (dirty ? TFS_CACHE_MAPPING_DIRTY : 0));
	return dirty_bit_set(cmd, cblock, dirty);
}

struct load_ctx {
	struct tfs_cmd *cmd;
	uint64_t *dirty_words; /* version 2: the dirty bitset, read once */
	bool hints;
	uint8_t hint[TFS_CACHE_MAX_HINT_SIZE];
	tfs_cmd_load_fn fn;
	void *ctx;
};

static int load_dirty_bit(void *ctx, uint64_t bit, bool on)
{
	uint64_t *words = ctx;

	if (on)
		words[bit / 64] |= 1ull << (bit % 64);
	return 0;
}

static int load_one(void *ctx, uint64_t index, const void *value)
{
	struct load_ctx *l = ctx;
	struct tfs_cmd *cmd = l->cmd;
	uint64_t v = tfs_le64(value);
	uint32_t cblock = (uint32_t)index;
	bool dirty;
	int r;

	if (!(v & TFS_CACHE_MAPPING_VALID))
		return 0;
	if (cmd->version == 1)
		dirty = v & TFS_CACHE_MAPPING_DIRTY;
	else
		dirty = l->dirty_words[index / 64] >> (index % 64) & 1;
	if (!cmd->clean_when_opened)
		dirty = true;
	if (l->hints) {
		r = tfs_array_get(&cmd->hint_info, cmd->hint_root, cblock, l->hint);
		if (r == -ENODATA) {
			tfs_err("cache block %u is missing from the hint array: corrupt metadata",
				cblock);
			r = -EUCLEAN;
		}
		if (r)
			return r;
	}
	return l->fn(l->ctx, cblock, v >> 16, dirty, l->hints ? l->hint : NULL);
}

static bool hints_usable(struct tfs_cmd *cmd, const struct tfs_cache_policy *p)
{
	return p && cmd->clean_when_opened && cmd->hint_root && has_hints(cmd) &&
	       strncmp(p->name, cmd->policy.name, TFS_CACHE_POLICY_NAME_SIZE) == 0 &&
	       p->version[0] == cmd->policy.version[0] && p->hint_size == cmd->policy.hint_size;
}

int tfs_cmd_load_mappings(struct tfs_cmd *cmd, const struct tfs_cache_policy *policy,
			  tfs_cmd_load_fn fn, void *ctx)
{
	struct load_ctx l = { .cmd = cmd, .hints = hints_usable(cmd, policy), .fn = fn, .ctx = ctx };
	int r = 0;

	if (cmd->version >= 2) {
		l.dirty_words = calloc((cmd->nr_cache_blocks + 63) / 64 + 1, sizeof(uint64_t));
		if (!l.dirty_words)
			return -ENOMEM;
		r = tfs_bitset_walk(&cmd->bitset_info, cmd->dirty_root, cmd->nr_cache_blocks,
				    load_dirty_bit, l.dirty_words);
	}
	if (!r)
		r = tfs_array_walk(&cmd->mapping_info, cmd->mapping_root, 0, cmd->nr_cache_blocks,
				   load_one, &l);
	free(l.dirty_words);
	return r;
}

/* ---- policy and hints -------------------------------------------------- */

int tfs_cmd_set_policy(struct tfs_cmd *cmd, const struct tfs_cache_policy *policy)
{
	bool same;
	int r;

	r = may_change(cmd);
	if (!r)
		r = check_policy(policy);
	if (r)
		return r;
	same = strncmp(policy->name, cmd->policy.name, TFS_CACHE_POLICY_NAME_SIZE) == 0 &&
	       policy->version[0] == cmd->policy.version[0] &&
	       policy->hint_size == cmd->policy.hint_size;
	if (!same && cmd->hint_root) {
		r = tfs_array_del(&cmd->hint_info, cmd->hint_root);
		if (r)
			return r;
		cmd->hint_root = 0;
	}
	cmd->policy = *policy;
	if (same && (cmd->hint_root || !has_hints(cmd)))
		return 0;
	setup_infos(cmd);
	return new_hints(cmd);
}

static int check_hint_call(struct tfs_cmd *cmd, uint32_t cblock)
{
	if (!has_hints(cmd) || !cmd->hint_root) {
		tfs_err("cache policy %s keeps no hints", cmd->policy.name);
		return -EINVAL;
	}
	return check_cblock(cmd, cblock);
}

int tfs_cmd_set_hint(struct tfs_cmd *cmd, uint32_t cblock, const void *hint)
{
	int r = may_change(cmd);

	if (!r)
		r = check_hint_call(cmd, cblock);
	return r ? r : tfs_array_set(&cmd->hint_info, cmd->hint_root, cblock, hint, &cmd->hint_root);
}

int tfs_cmd_get_hint(struct tfs_cmd *cmd, uint32_t cblock, void *hint)
{
	int r = check_hint_call(cmd, cblock);

	return r ? r : tfs_array_get(&cmd->hint_info, cmd->hint_root, cblock, hint);
}

/* ---- size -------------------------------------------------------------- */

struct dirty_scan {
	struct tfs_cmd *cmd;
	uint32_t first_dirty;
};

static int find_dirty(void *ctx, uint64_t index, const void *value)
{
	struct dirty_scan *s = ctx;
	uint64_t v = tfs_le64(value);
	bool dirty;
	int r;

	if (!(v & TFS_CACHE_MAPPING_VALID))
		return 0;
	r = is_dirty(s->cmd, (uint32_t)index, (uint32_t)(v & 0xffff), &dirty);
	if (r)
		return r;
	if (!dirty)
		return 0;
	s->first_dirty = (uint32_t)index;
	return 1;
}

int tfs_cmd_resize(struct tfs_cmd *cmd, uint32_t nr_cache_blocks, uint32_t *dirty_cblock)
{
	uint8_t zero[TFS_CACHE_MAX_HINT_SIZE] = { 0 };
	uint32_t old = cmd->nr_cache_blocks;
	int r;

	r = may_change(cmd);
	if (r)
		return r;
	if (nr_cache_blocks < old) {
		struct dirty_scan s = { cmd, 0 };
		r = tfs_array_walk(&cmd->mapping_info, cmd->mapping_root, nr_cache_blocks, old,
				   find_dirty, &s);
		if (r == 1) {
			if (dirty_cblock)
				*dirty_cblock = s.first_dirty;
			tfs_err("cannot shrink the cache to %u blocks: cache block %u is dirty "
				"(write it back first)", nr_cache_blocks, s.first_dirty);
			return -EINVAL;
		}
		if (r)
			return r;
	}
	r = tfs_array_resize(&cmd->mapping_info, cmd->mapping_root, old, nr_cache_blocks, zero,
			     &cmd->mapping_root);
	if (!r && cmd->version >= 2)
		r = tfs_bitset_resize(&cmd->bitset_info, cmd->dirty_root, old, nr_cache_blocks, false,
				      &cmd->dirty_root);
	if (!r && cmd->hint_root)
		r = tfs_array_resize(&cmd->hint_info, cmd->hint_root, old, nr_cache_blocks, zero,
				     &cmd->hint_root);
	if (!r)
		cmd->nr_cache_blocks = nr_cache_blocks;
	return r;
}

/* ---- discards ---------------------------------------------------------- */

int tfs_cmd_resize_discard(struct tfs_cmd *cmd, uint64_t block_sectors, uint64_t nr_blocks)
{
	uint64_t old = cmd->discard_nr_blocks;
	int r;

	r = may_change(cmd);
	if (r)
		return r;
	if (nr_blocks && !block_sectors) {
		tfs_err("a discard block size of 0 sectors is invalid");
		return -EINVAL;
	}
	/* Bits of another block size describe other ranges: forgetting a discard is always safe. */
	if (block_sectors != cmd->discard_block_sectors && old) {
		r = tfs_bitset_resize(&cmd->bitset_info, cmd->discard_root, old, 0, false,
				      &cmd->discard_root);
		if (r)
			return r;
		old = 0;
	}
	r = tfs_bitset_resize(&cmd->bitset_info, cmd->discard_root, old, nr_blocks, false,
			      &cmd->discard_root);
	if (r)
		return r;
	cmd->discard_block_sectors = block_sectors;
	cmd->discard_nr_blocks = nr_blocks;
	return 0;
}

static int check_dblock(struct tfs_cmd *cmd, uint64_t dblock)
{
	if (dblock < cmd->discard_nr_blocks)
		return 0;
	tfs_err("discard block %llu is past the end of the discard bitset (%llu blocks)",
		(unsigned long long)dblock, (unsigned long long)cmd->discard_nr_blocks);
	return -EINVAL;
}

int tfs_cmd_set_discard(struct tfs_cmd *cmd, uint64_t dblock, bool discarded)
{
	int r = may_change(cmd);

	if (!r)
		r = check_dblock(cmd, dblock);
	return r ? r : tfs_bitset_set(&cmd->bitset_info, cmd->discard_root, dblock, discarded,
				      &cmd->discard_root);
}

int tfs_cmd_test_discard(struct tfs_cmd *cmd, uint64_t dblock, bool *discarded)
{
	int r = check_dblock(cmd, dblock);

	return r ? r : tfs_bitset_test(&cmd->bitset_info, cmd->discard_root, dblock, discarded);
}

struct discard_ctx {
	bool trust;
	tfs_cmd_discard_fn fn;
	void *ctx;
};

static int load_discard(void *ctx, uint64_t bit, bool on)
{
	struct discard_ctx *d = ctx;

	return d->fn(d->ctx, bit, on && d->trust);
}

int tfs_cmd_load_discards(struct tfs_cmd *cmd, tfs_cmd_discard_fn fn, void *ctx)
{
	struct discard_ctx d = { cmd->clean_when_opened, fn, ctx };

	return tfs_bitset_walk(&cmd->bitset_info, cmd->discard_root, cmd->discard_nr_blocks,
			       load_discard, &d);
}
