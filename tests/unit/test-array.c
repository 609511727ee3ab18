/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dm-array and dm-bitset against in-memory models, on a memory device with
 * the real block manager, transaction manager and metadata space map, so
 * that sharing and shadowing show in the reference counts: after every
 * test the arrays are released and the metadata must be back to what it
 * was before (no leaked or doubly freed block).
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "array.h"
#include "bdev.h"
#include "bitset.h"
#include "block-manager.h"
#include "format.h"
#include "log.h"
#include "space-map-metadata.h"
#include "space-map.h"
#include "transaction-manager.h"

#define NR_META_BLOCKS 4096u
/* Where the test's superblock keeps its root (past the cache superblock's used bytes). */
#define SB_ROOT_OFF 1024u

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

struct env {
	struct tfs_bdev *dev;
	struct tfs_bm *bm;
	struct tfs_sm *sm;
	struct tfs_tm *tm;
};

static void env_maps(struct env *e, const uint8_t *sm_root)
{
	assert_int_equal(tfs_bm_create(e->dev, 64, &e->bm), 0);
	if (sm_root)
		assert_int_equal(tfs_smm_open(e->bm, sm_root, &e->sm), 0);
	else
		assert_int_equal(tfs_smm_create(e->bm, NR_META_BLOCKS, 1, &e->sm), 0);
	assert_int_equal(tfs_tm_create(e->bm, e->sm, &e->tm), 0);
	tfs_smm_bind(e->sm, e->tm);
}

static struct env *env_open(void)
{
	struct env *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	assert_int_equal(tfs_bdev_open_mem((uint64_t)NR_META_BLOCKS * TFS_BLOCK_SIZE, &e->dev), 0);
	env_maps(e, NULL);
	return e;
}

static void env_drop_maps(struct env *e)
{
	struct tfs_bm_stats st;

	tfs_bm_stats(e->bm, &st);
	assert_int_equal(st.locked, 0);
	tfs_tm_destroy(e->tm);
	tfs_sm_destroy(e->sm);
	tfs_bm_destroy(e->bm);
}

static void env_close(struct env *e)
{
	env_drop_maps(e);
	tfs_bdev_close(e->dev);
	free(e);
}

static void fill_sm_root(void *ctx, void *sb)
{
	struct env *e = ctx;

	tfs_sm_copy_root(e->sm, (uint8_t *)sb + offsetof(struct tfs_disk_cache_sb, metadata_space_map_root));
}

/* Commit with root stored in a superblock at block 0 (the cache superblock's validator). */
static void commit(struct env *e, uint64_t root)
{
	struct tfs_block *sb;

	assert_int_equal(tfs_bm_write_lock_zero(e->bm, 0, &tfs_cache_sb_validator, &sb), 0);
	tfs_put_le64((uint8_t *)tfs_block_data(sb) + offsetof(struct tfs_disk_cache_sb, magic),
		     TFS_CACHE_MAGIC);
	tfs_put_le64((uint8_t *)tfs_block_data(sb) + SB_ROOT_OFF, root);
	assert_int_equal(tfs_tm_commit(e->tm, sb, fill_sm_root, e), 0);
}

/* Forget everything in memory and load the maps from the committed superblock. */
static uint64_t reopen(struct env *e)
{
	uint8_t sb[TFS_BLOCK_SIZE];

	env_drop_maps(e);
	assert_int_equal(tfs_bdev_read(e->dev, sb, sizeof(sb), 0), 0);
	env_maps(e, sb + offsetof(struct tfs_disk_cache_sb, metadata_space_map_root));
	return tfs_le64(sb + SB_ROOT_OFF);
}

static uint64_t nr_free(struct env *e)
{
	return tfs_sm_nr_free(e->sm);
}

/* Value of element i in the model: value_size bytes derived from v. */
static void make_value(uint8_t *out, uint32_t size, uint64_t v)
{
	for (uint32_t i = 0; i < size; i++)
		out[i] = (uint8_t)(v >> (8 * (i % 8))) ^ (uint8_t)i;
}

static void assert_array(const struct tfs_array_info *info, uint64_t root, const uint64_t *model,
			 uint64_t n)
{
	uint8_t got[64], want[64];

	for (uint64_t i = 0; i < n; i++) {
		make_value(want, info->value_size, model[i]);
		assert_int_equal(tfs_array_get(info, root, i, got), 0);
		assert_memory_equal(got, want, info->value_size);
	}
	assert_int_equal(tfs_array_get(info, root, n, got), -ENODATA);
}

