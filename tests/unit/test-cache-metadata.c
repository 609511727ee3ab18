/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dm-cache metadata schema against a model of its mappings, in both
 * format versions, on a memory device: what is committed survives a
 * reopen, what is not is gone after an abort or a close, an unclean stop
 * makes every mapped block dirty and drops hints and discards, and bad
 * superblocks are refused with a message that names the problem.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "cache-metadata.h"
#include "crc32c.h"
#include "format.h"
#include "log.h"

#define NR_CBLOCKS 2000u
#define META_BYTES (4u << 20)

static char last_error[512];

static void keep_last_error(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	if (level <= TFS_LOG_ERR)
		snprintf(last_error, sizeof(last_error), "%s", msg);
}

static const struct tfs_cache_policy smq = { .name = "smq", .version = { 2, 0, 0 }, .hint_size = 4 };

static struct tfs_cmd *format(struct tfs_bdev *dev, uint32_t version)
{
	struct tfs_cmd_format_options opt = { .block_sectors = 128,
					      .nr_cache_blocks = NR_CBLOCKS,
					      .metadata_version = version,
					      .policy = smq,
					      .bm_cache_blocks = 64 };
	struct tfs_cmd *cmd;

	assert_int_equal(tfs_cmd_format(dev, &opt, &cmd), 0);
	return cmd;
}

static struct tfs_cmd *reopen(struct tfs_cmd *cmd, struct tfs_bdev *dev)
{
	struct tfs_cmd_open_options opt = { .block_sectors = 128, .bm_cache_blocks = 64 };

	tfs_cmd_close(cmd);
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), 0);
	return cmd;
}

/* ---- the model --------------------------------------------------------- */

struct model {
	uint64_t oblock[NR_CBLOCKS]; /* + 1; 0 = unmapped */
	bool dirty[NR_CBLOCKS];
	uint32_t hint[NR_CBLOCKS];
};

struct seen {
	const struct model *m;
	uint32_t nr;
	bool all_dirty, hints;
	uint32_t limit;
};

static int check_one(void *ctx, uint32_t cblock, uint64_t oblock, bool dirty, const void *hint)
{
	struct seen *s = ctx;

	assert_true(cblock < s->limit);
	assert_int_equal(s->m->oblock[cblock], oblock + 1);
	assert_int_equal(dirty, s->all_dirty || s->m->dirty[cblock]);
	if (s->hints) {
		assert_non_null(hint);
		assert_int_equal(tfs_le32(hint), s->m->hint[cblock]);
	} else {
		assert_null(hint);
	}
	s->nr++;
	return 0;
}

static void verify(struct tfs_cmd *cmd, const struct model *m, uint32_t nr_cblocks, bool all_dirty,
		   bool hints)
{
	struct seen s = { m, 0, all_dirty, hints, nr_cblocks };
	uint32_t mapped = 0;

	assert_int_equal(tfs_cmd_load_mappings(cmd, &smq, check_one, &s), 0);
	for (uint32_t c = 0; c < nr_cblocks; c++) {
		struct tfs_cache_mapping got;
		int r = tfs_cmd_lookup(cmd, c, &got);
		if (!m->oblock[c]) {
			assert_int_equal(r, -ENODATA);
			continue;
		}
		mapped++;
		assert_int_equal(r, 0);
		assert_int_equal(got.oblock + 1, m->oblock[c]);
		assert_int_equal(got.dirty, m->dirty[c]);
	}
	assert_int_equal(s.nr, mapped);
}

static uint32_t rng = 99;
static uint32_t rnd(uint32_t n)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng % n;
}

