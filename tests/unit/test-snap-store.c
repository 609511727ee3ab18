/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The dm-snapshot exception store (src/meta/snap-store), on sparse files. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "format.h"
#include "log.h"
#include "snap-store.h"

/* Messages the code under test logged, so a test can say which one it expects. */
static char logged[4096];

static void keep_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	size_t n = strlen(logged);
	snprintf(logged + n, sizeof(logged) - n, "%s\n", msg);
}

struct cow_file {
	char path[64];
	struct tfs_bdev *dev;
};

static void cow_create(struct cow_file *f, uint64_t size)
{
	snprintf(f->path, sizeof(f->path), "/tmp/tfs-cow-XXXXXX");
	int fd = mkstemp(f->path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	close(fd);
	assert_int_equal(tfs_bdev_open_direct(f->path, false, true, &f->dev), 0);
	logged[0] = 0;
}

/* A store opened on a new sparse COW file of size bytes. */
static struct tfs_snap_store *new_store(struct cow_file *f, uint64_t size, uint32_t chunk_sectors)
{
	cow_create(f, size);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(f->dev, chunk_sectors, &s), 0);
	return s;
}

static void cow_destroy(struct cow_file *f)
{
	tfs_bdev_close(f->dev);
	unlink(f->path);
}

static void pwrite_le(const char *path, uint64_t off, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
}

/* 4 KiB of non-zero bytes at off, as an old use of the device would leave. */
static void put_junk(const char *path, uint64_t off)
{
	uint8_t junk[4096];
	memset(junk, 0x5A, sizeof(junk));
	pwrite_le(path, off, junk, sizeof(junk));
}

static void read_all(const char *path, uint8_t *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	assert_true(fd >= 0);
	assert_int_equal(pread(fd, buf, len, 0), (ssize_t)len);
	close(fd);
}

/* A record written by hand, as the kernel lays it out. */
static void put_record(const char *path, uint32_t chunk_sectors, uint64_t area, uint64_t slot,
		       uint64_t old_chunk, uint64_t new_chunk)
{
	uint64_t chunk_bytes = (uint64_t)chunk_sectors * 512, per_area = chunk_bytes / 16;
	uint8_t rec[16];
	tfs_put_le64(rec, old_chunk);
	tfs_put_le64(rec + 8, new_chunk);
	pwrite_le(path, (1 + (per_area + 1) * area) * chunk_bytes + slot * 16, rec, 16);
}

static void put_header(const char *path, uint32_t magic, uint32_t valid, uint32_t version,
		       uint32_t chunk_sectors)
{
	uint8_t h[16];
	tfs_put_le32(h, magic);
	tfs_put_le32(h + 4, valid);
	tfs_put_le32(h + 8, version);
	tfs_put_le32(h + 12, chunk_sectors);
	pwrite_le(path, 0, h, sizeof(h));
}

/* How many exceptions a fresh open of dev finds. */
static uint64_t reopened_count(struct tfs_bdev *dev, uint32_t chunk_sectors)
{
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(dev, chunk_sectors, &s), 0);
	uint64_t n = tfs_snap_store_count(s);
	tfs_snap_store_close(s);
	return n;
}

static uint64_t alloc_commit(struct tfs_snap_store *s, uint64_t old_chunk)
{
	uint64_t new_chunk = 0;
	assert_int_equal(tfs_snap_store_allocate(s, old_chunk, &new_chunk), 0);
	assert_int_equal(tfs_snap_store_commit(s, old_chunk), 0);
	return new_chunk;
}

/* A store opened on a new sparse COW file through a fault wrapper (*fault). */
static struct tfs_snap_store *new_faulty_store(struct cow_file *f, uint64_t size,
					       bool volatile_cache, struct tfs_bdev **fault)
{
	cow_create(f, size);
	assert_int_equal(tfs_bdev_fault_wrap(f->dev, volatile_cache, fault), 0);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(*fault, 8, &s), 0);
	return s;
}

/* A copy's data: 4 KiB COW chunk `chunk` filled with byte. */
static void write_chunk(struct tfs_bdev *dev, uint64_t chunk, int byte)
{
	uint8_t data[4096];
	memset(data, byte, sizeof(data));
	assert_int_equal(tfs_bdev_write(dev, data, sizeof(data), chunk * 4096), 0);
}

/* old_chunk's exception points at want, which holds byte throughout. */
static void assert_copy(struct tfs_snap_store *s, struct tfs_bdev *dev, uint64_t old_chunk,
			uint64_t want, int byte)
{
	uint8_t data[4096], back[4096];
	uint64_t c;
	assert_int_equal(tfs_snap_store_lookup(s, old_chunk, &c), 0);
	assert_int_equal(c, want);
	memset(data, byte, sizeof(data));
	assert_int_equal(tfs_bdev_read(dev, back, sizeof(back), c * 4096), 0);
	assert_memory_equal(back, data, sizeof(data));
}

