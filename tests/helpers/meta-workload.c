/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * meta-workload: drive the thin-metadata API with a seeded random workload
 * on a metadata file and print the resulting devices and mappings as JSON,
 * so the integration tests can hold thin_dump/thin_check (an independent
 * implementation) against what the engine believes it wrote.
 *
 *   meta-workload IMAGE [--format NR_DATA_BLOCKS] [--block-sectors N]
 *                 [--seed S] [--ops N] [--devices N] [--span VBLOCKS]
 *                 [--no-commit-last] [--held-root] [--needs-check]
 *                 [--fill N]
 *
 * --fill N first maps N random single blocks of device 0 (committing every
 * 5,000), snapshots it as device 1, then maps N/4 more random blocks in
 * each: many full leaves, made room for by moving entries into siblings,
 * next to leaves shared with the snapshot.
 *
 * Output: {"transaction_id":T,"time":T,"devices":{"ID":{"mapped_blocks":N,
 *          "leaves":L,"leaf_capacity":C,"mappings":[[vblock,data_block,time],...]}}}
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "log.h"
#include "thin-metadata.h"

struct cfg {
	const char *image;
	uint64_t format_blocks;
	uint32_t block_sectors;
	uint32_t seed;
	unsigned ops, devices;
	uint64_t span, fill;
	bool held_root, needs_check;
};

static uint32_t rng;
static uint32_t rnd(uint32_t n)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return n ? rng % n : 0;
}

static int existing(struct tfs_pmd *pmd, tfs_dev_id *ids, unsigned max)
{
	int n = tfs_pmd_list_devices(pmd, ids, max);
	return n > (int)max ? (int)max : n;
}

static int op_write(struct tfs_pmd *pmd, const struct cfg *c)
{
	tfs_dev_id ids[256];
	int n = existing(pmd, ids, 256), r;
	struct tfs_td *td;

	if (n <= 0)
		return n;
	r = tfs_pmd_open_thin(pmd, ids[rnd((uint32_t)n)], &td);
	if (r)
		return r;
	uint64_t start = rnd((uint32_t)c->span), len = 1 + rnd(rnd(4) ? 16 : 600);
	for (uint64_t v = start; v < start + len && v < c->span && !r; v++) {
		uint64_t b;
		r = tfs_pmd_alloc_data_block(pmd, &b);
		if (r == -ENOSPC) {
			r = 0;
			break;
		}
		if (!r)
			r = tfs_thin_insert(td, v, b);
	}
	tfs_pmd_close_thin(td);
	return r;
}

static int op_discard(struct tfs_pmd *pmd, const struct cfg *c)
{
	tfs_dev_id ids[256];
	int n = existing(pmd, ids, 256), r;
	struct tfs_td *td;

	if (n <= 0)
		return n;
	r = tfs_pmd_open_thin(pmd, ids[rnd((uint32_t)n)], &td);
	if (r)
		return r;
	uint64_t start = rnd((uint32_t)c->span);
	r = tfs_thin_remove_range(td, start, start + 1 + rnd(rnd(3) ? 8 : 2000), NULL);
	tfs_pmd_close_thin(td);
	return r;
}

static int free_id(struct tfs_pmd *pmd, const struct cfg *c, tfs_dev_id *id)
{
	struct tfs_thin_details d;

	for (int tries = 0; tries < 50; tries++) {
		*id = rnd(c->devices);
		if (tfs_pmd_device_details(pmd, *id, &d) == -ENODATA)
			return 0;
	}
	return -EEXIST;
}

static int op_create(struct tfs_pmd *pmd, const struct cfg *c, bool snap)
{
	tfs_dev_id ids[256], id;
	int n = existing(pmd, ids, 256);

	if (n < 0)
		return n;
	if (free_id(pmd, c, &id))
		return 0;
	if (snap && n > 0)
		return tfs_pmd_create_snap(pmd, id, ids[rnd((uint32_t)n)]);
	return tfs_pmd_create_thin(pmd, id);
}

static int op_delete(struct tfs_pmd *pmd)
{
	tfs_dev_id ids[256];
	int n = existing(pmd, ids, 256);

	if (n <= 1)
		return n < 0 ? n : 0;
	return tfs_pmd_delete_thin(pmd, ids[rnd((uint32_t)n)]);
}

/* n random single-block mappings in device id, committing every 5,000. */
static int map_random(struct tfs_pmd *pmd, const struct cfg *c, tfs_dev_id id, uint64_t n)
{
	struct tfs_td *td = NULL;
	int r = tfs_pmd_open_thin(pmd, id, &td);

	for (uint64_t i = 0; i < n && !r; i++) {
		uint64_t b;

		r = tfs_pmd_alloc_data_block(pmd, &b);
		if (!r)
			r = tfs_thin_insert(td, rnd((uint32_t)c->span), b);
		if (!r && i % 5000 == 4999)
			r = tfs_pmd_commit(pmd);
	}
	if (td)
		tfs_pmd_close_thin(td);
	return r;
}

static int run_fill(struct tfs_pmd *pmd, const struct cfg *c)
{
	int r = tfs_pmd_create_thin(pmd, 0);

	if (!r)
		r = map_random(pmd, c, 0, c->fill);
	if (!r)
		r = tfs_pmd_create_snap(pmd, 1, 0);
	if (!r)
		r = map_random(pmd, c, 0, c->fill / 4);
	if (!r)
		r = map_random(pmd, c, 1, c->fill / 4);
	return r;
}

