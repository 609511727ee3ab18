/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The btree against in-memory models, on a memory device with the real
 * block manager and transaction manager and an in-memory space map
 * (mem-sm.c).  After the interesting steps every raw node is walked and
 * checked for what thin_check demands (layout, key order, parent keys,
 * min fill, equal leaf depth), and the metadata reference counts and the
 * value reference counts seen by the value type's hooks are recomputed
 * from the trees and compared with what the space map and hooks hold.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "bdev.h"
#include "block-manager.h"
#include "btree.h"
#include "format.h"
#include "log.h"
#include "mem-sm.h"
#include "transaction-manager.h"

#define NO_VALUE UINT64_MAX

/* ---- environment ------------------------------------------------------------ */

struct env {
	struct tfs_bdev *dev;
	struct tfs_bm *bm;
	struct tfs_sm *sm;
	struct tfs_tm *tm;
	uint64_t nr_blocks;
	/* References each value id holds, as the value type's hooks saw them. */
	uint32_t *vrefs;
	uint64_t nr_values, next_value;
	uint64_t hook_errors;
};

static int vt_inc(void *ctx, const void *value)
{
	struct env *e = ctx;
	uint64_t id = tfs_le64(value);

	if (id >= e->nr_values) {
		e->hook_errors++;
		return -EINVAL;
	}
	e->vrefs[id]++;
	return 0;
}

static int vt_dec(void *ctx, const void *value)
{
	struct env *e = ctx;
	uint64_t id = tfs_le64(value);

	if (id >= e->nr_values || !e->vrefs[id]) {
		e->hook_errors++;
		return -EINVAL;
	}
	e->vrefs[id]--;
	return 0;
}

static bool vt_equal(void *ctx, const void *a, const void *b)
{
	(void)ctx;
	return tfs_le64(a) == tfs_le64(b);
}

/* An env over dev (owned from now on), which holds nr_blocks metadata blocks. */
static struct env *env_open_on(struct tfs_bdev *dev, uint64_t nr_blocks, size_t cache_blocks,
			       uint64_t nr_values)
{
	struct env *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	e->nr_blocks = nr_blocks;
	e->dev = dev;
	assert_int_equal(tfs_bm_create(e->dev, cache_blocks, &e->bm), 0);
	assert_int_equal(mem_sm_create(nr_blocks, 1, &e->sm), 0);
	assert_int_equal(tfs_tm_create(e->bm, e->sm, &e->tm), 0);
	e->nr_values = nr_values;
	e->vrefs = calloc(nr_values, sizeof(*e->vrefs));
	assert_non_null(e->vrefs);
	return e;
}

static struct env *env_open(uint64_t nr_blocks, size_t cache_blocks, uint64_t nr_values)
{
	struct tfs_bdev *dev;

	assert_int_equal(tfs_bdev_open_mem(nr_blocks * TFS_BLOCK_SIZE, &dev), 0);
	return env_open_on(dev, nr_blocks, cache_blocks, nr_values);
}

static void env_close(struct env *e)
{
	struct tfs_bm_stats st;

	tfs_bm_stats(e->bm, &st);
	assert_int_equal(st.locked, 0);
	assert_int_equal(mem_sm_errors(e->sm), 0);
	assert_int_equal(e->hook_errors, 0);
	tfs_tm_destroy(e->tm);
	tfs_bm_destroy(e->bm);
	tfs_sm_destroy(e->sm);
	tfs_bdev_close(e->dev);
	free(e->vrefs);
	free(e);
}

static struct tfs_btree_info make_info(struct env *e, unsigned levels, uint32_t vsize)
{
	return (struct tfs_btree_info){
		.tm = e->tm,
		.levels = levels,
		.value_type = { .context = e, .size = vsize, .inc = vt_inc, .dec = vt_dec },
	};
}

/* A value the caller holds one reference to, which an insert hands to the tree. */
static uint64_t new_value(struct env *e)
{
	uint64_t id = e->next_value++;

	assert_true(id < e->nr_values);
	e->vrefs[id] = 1;
	return id;
}

static void fill_nothing(void *ctx, void *sb)
{
	(void)ctx;
	(void)sb;
}

static void commit(struct env *e)
{
	struct tfs_block *sb;

	assert_int_equal(tfs_bm_write_lock_zero(e->bm, 0, &tfs_thin_sb_validator, &sb), 0);
	tfs_put_le64((uint8_t *)tfs_block_data(sb) + offsetof(struct tfs_disk_thin_sb, magic),
		     TFS_THIN_MAGIC);
	assert_int_equal(tfs_tm_commit(e->tm, sb, fill_nothing, NULL), 0);
	mem_sm_checkpoint(e->sm);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t rng_state = 0x2545F491;

static uint32_t rnd(uint32_t n)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return n ? rng_state % n : 0;
}

static void shuffle(uint64_t *a, uint64_t n)
{
	for (uint64_t i = n - 1; i > 0; i--) {
		uint64_t j = ((uint64_t)rnd(1u << 30) << 30 | rnd(1u << 30)) % (i + 1);
		uint64_t t = a[i];
		a[i] = a[j];
		a[j] = t;
	}
}

/* Log sink that counts errors instead of printing them (corruption tests). */
static unsigned logged_errors;
static void counting_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)msg;
	if (level <= TFS_LOG_ERR)
		logged_errors++;
}

/* ---- tree helpers ------------------------------------------------------------ */

static void put_value(uint8_t *v, uint32_t vsize, uint64_t id)
{
	memset(v, 0, vsize);
	tfs_put_le64(v, id);
	/* Make wide values more than an id so that copies of the whole value are checked. */
	for (uint32_t i = 8; i < vsize; i++)
		v[i] = (uint8_t)(id * 7 + i);
}

static bool insert_id(struct env *e, const struct tfs_btree_info *info, uint64_t *root,
		      const uint64_t *keys, uint64_t id)
{
	uint8_t v[TFS_BLOCK_SIZE];
	bool inserted = false;

	put_value(v, info->value_type.size, id);
	assert_int_equal(tfs_btree_insert(info, *root, keys, v, root, &inserted), 0);
	(void)e;
	return inserted;
}

static uint64_t lookup_id(const struct tfs_btree_info *info, uint64_t root, const uint64_t *keys)
{
	uint8_t v[TFS_BLOCK_SIZE], want[TFS_BLOCK_SIZE];
	int r = tfs_btree_lookup(info, root, keys, v);

	if (r == -ENODATA)
		return NO_VALUE;
	assert_int_equal(r, 0);
	put_value(want, info->value_type.size, tfs_le64(v));
	assert_memory_equal(v, want, info->value_type.size);
	return tfs_le64(v);
}

static unsigned tree_depth(struct env *e, uint64_t root)
{
	unsigned depth = 1;

	for (;;) {
		struct tfs_block *b;
		uint8_t *n;
		uint64_t child;

		assert_int_equal(tfs_tm_read_lock(e->tm, root, &tfs_btree_validator, &b), 0);
		n = tfs_block_data(b);
		if (tfs_le32(n + 4) == TFS_BTREE_LEAF) {
			tfs_tm_unlock(e->tm, b);
			return depth;
		}
		child = tfs_le64(n + 32 + 8 * tfs_le32(n + 20));
		tfs_tm_unlock(e->tm, b);
		root = child;
		depth++;
	}
}

/* Entries in leaves / their capacity, of a one-level tree. */
static double leaf_fill(const struct tfs_btree_info *info, uint64_t root)
{
	uint64_t k[TFS_BTREE_MAX_LEVELS] = { 0 };
	struct tfs_btree_shape sh;

	assert_int_equal(tfs_btree_shape(info, root, k, &sh), 0);
	return (double)sh.entries / ((double)sh.leaves * sh.leaf_capacity);
}

/* The same for internal nodes: one entry per child, and every node but the root is a child. */
static double internal_fill(const struct tfs_btree_info *info, uint64_t root)
{
	uint64_t k[TFS_BTREE_MAX_LEVELS] = { 0 };
	struct tfs_btree_shape sh;

	assert_int_equal(tfs_btree_shape(info, root, k, &sh), 0);
	assert_true(sh.internal_nodes > 0);
	return (double)(sh.leaves + sh.internal_nodes - 1) /
	       ((double)sh.internal_nodes * tfs_btree_max_entries(8));
}

struct leaf_span {
	uint64_t b, first, last;
};

/* The leaves of a one-level tree in key order, read raw; returns how many (at most max). */
static unsigned collect_leaves(struct env *e, uint64_t b, struct leaf_span *out, unsigned max,
			       unsigned nr)
{
	uint8_t n[TFS_BLOCK_SIZE];
	struct tfs_block *blk;
	uint32_t cnt, cap;

	assert_int_equal(tfs_tm_read_lock(e->tm, b, &tfs_btree_validator, &blk), 0);
	memcpy(n, tfs_block_data(blk), sizeof(n));
	tfs_tm_unlock(e->tm, blk);
	cnt = tfs_le32(n + 16);
	cap = tfs_le32(n + 20);
	if (tfs_le32(n + 4) == TFS_BTREE_LEAF) {
		assert_true(nr < max && cnt > 0);
		out[nr] = (struct leaf_span){ b, tfs_le64(n + 32), tfs_le64(n + 32 + 8 * (cnt - 1)) };
		return nr + 1;
	}
	for (uint32_t i = 0; i < cnt; i++)
		nr = collect_leaves(e, tfs_le64(n + 32 + 8 * cap + 8 * i), out, max, nr);
	return nr;
}

/* ---- model ------------------------------------------------------------------- */

/*
 * Keys of a tree with L levels map to one index, mixed radix: each upper key
 * is below udim, the last-level key below span.  One level: the key itself.
 */
struct model {
	unsigned levels;
	uint64_t udim, span, nkeys, count;
	uint64_t *val; /* value id or NO_VALUE */
};

static struct model *model_new_dims(unsigned levels, uint64_t udim, uint64_t span)
{
	struct model *m = calloc(1, sizeof(*m));

	assert_non_null(m);
	m->levels = levels;
	m->udim = udim;
	m->span = span;
	m->nkeys = span;
	for (unsigned l = 0; l + 1 < levels; l++)
		m->nkeys *= udim;
	m->val = malloc(m->nkeys * sizeof(*m->val));
	assert_non_null(m->val);
	for (uint64_t i = 0; i < m->nkeys; i++)
		m->val[i] = NO_VALUE;
	return m;
}