struct walk_check {
	const struct tfs_array_info *info;
	const uint64_t *model;
	uint64_t next;
};

static int walk_check(void *ctx, uint64_t index, const void *value)
{
	struct walk_check *w = ctx;
	uint8_t want[64];

	assert_int_equal(index, w->next);
	make_value(want, w->info->value_size, w->model[index]);
	assert_memory_equal(value, want, w->info->value_size);
	w->next++;
	return 0;
}

static void resize(const struct tfs_array_info *info, uint64_t *root, uint64_t *model,
		   uint64_t old, uint64_t new, uint64_t fill)
{
	uint8_t v[64];

	make_value(v, info->value_size, fill);
	assert_int_equal(tfs_array_resize(info, *root, old, new, v, root), 0);
	for (uint64_t i = old; i < new; i++)
		model[i] = fill;
}

static void set(const struct tfs_array_info *info, uint64_t *root, uint64_t *model, uint64_t i,
		uint64_t val)
{
	uint8_t v[64];

	make_value(v, info->value_size, val);
	assert_int_equal(tfs_array_set(info, *root, i, v, root), 0);
	model[i] = val;
}

/* ---- arrays ------------------------------------------------------------- */

static void grow_shrink_set_get(uint32_t value_size)
{
	struct env *e = env_open();
	struct tfs_array_info info;
	uint64_t root, *model = calloc(20000, sizeof(*model)), base;
	uint32_t seed = 7;

	assert_non_null(model);
	assert_int_equal(tfs_array_info_init(&info, e->tm, value_size), 0);
	assert_int_equal(tfs_array_empty(&info, &root), 0);
	commit(e, root);
	base = nr_free(e);

	resize(&info, &root, model, 0, 1000, 11);
	/* Up to exactly the end of a block, and back. */
	uint64_t edge = (uint64_t)info.per_block * (1000 / info.per_block + 1);
	resize(&info, &root, model, 1000, edge, 12);
	assert_array(&info, root, model, edge);
	assert_int_equal(tfs_array_resize(&info, root, edge, 1000, NULL, &root), 0);
	assert_array(&info, root, model, 1000);
	for (int k = 0; k < 300; k++) {
		seed = seed * 1103515245u + 12345u;
		set(&info, &root, model, seed % 1000, seed);
	}
	assert_array(&info, root, model, 1000);
	resize(&info, &root, model, 1000, 15000, 22);
	assert_array(&info, root, model, 15000);
	commit(e, root);
	root = reopen(e);
	assert_int_equal(tfs_array_info_init(&info, e->tm, value_size), 0);
	assert_array(&info, root, model, 15000);

	/* Shrink into the middle of a block, then grow again: the dropped tail must not come back. */
	assert_int_equal(tfs_array_resize(&info, root, 15000, 600, NULL, &root), 0);
	assert_array(&info, root, model, 600);
	resize(&info, &root, model, 600, 2000, 33);
	assert_array(&info, root, model, 2000);
	for (uint64_t i = 0; i < 2000; i += 97)
		set(&info, &root, model, i, i * 3);
	struct walk_check w = { &info, model, 150 };
	assert_int_equal(tfs_array_walk(&info, root, 150, 1900, walk_check, &w), 0);
	assert_int_equal(w.next, 1900);
	commit(e, root);
	root = reopen(e);
	assert_int_equal(tfs_array_info_init(&info, e->tm, value_size), 0);
	assert_array(&info, root, model, 2000);

	/* Back to empty: every block the array took is free again. */
	assert_int_equal(tfs_array_resize(&info, root, 2000, 0, NULL, &root), 0);
	commit(e, root);
	commit(e, root);
	assert_int_equal(nr_free(e), base);
	free(model);
	env_close(e);
}

static void test_array_resize_set_get_commit_reopen_8_byte_values(void **state)
{
	(void)state;
	grow_shrink_set_get(8);
}

static void test_array_resize_set_get_commit_reopen_4_byte_values(void **state)
{
	(void)state;
	grow_shrink_set_get(4);
}

static void test_array_resize_set_get_commit_reopen_odd_value_size(void **state)
{
	(void)state;
	grow_shrink_set_get(12);
}

