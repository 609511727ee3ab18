/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Space maps: the bitmap encoding against the format document's examples,
 * then both maps against a model of reference counts through random
 * allocations, incs and decs (counts going past 2 and back), commits,
 * aborts, reopens and extends.  The model also enforces the allocation
 * rule: a block that was in use at any moment since the last commit is
 * never handed out again before the next one.  When thin_check is
 * installed, an image built with both maps must pass it.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "block-manager.h"
#include "btree.h"
#include "format.h"
#include "log.h"
#include "space-map-common.h"
#include "space-map-disk.h"
#include "space-map-metadata.h"
#include "space-map.h"
#include "transaction-manager.h"

#define E TFS_ENTRIES_PER_BITMAP

static uint32_t rng_state = 2463534242u;
static uint32_t rnd(uint32_t n)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return rng_state % n;
}

/* ---- encoding ---------------------------------------------------------- */

static void test_data_bitmap_bytes_decode_as_documented(void **state)
{
	/* Format doc 1.4.2: a data bitmap starting ff ff 5f 55 = counts 3 x10, then 2 x6. */
	uint8_t words[TFS_BITMAP_WORDS * 8] = { 0xff, 0xff, 0x5f, 0x55 };
	uint8_t built[TFS_BITMAP_WORDS * 8] = { 0 };
	uint32_t i;

	(void)state;
	for (i = 0; i < 16; i++) {
		unsigned want = i < 10 ? 3 : 2;

		assert_int_equal(tfs_sm_bitmap_get(words, i), want);
		tfs_sm_bitmap_set(built, i, want);
	}
	for (i = 16; i < E; i++)
		assert_int_equal(tfs_sm_bitmap_get(words, i), 0);
	assert_memory_equal(words, built, sizeof(words));
	assert_int_equal(tfs_sm_bitmap_find_free(words, NULL, 0, E), 16);
	assert_int_equal(tfs_sm_bitmap_count_free(words, 0, E), E - 16);
}

static void test_metadata_bitmap_word_decodes_as_documented(void **state)
{
	/* aa aa a8 02: blocks 0-7 count 1, block 8 count 0, blocks 9-12 count 1. */
	uint8_t words[TFS_BITMAP_WORDS * 8] = { 0xaa, 0xaa, 0xa8, 0x02 };
	uint8_t built[TFS_BITMAP_WORDS * 8] = { 0 };
	uint32_t i, nr_free, nfb;

	(void)state;
	for (i = 0; i < 13; i++) {
		unsigned want = i == 8 ? 0 : 1;

		assert_int_equal(tfs_sm_bitmap_get(words, i), want);
		tfs_sm_bitmap_set(built, i, want);
	}
	assert_int_equal(tfs_sm_bitmap_get(words, 13), 0);
	assert_memory_equal(words, built, sizeof(words));

	assert_int_equal(tfs_sm_bitmap_find_free(words, NULL, 0, E), 8);
	assert_int_equal(tfs_sm_bitmap_find_free(words, NULL, 9, E), 13);
	/* nr_free counts every zero entry of the block, in range or not. */
	tfs_sm_bitmap_hints(words, 20, &nr_free, &nfb);
	assert_int_equal(nr_free, E - 12);
	assert_int_equal(nfb, 8);
	/* No free entry in range: none_free_before is the in-range length. */
	tfs_sm_bitmap_hints(words, 8, &nr_free, &nfb);
	assert_int_equal(nfb, 8);
	tfs_sm_bitmap_hints(words, 5, &nr_free, &nfb);
	assert_int_equal(nfb, 5);
}

static void test_bitmap_set_touches_only_its_entry(void **state)
{
	uint8_t words[TFS_BITMAP_WORDS * 8];
	unsigned model[E];
	uint32_t i, n;

	(void)state;
	memset(words, 0, sizeof(words));
	memset(model, 0, sizeof(model));
	for (n = 0; n < 100000; n++) {
		i = rnd(E);
		model[i] = rnd(4);
		tfs_sm_bitmap_set(words, i, model[i]);
	}
	for (i = 0; i < E; i++)
		assert_int_equal(tfs_sm_bitmap_get(words, i), model[i]);
	/* Last entry lives in the top bits of the last word. */
	memset(words, 0, sizeof(words));
	tfs_sm_bitmap_set(words, E - 1, 1);
	assert_int_equal(words[sizeof(words) - 1], 0x80);
	assert_int_equal(tfs_sm_bitmap_count_free(words, 0, E), E - 1);
	assert_int_equal(tfs_sm_bitmap_find_free(words, NULL, E - 1, E), E);
}

static void test_find_free_honours_barrier_and_range(void **state)
{
	uint8_t words[TFS_BITMAP_WORDS * 8] = { 0 };
	uint64_t barrier[TFS_BITMAP_WORDS] = { 0 };
	uint32_t i;

	(void)state;
	for (i = 0; i < 100; i++)
		tfs_sm_bitmap_set(words, i, 1);
	/* Entries 100..199 free now but "used since the last commit". */
	for (i = 100; i < 200; i++)
		barrier[i / 32] |= 1ull << (2 * (i % 32));
	assert_int_equal(tfs_sm_bitmap_find_free(words, NULL, 0, E), 100);
	assert_int_equal(tfs_sm_bitmap_find_free(words, barrier, 0, E), 200);
	assert_int_equal(tfs_sm_bitmap_find_free(words, barrier, 0, 200), 200);
	assert_int_equal(tfs_sm_bitmap_find_free(words, barrier, 250, 251), 250);
	assert_int_equal(tfs_sm_bitmap_find_free(words, barrier, 33, 34), 34);
	assert_int_equal(tfs_sm_bitmap_count_free(words, 90, 110), 10);
	assert_int_equal(tfs_sm_bitmap_count_free(words, 0, 0), 0);

	tfs_sm_bitmap_used_mask(words, barrier);
	assert_int_equal(barrier[0], TFS_SM_EVEN_BITS);
	assert_int_equal(barrier[3], 0x55); /* entries 96..99: slots 0..3 of word 3 */
	assert_int_equal(barrier[4], 0);
}

