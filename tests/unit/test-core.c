/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The core's admission, suspend/drain/resume and pushback rules, with
 * real threads standing in for requests.  Waits poll with a deadline; no
 * assertion depends on timing beyond "still blocked after a while".
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core.h"

struct req {
	struct tfs_core *core;
	uint32_t dev;
	atomic_int phase; /* 0 started, 1 admitted, 2 done */
	pthread_t t;
};

static void *req_thread(void *arg)
{
	struct req *q = arg;
	struct tfs_core_io io;

	tfs_core_enter(q->core, &io, q->dev);
	atomic_store(&q->phase, 1);
	tfs_core_exit(q->core, &io);
	atomic_store(&q->phase, 2);
	return NULL;
}

static void start(struct req *q, struct tfs_core *core, uint32_t dev)
{
	q->core = core;
	q->dev = dev;
	atomic_store(&q->phase, 0);
	assert_int_equal(pthread_create(&q->t, NULL, req_thread, q), 0);
}

/* Poll until cond(arg) or 20 s pass; returns cond's last answer. */
static bool eventually(bool (*cond)(void *), void *arg)
{
	for (int i = 0; i < 20000; i++) {
		if (cond(arg))
			return true;
		usleep(1000);
	}
	return cond(arg);
}

static bool done(void *arg)
{
	return atomic_load(&((struct req *)arg)->phase) == 2;
}

struct held_count {
	struct tfs_core *core;
	uint32_t dev;
	unsigned n;
};

static bool has_held(void *arg)
{
	struct held_count *h = arg;

	return tfs_core_nr_held(h->core, h->dev) == h->n;
}

static void expect_held(struct tfs_core *core, uint32_t dev, unsigned n)
{
	struct held_count h = { core, dev, n };

	assert_true(eventually(has_held, &h));
}

static void test_idle_suspend_holds_new_requests_until_resume(void **state)
{
	struct tfs_core *core;
	struct req a;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), 0);
	tfs_core_suspend_end(core, true);
	assert_true(tfs_core_suspended(core, TFS_CORE_POOL));
	/* Suspending what is suspended changes nothing. */
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 0);
	tfs_core_suspend_end(core, true);

	start(&a, core, 7);
	expect_held(core, 7, 1);
	usleep(50000);
	assert_int_equal(atomic_load(&a.phase), 0);
	assert_int_equal(tfs_core_resume(core, NULL, 0), 1);
	assert_true(eventually(done, &a));
	pthread_join(a.t, NULL);
	assert_false(tfs_core_suspended(core, TFS_CORE_POOL));
	assert_int_equal(tfs_core_resume(core, NULL, 0), 0);
	tfs_core_destroy(core);
}

static void test_drain_waits_for_in_flight_and_times_out(void **state)
{
	struct tfs_core *core;
	struct tfs_core_io io;
	struct timespec deadline;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	tfs_core_enter(core, &io, 3);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_nsec += 200 * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	assert_int_equal(tfs_core_drain(core, NULL, 0, &deadline, NULL, NULL), -ETIMEDOUT);
	/* Abandoned: active again, and a new request goes straight in. */
	tfs_core_suspend_end(core, false);
	assert_false(tfs_core_suspended(core, TFS_CORE_POOL));
	tfs_core_exit(core, &io);
	tfs_core_enter(core, &io, 3);
	tfs_core_exit(core, &io);
	tfs_core_destroy(core);
}

static bool always(void *arg)
{
	(void)arg;
	return true;
}

static void test_drain_is_cancelled(void **state)
{
	struct tfs_core *core;
	struct tfs_core_io io;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	tfs_core_enter(core, &io, 1);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, true), 1);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, always, NULL), -EINTR);
	tfs_core_suspend_end(core, false);
	tfs_core_exit(core, &io);
	tfs_core_destroy(core);
}

/* A request held inside the target: what hold_check says before and during suspends. */
static void test_hold_check_pushback_and_eio(void **state)
{
	struct tfs_core *core;
	struct tfs_core_io io, io2;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	tfs_core_enter(core, &io, 5);
	assert_int_equal(tfs_core_hold_check(core, &io), 0);

	/* noflush: pushed back, out of the drain's count at once, held in the core. */
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, true), 1);
	assert_int_equal(tfs_core_hold_check(core, &io), TFS_CORE_PUSHBACK);
	assert_int_equal(tfs_core_nr_held(core, 5), 1);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), 0);
	tfs_core_suspend_end(core, true);
	assert_int_equal(tfs_core_resume(core, NULL, 0), 1);
	tfs_core_reissue(core, &io);
	assert_int_equal(tfs_core_nr_held(core, 5), 0);
	assert_int_equal(tfs_core_hold_check(core, &io), 0);

	/* Without noflush: -EIO, and it stays in flight until it leaves. */
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	assert_int_equal(tfs_core_hold_check(core, &io), -EIO);
	tfs_core_exit(core, &io);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), 0);
	tfs_core_suspend_end(core, true);
	tfs_core_resume(core, NULL, 0);

	/*
	 * An abandoned noflush suspend: one request was pushed back and goes
	 * in again; one told to leave but not pushed back yet fails.
	 */
	tfs_core_enter(core, &io, 5);
	tfs_core_enter(core, &io2, 6);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, true), 1);
	assert_int_equal(tfs_core_hold_check(core, &io), TFS_CORE_PUSHBACK);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, always, NULL), -EINTR);
	tfs_core_suspend_end(core, false);
	assert_int_equal(tfs_core_hold_check(core, &io2), -EIO);
	tfs_core_reissue(core, &io); /* the pool is active: no wait */
	tfs_core_exit(core, &io);
	tfs_core_exit(core, &io2);
	tfs_core_destroy(core);
}

