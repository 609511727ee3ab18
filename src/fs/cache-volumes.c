/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-volumes.c - cached origins ([cache "NAME"] of pool.cfg) in the
 * namespace (fs.h, "cached origins").
 *
 * Each cache is a top-level catalog row with an id from TFS_DEV_ID_CACHE
 * up, so that names, modes, owners and inode numbers work as for thin
 * volumes and stay the same from mount to mount.  pool.cfg says which
 * caches exist: the mount opens them all before the catalog is
 * reconciled, gives new ones a row and drops the rows of sections that
 * went (the cache's devices keep their data).  A read-only mount opens
 * them read-only and exports those that have a row.
 */
#include "fs.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "log.h"
#include "target.h"

bool tfs_fs_is_cache_id(uint32_t dev_id)
{
	return dev_id >= TFS_DEV_ID_CACHE && dev_id < TFS_DEV_ID_CACHE + (1u << 22);
}

static struct tfs_cache *cache_of(struct tfs_fs *fs, uint32_t dev_id)
{
	for (unsigned i = 0; i < fs->nr_caches; i++)
		if (fs->cache_ids[i] == dev_id)
			return fs->caches[i];
	return NULL;
}

struct tfs_cache *tfs_fs_cache_by_name(struct tfs_fs *fs, const char *name)
{
	for (unsigned i = 0; i < fs->nr_caches; i++)
		if (!strcmp(tfs_cache_name(fs->caches[i]), name))
			return fs->caches[i];
	return NULL;
}

int tfs_fs_cache_open_dev(struct tfs_fs *fs, uint32_t dev_id, unsigned flags, struct tfs_dev **out)
{
	struct tfs_cache *c = cache_of(fs, dev_id);

	return c ? tfs_cache_open_dev(c, flags, out) : -ENODATA;
}

/* The cache's events into the event log (any thread; no cache lock held). */
static void cache_notify(void *arg)
{
	struct tfs_fs *fs = arg;
	struct tfs_cache_event ev[8];

	for (unsigned i = 0; i < fs->nr_caches; i++) {
		unsigned n;

		while ((n = tfs_cache_take_events(fs->caches[i], ev, 8)) > 0)
			for (unsigned j = 0; j < n; j++) {
				const char *kind = ev[j].mode_change ? "mode_change" : "cache_clean";

				tfs_fs_event(fs, kind, "%s", ev[j].detail);
				tfs_fs_events_run_hook(fs, kind, tfs_cache_name(fs->caches[i]),
						       ev[j].old_mode, ev[j].new_mode);
			}
	}
}

struct id_scan {
	uint32_t next_id;
	struct tfs_fs *fs;
};

static int scan_row(void *ctx, const struct tfs_vol_row *row)
{
	struct id_scan *s = ctx;

	if (tfs_fs_is_cache_id(row->dev_id) && row->dev_id >= s->next_id)
		s->next_id = row->dev_id + 1;
	return 0;
}

/*
 * The row of an [origin] or [snapshot] section that pool.cfg no longer has
 * (the cow open drops such rows, but caches open first): when the section
 * became a [cache] of the same name, the cache takes the name over.  A
 * snapshot made with thinfs-ctl has no section and keeps its row.
 */
static bool stale_cow_row(struct tfs_fs *fs, const struct tfs_vol_row *row)
{
	if (row->dev_id < TFS_DEV_ID_OTHER || tfs_fs_is_cache_id(row->dev_id))
		return false;
	for (unsigned i = 0; i < fs->cfg.nr_cow_targets; i++)
		if (!strcmp(fs->cfg.cow_targets[i].name, row->name))
			return false;
	return tfs_fs_cow_name_kept(fs, row->name) == 0;
}

/* The row of cache i: found by name (its id kept) or made. */
static int settle_row(struct tfs_fs *fs, struct id_scan *s, unsigned i)
{
	const char *name = fs->cfg.caches[i].name;
	struct tfs_vol_row row;
	int64_t now = tfs_now_ns();
	uint64_t size = tfs_cache_size(fs->caches[i]);
	int r = tfs_catalog_get_by_name(fs->cat, name, &row);

	if (r == 0 && stale_cow_row(fs, &row)) {
		tfs_info("%s: no longer an [origin] or [snapshot] in pool.cfg: the [cache] of that "
			 "name takes its place", name);
		r = tfs_catalog_remove_volume(fs->cat, row.dev_id);
		if (r < 0)
			return r;
		r = -ENOENT;
	}
	if (r == 0 && !tfs_fs_is_cache_id(row.dev_id)) {
		tfs_err("[cache \"%s\"]: the name is taken by volume %s in the pool (rename one of "
			"them)", name, name);
		return -EEXIST;
	}
	if (r == 0) {
		fs->cache_ids[i] = row.dev_id;
		if (row.size == size)
			return 0;
		row.size = size;
		return tfs_catalog_update_volume(fs->cat, &row);
	}
	if (r != -ENOENT)
		return r;
	memset(&row, 0, sizeof(row));
	snprintf(row.name, sizeof(row.name), "%s", name);
	row.dev_id = s->next_id++;
	row.kind = TFS_VOL_THIN;
	row.size = size;
	row.mode = 0600;
	row.uid = fs->owner_uid;
	row.gid = fs->owner_gid;
	row.atime_ns = row.mtime_ns = row.ctime_ns = now;
	fs->cache_ids[i] = row.dev_id;
	return tfs_catalog_add_volume(fs->cat, &row);
}

/* Rows of caches whose section is gone. */
static int drop_stale(void *ctx, const struct tfs_vol_row *row)
{
	struct tfs_fs *fs = ctx;

	if (!tfs_fs_is_cache_id(row->dev_id) || cache_of(fs, row->dev_id))
		return 0;
	tfs_info("%s: no longer in pool.cfg: its file is gone (its devices keep the data)",
		 row->name);
	return tfs_catalog_remove_volume(fs->cat, row->dev_id);
}

/*
 * Read-only: the catalog cannot change, so only caches that have a row
 * already are exported (under its id); the others wait for a read-write
 * mount.  The list of caches is packed as it goes.
 */
static int keep_rows_read_only(struct tfs_fs *fs)
{
	unsigned kept = 0;

	for (unsigned i = 0; i < fs->nr_caches; i++) {
		struct tfs_vol_row row;
		const char *name = tfs_cache_name(fs->caches[i]);
		int r = tfs_catalog_get_by_name(fs->cat, name, &row);

		if (r == 0 && tfs_fs_is_cache_id(row.dev_id)) {
			fs->caches[kept] = fs->caches[i];
			fs->cache_ids[kept++] = row.dev_id;
			continue;
		}
		tfs_warn("cache %s: not exported on this read-only mount (it has no catalog row "
			 "yet: mount read-write once)", name);
		tfs_cache_close(fs->caches[i]);
	}
	fs->nr_caches = kept;
	return 0;
}

int tfs_fs_cache_open(struct tfs_fs *fs)
{
	struct tfs_cache_open_options o = { .direct = !fs->cfg.host_cache,
					    .allow_faults = fs->cfg.allow_faults,
					    .read_only = fs->read_only,
					    .notify = cache_notify, .notify_arg = fs };
	struct id_scan s = { .next_id = TFS_DEV_ID_CACHE, .fs = fs };
	int r = 0;

	for (unsigned i = 0; i < fs->cfg.nr_caches && r == 0; i++) {
		r = tfs_cache_open(&fs->cfg.caches[i], &o, &fs->caches[i]);
		if (r == 0)
			fs->nr_caches++;
	}
	if (r == 0 && fs->read_only)
		return keep_rows_read_only(fs);
	if (r == 0)
		r = tfs_catalog_list_volumes(fs->cat, true, scan_row, &s);
	for (unsigned i = 0; i < fs->nr_caches && r == 0; i++)
		r = settle_row(fs, &s, i);
	if (r == 0)
		r = tfs_catalog_list_volumes(fs->cat, true, drop_stale, fs);
	if (r == 0)
		return 0;
	tfs_err("cannot open the caches of %s: %s", fs->cfg.path, strerror(-r));
	tfs_fs_cache_close(fs);
	return r;
}

int tfs_fs_cache_close(struct tfs_fs *fs)
{
	int status = 0;

	for (unsigned i = 0; i < fs->nr_caches; i++) {
		int r = tfs_cache_close(fs->caches[i]);

		if (r < 0) {
			tfs_err("cache %s: final commit failed: %s", fs->cfg.caches[i].name,
				strerror(-r));
			status = r;
		}
		fs->caches[i] = NULL;
	}
	fs->nr_caches = 0;
	return status;
}

int tfs_fs_cache_add_ids(struct tfs_fs *fs, uint32_t **ids, unsigned *nr)
{
	uint32_t *grown;
	uint32_t sorted[TFS_CACHES_MAX];

	if (!fs->nr_caches)
		return 0;
	grown = realloc(*ids, (*nr + fs->nr_caches) * sizeof(*grown));
	if (!grown)
		return -ENOMEM;
	memcpy(sorted, fs->cache_ids, fs->nr_caches * sizeof(*sorted));
	/* Insertion sort: a handful of ids, all above the thin ones. */
	for (unsigned i = 1; i < fs->nr_caches; i++)
		for (unsigned j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
			uint32_t t = sorted[j];

			sorted[j] = sorted[j - 1];
			sorted[j - 1] = t;
		}
	memcpy(grown + *nr, sorted, fs->nr_caches * sizeof(*sorted));
	*ids = grown;
	*nr += fs->nr_caches;
	return 0;
}

static const struct tfs_cache_cfg *find_cfg(const struct tfs_pool_config *cfg, const char *name)
{
	for (unsigned i = 0; i < cfg->nr_caches; i++)
		if (!strcmp(cfg->caches[i].name, name))
			return &cfg->caches[i];
	return NULL;
}

/* What only a new open can take: the devices and the format. */
static bool same_shape(const struct tfs_cache_cfg *a, const struct tfs_cache_cfg *b)
{
	return !strcmp(a->origin, b->origin) && !strcmp(a->cache, b->cache) &&
	       !strcmp(a->metadata, b->metadata) && a->block_sectors == b->block_sectors &&
	       a->metadata_version == b->metadata_version &&
	       a->discard_passdown == b->discard_passdown;
}

static void note(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(char *out, size_t len, const char *fmt, ...)
{
	size_t n = strlen(out);
	va_list ap;

	if (n + 2 >= len)
		return;
	if (n)
		out[n++] = ';', out[n++] = ' ', out[n] = '\0';
	va_start(ap, fmt);
	vsnprintf(out + n, len - n, fmt, ap);
	va_end(ap);
}

/* One running cache against its section in the configuration in force. */
static void reload_one(struct tfs_cache *c, const struct tfs_cache_cfg *next, char *out,
		       size_t len)
{
	const char *name = tfs_cache_name(c);
	enum tfs_cache_mode mode;
	enum tfs_cache_policy_kind policy;
	uint64_t threshold;
	char msg[512];

	if (!next) {
		note(out, len, "[cache \"%s\"] removed: its file stays until the next mount", name);
		return;
	}
	if (!same_shape(tfs_cache_cfg(c), next))
		note(out, len, "[cache \"%s\"]: new devices, block_size, metadata_version or "
		     "discard_passdown take effect at the next mount", name);
	tfs_cache_get_settings(c, &mode, &policy, &threshold);
	msg[0] = '\0';
	if (mode != next->mode && tfs_cache_set_mode(c, next->mode, msg, sizeof(msg)) < 0)
		note(out, len, "%s", msg);
	msg[0] = '\0';
	if (policy != next->policy && tfs_cache_set_policy(c, next->policy, msg, sizeof(msg)) < 0)
		note(out, len, "%s", msg);
	msg[0] = '\0';
	if (threshold != next->migration_threshold &&
	    tfs_cache_set_migration_threshold(c, next->migration_threshold, msg, sizeof(msg)) < 0)
		note(out, len, "%s", msg);
}

void tfs_fs_cache_reload(struct tfs_fs *fs, char *out, size_t len)
{
	struct tfs_pool_config *cfg = malloc(sizeof(*cfg));

	out[0] = '\0';
	if (!cfg || fs->read_only) {
		free(cfg);
		return;
	}
	tfs_pool_get_config(fs->pool, cfg);
	for (unsigned i = 0; i < fs->nr_caches; i++)
		reload_one(fs->caches[i], find_cfg(cfg, tfs_cache_name(fs->caches[i])), out, len);
	for (unsigned i = 0; i < cfg->nr_caches; i++)
		if (!tfs_fs_cache_by_name(fs, cfg->caches[i].name))
			note(out, len, "[cache \"%s\"] added: it opens at the next mount",
			     cfg->caches[i].name);
	free(cfg);
}

int tfs_fs_cache_resize(struct tfs_fs *fs, struct tfs_cache *c, uint32_t *dev_id, char *msg,
			size_t len)
{
	struct tfs_inode *ino;
	struct tfs_vol_row row;
	uint64_t size;
	int r = tfs_cache_resize(c, &size, msg, len);

	*dev_id = 0;
	for (unsigned i = 0; i < fs->nr_caches; i++)
		if (fs->caches[i] == c)
			*dev_id = fs->cache_ids[i];
	if (r < 0)
		return r;
	/* The file has the origin's size: the open inode and the row follow it. */
	pthread_mutex_lock(&fs->lock);
	ino = tfs_fs_inode_find(fs, *dev_id);
	if (ino) {
		pthread_mutex_lock(&ino->attr_lock);
		if (ino->row.size != size) {
			ino->row.size = size;
			ino->row.ctime_ns = tfs_now_ns();
			ino->dirty = true;
		}
		pthread_mutex_unlock(&ino->attr_lock);
		r = tfs_fs_persist(fs, ino);
	} else if ((r = tfs_catalog_get_by_id(fs->cat, *dev_id, &row)) == 0 && row.size != size) {
		row.size = size;
		r = tfs_catalog_update_volume(fs->cat, &row);
	}
	pthread_mutex_unlock(&fs->lock);
	if (r == 0)
		tfs_fs_event(fs, "resize", "%s", msg);
	return r;
}

void tfs_fs_cache_stop_holding(struct tfs_fs *fs)
{
	for (unsigned i = 0; i < fs->nr_caches; i++)
		tfs_cache_stop_holding(fs->caches[i]);
}
