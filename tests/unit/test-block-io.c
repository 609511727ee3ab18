/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Backing devices, the fault wrapper and the block manager, each alone. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "block-manager.h"
#include "crc32c.h"
#include "format.h"
#include "log.h"
#include "scratch.h"

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

static void test_crc32c_matches_known_values(void **state)
{
	(void)state;
	/* Standard CRC-32C check value: init ~0, final xor ~0. */
	assert_int_equal(tfs_crc32c(0xFFFFFFFFu, "123456789", 9) ^ 0xFFFFFFFFu, 0xE3069283u);
	uint8_t blk[TFS_BLOCK_SIZE] = { 0 };
	/* Software and hardware paths must agree: checksum of an all-zero block is fixed. */
	uint32_t a = tfs_block_csum(blk, 0);
	blk[100] = 1;
	assert_int_not_equal(a, tfs_block_csum(blk, 0));
	assert_int_equal(tfs_block_csum(blk, TFS_SALT_BTREE) ^ tfs_block_csum(blk, 0), TFS_SALT_BTREE);
}

static void test_file_bdev_reads_zeros_past_end_and_grows(void **state)
{
	(void)state;
	char path[] = "/tmp/tfs-bdev-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	close(fd);
	struct tfs_bdev *d;
	assert_int_equal(tfs_bdev_open(path, false, &d), 0);
	uint8_t buf[8192];
	memset(buf, 0xAB, sizeof(buf));
	assert_int_equal(tfs_bdev_read(d, buf, sizeof(buf), 4096), 0);
	for (size_t i = 0; i < sizeof(buf); i++)
		assert_int_equal(buf[i], 0);
	memset(buf, 0x5A, 4096);
	assert_int_equal(tfs_bdev_write(d, buf, 4096, 8192), 0);
	uint64_t size;
	assert_int_equal(tfs_bdev_size(d, &size), 0);
	assert_int_equal(size, 12288);
	assert_int_equal(tfs_bdev_grow(d, 1 << 20), 0);
	assert_int_equal(tfs_bdev_size(d, &size), 0);
	assert_int_equal(size, 1 << 20);
	assert_int_equal(tfs_bdev_discard(d, 8192, 4096), 0);
	assert_int_equal(tfs_bdev_read(d, buf, 4096, 8192), 0);
	assert_int_equal(buf[17], 0);
	assert_int_equal(tfs_bdev_flush(d), 0);
	tfs_bdev_close(d);
	unlink(path);
}

static void test_open_refuses_a_directory(void **state)
{
	(void)state;
	struct tfs_bdev *d;
	assert_true(tfs_bdev_open("/tmp", false, &d) < 0);
	assert_int_equal(tfs_bdev_open("/dev/null", true, &d), -EINVAL);
	assert_true(tfs_bdev_open("/nonexistent/x", false, &d) < 0);
}

static void test_fault_fails_nth_write_then_recovers(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t buf[512] = { 1 };
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_EIO, 2, false);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 0), 0);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 512), 0);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 1024), -EIO);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 1024), -EIO);
	assert_int_equal(tfs_bdev_read(f, buf, 512, 0), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_ENOSPC, 0, true);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 0), -ENOSPC);
	assert_int_equal(tfs_bdev_write(f, buf, 512, 0), 0); /* once */
	tfs_bdev_fault_set(f, TFS_FAULT_FLUSH, TFS_FAULT_EIO, 0, false);
	assert_int_equal(tfs_bdev_flush(f), -EIO);
	tfs_bdev_fault_set(f, TFS_FAULT_FLUSH, TFS_FAULT_OK, 0, false);
	assert_int_equal(tfs_bdev_flush(f), 0);
	struct tfs_bdev_io_counts c;
	tfs_bdev_fault_counts(f, &c);
	assert_int_equal(c.writes, 6);
	assert_int_equal(c.reads, 1);
	assert_int_equal(c.flushes, 2);
	tfs_bdev_close(f);
}

static void test_power_cut_drops_unflushed_writes(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t a[4096], b[4096], got[4096];
	memset(a, 0xAA, sizeof(a));
	memset(b, 0xBB, sizeof(b));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, true, &f), 0);
	assert_int_equal(tfs_bdev_write(f, a, 4096, 0), 0);
	assert_int_equal(tfs_bdev_flush(f), 0);
	assert_int_equal(tfs_bdev_write(f, b, 4096, 0), 0);
	/* Reads see the volatile cache... */
	assert_int_equal(tfs_bdev_read(f, got, 4096, 0), 0);
	assert_memory_equal(got, b, 4096);
	assert_int_equal(tfs_bdev_fault_power_cut(f, false, 1), 0);
	/* ...and everything fails afterwards. */
	assert_int_equal(tfs_bdev_read(f, got, 4096, 0), -EIO);
	/* The lower device has only what was flushed. */
	assert_int_equal(tfs_bdev_read(mem, got, 4096, 0), 0);
	assert_memory_equal(got, a, 4096);
	tfs_bdev_close(f);
}

static void test_power_cut_tear_keeps_whole_sectors(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t b[4096], got[4096];
	memset(b, 0xBB, sizeof(b));
	for (uint32_t seed = 1; seed < 20; seed++) {
		assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
		assert_int_equal(tfs_bdev_fault_wrap(mem, true, &f), 0);
		assert_int_equal(tfs_bdev_write(f, b, 4096, 0), 0);
		assert_int_equal(tfs_bdev_fault_power_cut(f, true, seed), 0);
		assert_int_equal(tfs_bdev_read(mem, got, 4096, 0), 0);
		size_t i = 0;
		while (i < 4096 && got[i] == 0xBB)
			i++;
		assert_int_equal(i % 512, 0);
		for (; i < 4096; i++)
			assert_int_equal(got[i], 0);
		tfs_bdev_close(f);
	}
}

/* A file in /tmp opened direct; the file system may refuse O_DIRECT, and then d->direct is false. */
static struct tfs_bdev *open_direct_tmp(char *path)
{
	struct tfs_bdev *d;
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	close(fd);
	assert_int_equal(tfs_bdev_open_direct(path, false, true, &d), 0);
	return d;
}

static uint64_t bytes_read(struct tfs_bdev *d)
{
	return atomic_load(&d->read_bytes);
}

static uint64_t bytes_written(struct tfs_bdev *d)
{
	return atomic_load(&d->write_bytes);
}

/*
 * Under O_DIRECT every offset, length and buffer still works: writes and
 * reads at random odd places, from and to odd addresses, some larger than
 * the bounce buffer, agree with a model, and so does the file read back
 * through the page cache.
 */