static void random_ops(struct tfs_cmd *cmd, struct model *m, int n)
{
	for (int k = 0; k < n; k++) {
		uint32_t c = rnd(NR_CBLOCKS);
		uint8_t h[4];
		switch (rnd(5)) {
		case 0:
		case 1:
			/* Unique origin blocks: the caller's promise (cache_check rejects duplicates). */
			assert_int_equal(tfs_cmd_insert(cmd, c, (uint64_t)c * 1000 + 7), 0);
			m->oblock[c] = (uint64_t)c * 1000 + 8;
			m->dirty[c] = false;
			break;
		case 2:
			assert_int_equal(tfs_cmd_remove(cmd, c), m->oblock[c] ? 0 : -ENODATA);
			m->oblock[c] = 0;
			m->dirty[c] = false;
			break;
		case 3:
			assert_int_equal(tfs_cmd_set_dirty(cmd, c, true), m->oblock[c] ? 0 : -ENODATA);
			m->dirty[c] = m->oblock[c] != 0;
			break;
		default:
			if (m->oblock[c])
				assert_int_equal(tfs_cmd_set_dirty(cmd, c, false), 0);
			m->dirty[c] = false;
			tfs_put_le32(h, rng);
			assert_int_equal(tfs_cmd_set_hint(cmd, c, h), 0);
			m->hint[c] = rng;
		}
	}
}

/* ---- tests ------------------------------------------------------------- */

static void mappings_survive_commit_and_reopen(uint32_t version)
{
	static struct model m, saved;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cmd_info info;

	memset(&m, 0, sizeof(m));
	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, version);
	for (int round = 0; round < 4; round++) {
		random_ops(cmd, &m, 1500);
		verify(cmd, &m, NR_CBLOCKS, false, true);
		assert_int_equal(tfs_cmd_commit(cmd, true), 0);
		cmd = reopen(cmd, dev);
		assert_true(tfs_cmd_clean_when_opened(cmd));
		verify(cmd, &m, NR_CBLOCKS, false, true);
		/* Changes after the commit are dropped by an abort. */
		saved = m;
		random_ops(cmd, &m, 300);
		assert_int_equal(tfs_cmd_abort(cmd), 0);
		m = saved;
		verify(cmd, &m, NR_CBLOCKS, false, true);
	}
	tfs_cmd_info(cmd, &info);
	assert_int_equal(info.version, version);
	assert_int_equal(info.nr_cache_blocks, NR_CBLOCKS);
	assert_string_equal(info.policy.name, "smq");
	assert_int_equal(info.policy.hint_size, 4);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_v1_mappings_survive_commit_and_reopen(void **state)
{
	(void)state;
	mappings_survive_commit_and_reopen(1);
}

static void test_v2_mappings_survive_commit_and_reopen(void **state)
{
	(void)state;
	mappings_survive_commit_and_reopen(2);
}

static void unclean_stop_makes_every_mapping_dirty(uint32_t version)
{
	static struct model m;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	bool on;

	memset(&m, 0, sizeof(m));
	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, version);
	random_ops(cmd, &m, 1000);
	assert_int_equal(tfs_cmd_resize_discard(cmd, 1024, 300), 0);
	assert_int_equal(tfs_cmd_set_discard(cmd, 17, true), 0);
	/* Not a clean shutdown: the flag stays clear. */
	assert_int_equal(tfs_cmd_commit(cmd, false), 0);
	cmd = reopen(cmd, dev);
	assert_false(tfs_cmd_clean_when_opened(cmd));
	verify(cmd, &m, NR_CBLOCKS, true, false);
	assert_int_equal(tfs_cmd_test_discard(cmd, 17, &on), 0);
	assert_true(on); /* stored, but not reported by load_discards */

	/* A clean commit, then an open that is never closed cleanly: the open itself cleared the flag. */
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	cmd = reopen(cmd, dev);
	assert_true(tfs_cmd_clean_when_opened(cmd));
	verify(cmd, &m, NR_CBLOCKS, false, true);
	cmd = reopen(cmd, dev); /* closed without a commit: a crash */
	assert_false(tfs_cmd_clean_when_opened(cmd));
	verify(cmd, &m, NR_CBLOCKS, true, false);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_v1_unclean_stop_makes_every_mapping_dirty(void **state)
{
	(void)state;
	unclean_stop_makes_every_mapping_dirty(1);
}

static void test_v2_unclean_stop_makes_every_mapping_dirty(void **state)
{
	(void)state;
	unclean_stop_makes_every_mapping_dirty(2);
}

