/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Repair = salvage then rebuild, as thin_repair does, but in place:
 *   1. walk the old metadata with the independent reader, skipping any
 *      subtree that does not validate, and spool every mapping that looks
 *      sane (data block inside the data device, keys in order) to a
 *      temporary file, so memory does not grow with the pool;
 *   2. only then format the device and replay the spool through the
 *      thin-metadata API, one commit at the end.
 * Sharing between snapshots is not recovered (nor by thin_repair): every
 * device gets its own tree, and data blocks get one count per mapping.
 */
#include "repair.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "format.h"
#include "raw-meta.h"
#include "thin-metadata.h"

struct spooled_mapping {
	uint64_t vblock;
	uint64_t block_time;
};

struct salvaged_dev {
	uint64_t id;
	struct tfs_thin_details details; /* mapped_blocks recomputed */
	bool have_details;
	uint64_t root;
	uint64_t nr_mappings;
	uint64_t first_record; /* index into the spool */
};

struct salvage {
	struct tfs_raw_dev dev;
	struct tfs_raw_sb sb;
	FILE *report;
	FILE *spool;
	uint64_t nr_data_blocks;
	struct salvaged_dev *devs;
	size_t nr_devs, cap_devs;
	uint64_t lost_subtrees, dropped_mappings, nr_records;
	uint8_t block[TFS_BLOCK_SIZE * (TFS_RAW_MAX_DEPTH + 1)];
};

static struct salvaged_dev *find_dev(struct salvage *s, uint64_t id)
{
	for (size_t i = 0; i < s->nr_devs; i++)
		if (s->devs[i].id == id)
			return &s->devs[i];
	return NULL;
}

static struct salvaged_dev *add_dev(struct salvage *s, uint64_t id)
{
	struct salvaged_dev *d = find_dev(s, id);

	if (d)
		return d;
	if (s->nr_devs == s->cap_devs) {
		size_t cap = s->cap_devs ? 2 * s->cap_devs : 64;
		void *p = realloc(s->devs, cap * sizeof(*s->devs));
		if (!p)
			return NULL;
		s->devs = p;
		s->cap_devs = cap;
	}
	d = &s->devs[s->nr_devs++];
	memset(d, 0, sizeof(*d));
	d->id = id;
	return d;
}

typedef int (*leaf_fn)(struct salvage *s, void *ctx, uint64_t key, const uint8_t *value);

/*
 * Visit leaf entries with keys in [lo, hi) below block b, skipping (and
 * reporting) any node that does not validate.  Depth-limited; keys out of
 * their parent's range are dropped, so cycles cannot produce duplicates.
 */
static int walk(struct salvage *s, uint64_t b, uint32_t vsize, uint64_t lo, uint64_t hi,
		unsigned depth, const char *what, leaf_fn fn, void *ctx)
{
	uint8_t *blk = s->block + (size_t)depth * TFS_BLOCK_SIZE;
	struct tfs_raw_node n;
	char why[TFS_RAW_WHY_LEN];
	int r;

	if (depth > TFS_RAW_MAX_DEPTH) {
		fprintf(s->report, "lost: %s below block %" PRIu64 ": tree too deep\n", what, b);
		s->lost_subtrees++;
		return 0;
	}
	r = tfs_raw_read(&s->dev, b, blk);
	if (!r)
		r = tfs_raw_node_check(blk, b, vsize, &n, why, sizeof(why));
	else
		snprintf(why, sizeof(why), "unreadable (%s)", strerror(-r));
	if (r) {
		fprintf(s->report, "lost: %s keys %" PRIu64 "..%" PRIu64 " in block %" PRIu64 ": %s\n",
			what, lo, hi - 1, b, why);
		s->lost_subtrees++;
		return 0;
	}
	for (uint32_t i = 0; i < n.nr_entries; i++) {
		uint64_t k = tfs_raw_node_key(&n, i);
		uint64_t next = i + 1 < n.nr_entries ? tfs_raw_node_key(&n, i + 1) : hi;
		if (k < lo || k >= hi || next <= k) {
			if (tfs_raw_node_is_leaf(&n))
				s->dropped_mappings++;
			continue;
		}
		if (tfs_raw_node_is_leaf(&n)) {
			r = fn(s, ctx, k, tfs_raw_node_value(&n, i));
		} else {
			uint64_t child = tfs_le64(tfs_raw_node_value(&n, i));
			r = walk(s, child, vsize, k, next > hi ? hi : next, depth + 1, what, fn, ctx);
			/* The child walk reused deeper buffers only; ours is intact. */
		}
		if (r)
			return r;
	}
	return 0;
}