static void test_new_store_writes_the_kernel_header_and_counts_like_dm(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 1 << 20, 32);
	assert_true(tfs_snap_store_valid(s));
	assert_true(tfs_snap_store_persistent(s));
	uint8_t h[16];
	read_all(f.path, h, sizeof(h));
	assert_memory_equal(h, "SnAp", 4);
	assert_int_equal(tfs_le32(h + 4), 1);
	assert_int_equal(tfs_le32(h + 8), 1);
	assert_int_equal(tfs_le32(h + 12), 32);
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.total_sectors, 2048);
	assert_int_equal(u.allocated_sectors, 2 * 32); /* header + area 0 */
	assert_int_equal(u.metadata_sectors, 2 * 32);
	assert_int_equal(alloc_commit(s, 77), 2);
	assert_int_equal(alloc_commit(s, 5), 3);
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.allocated_sectors, 4 * 32);
	uint64_t n;
	assert_int_equal(tfs_snap_store_lookup(s, 77, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(tfs_snap_store_lookup(s, 78, &n), -ENODATA);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

static void test_exceptions_across_areas_are_found_after_reopen(void **state)
{
	(void)state;
	/* 4 KiB chunks: 256 records an area, areas at chunks 1, 258, 515. */
	const uint64_t n = 600;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 1000 * 4096, 8);
	uint64_t *got = calloc(n, sizeof(*got));
	for (uint64_t i = 0; i < n; i++) {
		got[i] = alloc_commit(s, i * 7 + 3);
		assert_true(got[i] != 1 && got[i] != 258 && got[i] != 515);
	}
	assert_int_equal(got[0], 2);
	assert_int_equal(got[255], 257);
	assert_int_equal(got[256], 259); /* area 1 skipped */
	assert_int_equal(got[n - 1], 603); /* area 2 skipped too */
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.allocated_sectors, 604 * 8);
	assert_int_equal(u.metadata_sectors, (600 / 256 + 2) * 8);
	tfs_snap_store_close(s);

	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), n);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t c;
		assert_int_equal(tfs_snap_store_lookup(s, i * 7 + 3, &c), 0);
		assert_int_equal(c, got[i]);
	}
	/* Allocation goes on after the highest chunk, and so does the table. */
	assert_int_equal(alloc_commit(s, 1), 604);
	tfs_snap_store_close(s);
	struct tfs_snap_check_info info;
	char msg[256];
	assert_int_equal(tfs_snap_store_check(f.dev, 0, &info, msg, sizeof(msg)), 0);
	assert_int_equal(info.exceptions, n + 1);
	assert_int_equal(info.chunk_sectors, 8);
	assert_true(info.valid);
	free(got);
	cow_destroy(&f);
}

static void test_area_filled_exactly_reads_back_through_the_next_one(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 600 * 4096);
	/* Stale bytes where area 1 will be: the store must not read them as records. */
	put_junk(f.path, 258 * 4096);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	for (uint64_t i = 0; i < 256; i++)
		alloc_commit(s, i);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), 256);
	assert_int_equal(alloc_commit(s, 1000), 259);
	tfs_snap_store_close(s);
	assert_int_equal(reopened_count(f.dev, 8), 257);
	cow_destroy(&f);
}

static void test_full_store_reports_enospc_and_resize_takes_growth(void **state)
{
	(void)state;
	struct cow_file f;
	/* header, area 0, data chunks 2..5 */
	struct tfs_snap_store *s = new_store(&f, 6 * 4096, 8);
	for (uint64_t i = 0; i < 4; i++)
		assert_int_equal(alloc_commit(s, i), i + 2);
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 10, &c), -ENOSPC);
	assert_true(tfs_snap_store_valid(s)); /* full is the caller's to act on */
	assert_int_equal(truncate(f.path, 20 * 4096), 0);
	uint64_t total;
	assert_int_equal(tfs_snap_store_resize(s, &total), 0);
	assert_int_equal(total, 20);
	assert_int_equal(alloc_commit(s, 10), 6);
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.total_sectors, 20 * 8);
	assert_int_equal(truncate(f.path, 10 * 4096), 0);
	assert_int_equal(tfs_snap_store_resize(s, &total), -EINVAL);
	assert_non_null(strstr(logged, "shrank"));
	assert_int_equal(total, 20);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

static void test_last_chunk_of_an_area_needs_room_for_the_next_area(void **state)
{
	(void)state;
	struct cow_file f;
	/* Chunks 0..257: data 2..257 fill area 0, area 1 (chunk 258) would not fit. */
	struct tfs_snap_store *s = new_store(&f, 258 * 4096, 8);
	uint64_t i = 0, c;
	int r;
	while ((r = tfs_snap_store_allocate(s, i, &c)) == 0) {
		assert_int_equal(tfs_snap_store_commit(s, i), 0);
		i++;
	}
	assert_int_equal(r, -ENOSPC);
	assert_int_equal(i, 255);
	tfs_snap_store_close(s);
	assert_int_equal(reopened_count(f.dev, 8), 255);
	cow_destroy(&f);
}

static void test_invalidated_store_reopens_invalid_and_refuses_io(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 64 * 4096, 8);
	alloc_commit(s, 3);
	assert_true(tfs_snap_store_invalidate(s));
	assert_false(tfs_snap_store_invalidate(s));
	assert_false(tfs_snap_store_valid(s));
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 4, &c), -EIO);
	tfs_snap_store_close(s);
	uint8_t h[16];
	read_all(f.path, h, sizeof(h));
	assert_int_equal(tfs_le32(h + 4), 0);

	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_false(tfs_snap_store_valid(s));
	assert_int_equal(tfs_snap_store_count(s), 0);
	assert_int_equal(tfs_snap_store_allocate(s, 4, &c), -EIO);
	/* Already invalid on disk: nothing more to report. */
	assert_false(tfs_snap_store_invalidate(s));
	tfs_snap_store_close(s);
	struct tfs_snap_check_info info;
	char msg[256];
	assert_int_equal(tfs_snap_store_check(f.dev, 0, &info, msg, sizeof(msg)), 0);
	assert_false(info.valid);
	cow_destroy(&f);
}