static void test_index_entry_and_root_pack_little_endian(void **state)
{
	const uint8_t ie_bytes[16] = { 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,
				       0x40, 0x3f, 0,    0,    0x11, 0x22, 0,    0 };
	struct tfs_sm_index_entry ie;
	struct tfs_sm_root root = { 1, 2, 3, 0x0102030405060708ull }, back;
	uint8_t buf[32];

	(void)state;
	tfs_sm_index_entry_unpack(ie_bytes, &ie);
	assert_true(ie.blocknr == 0x0102030405060708ull);
	assert_int_equal(ie.nr_free, 16192);
	assert_int_equal(ie.none_free_before, 0x2211);
	tfs_sm_index_entry_pack(&ie, buf);
	assert_memory_equal(buf, ie_bytes, 16);

	tfs_sm_root_pack(&root, buf);
	assert_int_equal(buf[0], 1);
	assert_int_equal(buf[8], 2);
	assert_int_equal(buf[16], 3);
	assert_int_equal(buf[24], 8);
	assert_int_equal(buf[31], 1);
	tfs_sm_root_unpack(buf, &back);
	assert_memory_equal(&root, &back, sizeof(root));
}

/* ---- a pool-shaped rig: superblock, metadata SM, tm, optional data SM --- */

struct rig {
	struct tfs_bdev *dev;
	struct tfs_bm *bm;
	struct tfs_sm *smm;
	struct tfs_tm *tm;
	struct tfs_sm *smd;      /* NULL when the test has no data map */
	uint64_t mapping_root;   /* empty trees so that thin_check sees a pool */
	uint64_t details_root;
	uint8_t data_root[32];   /* data SM root as of the last commit */
};

static size_t rig_cache = 64; /* small, so that eviction is exercised */

static const struct tfs_btree_info *tree_info(struct rig *r, uint32_t value_size)
{
	static struct tfs_btree_info info;

	memset(&info, 0, sizeof(info));
	info.tm = r->tm;
	info.levels = 1;
	info.value_type.size = value_size;
	return &info;
}

static void rig_format(struct rig *r, struct tfs_bdev *dev, uint64_t meta_blocks,
		       int64_t data_blocks)
{
	memset(r, 0, sizeof(*r));
	r->dev = dev;
	assert_int_equal(tfs_bm_create(dev, rig_cache, &r->bm), 0);
	assert_int_equal(tfs_smm_create(r->bm, meta_blocks, 1, &r->smm), 0);
	assert_int_equal(tfs_tm_create(r->bm, r->smm, &r->tm), 0);
	tfs_smm_bind(r->smm, r->tm);
	if (data_blocks >= 0)
		assert_int_equal(tfs_smd_create(r->tm, (uint64_t)data_blocks, &r->smd), 0);
	assert_int_equal(tfs_btree_empty(tree_info(r, 8), &r->mapping_root), 0);
	assert_int_equal(tfs_btree_empty(tree_info(r, 24), &r->details_root), 0);
}

static void fill_meta_root(void *ctx, void *sb)
{
	struct rig *r = ctx;

	tfs_sm_copy_root(r->smm, (uint8_t *)sb + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root));
}

/* Up to the commit's I/O: the caller writes and ends it (transaction-manager.h). */
static int rig_commit_begin(struct rig *r, struct tfs_tm_commit **c)
{
	struct tfs_block *sb;
	uint8_t *d;
	int ret;

	if (r->smd) {
		ret = tfs_sm_commit(r->smd);
		if (ret)
			return ret;
		tfs_sm_copy_root(r->smd, r->data_root);
	}
	ret = tfs_bm_write_lock_zero(r->bm, 0, &tfs_thin_sb_validator, &sb);
	if (ret)
		return ret;
	d = tfs_block_data(sb);
	tfs_put_le64(d + offsetof(struct tfs_disk_thin_sb, magic), TFS_THIN_MAGIC);
	tfs_put_le32(d + offsetof(struct tfs_disk_thin_sb, version), TFS_THIN_VERSION);
	memcpy(d + offsetof(struct tfs_disk_thin_sb, data_space_map_root), r->data_root, 32);
	tfs_put_le64(d + offsetof(struct tfs_disk_thin_sb, data_mapping_root), r->mapping_root);
	tfs_put_le64(d + offsetof(struct tfs_disk_thin_sb, device_details_root), r->details_root);
	tfs_put_le32(d + offsetof(struct tfs_disk_thin_sb, data_block_size), 128);
	tfs_put_le32(d + offsetof(struct tfs_disk_thin_sb, metadata_block_size), 8);
	tfs_put_le64(d + offsetof(struct tfs_disk_thin_sb, metadata_nr_blocks),
		     tfs_sm_nr_blocks(r->smm));
	return tfs_tm_commit_begin(r->tm, sb, fill_meta_root, r, c);
}

static int rig_commit(struct rig *r)
{
	struct tfs_tm_commit *c;
	int ret = rig_commit_begin(r, &c);

	if (!ret)
		ret = tfs_tm_commit_end(r->tm, c, tfs_tm_commit_write(c));
	if (!ret && r->smd)
		tfs_sm_commit_durable(r->smd);
	return ret;
}

static void rig_close(struct rig *r)
{
	tfs_sm_destroy(r->smd);
	r->smd = NULL;
	tfs_tm_destroy(r->tm);
	tfs_sm_destroy(r->smm);
	tfs_bm_destroy(r->bm);
}

static int rig_open(struct rig *r, bool with_data)
{
	struct tfs_block *sb;
	const uint8_t *d;
	int ret;

	r->smd = NULL;
	r->tm = NULL;
	r->smm = NULL;
	assert_int_equal(tfs_bm_create(r->dev, rig_cache, &r->bm), 0);
	assert_int_equal(tfs_bm_read_lock(r->bm, 0, &tfs_thin_sb_validator, &sb), 0);
	d = tfs_block_data(sb);
	ret = tfs_smm_open(r->bm, d + offsetof(struct tfs_disk_thin_sb, metadata_space_map_root),
			   &r->smm);
	memcpy(r->data_root, d + offsetof(struct tfs_disk_thin_sb, data_space_map_root), 32);
	r->mapping_root = tfs_le64(d + offsetof(struct tfs_disk_thin_sb, data_mapping_root));
	r->details_root = tfs_le64(d + offsetof(struct tfs_disk_thin_sb, device_details_root));
	tfs_bm_unlock(sb);
	if (ret)
		return ret;
	assert_int_equal(tfs_tm_create(r->bm, r->smm, &r->tm), 0);
	tfs_smm_bind(r->smm, r->tm);
	if (with_data)
		return tfs_smd_open(r->tm, r->data_root, &r->smd);
	return 0;
}