/* One level: nkeys keys.  Two levels: nkeys / span upper keys of span keys each. */
static struct model *model_new(unsigned levels, uint64_t nkeys, uint64_t span)
{
	return levels == 1 ? model_new_dims(1, 1, nkeys) : model_new_dims(levels, nkeys / span, span);
}

static struct model *model_copy(const struct model *src)
{
	struct model *m = model_new_dims(src->levels, src->udim, src->span);

	memcpy(m->val, src->val, src->nkeys * sizeof(*m->val));
	m->count = src->count;
	return m;
}

static void model_free(struct model *m)
{
	if (m)
		free(m->val);
	free(m);
}

/* Index of the first key of the last-level tree selected by upper keys. */
static uint64_t model_base(const struct model *m, const uint64_t *keys)
{
	uint64_t i = 0;

	for (unsigned l = 0; l + 1 < m->levels; l++)
		i = i * m->udim + keys[l];
	return i * m->span;
}

static uint64_t model_index(const struct model *m, const uint64_t *keys)
{
	return model_base(m, keys) + keys[m->levels - 1];
}

static void model_set(struct model *m, const uint64_t *keys, uint64_t id)
{
	uint64_t i = model_index(m, keys);

	m->count += m->val[i] == NO_VALUE;
	m->val[i] = id;
}

static void model_del(struct model *m, const uint64_t *keys)
{
	uint64_t i = model_index(m, keys);

	m->count -= m->val[i] != NO_VALUE;
	m->val[i] = NO_VALUE;
}

struct walk_cmp {
	const struct model *m;
	uint32_t vsize;
	uint64_t seen, last;
	bool any;
	unsigned bad;
};

static int walk_cmp_fn(void *ctx, const uint64_t *keys, const void *value)
{
	struct walk_cmp *w = ctx;
	uint64_t i = model_index(w->m, keys);
	uint8_t want[TFS_BLOCK_SIZE];

	if (i >= w->m->nkeys || (w->any && i <= w->last) || w->m->val[i] != tfs_le64(value)) {
		if (w->bad++ < 5)
			print_error("walk: key index %llu value %llu, model %llu\n",
				    (unsigned long long)i, (unsigned long long)tfs_le64(value),
				    i < w->m->nkeys ? (unsigned long long)w->m->val[i] : 0ull);
	} else {
		put_value(want, w->vsize, tfs_le64(value));
		if (memcmp(want, value, w->vsize))
			w->bad++;
	}
	w->any = true;
	w->last = i;
	w->seen++;
	return 0;
}

/* The tree holds exactly the model, in key order, and counts it right. */
static void compare_with_model(const struct tfs_btree_info *info, uint64_t root,
			       const struct model *m)
{
	struct walk_cmp w = { .m = m, .vsize = info->value_type.size };
	uint64_t count = 0;

	assert_int_equal(tfs_btree_walk(info, root, walk_cmp_fn, &w), 0);
	assert_int_equal(w.bad, 0);
	assert_int_equal(w.seen, m->count);
	assert_int_equal(tfs_btree_count(info, root, &count), 0);
	assert_int_equal(count, m->count);
}

/* ---- raw verification ---------------------------------------------------------- */

struct verifier {
	struct env *e;
	const struct tfs_btree_info *info;
	uint32_t *refs;  /* expected metadata reference counts */
	uint8_t *seen;   /* node already counted as a parent */
	uint32_t *vrefs; /* expected value reference counts */
	unsigned failures;
};

#define VCHECK(v, cond, ...)                                   \
	do {                                                   \
		if (!(cond)) {                                 \
			if ((v)->failures++ < 10)              \
				print_error(__VA_ARGS__);      \
			return;                                \
		}                                              \
	} while (0)

static void verify_node(struct verifier *v, unsigned level, uint64_t b, bool is_root,
			unsigned depth, uint64_t lo, bool has_hi, uint64_t hi, int *leaf_depth,
			uint64_t *first_key)
{
	const struct tfs_btree_info *info = v->info;
	unsigned last = info->levels - 1;
	uint8_t n[TFS_BLOCK_SIZE];
	struct tfs_block *blk;
	uint32_t flags, nr, max, vs, want_vs;
	bool first_visit;

	VCHECK(v, depth < 20, "node %llu: tree too deep\n", (unsigned long long)b);
	VCHECK(v, b < v->e->nr_blocks, "node %llu past the end\n", (unsigned long long)b);
	VCHECK(v, tfs_tm_read_lock(v->e->tm, b, &tfs_btree_validator, &blk) == 0,
	       "node %llu unreadable\n", (unsigned long long)b);
	memcpy(n, tfs_block_data(blk), sizeof(n));
	tfs_tm_unlock(v->e->tm, blk);

	flags = tfs_le32(n + 4);
	nr = tfs_le32(n + 16);
	max = tfs_le32(n + 20);
	vs = tfs_le32(n + 24);
	want_vs = flags == TFS_BTREE_INTERNAL ? 8 : level == last ? info->value_type.size : 8;
	VCHECK(v, flags == TFS_BTREE_INTERNAL || flags == TFS_BTREE_LEAF, "node %llu flags %u\n",
	       (unsigned long long)b, flags);
	VCHECK(v, tfs_le64(n + 8) == b, "node %llu claims %llu\n", (unsigned long long)b,
	       (unsigned long long)tfs_le64(n + 8));
	VCHECK(v, vs == want_vs, "node %llu value size %u, want %u\n", (unsigned long long)b, vs,
	       want_vs);
	VCHECK(v, max == tfs_btree_max_entries(vs), "node %llu max %u\n", (unsigned long long)b,
	       max);
	VCHECK(v, nr <= max, "node %llu nr %u > max\n", (unsigned long long)b, nr);
	VCHECK(v, is_root || nr >= max / 3, "node %llu underfull: %u < %u (depth %u)\n",
	       (unsigned long long)b, nr, max / 3, depth);
	VCHECK(v, flags == TFS_BTREE_LEAF || nr >= (is_root ? 2u : 1u),
	       "internal node %llu has %u entries\n", (unsigned long long)b, nr);
	VCHECK(v, tfs_le32(n + 28) == 0, "node %llu padding\n", (unsigned long long)b);
	for (uint32_t i = 0; i < nr; i++) {
		uint64_t k = tfs_le64(n + 32 + 8 * i);

		VCHECK(v, i == 0 || k > tfs_le64(n + 32 + 8 * (i - 1)),
		       "node %llu keys out of order at %u\n", (unsigned long long)b, i);
		VCHECK(v, k >= lo && (!has_hi || k < hi), "node %llu key %llu outside [%llu, %llu)\n",
		       (unsigned long long)b, (unsigned long long)k, (unsigned long long)lo,
		       (unsigned long long)hi);
	}
	/* Unused slots are zero, as the tools write them. */
	for (uint32_t i = 32 + 8 * nr; i < 32 + 8 * max; i++)
		VCHECK(v, n[i] == 0, "node %llu stale key bytes\n", (unsigned long long)b);
	for (uint32_t i = 32 + 8 * max + vs * nr; i < TFS_BLOCK_SIZE; i++)
		VCHECK(v, n[i] == 0, "node %llu stale value bytes\n", (unsigned long long)b);

	if (nr)
		*first_key = tfs_le64(n + 32);
	first_visit = !v->seen[b];
	v->seen[b] = 1;

	if (flags == TFS_BTREE_INTERNAL) {
		for (uint32_t i = 0; i < nr; i++) {
			uint64_t child = tfs_le64(n + 32 + 8 * max + 8 * i), ck = NO_VALUE;
			uint64_t k = tfs_le64(n + 32 + 8 * i);

			if (first_visit && child < v->e->nr_blocks)
				v->refs[child]++;
			verify_node(v, level, child, false, depth + 1, k, i + 1 < nr,
				    i + 1 < nr ? tfs_le64(n + 32 + 8 * (i + 1)) : 0, leaf_depth, &ck);
			VCHECK(v, ck == k, "node %llu key %u is %llu, child's first is %llu\n",
			       (unsigned long long)b, i, (unsigned long long)k,
			       (unsigned long long)ck);
		}
		return;
	}

	if (*leaf_depth < 0)
		*leaf_depth = (int)depth;
	VCHECK(v, *leaf_depth == (int)depth, "leaf %llu at depth %u, others at %d\n",
	       (unsigned long long)b, depth, *leaf_depth);
	for (uint32_t i = 0; i < nr; i++) {
		const uint8_t *val = n + 32 + 8 * max + vs * i;

		if (level < last) {
			uint64_t sub = tfs_le64(val), dummy;
			int sub_depth = -1;

			if (first_visit && sub < v->e->nr_blocks)
				v->refs[sub]++;
			verify_node(v, level + 1, sub, true, 0, 0, false, 0, &sub_depth, &dummy);
		} else if (first_visit) {
			uint64_t id = tfs_le64(val);

			VCHECK(v, id < v->e->nr_values, "leaf %llu value %llu out of range\n",
			       (unsigned long long)b, (unsigned long long)id);
			v->vrefs[id]++;
		}
	}
}

/*
 * roots are every tree alive in the env (all sharing info's shape): their
 * nodes must be well formed, the space map must count exactly one
 * reference per parent pointer (plus one per root handle and the
 * superblock), and each value must be held once per distinct leaf.
 */
static void verify_all(struct env *e, const struct tfs_btree_info *info, const uint64_t *roots,
		       unsigned nr_roots)
{
	struct verifier v = { .e = e, .info = info };
	unsigned mismatches = 0;

	v.refs = calloc(e->nr_blocks, sizeof(*v.refs));
	v.seen = calloc(e->nr_blocks, 1);
	v.vrefs = calloc(e->nr_values, sizeof(*v.vrefs));
	assert_true(v.refs && v.seen && v.vrefs);
	v.refs[0] = 1; /* superblock */
	for (unsigned i = 0; i < nr_roots; i++) {
		int leaf_depth = -1;
		uint64_t first;

		v.refs[roots[i]]++;
		verify_node(&v, 0, roots[i], true, 0, 0, false, 0, &leaf_depth, &first);
	}
	assert_int_equal(v.failures, 0);
	for (uint64_t b = 0; b < e->nr_blocks; b++) {
		if (mem_sm_count(e->sm, b) != v.refs[b] && mismatches++ < 10)
			print_error("block %llu: space map says %u, trees say %u\n",
				    (unsigned long long)b, mem_sm_count(e->sm, b), v.refs[b]);
	}
	for (uint64_t id = 0; id < e->next_value; id++) {
		if (e->vrefs[id] != v.vrefs[id] && mismatches++ < 10)
			print_error("value %llu: hooks say %u, trees say %u\n",
				    (unsigned long long)id, e->vrefs[id], v.vrefs[id]);
	}
	free(v.refs);
	free(v.seen);
	free(v.vrefs);
	assert_int_equal(mismatches, 0);
}

