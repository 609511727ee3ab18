/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The thin pool on sparse temporary files: reads and writes against an
 * in-memory model at odd offsets, zeroing of new blocks, snapshots and
 * their accounting, discard with passdown, provisioning, zero range,
 * seek, truncate, running out of data space, a metadata failure, many
 * threads at once, reopening, and an idle pool that writes nothing.
 *
 * Every test ends with the pool closed and its metadata checked by the
 * offline checker (tools/check.h), and by thin_check when it is installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "check.h"
#include "config.h"
#include "log.h"
#include "pool.h"
#include "record-sink.h"
#include "thin-metadata.h"

#define BS (64u * 1024)
#define KiB 1024u
#define MiB (1024u * 1024)

struct fixture {
	char dir[64];
	struct tfs_pool_config cfg;
	struct tfs_pool *pool;
	uint64_t data_blocks;
};

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

/* Zeroed memory, or the test fails here. */
static void *zalloc(size_t n)
{
	void *p = calloc(1, n);

	if (!p) /* not assert_non_null: the compiler must see that NULL never returns */
		abort();
	return p;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static void make_file(const char *path, uint64_t bytes)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0600);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	close(fd);
}

/* Fresh metadata (8 MiB) and data (data_blocks of 64 KiB) files, formatted. */
static struct fixture *new_fixture(uint64_t data_blocks, bool skip_zeroing)
{
	struct fixture *f = zalloc(sizeof(*f));

	strcpy(f->dir, "/tmp/tfs-pool-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->cfg.metadata, sizeof(f->cfg.metadata), "%s/meta", f->dir);
	snprintf(f->cfg.data, sizeof(f->cfg.data), "%s/data", f->dir);
	f->cfg.block_size = BS;
	f->cfg.low_water_is_percent = true;
	f->cfg.low_water_percent = 10;
	f->cfg.discard_passdown = true;
	f->cfg.skip_block_zeroing = skip_zeroing;
	f->cfg.commit_interval_ms = 100;
	f->cfg.metadata_cache_bytes = 4 * MiB;
	f->data_blocks = data_blocks;
	make_file(f->cfg.metadata, 8 * MiB);
	make_file(f->cfg.data, data_blocks * BS);
	assert_int_equal(tfs_pool_format(&f->cfg), 0);
	return f;
}

static void open_pool(struct fixture *f)
{
	assert_int_equal(tfs_pool_open(&f->cfg, false, &f->pool), 0);
}

static void close_pool(struct fixture *f)
{
	assert_int_equal(tfs_pool_close(f->pool), 0);
	f->pool = NULL;
}

/* 0 = clean, 1 = problems, -1 = thin_check is not installed. */
static int run_thin_check(const char *path)
{
	char cmd[512];
	int st;

	if (access("/usr/sbin/thin_check", X_OK))
		return -1;
	snprintf(cmd, sizeof(cmd), "/usr/sbin/thin_check -q %s", path);
	st = system(cmd);
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}

static void check_metadata(const char *path, bool expect_needs_check)
{
	struct tfs_check_opts opts = { .out = stderr };
	struct tfs_check_result res;
	struct tfs_bdev *dev;

	assert_int_equal(tfs_bdev_open(path, true, &dev), 0);
	assert_int_equal(tfs_check_metadata(dev, &opts, &res), 0);
	tfs_bdev_close(dev);
	assert_int_equal(res.errors, 0);
	assert_int_equal(res.needs_check, expect_needs_check);
	if (!expect_needs_check)
		assert_int_not_equal(run_thin_check(path), 1);
}

/* Close (if open), check the metadata, remove the files. */
static void done(struct fixture *f, bool expect_needs_check)
{
	char path[128];

	if (f->pool)
		close_pool(f);
	check_metadata(f->cfg.metadata, expect_needs_check);
	unlink(f->cfg.metadata);
	unlink(f->cfg.data);
	snprintf(path, sizeof(path), "%s", f->dir);
	rmdir(path);
	free(f);
}

static struct tfs_dev *new_volume(struct fixture *f, uint32_t *id)
{
	struct tfs_dev *vol;
	uint32_t i;

	assert_int_equal(tfs_pool_create_thin(f->pool, &i), 0);
	assert_int_equal(tfs_thin_open(f->pool, i, 0, &vol), 0);
	if (id)
		*id = i;
	return vol;
}

/* Blocks the device maps, from its allocated bytes (target.h). */
static uint64_t mapped_blocks(struct tfs_dev *dev)
{
	uint64_t bytes;

	assert_int_equal(tfs_dev_allocated(dev, &bytes), 0);
	assert_int_equal(bytes % BS, 0);
	return bytes / BS;
}

static uint64_t data_used(struct fixture *f)
{
	struct tfs_pool_status st;

	tfs_pool_status(f->pool, &st);
	return st.data_used;
}

static const char *mode_of(struct fixture *f)
{
	struct tfs_pool_status st;

	tfs_pool_status(f->pool, &st);
	return st.mode;
}

static uint32_t rng = 2463534242u;
static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng;
}

static void fill_random(uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(rnd() >> 11);
}

static bool all_bytes(const uint8_t *p, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != v)
			return false;
	return true;
}

static void expect_contents(struct tfs_dev *vol, const uint8_t *model, size_t len)
{
	uint8_t *got = zalloc(len);

	assert_int_equal(tfs_dev_read(vol, got, len, 0), 0);
	assert_memory_equal(got, model, len);
	free(got);
}

static uint64_t allocated_bytes(const char *path)
{
	struct stat st;

	assert_int_equal(stat(path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

/* ---- reads and writes ---------------------------------------------------------- */

static void test_unmapped_ranges_read_as_zeros(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_dev *vol;
	uint8_t buf[3 * BS + 100];

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x5a, sizeof(buf));
	assert_int_equal(tfs_dev_read(vol, buf, sizeof(buf), 12345), 0);
	assert_true(all_bytes(buf, sizeof(buf), 0));
	assert_int_equal(mapped_blocks(vol), 0);
	assert_int_equal(data_used(f), 0);
	tfs_dev_close(vol);
	done(f, false);
}

/*
 * A bulk read (send) reads what tfs_dev_read reads: blocks written in a
 * shuffled order (so their data blocks lie out of order), holes, ranges
 * inside a block and across blocks, more ranges than one lookup chunk;
 * ranges out of order are refused.
 */
static void test_bulk_read_reads_what_reads_read(void **state)
{
	enum { VOL = 300 * BS, NR = 160 };
	struct fixture *f = new_fixture(512, false);
	uint8_t *buf = zalloc(VOL), *got = zalloc(VOL), *want = zalloc(VOL);
	struct tfs_thin_range ranges[NR];
	struct tfs_thin_bulk *b;
	struct tfs_dev *vol;
	unsigned order[300];
	size_t used = 0;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	for (unsigned i = 0; i < 300; i++)
		order[i] = i;
	for (unsigned i = 299; i > 0; i--) {
		unsigned j = (unsigned)(rnd() % (i + 1)), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (unsigned i = 0; i < 300; i++) {
		if (order[i] % 5 == 4)
			continue; /* a hole */
		fill_random(buf, BS);
		assert_int_equal(tfs_dev_write(vol, buf, BS, (uint64_t)order[i] * BS), 0);
	}
	assert_int_equal(tfs_thin_bulk_open(vol, &b), 0);
	for (unsigned i = 0; i < NR; i++) {
		/* Every other range a whole block, the others odd pieces, some across blocks. */
		uint64_t off = (uint64_t)(i * 300 / NR) * BS + (i % 2 ? 4096 * (i % 7) : 0);
		size_t len = i % 2 ? 4096 * (1 + i % 23) : BS;

		ranges[i] = (struct tfs_thin_range){ off, len, got + used };
		used += len;
	}
	memset(got, 0xa5, VOL);
	assert_int_equal(tfs_thin_bulk_read(b, ranges, NR), 0);
	for (unsigned i = 0; i < NR; i++) {
		assert_int_equal(tfs_dev_read(vol, want, ranges[i].len, ranges[i].off), 0);
		assert_memory_equal(ranges[i].buf, want, ranges[i].len);
	}
	ranges[1] = ranges[0];
	assert_int_equal(tfs_thin_bulk_read(b, ranges, 2), -EINVAL);
	tfs_thin_bulk_close(b);
	tfs_dev_close(vol);
	free(buf);
	free(got);
	free(want);
	done(f, false);
}

static void test_writes_at_odd_offsets_read_back_as_the_model(void **state)
{
	enum { VOL = 48 * BS };
	struct fixture *f = new_fixture(64, false);
	uint8_t *model = zalloc(VOL), *buf = zalloc(VOL);
	struct tfs_dev *vol;
	uint32_t id;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	for (int i = 0; i < 200; i++) {
		uint64_t off = rnd() % VOL;
		size_t len = 1 + rnd() % (i % 4 == 0 ? 5 * BS : 9000);

		if (off + len > VOL)
			len = VOL - off;
		fill_random(buf, len);
		assert_int_equal(tfs_dev_write(vol, buf, len, off), 0);
		memcpy(model + off, buf, len);
		if (i % 7 == 0) {
			uint64_t roff = rnd() % VOL;
			size_t rlen = 1 + rnd() % (VOL - roff);

			assert_int_equal(tfs_dev_read(vol, buf, rlen, roff), 0);
			assert_memory_equal(buf, model + roff, rlen);
		}
	}
	expect_contents(vol, model, VOL);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_dev_close(vol);
	close_pool(f);

	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, id, TFS_DEV_READ_ONLY, &vol), 0);
	expect_contents(vol, model, VOL);
	tfs_dev_close(vol);
	free(model);
	free(buf);
	done(f, false);
}

/* Old bytes in the data file must not show through a new block's unwritten part. */
static void test_partial_write_zeroes_the_rest_of_a_new_block(void **state)
{
	struct fixture *f = new_fixture(16, false);
	uint8_t junk[BS], buf[2 * BS];
	struct tfs_dev *vol;
	int fd;

	(void)state;
	memset(junk, 0xaa, sizeof(junk));
	fd = open(f->cfg.data, O_WRONLY);
	for (int b = 0; b < 16; b++)
		assert_int_equal(pwrite(fd, junk, BS, (off_t)b * BS), BS);
	close(fd);
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x11, 100);
	assert_int_equal(tfs_dev_write(vol, buf, 100, BS + 1000), 0);
	assert_int_equal(tfs_dev_read(vol, buf, 2 * BS, 0), 0);
	assert_true(all_bytes(buf, BS + 1000, 0));
	assert_true(all_bytes(buf + BS + 1000, 100, 0x11));
	assert_true(all_bytes(buf + BS + 1100, BS - 1100, 0));
	assert_int_equal(mapped_blocks(vol), 1);
	tfs_dev_close(vol);
	done(f, false);
}

