/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The thin-pool metadata API against an in-memory model: devices,
 * snapshots, deletes, mappings, commits, aborts and reopens, then a fault
 * sweep that fails the Nth metadata write of a commit (and cuts power) and
 * requires the reopened pool to be exactly the old or the new transaction.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "check.h"
#include "format.h"
#include "log.h"
#include "thin-metadata.h"

#define NR_DEVS 6
#define NR_VBLOCKS 3000
#define NR_DATA 40000

static void quiet_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

static const struct tfs_pmd_options default_opt = { .data_block_sectors = 128,
						    .nr_data_blocks = NR_DATA,
						    .cache_blocks = 64 };

/* ---- the model --------------------------------------------------------- */

struct model {
	bool exists[NR_DEVS];
	uint64_t map[NR_DEVS][NR_VBLOCKS]; /* data block + 1; 0 = unmapped */
	uint64_t trans_id;
};

static uint32_t rng_state = 12345;
static uint32_t rnd(uint32_t n)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return rng_state % n;
}

static char tmp_path[64];

static struct tfs_bdev *new_file_dev(uint64_t bytes)
{
	struct tfs_bdev *d;
	strcpy(tmp_path, "/tmp/tfs-meta-XXXXXX");
	int fd = mkstemp(tmp_path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	close(fd);
	assert_int_equal(tfs_bdev_open(tmp_path, false, &d), 0);
	return d;
}

static struct tfs_pmd *format_mem(struct tfs_bdev **dev, uint64_t meta_blocks)
{
	struct tfs_pmd *pmd;
	assert_int_equal(tfs_bdev_open_mem(meta_blocks * TFS_BLOCK_SIZE, dev), 0);
	assert_int_equal(tfs_pmd_format(*dev, &default_opt, &pmd), 0);
	return pmd;
}

/* Compare every device and mapping of the pool with the model; check data usage. */
static void verify(struct tfs_pmd *pmd, const struct model *m)
{
	static uint8_t used[NR_DATA];
	tfs_dev_id ids[NR_DEVS + 1];
	int n = tfs_pmd_list_devices(pmd, ids, NR_DEVS + 1);
	int want = 0;
	uint64_t distinct = 0;

	memset(used, 0, sizeof(used));
	for (int d = 0; d < NR_DEVS; d++)
		want += m->exists[d];
	assert_int_equal(n, want);
	for (int i = 0; i < n; i++)
		assert_true(ids[i] < NR_DEVS && m->exists[ids[i]]);
	assert_int_equal(tfs_pmd_transaction_id(pmd), m->trans_id);

	for (tfs_dev_id d = 0; d < NR_DEVS; d++) {
		struct tfs_td *td;
		if (!m->exists[d]) {
			assert_int_equal(tfs_pmd_open_thin(pmd, d, &td), -ENODATA);
			continue;
		}
		assert_int_equal(tfs_pmd_open_thin(pmd, d, &td), 0);
		uint64_t mapped = 0;
		static struct tfs_thin_mapping runs[NR_VBLOCKS];
		int got = tfs_thin_lookup_range(td, 0, NR_VBLOCKS, NR_VBLOCKS, runs);
		assert_true(got >= 0);
		int j = 0;
		for (uint64_t v = 0; v < NR_VBLOCKS; v++) {
			if (!m->map[d][v])
				continue;
			mapped++;
			assert_true(j < got);
			assert_int_equal(runs[j].vblock, v);
			assert_int_equal(runs[j].data_block, m->map[d][v] - 1);
			j++;
			if (!used[m->map[d][v] - 1]++)
				distinct++;
		}
		assert_int_equal(j, got);
		assert_int_equal(tfs_td_mapped_blocks(td), mapped);
		struct tfs_thin_tree_shape sh;
		assert_int_equal(tfs_thin_tree_shape(td, &sh), 0);
		assert_int_equal(sh.mappings, mapped);
		assert_int_equal(sh.leaf_capacity, 252);
		assert_true(sh.depth >= 1 && sh.leaves >= 1 && sh.leaves * 252 >= mapped);
		/* Single lookups agree with the range lookup. */
		for (int k = 0; k < 20; k++) {
			uint64_t v = rnd(NR_VBLOCKS);
			struct tfs_thin_mapping mp;
			int r = tfs_thin_lookup(td, v, &mp);
			if (m->map[d][v]) {
				assert_int_equal(r, 0);
				assert_int_equal(mp.data_block, m->map[d][v] - 1);
			} else {
				assert_int_equal(r, -ENODATA);
			}
		}
		tfs_pmd_close_thin(td);
	}
	/* A data block is in use exactly when some device maps it. */
	for (uint64_t b = 0; b < NR_DATA; b++) {
		uint32_t c;
		assert_int_equal(tfs_pmd_data_block_count(pmd, b, &c), 0);
		if (used[b])
			assert_true(c >= 1 && c <= used[b]);
		else
			assert_int_equal(c, 0);
	}
	struct tfs_pmd_space sp;
	tfs_pmd_space(pmd, &sp);
	assert_int_equal(sp.data_total, NR_DATA);
	assert_int_equal(sp.data_free, NR_DATA - distinct);
}

/* ---- random operations --------------------------------------------------- */

static int pick_dev(const struct model *m, bool exists)
{
	for (int tries = 0; tries < 20; tries++) {
		int d = (int)rnd(NR_DEVS);
		if (m->exists[d] == exists)
			return d;
	}
	return -1;
}

static void op_write(struct tfs_pmd *pmd, struct model *m)
{
	int d = pick_dev(m, true);
	if (d < 0)
		return;
	struct tfs_td *td;
	assert_int_equal(tfs_pmd_open_thin(pmd, (tfs_dev_id)d, &td), 0);
	uint64_t start = rnd(NR_VBLOCKS), len = 1 + rnd(64);
	for (uint64_t v = start; v < start + len && v < NR_VBLOCKS; v++) {
		uint64_t b;
		assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
		assert_int_equal(tfs_thin_insert(td, v, b), 0);
		m->map[d][v] = b + 1;
	}
	tfs_pmd_close_thin(td);
}

static void op_unmap(struct tfs_pmd *pmd, struct model *m)
{
	int d = pick_dev(m, true);
	if (d < 0)
		return;
	struct tfs_td *td;
	assert_int_equal(tfs_pmd_open_thin(pmd, (tfs_dev_id)d, &td), 0);
	uint64_t start = rnd(NR_VBLOCKS), len = rnd(4) ? 1 + rnd(8) : 1 + rnd(1500);
	uint64_t end = start + len > NR_VBLOCKS ? NR_VBLOCKS : start + len, want = 0, got = 0;
	if (len == 1) {
		int r = tfs_thin_remove(td, start);
		assert_int_equal(r, m->map[d][start] ? 0 : -ENODATA);
		m->map[d][start] = 0;
	} else {
		for (uint64_t v = start; v < end; v++) {
			want += !!m->map[d][v];
			m->map[d][v] = 0;
		}
		assert_int_equal(tfs_thin_remove_range(td, start, end, &got), 0);
		assert_int_equal(got, want);
	}
	tfs_pmd_close_thin(td);
}

static void op_create(struct tfs_pmd *pmd, struct model *m)
{
	int d = pick_dev(m, false);
	if (d < 0)
		return;
	int origin = rnd(2) ? pick_dev(m, true) : -1;
	if (origin >= 0) {
		assert_int_equal(tfs_pmd_create_snap(pmd, (tfs_dev_id)d, (tfs_dev_id)origin), 0);
		memcpy(m->map[d], m->map[origin], sizeof(m->map[d]));
	} else {
		assert_int_equal(tfs_pmd_create_thin(pmd, (tfs_dev_id)d), 0);
		memset(m->map[d], 0, sizeof(m->map[d]));
	}
	m->exists[d] = true;
}

static void op_delete(struct tfs_pmd *pmd, struct model *m)
{
	int d = pick_dev(m, true);
	if (d < 0)
		return;
	assert_int_equal(tfs_pmd_delete_thin(pmd, (tfs_dev_id)d), 0);
	m->exists[d] = false;
	memset(m->map[d], 0, sizeof(m->map[d]));
}

static void test_random_operations_match_the_model(void **state)
{
	(void)state;
	struct tfs_bdev *dev = new_file_dev(4096ull * 4096);
	struct tfs_pmd *pmd;
	static struct model m, committed;

	memset(&m, 0, sizeof(m));
	assert_int_equal(tfs_pmd_format(dev, &default_opt, &pmd), 0);
	committed = m;
	for (int i = 0; i < 3000; i++) {
		uint32_t op = rnd(100);
		if (op < 45)
			op_write(pmd, &m);
		else if (op < 60)
			op_unmap(pmd, &m);
		else if (op < 72)
			op_create(pmd, &m);
		else if (op < 78)
			op_delete(pmd, &m);
		else if (op < 90) {
			m.trans_id++;
			assert_int_equal(tfs_pmd_set_transaction_id(pmd, m.trans_id - 1, m.trans_id), 0);
			assert_int_equal(tfs_pmd_commit(pmd), 0);
			committed = m;
		} else if (op < 95) {
			assert_int_equal(tfs_pmd_abort(pmd), 0);
			m = committed;
		} else {
			assert_int_equal(tfs_pmd_commit(pmd), 0);
			committed = m;
			tfs_pmd_close(pmd);
			assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), 0);
		}
		if (i % 250 == 0)
			verify(pmd, &m);
	}
	verify(pmd, &m);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), 0);
	verify(pmd, &m);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	unlink(tmp_path);
}