/* Nothing allocated but the superblock, no value referenced. */
static void assert_all_released(struct env *e)
{
	assert_int_equal(mem_sm_nr_allocated(e->sm), 1);
	for (uint64_t id = 0; id < e->next_value; id++)
		assert_int_equal(e->vrefs[id], 0);
}

/* ---- tests ------------------------------------------------------------------- */

static void test_empty_tree_is_one_empty_leaf(void **state)
{
	struct env *e = env_open(1024, 256, 16);
	struct tfs_btree_info info = make_info(e, 1, 24);
	struct tfs_btree_info info2 = make_info(e, 2, 8);
	uint64_t root, root2, key[2] = { 5, 6 }, count = 7;
	struct tfs_block *b;
	uint8_t *n;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	assert_int_equal(tfs_tm_read_lock(e->tm, root, &tfs_btree_validator, &b), 0);
	n = tfs_block_data(b);
	assert_int_equal(tfs_le32(n + 4), TFS_BTREE_LEAF);
	assert_int_equal(tfs_le64(n + 8), root);
	assert_int_equal(tfs_le32(n + 16), 0);
	assert_int_equal(tfs_le32(n + 20), 126);
	assert_int_equal(tfs_le32(n + 24), 24);
	tfs_tm_unlock(e->tm, b);
	verify_all(e, &info, &root, 1);

	/* The first level of a 2-level tree holds subtree roots: 8-byte values. */
	assert_int_equal(tfs_btree_empty(&info2, &root2), 0);
	assert_int_equal(tfs_tm_read_lock(e->tm, root2, &tfs_btree_validator, &b), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(b) + 24), 8);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(b) + 20), 252);
	tfs_tm_unlock(e->tm, b);

	assert_int_equal(tfs_btree_lookup(&info, root, key, NULL), -ENODATA);
	assert_int_equal(tfs_btree_lookup(&info2, root2, key, NULL), -ENODATA);
	assert_int_equal(tfs_btree_count(&info, root, &count), 0);
	assert_int_equal(count, 0);
	assert_int_equal(tfs_btree_lookup_range(&info2, root2, key, 0, 100, 10, NULL, NULL), 0);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_int_equal(tfs_btree_del(&info2, root2), 0);
	assert_all_released(e);
	env_close(e);
}

static void test_bad_info_is_rejected(void **state)
{
	struct env *e = env_open(64, 16, 1);
	struct tfs_btree_info info = make_info(e, 0, 8);
	uint64_t root;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), -EINVAL);
	info = make_info(e, TFS_BTREE_MAX_LEVELS + 1, 8);
	assert_int_equal(tfs_btree_empty(&info, &root), -EINVAL);
	info = make_info(e, 1, 0);
	assert_int_equal(tfs_btree_empty(&info, &root), -EINVAL);
	info = make_info(e, 1, 2000);
	assert_int_equal(tfs_btree_empty(&info, &root), -EINVAL);
	env_close(e);
}

static void test_insert_lookup_overwrite_remove(void **state)
{
	struct env *e = env_open(4096, 1024, 4096);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 2000, 0);
	uint64_t root, old_root, k[2];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 1000; i++) {
		k[0] = i * 2;
		uint64_t id = new_value(e);
		assert_true(insert_id(e, &info, &root, k, id));
		model_set(m, k, id);
	}
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	for (uint64_t i = 0; i < 2000; i++) {
		k[0] = i;
		assert_int_equal(lookup_id(&info, root, k), m->val[i]);
	}

	/* Overwrite: the old value loses the tree's reference. */
	k[0] = 10;
	uint64_t old = m->val[10], id = new_value(e);
	assert_false(insert_id(e, &info, &root, k, id));
	model_set(m, k, id);
	assert_int_equal(e->vrefs[old], 0);
	assert_int_equal(e->vrefs[id], 1);

	/* Removing an absent key changes nothing, root included. */
	k[0] = 11;
	old_root = root;
	assert_int_equal(tfs_btree_remove(&info, root, k, &root), -ENODATA);
	assert_int_equal(root, old_root);

	for (uint64_t i = 0; i < 2000; i += 6) {
		k[0] = i;
		old = m->val[i];
		assert_int_equal(tfs_btree_remove(&info, root, k, &root), 0);
		model_del(m, k);
		assert_int_equal(e->vrefs[old], 0);
		assert_int_equal(tfs_btree_lookup(&info, root, k, NULL), -ENODATA);
	}
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

static void test_overwrite_with_equal_value_keeps_its_reference(void **state)
{
	struct env *e = env_open(256, 64, 16);
	struct tfs_btree_info info = make_info(e, 1, 8);
	uint64_t root, k[2] = { 42 }, id;

	(void)state;
	info.value_type.equal = vt_equal;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	id = new_value(e);
	assert_true(insert_id(e, &info, &root, k, id));
	/* Same value again: equal() says so, the tree keeps its one reference. */
	assert_false(insert_id(e, &info, &root, k, id));
	assert_int_equal(e->vrefs[id], 1);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	env_close(e);
}

static void test_insert_below_smallest_key_keeps_parent_keys_exact(void **state)
{
	struct env *e = env_open(8192, 4096, 30000);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 40001, 0);
	uint64_t root, k[2];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	/* Descending keys: every insert goes below the smallest key in the tree. */
	for (uint64_t i = 20000; i > 0; i--) {
		uint64_t id = new_value(e);
		k[0] = i * 2;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	assert_true(tree_depth(e, root) >= 2);
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

static void test_many_inserts_split_to_depth_3(void **state)
{
	enum { N = 200000 };
	struct env *e = env_open(16384, TFS_BM_DEFAULT_CACHE_BLOCKS, N + 1);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, N * 4, 0);
	uint64_t *keys = malloc(N * sizeof(*keys)), root, k[2], count;
	double t0, t1, t2;
	uint8_t v[8];

	(void)state;
	assert_non_null(keys);
	for (uint64_t i = 0; i < N; i++)
		keys[i] = i * 4 + rnd(4);
	shuffle(keys, N);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);

	t0 = now();
	for (uint64_t i = 0; i < N; i++) {
		k[0] = keys[i];
		tfs_put_le64(v, new_value(e));
		assert_int_equal(tfs_btree_insert(&info, root, k, v, &root, NULL), 0);
	}
	t1 = now();
	for (uint64_t i = 0; i < N; i++) {
		k[0] = keys[i];
		assert_int_equal(tfs_btree_lookup(&info, root, k, v), 0);
		assert_int_equal(tfs_le64(v), i);
	}
	t2 = now();
	printf("# %d random inserts: %.0f/s; lookups: %.0f/s; depth %u\n", N, N / (t1 - t0),
	       N / (t2 - t1), tree_depth(e, root));

	for (uint64_t i = 0; i < N; i++) {
		k[0] = keys[i];
		model_set(m, k, i);
	}
	assert_true(tree_depth(e, root) >= 3);
	assert_int_equal(tfs_btree_count(&info, root, &count), 0);
	assert_int_equal(count, N);
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);

	/* Committed, the tree reads back from the device sealed and valid. */
	commit(e);
	tfs_bm_invalidate(e->bm);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	free(keys);
	model_free(m);
	env_close(e);
}

/*
 * Every commit moves what it changes to new blocks.  The committed blocks
 * that a transaction frees leave the cache, so it holds the live tree and
 * not stale copies up to its budget; an abort reads them back from disk.
 */
static void test_cache_holds_live_blocks_not_freed_ones(void **state)
{
	enum { KEYS = 1000, ROUNDS = 400 };
	struct env *e = env_open(8192, 4096, KEYS + ROUNDS + 1);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct tfs_bm_stats st;
	uint64_t root, k[1];
	uint8_t v[8];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < KEYS; i++) {
		k[0] = i;
		tfs_put_le64(v, new_value(e));
		assert_int_equal(tfs_btree_insert(&info, root, k, v, &root, NULL), 0);
	}
	commit(e);
	for (uint64_t i = 0; i < ROUNDS; i++) {
		k[0] = rnd(KEYS);
		tfs_put_le64(v, new_value(e));
		assert_int_equal(tfs_btree_insert(&info, root, k, v, &root, NULL), 0);
		commit(e);
	}
	tfs_bm_stats(e->bm, &st);
	/* a root and 4-6 leaves, the superblock; 800 shadows were made */
	assert_true(st.cached <= 16);

	/* the committed leaf of key 7 leaves the cache when shadowed; an abort reads it from disk */
	k[0] = 7;
	assert_int_equal(tfs_btree_lookup(&info, root, k, v), 0);
	uint64_t committed_value = tfs_le64(v), committed_root = root;
	tfs_put_le64(v, new_value(e));
	assert_int_equal(tfs_btree_insert(&info, root, k, v, &root, NULL), 0);
	tfs_tm_abort(e->tm);
	assert_int_equal(tfs_btree_lookup(&info, committed_root, k, v), 0);
	assert_int_equal(tfs_le64(v), committed_value);
	env_close(e);
}

/*
 * Ascending and descending runs: the node at the end of the run splits
 * alone, keeping the nodes behind the run full, and when it fills up again
 * it moves entries into its neighbour rather than splitting, until the
 * neighbour is nearly full too.
 */
static void test_sequential_and_descending_inserts_fill_leaves(void **state)
{
	enum { N = 100000 };
	struct env *e = env_open(8192, TFS_BM_DEFAULT_CACHE_BLOCKS, 2 * N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	uint64_t up, down, k[2];
	double t0, t1, f_up, f_down;
	uint8_t v[8];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &up), 0);
	t0 = now();
	for (uint64_t i = 0; i < N; i++) {
		k[0] = i;
		tfs_put_le64(v, new_value(e));
		assert_int_equal(tfs_btree_insert(&info, up, k, v, &up, NULL), 0);
	}
	t1 = now();
	/* 100000 entries would take 397 full leaves; nearly full, plus a few internal nodes. */
	printf("# %d sequential inserts: %.0f/s, %llu blocks\n", N, N / (t1 - t0),
	       (unsigned long long)mem_sm_nr_allocated(e->sm) - 1);
	assert_true(mem_sm_nr_allocated(e->sm) - 1 < 420);
	f_up = leaf_fill(&info, up);

	assert_int_equal(tfs_btree_empty(&info, &down), 0);
	for (uint64_t i = N; i > 0; i--) {
		k[0] = i;
		tfs_put_le64(v, new_value(e));
		assert_int_equal(tfs_btree_insert(&info, down, k, v, &down, NULL), 0);
	}
	f_down = leaf_fill(&info, down);
	printf("# leaf fill: ascending %.1f%%, descending %.1f%%\n", 100 * f_up, 100 * f_down);
	assert_true(f_up > 0.95 && f_down > 0.95);
	{
		uint64_t roots[2] = { up, down };
		verify_all(e, &info, roots, 2);
	}
	assert_int_equal(tfs_btree_del(&info, up), 0);
	assert_int_equal(tfs_btree_del(&info, down), 0);
	assert_all_released(e);
	env_close(e);
}