static void test_array_grow_shares_one_block_and_set_copies_it(void **state)
{
	(void)state;
	struct env *e = env_open();
	struct tfs_array_info info;
	uint64_t root, model[509 * 40], before;

	assert_int_equal(tfs_array_info_init(&info, e->tm, 8), 0);
	assert_int_equal(tfs_array_empty(&info, &root), 0);
	before = nr_free(e);
	resize(&info, &root, model, 0, 509 * 40, 5);
	/* 40 full blocks cost one array block (and the btree leaf was there already). */
	assert_int_equal(before - nr_free(e), 1);
	set(&info, &root, model, 509 * 7 + 3, 99);
	assert_int_equal(before - nr_free(e), 2);
	assert_array(&info, root, model, 509 * 40);
	commit(e, root);

	/* After commit the old root is intact while the new transaction changes the array. */
	uint64_t old_root = root;
	set(&info, &root, model, 509 * 7 + 3, 100);
	set(&info, &root, model, 0, 101);
	assert_int_not_equal(root, old_root);
	uint8_t v[8], want[8];
	make_value(want, 8, 99);
	assert_int_equal(tfs_array_get(&info, old_root, 509 * 7 + 3, v), 0);
	assert_memory_equal(v, want, 8);
	make_value(want, 8, 5);
	assert_int_equal(tfs_array_get(&info, old_root, 0, v), 0);
	assert_memory_equal(v, want, 8);
	assert_array(&info, root, model, 509 * 40);
	commit(e, root);
	root = reopen(e);
	assert_int_equal(tfs_array_info_init(&info, e->tm, 8), 0);
	assert_array(&info, root, model, 509 * 40);
	assert_int_equal(tfs_array_del(&info, root), 0);
	env_close(e);
}

/* Sizes near block boundaries are where resize goes wrong, so pick them often. */
static uint64_t pick_size(uint32_t *seed, uint32_t per_block, uint64_t max)
{
	*seed = *seed * 1103515245u + 12345u;
	uint64_t blocks = (*seed >> 8) % (max / per_block + 1);
	int64_t delta = (int64_t)((*seed >> 4) % 5) - 2;
	uint64_t n = blocks * per_block;

	if ((*seed & 3) == 0)
		return (*seed >> 3) % max;
	n = delta < 0 && n < (uint64_t)-delta ? 0 : (uint64_t)((int64_t)n + delta);
	return n > max ? max : n;
}

static void test_array_random_resizes_and_sets_match_the_model(void **state)
{
	(void)state;
	enum { MAX = 6000 };
	struct env *e = env_open();
	struct tfs_array_info info;
	uint64_t root, size = 0, base, *model = calloc(MAX, sizeof(*model));
	uint32_t seed = 2024;

	assert_non_null(model);
	assert_int_equal(tfs_array_info_init(&info, e->tm, 8), 0);
	assert_int_equal(tfs_array_empty(&info, &root), 0);
	commit(e, root);
	base = nr_free(e);
	for (int step = 0; step < 300; step++) {
		uint64_t n = pick_size(&seed, info.per_block, MAX);
		if (n > size)
			resize(&info, &root, model, size, n, (uint64_t)step << 32);
		else
			assert_int_equal(tfs_array_resize(&info, root, size, n, NULL, &root), 0);
		size = n;
		for (int k = 0; size && k < 20; k++) {
			seed = seed * 1103515245u + 12345u;
			set(&info, &root, model, (seed >> 5) % size, seed);
		}
		if (step % 10 == 0) {
			assert_array(&info, root, model, size);
			commit(e, root);
		}
		if (step % 50 == 0) {
			root = reopen(e);
			assert_int_equal(tfs_array_info_init(&info, e->tm, 8), 0);
		}
	}
	assert_array(&info, root, model, size);
	assert_int_equal(tfs_array_resize(&info, root, size, 0, NULL, &root), 0);
	commit(e, root);
	commit(e, root);
	assert_int_equal(nr_free(e), base);
	free(model);
	env_close(e);
}