/* ---- specific behaviour ------------------------------------------------ */

static void test_format_refuses_bad_data_block_sizes(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;
	uint32_t bad[] = { 0, 64, 127, 129, 200, 4194304 };
	assert_int_equal(tfs_bdev_open_mem(1 << 20, &dev), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct tfs_pmd_options o = default_opt;
		o.data_block_sectors = bad[i];
		assert_int_equal(tfs_pmd_format(dev, &o, &pmd), -EINVAL);
	}
	struct tfs_pmd_options o = default_opt;
	o.data_block_sectors = 2097152;
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_open_refuses_foreign_or_mismatched_metadata(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;
	uint8_t sb[TFS_BLOCK_SIZE];

	assert_int_equal(tfs_bdev_open_mem(1 << 20, &dev), 0);
	assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), -EINVAL); /* all zero */
	assert_int_equal(tfs_pmd_format(dev, &default_opt, &pmd), 0);
	tfs_pmd_close(pmd);

	struct tfs_pmd_options o = default_opt;
	o.data_block_sectors = 256;
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), -EINVAL);
	o.data_block_sectors = 0; /* accept what is stored */
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_data_block_sectors(pmd), 128);
	tfs_pmd_close(pmd);

	assert_int_equal(tfs_bdev_read(dev, sb, sizeof(sb), 0), 0);
	sb[offsetof(struct tfs_disk_thin_sb, incompat_flags)] = 4;
	assert_int_equal(tfs_bdev_write(dev, sb, sizeof(sb), 0), 0);
	/* Unsealed: checksum error; the refusal names the problem either way. */
	assert_true(tfs_pmd_open(dev, &default_opt, &pmd) < 0);
	tfs_bdev_close(dev);
}

