/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thinfs check: rebuild every reference count from the trees and compare.
 *
 * The walk visits each metadata block at most once.  Per block we keep the
 * count of references found so far (expected), what the block was first
 * reached as (kind), and for btree nodes the state of their walk (height,
 * or in progress, or bad).  A second reference to a node is allowed only for
 * the tree kinds that the format shares (mapping subtrees between devices,
 * and any tree between the live superblock and the metadata snapshot); it
 * is then not walked again, only its key range and height are checked
 * against the new parent.  That keeps the walk linear in the metadata size
 * even for pools with thousands of snapshots, and makes cycles harmless: a
 * node reached while still in progress is its own ancestor.
 */
#include "check.h"
#include "repair.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "cache-check.h"
#include "crc32c.h"
#include "pool-cfg.h"
#include "raw-meta.h"

enum kind {
	K_FREE = 0,
	K_SB,
	K_SB_COPY,
	K_MSM_INDEX,
	K_MSM_BITMAP,
	K_MSM_RC,
	K_DSM_INDEX,
	K_DSM_BITMAP,
	K_DSM_RC,
	K_DETAILS,
	K_TOP,
	K_L1,
};

static const char *const kind_names[] = {
	[K_FREE] = "unreferenced",
	[K_SB] = "superblock",
	[K_SB_COPY] = "metadata snapshot superblock",
	[K_MSM_INDEX] = "metadata space map index block",
	[K_MSM_BITMAP] = "metadata space map bitmap",
	[K_MSM_RC] = "metadata space map ref-count tree node",
	[K_DSM_INDEX] = "data space map index tree node",
	[K_DSM_BITMAP] = "data space map bitmap",
	[K_DSM_RC] = "data space map ref-count tree node",
	[K_DETAILS] = "device details tree node",
	[K_TOP] = "mapping tree top-level node",
	[K_L1] = "device mapping tree node",
};

/* Node walk state, one byte per block: height plus a flag, or a special value. */
#define ST_HEIGHT_MASK 0x1Fu
#define ST_INCOMPLETE 0x20u /* something below could not be walked */
#define ST_NONE 0xFDu       /* not a node, or not reached yet */
#define ST_BAD 0xFEu        /* the node itself is unusable */
#define ST_IN_PROGRESS 0xFFu

#define DEFAULT_MAX_REPORTS 10000u
/* A multiple of the bitmap size, so that each bitmap falls in one window. */
#define DEFAULT_DATA_WINDOW (1028ull * TFS_ENTRIES_PER_BITMAP)

struct data_bitmap {
	uint64_t blocknr; /* 0: no (valid) index entry */
	uint32_t nr_free;
	uint32_t none_free_before;
	bool present; /* an index entry names it */
	bool ok;      /* ... and the block is a valid bitmap */
};

struct checker {
	const struct tfs_check_opts *o;
	FILE *out;
	uint64_t max_reports, printed;
	struct tfs_check_result *res;

	struct tfs_raw_dev dev;
	struct tfs_raw_sb sb;

	/* Metadata blocks [0, meta_domain) are tracked. */
	uint64_t meta_domain;
	uint32_t *expected;
	uint8_t *kind;
	uint8_t *state;
	uint32_t *mappings; /* level-1 nodes: mappings in the subtree */

	/* Metadata space map. */
	bool msm_ok; /* index block usable */
	uint64_t msm_nr_blocks;
	uint64_t nr_mbitmaps;
	uint8_t (*mbitmap)[TFS_BLOCK_SIZE];
	struct data_bitmap mbm[TFS_MAX_METADATA_BITMAPS];
	int msm_rc_state;

	/* Data space map. */
	bool dsm_ok; /* small enough to check */
	uint64_t data_nr;
	uint64_t nr_dbitmaps;
	struct data_bitmap *dbm;
	int dsm_rc_state;
	uint64_t win_base, win_len;
	uint32_t *win_count;

	/* The superblock whose trees are being walked. */
	uint32_t cur_time;
	const char *prefix; /* "" or "metadata snapshot: " */
};

/* ---- reporting ----------------------------------------------------------- */

static void emit(struct checker *c, const char *tag, const char *fmt, va_list ap)
	__attribute__((format(printf, 3, 0)));
static void emit(struct checker *c, const char *tag, const char *fmt, va_list ap)
{
	if (c->o->quiet)
		return;
	if (c->printed == c->max_reports)
		fprintf(c->out, "(more problems found; not shown)\n");
	if (c->printed++ >= c->max_reports)
		return;
	fputs(tag, c->out);
	vfprintf(c->out, fmt, ap);
	fputc('\n', c->out);
}

static void problem(struct checker *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct checker *c, const char *fmt, ...)
{
	va_list ap;

	c->res->errors++;
	va_start(ap, fmt);
	emit(c, "error: ", fmt, ap);
	va_end(ap);
}

