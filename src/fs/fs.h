/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * fs.h - the daemon's state and the namespace operations shared by the
 * FUSE layer (fuse-ops.c) and the control socket (ctl-server.c).
 *
 * Owns: the one daemon state struct (struct tfs_fs), the table of volume
 * inodes the kernel knows about or has open, the open-volume counts that
 * decide when an unlinked volume's device is deleted, the in-memory copy
 * of each known volume's attributes (size, mode, owner, times) and when
 * it reaches the catalog, and every change to the namespace: create,
 * unlink, rename, snapshot groups, single snapshots, deletes.  Each such
 * change commits the metadata first and the catalog after it, so a crash
 * in between leaves something the next mount's reconcile repairs.
 *
 * Never: replies to FUSE requests or to control clients (the callers do,
 * once per request); holds fs->lock while doing volume I/O.
 *
 * Locks, outermost first: fs->lock (table, counts, namespace changes) ->
 * inode->io_lock (read: I/O; write: a size change that shrinks) ->
 * inode->attr_lock (the row, dirty flag, allocated-bytes cache).  fs->lock
 * may be taken with no inode lock held only; attr_lock is a leaf.
 *
 * Errors: 0 or -errno as below FUSE everywhere: -ENOENT, -EEXIST, -EINVAL
 * / -ENAMETOOLONG (names), -EROFS (read-only mount or snapshot member),
 * -EBUSY, -EFBIG, and what the pool and catalog return.
 */
#ifndef TFS_FS_FS_H
#define TFS_FS_FS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "catalog.h"
#include "config.h"
#include "pool.h"

struct fuse_session;
struct tfs_ctl_server;
struct tfs_events;
struct tfs_cache;
struct tfs_cow_set;
struct tfs_wb_rec;

/* Inode numbers (stable across mounts: derived from ids on disk). */
#define TFS_INO_ROOT 1u
#define TFS_INO_SNAPSHOTS 2u
#define TFS_INO_VOL_BASE 0x1000ull
#define TFS_INO_GROUP_BASE 0x100000000ull
#define TFS_SNAPSHOTS_NAME ".snapshots"

static inline uint64_t tfs_ino_of_dev(uint32_t dev_id)
{
	return TFS_INO_VOL_BASE + dev_id;
}

static inline uint64_t tfs_ino_of_group(int64_t group_id)
{
	return TFS_INO_GROUP_BASE + (uint64_t)group_id;
}

/* A volume (top-level or group member) the kernel has looked up or opened. */
struct tfs_inode {
	uint32_t dev_id;
	uint64_t generation;       /* new each time the entry is (re)born */
	struct tfs_inode *next;    /* hash chain; fs->lock */
	uint64_t nlookup;          /* kernel references; fs->lock */
	unsigned nopen;            /* open handles and temporary pins; fs->lock */
	struct tfs_dev *dev;       /* the engine's device (target.h): non-NULL iff nopen > 0;
				      changed under fs->lock and attr_lock, read under either */
	bool unlinked;             /* name removed, device kept until nopen == 0; fs->lock */
	bool gone;                 /* device deleted, waiting for the kernel's forget; fs->lock */

	pthread_rwlock_t io_lock;  /* read: read/write/fallocate/seek; write: shrink */
	pthread_mutex_t attr_lock; /* protects the fields below */
	struct tfs_vol_row row;    /* the attributes (the catalog's copy may lag: dirty) */
	bool dirty;                /* row has changes the catalog has not seen */
	bool allocated_valid;      /* allocated below may be used (closed volumes) */
	uint64_t allocated;        /* bytes the device holds (st_blocks) */
	uint64_t close_seq;        /* bumped when the volume closes: a walk older than that is stale */

	/* Writebacks the engine would hold, taken off the kernel (wb-stash.h). */
	pthread_mutex_t wb_lock;
	pthread_cond_t wb_cv;      /* a record was written */
	struct tfs_wb_rec *wb_head, *wb_tail; /* wb_lock: in arrival order */
	atomic_uint wb_nr;         /* records on the list: read without wb_lock (wb-stash.c) */
	bool wb_writer;            /* wb_lock: a thread writes them (and pins the volume) */
	int wb_err;                /* wb_lock: a record failed; the next fsync or close says so */
};