/*
 * Random inserts make room in a full node by moving entries into a sibling
 * or splitting two nodes into three, so leaves end well above the 70% of
 * plain splits.  Commits in between make the siblings clean blocks that
 * must be shadowed (copied) before entries move into them.  With 600-byte
 * values (6 per leaf) the tree is deep and internal nodes do the same.
 */
static void test_random_inserts_fill_nodes_by_moving_into_siblings(void **state)
{
	static const struct {
		uint32_t vsize, n, commit_every;
		double min_leaf_fill, min_internal_fill;
	} runs[] = {
		{ 8, 100000, 10000, 0.80, 0 }, /* 3 internal nodes: their fill says nothing */
		{ 600, 6000, 500, 0.70, 0.70 },
	};

	(void)state;
	for (unsigned r = 0; r < sizeof(runs) / sizeof(runs[0]); r++) {
		uint32_t n = runs[r].n;
		struct env *e = env_open(32768, 1024, n + 1);
		struct tfs_btree_info info = make_info(e, 1, runs[r].vsize);
		struct model *m = model_new(1, 4 * (uint64_t)n, 0);
		uint64_t *keys = malloc(n * sizeof(*keys)), root, k[2];
		double lf, inf;

		assert_non_null(keys);
		for (uint64_t i = 0; i < n; i++)
			keys[i] = i * 4 + rnd(4);
		shuffle(keys, n);
		assert_int_equal(tfs_btree_empty(&info, &root), 0);
		for (uint64_t i = 0; i < n; i++) {
			k[0] = keys[i];
			insert_id(e, &info, &root, k, new_value(e));
			model_set(m, k, i);
			if (i % runs[r].commit_every == runs[r].commit_every - 1) {
				commit(e);
				if (i % (5 * runs[r].commit_every) == 5 * runs[r].commit_every - 1) {
					verify_all(e, &info, &root, 1);
					compare_with_model(&info, root, m);
				}
			}
		}
		verify_all(e, &info, &root, 1);
		compare_with_model(&info, root, m);
		lf = leaf_fill(&info, root);
		inf = internal_fill(&info, root);
		printf("# %u random inserts of %u-byte values: leaves %.1f%% full, "
		       "internal nodes %.1f%%, depth %u\n",
		       n, runs[r].vsize, 100 * lf, 100 * inf, tree_depth(e, root));
		assert_true(lf >= runs[r].min_leaf_fill);
		assert_true(inf >= runs[r].min_internal_fill);
		assert_int_equal(tfs_btree_del(&info, root), 0);
		assert_all_released(e);
		free(keys);
		model_free(m);
		env_close(e);
	}
}

/*
 * A full leaf that already holds the key is overwritten in place: no split
 * (nothing else would be inserted), here in a root leaf that is full.
 */
static void test_overwrite_in_a_full_leaf_does_not_split(void **state)
{
	struct env *e = env_open(256, 64, 600);
	struct tfs_btree_info info = make_info(e, 1, 8);
	uint64_t root, k[2], old;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 252; i++) {
		k[0] = i;
		insert_id(e, &info, &root, k, new_value(e));
	}
	assert_int_equal(tree_depth(e, root), 1);
	k[0] = 100;
	old = lookup_id(&info, root, k);
	assert_false(insert_id(e, &info, &root, k, new_value(e)));
	assert_int_equal(e->vrefs[old], 0);
	assert_int_equal(tree_depth(e, root), 1);
	assert_int_equal(mem_sm_nr_allocated(e->sm), 2);
	/* A new key does need the room. */
	k[0] = 300;
	assert_true(insert_id(e, &info, &root, k, new_value(e)));
	assert_int_equal(tree_depth(e, root), 2);
	verify_all(e, &info, &root, 1);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	env_close(e);
}

/*
 * After a snapshot every leaf is shared.  Inserts into one leaf's key range
 * split it, then move entries between the new unshared leaves and split
 * them two into three; the shared neighbours are never copied for room
 * (that would break sharing for nothing), so every leaf of the origin
 * that is not the snapshot's own holds only keys of that one range.
 */
static void test_inserts_after_a_snapshot_leave_shared_siblings_alone(void **state)
{
	enum { N = 20000, MAXL = 200 };
	struct env *e = env_open(8192, 2048, 2 * N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 10 * N, 0), *sm;
	struct leaf_span snap_leaves[MAXL], leaves[MAXL];
	uint64_t root, snap, k[2], lo, hi, *keys;
	unsigned ns, no, mid, own = 0, nkeys = 0;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = 10 * i;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	commit(e);
	snap = root;
	assert_int_equal(tfs_tm_inc(e->tm, root), 0);
	sm = model_copy(m);

	ns = collect_leaves(e, snap, snap_leaves, MAXL, 0);
	mid = ns / 2;
	lo = snap_leaves[mid].first;
	hi = snap_leaves[mid + 1].first; /* the leaf's range is [lo, hi) */
	keys = malloc((hi - lo) * sizeof(*keys));
	assert_non_null(keys);
	for (uint64_t key = lo; key < hi; key++)
		if (key % 10)
			keys[nkeys++] = key;
	shuffle(keys, nkeys);
	for (unsigned i = 0; i < nkeys; i++) {
		uint64_t id = new_value(e);
		k[0] = keys[i];
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}

	no = collect_leaves(e, root, leaves, MAXL, 0);
	for (unsigned i = 0; i < no; i++) {
		bool shared = false;

		for (unsigned j = 0; j < ns && !shared; j++)
			shared = leaves[i].b == snap_leaves[j].b;
		if (!shared) {
			assert_true(leaves[i].first >= lo && leaves[i].last < hi);
			own++;
		}
	}
	printf("# %u inserts into one shared leaf's range: %u leaves of their own, %u shared\n",
	       nkeys, own, no - own);
	assert_int_equal(no - own, ns - 1);
	assert_true(own >= 8);
	{
		uint64_t roots[2] = { root, snap };
		verify_all(e, &info, roots, 2);
	}
	compare_with_model(&info, root, m);
	compare_with_model(&info, snap, sm);
	assert_int_equal(tfs_btree_del(&info, snap), 0);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	free(keys);
	model_free(sm);
	model_free(m);
	env_close(e);
}

static void test_remove_to_empty_keeps_min_fill(void **state)
{
	enum { N = 30000 };
	struct env *e = env_open(8192, 512, N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, N, 0);
	uint64_t *keys = malloc(N * sizeof(*keys)), root, k[2];
	struct tfs_block *b;

	(void)state;
	assert_non_null(keys);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		keys[i] = i;
		k[0] = i;
		insert_id(e, &info, &root, k, new_value(e));
		model_set(m, k, i);
	}
	commit(e);
	shuffle(keys, N);
	for (uint64_t i = 0; i < N; i++) {
		k[0] = keys[i];
		assert_int_equal(tfs_btree_remove(&info, root, k, &root), 0);
		model_del(m, k);
		if (i % 3000 == 2999) {
			verify_all(e, &info, &root, 1);
			compare_with_model(&info, root, m);
			commit(e);
		}
	}
	verify_all(e, &info, &root, 1);
	assert_int_equal(tfs_tm_read_lock(e->tm, root, &tfs_btree_validator, &b), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(b) + 4), TFS_BTREE_LEAF);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(b) + 16), 0);
	tfs_tm_unlock(e->tm, b);
	assert_int_equal(mem_sm_nr_allocated(e->sm), 2);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	free(keys);
	model_free(m);
	env_close(e);
}

/* lookup_range in the last-level tree selected by upper (NULL for one level) matches the model. */
static void check_range(const struct tfs_btree_info *info, uint64_t root, const struct model *m,
			const uint64_t *upper, uint64_t begin, uint64_t end, unsigned max)
{
	uint64_t keys[TFS_BTREE_MAX_LEVELS] = { 0 }, base, *got_k;
	uint32_t vs = info->value_type.size;
	uint8_t *got_v;
	unsigned want = 0;
	int n;

	for (unsigned l = 0; l + 1 < m->levels; l++)
		keys[l] = upper[l];
	base = model_base(m, keys);
	got_k = malloc((max + 1) * sizeof(uint64_t));
	got_v = malloc((size_t)(max + 1) * vs);
	assert_true(got_k && got_v);
	n = tfs_btree_lookup_range(info, root, keys, begin, end, max, got_k, got_v);
	assert_true(n >= 0);
	for (uint64_t k = begin; k < end && k < m->span && want < max; k++) {
		uint8_t v[TFS_BLOCK_SIZE];

		if (m->val[base + k] == NO_VALUE)
			continue;
		assert_true(want < (unsigned)n);
		assert_int_equal(got_k[want], k);
		put_value(v, vs, m->val[base + k]);
		assert_memory_equal(got_v + (size_t)want * vs, v, vs);
		want++;
	}
	assert_int_equal(n, want);
	free(got_k);
	free(got_v);
}

