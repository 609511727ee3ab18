/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The thin-pool schema on top of the btrees and space maps.
 *
 * Per-device details that change on every mapping (mapped_blocks) live in
 * the open device handle and reach the details tree at commit or close,
 * so a write costs one btree insert, not two.
 */
#include "thin-metadata.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "block-manager.h"
#include "btree.h"
#include "crc32c.h"
#include "format.h"
#include "log.h"
#include "space-map-disk.h"
#include "space-map-metadata.h"
#include "space-map.h"
#include "transaction-manager.h"

struct tfs_td {
	struct tfs_pmd *pmd;
	tfs_dev_id id;
	struct tfs_thin_details details;
	bool changed; /* details differ from the details tree */
	bool deleted; /* the device vanished in an abort; every call fails */
	struct tfs_td *next;
};

struct tfs_pmd {
	struct tfs_bdev *meta;
	struct tfs_bm *bm;
	struct tfs_sm *msm;
	struct tfs_tm *tm;
	struct tfs_sm *dsm;

	struct tfs_btree_info map_info;     /* dev id -> vblock -> block_time */
	struct tfs_btree_info tl_info;      /* dev id -> device tree root */
	struct tfs_btree_info bl_info;      /* vblock -> block_time (one device) */
	struct tfs_btree_info details_info; /* dev id -> details */

	/* Superblock fields of the current transaction. */
	uint64_t mapping_root;
	uint64_t details_root;
	uint64_t trans_id;
	uint64_t held_root;
	uint64_t metadata_nr_blocks;
	uint32_t time;
	uint32_t flags;
	uint32_t data_block_sectors;

	bool read_only;
	struct tfs_td *tds; /* open device handles */
	uint64_t commits;   /* commits done since open, and aborts: a diff's hold needs them */
	uint64_t aborts;
};

/* ---- value types ------------------------------------------------------- */

static int data_inc(void *ctx, const void *value)
{
	struct tfs_pmd *pmd = ctx;
	return tfs_sm_inc(pmd->dsm, tfs_le64(value) >> 24);
}

static int data_dec(void *ctx, const void *value)
{
	struct tfs_pmd *pmd = ctx;
	return tfs_sm_dec(pmd->dsm, tfs_le64(value) >> 24);
}

static int subtree_inc(void *ctx, const void *value)
{
	struct tfs_pmd *pmd = ctx;
	return tfs_tm_inc(pmd->tm, tfs_le64(value));
}

static int subtree_dec(void *ctx, const void *value)
{
	struct tfs_pmd *pmd = ctx;
	return tfs_btree_del(&pmd->bl_info, tfs_le64(value));
}

static void setup_infos(struct tfs_pmd *pmd)
{
	/*
	 * No equal() for mappings: an overwrite always releases the old data
	 * block, because the caller already holds a reference for the new one,
	 * even when it is the same block.
	 */
	struct tfs_btree_value_type block_time = {
		.context = pmd, .size = 8, .inc = data_inc, .dec = data_dec, .equal = NULL,
	};

	pmd->map_info = (struct tfs_btree_info){ .tm = pmd->tm, .levels = 2, .value_type = block_time };
	pmd->bl_info = (struct tfs_btree_info){ .tm = pmd->tm, .levels = 1, .value_type = block_time };
	pmd->tl_info = (struct tfs_btree_info){
		.tm = pmd->tm, .levels = 1,
		.value_type = { .context = pmd, .size = 8, .inc = subtree_inc, .dec = subtree_dec },
	};
	pmd->details_info = (struct tfs_btree_info){
		.tm = pmd->tm, .levels = 1,
		.value_type = { .context = pmd, .size = sizeof(struct tfs_disk_device_details) },
	};
}

/* ---- details ----------------------------------------------------------- */

static void pack_details(const struct tfs_thin_details *d, uint8_t out[24])
{
	tfs_put_le64(out, d->mapped_blocks);
	tfs_put_le64(out + 8, d->transaction_id);
	tfs_put_le32(out + 16, d->creation_time);
	tfs_put_le32(out + 20, d->snapshotted_time);
}

static void unpack_details(const uint8_t in[24], struct tfs_thin_details *d)
{
	d->mapped_blocks = tfs_le64(in);
	d->transaction_id = tfs_le64(in + 8);
	d->creation_time = tfs_le32(in + 16);
	d->snapshotted_time = tfs_le32(in + 20);
}

static struct tfs_td *find_td(struct tfs_pmd *pmd, tfs_dev_id id)
{
	for (struct tfs_td *td = pmd->tds; td; td = td->next)
		if (td->id == id && !td->deleted)
			return td;
	return NULL;
}

static int read_details(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_thin_details *d)
{
	uint64_t key = id;
	uint8_t v[24];
	int r = tfs_btree_lookup(&pmd->details_info, pmd->details_root, &key, v);

	if (!r)
		unpack_details(v, d);
	return r;
}

static int write_details(struct tfs_pmd *pmd, tfs_dev_id id, const struct tfs_thin_details *d)
{
	uint64_t key = id;
	uint8_t v[24];

	pack_details(d, v);
	return tfs_btree_insert(&pmd->details_info, pmd->details_root, &key, v, &pmd->details_root,
				NULL);
}

/* Details as of now: an open handle's in-memory copy wins over the tree. */
static int get_details(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_thin_details *d)
{
	struct tfs_td *td = find_td(pmd, id);

	if (td) {
		*d = td->details;
		return 0;
	}
	return read_details(pmd, id, d);
}

static int set_details(struct tfs_pmd *pmd, tfs_dev_id id, const struct tfs_thin_details *d)
{
	struct tfs_td *td = find_td(pmd, id);

	if (td) {
		td->details = *d;
		td->changed = true;
		return 0;
	}
	return write_details(pmd, id, d);
}

static int flush_details(struct tfs_pmd *pmd)
{
	for (struct tfs_td *td = pmd->tds; td; td = td->next) {
		if (!td->changed || td->deleted)
			continue;
		int r = write_details(pmd, td->id, &td->details);
		if (r)
			return r;
		td->changed = false;
	}
	return 0;
}