#define TFS_INODE_BUCKETS 1024u

/* The daemon: everything mutable lives here. */
struct tfs_fs {
	struct tfs_pool_config cfg;
	char mountpoint[4096];     /* canonical path */
	bool read_only;
	bool foreground;
	uid_t owner_uid;           /* who mounted: may use the control socket */
	gid_t owner_gid;
	int64_t mount_time_ns;
	uint64_t block_size;
	uint64_t max_size;         /* largest virtual size: EFBIG beyond */

	struct tfs_pool *pool;
	struct tfs_cache *caches[TFS_CACHES_MAX]; /* [cache] sections (cache-volumes.c), set at mount */
	uint32_t cache_ids[TFS_CACHES_MAX];
	unsigned nr_caches;
	struct tfs_cow_set *cow;   /* origins and classic snapshots (cow-volumes.c); NULL read-only */
	struct tfs_catalog *cat;
	struct fuse_session *se;
	bool parallel_dio;         /* the kernel takes FOPEN_PARALLEL_DIRECT_WRITES: set at
				      FUSE init, before any open, then only read */
	bool writeback;            /* the kernel caches buffered writes (writeback_cache):
				      set at FUSE init, then only read */
	struct tfs_ctl_server *ctl;

	pthread_mutex_t lock;
	pthread_mutex_t persist_lock; /* orders catalog writes of rows: after lock, before attr_lock */
	struct tfs_inode *buckets[TFS_INODE_BUCKETS]; /* lock */
	uint64_t next_generation;                     /* lock */

	/* Event log mirror for wait-event and events --follow. */
	pthread_mutex_t event_lock;
	pthread_cond_t event_cond;
	int64_t last_event_id;     /* event_lock */
	bool stopping;             /* event_lock: wakes waiters at shutdown */

	/* The thread that reports the pool's mode changes and low-water crossings (events.c). */
	struct tfs_events *events;

	atomic_uint crash_at;      /* the armed crash point (crash-points.c), 0 = none */

	char bdi_dev[32];          /* the mount's MAJ:MIN (mount-bdi.c) */
	pthread_t bdi_thread;      /* raises the read-ahead once INIT is done */
	bool bdi_thread_started;

	/* The stash's share of the mount (wb-stash.h). */
	pthread_mutex_t wb_lock;
	pthread_cond_t wb_cv;      /* room freed, or a writer finished */
	uint64_t wb_bytes;         /* wb_lock: bytes in every volume's records */
	unsigned wb_writers;       /* wb_lock: writer threads running */
};

void tfs_fs_init(struct tfs_fs *fs);
/* Frees the inode table (volumes must be closed: see tfs_fs_close_all). */
void tfs_fs_destroy(struct tfs_fs *fs);

/* ---- inode table (the caller holds fs->lock unless said otherwise) ---- */
struct tfs_inode *tfs_fs_inode_find(struct tfs_fs *fs, uint32_t dev_id);
/*
 * Find or create the entry for row->dev_id (created from row), count one
 * kernel lookup, and return it.  -ENOMEM.
 */
int tfs_fs_inode_lookup(struct tfs_fs *fs, const struct tfs_vol_row *row,
			struct tfs_inode **out);
/* The kernel dropped n references (takes fs->lock). */
void tfs_fs_forget(struct tfs_fs *fs, uint32_t dev_id, uint64_t n);

/*
 * The engine device behind a row (target.h): the one place that knows
 * which target a row belongs to.  Every catalog row is a thin device of
 * the pool today; rows of later targets are told apart by their id range
 * (TFS_DEV_ID_OTHER).  flags as tfs_thin_open.
 */
int tfs_fs_open_dev(struct tfs_fs *fs, uint32_t dev_id, unsigned flags, struct tfs_dev **out);

/*
 * Open the engine device (once, shared by every handle) and count a pin.
 * for_write: refuse with -EROFS on a read-only mount or a group member.
 * Takes fs->lock.  Returns the inode of a looked-up volume or -ENOENT.
 */