static void test_lookup_range_crosses_leaves(void **state)
{
	enum { N = 60000 };
	struct env *e = env_open(4096, 1024, N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 3 * N, 3 * N);
	uint64_t root, k[2];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	/* Every third key, so that ranges start and end between keys too. */
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = i * 3 + 1;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	assert_true(tree_depth(e, root) >= 2);
	check_range(&info, root, m, NULL, 0, 3 * N, 5000);
	check_range(&info, root, m, NULL, 0, UINT64_MAX, 1000);
	check_range(&info, root, m, NULL, 1, 2, 10);
	check_range(&info, root, m, NULL, 2, 4, 10);
	check_range(&info, root, m, NULL, 2, 3, 10);
	check_range(&info, root, m, NULL, 500, 90000, 100000);
	check_range(&info, root, m, NULL, 3 * N - 10, UINT64_MAX, 100);
	check_range(&info, root, m, NULL, 3 * N, UINT64_MAX, 100);
	check_range(&info, root, m, NULL, 7, 7, 100);
	check_range(&info, root, m, NULL, 9, 3, 100);
	check_range(&info, root, m, NULL, 0, 100, 0);
	for (int i = 0; i < 200; i++) {
		uint64_t b = rnd(3 * N), len = rnd(4000);
		check_range(&info, root, m, NULL, b, b + len, 1 + rnd(2000));
	}
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

static void test_remove_range_of_big_ranges(void **state)
{
	enum { N = 300000 };
	struct env *e = env_open(16384, TFS_BM_DEFAULT_CACHE_BLOCKS, N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, N, N);
	uint64_t root, snap, k[2], removed, old_root;
	struct model *snap_m;
	double t0, t1;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = i;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	commit(e);

	/* Share the tree, so the removal meets shared subtrees it must count but keep. */
	snap = root;
	assert_int_equal(tfs_tm_inc(e->tm, root), 0);
	snap_m = model_copy(m);

	t0 = now();
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 1000, 290000, &root, &removed), 0);
	t1 = now();
	printf("# remove_range of 289000 shared entries: %.1f ms\n", (t1 - t0) * 1e3);
	assert_int_equal(removed, 289000);
	for (uint64_t i = 1000; i < 290000; i++)
		m->val[i] = NO_VALUE;
	m->count -= 289000;
	{
		uint64_t roots[2] = { root, snap };
		verify_all(e, &info, roots, 2);
	}
	compare_with_model(&info, root, m);
	compare_with_model(&info, snap, snap_m);

	/* An empty range, or one with no keys, leaves the root alone. */
	old_root = root;
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 5000, 6000, &root, &removed), 0);
	assert_int_equal(removed, 0);
	assert_int_equal(root, old_root);
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 10, 10, &root, &removed), 0);
	assert_int_equal(root, old_root);

	/* The snapshot loses everything but its two ends (sharing only those with root). */
	t0 = now();
	assert_int_equal(tfs_btree_remove_range(&info, snap, k, 1, N - 1, &snap, &removed), 0);
	t1 = now();
	printf("# remove_range of %d mostly unshared entries: %.1f ms\n", N - 2, (t1 - t0) * 1e3);
	assert_int_equal(removed, N - 2);
	for (uint64_t i = 1; i < N - 1; i++)
		snap_m->val[i] = NO_VALUE;
	snap_m->count = 2;
	{
		uint64_t roots[2] = { root, snap };
		verify_all(e, &info, roots, 2);
	}
	compare_with_model(&info, snap, snap_m);

	/* Many small and medium ranges. */
	for (int i = 0; i < 300; i++) {
		uint64_t b = rnd(N), len = rnd(i % 10 ? 400 : 20000), n = 0;

		assert_int_equal(tfs_btree_remove_range(&info, root, k, b, b + len, &root, &removed),
				 0);
		for (uint64_t j = b; j < b + len && j < N; j++) {
			n += m->val[j] != NO_VALUE;
			m->val[j] = NO_VALUE;
		}
		m->count -= n;
		assert_int_equal(removed, n);
		if (i % 50 == 0) {
			uint64_t roots[2] = { root, snap };
			verify_all(e, &info, roots, 2);
			compare_with_model(&info, root, m);
		}
	}

	/* Everything, up to the largest key there can be. */
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 0, UINT64_MAX, &root, &removed), 0);
	assert_int_equal(removed, m->count);
	assert_int_equal(tfs_btree_remove_range(&info, snap, k, 0, UINT64_MAX, &snap, &removed), 0);
	assert_int_equal(removed, 2);
	{
		uint64_t roots[2] = { root, snap };
		verify_all(e, &info, roots, 2);
	}
	assert_int_equal(mem_sm_nr_allocated(e->sm), 3);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_int_equal(tfs_btree_del(&info, snap), 0);
	assert_all_released(e);
	model_free(m);
	model_free(snap_m);
	env_close(e);
}

static void test_remove_range_at_the_top_of_the_key_space(void **state)
{
	struct env *e = env_open(2048, 512, 2000);
	struct tfs_btree_info info = make_info(e, 1, 8);
	uint64_t root, k[2], removed;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 1000; i++) {
		k[0] = UINT64_MAX - i;
		insert_id(e, &info, &root, k, new_value(e));
	}
	k[0] = UINT64_MAX;
	assert_int_equal(lookup_id(&info, root, k), 0);
	assert_int_equal(tfs_btree_remove(&info, root, k, &root), 0);
	/* [begin, UINT64_MAX) cannot name the last key; a single remove can. */
	assert_int_equal(tfs_btree_remove_range(&info, root, k, UINT64_MAX - 500, UINT64_MAX, &root,
						&removed),
			 0);
	assert_int_equal(removed, 500);
	verify_all(e, &info, &root, 1);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	env_close(e);
}

static void test_two_level_tree(void **state)
{
	enum { DEVS = 10, SPAN = 5000 };
	struct env *e = env_open(8192, 2048, DEVS * SPAN);
	struct tfs_btree_info info = make_info(e, 2, 8);
	struct model *m = model_new(2, DEVS * SPAN, SPAN);
	uint64_t root, k[2], removed, old_root;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	/* Devices 0, 2, 4 ... only; device i gets i * 500 mappings. */
	for (uint64_t d = 0; d < DEVS; d += 2) {
		for (uint64_t i = 0; i < d * 500; i++) {
			uint64_t id = new_value(e);
			k[0] = d;
			k[1] = (i * 7919) % SPAN;
			assert_true(insert_id(e, &info, &root, k, id));
			model_set(m, k, id);
		}
	}
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);

	/* Shapes: every node but the top level's one leaf belongs to one device tree. */
	{
		uint64_t nodes = 0;

		for (uint64_t d = 0; d < DEVS; d++) {
			struct tfs_btree_shape sh;
			bool has = d % 2 == 0 && d > 0; /* device 0 got no mappings, so no tree */

			k[0] = d;
			assert_int_equal(tfs_btree_shape(&info, root, k, &sh), 0);
			assert_int_equal(sh.entries, has ? d * 500 : 0);
			assert_int_equal(sh.depth, has ? 2 : 0);
			assert_int_equal(sh.leaf_capacity, has ? 252 : 0);
			assert_true(sh.leaves * 252 >= sh.entries && sh.leaves * 84 <= sh.entries + 84);
			nodes += sh.leaves + sh.internal_nodes;
		}
		assert_int_equal(nodes + 1, mem_sm_nr_allocated(e->sm) - 1);
	}
	for (uint64_t d = 0; d < DEVS; d++) {
		k[0] = d;
		for (uint64_t b = 0; b < SPAN; b += 37) {
			k[1] = b;
			assert_int_equal(lookup_id(&info, root, k), m->val[d * SPAN + b]);
		}
		check_range(&info, root, m, (uint64_t[]){ d }, 0, SPAN, SPAN);
		check_range(&info, root, m, (uint64_t[]){ d }, 100, 3000, 77);
	}

	/* A missing device: nothing to find, nothing to remove, the root stays. */
	k[0] = 3;
	k[1] = 0;
	old_root = root;
	assert_int_equal(tfs_btree_remove(&info, root, k, &root), -ENODATA);
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 0, SPAN, &root, &removed), 0);
	assert_int_equal(removed, 0);
	assert_int_equal(root, old_root);

	/* Remove from one device's tree; the others are untouched. */
	k[0] = 8;
	for (uint64_t b = 0; b < SPAN; b += 3) {
		k[1] = b;
		if (m->val[8 * SPAN + b] == NO_VALUE)
			continue;
		assert_int_equal(tfs_btree_remove(&info, root, k, &root), 0);
		model_del(m, k);
	}
	k[0] = 6;
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 1000, 4000, &root, &removed), 0);
	{
		uint64_t n = 0;
		for (uint64_t b = 1000; b < 4000; b++) {
			n += m->val[6 * SPAN + b] != NO_VALUE;
			m->val[6 * SPAN + b] = NO_VALUE;
		}
		m->count -= n;
		assert_int_equal(removed, n);
	}
	/* Emptying a device keeps it: an empty leaf as its tree. */
	k[0] = 2;
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 0, UINT64_MAX, &root, &removed), 0);
	assert_int_equal(removed, 1000);
	for (uint64_t b = 0; b < SPAN; b++)
		m->val[2 * SPAN + b] = NO_VALUE;
	m->count -= 1000;
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);

	/* Inserting into a new device creates its tree on the way down. */
	k[0] = 9;
	k[1] = 17;
	{
		uint64_t id = new_value(e);
		assert_true(insert_id(e, &info, &root, k, id));
		model_set(m, k, id);
	}
	commit(e);
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