static int count_discards(void *ctx, uint64_t dblock, bool discarded)
{
	uint64_t *n = ctx;

	if (discarded)
		*n += dblock + 1;
	return 0;
}

static void test_discard_bitset_resizes_and_a_new_block_size_clears_it(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cmd_info info;
	uint64_t sum = 0;
	bool on;

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, 2);
	assert_int_equal(tfs_cmd_resize_discard(cmd, 0, 10), -EINVAL);
	assert_int_equal(tfs_cmd_resize_discard(cmd, 1024, 100000), 0);
	assert_int_equal(tfs_cmd_set_discard(cmd, 5, true), 0);
	assert_int_equal(tfs_cmd_set_discard(cmd, 99999, true), 0);
	assert_int_equal(tfs_cmd_set_discard(cmd, 100000, true), -EINVAL);
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	cmd = reopen(cmd, dev);
	assert_int_equal(tfs_cmd_load_discards(cmd, count_discards, &sum), 0);
	assert_int_equal(sum, 6 + 100000);
	/* Same block size: kept bits stay, the cut ones go. */
	assert_int_equal(tfs_cmd_resize_discard(cmd, 1024, 50000), 0);
	assert_int_equal(tfs_cmd_resize_discard(cmd, 1024, 100000), 0);
	assert_int_equal(tfs_cmd_test_discard(cmd, 5, &on), 0);
	assert_true(on);
	assert_int_equal(tfs_cmd_test_discard(cmd, 99999, &on), 0);
	assert_false(on);
	/* Another block size: every bit described another range. */
	assert_int_equal(tfs_cmd_resize_discard(cmd, 2048, 50000), 0);
	assert_int_equal(tfs_cmd_test_discard(cmd, 5, &on), 0);
	assert_false(on);
	tfs_cmd_info(cmd, &info);
	assert_int_equal(info.discard_block_sectors, 2048);
	assert_int_equal(info.discard_nr_blocks, 50000);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void resize_keeps_mappings_and_refuses_to_drop_dirty_ones(uint32_t version)
{
	static struct model m;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cmd_info info;
	uint32_t dirty_at = 0;

	memset(&m, 0, sizeof(m));
	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, version);
	assert_int_equal(tfs_cmd_resize(cmd, 500, NULL), 0);
	for (uint32_t c = 0; c < 500; c += 7) {
		assert_int_equal(tfs_cmd_insert(cmd, c, c + 1000), 0);
		m.oblock[c] = c + 1001;
	}
	assert_int_equal(tfs_cmd_set_dirty(cmd, 301, true), 0);
	m.dirty[301] = true;
	assert_int_equal(tfs_cmd_insert(cmd, 500, 1), -EINVAL);
	assert_int_equal(tfs_cmd_resize(cmd, NR_CBLOCKS, NULL), 0);
	verify(cmd, &m, NR_CBLOCKS, false, true);
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);

	last_error[0] = 0;
	assert_int_equal(tfs_cmd_resize(cmd, 200, &dirty_at), -EINVAL);
	assert_int_equal(dirty_at, 301);
	assert_non_null(strstr(last_error, "cache block 301 is dirty"));
	verify(cmd, &m, NR_CBLOCKS, false, true);

	/* Clean mappings past the new end go; the shrink is committed and survives. */
	assert_int_equal(tfs_cmd_resize(cmd, 302, NULL), 0);
	for (uint32_t c = 302; c < NR_CBLOCKS; c++)
		m.oblock[c] = 0;
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	cmd = reopen(cmd, dev);
	tfs_cmd_info(cmd, &info);
	assert_int_equal(info.nr_cache_blocks, 302);
	verify(cmd, &m, 302, false, true);
	assert_int_equal(tfs_cmd_resize(cmd, 1000, NULL), 0);
	verify(cmd, &m, 1000, false, true);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_v1_resize_keeps_mappings_and_refuses_to_drop_dirty_ones(void **state)
{
	(void)state;
	resize_keeps_mappings_and_refuses_to_drop_dirty_ones(1);
}