static void warning(struct checker *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warning(struct checker *c, const char *fmt, ...)
{
	va_list ap;

	c->res->warnings++;
	va_start(ap, fmt);
	emit(c, "warning: ", fmt, ap);
	va_end(ap);
}

/* Summary fields the 0.9.0 tools write inexactly: warnings unless --strict. */
static void hint_issue(struct checker *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void hint_issue(struct checker *c, const char *fmt, ...)
{
	va_list ap;

	if (c->o->strict)
		c->res->errors++;
	else
		c->res->warnings++;
	va_start(ap, fmt);
	emit(c, c->o->strict ? "error: " : "warning: ", fmt, ap);
	va_end(ap);
}

static void note(struct checker *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct checker *c, const char *fmt, ...)
{
	va_list ap;

	if (c->o->quiet)
		return;
	va_start(ap, fmt);
	vfprintf(c->out, fmt, ap);
	fputc('\n', c->out);
	va_end(ap);
}

static const char *read_error(int r)
{
	return r == -ERANGE ? "beyond the end of the metadata device" : strerror(-r);
}

/* ---- references ---------------------------------------------------------- */

enum ref { REF_FIRST, REF_AGAIN, REF_BAD };

static bool shareable(enum kind k)
{
	return k == K_DETAILS || k == K_TOP || k == K_L1;
}

/* Count one reference to block b, reached as kind k from `from`. */
static enum ref take_ref(struct checker *c, uint64_t b, enum kind k, const char *from)
{
	if (b >= c->meta_domain) {
		problem(c, "%s refers to block %" PRIu64 ", outside the metadata (%" PRIu64
			   " blocks), as %s",
			from, b, c->meta_domain, kind_names[k]);
		return REF_BAD;
	}
	if (c->expected[b] < UINT32_MAX)
		c->expected[b]++;
	if (c->kind[b] == K_FREE) {
		c->kind[b] = (uint8_t)k;
		return REF_FIRST;
	}
	if (c->kind[b] != k) {
		problem(c, "block %" PRIu64 ": used as %s and, by %s, as %s", b,
			kind_names[c->kind[b]], from, kind_names[k]);
		return REF_BAD;
	}
	if (!shareable(k)) {
		problem(c, "block %" PRIu64 " (%s): referenced more than once (again by %s)", b,
			kind_names[k], from);
		return REF_BAD;
	}
	return REF_AGAIN;
}

/* ---- btree walk ---------------------------------------------------------- */

struct tree;
typedef void (*leaf_fn)(struct checker *c, const struct tree *t, const struct tfs_raw_node *n);

struct tree {
	enum kind kind;
	uint32_t vsize;
	uint64_t dev; /* level-1 trees: the device, for messages */
	leaf_fn leaf; /* called once per distinct leaf */
	char name[96];
};

struct bounds {
	uint64_t lo;
	uint64_t hi;
	bool has_hi;
};

static int read_node(struct checker *c, const struct tree *t, uint64_t b, uint8_t *buf,
		     struct tfs_raw_node *n, bool quiet)
{
	char why[TFS_RAW_WHY_LEN];
	int r = tfs_raw_read(&c->dev, b, buf);

	if (r < 0) {
		if (!quiet)
			problem(c, "block %" PRIu64 " (%s): %s", b, t->name, read_error(r));
		return r;
	}
	r = tfs_raw_node_check(buf, b, t->vsize, n, why, sizeof(why));
	if (r < 0) {
		if (!quiet)
			problem(c, "block %" PRIu64 " (%s): %s", b, t->name, why);
		return r;
	}
	if (n->max_unusual && !quiet)
		warning(c, "block %" PRIu64 " (%s): max_entries %" PRIu32 " (usual: %" PRIu32 ")",
			b, t->name, n->max_entries, tfs_btree_max_entries(n->value_size));
	return 0;
}

/* Fill, key order and key range of a node: reported once each per node. */
static void check_node_keys(struct checker *c, const struct tree *t, const struct tfs_raw_node *n,
			    const struct bounds *bd, bool is_root)
{
	bool order_bad = false, range_bad = false;

	if (!is_root && n->nr_entries < tfs_raw_node_min_entries(n))
		problem(c, "block %" PRIu64 " (%s): non-root node has %" PRIu32
			   " entries, fewer than %" PRIu32,
			n->blocknr, t->name, n->nr_entries, tfs_raw_node_min_entries(n));
	if (!tfs_raw_node_is_leaf(n) && n->nr_entries == 0)
		problem(c, "block %" PRIu64 " (%s): internal node with no entries", n->blocknr,
			t->name);

	for (uint32_t i = 0; i < n->nr_entries; i++) {
		uint64_t k = tfs_raw_node_key(n, i);

		if (!order_bad && i > 0 && k <= tfs_raw_node_key(n, i - 1)) {
			order_bad = true;
			problem(c, "block %" PRIu64 " (%s): keys out of order at entry %" PRIu32
				   " (%" PRIu64 " after %" PRIu64 ")",
				n->blocknr, t->name, i, k, tfs_raw_node_key(n, i - 1));
		}
		if (!range_bad && (k < bd->lo || (bd->has_hi && k >= bd->hi))) {
			range_bad = true;
			if (k < bd->lo)
				problem(c, "block %" PRIu64 " (%s): key %" PRIu64
					   " below its parent's key %" PRIu64,
					n->blocknr, t->name, k, bd->lo);
			else
				problem(c, "block %" PRIu64 " (%s): key %" PRIu64
					   " not below the parent's next key %" PRIu64
					   " (overlaps the next subtree)",
					n->blocknr, t->name, k, bd->hi);
		}
	}
}

/*
 * Highest key under an already-walked node: follow the last child down.
 * Returns false when the subtree is empty or cannot be read again.
 */
static bool subtree_max_key(struct checker *c, const struct tree *t, uint64_t b, uint64_t *key)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	struct tfs_raw_node n;

	for (int depth = 0; depth < TFS_RAW_MAX_DEPTH; depth++) {
		if (read_node(c, t, b, buf, &n, true) < 0 || n.nr_entries == 0)
			return false;
		if (tfs_raw_node_is_leaf(&n)) {
			*key = tfs_raw_node_key(&n, n.nr_entries - 1);
			return true;
		}
		b = tfs_le64(tfs_raw_node_value(&n, n.nr_entries - 1));
	}
	return false;
}

/* A shared node reached again: check it fits its new parent. */
static int revisit(struct checker *c, const struct tree *t, uint64_t b, const struct bounds *bd,
		   bool is_root)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	struct tfs_raw_node n;
	uint8_t st = c->state[b];
	uint64_t max_key;

	if (st == ST_IN_PROGRESS) {
		problem(c, "block %" PRIu64 " (%s): cycle: the node is its own ancestor", b,
			t->name);
		return -1;
	}
	if (st == ST_BAD || st == ST_NONE)
		return -1;
	if (read_node(c, t, b, buf, &n, true) < 0)
		return -1;
	if (!is_root && n.nr_entries < tfs_raw_node_min_entries(&n))
		problem(c, "block %" PRIu64 " (%s): shared node used as a non-root node has only %" PRIu32
			   " entries",
			b, t->name, n.nr_entries);
	if (n.nr_entries && tfs_raw_node_key(&n, 0) < bd->lo)
		problem(c, "block %" PRIu64 " (%s): shared node's first key %" PRIu64
			   " is below its parent's key %" PRIu64,
			b, t->name, tfs_raw_node_key(&n, 0), bd->lo);
	if (bd->has_hi && subtree_max_key(c, t, b, &max_key) && max_key >= bd->hi)
		problem(c, "block %" PRIu64 " (%s): shared subtree's last key %" PRIu64
			   " is not below the parent's next key %" PRIu64,
			b, t->name, max_key, bd->hi);
	return st;
}

static int walk_node(struct checker *c, const struct tree *t, uint64_t b, const struct bounds *bd,
		     int depth, bool is_root, const char *from);

/* Walk the children of internal node n; returns its state byte or -1. */
static int walk_children(struct checker *c, const struct tree *t, const struct tfs_raw_node *n,
			 const struct bounds *bd, int depth)
{
	char from[256];
	int child_height = -1;
	bool incomplete = false;
	uint64_t sum = 0;

	snprintf(from, sizeof(from), "block %" PRIu64 " (%s)", n->blocknr, t->name);
	for (uint32_t i = 0; i < n->nr_entries; i++) {
		uint64_t child = tfs_le64(tfs_raw_node_value(n, i));
		struct bounds cb = {
			.lo = tfs_raw_node_key(n, i),
			.hi = i + 1 < n->nr_entries ? tfs_raw_node_key(n, i + 1) : bd->hi,
			.has_hi = i + 1 < n->nr_entries || bd->has_hi,
		};
		int r = walk_node(c, t, child, &cb, depth + 1, false, from);

		if (r < 0) {
			incomplete = true;
			continue;
		}
		if (r & ST_INCOMPLETE)
			incomplete = true;
		if (child_height < 0) {
			child_height = r & ST_HEIGHT_MASK;
		} else if ((r & ST_HEIGHT_MASK) != (unsigned)child_height) {
			problem(c, "block %" PRIu64 " (%s): children of different heights (child %" PRIu64
				   "): leaves are not all at one depth",
				n->blocknr, t->name, child);
			incomplete = true;
		}
		if (t->kind == K_L1)
			sum += c->mappings[child];
	}
	if (child_height < 0)
		return -1;
	c->mappings[n->blocknr] = sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
	return (child_height + 1) | (incomplete ? ST_INCOMPLETE : 0);
}

/*
 * Walk the subtree at b.  Returns the node's state byte (height, maybe
 * ST_INCOMPLETE) or -1 when the node is unusable.  Recursion is bounded by
 * TFS_RAW_MAX_DEPTH; each frame holds one block.
 */