static void test_snapshot_write_leaves_origin_unchanged(void **state)
{
	enum { N = 20000 };
	struct env *e = env_open(8192, 2048, 3 * N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 2 * N, 0), *sm;
	uint64_t root, snap, k[2];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = i * 2;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	for (int committed = 0; committed < 2; committed++) {
		/* Once within the transaction that built the tree, once after a commit. */
		if (committed)
			commit(e);
		snap = root;
		assert_int_equal(tfs_tm_inc(e->tm, root), 0);
		sm = model_copy(m);

		for (int i = 0; i < 3000; i++) {
			uint64_t key = rnd(2 * N), id;
			k[0] = key;
			switch (rnd(3)) {
			case 0:
			case 1:
				id = new_value(e);
				insert_id(e, &info, &root, k, id);
				model_set(m, k, id);
				break;
			default:
				if (m->val[key] != NO_VALUE) {
					assert_int_equal(tfs_btree_remove(&info, root, k, &root), 0);
					model_del(m, k);
				}
			}
		}
		assert_int_not_equal(root, snap);
		{
			uint64_t roots[2] = { root, snap };
			verify_all(e, &info, roots, 2);
		}
		compare_with_model(&info, root, m);
		compare_with_model(&info, snap, sm);

		/* Deleting the snapshot releases only what the origin does not use. */
		assert_int_equal(tfs_btree_del(&info, snap), 0);
		verify_all(e, &info, &root, 1);
		compare_with_model(&info, root, m);
		model_free(sm);
	}
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

/* Top-level value type like the thin schema's: a value is a device tree root. */
struct subtree_ctx {
	struct env *e;
	struct tfs_btree_info *dev_info;
};

static int subtree_inc(void *ctx, const void *value)
{
	struct subtree_ctx *s = ctx;
	return tfs_tm_inc(s->e->tm, tfs_le64(value));
}

static int subtree_dec(void *ctx, const void *value)
{
	struct subtree_ctx *s = ctx;
	return tfs_btree_del(s->dev_info, tfs_le64(value));
}

static void test_shared_device_trees_in_a_two_level_tree(void **state)
{
	enum { SPAN = 4000 };
	struct env *e = env_open(8192, 1024, 4 * SPAN);
	struct tfs_btree_info info = make_info(e, 2, 8), dev_info = make_info(e, 1, 8);
	struct subtree_ctx sctx = { .e = e, .dev_info = &dev_info };
	struct tfs_btree_info top_info = {
		.tm = e->tm,
		.levels = 1,
		.value_type = { .context = &sctx, .size = 8, .inc = subtree_inc, .dec = subtree_dec },
	};
	struct model *m = model_new(2, 4 * SPAN, SPAN);
	uint64_t root, k[2], dev_root, removed;
	uint8_t v[8];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 3000; i++) {
		uint64_t id = new_value(e);
		k[0] = 1;
		k[1] = i;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	commit(e);

	/* Snapshot device 1 as device 2: one more parent for its tree root. */
	k[0] = 1;
	assert_int_equal(tfs_btree_lookup(&top_info, root, k, v), 0);
	dev_root = tfs_le64(v);
	assert_int_equal(tfs_tm_inc(e->tm, dev_root), 0);
	k[0] = 2;
	assert_int_equal(tfs_btree_insert(&top_info, root, k, v, &root, NULL), 0);
	for (uint64_t i = 0; i < SPAN; i++)
		m->val[2 * SPAN + i] = m->val[SPAN + i];
	m->count *= 2;
	assert_int_equal(mem_sm_count(e->sm, dev_root), 2);
	verify_all(e, &info, &root, 1);

	/* Writes to the snapshot break sharing along their paths only. */
	k[0] = 2;
	for (uint64_t i = 0; i < 3000; i += 50) {
		uint64_t id = new_value(e);
		k[1] = i;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 500, 700, &root, &removed), 0);
	assert_int_equal(removed, 200);
	for (uint64_t i = 500; i < 700; i++)
		model_del(m, (uint64_t[]){ 2, i });
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);

	/* Deleting device 1 through the top level leaves device 2 whole. */
	k[0] = 1;
	assert_int_equal(tfs_btree_remove(&top_info, root, k, &root), 0);
	for (uint64_t i = 0; i < SPAN; i++)
		model_del(m, (uint64_t[]){ 1, i });
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

static void test_abort_keeps_the_committed_tree(void **state)
{
	enum { N = 10000 };
	struct env *e = env_open(4096, 256, 3 * N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 2 * N, 0);
	uint64_t root, committed_root, k[2], removed;
	uint32_t *vrefs = malloc(e->nr_values * sizeof(*vrefs));

	(void)state;
	assert_non_null(vrefs);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = i;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	commit(e);
	committed_root = root;
	memcpy(vrefs, e->vrefs, e->nr_values * sizeof(*vrefs));

	for (uint64_t i = 0; i < N; i++) {
		k[0] = N + i;
		insert_id(e, &info, &root, k, new_value(e));
	}
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 100, 9000, &root, &removed), 0);
	tfs_tm_abort(e->tm);
	memcpy(e->vrefs, vrefs, e->nr_values * sizeof(*vrefs)); /* the values' owner rolls back too */

	root = committed_root;
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	free(vrefs);
	model_free(m);
	env_close(e);
}

static void test_wide_values(void **state)
{
	enum { N = 20000 };
	struct env *e = env_open(4096, 1024, N);
	struct tfs_btree_info info = make_info(e, 1, 24);
	struct model *m = model_new(1, 4 * N, 4 * N);
	uint64_t root, k[2], removed;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		uint64_t id = new_value(e);
		k[0] = rnd(4 * N);
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	check_range(&info, root, m, NULL, 1000, 30000, 3000);
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 0, 2 * N, &root, &removed), 0);
	for (uint64_t i = 0; i < 2 * N; i++)
		model_del(m, (uint64_t[]){ i, 0 });
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

/* Every node of a committed tree on the device carries a valid seal. */
struct seal_ctx {
	struct env *e;
	unsigned bad, nodes;
};

static void check_seals(struct seal_ctx *s, uint64_t b)
{
	uint8_t n[TFS_BLOCK_SIZE];
	char why[160];
	uint32_t nr, max;

	assert_int_equal(tfs_bdev_read(s->e->dev, n, sizeof(n), b * TFS_BLOCK_SIZE), 0);
	s->nodes++;
	if (tfs_btree_validator.check(&tfs_btree_validator, n, b, why, sizeof(why))) {
		s->bad++;
		return;
	}
	nr = tfs_le32(n + 16);
	max = tfs_le32(n + 20);
	if (tfs_le32(n + 4) == TFS_BTREE_INTERNAL)
		for (uint32_t i = 0; i < nr; i++)
			check_seals(s, tfs_le64(n + 32 + 8 * max + 8 * i));
}

static void test_committed_nodes_are_sealed_on_disk(void **state)
{
	struct env *e = env_open(2048, 64, 20000);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct seal_ctx s = { .e = e };
	uint64_t root, k[2];

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 20000; i++) {
		k[0] = rnd(1000000);
		insert_id(e, &info, &root, k, new_value(e));
	}
	commit(e);
	check_seals(&s, root);
	assert_true(s.nodes > 50);
	assert_int_equal(s.bad, 0);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	env_close(e);
}

/* Rewrite block b on the device through f, resealed, and drop the cache. */
static void tamper(struct env *e, uint64_t b, void (*f)(uint8_t *n, uint64_t b))
{
	uint8_t n[TFS_BLOCK_SIZE];

	assert_int_equal(tfs_bdev_read(e->dev, n, sizeof(n), b * TFS_BLOCK_SIZE), 0);
	f(n, b);
	tfs_btree_validator.prepare(&tfs_btree_validator, n, b);
	assert_int_equal(tfs_bdev_write(e->dev, n, sizeof(n), b * TFS_BLOCK_SIZE), 0);
	tfs_bm_invalidate(e->bm);
}

static void point_first_child_at_self(uint8_t *n, uint64_t b)
{
	tfs_put_le64(n + 32 + 8 * tfs_le32(n + 20), b);
}

static void make_value_size_16(uint8_t *n, uint64_t b)
{
	(void)b;
	tfs_put_le32(n + 24, 16);
	tfs_put_le32(n + 20, tfs_btree_max_entries(16));
}

static int count_fn(void *ctx, const uint64_t *keys, const void *value)
{
	(void)keys;
	(void)value;
	++*(uint64_t *)ctx;
	return 0;
}

static void test_corrupt_nodes_are_refused_not_followed(void **state)
{
	struct env *e = env_open(2048, 64, 4000);
	struct tfs_btree_info info = make_info(e, 1, 8);
	uint64_t root, k[2] = { 0 }, count = 0, removed;
	uint8_t v[8];

	(void)state;
	tfs_log_set_sink(counting_sink, NULL);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 3000; i++) {
		k[0] = i;
		insert_id(e, &info, &root, k, new_value(e));
	}
	commit(e);
	assert_true(tree_depth(e, root) == 2);

	/* A cycle: the root's first child is the root itself. */
	tamper(e, root, point_first_child_at_self);
	logged_errors = 0;
	k[0] = 5;
	assert_int_equal(tfs_btree_lookup(&info, root, k, v), -EUCLEAN);
	assert_int_equal(tfs_btree_walk(&info, root, count_fn, &count), -EUCLEAN);
	assert_int_equal(tfs_btree_lookup_range(&info, root, k, 0, 100, 10, NULL, NULL), -EUCLEAN);
	assert_int_equal(tfs_btree_count(&info, root, &count), -EUCLEAN);
	assert_true(logged_errors > 0);

	tfs_tm_abort(e->tm);
	tfs_log_set_sink(NULL, NULL);
	env_close(e);

	/* A leaf with the wrong value size for the tree. */
	e = env_open(256, 64, 10);
	info = make_info(e, 1, 8);
	tfs_log_set_sink(counting_sink, NULL);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	k[0] = 1;
	insert_id(e, &info, &root, k, new_value(e));
	commit(e);
	tamper(e, root, make_value_size_16);
	logged_errors = 0;
	assert_int_equal(tfs_btree_lookup(&info, root, k, v), -EUCLEAN);
	assert_int_equal(tfs_btree_insert(&info, root, k, v, &root, NULL), -EUCLEAN);
	assert_int_equal(tfs_btree_remove_range(&info, root, k, 0, 10, &root, &removed), -EUCLEAN);
	assert_true(logged_errors > 0);
	tfs_tm_abort(e->tm);
	tfs_log_set_sink(NULL, NULL);
	e->hook_errors = 0;
	env_close(e);
}

/* Rewrite a node with a smaller (legal) max_entries: leaves 249, internal nodes 6. */
static void shrink_max(uint8_t *n, uint64_t b)
{
	uint32_t nr = tfs_le32(n + 16), max = tfs_le32(n + 20), vs = tfs_le32(n + 24);
	uint32_t small = tfs_le32(n + 4) == TFS_BTREE_LEAF ? 249 : 6;
	uint8_t values[TFS_BLOCK_SIZE];

	(void)b;
	assert_true(nr <= small);
	memcpy(values, n + 32 + 8 * max, (size_t)vs * nr);
	memset(n + 32 + 8 * nr, 0, TFS_BLOCK_SIZE - 32 - 8 * nr);
	tfs_put_le32(n + 20, small);
	memcpy(n + 32 + 8 * small, values, (size_t)vs * nr);
}

static void test_nodes_with_smaller_max_entries_are_read_and_relaid_out(void **state)
{
	struct env *e = env_open(1024, 64, 1000);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct model *m = model_new(1, 1000, 0);
	uint64_t root, k[2], leaf;
	struct tfs_block *b;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < 300; i++) {
		uint64_t id = new_value(e);
		k[0] = i * 2;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	commit(e);
	assert_int_equal(tree_depth(e, root), 2);
	assert_int_equal(tfs_tm_read_lock(e->tm, root, &tfs_btree_validator, &b), 0);
	leaf = tfs_le64((uint8_t *)tfs_block_data(b) + 32 + 8 * 252);
	tfs_tm_unlock(e->tm, b);
	tamper(e, leaf, shrink_max);
	tamper(e, root, shrink_max);

	/* Readers follow the node's own max_entries ... */
	compare_with_model(&info, root, m);
	check_range(&info, root, m, NULL, 0, 1000, 1000);
	/* ... and writers re-lay the node out at the formula's capacity. */
	for (uint64_t i = 0; i < 300; i++) {
		uint64_t id = new_value(e);
		k[0] = i * 2 + 1;
		insert_id(e, &info, &root, k, id);
		model_set(m, k, id);
	}
	verify_all(e, &info, &root, 1);
	compare_with_model(&info, root, m);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(m);
	env_close(e);
}