/* ---- superblock -------------------------------------------------------- */

static int check_data_block_size(uint32_t sectors)
{
	if (sectors < TFS_DATA_BLOCK_MIN_SECTORS || sectors > TFS_DATA_BLOCK_MAX_SECTORS ||
	    sectors % TFS_DATA_BLOCK_MIN_SECTORS) {
		tfs_err("data block size %u sectors (%llu bytes) is invalid: it must be a multiple "
			"of 64 KiB between 64 KiB and 1 GiB", sectors,
			(unsigned long long)sectors << TFS_SECTOR_SHIFT);
		return -EINVAL;
	}
	return 0;
}

static void fill_superblock(struct tfs_pmd *pmd, uint8_t *sb)
{
	uint8_t root[32];

	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, flags), pmd->flags);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, magic), TFS_THIN_MAGIC);
	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, version), TFS_THIN_VERSION);
	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, time), pmd->time);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, trans_id), pmd->trans_id);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, held_root), pmd->held_root);
	memset(sb + offsetof(struct tfs_disk_thin_sb, data_space_map_root), 0, TFS_SM_ROOT_FIELD);
	tfs_sm_copy_root(pmd->dsm, root);
	memcpy(sb + offsetof(struct tfs_disk_thin_sb, data_space_map_root), root, sizeof(root));
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, data_mapping_root), pmd->mapping_root);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, device_details_root), pmd->details_root);
	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, data_block_size), pmd->data_block_sectors);
	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, metadata_block_size), 8);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, metadata_nr_blocks), pmd->metadata_nr_blocks);
}

static void fill_metadata_sm_root(void *ctx, void *sb_data)
{
	struct tfs_pmd *pmd = ctx;
	uint8_t *sb = sb_data;
	uint8_t root[32];

	memset(sb + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root), 0, TFS_SM_ROOT_FIELD);
	tfs_sm_copy_root(pmd->msm, root);
	memcpy(sb + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root), root, sizeof(root));
}

/* What the metadata layer keeps of a commit between its begin and its end. */
struct tfs_pmd_commit {
	struct tfs_tm_commit *tm;
};

static int commit_begin(struct tfs_pmd *pmd, bool first, struct tfs_pmd_commit **out)
{
	struct tfs_pmd_commit *c;
	struct tfs_block *sb;
	int r;

	if (pmd->read_only)
		return -EROFS;
	r = flush_details(pmd);
	if (r)
		return r;
	r = tfs_sm_commit(pmd->dsm);
	if (r)
		return r;
	if (first)
		r = tfs_bm_write_lock_zero(pmd->bm, 0, &tfs_thin_sb_validator, &sb);
	else
		r = tfs_bm_write_lock(pmd->bm, 0, &tfs_thin_sb_validator, &sb);
	if (r)
		return r;
	fill_superblock(pmd, tfs_block_data(sb));
	c = malloc(sizeof(*c));
	if (!c) {
		tfs_bm_unlock(sb);
		return -ENOMEM;
	}
	r = tfs_tm_commit_begin(pmd->tm, sb, fill_metadata_sm_root, pmd, &c->tm);
	if (r) {
		free(c);
		return r;
	}
	*out = c;
	return 0;
}

int tfs_pmd_commit_begin(struct tfs_pmd *pmd, struct tfs_pmd_commit **out)
{
	return commit_begin(pmd, false, out);
}

int tfs_pmd_commit_write(struct tfs_pmd_commit *c)
{
	return tfs_tm_commit_write(c->tm);
}

int tfs_pmd_commit_write_blocks(struct tfs_pmd_commit *c)
{
	return tfs_tm_commit_write_blocks(c->tm);
}

int tfs_pmd_commit_write_super(struct tfs_pmd_commit *c)
{
	return tfs_tm_commit_write_super(c->tm);
}

int tfs_pmd_commit_end(struct tfs_pmd *pmd, struct tfs_pmd_commit *c, int r)
{
	r = tfs_tm_commit_end(pmd->tm, c->tm, r);
	free(c);
	if (!r)
		pmd->commits++;
	return r;
}

void tfs_pmd_release_freed_data(struct tfs_pmd *pmd)
{
	if (pmd->dsm)
		tfs_sm_commit_durable(pmd->dsm);
}

static int commit(struct tfs_pmd *pmd, bool first)
{
	struct tfs_pmd_commit *c;
	int r = commit_begin(pmd, first, &c);

	if (!r)
		r = tfs_pmd_commit_end(pmd, c, tfs_pmd_commit_write(c));
	if (!r)
		tfs_pmd_release_freed_data(pmd);
	return r;
}

int tfs_pmd_commit(struct tfs_pmd *pmd)
{
	return commit(pmd, false);
}

/* ---- open / format / close -------------------------------------------- */

static int alloc_pmd(struct tfs_bdev *meta, const struct tfs_pmd_options *opt, struct tfs_pmd **out)
{
	struct tfs_pmd *pmd = calloc(1, sizeof(*pmd));
	int r;

	if (!pmd)
		return -ENOMEM;
	pmd->meta = meta;
	pmd->read_only = opt->read_only;
	r = tfs_bm_create(meta, opt->cache_blocks ? opt->cache_blocks : (size_t)TFS_BM_DEFAULT_CACHE_BLOCKS,
			  &pmd->bm);
	if (r) {
		free(pmd);
		return r;
	}
	*out = pmd;
	return 0;
}

static void free_pmd(struct tfs_pmd *pmd)
{
	while (pmd->tds) {
		struct tfs_td *td = pmd->tds;
		pmd->tds = td->next;
		free(td);
	}
	tfs_sm_destroy(pmd->dsm);
	tfs_tm_destroy(pmd->tm);
	tfs_sm_destroy(pmd->msm);
	tfs_bm_destroy(pmd->bm);
	free(pmd);
}