static int walk_node(struct checker *c, const struct tree *t, uint64_t b, const struct bounds *bd,
		     int depth, bool is_root, const char *from)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	struct tfs_raw_node n;
	int st;

	if (depth >= TFS_RAW_MAX_DEPTH) {
		problem(c, "block %" PRIu64 " (%s): tree deeper than %d levels (cycle?)", b, t->name,
			TFS_RAW_MAX_DEPTH);
		return -1;
	}
	switch (take_ref(c, b, t->kind, from)) {
	case REF_BAD:
		return -1;
	case REF_AGAIN:
		return revisit(c, t, b, bd, is_root);
	case REF_FIRST:
		break;
	}
	c->state[b] = ST_IN_PROGRESS;
	if (read_node(c, t, b, buf, &n, false) < 0) {
		c->state[b] = ST_BAD;
		return -1;
	}
	check_node_keys(c, t, &n, bd, is_root);
	if (tfs_raw_node_is_leaf(&n)) {
		if (t->leaf)
			t->leaf(c, t, &n);
		if (t->kind == K_L1)
			c->mappings[b] = n.nr_entries;
		st = 0;
	} else {
		st = walk_children(c, t, &n, bd, depth);
	}
	c->state[b] = st < 0 ? ST_BAD : (uint8_t)st;
	return st;
}

/* Walk a whole tree from a root held outside any tree (superblock, leaf value). */
static int walk_tree(struct checker *c, const struct tree *t, uint64_t root, const char *from)
{
	struct bounds bd = { 0, 0, false };

	return walk_node(c, t, root, &bd, 0, true, from);
}

/* A walk result or state byte saying: usable, and everything below was walked. */
static bool walk_complete(int st)
{
	return st >= 0 && st <= (int)ST_HEIGHT_MASK;
}

/* ---- leaves -------------------------------------------------------------- */

static void data_ref(struct checker *c, uint64_t dblock)
{
	uint64_t off = dblock - c->win_base;

	if (dblock >= c->win_base && off < c->win_len && c->win_count[off] < UINT32_MAX)
		c->win_count[off]++;
}

static void leaf_mappings(struct checker *c, const struct tree *t, const struct tfs_raw_node *n)
{
	bool time_bad = false, range_bad = false;

	for (uint32_t i = 0; i < n->nr_entries; i++) {
		uint64_t vblock = tfs_raw_node_key(n, i);
		uint64_t dblock;
		uint32_t time;

		tfs_unpack_block_time(tfs_le64(tfs_raw_node_value(n, i)), &dblock, &time);
		if (time > c->cur_time && !time_bad) {
			time_bad = true; /* one line per leaf is enough to find it */
			problem(c, "block %" PRIu64 " (%s): block %" PRIu64 " mapped at time %" PRIu32
				   ", after the pool's time %" PRIu32,
				n->blocknr, t->name, vblock, time, c->cur_time);
		}
		if (dblock >= c->data_nr) {
			if (!range_bad)
				problem(c, "block %" PRIu64 " (%s): block %" PRIu64
					   " maps data block %" PRIu64 ", beyond the data device (%" PRIu64
					   " blocks)",
					n->blocknr, t->name, vblock, dblock, c->data_nr);
			range_bad = true;
			continue;
		}
		data_ref(c, dblock);
	}
}

static void leaf_top_level(struct checker *c, const struct tree *t, const struct tfs_raw_node *n)
{
	char from[256];

	for (uint32_t i = 0; i < n->nr_entries; i++) {
		struct tree l1 = {
			.kind = K_L1,
			.vsize = TFS_RAW_VSIZE_U64,
			.dev = tfs_raw_node_key(n, i),
			.leaf = leaf_mappings,
		};

		snprintf(l1.name, sizeof(l1.name), "%smapping tree of device %" PRIu64, c->prefix,
			 l1.dev);
		snprintf(from, sizeof(from), "block %" PRIu64 " (%s), device %" PRIu64, n->blocknr,
			 t->name, l1.dev);
		walk_tree(c, &l1, tfs_le64(tfs_raw_node_value(n, i)), from);
	}
}

/* Ref-count trees: keys are blocks of the map's domain, values counts >= 3. */
static void leaf_ref_counts(struct checker *c, const struct tree *t, const struct tfs_raw_node *n)
{
	uint64_t domain = t->kind == K_MSM_RC ? c->msm_nr_blocks : c->data_nr;

	for (uint32_t i = 0; i < n->nr_entries; i++) {
		uint64_t b = tfs_raw_node_key(n, i);
		uint32_t count = tfs_le32(tfs_raw_node_value(n, i));

		if (b >= domain)
			problem(c, "block %" PRIu64 " (%s): entry for block %" PRIu64
				   " beyond the space map (%" PRIu64 " blocks)",
				n->blocknr, t->name, b, domain);
		else if (count < 3)
			problem(c, "block %" PRIu64 " (%s): count %" PRIu32 " for block %" PRIu64
				   " (only counts >= 3 belong here)",
				n->blocknr, t->name, count, b);
	}
}

static bool check_bitmap_block(struct checker *c, uint64_t b, enum kind k, uint8_t *buf,
			       const char *from)
{
	char why[TFS_RAW_WHY_LEN];
	int r;

	if (take_ref(c, b, k, from) != REF_FIRST)
		return false;
	r = tfs_raw_read(&c->dev, b, buf);
	if (r < 0) {
		problem(c, "block %" PRIu64 " (%s): %s", b, kind_names[k], read_error(r));
		return false;
	}
	if (tfs_raw_bitmap_check(buf, b, why, sizeof(why)) < 0) {
		problem(c, "block %" PRIu64 " (%s): %s", b, kind_names[k], why);
		return false;
	}
	return true;
}

static void leaf_data_index(struct checker *c, const struct tree *t, const struct tfs_raw_node *n)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	char from[256];

	for (uint32_t i = 0; i < n->nr_entries; i++) {
		uint64_t k = tfs_raw_node_key(n, i);
		const uint8_t *v = tfs_raw_node_value(n, i);
		struct data_bitmap *dbm;

		if (k >= c->nr_dbitmaps) {
			problem(c, "block %" PRIu64 " (%s): entry for bitmap %" PRIu64
				   ", but %" PRIu64 " data blocks need only %" PRIu64,
				n->blocknr, t->name, k, c->data_nr, c->nr_dbitmaps);
			continue;
		}
		snprintf(from, sizeof(from), "block %" PRIu64 " (%s), bitmap %" PRIu64, n->blocknr,
			 t->name, k);
		if (!c->dbm) { /* map too big to compare: only count the bitmap's block */
			check_bitmap_block(c, tfs_le64(v), K_DSM_BITMAP, buf, from);
			continue;
		}
		dbm = &c->dbm[k];
		dbm->present = true;
		dbm->blocknr = tfs_le64(v + offsetof(struct tfs_disk_index_entry, blocknr));
		dbm->nr_free = tfs_le32(v + offsetof(struct tfs_disk_index_entry, nr_free));
		dbm->none_free_before =
			tfs_le32(v + offsetof(struct tfs_disk_index_entry, none_free_before));
		dbm->ok = check_bitmap_block(c, dbm->blocknr, K_DSM_BITMAP, buf, from);
	}
}

/* ---- superblock ---------------------------------------------------------- */

static bool block_is_zero(const uint8_t *p)
{
	for (size_t i = 0; i < TFS_BLOCK_SIZE; i++)
		if (p[i])
			return false;
	return true;
}