static void test_device_ids_are_24_bit_and_unique(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 256);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), -EEXIST);
	assert_int_equal(tfs_pmd_create_snap(pmd, 1, 1), -EEXIST);
	assert_int_equal(tfs_pmd_create_thin(pmd, TFS_MAX_DEV_ID), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, TFS_MAX_DEV_ID + 1), -EINVAL);
	assert_int_equal(tfs_pmd_create_snap(pmd, 5, 4), -ENODATA);
	assert_int_equal(tfs_pmd_delete_thin(pmd, 4), -ENODATA);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_snapshot_shares_blocks_and_writes_break_sharing(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 1024);
	struct tfs_td *origin, *snap;
	struct tfs_thin_mapping mp;
	struct tfs_thin_details d;
	uint32_t c;
	uint64_t b;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &origin), 0);
	for (uint64_t v = 0; v < 1000; v++) {
		assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
		assert_int_equal(tfs_thin_insert(origin, v, b), 0);
	}
	assert_int_equal(tfs_thin_lookup(origin, 10, &mp), 0);
	assert_false(mp.shared);
	uint32_t t0 = tfs_pmd_time(pmd);
	assert_int_equal(tfs_pmd_create_snap(pmd, 2, 1), 0);
	assert_int_equal(tfs_pmd_time(pmd), t0 + 1);
	assert_int_equal(tfs_pmd_device_details(pmd, 2, &d), 0);
	assert_int_equal(d.mapped_blocks, 1000);
	assert_int_equal(d.creation_time, t0 + 1);
	assert_int_equal(tfs_pmd_device_details(pmd, 1, &d), 0);
	assert_int_equal(d.snapshotted_time, t0 + 1);

	/* Same data, now marked shared; the data counts are per leaf, so still 1. */
	assert_int_equal(tfs_pmd_open_thin(pmd, 2, &snap), 0);
	assert_int_equal(tfs_thin_lookup(origin, 10, &mp), 0);
	assert_true(mp.shared);
	uint64_t old10 = mp.data_block;
	assert_int_equal(tfs_thin_lookup(snap, 10, &mp), 0);
	assert_int_equal(mp.data_block, old10);
	assert_true(mp.shared);
	assert_int_equal(tfs_pmd_data_block_count(pmd, old10, &c), 0);
	assert_int_equal(c, 1);

	/* A write to the origin remaps it; the snapshot still sees the old block. */
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
	assert_int_equal(tfs_thin_insert(origin, 10, b), 0);
	assert_int_equal(tfs_thin_lookup(origin, 10, &mp), 0);
	assert_int_equal(mp.data_block, b);
	assert_false(mp.shared);
	assert_int_equal(tfs_thin_lookup(snap, 10, &mp), 0);
	assert_int_equal(mp.data_block, old10);
	assert_int_equal(tfs_pmd_data_block_count(pmd, old10, &c), 0);
	assert_int_equal(c, 1);
	assert_int_equal(tfs_pmd_data_block_count(pmd, b, &c), 0);
	assert_int_equal(c, 1);
	/* A neighbour in the copied leaf is now referenced by two leaves. */
	assert_int_equal(tfs_thin_lookup(origin, 11, &mp), 0);
	assert_int_equal(tfs_pmd_data_block_count(pmd, mp.data_block, &c), 0);
	assert_int_equal(c, 2);

	/* Deleting the snapshot hands its exclusive blocks back. */
	tfs_pmd_close_thin(snap);
	struct tfs_pmd_space before, after;
	tfs_pmd_space(pmd, &before);
	assert_int_equal(tfs_pmd_delete_thin(pmd, 2), 0);
	tfs_pmd_space(pmd, &after);
	assert_int_equal(after.data_free, before.data_free + 1); /* old10 */
	assert_int_equal(tfs_pmd_data_block_count(pmd, mp.data_block, &c), 0);
	assert_int_equal(c, 1);
	tfs_pmd_close_thin(origin);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_mark_shared_makes_cloned_mappings_shared_on_both_sides(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 1024);
	struct tfs_td *a, *b;
	struct tfs_thin_mapping mp;
	struct tfs_thin_details d;
	uint64_t blk, other;
	uint32_t c, t0;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 2), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &a), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 2, &b), 0);
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &blk), 0);
	assert_int_equal(tfs_thin_insert(a, 0, blk), 0);

	/* A clone of block 0 of a to block 7 of b: mark, then map at the time before it. */
	t0 = tfs_pmd_time(pmd);
	assert_int_equal(tfs_thin_mark_shared(a, b), 0);
	assert_int_equal(tfs_pmd_time(pmd), t0 + 1);
	assert_int_equal(tfs_pmd_data_block_inc(pmd, blk), 0);
	assert_int_equal(tfs_thin_insert_timed(b, 7, blk, t0), 0);
	assert_int_equal(tfs_pmd_data_block_count(pmd, blk, &c), 0);
	assert_int_equal(c, 2);
	assert_int_equal(tfs_thin_lookup(a, 0, &mp), 0);
	assert_true(mp.shared);
	assert_int_equal(tfs_thin_lookup(b, 7, &mp), 0);
	assert_true(mp.shared);
	assert_int_equal(mp.data_block, blk);

	/* What either maps from now on is its own; a rewrite releases one reference. */
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &other), 0);
	assert_int_equal(tfs_thin_insert(b, 7, other), 0);
	assert_int_equal(tfs_thin_lookup(b, 7, &mp), 0);
	assert_false(mp.shared);
	assert_int_equal(tfs_pmd_data_block_count(pmd, blk, &c), 0);
	assert_int_equal(c, 1);

	/* Saved with the details at commit, undone by an abort. */
	tfs_pmd_close_thin(b);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	assert_int_equal(tfs_pmd_device_details(pmd, 2, &d), 0);
	assert_int_equal(d.snapshotted_time, t0 + 1);
	assert_int_equal(tfs_thin_mark_shared(a, a), 0);
	assert_int_equal(tfs_pmd_abort(pmd), 0);
	assert_int_equal(tfs_pmd_time(pmd), t0 + 1);
	assert_int_equal(tfs_pmd_device_details(pmd, 1, &d), 0);
	assert_int_equal(d.snapshotted_time, t0 + 1);
	tfs_pmd_close_thin(a);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_freed_data_blocks_are_not_reused_before_commit(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 2048);
	struct tfs_pmd_options o = default_opt;
	struct tfs_td *td;
	uint64_t b, first;

	tfs_pmd_close(pmd);
	o.nr_data_blocks = 0;
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 0), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 0, &td), 0);
	for (uint64_t v = 0; v < NR_DATA; v++) {
		assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
		assert_int_equal(tfs_thin_insert(td, v, b), 0);
	}
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), -ENOSPC);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	assert_int_equal(tfs_thin_lookup(td, 7, &(struct tfs_thin_mapping){ 0 }), 0);
	struct tfs_thin_mapping mp;
	assert_int_equal(tfs_thin_lookup(td, 7, &mp), 0);
	first = mp.data_block;
	assert_int_equal(tfs_thin_remove(td, 7), 0);
	/* Free now, but the committed mapping still points at it. */
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), -ENOSPC);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
	assert_int_equal(b, first);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_abort_returns_to_the_last_commit(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 256);
	struct tfs_td *td;
	struct tfs_thin_mapping mp;
	uint64_t b;

	assert_int_equal(tfs_pmd_create_thin(pmd, 3), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 3, &td), 0);
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
	assert_int_equal(tfs_thin_insert(td, 5, b), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 4), 0);
	assert_int_equal(tfs_pmd_abort(pmd), 0);
	assert_int_equal(tfs_thin_lookup(td, 5, &mp), -ENODATA);
	assert_int_equal(tfs_td_mapped_blocks(td), 0);
	struct tfs_thin_details d;
	assert_int_equal(tfs_pmd_device_details(pmd, 4, &d), -ENODATA);
	struct tfs_pmd_space sp;
	tfs_pmd_space(pmd, &sp);
	assert_int_equal(sp.data_free, sp.data_total);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_transaction_id_is_compare_and_swap(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 256);
	assert_int_equal(tfs_pmd_set_transaction_id(pmd, 1, 2), -EINVAL);
	assert_int_equal(tfs_pmd_set_transaction_id(pmd, 0, 7), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), 0);
	assert_int_equal(tfs_pmd_transaction_id(pmd), 7);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_needs_check_persists_outside_transactions(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 256);
	assert_false(tfs_pmd_needs_check(pmd));
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0); /* uncommitted */
	assert_int_equal(tfs_pmd_set_needs_check(pmd, true), 0);
	tfs_pmd_close(pmd);
	assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), 0);
	assert_true(tfs_pmd_needs_check(pmd));
	struct tfs_thin_details d;
	assert_int_equal(tfs_pmd_device_details(pmd, 1, &d), -ENODATA);
	assert_int_equal(tfs_pmd_set_needs_check(pmd, false), 0);
	tfs_pmd_close(pmd);
	assert_int_equal(tfs_pmd_open(dev, &default_opt, &pmd), 0);
	assert_false(tfs_pmd_needs_check(pmd));
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_metadata_snapshot_holds_the_old_roots(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 1024);
	struct tfs_td *td;
	struct tfs_pmd_space s0, s1;
	uint64_t b;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	for (uint64_t v = 0; v < 600; v++) {
		assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
		assert_int_equal(tfs_thin_insert(td, v, b), 0);
	}
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_space(pmd, &s0);
	assert_int_equal(tfs_pmd_reserve_metadata_snap(pmd), 0);
	assert_true(tfs_pmd_held_root(pmd) != 0);
	assert_int_equal(tfs_pmd_reserve_metadata_snap(pmd), -EBUSY);
	assert_int_equal(tfs_thin_remove_range(td, 0, 600, NULL), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	assert_int_equal(tfs_pmd_release_metadata_snap(pmd), 0);
	assert_int_equal(tfs_pmd_held_root(pmd), 0);
	assert_int_equal(tfs_pmd_release_metadata_snap(pmd), -EINVAL);
	tfs_pmd_space(pmd, &s1);
	assert_int_equal(s1.data_free, s1.data_total);
	assert_true(s1.meta_free + 4 >= s0.meta_free);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

/* ---- shrinking the data device ------------------------------------------ */

#define SHRINK_META_BLOCKS 2048

/*
 * The metadata file at tmp_path must pass our checker with exact hints
 * (strict) and, when installed, thin_check 0.9.0.
 */
static void assert_metadata_clean(void)
{
	struct tfs_check_opts opts = { .strict = true, .out = stderr };
	struct tfs_check_result res;
	struct tfs_bdev *dev;
	char cmd[160];
	int st;

	assert_int_equal(tfs_bdev_open(tmp_path, true, &dev), 0);
	assert_int_equal(tfs_check_metadata(dev, &opts, &res), 0);
	tfs_bdev_close(dev);
	assert_int_equal(res.errors, 0);
	assert_int_equal(res.warnings, 0);
	if (access("/usr/sbin/thin_check", X_OK) == 0) {
		snprintf(cmd, sizeof(cmd), "/usr/sbin/thin_check -q %s", tmp_path);
		st = system(cmd);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
}

static struct tfs_pmd *reopen_data(struct tfs_pmd *pmd, struct tfs_bdev *dev)
{
	struct tfs_pmd_options o = default_opt;

	if (pmd)
		tfs_pmd_close(pmd);
	o.nr_data_blocks = 0;
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), 0);
	return pmd;
}