static void test_v2_resize_keeps_mappings_and_refuses_to_drop_dirty_ones(void **state)
{
	(void)state;
	resize_keeps_mappings_and_refuses_to_drop_dirty_ones(2);
}

static void test_needs_check_and_stats_persist(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cache_stats st = { 1, 2, 3, 0xffffffffu }, got;

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, 2);
	assert_int_equal(tfs_cmd_set_stats(cmd, &st), 0);
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	assert_int_equal(tfs_cmd_insert(cmd, 1, 1), 0);
	/* needs_check is written at once, without the transaction it interrupts. */
	assert_int_equal(tfs_cmd_set_needs_check(cmd, true), 0);
	assert_true(tfs_cmd_needs_check(cmd));
	cmd = reopen(cmd, dev);
	assert_true(tfs_cmd_needs_check(cmd));
	tfs_cmd_get_stats(cmd, &got);
	assert_memory_equal(&got, &st, sizeof(st));
	struct tfs_cache_mapping mp;
	assert_int_equal(tfs_cmd_lookup(cmd, 1, &mp), -ENODATA);
	/* It survives commits until cleared. */
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	cmd = reopen(cmd, dev);
	assert_true(tfs_cmd_needs_check(cmd));
	assert_int_equal(tfs_cmd_set_needs_check(cmd, false), 0);
	cmd = reopen(cmd, dev);
	assert_false(tfs_cmd_needs_check(cmd));
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_policy_change_replaces_the_hints(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cache_policy cleaner = { .name = "cleaner", .version = { 1, 0, 0 } };
	struct tfs_cache_policy smq_minor = smq;
	uint8_t h[4] = { 1, 2, 3, 4 }, got[4];

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, 1);
	assert_int_equal(tfs_cmd_set_hint(cmd, 9, h), 0);
	smq_minor.version[1] = 5;
	assert_int_equal(tfs_cmd_set_policy(cmd, &smq_minor), 0); /* same major: hints kept */
	assert_int_equal(tfs_cmd_get_hint(cmd, 9, got), 0);
	assert_memory_equal(got, h, 4);
	assert_int_equal(tfs_cmd_set_policy(cmd, &cleaner), 0);
	assert_int_equal(tfs_cmd_get_hint(cmd, 9, got), -EINVAL);
	assert_int_equal(tfs_cmd_commit(cmd, true), 0);
	cmd = reopen(cmd, dev);
	struct tfs_cmd_info info;
	tfs_cmd_info(cmd, &info);
	assert_string_equal(info.policy.name, "cleaner");
	assert_int_equal(info.policy.hint_size, 0);
	assert_int_equal(tfs_cmd_set_policy(cmd, &smq), 0);
	assert_int_equal(tfs_cmd_get_hint(cmd, 9, got), 0);
	assert_int_equal(tfs_le32(got), 0);
	struct tfs_cache_policy bad = smq;
	bad.hint_size = 6;
	assert_int_equal(tfs_cmd_set_policy(cmd, &bad), -EINVAL);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_format_refuses_bad_arguments(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct tfs_cmd_format_options opt = { .block_sectors = 96, .nr_cache_blocks = 10,
					      .metadata_version = 2, .policy = smq };

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	assert_int_equal(tfs_cmd_format(dev, &opt, &cmd), -EINVAL);
	opt.block_sectors = 64;
	opt.metadata_version = 3;
	assert_int_equal(tfs_cmd_format(dev, &opt, &cmd), -EINVAL);
	opt.metadata_version = 1;
	opt.policy.hint_size = 132;
	assert_int_equal(tfs_cmd_format(dev, &opt, &cmd), -EINVAL);
	tfs_bdev_close(dev);
}