static void test_every_chunk_size_from_4k_to_1m_round_trips(void **state)
{
	(void)state;
	for (uint32_t cs = 8; cs <= 2048; cs *= 2) {
		uint64_t cb = (uint64_t)cs * 512;
		struct cow_file f;
		cow_create(&f, 40 * cb);
		struct tfs_snap_store *s;
		assert_int_equal(tfs_snap_store_open(f.dev, cs, &s), 0);
		for (uint64_t i = 0; i < 30; i++)
			assert_int_equal(alloc_commit(s, 1000 - i), i + 2);
		tfs_snap_store_close(s);
		assert_int_equal(tfs_snap_store_open(f.dev, cs, &s), 0);
		assert_int_equal(tfs_snap_store_chunk_sectors(s), cs);
		for (uint64_t i = 0; i < 30; i++) {
			uint64_t c;
			assert_int_equal(tfs_snap_store_lookup(s, 1000 - i, &c), 0);
			assert_int_equal(c, i + 2);
		}
		tfs_snap_store_close(s);
		cow_destroy(&f);
	}
	/* 1 GiB, the largest: a header and area on a sparse file. */
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, (uint64_t)3 << 30, TFS_SNAP_MAX_CHUNK_SECTORS);
	assert_int_equal(alloc_commit(s, 9), 2);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open(f.dev, TFS_SNAP_MAX_CHUNK_SECTORS, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), 1);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

static void test_bad_chunk_sizes_are_refused_with_the_rule(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 64 * 4096);
	struct tfs_snap_store *s;
	const uint32_t bad[] = { 0, 4, 12, 24, TFS_SNAP_MAX_CHUNK_SECTORS * 2 };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		logged[0] = 0;
		assert_int_equal(tfs_snap_store_open(f.dev, bad[i], &s), -EINVAL);
		assert_non_null(strstr(logged, TFS_SNAP_CHUNK_RULE));
		assert_int_equal(tfs_snap_store_open_transient(f.dev, bad[i], &s), -EINVAL);
	}
	uint8_t h[16], zero[16] = { 0 };
	read_all(f.path, h, sizeof(h));
	assert_memory_equal(h, zero, sizeof(h));
	cow_destroy(&f);
}

static void test_header_chunk_size_wins_over_the_configured_one(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 256 * 8192, 16);
	alloc_commit(s, 42);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open(f.dev, 64, &s), 0);
	assert_int_equal(tfs_snap_store_chunk_sectors(s), 16);
	uint64_t c;
	assert_int_equal(tfs_snap_store_lookup(s, 42, &c), 0);
	assert_int_equal(c, 2);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

static void expect_refused(const char *path, struct tfs_bdev *dev, const char *what)
{
	uint8_t before[8192], after[8192];
	read_all(path, before, sizeof(before));
	logged[0] = 0;
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(dev, 8, &s), -EINVAL);
	if (!strstr(logged, what) || !strstr(logged, path))
		fail_msg("expected '%s' naming %s, logged: %s", what, path, logged);
	read_all(path, after, sizeof(after));
	assert_memory_equal(before, after, sizeof(before));
	char msg[256];
	assert_int_equal(tfs_snap_store_check(dev, 0, NULL, msg, sizeof(msg)), -EINVAL);
	if (!strstr(msg, what))
		fail_msg("check: expected '%s', got: %s", what, msg);
}

static void test_corrupt_or_foreign_headers_are_refused_unchanged(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 64 * 4096);
	put_header(f.path, 0xEF53, 1, 1, 8);
	expect_refused(f.path, f.dev, "not a COW store");
	put_header(f.path, 0x70416E53, 1, 2, 8);
	expect_refused(f.path, f.dev, "version 2");
	put_header(f.path, 0x70416E53, 7, 1, 8);
	expect_refused(f.path, f.dev, "valid field is 7");
	put_header(f.path, 0x70416E53, 1, 1, 12);
	expect_refused(f.path, f.dev, "chunk size 12 sectors");
	/* No magic, but a file system's superblock further into chunk 0. */
	put_header(f.path, 0, 0, 0, 0);
	uint8_t sig[2] = { 0x53, 0xEF };
	pwrite_le(f.path, 1024 + 56, sig, sizeof(sig));
	logged[0] = 0;
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), -EINVAL);
	assert_non_null(strstr(logged, "not all zero"));
	cow_destroy(&f);
}