static void test_direct_file_bdev_takes_any_offset_length_and_buffer(void **state)
{
	(void)state;
	enum { SIZE = 3 << 20, MAXLEN = (3 << 19) + 77 };
	char path[] = "/tmp/tfs-bdev-XXXXXX";
	struct tfs_bdev *d = open_direct_tmp(path), *plain;
	uint8_t *model = calloc(1, SIZE), *buf = malloc(MAXLEN + 1), *got = malloc(SIZE + 1);
	unsigned seed = 7;

	assert_non_null(model);
	assert_non_null(buf);
	assert_non_null(got);
	for (int i = 0; i < 200; i++) {
		size_t len = (size_t)rand_r(&seed) % (i % 10 ? 9000 : MAXLEN) + 1;
		uint64_t off = (uint64_t)rand_r(&seed) % (SIZE - len);
		unsigned skew = (unsigned)rand_r(&seed) % 2; /* an odd buffer half of the time */
		/*
		 * Staging reuses this thread's scratch buffers across sizes; the
		 * layers above may hold some (a reply, a block being built).
		 */
		size_t held_len = (size_t)rand_r(&seed) % MAXLEN + 1;
		uint8_t *held[2] = { NULL, NULL };

		for (int h = 0; h < i % 3; h++) {
			held[h] = tfs_scratch_get(held_len);
			assert_non_null(held[h]);
			memset(held[h], 0xC0 + h, held_len);
		}
		if (rand_r(&seed) % 2) {
			for (size_t k = 0; k < len; k++)
				buf[skew + k] = (uint8_t)rand_r(&seed);
			assert_int_equal(tfs_bdev_write(d, buf + skew, len, off), 0);
			memcpy(model + off, buf + skew, len);
		} else {
			assert_int_equal(tfs_bdev_read(d, got + skew, len, off), 0);
			assert_memory_equal(got + skew, model + off, len);
		}
		for (int h = 0; h < i % 3; h++) {
			for (size_t k = 0; k < held_len; k++)
				assert_int_equal(held[h][k], 0xC0 + h);
			tfs_scratch_put(held[h], held_len);
		}
	}
	assert_true(tfs_scratch_kept() <= TFS_SCRATCH_SLOTS * ((size_t)MAXLEN + 2 * 4096));
	assert_int_equal(tfs_bdev_flush(d), 0);
	assert_int_equal(tfs_bdev_open(path, true, &plain), 0);
	assert_int_equal(tfs_bdev_read(plain, got, SIZE, 0), 0);
	assert_memory_equal(got, model, SIZE);
	tfs_bdev_close(plain);
	tfs_bdev_close(d);
	unlink(path);
	free(model);
	free(buf);
	free(got);
}

/*
 * Scratch buffers: page-aligned, distinct while nested (a third nested one
 * is a buffer of its own), reused at any smaller size, grown to a larger
 * one, and at most TFS_SCRATCH_SLOTS of them kept by a thread.
 */
/*
 * A batch of reads (more than the AIO depth, aligned and not, in a
 * shuffled order, one past the end) reads what single reads read, on a
 * direct file, through an unarmed and an armed fault wrapper, and on
 * memory; an armed read rule fails the batch.
 */
static void test_read_batch_reads_what_single_reads_read(void **state)
{
	(void)state;
	char path[] = "/tmp/tfs-batch-XXXXXX";
	struct tfs_bdev *d = open_direct_tmp(path), *mem, *w;
	const unsigned nr = 3 * TFS_BDEV_BATCH_DEPTH + 5;
	const size_t piece = 8192, size = (size_t)nr * piece;
	struct tfs_bdev_req reqs[3 * TFS_BDEV_BATCH_DEPTH + 5];
	uint8_t *src = malloc(size), *dst, *want;
	struct tfs_bdev_io_counts c;

	assert_non_null(src);
	assert_int_equal(posix_memalign((void **)&dst, 4096, size + 8192), 0);
	want = malloc(size + 8192);
	assert_non_null(want);
	for (size_t i = 0; i < size; i++)
		src[i] = (uint8_t)(i * 31 + i / 4096);
	assert_int_equal(tfs_bdev_open_mem(size, &mem), 0);
	assert_int_equal(tfs_bdev_write(d, src, size, 0), 0);
	assert_int_equal(tfs_bdev_write(mem, src, size, 0), 0);
	for (unsigned i = 0; i < nr; i++) {
		/* Request i reads piece p(i) into slot i; every seventh is unaligned. */
		unsigned p = (i * 37) % nr;
		size_t skew = i % 7 == 3 ? 1 : 0;

		reqs[i] = (struct tfs_bdev_req){ .buf = dst + (size_t)i * piece + skew,
						 .len = piece - 2 * skew,
						 .off = (uint64_t)p * piece + skew };
	}
	/* The last one runs past the end: zeros there. */
	reqs[nr - 1].off = size - piece / 2;
	for (int round = 0; round < 3; round++) {
		struct tfs_bdev *dev = round == 0 ? d : mem;

		if (round == 2) {
			assert_int_equal(tfs_bdev_fault_wrap(d, false, &w), 0);
			dev = d = w;
		}
		memset(dst, 0xee, size + 8192);
		assert_int_equal(tfs_bdev_read_batch(dev, reqs, nr), 0);
		for (unsigned i = 0; i < nr; i++) {
			memset(want, 0, reqs[i].len);
			if (reqs[i].off < size)
				memcpy(want, src + reqs[i].off,
				       reqs[i].off + reqs[i].len <= size ? reqs[i].len :
				       size - reqs[i].off);
			assert_memory_equal(reqs[i].buf, want, reqs[i].len);
		}
	}
	tfs_bdev_fault_counts(w, &c);
	assert_int_equal(c.reads, nr);
	tfs_bdev_fault_set(w, TFS_FAULT_READ, TFS_FAULT_EIO, 10, false);
	assert_int_equal(tfs_bdev_read_batch(w, reqs, nr), -EIO);
	tfs_bdev_close(w);
	tfs_bdev_close(mem);
	unlink(path);
	free(src);
	free(dst);
	free(want);
}

/*
 * Reads larger than a batch's byte bound (tfs_bdev_read_batch_bounded) go
 * one at a time, smaller ones several at once, mixed in one batch on a
 * direct file, bare and through an unarmed fault wrapper: every one reads
 * what a single read reads, and the device counts every byte once.
 */