static void test_skip_block_zeroing_leaves_the_rest_unwritten(void **state)
{
	struct fixture *f = new_fixture(16, true);
	uint8_t junk[BS], buf[BS];
	struct tfs_dev *vol;
	int fd;

	(void)state;
	memset(junk, 0xaa, sizeof(junk));
	fd = open(f->cfg.data, O_WRONLY);
	assert_int_equal(pwrite(fd, junk, BS, 0), BS);
	close(fd);
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x11, 100);
	assert_int_equal(tfs_dev_write(vol, buf, 100, 500), 0);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), 0);
	assert_true(all_bytes(buf, 500, 0xaa));
	assert_true(all_bytes(buf + 500, 100, 0x11));
	assert_true(all_bytes(buf + 600, BS - 600, 0xaa));
	tfs_dev_close(vol);
	done(f, false);
}

/* ---- snapshots ------------------------------------------------------------------- */

static void test_snapshot_keeps_content_and_accounting_is_exact(void **state)
{
	enum { N = 20 };
	struct fixture *f = new_fixture(64, false);
	uint8_t *orig = zalloc(N * BS), *other = zalloc(N * BS);
	struct tfs_dev *vol, *snap;
	uint32_t id, sid;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	fill_random(orig, N * BS);
	fill_random(other, N * BS);
	assert_int_equal(tfs_dev_write(vol, orig, N * BS, 0), 0);
	assert_int_equal(data_used(f), N);

	assert_int_equal(tfs_pool_create_snaps(f->pool, &id, 1, &sid), 0);
	assert_int_not_equal(sid, id);
	assert_int_equal(data_used(f), N);

	assert_int_equal(tfs_thin_open(f->pool, sid, 0, &snap), 0);
	assert_int_equal(tfs_dev_write(snap, other, N * BS, 0), 0);
	assert_int_equal(data_used(f), 2 * N);
	expect_contents(vol, orig, N * BS);
	expect_contents(snap, other, N * BS);

	/* The origin's blocks still pass the time test as shared, so this copies, but the
	 * old block is the origin's alone by now and is freed: usage stays 2N. */
	assert_int_equal(tfs_dev_write(vol, other, BS, 0), 0);
	assert_int_equal(data_used(f), 2 * N);
	memcpy(orig, other, BS);

	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_delete(f->pool, sid), -EBUSY);
	tfs_log_set_sink(NULL, NULL);
	tfs_dev_close(snap);
	assert_int_equal(tfs_pool_delete(f->pool, sid), 0);
	assert_int_equal(data_used(f), N);
	expect_contents(vol, orig, N * BS);
	tfs_dev_close(vol);
	free(orig);
	free(other);
	done(f, false);
}

/*
 * A snapshot shares leaves, not just blocks: after the origin writes one
 * leaf, the blocks of leaves it never touched still have count 1 but are
 * shared, and writing them must copy.
 */
static void test_write_to_untouched_leaf_after_snapshot_copies(void **state)
{
	enum { N = 700 }; /* several mapping leaves */
	struct fixture *f = new_fixture(N + 16, false);
	uint8_t a[BS], b[BS], got[BS];
	struct tfs_dev *vol, *snap;
	uint32_t id, sid;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	memset(a, 0x41, BS);
	for (uint64_t i = 0; i < N; i++)
		assert_int_equal(tfs_dev_write(vol, a, BS, i * BS), 0);
	assert_int_equal(tfs_pool_create_snaps(f->pool, &id, 1, &sid), 0);
	memset(b, 0x42, BS);
	assert_int_equal(tfs_dev_write(vol, b, BS, 0), 0);
	assert_int_equal(tfs_dev_write(vol, b, 100, (N - 1) * BS + 7), 0);
	assert_int_equal(tfs_thin_open(f->pool, sid, TFS_DEV_READ_ONLY, &snap), 0);
	assert_int_equal(tfs_dev_read(snap, got, BS, (N - 1) * BS), 0);
	assert_true(all_bytes(got, BS, 0x41));
	assert_int_equal(tfs_dev_read(snap, got, BS, 0), 0);
	assert_true(all_bytes(got, BS, 0x41));
	assert_int_equal(tfs_dev_read(vol, got, BS, (N - 1) * BS), 0);
	assert_true(all_bytes(got, 7, 0x41));
	assert_true(all_bytes(got + 7, 100, 0x42));
	assert_true(all_bytes(got + 107, BS - 107, 0x41));
	assert_int_equal(data_used(f), N + 2);
	tfs_dev_close(snap);
	tfs_dev_close(vol);
	done(f, false);
}

static void test_snapshots_with_chosen_ids_and_deleting_several_at_once(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t buf[BS];
	struct tfs_dev *v;
	uint32_t id, free_ids[2], list[8], ids[3];
	uint64_t end;

	(void)state;
	open_pool(f);
	v = new_volume(f, &id);
	fill_random(buf, sizeof(buf));
	assert_int_equal(tfs_pool_dev_end(f->pool, id, &end), 0);
	assert_int_equal(end, 0);
	assert_int_equal(tfs_dev_write(v, buf, BS, 3 * BS), 0);
	assert_int_equal(tfs_dev_write(v, buf, 100, 1000 * BS + 7), 0);
	/* One past the highest mapped block, whatever lies between. */
	assert_int_equal(tfs_pool_dev_end(f->pool, id, &end), 0);
	assert_int_equal(end, 1001);

	/* Ids picked first are what the snapshots get; a taken one is refused, nothing made. */
	assert_int_equal(tfs_pool_free_ids(f->pool, 2, free_ids), 0);
	assert_int_equal(free_ids[0], 1);
	assert_int_equal(free_ids[1], 2);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_create_snaps_as(f->pool, (uint32_t[]){ id, id }, 2,
						  (uint32_t[]){ 5, id }), -EEXIST);
	tfs_log_set_sink(NULL, NULL);
	assert_int_equal(tfs_pool_list(f->pool, list, 8), 1);
	assert_int_equal(tfs_pool_create_snaps_as(f->pool, (uint32_t[]){ id, id }, 2,
						  (uint32_t[]){ 7, 4 }), 0);
	assert_int_equal(tfs_pool_list(f->pool, list, 8), 3);
	assert_int_equal(list[1], 4);
	assert_int_equal(list[2], 7);
	assert_int_equal(tfs_pool_dev_end(f->pool, 7, &end), 0);
	assert_int_equal(end, 1001);

	/* Open devices are refused before any goes; missing ids are skipped. */
	ids[0] = 4;
	ids[1] = id;
	ids[2] = 9;
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_delete_devices(f->pool, ids, 3), -EBUSY);
	tfs_log_set_sink(NULL, NULL);
	assert_int_equal(tfs_pool_list(f->pool, list, 8), 3);
	ids[1] = 7;
	assert_int_equal(tfs_pool_delete_devices(f->pool, ids, 3), 0);
	assert_int_equal(tfs_pool_list(f->pool, list, 8), 1);
	assert_int_equal(tfs_pool_dev_end(f->pool, 7, &end), -ENODATA);
	tfs_dev_close(v);
	done(f, false);
}

static void test_group_snapshot_is_atomic_and_usage_counts_exclusive_blocks(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t buf[4 * BS];
	struct tfs_dev *v1, *v2;
	struct tfs_dev_usage u;
	uint32_t ids[2], snaps[2], list[8];

	(void)state;
	open_pool(f);
	v1 = new_volume(f, &ids[0]);
	v2 = new_volume(f, &ids[1]);
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 1);
	fill_random(buf, sizeof(buf));
	assert_int_equal(tfs_dev_write(v1, buf, 4 * BS, 0), 0);
	assert_int_equal(tfs_dev_write(v2, buf, 2 * BS, 0), 0);
	assert_int_equal(tfs_pool_create_snaps(f->pool, ids, 2, snaps), 0);
	assert_int_equal(snaps[0], 2);
	assert_int_equal(snaps[1], 3);
	assert_int_equal(tfs_pool_list(f->pool, list, 8), 4);

	assert_int_equal(tfs_pool_dev_usage(f->pool, ids[0], &u), 0);
	assert_int_equal(u.mapped_blocks, 4);
	assert_int_equal(u.exclusive_blocks, 0);
	assert_int_equal(tfs_dev_write(v1, buf, BS, BS), 0); /* breaks sharing of one block */
	assert_int_equal(tfs_pool_dev_usage(f->pool, ids[0], &u), 0);
	assert_int_equal(u.mapped_blocks, 4);
	assert_int_equal(u.exclusive_blocks, 1);
	assert_int_equal(tfs_pool_dev_usage(f->pool, snaps[1], &u), 0);
	assert_int_equal(u.mapped_blocks, 2);

	/* With the snapshot gone nothing shares v1's blocks, though the time test still says so. */
	assert_int_equal(tfs_pool_delete(f->pool, snaps[0]), 0);
	assert_int_equal(tfs_pool_dev_usage(f->pool, ids[0], &u), 0);
	assert_int_equal(u.mapped_blocks, 4);
	assert_int_equal(u.exclusive_blocks, 4);
	/* A freed id is reused: the lowest free one. */
	tfs_dev_close(v2);
	assert_int_equal(tfs_pool_create_thin(f->pool, &ids[1]), 0);
	assert_int_equal(ids[1], 2);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_create_snaps(f->pool, (uint32_t[]){ 99 }, 1, snaps), -ENODATA);
	tfs_log_set_sink(NULL, NULL);
	tfs_dev_close(v1);
	done(f, false);
}

/* A snapshot taken while writers run sees each block as before or after a write, whole. */
struct snap_writer {
	struct tfs_dev *vol;
	atomic_int stop;
	int rounds;
};

static void *rewrite_blocks(void *arg)
{
	struct snap_writer *w = arg;
	uint8_t *buf = zalloc(8 * BS);

	for (int round = 1; !atomic_load(&w->stop); round++) {
		memset(buf, round & 0xff, 8 * BS);
		assert_int_equal(tfs_dev_write(w->vol, buf, 8 * BS, 0), 0);
		w->rounds = round;
	}
	free(buf);
	return NULL;
}

