/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The origin and cow-snapshot targets (src/engine/origin.c, cowsnap.c) on sparse files. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"
#include "origin.h"
#include "record-sink.h"

#define KIB 1024u
#define MIB (1024u * KIB)
#define ID TFS_DEV_ID_OTHER

static char logged[4096];

static void keep_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	size_t n = strlen(logged);

	(void)ctx;
	(void)level;
	snprintf(logged + n, sizeof(logged) - n, "%s\n", msg);
}

struct env {
	char dir[64];
	char origin[96], cow[96], cow2[96];
	struct tfs_cow_set *set;
	unsigned notified;
};

static void make_file(const char *path, uint64_t size, uint8_t fill)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
	uint8_t buf[4096];

	assert_true(fd >= 0);
	memset(buf, fill, sizeof(buf));
	if (fill)
		for (uint64_t off = 0; off < size; off += sizeof(buf))
			assert_int_equal(pwrite(fd, buf, sizeof(buf), (off_t)off), sizeof(buf));
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	close(fd);
}

static void notify(void *arg)
{
	((struct env *)arg)->notified++;
}

static int setup(void **state)
{
	struct env *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	snprintf(e->dir, sizeof(e->dir), "/tmp/tfs-cowsnap-XXXXXX");
	assert_non_null(mkdtemp(e->dir));
	snprintf(e->origin, sizeof(e->origin), "%s/origin", e->dir);
	snprintf(e->cow, sizeof(e->cow), "%s/cow", e->dir);
	snprintf(e->cow2, sizeof(e->cow2), "%s/cow2", e->dir);
	make_file(e->origin, 1 * MIB, 0x11);
	make_file(e->cow, 1 * MIB, 0);
	make_file(e->cow2, 64 * KIB, 0);
	logged[0] = '\0';
	tfs_log_set_sink(keep_sink, NULL);
	assert_int_equal(tfs_cow_set_create(true, false, 50, notify, e, &e->set), 0);
	assert_int_equal(tfs_cow_set_add_origin(e->set, "db", ID, e->origin), 0);
	*state = e;
	return 0;
}

static int teardown(void **state)
{
	struct env *e = *state;
	char cmd[128];

	tfs_cow_set_destroy(e->set);
	tfs_log_set_sink(NULL, NULL);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
	assert_int_equal(system(cmd), 0);
	free(e);
	return 0;
}

static void add_snap(struct env *e, const char *name, uint32_t id, const char *cow,
		     uint32_t chunk_sectors)
{
	struct tfs_cowsnap_params p = {
		.name = name, .id = id, .origin = "db", .cow = cow,
		.chunk_sectors = chunk_sectors, .persistent = true,
	};

	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), 0);
}

static void fill(uint8_t *buf, size_t len, uint8_t v)
{
	memset(buf, v, len);
}

static bool all(const uint8_t *buf, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != v)
			return false;
	return true;
}

static void test_writes_to_origin_and_snapshot_stay_apart(void **state)
{
	struct env *e = *state;
	struct tfs_dev *o, *s;
	static uint8_t buf[64 * KIB];
	uint64_t size;

	add_snap(e, "s", ID + 1, e->cow, 16);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID, 0, &o), 0);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, 0, &s), 0);
	assert_string_equal(tfs_dev_kind(o), "origin");
	assert_string_equal(tfs_dev_kind(s), "cow-snapshot");
	assert_int_equal(tfs_dev_get_size(s, &size), 0);
	assert_int_equal(size, 1 * MIB);
	/* Unaligned, across chunk edges. */
	fill(buf, 10000, 0x22);
	assert_int_equal(tfs_dev_write(o, buf, 10000, 7000), 0);
	fill(buf, 3000, 0x33);
	assert_int_equal(tfs_dev_write(s, buf, 3000, 100000), 0);
	assert_int_equal(tfs_dev_read(s, buf, 20000, 0), 0);
	assert_true(all(buf, 20000, 0x11));
	assert_int_equal(tfs_dev_read(o, buf, 10000, 7000), 0);
	assert_true(all(buf, 10000, 0x22));
	assert_int_equal(tfs_dev_read(o, buf, 3000, 100000), 0);
	assert_true(all(buf, 3000, 0x11));
	assert_int_equal(tfs_dev_read(s, buf, 3000, 100000), 0);
	assert_true(all(buf, 3000, 0x33));
	/* Past the end: a device of fixed size. */
	assert_int_equal(tfs_dev_write(o, buf, 1, 1 * MIB), -ENOSPC);
	assert_int_equal(tfs_dev_write(s, buf, 2, 1 * MIB - 1), -ENOSPC);
	assert_int_equal(tfs_dev_discard(o, 0, 4096), -EOPNOTSUPP);
	assert_int_equal(tfs_dev_truncate(s, 0), -ENOTSUP);
	assert_int_equal(tfs_dev_flush(o), 0);
	tfs_dev_close(s);
	tfs_dev_close(o);
}