/* Returns false when nothing else can be checked. */
static bool check_superblock(struct checker *c)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	struct tfs_raw_sb *sb = &c->sb;
	uint32_t dbs;
	int r;

	if (c->dev.nr_blocks == 0) {
		problem(c, "the metadata device is smaller than one block (4096 bytes)");
		return false;
	}
	r = tfs_raw_read(&c->dev, 0, buf);
	if (r < 0) {
		problem(c, "block 0 (superblock): %s", read_error(r));
		return false;
	}
	if (block_is_zero(buf)) {
		problem(c, "block 0 (superblock) is all zeros: not formatted");
		return false;
	}
	tfs_raw_sb_decode(buf, sb);
	if (sb->magic != TFS_THIN_MAGIC) {
		problem(c, "block 0 (superblock): bad magic %" PRIu64 " (expected %llu): "
			   "not thin-pool metadata",
			sb->magic, TFS_THIN_MAGIC);
		return false;
	}
	/* With a good magic the rest is still worth reading, to say more. */
	if (sb->csum != tfs_block_csum(buf, TFS_SALT_THIN_SB))
		problem(c, "block 0 (superblock): bad checksum (stored 0x%08" PRIx32
			   ", computed 0x%08" PRIx32 ")",
			sb->csum, tfs_block_csum(buf, TFS_SALT_THIN_SB));
	if (sb->blocknr != 0)
		problem(c, "block 0 (superblock): wrong block number %" PRIu64 " in its header",
			sb->blocknr);
	if (sb->version != 1 && sb->version != 2)
		problem(c, "block 0 (superblock): unknown version %" PRIu32 " (1 or 2)",
			sb->version);
	if (sb->flags & ~TFS_THIN_FLAG_NEEDS_CHECK)
		warning(c, "block 0 (superblock): unknown flags 0x%" PRIx32, sb->flags);
	if (sb->metadata_block_size != TFS_BLOCK_SIZE >> TFS_SECTOR_SHIFT)
		problem(c, "block 0 (superblock): metadata block size %" PRIu32 " sectors (must be 8)",
			sb->metadata_block_size);
	dbs = sb->data_block_size;
	if (dbs < TFS_DATA_BLOCK_MIN_SECTORS || dbs > TFS_DATA_BLOCK_MAX_SECTORS ||
	    dbs % TFS_DATA_BLOCK_MIN_SECTORS)
		problem(c, "block 0 (superblock): data block size %" PRIu32
			   " sectors (must be 128..2097152, a multiple of 128)",
			dbs);
	if (sb->incompat_flags)
		problem(c, "block 0 (superblock): unknown incompatible features 0x%" PRIx32,
			sb->incompat_flags);
	if (sb->compat_ro_flags)
		problem(c, "block 0 (superblock): unknown read-only-compatible features 0x%" PRIx32
			   " (the pool could only be opened read-only)",
			sb->compat_ro_flags);
	if (sb->compat_flags)
		warning(c, "block 0 (superblock): unknown compatible features 0x%" PRIx32,
			sb->compat_flags);
	if (sb->metadata_nr_blocks == 0 || sb->metadata_nr_blocks > TFS_MAX_METADATA_BLOCKS)
		problem(c, "block 0 (superblock): metadata_nr_blocks %" PRIu64
			   " (must be 1..%u)",
			sb->metadata_nr_blocks, TFS_MAX_METADATA_BLOCKS);
	else if (sb->metadata_nr_blocks > c->dev.nr_blocks)
		problem(c, "block 0 (superblock): metadata_nr_blocks %" PRIu64
			   ", but the device holds only %" PRIu64 " blocks",
			sb->metadata_nr_blocks, c->dev.nr_blocks);
	c->res->needs_check = sb->flags & TFS_THIN_FLAG_NEEDS_CHECK;
	if (c->res->needs_check)
		note(c, "needs_check flag is set");
	return true;
}

/* Decide which metadata blocks are tracked and allocate the per-block arrays. */
static int setup_meta_domain(struct checker *c)
{
	uint64_t nr = c->sb.meta_sm.nr_blocks;

	if (nr != c->sb.metadata_nr_blocks)
		warning(c, "metadata space map covers %" PRIu64
			   " blocks, the superblock's metadata_nr_blocks says %" PRIu64,
			nr, c->sb.metadata_nr_blocks);
	if (nr == 0 || nr > TFS_MAX_METADATA_BLOCKS) {
		problem(c, "metadata space map: nr_blocks %" PRIu64 " (must be 1..%u)", nr,
			TFS_MAX_METADATA_BLOCKS);
		nr = nr ? TFS_MAX_METADATA_BLOCKS : c->sb.metadata_nr_blocks;
		if (nr == 0 || nr > TFS_MAX_METADATA_BLOCKS)
			nr = TFS_MAX_METADATA_BLOCKS;
	}
	c->msm_nr_blocks = nr;
	c->nr_mbitmaps = (nr + TFS_ENTRIES_PER_BITMAP - 1) / TFS_ENTRIES_PER_BITMAP;
	if (nr > c->dev.nr_blocks) {
		problem(c, "metadata space map covers %" PRIu64
			   " blocks, but the device holds only %" PRIu64,
			nr, c->dev.nr_blocks);
		nr = c->dev.nr_blocks;
	}
	c->meta_domain = nr;
	c->expected = calloc(nr, sizeof(*c->expected));
	c->kind = calloc(nr, sizeof(*c->kind));
	c->state = malloc(nr);
	c->mappings = calloc(nr, sizeof(*c->mappings));
	c->mbitmap = calloc(c->nr_mbitmaps, TFS_BLOCK_SIZE);
	if (!c->expected || !c->kind || !c->state || !c->mappings || !c->mbitmap)
		return -ENOMEM;
	memset(c->state, ST_NONE, nr);
	c->kind[0] = K_SB;
	c->expected[0] = 1;
	return 0;
}

/* ---- space maps: structure ----------------------------------------------- */

static void walk_metadata_sm(struct checker *c)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	char why[TFS_RAW_WHY_LEN], from[160];
	uint64_t idx = c->sb.meta_sm.bitmap_root;
	struct tree rc = { .kind = K_MSM_RC, .vsize = TFS_RAW_VSIZE_COUNT, .leaf = leaf_ref_counts,
			   .name = "metadata space map ref-count tree" };
	int r;

	if (take_ref(c, idx, K_MSM_INDEX, "the superblock's metadata space map root") != REF_FIRST)
		goto rc_tree;
	r = tfs_raw_read(&c->dev, idx, buf);
	if (r < 0) {
		problem(c, "block %" PRIu64 " (%s): %s", idx, kind_names[K_MSM_INDEX], read_error(r));
		goto rc_tree;
	}
	if (tfs_raw_index_check(buf, idx, why, sizeof(why)) < 0) {
		problem(c, "block %" PRIu64 " (%s): %s", idx, kind_names[K_MSM_INDEX], why);
		goto rc_tree;
	}
	c->msm_ok = true;
	for (uint64_t k = 0; k < TFS_MAX_METADATA_BITMAPS; k++) {
		const uint8_t *e = buf + offsetof(struct tfs_disk_metadata_index, index) +
				   k * sizeof(struct tfs_disk_index_entry);
		struct data_bitmap *m = &c->mbm[k];

		m->blocknr = tfs_le64(e + offsetof(struct tfs_disk_index_entry, blocknr));
		m->nr_free = tfs_le32(e + offsetof(struct tfs_disk_index_entry, nr_free));
		m->none_free_before =
			tfs_le32(e + offsetof(struct tfs_disk_index_entry, none_free_before));
		if (k >= c->nr_mbitmaps) {
			if (m->blocknr || m->nr_free || m->none_free_before)
				warning(c, "block %" PRIu64 " (%s): unused entry %" PRIu64
					   " is not zero",
					idx, kind_names[K_MSM_INDEX], k);
			continue;
		}
		snprintf(from, sizeof(from), "block %" PRIu64 " (%s), entry %" PRIu64, idx,
			 kind_names[K_MSM_INDEX], k);
		m->ok = check_bitmap_block(c, m->blocknr, K_MSM_BITMAP, c->mbitmap[k], from);
	}