static void test_snapshot_during_writes_sees_whole_requests(void **state)
{
	struct fixture *f = new_fixture(512, false);
	struct snap_writer w = { 0 };
	struct tfs_dev *snap;
	uint8_t *buf = zalloc(8 * BS);
	uint32_t id, sid;
	pthread_t th;

	(void)state;
	open_pool(f);
	w.vol = new_volume(f, &id);
	assert_int_equal(pthread_create(&th, NULL, rewrite_blocks, &w), 0);
	for (int i = 0; i < 10; i++) {
		sleep_ms(10);
		assert_int_equal(tfs_pool_create_snaps(f->pool, &id, 1, &sid), 0);
		assert_int_equal(tfs_thin_open(f->pool, sid, TFS_DEV_READ_ONLY, &snap), 0);
		assert_int_equal(tfs_dev_read(snap, buf, 8 * BS, 0), 0);
		/* One request covers all 8 blocks: the snapshot has all of it or none. */
		assert_true(all_bytes(buf, 8 * BS, buf[0]));
		tfs_dev_close(snap);
		assert_int_equal(tfs_pool_delete(f->pool, sid), 0);
	}
	atomic_store(&w.stop, 1);
	pthread_join(th, NULL);
	assert_true(w.rounds > 0);
	tfs_dev_close(w.vol);
	free(buf);
	done(f, false);
}

/* ---- discard, provision, zero range, truncate, seek ----------------------------------- */

static void test_discard_frees_whole_blocks_and_zeroes_partial_ones(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t *model = zalloc(8 * BS);
	uint64_t before;
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	fill_random(model, 8 * BS);
	assert_int_equal(tfs_dev_write(vol, model, 8 * BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	before = allocated_bytes(f->cfg.data);
	assert_true(before >= 8 * BS);

	/* From the middle of block 1 to the middle of block 6: blocks 2-5 go. */
	assert_int_equal(tfs_dev_discard(vol, BS + 300, 5 * BS), 0);
	memset(model + BS + 300, 0, 5 * BS);
	expect_contents(vol, model, 8 * BS);
	assert_int_equal(mapped_blocks(vol), 4);
	assert_int_equal(data_used(f), 4);
	/* Passdown waits for the commit: until then the committed mappings still need the data. */
	assert_int_equal(allocated_bytes(f->cfg.data), before);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(allocated_bytes(f->cfg.data), before - 4 * BS);

	/* A discard within one block only zeroes. */
	assert_int_equal(tfs_dev_discard(vol, 10, 20), 0);
	memset(model + 10, 0, 20);
	expect_contents(vol, model, 8 * BS);
	assert_int_equal(mapped_blocks(vol), 4);
	tfs_dev_close(vol);
	free(model);
	done(f, false);
}

/* A discarded block a snapshot still maps stays with the snapshot; its edges are copied. */
static void test_discard_of_shared_blocks_keeps_the_snapshot(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t *model = zalloc(4 * BS), *got = zalloc(4 * BS);
	struct tfs_dev *vol, *snap;
	uint32_t id, sid;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	fill_random(model, 4 * BS);
	assert_int_equal(tfs_dev_write(vol, model, 4 * BS, 0), 0);
	assert_int_equal(tfs_pool_create_snaps(f->pool, &id, 1, &sid), 0);
	assert_int_equal(tfs_dev_discard(vol, 100, 3 * BS), 0);
	assert_int_equal(tfs_thin_open(f->pool, sid, TFS_DEV_READ_ONLY, &snap), 0);
	expect_contents(snap, model, 4 * BS);
	assert_int_equal(tfs_dev_read(vol, got, 4 * BS, 0), 0);
	assert_memory_equal(got, model, 100);
	assert_true(all_bytes(got + 100, 3 * BS, 0));
	assert_memory_equal(got + 100 + 3 * BS, model + 100 + 3 * BS, BS - 100);
	/* Blocks 0 and 3 copied, 1 and 2 unmapped: 4 shared + 2 copies. */
	assert_int_equal(data_used(f), 6);
	tfs_dev_close(snap);
	tfs_dev_close(vol);
	free(model);
	free(got);
	done(f, false);
}

static void test_provision_maps_zeroed_blocks_and_zero_range_unmaps(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t junk[BS], buf[6 * BS], model[6 * BS];
	struct tfs_dev *vol;
	int fd;

	(void)state;
	memset(junk, 0xaa, sizeof(junk));
	fd = open(f->cfg.data, O_WRONLY);
	for (int b = 0; b < 8; b++)
		assert_int_equal(pwrite(fd, junk, BS, (off_t)b * BS), BS);
	close(fd);
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x33, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 2 * BS), 0);
	/* Partial blocks at both ends are provisioned whole; the mapped block is left alone. */
	assert_int_equal(tfs_dev_provision(vol, 100, 4 * BS), 0);
	assert_int_equal(mapped_blocks(vol), 5);
	memset(model, 0, sizeof(model));
	memset(model + 2 * BS, 0x33, BS);
	expect_contents(vol, model, sizeof(model));

	assert_int_equal(tfs_dev_zero_range(vol, BS / 2, 3 * BS), 0);
	memset(model + BS / 2, 0, 3 * BS);
	expect_contents(vol, model, sizeof(model));
	assert_int_equal(mapped_blocks(vol), 3); /* blocks 1 and 2 unmapped */
	tfs_dev_close(vol);
	done(f, false);
}

static void test_clone_range_shares_whole_blocks_and_writes_break_it(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t a[8 * BS], b[8 * BS], got[8 * BS];
	struct tfs_dev *src, *dst;
	uint64_t used;

	(void)state;
	open_pool(f);
	src = new_volume(f, NULL);
	dst = new_volume(f, NULL);
	fill_random(a, sizeof(a));
	fill_random(b, sizeof(b));
	assert_int_equal(tfs_dev_write(src, a, sizeof(a), 0), 0);
	assert_int_equal(tfs_dev_write(dst, b, sizeof(b), 0), 0);
	used = data_used(f);
	/* Head [100, BS), blocks 1-5 shared, tail [6 BS, 6 BS + 100). */
	assert_int_equal(tfs_dev_clone_range(dst, src, 100, 100, 6 * BS), 0);
	memcpy(b + 100, a + 100, 6 * BS);
	expect_contents(dst, b, sizeof(b));
	assert_int_equal(data_used(f), used - 5); /* dst's own blocks 1-5 are free */
	assert_int_equal(mapped_blocks(dst), 8);

	/* Writes to either side copy the block first; the other side keeps its bytes. */
	memset(got, 0x5a, BS);
	assert_int_equal(tfs_dev_write(src, got, 10, 2 * BS), 0);
	memcpy(a + 2 * BS, got, 10);
	assert_int_equal(tfs_dev_write(dst, got, 10, 3 * BS + 7), 0);
	memcpy(b + 3 * BS + 7, got, 10);
	expect_contents(src, a, sizeof(a));
	expect_contents(dst, b, sizeof(b));
	assert_int_equal(data_used(f), used - 3);

	/* Within one device, then the refusals. */
	assert_int_equal(tfs_dev_clone_range(dst, dst, 0, 4 * BS, 2 * BS), 0);
	memcpy(b + 4 * BS, b, 2 * BS);
	expect_contents(dst, b, sizeof(b));
	assert_int_equal(tfs_dev_clone_range(dst, dst, 0, BS, 2 * BS), -EINVAL);
	assert_int_equal(tfs_dev_clone_range(dst, src, 0, 4096, BS), -EOPNOTSUPP);
	tfs_dev_close(src);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &src), 0);
	assert_int_equal(tfs_dev_clone_range(src, dst, 0, 0, BS), -EROFS);
	tfs_dev_close(src);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_STATUS_ONLY, &src), 0);
	assert_int_equal(tfs_dev_clone_range(dst, src, 0, 0, BS), -EBADF);
	tfs_dev_close(src);
	{
		struct tfs_bdev *mem;
		struct tfs_dev *lin;

		assert_int_equal(tfs_bdev_open_mem(BS, &mem), 0);
		assert_int_equal(tfs_linear_open(mem, true, 0, &lin), 0);
		assert_int_equal(tfs_dev_clone_range(dst, lin, 0, 0, BS), -EXDEV);
		assert_int_equal(tfs_dev_clone_range(lin, dst, 0, 0, BS), -EOPNOTSUPP);
		tfs_dev_close(lin);
	}
	{
		struct fixture *g = new_fixture(16, false);
		struct tfs_dev *other;

		open_pool(g);
		other = new_volume(g, NULL);
		assert_int_equal(tfs_dev_clone_range(other, dst, 0, 0, BS), -EXDEV);
		assert_int_equal(tfs_dev_clone_range(dst, other, 0, 0, BS), -EXDEV);
		tfs_dev_close(other);
		done(g, false);
	}
	expect_contents(dst, b, sizeof(b));
	tfs_dev_close(dst);
	done(f, false);
}

static void test_detect_zeroes_unmaps_whole_blocks_of_zeros(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t buf[4 * BS], model[4 * BS];
	struct tfs_dev *vol;
	uint64_t used;

	(void)state;
	f->cfg.detect_zeroes = true;
	open_pool(f);
	vol = new_volume(f, NULL);
	/* Zeros to unmapped blocks map nothing. */
	memset(buf, 0, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, sizeof(buf), 0), 0);
	assert_int_equal(mapped_blocks(vol), 0);
	assert_int_equal(data_used(f), 0);
	/* Over mapped blocks they unmap the whole ones; partial ones are written. */
	fill_random(model, sizeof(model));
	assert_int_equal(tfs_dev_write(vol, model, sizeof(model), 0), 0);
	used = data_used(f);
	assert_int_equal(used, 4);
	assert_int_equal(tfs_dev_write(vol, buf, 2 * BS + 10, BS), 0);
	memset(model + BS, 0, 2 * BS + 10);
	expect_contents(vol, model, sizeof(model));
	assert_int_equal(mapped_blocks(vol), 2);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(data_used(f), 2);
	/* A block of data mixed with zeros is data. */
	buf[BS - 1] = 1;
	assert_int_equal(tfs_dev_write(vol, buf, BS, BS), 0);
	memcpy(model + BS, buf, BS);
	expect_contents(vol, model, sizeof(model));
	assert_int_equal(mapped_blocks(vol), 3);
	tfs_dev_close(vol);
	done(f, false);
}