static void test_read_batch_bounds_bytes_in_flight(void **state)
{
	(void)state;
	enum { NR = 24 };
	const size_t bound = 2u << 20;
	const size_t lens[] = { bound + 4096, 65536, bound / 2, bound / 2 + 8192, 4096, 2 * bound };
	char path[] = "/tmp/tfs-batchbytes-XXXXXX";
	struct tfs_bdev *d = open_direct_tmp(path), *w = NULL;
	struct tfs_bdev_req reqs[NR];
	size_t size = 0, at = 0;
	uint8_t *src, *dst;
	uint64_t before;

	for (unsigned i = 0; i < NR; i++)
		size += lens[i % 6];
	src = malloc(size);
	assert_non_null(src);
	assert_int_equal(posix_memalign((void **)&dst, 4096, size), 0);
	for (size_t i = 0; i < size; i++)
		src[i] = (uint8_t)(i * 13 + i / 65536);
	assert_int_equal(tfs_bdev_write(d, src, size, 0), 0);
	/* Request i reads the file's i-th piece from the end into the i-th slot of dst. */
	for (unsigned i = 0; i < NR; i++) {
		size_t len = lens[i % 6];

		reqs[i] = (struct tfs_bdev_req){ .buf = dst + at, .len = len,
						 .off = (uint64_t)(size - at - len) };
		at += len;
	}
	for (int round = 0; round < 2; round++) {
		if (round == 1)
			assert_int_equal(tfs_bdev_fault_wrap(d, false, &w), 0);
		memset(dst, 0xee, size);
		before = bytes_read(d);
		assert_int_equal(tfs_bdev_read_batch_bounded(round ? w : d, reqs, NR, bound), 0);
		for (unsigned i = 0; i < NR; i++)
			assert_memory_equal(reqs[i].buf, src + reqs[i].off, reqs[i].len);
		assert_int_equal(bytes_read(d) - before, size);
	}
	tfs_bdev_close(w);
	unlink(path);
	free(src);
	free(dst);
}

static void test_scratch_nests_reuses_and_stays_bounded(void **state)
{
	(void)state;
	uint8_t *a, *b, *c, *again;

	a = tfs_scratch_get(1 << 20);
	b = tfs_scratch_get(5000);
	c = tfs_scratch_get(100);
	assert_non_null(a);
	assert_non_null(b);
	assert_non_null(c);
	assert_int_equal((uintptr_t)a % 4096, 0);
	assert_int_equal((uintptr_t)b % 4096, 0);
	assert_int_equal((uintptr_t)c % 4096, 0);
	memset(a, 1, 1 << 20);
	memset(b, 2, 5000);
	memset(c, 3, 100);
	assert_int_equal(a[(1 << 20) - 1], 1);
	assert_int_equal(b[0], 2);
	assert_int_equal(b[4999], 2);
	tfs_scratch_put(c, 100);
	tfs_scratch_put(b, 5000);
	tfs_scratch_put(a, 1 << 20);
	/* Two kept (other tests on this thread may have grown them), c unmapped. */
	assert_true(tfs_scratch_kept() >= (1 << 20) + 4096);
	assert_true(tfs_scratch_kept() <= TFS_SCRATCH_SLOTS * TFS_SCRATCH_MAX);
	assert_int_equal(msync(c, 100, MS_ASYNC), -1);

	again = tfs_scratch_get(4096); /* fits in a kept one */
	assert_true(again == a || again == b);
	assert_true(again != c);
	tfs_scratch_put(again, 4096);
	again = tfs_scratch_get((1 << 20) + 1); /* larger: a kept one grows */
	assert_non_null(again);
	memset(again, 4, (1 << 20) + 1);
	tfs_scratch_put(again, (1 << 20) + 1);
	assert_true(tfs_scratch_kept() >= (1 << 20) + 4096 + 4096);

	again = tfs_scratch_get(TFS_SCRATCH_MAX + 1); /* too large to keep */
	assert_non_null(again);
	memset(again, 5, TFS_SCRATCH_MAX + 1);
	tfs_scratch_put(again, TFS_SCRATCH_MAX + 1);
	assert_true(tfs_scratch_kept() <= TFS_SCRATCH_SLOTS * TFS_SCRATCH_MAX);
}

struct scratch_thread {
	void *buf;
	size_t kept;
};

static void *scratch_thread_main(void *arg)
{
	struct scratch_thread *t = arg;

	t->buf = tfs_scratch_get(1 << 20);
	if (t->buf) {
		memset(t->buf, 6, 1 << 20);
		tfs_scratch_put(t->buf, 1 << 20);
	}
	t->kept = tfs_scratch_kept();
	return NULL;
}

/* A thread's buffers are its own and are unmapped when it ends. */
static void test_scratch_is_unmapped_when_its_thread_ends(void **state)
{
	(void)state;
	struct scratch_thread t = { 0 };
	size_t mine = tfs_scratch_kept();
	pthread_t th;

	assert_int_equal(pthread_create(&th, NULL, scratch_thread_main, &t), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_non_null(t.buf);
	assert_int_equal(t.kept, 1 << 20);
	assert_int_equal(tfs_scratch_kept(), mine);
	/* msync fails with ENOMEM on a range that is not mapped. */
	assert_int_equal(msync(t.buf, 1 << 20, MS_ASYNC), -1);
	assert_int_equal(errno, ENOMEM);
}

/*
 * The byte counters say what the device moved: an aligned read moves just
 * itself; under O_DIRECT an odd one moves whole sectors, and an odd write
 * reads the sectors at its edges and writes them back whole.
 */
static void test_direct_file_bdev_counts_the_bytes_the_device_moves(void **state)
{
	(void)state;
	char path[] = "/tmp/tfs-bdev-XXXXXX";
	struct tfs_bdev *d = open_direct_tmp(path);
	uint8_t *page = aligned_alloc(4096, 16384), odd[100];
	uint64_t r0, w0;

	assert_non_null(page);
	memset(page, 0x11, 16384);
	assert_int_equal(tfs_bdev_write(d, page, 16384, 0), 0);
	assert_int_equal(bytes_written(d), 16384);
	r0 = bytes_read(d);
	assert_int_equal(tfs_bdev_read(d, page, 4096, 4096), 0);
	assert_int_equal(bytes_read(d) - r0, 4096);
	if (d->direct) {
		r0 = bytes_read(d);
		assert_int_equal(tfs_bdev_read(d, odd, 10, 5000), 0);
		assert_int_equal(bytes_read(d) - r0, 4096);
		memset(odd, 0x22, sizeof(odd));
		r0 = bytes_read(d);
		w0 = bytes_written(d);
		assert_int_equal(tfs_bdev_write(d, odd, 100, 4090), 0); /* across a sector edge */
		assert_int_equal(bytes_read(d) - r0, 8192);
		assert_int_equal(bytes_written(d) - w0, 8192);
		assert_int_equal(tfs_bdev_read(d, page, 8192, 0), 0);
		for (size_t k = 0; k < 8192; k++)
			assert_int_equal(page[k], k >= 4090 && k < 4190 ? 0x22 : 0x11);
	}
	/* Past the end of the file: zeros, and nothing moved. */
	r0 = bytes_read(d);
	memset(page, 0xFF, 8192);
	assert_int_equal(tfs_bdev_read(d, page, 8192, 1 << 20), 0);
	for (size_t k = 0; k < 8192; k++)
		assert_int_equal(page[k], 0);
	assert_int_equal(bytes_read(d) - r0, 0);
	tfs_bdev_close(d);
	unlink(path);
	free(page);
}

struct log_record {
	unsigned nr_info;
	char last[512];
};

static void recording_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	struct log_record *rec = ctx;

	if (level == TFS_LOG_INFO)
		rec->nr_info++;
	snprintf(rec->last, sizeof(rec->last), "%s", msg);
}