/* Commit, close, require clean metadata, open again. */
static struct tfs_pmd *commit_check_reopen(struct tfs_pmd *pmd, struct tfs_bdev *dev)
{
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	assert_metadata_clean();
	return reopen_data(NULL, dev);
}

static void assert_data_space(struct tfs_pmd *pmd, uint64_t total, uint64_t free_blocks)
{
	struct tfs_pmd_space sp;

	tfs_pmd_space(pmd, &sp);
	assert_int_equal(sp.data_total, total);
	assert_int_equal(sp.data_free, free_blocks);
}

/* Map vblock -> block of a data block the test picks (not the allocator). */
static void map_block(struct tfs_td *td, struct tfs_pmd *pmd, uint64_t vblock, uint64_t block)
{
	assert_int_equal(tfs_pmd_data_block_inc(pmd, block), 0);
	assert_int_equal(tfs_thin_insert(td, vblock, block), 0);
}

/* Gathers the runs tfs_pmd_walk_free_data reports. */
struct runs {
	uint64_t begin[16], len[16];
	unsigned nr;
};

static int note_run(void *arg, uint64_t begin, uint64_t len)
{
	struct runs *r = arg;

	if (r->nr == 16)
		return -E2BIG;
	r->begin[r->nr] = begin;
	r->len[r->nr++] = len;
	return 0;
}

static void test_walk_free_data_reports_each_free_run_whole(void **state)
{
	struct tfs_pmd_options o = default_opt;
	struct tfs_bdev *dev = new_file_dev(SHRINK_META_BLOCKS * TFS_BLOCK_SIZE);
	struct runs runs = { 0 };
	struct tfs_pmd *pmd;

	(void)state;
	o.nr_data_blocks = NR_DATA; /* three bitmaps: runs cross their edges */
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_walk_free_data(pmd, note_run, &runs), 0);
	assert_int_equal(runs.nr, 1);
	assert_int_equal(runs.begin[0], 0);
	assert_int_equal(runs.len[0], NR_DATA);

	/*
	 * Used: 0, 5..6, 16383..16384, the last block; one freed again.  The
	 * run 7..16382 crosses the end of the first bitmap (16320 entries).
	 */
	uint64_t used[] = { 0, 5, 6, 100, 16383, 16384, NR_DATA - 1 };

	for (unsigned i = 0; i < sizeof(used) / sizeof(used[0]); i++)
		assert_int_equal(tfs_pmd_data_block_inc(pmd, used[i]), 0);
	assert_int_equal(tfs_pmd_free_data_block(pmd, 100), 0);
	runs.nr = 0;
	assert_int_equal(tfs_pmd_walk_free_data(pmd, note_run, &runs), 0);
	assert_int_equal(runs.nr, 3);
	assert_int_equal(runs.begin[0], 1);
	assert_int_equal(runs.len[0], 4);
	assert_int_equal(runs.begin[1], 7);
	assert_int_equal(runs.len[1], 16383 - 7);
	assert_int_equal(runs.begin[2], 16385);
	assert_int_equal(runs.len[2], NR_DATA - 1 - 16385);

	/* The walker's callback can stop it. */
	runs.nr = 16;
	assert_int_equal(tfs_pmd_walk_free_data(pmd, note_run, &runs), -E2BIG);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_shrink_data_down_to_the_highest_used_block(void **state)
{
	struct tfs_pmd_options o = default_opt;
	struct tfs_bdev *dev = new_file_dev(SHRINK_META_BLOCKS * TFS_BLOCK_SIZE);
	uint64_t highest, b, removed;
	struct tfs_pmd *pmd;
	struct tfs_td *td;
	uint32_t c;

	(void)state;
	o.nr_data_blocks = NR_DATA; /* three bitmaps */
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	for (uint64_t v = 0; v < 100; v++) {
		assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
		assert_int_equal(tfs_thin_insert(td, v, b), 0);
	}
	tfs_pmd_close_thin(td);
	assert_int_equal(tfs_pmd_commit(pmd), 0);

	/* Refused below the highest used block: nothing changes, the transaction goes on. */
	assert_int_equal(tfs_pmd_shrink_data(pmd, 50, &highest), -EINVAL);
	assert_int_equal(highest, 99);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 99, NULL), -EINVAL);
	assert_int_equal(tfs_pmd_shrink_data(pmd, NR_DATA + 1, NULL), -EINVAL);
	assert_data_space(pmd, NR_DATA, NR_DATA - 100);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	pmd = reopen_data(pmd, dev);
	assert_data_space(pmd, NR_DATA, NR_DATA - 100);

	/* Down to exactly highest + 1, committed. */
	assert_int_equal(tfs_pmd_shrink_data(pmd, 100, &highest), 0);
	assert_int_equal(highest, 99);
	assert_data_space(pmd, 100, 0);
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), -ENOSPC);
	pmd = commit_check_reopen(pmd, dev);
	assert_data_space(pmd, 100, 0);
	assert_int_equal(tfs_pmd_data_block_count(pmd, 99, &c), 0);
	assert_int_equal(c, 1);
	assert_int_equal(tfs_pmd_data_block_count(pmd, 100, &c), -EINVAL);

	/*
	 * Blocks freed in this transaction (still mapped by the last commit)
	 * may be cut off; not committing is like a crash: the old size stays.
	 */
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	assert_int_equal(tfs_thin_remove_range(td, 60, 100, &removed), 0);
	assert_int_equal(removed, 40);
	tfs_pmd_close_thin(td);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 60, &highest), 0);
	assert_int_equal(highest, 59);
	assert_data_space(pmd, 60, 0);
	pmd = reopen_data(pmd, dev);
	assert_data_space(pmd, 100, 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	assert_int_equal(tfs_thin_remove_range(td, 60, 100, &removed), 0);
	tfs_pmd_close_thin(td);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 60, NULL), 0);
	pmd = commit_check_reopen(pmd, dev);

	/* Grow again: the new blocks are free and allocated after the kept ones. */
	assert_data_space(pmd, 60, 0);
	assert_int_equal(tfs_pmd_resize_data(pmd, NR_DATA), 0);
	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
	assert_true(b >= 60);
	assert_int_equal(tfs_pmd_free_data_block(pmd, b), 0);
	pmd = commit_check_reopen(pmd, dev);
	assert_data_space(pmd, NR_DATA, NR_DATA - 60);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	unlink(tmp_path);
}

