/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Range locks: disjoint ranges and other devices never wait, overlapping
 * ones do, shared cells coexist, arrival order is kept among overlapping
 * requests, and a stress run with many threads never lets two holders of
 * conflicting cells in at once.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"
#include "prison.h"

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* A thread that takes one cell and records when it got it. */
struct taker {
	struct tfs_prison *p;
	uint32_t dev;
	uint64_t begin, end;
	bool shared;
	atomic_int got;     /* 1 once the cell is held */
	atomic_int release; /* set to let the thread unlock and exit */
	atomic_int *order;  /* grant counter shared by takers */
	int rank;           /* order in which it was granted */
	pthread_t thread;
};

static void *take(void *arg)
{
	struct taker *t = arg;

	if (t->shared)
		assert_int_equal(tfs_prison_lock_shared(t->p, t->dev, t->begin, t->end), 0);
	else
		assert_int_equal(tfs_prison_lock(t->p, t->dev, t->begin, t->end), 0);
	if (t->order)
		t->rank = atomic_fetch_add(t->order, 1);
	atomic_store(&t->got, 1);
	while (!atomic_load(&t->release))
		sleep_ms(1);
	if (t->shared)
		tfs_prison_unlock_shared(t->p, t->dev, t->begin, t->end);
	else
		tfs_prison_unlock(t->p, t->dev, t->begin, t->end);
	return NULL;
}

static void start(struct taker *t, struct tfs_prison *p, uint32_t dev, uint64_t b, uint64_t e,
		  bool shared)
{
	t->p = p;
	t->dev = dev;
	t->begin = b;
	t->end = e;
	t->shared = shared;
	atomic_store(&t->got, 0);
	atomic_store(&t->release, 0);
	assert_int_equal(pthread_create(&t->thread, NULL, take, t), 0);
}

static void finish(struct taker *t)
{
	atomic_store(&t->release, 1);
	pthread_join(t->thread, NULL);
}

/* Waits up to 2 s for the taker to hold its cell. */
static bool granted_soon(struct taker *t)
{
	for (int i = 0; i < 2000 && !atomic_load(&t->got); i++)
		sleep_ms(1);
	return atomic_load(&t->got);
}

static void test_disjoint_ranges_and_other_devices_do_not_wait(void **state)
{
	struct tfs_prison *p;

	(void)state;
	assert_int_equal(tfs_prison_create(&p), 0);
	assert_int_equal(tfs_prison_lock(p, 1, 0, 10), 0);
	assert_int_equal(tfs_prison_lock(p, 1, 10, 20), 0); /* touching, not overlapping */
	assert_int_equal(tfs_prison_lock(p, 2, 0, 20), 0);  /* same blocks, other device */
	assert_int_equal(tfs_prison_lock(p, 1, 100, UINT64_MAX), 0);
	tfs_prison_unlock(p, 1, 0, 10);
	tfs_prison_unlock(p, 1, 10, 20);
	tfs_prison_unlock(p, 2, 0, 20);
	tfs_prison_unlock(p, 1, 100, UINT64_MAX);
	tfs_prison_destroy(p);
}

static void test_overlapping_cell_waits_for_release(void **state)
{
	struct tfs_prison *p;
	struct taker t = { 0 };

	(void)state;
	assert_int_equal(tfs_prison_create(&p), 0);
	assert_int_equal(tfs_prison_lock(p, 7, 5, 6), 0);
	start(&t, p, 7, 0, 100, false);
	sleep_ms(100);
	assert_false(atomic_load(&t.got));
	tfs_prison_unlock(p, 7, 5, 6);
	assert_true(granted_soon(&t));
	finish(&t);
	tfs_prison_destroy(p);
}

static void test_shared_cells_coexist_but_exclude_exclusive_ones(void **state)
{
	struct tfs_prison *p;
	struct taker reader = { 0 }, writer = { 0 };

	(void)state;
	assert_int_equal(tfs_prison_create(&p), 0);
	assert_int_equal(tfs_prison_lock_shared(p, 3, 0, 10), 0);
	start(&reader, p, 3, 5, 15, true);
	assert_true(granted_soon(&reader));
	start(&writer, p, 3, 9, 10, false);
	sleep_ms(100);
	assert_false(atomic_load(&writer.got));
	tfs_prison_unlock_shared(p, 3, 0, 10);
	sleep_ms(50);
	assert_false(atomic_load(&writer.got)); /* the second reader still holds block 9 */
	finish(&reader);
	assert_true(granted_soon(&writer));
	finish(&writer);
	tfs_prison_destroy(p);
}