/* Drop the transaction: metadata map rolled back, data map reloaded from its committed root. */
static void rig_abort(struct rig *r)
{
	tfs_sm_destroy(r->smd);
	r->smd = NULL;
	tfs_tm_abort(r->tm);
}

static uint32_t count_of(struct tfs_sm *sm, uint64_t b)
{
	uint32_t c = 0;

	assert_int_equal(tfs_sm_get_count(sm, b, &c), 0);
	return c;
}

/* ---- model ------------------------------------------------------------- */

/*
 * held[b]: references the test holds.  touched[b]: b was in use at some
 * moment since the last commit (or is in use in the committed state), so
 * the allocator must not return it.
 */
struct model {
	uint64_t nr;
	uint32_t *held, *committed;
	bool *touched;
	uint64_t *list; /* blocks with held > 0, in no order */
	uint64_t nr_list;
	uint64_t committed_nr;
	uint64_t nr_ovf;  /* blocks with held >= 3 */
	uint64_t max_ovf; /* keep the overflow trees this small */
};

static void model_init(struct model *m, uint64_t cap)
{
	memset(m, 0, sizeof(*m));
	m->held = calloc(cap, sizeof(uint32_t));
	m->committed = calloc(cap, sizeof(uint32_t));
	m->touched = calloc(cap, sizeof(bool));
	m->list = calloc(cap, sizeof(uint64_t));
	assert_non_null(m->held);
	assert_non_null(m->committed);
	assert_non_null(m->touched);
	assert_non_null(m->list);
}

static void model_free(struct model *m)
{
	free(m->held);
	free(m->committed);
	free(m->touched);
	free(m->list);
}

static void model_rebuild_list(struct model *m)
{
	uint64_t b;

	m->nr_list = 0;
	m->nr_ovf = 0;
	for (b = 0; b < m->nr; b++) {
		if (m->held[b])
			m->list[m->nr_list++] = b;
		m->nr_ovf += m->held[b] >= 3;
	}
}

static void model_commit(struct model *m)
{
	uint64_t b;

	memcpy(m->committed, m->held, m->nr * sizeof(uint32_t));
	for (b = 0; b < m->nr; b++)
		m->touched[b] = m->held[b] != 0;
	m->committed_nr = m->nr;
}

static void model_abort(struct model *m)
{
	uint64_t b;

	memcpy(m->held, m->committed, m->committed_nr * sizeof(uint32_t));
	for (b = m->committed_nr; b < m->nr; b++)
		m->held[b] = 0;
	m->nr = m->committed_nr;
	for (b = 0; b < m->nr; b++)
		m->touched[b] = m->held[b] != 0;
	model_rebuild_list(m);
}

/* One random operation on sm (alloc, inc, dec) mirrored in the model. */
static void random_op(struct tfs_sm *sm, struct model *m, uint32_t max_count)
{
	uint32_t op = rnd(100);
	uint64_t b;
	int r;

	if (op < 45 || m->nr_list == 0) {
		r = tfs_sm_new_block(sm, &b);
		if (r == -ENOSPC)
			return;
		assert_int_equal(r, 0);
		assert_true(b < m->nr);
		/* Never a block in use since the last commit. */
		assert_false(m->touched[b]);
		assert_int_equal(m->held[b], 0);
		m->held[b] = 1;
		m->touched[b] = true;
		m->list[m->nr_list++] = b;
		return;
	}
	uint64_t idx = rnd((uint32_t)m->nr_list);

	b = m->list[idx];
	if (op < 70 && m->held[b] < max_count && (m->held[b] != 2 || m->nr_ovf < m->max_ovf)) {
		assert_int_equal(tfs_sm_inc(sm, b), 0);
		m->nr_ovf += ++m->held[b] == 3;
		return;
	}
	assert_int_equal(tfs_sm_dec(sm, b), 0);
	m->nr_ovf -= m->held[b]-- == 3;
	if (m->held[b] == 0)
		m->list[idx] = m->list[--m->nr_list];
}

/* ---- metadata space map ------------------------------------------------ */

struct meta_layout {
	uint64_t nr;
	uint8_t *own; /* 1 for blocks the map's committed structures (and the superblock) use */
};

/*
 * The blocks the last committed state uses outside the test's references:
 * superblock, the two empty trees, the index block, bitmaps and the
 * ref-count tree (read from disk: a single leaf while it has < 336 entries).
 */
static void committed_layout(struct rig *r, struct meta_layout *l, bool first)
{
	uint8_t root32[32];
	struct tfs_sm_root root;
	struct tfs_block *blk;
	uint64_t k;

	memset(l->own, 0, l->nr);
	l->own[0] = 1;
	l->own[r->mapping_root] = 1;
	l->own[r->details_root] = 1;
	if (first)
		return;
	tfs_sm_copy_root(r->smm, root32);
	tfs_sm_root_unpack(root32, &root);
	l->own[root.bitmap_root] = 1;
	l->own[root.ref_count_root] = 1;
	assert_int_equal(tfs_bm_read_lock(r->bm, root.bitmap_root, &tfs_index_validator, &blk), 0);
	for (k = 0; k < tfs_sm_nr_bitmaps(root.nr_blocks); k++) {
		struct tfs_sm_index_entry ie;

		tfs_sm_index_entry_unpack((uint8_t *)tfs_block_data(blk) + 16 + 16 * k, &ie);
		assert_true(ie.blocknr < root.nr_blocks);
		l->own[ie.blocknr] = 1;
	}
	tfs_bm_unlock(blk);
}

/* Between commits, count = test's references + 1 for each committed structure block. */
static void check_meta_counts(struct rig *r, struct model *m, struct meta_layout *l)
{
	uint64_t b, used = 0;

	assert_int_equal(tfs_sm_nr_blocks(r->smm), m->nr);
	for (b = 0; b < m->nr; b++) {
		uint32_t want = m->held[b] + l->own[b];

		if (count_of(r->smm, b) != want)
			fail_msg("block %llu: count %u, model %u", (unsigned long long)b,
				 count_of(r->smm, b), want);
		used += want != 0;
	}
	assert_int_equal(tfs_sm_nr_free(r->smm), m->nr - used);
}