static void test_truncate_unmaps_past_the_end_and_zeroes_the_tail(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t buf[10 * BS];
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x77, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, sizeof(buf), 0), 0);
	assert_int_equal(tfs_dev_write(vol, buf, 100, 40 * BS), 0);
	assert_int_equal(tfs_dev_truncate(vol, 3 * BS + 10), 0);
	assert_int_equal(mapped_blocks(vol), 4);
	assert_int_equal(data_used(f), 4);
	assert_int_equal(tfs_dev_read(vol, buf, 5 * BS, 0), 0);
	assert_true(all_bytes(buf, 3 * BS + 10, 0x77));
	assert_true(all_bytes(buf + 3 * BS + 10, 2 * BS - 10, 0));
	assert_int_equal(tfs_dev_truncate(vol, 0), 0);
	assert_int_equal(mapped_blocks(vol), 0);
	tfs_dev_close(vol);
	done(f, false);
}

static void test_seek_data_and_hole_follow_the_mapping(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint64_t size = 20 * BS + 500, pos;
	uint8_t buf[BS] = { 1 };
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	assert_int_equal(tfs_dev_write(vol, buf, 10, 3 * BS + 5), 0);  /* block 3 */
	assert_int_equal(tfs_dev_write(vol, buf, BS, 4 * BS), 0);      /* block 4 */
	assert_int_equal(tfs_dev_write(vol, buf, 10, 10 * BS), 0);     /* block 10 */

	assert_int_equal(tfs_dev_seek(vol, 0, SEEK_DATA, size, &pos), 0);
	assert_int_equal(pos, 3 * BS);
	assert_int_equal(tfs_dev_seek(vol, 3 * BS + 7, SEEK_DATA, size, &pos), 0);
	assert_int_equal(pos, 3 * BS + 7);
	assert_int_equal(tfs_dev_seek(vol, 3 * BS, SEEK_HOLE, size, &pos), 0);
	assert_int_equal(pos, 5 * BS);
	assert_int_equal(tfs_dev_seek(vol, 5 * BS, SEEK_DATA, size, &pos), 0);
	assert_int_equal(pos, 10 * BS);
	assert_int_equal(tfs_dev_seek(vol, 0, SEEK_HOLE, size, &pos), 0);
	assert_int_equal(pos, 0);
	assert_int_equal(tfs_dev_seek(vol, 11 * BS, SEEK_DATA, size, &pos), -ENXIO);
	assert_int_equal(tfs_dev_seek(vol, 10 * BS + 1, SEEK_HOLE, size, &pos), 0);
	assert_int_equal(pos, 11 * BS);
	assert_int_equal(tfs_dev_seek(vol, size, SEEK_HOLE, size, &pos), -ENXIO);
	/* Data past the size does not count, and the end of the volume is a hole. */
	assert_int_equal(tfs_dev_seek(vol, 0, SEEK_DATA, 2 * BS, &pos), -ENXIO);
	assert_int_equal(tfs_dev_seek(vol, 4 * BS, SEEK_HOLE, 4 * BS + 100, &pos), 0);
	assert_int_equal(pos, 4 * BS + 100);
	tfs_dev_close(vol);
	done(f, false);
}

/* ---- space and failures ------------------------------------------------------------------- */

static void test_full_data_device_gives_enospc_and_freed_blocks_come_back(void **state)
{
	struct fixture *f = new_fixture(8, false);
	uint8_t buf[8 * BS];
	struct tfs_dev *vol;

	(void)state;
	tfs_log_set_sink(quiet_sink, NULL);
	f->cfg.error_if_no_space = true; /* fail at once rather than hold */
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x66, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, 8 * BS, 0), 0);
	assert_int_equal(tfs_dev_write(vol, buf, 10, 8 * BS), -ENOSPC);
	assert_string_equal(mode_of(f), "out_of_data_space");
	/* All or nothing per request: nothing of a write that did not fit is mapped. */
	assert_int_equal(tfs_dev_write(vol, buf, 2 * BS, 7 * BS), -ENOSPC);
	assert_int_equal(mapped_blocks(vol), 8);
	/* Reads and overwrites in place still work. */
	assert_int_equal(tfs_dev_write(vol, buf, 100, 3 * BS + 1), 0);
	assert_int_equal(tfs_dev_read(vol, buf, 8 * BS, 0), 0);
	assert_true(all_bytes(buf, 8 * BS, 0x66));
	/* A block discarded in this transaction is usable once a commit made it free. */
	assert_int_equal(tfs_dev_discard(vol, 0, BS), 0);
	assert_int_equal(tfs_dev_write(vol, buf, 10, 9 * BS), 0);
	assert_int_equal(data_used(f), 8);
	assert_string_equal(mode_of(f), "write");
	tfs_dev_close(vol);
	tfs_log_set_sink(NULL, NULL);
	done(f, false);
}

static void test_data_shrinks_down_to_the_highest_used_block(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	uint8_t buf[4 * BS];
	struct tfs_dev *vol;
	struct stat sb;
	char why[256];

	(void)state;
	tfs_log_set_sink(quiet_sink, NULL);
	f->cfg.error_if_no_space = true; /* fail at once rather than hold */
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x5a, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, 4 * BS, 0), 0); /* data blocks 0..3 */
	assert_int_equal(tfs_dev_flush(vol), 0);
	/* Refused below the highest used block, which is named; metadata never shrinks. */
	assert_int_equal(tfs_pool_resize(f->pool, true, 3 * BS, why, sizeof(why)), -EINVAL);
	assert_non_null(strstr(why, "block 3 is in use"));
	assert_non_null(strstr(why, "smallest possible size is 4 blocks"));
	assert_int_equal(tfs_pool_resize(f->pool, false, 1 * MiB, why, sizeof(why)), -EINVAL);
	assert_non_null(strstr(why, "shrinking the metadata device is not supported"));
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.data_total, 64);
	assert_string_equal(st.mode, "write");
	/* Down to highest used + 1: committed, and the file is cut after the commit. */
	assert_int_equal(tfs_pool_resize(f->pool, true, 4 * BS, why, sizeof(why)), 0);
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.data_total, 4);
	assert_int_equal(stat(f->cfg.data, &sb), 0);
	assert_int_equal(sb.st_size, 4 * BS);
	assert_int_equal(tfs_dev_write(vol, buf, 10, 4 * BS), -ENOSPC);
	assert_int_equal(tfs_dev_read(vol, buf, 4 * BS, 0), 0);
	assert_true(all_bytes(buf, 4 * BS, 0x5a));
	/* And grown again: writes need and get new blocks. */
	assert_int_equal(tfs_pool_resize(f->pool, true, 16 * BS, why, sizeof(why)), 0);
	memset(buf, 0x3c, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 4 * BS), 0);
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.data_total, 16);
	assert_string_equal(st.mode, "write");
	tfs_dev_close(vol);
	close_pool(f);
	open_pool(f);
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.data_total, 16);
	tfs_log_set_sink(NULL, NULL);
	done(f, false);
}

static void test_held_write_times_out_then_resize_brings_space_back(void **state)
{
	struct fixture *f = new_fixture(8, false);
	struct tfs_pool_status st;
	uint8_t buf[8 * BS];
	struct timespec t0, t1;
	struct tfs_dev *vol;
	char why[256];
	long ms;

	(void)state;
	tfs_log_set_sink(quiet_sink, NULL);
	f->cfg.no_space_timeout_ms = 300;
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x77, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, 8 * BS, 0), 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	/* Held until no_space_timeout, then ENOSPC; later writes fail at once. */
	assert_int_equal(tfs_dev_write(vol, buf, 10, 8 * BS), -ENOSPC);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
	assert_true(ms >= 250);
	tfs_pool_status(f->pool, &st);
	assert_true(st.no_space_error);
	assert_string_equal(st.mode, "out_of_data_space");
	assert_int_equal(tfs_dev_write(vol, buf, 10, 9 * BS), -ENOSPC);
	/* Shrinking is refused; growing gives space back and holds again afterwards. */
	assert_int_equal(tfs_pool_resize(f->pool, true, 4 * BS, why, sizeof(why)), -EINVAL);
	assert_true(strstr(why, "shrink") != NULL);
	assert_int_equal(tfs_pool_resize(f->pool, true, 10 * BS, why, sizeof(why)), 0);
	tfs_pool_status(f->pool, &st);
	assert_false(st.no_space_error);
	assert_string_equal(st.mode, "write");
	assert_int_equal(st.data_total, 10);
	assert_int_equal(tfs_dev_write(vol, buf, 2 * BS, 8 * BS), 0);
	assert_int_equal(tfs_dev_read(vol, buf, 2 * BS, 8 * BS), 0);
	assert_true(all_bytes(buf, 2 * BS, 0x77));
	tfs_dev_close(vol);
	tfs_log_set_sink(NULL, NULL);
	done(f, false);
}

static void test_metadata_write_error_makes_the_pool_read_only(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	uint8_t buf[2 * BS];
	struct tfs_dev *vol;
	uint32_t id;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	memset(buf, 0x21, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, BS), 0); /* not committed */

	tfs_log_set_sink(quiet_sink, NULL);
	/* One failed metadata write inside the commit; setting needs_check afterwards works. */
	tfs_bdev_fault_set(tfs_pool_bdev(f->pool, false), TFS_FAULT_WRITE, TFS_FAULT_EIO, 0, true);
	assert_int_equal(tfs_dev_flush(vol), -EIO);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "read_only");
	assert_true(st.needs_check);
	assert_true(strstr(st.reason, "commit") != NULL);

	/* The uncommitted block is gone; the committed one reads and can be overwritten. */
	assert_int_equal(tfs_dev_read(vol, buf, 2 * BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x21));
	assert_true(all_bytes(buf + BS, BS, 0));
	memset(buf, 0x22, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 5 * BS), -EIO);
	assert_int_equal(tfs_dev_discard(vol, 0, BS), -EIO);
	assert_int_equal(tfs_pool_create_thin(f->pool, &id), -EIO);
	tfs_dev_close(vol);
	close_pool(f);

	assert_int_equal(tfs_pool_open(&f->cfg, false, &f->pool), -EROFS);
	assert_int_equal(tfs_pool_open(&f->cfg, true, &f->pool), 0);
	tfs_log_set_sink(NULL, NULL);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "read_only");
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x22));
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), -EROFS);
	tfs_dev_close(vol);
	done(f, true);
}

