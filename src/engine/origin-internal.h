/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * origin-internal.h - what origin.c and cowsnap.c share (see origin.h).
 */
#ifndef TFS_ENGINE_ORIGIN_INTERNAL_H
#define TFS_ENGINE_ORIGIN_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "core.h"
#include "origin.h"
#include "prealloc.h"
#include "prison.h"
#include "snap-store.h"

#define COW_NAME_MAX 256

struct tfs_cowsnap;
struct tfs_cow_merge;

struct tfs_origin {
	struct tfs_cow_set *set;
	char name[COW_NAME_MAX];
	uint32_t id;
	struct tfs_bdev *bdev;     /* the device (fault-wrapped when faults are on): its name */
	struct tfs_dev *dev;       /* the same as a device of target.h (linear, owns bdev): I/O */
	struct tfs_bdev *fault;    /* == bdev when wrapped, else NULL */
	uint64_t size;             /* bytes, fixed while open */
	atomic_uint refs;          /* the set's + each open handle's */
	/*
	 * Suspend and resume of the origin and its snapshots (target.h): the
	 * origin is TFS_CORE_POOL here, each device is its own id.  Entered
	 * by every I/O request before o->lock (tfs_origin_io_begin).
	 */
	struct tfs_core *core;

	/* Shared: any I/O to the origin or its snapshots; exclusive: the snapshot list changes. */
	pthread_rwlock_t lock;
	struct tfs_prison *prison; /* range locks in bytes of the origin, device 0 */
	uint64_t lock_align;       /* lock: the largest chunk in bytes (at least 4 KiB) */
	struct tfs_cowsnap **snaps;/* lock */
	unsigned nr_snaps;         /* lock */
	/*
	 * The snapshot being merged into the origin (cowmerge.c), out of
	 * snaps: while set, the origin's I/O goes through it.  Changed with
	 * lock held exclusively and set->lock.
	 */
	struct tfs_cow_merge *merge;
};

struct tfs_cowsnap {
	struct tfs_origin *origin;
	char name[COW_NAME_MAX];
	uint32_t id;
	bool from_cfg;
	char cow_path[4096];
	struct tfs_bdev *cow;      /* fault-wrapped when faults are on */
	struct tfs_bdev *fault;
	struct tfs_snap_store *store;
	/*
	 * The COW file's space reserved ahead of the store's allocator, in
	 * COW chunks (NULL on a block device), and its free data chunks then
	 * written with zeros: copies land in written extents, host overwrites
	 * that run in parallel and leave the host no metadata to make durable
	 * at the data flush, not host allocations that run one at a time.
	 */
	struct tfs_prealloc *prealloc;
	atomic_uint_fast64_t zeroed_bytes; /* written ahead since the mount */
	/*
	 * The thread that fills the next region (fallocate, then the zeros)
	 * while writers copy into this one (with prealloc only), so that no
	 * break waits for a fill unless it caught up with the thread.  Writers
	 * raise ahead_want once per region; the last put stops and joins it
	 * before prealloc and the store go.
	 */
	pthread_t ahead;
	bool has_ahead;
	pthread_mutex_t ahead_lock;
	pthread_cond_t ahead_work;
	uint64_t ahead_want;       /* ahead_lock: fill the region of this chunk */
	uint64_t ahead_done;       /* ahead_lock: the last ahead_want taken up */
	atomic_uint_fast64_t ahead_asked; /* ahead_want as writers last saw it */
	atomic_bool ahead_stop;    /* the last put: stop, between zero pieces too */
	uint64_t region_chunks;    /* COW chunks per preallocated region */
	uint64_t chunk_bytes;
	bool persistent;
	atomic_uint refs;          /* the set's + each open handle's */

	atomic_bool merging;       /* being merged into its origin: no file, no I/O of its own */
	atomic_bool merge_failed;  /* the merge stopped on an error (dm's "Merge failed") */
	atomic_bool invalid;       /* set once, never cleared */
	char invalid_why[160];     /* written by the thread that set invalid, before notify */

	/* Low water (set->events_lock): crossings counted, and how many were reported. */
	bool lw_above;
	uint64_t lw_crossings, lw_reported;
	bool invalid_reported;
};

struct tfs_cow_set {
	pthread_mutex_t lock;      /* the origins list and each origin's snapshot membership */
	struct tfs_origin **origins;
	unsigned nr_origins;
	bool direct, faults;
	atomic_uint low_water_percent;
	void (*notify)(void *arg);
	void *notify_arg;
	pthread_mutex_t events_lock; /* leaf: the event fields of every snapshot */
	/* One suspend or resume of origins at a time (core.h); taken before lock. */
	pthread_mutex_t suspend_mutex;
	bool stop_holding;         /* lock: shutting down, new origins' cores are closed too */
};