static uint64_t usable_metadata_blocks(struct tfs_pmd *pmd)
{
	uint64_t n = tfs_bm_nr_blocks(pmd->bm);

	if (n > TFS_MAX_METADATA_BLOCKS) {
		tfs_warn("%s: metadata device has %llu blocks; only the first %u are used "
			 "(the format's maximum, about 15.9 GiB)", tfs_bdev_name(pmd->meta),
			 (unsigned long long)n, TFS_MAX_METADATA_BLOCKS);
		n = TFS_MAX_METADATA_BLOCKS;
	}
	return n;
}

int tfs_pmd_format(struct tfs_bdev *meta, const struct tfs_pmd_options *opt, struct tfs_pmd **out)
{
	struct tfs_pmd *pmd;
	int r;

	r = check_data_block_size(opt->data_block_sectors);
	if (r)
		return r;
	if (opt->read_only)
		return -EROFS;
	r = alloc_pmd(meta, opt, &pmd);
	if (r)
		return r;
	pmd->data_block_sectors = opt->data_block_sectors;
	pmd->metadata_nr_blocks = usable_metadata_blocks(pmd);
	if (pmd->metadata_nr_blocks < 16) {
		tfs_err("%s: metadata device too small (%llu blocks of 4 KiB)", tfs_bdev_name(meta),
			(unsigned long long)pmd->metadata_nr_blocks);
		r = -ENOSPC;
		goto err;
	}
	r = tfs_smm_create(pmd->bm, pmd->metadata_nr_blocks, 1, &pmd->msm);
	if (r)
		goto err;
	r = tfs_tm_create(pmd->bm, pmd->msm, &pmd->tm);
	if (r)
		goto err;
	tfs_smm_bind(pmd->msm, pmd->tm);
	r = tfs_smd_create(pmd->tm, opt->nr_data_blocks, &pmd->dsm);
	if (r)
		goto err;
	setup_infos(pmd);
	r = tfs_btree_empty(&pmd->tl_info, &pmd->mapping_root);
	if (!r)
		r = tfs_btree_empty(&pmd->details_info, &pmd->details_root);
	if (!r)
		r = commit(pmd, true);
	if (r)
		goto err;
	*out = pmd;
	return 0;

err:
	free_pmd(pmd);
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
static int check_superblock(struct tfs_pmd *pmd, const struct tfs_pmd_options *opt, uint8_t *sb)
{
	const char *name = tfs_bdev_name(pmd->meta);
	uint32_t v;
	int r;

	r = tfs_bdev_read(pmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (r) {
		tfs_err("%s: reading the superblock failed: %s", name, strerror(-r));
		return r;
	}
	if (all_zero(sb, TFS_BLOCK_SIZE)) {
		tfs_err("%s: no thin-pool metadata here (block 0 is zero): format it first", name);
		return -EINVAL;
	}
	if (tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, magic)) != TFS_THIN_MAGIC) {
		tfs_err("%s: not thin-pool metadata (bad superblock magic)", name);
		return -EINVAL;
	}
	if (tfs_le32(sb) != tfs_block_csum(sb, TFS_SALT_THIN_SB)) {
		tfs_err("%s: superblock checksum is wrong: the metadata is corrupt", name);
		return -EUCLEAN;
	}
	v = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, version));
	if (v < 1 || v > TFS_THIN_VERSION) {
		tfs_err("%s: unsupported metadata version %u", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, incompat_flags));
	if (v) {
		tfs_err("%s: metadata uses unknown incompatible features (%#x)", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, compat_ro_flags));
	if (v && !opt->read_only) {
		tfs_err("%s: metadata uses features (%#x) that allow only read-only use", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, metadata_block_size));
	if (v != 8) {
		tfs_err("%s: metadata block size %u sectors is not 8", name, v);
		return -EINVAL;
	}
	v = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, data_block_size));
	r = check_data_block_size(v);
	if (r)
		return r;
	if (opt->data_block_sectors && v != opt->data_block_sectors) {
		tfs_err("%s: metadata has data block size %u sectors but %u was configured", name, v,
			opt->data_block_sectors);
		return -EINVAL;
	}
	return 0;
}

/* Load roots and space maps from a validated superblock image. */
static int load(struct tfs_pmd *pmd, const uint8_t *sb)
{
	int r;

	pmd->flags = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, flags));
	pmd->time = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, time));
	pmd->trans_id = tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, trans_id));
	pmd->held_root = tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, held_root));
	pmd->mapping_root = tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, data_mapping_root));
	pmd->details_root = tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, device_details_root));
	pmd->data_block_sectors = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, data_block_size));
	pmd->metadata_nr_blocks = tfs_le64(sb + offsetof(struct tfs_disk_thin_sb, metadata_nr_blocks));

	tfs_sm_destroy(pmd->dsm);
	pmd->dsm = NULL;
	if (!pmd->msm) {
		r = tfs_smm_open(pmd->bm, sb + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root),
				 &pmd->msm);
		if (r)
			return r;
		r = tfs_tm_create(pmd->bm, pmd->msm, &pmd->tm);
		if (r)
			return r;
		tfs_smm_bind(pmd->msm, pmd->tm);
	}
	r = tfs_smd_open(pmd->tm, sb + offsetof(struct tfs_disk_thin_sb, data_space_map_root),
			 &pmd->dsm);
	if (r)
		return r;
	setup_infos(pmd);
	return 0;
}

int tfs_pmd_open(struct tfs_bdev *meta, const struct tfs_pmd_options *opt, struct tfs_pmd **out)
{
	uint8_t *sb;
	struct tfs_pmd *pmd;
	int r;

	sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	if (!sb)
		return -ENOMEM;
	r = alloc_pmd(meta, opt, &pmd);
	if (r)
		goto out_free_sb;
	r = check_superblock(pmd, opt, sb);
	if (!r)
		r = load(pmd, sb);
	if (!r && opt->nr_data_blocks > tfs_sm_nr_blocks(pmd->dsm) && !opt->read_only)
		r = tfs_pmd_resize_data(pmd, opt->nr_data_blocks);
	if (r) {
		free_pmd(pmd);
		goto out_free_sb;
	}
	*out = pmd;
out_free_sb:
	free(sb);
	return r;
}

void tfs_pmd_close(struct tfs_pmd *pmd)
{
	if (pmd)
		free_pmd(pmd);
}