static void test_metadata_space_exhaustion_gives_enospc_then_read_only(void **state)
{
	struct fixture *f = new_fixture(30000, false);
	struct tfs_pool_status st;
	uint8_t *buf = zalloc(MiB);
	struct tfs_dev *vol;
	uint64_t off = 0;
	int r;

	(void)state;
	make_file(f->cfg.metadata, 64 * 4096); /* about ten thousand mappings at most */
	assert_int_equal(tfs_pool_format(&f->cfg), 0);
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x4d, MiB);
	assert_int_equal(tfs_dev_write(vol, buf, MiB, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_log_set_sink(quiet_sink, NULL);
	do {
		off += MiB;
		r = tfs_dev_write(vol, buf, MiB, off);
	} while (!r && off < 30000ull * BS - MiB);
	tfs_log_set_sink(NULL, NULL);
	assert_int_equal(r, -ENOSPC);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "read_only");
	assert_true(st.needs_check);
	assert_true(strstr(st.reason, "No space") != NULL);
	assert_int_equal(tfs_dev_write(vol, buf, MiB, off), -EIO);
	memset(buf, 0, MiB);
	assert_int_equal(tfs_dev_read(vol, buf, MiB, 0), 0);
	assert_true(all_bytes(buf, MiB, 0x4d));
	tfs_dev_close(vol);
	free(buf);
	done(f, true);
}

struct held_commit {
	struct tfs_dev *vol;
	uint64_t off;
	int r;
};

static void *flush_vol(void *arg)
{
	struct held_commit *h = arg;

	h->r = tfs_dev_flush(h->vol);
	return NULL;
}

/* Allocating writes of 1 MiB from h->off on, until one fails. */
static void *fill_vol(void *arg)
{
	struct held_commit *h = arg;
	uint8_t *buf = zalloc(MiB);

	memset(buf, 0x4f, MiB);
	do {
		h->r = tfs_dev_write(h->vol, buf, MiB, h->off);
		h->off += MiB;
	} while (!h->r);
	free(buf);
	return NULL;
}

static atomic_bool abort_waits;

static void see_abort_wait(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	if (strstr(msg, "during a commit's metadata I/O: aborting when it ends"))
		atomic_store(&abort_waits, true);
}

/*
 * The next transaction runs out of metadata space while a commit's
 * metadata writes are held.  Its abort needs the commit's pinned blocks,
 * so it waits for the commit to end (an abort meanwhile would find them
 * locked); then the pool goes read_only with the commit durable: what it
 * committed reopens, the failed transaction is gone.
 */
static void test_a_change_failing_during_a_commit_io_is_aborted_after_it(void **state)
{
	struct fixture *f = new_fixture(30000, false);
	struct held_commit flusher = { 0 }, filler = { 0 };
	struct tfs_pool_status st;
	uint8_t *buf = zalloc(2 * MiB);
	pthread_t th_flush, th_fill;
	struct tfs_bdev *meta;
	struct tfs_dev *vol;

	(void)state;
	make_file(f->cfg.metadata, 64 * 4096); /* about ten thousand mappings at most */
	assert_int_equal(tfs_pool_format(&f->cfg), 0);
	f->cfg.commit_interval_ms = 3600 * 1000; /* only the flush below commits */
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x4d, MiB);
	memset(buf + MiB, 0x4e, MiB);
	assert_int_equal(tfs_dev_write(vol, buf, MiB, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, buf + MiB, MiB, MiB), 0); /* for the held commit */

	meta = tfs_pool_bdev(f->pool, false);
	tfs_bdev_fault_set(meta, TFS_FAULT_WRITE, TFS_FAULT_STALL, 0, false);
	flusher.vol = vol;
	assert_int_equal(pthread_create(&th_flush, NULL, flush_vol, &flusher), 0);
	while (tfs_bdev_fault_stalled(meta) == 0)
		sleep_ms(1);
	atomic_store(&abort_waits, false);
	tfs_log_set_sink(see_abort_wait, NULL);
	filler = (struct held_commit){ .vol = vol, .off = 2 * MiB };
	assert_int_equal(pthread_create(&th_fill, NULL, fill_vol, &filler), 0);
	/* Said before the abort waits; 60 s is only a bound for a loaded machine. */
	for (int ms = 0; ms < 60000 && !atomic_load(&abort_waits); ms++)
		sleep_ms(1);
	assert_true(atomic_load(&abort_waits));
	assert_int_equal(tfs_bdev_fault_stalled(meta), 1); /* the commit is still held */
	tfs_bdev_fault_set(meta, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
	assert_int_equal(pthread_join(th_flush, NULL), 0);
	assert_int_equal(pthread_join(th_fill, NULL), 0);
	tfs_log_set_sink(NULL, NULL);
	assert_int_equal(flusher.r, 0);
	assert_int_equal(filler.r, -ENOSPC);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "read_only");
	assert_true(st.needs_check);
	tfs_dev_close(vol);
	close_pool(f);

	/* The held commit is durable; the failed transaction after it never happened. */
	f->cfg.allow_faults = false;
	assert_int_equal(tfs_pool_open(&f->cfg, true, &f->pool), 0);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(mapped_blocks(vol), 2 * MiB / BS);
	memset(buf, 0, 2 * MiB);
	assert_int_equal(tfs_dev_read(vol, buf, 2 * MiB, 0), 0);
	assert_true(all_bytes(buf, MiB, 0x4d));
	assert_true(all_bytes(buf + MiB, MiB, 0x4e));
	tfs_dev_close(vol);
	free(buf);
	done(f, true);
}

/*
 * When even the abort or the needs_check write fails, the pool is in fail
 * mode: every call fails with -EIO, nothing touches the metadata any more,
 * and closing is still clean (the last commit is intact on disk).
 */
static void fail_mode_case(bool abort_fails)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	struct tfs_dev *vol, *other;
	struct tfs_bdev *meta;
	uint8_t buf[BS];
	uint32_t id;

	open_pool(f);
	vol = new_volume(f, &id);
	memset(buf, 0x5e, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, BS), 0);

	tfs_log_set_sink(quiet_sink, NULL);
	meta = tfs_pool_bdev(f->pool, false);
	tfs_bdev_fault_set(meta, TFS_FAULT_WRITE, TFS_FAULT_EIO, 0, false);
	if (abort_fails)
		tfs_bdev_fault_set(meta, TFS_FAULT_READ, TFS_FAULT_EIO, 0, false);
	assert_int_equal(tfs_dev_flush(vol), -EIO);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "fail");
	assert_true(strlen(st.reason) > 0);
	assert_int_equal(st.data_total, 64);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), -EIO);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), -EIO);
	assert_int_equal(tfs_dev_discard(vol, 0, BS), -EIO);
	assert_int_equal(tfs_thin_open(f->pool, id, TFS_DEV_READ_ONLY, &other), -EIO);
	assert_int_equal(tfs_pool_create_thin(f->pool, &id), -EIO);
	assert_int_equal(tfs_pool_list(f->pool, &id, 1), -EIO);
	tfs_dev_close(vol);
	close_pool(f);
	tfs_log_set_sink(NULL, NULL);

	/* The committed block survived; the uncommitted one never existed. */
	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(mapped_blocks(vol), 1);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x5e));
	tfs_dev_close(vol);
	done(f, false);
}

static void test_needs_check_write_failure_means_fail_mode(void **state)
{
	(void)state;
	fail_mode_case(false);
}

static void test_abort_failure_means_fail_mode(void **state)
{
	(void)state;
	fail_mode_case(true);
}

/* ---- durability and idleness ---------------------------------------------------------------- */

static void test_flush_then_reopen_keeps_data(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t *model = zalloc(6 * BS);
	struct tfs_dev *vol;
	uint32_t id;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	fill_random(model, 6 * BS);
	assert_int_equal(tfs_dev_write(vol, model, 6 * BS - 77, 33), 0);
	memmove(model + 33, model, 6 * BS - 77);
	memset(model, 0, 33);
	memset(model + 6 * BS - 44, 0, 44);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_dev_close(vol);
	close_pool(f);
	check_metadata(f->cfg.metadata, false);
	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, id, 0, &vol), 0);
	expect_contents(vol, model, 6 * BS);
	assert_int_equal(mapped_blocks(vol), 6);
	tfs_dev_close(vol);
	free(model);
	done(f, false);
}

/*
 * A daemon killed while writers run: what was flushed survives, and the
 * last commit is consistent (no block allocated but unmapped, which the
 * checker reports as leaked) even though commits ran every 50 ms while
 * allocations were in flight.
 */
#define CRASH_WRITERS 3
#define CRASH_REGION (32 * BS)

struct crash_shared {
	atomic_uint flushed_rounds; /* the flusher's rounds known durable */
	atomic_int go;
};

struct crash_writer {
	struct tfs_dev *vol;
	int idx;
	struct crash_shared *sh;
};

static void *crash_write(void *arg)
{
	struct crash_writer *w = arg;
	uint8_t buf[3 * BS];
	uint32_t seed = 99u + (uint32_t)w->idx;

	memset(buf, w->idx, sizeof(buf));
	while (atomic_load(&w->sh->go)) {
		seed ^= seed << 13;
		seed ^= seed >> 17;
		seed ^= seed << 5;
		uint64_t off = (uint64_t)(w->idx + 1) * CRASH_REGION + seed % (CRASH_REGION - sizeof(buf));

		if (tfs_dev_write(w->vol, buf, 1 + seed % sizeof(buf), off))
			break;
		if (!(seed % 16))
			tfs_dev_discard(w->vol, off, BS + seed % BS);
	}
	return NULL;
}

/* Rewrites its region block by block, one round = one value; flushes after each. */
static void *crash_flush(void *arg)
{
	struct crash_writer *w = arg;
	uint8_t buf[BS];

	for (unsigned round = 1; atomic_load(&w->sh->go); round++) {
		memset(buf, (int)round, sizeof(buf));
		for (uint64_t b = 0; b < CRASH_REGION / BS; b++)
			assert_int_equal(tfs_dev_write(w->vol, buf, BS, b * BS), 0);
		assert_int_equal(tfs_dev_flush(w->vol), 0);
		atomic_store(&w->sh->flushed_rounds, round);
	}
	return NULL;
}