static void test_shrink_data_across_bitmaps(void **state)
{
	const uint64_t E = TFS_ENTRIES_PER_BITMAP;
	const uint64_t big = 20 * E + 123, high = 5 * E + 7;
	struct tfs_pmd_options o = default_opt;
	struct tfs_bdev *dev = new_file_dev(SHRINK_META_BLOCKS * TFS_BLOCK_SIZE);
	struct tfs_pmd_space before, after;
	uint64_t highest;
	struct tfs_pmd *pmd;
	struct tfs_td *td;
	uint32_t c;

	(void)state;
	o.nr_data_blocks = big; /* 21 bitmaps, the last one partial */
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	map_block(td, pmd, 0, 3 * E + 1);
	map_block(td, pmd, 1, high);
	map_block(td, pmd, 2, 0);
	tfs_pmd_close_thin(td);
	/* A snapshot shares the leaf: counts stay 1, and the snapshot keeps them in use. */
	assert_int_equal(tfs_pmd_create_snap(pmd, 2, 1), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);

	assert_int_equal(tfs_pmd_shrink_data(pmd, high, &highest), -EINVAL);
	assert_int_equal(highest, high);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 2 * E, &highest), -EINVAL);
	assert_int_equal(highest, high);
	assert_data_space(pmd, big, big - 3);
	/* Delete the origin: the snapshot still holds the blocks. */
	assert_int_equal(tfs_pmd_delete_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_shrink_data(pmd, high, &highest), -EINVAL);
	assert_int_equal(highest, high);

	tfs_pmd_space(pmd, &before);
	assert_int_equal(tfs_pmd_shrink_data(pmd, high + 1, &highest), 0);
	assert_data_space(pmd, high + 1, high + 1 - 3);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_space(pmd, &after);
	/* Fifteen bitmaps given back (less what the shadowed index tree took). */
	assert_true(after.meta_free > before.meta_free);
	tfs_pmd_close(pmd);
	assert_metadata_clean();

	pmd = reopen_data(NULL, dev);
	assert_data_space(pmd, high + 1, high + 1 - 3);
	assert_int_equal(tfs_pmd_data_block_count(pmd, high, &c), 0);
	assert_int_equal(c, 1);
	assert_int_equal(tfs_pmd_data_block_count(pmd, high + 1, &c), -EINVAL);

	/* Grown and shrunk again inside one transaction: the new bitmaps go back unused. */
	assert_int_equal(tfs_pmd_resize_data(pmd, big), 0);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 4 * E + 1, &highest), -EINVAL);
	assert_int_equal(tfs_pmd_shrink_data(pmd, 6 * E, &highest), 0);
	assert_data_space(pmd, 6 * E, 6 * E - 3);
	pmd = commit_check_reopen(pmd, dev);

	/* Back to the full size; every block past the old end is free. */
	assert_int_equal(tfs_pmd_resize_data(pmd, big), 0);
	pmd = commit_check_reopen(pmd, dev);
	assert_data_space(pmd, big, big - 3);
	assert_int_equal(tfs_pmd_data_block_count(pmd, big - 1, &c), 0);
	assert_int_equal(c, 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	unlink(tmp_path);
}

static void test_resize_grows_and_refuses_to_shrink(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;
	struct tfs_pmd_options o = default_opt;
	struct tfs_pmd_space sp;

	assert_int_equal(tfs_bdev_open_mem(128 * TFS_BLOCK_SIZE, &dev), 0);
	o.nr_data_blocks = 100;
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_resize_data(pmd, 50), -EINVAL);
	assert_int_equal(tfs_pmd_resize_data(pmd, 100000), 0);
	assert_int_equal(tfs_pmd_resize_metadata(pmd, 64), -EINVAL);
	assert_int_equal(tfs_pmd_resize_metadata(pmd, 256), -EINVAL); /* device too small */
	assert_int_equal(tfs_bdev_grow(dev, 40000ull * TFS_BLOCK_SIZE), 0);
	assert_int_equal(tfs_pmd_resize_metadata(pmd, 40000), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	o.nr_data_blocks = 0;
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), 0);
	tfs_pmd_space(pmd, &sp);
	assert_int_equal(sp.data_total, 100000);
	assert_int_equal(sp.meta_total, 40000);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_metadata_exhaustion_is_enospc(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 48);
	struct tfs_td *td;
	uint64_t b;
	int r = 0;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	/* Sparse vblocks: one leaf entry each, so metadata runs out long before data. */
	for (uint64_t v = 0; v < NR_DATA && !r; v++) {
		r = tfs_pmd_alloc_data_block(pmd, &b);
		if (!r)
			r = tfs_thin_insert(td, v * 1000, b);
	}
	assert_int_equal(r, -ENOSPC);
	assert_int_equal(tfs_pmd_abort(pmd), 0);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

/* ---- fault sweep -------------------------------------------------------- */

static void fill_base(struct tfs_pmd *pmd, struct model *m)
{
	for (int i = 0; i < 40; i++)
		op_create(pmd, m), op_write(pmd, m), op_write(pmd, m);
}

static void random_ops(struct tfs_pmd *pmd, struct model *m, int n)
{
	for (int i = 0; i < n; i++) {
		uint32_t op = rnd(10);
		if (op < 5)
			op_write(pmd, m);
		else if (op < 7)
			op_unmap(pmd, m);
		else if (op < 9)
			op_create(pmd, m);
		else
			op_delete(pmd, m);
	}
}

/*
 * The commit in three steps as the pool runs it, with the next transaction
 * (next_m, transaction id 3) made between begin and write: its changes,
 * and its dirty blocks that the small cache evicts to the device
 * meanwhile, must leave both the old and the committing state intact.
 * The fault is armed only after them: N counts the commit's own writes.
 * (That the allocator hands out no block the committing transaction used,
 * even once it wraps, is test-space-map's held-blocks test.)
 */
static int commit_with_next_transaction(struct tfs_pmd *pmd, struct tfs_bdev *f, uint64_t n,
					struct model *next_m)
{
	struct tfs_bdev_io_counts before, after;
	struct tfs_pmd_commit *c;
	int r;

	assert_int_equal(tfs_pmd_commit_begin(pmd, &c), 0);
	tfs_bdev_fault_counts(f, &before);
	random_ops(pmd, next_m, 30);
	tfs_bdev_fault_counts(f, &after);
	assert_true(after.writes > before.writes); /* the case this is about: blocks evicted */
	next_m->trans_id = 3;
	assert_int_equal(tfs_pmd_set_transaction_id(pmd, 2, 3), 0);
	tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_EIO, n, false);
	r = tfs_pmd_commit_end(pmd, c, tfs_pmd_commit_write(c));
	if (!r)
		tfs_pmd_release_freed_data(pmd);
	return r;
}