/* The device for a tree key, or NULL for a key no device can have (skipped). */
static int dev_for_key(struct salvage *s, uint64_t key, struct salvaged_dev **d)
{
	*d = NULL;
	if (key > TFS_MAX_DEV_ID)
		return 0;
	*d = add_dev(s, key);
	return *d ? 0 : -ENOMEM;
}

static int on_details(struct salvage *s, void *ctx, uint64_t key, const uint8_t *v)
{
	struct salvaged_dev *d;
	int r = dev_for_key(s, key, &d);

	(void)ctx;
	if (r || !d)
		return r;
	d->details.transaction_id = tfs_le64(v + 8);
	d->details.creation_time = tfs_le32(v + 16) & TFS_TIME_MASK;
	d->details.snapshotted_time = tfs_le32(v + 20) & TFS_TIME_MASK;
	d->have_details = true;
	return 0;
}

static int on_top_level(struct salvage *s, void *ctx, uint64_t key, const uint8_t *v)
{
	struct salvaged_dev *d;
	int r = dev_for_key(s, key, &d);

	(void)ctx;
	if (r || !d)
		return r;
	d->root = tfs_le64(v);
	return 0;
}

static int on_mapping(struct salvage *s, void *ctx, uint64_t key, const uint8_t *v)
{
	struct salvaged_dev *d = ctx;
	struct spooled_mapping m = { key, tfs_le64(v) };

	if ((m.block_time >> 24) >= s->nr_data_blocks) {
		s->dropped_mappings++;
		return 0;
	}
	if (fwrite(&m, sizeof(m), 1, s->spool) != 1)
		return -EIO;
	d->nr_mappings++;
	s->nr_records++;
	return 0;
}

static int salvage(struct salvage *s)
{
	int r;

	r = walk(s, s->sb.details_root, TFS_RAW_VSIZE_DETAILS, 0, UINT64_MAX, 0, "device details",
		 on_details, NULL);
	if (!r)
		r = walk(s, s->sb.mapping_root, TFS_RAW_VSIZE_U64, 0, UINT64_MAX, 0,
			 "device list", on_top_level, NULL);
	for (size_t i = 0; !r && i < s->nr_devs; i++) {
		struct salvaged_dev *d = &s->devs[i];
		char what[64];
		if (!d->root) {
			fprintf(s->report, "lost: thin device %" PRIu64 " has details but no mappings tree;"
				" it is dropped\n", d->id);
			continue;
		}
		snprintf(what, sizeof(what), "thin device %" PRIu64 " mappings", d->id);
		d->first_record = s->nr_records;
		r = walk(s, d->root, TFS_RAW_VSIZE_U64, 0, UINT64_MAX, 0, what, on_mapping, d);
	}
	return r;
}