static void crash_child(struct fixture *f, struct crash_shared *sh)
{
	struct crash_writer w[CRASH_WRITERS + 1];
	pthread_t th[CRASH_WRITERS + 1];
	struct tfs_dev *vol;

	f->cfg.commit_interval_ms = 50;
	open_pool(f);
	vol = new_volume(f, NULL);
	atomic_store(&sh->go, 1);
	for (int i = 0; i <= CRASH_WRITERS; i++) {
		w[i] = (struct crash_writer){ .vol = vol, .idx = i, .sh = sh };
		assert_int_equal(pthread_create(&th[i], NULL, i ? crash_write : crash_flush, &w[i]), 0);
	}
	sleep_ms(1500);
	_exit(0); /* mid-I/O, no close, no commit */
}

static void test_crash_keeps_flushed_data_and_a_consistent_commit(void **state)
{
	struct fixture *f = new_fixture((CRASH_WRITERS + 1) * 32 + 64, false);
	struct crash_shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	uint8_t buf[BS];
	struct tfs_dev *vol;
	unsigned rounds;
	int st;
	pid_t pid;

	(void)state;
	assert_true(sh != MAP_FAILED);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		crash_child(f, sh);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	rounds = atomic_load(&sh->flushed_rounds);
	assert_true(rounds > 0);
	check_metadata(f->cfg.metadata, false);

	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	for (uint64_t b = 0; b < CRASH_REGION / BS; b++) {
		assert_int_equal(tfs_dev_read(vol, buf, BS, b * BS), 0);
		/*
		 * The last flushed round, or a later one that happened to be
		 * committed.  Rounds are bytes and wrap at 256 (a fast flusher
		 * gets there), so "later" is counted modulo 256: a block can
		 * be a round or two ahead, never behind.
		 */
		assert_true(all_bytes(buf, BS, buf[0]));
		assert_true((uint8_t)(buf[0] - (uint8_t)rounds) < 128);
	}
	tfs_dev_close(vol);
	munmap(sh, sizeof(*sh));
	done(f, false);
}

/* With fault injection allowed, a power cut drops what was not flushed, data and metadata. */
static void test_power_cut_drops_only_unflushed_writes(void **state)
{
	struct fixture *f = new_fixture(64, false);
	uint8_t a[BS], b[BS], got[2 * BS];
	struct tfs_dev *vol;

	(void)state;
	f->cfg.allow_faults = true;
	f->cfg.commit_interval_ms = 60000; /* no timer commit during the test */
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(a, 0xa1, BS);
	memset(b, 0xb2, BS);
	assert_int_equal(tfs_dev_write(vol, a, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, b, 100, 0), 0); /* in place, unflushed */
	assert_int_equal(tfs_dev_write(vol, b, BS, BS), 0); /* allocated, unflushed */
	assert_int_equal(tfs_dev_read(vol, got, 2 * BS, 0), 0);
	assert_true(all_bytes(got, 100, 0xb2));
	assert_true(all_bytes(got + BS, BS, 0xb2));

	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_bdev_fault_power_cut(tfs_pool_bdev(f->pool, true), false, 1), 0);
	assert_int_equal(tfs_bdev_fault_power_cut(tfs_pool_bdev(f->pool, false), false, 1), 0);
	assert_int_equal(tfs_dev_read(vol, got, BS, 0), -EIO);
	tfs_dev_close(vol);
	assert_int_equal(tfs_pool_close(f->pool), -EIO);
	f->pool = NULL;
	tfs_log_set_sink(NULL, NULL);

	f->cfg.allow_faults = false;
	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(mapped_blocks(vol), 1);
	assert_int_equal(tfs_dev_read(vol, got, 2 * BS, 0), 0);
	assert_true(all_bytes(got, BS, 0xa1));
	assert_true(all_bytes(got + BS, BS, 0));
	tfs_dev_close(vol);
	done(f, false);
}

/* ---- commits with requests in flight ---------------------------------------------- */

struct bg_io {
	struct tfs_dev *vol;
	uint64_t off;
	int value;
	int r;
	atomic_bool done;
};

static void *bg_write_block(void *arg)
{
	struct bg_io *b = arg;
	uint8_t *buf = zalloc(BS);

	memset(buf, b->value, BS);
	b->r = tfs_dev_write(b->vol, buf, BS, b->off);
	free(buf);
	atomic_store(&b->done, true);
	return NULL;
}

static void *bg_flush(void *arg)
{
	struct bg_io *b = arg;

	b->r = tfs_dev_flush(b->vol);
	atomic_store(&b->done, true);
	return NULL;
}

/* Until *flag or 60 s (only a bound for a loaded machine, never expected). */
static void wait_flag(atomic_bool *flag)
{
	for (int ms = 0; ms < 60000 && !atomic_load(flag); ms++)
		sleep_ms(1);
}

/*
 * A commit does not wait for an allocating write in flight (held here in
 * its data write, after its allocation), and the state it commits does
 * not count that write's block: the checkers find no leaked block on
 * disk while the write is still held.  Once released, the write is mapped
 * in the next transaction like any other.
 */
static void test_a_commit_neither_waits_for_nor_counts_an_allocation_in_flight(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct bg_io w = { 0 }, fl = { 0 };
	pthread_t th_w, th_fl;
	struct tfs_bdev *data;
	struct tfs_dev *vol;
	uint8_t buf[BS];

	(void)state;
	f->cfg.commit_interval_ms = 3600 * 1000; /* only the flushes below commit */
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x31, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);

	data = tfs_pool_bdev(f->pool, true);
	tfs_bdev_fault_set(data, TFS_FAULT_WRITE, TFS_FAULT_STALL, 0, false);
	w = (struct bg_io){ .vol = vol, .off = 3 * BS, .value = 0x32 };
	assert_int_equal(pthread_create(&th_w, NULL, bg_write_block, &w), 0);
	while (tfs_bdev_fault_stalled(data) == 0)
		sleep_ms(1);
	assert_int_equal(data_used(f), 2); /* the held write's block is allocated */

	/* Its allocation made the pool dirty: this flush commits, with the block in flight. */
	fl.vol = vol;
	assert_int_equal(pthread_create(&th_fl, NULL, bg_flush, &fl), 0);
	wait_flag(&fl.done);
	assert_true(atomic_load(&fl.done));
	assert_int_equal(pthread_join(th_fl, NULL), 0);
	assert_int_equal(fl.r, 0);
	assert_int_equal(tfs_bdev_fault_stalled(data), 1);
	assert_false(atomic_load(&w.done));
	check_metadata(f->cfg.metadata, false); /* what is on disk: block 0 alone, no leak */
	assert_int_equal(data_used(f), 2);

	tfs_bdev_fault_set(data, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
	assert_int_equal(pthread_join(th_w, NULL), 0);
	assert_int_equal(w.r, 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_dev_close(vol);
	close_pool(f);

	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(mapped_blocks(vol), 2);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x31));
	assert_int_equal(tfs_dev_read(vol, buf, BS, 3 * BS), 0);
	assert_true(all_bytes(buf, BS, 0x32));
	tfs_dev_close(vol);
	done(f, false);
}

/* mapped_blocks of device id in the state on disk (the last superblock written). */
static uint64_t mapped_on_disk(const char *meta, tfs_dev_id id)
{
	struct tfs_pmd_options opt = { .read_only = true };
	struct tfs_thin_details dd;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;

	assert_int_equal(tfs_bdev_open(meta, true, &dev), 0);
	assert_int_equal(tfs_pmd_open(dev, &opt, &pmd), 0);
	assert_int_equal(tfs_pmd_device_details(pmd, id, &dd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	return dd.mapped_blocks;
}

/*
 * The data flush runs beside the commit's metadata block writes, but the
 * superblock waits for it: with the flush held, the blocks are written
 * and flushed, and the state on disk is still the one before the commit.
 */
static void test_the_superblock_waits_for_the_data_flush(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	struct bg_io fl = { 0 };
	struct tfs_bdev *data;
	struct tfs_dev *vol;
	uint64_t meta_flushes;
	uint8_t buf[BS];
	pthread_t th;
	uint32_t id;

	(void)state;
	f->cfg.commit_interval_ms = 3600 * 1000;
	open_pool(f);
	vol = new_volume(f, &id);
	memset(buf, 0x51, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, BS), 0); /* for the held commit */
	tfs_pool_status(f->pool, &st);
	meta_flushes = st.io_meta.flushes;

	data = tfs_pool_bdev(f->pool, true);
	tfs_bdev_fault_set(data, TFS_FAULT_FLUSH, TFS_FAULT_STALL, 0, false);
	fl.vol = vol;
	assert_int_equal(pthread_create(&th, NULL, bg_flush, &fl), 0);
	while (tfs_bdev_fault_stalled(data) == 0)
		sleep_ms(1);
	/* The metadata blocks and their flush; 60 s is only a bound for a loaded machine. */
	for (int ms = 0; ms < 60000 && st.io_meta.flushes == meta_flushes; ms++) {
		sleep_ms(1);
		tfs_pool_status(f->pool, &st);
	}
	assert_int_equal(st.io_meta.flushes, meta_flushes + 1);
	assert_int_equal(tfs_bdev_fault_stalled(data), 1);
	assert_int_equal(mapped_on_disk(f->cfg.metadata, id), 1);

	tfs_bdev_fault_set(data, TFS_FAULT_FLUSH, TFS_FAULT_OK, 0, false);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(fl.r, 0);
	assert_int_equal(mapped_on_disk(f->cfg.metadata, id), 2);
	tfs_dev_close(vol);
	done(f, false);
}

/*
 * A commit's data flush runs after its in-memory part: when it fails, the
 * commit fails as a failed metadata write does (read_only, needs_check,
 * the transaction aborted), and the state on disk is the one before it.
 */
static void test_a_failed_data_flush_fails_the_commit(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	uint8_t buf[2 * BS];
	struct tfs_dev *vol;

	(void)state;
	f->cfg.commit_interval_ms = 3600 * 1000;
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x41, sizeof(buf));
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, BS), 0); /* not committed */

	tfs_log_set_sink(quiet_sink, NULL);
	tfs_bdev_fault_set(tfs_pool_bdev(f->pool, true), TFS_FAULT_FLUSH, TFS_FAULT_EIO, 0, true);
	assert_int_equal(tfs_dev_flush(vol), -EIO);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "read_only");
	assert_true(st.needs_check);
	assert_non_null(strstr(st.reason, "flushing the data device for a commit"));
	assert_int_equal(tfs_dev_read(vol, buf, 2 * BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x41));
	assert_true(all_bytes(buf + BS, BS, 0));
	tfs_dev_close(vol);
	close_pool(f);
	tfs_log_set_sink(NULL, NULL);

	assert_int_equal(tfs_pool_open(&f->cfg, true, &f->pool), 0);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(mapped_blocks(vol), 1);
	tfs_dev_close(vol);
	done(f, true);
}