int tfs_fs_pin(struct tfs_fs *fs, uint32_t dev_id, bool for_write, struct tfs_inode **out);
/*
 * Added (send): pin the volume of row want (by id, as tfs_fs_pin, read
 * only) whether or not the kernel has looked it up, so that it stays for
 * as long as the pin: a group with a pinned member cannot be removed
 * (-EBUSY), an unlinked volume is deleted at the last unpin.  -ENOENT when
 * it is gone or its id now names another volume; what opening returns.
 * Takes fs->lock.  Drop it with tfs_fs_unpin.
 */
int tfs_fs_hold_volume(struct tfs_fs *fs, const struct tfs_vol_row *want, struct tfs_inode **out);
/*
 * Drop a pin.  The last one persists the attributes, closes the engine
 * device and, if the name was unlinked meanwhile, deletes the device and
 * then the catalog row.  Takes fs->lock.
 */
void tfs_fs_unpin(struct tfs_fs *fs, struct tfs_inode *ino);
/* One more pin of a volume the caller holds open (takes fs->lock). */
void tfs_fs_pin_again(struct tfs_fs *fs, struct tfs_inode *ino);

/* Copy of the attributes and the bytes the device holds, for st_blocks (no locks held). */
int tfs_fs_inode_attr(struct tfs_fs *fs, struct tfs_inode *ino, struct tfs_vol_row *row,
		      uint64_t *allocated);
/* Write the row to the catalog if dirty (no locks held on entry). */
int tfs_fs_persist(struct tfs_fs *fs, struct tfs_inode *ino);
/* Persist every dirty row (takes fs->lock). */
void tfs_fs_persist_all(struct tfs_fs *fs);
/* Shutdown: persist, close every open volume, delete unlinked ones. */
void tfs_fs_close_all(struct tfs_fs *fs);

/* Attributes of a volume by name at the root, in-memory copy preferred. */
int tfs_fs_get_volume(struct tfs_fs *fs, const char *name, struct tfs_vol_row *out);
/* A volume at the root ("NAME") or a group member ("GROUP/NAME", ".snapshots/GROUP/NAME"). */
int tfs_fs_find_volume(struct tfs_fs *fs, const char *spec, struct tfs_vol_row *out);
/* Attributes by device id, in-memory copy preferred. */
int tfs_fs_get_volume_by_id(struct tfs_fs *fs, uint32_t dev_id, struct tfs_vol_row *out);

/* ---- namespace changes (take fs->lock themselves) ---- */
/* A thin volume of size 0 at the root; counts one lookup on *out. */
int tfs_fs_create_volume(struct tfs_fs *fs, const char *name, uint32_t mode, uid_t uid,
			 gid_t gid, struct tfs_inode **out);
/* unlink(2) at the root: the name goes now, the device at last close. */
int tfs_fs_unlink_volume(struct tfs_fs *fs, const char *name);
/* rename(2) within the root; flags: RENAME_NOREPLACE honoured, RENAME_EXCHANGE -EINVAL. */
int tfs_fs_rename_volume(struct tfs_fs *fs, const char *old_name, const char *new_name,
			 unsigned flags);
/* mkdir .snapshots/NAME: snapshot every top-level volume in one transaction. */
int tfs_fs_create_group(struct tfs_fs *fs, const char *name, struct tfs_group_row *out);
/* rmdir .snapshots/NAME: -EBUSY while a member is open. */
int tfs_fs_remove_group(struct tfs_fs *fs, const char *name);
/* thinfs-ctl snapshot SRC NEW: a writable thin snapshot, a top-level volume. */
int tfs_fs_snapshot_volume(struct tfs_fs *fs, const char *src, const char *new_name);

/*
 * Delete the volumes a send or receive cut short by a crash left under
 * their temporary names (send-recv.c), after the mount's reconcile;
 * read-write mounts only.  -errno from the catalog.
 */
int tfs_fs_settle_temp_names(struct tfs_fs *fs);

