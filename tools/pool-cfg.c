/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "pool-cfg.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bdev.h"
#include "catalog.h"
#include "config.h"
#include "log.h"
#include "snap-store.h"

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && !strcmp(s + n - m, suffix);
}

static int copy_out(const char *s, char *out, size_t out_len)
{
	if (strlen(s) >= out_len) {
		tfs_err("path too long: %s", s);
		return -ENAMETOOLONG;
	}
	strcpy(out, s);
	return 0;
}

int tfs_pool_cfg_metadata_path(const char *arg, char *out, size_t out_len)
{
	struct tfs_pool_config *cfg;
	int r;

	if (!ends_with(arg, ".cfg"))
		return copy_out(arg, out, out_len);
	cfg = malloc(sizeof(*cfg));
	if (!cfg) {
		tfs_err("out of memory");
		return -ENOMEM;
	}
	/* Every problem is logged there, with file:line, and a file with one is not used. */
	r = tfs_config_load(arg, cfg);
	if (!r)
		r = copy_out(cfg->metadata, out, out_len);
	free(cfg);
	return r;
}

/* One persistent store: 0 clean, 1 a problem (printed, naming the snapshot), 2 an I/O error. */
static int check_store(const char *name, const char *cow_path, const char *origin_path,
		       bool quiet)
{
	struct tfs_snap_check_info info;
	struct tfs_bdev *cow = NULL, *origin = NULL;
	uint64_t origin_bytes = 0, chunk_bytes;
	char msg[512] = "";
	int r;

	r = tfs_bdev_open(cow_path, true, &cow);
	if (r < 0) {
		printf("snapshot %s: cannot open its COW device %s: %s\n", name, cow_path,
		       strerror(-r));
		return 2;
	}
	if (origin_path && tfs_bdev_open(origin_path, true, &origin) == 0) {
		tfs_bdev_size(origin, &origin_bytes);
		tfs_bdev_close(origin);
	}
	/* The header's chunk size says how many chunks the origin has. */
	r = tfs_snap_store_check(cow, 0, &info, msg, sizeof(msg));
	if (r == 0 && !info.fresh && origin_bytes) {
		chunk_bytes = (uint64_t)info.chunk_sectors * 512;
		r = tfs_snap_store_check(cow, (origin_bytes + chunk_bytes - 1) / chunk_bytes, &info,
					 msg, sizeof(msg));
	}
	tfs_bdev_close(cow);
	if (r == -EINVAL) {
		printf("snapshot %s (COW device %s): %s\n", name, cow_path, msg);
		return 1;
	}
	if (r < 0) {
		printf("snapshot %s: cannot read its COW device %s: %s\n", name, cow_path,
		       strerror(-r));
		return 2;
	}
	if (!quiet)
		printf("snapshot %s (COW device %s): %s, %" PRIu64 " exception(s)%s\n", name,
		       cow_path, info.fresh ? "not written yet" : "clean", info.exceptions,
		       info.fresh || info.valid ? "" : ", marked invalid");
	return 0;
}

struct ctl_check {
	const struct tfs_pool_config *cfg;
	struct tfs_catalog *cat;
	bool quiet;
	int worst;
};

static const char *origin_device(const struct tfs_pool_config *cfg, const char *origin)
{
	for (unsigned i = 0; i < cfg->nr_cow_targets; i++)
		if (!cfg->cow_targets[i].is_snapshot && !strcmp(cfg->cow_targets[i].name, origin))
			return cfg->cow_targets[i].device;
	return NULL;
}

static int check_ctl_row(void *ctx, const struct tfs_cow_snap_row *row)
{
	struct ctl_check *c = ctx;
	int r = check_store(row->name, row->cow, origin_device(c->cfg, row->origin), c->quiet);

	if (r > c->worst)
		c->worst = r;
	return 0;
}

int tfs_pool_cfg_check_cow_stores(const char *arg, bool quiet)
{
	struct tfs_pool_config *cfg;
	struct ctl_check c = { .quiet = quiet };
	int r;

	if (!ends_with(arg, ".cfg"))
		return 0;
	cfg = malloc(sizeof(*cfg));
	if (!cfg)
		return 2;
	if (tfs_config_load(arg, cfg) < 0) {
		free(cfg);
		return 2;
	}
	c.cfg = cfg;
	for (unsigned i = 0; i < cfg->nr_cow_targets; i++) {
		const struct tfs_cow_target_cfg *t = &cfg->cow_targets[i];

		if (!t->is_snapshot || !t->persistent)
			continue;
		r = check_store(t->name, t->device, origin_device(cfg, t->origin), quiet);
		if (r > c.worst)
			c.worst = r;
	}
	/* Snapshots made with thinfs-ctl are in the catalog (none when it is missing). */
	if (access(cfg->catalog, F_OK) == 0 && tfs_catalog_open(cfg->catalog, true, &c.cat) == 0) {
		tfs_catalog_list_cow_snapshots(c.cat, check_ctl_row, &c);
		tfs_catalog_close(c.cat);
	}
	free(cfg);
	return c.worst;
}