/*
 * A file system that refuses O_DIRECT (procfs does, with EINVAL, as tmpfs
 * did before Linux 6.6) gets buffered I/O and says so in one info line.
 */
static void test_direct_open_falls_back_where_o_direct_is_refused(void **state)
{
	(void)state;
	struct log_record rec = { 0 };
	struct tfs_bdev *d;
	uint8_t buf[16];

	tfs_log_set_sink(recording_sink, &rec);
	tfs_log_set_level(TFS_LOG_INFO);
	assert_int_equal(tfs_bdev_open_direct("/proc/version", true, true, &d), 0);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_false(d->direct);
	assert_int_equal(rec.nr_info, 1);
	assert_non_null(strstr(rec.last, "/proc/version: O_DIRECT refused"));
	assert_int_equal(tfs_bdev_read(d, buf, 5, 0), 0);
	assert_memory_equal(buf, "Linux", 5);
	tfs_bdev_close(d);
}

/* A torn power cut onto a direct file still lands whole 512-byte sectors, in order. */
static void test_power_cut_tear_onto_a_direct_file(void **state)
{
	(void)state;
	uint8_t a[8192], b[8192], got[8192];
	memset(a, 0xAA, sizeof(a));
	memset(b, 0xBB, sizeof(b));
	for (uint32_t seed = 1; seed < 10; seed++) {
		char path[] = "/tmp/tfs-bdev-XXXXXX";
		struct tfs_bdev *file = open_direct_tmp(path), *f, *plain;

		assert_int_equal(tfs_bdev_fault_wrap(file, true, &f), 0);
		assert_int_equal(tfs_bdev_write(f, a, sizeof(a), 0), 0);
		assert_int_equal(tfs_bdev_flush(f), 0);
		assert_int_equal(tfs_bdev_write(f, b, sizeof(b), 0), 0);
		assert_int_equal(tfs_bdev_fault_power_cut(f, true, seed), 0);
		tfs_bdev_close(f);
		assert_int_equal(tfs_bdev_open(path, true, &plain), 0);
		assert_int_equal(tfs_bdev_read(plain, got, sizeof(got), 0), 0);
		tfs_bdev_close(plain);
		unlink(path);
		size_t i = 0;
		while (i < sizeof(got) && got[i] == 0xBB)
			i++;
		assert_int_equal(i % 512, 0);
		for (; i < sizeof(got); i++)
			assert_int_equal(got[i], 0xAA);
	}
}

/* One op run on its own thread, so that it can stall while the test goes on. */
struct bg_op {
	struct tfs_bdev *dev;
	enum tfs_fault_op op;
	uint8_t *buf;
	size_t len;
	uint64_t off;
	int ret;
	pthread_t thread;
};

static void *bg_op_run(void *arg)
{
	struct bg_op *o = arg;

	switch (o->op) {
	case TFS_FAULT_READ:
		o->ret = tfs_bdev_read(o->dev, o->buf, o->len, o->off);
		break;
	case TFS_FAULT_WRITE:
		o->ret = tfs_bdev_write(o->dev, o->buf, o->len, o->off);
		break;
	default:
		o->ret = tfs_bdev_flush(o->dev);
		break;
	}
	return NULL;
}

static void bg_op_start(struct bg_op *o, struct tfs_bdev *dev, enum tfs_fault_op op,
			uint8_t *buf, size_t len, uint64_t off)
{
	*o = (struct bg_op){ .dev = dev, .op = op, .buf = buf, .len = len, .off = off, .ret = 1 };
	assert_int_equal(pthread_create(&o->thread, NULL, bg_op_run, o), 0);
}

static int bg_op_join(struct bg_op *o)
{
	assert_int_equal(pthread_join(o->thread, NULL), 0);
	return o->ret;
}

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Polls rather than sleeps a fixed time: a slow machine only makes it wait longer. */
static void wait_stalled(struct tfs_bdev *f, unsigned n)
{
	double deadline = now_seconds() + 30;
	const struct timespec ms = { .tv_nsec = 1000000 };

	while (tfs_bdev_fault_stalled(f) < n && now_seconds() < deadline)
		nanosleep(&ms, NULL);
	assert_int_equal(tfs_bdev_fault_stalled(f), n);
}

static void test_fault_stall_holds_a_read_until_set_back_to_ok(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t a[4096], b[4096], got[4096];
	memset(a, 0xAA, sizeof(a));
	memset(b, 0xBB, sizeof(b));
	memset(got, 0, sizeof(got));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	assert_int_equal(tfs_bdev_write(f, a, 4096, 0), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_STALL, 1, false);
	assert_int_equal(tfs_bdev_read(f, got, 4096, 0), 0); /* the one let through */
	memset(got, 0, sizeof(got));
	struct bg_op rd;
	bg_op_start(&rd, f, TFS_FAULT_READ, got, sizeof(got), 0);
	wait_stalled(f, 1);
	/* The stalled read holds nothing a write needs. */
	assert_int_equal(tfs_bdev_write(f, b, 4096, 8192), 0);
	assert_int_equal(tfs_bdev_fault_stalled(f), 1);
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_OK, 0, false);
	assert_int_equal(bg_op_join(&rd), 0);
	assert_memory_equal(got, a, sizeof(a));
	assert_int_equal(tfs_bdev_fault_stalled(f), 0);
	assert_int_equal(tfs_bdev_fault_stalled(mem), 0); /* not a wrapper */
	struct tfs_bdev_io_counts c;
	tfs_bdev_fault_counts(f, &c);
	assert_int_equal(c.reads, 2);
	assert_int_equal(c.writes, 2);
	tfs_bdev_close(f);
}