static void test_full_store_invalidates_only_its_snapshot(void **state)
{
	struct env *e = *state;
	struct tfs_dev *o, *small, *big, *st;
	struct record_sink rec;
	static uint8_t buf[256 * KIB];

	add_snap(e, "small", ID + 1, e->cow2, 8);  /* 16 chunks: header, area, 14 of data */
	add_snap(e, "big", ID + 2, e->cow, 8);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID, 0, &o), 0);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, 0, &small), 0);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 2, 0, &big), 0);
	fill(buf, sizeof(buf), 0x44);
	assert_int_equal(tfs_dev_write(o, buf, sizeof(buf), 0), 0); /* the origin never fails */
	assert_int_equal(tfs_dev_read(small, buf, 4096, 0), -EIO);
	assert_int_equal(tfs_dev_write(small, buf, 4096, 0), -EIO);
	assert_int_equal(tfs_dev_read(big, buf, sizeof(buf), 0), 0);
	assert_true(all(buf, sizeof(buf), 0x11));
	assert_non_null(strstr(logged, "snapshot small: invalidated: the COW store is full"));
	assert_true(e->notified >= 1);
	/* A status handle of it: invalid in dm's words, and no I/O. */
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, TFS_DEV_STATUS_ONLY, &st), 0);
	assert_int_equal(tfs_dev_read(st, buf, 1, 0), -EBADF);
	record_sink_init(&rec);
	tfs_dev_status(st, &rec.sink);
	assert_non_null(strstr(record_sink_line(&rec), "valid=false "));
	assert_non_null(strstr(record_sink_line(&rec), "dm_status=Invalid "));
	tfs_dev_close(st);
	tfs_dev_close(big);
	tfs_dev_close(small);
	tfs_dev_close(o);
}

struct event_seen {
	unsigned invalid, low_water;
	char last[64];
};

static void count_event(void *ctx, enum tfs_cow_event what, const char *name, const char *detail)
{
	struct event_seen *s = ctx;

	(void)detail;
	if (what == TFS_COW_EVENT_INVALID)
		s->invalid++;
	else
		s->low_water++;
	snprintf(s->last, sizeof(s->last), "%s", name);
}

static void test_events_are_handed_out_once(void **state)
{
	struct env *e = *state;
	struct tfs_dev *o;
	struct event_seen seen = { 0 };
	static uint8_t buf[600 * KIB];

	add_snap(e, "s", ID + 1, e->cow, 8);        /* 1 MiB: the mark at 50% */
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID, 0, &o), 0);
	fill(buf, sizeof(buf), 0x55);
	assert_int_equal(tfs_dev_write(o, buf, sizeof(buf), 0), 0);
	tfs_cow_set_events(e->set, count_event, &seen);
	assert_int_equal(seen.low_water, 1);
	assert_int_equal(seen.invalid, 0);
	assert_string_equal(seen.last, "s");
	tfs_cow_set_events(e->set, count_event, &seen);
	assert_int_equal(seen.low_water, 1);
	tfs_dev_close(o);
}

static void test_bad_snapshots_are_refused_and_change_nothing(void **state)
{
	struct env *e = *state;
	struct tfs_cowsnap_params p = {
		.name = "s", .id = ID + 1, .origin = "db", .cow = e->cow,
		.chunk_sectors = 8, .persistent = true,
	};
	uint8_t head[16];
	int fd;

	p.chunk_sectors = 12;
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -EINVAL);
	assert_non_null(strstr(logged, "a power of two from 4 KiB to 1 GiB"));
	p.chunk_sectors = 8;
	p.origin = "nope";
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -ENOENT);
	p.origin = "db";
	p.cow = e->origin;
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -EEXIST);
	assert_non_null(strstr(logged, "is used by [origin \"db\"] device"));
	p.cow = e->cow;
	p.name = "db";
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -EEXIST);
	p.name = "s";
	p.chunk_sectors = 2097152;                 /* 1 GiB chunks on a 1 MiB device */
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -EINVAL);
	assert_non_null(strstr(logged, "less than"));
	/* None of it wrote the COW device. */
	fd = open(e->cow, O_RDONLY);
	assert_true(fd >= 0);
	assert_int_equal(pread(fd, head, sizeof(head), 0), sizeof(head));
	close(fd);
	assert_true(all(head, sizeof(head), 0));
	assert_false(tfs_cow_set_has(e->set, ID + 1, NULL));
	/* A run-time one goes; a pool.cfg one does not, except by a reload. */
	p.chunk_sectors = 8;
	p.from_cfg = true;
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), 0);
	assert_int_equal(tfs_cow_set_remove_snapshot(e->set, ID + 1, false), -EPERM);
	assert_int_equal(tfs_cow_set_remove_origin(e->set, ID), -EBUSY);
	assert_int_equal(tfs_cow_set_remove_snapshot(e->set, ID + 1, true), 0);
	assert_int_equal(tfs_cow_set_remove_origin(e->set, ID), 0);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID, 0, NULL), -ENODATA);
}

static void count_merge_done(void *ctx, enum tfs_cow_event what, const char *name,
			     const char *detail)
{
	(void)detail;
	if (what == TFS_COW_EVENT_MERGE_DONE && !strcmp(name, "s"))
		++*(unsigned *)ctx;
}