static void test_too_small_a_device_is_refused(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 3 * 8192 - 1);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(f.dev, 16, &s), -EINVAL);
	assert_non_null(strstr(logged, "too small"));
	assert_non_null(strstr(logged, f.path));
	/* A transient store needs one chunk. */
	assert_int_equal(tfs_snap_store_open_transient(f.dev, 16, &s), 0);
	tfs_snap_store_close(s);
	cow_destroy(&f);
	/* Smaller than one I/O block: refused as too small, before any read. */
	cow_create(&f, 2048);
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), -EINVAL);
	assert_non_null(strstr(logged, "too small"));
	char msg[256];
	assert_int_equal(tfs_snap_store_check(f.dev, 0, NULL, msg, sizeof(msg)), -EINVAL);
	assert_non_null(strstr(msg, "too small"));
	cow_destroy(&f);
}

static void test_check_and_open_catch_bad_exceptions(void **state)
{
	(void)state;
	static const struct {
		uint64_t old1, new1, old2, new2;
		const char *what;
	} cases[] = {
		{ 5, 2, 5, 3, "origin chunk 5 is recorded twice" },
		{ 5, 2, 6, 2, "COW chunk 2 is used twice" },
		{ 5, 2, 6, 1, "a metadata chunk" },
		{ 5, 2, 6, 64, "past the device's end" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct cow_file f;
		cow_create(&f, 64 * 4096);
		put_header(f.path, 0x70416E53, 1, 1, 8);
		put_record(f.path, 8, 0, 0, cases[i].old1, cases[i].new1);
		put_record(f.path, 8, 0, 1, cases[i].old2, cases[i].new2);
		expect_refused(f.path, f.dev, cases[i].what);
		cow_destroy(&f);
	}
	/* The origin's size bounds old chunks when the checker knows it. */
	struct cow_file f;
	cow_create(&f, 64 * 4096);
	put_header(f.path, 0x70416E53, 1, 1, 8);
	put_record(f.path, 8, 0, 0, 100, 2);
	char msg[256];
	assert_int_equal(tfs_snap_store_check(f.dev, 100, NULL, msg, sizeof(msg)), -EINVAL);
	assert_non_null(strstr(msg, "past the origin's end"));
	assert_int_equal(tfs_snap_store_check(f.dev, 101, NULL, msg, sizeof(msg)), 0);
	cow_destroy(&f);
}

static void test_transient_store_keeps_exceptions_in_memory_only(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 4 * 8192);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open_transient(f.dev, 16, &s), 0);
	assert_false(tfs_snap_store_persistent(s));
	for (uint64_t i = 0; i < 4; i++)
		assert_int_equal(alloc_commit(s, 100 + i), i); /* from chunk 0: no header */
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 7, &c), -ENOSPC);
	assert_int_equal(tfs_snap_store_lookup(s, 102, &c), 0);
	assert_int_equal(c, 2);
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.total_sectors, 64);
	assert_int_equal(u.allocated_sectors, 64);
	assert_int_equal(u.metadata_sectors, 0);
	assert_int_equal(tfs_snap_store_merge_prepare(s, 1, &c, &c), -EOPNOTSUPP);
	assert_true(tfs_snap_store_invalidate(s));
	assert_int_equal(tfs_snap_store_commit(s, 1), -EIO);
	tfs_snap_store_close(s);
	uint8_t buf[4 * 8192], zero[4 * 8192] = { 0 };
	read_all(f.path, buf, sizeof(buf));
	assert_memory_equal(buf, zero, sizeof(buf));
	cow_destroy(&f);
}

static void test_commit_needs_an_allocation_and_allocation_is_once(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 64 * 4096, 8);
	assert_int_equal(tfs_snap_store_commit(s, 3), -ENOENT);
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 3, &c), 0);
	/* Visible from allocation on: the caller's range lock covers the copy. */
	assert_int_equal(tfs_snap_store_lookup(s, 3, &c), 0);
	assert_int_equal(tfs_snap_store_allocate(s, 3, &c), -EEXIST);
	assert_int_equal(tfs_snap_store_commit(s, 3), 0);
	assert_int_equal(tfs_snap_store_commit(s, 3), -ENOENT);
	assert_int_equal(tfs_snap_store_allocate(s, 3, &c), -EEXIST);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

struct committer {
	struct tfs_snap_store *s;
	uint64_t old_chunk;
	int r;
};

static void *commit_thread(void *arg)
{
	struct committer *c = arg;
	c->r = tfs_snap_store_commit(c->s, c->old_chunk);
	return NULL;
}

/*
 * A store on a fault wrapper of f with six copies allocated and committing
 * from threads t: the first committer's first op of kind `held` is held,
 * and the other five have queued their records behind it.  before: the
 * wrapper's counts before the first commit.
 */
static struct tfs_snap_store *six_queued_behind_a_held_op(struct cow_file *f,
							   struct tfs_bdev **fault,
							   enum tfs_fault_op held,
							   struct committer c[6], pthread_t t[6],
							   struct tfs_bdev_io_counts *before)
{
	struct tfs_snap_store *s;
	uint64_t nc;
	cow_create(f, 64 * 4096);
	assert_int_equal(tfs_bdev_fault_wrap(f->dev, false, fault), 0);
	assert_int_equal(tfs_snap_store_open(*fault, 8, &s), 0);
	for (int i = 0; i < 6; i++) {
		c[i] = (struct committer){ s, (uint64_t)i + 10, -1 };
		assert_int_equal(tfs_snap_store_allocate(s, c[i].old_chunk, &nc), 0);
	}
	tfs_bdev_fault_counts(*fault, before);
	tfs_bdev_fault_set(*fault, held, TFS_FAULT_STALL, 0, false);
	assert_int_equal(pthread_create(&t[0], NULL, commit_thread, &c[0]), 0);
	while (tfs_bdev_fault_stalled(*fault) == 0)
		usleep(1000);
	for (int i = 1; i < 6; i++)
		assert_int_equal(pthread_create(&t[i], NULL, commit_thread, &c[i]), 0);
	while (tfs_snap_store_uncommitted(s) != 0)
		usleep(1000);
	return s;
}