/* cowsnap.c */
int tfs_cowsnap_create(struct tfs_cow_set *set, struct tfs_origin *o,
		       const struct tfs_cowsnap_params *p, struct tfs_cowsnap **out);
void tfs_cowsnap_put(struct tfs_cowsnap *s);
/* The checks of create that need no store: chunk size, device size, signature (logged). */
int tfs_cowsnap_check(const struct tfs_cowsnap_params *p);
int tfs_cowsnap_open_dev(struct tfs_cowsnap *s, unsigned flags, struct tfs_dev **out);
/* Record that s is invalid (why), once: store header, log, event.  Never fails. */
void tfs_cowsnap_invalidate(struct tfs_cowsnap *s, const char *why, int err);
/* The COW device grew to total_chunks chunks: preallocation may reach them too. */
void tfs_cowsnap_resized(struct tfs_cowsnap *s, uint64_t total_chunks);
/* After an allocation: count a low-water crossing if the store just passed the mark. */
void tfs_cowsnap_check_low_water(struct tfs_cowsnap *s);
/*
 * The origin's bytes under an origin write's range lock, read once (the
 * first time a snapshot needs a copy) and shared by every snapshot's
 * copies, so that N snapshots read the origin once, not N times.  Only
 * for ranges up to TFS_SCRATCH_MAX (len 0: each copy reads for itself).
 */
struct tfs_origin_bytes {
	uint64_t begin, len;
	uint8_t *buf;             /* NULL until read (tfs_scratch_get(len)) */
	int err;                  /* the read's result once buf was tried */
};

/*
 * Read src's bytes of the origin into a scratch buffer of this thread,
 * unless done or tried already (or src->len is 0); the result in src->err.
 */
void tfs_origin_bytes_read(struct tfs_origin *o, struct tfs_origin_bytes *src);

/*
 * Copy what s needs of [off, off + len) of the origin before it is
 * overwritten (origin write path; the caller holds the range lock
 * exclusively), from src when it covers a run.  Failures invalidate s;
 * nothing is returned.
 */
void tfs_cowsnap_copy_out(struct tfs_cowsnap *s, uint64_t off, uint64_t len,
			  struct tfs_origin_bytes *src);

/*
 * Read [off, off + len) as s sees it: chunks with an exception from its
 * COW device, the rest from the origin.  The caller holds the origin's
 * lock shared and a shared range lock over the bytes.  A COW read error
 * invalidates s and gives -EIO.
 */
int tfs_cowsnap_read_locked(struct tfs_cowsnap *s, void *buf, size_t len, uint64_t off);

/* cowmerge.c: the origin's I/O while a snapshot merges into it (o->lock held shared). */
int tfs_cow_merge_write(struct tfs_origin *o, const void *buf, size_t len, uint64_t off);
int tfs_cow_merge_flush(struct tfs_origin *o);
struct tfs_cowsnap *tfs_cow_merge_snap(struct tfs_origin *o);
/* set->lock held: the merging snapshot called name (non-NULL) or with id, or NULL. */
struct tfs_cowsnap *tfs_cow_merge_find(struct tfs_cow_set *set, const char *name, uint32_t id);
/* Unmount: stop o's merge where it is (the next mount resumes it) and drop it. */
void tfs_cow_merge_stop(struct tfs_origin *o);
/* Report and drop every merge that finished (tfs_cow_set_events; no lock held). */
void tfs_cow_merge_reap(struct tfs_cow_set *set, tfs_cow_event_fn fn, void *ctx);

/* origin.c */
/* set->lock held: the snapshot in an origin's list called name (non-NULL) or with id. */
struct tfs_cowsnap *tfs_cow_set_find_snap(struct tfs_cow_set *set, const char *name, uint32_t id);
int tfs_origin_open_dev(struct tfs_origin *o, unsigned flags, struct tfs_dev **out);
void tfs_origin_put(struct tfs_origin *o);
/*
 * An I/O request to device dev (the origin's id or a snapshot's) of o:
 * admitted by the core (held while suspended), then o->lock shared.
 * end undoes both.
 */
void tfs_origin_io_begin(struct tfs_origin *o, struct tfs_core_io *io, uint32_t dev);
void tfs_origin_io_end(struct tfs_origin *o, struct tfs_core_io *io);
/* The range lock of [off, off + len) rounded out to the origin's lock_align. */
void tfs_origin_lock_range(struct tfs_origin *o, uint64_t off, uint64_t len, uint64_t *begin,
			   uint64_t *end);

#endif
