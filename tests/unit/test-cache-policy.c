/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The cache target's mapping and smq bookkeeping (src/engine/cache-policy.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cache-policy.h"

#define NONE UINT32_MAX

static struct tfs_cache_policy_state *make(uint32_t nr)
{
	struct tfs_cache_policy_state *p;

	assert_int_equal(tfs_cache_policy_create(nr, &p), 0);
	return p;
}

static void test_insert_lookup_remove_keep_free_and_dirty_counts(void **state)
{
	struct tfs_cache_policy_state *p = make(8);
	uint32_t cb;

	(void)state;
	assert_int_equal(tfs_cache_policy_nr_free(p), 8);
	for (uint32_t i = 0; i < 8; i++)
		tfs_cache_policy_insert(p, i, 1000 + i * 1024, i % 2, 0);
	assert_int_equal(tfs_cache_policy_nr_free(p), 0);
	assert_int_equal(tfs_cache_policy_nr_dirty(p), 4);
	assert_int_equal(tfs_cache_policy_take_free(p), NONE);
	for (uint32_t i = 0; i < 8; i++) {
		assert_int_equal(tfs_cache_policy_lookup(p, 1000 + i * 1024), i);
		assert_int_equal(tfs_cache_policy_oblock(p, i), 1000 + i * 1024);
	}
	assert_int_equal(tfs_cache_policy_lookup(p, 999), NONE);
	tfs_cache_policy_remove(p, 3); /* dirty */
	tfs_cache_policy_remove(p, 3); /* again: nothing */
	assert_int_equal(tfs_cache_policy_nr_dirty(p), 3);
	assert_int_equal(tfs_cache_policy_nr_free(p), 1);
	assert_int_equal(tfs_cache_policy_lookup(p, 1000 + 3 * 1024), NONE);
	assert_int_equal(tfs_cache_policy_oblock(p, 3), UINT64_MAX);
	cb = tfs_cache_policy_take_free(p);
	assert_int_equal(cb, 3);
	assert_int_equal(tfs_cache_policy_nr_free(p), 0);
	tfs_cache_policy_put_free(p, cb);
	assert_int_equal(tfs_cache_policy_nr_free(p), 1);
	cb = tfs_cache_policy_take_free(p);
	tfs_cache_policy_insert(p, cb, 5, true, 0);
	assert_int_equal(tfs_cache_policy_nr_dirty(p), 4);
	tfs_cache_policy_set_dirty(p, cb, false);
	tfs_cache_policy_set_dirty(p, cb, false);
	assert_int_equal(tfs_cache_policy_nr_dirty(p), 3);
	/* The rest of the chain survives removals from its middle. */
	for (uint32_t i = 0; i < 8; i++)
		if (i != 3)
			assert_int_equal(tfs_cache_policy_lookup(p, 1000 + i * 1024), i);
	tfs_cache_policy_destroy(p);
}

static void test_a_block_used_twice_becomes_a_candidate_once(void **state)
{
	struct tfs_cache_policy_state *p = make(4);
	uint64_t ob;

	(void)state;
	assert_false(tfs_cache_policy_access(p, 77, NONE, true));
	assert_false(tfs_cache_policy_pop_candidate(p, &ob));
	assert_true(tfs_cache_policy_access(p, 77, NONE, true));
	assert_false(tfs_cache_policy_access(p, 77, NONE, true)); /* queued already */
	assert_int_equal(tfs_cache_policy_candidate_hits(p, 77), 3);
	assert_true(tfs_cache_policy_pop_candidate(p, &ob));
	assert_int_equal(ob, 77);
	assert_false(tfs_cache_policy_pop_candidate(p, &ob));
	/* Without may_promote (passthrough, cleaner, migrations off) it is only counted. */
	assert_false(tfs_cache_policy_access(p, 78, NONE, false));
	assert_false(tfs_cache_policy_access(p, 78, NONE, false));
	assert_false(tfs_cache_policy_pop_candidate(p, &ob));
	tfs_cache_policy_destroy(p);
}

static void test_coldest_clean_block_is_the_demotion_victim(void **state)
{
	struct tfs_cache_policy_state *p = make(4);

	(void)state;
	tfs_cache_policy_insert(p, 0, 10, false, 9);
	tfs_cache_policy_insert(p, 1, 11, true, 0);  /* coldest, but dirty */
	tfs_cache_policy_insert(p, 2, 12, false, 3);
	tfs_cache_policy_insert(p, 3, 13, false, 5);
	assert_int_equal(tfs_cache_policy_coldest_clean(p, 4), 2);
	assert_int_equal(tfs_cache_policy_coldest_clean(p, 3), NONE); /* not colder than that */
	tfs_cache_policy_access(p, 12, 2, true);
	tfs_cache_policy_access(p, 12, 2, true);
	tfs_cache_policy_access(p, 12, 2, true);
	assert_int_equal(tfs_cache_policy_hits(p, 2), 6);
	assert_int_equal(tfs_cache_policy_coldest_clean(p, 100), 3);
	tfs_cache_policy_destroy(p);
}

static void test_writeback_goes_round_the_origin_in_order(void **state)
{
	struct tfs_cache_policy_state *p = make(6);
	static const uint64_t obs[] = { 50, 7, 900, 30, 8, 600 };
	static const uint64_t order[] = { 7, 8, 30, 50, 600, 900, 7 };

	(void)state;
	assert_int_equal(tfs_cache_policy_next_dirty(p), NONE);
	for (uint32_t i = 0; i < 6; i++)
		tfs_cache_policy_insert(p, i, obs[i], true, 0);
	for (unsigned i = 0; i < 7; i++)
		assert_int_equal(tfs_cache_policy_oblock(p, tfs_cache_policy_next_dirty(p)), order[i]);
	/* Cleaned on the way: the walk goes on past it. */
	tfs_cache_policy_set_dirty(p, 4, false); /* 8 */
	assert_int_equal(tfs_cache_policy_oblock(p, tfs_cache_policy_next_dirty(p)), 30);
	tfs_cache_policy_destroy(p);
}

static void test_counts_age(void **state)
{
	struct tfs_cache_policy_state *p = make(4);

	(void)state;
	tfs_cache_policy_insert(p, 0, 1, false, 1000);
	/* Every so many accesses (at least 4096) every count is halved. */
	for (unsigned i = 0; i < 4096; i++)
		tfs_cache_policy_access(p, 2 + i, NONE, false);
	assert_int_equal(tfs_cache_policy_hits(p, 0), 500);
	tfs_cache_policy_destroy(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_insert_lookup_remove_keep_free_and_dirty_counts),
		cmocka_unit_test(test_a_block_used_twice_becomes_a_candidate_once),
		cmocka_unit_test(test_coldest_clean_block_is_the_demotion_victim),
		cmocka_unit_test(test_writeback_goes_round_the_origin_in_order),
		cmocka_unit_test(test_counts_age),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