rc_tree:
	c->msm_rc_state = walk_tree(c, &rc, c->sb.meta_sm.ref_count_root,
				    "the superblock's metadata space map root");
}

static int walk_data_sm(struct checker *c)
{
	struct tree index = { .kind = K_DSM_INDEX, .vsize = TFS_RAW_VSIZE_INDEX,
			      .leaf = leaf_data_index, .name = "data space map index tree" };
	struct tree rc = { .kind = K_DSM_RC, .vsize = TFS_RAW_VSIZE_COUNT, .leaf = leaf_ref_counts,
			   .name = "data space map ref-count tree" };
	uint64_t win;

	c->data_nr = c->sb.data_sm.nr_blocks;
	c->nr_dbitmaps = c->data_nr / TFS_ENTRIES_PER_BITMAP +
			 (c->data_nr % TFS_ENTRIES_PER_BITMAP != 0);
	/*
	 * Every bitmap is a metadata block of its own: more cannot be real.
	 * The trees are still walked, for their blocks' metadata counts.
	 */
	if (c->nr_dbitmaps > c->meta_domain) {
		problem(c, "data space map: %" PRIu64 " blocks would need %" PRIu64
			   " bitmaps, more than there are metadata blocks; data counts not checked",
			c->data_nr, c->nr_dbitmaps);
	} else {
		c->dbm = calloc(c->nr_dbitmaps ? c->nr_dbitmaps : 1, sizeof(*c->dbm));
		if (!c->dbm)
			return -ENOMEM;
	}
	walk_tree(c, &index, c->sb.data_sm.bitmap_root, "the superblock's data space map root");
	for (uint64_t k = 0; c->dbm && k < c->nr_dbitmaps; k++)
		if (!c->dbm[k].present)
			problem(c, "data space map index tree: no entry for bitmap %" PRIu64
				   " (data blocks %" PRIu64 "..%" PRIu64 ")",
				k, k * TFS_ENTRIES_PER_BITMAP,
				(k + 1) * TFS_ENTRIES_PER_BITMAP - 1);
	c->dsm_rc_state = walk_tree(c, &rc, c->sb.data_sm.ref_count_root,
				    "the superblock's data space map root");
	if (!c->dbm)
		return 0;

	win = c->o->data_window ? c->o->data_window : DEFAULT_DATA_WINDOW;
	win = (win + TFS_ENTRIES_PER_BITMAP - 1) / TFS_ENTRIES_PER_BITMAP * TFS_ENTRIES_PER_BITMAP;
	c->win_base = 0;
	c->win_len = c->data_nr < win ? c->data_nr : win;
	c->win_count = calloc(c->win_len ? c->win_len : 1, sizeof(*c->win_count));
	if (!c->win_count)
		return -ENOMEM;
	c->dsm_ok = true;
	return 0;
}

/* ---- devices ------------------------------------------------------------- */

struct dev_entry {
	uint64_t id;
	uint64_t v1; /* details: mapped_blocks; top level: subtree root */
	uint32_t creation_time, snapshotted_time;
};

struct dev_vec {
	struct dev_entry *v;
	size_t n, cap;
};

static int dev_push(struct dev_vec *dv, const struct dev_entry *e)
{
	if (dv->n == dv->cap) {
		size_t cap = dv->cap ? dv->cap * 2 : 64;
		struct dev_entry *v = realloc(dv->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		dv->v = v;
		dv->cap = cap;
	}
	dv->v[dv->n++] = *e;
	return 0;
}

/* Entries of a tree already walked without errors; -ENOMEM or -EUCLEAN. */
static int collect(struct checker *c, uint64_t root, uint32_t vsize, const char *tree,
		   struct dev_vec *dv)
{
	struct tfs_raw_iter *it;
	const uint8_t *v;
	uint64_t key;
	int r;

	r = tfs_raw_iter_open(&c->dev, root, vsize, 0, &it);
	while (r >= 0 && (r = tfs_raw_iter_next(it, &key, &v)) > 0) {
		struct dev_entry e = { .id = key, .v1 = tfs_le64(v) };

		if (vsize == TFS_RAW_VSIZE_DETAILS) {
			e.creation_time = tfs_le32(v + offsetof(struct tfs_disk_device_details,
								 creation_time));
			e.snapshotted_time = tfs_le32(v + offsetof(struct tfs_disk_device_details,
								    snapshotted_time));
		}
		r = dev_push(dv, &e);
	}
	/* The walk passed, so the iterator can only fail on a shared node's new context. */
	if (r < 0 && r != -ENOMEM)
		problem(c, "%s%s: %s", c->prefix, tree, tfs_raw_iter_why(it));
	tfs_raw_iter_close(it);
	return r;
}

static void check_device(struct checker *c, const struct dev_entry *d, const struct dev_entry *m)
{
	uint64_t root = m->v1;

	if (d->id > TFS_MAX_DEV_ID)
		warning(c, "%sdevice %" PRIu64 ": id above the kernel's limit of %u", c->prefix,
			d->id, TFS_MAX_DEV_ID);
	if (d->creation_time > c->cur_time || d->snapshotted_time > c->cur_time)
		warning(c, "%sdevice %" PRIu64 ": creation time %" PRIu32 " / snapshot time %" PRIu32
			   " after the pool's time %" PRIu32,
			c->prefix, d->id, d->creation_time, d->snapshotted_time, c->cur_time);
	if (root < c->meta_domain && c->kind[root] == K_L1 && walk_complete(c->state[root]) &&
	    c->mappings[root] != d->v1)
		problem(c, "%sdevice %" PRIu64 ": mapped_blocks is %" PRIu64
			   ", but its mapping tree holds %" PRIu32 " mappings",
			c->prefix, d->id, d->v1, c->mappings[root]);
}

/* Details and top level must name the same devices; mapped_blocks must be right. */
static int check_devices(struct checker *c, uint64_t details_root, uint64_t mapping_root,
			 bool count)
{
	struct dev_vec det = { 0 }, top = { 0 };
	size_t i = 0, j = 0;
	int r;

	r = collect(c, details_root, TFS_RAW_VSIZE_DETAILS, "device details tree", &det);
	if (r >= 0)
		r = collect(c, mapping_root, TFS_RAW_VSIZE_U64, "mapping tree", &top);
	if (r < 0)
		goto out;
	while (i < det.n || j < top.n) {
		if (j == top.n || (i < det.n && det.v[i].id < top.v[j].id)) {
			problem(c, "%sdevice %" PRIu64
				   " is in the device details tree but has no mapping tree",
				c->prefix, det.v[i].id);
			i++;
		} else if (i == det.n || top.v[j].id < det.v[i].id) {
			problem(c, "%sdevice %" PRIu64
				   " has a mapping tree but no entry in the device details tree",
				c->prefix, top.v[j].id);
			j++;
		} else {
			check_device(c, &det.v[i], &top.v[j]);
			i++;
			j++;
		}
	}
	if (count)
		c->res->nr_devices = det.n;
out:
	free(det.v);
	free(top.v);
	return r == -ENOMEM ? r : 0;
}

/* The details and mapping trees of one superblock (live, or the snapshot copy). */
static int walk_pool_trees(struct checker *c, const struct tfs_raw_sb *sb, const char *from,
			   bool live)
{
	struct tree details = { .kind = K_DETAILS, .vsize = TFS_RAW_VSIZE_DETAILS };
	struct tree top = { .kind = K_TOP, .vsize = TFS_RAW_VSIZE_U64, .leaf = leaf_top_level };
	char from_d[160], from_m[160];
	int sd, sm;

	c->cur_time = sb->time;
	snprintf(details.name, sizeof(details.name), "%sdevice details tree", c->prefix);
	snprintf(top.name, sizeof(top.name), "%smapping tree (top level)", c->prefix);
	snprintf(from_d, sizeof(from_d), "%s's device details root", from);
	snprintf(from_m, sizeof(from_m), "%s's mapping root", from);
	sd = walk_tree(c, &details, sb->details_root, from_d);
	sm = walk_tree(c, &top, sb->mapping_root, from_m);
	if (!walk_complete(sd) || !walk_complete(sm))
		return 0; /* the damage is reported; comparing half-read trees adds noise */
	return check_devices(c, sb->details_root, sb->mapping_root, live);
}

static int walk_metadata_snapshot(struct checker *c)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	uint64_t b = c->sb.held_root;
	struct tfs_raw_sb copy;
	int r;

	if (!b)
		return 0;
	if (take_ref(c, b, K_SB_COPY, "the superblock's held root") != REF_FIRST)
		return 0;
	r = tfs_raw_read(&c->dev, b, buf);
	if (r < 0) {
		problem(c, "block %" PRIu64 " (%s): %s", b, kind_names[K_SB_COPY], read_error(r));
		return 0;
	}
	tfs_raw_sb_decode(buf, &copy);
	if (copy.csum != tfs_block_csum(buf, TFS_SALT_THIN_SB)) {
		problem(c, "block %" PRIu64 " (%s): bad checksum", b, kind_names[K_SB_COPY]);
		return 0;
	}
	if (copy.blocknr != b || copy.magic != TFS_THIN_MAGIC) {
		problem(c, "block %" PRIu64 " (%s): %s", b, kind_names[K_SB_COPY],
			copy.magic != TFS_THIN_MAGIC ? "bad magic" : "wrong block number in its header");
		return 0;
	}
	if (copy.held_root)
		problem(c, "block %" PRIu64 " (%s): has a held root of its own (%" PRIu64 ")", b,
			kind_names[K_SB_COPY], copy.held_root);
	if (!copy.sm_fields_zero)
		warning(c, "block %" PRIu64 " (%s): space map roots are not zeroed", b,
			kind_names[K_SB_COPY]);
	if (copy.time > c->sb.time || copy.trans_id > c->sb.trans_id)
		warning(c, "block %" PRIu64 " (%s): newer (time %" PRIu32 ", transaction %" PRIu64
			   ") than the live superblock",
			b, kind_names[K_SB_COPY], copy.time, copy.trans_id);
	c->prefix = "metadata snapshot: ";
	r = walk_pool_trees(c, &copy, "metadata snapshot superblock", false);
	c->prefix = "";
	return r;
}