/*
 * Data flushes fail from the k-th on, k = 0, 1, ..., so the first commit
 * after those fails in its data flush, while writers allocate, write and
 * discard all the time (commits every 20 ms, so with
 * blocks in flight at most of them): the pool goes read_only, and the
 * committed state on disk is consistent (no leaked block, exact counts).
 */
static void test_data_flush_failure_sweep_leaves_a_consistent_commit(void **state)
{
	(void)state;
	for (unsigned k = 0; k < 6; k++) {
		struct fixture *f = new_fixture((CRASH_WRITERS + 1) * 32 + 64, false);
		struct crash_writer w[CRASH_WRITERS];
		struct crash_shared sh = { 0 };
		pthread_t th[CRASH_WRITERS];
		struct tfs_dev *vol;

		f->cfg.commit_interval_ms = 20;
		open_pool(f);
		vol = new_volume(f, NULL);
		tfs_log_set_sink(quiet_sink, NULL);
		atomic_store(&sh.go, 1);
		for (int i = 0; i < CRASH_WRITERS; i++) {
			w[i] = (struct crash_writer){ .vol = vol, .idx = i + 1, .sh = &sh };
			assert_int_equal(pthread_create(&th[i], NULL, crash_write, &w[i]), 0);
		}
		/* Not once: a timer flush of overwrites alone may fail first (mode unchanged). */
		tfs_bdev_fault_set(tfs_pool_bdev(f->pool, true), TFS_FAULT_FLUSH, TFS_FAULT_EIO, k,
				   false);
		for (int ms = 0; ms < 60000 && !strcmp(mode_of(f), "write"); ms++)
			sleep_ms(1);
		assert_string_equal(mode_of(f), "read_only");
		tfs_bdev_fault_set(tfs_pool_bdev(f->pool, true), TFS_FAULT_FLUSH, TFS_FAULT_OK, 0,
				   false);
		atomic_store(&sh.go, 0);
		for (int i = 0; i < CRASH_WRITERS; i++)
			assert_int_equal(pthread_join(th[i], NULL), 0);
		tfs_dev_close(vol);
		close_pool(f);
		tfs_log_set_sink(NULL, NULL);
		done(f, true);
	}
}

/* Overwrites in place change no metadata, yet the timer flushes them too. */
static void test_timer_flushes_overwrites_in_place(void **state)
{
	struct fixture *f = new_fixture(16, false);
	struct tfs_pool_status before, after;
	uint8_t buf[BS];
	struct tfs_dev *vol;

	(void)state;
	f->cfg.allow_faults = true;
	open_pool(f);
	vol = new_volume(f, NULL);
	memset(buf, 0x10, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_pool_status(f->pool, &before);
	memset(buf, 0x20, BS);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	sleep_ms(400);
	tfs_pool_status(f->pool, &after);
	assert_int_equal(after.io_meta.writes, before.io_meta.writes); /* no commit needed */
	assert_true(after.io_data.flushes > before.io_data.flushes);

	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_bdev_fault_power_cut(tfs_pool_bdev(f->pool, true), false, 1), 0);
	assert_int_equal(tfs_bdev_fault_power_cut(tfs_pool_bdev(f->pool, false), false, 1), 0);
	tfs_dev_close(vol);
	tfs_pool_close(f->pool);
	f->pool = NULL;
	tfs_log_set_sink(NULL, NULL);
	f->cfg.allow_faults = false;
	open_pool(f);
	assert_int_equal(tfs_thin_open(f->pool, 0, TFS_DEV_READ_ONLY, &vol), 0);
	assert_int_equal(tfs_dev_read(vol, buf, BS, 0), 0);
	assert_true(all_bytes(buf, BS, 0x20));
	tfs_dev_close(vol);
	done(f, false);
}

static bool same_counts(const struct tfs_pool_status *a, const struct tfs_pool_status *b)
{
	return !memcmp(&a->io_meta, &b->io_meta, sizeof(a->io_meta)) &&
	       !memcmp(&a->io_data, &b->io_data, sizeof(a->io_data));
}

static void test_idle_pool_does_no_io(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status before, after;
	uint8_t buf[BS] = { 9 };
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 0), 0);
	sleep_ms(300); /* the timer commits the write */
	tfs_pool_status(f->pool, &before);
	assert_true(before.io_meta.writes > 0);
	sleep_ms(2000); /* 20 commit intervals */
	tfs_pool_status(f->pool, &after);
	assert_true(same_counts(&before, &after));
	/* Status and a flush of an unchanged pool write no metadata either. */
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_pool_status(f->pool, &after);
	assert_int_equal(after.io_meta.writes, before.io_meta.writes);
	tfs_dev_close(vol);
	done(f, false);
}

/* ---- changed-block diffs --------------------------------------------------------- */

struct runs {
	uint64_t v[16][3]; /* vblock, len, zero */
	unsigned nr;
};

static int note_run(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct runs *r = ctx;

	if (r->nr == 16)
		return -E2BIG;
	r->v[r->nr][0] = vblock;
	r->v[r->nr][1] = len;
	r->v[r->nr++][2] = zero;
	return 0;
}

static void test_diff_of_a_snapshot_and_an_idle_pool_stays_idle(void **state)
{
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_diff_stats st;
	struct tfs_pool_status before, after;
	uint8_t buf[BS] = { 7 };
	struct runs r = { 0 };
	uint32_t id, snap;
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	for (unsigned b = 0; b < 6; b++)
		assert_int_equal(tfs_dev_write(vol, buf, BS, b * BS), 0);
	assert_int_equal(tfs_pool_create_snaps(f->pool, &id, 1, &snap), 0);
	assert_int_equal(tfs_dev_write(vol, buf, BS, 2 * BS), 0);
	assert_int_equal(tfs_dev_discard(vol, 4 * BS, BS), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	sleep_ms(300);
	tfs_pool_status(f->pool, &before);
	assert_int_equal(tfs_pool_diff(f->pool, &snap, &id, note_run, NULL, &r, &st), 0);
	assert_true(st.held);
	assert_int_equal(r.nr, 2);
	assert_int_equal(r.v[0][0], 2);
	assert_int_equal(r.v[0][2], false);
	assert_int_equal(r.v[1][0], 4);
	assert_int_equal(r.v[1][2], true);
	/* Hold and drop with no commit between change nothing: nothing to write. */
	sleep_ms(500);
	tfs_pool_status(f->pool, &after);
	assert_int_equal(after.io_meta.writes, before.io_meta.writes);
	assert_int_equal(after.held_root, 0);
	/* A user's metadata snapshot takes the slot the diff needs. */
	assert_int_equal(tfs_pool_reserve_metadata_snap(f->pool), 0);
	assert_int_equal(tfs_pool_diff(f->pool, NULL, &id, note_run, NULL, &r, &st), -EBUSY);
	assert_int_equal(tfs_pool_release_metadata_snap(f->pool), 0);
	assert_int_equal(tfs_pool_diff(f->pool, NULL, &(uint32_t){ 99 }, note_run, NULL, &r, &st),
			 -ENODATA);
	tfs_dev_close(vol);
	done(f, false);
}

/* A crash during a diff whose hold a commit wrote: the next open drops it, a user's stays. */
static void test_open_drops_a_hold_a_diff_left_behind(void **state)
{
	struct tfs_pmd_options opt = { .data_block_sectors = BS >> 9 };
	struct fixture *f = new_fixture(64, false);
	struct tfs_pool_status st;
	struct tfs_bdev *meta;
	struct tfs_pmd *pmd;

	(void)state;
	assert_int_equal(tfs_bdev_open(f->cfg.metadata, false, &meta), 0);
	assert_int_equal(tfs_pmd_open(meta, &opt, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 0), 0);
	assert_int_equal(tfs_pmd_hold_roots(pmd), 0);
	assert_true(tfs_pmd_held_for_diff(pmd));
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(meta);
	check_metadata(f->cfg.metadata, false);

	open_pool(f);
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.held_root, 0);
	assert_int_equal(tfs_pool_reserve_metadata_snap(f->pool), 0);
	close_pool(f);
	open_pool(f);
	tfs_pool_status(f->pool, &st);
	assert_true(st.held_root != 0);
	assert_int_equal(tfs_pool_release_metadata_snap(f->pool), 0);
	done(f, false);
}

static void test_status_reports_space_and_counters(void **state)
{
	struct fixture *f = new_fixture(100, false);
	struct tfs_pool_status st;
	uint8_t buf[3 * BS] = { 0 };
	struct tfs_dev *vol;

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	assert_int_equal(tfs_dev_write(vol, buf, sizeof(buf), 0), 0);
	assert_int_equal(tfs_dev_flush(vol), 0);
	tfs_pool_status(f->pool, &st);
	assert_string_equal(st.mode, "write");
	assert_false(st.needs_check);
	assert_int_equal(st.data_block_size, BS);
	assert_int_equal(st.data_total, 100);
	assert_int_equal(st.data_used, 3);
	assert_int_equal(st.low_water_blocks, 10);
	assert_int_equal(st.meta_total, 8 * MiB / 4096);
	assert_true(st.meta_used > 0);
	assert_int_equal(st.held_root, 0);
	assert_true(st.io_data.writes >= 1);
	assert_true(st.io_data.flushes >= 1);
	assert_int_equal(tfs_pool_reserve_metadata_snap(f->pool), 0);
	tfs_pool_status(f->pool, &st);
	assert_int_not_equal(st.held_root, 0);
	assert_int_equal(tfs_pool_release_metadata_snap(f->pool), 0);
	assert_int_equal(tfs_pool_set_transaction_id(f->pool, 0, 5), 0);
	tfs_pool_status(f->pool, &st);
	assert_int_equal(st.transaction_id, 5);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_set_transaction_id(f->pool, 0, 6), -EINVAL);
	tfs_log_set_sink(NULL, NULL);
	tfs_dev_close(vol);
	done(f, false);
}