/* The index block on disk carries exact hints (the Rust writer's rule). */
static void check_meta_hints_on_disk(struct rig *r)
{
	uint8_t root32[32];
	struct tfs_sm_root root;
	struct tfs_block *idx, *bb;
	uint64_t k, allocated = 0;

	tfs_sm_copy_root(r->smm, root32);
	tfs_sm_root_unpack(root32, &root);
	assert_int_equal(tfs_bm_read_lock(r->bm, root.bitmap_root, &tfs_index_validator, &idx), 0);
	for (k = 0; k < TFS_MAX_METADATA_BITMAPS; k++) {
		const uint8_t *slot = (uint8_t *)tfs_block_data(idx) + 16 + 16 * k;
		struct tfs_sm_index_entry ie;
		uint32_t nr_free, nfb, len = tfs_sm_bitmap_len(root.nr_blocks, k);

		tfs_sm_index_entry_unpack(slot, &ie);
		if (k >= tfs_sm_nr_bitmaps(root.nr_blocks)) {
			assert_true(ie.blocknr == 0 && ie.nr_free == 0 && ie.none_free_before == 0);
			continue;
		}
		assert_int_equal(tfs_bm_read_lock(r->bm, ie.blocknr, &tfs_bitmap_validator, &bb), 0);
		tfs_sm_bitmap_hints((uint8_t *)tfs_block_data(bb) + 16, len, &nr_free, &nfb);
		allocated += len - tfs_sm_bitmap_count_free((uint8_t *)tfs_block_data(bb) + 16, 0, len);
		tfs_bm_unlock(bb);
		assert_int_equal(ie.nr_free, nr_free);
		assert_int_equal(ie.none_free_before, nfb);
	}
	tfs_bm_unlock(idx);
	assert_true(allocated == root.nr_allocated);
}

static void meta_commit(struct rig *r, struct model *m, struct meta_layout *l)
{
	assert_int_equal(rig_commit(r), 0);
	model_commit(m);
	committed_layout(r, l, false);
	check_meta_counts(r, m, l);
	check_meta_hints_on_disk(r);
}

static void test_metadata_map_follows_model_through_commit_abort_reopen(void **state)
{
	const uint64_t nr = 40000, cap = 60000; /* three bitmaps, the last partial */
	struct tfs_bdev *dev;
	struct meta_layout l;
	struct model m;
	struct rig r;
	uint32_t step;

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(cap * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, nr, -1);
	model_init(&m, cap);
	m.nr = nr;
	l.nr = cap;
	l.own = calloc(cap, 1);
	m.max_ovf = 200; /* ref-count tree stays one leaf: committed_layout sees it all */
	committed_layout(&r, &l, true);
	check_meta_counts(&r, &m, &l);
	meta_commit(&r, &m, &l);

	for (step = 0; step < 30000; step++) {
		uint32_t what = rnd(1000);

		if (what < 4) {
			meta_commit(&r, &m, &l);
		} else if (what < 6) {
			tfs_tm_abort(r.tm);
			model_abort(&m);
			check_meta_counts(&r, &m, &l);
		} else if (what < 7) {
			meta_commit(&r, &m, &l);
			rig_close(&r);
			assert_int_equal(rig_open(&r, false), 0);
			check_meta_counts(&r, &m, &l);
		} else if (what < 8 && m.nr < cap - 5000) {
			assert_int_equal(tfs_sm_extend(r.smm, 5000), 0);
			m.nr += 5000;
		} else {
			/* Counts up to 6 so that the overflow tree gets entries and loses them. */
			random_op(r.smm, &m, 6);
		}
		for (uint64_t b = 0; b < m.nr && step % 5000 == 0; b++)
			if (m.held[b] && !r.smm->ops->is_new(r.smm, b))
				assert_true(m.committed[b] != 0 || l.own[b]);
	}
	meta_commit(&r, &m, &l);
	rig_close(&r);
	assert_int_equal(rig_open(&r, false), 0);
	check_meta_counts(&r, &m, &l);
	check_meta_hints_on_disk(&r);
	rig_close(&r);
	tfs_bdev_close(dev);
	model_free(&m);
	free(l.own);
}

static void test_metadata_map_never_reuses_a_block_freed_in_the_transaction(void **state)
{
	const uint64_t nr = 3000;
	struct tfs_bdev *dev;
	struct rig r;
	uint64_t b, got[3000], nr_got = 0, i;
	bool *freed = calloc(nr, sizeof(bool));

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(nr * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, nr, -1);
	assert_int_equal(rig_commit(&r), 0);
	while (nr_got < 2000 && tfs_sm_new_block(r.smm, &b) == 0)
		got[nr_got++] = b;
	assert_int_equal(nr_got, 2000);
	assert_int_equal(rig_commit(&r), 0);

	/* Free every other committed block, plus blocks born and freed in this transaction. */
	for (i = 0; i < nr_got; i += 2) {
		assert_int_equal(tfs_sm_dec(r.smm, got[i]), 0);
		freed[got[i]] = true;
	}
	for (i = 0; i < 100; i++) {
		assert_int_equal(tfs_sm_new_block(r.smm, &b), 0);
		assert_false(freed[b]);
		assert_int_equal(tfs_sm_dec(r.smm, b), 0);
		freed[b] = true;
	}
	/* Allocate until full: never one of them. */
	while (tfs_sm_new_block(r.smm, &b) == 0)
		assert_false(freed[b]);
	assert_true(tfs_sm_nr_free(r.smm) >= 1000);

	/* Abort (the frees too), free again and commit: then the freed blocks come back. */
	tfs_tm_abort(r.tm);
	for (i = 0; i < nr_got; i += 2)
		assert_int_equal(tfs_sm_dec(r.smm, got[i]), 0);
	assert_int_equal(rig_commit(&r), 0);
	while (tfs_sm_new_block(r.smm, &b) == 0)
		;
	assert_int_equal(tfs_sm_nr_free(r.smm), 0);
	for (i = 0; i < nr_got; i++)
		assert_int_equal(count_of(r.smm, got[i]), 1);
	rig_close(&r);
	tfs_bdev_close(dev);
	free(freed);
}