/* ---- space maps: counts -------------------------------------------------- */

/* Sorted walk of a ref-count tree, in step with the blocks being compared. */
struct rc_cursor {
	struct tfs_raw_iter *it;
	bool live;  /* has a current entry */
	bool dead;  /* tree unusable: counts >= 3 cannot be checked */
	uint64_t key;
	uint32_t count;
};

static void rc_advance(struct rc_cursor *rc)
{
	const uint8_t *v;
	int r;

	rc->live = false;
	if (rc->dead)
		return;
	r = tfs_raw_iter_next(rc->it, &rc->key, &v);
	if (r > 0) {
		rc->count = tfs_le32(v);
		rc->live = true;
	} else if (r < 0) {
		rc->dead = true;
	}
}

static int rc_open(struct checker *c, struct rc_cursor *rc, uint64_t root, int walk_state,
		   uint64_t start)
{
	int r;

	memset(rc, 0, sizeof(*rc));
	if (!walk_complete(walk_state)) {
		rc->dead = true;
		return 0;
	}
	r = tfs_raw_iter_open(&c->dev, root, TFS_RAW_VSIZE_COUNT, start, &rc->it);
	if (r == -ENOMEM)
		return r;
	if (r < 0)
		rc->dead = true;
	rc_advance(rc);
	return 0;
}

static void rc_close(struct rc_cursor *rc)
{
	if (rc->it)
		tfs_raw_iter_close(rc->it);
}

/*
 * On-disk count of block b whose bitmap entry is e.  Entries of the tree
 * for blocks skipped (their bitmap was unusable) are passed over quietly.
 * Returns false when the count cannot be known.
 */
static bool disk_count(struct checker *c, struct rc_cursor *rc, const char *map, uint64_t b,
		       unsigned e, uint32_t *count)
{
	while (rc->live && rc->key < b)
		rc_advance(rc);
	if (rc->live && rc->key == b) {
		uint32_t tree_count = rc->count;

		rc_advance(rc);
		if (e != 3) {
			problem(c, "%s: block %" PRIu64 " is in the ref-count tree (count %" PRIu32
				   "), but its bitmap entry says %u",
				map, b, tree_count, e);
			*count = e;
			return true;
		}
		*count = tree_count;
		return true;
	}
	*count = e;
	if (e != 3)
		return true;
	if (!rc->dead)
		problem(c, "%s: block %" PRIu64 " has bitmap entry 3 (count >= 3) but no entry in the "
			   "ref-count tree",
			map, b);
	return false;
}

/* Allocation hints of one bitmap against its contents. */
static void check_index_hints(struct checker *c, const char *map, uint64_t k,
			      const struct data_bitmap *m, const uint8_t *bitmap, uint64_t in_range)
{
	uint64_t free_in_range = 0, free_all = 0, first_free = TFS_ENTRIES_PER_BITMAP;

	for (uint32_t i = 0; i < TFS_ENTRIES_PER_BITMAP; i++) {
		if (tfs_raw_bitmap_entry(bitmap, i))
			continue;
		free_all++;
		if (i < in_range) {
			free_in_range++;
			if (first_free == TFS_ENTRIES_PER_BITMAP)
				first_free = i;
		}
	}
	/* The kernel counts the entries past the end as free, the 0.9.0 tools do not. */
	if (m->nr_free != free_in_range && m->nr_free != free_all)
		hint_issue(c, "%s: index entry %" PRIu64 " says nr_free %" PRIu32
			      ", the bitmap has %" PRIu64 " free entries",
			   map, k, m->nr_free, free_in_range);
	if (first_free < m->none_free_before)
		hint_issue(c, "%s: index entry %" PRIu64 " says none_free_before %" PRIu32
			      ", but entry %" PRIu64 " is free",
			   map, k, m->none_free_before, first_free);
}