/* ---- many threads ---------------------------------------------------------------------------- */

#define T_THREADS 4
#define T_REGION (16 * BS) /* each thread's own range */
#define T_SHARED_BLOCKS 16 /* then a range all threads write whole blocks into */

struct worker {
	struct tfs_dev *vol;
	int idx;
	uint32_t seed;
	uint8_t *model; /* of its own region */
};

static uint32_t wrnd(struct worker *w)
{
	w->seed ^= w->seed << 13;
	w->seed ^= w->seed >> 17;
	w->seed ^= w->seed << 5;
	return w->seed;
}

/* A shared block is always written whole, stamped with its writer and a sequence number. */
static void stamp(uint8_t *blk, int idx, uint32_t seq)
{
	for (size_t i = 0; i < BS; i += 8) {
		memcpy(blk + i, &idx, 4);
		memcpy(blk + i + 4, &seq, 4);
	}
}

static bool stamped_whole(const uint8_t *blk)
{
	for (size_t i = 8; i < BS; i += 8)
		if (memcmp(blk + i, blk, 8))
			return false;
	return true;
}

static void *work(void *arg)
{
	struct worker *w = arg;
	uint64_t base = (uint64_t)w->idx * T_REGION;
	uint64_t shared = (uint64_t)T_THREADS * T_REGION;
	uint8_t *buf = zalloc(4 * BS);

	for (uint32_t it = 1; it <= 400; it++) {
		uint32_t r = wrnd(w);
		uint64_t off = r % T_REGION;
		size_t len = 1 + wrnd(w) % (2 * BS);

		if (off + len > T_REGION)
			len = T_REGION - off;
		switch (r % 5) {
		case 0: case 1:
			for (size_t i = 0; i < len; i++)
				buf[i] = (uint8_t)(it + i);
			assert_int_equal(tfs_dev_write(w->vol, buf, len, base + off), 0);
			memcpy(w->model + off, buf, len);
			break;
		case 2:
			assert_int_equal(tfs_dev_read(w->vol, buf, len, base + off), 0);
			assert_memory_equal(buf, w->model + off, len);
			break;
		case 3: {
			uint64_t b = wrnd(w) % (T_SHARED_BLOCKS - 1);
			unsigned n = 1 + wrnd(w) % 2;

			for (unsigned i = 0; i < n; i++)
				stamp(buf + i * BS, w->idx, it);
			assert_int_equal(tfs_dev_write(w->vol, buf, n * BS, shared + b * BS), 0);
			break;
		}
		default: {
			uint64_t b = wrnd(w) % (T_SHARED_BLOCKS - 3);

			assert_int_equal(tfs_dev_read(w->vol, buf, 3 * BS, shared + b * BS), 0);
			for (int i = 0; i < 3; i++)
				assert_true(stamped_whole(buf + i * BS));
			break;
		}
		}
	}
	free(buf);
	return NULL;
}

static void test_threads_on_disjoint_and_overlapping_ranges_match_the_model(void **state)
{
	struct fixture *f = new_fixture(T_THREADS * 16 + T_SHARED_BLOCKS + 8, false);
	struct worker w[T_THREADS];
	pthread_t th[T_THREADS];
	struct tfs_dev *vol;
	uint8_t *buf = zalloc(T_REGION);

	(void)state;
	open_pool(f);
	vol = new_volume(f, NULL);
	for (int i = 0; i < T_THREADS; i++) {
		w[i] = (struct worker){ .vol = vol, .idx = i, .seed = 77u + (uint32_t)i * 1000,
					.model = zalloc(T_REGION) };
		assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
	}
	for (int i = 0; i < T_THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < T_THREADS; i++) {
		assert_int_equal(tfs_dev_read(vol, buf, T_REGION, (uint64_t)i * T_REGION), 0);
		assert_memory_equal(buf, w[i].model, T_REGION);
		free(w[i].model);
	}
	tfs_dev_close(vol);
	free(buf);
	done(f, false);
}

static void test_handles_on_one_device_share_it(void **state)
{
	struct fixture *f = new_fixture(16, false);
	struct tfs_dev *a, *b;
	uint8_t buf[100];
	uint32_t id;

	(void)state;
	open_pool(f);
	a = new_volume(f, &id);
	assert_int_equal(tfs_thin_open(f->pool, id, 0, &b), 0);
	memset(buf, 0x3c, sizeof(buf));
	assert_int_equal(tfs_dev_write(a, buf, sizeof(buf), 5), 0);
	memset(buf, 0, sizeof(buf));
	assert_int_equal(tfs_dev_read(b, buf, sizeof(buf), 5), 0);
	assert_true(all_bytes(buf, sizeof(buf), 0x3c));
	tfs_dev_close(a);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_pool_delete(f->pool, id), -EBUSY);
	tfs_log_set_sink(NULL, NULL);
	assert_int_equal(mapped_blocks(b), 1);
	tfs_dev_close(b);
	assert_int_equal(tfs_pool_delete(f->pool, id), 0);
	assert_int_equal(tfs_thin_open(f->pool, id, 0, &a), -ENODATA);
	done(f, false);
}

static void test_thin_status_handle_reports_and_does_no_io(void **state)
{
	struct fixture *f = new_fixture(16, false);
	struct record_sink rec;
	struct tfs_dev *vol, *st;
	uint8_t buf[100] = { 0 };
	uint64_t bytes;
	uint32_t id;

	(void)state;
	open_pool(f);
	vol = new_volume(f, &id);
	assert_string_equal(tfs_dev_kind(vol), "thin");
	assert_int_equal(tfs_dev_write(vol, buf, sizeof(buf), 2 * BS - 50), 0); /* 2 blocks */
	assert_int_equal(tfs_dev_get_size(vol, &bytes), -ENOTSUP);
	assert_int_equal(tfs_thin_open(f->pool, id, TFS_DEV_STATUS_ONLY, &st), 0);
	assert_string_equal(tfs_dev_kind(st), "thin");
	record_sink_init(&rec);
	tfs_dev_status(st, &rec.sink);
	assert_string_equal(record_sink_line(&rec),
			    "mapped_blocks=2 exclusive_blocks=2 suspended=false held_in_core=0 ");
	assert_int_equal(tfs_dev_allocated(st, &bytes), 0);
	assert_int_equal(bytes, 2 * BS);
	assert_int_equal(tfs_dev_read(st, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(tfs_dev_write(st, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(tfs_dev_flush(st), -EBADF);
	assert_int_equal(tfs_dev_seek(st, 0, SEEK_DATA, BS, &bytes), -EBADF);
	/* Only the I/O handle keeps the device from being deleted. */
	tfs_dev_close(vol);
	assert_int_equal(tfs_pool_delete(f->pool, id), 0);
	assert_int_equal(tfs_dev_allocated(st, &bytes), -ENODATA);
	tfs_dev_close(st);
	done(f, false);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_unmapped_ranges_read_as_zeros),
		cmocka_unit_test(test_bulk_read_reads_what_reads_read),
		cmocka_unit_test(test_writes_at_odd_offsets_read_back_as_the_model),
		cmocka_unit_test(test_partial_write_zeroes_the_rest_of_a_new_block),
		cmocka_unit_test(test_skip_block_zeroing_leaves_the_rest_unwritten),
		cmocka_unit_test(test_snapshot_keeps_content_and_accounting_is_exact),
		cmocka_unit_test(test_write_to_untouched_leaf_after_snapshot_copies),
		cmocka_unit_test(test_group_snapshot_is_atomic_and_usage_counts_exclusive_blocks),
		cmocka_unit_test(test_snapshots_with_chosen_ids_and_deleting_several_at_once),
		cmocka_unit_test(test_snapshot_during_writes_sees_whole_requests),
		cmocka_unit_test(test_discard_frees_whole_blocks_and_zeroes_partial_ones),
		cmocka_unit_test(test_discard_of_shared_blocks_keeps_the_snapshot),
		cmocka_unit_test(test_provision_maps_zeroed_blocks_and_zero_range_unmaps),
		cmocka_unit_test(test_clone_range_shares_whole_blocks_and_writes_break_it),
		cmocka_unit_test(test_detect_zeroes_unmaps_whole_blocks_of_zeros),
		cmocka_unit_test(test_truncate_unmaps_past_the_end_and_zeroes_the_tail),
		cmocka_unit_test(test_seek_data_and_hole_follow_the_mapping),
		cmocka_unit_test(test_full_data_device_gives_enospc_and_freed_blocks_come_back),
		cmocka_unit_test(test_held_write_times_out_then_resize_brings_space_back),
		cmocka_unit_test(test_data_shrinks_down_to_the_highest_used_block),
		cmocka_unit_test(test_metadata_write_error_makes_the_pool_read_only),
		cmocka_unit_test(test_metadata_space_exhaustion_gives_enospc_then_read_only),
		cmocka_unit_test(test_a_change_failing_during_a_commit_io_is_aborted_after_it),
		cmocka_unit_test(test_needs_check_write_failure_means_fail_mode),
		cmocka_unit_test(test_abort_failure_means_fail_mode),
		cmocka_unit_test(test_diff_of_a_snapshot_and_an_idle_pool_stays_idle),
		cmocka_unit_test(test_open_drops_a_hold_a_diff_left_behind),
		cmocka_unit_test(test_flush_then_reopen_keeps_data),
		cmocka_unit_test(test_crash_keeps_flushed_data_and_a_consistent_commit),
		cmocka_unit_test(test_power_cut_drops_only_unflushed_writes),
		cmocka_unit_test(test_a_commit_neither_waits_for_nor_counts_an_allocation_in_flight),
		cmocka_unit_test(test_the_superblock_waits_for_the_data_flush),
		cmocka_unit_test(test_a_failed_data_flush_fails_the_commit),
		cmocka_unit_test(test_data_flush_failure_sweep_leaves_a_consistent_commit),
		cmocka_unit_test(test_timer_flushes_overwrites_in_place),
		cmocka_unit_test(test_idle_pool_does_no_io),
		cmocka_unit_test(test_status_reports_space_and_counters),
		cmocka_unit_test(test_threads_on_disjoint_and_overlapping_ranges_match_the_model),
		cmocka_unit_test(test_handles_on_one_device_share_it),
		cmocka_unit_test(test_thin_status_handle_reports_and_does_no_io),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