/*
 * For N = 0, 1, 2, ...: prepare a transaction on top of a committed one,
 * fail the (N+1)th metadata write of its commit (write error, or a power
 * cut that drops or tears what was not flushed), reopen: the pool must be
 * exactly the old or the new transaction.  Ends when a commit completes.
 * With overlap, the next transaction runs during the commit's I/O; once
 * the commit completes it is committed too and must be what reopens.
 */
static void sweep(bool power_cut, bool overlap)
{
	static struct model old_m, new_m, next_m;
	struct tfs_pmd_options opt = default_opt;
	bool done = false;

	if (overlap)
		opt.cache_blocks = 16; /* the smallest: the next transaction's blocks get evicted */

	for (uint64_t n = 0; !done; n++) {
		struct tfs_bdev *file = new_file_dev(512ull * 4096), *f;
		struct tfs_pmd *pmd;
		memset(&old_m, 0, sizeof(old_m));
		rng_state = 777;
		assert_int_equal(tfs_bdev_fault_wrap(file, power_cut, &f), 0);
		assert_int_equal(tfs_pmd_format(f, &opt, &pmd), 0);
		fill_base(pmd, &old_m);
		old_m.trans_id = 1;
		assert_int_equal(tfs_pmd_set_transaction_id(pmd, 0, 1), 0);
		assert_int_equal(tfs_pmd_commit(pmd), 0);

		new_m = old_m;
		random_ops(pmd, &new_m, 30);
		new_m.trans_id = 2;
		assert_int_equal(tfs_pmd_set_transaction_id(pmd, 1, 2), 0);
		next_m = new_m;
		int r;
		if (overlap) {
			r = commit_with_next_transaction(pmd, f, n, &next_m);
		} else {
			tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_EIO, n, false);
			r = tfs_pmd_commit(pmd);
		}
		if (!r && overlap && !power_cut) {
			tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
			assert_int_equal(tfs_pmd_commit(pmd), 0);
		}
		if (r && !power_cut) {
			/* Abort in place must land exactly on the old transaction and go on working. */
			tfs_bdev_fault_set(f, TFS_FAULT_WRITE, TFS_FAULT_OK, 0, false);
			assert_int_equal(tfs_pmd_abort(pmd), 0);
			verify(pmd, &old_m);
			op_write(pmd, &old_m);
			op_create(pmd, &old_m);
			assert_int_equal(tfs_pmd_commit(pmd), 0);
			verify(pmd, &old_m);
		}
		if (power_cut)
			assert_int_equal(tfs_bdev_fault_power_cut(f, n % 2, (uint32_t)n + 1), 0);
		tfs_pmd_close(pmd);
		tfs_bdev_close(f);
		done = r == 0;

		struct tfs_bdev *again;
		assert_int_equal(tfs_bdev_open(tmp_path, false, &again), 0);
		assert_int_equal(tfs_pmd_open(again, &default_opt, &pmd), 0);
		uint64_t tid = tfs_pmd_transaction_id(pmd);
		if (done && !power_cut)
			assert_int_equal(tid, overlap ? 3 : 2);
		else
			assert_true(tid == 1 || tid == 2);
		verify(pmd, tid == 1 ? &old_m : tid == 2 ? &new_m : &next_m);
		tfs_pmd_close(pmd);
		tfs_bdev_close(again);
		if (overlap)
			assert_metadata_clean();
		unlink(tmp_path);
		assert_true(n < 100000);
	}
}

static void test_failed_commit_leaves_old_or_new_transaction(void **state)
{
	(void)state;
	sweep(false, false);
}

static void test_power_cut_during_commit_leaves_old_or_new_transaction(void **state)
{
	(void)state;
	sweep(true, false);
}

static void test_failed_commit_with_the_next_transaction_running_leaves_old_or_new(void **state)
{
	(void)state;
	sweep(false, true);
}

static void test_power_cut_with_the_next_transaction_running_leaves_old_or_new(void **state)
{
	(void)state;
	sweep(true, true);
}


/* ---- diff ------------------------------------------------------------------ */

struct diff_run {
	uint64_t begin, len;
	bool zero;
};

struct diff_runs {
	struct diff_run *v;
	unsigned nr, cap;
};

static int note_diff_run(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct diff_runs *r = ctx;

	if (r->nr == r->cap) {
		r->cap = r->cap ? 2 * r->cap : 64;
		r->v = realloc(r->v, r->cap * sizeof(*r->v));
		assert_non_null(r->v);
	}
	r->v[r->nr++] = (struct diff_run){ vblock, len, zero };
	return 0;
}

/* The whole diff in steps of step_reads nodes; returns the nodes read. */
static uint64_t run_diff(struct tfs_pmd *pmd, bool has_from, tfs_dev_id from, tfs_dev_id to,
			 unsigned step_reads, struct diff_runs *out)
{
	struct tfs_thin_diff *d;
	uint64_t reads;
	int r;

	out->nr = 0;
	assert_int_equal(tfs_thin_diff_begin(pmd, has_from ? &from : NULL, &to, &d), 0);
	while ((r = tfs_thin_diff_step(d, step_reads, note_diff_run, out)) == 1)
		;
	assert_int_equal(r, 0);
	reads = tfs_thin_diff_nodes_read(d);
	tfs_thin_diff_end(d);
	return reads;
}

/* What the diff must say, from lookups of every block below nv. */
static void model_diff(struct tfs_pmd *pmd, bool has_from, tfs_dev_id from, tfs_dev_id to,
		       uint64_t nv, struct diff_runs *out)
{
	struct tfs_td *tf = NULL, *tt;
	struct diff_run cur = { 0 };
	bool open = false;

	out->nr = 0;
	assert_int_equal(tfs_pmd_open_thin(pmd, to, &tt), 0);
	if (has_from && from != to)
		assert_int_equal(tfs_pmd_open_thin(pmd, from, &tf), 0);
	else if (has_from)
		tf = tt;
	for (uint64_t v = 0; v < nv; v++) {
		struct tfs_thin_mapping a, b;
		bool in_a = tf && tfs_thin_lookup(tf, v, &a) == 0;
		bool in_b = tfs_thin_lookup(tt, v, &b) == 0;
		bool differs = in_b ? !in_a || a.data_block != b.data_block : in_a;

		if (open && (!differs || cur.zero != !in_b || cur.begin + cur.len != v)) {
			note_diff_run(out, cur.begin, cur.len, cur.zero);
			open = false;
		}
		if (!differs)
			continue;
		if (open) {
			cur.len++;
		} else {
			cur = (struct diff_run){ v, 1, !in_b };
			open = true;
		}
	}
	if (open)
		note_diff_run(out, cur.begin, cur.len, cur.zero);
	if (tf && tf != tt)
		tfs_pmd_close_thin(tf);
	tfs_pmd_close_thin(tt);
}

static void assert_runs_equal(const struct diff_runs *a, const struct diff_runs *b)
{
	assert_int_equal(a->nr, b->nr);
	for (unsigned i = 0; i < a->nr; i++) {
		assert_int_equal(a->v[i].begin, b->v[i].begin);
		assert_int_equal(a->v[i].len, b->v[i].len);
		assert_int_equal(a->v[i].zero, b->v[i].zero);
	}
}