/* After a failed abort only tfs_pmd_close is safe: the maps could not be reloaded. */
int tfs_pmd_abort(struct tfs_pmd *pmd)
{
	uint8_t *sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	struct tfs_pmd_options opt = { .data_block_sectors = pmd->data_block_sectors, .read_only = true };
	int r;

	if (!sb)
		return -ENOMEM;
	pmd->aborts++;
	tfs_tm_abort(pmd->tm);
	/*
	 * Reload the metadata space map from disk rather than trusting its
	 * rollback: a commit that failed after the map wrote itself has moved
	 * its idea of "committed" past what the superblock on disk says.
	 */
	tfs_sm_destroy(pmd->dsm);
	tfs_tm_destroy(pmd->tm);
	tfs_sm_destroy(pmd->msm);
	pmd->dsm = NULL;
	pmd->tm = NULL;
	pmd->msm = NULL;
	r = check_superblock(pmd, &opt, sb);
	if (!r)
		r = load(pmd, sb);
	free(sb);
	if (r)
		return r;
	/* Open handles go back to the committed details; devices born since are gone. */
	for (struct tfs_td *td = pmd->tds; td; td = td->next) {
		if (td->deleted)
			continue;
		td->changed = false;
		if (read_details(pmd, td->id, &td->details))
			td->deleted = true;
	}
	return 0;
}

/* ---- pool-wide --------------------------------------------------------- */

uint64_t tfs_pmd_transaction_id(struct tfs_pmd *pmd)
{
	return pmd->trans_id;
}

int tfs_pmd_set_transaction_id(struct tfs_pmd *pmd, uint64_t old_id, uint64_t new_id)
{
	if (pmd->read_only)
		return -EROFS;
	if (pmd->trans_id != old_id) {
		tfs_err("transaction id is %llu, not %llu: not changed",
			(unsigned long long)pmd->trans_id, (unsigned long long)old_id);
		return -EINVAL;
	}
	pmd->trans_id = new_id;
	return 0;
}

uint32_t tfs_pmd_data_block_sectors(struct tfs_pmd *pmd)
{
	return pmd->data_block_sectors;
}

uint32_t tfs_pmd_time(struct tfs_pmd *pmd)
{
	return pmd->time;
}

void tfs_pmd_take_write_error(struct tfs_pmd *pmd, char *buf, size_t len)
{
	tfs_bm_take_write_error(pmd->bm, buf, len);
}

bool tfs_pmd_needs_check(struct tfs_pmd *pmd)
{
	return pmd->flags & TFS_THIN_FLAG_NEEDS_CHECK;
}

/*
 * Written in place on the committed superblock, outside any transaction:
 * this runs when the transaction itself can no longer be trusted.
 */
