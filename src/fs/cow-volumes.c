/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cow-volumes.c - origins and classic snapshots in the namespace (see
 * fs.h, "classic snapshots").
 *
 * Each origin and snapshot is a top-level catalog row (kind thin in the
 * catalog's terms, a device id from TFS_DEV_ID_OTHER up), so that names,
 * modes, owners and inode numbers work as for thin volumes and stay the
 * same from mount to mount.  pool.cfg says which origins and snapshots
 * exist; the catalog's cow_snapshots table adds those made with
 * thinfs-ctl.  The mount opens them all before the catalog is reconciled,
 * gives new ones a row and drops the rows of sections that went.
 */
#include "fs.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "origin.h"

struct id_scan {
	uint32_t next_id;   /* one past the largest id of a target row */
	struct tfs_cow_snap_row *ctl;
	unsigned nr_ctl;
};

static int scan_row(void *ctx, const struct tfs_vol_row *row)
{
	struct id_scan *s = ctx;

	/* Caches number their rows in their own range (cache-volumes.c). */
	if (row->dev_id >= TFS_DEV_ID_OTHER && !tfs_fs_is_cache_id(row->dev_id) &&
	    row->dev_id >= s->next_id)
		s->next_id = row->dev_id + 1;
	return 0;
}

static int keep_ctl_row(void *ctx, const struct tfs_cow_snap_row *row)
{
	struct id_scan *s = ctx;
	struct tfs_cow_snap_row *grown = realloc(s->ctl, (s->nr_ctl + 1) * sizeof(*grown));

	if (!grown)
		return -ENOMEM;
	s->ctl = grown;
	s->ctl[s->nr_ctl++] = *row;
	if (row->dev_id >= s->next_id)
		s->next_id = row->dev_id + 1;
	return 0;
}

static bool made_by_ctl(const struct id_scan *s, uint32_t id)
{
	for (unsigned i = 0; i < s->nr_ctl; i++)
		if (s->ctl[i].dev_id == id)
			return true;
	return false;
}

/*
 * The row of a pool.cfg section: its id (an existing row keeps its own),
 * or -EEXIST (logged) when a thin volume or a thinfs-ctl snapshot has the
 * name.  *is_new: no row yet.
 */
static int section_row(struct tfs_fs *fs, struct id_scan *s, const char *kind, const char *name,
		       struct tfs_vol_row *row, bool *is_new)
{
	const char *bad = tfs_catalog_name_error(name);
	int r;

	*is_new = false;
	if (bad || !strcmp(name, TFS_SNAPSHOTS_NAME)) {
		tfs_err("[%s \"%s\"]: the name cannot be a file of the mount: %s", kind, name,
			bad ? bad : "it is the snapshot groups' directory");
		return -EINVAL;
	}
	r = tfs_catalog_get_by_name(fs->cat, name, row);
	if (r == -ENOENT) {
		*is_new = true;
		row->dev_id = s->next_id++;
		return 0;
	}
	if (r < 0)
		return r;
	if (row->dev_id < TFS_DEV_ID_OTHER || made_by_ctl(s, row->dev_id)) {
		tfs_err("[%s \"%s\"]: the name is taken by %s %s in the pool (rename one of them)",
			kind, name, row->dev_id < TFS_DEV_ID_OTHER ? "thin volume" :
			"the snapshot made with thinfs-ctl", name);
		return -EEXIST;
	}
	return 0;
}

/* A new row for id, or the size brought up to date in an old one. */
static int settle_row(struct tfs_fs *fs, struct tfs_vol_row *row, bool is_new, const char *name)
{
	uint64_t size = 0;
	int64_t now = tfs_now_ns();
	uint32_t id = row->dev_id;

	tfs_cow_set_size(fs->cow, row->dev_id, &size);
	if (!is_new) {
		if (row->size == size)
			return 0;
		row->size = size;
		return tfs_catalog_update_volume(fs->cat, row);
	}
	memset(row, 0, sizeof(*row));
	snprintf(row->name, sizeof(row->name), "%s", name);
	row->dev_id = id;
	row->kind = TFS_VOL_THIN;
	row->size = size;
	row->mode = 0600;
	row->uid = fs->owner_uid;
	row->gid = fs->owner_gid;
	row->atime_ns = row->mtime_ns = row->ctime_ns = now;
	return tfs_catalog_add_volume(fs->cat, row);
}

/* Open one section and give it its row.  probe: a device seen for the first time. */
static int open_section(struct tfs_fs *fs, struct id_scan *s, const struct tfs_cow_target_cfg *t)
{
	const char *kind = t->is_snapshot ? "snapshot" : "origin";
	struct tfs_vol_row row;
	bool is_new;
	uint32_t id;
	int r;

	r = section_row(fs, s, kind, t->name, &row, &is_new);
	if (r < 0)
		return r;
	id = row.dev_id;
	if (t->is_snapshot) {
		bool fresh = false;
		struct tfs_cowsnap_params p = {
			.name = t->name, .id = id, .origin = t->origin, .cow = t->device,
			.chunk_sectors = t->chunk_sectors, .persistent = t->persistent,
			.from_cfg = true, .probe = is_new,
			.known_invalid = tfs_catalog_cow_invalid(fs->cat, t->name),
			.fresh = &fresh,
		};

		r = tfs_cow_set_add_snapshot(fs->cow, &p);
		if (r == 0 && (fresh || !t->persistent) && p.known_invalid)
			tfs_catalog_set_cow_invalid(fs->cat, t->name, false);
	} else {
		r = tfs_cow_set_add_origin(fs->cow, t->name, id, t->device);
	}
	if (r == -EEXIST)
		tfs_err("[%s \"%s\"]: cannot be opened: its name or device is taken", kind,
			t->name);
	if (r < 0)
		return r; /* the rest logged by the engine, naming the section */
	row.dev_id = id;
	return settle_row(fs, &row, is_new, t->name);
}

static int open_sections(struct tfs_fs *fs, struct id_scan *s)
{
	int r = 0;

	for (unsigned i = 0; !r && i < fs->cfg.nr_cow_targets; i++)
		r = open_section(fs, s, &fs->cfg.cow_targets[i]);
	return r;
}

/*
 * A snapshot whose merge was under way at the last unmount or crash: it
 * has no file; the merge goes on from the exceptions its store still has.
 * One that cannot be opened leaves its origin reading what was merged so
 * far, which is neither the snapshot nor the old origin: said loudly.
 */
static void open_merging(struct tfs_fs *fs, const struct tfs_cow_snap_row *c)
{
	struct tfs_cowsnap_params p = {
		.id = c->dev_id, .name = c->name, .origin = c->origin, .cow = c->cow,
		.chunk_sectors = c->chunk_sectors, .persistent = c->persistent,
	};
	uint64_t chunks = 0;
	char why[512];
	int r;

	tfs_log_capture(why, sizeof(why));
	r = tfs_cow_set_add_snapshot(fs->cow, &p);
	if (r == 0)
		r = tfs_cow_set_merge(fs->cow, c->dev_id, &chunks, NULL);
	tfs_log_capture(NULL, 0);
	if (r < 0) {
		tfs_cow_set_remove_snapshot(fs->cow, c->dev_id, false);
		tfs_err("snapshot %s: its merge into %s cannot go on (%s): %s reads as partly "
			"merged until it does (the COW device %s keeps the rest)", c->name, c->origin,
			why[0] ? why : strerror(-r), c->origin, c->cow);
		return;
	}
	tfs_fs_event(fs, "merge", "snapshot %s into %s: resumed, %" PRIu64 " chunk(s) left",
		     c->name, c->origin, chunks);
}

/*
 * Snapshots made with thinfs-ctl.  One that cannot be opened (its origin
 * section is missing, its device is gone) is left out of this mount with
 * a warning and its name row goes, but the catalog keeps what it is: it
 * comes back, under its name, at a mount where it can be opened.  One
 * whose row was unlinked (rm while open, then a crash) is removed.
 */
static void open_ctl_snapshots(struct tfs_fs *fs, struct id_scan *s)
{
	for (unsigned i = 0; i < s->nr_ctl; i++) {
		const struct tfs_cow_snap_row *c = &s->ctl[i];
		struct tfs_vol_row row, other;
		char why[512];
		struct tfs_cowsnap_params p = {
			.id = c->dev_id, .name = c->name, .origin = c->origin, .cow = c->cow,
			.chunk_sectors = c->chunk_sectors, .persistent = c->persistent,
		};
		bool have_row = tfs_catalog_get_by_id(fs->cat, c->dev_id, &row) == 0;
		int r;

		if (tfs_catalog_cow_merging(fs->cat, c->dev_id))
			continue; /* after the others: a merging origin takes no new snapshot */
		if (have_row && row.unlinked) {
			tfs_catalog_begin(fs->cat);
			tfs_catalog_remove_cow_snapshot(fs->cat, c->dev_id);
			tfs_catalog_remove_volume(fs->cat, c->dev_id);
			if (tfs_catalog_commit(fs->cat) < 0)
				tfs_catalog_rollback(fs->cat);
			continue;
		}
		if (!have_row && tfs_catalog_get_by_name(fs->cat, c->name, &other) == 0) {
			tfs_warn("snapshot %s (made with thinfs-ctl of %s on %s): the name is taken "
				 "now: not opened (rename the other volume to get it back)", c->name,
				 c->origin, c->cow);
			continue;
		}
		p.known_invalid = tfs_catalog_cow_invalid(fs->cat, c->name);
		/* Not an error of this mount: the reason goes into one warning. */
		tfs_log_capture(why, sizeof(why));
		r = tfs_cow_set_add_snapshot(fs->cow, &p);
		tfs_log_capture(NULL, 0);
		if (r == 0) {
			if (!have_row)
				row.dev_id = c->dev_id;
			settle_row(fs, &row, !have_row, c->name);
			continue;
		}
		tfs_warn("snapshot %s (made with thinfs-ctl of %s on %s) cannot be opened (%s): left "
			 "out of this mount; it comes back when it can be (the COW device keeps its "
			 "data)", c->name, c->origin, c->cow, why[0] ? why : strerror(-r));
		if (have_row)
			tfs_catalog_remove_volume(fs->cat, c->dev_id);
	}
	for (unsigned i = 0; i < s->nr_ctl; i++)
		if (tfs_catalog_cow_merging(fs->cat, s->ctl[i].dev_id))
			open_merging(fs, &s->ctl[i]);
}

/* Rows of origins and snapshots that are gone from pool.cfg. */
static int drop_stale(void *ctx, const struct tfs_vol_row *row)
{
	struct tfs_fs *fs = ctx;

	if (row->dev_id < TFS_DEV_ID_OTHER || tfs_fs_is_cache_id(row->dev_id) ||
	    tfs_cow_set_has(fs->cow, row->dev_id, NULL))
		return 0;
	tfs_info("%s: no longer in pool.cfg: its file is gone", row->name);
	tfs_catalog_remove_volume(fs->cat, row->dev_id);
	return 0;
}

static void cow_notify(void *arg);

int tfs_fs_cow_open(struct tfs_fs *fs)
{
	struct id_scan s = { .next_id = TFS_DEV_ID_OTHER };
	int r;

	if (fs->read_only)
		return 0; /* not exported on a read-only mount (README) */
	r = tfs_cow_set_create(!fs->cfg.host_cache, fs->cfg.allow_faults,
			       fs->cfg.snapshot_low_water, cow_notify, fs, &fs->cow);
	if (r < 0)
		goto err;
	r = tfs_catalog_list_volumes(fs->cat, true, scan_row, &s);
	if (r == 0)
		r = tfs_catalog_list_cow_snapshots(fs->cat, keep_ctl_row, &s);
	if (r == 0)
		r = open_sections(fs, &s);
	if (r == 0) {
		open_ctl_snapshots(fs, &s);
		r = tfs_catalog_list_volumes(fs->cat, false, drop_stale, fs);
	}
	free(s.ctl);
	if (r == 0)
		return 0;
err:
	tfs_err("cannot open the origins and classic snapshots of %s: %s", fs->cfg.path,
		strerror(-r));
	tfs_cow_set_destroy(fs->cow);
	fs->cow = NULL;
	return r;
}

void tfs_fs_cow_close(struct tfs_fs *fs)
{
	tfs_cow_set_destroy(fs->cow);
	fs->cow = NULL;
}

int tfs_fs_cow_ids(struct tfs_fs *fs, uint32_t **ids, unsigned *nr)
{
	if (!fs->cow) {
		*ids = NULL;
		*nr = 0;
		return 0;
	}
	return tfs_cow_set_ids(fs->cow, ids, nr);
}

/* The engine recorded an event: the event thread reports it (events.c). */
static void cow_notify(void *arg)
{
	tfs_fs_events_wake(arg);
}

int tfs_fs_cow_may_unlink(struct tfs_fs *fs, const struct tfs_vol_row *row)
{
	bool from_cfg = true;

	if (row->dev_id < TFS_DEV_ID_OTHER)
		return 0;
	if (fs->cow && tfs_cow_set_has(fs->cow, row->dev_id, &from_cfg) && !from_cfg)
		return 0;
	tfs_warn("%s comes from pool.cfg: remove its section from pool.cfg and reload "
		 "(thinfs-ctl reload) to remove it", row->name);
	return -EPERM;
}

int tfs_fs_cow_delete(struct tfs_fs *fs, uint32_t dev_id, const char *name)
{
	int r = fs->cow ? tfs_cow_set_remove_snapshot(fs->cow, dev_id, false) : -ENODATA;

	if (r < 0 && r != -ENOENT && r != -ENODATA) {
		tfs_err("cannot remove snapshot %s: %s", name, strerror(-r));
		return r;
	}
	r = tfs_catalog_begin(fs->cat);
	if (r == 0) {
		tfs_catalog_remove_cow_snapshot(fs->cat, dev_id);
		tfs_catalog_remove_volume(fs->cat, dev_id);
		r = tfs_catalog_commit(fs->cat);
	}
	if (r < 0) {
		tfs_catalog_rollback(fs->cat);
		tfs_warn("catalog: cannot remove the rows of snapshot %s: %s", name, strerror(-r));
	}
	tfs_catalog_set_cow_invalid(fs->cat, name, false);
	tfs_fs_event(fs, "delete", "snapshot %s (device %" PRIu32 ") removed", name, dev_id);
	return 0;
}

static int find_ctl_name(void *ctx, const struct tfs_cow_snap_row *row)
{
	const char *name = ctx;

	return strcmp(row->name, name) ? 0 : -EEXIST;
}

int tfs_fs_cow_name_kept(struct tfs_fs *fs, const char *name)
{
	int r = tfs_catalog_list_cow_snapshots(fs->cat, find_ctl_name, (void *)name);

	return r == -EEXIST ? -EEXIST : r;
}

int tfs_fs_cow_snapshot(struct tfs_fs *fs, const struct tfs_fs_cow_request *req)
{
	struct tfs_cow_snap_row c = { .chunk_sectors = req->chunk_sectors,
				      .persistent = req->persistent };
	struct tfs_cowsnap_params p = {
		.name = req->name, .origin = req->origin, .cow = req->cow,
		.chunk_sectors = req->chunk_sectors, .persistent = req->persistent,
		.probe = true,
	};
	struct id_scan s = { .next_id = TFS_DEV_ID_OTHER };
	struct tfs_vol_row row;
	int r;

	if (!fs->cow)
		return -EROFS;
	if (!strcmp(req->name, TFS_SNAPSHOTS_NAME))
		return -EEXIST;
	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_get_by_name(fs->cat, req->name, &row);
	if (r == 0)
		r = -EEXIST;
	if (r != -ENOENT)
		goto out_unlock;
	r = tfs_catalog_get_by_name(fs->cat, req->origin, &row);
	if (r == 0 && (row.dev_id < TFS_DEV_ID_OTHER || !tfs_cow_set_has(fs->cow, row.dev_id, NULL)))
		r = -ENOENT;
	if (r < 0) {
		r = r == -ENOENT ? -ENXIO : r;
		goto out_unlock;
	}
	r = tfs_catalog_list_volumes(fs->cat, true, scan_row, &s);
	if (r == 0)
		r = tfs_catalog_list_cow_snapshots(fs->cat, keep_ctl_row, &s);
	/* One left out of this mount keeps its name for when it comes back. */
	for (unsigned i = 0; r == 0 && i < s.nr_ctl; i++)
		if (!strcmp(s.ctl[i].name, req->name))
			r = -EEXIST;
	free(s.ctl);
	if (r < 0)
		goto out_unlock;
	p.id = s.next_id;
	/* A name used before: its old record of invalidity is not this snapshot's. */
	tfs_catalog_set_cow_invalid(fs->cat, req->name, false);
	r = tfs_cow_set_add_snapshot(fs->cow, &p);
	if (r < 0)
		goto out_unlock;
	/* Only a persistent store outlives the mount: a transient one is not recorded. */
	memset(&row, 0, sizeof(row));
	row.dev_id = p.id;
	r = tfs_catalog_begin(fs->cat);
	if (r == 0) {
		r = settle_row(fs, &row, true, req->name);
		if (r == 0 && req->persistent) {
			c.dev_id = p.id;
			snprintf(c.name, sizeof(c.name), "%s", req->name);
			snprintf(c.origin, sizeof(c.origin), "%s", req->origin);
			snprintf(c.cow, sizeof(c.cow), "%s", req->cow);
			r = tfs_catalog_add_cow_snapshot(fs->cat, &c);
		}
		if (r == 0)
			r = tfs_catalog_commit(fs->cat);
		if (r < 0)
			tfs_catalog_rollback(fs->cat);
	}
	if (r < 0) {
		tfs_cow_set_remove_snapshot(fs->cow, p.id, false);
		goto out_unlock;
	}
	tfs_fs_event(fs, "snapshot", "classic snapshot %s of %s on %s (%s, %" PRIu64
		     "-byte chunks)", req->name, req->origin, req->cow,
		     req->persistent ? "persistent" : "transient",
		     (uint64_t)req->chunk_sectors * 512);
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

static bool same_target(const struct tfs_cow_target_cfg *a, const struct tfs_cow_target_cfg *b)
{
	return a->is_snapshot == b->is_snapshot && !strcmp(a->name, b->name) &&
	       !strcmp(a->origin, b->origin) && !strcmp(a->device, b->device) &&
	       a->chunk_sectors == b->chunk_sectors && a->persistent == b->persistent;
}

static bool listed(const struct tfs_cow_target_cfg *t, const struct tfs_cow_target_cfg *in,
		   unsigned nr)
{
	for (unsigned i = 0; i < nr; i++)
		if (same_target(t, &in[i]))
			return true;
	return false;
}

static const char *kind_of(const struct tfs_cow_target_cfg *t)
{
	return t->is_snapshot ? "snapshot" : "origin";
}

struct ctl_user {
	struct tfs_catalog *cat;
	const char *origin;
	uint32_t id;
	bool merging;           /* id is being merged into the origin */
};

/* A snapshot of the origin made with thinfs-ctl; one being merged wins. */
static int find_ctl_user(void *ctx, const struct tfs_cow_snap_row *row)
{
	struct ctl_user *u = ctx;

	if (strcmp(row->origin, u->origin) || u->merging)
		return 0;
	if (tfs_catalog_cow_merging(u->cat, row->dev_id)) {
		u->id = row->dev_id;
		u->merging = true;
	} else if (!u->id) {
		u->id = row->dev_id;
	}
	return 0;
}

/* A section that goes: not open, and no snapshot that stays depends on it.  fs->lock held. */
static int check_gone(struct tfs_fs *fs, const struct tfs_cow_target_cfg *t,
		      const struct tfs_pool_config *next, char *why, size_t len)
{
	struct ctl_user u = { .cat = fs->cat, .origin = t->name };
	struct tfs_vol_row row;
	struct tfs_inode *ino;

	if (tfs_catalog_get_by_name(fs->cat, t->name, &row) == 0) {
		ino = tfs_fs_inode_find(fs, row.dev_id);
		if (ino && ino->nopen > 0) {
			snprintf(why, len, "[%s \"%s\"] removed or changed: %s is open: close it "
				 "first", kind_of(t), t->name, t->name);
			return -EBUSY;
		}
	}
	if (t->is_snapshot)
		return 0;
	for (unsigned i = 0; i < next->nr_cow_targets; i++) {
		const struct tfs_cow_target_cfg *n = &next->cow_targets[i];

		if (n->is_snapshot && !strcmp(n->origin, t->name) &&
		    listed(n, fs->cfg.cow_targets, fs->cfg.nr_cow_targets)) {
			snprintf(why, len, "[origin \"%s\"] removed or changed: its snapshot "
				 "[snapshot \"%s\"] stays: remove or change it too", t->name,
				 n->name);
			return -EBUSY;
		}
	}
	tfs_catalog_list_cow_snapshots(fs->cat, find_ctl_user, &u);
	if (u.merging) {
		snprintf(why, len, "[origin \"%s\"] removed or changed: a snapshot is being "
			 "merged into it: wait for merge_done", t->name);
		return -EBUSY;
	}
	if (u.id && tfs_catalog_get_by_id(fs->cat, u.id, &row) == 0) {
		snprintf(why, len, "[origin \"%s\"] removed or changed: snapshot %s made with "
			 "thinfs-ctl is of it: rm it first", t->name, row.name);
		return -EBUSY;
	}
	return 0;
}

/* A section that comes: a free name, and what its devices hold.  fs->lock held. */
static int check_new(struct tfs_fs *fs, const struct tfs_cow_target_cfg *t, char *why,
		     size_t len)
{
	struct tfs_vol_row row;
	bool from_cfg = false;
	int r;

	if (tfs_catalog_get_by_name(fs->cat, t->name, &row) == 0 &&
	    (row.dev_id < TFS_DEV_ID_OTHER ||
	     (tfs_cow_set_has(fs->cow, row.dev_id, &from_cfg) && !from_cfg))) {
		snprintf(why, len, "[%s \"%s\"]: the name is taken by %s %s", kind_of(t), t->name,
			 row.dev_id < TFS_DEV_ID_OTHER ? "thin volume" :
			 "the snapshot made with thinfs-ctl", t->name);
		return -EEXIST;
	}
	if (!t->is_snapshot)
		return 0;
	struct tfs_cowsnap_params p = {
		.name = t->name, .origin = t->origin, .cow = t->device,
		.chunk_sectors = t->chunk_sectors, .persistent = t->persistent, .probe = true,
	};
	char errors[512];

	tfs_log_capture(errors, sizeof(errors));
	r = tfs_cow_set_check_snapshot(fs->cow, &p);
	tfs_log_capture(NULL, 0);
	if (r < 0)
		snprintf(why, len, "%s", errors[0] ? errors : strerror(-r));
	return r;
}

int tfs_fs_cow_reload_check(struct tfs_fs *fs, const struct tfs_pool_config *next, char *why,
			    size_t len)
{
	int r = 0;

	if (!fs->cow)
		return 0;
	pthread_mutex_lock(&fs->lock);
	for (unsigned i = 0; !r && i < fs->cfg.nr_cow_targets; i++)
		if (!listed(&fs->cfg.cow_targets[i], next->cow_targets, next->nr_cow_targets))
			r = check_gone(fs, &fs->cfg.cow_targets[i], next, why, len);
	for (unsigned i = 0; !r && i < next->nr_cow_targets; i++)
		if (!listed(&next->cow_targets[i], fs->cfg.cow_targets, fs->cfg.nr_cow_targets))
			r = check_new(fs, &next->cow_targets[i], why, len);
	pthread_mutex_unlock(&fs->lock);
	return r;
}

/* Take a section out: its device from the set, its row from the catalog.  fs->lock held. */
static void close_section(struct tfs_fs *fs, const struct tfs_cow_target_cfg *t)
{
	struct tfs_vol_row row;
	struct tfs_inode *ino;

	if (tfs_catalog_get_by_name(fs->cat, t->name, &row) < 0 || row.dev_id < TFS_DEV_ID_OTHER)
		return;
	if (t->is_snapshot)
		tfs_cow_set_remove_snapshot(fs->cow, row.dev_id, true);
	else
		tfs_cow_set_remove_origin(fs->cow, row.dev_id);
	tfs_catalog_remove_volume(fs->cat, row.dev_id);
	tfs_catalog_set_cow_invalid(fs->cat, t->name, false);
	ino = tfs_fs_inode_find(fs, row.dev_id);
	if (ino) {
		/* The kernel may still hold the inode: it is gone, as after an unlink. */
		ino->gone = true;
		ino->unlinked = true;
	}
}

/* Snapshots first (an origin goes after its snapshots), origins last. */
static void close_sections(struct tfs_fs *fs, const struct tfs_cow_target_cfg *from,
			   unsigned nr, const struct tfs_cow_target_cfg *keep, unsigned nr_keep)
{
	for (int pass = 0; pass < 2; pass++)
		for (unsigned i = 0; i < nr; i++)
			if (from[i].is_snapshot == (pass == 0) && !listed(&from[i], keep, nr_keep))
				close_section(fs, &from[i]);
}

int tfs_fs_cow_reload_apply(struct tfs_fs *fs, const struct tfs_pool_config *next, char *why,
			    size_t len, char ***gone, unsigned *nr_gone)
{
	struct tfs_cow_target_cfg *old;
	struct id_scan s = { .next_id = TFS_DEV_ID_OTHER };
	unsigned nr_old, n = 0, opened = 0;
	int r = 0;

	*gone = NULL;
	*nr_gone = 0;
	if (!fs->cow)
		return 0;
	old = malloc(sizeof(fs->cfg.cow_targets));
	*gone = calloc(TFS_COW_TARGETS_MAX, sizeof(**gone));
	if (!old || !*gone) {
		free(old);
		free(*gone);
		*gone = NULL;
		snprintf(why, len, "out of memory");
		return -ENOMEM;
	}
	pthread_mutex_lock(&fs->lock);
	nr_old = fs->cfg.nr_cow_targets;
	memcpy(old, fs->cfg.cow_targets, sizeof(fs->cfg.cow_targets));
	/* Again under the lock opens take: a file opened since the check stays. */
	for (unsigned i = 0; !r && i < nr_old; i++)
		if (!listed(&old[i], next->cow_targets, next->nr_cow_targets))
			r = check_gone(fs, &old[i], next, why, len);
	if (r < 0) {
		pthread_mutex_unlock(&fs->lock);
		free(old);
		return r;
	}
	for (unsigned i = 0; i < nr_old; i++)
		if (!listed(&old[i], next->cow_targets, next->nr_cow_targets))
			(*gone)[n++] = strdup(old[i].name);
	*nr_gone = n;
	close_sections(fs, old, nr_old, next->cow_targets, next->nr_cow_targets);
	r = tfs_catalog_list_volumes(fs->cat, true, scan_row, &s);
	if (r == 0)
		r = tfs_catalog_list_cow_snapshots(fs->cat, keep_ctl_row, &s);
	for (unsigned i = 0; !r && i < next->nr_cow_targets; i++) {
		const struct tfs_cow_target_cfg *t = &next->cow_targets[i];
		char errors[512];

		if (listed(t, old, nr_old))
			continue;
		opened++;
		tfs_log_capture(errors, sizeof(errors));
		r = open_section(fs, &s, t);
		tfs_log_capture(NULL, 0);
		if (r < 0)
			snprintf(why, len, "%s", errors[0] ? errors : strerror(-r));
	}
	if (r < 0) {
		/* Back to what ran: the new sections out, the old ones in again. */
		close_sections(fs, next->cow_targets, next->nr_cow_targets, old, nr_old);
		for (unsigned i = 0; i < nr_old; i++)
			if (!listed(&old[i], next->cow_targets, next->nr_cow_targets) &&
			    open_section(fs, &s, &old[i]) < 0)
				tfs_warn("[%s \"%s\"]: could not be opened again after the refused "
					 "reload: it is back at the next mount", kind_of(&old[i]),
					 old[i].name);
	} else {
		fs->cfg.nr_cow_targets = next->nr_cow_targets;
		memcpy(fs->cfg.cow_targets, next->cow_targets, sizeof(fs->cfg.cow_targets));
	}
	pthread_mutex_unlock(&fs->lock);
	free(s.ctl);
	free(old);
	return r < 0 ? r : (int)(n + opened);
}

void tfs_fs_cow_after_resume(struct tfs_fs *fs)
{
	struct tfs_pool_config *cfg;

	if (!fs->cow || !(cfg = malloc(sizeof(*cfg))))
		return;
	tfs_pool_get_config(fs->pool, cfg);
	tfs_cow_set_set_low_water(fs->cow, cfg->snapshot_low_water);
	free(cfg);
}

int tfs_fs_cow_merge(struct tfs_fs *fs, const char *name, uint64_t *chunks, uint32_t *origin_id)
{
	struct tfs_vol_row row;
	struct tfs_inode *ino;
	int r;

	if (!fs->cow)
		return -EROFS;
	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_get_by_name(fs->cat, name, &row);
	if (r == 0 && (row.dev_id < TFS_DEV_ID_OTHER || row.unlinked))
		r = -EINVAL;
	if (r == 0) {
		ino = tfs_fs_inode_find(fs, row.dev_id);
		r = ino && ino->nopen > 0 ? -EBUSY : tfs_cow_set_merge_check(fs->cow, row.dev_id);
		if (r == -ENOENT)
			r = -EINVAL; /* an origin */
	}
	if (r < 0)
		goto out;
	/* Recorded first: from the moment the merge starts, a crash must resume it. */
	r = tfs_catalog_begin(fs->cat);
	if (r == 0) {
		r = tfs_catalog_set_cow_merging(fs->cat, row.dev_id, true);
		if (r == -ENOENT)
			r = 0; /* recorded already (nothing changed) */
		if (r == 0)
			r = tfs_catalog_remove_volume(fs->cat, row.dev_id);
		if (r == 0)
			r = tfs_catalog_commit(fs->cat);
		if (r < 0)
			tfs_catalog_rollback(fs->cat);
	}
	if (r < 0) {
		tfs_err("catalog: cannot record the merge of %s: %s", name, strerror(-r));
		goto out;
	}
	r = tfs_cow_set_merge(fs->cow, row.dev_id, chunks, origin_id);
	if (r < 0) {
		/* Not started: the snapshot is back as it was. */
		tfs_catalog_begin(fs->cat);
		if (tfs_catalog_add_volume(fs->cat, &row) < 0 ||
		    tfs_catalog_set_cow_merging(fs->cat, row.dev_id, false) < 0 ||
		    tfs_catalog_commit(fs->cat) < 0) {
			tfs_catalog_rollback(fs->cat);
			tfs_err("catalog: snapshot %s: its merge did not start, and its row could "
				"not be put back: it is merged at the next mount", name);
		}
		goto out;
	}
	ino = tfs_fs_inode_find(fs, row.dev_id);
	if (ino) {
		/* The kernel may still hold the inode: it is gone, as after an unlink. */
		ino->gone = true;
		ino->unlinked = true;
	}
	if (tfs_catalog_get_by_id(fs->cat, *origin_id, &row) < 0)
		snprintf(row.name, sizeof(row.name), "its origin");
	tfs_fs_event(fs, "merge", "snapshot %s into %s: %" PRIu64 " chunk(s) to merge", name,
		     row.name, *chunks);
out:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

struct merged_row {
	struct tfs_catalog *cat;
	const char *name;
	uint32_t id;
};

static int find_merged(void *ctx, const struct tfs_cow_snap_row *row)
{
	struct merged_row *m = ctx;

	if (!strcmp(row->name, m->name) && tfs_catalog_cow_merging(m->cat, row->dev_id))
		m->id = row->dev_id;
	return 0;
}

void tfs_fs_cow_merged(struct tfs_fs *fs, const char *name)
{
	struct merged_row m = { .cat = fs->cat, .name = name };
	int r;

	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_list_cow_snapshots(fs->cat, find_merged, &m);
	if (r == 0 && m.id) {
		r = tfs_catalog_begin(fs->cat);
		if (r == 0) {
			tfs_catalog_remove_cow_snapshot(fs->cat, m.id);
			tfs_catalog_set_cow_merging(fs->cat, m.id, false);
			r = tfs_catalog_commit(fs->cat);
			if (r < 0)
				tfs_catalog_rollback(fs->cat);
		}
	}
	if (r < 0)
		tfs_warn("catalog: cannot drop the merged snapshot %s: %s (the next mount finds "
			 "nothing left to merge and drops it)", name, strerror(-r));
	tfs_catalog_set_cow_invalid(fs->cat, name, false);
	pthread_mutex_unlock(&fs->lock);
}