static void test_commits_waiting_on_a_write_share_the_next_one(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_bdev *fault;
	struct committer c[6];
	pthread_t t[6];
	struct tfs_bdev_io_counts before, after;
	/* The first commit's data flush is held: the other five pile up behind it. */
	struct tfs_snap_store *s =
		six_queued_behind_a_held_op(&f, &fault, TFS_FAULT_FLUSH, c, t, &before);
	tfs_bdev_fault_set(fault, TFS_FAULT_FLUSH, TFS_FAULT_OK, 0, false);
	for (int i = 0; i < 6; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(c[i].r, 0);
	}
	tfs_bdev_fault_counts(fault, &after);
	/*
	 * Two groups, none per committer: the first group's data flush, its
	 * area write and the flush after it, which also covers the data of
	 * the five added before it began, then their area write and a flush.
	 */
	assert_int_equal(after.writes - before.writes, 2);
	assert_int_equal(after.flushes - before.flushes, 3);
	tfs_snap_store_close(s);
	assert_int_equal(reopened_count(fault, 8), 6);
	tfs_bdev_close(fault);
	unlink(f.path);
}

/* One batch commit of 300 copies spanning two areas: few writes, all found again. */
static void test_batch_commit_writes_once_for_many_and_is_all_or_none(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 1000 * 4096);
	struct tfs_bdev *fault;
	assert_int_equal(tfs_bdev_fault_wrap(f.dev, false, &fault), 0);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(fault, 8, &s), 0);
	uint64_t olds[300], nc;
	for (uint64_t i = 0; i < 300; i++) {
		olds[i] = i * 5 + 1;
		assert_int_equal(tfs_snap_store_allocate(s, olds[i], &nc), 0);
	}
	/* One of them has no allocation: nothing is committed. */
	uint64_t bad[2] = { olds[0], 99999 };
	assert_int_equal(tfs_snap_store_commit_batch(s, bad, 2), -ENOENT);
	assert_int_equal(tfs_snap_store_uncommitted(s), 300);
	struct tfs_bdev_io_counts before, after;
	tfs_bdev_fault_counts(fault, &before);
	assert_int_equal(tfs_snap_store_commit_batch(s, olds, 300), 0);
	tfs_bdev_fault_counts(fault, &after);
	assert_int_equal(tfs_snap_store_uncommitted(s), 0);
	/* Area 1's first block, area 0's blocks: a handful of writes, not 300. */
	assert_true(after.writes - before.writes <= 4);
	assert_true(after.flushes - before.flushes <= 4);
	tfs_snap_store_close(s);
	assert_int_equal(reopened_count(fault, 8), 300);
	tfs_bdev_close(fault);
	unlink(f.path);
}

static void test_failed_area_write_invalidates_and_later_calls_fail(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 64 * 4096);
	struct tfs_bdev *fault;
	assert_int_equal(tfs_bdev_fault_wrap(f.dev, false, &fault), 0);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open(fault, 8, &s), 0);
	alloc_commit(s, 1);
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 2, &c), 0);
	tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_EIO, 0, false);
	logged[0] = 0;
	assert_int_equal(tfs_snap_store_commit(s, 2), -EIO);
	assert_false(tfs_snap_store_valid(s));
	assert_non_null(strstr(logged, "metadata area 0"));
	/* The header cannot be written either: logged, still invalid in memory. */
	assert_true(tfs_snap_store_invalidate(s));
	assert_non_null(strstr(logged, "invalid in memory"));
	assert_int_equal(tfs_snap_store_allocate(s, 3, &c), -EIO);
	tfs_snap_store_close(s);
	tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
	/* On disk it is still the store with exception 1. */
	assert_int_equal(tfs_snap_store_open(fault, 8, &s), 0);
	assert_true(tfs_snap_store_valid(s));
	assert_int_equal(tfs_snap_store_count(s), 1);
	tfs_snap_store_close(s);
	tfs_bdev_close(fault);
	unlink(f.path);
}

/*
 * Committers wait each for its own wake-up, and a stage posts only the
 * first of those it finished (each posts the next).  When the store
 * fails, every one waiting must be woken with -EIO: the one whose area
 * write failed and the five queued behind it for the next stage, none
 * left asleep.
 */
static void test_a_failed_stage_wakes_every_waiting_committer_with_eio(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_bdev *fault;
	struct committer c[6];
	pthread_t t[6];
	struct tfs_bdev_io_counts before;
	/* The first committer's area write is held; the others queue behind it. */
	struct tfs_snap_store *s =
		six_queued_behind_a_held_op(&f, &fault, TFS_FAULT_WRITE, c, t, &before);
	logged[0] = 0;
	tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_EIO, 0, false);
	for (int i = 0; i < 6; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(c[i].r, -EIO);
	}
	assert_false(tfs_snap_store_valid(s));
	assert_non_null(strstr(logged, "metadata area 0"));
	tfs_snap_store_close(s);
	tfs_bdev_close(fault);
	unlink(f.path);
}