/* Change a superblock field, reseal (or not), and expect open to refuse naming it. */
static void refuse(struct tfs_bdev *dev, size_t off, uint32_t value, bool reseal, int err,
		   const char *words)
{
	struct tfs_cmd_open_options opt = { .read_only = true };
	uint8_t sb[TFS_BLOCK_SIZE], saved[TFS_BLOCK_SIZE];
	struct tfs_cmd *cmd;

	assert_int_equal(tfs_bdev_read(dev, saved, sizeof(saved), 0), 0);
	memcpy(sb, saved, sizeof(sb));
	tfs_put_le32(sb + off, value);
	if (reseal)
		tfs_put_le32(sb, tfs_block_csum(sb, TFS_SALT_CACHE_SB));
	assert_int_equal(tfs_bdev_write(dev, sb, sizeof(sb), 0), 0);
	last_error[0] = 0;
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), err);
	assert_non_null(strstr(last_error, words));
	assert_int_equal(tfs_bdev_write(dev, saved, sizeof(saved), 0), 0);
}

static void test_open_refuses_bad_superblocks_naming_the_problem(void **state)
{
	(void)state;
	struct tfs_cmd_open_options opt = { .block_sectors = 128 };
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	last_error[0] = 0;
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), -EINVAL);
	assert_non_null(strstr(last_error, "block 0 is zero"));
	cmd = format(dev, 2);
	tfs_cmd_close(cmd);

	refuse(dev, offsetof(struct tfs_disk_cache_sb, magic), 27022010, true, -EINVAL,
	       "not dm-cache metadata");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, version), 3, true, -EINVAL,
	       "unsupported cache metadata version 3");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, version), 0, true, -EINVAL,
	       "unsupported cache metadata version 0");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, cache_blocks), 7, false, -EUCLEAN,
	       "checksum is wrong");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, flags), 0x20, true, -EINVAL,
	       "unknown flags 0x20");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, incompat_flags), 1, true, -EINVAL,
	       "incompatible features");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, data_block_size), 100, true, -EINVAL,
	       "cache block size 100 sectors is invalid");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, policy_hint_size), 5, true, -EUCLEAN,
	       "hint size 5");
	refuse(dev, offsetof(struct tfs_disk_cache_sb, cache_blocks), 0xffffffffu, true, -EUCLEAN,
	       "cannot fit a metadata device");

	opt.block_sectors = 256;
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), -EINVAL);
	assert_non_null(strstr(last_error, "block size 128 sectors but 256"));
	opt.block_sectors = 0;
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), 0);
	tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
}

static void test_read_only_open_changes_nothing(void **state)
{
	(void)state;
	struct tfs_cmd_open_options opt = { .read_only = true };
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	uint8_t before[TFS_BLOCK_SIZE], after[TFS_BLOCK_SIZE];

	assert_int_equal(tfs_bdev_open_mem(META_BYTES, &dev), 0);
	cmd = format(dev, 2);
	tfs_cmd_close(cmd);
	assert_int_equal(tfs_bdev_read(dev, before, sizeof(before), 0), 0);
	assert_int_equal(tfs_cmd_open(dev, &opt, &cmd), 0);
	assert_true(tfs_cmd_clean_when_opened(cmd));
	assert_int_equal(tfs_cmd_insert(cmd, 1, 1), -EROFS);
	assert_int_equal(tfs_cmd_commit(cmd, true), -EROFS);
	assert_int_equal(tfs_cmd_set_needs_check(cmd, true), -EROFS);
	tfs_cmd_close(cmd);
	assert_int_equal(tfs_bdev_read(dev, after, sizeof(after), 0), 0);
	assert_memory_equal(before, after, sizeof(before));
	tfs_bdev_close(dev);
}

static char tmp_path[64];

static struct tfs_bdev *new_file_dev(uint64_t bytes)
{
	struct tfs_bdev *d;
	int fd;