static void test_metadata_map_extends_and_refuses_past_the_format_limit(void **state)
{
	struct tfs_bdev *dev;
	struct rig r;
	uint64_t b, n = 0;

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(40000ull * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, 1000, -1);
	assert_int_equal(rig_commit(&r), 0);
	while (tfs_sm_new_block(r.smm, &b) == 0)
		n++;
	assert_int_equal(tfs_sm_nr_free(r.smm), 0);
	assert_int_equal(tfs_sm_extend(r.smm, 20000), 0);
	assert_int_equal(tfs_sm_nr_blocks(r.smm), 21000);
	assert_int_equal(tfs_sm_new_block(r.smm, &b), 0);
	assert_true(b >= 1000);
	assert_int_equal(rig_commit(&r), 0);
	rig_close(&r);
	assert_int_equal(rig_open(&r, false), 0);
	assert_int_equal(tfs_sm_nr_blocks(r.smm), 21000);
	assert_int_equal(count_of(r.smm, b), 1);

	/* An extend that is aborted is forgotten. */
	assert_int_equal(tfs_sm_extend(r.smm, 100), 0);
	tfs_tm_abort(r.tm);
	assert_int_equal(tfs_sm_nr_blocks(r.smm), 21000);

	assert_int_equal(tfs_sm_extend(r.smm, TFS_MAX_METADATA_BLOCKS - 21000), 0);
	assert_int_equal(tfs_sm_nr_blocks(r.smm), TFS_MAX_METADATA_BLOCKS);
	assert_int_equal(tfs_sm_extend(r.smm, 1), -EINVAL);
	tfs_tm_abort(r.tm);
	rig_close(&r);
	tfs_bdev_close(dev);
	(void)n;
}