static void test_array_refuses_indexes_past_the_end(void **state)
{
	(void)state;
	struct env *e = env_open();
	struct tfs_array_info info;
	uint64_t root, r2, model[100];
	uint8_t v[8] = { 1 };

	assert_int_equal(tfs_array_info_init(&info, e->tm, 0), -EINVAL);
	assert_int_equal(tfs_array_info_init(&info, e->tm, TFS_BLOCK_SIZE), -EINVAL);
	assert_int_equal(tfs_array_info_init(&info, e->tm, 8), 0);
	assert_int_equal(tfs_array_empty(&info, &root), 0);
	assert_int_equal(tfs_array_get(&info, root, 0, v), -ENODATA);
	resize(&info, &root, model, 0, 100, 1);
	assert_int_equal(tfs_array_set(&info, root, 100, v, &r2), -ENODATA);
	assert_int_equal(r2, root);
	assert_int_equal(tfs_array_set(&info, root, 5000, v, &r2), -ENODATA);
	assert_array(&info, root, model, 100);
	assert_int_equal(tfs_array_del(&info, root), 0);
	env_close(e);
}

/* ---- bitsets ------------------------------------------------------------ */

static void assert_bits(const struct tfs_bitset_info *info, uint64_t root, const bool *model,
			uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		bool on;
		assert_int_equal(tfs_bitset_test(info, root, i, &on), 0);
		assert_int_equal(on, model[i]);
	}
}

struct bit_walk {
	const bool *model;
	uint64_t next;
};

static int bit_walk(void *ctx, uint64_t bit, bool on)
{
	struct bit_walk *w = ctx;

	assert_int_equal(bit, w->next);
	assert_int_equal(on, w->model[bit]);
	w->next++;
	return 0;
}

static void bitset_resize(const struct tfs_bitset_info *info, uint64_t *root, bool *model,
			  uint64_t old, uint64_t new, bool fill)
{
	assert_int_equal(tfs_bitset_resize(info, *root, old, new, fill, root), 0);
	for (uint64_t i = old; i < new; i++)
		model[i] = fill;
}

static void test_bitset_resize_set_walk_commit_reopen(void **state)
{
	(void)state;
	struct env *e = env_open();
	struct tfs_bitset_info info;
	static bool model[100000];
	uint64_t root, base;
	uint32_t seed = 3;

	assert_int_equal(tfs_bitset_info_init(&info, e->tm), 0);
	assert_int_equal(tfs_bitset_empty(&info, &root), 0);
	commit(e, root);
	base = nr_free(e);
	bitset_resize(&info, &root, model, 0, 70, true);
	bitset_resize(&info, &root, model, 70, 128, true); /* to exactly the end of a word */
	assert_bits(&info, root, model, 128);
	assert_int_equal(tfs_bitset_resize(&info, root, 128, 70, false, &root), 0);
	bitset_resize(&info, &root, model, 70, 100, false);
	bitset_resize(&info, &root, model, 100, 40000, true);
	for (int k = 0; k < 2000; k++) {
		seed = seed * 1103515245u + 12345u;
		uint64_t b = seed % 40000;
		bool on = seed >> 20 & 1;
		assert_int_equal(tfs_bitset_set(&info, root, b, on, &root), 0);
		model[b] = on;
	}
	assert_bits(&info, root, model, 40000);
	commit(e, root);
	root = reopen(e);
	assert_int_equal(tfs_bitset_info_init(&info, e->tm), 0);
	assert_bits(&info, root, model, 40000);

	/* Shrink to a partial word, grow with clear bits: the old ones past the cut stay gone. */
	assert_int_equal(tfs_bitset_resize(&info, root, 40000, 33, false, &root), 0);
	bitset_resize(&info, &root, model, 33, 99999, false);
	struct bit_walk w = { model, 0 };
	assert_int_equal(tfs_bitset_walk(&info, root, 99999, bit_walk, &w), 0);
	assert_int_equal(w.next, 99999);
	bool on;
	assert_int_equal(tfs_bitset_test(&info, root, 99999 + 64, &on), -ENODATA);

	assert_int_equal(tfs_bitset_resize(&info, root, 99999, 0, false, &root), 0);
	commit(e, root);
	commit(e, root);
	assert_int_equal(nr_free(e), base);
	env_close(e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_array_resize_set_get_commit_reopen_8_byte_values),
		cmocka_unit_test(test_array_resize_set_get_commit_reopen_4_byte_values),
		cmocka_unit_test(test_array_resize_set_get_commit_reopen_odd_value_size),
		cmocka_unit_test(test_array_grow_shares_one_block_and_set_copies_it),
		cmocka_unit_test(test_array_random_resizes_and_sets_match_the_model),
		cmocka_unit_test(test_array_refuses_indexes_past_the_end),
		cmocka_unit_test(test_bitset_resize_set_walk_commit_reopen),
	};
	tfs_log_set_sink(quiet_sink, NULL);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