static void report_meta_mismatch(struct checker *c, uint64_t b, uint32_t disk, uint32_t want)
{
	if (want == 0)
		problem(c, "block %" PRIu64 ": count %" PRIu32
			   " in the metadata space map, but nothing references it (leaked)",
			b, disk);
	else if (disk == 0)
		problem(c, "block %" PRIu64 " (%s): referenced %" PRIu32
			   " time(s) but free in the metadata space map",
			b, kind_names[c->kind[b]], want);
	else
		problem(c, "block %" PRIu64 " (%s): metadata space map count %" PRIu32
			   ", expected %" PRIu32,
			b, kind_names[c->kind[b]], disk, want);
}

/* Entries for blocks past the end of the map must be zero. */
static void check_bitmap_tail(struct checker *c, const char *map, uint64_t k,
			      const uint8_t *bitmap, uint64_t in_range)
{
	for (uint64_t i = in_range; i < TFS_ENTRIES_PER_BITMAP; i++)
		if (tfs_raw_bitmap_entry(bitmap, (uint32_t)i)) {
			hint_issue(c, "%s: bitmap %" PRIu64 " has a count for block %" PRIu64
				      ", past the end of the map",
				   map, k, k * TFS_ENTRIES_PER_BITMAP + i);
			return;
		}
}

static int compare_metadata_sm(struct checker *c)
{
	static const char map[] = "metadata space map";
	struct rc_cursor rc;
	uint64_t allocated = 0;
	bool all_known = c->msm_ok;
	int r;

	if (!c->msm_ok) {
		note(c, "metadata reference counts not compared: no usable index block");
		return 0;
	}
	r = rc_open(c, &rc, c->sb.meta_sm.ref_count_root, c->msm_rc_state, 0);
	if (r < 0)
		return r;
	for (uint64_t k = 0; k < c->nr_mbitmaps; k++) {
		uint64_t base = k * TFS_ENTRIES_PER_BITMAP;
		uint64_t in_range = c->msm_nr_blocks - base;
		const uint8_t *bm = c->mbitmap[k];

		if (!c->mbm[k].ok) {
			all_known = false;
			continue;
		}
		if (in_range > TFS_ENTRIES_PER_BITMAP)
			in_range = TFS_ENTRIES_PER_BITMAP;
		check_index_hints(c, map, k, &c->mbm[k], bm, in_range);
		check_bitmap_tail(c, map, k, bm, in_range);
		for (uint64_t i = 0; i < in_range; i++) {
			uint64_t b = base + i;
			unsigned e = tfs_raw_bitmap_entry(bm, (uint32_t)i);
			uint32_t disk;

			allocated += e != 0;
			if (b >= c->meta_domain)
				continue; /* past the device: reported as a size problem */
			if (!disk_count(c, &rc, map, b, e, &disk))
				continue;
			if (disk != c->expected[b])
				report_meta_mismatch(c, b, disk, c->expected[b]);
		}
	}
	rc_close(&rc);
	c->res->meta_used = allocated;
	c->res->meta_total = c->msm_nr_blocks;
	if (all_known && allocated != c->sb.meta_sm.nr_allocated)
		hint_issue(c, "%s: nr_allocated is %" PRIu64 ", the bitmaps hold %" PRIu64
			      " blocks in use",
			   map, c->sb.meta_sm.nr_allocated, allocated);
	return 0;
}

/* Count data references of every distinct level-1 leaf into the current window. */
static void recount_window(struct checker *c)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	struct tree t = { .kind = K_L1, .vsize = TFS_RAW_VSIZE_U64, .name = "mapping tree" };
	struct tfs_raw_node n;

	memset(c->win_count, 0, c->win_len * sizeof(*c->win_count));
	for (uint64_t b = 0; b < c->meta_domain; b++) {
		if (c->kind[b] != K_L1 || c->state[b] != 0)
			continue;
		if (read_node(c, &t, b, buf, &n, true) < 0 || !tfs_raw_node_is_leaf(&n))
			continue;
		for (uint32_t i = 0; i < n.nr_entries; i++)
			data_ref(c, tfs_le64(tfs_raw_node_value(&n, i)) >> 24);
	}
}

static void report_data_mismatch(struct checker *c, uint64_t b, uint32_t disk, uint32_t want)
{
	if (want == 0)
		problem(c, "data block %" PRIu64 ": count %" PRIu32
			   " in the data space map, but no mapping references it (leaked)",
			b, disk);
	else if (disk == 0)
		problem(c, "data block %" PRIu64 ": mapped by %" PRIu32
			   " leaf node(s) but free in the data space map",
			b, want);
	else
		problem(c, "data block %" PRIu64 ": data space map count %" PRIu32
			   ", expected %" PRIu32 " (distinct leaves mapping it)",
			b, disk, want);
}

static void compare_data_bitmap(struct checker *c, struct rc_cursor *rc, uint64_t k,
				uint64_t *allocated)
{
	static const char map[] = "data space map";
	uint8_t bm[TFS_BLOCK_SIZE];
	char why[TFS_RAW_WHY_LEN];
	struct data_bitmap *m = &c->dbm[k];
	uint64_t base = k * TFS_ENTRIES_PER_BITMAP;
	uint64_t in_range = c->data_nr - base;

	if (!m->ok)
		return;
	/* Checked when the index was walked; only a changing device fails here. */
	if (tfs_raw_read(&c->dev, m->blocknr, bm) < 0 ||
	    tfs_raw_bitmap_check(bm, m->blocknr, why, sizeof(why)) < 0) {
		problem(c, "block %" PRIu64 " (%s): unreadable on the second pass", m->blocknr,
			kind_names[K_DSM_BITMAP]);
		return;
	}
	if (in_range > TFS_ENTRIES_PER_BITMAP)
		in_range = TFS_ENTRIES_PER_BITMAP;
	check_index_hints(c, map, k, m, bm, in_range);
	check_bitmap_tail(c, map, k, bm, in_range);
	for (uint64_t i = 0; i < in_range; i++) {
		uint64_t b = base + i;
		unsigned e = tfs_raw_bitmap_entry(bm, (uint32_t)i);
		uint32_t disk, want = c->win_count[b - c->win_base];

		*allocated += e != 0;
		if (disk_count(c, rc, map, b, e, &disk) && disk != want)
			report_data_mismatch(c, b, disk, want);
	}
}

static int compare_data_sm(struct checker *c)
{
	uint64_t allocated = 0;
	bool all_known = true;
	int r = 0;

	if (!c->dsm_ok)
		return 0;
	for (c->win_base = 0; c->win_base < c->data_nr; c->win_base += c->win_len) {
		uint64_t kfirst = c->win_base / TFS_ENTRIES_PER_BITMAP;
		uint64_t end = c->data_nr - c->win_base < c->win_len ? c->data_nr
								      : c->win_base + c->win_len;
		uint64_t klast = (end - 1) / TFS_ENTRIES_PER_BITMAP;
		struct rc_cursor rc;

		if (c->win_base > 0)
			recount_window(c);
		r = rc_open(c, &rc, c->sb.data_sm.ref_count_root, c->dsm_rc_state, c->win_base);
		if (r < 0)
			return r;
		for (uint64_t k = kfirst; k <= klast; k++) {
			all_known &= c->dbm[k].ok;
			compare_data_bitmap(c, &rc, k, &allocated);
		}
		rc_close(&rc);
	}
	c->res->data_used = allocated;
	c->res->data_total = c->data_nr;
	if (all_known && allocated != c->sb.data_sm.nr_allocated)
		hint_issue(c, "data space map: nr_allocated is %" PRIu64 ", the bitmaps hold %" PRIu64
			      " blocks in use",
			   c->sb.data_sm.nr_allocated, allocated);
	return 0;
}