static void test_metadata_map_reports_bad_dec_and_out_of_range(void **state)
{
	struct tfs_bdev *dev;
	struct rig r;
	uint32_t c;

	(void)state;
	tfs_log_set_level((enum tfs_log_level)0); /* expected errors stay quiet */
	assert_int_equal(tfs_bdev_open_mem(100 * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, 100, -1);
	assert_int_equal(tfs_sm_dec(r.smm, 50), -EINVAL);
	assert_int_equal(tfs_sm_inc(r.smm, 100), -EINVAL);
	assert_int_equal(tfs_sm_get_count(r.smm, 100, &c), -EINVAL);
	assert_true(r.smm->ops->is_new(r.smm, 0)); /* nothing committed yet */
	assert_int_equal(rig_commit(&r), 0);
	assert_false(r.smm->ops->is_new(r.smm, 0));
	rig_close(&r);
	tfs_bdev_close(dev);
	tfs_log_set_level(TFS_LOG_INFO);
}

/* A commit that runs out of blocks for the map's own relocation rolls back exactly. */
static void test_metadata_commit_out_of_space_rolls_back(void **state)
{
	const uint64_t nr = 40000;
	struct tfs_bdev *dev;
	struct meta_layout l;
	struct model m;
	struct rig r;
	uint64_t b;

	(void)state;
	tfs_log_set_level((enum tfs_log_level)0);
	assert_int_equal(tfs_bdev_open_mem(nr * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, nr, -1);
	model_init(&m, nr);
	m.nr = nr;
	l.nr = nr;
	l.own = calloc(nr, 1);
	meta_commit(&r, &m, &l);
	/* Some committed blocks with counts >= 3, so the ref-count tree has work to do. */
	for (b = 0; b < 20; b++) {
		assert_int_equal(tfs_sm_new_block(r.smm, &m.list[m.nr_list]), 0);
		m.held[m.list[m.nr_list]] = 1;
		m.nr_list++;
	}
	meta_commit(&r, &m, &l);
	/* Fill every allocatable block, in all three bitmaps, and change the overflow set. */
	while (tfs_sm_new_block(r.smm, &b) == 0)
		m.held[b] = 1;
	for (b = 0; b < 20; b++)
		assert_int_equal(r.smm->ops->inc(r.smm, m.list[b], 3), 0);
	assert_int_equal(rig_commit(&r), -ENOSPC);
	tfs_tm_abort(r.tm);
	model_abort(&m);
	check_meta_counts(&r, &m, &l);
	/* The map is usable again: free a few committed blocks, commit twice. */
	for (b = 0; b < 10; b++)
		assert_int_equal(tfs_sm_dec(r.smm, m.list[b]), 0), m.held[m.list[b]]--;
	meta_commit(&r, &m, &l);
	meta_commit(&r, &m, &l);
	rig_close(&r);
	assert_int_equal(rig_open(&r, false), 0);
	check_meta_counts(&r, &m, &l);
	rig_close(&r);
	tfs_bdev_close(dev);
	model_free(&m);
	free(l.own);
	tfs_log_set_level(TFS_LOG_INFO);
}

/* Corrupt or inconsistent committed maps are refused with -EUCLEAN, never trusted. */
static void test_open_refuses_corrupt_maps(void **state)
{
	struct tfs_bdev *dev;
	struct tfs_block *blk;
	struct tfs_sm_root root;
	uint8_t root32[32], data32[32];
	struct rig r;
	uint64_t b;

	(void)state;
	tfs_log_set_level((enum tfs_log_level)0);
	assert_int_equal(tfs_bdev_open_mem(3000 * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, 3000, 20000);
	assert_int_equal(tfs_sm_new_block(r.smm, &b), 0);
	assert_int_equal(r.smm->ops->inc(r.smm, b, 4), 0); /* count 5: in the ref-count tree */
	assert_int_equal(rig_commit(&r), 0);
	tfs_sm_copy_root(r.smm, root32);
	memcpy(data32, r.data_root, 32);
	rig_close(&r);
	tfs_sm_root_unpack(root32, &root);

	/* A root past the end of the map, and an index block location that is not one. */
	struct tfs_sm_root bad = root;
	uint8_t bad32[32];
	struct tfs_sm *sm;
	struct tfs_bm *bm;

	assert_int_equal(tfs_bm_create(dev, 64, &bm), 0);
	bad.bitmap_root = root.nr_blocks;
	tfs_sm_root_pack(&bad, bad32);
	assert_int_equal(tfs_smm_open(bm, bad32, &sm), -EUCLEAN);
	bad = root;
	bad.bitmap_root = root.ref_count_root; /* a btree node, not an index block */
	tfs_sm_root_pack(&bad, bad32);
	assert_int_equal(tfs_smm_open(bm, bad32, &sm), -EUCLEAN);
	/* A ref-count tree that lacks the block counted >= 3: an empty tree instead. */
	assert_int_equal(tfs_smm_open(bm, root32, &sm), 0);
	{
		struct tfs_tm *tm;
		struct tfs_btree_info info = { .levels = 1, .value_type = { .size = 4 } };
		uint64_t empty;

		assert_int_equal(tfs_tm_create(bm, sm, &tm), 0);
		tfs_smm_bind(sm, tm);
		info.tm = tm;
		assert_int_equal(tfs_btree_empty(&info, &empty), 0);
		assert_int_equal(tfs_bm_flush(bm), 0);
		bad = root;
		bad.ref_count_root = empty;
		tfs_sm_root_pack(&bad, bad32);
		tfs_tm_destroy(tm);
		tfs_sm_destroy(sm);
	}
	tfs_bm_destroy(bm);
	assert_int_equal(tfs_bm_create(dev, 64, &bm), 0);
	assert_int_equal(tfs_smm_open(bm, bad32, &sm), -EUCLEAN);

	/* A data map whose index tree lacks a bitmap it needs. */
	tfs_sm_root_unpack(data32, &bad);
	bad.nr_blocks += TFS_ENTRIES_PER_BITMAP;
	tfs_sm_root_pack(&bad, bad32);
	assert_int_equal(tfs_smm_open(bm, root32, &sm), 0);
	{
		struct tfs_tm *tm;
		struct tfs_sm *dsm;

		assert_int_equal(tfs_tm_create(bm, sm, &tm), 0);
		tfs_smm_bind(sm, tm);
		assert_int_equal(tfs_smd_open(tm, bad32, &dsm), -EUCLEAN);
		assert_int_equal(tfs_smd_open(tm, data32, &dsm), 0);
		tfs_sm_destroy(dsm);
		/* A bitmap with a bad checksum. */
		assert_int_equal(tfs_bm_read_lock(bm, root.bitmap_root, &tfs_index_validator, &blk), 0);
		b = tfs_le64((uint8_t *)tfs_block_data(blk) + 16);
		tfs_bm_unlock(blk);
		tfs_tm_destroy(tm);
		tfs_sm_destroy(sm);
	}
	tfs_bm_destroy(bm);
	{
		uint8_t junk[TFS_BLOCK_SIZE];

		assert_int_equal(tfs_bdev_read(dev, junk, TFS_BLOCK_SIZE, b * TFS_BLOCK_SIZE), 0);
		junk[100] ^= 1;
		assert_int_equal(tfs_bdev_write(dev, junk, TFS_BLOCK_SIZE, b * TFS_BLOCK_SIZE), 0);
	}
	assert_int_equal(tfs_bm_create(dev, 64, &bm), 0);
	assert_int_equal(tfs_smm_open(bm, root32, &sm), -EUCLEAN);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
	tfs_log_set_level(TFS_LOG_INFO);
}

/* ---- disk space map ---------------------------------------------------- */

static void check_data_counts(struct rig *r, struct model *m)
{
	uint64_t b, used = 0;

	assert_true(tfs_sm_nr_blocks(r->smd) == m->nr);
	for (b = 0; b < m->nr; b++) {
		uint32_t c = count_of(r->smd, b);

		if (c != m->held[b])
			fail_msg("data block %llu: count %u, model %u", (unsigned long long)b, c,
				 m->held[b]);
		used += c != 0;
	}
	assert_true(tfs_sm_nr_free(r->smd) == m->nr - used);
}

static char image_path[64];

static struct tfs_bdev *new_file_dev(uint64_t bytes)
{
	struct tfs_bdev *d;
	int fd;

	strcpy(image_path, "/tmp/tfs-sm-XXXXXX");
	fd = mkstemp(image_path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	close(fd);
	assert_int_equal(tfs_bdev_open(image_path, false, &d), 0);
	return d;
}

/* 0 = passed, 1 = failed, -1 = thin_check not installed. */
static int run_thin_check(const char *path)
{
	const char *tc = "/usr/sbin/thin_check";
	char cmd[256];
	int st;

	if (access(tc, X_OK))
		return -1;
	snprintf(cmd, sizeof(cmd), "%s %s >/tmp/tfs-sm-check.log 2>&1", tc, path);
	st = system(cmd);
	if (st && WIFEXITED(st)) {
		int shown = system("cat /tmp/tfs-sm-check.log >&2");

		(void)shown;
		return 1;
	}
	return st ? 1 : 0;
}

static void test_data_map_follows_model_and_passes_thin_check(void **state)
{
	const uint64_t meta = 20000, cap = 60000;
	struct tfs_bdev *dev = new_file_dev(meta * TFS_BLOCK_SIZE);
	struct model m;
	struct rig r;
	uint32_t step;
	int tc;

	(void)state;
	rig_format(&r, dev, meta, 0);
	model_init(&m, cap);
	m.max_ovf = 2000; /* several leaves in the data ref-count tree */
	/* Extend from nothing across a bitmap boundary, then commit. */
	assert_int_equal(tfs_sm_new_block(r.smd, &(uint64_t){ 0 }), -ENOSPC);
	assert_int_equal(tfs_sm_extend(r.smd, 100), 0);
	m.nr = 100;
	assert_int_equal(tfs_sm_extend(r.smd, 20000), 0);
	m.nr = 20100;
	assert_int_equal(rig_commit(&r), 0);
	model_commit(&m);

	for (step = 0; step < 40000; step++) {
		uint32_t what = rnd(1000);

		if (what < 3) {
			assert_int_equal(rig_commit(&r), 0);
			model_commit(&m);
			check_data_counts(&r, &m);
		} else if (what < 5) {
			rig_abort(&r);
			assert_int_equal(tfs_smd_open(r.tm, r.data_root, &r.smd), 0);
			model_abort(&m);
			check_data_counts(&r, &m);
		} else if (what < 6) {
			assert_int_equal(rig_commit(&r), 0);
			model_commit(&m);
			rig_close(&r);
			assert_int_equal(rig_open(&r, true), 0);
			check_data_counts(&r, &m);
		} else if (what < 7 && m.nr + 7000 <= cap) {
			assert_int_equal(tfs_sm_extend(r.smd, 7000), 0);
			m.nr += 7000;
		} else {
			random_op(r.smd, &m, 7);
		}
	}
	assert_int_equal(rig_commit(&r), 0);
	model_commit(&m);
	check_data_counts(&r, &m);
	rig_close(&r);
	assert_int_equal(rig_open(&r, true), 0);
	check_data_counts(&r, &m);
	rig_close(&r);
	tfs_bdev_close(dev);

	tc = run_thin_check(image_path);
	unlink(image_path);
	model_free(&m);
	if (tc < 0)
		skip();
	assert_int_equal(tc, 0);
}

static void test_data_map_never_reuses_a_block_freed_in_the_transaction(void **state)
{
	const uint64_t nr = 40000;
	struct tfs_bdev *dev;
	struct rig r;
	uint64_t b, i;
	bool *freed = calloc(nr, sizeof(bool));

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(4000 * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, 4000, (int64_t)nr);
	for (i = 0; i < nr; i++) {
		assert_int_equal(tfs_sm_new_block(r.smd, &b), 0);
		assert_true(b == i); /* a fresh map hands out blocks in order */
	}
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);
	assert_int_equal(rig_commit(&r), 0);
	for (i = 0; i < nr; i += 3) {
		assert_int_equal(tfs_sm_dec(r.smd, i), 0);
		freed[i] = true;
	}
	assert_true(tfs_sm_nr_free(r.smd) == (nr + 2) / 3);
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);
	assert_int_equal(rig_commit(&r), 0);
	for (i = 0; i < (nr + 2) / 3; i++) {
		assert_int_equal(tfs_sm_new_block(r.smd, &b), 0);
		assert_true(freed[b]);
		freed[b] = false;
		/* Born and freed in one transaction: still not handed out again. */
		if (i % 2) {
			assert_int_equal(tfs_sm_dec(r.smd, b), 0);
			freed[b] = true;
		}
	}
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);
	rig_close(&r);
	tfs_bdev_close(dev);
	free(freed);
}

/*
 * The next transaction runs while a commit's blocks are written: nothing
 * freed in the committing transaction (which the state on disk may still
 * use) is handed out before that commit is durable; metadata blocks come
 * back at its end, data blocks when the owner says (after discarding them).
 */
static void test_blocks_freed_in_a_commit_stay_held_until_it_is_durable(void **state)
{
	const uint64_t nr = 40000, nr_meta = 4000;
	uint64_t meta_freed[64], b, i, j;
	struct tfs_tm_commit *c;
	struct tfs_bdev *dev;
	bool *freed = calloc(nr, sizeof(bool));
	struct rig r;
	int ret;

	(void)state;
	assert_non_null(freed);
	assert_int_equal(tfs_bdev_open_mem(nr_meta * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, nr_meta, (int64_t)nr);
	for (i = 0; i < nr; i++)
		assert_int_equal(tfs_sm_new_block(r.smd, &b), 0);
	for (i = 0; i < 64; i++)
		assert_int_equal(tfs_sm_new_block(r.smm, &meta_freed[i]), 0);
	assert_int_equal(rig_commit(&r), 0);

	/* Data blocks: held past the commit's end, until the owner has discarded them. */
	for (i = 0; i < nr; i += 3) {
		assert_int_equal(tfs_sm_dec(r.smd, i), 0);
		freed[i] = true;
	}
	assert_int_equal(rig_commit_begin(&r, &c), 0);
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);
	assert_int_equal(tfs_tm_commit_end(r.tm, c, tfs_tm_commit_write(c)), 0);
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);
	tfs_sm_commit_durable(r.smd);
	for (i = 0; i < (nr + 2) / 3; i++) {
		assert_int_equal(tfs_sm_new_block(r.smd, &b), 0);
		assert_true(freed[b]);
		freed[b] = false;
	}
	assert_int_equal(tfs_sm_new_block(r.smd, &b), -ENOSPC);

	/* Metadata blocks: held until the commit's end. */
	for (i = 0; i < 64; i++)
		assert_int_equal(tfs_sm_dec(r.smm, meta_freed[i]), 0);
	assert_int_equal(rig_commit_begin(&r, &c), 0);
	while ((ret = tfs_sm_new_block(r.smm, &b)) == 0)
		for (j = 0; j < 64; j++)
			assert_true(b != meta_freed[j]);
	assert_int_equal(ret, -ENOSPC);
	assert_int_equal(tfs_tm_commit_end(r.tm, c, tfs_tm_commit_write(c)), 0);
	for (i = 0; (ret = tfs_sm_new_block(r.smm, &b)) == 0;)
		for (j = 0; j < 64; j++)
			i += b == meta_freed[j];
	assert_int_equal(ret, -ENOSPC);
	assert_true(i == 64);
	rig_close(&r);
	tfs_bdev_close(dev);
	free(freed);
}