/* Reports events until s's merge_done came (bounded: a failing test does not hang). */
static void wait_merge_done(struct env *e)
{
	unsigned done = 0;

	for (int i = 0; i < 10000 && !done; i++) {
		tfs_cow_set_events(e->set, count_merge_done, &done);
		if (!done)
			usleep(1000);
	}
	assert_int_equal(done, 1);
}

static void test_merge_rolls_the_origin_back_and_keeps_later_writes(void **state)
{
	struct env *e = *state;
	struct tfs_cowsnap_params p = {
		.name = "t", .id = ID + 2, .origin = "db", .cow = e->cow2,
		.chunk_sectors = 8, .persistent = true,
	};
	struct tfs_dev *o, *s, *st;
	static uint8_t buf[1 * MIB];
	uint64_t chunks = 0;
	uint32_t origin_id = 0;

	add_snap(e, "s", ID + 1, e->cow, 8);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID, 0, &o), 0);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, 0, &s), 0);
	/* Every other chunk of the first 256 KiB changes in the origin: 32 runs of one. */
	fill(buf, 4096, 0x22);
	for (unsigned c = 0; c < 64; c += 2)
		assert_int_equal(tfs_dev_write(o, buf, 4096, c * 4096), 0);
	fill(buf, 5000, 0x33);
	assert_int_equal(tfs_dev_write(s, buf, 5000, 512 * KIB), 0);
	tfs_dev_close(s);
	assert_int_equal(tfs_cow_set_merge_check(e->set, ID + 1), 0);
	assert_int_equal(tfs_cow_set_merge(e->set, ID + 1, &chunks, &origin_id), 0);
	assert_int_equal(chunks, 32 + 2);
	assert_int_equal(origin_id, ID);
	/* Merging: no I/O handle of it any more, a status one; no new snapshot, no removal. */
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, 0, &s), -ENODATA);
	assert_int_equal(tfs_cow_set_open_dev(e->set, ID + 1, TFS_DEV_STATUS_ONLY, &st), 0);
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), -EBUSY);
	assert_non_null(strstr(logged, "being rolled back by a merge"));
	assert_int_equal(tfs_cow_set_remove_origin(e->set, ID), -EBUSY);
	assert_int_equal(tfs_cow_set_merge(e->set, ID + 1, &chunks, NULL), -ENOENT);
	/* A write during the merge, to a chunk with an exception and one without. */
	fill(buf, 8192, 0x44);
	assert_int_equal(tfs_dev_write(o, buf, 8192, 4096 * 10 - 100), 0);
	wait_merge_done(e);
	assert_int_equal(tfs_dev_read(o, buf, sizeof(buf), 0), 0);
	assert_true(all(buf, 4096 * 10 - 100, 0x11));
	assert_true(all(buf + 4096 * 10 - 100, 8192, 0x44));
	assert_true(all(buf + 4096 * 10 - 100 + 8192, 512 * KIB - (4096 * 10 - 100 + 8192), 0x11));
	assert_true(all(buf + 512 * KIB, 5000, 0x33));
	assert_true(all(buf + 512 * KIB + 5000, 512 * KIB - 5000, 0x11));
	tfs_dev_close(st);
	tfs_dev_close(o);
	/* Gone from the set: the origin has no snapshot left. */
	assert_false(tfs_cow_set_has(e->set, ID + 1, NULL));
	assert_int_equal(tfs_cow_set_remove_origin(e->set, ID), 0);
}

static void test_merge_refuses_pool_cfg_and_transient_snapshots(void **state)
{
	struct env *e = *state;
	struct tfs_cowsnap_params p = {
		.name = "s", .id = ID + 1, .origin = "db", .cow = e->cow,
		.chunk_sectors = 8, .persistent = true, .from_cfg = true,
	};
	uint64_t chunks;

	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), 0);
	assert_int_equal(tfs_cow_set_merge(e->set, ID + 1, &chunks, NULL), -EPERM);
	assert_non_null(strstr(logged, "comes from pool.cfg"));
	p.name = "t";
	p.id = ID + 2;
	p.cow = e->cow2;
	p.from_cfg = false;
	p.persistent = false;
	assert_int_equal(tfs_cow_set_add_snapshot(e->set, &p), 0);
	assert_int_equal(tfs_cow_set_merge_check(e->set, ID + 2), -EOPNOTSUPP);
	assert_non_null(strstr(logged, "is transient"));
	assert_int_equal(tfs_cow_set_merge_check(e->set, ID), -ENOENT);   /* an origin */
	assert_true(tfs_cow_set_has(e->set, ID + 1, NULL));
	assert_true(tfs_cow_set_has(e->set, ID + 2, NULL));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
		T(test_writes_to_origin_and_snapshot_stay_apart),
		T(test_full_store_invalidates_only_its_snapshot),
		T(test_events_are_handed_out_once),
		T(test_bad_snapshots_are_refused_and_change_nothing),
		T(test_merge_rolls_the_origin_back_and_keeps_later_writes),
		T(test_merge_refuses_pool_cfg_and_transient_snapshots),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