/* A waiting exclusive cell keeps later overlapping readers out, so it cannot starve. */
static void test_waiting_cell_holds_back_later_overlapping_ones(void **state)
{
	struct tfs_prison *p;
	struct taker whole = { 0 }, late = { 0 }, other = { 0 };
	atomic_int order = 0;

	(void)state;
	assert_int_equal(tfs_prison_create(&p), 0);
	assert_int_equal(tfs_prison_lock_shared(p, 1, 0, 1), 0);
	whole.order = &order;
	late.order = &order;
	start(&whole, p, 1, 0, UINT64_MAX, false);
	sleep_ms(50);
	start(&late, p, 1, 1000, 1001, true); /* overlaps only the waiting cell */
	start(&other, p, 2, 0, 1, false);     /* another device: not held back */
	assert_true(granted_soon(&other));
	sleep_ms(100);
	assert_false(atomic_load(&whole.got));
	assert_false(atomic_load(&late.got));
	tfs_prison_unlock_shared(p, 1, 0, 1);
	assert_true(granted_soon(&whole));
	sleep_ms(50);
	assert_false(atomic_load(&late.got));
	finish(&whole);
	assert_true(granted_soon(&late));
	assert_int_equal(whole.rank, 0);
	assert_int_equal(late.rank, 1);
	finish(&late);
	finish(&other);
	tfs_prison_destroy(p);
}

static void test_empty_range_is_refused(void **state)
{
	struct tfs_prison *p;

	(void)state;
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_prison_create(&p), 0);
	assert_int_equal(tfs_prison_lock(p, 1, 5, 5), -EINVAL);
	assert_int_equal(tfs_prison_lock_shared(p, 1, 6, 5), -EINVAL);
	tfs_prison_destroy(p);
	tfs_log_set_sink(NULL, NULL);
}

/* ---- stress: holders per block never conflict ---- */

#define STRESS_BLOCKS 64
#define STRESS_DEVS 3
#define STRESS_THREADS 8

static struct tfs_prison *stress_p;
static atomic_int writers[STRESS_DEVS][STRESS_BLOCKS];
static atomic_int readers[STRESS_DEVS][STRESS_BLOCKS];
static atomic_int violations;

static void *stress(void *arg)
{
	uint32_t seed = (uint32_t)(uintptr_t)arg * 2654435761u + 1;

	for (int it = 0; it < 3000; it++) {
		seed ^= seed << 13;
		seed ^= seed >> 17;
		seed ^= seed << 5;
		uint32_t dev = seed % STRESS_DEVS;
		uint64_t b = (seed >> 4) % STRESS_BLOCKS;
		uint64_t e = b + 1 + (seed >> 12) % 8;
		bool shared = (seed >> 20) & 1;

		if (e > STRESS_BLOCKS)
			e = STRESS_BLOCKS;
		if (shared)
			assert_int_equal(tfs_prison_lock_shared(stress_p, dev, b, e), 0);
		else
			assert_int_equal(tfs_prison_lock(stress_p, dev, b, e), 0);
		for (uint64_t i = b; i < e; i++) {
			if (shared) {
				atomic_fetch_add(&readers[dev][i], 1);
				if (atomic_load(&writers[dev][i]))
					atomic_fetch_add(&violations, 1);
			} else if (atomic_fetch_add(&writers[dev][i], 1) || atomic_load(&readers[dev][i])) {
				atomic_fetch_add(&violations, 1);
			}
		}
		if (!(it % 64))
			sched_yield();
		for (uint64_t i = b; i < e; i++) {
			if (shared)
				atomic_fetch_sub(&readers[dev][i], 1);
			else
				atomic_fetch_sub(&writers[dev][i], 1);
		}
		if (shared)
			tfs_prison_unlock_shared(stress_p, dev, b, e);
		else
			tfs_prison_unlock(stress_p, dev, b, e);
	}
	return NULL;
}

static void test_many_threads_never_hold_conflicting_cells(void **state)
{
	pthread_t th[STRESS_THREADS];

	(void)state;
	assert_int_equal(tfs_prison_create(&stress_p), 0);
	for (uintptr_t i = 0; i < STRESS_THREADS; i++)
		assert_int_equal(pthread_create(&th[i], NULL, stress, (void *)i), 0);
	for (int i = 0; i < STRESS_THREADS; i++)
		pthread_join(th[i], NULL);
	assert_int_equal(atomic_load(&violations), 0);
	tfs_prison_destroy(stress_p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_disjoint_ranges_and_other_devices_do_not_wait),
		cmocka_unit_test(test_overlapping_cell_waits_for_release),
		cmocka_unit_test(test_shared_cells_coexist_but_exclude_exclusive_ones),
		cmocka_unit_test(test_waiting_cell_holds_back_later_overlapping_ones),
		cmocka_unit_test(test_empty_range_is_refused),
		cmocka_unit_test(test_many_threads_never_hold_conflicting_cells),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