static int run(struct tfs_pmd *pmd, const struct cfg *c)
{
	int r = 0;

	for (unsigned i = 0; i < c->ops && !r; i++) {
		uint32_t op = rnd(100);
		if (op < 50)
			r = op_write(pmd, c);
		else if (op < 65)
			r = op_discard(pmd, c);
		else if (op < 75)
			r = op_create(pmd, c, false);
		else if (op < 85)
			r = op_create(pmd, c, true);
		else if (op < 90)
			r = op_delete(pmd);
		else
			r = tfs_pmd_commit(pmd);
	}
	return r;
}

static int print_json(struct tfs_pmd *pmd)
{
	tfs_dev_id ids[4096];
	int n = tfs_pmd_list_devices(pmd, ids, 4096);
	static struct tfs_thin_mapping m[1024];

	if (n < 0)
		return n;
	printf("{\"transaction_id\":%" PRIu64 ",\"time\":%u,\"held_root\":%" PRIu64
	       ",\"needs_check\":%s,\"devices\":{", tfs_pmd_transaction_id(pmd), tfs_pmd_time(pmd),
	       tfs_pmd_held_root(pmd), tfs_pmd_needs_check(pmd) ? "true" : "false");
	for (int i = 0; i < n; i++) {
		struct tfs_td *td;
		int r = tfs_pmd_open_thin(pmd, ids[i], &td);
		if (r)
			return r;
		struct tfs_thin_tree_shape sh;
		r = tfs_thin_tree_shape(td, &sh);
		if (r) {
			tfs_pmd_close_thin(td);
			return r;
		}
		printf("%s\"%u\":{\"mapped_blocks\":%" PRIu64 ",\"leaves\":%" PRIu64
		       ",\"leaf_capacity\":%u,\"mappings\":[", i ? "," : "", ids[i],
		       tfs_td_mapped_blocks(td), sh.leaves, sh.leaf_capacity);
		uint64_t begin = 0;
		bool first = true;
		for (;;) {
			int got = tfs_thin_lookup_range(td, begin, UINT64_MAX, 1024, m);
			if (got < 0) {
				tfs_pmd_close_thin(td);
				return got;
			}
			for (int k = 0; k < got; k++) {
				printf("%s[%" PRIu64 ",%" PRIu64 ",%u]", first ? "" : ",", m[k].vblock,
				       m[k].data_block, m[k].time);
				first = false;
			}
			if (got < 1024)
				break;
			begin = m[got - 1].vblock + 1;
		}
		printf("]}");
		tfs_pmd_close_thin(td);
	}
	printf("}}\n");
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "format", required_argument, NULL, 'f' },
		{ "block-sectors", required_argument, NULL, 'b' },
		{ "seed", required_argument, NULL, 's' },
		{ "ops", required_argument, NULL, 'o' },
		{ "devices", required_argument, NULL, 'd' },
		{ "span", required_argument, NULL, 'n' },
		{ "held-root", no_argument, NULL, 'H' },
		{ "needs-check", no_argument, NULL, 'N' },
		{ "fill", required_argument, NULL, 'F' },
		{ NULL, 0, NULL, 0 },
	};
	struct cfg c = { .block_sectors = 128, .seed = 1, .ops = 200, .devices = 8, .span = 5000 };
	struct tfs_pmd_options po = { 0 };
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;
	int ch, r;

	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (ch) {
		case 'f': c.format_blocks = strtoull(optarg, NULL, 0); break;
		case 'b': c.block_sectors = (uint32_t)strtoul(optarg, NULL, 0); break;
		case 's': c.seed = (uint32_t)strtoul(optarg, NULL, 0); break;
		case 'o': c.ops = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'd': c.devices = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'n': c.span = strtoull(optarg, NULL, 0); break;
		case 'H': c.held_root = true; break;
		case 'N': c.needs_check = true; break;
		case 'F': c.fill = strtoull(optarg, NULL, 0); break;
		default: return 2;
		}
	}
	if (optind != argc - 1 || !c.devices || !c.span) {
		fprintf(stderr, "usage: meta-workload IMAGE [--format N] [--seed S] [--ops N] ...\n");
		return 2;
	}
	c.image = argv[optind];
	rng = c.seed ? c.seed : 1;
	r = tfs_bdev_open(c.image, false, &dev);
	if (r)
		return 1;
	po.data_block_sectors = c.format_blocks ? c.block_sectors : 0;
	po.nr_data_blocks = c.format_blocks;
	r = c.format_blocks ? tfs_pmd_format(dev, &po, &pmd) : tfs_pmd_open(dev, &po, &pmd);
	if (r) {
		fprintf(stderr, "meta-workload: opening %s failed: %s\n", c.image, strerror(-r));
		tfs_bdev_close(dev);
		return 1;
	}
	r = c.fill ? run_fill(pmd, &c) : 0;
	if (!r)
		r = run(pmd, &c);
	if (!r)
		r = tfs_pmd_set_transaction_id(pmd, tfs_pmd_transaction_id(pmd),
					       tfs_pmd_transaction_id(pmd) + 1);
	if (!r)
		r = tfs_pmd_commit(pmd);
	if (!r && c.held_root)
		r = tfs_pmd_reserve_metadata_snap(pmd);
	if (!r && c.needs_check)
		r = tfs_pmd_set_needs_check(pmd, true);
	if (!r)
		r = print_json(pmd);
	if (r)
		fprintf(stderr, "meta-workload: %s\n", strerror(-r));
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	return r ? 1 : 0;
}
