/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Preallocation of a data file's chunks: a fill reserves the whole chunk
 * on the host without changing what any block reads, marks it, a punch
 * forgets it, a resize forgets what it made partial, a fill ahead fills
 * only what is not marked, and nothing is made for a chunk size of 0.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "log.h"
#include "prealloc.h"

#define BS (64u << 10)
#define CHUNK (4u << 20) /* 64 blocks */

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

struct env {
	char path[64];
	struct tfs_bdev *dev;
	uint8_t buf[BS];
};

/* A sparse file of 72 blocks (a chunk and a piece) with block 3 written. */
static int setup(void **state)
{
	struct env *e = calloc(1, sizeof(*e));
	int fd;

	tfs_log_set_sink(quiet_sink, NULL);
	strcpy(e->path, "/tmp/tfs-prealloc-XXXXXX");
	fd = mkstemp(e->path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 72 * (off_t)BS), 0);
	close(fd);
	assert_int_equal(tfs_bdev_open(e->path, false, &e->dev), 0);
	memset(e->buf, 0xa5, BS);
	assert_int_equal(tfs_bdev_write(e->dev, e->buf, BS, 3 * BS), 0);
	*state = e;
	return 0;
}

static int teardown(void **state)
{
	struct env *e = *state;

	tfs_bdev_close(e->dev);
	unlink(e->path);
	free(e);
	return 0;
}