int tfs_pmd_set_needs_check(struct tfs_pmd *pmd, bool on)
{
	uint8_t *sb = aligned_alloc(TFS_BLOCK_SIZE, TFS_BLOCK_SIZE);
	uint32_t flags;
	int r;

	if (!sb)
		return -ENOMEM;
	r = tfs_bdev_read(pmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (r)
		goto out;
	flags = tfs_le32(sb + offsetof(struct tfs_disk_thin_sb, flags));
	flags = on ? flags | TFS_THIN_FLAG_NEEDS_CHECK : flags & ~TFS_THIN_FLAG_NEEDS_CHECK;
	tfs_put_le32(sb + offsetof(struct tfs_disk_thin_sb, flags), flags);
	tfs_put_le32(sb, tfs_block_csum(sb, TFS_SALT_THIN_SB));
	tfs_bm_forget(pmd->bm, 0);
	r = tfs_bdev_write(pmd->meta, sb, TFS_BLOCK_SIZE, 0);
	if (!r)
		r = tfs_bdev_flush(pmd->meta);
	if (r) {
		tfs_err("%s: writing needs_check to the superblock failed: %s",
			tfs_bdev_name(pmd->meta), strerror(-r));
		goto out;
	}
	pmd->flags = on ? pmd->flags | TFS_THIN_FLAG_NEEDS_CHECK
			: pmd->flags & ~TFS_THIN_FLAG_NEEDS_CHECK;
out:
	free(sb);
	return r;
}

void tfs_pmd_space(struct tfs_pmd *pmd, struct tfs_pmd_space *out)
{
	out->data_total = tfs_sm_nr_blocks(pmd->dsm);
	out->data_free = tfs_sm_nr_free(pmd->dsm);
	out->meta_total = tfs_sm_nr_blocks(pmd->msm);
	out->meta_free = tfs_sm_nr_free(pmd->msm);
}

int tfs_pmd_resize_data(struct tfs_pmd *pmd, uint64_t nr_blocks)
{
	uint64_t cur = tfs_sm_nr_blocks(pmd->dsm);

	if (pmd->read_only)
		return -EROFS;
	if (nr_blocks < cur) {
		tfs_err("data device cannot shrink from %llu to %llu blocks",
			(unsigned long long)cur, (unsigned long long)nr_blocks);
		return -EINVAL;
	}
	if (nr_blocks > TFS_MAX_DATA_BLOCK + 1) {
		tfs_err("data device of %llu blocks exceeds the format's 2^40 blocks",
			(unsigned long long)nr_blocks);
		return -EFBIG;
	}
	return nr_blocks == cur ? 0 : tfs_sm_extend(pmd->dsm, nr_blocks - cur);
}

int tfs_pmd_shrink_data(struct tfs_pmd *pmd, uint64_t nr_blocks, uint64_t *highest_used)
{
	uint64_t cur = tfs_sm_nr_blocks(pmd->dsm), highest = UINT64_MAX;
	int r;

	if (highest_used)
		*highest_used = UINT64_MAX;
	if (pmd->read_only)
		return -EROFS;
	if (nr_blocks > cur) {
		tfs_err("data device cannot shrink from %llu to %llu blocks: that is growing",
			(unsigned long long)cur, (unsigned long long)nr_blocks);
		return -EINVAL;
	}
	/* The data size lives only in the data space map's root: nothing else to keep in step. */
	r = tfs_smd_shrink(pmd->dsm, nr_blocks, &highest);
	if (highest_used)
		*highest_used = highest;
	return r;
}

int tfs_pmd_resize_metadata(struct tfs_pmd *pmd, uint64_t nr_blocks)
{
	uint64_t cur = tfs_sm_nr_blocks(pmd->msm);
	int r;

	if (pmd->read_only)
		return -EROFS;
	if (nr_blocks > TFS_MAX_METADATA_BLOCKS) {
		tfs_warn("metadata device of %llu blocks: only %u are used (the format's maximum)",
			 (unsigned long long)nr_blocks, TFS_MAX_METADATA_BLOCKS);
		nr_blocks = TFS_MAX_METADATA_BLOCKS;
	}
	if (nr_blocks < cur) {
		tfs_err("metadata device cannot shrink from %llu to %llu blocks",
			(unsigned long long)cur, (unsigned long long)nr_blocks);
		return -EINVAL;
	}
	if (nr_blocks > tfs_bm_nr_blocks(pmd->bm)) {
		tfs_err("metadata device has only %llu blocks, cannot use %llu",
			(unsigned long long)tfs_bm_nr_blocks(pmd->bm), (unsigned long long)nr_blocks);
		return -EINVAL;
	}
	if (nr_blocks == cur)
		return 0;
	r = tfs_sm_extend(pmd->msm, nr_blocks - cur);
	if (!r)
		pmd->metadata_nr_blocks = nr_blocks;
	return r;
}

/* ---- metadata snapshot ------------------------------------------------- */

/*
 * What a diff's held copy carries in its (otherwise unused, zero) uuid
 * field, so that a mount after a crash can tell it from a user's metadata
 * snapshot and drop it.
 */
static const char diff_hold_tag[16] = "thinfs:diffhold";

/*
 * The held copy of the superblock (docs 2.7): a new block C describing the
 * current roots, which gain a parent each, so that from now on every change
 * shadows them and their trees stay as they are until the copy is dropped.
 */
static int hold_roots(struct tfs_pmd *pmd, bool for_diff)
{
	struct tfs_block *copy;
	uint8_t *d;
	int r;

	r = tfs_tm_new_block(pmd->tm, &tfs_thin_sb_validator, &copy);
	if (r)
		return r;
	d = tfs_block_data(copy);
	fill_superblock(pmd, d);
	memset(d + offsetof(struct tfs_disk_thin_sb, data_space_map_root), 0, 2 * TFS_SM_ROOT_FIELD);
	tfs_put_le64(d + offsetof(struct tfs_disk_thin_sb, held_root), 0);
	if (for_diff)
		memcpy(d + offsetof(struct tfs_disk_thin_sb, uuid), diff_hold_tag, sizeof(diff_hold_tag));
	pmd->held_root = tfs_block_location(copy);
	tfs_tm_unlock(pmd->tm, copy);
	r = tfs_tm_inc(pmd->tm, pmd->mapping_root);
	if (!r)
		r = tfs_tm_inc(pmd->tm, pmd->details_root);
	return r;
}

/* Release the held copy's trees and the copy itself. */
static int drop_held_roots(struct tfs_pmd *pmd)
{
	struct tfs_block *copy;
	uint64_t held = pmd->held_root, mroot, droot;
	int r;

	r = tfs_tm_read_lock(pmd->tm, held, &tfs_thin_sb_validator, &copy);
	if (r)
		return r;
	mroot = tfs_le64((uint8_t *)tfs_block_data(copy) + offsetof(struct tfs_disk_thin_sb, data_mapping_root));
	droot = tfs_le64((uint8_t *)tfs_block_data(copy) + offsetof(struct tfs_disk_thin_sb, device_details_root));
	tfs_tm_unlock(pmd->tm, copy);
	r = tfs_btree_del(&pmd->map_info, mroot);
	if (!r)
		r = tfs_btree_del(&pmd->details_info, droot);
	if (!r)
		r = tfs_tm_dec(pmd->tm, held);
	if (!r)
		pmd->held_root = 0;
	return r;
}

int tfs_pmd_reserve_metadata_snap(struct tfs_pmd *pmd)
{
	int r;

	if (pmd->read_only)
		return -EROFS;
	if (pmd->held_root) {
		tfs_err("a metadata snapshot is already held (block %llu)",
			(unsigned long long)pmd->held_root);
		return -EBUSY;
	}
	/* The copy must describe committed roots, so commit first. */
	r = tfs_pmd_commit(pmd);
	if (!r)
		r = hold_roots(pmd, false);
	if (!r)
		r = tfs_pmd_commit(pmd);
	return r;
}

int tfs_pmd_release_metadata_snap(struct tfs_pmd *pmd)
{
	int r;

	if (pmd->read_only)
		return -EROFS;
	if (!pmd->held_root) {
		tfs_err("no metadata snapshot is held");
		return -EINVAL;
	}
	r = drop_held_roots(pmd);
	return r ? r : tfs_pmd_commit(pmd);
}

uint64_t tfs_pmd_held_root(struct tfs_pmd *pmd)
{
	return pmd->held_root;
}

/* ---- changed blocks between two devices ---------------------------------- */

static int need_metadata_space(struct tfs_pmd *pmd);

struct tfs_thin_diff {
	struct tfs_pmd *pmd;
	struct tfs_btree_diff *walk;
	uint64_t aborts;         /* the pmd's count at begin */
	tfs_thin_diff_fn fn;     /* of the current step */
	void *ctx;
	bool open, zero;         /* the extent being built, not given to fn yet */
	uint64_t begin, len;
};

static int device_root(struct tfs_pmd *pmd, tfs_dev_id id, uint64_t *root)
{
	uint64_t key = id;
	uint8_t v[8];
	int r = tfs_btree_lookup(&pmd->tl_info, pmd->mapping_root, &key, v);

	if (r == -ENODATA)
		tfs_err("diff: no thin device %u", id);
	if (!r)
		*root = tfs_le64(v);
	return r;
}

int tfs_pmd_hold_roots(struct tfs_pmd *pmd)
{
	int r;

	if (pmd->read_only)
		return -EROFS;
	if (pmd->held_root)
		return -EBUSY;
	r = need_metadata_space(pmd);
	if (r)
		return r;
	/* If a commit writes the hold, the held details must match the held mappings. */
	r = flush_details(pmd);
	return r ? r : hold_roots(pmd, true);
}

bool tfs_pmd_held_for_diff(struct tfs_pmd *pmd)
{
	struct tfs_block *copy;
	bool tagged;

	if (!pmd->held_root ||
	    tfs_tm_read_lock(pmd->tm, pmd->held_root, &tfs_thin_sb_validator, &copy))
		return false;
	tagged = !memcmp((uint8_t *)tfs_block_data(copy) + offsetof(struct tfs_disk_thin_sb, uuid),
			 diff_hold_tag, sizeof(diff_hold_tag));
	tfs_tm_unlock(pmd->tm, copy);
	return tagged;
}

int tfs_pmd_drop_held_roots(struct tfs_pmd *pmd)
{
	if (pmd->read_only)
		return -EROFS;
	return pmd->held_root ? drop_held_roots(pmd) : -EINVAL;
}

uint64_t tfs_pmd_commit_count(struct tfs_pmd *pmd)
{
	return pmd->commits;
}

int tfs_thin_diff_begin(struct tfs_pmd *pmd, const tfs_dev_id *from, const tfs_dev_id *to,
			struct tfs_thin_diff **out)
{
	struct tfs_thin_diff *d;
	uint64_t from_root = 0, to_root = 0;
	int r = 0;

	if (to)
		r = device_root(pmd, *to, &to_root);
	if (!r && from)
		r = device_root(pmd, *from, &from_root);
	if (r)
		return r;
	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->pmd = pmd;
	d->aborts = pmd->aborts;
	r = tfs_btree_diff_begin(&pmd->bl_info, from_root, to_root, &d->walk);
	if (r) {
		free(d);
		return r;
	}
	*out = d;
	return 0;
}

/* One differing virtual block: extend the open extent or start another. */
static int diff_one(void *ctx, uint64_t vblock, const void *from, const void *to)
{
	struct tfs_thin_diff *d = ctx;
	bool zero = !to;
	int r;

	/* The same data block mapped at another time is the same data. */
	if (from && to && tfs_le64(from) >> 24 == tfs_le64(to) >> 24)
		return 0;
	if (d->open && d->zero == zero && d->begin + d->len == vblock) {
		d->len++;
		return 0;
	}
	if (d->open) {
		r = d->fn(d->ctx, d->begin, d->len, d->zero);
		if (r)
			return r;
	}
	d->open = true;
	d->zero = zero;
	d->begin = vblock;
	d->len = 1;
	return 0;
}

int tfs_thin_diff_step(struct tfs_thin_diff *d, unsigned max_reads, tfs_thin_diff_fn fn,
		       void *ctx)
{
	int r;

	/* An abort replaced the transaction manager and may have freed what we walk. */
	if (d->pmd->aborts != d->aborts) {
		tfs_err("diff: the metadata transaction was aborted during the walk");
		return -EIO;
	}
	d->fn = fn;
	d->ctx = ctx;
	r = tfs_btree_diff_step(d->walk, max_reads, diff_one, d);
	if (r == 0 && d->open) {
		d->open = false;
		r = fn(ctx, d->begin, d->len, d->zero);
	}
	return r;
}

uint64_t tfs_thin_diff_nodes_read(const struct tfs_thin_diff *d)
{
	return d->walk ? tfs_btree_diff_nodes_read(d->walk) : 0;
}

uint64_t tfs_thin_diff_position(const struct tfs_thin_diff *d)
{
	return d->walk ? tfs_btree_diff_position(d->walk) : 0;
}

void tfs_thin_diff_end(struct tfs_thin_diff *d)
{
	if (!d)
		return;
	tfs_btree_diff_end(d->walk);
	free(d);
}

/* ---- devices ----------------------------------------------------------- */

/*
 * A commit needs free metadata blocks of its own (a new index block, the
 * shadows of changed bitmaps, the ref-count tree path), so changes stop
 * while that much is still free: running out mid-commit would lose the
 * whole transaction instead of one request.
 */
static int need_metadata_space(struct tfs_pmd *pmd)
{
	uint64_t total = tfs_sm_nr_blocks(pmd->msm);
	uint64_t reserve = (total + TFS_ENTRIES_PER_BITMAP - 1) / TFS_ENTRIES_PER_BITMAP + 64;

	if (reserve > total / 4)
		reserve = total / 4;
	if (pmd->read_only)
		return -EROFS;
	return tfs_sm_nr_free(pmd->msm) <= reserve ? -ENOSPC : 0;
}

static int check_new_id(struct tfs_pmd *pmd, tfs_dev_id id)
{
	struct tfs_thin_details d;
	int r;

	r = need_metadata_space(pmd);
	if (r)
		return r;
	if (id > TFS_MAX_DEV_ID) {
		tfs_err("thin device id %u is larger than the 24-bit maximum %u", id, TFS_MAX_DEV_ID);
		return -EINVAL;
	}
	r = get_details(pmd, id, &d);
	if (r == 0) {
		tfs_err("thin device id %u already exists", id);
		return -EEXIST;
	}
	return r == -ENODATA ? 0 : r;
}

int tfs_pmd_create_thin(struct tfs_pmd *pmd, tfs_dev_id id)
{
	struct tfs_thin_details d = { .transaction_id = pmd->trans_id,
				      .creation_time = pmd->time,
				      .snapshotted_time = pmd->time };
	uint64_t key = id, dev_root;
	uint8_t v[8];
	int r;

	r = check_new_id(pmd, id);
	if (r)
		return r;
	r = tfs_btree_empty(&pmd->bl_info, &dev_root);
	if (r)
		return r;
	tfs_put_le64(v, dev_root);
	r = tfs_btree_insert(&pmd->tl_info, pmd->mapping_root, &key, v, &pmd->mapping_root, NULL);
	if (r)
		return r;
	return write_details(pmd, id, &d);
}

int tfs_pmd_create_snap(struct tfs_pmd *pmd, tfs_dev_id id, tfs_dev_id origin)
{
	struct tfs_thin_details od, nd;
	uint64_t key = origin, origin_root;
	uint8_t v[8];
	int r;

	r = check_new_id(pmd, id);
	if (r)
		return r;
	r = get_details(pmd, origin, &od);
	if (r == -ENODATA)
		tfs_err("snapshot origin: no thin device %u", origin);
	if (r)
		return r;
	r = tfs_btree_lookup(&pmd->tl_info, pmd->mapping_root, &key, v);
	if (r)
		return r;
	origin_root = tfs_le64(v);
	/* Sharing the whole subtree is the snapshot: one more parent for its root. */
	r = tfs_tm_inc(pmd->tm, origin_root);
	if (r)
		return r;
	key = id;
	r = tfs_btree_insert(&pmd->tl_info, pmd->mapping_root, &key, v, &pmd->mapping_root, NULL);
	if (r)
		return r;
	pmd->time = (pmd->time + 1) & TFS_TIME_MASK;
	od.snapshotted_time = pmd->time;
	r = set_details(pmd, origin, &od);
	if (r)
		return r;
	nd = (struct tfs_thin_details){ .mapped_blocks = od.mapped_blocks,
					.transaction_id = pmd->trans_id,
					.creation_time = pmd->time,
					.snapshotted_time = pmd->time };
	return write_details(pmd, id, &nd);
}

int tfs_pmd_delete_thin(struct tfs_pmd *pmd, tfs_dev_id id)
{
	uint64_t key = id;
	int r;

	/* No reserve check: deleting is how space comes back, and it shadows only a few blocks. */
	if (pmd->read_only)
		return -EROFS;
	if (find_td(pmd, id)) {
		tfs_err("thin device %u is open and cannot be deleted", id);
		return -EBUSY;
	}
	r = tfs_btree_remove(&pmd->details_info, pmd->details_root, &key, &pmd->details_root);
	if (r == -ENODATA)
		tfs_err("no thin device %u to delete", id);
	if (r)
		return r;
	/* Removing the top-level entry releases the device's tree and its data blocks. */
	return tfs_btree_remove(&pmd->tl_info, pmd->mapping_root, &key, &pmd->mapping_root);
}

struct list_ctx {
	tfs_dev_id *ids;
	unsigned max, n;
};

static int list_one(void *ctx, const uint64_t *keys, const void *value)
{
	struct list_ctx *l = ctx;

	(void)value;
	if (l->n < l->max)
		l->ids[l->n] = (tfs_dev_id)keys[0];
	l->n++;
	return 0;
}

int tfs_pmd_list_devices(struct tfs_pmd *pmd, tfs_dev_id *ids, unsigned max)
{
	struct list_ctx l = { ids, max, 0 };
	int r = tfs_btree_walk(&pmd->details_info, pmd->details_root, list_one, &l);

	return r ? r : (int)l.n;
}

int tfs_pmd_device_details(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_thin_details *out)
{
	return get_details(pmd, id, out);
}

int tfs_pmd_open_thin(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_td **out)
{
	struct tfs_td *td;
	int r;

	if (find_td(pmd, id)) {
		tfs_err("thin device %u is already open", id);
		return -EBUSY;
	}
	td = calloc(1, sizeof(*td));
	if (!td)
		return -ENOMEM;
	r = read_details(pmd, id, &td->details);
	if (r) {
		free(td);
		return r;
	}
	td->pmd = pmd;
	td->id = id;
	td->next = pmd->tds;
	pmd->tds = td;
	*out = td;
	return 0;
}

void tfs_pmd_close_thin(struct tfs_td *td)
{
	struct tfs_pmd *pmd = td->pmd;
	struct tfs_td **pp = &pmd->tds;

	/* Unsaved details join the current transaction; a failure here shows at commit as a check error. */
	if (td->changed && !td->deleted && !pmd->read_only &&
	    write_details(pmd, td->id, &td->details))
		tfs_err("thin device %u: saving its details failed", td->id);
	while (*pp != td)
		pp = &(*pp)->next;
	*pp = td->next;
	free(td);
}

tfs_dev_id tfs_td_id(const struct tfs_td *td)
{
	return td->id;
}

uint64_t tfs_td_mapped_blocks(struct tfs_td *td)
{
	return td->details.mapped_blocks;
}

/* ---- mappings ---------------------------------------------------------- */

static void to_mapping(const struct tfs_td *td, uint64_t vblock, uint64_t bt,
		       struct tfs_thin_mapping *m)
{
	m->vblock = vblock;
	tfs_unpack_block_time(bt, &m->data_block, &m->time);
	m->shared = m->time < td->details.snapshotted_time;
}

int tfs_thin_lookup(struct tfs_td *td, uint64_t vblock, struct tfs_thin_mapping *out)
{
	uint64_t keys[2] = { td->id, vblock };
	uint8_t v[8];
	int r;

	if (td->deleted)
		return -ENODEV;
	r = tfs_btree_lookup(&td->pmd->map_info, td->pmd->mapping_root, keys, v);
	if (!r)
		to_mapping(td, vblock, tfs_le64(v), out);
	return r;
}

int tfs_thin_lookup_range(struct tfs_td *td, uint64_t begin, uint64_t end, unsigned max,
			  struct tfs_thin_mapping *out)
{
	enum { CHUNK = 128 };
	uint64_t keys[2] = { td->id, 0 };
	uint64_t k[CHUNK];
	uint8_t v[CHUNK * 8];
	unsigned total = 0;

	if (td->deleted)
		return -ENODEV;
	while (total < max && begin < end) {
		unsigned want = max - total < CHUNK ? max - total : CHUNK;
		int n = tfs_btree_lookup_range(&td->pmd->map_info, td->pmd->mapping_root, keys, begin,
					       end, want, k, v);
		if (n < 0)
			return n;
		for (int i = 0; i < n; i++)
			to_mapping(td, k[i], tfs_le64(v + 8 * i), &out[total + i]);
		total += (unsigned)n;
		if ((unsigned)n < want)
			break;
		begin = k[n - 1] + 1;
	}
	return (int)total;
}

int tfs_thin_tree_shape(struct tfs_td *td, struct tfs_thin_tree_shape *out)
{
	uint64_t keys[2] = { td->id, 0 };
	struct tfs_btree_shape sh;
	int r;

	memset(out, 0, sizeof(*out));
	if (td->deleted)
		return -ENODEV;
	r = tfs_btree_shape(&td->pmd->map_info, td->pmd->mapping_root, keys, &sh);
	if (r)
		return r;
	*out = (struct tfs_thin_tree_shape){ .leaves = sh.leaves, .mappings = sh.entries,
					     .internal_nodes = sh.internal_nodes,
					     .leaf_capacity = sh.leaf_capacity, .depth = sh.depth };
	return 0;
}

static int insert(struct tfs_td *td, uint64_t vblock, uint64_t data_block, uint32_t time)
{
	struct tfs_pmd *pmd = td->pmd;
	uint64_t keys[2] = { td->id, vblock };
	uint8_t v[8];
	bool inserted = false;
	int r;

	if (td->deleted)
		return -ENODEV;
	r = need_metadata_space(pmd);
	if (r)
		return r;
	if (data_block > TFS_MAX_DATA_BLOCK) {
		tfs_err("data block %llu is beyond the format's 40-bit limit",
			(unsigned long long)data_block);
		return -EINVAL;
	}
	tfs_put_le64(v, tfs_pack_block_time(data_block, time));
	r = tfs_btree_insert(&pmd->map_info, pmd->mapping_root, keys, v, &pmd->mapping_root, &inserted);
	if (r)
		return r;
	if (inserted) {
		td->details.mapped_blocks++;
		td->changed = true;
	}
	return 0;
}

int tfs_thin_insert(struct tfs_td *td, uint64_t vblock, uint64_t data_block)
{
	return insert(td, vblock, data_block, td->pmd->time);
}

int tfs_thin_insert_timed(struct tfs_td *td, uint64_t vblock, uint64_t data_block, uint32_t time)
{
	return insert(td, vblock, data_block, time & TFS_TIME_MASK);
}

int tfs_thin_mark_shared(struct tfs_td *a, struct tfs_td *b)
{
	struct tfs_pmd *pmd = a->pmd;

	if (a->deleted || b->deleted)
		return -ENODEV;
	if (pmd->read_only)
		return -EROFS;
	pmd->time = (pmd->time + 1) & TFS_TIME_MASK;
	a->details.snapshotted_time = pmd->time;
	a->changed = true;
	b->details.snapshotted_time = pmd->time;
	b->changed = true;
	return 0;
}

int tfs_thin_remove(struct tfs_td *td, uint64_t vblock)
{
	struct tfs_pmd *pmd = td->pmd;
	uint64_t keys[2] = { td->id, vblock };
	int r;

	if (td->deleted)
		return -ENODEV;
	if (pmd->read_only)
		return -EROFS;
	r = tfs_btree_remove(&pmd->map_info, pmd->mapping_root, keys, &pmd->mapping_root);
	if (r)
		return r;
	td->details.mapped_blocks--;
	td->changed = true;
	return 0;
}

int tfs_thin_remove_range(struct tfs_td *td, uint64_t begin, uint64_t end, uint64_t *nr_removed)
{
	struct tfs_pmd *pmd = td->pmd;
	uint64_t keys[2] = { td->id, 0 };
	uint64_t n = 0;
	int r;

	if (td->deleted)
		return -ENODEV;
	if (pmd->read_only)
		return -EROFS;
	r = tfs_btree_remove_range(&pmd->map_info, pmd->mapping_root, keys, begin, end,
				   &pmd->mapping_root, &n);
	if (n) {
		td->details.mapped_blocks -= n;
		td->changed = true;
	}
	if (nr_removed)
		*nr_removed = n;
	return r;
}

/* ---- data space -------------------------------------------------------- */

int tfs_pmd_alloc_data_block(struct tfs_pmd *pmd, uint64_t *block)
{
	if (pmd->read_only)
		return -EROFS;
	return tfs_sm_new_block(pmd->dsm, block);
}

int tfs_pmd_free_data_block(struct tfs_pmd *pmd, uint64_t block)
{
	return tfs_sm_dec(pmd->dsm, block);
}

int tfs_pmd_data_block_count(struct tfs_pmd *pmd, uint64_t block, uint32_t *count)
{
	return tfs_sm_get_count(pmd->dsm, block, count);
}

int tfs_pmd_walk_free_data(struct tfs_pmd *pmd,
			   int (*fn)(void *arg, uint64_t begin, uint64_t len), void *arg)
{
	return tfs_smd_walk_free(pmd->dsm, fn, arg);
}

int tfs_pmd_data_block_inc(struct tfs_pmd *pmd, uint64_t block)
{
	if (block >= tfs_sm_nr_blocks(pmd->dsm)) {
		tfs_err("data block %llu is past the end of the data device (%llu blocks)",
			(unsigned long long)block, (unsigned long long)tfs_sm_nr_blocks(pmd->dsm));
		return -EINVAL;
	}
	return tfs_sm_inc(pmd->dsm, block);
}

/* ---- restore ----------------------------------------------------------- */

int tfs_pmd_restore_superblock(struct tfs_pmd *pmd, uint32_t time, uint64_t trans_id,
			       uint32_t flags)
{
	if (pmd->read_only)
		return -EROFS;
	if (flags & ~TFS_THIN_FLAG_NEEDS_CHECK) {
		tfs_err("superblock flags %#x: only NEEDS_CHECK (1) is defined", flags);
		return -EINVAL;
	}
	pmd->time = time & TFS_TIME_MASK;
	pmd->trans_id = trans_id;
	pmd->flags = flags;
	return 0;
}

int tfs_pmd_restore_details(struct tfs_pmd *pmd, tfs_dev_id id, const struct tfs_thin_details *d)
{
	struct tfs_thin_details cur;
	int r;

	if (pmd->read_only)
		return -EROFS;
	r = get_details(pmd, id, &cur);
	if (r)
		return r;
	return set_details(pmd, id, d);
}