/*
 * The mount's (fs->mountpoint, mounted) backing-dev settings (mount-bdi.c):
 * a 4 MiB read-ahead, and with lift_dirty (writeback_cache) a fifth of the
 * system's dirty page limit instead of FUSE's 1%.  Logs and goes on when a
 * knob cannot be written.
 */
void tfs_fs_tune_bdi(struct tfs_fs *fs, bool lift_dirty);
/* After the unmount: the read-ahead's thread (it waits for INIT through the mount) is done. */
void tfs_fs_tune_bdi_end(struct tfs_fs *fs);

/* ---- listings (catalog reads; sizes from memory where newer) ---- */
/* Group lookups. */
int tfs_fs_group_by_id(struct tfs_fs *fs, int64_t id, struct tfs_group_row *out);
/*
 * Rows of the top level (group_id 0: thin volumes and writable snapshots)
 * or of one snapshot group, in name order; *rows is malloc'ed (free it).
 */
int tfs_fs_list(struct tfs_fs *fs, int64_t group_id, struct tfs_vol_row **rows, unsigned *nr);
/* Every snapshot group in name order; *rows is malloc'ed. */
int tfs_fs_list_groups(struct tfs_fs *fs, struct tfs_group_row **rows, unsigned *nr);
/* The entry of a volume the kernel holds a reference to, or NULL (takes fs->lock). */
struct tfs_inode *tfs_fs_inode_get(struct tfs_fs *fs, uint32_t dev_id);

/*
 * With writeback_cache, make the kernel write back what writers left in
 * the page cache of the open top-level volumes among ids[0..nr) (every
 * one when nr == 0), and wait for it: a snapshot or a suspend then holds
 * what was written before it, as dm's suspend syncs a block device's
 * page cache first.  The daemon cannot write the kernel's cache itself,
 * so it does what a writer would: open and fsync(2) each through the
 * mount, which sends the dirty pages to the other workers as WRITEs.
 * Skipped (0) for suspended volumes and while the pool is not in write
 * mode, whose writes would wait (for a resume, for data space) and this
 * with them.  Blocks for the writeback; call with no lock held, never
 * from the control thread's accept loop.  why names the caller in the
 * log.  A volume the daemon cannot open is skipped with a warning.
 * Returns 0 or the first fsync's -errno (logged).
 */
int tfs_fs_flush_cached_writes(struct tfs_fs *fs, const uint32_t *ids, unsigned nr,
			       const char *why);

/* ---- size changes and limits ---- */
/* Set the virtual size (truncate): shrinking unmaps; takes io_lock for writing. */
int tfs_fs_set_size(struct tfs_fs *fs, struct tfs_inode *ino, uint64_t size);
/* Grow the size to at least end (write/fallocate past EOF), mark mtime. */
void tfs_fs_extend(struct tfs_fs *fs, struct tfs_inode *ino, uint64_t end, bool touch_mtime);

/*
 * ---- cached origins (cache-volumes.c) ----
 * Their files are top-level rows with ids from TFS_DEV_ID_CACHE up.
 * cache_open (mount, before the catalog is reconciled): open every [cache]
 * of pool.cfg, give new ones rows, drop rows of sections gone (read-only:
 * open them read-only, export those with a row); -errno (logged).  A cache whose metadata refuses to start
 * still opens (its file answers EIO, status says why).  cache_close:
 * after the last volume closed; -errno of a final commit.  add_ids: append
 * the caches' ids (ascending) to a reconcile's list.
 */
#define TFS_DEV_ID_CACHE (TFS_DEV_ID_OTHER + (1u << 23))
bool tfs_fs_is_cache_id(uint32_t dev_id);
int tfs_fs_cache_open(struct tfs_fs *fs);
int tfs_fs_cache_close(struct tfs_fs *fs);
int tfs_fs_cache_add_ids(struct tfs_fs *fs, uint32_t **ids, unsigned *nr);
int tfs_fs_cache_open_dev(struct tfs_fs *fs, uint32_t dev_id, unsigned flags, struct tfs_dev **out);
struct tfs_cache *tfs_fs_cache_by_name(struct tfs_fs *fs, const char *name);
/*
 * After the pool's resume (which may have taken a reload): each cache takes
 * mode, policy and migration_threshold from the configuration in force;
 * out says what could not be taken (other changes wait for the next
 * mount, a refused mode), "" when all was.
 */