static void test_fault_delay_waits_then_passes_the_data(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t a[4096], got[4096];
	memset(a, 0xAA, sizeof(a));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	tfs_bdev_fault_set_delay(f, TFS_FAULT_WRITE, 200000);
	double t = now_seconds();
	assert_int_equal(tfs_bdev_write(f, a, 4096, 0), 0);
	assert_true(now_seconds() - t >= 0.2); /* at least the delay: a lower bound only */
	assert_int_equal(tfs_bdev_read(f, got, 4096, 0), 0);
	assert_memory_equal(got, a, sizeof(a));
	/* Two writes at once both go through (each waits without the lock) ... */
	struct bg_op w1, w2;
	bg_op_start(&w1, f, TFS_FAULT_WRITE, a, sizeof(a), 4096);
	bg_op_start(&w2, f, TFS_FAULT_WRITE, a, sizeof(a), 8192);
	assert_int_equal(bg_op_join(&w1), 0);
	assert_int_equal(bg_op_join(&w2), 0);
	/* ... and 0 is no delay. */
	tfs_bdev_fault_set_delay(f, TFS_FAULT_WRITE, 0);
	assert_int_equal(tfs_bdev_write(f, a, 4096, 0), 0);
	struct tfs_bdev_io_counts c;
	tfs_bdev_fault_counts(f, &c);
	assert_int_equal(c.writes, 4);
	tfs_bdev_close(f);
}

static void test_fault_stall_released_with_eio_fails_the_write(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t c[4096], got[4096];
	memset(c, 0xCC, sizeof(c));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_STALL, 0, true);
	struct bg_op wr;
	bg_op_start(&wr, f, TFS_FAULT_WRITE, c, sizeof(c), 0);
	wait_stalled(f, 1);
	/* once: only the first write stalls, a later one passes meanwhile. */
	assert_int_equal(tfs_bdev_write(f, c, 4096, 8192), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_EIO, 0, true);
	assert_int_equal(bg_op_join(&wr), -EIO);
	assert_int_equal(tfs_bdev_read(mem, got, 4096, 0), 0);
	for (size_t i = 0; i < sizeof(got); i++)
		assert_int_equal(got[i], 0);
	assert_int_equal(tfs_bdev_write(f, c, 4096, 0), 0); /* the EIO was once too */
	struct tfs_bdev_io_counts n;
	tfs_bdev_fault_counts(f, &n);
	assert_int_equal(n.writes, 3);
	tfs_bdev_close(f);
}

static void test_power_cut_releases_a_stalled_op(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t b[4096], got[4096];
	memset(b, 0xBB, sizeof(b));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, true, &f), 0);
	assert_int_equal(tfs_bdev_write(f, b, 4096, 0), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_FLUSH, TFS_FAULT_STALL, 0, false);
	struct bg_op fl;
	bg_op_start(&fl, f, TFS_FAULT_FLUSH, NULL, 0, 0);
	wait_stalled(f, 1);
	assert_int_equal(tfs_bdev_fault_power_cut(f, false, 1), 0);
	assert_int_equal(bg_op_join(&fl), -EIO);
	assert_int_equal(tfs_bdev_fault_stalled(f), 0);
	/* The stalled flush never wrote the cached write back. */
	assert_int_equal(tfs_bdev_read(mem, got, 4096, 0), 0);
	assert_int_equal(got[0], 0);
	tfs_bdev_close(f);
}

static void test_fault_stall_releases_every_stalled_thread(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t a[4096], got[2][4096];
	memset(a, 0xAA, sizeof(a));
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	assert_int_equal(tfs_bdev_write(f, a, 4096, 4096), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_STALL, 0, false);
	struct bg_op rd[2];
	for (int i = 0; i < 2; i++)
		bg_op_start(&rd[i], f, TFS_FAULT_READ, got[i], 4096, 4096);
	wait_stalled(f, 2);
	/* Stalling again is no release. */
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_STALL, 0, false);
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_OK, 0, false);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(bg_op_join(&rd[i]), 0);
		assert_memory_equal(got[i], a, sizeof(a));
	}
	assert_int_equal(tfs_bdev_fault_stalled(f), 0);
	struct tfs_bdev_io_counts c;
	tfs_bdev_fault_counts(f, &c);
	assert_int_equal(c.reads, 2);
	tfs_bdev_close(f);
}

static void test_close_releases_stalled_ops(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *f;
	uint8_t got[2][512];
	assert_int_equal(tfs_bdev_open_mem(1 << 16, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &f), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_READ, TFS_FAULT_STALL, 0, false);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_STALL, 0, false);
	struct bg_op rd, wr;
	bg_op_start(&rd, f, TFS_FAULT_READ, got[0], 512, 0);
	bg_op_start(&wr, f, TFS_FAULT_WRITE, got[1], 512, 0);
	wait_stalled(f, 2);
	tfs_bdev_close(f);
	assert_int_equal(bg_op_join(&rd), -EIO);
	assert_int_equal(bg_op_join(&wr), -EIO);
}

static struct tfs_bm *new_bm(struct tfs_bdev **dev, size_t blocks, size_t cache)
{
	struct tfs_bm *bm;
	assert_int_equal(tfs_bdev_open_mem(blocks * TFS_BLOCK_SIZE, dev), 0);
	assert_int_equal(tfs_bm_create(*dev, cache, &bm), 0);
	return bm;
}

static void write_leaf(struct tfs_bm *bm, uint64_t b, uint32_t nr)
{
	struct tfs_block *blk;
	assert_int_equal(tfs_bm_write_lock_zero(bm, b, &tfs_btree_validator, &blk), 0);
	uint8_t *d = tfs_block_data(blk);
	tfs_put_le32(d + 4, TFS_BTREE_LEAF);
	tfs_put_le32(d + 16, nr);
	tfs_put_le32(d + 20, 252);
	tfs_put_le32(d + 24, 8);
	tfs_bm_unlock(blk);
}

static void test_bm_seals_and_validates_blocks(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 16);
	struct tfs_block *blk;
	write_leaf(bm, 5, 3);
	assert_int_equal(tfs_bm_flush(bm), 0);
	tfs_bm_invalidate(bm);
	assert_int_equal(tfs_bm_read_lock(bm, 5, &tfs_btree_validator, &blk), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), 3);
	assert_int_equal(tfs_le64((uint8_t *)tfs_block_data(blk) + 8), 5);
	tfs_bm_unlock(blk);
	/* The same block read as another type fails cleanly. */
	assert_int_equal(tfs_bm_read_lock(bm, 5, &tfs_bitmap_validator, &blk), -EUCLEAN);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