static void test_merge_takes_runs_from_the_end_and_persists(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 600 * 4096, 8);
	/* 258 exceptions: area 0 full, two in area 1; old chunks 0..257 in a row. */
	for (uint64_t i = 0; i < 258; i++)
		alloc_commit(s, i);
	uint64_t old, new;
	/* The run stops at the area boundary. */
	assert_int_equal(tfs_snap_store_merge_prepare(s, 100, &old, &new), 2);
	assert_int_equal(old, 256);
	assert_int_equal(new, 259);
	assert_int_equal(tfs_snap_store_merge_commit(s, 3), -EINVAL);
	assert_int_equal(tfs_snap_store_merge_commit(s, 2), 0);
	assert_int_equal(tfs_snap_store_lookup(s, 256, &new), -ENODATA);
	assert_int_equal(tfs_snap_store_merge_prepare(s, 10, &old, &new), 10);
	assert_int_equal(old, 246);
	assert_int_equal(new, 248);
	assert_int_equal(tfs_snap_store_merge_commit(s, 10), 0);
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	assert_int_equal(u.metadata_sectors, 2 * 8);
	assert_int_equal(u.allocated_sectors, (1 + 246 + 1) * 8);
	/* No merging while an exception is on its way in. */
	assert_int_equal(tfs_snap_store_allocate(s, 9999, &new), 0);
	assert_int_equal(tfs_snap_store_merge_commit(s, 1), -EBUSY);
	assert_int_equal(tfs_snap_store_commit(s, 9999), 0);
	assert_int_equal(tfs_snap_store_merge_commit(s, 1), 0);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), 246);
	assert_int_equal(tfs_snap_store_lookup(s, 245, &new), 0);
	assert_int_equal(new, 247);
	assert_int_equal(tfs_snap_store_lookup(s, 246, &new), -ENODATA);
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

struct worker {
	struct tfs_snap_store *s;
	uint64_t first, n;
	uint64_t *got; /* got[i]: the COW chunk of origin chunk first + i */
};

static void *alloc_commit_thread(void *arg)
{
	struct worker *w = arg;
	for (uint64_t i = 0; i < w->n; i++) {
		if (tfs_snap_store_allocate(w->s, w->first + i, &w->got[i]) ||
		    tfs_snap_store_commit(w->s, w->first + i))
			w->got[i] = 0;
	}
	return NULL;
}

static void test_parallel_committers_across_areas_all_persist(void **state)
{
	(void)state;
	enum { THREADS = 4, EACH = 300 };
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 2000 * 4096, 8);
	struct worker w[THREADS];
	pthread_t t[THREADS];
	for (int i = 0; i < THREADS; i++) {
		w[i] = (struct worker){ s, (uint64_t)i * 100000, EACH, calloc(EACH, sizeof(uint64_t)) };
		assert_int_equal(pthread_create(&t[i], NULL, alloc_commit_thread, &w[i]), 0);
	}
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), THREADS * EACH);
	for (int i = 0; i < THREADS; i++) {
		for (uint64_t j = 0; j < EACH; j++) {
			uint64_t c;
			assert_true(w[i].got[j] != 0);
			assert_int_equal(tfs_snap_store_lookup(s, w[i].first + j, &c), 0);
			assert_int_equal(c, w[i].got[j]);
		}
		free(w[i].got);
	}
	tfs_snap_store_close(s);
	char msg[256];
	assert_int_equal(tfs_snap_store_check(f.dev, 0, NULL, msg, sizeof(msg)), 0);
	cow_destroy(&f);
}

/*
 * Fail the Nth write around the moment area 0 fills (each commit is one
 * write, filling an area two), lose what was not flushed, reopen: every
 * acknowledged exception is there, nothing else, and the store checks clean.
 */
static void test_failed_write_then_power_loss_keeps_exactly_the_acknowledged(void **state)
{
	(void)state;
	for (uint64_t n = 250; n < 262; n++) {
		struct cow_file f;
		cow_create(&f, 600 * 4096);
		/* Old bytes where area 1 goes: only the write order keeps them unread. */
		put_junk(f.path, 258 * 4096);
		struct tfs_bdev *fault;
		assert_int_equal(tfs_bdev_fault_wrap(f.dev, true, &fault), 0);
		struct tfs_snap_store *s;
		assert_int_equal(tfs_snap_store_open(fault, 8, &s), 0);
		tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_EIO, n, false);
		uint64_t acked = 0, c;
		while (acked < 300 && tfs_snap_store_allocate(s, acked, &c) == 0 &&
		       tfs_snap_store_commit(s, acked) == 0)
			acked++;
		assert_true(acked < 300);
		assert_false(tfs_snap_store_valid(s));
		assert_int_equal(tfs_bdev_fault_power_cut(fault, true, (uint32_t)n), 0);
		tfs_snap_store_close(s);
		tfs_bdev_close(fault);
		assert_int_equal(tfs_bdev_open(f.path, false, &f.dev), 0);
		assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
		assert_int_equal(tfs_snap_store_count(s), acked);
		for (uint64_t i = 0; i < acked; i++) {
			assert_int_equal(tfs_snap_store_lookup(s, i, &c), 0);
			assert_int_equal(c, i < 256 ? i + 2 : i + 3);
		}
		tfs_snap_store_close(s);
		char msg[256];
		assert_int_equal(tfs_snap_store_check(f.dev, 0, NULL, msg, sizeof(msg)), 0);
		cow_destroy(&f);
	}
}

