/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * volumes.c - the namespace: volume inodes, open counts, attributes and
 * every change to names, devices and snapshot groups.  See fs.h.
 *
 * Ordering rule for every change: the thin metadata is the truth about
 * which devices exist, so a device is created (and committed) before its
 * catalog row, and a row is hidden (unlinked) before its device is
 * deleted.  A crash between the two steps leaves either a device without a
 * row (shown as thin-<id> at the next mount) or an unlinked row (its device
 * deleted at the next mount): never a half-deleted device.
 */
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "origin.h"
#include "own-mount.h"
#include "utf8.h"
#include "wb-stash.h"

int64_t tfs_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void tfs_format_time(int64_t ns, char *buf, size_t len)
{
	time_t secs = (time_t)(ns / 1000000000);
	struct tm tm;

	gmtime_r(&secs, &tm);
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

void tfs_fs_init(struct tfs_fs *fs)
{
	memset(fs, 0, sizeof(*fs));
	pthread_mutex_init(&fs->lock, NULL);
	pthread_mutex_init(&fs->persist_lock, NULL);
	pthread_mutex_init(&fs->event_lock, NULL);
	pthread_cond_init(&fs->event_cond, NULL);
	pthread_mutex_init(&fs->wb_lock, NULL);
	pthread_cond_init(&fs->wb_cv, NULL);
}

static void inode_free(struct tfs_inode *ino)
{
	pthread_rwlock_destroy(&ino->io_lock);
	pthread_mutex_destroy(&ino->attr_lock);
	tfs_wb_inode_destroy(ino);
	free(ino);
}

void tfs_fs_destroy(struct tfs_fs *fs)
{
	for (unsigned b = 0; b < TFS_INODE_BUCKETS; b++) {
		while (fs->buckets[b]) {
			struct tfs_inode *ino = fs->buckets[b];

			fs->buckets[b] = ino->next;
			inode_free(ino);
		}
	}
	pthread_cond_destroy(&fs->event_cond);
	pthread_mutex_destroy(&fs->event_lock);
	pthread_mutex_destroy(&fs->persist_lock);
	pthread_mutex_destroy(&fs->lock);
}

/* ---- inode table ---- */

static unsigned bucket_of(uint32_t dev_id)
{
	return dev_id % TFS_INODE_BUCKETS;
}

struct tfs_inode *tfs_fs_inode_find(struct tfs_fs *fs, uint32_t dev_id)
{
	struct tfs_inode *ino;

	for (ino = fs->buckets[bucket_of(dev_id)]; ino; ino = ino->next)
		if (ino->dev_id == dev_id)
			return ino;
	return NULL;
}

static void inode_remove(struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct tfs_inode **pp;

	for (pp = &fs->buckets[bucket_of(ino->dev_id)]; *pp; pp = &(*pp)->next) {
		if (*pp == ino) {
			*pp = ino->next;
			inode_free(ino);
			return;
		}
	}
}

/* (Re)initialise the in-memory attributes of an entry from a catalog row. */
static void inode_reset(struct tfs_fs *fs, struct tfs_inode *ino, const struct tfs_vol_row *row)
{
	pthread_mutex_lock(&ino->attr_lock);
	ino->row = *row;
	ino->dirty = false;
	ino->allocated_valid = false;
	pthread_mutex_unlock(&ino->attr_lock);
	ino->generation = ++fs->next_generation;
	ino->unlinked = row->unlinked;
	ino->gone = false;
}

int tfs_fs_inode_lookup(struct tfs_fs *fs, const struct tfs_vol_row *row,
			struct tfs_inode **out)
{
	struct tfs_inode *ino = tfs_fs_inode_find(fs, row->dev_id);

	if (!ino) {
		ino = calloc(1, sizeof(*ino));
		if (!ino)
			return -ENOMEM;
		ino->dev_id = row->dev_id;
		pthread_rwlock_init(&ino->io_lock, NULL);
		pthread_mutex_init(&ino->attr_lock, NULL);
		tfs_wb_inode_init(ino);
		inode_reset(fs, ino, row);
		ino->next = fs->buckets[bucket_of(row->dev_id)];
		fs->buckets[bucket_of(row->dev_id)] = ino;
	} else if (ino->gone) {
		/*
		 * The device id was reused after a delete the kernel has not
		 * forgotten yet.  The kernel counts lookups per inode number,
		 * so the count carries over; a new generation tells it the
		 * old inode is stale.
		 */
		inode_reset(fs, ino, row);
	}
	ino->nlookup++;
	*out = ino;
	return 0;
}

void tfs_fs_forget(struct tfs_fs *fs, uint32_t dev_id, uint64_t n)
{
	struct tfs_inode *ino;

	pthread_mutex_lock(&fs->lock);
	ino = tfs_fs_inode_find(fs, dev_id);
	if (ino) {
		ino->nlookup -= n < ino->nlookup ? n : ino->nlookup;
		if (ino->nlookup == 0 && ino->nopen == 0)
			inode_remove(fs, ino);
	}
	pthread_mutex_unlock(&fs->lock);
}

/* ---- attributes ---- */

int tfs_fs_persist(struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct tfs_vol_row row;
	int r;

	/*
	 * persist_lock keeps two persists of one row in order: without it an
	 * older copy could reach sqlite after a newer one and stay there.
	 */
	pthread_mutex_lock(&fs->persist_lock);
	pthread_mutex_lock(&ino->attr_lock);
	if (!ino->dirty || ino->gone) {
		pthread_mutex_unlock(&ino->attr_lock);
		pthread_mutex_unlock(&fs->persist_lock);
		return 0;
	}
	row = ino->row;
	ino->dirty = false;
	pthread_mutex_unlock(&ino->attr_lock);

	r = tfs_catalog_update_volume(fs->cat, &row);
	if (r < 0) {
		pthread_mutex_lock(&ino->attr_lock);
		ino->dirty = true;
		pthread_mutex_unlock(&ino->attr_lock);
		tfs_warn("catalog: cannot store attributes of %s: %s", row.name, strerror(-r));
	}
	pthread_mutex_unlock(&fs->persist_lock);
	return r;
}

void tfs_fs_persist_all(struct tfs_fs *fs)
{
	pthread_mutex_lock(&fs->lock);
	for (unsigned b = 0; b < TFS_INODE_BUCKETS; b++)
		for (struct tfs_inode *ino = fs->buckets[b]; ino; ino = ino->next)
			tfs_fs_persist(fs, ino);
	pthread_mutex_unlock(&fs->lock);
}

int tfs_fs_inode_attr(struct tfs_fs *fs, struct tfs_inode *ino, struct tfs_vol_row *row,
		      uint64_t *allocated)
{
	struct tfs_dev *dev;
	uint64_t seq, bytes;
	int r;

	pthread_mutex_lock(&ino->attr_lock);
	*row = ino->row;
	if (ino->dev) {
		r = tfs_dev_allocated(ino->dev, allocated);
		pthread_mutex_unlock(&ino->attr_lock);
		return r;
	}
	if (ino->allocated_valid) {
		*allocated = ino->allocated;
		pthread_mutex_unlock(&ino->attr_lock);
		return 0;
	}
	seq = ino->close_seq;
	pthread_mutex_unlock(&ino->attr_lock);

	/* A closed device's count changes only when it is opened: cache the walk. */
	r = tfs_fs_open_dev(fs, ino->dev_id, TFS_DEV_STATUS_ONLY, &dev);
	if (r == 0) {
		r = tfs_dev_allocated(dev, &bytes);
		tfs_dev_close(dev);
	}
	if (r < 0) {
		*allocated = 0;
		return r == -ENODATA ? -ENOENT : r;
	}
	*allocated = bytes;
	pthread_mutex_lock(&ino->attr_lock);
	if (!ino->dev && ino->close_seq == seq) {
		ino->allocated = bytes;
		ino->allocated_valid = true;
	}
	pthread_mutex_unlock(&ino->attr_lock);
	return 0;
}

int tfs_fs_get_volume(struct tfs_fs *fs, const char *name, struct tfs_vol_row *out)
{
	struct tfs_inode *ino;
	int r;

	r = tfs_catalog_get_by_name(fs->cat, name, out);
	if (r < 0)
		return r;
	pthread_mutex_lock(&fs->lock);
	ino = tfs_fs_inode_find(fs, out->dev_id);
	if (ino && !ino->gone) {
		pthread_mutex_lock(&ino->attr_lock);
		*out = ino->row;
		pthread_mutex_unlock(&ino->attr_lock);
	}
	pthread_mutex_unlock(&fs->lock);
	return 0;
}

/* As tfs_fs_get_volume_by_id with fs->lock held. */
static int get_by_id_locked(struct tfs_fs *fs, uint32_t dev_id, struct tfs_vol_row *out)
{
	struct tfs_inode *ino = tfs_fs_inode_find(fs, dev_id);

	if (ino && !ino->gone) {
		pthread_mutex_lock(&ino->attr_lock);
		*out = ino->row;
		pthread_mutex_unlock(&ino->attr_lock);
		return 0;
	}
	return tfs_catalog_get_by_id(fs->cat, dev_id, out);
}

int tfs_fs_get_volume_by_id(struct tfs_fs *fs, uint32_t dev_id, struct tfs_vol_row *out)
{
	int r;

	pthread_mutex_lock(&fs->lock);
	r = get_by_id_locked(fs, dev_id, out);
	pthread_mutex_unlock(&fs->lock);
	return r;
}

struct tfs_inode *tfs_fs_inode_get(struct tfs_fs *fs, uint32_t dev_id)
{
	struct tfs_inode *ino;

	pthread_mutex_lock(&fs->lock);
	ino = tfs_fs_inode_find(fs, dev_id);
	if (ino && ino->gone)
		ino = NULL;
	pthread_mutex_unlock(&fs->lock);
	/* The kernel's reference keeps the entry alive after the lock is dropped. */
	return ino;
}

/* ---- open counts ---- */

int tfs_fs_open_dev(struct tfs_fs *fs, uint32_t dev_id, unsigned flags, struct tfs_dev **out)
{
	if (tfs_fs_is_cache_id(dev_id))
		return tfs_fs_cache_open_dev(fs, dev_id, flags, out);
	if (dev_id >= TFS_DEV_ID_OTHER)
		return fs->cow ? tfs_cow_set_open_dev(fs->cow, dev_id, flags, out) : -ENODATA;
	return tfs_thin_open(fs->pool, dev_id, flags, out);
}

/* Count a pin on ino, opening its engine device at the first.  fs->lock held. */
static int pin_locked(struct tfs_fs *fs, struct tfs_inode *ino, bool for_write)
{
	struct tfs_dev *dev;
	bool member = ino->row.kind == TFS_VOL_GROUP_MEMBER;
	int r;

	if (for_write && (fs->read_only || member))
		return -EROFS;
	if (ino->nopen == 0) {
		r = tfs_fs_open_dev(fs, ino->dev_id,
				    fs->read_only || member ? TFS_DEV_READ_ONLY : 0, &dev);
		if (r < 0) {
			struct tfs_pool_status st;

			/* The caller sees only EIO: say here why the volume cannot be opened. */
			tfs_pool_status(fs->pool, &st);
			if (r == -EIO && st.mode && !strcmp(st.mode, "fail"))
				tfs_warn("cannot open %s%s: the pool is in fail mode (%s); only a "
					 "restart leaves it", ino->row.name,
					 for_write ? " for writing" : "", st.reason);
			return r;
		}
		pthread_mutex_lock(&ino->attr_lock);
		ino->dev = dev;
		pthread_mutex_unlock(&ino->attr_lock);
	}
	ino->nopen++;
	return 0;
}

int tfs_fs_pin(struct tfs_fs *fs, uint32_t dev_id, bool for_write, struct tfs_inode **out)
{
	struct tfs_inode *ino;
	int r;

	pthread_mutex_lock(&fs->lock);
	ino = tfs_fs_inode_find(fs, dev_id);
	r = !ino || ino->gone ? -ENOENT : pin_locked(fs, ino, for_write);
	pthread_mutex_unlock(&fs->lock);
	if (r == 0)
		*out = ino;
	return r;
}

int tfs_fs_hold_volume(struct tfs_fs *fs, const struct tfs_vol_row *want, struct tfs_inode **out)
{
	struct tfs_vol_row row;
	struct tfs_inode *ino = NULL;
	int r;

	pthread_mutex_lock(&fs->lock);
	r = get_by_id_locked(fs, want->dev_id, &row);
	/* Deleted, or the id reused, since the caller looked the name up. */
	if (r == 0 && (row.unlinked || row.group_id != want->group_id || strcmp(row.name, want->name)))
		r = -ENOENT;
	if (r == 0) {
		ino = tfs_fs_inode_find(fs, row.dev_id);
		if (!ino || ino->gone) {
			/* An entry the kernel has not looked up: it counts no lookup. */
			r = tfs_fs_inode_lookup(fs, &row, &ino);
			if (r == 0)
				ino->nlookup--;
		}
	}
	if (r == 0) {
		r = pin_locked(fs, ino, false);
		if (r < 0 && ino->nopen == 0 && ino->nlookup == 0)
			inode_remove(fs, ino);
	}
	pthread_mutex_unlock(&fs->lock);
	if (r == 0)
		*out = ino;
	return r;
}

static void event_locked_delete(struct tfs_fs *fs, const char *name, uint32_t dev_id)
{
	tfs_fs_event(fs, "delete", "volume %s (device %" PRIu32 ") deleted", name, dev_id);
}

/*
 * Delete a device whose catalog row is already unlinked, then the row.
 * fs->lock held.  A failure leaves an unlinked row: the next mount's
 * reconcile finishes the job.
 */
static int delete_unlinked(struct tfs_fs *fs, uint32_t dev_id, const char *name)
{
	int r;

	if (dev_id >= TFS_DEV_ID_OTHER)
		return tfs_fs_cow_delete(fs, dev_id, name);
	r = tfs_pool_delete(fs->pool, dev_id);
	if (r == -EBUSY && tfs_pool_is_suspended(fs->pool)) {
		/* The row stays unlinked: tfs_fs_after_resume finds it. */
		tfs_info("volume %s: device %" PRIu32 " is deleted when the pool resumes", name,
			 dev_id);
		return r;
	}
	if (r < 0 && r != -ENODATA) {
		tfs_err("cannot delete device %" PRIu32 " (%s): %s; the next mount retries",
			dev_id, name, strerror(-r));
		return r;
	}
	r = tfs_catalog_remove_volume(fs->cat, dev_id);
	if (r < 0)
		tfs_warn("catalog: cannot remove the row of device %" PRIu32 ": %s", dev_id,
			 strerror(-r));
	event_locked_delete(fs, name, dev_id);
	return 0;
}

static void mark_gone(struct tfs_inode *ino)
{
	ino->gone = true;
	ino->unlinked = true;
	pthread_mutex_lock(&ino->attr_lock);
	ino->dirty = false;
	ino->row.unlinked = true;
	pthread_mutex_unlock(&ino->attr_lock);
}

/* Close the engine device of an inode whose last pin went. fs->lock held. */
static void last_close_locked(struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct tfs_dev *dev = ino->dev;
	uint64_t allocated = 0;
	bool known;

	if (!ino->unlinked)
		tfs_fs_persist(fs, ino);
	known = tfs_dev_allocated(dev, &allocated) == 0;
	pthread_mutex_lock(&ino->attr_lock);
	ino->dev = NULL;
	ino->allocated = allocated;
	ino->allocated_valid = known;
	ino->close_seq++;
	pthread_mutex_unlock(&ino->attr_lock);
	tfs_dev_close(dev);

	if (ino->unlinked && !ino->gone) {
		if (delete_unlinked(fs, ino->dev_id, ino->row.name) == 0)
			mark_gone(ino);
		else
			ino->gone = true; /* the row stays unlinked: reconcile deletes it */
	}
}

void tfs_fs_unpin(struct tfs_fs *fs, struct tfs_inode *ino)
{
	pthread_mutex_lock(&fs->lock);
	if (--ino->nopen == 0) {
		last_close_locked(fs, ino);
		if (ino->nlookup == 0)
			inode_remove(fs, ino);
	}
	pthread_mutex_unlock(&fs->lock);
}

void tfs_fs_pin_again(struct tfs_fs *fs, struct tfs_inode *ino)
{
	pthread_mutex_lock(&fs->lock);
	ino->nopen++;
	pthread_mutex_unlock(&fs->lock);
}

void tfs_fs_close_all(struct tfs_fs *fs)
{
	pthread_mutex_lock(&fs->lock);
	for (unsigned b = 0; b < TFS_INODE_BUCKETS; b++) {
		for (struct tfs_inode *ino = fs->buckets[b]; ino; ino = ino->next) {
			if (ino->nopen > 0) {
				tfs_warn("volume %s still open at shutdown: closing it", ino->row.name);
				ino->nopen = 0;
				last_close_locked(fs, ino);
			} else {
				tfs_fs_persist(fs, ino);
			}
		}
	}
	pthread_mutex_unlock(&fs->lock);
}

/* ---- the kernel's cached writes ---- */

struct cached_writer {
	uint32_t dev_id;
	char name[TFS_NAME_MAX + 1];
};

/*
 * Open top-level volumes (of ids[0..nr), or all when nr == 0), under
 * fs->lock.  Not fixed-size files: their writable opens bypass the page
 * cache (fuse-ops.c), so it never holds their writes, and an fsync of one
 * would only wait for its device's in-flight I/O.
 */
static int list_open_volumes(struct tfs_fs *fs, const uint32_t *ids, unsigned nr,
			     struct cached_writer **out, unsigned *nr_out)
{
	struct cached_writer *w = NULL, *n;
	unsigned cnt = 0, cap = 0;
	int r = 0;

	pthread_mutex_lock(&fs->lock);
	for (unsigned b = 0; b < TFS_INODE_BUCKETS; b++) {
		for (struct tfs_inode *ino = fs->buckets[b]; ino; ino = ino->next) {
			bool wanted = nr == 0;

			for (unsigned i = 0; i < nr && !wanted; i++)
				wanted = ids[i] == ino->dev_id;
			if (!wanted || ino->nopen == 0 || ino->unlinked || ino->gone ||
			    ino->row.kind == TFS_VOL_GROUP_MEMBER || ino->dev_id >= TFS_DEV_ID_OTHER)
				continue;
			if (cnt == cap) {
				cap = cap ? cap * 2 : 16;
				n = realloc(w, cap * sizeof(*w));
				if (!n) {
					r = -ENOMEM;
					goto out;
				}
				w = n;
			}
			w[cnt].dev_id = ino->dev_id;
			snprintf(w[cnt].name, sizeof(w[cnt].name), "%s", ino->row.name);
			cnt++;
		}
	}
out:
	pthread_mutex_unlock(&fs->lock);
	if (r < 0) {
		free(w);
		return r;
	}
	*out = w;
	*nr_out = cnt;
	return 0;
}

/*
 * fsync(2) of each volume of w[0..cnt) through the mount, by a child
 * process (own-mount.h): 0, or the first writeback's -errno.  A volume
 * gone meanwhile, or one the daemon may not open (an unprivileged daemon,
 * a volume of mode 0200), is skipped: that is no reason to refuse the
 * caller.  A suspended volume's writes would wait for its resume, and so
 * would we: skipped too.
 */
static int fsync_volumes(struct tfs_fs *fs, const struct cached_writer *w, unsigned cnt,
			 const char *why)
{
	struct tfs_own_fsync *f = calloc(cnt, sizeof(*f));
	unsigned n = 0;
	int r;

	if (!f)
		return -ENOMEM;
	for (unsigned i = 0; i < cnt; i++) {
		if (tfs_pool_dev_suspended(fs->pool, w[i].dev_id))
			continue;
		f[n].name = w[i].name;
		f[n].ino = tfs_ino_of_dev(w[i].dev_id);
		n++;
	}
	r = n ? tfs_own_mount_fsync(fs->mountpoint, TFS_INO_ROOT, f, n) : 0;
	if (r == -ENOENT) {
		/* Overmounted or gone: nothing of ours to flush there. */
		tfs_warn("%s: cannot reach the mount %s to flush cached writes", why,
			 fs->mountpoint);
		r = 0;
	} else if (r == 0) {
		for (unsigned i = 0; i < n; i++) {
			if (f[i].open_err && f[i].open_err != -ENOENT)
				tfs_warn("%s: cannot open %s through the mount to write back its "
					 "cached writes: %s", why, f[i].name,
					 strerror(-f[i].open_err));
			if (f[i].err)
				tfs_err("%s: writing back the cached writes of %s: %s", why,
					f[i].name, strerror(-f[i].err));
			if (f[i].err && !r)
				r = f[i].err;
		}
	}
	free(f);
	return r;
}

int tfs_fs_flush_cached_writes(struct tfs_fs *fs, const uint32_t *ids, unsigned nr,
			       const char *why)
{
	struct tfs_pool_status st;
	struct cached_writer *w;
	unsigned cnt;
	int r;

	if (!fs->writeback || fs->read_only)
		return 0;
	/*
	 * Writes held for data space would hold this fsync (forever with
	 * no_space_timeout = 0) and with it the caller: what is held is not
	 * flushed, as with a pool that cannot take it.
	 */
	tfs_pool_status(fs->pool, &st);
	if (st.mode && strcmp(st.mode, "write")) {
		tfs_info("%s: the pool is in %s mode: writes still in the kernel's cache are "
			 "not flushed first", why, st.mode);
		return 0;
	}
	r = list_open_volumes(fs, ids, nr, &w, &cnt);
	if (r < 0 || cnt == 0)
		return r;
	r = fsync_volumes(fs, w, cnt, why);
	free(w);
	return r;
}

/* ---- sizes ---- */

int tfs_fs_set_size(struct tfs_fs *fs, struct tfs_inode *ino, uint64_t size)
{
	uint64_t old;
	int r = 0;

	if (size > fs->max_size)
		return -EFBIG;
	if (!ino->dev)
		return -EBADF;
	pthread_rwlock_wrlock(&ino->io_lock);
	pthread_mutex_lock(&ino->attr_lock);
	old = ino->row.size;
	pthread_mutex_unlock(&ino->attr_lock);
	/* An origin, its snapshots and a cache have the origin device's size. */
	if (ino->dev_id >= TFS_DEV_ID_OTHER && size != old)
		r = -EPERM;
	else if (size < old)
		r = tfs_dev_truncate(ino->dev, size);
	if (r == 0) {
		int64_t now = tfs_now_ns();

		pthread_mutex_lock(&ino->attr_lock);
		ino->row.size = size;
		ino->row.mtime_ns = ino->row.ctime_ns = now;
		ino->dirty = true;
		pthread_mutex_unlock(&ino->attr_lock);
	}
	pthread_rwlock_unlock(&ino->io_lock);
	if (r == 0)
		r = tfs_fs_persist(fs, ino);
	return r;
}

void tfs_fs_extend(struct tfs_fs *fs, struct tfs_inode *ino, uint64_t end, bool touch_mtime)
{
	int64_t now = touch_mtime ? tfs_now_ns() : 0;

	pthread_mutex_lock(&ino->attr_lock);
	/* An origin and its snapshots keep the origin device's size. */
	if (end > ino->row.size && ino->dev_id < TFS_DEV_ID_OTHER) {
		ino->row.size = end;
		ino->dirty = true;
	}
	if (touch_mtime) {
		ino->row.mtime_ns = ino->row.ctime_ns = now;
		ino->dirty = true;
	}
	pthread_mutex_unlock(&ino->attr_lock);
}

/* ---- namespace changes ---- */

static bool is_reserved(const char *name)
{
	return !strcmp(name, TFS_SNAPSHOTS_NAME);
}

/* Checks every new top-level name passes before the lock is taken. */
static int check_new_name(struct tfs_fs *fs, const char *name)
{
	int r = tfs_catalog_check_name(name);

	if (r < 0)
		return r;
	if (is_reserved(name))
		return -EEXIST;
	return fs->read_only ? -EROFS : 0;
}

/*
 * 0 when no visible top-level volume has name and no classic snapshot keeps
 * it (one being merged has no volume row); -EEXIST or a catalog error
 * otherwise. Under fs->lock.
 */
static int name_free_locked(struct tfs_fs *fs, const char *name)
{
	struct tfs_vol_row row;
	int r = tfs_catalog_get_by_name(fs->cat, name, &row);

	if (r == 0)
		return -EEXIST;
	if (r != -ENOENT)
		return r;
	return tfs_fs_cow_name_kept(fs, name);
}

int tfs_fs_create_volume(struct tfs_fs *fs, const char *name, uint32_t mode, uid_t uid,
			 gid_t gid, struct tfs_inode **out)
{
	struct tfs_vol_row row;
	uint32_t id;
	int r;

	r = check_new_name(fs, name);
	if (r < 0)
		return r;

	pthread_mutex_lock(&fs->lock);
	r = name_free_locked(fs, name);
	if (r < 0)
		goto out_unlock;

	r = tfs_pool_create_thin(fs->pool, &id);
	if (r < 0)
		goto out_unlock;

	memset(&row, 0, sizeof(row));
	snprintf(row.name, sizeof(row.name), "%s", name);
	row.dev_id = id;
	row.kind = TFS_VOL_THIN;
	row.mode = mode & 07777;
	row.uid = uid;
	row.gid = gid;
	row.atime_ns = row.mtime_ns = row.ctime_ns = tfs_now_ns();
	r = tfs_catalog_add_volume(fs->cat, &row);
	if (r < 0) {
		/* No name points at it: take the device back. */
		if (tfs_pool_delete(fs->pool, id) < 0)
			tfs_warn("device %" PRIu32 " left without a name: shown as thin-%" PRIu32
				 " at the next mount", id, id);
		goto out_unlock;
	}
	r = tfs_fs_inode_lookup(fs, &row, out);
	if (r == 0)
		tfs_fs_event(fs, "create", "volume %s (device %" PRIu32 ") created", name, id);
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

/*
 * Remove the name of a top-level volume whose row is row.  fs->lock held.
 * Open: the row is unlinked and the device waits for the last close.
 * Closed: unlink, delete the device, remove the row, now.
 */
static int unlink_row_locked(struct tfs_fs *fs, const struct tfs_vol_row *row)
{
	struct tfs_inode *ino = tfs_fs_inode_find(fs, row->dev_id);
	bool open = ino && ino->nopen > 0;
	int r;

	if (tfs_fs_is_cache_id(row->dev_id)) {
		tfs_warn("%s is a cache from pool.cfg: remove its section from pool.cfg to remove it",
			 row->name);
		return -EPERM;
	}
	r = tfs_fs_cow_may_unlink(fs, row);
	if (r < 0)
		return r;
	/* Deleting the device now would change a suspended pool; an open one waits anyway. */
	if (!open && row->dev_id < TFS_DEV_ID_OTHER && tfs_pool_is_suspended(fs->pool))
		return -EBUSY;
	r = tfs_catalog_unlink(fs->cat, row->dev_id);
	if (r < 0)
		return r;
	if (open) {
		ino->unlinked = true;
		pthread_mutex_lock(&ino->attr_lock);
		ino->row.unlinked = true;
		pthread_mutex_unlock(&ino->attr_lock);
		return 0;
	}
	r = delete_unlinked(fs, row->dev_id, row->name);
	if (ino) {
		if (r == 0)
			mark_gone(ino);
		else
			ino->gone = true;
	}
	/* The name is gone whatever happened to the device. */
	return 0;
}

int tfs_fs_unlink_volume(struct tfs_fs *fs, const char *name)
{
	struct tfs_vol_row row;
	int r;

	if (is_reserved(name))
		return -EISDIR;
	if (fs->read_only)
		return -EROFS;
	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_get_by_name(fs->cat, name, &row);
	if (r == 0)
		r = unlink_row_locked(fs, &row);
	pthread_mutex_unlock(&fs->lock);
	return r;
}

int tfs_fs_rename_volume(struct tfs_fs *fs, const char *old_name, const char *new_name,
			 unsigned flags)
{
	const unsigned noreplace = 1u << 0; /* RENAME_NOREPLACE */
	struct tfs_vol_row src, dst;
	struct tfs_inode *ino;
	bool replace = false;
	int r;

	if (flags & ~noreplace)
		return -EINVAL; /* RENAME_EXCHANGE, RENAME_WHITEOUT */
	if (is_reserved(old_name))
		return -EPERM;
	if (is_reserved(new_name))
		return (flags & noreplace) ? -EEXIST : -EISDIR;
	r = tfs_catalog_check_name(new_name);
	if (r < 0)
		return r;
	if (fs->read_only)
		return -EROFS;

	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_get_by_name(fs->cat, old_name, &src);
	if (r < 0)
		goto out_unlock;
	if (!strcmp(old_name, new_name))
		goto out_unlock;
	r = tfs_catalog_get_by_name(fs->cat, new_name, &dst);
	/* An origin's, classic snapshot's or cache's name is its section's or the catalog's. */
	if (src.dev_id >= TFS_DEV_ID_OTHER || (r == 0 && dst.dev_id >= TFS_DEV_ID_OTHER)) {
		r = -EPERM;
		goto out_unlock;
	}
	if (r == 0) {
		if (flags & noreplace) {
			r = -EEXIST;
			goto out_unlock;
		}
		replace = true;
	} else if (r != -ENOENT) {
		goto out_unlock;
	} else {
		r = tfs_fs_cow_name_kept(fs, new_name);
		if (r < 0) {
			r = r == -EEXIST ? -EPERM : r; /* a classic snapshot's, as above */
			goto out_unlock;
		}
	}

	if (replace) {
		/*
		 * Hide the replaced volume and move the name in one sqlite
		 * transaction, so no instant shows neither or both.  Its device
		 * goes afterwards, as for unlink.
		 */
		r = tfs_catalog_begin(fs->cat);
		if (r < 0)
			goto out_unlock;
		r = tfs_catalog_unlink(fs->cat, dst.dev_id);
		if (r == 0)
			r = tfs_catalog_rename(fs->cat, old_name, new_name);
		if (r == 0)
			r = tfs_catalog_commit(fs->cat);
		if (r < 0) {
			tfs_catalog_rollback(fs->cat);
			goto out_unlock;
		}
		ino = tfs_fs_inode_find(fs, dst.dev_id);
		if (ino && ino->nopen > 0) {
			ino->unlinked = true;
			pthread_mutex_lock(&ino->attr_lock);
			ino->row.unlinked = true;
			pthread_mutex_unlock(&ino->attr_lock);
		} else {
			int d = delete_unlinked(fs, dst.dev_id, dst.name);

			if (ino) {
				if (d == 0)
					mark_gone(ino);
				else
					ino->gone = true;
			}
		}
	} else {
		r = tfs_catalog_rename(fs->cat, old_name, new_name);
		if (r < 0)
			goto out_unlock;
	}

	ino = tfs_fs_inode_find(fs, src.dev_id);
	if (ino && !ino->gone) {
		pthread_mutex_lock(&ino->attr_lock);
		snprintf(ino->row.name, sizeof(ino->row.name), "%s", new_name);
		pthread_mutex_unlock(&ino->attr_lock);
	}
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

/* Rows collected from a catalog listing. */
struct row_list {
	struct tfs_vol_row *rows;
	unsigned nr, cap;
	int64_t group_id; /* collect rows of this group (0 = top level) */
	bool include_unlinked;
};

static int collect_row(void *ctx, const struct tfs_vol_row *row)
{
	struct row_list *l = ctx;

	if (row->group_id != l->group_id)
		return 0;
	if (row->unlinked && !l->include_unlinked)
		return 0;
	if (l->group_id == 0 && row->kind == TFS_VOL_GROUP_MEMBER)
		return 0;
	if (l->nr == l->cap) {
		unsigned cap = l->cap ? l->cap * 2 : 16;
		struct tfs_vol_row *n = realloc(l->rows, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		l->rows = n;
		l->cap = cap;
	}
	l->rows[l->nr++] = *row;
	return 0;
}

static int list_rows(struct tfs_fs *fs, int64_t group_id, bool with_unlinked,
		     struct row_list *l)
{
	int r;

	memset(l, 0, sizeof(*l));
	l->group_id = group_id;
	l->include_unlinked = with_unlinked;
	r = tfs_catalog_list_volumes(fs->cat, with_unlinked, collect_row, l);
	if (r < 0) {
		free(l->rows);
		l->rows = NULL;
		l->nr = 0;
	}
	return r;
}

static const char *pool_mode(struct tfs_fs *fs)
{
	struct tfs_pool_status st;

	tfs_pool_status(fs->pool, &st);
	return st.mode;
}

/*
 * A group is made whole or not at all, across a crash too: its rows go to
 * the catalog first, marked as being made, with device ids chosen before
 * the devices exist; then the snapshots, in one metadata transaction; then
 * the mark goes.  Until then the group is invisible, and the next mount
 * completes it if every device exists or deletes the ones that do
 * (daemon.c: settle_groups).
 */
int tfs_fs_create_group(struct tfs_fs *fs, const char *name, struct tfs_group_row *out)
{
	struct row_list l;
	uint32_t *origins = NULL, *snaps = NULL;
	const char *mode;
	int64_t now, gid;
	int r;

	r = tfs_catalog_check_name(name);
	if (r < 0)
		return r;
	if (fs->read_only)
		return -EROFS;

	pthread_mutex_lock(&fs->lock);
	r = tfs_catalog_get_group(fs->cat, name, out);
	if (r == 0) {
		r = -EEXIST;
		goto out_unlock;
	}
	if (r != -ENOENT)
		goto out_unlock;
	r = list_rows(fs, 0, false, &l);
	if (r < 0)
		goto out_unlock;
	/* A group holds thin devices only: origins, classic snapshots and caches stay out. */
	for (unsigned i = 0, n = l.nr; i < n; i++)
		if (l.rows[i].dev_id >= TFS_DEV_ID_OTHER)
			l.nr--;
		else
			l.rows[i - (n - l.nr)] = l.rows[i];
	origins = calloc(l.nr + 1, sizeof(*origins));
	snaps = calloc(l.nr + 1, sizeof(*snaps));
	if (!origins || !snaps) {
		r = -ENOMEM;
		goto out_free;
	}
	for (unsigned i = 0; i < l.nr; i++) {
		/* Sizes of open volumes may be newer in memory than in the catalog. */
		get_by_id_locked(fs, l.rows[i].dev_id, &l.rows[i]);
		origins[i] = l.rows[i].dev_id;
	}
	if (l.nr > 0) {
		/* fs->lock keeps them free: every device is made under it. */
		r = tfs_pool_free_ids(fs->pool, l.nr, snaps);
		if (r < 0)
			goto out_free;
	}

	now = tfs_now_ns();
	r = tfs_catalog_begin(fs->cat);
	if (r < 0)
		goto out_free;
	r = tfs_catalog_add_unfinished_group(fs->cat, name, now, &gid);
	for (unsigned i = 0; r == 0 && i < l.nr; i++) {
		struct tfs_vol_row m = l.rows[i];

		m.dev_id = snaps[i];
		m.kind = TFS_VOL_GROUP_MEMBER;
		/*
		 * The origin's owner, group and read/execute bits as they are
		 * now, as ZFS's .zfs/snapshot keeps them: a snapshot of a private
		 * volume stays private.  Write, setuid, setgid and sticky bits go.
		 */
		m.mode = l.rows[i].mode & 0555;
		m.ctime_ns = now;
		m.group_id = gid;
		m.unlinked = false;
		r = tfs_catalog_add_volume(fs->cat, &m);
		if (i == 0)
			tfs_fs_crash_point(fs, "group-create-between-rows");
	}
	if (r == 0)
		r = tfs_catalog_commit(fs->cat);
	if (r < 0) {
		tfs_catalog_rollback(fs->cat);
		goto out_free;
	}
	tfs_fs_crash_point(fs, "group-create-after-intent");

	mode = pool_mode(fs);
	if (l.nr > 0) {
		/* One metadata transaction: every volume at the same instant. */
		r = tfs_pool_create_snaps_as(fs->pool, origins, l.nr, snaps);
		/*
		 * Refused, the devices do not exist.  A metadata failure changes
		 * the pool's mode, and the disk may then hold them or not: the
		 * next mount finds out and removes them.
		 */
		if (r < 0 && !strcmp(pool_mode(fs), mode))
			goto out_remove_group;
		if (r < 0) {
			tfs_catalog_set_group_intent(fs->cat, gid, TFS_GROUP_REMOVING);
			goto out_left;
		}
	}
	tfs_fs_crash_point(fs, "group-create-after-devices");
	r = tfs_catalog_set_group_intent(fs->cat, gid, TFS_GROUP_WHOLE);
	if (r < 0) {
		if (tfs_pool_delete_devices(fs->pool, snaps, l.nr) < 0)
			goto out_left;
		goto out_remove_group;
	}

	out->id = gid;
	snprintf(out->name, sizeof(out->name), "%s", name);
	out->created_ns = now;
	out->intent = TFS_GROUP_WHOLE;
	{
		char detail[400];
		size_t used = 0;

		detail[0] = '\0';
		for (unsigned i = 0; i < l.nr && used < sizeof(detail) - 1; i++)
			used += (size_t)snprintf(detail + used, sizeof(detail) - used, "%s%s",
						 i ? " " : "", l.rows[i].name);
		detail[tfs_utf8_whole_prefix(detail, strlen(detail))] = '\0';
		tfs_fs_event(fs, "snapshot", "group %s: %u volume(s): %s", name, l.nr, detail);
	}
	goto out_free;

out_remove_group:
	/* No device of the group exists: its rows can go. */
	if (tfs_catalog_remove_group(fs->cat, gid) == 0)
		goto out_free;
out_left:
	tfs_warn("snapshot group %s is left half made: the next mount finishes or removes it",
		 name);
out_free:
	free(origins);
	free(snaps);
	free(l.rows);
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

/*
 * Removal is whole across a crash too: the group is marked as being
 * removed (and vanishes), then its devices go in one metadata
 * transaction, then its rows.  The next mount finishes a removal that was
 * started (daemon.c: settle_groups).
 */
int tfs_fs_remove_group(struct tfs_fs *fs, const char *name)
{
	struct tfs_group_row g;
	struct row_list l;
	uint32_t *ids = NULL;
	int r;

	if (fs->read_only)
		return -EROFS;
	for (int tries = 0;; tries++) {
		bool busy = false;

		pthread_mutex_lock(&fs->lock);
		r = tfs_catalog_get_group(fs->cat, name, &g);
		if (r < 0)
			goto out_unlock;
		r = list_rows(fs, g.id, true, &l);
		if (r < 0)
			goto out_unlock;
		for (unsigned i = 0; i < l.nr; i++) {
			struct tfs_inode *ino = tfs_fs_inode_find(fs, l.rows[i].dev_id);

			busy |= ino && ino->nopen > 0;
		}
		if (!busy)
			break;
		pthread_mutex_unlock(&fs->lock);
		free(l.rows);
		/*
		 * The kernel sends RELEASE after close(2) has returned, so a
		 * member read just before the rmdir may still count as open
		 * for a moment: give it up to two seconds before -EBUSY.
		 */
		if (tries >= 200)
			return -EBUSY;
		usleep(10000);
	}
	ids = calloc(l.nr + 1, sizeof(*ids));
	if (!ids) {
		r = -ENOMEM;
		goto out_free;
	}
	for (unsigned i = 0; i < l.nr; i++)
		ids[i] = l.rows[i].dev_id;
	r = tfs_catalog_set_group_intent(fs->cat, g.id, TFS_GROUP_REMOVING);
	if (r < 0)
		goto out_free;
	tfs_fs_crash_point(fs, "group-remove-after-intent");
	if (l.nr > 0) {
		const char *mode = pool_mode(fs);

		r = tfs_pool_delete_devices(fs->pool, ids, l.nr);
		/*
		 * Refused (the pool's mode unchanged): nothing was deleted, so the
		 * group is whole again.  After a metadata failure the next mount
		 * finishes the removal.
		 */
		if (r < 0 && (strcmp(pool_mode(fs), mode) ||
			      tfs_catalog_set_group_intent(fs->cat, g.id, TFS_GROUP_WHOLE) < 0))
			tfs_warn("snapshot group %s is left half removed: the next mount "
				 "finishes removing it", name);
		if (r < 0)
			goto out_free;
	}
	tfs_fs_crash_point(fs, "group-remove-after-devices");
	for (unsigned i = 0; i < l.nr; i++) {
		struct tfs_inode *ino = tfs_fs_inode_find(fs, l.rows[i].dev_id);

		if (ino)
			mark_gone(ino);
	}
	r = tfs_catalog_begin(fs->cat);
	for (unsigned i = 0; r == 0 && i < l.nr; i++) {
		r = tfs_catalog_remove_volume(fs->cat, l.rows[i].dev_id);
		if (i == 0)
			tfs_fs_crash_point(fs, "group-remove-between-rows");
	}
	if (r == 0)
		r = tfs_catalog_remove_group(fs->cat, g.id);
	if (r == 0)
		r = tfs_catalog_commit(fs->cat);
	if (r < 0) {
		tfs_catalog_rollback(fs->cat);
		tfs_warn("catalog: snapshot group %s lost its devices but not its rows: the next "
			 "mount finishes removing it", name);
		r = 0; /* the group is gone all the same: it stays invisible */
	}
	tfs_fs_event(fs, "delete", "snapshot group %s deleted (%u volume(s))", name, l.nr);
out_free:
	free(ids);
	free(l.rows);
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

struct group_find {
	int64_t id;
	struct tfs_group_row *out;
	bool found;
};

static int find_group_cb(void *ctx, const struct tfs_group_row *row)
{
	struct group_find *f = ctx;

	if (row->id == f->id) {
		*f->out = *row;
		f->found = true;
	}
	return 0;
}

int tfs_fs_group_by_id(struct tfs_fs *fs, int64_t id, struct tfs_group_row *out)
{
	struct group_find f = { .id = id, .out = out };
	int r;

	r = tfs_catalog_list_groups(fs->cat, find_group_cb, &f);
	if (r < 0)
		return r;
	return f.found ? 0 : -ENOENT;
}

int tfs_fs_list(struct tfs_fs *fs, int64_t group_id, struct tfs_vol_row **rows, unsigned *nr)
{
	struct row_list l;
	int r;

	r = list_rows(fs, group_id, false, &l);
	if (r < 0)
		return r;
	pthread_mutex_lock(&fs->lock);
	for (unsigned i = 0; i < l.nr; i++)
		get_by_id_locked(fs, l.rows[i].dev_id, &l.rows[i]);
	pthread_mutex_unlock(&fs->lock);
	*rows = l.rows;
	*nr = l.nr;
	return 0;
}

struct group_list {
	struct tfs_group_row *rows;
	unsigned nr, cap;
};

static int collect_group(void *ctx, const struct tfs_group_row *row)
{
	struct group_list *l = ctx;

	if (l->nr == l->cap) {
		unsigned cap = l->cap ? l->cap * 2 : 16;
		struct tfs_group_row *n = realloc(l->rows, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		l->rows = n;
		l->cap = cap;
	}
	l->rows[l->nr++] = *row;
	return 0;
}

int tfs_fs_list_groups(struct tfs_fs *fs, struct tfs_group_row **rows, unsigned *nr)
{
	struct group_list l = { 0 };
	int r;

	r = tfs_catalog_list_groups(fs->cat, collect_group, &l);
	if (r < 0) {
		free(l.rows);
		return r;
	}
	*rows = l.rows;
	*nr = l.nr;
	return 0;
}

/* Find "GROUP/NAME" (a group member) or NAME (top level). fs->lock held. */
static int find_source_locked(struct tfs_fs *fs, const char *src, struct tfs_vol_row *out)
{
	const char *slash;
	char gname[TFS_NAME_MAX + 1];
	struct tfs_group_row g;
	struct row_list l;
	int r;

	if (!strncmp(src, TFS_SNAPSHOTS_NAME "/", sizeof(TFS_SNAPSHOTS_NAME)))
		src += sizeof(TFS_SNAPSHOTS_NAME);
	slash = strchr(src, '/');
	if (!slash) {
		r = tfs_catalog_get_by_name(fs->cat, src, out);
		return r < 0 ? r : get_by_id_locked(fs, out->dev_id, out);
	}
	if ((size_t)(slash - src) > TFS_NAME_MAX)
		return -ENAMETOOLONG;
	memcpy(gname, src, (size_t)(slash - src));
	gname[slash - src] = '\0';
	r = tfs_catalog_get_group(fs->cat, gname, &g);
	if (r < 0)
		return r;
	r = list_rows(fs, g.id, false, &l);
	if (r < 0)
		return r;
	r = -ENOENT;
	for (unsigned i = 0; i < l.nr; i++) {
		if (!strcmp(l.rows[i].name, slash + 1)) {
			*out = l.rows[i];
			r = 0;
			break;
		}
	}
	free(l.rows);
	return r;
}

int tfs_fs_find_volume(struct tfs_fs *fs, const char *spec, struct tfs_vol_row *out)
{
	int r;

	pthread_mutex_lock(&fs->lock);
	r = find_source_locked(fs, spec, out);
	pthread_mutex_unlock(&fs->lock);
	return r;
}

int tfs_fs_snapshot_volume(struct tfs_fs *fs, const char *src, const char *new_name)
{
	struct tfs_vol_row s, row;
	uint32_t id;
	int r;

	r = check_new_name(fs, new_name);
	if (r < 0)
		return r;

	pthread_mutex_lock(&fs->lock);
	r = find_source_locked(fs, src, &s);
	if (r == 0 && s.dev_id >= TFS_DEV_ID_OTHER)
		r = -EXDEV; /* not a thin device: a classic snapshot needs --cow */
	if (r < 0)
		goto out_unlock;
	r = name_free_locked(fs, new_name);
	if (r < 0)
		goto out_unlock;
	r = tfs_pool_create_snaps(fs->pool, &s.dev_id, 1, &id);
	if (r < 0)
		goto out_unlock;

	row = s;
	snprintf(row.name, sizeof(row.name), "%s", new_name);
	row.dev_id = id;
	row.kind = TFS_VOL_SNAPSHOT;
	if (s.kind == TFS_VOL_GROUP_MEMBER)
		row.mode = s.mode | 0200; /* a writable clone of a read-only member, no wider */
	row.ctime_ns = tfs_now_ns();
	row.group_id = 0;
	row.unlinked = false;
	r = tfs_catalog_add_volume(fs->cat, &row);
	if (r < 0) {
		if (tfs_pool_delete(fs->pool, id) < 0)
			tfs_warn("device %" PRIu32 " left without a name: shown as thin-%" PRIu32
				 " at the next mount", id, id);
		goto out_unlock;
	}
	tfs_fs_event(fs, "snapshot", "volume %s snapshot of %s (device %" PRIu32 ")", new_name,
		     src, id);
out_unlock:
	pthread_mutex_unlock(&fs->lock);
	return r;
}

/* ---- housekeeping ---- */

void tfs_fs_after_resume(struct tfs_fs *fs)
{
	struct row_list l;

	pthread_mutex_lock(&fs->lock);
	/* Unlinked rows of closed volumes: their deletes met the suspended pool. */
	if (list_rows(fs, 0, true, &l) < 0)
		goto out; /* logged by the catalog; the next mount's reconcile deletes them */
	for (unsigned i = 0; i < l.nr; i++) {
		struct tfs_inode *ino = tfs_fs_inode_find(fs, l.rows[i].dev_id);

		if (!l.rows[i].unlinked || (ino && ino->nopen > 0))
			continue;
		if (delete_unlinked(fs, l.rows[i].dev_id, l.rows[i].name) == 0 && ino)
			mark_gone(ino);
	}
	free(l.rows);
out:
	pthread_mutex_unlock(&fs->lock);
}

void tfs_fs_tick(struct tfs_fs *fs)
{
	tfs_fs_persist_all(fs);
}