/*
 * A commit's batch seals the copy it writes, outside the owner's lock,
 * and leaves the cached block as it was (readers of the cache run beside
 * the write): single blocks and runs alike come back sealed from the
 * device, while the cache holds the same bytes as before the batch.
 */
static void test_bm_batch_seals_the_written_copy_not_the_cached_block(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 16);
	const uint64_t blocks[] = { 5, 7, 8 }; /* a single block and a run of two */
	uint8_t before[3][TFS_BLOCK_SIZE];
	struct tfs_bm_batch *batch;
	struct tfs_block *blk;

	for (size_t i = 0; i < 3; i++) {
		write_leaf(bm, blocks[i], (uint32_t)blocks[i]);
		assert_int_equal(tfs_bm_read_lock(bm, blocks[i], &tfs_btree_validator, &blk), 0);
		memcpy(before[i], tfs_block_data(blk), TFS_BLOCK_SIZE);
		tfs_bm_unlock(blk);
	}
	assert_int_equal(tfs_bm_batch_dirty(bm, &batch), 0);
	assert_int_equal(tfs_bm_batch_write(batch), 0);
	tfs_bm_batch_end(bm, batch, true);
	for (size_t i = 0; i < 3; i++) {
		assert_int_equal(tfs_bm_read_lock(bm, blocks[i], &tfs_btree_validator, &blk), 0);
		assert_memory_equal(tfs_block_data(blk), before[i], TFS_BLOCK_SIZE);
		tfs_bm_unlock(blk);
	}
	tfs_bm_invalidate(bm);
	for (size_t i = 0; i < 3; i++) {
		assert_int_equal(tfs_bm_read_lock(bm, blocks[i], &tfs_btree_validator, &blk), 0);
		assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), blocks[i]);
		assert_int_equal(tfs_le64((uint8_t *)tfs_block_data(blk) + 8), blocks[i]);
		tfs_bm_unlock(blk);
	}
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

static void test_bm_flush_writes_neighbouring_blocks_as_one_write(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *dev;
	struct tfs_bm *bm;
	struct tfs_block *blk;
	struct tfs_bdev_io_counts c;
	const uint64_t blocks[] = { 9, 3, 4, 5, 12 }; /* runs 3-5, 9, 12 */

	assert_int_equal(tfs_bdev_open_mem(64 * TFS_BLOCK_SIZE, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &dev), 0);
	assert_int_equal(tfs_bm_create(dev, 16, &bm), 0);
	for (size_t i = 0; i < sizeof(blocks) / sizeof(blocks[0]); i++)
		write_leaf(bm, blocks[i], (uint32_t)blocks[i]);
	assert_int_equal(tfs_bm_flush(bm), 0);
	tfs_bdev_fault_counts(dev, &c);
	assert_int_equal(c.writes, 3);
	tfs_bm_invalidate(bm);
	for (size_t i = 0; i < sizeof(blocks) / sizeof(blocks[0]); i++) {
		assert_int_equal(tfs_bm_read_lock(bm, blocks[i], &tfs_btree_validator, &blk), 0);
		assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), blocks[i]);
		tfs_bm_unlock(blk);
	}
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

static void test_bm_reports_corruption_naming_the_problem(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 16);
	struct tfs_block *blk;
	uint8_t raw[TFS_BLOCK_SIZE];

	write_leaf(bm, 7, 1);
	assert_int_equal(tfs_bm_flush(bm), 0);
	tfs_bm_invalidate(bm);
	/* Flip one byte: bad checksum. */
	assert_int_equal(tfs_bdev_read(dev, raw, sizeof(raw), 7 * 4096), 0);
	raw[100] ^= 1;
	assert_int_equal(tfs_bdev_write(dev, raw, sizeof(raw), 7 * 4096), 0);
	assert_int_equal(tfs_bm_read_lock(bm, 7, &tfs_btree_validator, &blk), -EUCLEAN);
	/* Valid checksum but nr_entries > max_entries. */
	raw[100] ^= 1;
	tfs_put_le32(raw + 16, 300);
	tfs_put_le32(raw, tfs_block_csum(raw, TFS_SALT_BTREE));
	assert_int_equal(tfs_bdev_write(dev, raw, sizeof(raw), 7 * 4096), 0);
	assert_int_equal(tfs_bm_read_lock(bm, 7, &tfs_btree_validator, &blk), -EUCLEAN);
	/* Copied to another location: wrong self block number. */
	tfs_put_le32(raw + 16, 1);
	tfs_put_le32(raw, tfs_block_csum(raw, TFS_SALT_BTREE));
	assert_int_equal(tfs_bdev_write(dev, raw, sizeof(raw), 9 * 4096), 0);
	assert_int_equal(tfs_bm_read_lock(bm, 9, &tfs_btree_validator, &blk), -EUCLEAN);
	/* Past the end of the device. */
	assert_int_equal(tfs_bm_read_lock(bm, 64, &tfs_btree_validator, &blk), -EINVAL);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

static void test_bm_cache_stays_bounded_and_writes_back_dirty_evictions(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 1024, 16);
	struct tfs_bm_stats st;
	struct tfs_block *blk;

	for (uint64_t b = 1; b < 1000; b++)
		write_leaf(bm, b, (uint32_t)(b % 252));
	tfs_bm_stats(bm, &st);
	assert_true(st.cached <= 17);
	assert_true(st.evictions > 900);
	assert_int_equal(tfs_bm_flush(bm), 0);
	tfs_bm_invalidate(bm);
	for (uint64_t b = 1; b < 1000; b++) {
		assert_int_equal(tfs_bm_read_lock(bm, b, &tfs_btree_validator, &blk), 0);
		assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), b % 252);
		tfs_bm_unlock(blk);
	}
	tfs_bm_stats(bm, &st);
	assert_true(st.cached <= 17);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

/*
 * The memory behind the cache stays within its budget however many blocks
 * pass through it, reads and dirty shadows alike, across invalidations:
 * evicted blocks are reused, never given back to malloc and taken anew.
 */