	strcpy(tmp_path, "/tmp/tfs-cache-meta-XXXXXX");
	fd = mkstemp(tmp_path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	close(fd);
	assert_int_equal(tfs_bdev_open(tmp_path, false, &d), 0);
	return d;
}

/*
 * Fail the n-th write of a commit (or cut the power after it) for n = 0,
 * 1, 2, ... until a commit gets through: the metadata on disk is always
 * exactly the old or the new transaction (told apart by the read_hits
 * counter), and after a failed commit an abort lands on the old one and
 * goes on working.
 */
static void sweep(bool power_cut)
{
	static struct model old_m, new_m;
	struct tfs_cmd_open_options ro = { .read_only = true };
	bool done = false;

	for (uint64_t n = 0; !done; n++) {
		struct tfs_bdev *f, *again;
		struct tfs_cache_stats st = { .read_hits = 1 };
		struct tfs_cmd *cmd;
		int r;

		memset(&old_m, 0, sizeof(old_m));
		rng = 4242;
		assert_int_equal(tfs_bdev_fault_wrap(new_file_dev(META_BYTES), power_cut, &f), 0);
		cmd = format(f, 2 - n % 2);
		random_ops(cmd, &old_m, 400);
		assert_int_equal(tfs_cmd_set_stats(cmd, &st), 0);
		assert_int_equal(tfs_cmd_commit(cmd, true), 0);

		new_m = old_m;
		random_ops(cmd, &new_m, 400);
		st.read_hits = 2;
		assert_int_equal(tfs_cmd_set_stats(cmd, &st), 0);
		tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_EIO, n, false);
		r = tfs_cmd_commit(cmd, true);
		if (r && !power_cut) {
			tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
			assert_int_equal(tfs_cmd_abort(cmd), 0);
			verify(cmd, &old_m, NR_CBLOCKS, false, true);
			random_ops(cmd, &old_m, 50);
			st.read_hits = 1;
			assert_int_equal(tfs_cmd_set_stats(cmd, &st), 0);
			assert_int_equal(tfs_cmd_commit(cmd, true), 0);
			verify(cmd, &old_m, NR_CBLOCKS, false, true);
		}
		if (power_cut)
			assert_int_equal(tfs_bdev_fault_power_cut(f, n % 2, (uint32_t)n + 1), 0);
		tfs_cmd_close(cmd);
		tfs_bdev_close(f);
		done = r == 0;

		assert_int_equal(tfs_bdev_open(tmp_path, true, &again), 0);
		assert_int_equal(tfs_cmd_open(again, &ro, &cmd), 0);
		tfs_cmd_get_stats(cmd, &st);
		if (done && !power_cut)
			assert_int_equal(st.read_hits, 2);
		assert_true(st.read_hits == 1 || st.read_hits == 2);
		verify(cmd, st.read_hits == 1 ? &old_m : &new_m, NR_CBLOCKS, false, true);
		tfs_cmd_close(cmd);
		tfs_bdev_close(again);
		unlink(tmp_path);
		assert_true(n < 10000);
	}
}

static void test_failed_commit_leaves_old_or_new_transaction(void **state)
{
	(void)state;
	sweep(false);
}

static void test_power_cut_during_commit_leaves_old_or_new_transaction(void **state)
{
	(void)state;
	sweep(true);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_v1_mappings_survive_commit_and_reopen),
		cmocka_unit_test(test_v2_mappings_survive_commit_and_reopen),
		cmocka_unit_test(test_v1_unclean_stop_makes_every_mapping_dirty),
		cmocka_unit_test(test_v2_unclean_stop_makes_every_mapping_dirty),
		cmocka_unit_test(test_discard_bitset_resizes_and_a_new_block_size_clears_it),
		cmocka_unit_test(test_v1_resize_keeps_mappings_and_refuses_to_drop_dirty_ones),
		cmocka_unit_test(test_v2_resize_keeps_mappings_and_refuses_to_drop_dirty_ones),
		cmocka_unit_test(test_needs_check_and_stats_persist),
		cmocka_unit_test(test_policy_change_replaces_the_hints),
		cmocka_unit_test(test_format_refuses_bad_arguments),
		cmocka_unit_test(test_open_refuses_bad_superblocks_naming_the_problem),
		cmocka_unit_test(test_read_only_open_changes_nothing),
		cmocka_unit_test(test_failed_commit_leaves_old_or_new_transaction),
		cmocka_unit_test(test_power_cut_during_commit_leaves_old_or_new_transaction),
	};
	tfs_log_set_sink(keep_last_error, NULL);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