static void test_data_map_overflow_counts_survive_reopen(void **state)
{
	struct tfs_bdev *dev;
	struct rig r;
	uint64_t b;
	uint32_t i;

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(4000 * TFS_BLOCK_SIZE, &dev), 0);
	rig_format(&r, dev, 4000, 50000);
	for (b = 0; b < 600; b++) /* two leaves' worth of overflow entries */
		for (i = 0; i < 3 + b % 5; i++)
			assert_int_equal(tfs_sm_inc(r.smd, b * 61), 0);
	assert_int_equal(tfs_sm_inc(r.smd, 49999), 0);
	assert_int_equal(r.smd->ops->inc(r.smd, 49999, 100000), 0);
	assert_int_equal(rig_commit(&r), 0);
	rig_close(&r);
	assert_int_equal(rig_open(&r, true), 0);
	for (b = 0; b < 600; b++)
		assert_int_equal(count_of(r.smd, b * 61), 3 + b % 5);
	assert_int_equal(count_of(r.smd, 49999), 100001);
	assert_int_equal(count_of(r.smd, 1), 0);
	/* Back below 3: the bitmap alone holds the count again. */
	for (b = 0; b < 600; b++)
		assert_int_equal(r.smd->ops->dec(r.smd, b * 61, 1 + b % 5), 0);
	assert_int_equal(rig_commit(&r), 0);
	rig_close(&r);
	assert_int_equal(rig_open(&r, true), 0);
	for (b = 0; b < 600; b++)
		assert_int_equal(count_of(r.smd, b * 61), 2);
	rig_close(&r);
	tfs_bdev_close(dev);
}