static void test_bm_memory_stays_within_the_budget_under_churn(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 4096, 100);
	struct tfs_bm_stats st;
	struct tfs_block *blk, *held[8];

	for (int round = 0; round < 3; round++) {
		for (uint64_t b = 1; b < 4096; b++)
			write_leaf(bm, b, (uint32_t)(b % 252));
		assert_int_equal(tfs_bm_flush(bm), 0);
		for (uint64_t b = 4095; b >= 8; b--) {
			assert_int_equal(tfs_bm_read_lock(bm, b, &tfs_btree_validator, &blk), 0);
			tfs_bm_unlock(blk);
		}
		/* a few locked at once, as a btree operation holds them */
		for (unsigned i = 0; i < 8; i++)
			assert_int_equal(tfs_bm_read_lock(bm, 1000 + i, &tfs_btree_validator,
							  &held[i]), 0);
		for (uint64_t b = 2000; b < 3000; b++) {
			assert_int_equal(tfs_bm_read_lock(bm, b, &tfs_btree_validator, &blk), 0);
			tfs_bm_unlock(blk);
		}
		for (unsigned i = 0; i < 8; i++)
			tfs_bm_unlock(held[i]);
		tfs_bm_invalidate(bm);
	}
	tfs_bm_stats(bm, &st);
	assert_true(st.evictions > 3 * 4000);
	/* 100 + 8 locked, in slabs of 64 */
	assert_true(st.allocated >= 108);
	assert_true(st.allocated <= 128);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

static void test_bm_invalidate_drops_unwritten_changes(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 64);
	struct tfs_block *blk;
	write_leaf(bm, 3, 2);
	assert_int_equal(tfs_bm_flush(bm), 0);
	assert_int_equal(tfs_bm_write_lock(bm, 3, &tfs_btree_validator, &blk), 0);
	tfs_put_le32((uint8_t *)tfs_block_data(blk) + 16, 9);
	tfs_bm_unlock(blk);
	tfs_bm_invalidate(bm);
	assert_int_equal(tfs_bm_read_lock(bm, 3, &tfs_btree_validator, &blk), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), 2);
	tfs_bm_unlock(blk);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

static void test_bm_flush_leaves_locked_blocks_to_their_holder(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 64);
	struct tfs_block *blk;
	uint8_t raw[TFS_BLOCK_SIZE];
	assert_int_equal(tfs_bm_write_lock_zero(bm, 0, &tfs_btree_validator, &blk), 0);
	uint8_t *d = tfs_block_data(blk);
	tfs_put_le32(d + 4, TFS_BTREE_LEAF);
	tfs_put_le32(d + 20, 252);
	tfs_put_le32(d + 24, 8);
	assert_int_equal(tfs_bm_flush(bm), 0);
	assert_int_equal(tfs_bdev_read(dev, raw, sizeof(raw), 0), 0);
	assert_int_equal(tfs_le32(raw + 4), 0); /* not written yet */
	assert_int_equal(tfs_bm_write_now(bm, blk), 0);
	assert_int_equal(tfs_bdev_read(dev, raw, sizeof(raw), 0), 0);
	assert_int_equal(tfs_le32(raw + 4), TFS_BTREE_LEAF);
	tfs_bm_unlock(blk);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

/* Blocks a test wrote and flushed to the device, then dropped from the cache. */
static void write_leaves_to_disk(struct tfs_bm *bm, const uint64_t *blocks, size_t n)
{
	for (size_t i = 0; i < n; i++)
		write_leaf(bm, blocks[i], (uint32_t)blocks[i]);
	assert_int_equal(tfs_bm_flush(bm), 0);
	tfs_bm_invalidate(bm);
}

static void assert_leaf_cached(struct tfs_bm *bm, uint64_t b)
{
	struct tfs_bm_stats before, after;
	struct tfs_block *blk;

	tfs_bm_stats(bm, &before);
	assert_int_equal(tfs_bm_read_lock(bm, b, &tfs_btree_validator, &blk), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(blk) + 16), b);
	tfs_bm_unlock(blk);
	tfs_bm_stats(bm, &after);
	assert_int_equal(after.reads, before.reads);
	assert_int_equal(after.hits, before.hits + 1);
}

static void test_bm_prefetch_reads_missing_blocks_with_neighbours_in_one_read(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *dev;
	struct tfs_bm *bm;
	struct tfs_bdev_io_counts c0, c1;
	struct tfs_bm_stats st;
	const uint64_t on_disk[] = { 3, 4, 5, 9, 12, 40 };
	/* out of order, one twice, one cached already, one past the end (64 blocks) */
	const uint64_t wanted[] = { 12, 40, 5, 3, 9, 4, 5, 70, 20 };
	struct tfs_block *blk;

	assert_int_equal(tfs_bdev_open_mem(64 * TFS_BLOCK_SIZE, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &dev), 0);
	assert_int_equal(tfs_bm_create(dev, 64, &bm), 0);
	write_leaves_to_disk(bm, on_disk, sizeof(on_disk) / sizeof(on_disk[0]));
	write_leaf(bm, 20, 20);
	tfs_bdev_fault_counts(dev, &c0);
	assert_int_equal(tfs_bm_prefetch(bm, wanted, sizeof(wanted) / sizeof(wanted[0])), 6);
	tfs_bdev_fault_counts(dev, &c1);
	assert_int_equal(c1.reads - c0.reads, 4); /* 3-5, 9, 12, 40 */
	assert_int_equal(c1.read_bytes - c0.read_bytes, 6 * TFS_BLOCK_SIZE);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.prefetched, 6);
	assert_int_equal(st.locked, 0);
	/* Everything is there for the locks, and read again by nobody. */
	for (size_t i = 0; i < sizeof(on_disk) / sizeof(on_disk[0]); i++)
		assert_leaf_cached(bm, on_disk[i]);
	assert_leaf_cached(bm, 20);
	tfs_bdev_fault_counts(dev, &c0);
	assert_int_equal(c0.reads, c1.reads);
	/* Cached blocks are not read again. */
	assert_int_equal(tfs_bm_prefetch(bm, wanted, sizeof(wanted) / sizeof(wanted[0])), 0);
	/* Past the end is skipped here and refused by the lock, as ever. */
	assert_int_equal(tfs_bm_read_lock(bm, 70, &tfs_btree_validator, &blk), -EINVAL);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

/* Read ahead is not validated ahead: the lock validates, as if it had read the block itself. */
static void test_bm_prefetched_block_is_validated_when_locked(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_bm *bm = new_bm(&dev, 64, 16);
	struct tfs_bm_stats st;
	struct tfs_block *blk;
	uint8_t raw[TFS_BLOCK_SIZE];
	const uint64_t blocks[] = { 7, 8 };

	write_leaves_to_disk(bm, blocks, 2);
	assert_int_equal(tfs_bdev_read(dev, raw, sizeof(raw), 7 * 4096), 0);
	raw[100] ^= 1;
	assert_int_equal(tfs_bdev_write(dev, raw, sizeof(raw), 7 * 4096), 0);
	tfs_log_set_sink(quiet_sink, NULL);
	assert_int_equal(tfs_bm_prefetch(bm, blocks, 2), 2);
	/* The corrupt one fails its first lock and leaves the cache... */
	assert_int_equal(tfs_bm_read_lock(bm, 7, &tfs_btree_validator, &blk), -EUCLEAN);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.cached, 1);
	/* ...so that, mended, it is read again rather than served as it was. */
	raw[100] ^= 1;
	assert_int_equal(tfs_bdev_write(dev, raw, sizeof(raw), 7 * 4096), 0);
	assert_int_equal(tfs_bm_read_lock(bm, 7, &tfs_btree_validator, &blk), 0);
	tfs_bm_unlock(blk);
	/* A good block read ahead is checked against the type the lock asks for. */
	assert_int_equal(tfs_bm_read_lock(bm, 8, &tfs_bitmap_validator, &blk), -EUCLEAN);
	assert_int_equal(tfs_bm_read_lock(bm, 8, &tfs_btree_validator, &blk), 0);
	tfs_bm_unlock(blk);
	tfs_log_set_sink(NULL, NULL);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