/* ---- failure sweep ---------------------------------------------------------------- */

/*
 * One transaction's worth of changes to the 2-level tree at *root (which
 * shares everything with *snap at the start; keys are even): inserts that
 * split, a range removal, single removals that merge, overwrites, deleting
 * the snapshot, then inserts that move entries into siblings.
 * The model follows each step that succeeds.  Returns the first error.
 */
static int txn_ops(struct env *e, const struct tfs_btree_info *info, uint64_t *root,
		   uint64_t *snap, struct model *m)
{
	uint64_t k[2], removed;
	uint8_t v[8];
	int r;

	rng_state = 99;
	for (int i = 0; i < 400; i++) {
		uint64_t id = new_value(e);
		k[0] = 1;
		k[1] = 6000 + rnd(3000);
		tfs_put_le64(v, id);
		r = tfs_btree_insert(info, *root, k, v, root, NULL);
		if (r)
			return r;
		model_set(m, k, id);
	}
	k[0] = 2;
	r = tfs_btree_remove_range(info, *root, k, 500, 2500, root, &removed);
	if (r)
		return r;
	for (uint64_t i = 500; i < 2500; i++)
		model_del(m, (uint64_t[]){ 2, i });
	for (int i = 0; i < 300; i++) {
		k[0] = 0;
		k[1] = rnd(3000);
		if (m->val[model_index(m, k)] == NO_VALUE)
			continue;
		r = tfs_btree_remove(info, *root, k, root);
		if (r)
			return r;
		model_del(m, k);
	}
	for (int i = 0; i < 100; i++) {
		uint64_t id = new_value(e);
		k[0] = 3;
		k[1] = rnd(3000);
		tfs_put_le64(v, id);
		r = tfs_btree_insert(info, *root, k, v, root, NULL);
		if (r)
			return r;
		model_set(m, k, id);
	}
	r = tfs_btree_del(info, *snap);
	if (r)
		return r;
	*snap = 0;
	/*
	 * Now unshared: filling one committed leaf's range makes room by
	 * reading, copying and filling its clean neighbours.
	 */
	for (int i = 0; i < 300; i++) {
		uint64_t id = new_value(e);
		k[0] = 0;
		k[1] = 4001 + 2 * rnd(400);
		tfs_put_le64(v, id);
		r = tfs_btree_insert(info, *root, k, v, root, NULL);
		if (r)
			return r;
		model_set(m, k, id);
	}
	return 0;
}

/*
 * Fail the Nth metadata allocation of a transaction for N = 0, 1, 2, ...
 * until the transaction fits: every failure must come back as -ENOSPC with
 * no block left locked, and aborting must give back exactly the committed
 * trees and reference counts.
 */
static void test_failed_allocation_anywhere_aborts_to_the_committed_trees(void **state)
{
	struct env *e = env_open(4096, 256, 400000);
	struct tfs_btree_info info = make_info(e, 2, 8);
	struct model *committed = model_new(2, 4 * 9000, 9000);
	uint32_t *vrefs = malloc(e->nr_values * sizeof(*vrefs));
	uint64_t root, snap, k[2];
	unsigned failures = 0;

	(void)state;
	assert_non_null(vrefs);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t d = 0; d < 4; d++)
		for (uint64_t i = 0; i < 3000; i++) {
			uint64_t id = new_value(e);
			k[0] = d;
			k[1] = 2 * i;
			insert_id(e, &info, &root, k, id);
			model_set(committed, k, id);
		}
	snap = root;
	assert_int_equal(tfs_tm_inc(e->tm, root), 0);
	commit(e);
	memcpy(vrefs, e->vrefs, e->nr_values * sizeof(*vrefs));

	for (uint64_t n = 0;; n++) {
		struct model *m = model_copy(committed);
		uint64_t r_root = root, r_snap = snap;
		struct tfs_bm_stats st;
		int r;

		mem_sm_fail_after(e->sm, n);
		r = txn_ops(e, &info, &r_root, &r_snap, m);
		mem_sm_fail_after(e->sm, UINT64_MAX);
		tfs_bm_stats(e->bm, &st);
		assert_int_equal(st.locked, 0);
		if (!r) {
			verify_all(e, &info, &r_root, 1);
			compare_with_model(&info, r_root, m);
			root = r_root;
			model_free(m);
			break;
		}
		assert_int_equal(r, -ENOSPC);
		failures++;
		tfs_tm_abort(e->tm);
		memcpy(e->vrefs, vrefs, e->nr_values * sizeof(*vrefs));
		if (n % 16 == 0) {
			uint64_t roots[2] = { root, snap };

			verify_all(e, &info, roots, 2);
			compare_with_model(&info, root, committed);
			compare_with_model(&info, snap, committed);
		}
		model_free(m);
	}
	printf("# transaction failed cleanly at each of its %u allocations\n", failures);
	assert_true(failures > 20);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	model_free(committed);
	free(vrefs);
	env_close(e);
}

/*
 * The same transaction against a device that fails every read (then every
 * write) from the Nth on, with a small cache so that nodes are read and
 * dirty ones written back all the time: each failure is an error return
 * with nothing left locked, and abort gives back the committed trees.
 * Fuller leaves and freed blocks leaving the cache mean fewer dirty
 * write-backs than a 32-block cache once gave, hence 16 blocks; the sweep
 * still fails each of them in turn.
 */
static void test_failed_io_anywhere_aborts_to_the_committed_trees(void **state)
{
	struct tfs_bdev *mem, *dev;
	struct env *e;
	struct tfs_btree_info info;
	struct model *committed = model_new(2, 4 * 9000, 9000);
	uint32_t *vrefs;
	uint64_t root, snap, k[2];
	unsigned failures[2] = { 0, 0 };

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(4096 * TFS_BLOCK_SIZE, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &dev), 0);
	e = env_open_on(dev, 4096, 16, 400000);
	info = make_info(e, 2, 8);
	vrefs = malloc(e->nr_values * sizeof(*vrefs));
	assert_non_null(vrefs);
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t d = 0; d < 4; d++)
		for (uint64_t i = 0; i < 3000; i++) {
			uint64_t id = new_value(e);
			k[0] = d;
			k[1] = 2 * i;
			insert_id(e, &info, &root, k, id);
			model_set(committed, k, id);
		}
	snap = root;
	assert_int_equal(tfs_tm_inc(e->tm, root), 0);
	commit(e);
	memcpy(vrefs, e->vrefs, e->nr_values * sizeof(*vrefs));

	tfs_log_set_sink(counting_sink, NULL); /* every failed I/O is logged, by design */
	for (int op = TFS_FAULT_READ; op <= TFS_FAULT_WRITE; op++) {
		for (uint64_t n = 0;; n++) {
			struct model *m = model_copy(committed);
			uint64_t r_root = root, r_snap = snap;
			struct tfs_bm_stats st;
			int r;

			tfs_bm_invalidate(e->bm); /* start cold: every node is read */
			tfs_bdev_fault_set(dev, (enum tfs_fault_op)op, TFS_FAULT_EIO, n, false);
			r = txn_ops(e, &info, &r_root, &r_snap, m);
			tfs_bdev_fault_set(dev, (enum tfs_fault_op)op, TFS_FAULT_OK, 0, false);
			tfs_bm_stats(e->bm, &st);
			assert_int_equal(st.locked, 0);
			if (r)
				assert_int_equal(r, -EIO);
			if (r)
				failures[op - TFS_FAULT_READ]++;
			if (!r) {
				verify_all(e, &info, &r_root, 1);
				compare_with_model(&info, r_root, m);
			}
			tfs_tm_abort(e->tm);
			memcpy(e->vrefs, vrefs, e->nr_values * sizeof(*vrefs));
			if (!r || n % 32 == 0) {
				uint64_t roots[2] = { root, snap };

				verify_all(e, &info, roots, 2);
				compare_with_model(&info, root, committed);
			}
			model_free(m);
			if (!r)
				break;
		}
	}
	tfs_log_set_sink(NULL, NULL);
	printf("# transaction failed cleanly at each of its %u reads and %u writes\n",
	       failures[0], failures[1]);
	assert_true(failures[0] > 20 && failures[1] > 10);
	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_int_equal(tfs_btree_del(&info, snap), 0);
	assert_all_released(e);
	model_free(committed);
	free(vrefs);
	env_close(e);
}

/* ---- randomized ------------------------------------------------------------------ */

#define MAX_TREES 6

struct rtree {
	uint64_t root;
	struct model *m;
};

struct rconf {
	unsigned levels;
	uint32_t vsize;
	uint32_t udim, span; /* upper keys below udim, last-level keys below span */
	uint32_t small_range, big_range; /* longest remove_range of each kind */
	unsigned nr_ops, verify_every;
	uint64_t nr_blocks;
};

/*
 * Random inserts, overwrites, removes, range removes, range lookups,
 * snapshots (the whole tree shared by tfs_tm_inc of its root), deletes and
 * commits over up to MAX_TREES trees, each checked against its model; the
 * layout and every reference count are verified every verify_every ops.
 */