void tfs_fs_cache_reload(struct tfs_fs *fs, char *out, size_t len);
/*
 * resize NAME of a cache (tfs_cache_resize), then the file's size (the
 * origin's) in the open inode and the catalog.  *dev_id: the file's.
 */
int tfs_fs_cache_resize(struct tfs_fs *fs, struct tfs_cache *c, uint32_t *dev_id, char *msg,
			size_t len);
/* Shutting down: every cache's held requests go in, none is suspended again. */
void tfs_fs_cache_stop_holding(struct tfs_fs *fs);

/*
 * ---- origins and classic snapshots (cow-volumes.c) ----
 * Their files are top-level rows with ids from TFS_DEV_ID_OTHER up.
 * cow_open (mount, read-write only, before the catalog is reconciled):
 * open every [origin] and [snapshot] of pool.cfg and every snapshot made
 * with thinfs-ctl, give new ones rows, drop rows of sections gone; -errno
 * (logged, naming the section).  cow_close: after the last volume closed.
 * cow_ids: the ids the reconcile must keep (*ids malloc'ed, may be NULL).
 * cow_may_unlink: 0, or -EPERM (logged) for an origin or a pool.cfg
 * snapshot.  cow_delete: remove a run-time snapshot and its rows (its
 * name was unlinked and its last handle closed).  cow_snapshot: thinfs-ctl
 * snapshot ORIGIN NAME --cow DEV (takes fs->lock): -EEXIST name taken,
 * -ENXIO no origin of that name, -EROFS read-only, engine errors (logged).
 */
struct tfs_fs_cow_request {
	const char *origin, *name, *cow;   /* cow: a resolved path */
	uint32_t chunk_sectors;
	bool persistent;
};
int tfs_fs_cow_open(struct tfs_fs *fs);
void tfs_fs_cow_close(struct tfs_fs *fs);
int tfs_fs_cow_ids(struct tfs_fs *fs, uint32_t **ids, unsigned *nr);
int tfs_fs_cow_may_unlink(struct tfs_fs *fs, const struct tfs_vol_row *row);
int tfs_fs_cow_delete(struct tfs_fs *fs, uint32_t dev_id, const char *name);
int tfs_fs_cow_snapshot(struct tfs_fs *fs, const struct tfs_fs_cow_request *req);
/*
 * A reload's [origin]/[snapshot] sections (the pool is suspended; they
 * take effect when the reload is accepted; a new origin starts active,
 * not suspended).  reload_check changes nothing: 0, or -errno with why (one
 * line naming the section): a section that goes is open, or an origin
 * that goes keeps a snapshot; one that comes has a taken name or a bad
 * device.  reload_apply: sections that went are closed and their rows
 * removed (*gone: their names, malloc'ed, for the caller to drop from
 * the kernel's cache and free), new ones opened: returns how many
 * sections went or came; on failure (why) what ran is put back and
 * -errno returned.  after_resume: what a resume took
 * (snapshot_low_water).
 */
int tfs_fs_cow_reload_check(struct tfs_fs *fs, const struct tfs_pool_config *next, char *why,
			    size_t len);
int tfs_fs_cow_reload_apply(struct tfs_fs *fs, const struct tfs_pool_config *next, char *why,
			    size_t len, char ***gone, unsigned *nr_gone);
void tfs_fs_cow_after_resume(struct tfs_fs *fs);
/*
 * thinfs-ctl merge NAME (takes fs->lock): the snapshot's row goes and the
 * catalog records the merge (resumed at the next mount), then the engine
 * starts it (origin.h, tfs_cow_set_merge); *chunks: exceptions to merge,
 * *origin_id: the origin's id.
 * -ENOENT no such name, -EINVAL not a classic snapshot, -EBUSY its file
 * is open, -EROFS read-only, the engine's refusals (logged).  merged: the
 * merge_done event of NAME: its catalog records go.
 */