/*
 * A read-ahead takes at most its window (a quarter of the cache), only
 * free room or clean unlocked blocks: it never writes a dirty block early
 * nor drops a locked one.  A failed read caches nothing; the lock reads.
 */
static void test_bm_prefetch_is_bounded_and_evicts_nothing_dirty_or_locked(void **state)
{
	(void)state;
	struct tfs_bdev *mem, *dev;
	struct tfs_bm *bm;
	struct tfs_bm_stats st;
	struct tfs_block *held;
	uint64_t blocks[32];

	assert_int_equal(tfs_bdev_open_mem(256 * TFS_BLOCK_SIZE, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &dev), 0);
	assert_int_equal(tfs_bm_create(dev, 16, &bm), 0);
	assert_int_equal(tfs_bm_prefetch_window(bm), 4);
	for (uint64_t i = 0; i < 32; i++)
		blocks[i] = 100 + i;
	write_leaves_to_disk(bm, blocks, 32);

	assert_int_equal(tfs_bm_prefetch(bm, blocks, 32), 4);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.cached, 4);
	assert_leaf_cached(bm, 100);
	assert_leaf_cached(bm, 103);

	/* A cache full of dirty blocks and one locked block: nothing to take. */
	tfs_bm_invalidate(bm);
	assert_int_equal(tfs_bm_read_lock(bm, 100, &tfs_btree_validator, &held), 0);
	for (uint64_t b = 1; b <= 16; b++)
		write_leaf(bm, b, (uint32_t)b);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.dirty, 16);
	assert_int_equal(st.writes, 32);
	assert_int_equal(tfs_bm_prefetch(bm, blocks + 8, 4), 0);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.dirty, 16);
	assert_int_equal(st.writes, 32);
	assert_int_equal(st.cached, 17);
	/* Clean, the same blocks make room; the locked one stays. */
	assert_int_equal(tfs_bm_flush(bm), 0);
	assert_int_equal(tfs_bm_prefetch(bm, blocks + 8, 4), 4);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.cached, 17);
	assert_int_equal(st.locked, 1);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(held) + 16), 100);
	tfs_bm_unlock(held);

	/* A failed read leaves its blocks out, and the lock that wants one reads it. */
	tfs_bm_invalidate(bm);
	tfs_log_set_sink(quiet_sink, NULL);
	tfs_bdev_fault_set(dev, TFS_FAULT_READ, TFS_FAULT_EIO, 0, true);
	assert_int_equal(tfs_bm_prefetch(bm, blocks + 20, 1), 0);
	tfs_log_set_sink(NULL, NULL);
	tfs_bm_stats(bm, &st);
	assert_int_equal(st.cached, 0);
	assert_int_equal(st.prefetched, 8);
	assert_int_equal(tfs_bm_read_lock(bm, 120, &tfs_btree_validator, &held), 0);
	assert_int_equal(tfs_le32((uint8_t *)tfs_block_data(held) + 16), 120);
	tfs_bm_unlock(held);
	tfs_bm_destroy(bm);
	tfs_bdev_close(dev);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_crc32c_matches_known_values),
		cmocka_unit_test(test_file_bdev_reads_zeros_past_end_and_grows),
		cmocka_unit_test(test_open_refuses_a_directory),
		cmocka_unit_test(test_read_batch_reads_what_single_reads_read),
		cmocka_unit_test(test_read_batch_bounds_bytes_in_flight),
		cmocka_unit_test(test_fault_fails_nth_write_then_recovers),
		cmocka_unit_test(test_power_cut_drops_unflushed_writes),
		cmocka_unit_test(test_power_cut_tear_keeps_whole_sectors),
		cmocka_unit_test(test_direct_file_bdev_takes_any_offset_length_and_buffer),
		cmocka_unit_test(test_direct_file_bdev_counts_the_bytes_the_device_moves),
		cmocka_unit_test(test_scratch_nests_reuses_and_stays_bounded),
		cmocka_unit_test(test_scratch_is_unmapped_when_its_thread_ends),
		cmocka_unit_test(test_power_cut_tear_onto_a_direct_file),
		cmocka_unit_test(test_direct_open_falls_back_where_o_direct_is_refused),
		cmocka_unit_test(test_fault_stall_holds_a_read_until_set_back_to_ok),
		cmocka_unit_test(test_fault_delay_waits_then_passes_the_data),
		cmocka_unit_test(test_fault_stall_released_with_eio_fails_the_write),
		cmocka_unit_test(test_power_cut_releases_a_stalled_op),
		cmocka_unit_test(test_fault_stall_releases_every_stalled_thread),
		cmocka_unit_test(test_close_releases_stalled_ops),
		cmocka_unit_test(test_bm_seals_and_validates_blocks),
		cmocka_unit_test(test_bm_flush_writes_neighbouring_blocks_as_one_write),
		cmocka_unit_test(test_bm_reports_corruption_naming_the_problem),
		cmocka_unit_test(test_bm_cache_stays_bounded_and_writes_back_dirty_evictions),
		cmocka_unit_test(test_bm_memory_stays_within_the_budget_under_churn),
		cmocka_unit_test(test_bm_invalidate_drops_unwritten_changes),
		cmocka_unit_test(test_bm_flush_leaves_locked_blocks_to_their_holder),
		cmocka_unit_test(test_bm_batch_seals_the_written_copy_not_the_cached_block),
		cmocka_unit_test(test_bm_prefetch_reads_missing_blocks_with_neighbours_in_one_read),
		cmocka_unit_test(test_bm_prefetched_block_is_validated_when_locked),
		cmocka_unit_test(test_bm_prefetch_is_bounded_and_evicts_nothing_dirty_or_locked),
	};
	tfs_log_set_sink(quiet_sink, NULL);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