static void test_device_suspend_holds_only_that_device(void **state)
{
	struct tfs_core *core;
	uint32_t one = 1;
	struct req a, b;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	assert_int_equal(tfs_core_suspend_begin(core, &one, 1, false), 1);
	assert_int_equal(tfs_core_drain(core, &one, 1, NULL, NULL, NULL), 0);
	tfs_core_suspend_end(core, true);
	assert_true(tfs_core_suspended(core, 1));
	assert_false(tfs_core_suspended(core, TFS_CORE_POOL));

	start(&a, core, 1);
	expect_held(core, 1, 1);
	start(&b, core, 2); /* not held behind a's suspended device */
	assert_true(eventually(done, &b));
	pthread_join(b.t, NULL);

	/* The pool suspended too: resuming the device alone keeps a held. */
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), 0);
	tfs_core_suspend_end(core, true);
	assert_int_equal(tfs_core_resume(core, &one, 1), 1);
	usleep(50000);
	assert_int_equal(atomic_load(&a.phase), 0);
	assert_int_equal(tfs_core_resume(core, NULL, 0), 1);
	assert_true(eventually(done, &a));
	pthread_join(a.t, NULL);
	tfs_core_destroy(core);
}

static void test_admin_refused_while_pool_suspended(void **state)
{
	struct tfs_core *core;
	struct tfs_core_io io;
	uint32_t one = 1;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	/* A device's suspend leaves pool-level changes alone. */
	assert_int_equal(tfs_core_suspend_begin(core, &one, 1, false), 1);
	tfs_core_suspend_end(core, true);
	assert_int_equal(tfs_core_enter_admin(core, &io), 0);
	tfs_core_exit(core, &io);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	assert_int_equal(tfs_core_enter_admin(core, &io), -EBUSY);
	tfs_core_suspend_end(core, true);
	assert_int_equal(tfs_core_enter_admin(core, &io), -EBUSY);
	tfs_core_resume(core, NULL, 0);
	assert_int_equal(tfs_core_enter_admin(core, &io), 0);
	tfs_core_exit(core, &io);
	tfs_core_destroy(core);
}

static void test_close_admits_everything(void **state)
{
	struct tfs_core *core;
	struct req a;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, true), 1);
	tfs_core_suspend_end(core, true);
	start(&a, core, 9);
	expect_held(core, 9, 1);
	tfs_core_close(core);
	assert_true(eventually(done, &a));
	pthread_join(a.t, NULL);
	/* Nothing is suspended after close. */
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), -ESHUTDOWN);
	assert_false(tfs_core_suspended(core, TFS_CORE_POOL));
	tfs_core_destroy(core);
}

/* Many requests held across suspend/resume cycles all finish; none is stranded. */
/* A suspend waiting for a request that never leaves is abandoned by close, not reported done. */
static void *close_later(void *arg)
{
	usleep(100000);
	tfs_core_close(arg);
	return NULL;
}

static void test_close_abandons_a_draining_suspend(void **state)
{
	struct tfs_core *core;
	struct tfs_core_io io;
	pthread_t t;

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	tfs_core_enter(core, &io, 4);
	assert_int_equal(tfs_core_suspend_begin(core, NULL, 0, false), 1);
	assert_int_equal(pthread_create(&t, NULL, close_later, core), 0);
	assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), -ESHUTDOWN);
	tfs_core_suspend_end(core, false);
	pthread_join(t, NULL);
	tfs_core_exit(core, &io);
	tfs_core_destroy(core);
}

static void test_cycles_strand_nothing(void **state)
{
	enum { N = 16 };
	struct tfs_core *core;
	struct req r[N];

	(void)state;
	assert_int_equal(tfs_core_create(&core), 0);
	for (int round = 0; round < 20; round++) {
		for (int i = 0; i < N; i++)
			start(&r[i], core, (uint32_t)(i % 3));
		assert_true(tfs_core_suspend_begin(core, NULL, 0, round % 2) >= 0);
		assert_int_equal(tfs_core_drain(core, NULL, 0, NULL, NULL, NULL), 0);
		tfs_core_suspend_end(core, true);
		tfs_core_resume(core, NULL, 0);
		for (int i = 0; i < N; i++) {
			assert_true(eventually(done, &r[i]));
			pthread_join(r[i].t, NULL);
		}
	}
	tfs_core_destroy(core);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_idle_suspend_holds_new_requests_until_resume),
		cmocka_unit_test(test_drain_waits_for_in_flight_and_times_out),
		cmocka_unit_test(test_drain_is_cancelled),
		cmocka_unit_test(test_hold_check_pushback_and_eio),
		cmocka_unit_test(test_device_suspend_holds_only_that_device),
		cmocka_unit_test(test_admin_refused_while_pool_suspended),
		cmocka_unit_test(test_close_admits_everything),
		cmocka_unit_test(test_close_abandons_a_draining_suspend),
		cmocka_unit_test(test_cycles_strand_nothing),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