/*
 * Metadata blocks referenced three or more times (level-1 roots shared by
 * several devices) put the metadata map's ref-count tree on disk; with 400
 * of them it needs several nodes.  thin_check counts the references itself
 * and must agree, after the counts first go past 2 and after half of them
 * come back below 3 while others grow.
 */
#define GROUPS 400

static void add_device(struct rig *r, uint64_t dev_id, uint64_t leaf)
{
	uint8_t details[24] = { 0 }, v[8];

	tfs_put_le64(v, leaf);
	assert_int_equal(tfs_btree_insert(tree_info(r, 8), r->mapping_root, &dev_id, v,
					  &r->mapping_root, NULL), 0);
	assert_int_equal(tfs_btree_insert(tree_info(r, 24), r->details_root, &dev_id, details,
					  &r->details_root, NULL), 0);
}

static void remove_device(struct rig *r, uint64_t dev_id, uint64_t leaf)
{
	assert_int_equal(tfs_btree_remove(tree_info(r, 8), r->mapping_root, &dev_id,
					  &r->mapping_root), 0);
	assert_int_equal(tfs_btree_remove(tree_info(r, 24), r->details_root, &dev_id,
					  &r->details_root), 0);
	assert_int_equal(tfs_tm_dec(r->tm, leaf), 0);
}

static void check_image_or_skip(bool *skipped)
{
	int tc = run_thin_check(image_path);

	*skipped = tc < 0;
	if (tc >= 0)
		assert_int_equal(tc, 0);
}

static void test_metadata_overflow_passes_thin_check(void **state)
{
	struct tfs_bdev *dev = new_file_dev(6000 * TFS_BLOCK_SIZE);
	static uint64_t leaf[GROUPS];
	struct rig r;
	uint64_t g, j;
	bool skipped;

	(void)state;
	rig_format(&r, dev, 6000, 1000);
	/* Devices 4g+1 .. 4g+3 share leaf g: count 3. */
	for (g = 0; g < GROUPS; g++) {
		assert_int_equal(tfs_btree_empty(tree_info(&r, 8), &leaf[g]), 0);
		for (j = 1; j <= 3; j++) {
			add_device(&r, 4 * g + j, leaf[g]);
			if (j > 1)
				assert_int_equal(tfs_tm_inc(r.tm, leaf[g]), 0);
		}
	}
	assert_int_equal(count_of(r.smm, leaf[7]), 3);
	assert_int_equal(rig_commit(&r), 0);
	check_image_or_skip(&skipped);

	/* Even groups drop to 2 (leave the ref-count tree), odd groups grow to 4. */
	for (g = 0; g < GROUPS; g++) {
		if (g % 2) {
			add_device(&r, 4 * g + 4, leaf[g]);
			assert_int_equal(tfs_tm_inc(r.tm, leaf[g]), 0);
		} else {
			remove_device(&r, 4 * g + 3, leaf[g]);
		}
	}
	assert_int_equal(rig_commit(&r), 0);
	rig_close(&r);
	assert_int_equal(rig_open(&r, true), 0);
	for (g = 0; g < GROUPS; g++)
		assert_int_equal(count_of(r.smm, leaf[g]), g % 2 ? 4 : 2);
	rig_close(&r);
	tfs_bdev_close(dev);
	if (!skipped)
		check_image_or_skip(&skipped);
	unlink(image_path);
	if (skipped)
		skip();
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Not a pass/fail benchmark: prints the warm rate of the data path. */
static void test_data_map_warm_alloc_inc_dec_rate(void **state)
{
	const uint64_t nr = 1000000;
	struct tfs_bdev *dev;
	struct rig r;
	uint64_t b, i, ops = 0;
	double t0, t;

	(void)state;
	assert_int_equal(tfs_bdev_open_mem(8000 * TFS_BLOCK_SIZE, &dev), 0);
	rig_cache = 4096; /* nearer the daemon's cache than the tests' tiny one */
	rig_format(&r, dev, 8000, (int64_t)nr);
	rig_cache = 64;
	assert_int_equal(rig_commit(&r), 0);
	t0 = now();
	for (i = 0; i < 300000; i++) {
		assert_int_equal(tfs_sm_new_block(r.smd, &b), 0);
		assert_int_equal(tfs_sm_inc(r.smd, b), 0);
		assert_int_equal(tfs_sm_dec(r.smd, b), 0);
		ops += 3;
	}
	t = now() - t0;
	print_message("data space map: %.0f ops/s (alloc+inc+dec, warm)\n", ops / t);
	rig_close(&r);
	tfs_bdev_close(dev);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_data_bitmap_bytes_decode_as_documented),
		cmocka_unit_test(test_metadata_bitmap_word_decodes_as_documented),
		cmocka_unit_test(test_bitmap_set_touches_only_its_entry),
		cmocka_unit_test(test_find_free_honours_barrier_and_range),
		cmocka_unit_test(test_index_entry_and_root_pack_little_endian),
		cmocka_unit_test(test_metadata_map_follows_model_through_commit_abort_reopen),
		cmocka_unit_test(test_metadata_map_never_reuses_a_block_freed_in_the_transaction),
		cmocka_unit_test(test_metadata_map_extends_and_refuses_past_the_format_limit),
		cmocka_unit_test(test_metadata_map_reports_bad_dec_and_out_of_range),
		cmocka_unit_test(test_metadata_commit_out_of_space_rolls_back),
		cmocka_unit_test(test_open_refuses_corrupt_maps),
		cmocka_unit_test(test_data_map_follows_model_and_passes_thin_check),
		cmocka_unit_test(test_data_map_never_reuses_a_block_freed_in_the_transaction),
		cmocka_unit_test(test_blocks_freed_in_a_commit_stay_held_until_it_is_durable),
		cmocka_unit_test(test_data_map_overflow_counts_survive_reopen),
		cmocka_unit_test(test_metadata_overflow_passes_thin_check),
		cmocka_unit_test(test_data_map_warm_alloc_inc_dec_rate),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