static void random_ops(const struct rconf *c, uint32_t seed)
{
	unsigned last = c->levels - 1;
	struct env *e = env_open(c->nr_blocks, 64, (uint64_t)c->nr_ops + 16);
	struct tfs_btree_info info = make_info(e, c->levels, c->vsize);
	struct rtree t[MAX_TREES];
	unsigned nr = 1;

	rng_state = seed;
	assert_int_equal(tfs_btree_empty(&info, &t[0].root), 0);
	t[0].m = model_new_dims(c->levels, c->udim, c->span);

	for (unsigned op = 0; op < c->nr_ops; op++) {
		struct rtree *x = &t[rnd(nr)];
		uint64_t k[TFS_BTREE_MAX_LEVELS], removed, old_root;
		unsigned what = rnd(100);
		bool was;

		for (unsigned l = 0; l < last; l++)
			k[l] = rnd(c->udim);
		k[last] = rnd(c->span);
		was = x->m->val[model_index(x->m, k)] != NO_VALUE;
		if (what < 50) {
			/* Insert, or overwrite an existing key. */
			uint64_t id = new_value(e);

			assert_int_equal(insert_id(e, &info, &x->root, k, id), !was);
			model_set(x->m, k, id);
		} else if (what < 75) {
			old_root = x->root;
			assert_int_equal(tfs_btree_remove(&info, x->root, k, &x->root),
					 was ? 0 : -ENODATA);
			if (!was)
				assert_int_equal(old_root, x->root);
			model_del(x->m, k);
		} else if (what < 85) {
			uint64_t begin = k[last], n = 0;
			uint64_t len = rnd(what < 83 ? c->small_range : c->big_range);
			uint64_t base = model_base(x->m, k);

			bool count = rnd(2); /* without a count, shared subtrees are not read */

			assert_int_equal(tfs_btree_remove_range(&info, x->root, k, begin, begin + len,
								&x->root, count ? &removed : NULL),
					 0);
			for (uint64_t j = begin; j < begin + len && j < c->span; j++) {
				n += x->m->val[base + j] != NO_VALUE;
				x->m->val[base + j] = NO_VALUE;
			}
			x->m->count -= n;
			if (count)
				assert_int_equal(removed, n);
		} else if (what < 90) {
			check_range(&info, x->root, x->m, k, k[last], k[last] + rnd(c->span / 2 + 1),
				    1 + rnd(c->span / 4));
		} else if (what < 94) {
			if (nr < MAX_TREES) {
				assert_int_equal(tfs_tm_inc(e->tm, x->root), 0);
				t[nr].root = x->root;
				t[nr].m = model_copy(x->m);
				nr++;
			}
		} else if (what < 97) {
			if (nr > 1) {
				unsigned i = (unsigned)(x - t);

				assert_int_equal(tfs_btree_del(&info, x->root), 0);
				model_free(x->m);
				t[i] = t[--nr];
			}
		} else {
			commit(e);
		}

		if (op % c->verify_every == c->verify_every - 1 || op == c->nr_ops - 1) {
			uint64_t roots[MAX_TREES];

			for (unsigned i = 0; i < nr; i++) {
				roots[i] = t[i].root;
				compare_with_model(&info, t[i].root, t[i].m);
			}
			verify_all(e, &info, roots, nr);
		}
	}
	for (unsigned i = 0; i < nr; i++) {
		assert_int_equal(tfs_btree_del(&info, t[i].root), 0);
		model_free(t[i].m);
	}
	assert_all_released(e);
	env_close(e);
}

static uint32_t seed_from_env(uint32_t dflt)
{
	const char *s = getenv("THINFS_SEED");

	return s ? (uint32_t)strtoul(s, NULL, 0) : dflt;
}

static void test_random_ops_one_level_match_the_model(void **state)
{
	struct rconf c = { .levels = 1, .vsize = 8, .udim = 1, .span = 12000,
			   .small_range = 240, .big_range = 3000,
			   .nr_ops = 30000, .verify_every = 1000, .nr_blocks = 16384 };

	(void)state;
	random_ops(&c, seed_from_env(1));
}

static void test_random_ops_two_levels_match_the_model(void **state)
{
	struct rconf c = { .levels = 2, .vsize = 8, .udim = 4, .span = 3000,
			   .small_range = 60, .big_range = 750,
			   .nr_ops = 30000, .verify_every = 1000, .nr_blocks = 16384 };

	(void)state;
	random_ops(&c, seed_from_env(2));
}

static void test_random_ops_wide_values_match_the_model(void **state)
{
	struct rconf c = { .levels = 1, .vsize = 24, .udim = 1, .span = 12000,
			   .small_range = 240, .big_range = 3000,
			   .nr_ops = 20000, .verify_every = 1000, .nr_blocks = 16384 };

	(void)state;
	random_ops(&c, seed_from_env(3));
}

/*
 * Values of 600 bytes leave room for 6 per leaf (min fill 2), so a few
 * thousand keys make trees three deep, where internal nodes are merged and
 * redistributed too, and root collapses happen at two heights.
 */
static void test_random_ops_deep_trees_match_the_model(void **state)
{
	struct rconf c = { .levels = 1, .vsize = 600, .udim = 1, .span = 20000,
			   .small_range = 10, .big_range = 100,
			   .nr_ops = 40000, .verify_every = 500, .nr_blocks = 65536 };

	(void)state;
	random_ops(&c, seed_from_env(4));
}

/* Upper levels with internal nodes of their own: 2000 devices, then three levels. */
static void test_random_ops_many_subtrees_match_the_model(void **state)
{
	struct rconf two = { .levels = 2, .vsize = 8, .udim = 2000, .span = 50,
			     .small_range = 5, .big_range = 30,
			     .nr_ops = 30000, .verify_every = 1000, .nr_blocks = 65536 };
	struct rconf three = { .levels = 3, .vsize = 16, .udim = 30, .span = 40,
			       .small_range = 5, .big_range = 30,
			       .nr_ops = 30000, .verify_every = 1000, .nr_blocks = 65536 };

	(void)state;
	random_ops(&two, seed_from_env(5));
	random_ops(&three, seed_from_env(6));
}

/*
 * Cold, an ordered walk reads a node's children ahead of visiting them
 * and a range lookup the leaves its range reaches; a lookup of one entry
 * reads nothing ahead, so nothing it would not have read anyway.
 */
static void test_cold_walks_read_the_children_ahead(void **state)
{
	enum { N = 30000 };
	struct env *e = env_open(4096, 1024, N);
	struct tfs_btree_info info = make_info(e, 1, 8);
	struct tfs_btree_shape sh;
	struct tfs_bm_stats st0, st1;
	uint64_t root, k[1] = { 0 }, count = 0, key;

	(void)state;
	assert_int_equal(tfs_btree_empty(&info, &root), 0);
	for (uint64_t i = 0; i < N; i++) {
		k[0] = i;
		insert_id(e, &info, &root, k, new_value(e));
	}
	commit(e);
	assert_int_equal(tfs_btree_shape(&info, root, k, &sh), 0);
	assert_true(sh.depth >= 2 && sh.leaves > 100);

	/* The walk: every node but the root was read ahead. */
	tfs_bm_invalidate(e->bm);
	tfs_bm_stats(e->bm, &st0);
	assert_int_equal(tfs_btree_walk(&info, root, count_fn, &count), 0);
	assert_int_equal(count, N);
	tfs_bm_stats(e->bm, &st1);
	assert_int_equal(st1.reads - st0.reads, sh.leaves + sh.internal_nodes);
	assert_int_equal(st1.prefetched - st0.prefetched, sh.leaves + sh.internal_nodes - 1);

	/* One entry: the path down, nothing more. */
	tfs_bm_invalidate(e->bm);
	tfs_bm_stats(e->bm, &st0);
	assert_int_equal(tfs_btree_lookup_range(&info, root, k, 1000, 9000, 1, &key, NULL), 1);
	assert_int_equal(key, 1000);
	tfs_bm_stats(e->bm, &st1);
	assert_int_equal(st1.reads - st0.reads, sh.depth);
	assert_int_equal(st1.prefetched - st0.prefetched, 0);

	/* 8,000 entries: the leaves holding them were read ahead, all but a few read on the way down. */
	tfs_bm_invalidate(e->bm);
	tfs_bm_stats(e->bm, &st0);
	assert_int_equal(tfs_btree_lookup_range(&info, root, k, 1000, 9000, 8000, NULL, NULL), 8000);
	tfs_bm_stats(e->bm, &st1);
	assert_true(st1.reads - st0.reads > 8000 / tfs_btree_max_entries(8));
	assert_true(st1.prefetched - st0.prefetched + sh.depth + 1 >= st1.reads - st0.reads);
	assert_true(st1.prefetched - st0.prefetched > 0);

	assert_int_equal(tfs_btree_del(&info, root), 0);
	assert_all_released(e);
	env_close(e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_empty_tree_is_one_empty_leaf),
		cmocka_unit_test(test_bad_info_is_rejected),
		cmocka_unit_test(test_insert_lookup_overwrite_remove),
		cmocka_unit_test(test_overwrite_with_equal_value_keeps_its_reference),
		cmocka_unit_test(test_insert_below_smallest_key_keeps_parent_keys_exact),
		cmocka_unit_test(test_many_inserts_split_to_depth_3),
		cmocka_unit_test(test_sequential_and_descending_inserts_fill_leaves),
		cmocka_unit_test(test_random_inserts_fill_nodes_by_moving_into_siblings),
		cmocka_unit_test(test_overwrite_in_a_full_leaf_does_not_split),
		cmocka_unit_test(test_inserts_after_a_snapshot_leave_shared_siblings_alone),
		cmocka_unit_test(test_cache_holds_live_blocks_not_freed_ones),
		cmocka_unit_test(test_remove_to_empty_keeps_min_fill),
		cmocka_unit_test(test_lookup_range_crosses_leaves),
		cmocka_unit_test(test_cold_walks_read_the_children_ahead),
		cmocka_unit_test(test_remove_range_of_big_ranges),
		cmocka_unit_test(test_remove_range_at_the_top_of_the_key_space),
		cmocka_unit_test(test_two_level_tree),
		cmocka_unit_test(test_snapshot_write_leaves_origin_unchanged),
		cmocka_unit_test(test_shared_device_trees_in_a_two_level_tree),
		cmocka_unit_test(test_abort_keeps_the_committed_tree),
		cmocka_unit_test(test_wide_values),
		cmocka_unit_test(test_committed_nodes_are_sealed_on_disk),
		cmocka_unit_test(test_corrupt_nodes_are_refused_not_followed),
		cmocka_unit_test(test_nodes_with_smaller_max_entries_are_read_and_relaid_out),
		cmocka_unit_test(test_failed_allocation_anywhere_aborts_to_the_committed_trees),
		cmocka_unit_test(test_failed_io_anywhere_aborts_to_the_committed_trees),
		cmocka_unit_test(test_random_ops_one_level_match_the_model),
		cmocka_unit_test(test_random_ops_two_levels_match_the_model),
		cmocka_unit_test(test_random_ops_wide_values_match_the_model),
		cmocka_unit_test(test_random_ops_deep_trees_match_the_model),
		cmocka_unit_test(test_random_ops_many_subtrees_match_the_model),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