int tfs_fs_cow_merge(struct tfs_fs *fs, const char *name, uint64_t *chunks, uint32_t *origin_id);
void tfs_fs_cow_merged(struct tfs_fs *fs, const char *name);
/*
 * -EEXIST when a classic snapshot made with thinfs-ctl still owns name in
 * the catalog: while it is merged into its origin (a restart resumes the
 * merge by that name) or while it is left out of this mount; 0 when none
 * does, or a catalog error.  Under fs->lock.
 */
int tfs_fs_cow_name_kept(struct tfs_fs *fs, const char *name);

/* ---- events (events.c) ---- */
/*
 * Wake the event thread (arg: the struct tfs_fs): the engine recorded a
 * classic snapshot's event (snapshot_invalid, low_water_cow, merge_done).  Takes a leaf
 * lock only.
 */
void tfs_fs_events_wake(void *arg);
/*
 * Run on_event for an event of another target (a cache's mode_change or
 * cache_clean): THINFS_VOLUME names it, THINFS_OLD_MODE and THINFS_NEW_MODE
 * are its modes, the rest the pool's.  Not waited for; nothing before the
 * event thread started.
 */
void tfs_fs_events_run_hook(struct tfs_fs *fs, const char *event, const char *volume,
			    const char *old_mode, const char *new_mode);
/* Log an event in the catalog and wake waiters (-errno from the catalog). */
int tfs_fs_event(struct tfs_fs *fs, const char *kind, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/*
 * Start the event thread: the pool's mode changes (mode_change) and
 * low-water crossings (low_water_data, low_water_metadata) are logged and
 * their on_event program started as soon as the pool records them (it
 * wakes the thread through tfs_pool_set_event_notify).  Needs fs->pool
 * and fs->cat open.  -errno (logged).
 */
int tfs_fs_events_start(struct tfs_fs *fs);
/*
 * Shutdown, after the pool's last I/O (tfs_pool_shutdown) and before the
 * catalog closes: stop the thread, report everything the pool recorded
 * up to then, and wait up to 10 s for on_event programs still running.
 * Nothing when the thread was not started.
 */
void tfs_fs_events_stop(struct tfs_fs *fs);
/*
 * Around a command's pool change and the event it logs for it (resize,
 * resume): the consequences the event thread reports (a mode change, a
 * low-water crossing) are logged after it, cause before effect.  Only
 * while the event thread runs (between start and stop, when the control
 * socket serves); takes pool locks inside, never the other way round.
 */
void tfs_fs_events_hold(struct tfs_fs *fs);
void tfs_fs_events_release(struct tfs_fs *fs);
/* The 1-second housekeeping: persist sizes. */
void tfs_fs_tick(struct tfs_fs *fs);
/*
 * The pool was resumed: delete the devices of volumes unlinked while it
 * was suspended.
 */
void tfs_fs_after_resume(struct tfs_fs *fs);

/*
 * ---- crash points (fault injection, tests only: crash-points.c) ----
 * A crash point is a named place inside a namespace change (the names are
 * listed by tfs_fs_crash_point_name(0, 1, ...) until it returns NULL).
 * Once armed, the thread that reaches it ends the daemon at once, as a
 * crash would: no commit, no unmount.  PROCESS keeps what was written
 * (the kernel had it); POWER drops what was not flushed, POWER_TEAR tears
 * it (tfs_bdev_fault_power_cut).  arm: -EINVAL no such point.
 */
enum tfs_crash_how { TFS_CRASH_PROCESS, TFS_CRASH_POWER, TFS_CRASH_POWER_TEAR };
const char *tfs_fs_crash_point_name(unsigned i);
int tfs_fs_crash_arm(struct tfs_fs *fs, const char *name, enum tfs_crash_how how);
void tfs_fs_crash_point(struct tfs_fs *fs, const char *name);

int64_t tfs_now_ns(void);
/* "2026-11-21T03:00:00Z" */
void tfs_format_time(int64_t ns, char *buf, size_t len);

#endif