static void map_new(struct tfs_pmd *pmd, struct tfs_td *td, uint64_t v)
{
	uint64_t b;

	assert_int_equal(tfs_pmd_alloc_data_block(pmd, &b), 0);
	assert_int_equal(tfs_thin_insert(td, v, b), 0);
}

static void test_diff_of_a_snapshot_reads_only_the_changed_paths(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 4096);
	struct tfs_thin_tree_shape shape;
	struct diff_runs got = { 0 };
	struct tfs_td *td;
	uint64_t reads;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	for (uint64_t v = 0; v < 30000; v++)
		map_new(pmd, td, v);
	assert_int_equal(tfs_pmd_create_snap(pmd, 2, 1), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	map_new(pmd, td, 100);
	map_new(pmd, td, 101);
	map_new(pmd, td, 20000);
	assert_int_equal(tfs_thin_remove(td, 25000), 0);
	assert_int_equal(tfs_thin_tree_shape(td, &shape), 0);
	assert_true(shape.depth >= 2 && shape.leaves > 100);

	/* The snapshot to the origin: the two rewrites and the discard. */
	reads = run_diff(pmd, true, 2, 1, 64, &got);
	assert_int_equal(got.nr, 3);
	assert_int_equal(got.v[0].begin, 100);
	assert_int_equal(got.v[0].len, 2);
	assert_false(got.v[0].zero);
	assert_int_equal(got.v[1].begin, 20000);
	assert_int_equal(got.v[1].len, 1);
	assert_false(got.v[1].zero);
	assert_int_equal(got.v[2].begin, 25000);
	assert_true(got.v[2].zero);
	/* The leftmost paths (begin), then one path per change on each side, at most. */
	assert_true(reads <= 2 * shape.depth + 3 * 2 * shape.depth);

	/* The other way round the discarded block is data again. */
	run_diff(pmd, true, 1, 2, 1, &got);
	assert_int_equal(got.nr, 3);
	assert_int_equal(got.v[2].begin, 25000);
	assert_false(got.v[2].zero);

	/* A tree against itself reads nothing; from nothing, every mapping. */
	assert_int_equal(run_diff(pmd, true, 2, 2, 64, &got), 0);
	assert_int_equal(got.nr, 0);
	reads = run_diff(pmd, false, 0, 1, 16, &got);
	assert_int_equal(got.nr, 2);
	assert_int_equal(got.v[0].begin, 0);
	assert_int_equal(got.v[0].len, 25000);
	assert_int_equal(got.v[1].begin, 25001);
	assert_int_equal(got.v[1].len, 4999);
	assert_true(reads >= shape.leaves);

	assert_int_equal(tfs_thin_diff_begin(pmd, &(tfs_dev_id){ 7 }, &(tfs_dev_id){ 1 },
					     &(struct tfs_thin_diff *){ 0 }),
			 -ENODATA);
	free(got.v);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

/*
 * The origin grows a level after the snapshot (its root splits): the walk
 * opens the taller side first, meets the snapshot's nodes again one level
 * down and still skips every leaf the two share.
 */
static void test_diff_skips_shared_leaves_after_the_origin_grows_a_level(void **state)
{
	(void)state;
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 8192);
	struct tfs_thin_tree_shape before, after;
	struct diff_runs got = { 0 };
	struct tfs_td *td;
	uint64_t v = 0, reads, grown;

	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	do {
		for (unsigned i = 0; i < 1000; i++, v++)
			map_block(td, pmd, v, v % 1000); /* more mappings than data blocks */
		assert_int_equal(tfs_thin_tree_shape(td, &before), 0);
	} while (before.depth < 2 || before.leaves < 40);
	assert_int_equal(tfs_pmd_create_snap(pmd, 2, 1), 0);
	grown = v;
	do {
		for (unsigned i = 0; i < 1000; i++, v++)
			map_block(td, pmd, v, v % 1000); /* more mappings than data blocks */
		assert_int_equal(tfs_thin_tree_shape(td, &after), 0);
	} while (after.depth == before.depth);

	reads = run_diff(pmd, true, 2, 1, 8, &got);
	assert_int_equal(got.nr, 1);
	assert_int_equal(got.v[0].begin, grown);
	assert_int_equal(got.v[0].len, v - grown);
	/* The new leaves and the path to them; none of the old leaves but the last. */
	assert_true(reads <= (after.leaves - before.leaves) + after.internal_nodes + 2 * after.depth + 4);
	assert_true(reads < after.leaves);
	free(got.v);
	tfs_pmd_close_thin(td);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

/*
 * Cold (the pool just opened), the diff reads ahead the nodes it is about
 * to open, in few device reads, and reads ahead nothing the two trees
 * share: the blocks the device gives are the nodes the walk reads plus
 * the few lookups that find the two trees.
 */
static void test_cold_diff_reads_ahead_only_the_nodes_it_opens(void **state)
{
	(void)state;
	struct tfs_pmd_options o = default_opt;
	struct tfs_bdev *mem, *dev;
	struct tfs_bdev_io_counts c0, c1;
	struct tfs_thin_tree_shape shape;
	struct diff_runs got = { 0 };
	struct tfs_pmd *pmd;
	struct tfs_td *td;
	uint64_t reads, blocks_read;

	o.cache_blocks = 4096;
	assert_int_equal(tfs_bdev_open_mem(8192 * TFS_BLOCK_SIZE, &mem), 0);
	assert_int_equal(tfs_bdev_fault_wrap(mem, false, &dev), 0);
	assert_int_equal(tfs_pmd_format(dev, &o, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	for (uint64_t v = 0; v < 80000; v++)
		map_block(td, pmd, v, v % 1000); /* more mappings than data blocks */
	assert_int_equal(tfs_pmd_create_snap(pmd, 2, 1), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	/* Changes in the first half only: the second half's leaves stay shared. */
	for (uint64_t v = 0; v < 40000; v += 400)
		map_block(td, pmd, v, 1000 + v / 400);
	assert_int_equal(tfs_thin_tree_shape(td, &shape), 0);
	assert_true(shape.depth >= 3);
	tfs_pmd_close_thin(td);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);

	o.nr_data_blocks = 0;
	assert_int_equal(tfs_pmd_open(dev, &o, &pmd), 0);
	tfs_bdev_fault_counts(dev, &c0);
	reads = run_diff(pmd, true, 2, 1, 64, &got);
	tfs_bdev_fault_counts(dev, &c1);
	assert_int_equal(got.nr, 100);
	blocks_read = (c1.read_bytes - c0.read_bytes) / TFS_BLOCK_SIZE;
	assert_true(reads > shape.leaves / 2 && reads < shape.leaves);
	printf("# cold diff: %llu nodes, %llu blocks from the device in %llu reads\n",
	       (unsigned long long)reads, (unsigned long long)blocks_read,
	       (unsigned long long)(c1.reads - c0.reads));
	assert_true(blocks_read <= reads + 8);
	assert_true(c1.reads - c0.reads < reads / 2);
	free(got.v);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

static void test_diff_matches_a_model_over_random_changes(void **state)
{
	(void)state;
	enum { NV = 2500, DEVS = 4 };
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd = format_mem(&dev, 4096);
	struct diff_runs got = { 0 }, want = { 0 };
	unsigned runs = 0;

	rng_state = 777;
	assert_int_equal(tfs_pmd_create_thin(pmd, 0), 0);
	for (tfs_dev_id id = 0; id < DEVS; id++) {
		struct tfs_td *td;

		if (id)
			assert_int_equal(tfs_pmd_create_snap(pmd, id, rnd(id)), 0);
		for (unsigned round = 0; round < 3; round++) {
			assert_int_equal(tfs_pmd_open_thin(pmd, id, &td), 0);
			for (unsigned i = 0; i < 400; i++) {
				uint64_t v = rnd(NV), len = 1 + rnd(i % 7 ? 3 : 200);

				if (rnd(4))
					for (uint64_t k = v; k < v + len && k < NV; k++)
						map_new(pmd, td, k);
				else
					assert_int_equal(tfs_thin_remove_range(td, v, v + len, NULL), 0);
			}
			tfs_pmd_close_thin(td);
			if (round == 1)
				assert_int_equal(tfs_pmd_commit(pmd), 0);
		}
	}
	for (tfs_dev_id to = 0; to < DEVS; to++) {
		for (int from = -1; from < DEVS; from++) {
			run_diff(pmd, from >= 0, (tfs_dev_id)(from < 0 ? 0 : from), to, 1 + rnd(8), &got);
			model_diff(pmd, from >= 0, (tfs_dev_id)(from < 0 ? 0 : from), to, NV, &want);
			assert_runs_equal(&got, &want);
			runs += got.nr;
		}
	}
	assert_true(runs > 100);
	free(got.v);
	free(want.v);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
}

/*
 * A held diff sees the devices as they were at begin, whatever changes and
 * commits come between its steps, and leaves metadata both checkers pass.
 */
static void test_diff_hold_keeps_the_view_of_begin(void **state)
{
	(void)state;
	struct tfs_bdev *dev = new_file_dev(2048 * TFS_BLOCK_SIZE);
	struct tfs_pmd *pmd;
	struct diff_runs got = { 0 };
	struct tfs_thin_diff *d;
	struct tfs_td *td;
	uint64_t commits;
	int r;

	assert_int_equal(tfs_pmd_format(dev, &default_opt, &pmd), 0);
	assert_int_equal(tfs_pmd_create_thin(pmd, 1), 0);
	assert_int_equal(tfs_pmd_open_thin(pmd, 1, &td), 0);
	for (uint64_t v = 0; v < 3000; v++)
		map_new(pmd, td, v);

	/* No commit since the mappings: the hold covers the transaction in memory. */
	assert_int_equal(tfs_pmd_hold_roots(pmd), 0);
	commits = tfs_pmd_commit_count(pmd);
	assert_int_equal(tfs_thin_diff_begin(pmd, NULL, &(tfs_dev_id){ 1 }, &d), 0);
	assert_true(tfs_pmd_held_root(pmd) != 0);
	assert_int_equal(tfs_pmd_reserve_metadata_snap(pmd), -EBUSY);
	assert_int_equal(tfs_thin_diff_step(d, 1, note_diff_run, &got), 1);
	assert_int_equal(tfs_thin_remove_range(td, 1000, 3000, NULL), 0);
	map_new(pmd, td, 5000);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	map_new(pmd, td, 10);
	while ((r = tfs_thin_diff_step(d, 1, note_diff_run, &got)) == 1)
		;
	assert_int_equal(r, 0);
	assert_int_equal(got.nr, 1);
	assert_int_equal(got.v[0].begin, 0);
	assert_int_equal(got.v[0].len, 3000);
	tfs_thin_diff_end(d);
	/* The commit wrote the hold, so its release has to be committed too. */
	assert_int_equal(tfs_pmd_drop_held_roots(pmd), 0);
	assert_true(tfs_pmd_commit_count(pmd) != commits);
	assert_int_equal(tfs_pmd_held_root(pmd), 0);
	assert_int_equal(tfs_pmd_drop_held_roots(pmd), -EINVAL);

	/* The slot taken by a metadata snapshot: refused, nothing changed. */
	assert_int_equal(tfs_pmd_reserve_metadata_snap(pmd), 0);
	assert_int_equal(tfs_pmd_hold_roots(pmd), -EBUSY);
	assert_int_equal(tfs_pmd_release_metadata_snap(pmd), 0);

	/* An abort during the walk ends it: what it walked may be gone. */
	assert_int_equal(tfs_pmd_hold_roots(pmd), 0);
	assert_int_equal(tfs_thin_diff_begin(pmd, NULL, &(tfs_dev_id){ 1 }, &d), 0);
	assert_int_equal(tfs_pmd_abort(pmd), 0);
	assert_int_equal(tfs_thin_diff_step(d, 1, note_diff_run, &got), -EIO);
	tfs_thin_diff_end(d);
	assert_int_equal(tfs_pmd_held_root(pmd), 0);

	tfs_pmd_close_thin(td);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	assert_metadata_clean();
	unlink(tmp_path);
	free(got.v);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_format_refuses_bad_data_block_sizes),
		cmocka_unit_test(test_open_refuses_foreign_or_mismatched_metadata),
		cmocka_unit_test(test_device_ids_are_24_bit_and_unique),
		cmocka_unit_test(test_snapshot_shares_blocks_and_writes_break_sharing),
		cmocka_unit_test(test_mark_shared_makes_cloned_mappings_shared_on_both_sides),
		cmocka_unit_test(test_freed_data_blocks_are_not_reused_before_commit),
		cmocka_unit_test(test_abort_returns_to_the_last_commit),
		cmocka_unit_test(test_transaction_id_is_compare_and_swap),
		cmocka_unit_test(test_needs_check_persists_outside_transactions),
		cmocka_unit_test(test_metadata_snapshot_holds_the_old_roots),
		cmocka_unit_test(test_resize_grows_and_refuses_to_shrink),
		cmocka_unit_test(test_walk_free_data_reports_each_free_run_whole),
		cmocka_unit_test(test_shrink_data_down_to_the_highest_used_block),
		cmocka_unit_test(test_shrink_data_across_bitmaps),
		cmocka_unit_test(test_metadata_exhaustion_is_enospc),
		cmocka_unit_test(test_random_operations_match_the_model),
		cmocka_unit_test(test_diff_of_a_snapshot_reads_only_the_changed_paths),
		cmocka_unit_test(test_diff_skips_shared_leaves_after_the_origin_grows_a_level),
		cmocka_unit_test(test_cold_diff_reads_ahead_only_the_nodes_it_opens),
		cmocka_unit_test(test_diff_matches_a_model_over_random_changes),
		cmocka_unit_test(test_diff_hold_keeps_the_view_of_begin),
		cmocka_unit_test(test_failed_commit_leaves_old_or_new_transaction),
		cmocka_unit_test(test_power_cut_during_commit_leaves_old_or_new_transaction),
		cmocka_unit_test(test_failed_commit_with_the_next_transaction_running_leaves_old_or_new),
		cmocka_unit_test(test_power_cut_with_the_next_transaction_running_leaves_old_or_new),
	};
	tfs_log_set_sink(quiet_sink, NULL);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