/*
 * The copies' data is written without a flush of its own: commit flushes it
 * before the records, so after a power cut every acknowledged exception's
 * chunk holds its data; until then an exception is found but not durable.
 */
static void test_commit_flushes_the_copied_data_before_the_records(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_bdev *fault;
	struct tfs_snap_store *s = new_faulty_store(&f, 64 * 4096, true, &fault);
	uint64_t nc[3];
	for (uint64_t i = 0; i < 3; i++) {
		assert_int_equal(tfs_snap_store_allocate(s, 20 + i, &nc[i]), 0);
		write_chunk(fault, nc[i], (int)(0xA0 + i));
	}
	assert_int_equal(tfs_snap_store_lookup(s, 21, &nc[1]), 0);
	assert_false(tfs_snap_store_durable(s, 20, 22));
	uint64_t olds[2] = { 20, 21 };
	assert_int_equal(tfs_snap_store_commit_batch(s, olds, 2), 0);
	assert_true(tfs_snap_store_durable(s, 20, 21));
	assert_false(tfs_snap_store_durable(s, 20, 22));
	assert_false(tfs_snap_store_durable(s, 19, 21));
	assert_false(tfs_snap_store_durable(s, 21, 20));
	/* 22 is written but never committed: lost with the cut, and never pointed at. */
	assert_int_equal(tfs_bdev_fault_power_cut(fault, false, 0), 0);
	tfs_snap_store_close(s);
	tfs_bdev_close(fault);
	assert_int_equal(tfs_bdev_open(f.path, false, &f.dev), 0);
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_count(s), 2);
	assert_true(tfs_snap_store_durable(s, 20, 21));
	for (uint64_t i = 0; i < 2; i++)
		assert_copy(s, f.dev, 20 + i, nc[i], (int)(0xA0 + i));
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

/*
 * The flush after one group's area write is the next group's data flush.
 * A's area write is held while B's copy is written and B commits; that
 * flush then covers B's data, and B's record goes out in the next area
 * write: three flushes for two groups, not four.  Power is cut while the
 * flush after B's area write is held (B not acknowledged), tearing what
 * was not flushed: A is there with its data, and B, if its record landed,
 * has its data too, since no record is written before its data is flushed.
 */
static void test_the_area_flush_covers_the_next_groups_data_through_a_power_cut(void **state)
{
	(void)state;
	for (uint32_t seed = 1; seed <= 8; seed++) {
		struct cow_file f;
		struct tfs_bdev *fault;
		struct tfs_snap_store *s = new_faulty_store(&f, 64 * 4096, true, &fault);
		uint64_t nc[2];
		struct committer c[2] = { { s, 10, -1 }, { s, 11, -1 } };
		pthread_t t[2];
		struct tfs_bdev_io_counts before, after;

		tfs_bdev_fault_counts(fault, &before);
		assert_int_equal(tfs_snap_store_allocate(s, 10, &nc[0]), 0);
		write_chunk(fault, nc[0], 0xA1);
		/* A's data flush passes, its area write is held. */
		tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_STALL, 0, true);
		assert_int_equal(pthread_create(&t[0], NULL, commit_thread, &c[0]), 0);
		while (tfs_bdev_fault_stalled(fault) == 0)
			usleep(1000);
		assert_int_equal(tfs_snap_store_allocate(s, 11, &nc[1]), 0);
		write_chunk(fault, nc[1], 0xB2);
		assert_int_equal(pthread_create(&t[1], NULL, commit_thread, &c[1]), 0);
		while (tfs_snap_store_uncommitted(s) != 0)
			usleep(1000);
		/* The flush after A's area write passes; the one after B's is held. */
		tfs_bdev_fault_set(fault, TFS_FAULT_FLUSH, TFS_FAULT_STALL, 1, true);
		tfs_bdev_fault_set(fault, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
		pthread_join(t[0], NULL);
		assert_int_equal(c[0].r, 0);
		while (tfs_bdev_fault_stalled(fault) == 0)
			usleep(1000);
		tfs_bdev_fault_counts(fault, &after);
		/* Two copies, two area writes; A's data flush, A's area flush, B's held one. */
		assert_int_equal(after.writes - before.writes, 4);
		assert_int_equal(after.flushes - before.flushes, 3);
		/* Small seeds all tear the first write to nothing: spread them. */
		assert_int_equal(tfs_bdev_fault_power_cut(fault, true, seed * 0x9E3779B1u), 0);
		pthread_join(t[1], NULL);
		assert_int_equal(c[1].r, -EIO);
		tfs_snap_store_close(s);
		tfs_bdev_close(fault);

		assert_int_equal(tfs_bdev_open(f.path, false, &f.dev), 0);
		assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
		assert_copy(s, f.dev, 10, nc[0], 0xA1);
		/* B was not acknowledged: its record may be there or not, never without its data. */
		if (tfs_snap_store_count(s) == 2)
			assert_copy(s, f.dev, 11, nc[1], 0xB2);
		else
			assert_int_equal(tfs_snap_store_count(s), 1);
		tfs_snap_store_close(s);
		char msg[256];
		assert_int_equal(tfs_snap_store_check(f.dev, 0, NULL, msg, sizeof(msg)), 0);
		cow_destroy(&f);
	}
}