static int rebuild_dev(struct salvage *s, struct tfs_pmd *pmd, struct salvaged_dev *d)
{
	struct tfs_td *td;
	int r;

	r = tfs_pmd_create_thin(pmd, (tfs_dev_id)d->id);
	if (!r)
		r = tfs_pmd_open_thin(pmd, (tfs_dev_id)d->id, &td);
	if (r)
		return r;
	if (fseeko(s->spool, (off_t)(d->first_record * sizeof(struct spooled_mapping)), SEEK_SET)) {
		r = -errno;
		goto out;
	}
	for (uint64_t i = 0; i < d->nr_mappings && !r; i++) {
		struct spooled_mapping m;
		if (fread(&m, sizeof(m), 1, s->spool) != 1) {
			r = -EIO;
			break;
		}
		r = tfs_pmd_data_block_inc(pmd, m.block_time >> 24);
		if (!r)
			r = tfs_thin_insert_timed(td, m.vblock, m.block_time >> 24,
						  (uint32_t)(m.block_time & TFS_TIME_MASK));
	}
	if (!r) {
		d->details.mapped_blocks = tfs_td_mapped_blocks(td);
		r = tfs_pmd_restore_details(pmd, (tfs_dev_id)d->id, &d->details);
	}
out:
	tfs_pmd_close_thin(td);
	return r;
}

static int rebuild(struct salvage *s, struct tfs_bdev *bdev)
{
	struct tfs_pmd_options opt = { .data_block_sectors = s->sb.data_block_size,
				       .nr_data_blocks = s->nr_data_blocks };
	struct tfs_pmd *pmd;
	int r;

	r = tfs_pmd_format(bdev, &opt, &pmd);
	if (r)
		return r;
	/* needs_check is cleared: the rebuilt metadata is consistent by construction. */
	r = tfs_pmd_restore_superblock(pmd, s->sb.time, s->sb.trans_id, 0);
	for (size_t i = 0; !r && i < s->nr_devs; i++)
		if (s->devs[i].root)
			r = rebuild_dev(s, pmd, &s->devs[i]);
	if (!r)
		r = tfs_pmd_commit(pmd);
	tfs_pmd_close(pmd);
	return r;
}

int tfs_repair_metadata(struct tfs_bdev *bdev, uint64_t nr_data_blocks, FILE *report)
{
	struct salvage *s = calloc(1, sizeof(*s));
	uint8_t sbuf[TFS_BLOCK_SIZE];
	int r;

	if (!s)
		return -ENOMEM;
	s->report = report;
	r = tfs_raw_dev_init(&s->dev, bdev);
	if (!r)
		r = tfs_raw_read(&s->dev, 0, sbuf);
	if (r) {
		fprintf(report, "repair: cannot read the superblock: %s\n", strerror(-r));
		goto out;
	}
	tfs_raw_sb_decode(sbuf, &s->sb);
	if (s->sb.magic != TFS_THIN_MAGIC || s->sb.data_block_size < TFS_DATA_BLOCK_MIN_SECTORS ||
	    s->sb.data_block_size > TFS_DATA_BLOCK_MAX_SECTORS ||
	    s->sb.data_block_size % TFS_DATA_BLOCK_MIN_SECTORS) {
		fprintf(report, "repair: the superblock is unusable (magic or data block size): "
				"nothing can be salvaged without it; nothing was changed\n");
		r = -EUCLEAN;
		goto out;
	}
	s->nr_data_blocks = nr_data_blocks ? nr_data_blocks : s->sb.data_sm.nr_blocks;
	s->spool = tmpfile();
	if (!s->spool) {
		r = -errno;
		fprintf(report, "repair: cannot create a temporary file: %s\n", strerror(errno));
		goto out;
	}
	r = salvage(s);
	if (r) {
		fprintf(report, "repair: salvaging failed: %s; nothing was changed\n", strerror(-r));
		goto out;
	}
	r = rebuild(s, bdev);
	if (r) {
		fprintf(report, "repair: rebuilding the metadata failed: %s\n", strerror(-r));
		goto out;
	}
	fprintf(report, "repair: rebuilt %zu devices with %" PRIu64 " mappings; %" PRIu64
		" damaged subtrees and %" PRIu64 " bad mappings were lost\n",
		s->nr_devs, s->nr_records, s->lost_subtrees, s->dropped_mappings);
out:
	if (s->spool)
		fclose(s->spool);
	free(s->devs);
	free(s);
	return r;
}