static uint64_t host_bytes(const struct env *e)
{
	struct stat st;

	assert_int_equal(stat(e->path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

static void test_a_fill_reserves_the_chunk_and_changes_no_data(void **state)
{
	struct env *e = *state;
	struct tfs_prealloc *p;
	struct tfs_prealloc_counts n;

	assert_int_equal(tfs_prealloc_create(e->dev, BS, CHUNK, 72, "test", &p), 0);
	assert_non_null(p);
	assert_false(tfs_prealloc_ready(p, 5));
	assert_int_equal(tfs_prealloc_fill(p, 5), 0);
	assert_true(tfs_prealloc_ready(p, 0));
	assert_true(tfs_prealloc_ready(p, 63));
	assert_false(tfs_prealloc_ready(p, 64));
	assert_true(host_bytes(e) >= CHUNK);
	tfs_prealloc_counts(p, &n);
	assert_true(n.active);
	assert_int_equal(n.chunk_bytes, CHUNK);
	assert_int_equal(n.chunks, 1);
	assert_int_equal(n.fallocates, 1);
	assert_int_equal(n.failures, 0);

	uint8_t *got = malloc(BS), zero[4096] = { 0 };
	assert_int_equal(tfs_bdev_read(e->dev, got, BS, 3 * BS), 0);
	assert_memory_equal(got, e->buf, BS);
	assert_int_equal(tfs_bdev_read(e->dev, got, BS, 10 * BS), 0);
	for (size_t i = 0; i < BS; i += sizeof(zero))
		assert_memory_equal(got + i, zero, sizeof(zero));
	free(got);

	/* The last chunk ends with the device. */
	assert_int_equal(tfs_prealloc_fill(p, 70), 0);
	assert_true(tfs_prealloc_ready(p, 71));
	tfs_prealloc_counts(p, &n);
	assert_int_equal(n.chunks, 2);
	tfs_prealloc_destroy(p);
}

static void test_a_punch_or_a_resize_forgets_the_chunks_it_touches(void **state)
{
	struct env *e = *state;
	struct tfs_prealloc *p;
	struct tfs_prealloc_counts n;

	assert_int_equal(tfs_prealloc_create(e->dev, BS, CHUNK, 72, "test", &p), 0);
	assert_int_equal(tfs_prealloc_fill(p, 1), 0);
	assert_int_equal(tfs_prealloc_fill(p, 65), 0);
	tfs_prealloc_forget(p, 62, 1);
	assert_false(tfs_prealloc_ready(p, 1));
	assert_true(tfs_prealloc_ready(p, 65));
	/* Grown: the old last chunk was filled only up to the old end. */
	assert_int_equal(tfs_prealloc_resize(p, 200), 0);
	assert_false(tfs_prealloc_ready(p, 65));
	assert_int_equal(tfs_prealloc_fill(p, 195), 0);
	assert_true(tfs_prealloc_ready(p, 199));
	/* Shrunk: chunks past the end are gone. */
	assert_int_equal(tfs_prealloc_resize(p, 100), 0);
	assert_false(tfs_prealloc_ready(p, 195));
	tfs_prealloc_counts(p, &n);
	assert_int_equal(n.chunks, 0);
	assert_int_equal(n.fallocates, 3);
	tfs_prealloc_destroy(p);
}

static void *fill_one(void *arg)
{
	assert_int_equal(tfs_prealloc_fill(arg, 7), 0);
	return NULL;
}

/* Requests crowding into a new chunk: one fallocate, the others wait for it. */
static void test_threads_filling_one_chunk_fallocate_it_once(void **state)
{
	struct env *e = *state;
	struct tfs_prealloc *p;
	struct tfs_prealloc_counts n;
	pthread_t t[8];

	assert_int_equal(tfs_prealloc_create(e->dev, BS, CHUNK, 72, "test", &p), 0);
	for (int i = 0; i < 8; i++)
		assert_int_equal(pthread_create(&t[i], NULL, fill_one, p), 0);
	for (int i = 0; i < 8; i++)
		pthread_join(t[i], NULL);
	tfs_prealloc_counts(p, &n);
	assert_int_equal(n.fallocates, 1);
	assert_int_equal(n.chunks, 1);
	tfs_prealloc_destroy(p);
}

/* What a COW store does one region ahead of its allocator. */
static void test_a_fill_ahead_fills_only_unmarked_chunks_inside_the_device(void **state)
{
	struct env *e = *state;
	struct tfs_prealloc *p;
	struct tfs_prealloc_counts n;

	assert_int_equal(tfs_prealloc_fill_ahead(NULL, 0), 0);
	assert_int_equal(tfs_prealloc_create(e->dev, BS, CHUNK, 72, "test", &p), 0);
	assert_int_equal(tfs_prealloc_fill_ahead(p, 64), 0);
	assert_true(tfs_prealloc_ready(p, 71));
	assert_false(tfs_prealloc_ready(p, 0));
	assert_int_equal(tfs_prealloc_fill_ahead(p, 70), 0);
	/* Past the device's end there is nothing to fill: the file never grows. */
	assert_int_equal(tfs_prealloc_fill_ahead(p, 128), -EOPNOTSUPP);
	assert_true(host_bytes(e) < 72 * (uint64_t)BS);
	tfs_prealloc_counts(p, &n);
	assert_int_equal(n.fallocates, 1);
	assert_int_equal(n.chunks, 1);
	assert_int_equal(n.failures, 0);
	tfs_prealloc_destroy(p);
}

struct then_log {
	uint64_t block, nr;
	unsigned calls;
	int ret;
};

static int then_record(void *arg, uint64_t block, uint64_t nr)
{
	struct then_log *l = arg;

	l->block = block;
	l->nr = nr;
	l->calls++;
	return l->ret;
}

static void test_then_runs_once_per_fill_on_the_chunk_and_its_error_fails_it(void **state)
{
	struct env *e = *state;
	struct then_log l = { .ret = 0 };
	struct tfs_prealloc *p;
	struct tfs_prealloc_counts n;

	tfs_prealloc_set_then(NULL, then_record, &l);
	assert_int_equal(tfs_prealloc_create(e->dev, BS, CHUNK, 72, "test", &p), 0);
	tfs_prealloc_set_then(p, then_record, &l);
	assert_int_equal(tfs_prealloc_fill(p, 5), 0);
	assert_int_equal(l.calls, 1);
	assert_int_equal(l.block, 0);
	assert_int_equal(l.nr, 64);
	/* Marked: not again. */
	assert_int_equal(tfs_prealloc_fill(p, 6), 0);
	assert_int_equal(l.calls, 1);
	/* The last chunk is cut at the device's end; an error leaves it unmarked. */
	l.ret = -EIO;
	assert_int_equal(tfs_prealloc_fill(p, 70), -EIO);
	assert_int_equal(l.block, 64);
	assert_int_equal(l.nr, 8);
	assert_false(tfs_prealloc_ready(p, 70));
	tfs_prealloc_counts(p, &n);
	assert_int_equal(n.failures, 1);
	assert_int_equal(n.chunks, 1);
	assert_true(n.active);
	tfs_prealloc_destroy(p);
}

static void test_nothing_is_made_when_off(void **state)
{
	struct env *e = *state;
	struct tfs_prealloc *p = (void *)1;
	struct tfs_prealloc_counts n;

	assert_int_equal(tfs_prealloc_create(e->dev, BS, 0, 72, "test", &p), 0);
	assert_null(p);
	assert_false(tfs_prealloc_ready(NULL, 0));
	tfs_prealloc_forget(NULL, 0, 10);
	assert_int_equal(tfs_prealloc_resize(NULL, 10), 0);
	tfs_prealloc_counts(NULL, &n);
	assert_false(n.active);
	assert_int_equal(n.chunk_bytes, 0);
	tfs_prealloc_destroy(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_a_fill_reserves_the_chunk_and_changes_no_data,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_a_punch_or_a_resize_forgets_the_chunks_it_touches,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_threads_filling_one_chunk_fallocate_it_once,
						setup, teardown),
		cmocka_unit_test_setup_teardown(
			test_a_fill_ahead_fills_only_unmarked_chunks_inside_the_device, setup, teardown),
		cmocka_unit_test_setup_teardown(test_nothing_is_made_when_off, setup, teardown),
		cmocka_unit_test_setup_teardown(
			test_then_runs_once_per_fill_on_the_chunk_and_its_error_fails_it, setup,
			teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