/* A transient store's exceptions are durable once committed (nothing to write). */
/* What the COW file's zeros ahead (cowsnap.c) rely on to spare copies and records. */
static void test_next_free_and_meta_chunks_mark_what_is_free_ahead(void **state)
{
	(void)state;
	struct cow_file f;
	struct tfs_snap_store *s = new_store(&f, 1000 * 4096, 8);
	assert_int_equal(tfs_snap_store_next_free(s), 2);
	assert_true(tfs_snap_store_is_meta(s, 0) && tfs_snap_store_is_meta(s, 1));
	assert_true(tfs_snap_store_is_meta(s, 258) && tfs_snap_store_is_meta(s, 515));
	assert_false(tfs_snap_store_is_meta(s, 2) || tfs_snap_store_is_meta(s, 257) ||
		     tfs_snap_store_is_meta(s, 259));
	for (uint64_t i = 0; i < 256; i++)
		alloc_commit(s, i);
	/* Past the full area 0 and over area 1's chunk. */
	assert_int_equal(tfs_snap_store_next_free(s), 259);
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 999, &c), 0);
	/* Handed out, not committed yet: no longer free. */
	assert_int_equal(tfs_snap_store_next_free(s), 260);
	assert_int_equal(tfs_snap_store_commit(s, 999), 0);
	tfs_snap_store_close(s);
	/* After a reopen: one past the highest copy, as loading rebuilds it. */
	assert_int_equal(tfs_snap_store_open(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_next_free(s), 260);
	tfs_snap_store_close(s);
	assert_int_equal(tfs_snap_store_open_transient(f.dev, 8, &s), 0);
	assert_int_equal(tfs_snap_store_next_free(s), 0);
	assert_false(tfs_snap_store_is_meta(s, 0) || tfs_snap_store_is_meta(s, 1));
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

static void test_transient_exceptions_are_durable_once_committed(void **state)
{
	(void)state;
	struct cow_file f;
	cow_create(&f, 16 * 4096);
	struct tfs_snap_store *s;
	assert_int_equal(tfs_snap_store_open_transient(f.dev, 8, &s), 0);
	uint64_t c;
	assert_int_equal(tfs_snap_store_allocate(s, 5, &c), 0);
	assert_false(tfs_snap_store_durable(s, 5, 5));
	assert_int_equal(tfs_snap_store_commit(s, 5), 0);
	assert_true(tfs_snap_store_durable(s, 5, 5));
	tfs_snap_store_close(s);
	cow_destroy(&f);
}

int main(void)
{
	tfs_log_set_sink(keep_sink, NULL);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_new_store_writes_the_kernel_header_and_counts_like_dm),
		cmocka_unit_test(test_exceptions_across_areas_are_found_after_reopen),
		cmocka_unit_test(test_area_filled_exactly_reads_back_through_the_next_one),
		cmocka_unit_test(test_full_store_reports_enospc_and_resize_takes_growth),
		cmocka_unit_test(test_last_chunk_of_an_area_needs_room_for_the_next_area),
		cmocka_unit_test(test_invalidated_store_reopens_invalid_and_refuses_io),
		cmocka_unit_test(test_every_chunk_size_from_4k_to_1m_round_trips),
		cmocka_unit_test(test_bad_chunk_sizes_are_refused_with_the_rule),
		cmocka_unit_test(test_header_chunk_size_wins_over_the_configured_one),
		cmocka_unit_test(test_corrupt_or_foreign_headers_are_refused_unchanged),
		cmocka_unit_test(test_too_small_a_device_is_refused),
		cmocka_unit_test(test_check_and_open_catch_bad_exceptions),
		cmocka_unit_test(test_transient_store_keeps_exceptions_in_memory_only),
		cmocka_unit_test(test_commit_needs_an_allocation_and_allocation_is_once),
		cmocka_unit_test(test_commits_waiting_on_a_write_share_the_next_one),
		cmocka_unit_test(test_batch_commit_writes_once_for_many_and_is_all_or_none),
		cmocka_unit_test(test_failed_area_write_invalidates_and_later_calls_fail),
		cmocka_unit_test(test_a_failed_stage_wakes_every_waiting_committer_with_eio),
		cmocka_unit_test(test_merge_takes_runs_from_the_end_and_persists),
		cmocka_unit_test(test_parallel_committers_across_areas_all_persist),
		cmocka_unit_test(test_failed_write_then_power_loss_keeps_exactly_the_acknowledged),
		cmocka_unit_test(test_commit_flushes_the_copied_data_before_the_records),
		cmocka_unit_test(test_the_area_flush_covers_the_next_groups_data_through_a_power_cut),
		cmocka_unit_test(test_transient_exceptions_are_durable_once_committed),
		cmocka_unit_test(test_next_free_and_meta_chunks_mark_what_is_free_ahead),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