/* ---- driver -------------------------------------------------------------- */

static int clear_needs_check(struct checker *c)
{
	uint8_t buf[TFS_BLOCK_SIZE];
	int r;

	r = tfs_raw_read(&c->dev, 0, buf);
	if (r < 0)
		return r;
	tfs_put_le32(buf + offsetof(struct tfs_disk_thin_sb, flags),
		     c->sb.flags & ~TFS_THIN_FLAG_NEEDS_CHECK);
	tfs_put_le32(buf, tfs_block_csum(buf, TFS_SALT_THIN_SB));
	r = tfs_bdev_write(c->dev.bdev, buf, TFS_BLOCK_SIZE, 0);
	if (r < 0)
		return r;
	return tfs_bdev_flush(c->dev.bdev);
}

static void free_checker(struct checker *c)
{
	free(c->expected);
	free(c->kind);
	free(c->state);
	free(c->mappings);
	free(c->mbitmap);
	free(c->dbm);
	free(c->win_count);
}

static int run_checks(struct checker *c)
{
	int r;

	if (!check_superblock(c))
		return 0;
	r = setup_meta_domain(c);
	if (r < 0)
		return r;
	walk_metadata_sm(c);
	r = walk_data_sm(c);
	if (r < 0)
		return r;
	r = walk_pool_trees(c, &c->sb, "the superblock", true);
	if (r < 0)
		return r;
	r = walk_metadata_snapshot(c);
	if (r < 0)
		return r;
	r = compare_metadata_sm(c);
	if (r < 0)
		return r;
	return compare_data_sm(c);
}

int tfs_check_metadata(struct tfs_bdev *bdev, const struct tfs_check_opts *o,
		       struct tfs_check_result *res)
{
	struct checker c = {
		.o = o,
		.out = o->out ? o->out : stdout,
		.max_reports = o->max_reports ? o->max_reports : DEFAULT_MAX_REPORTS,
		.res = res,
		.prefix = "",
	};
	int r;

	memset(res, 0, sizeof(*res));
	r = tfs_raw_dev_init(&c.dev, bdev);
	if (r < 0) {
		problem(&c, "cannot get the metadata device size: %s", strerror(-r));
		return 0;
	}
	r = run_checks(&c);
	if (r < 0)
		goto out;
	if (o->clear_needs_check && res->needs_check) {
		if (res->errors) {
			note(&c, "needs_check left set: the metadata has problems");
		} else {
			r = clear_needs_check(&c);
			if (r < 0)
				goto out;
			res->cleared_needs_check = true;
			note(&c, "needs_check flag cleared");
		}
	}
out:
	free_checker(&c);
	return r;
}

/* ---- command line -------------------------------------------------------- */

static void check_usage(FILE *f)
{
	fputs("Usage: thinfs check [options] METADATA|POOL.cfg\n"
	      "Check thin-pool metadata offline: superblock, every btree, device details,\n"
	      "and the metadata and data reference counts.\n"
	      "\n"
	      "      --clear-needs-check  clear the needs_check flag if the metadata is clean\n"
	      "                           (--clear-needs-check-flag is accepted too)\n"
	      "      --repair             rebuild the metadata in place from what can be read,\n"
	      "                           report what was lost, clear needs_check\n"
	      "      --strict             nr_allocated, nr_free and none_free_before must be\n"
	      "                           exact (thin_restore 0.9.0 writes them inexactly)\n"
	      "  -q, --quiet              print nothing; the exit status tells\n"
	      "  -h, --help               this text\n"
	      "\n"
	      "Exit status: 0 clean (warnings allowed), 1 problems found, 2 usage or\n"
	      "operational error.\n",
	      f);
}

enum { OPT_CLEAR = 256, OPT_REPAIR, OPT_STRICT, OPT_MAX_REPORTS, OPT_DATA_WINDOW };

static int parse_count(const char *s, uint64_t *out)
{
	char *end;

	if (!*s || *s == '-')
		return -EINVAL;
	errno = 0;
	*out = strtoull(s, &end, 0);
	return errno || *end ? -EINVAL : 0;
}

int tfs_cmd_check(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "clear-needs-check", no_argument, NULL, OPT_CLEAR },
		{ "clear-needs-check-flag", no_argument, NULL, OPT_CLEAR },
		{ "repair", no_argument, NULL, OPT_REPAIR },
		{ "strict", no_argument, NULL, OPT_STRICT },
		/* For tests: cap the output, and force several data-counting passes. */
		{ "max-reports", required_argument, NULL, OPT_MAX_REPORTS },
		{ "data-window", required_argument, NULL, OPT_DATA_WINDOW },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct tfs_check_opts o = { 0 };
	struct tfs_check_result res;
	struct tfs_bdev *bdev;
	char path[4096];
	bool repair = false;
	int c, r, cow;

	optind = 1;
	while ((c = getopt_long(argc, argv, "qh", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_CLEAR:
			o.clear_needs_check = true;
			break;
		case OPT_REPAIR:
			repair = true;
			break;
		case OPT_STRICT:
			o.strict = true;
			break;
		case OPT_MAX_REPORTS:
		case OPT_DATA_WINDOW:
			if (parse_count(optarg, c == OPT_MAX_REPORTS ? &o.max_reports
								      : &o.data_window) < 0) {
				fprintf(stderr, "thinfs check: bad number '%s'\n", optarg);
				return 2;
			}
			break;
		case 'q':
			o.quiet = true;
			break;
		case 'h':
			check_usage(stdout);
			return 0;
		default:
			check_usage(stderr);
			return 2;
		}
	}
	if (optind + 1 != argc) {
		check_usage(stderr);
		return 2;
	}
	if (tfs_pool_cfg_metadata_path(argv[optind], path, sizeof(path)) < 0)
		return 2;
	r = tfs_bdev_open(path, !o.clear_needs_check && !repair, &bdev);
	if (r < 0)
		return 2; /* logged by tfs_bdev_open */
	if (repair) {
		/* Then check the result like any other metadata, so the report ends with its verdict. */
		r = tfs_repair_metadata(bdev, 0, o.quiet ? stderr : stdout);
		if (r < 0) {
			tfs_bdev_close(bdev);
			return 2;
		}
	}
	r = tfs_check_metadata(bdev, &o, &res);
	tfs_bdev_close(bdev);
	if (r < 0) {
		fprintf(stderr, "thinfs check: %s: %s\n", path, strerror(-r));
		return 2;
	}
	if (!o.quiet) {
		if (res.errors)
			printf("%s: %" PRIu64 " error(s), %" PRIu64 " warning(s)\n", path, res.errors,
			       res.warnings);
		else
			printf("%s: clean%s: %" PRIu64 " device(s), metadata %" PRIu64 "/%" PRIu64
			       " blocks used, data %" PRIu64 "/%" PRIu64 " blocks used\n",
			       path, res.warnings ? " (with warnings)" : "", res.nr_devices,
			       res.meta_used, res.meta_total, res.data_used, res.data_total);
	}
	cow = tfs_pool_cfg_check_cow_stores(argv[optind], o.quiet);
	if (cow == 2)
		return 2;
	r = tfs_check_caches(argv[optind], o.clear_needs_check || repair, o.quiet);
	if (r == 2)
		return 2;
	return res.errors || cow || r ? 1 : 0;
}
