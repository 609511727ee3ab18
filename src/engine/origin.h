/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * origin.h - classic COW snapshots (the userspace counterpart of Linux
 * dm-snapshot): the origin target (origin.c) and the cow-snapshot target
 * (cowsnap.c), and the set of them a mount holds.
 *
 * Owns: origins (a raw device exported whole, kind "origin") and their
 * snapshots (kind "cow-snapshot"), each a device of target.h; copying an
 * origin chunk to every valid snapshot's COW store before the first write
 * to it; a snapshot's reads and writes through its store; invalidation
 * (store full, COW device error); COW low-water crossings; the devices'
 * numbers (ids from TFS_DEV_ID_OTHER, given by the caller).
 *
 * Never: knows FUSE, the catalog or events (it counts what happened and
 * calls the notify callback; the caller logs and runs hooks); parses
 * pool.cfg.  The exception store's format is src/meta/snap-store.c.
 *
 * Locks, outermost first: set->lock (the list of origins, taken by
 * lookups and changes of the set, never across I/O) -> origin->lock
 * (rwlock: shared by every I/O request to the origin or one of its
 * snapshots, exclusive while a snapshot is added or removed, so that a
 * new snapshot is exactly the origin at one instant: this is the
 * "origin held" of dm) -> range locks of the origin's prison (bytes of the
 * origin, rounded out to the largest chunk size of its snapshots) ->
 * the store's own locks.
 *
 * Every call returns 0 or -errno; a device's problem is logged once here,
 * naming the section ([origin "NAME"] device, [snapshot "NAME"] cow).
 */
#ifndef TFS_ENGINE_ORIGIN_H
#define TFS_ENGINE_ORIGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bdev.h"
#include "target.h"

struct tfs_cow_set;
struct tfs_suspend_opts;

/* What a snapshot is made of (pool.cfg [snapshot] or thinfs-ctl snapshot). */
struct tfs_cowsnap_params {
	const char *name;
	uint32_t id;              /* TFS_DEV_ID_OTHER and up, unique in the set */
	const char *origin;       /* the origin's name */
	const char *cow;          /* COW device path (resolved) */
	uint32_t chunk_sectors;   /* TFS_SNAP_CHUNK_RULE; a header's wins, with a warning */
	bool persistent;
	bool from_cfg;            /* pool.cfg (false: made at run time, removable by rm) */
	/*
	 * A new COW device must be all zero in its first chunk or hold a
	 * SnAp header; with this set, a device whose first chunk is zero is
	 * also probed for other signatures (libblkid) and refused if it has
	 * one: thinfs-ctl snapshot, and a pool.cfg section seen for the first time.
	 */
	bool probe;
	/*
	 * The caller's record says the snapshot was invalidated before (its
	 * header may not say so: that write failed).  A store with a header
	 * then opens invalid; a fresh device is a new snapshot.
	 */
	bool known_invalid;
	bool *fresh;              /* if non-NULL: set to whether the device was fresh */
};

/* Per snapshot, for the caller's event log (tfs_cow_set_events). */
enum tfs_cow_event { TFS_COW_EVENT_INVALID, TFS_COW_EVENT_LOW_WATER, TFS_COW_EVENT_MERGE_DONE };
typedef void (*tfs_cow_event_fn)(void *ctx, enum tfs_cow_event what, const char *name,
				 const char *detail);

/*
 * A set for one mount.  direct: devices opened O_DIRECT (the pool's
 * host_cache = no); faults: each device wrapped for fault injection
 * (bdev.h), without a volatile cache; low_water_percent: the COW
 * low-water mark (pool.cfg snapshot_low_water).  notify(arg) is called,
 * possibly under engine locks, when an event is waiting for
 * tfs_cow_set_events: it must only wake someone.  -ENOMEM.
 */
int tfs_cow_set_create(bool direct, bool faults, unsigned low_water_percent,
		       void (*notify)(void *arg), void *arg, struct tfs_cow_set **out);
/* Closes every origin and snapshot (flushing them).  No device may be open. */
void tfs_cow_set_destroy(struct tfs_cow_set *set);
void tfs_cow_set_set_low_water(struct tfs_cow_set *set, unsigned percent);

/*
 * Open the origin device at path as origin name with device number id.
 * -EEXIST name or id taken; device errors (logged naming [origin "NAME"] device).
 */
int tfs_cow_set_add_origin(struct tfs_cow_set *set, const char *name, uint32_t id,
			   const char *path);

/*
 * Open a snapshot's store and attach it to its origin, holding the
 * origin's I/O meanwhile (the snapshot is the origin as it is when the
 * hold begins; the origin is flushed first so that content is durable).
 * -ENOENT no such origin; -EEXIST name or id taken, or the COW device is
 * used by another snapshot or is an origin; -EINVAL a bad store, chunk
 * size, a COW device with another signature or too small (logged, naming
 * the section and key); device -errno.  Nothing changes on failure.
 */
int tfs_cow_set_add_snapshot(struct tfs_cow_set *set, const struct tfs_cowsnap_params *p);

/*
 * Remove a snapshot (its store is closed; the COW device keeps what it
 * holds).  Call only when no I/O handle of it is open; status handles may
 * be.  -ENOENT, -EPERM one from pool.cfg unless from_cfg_too (a reload
 * that removed its section).
 */
int tfs_cow_set_remove_snapshot(struct tfs_cow_set *set, uint32_t id, bool from_cfg_too);

/* Remove an origin (no I/O handle open): -ENOENT, -EBUSY while it has snapshots. */
int tfs_cow_set_remove_origin(struct tfs_cow_set *set, uint32_t id);

/*
 * What tfs_cow_set_add_snapshot would refuse without opening a store:
 * chunk size, the COW device used already, its size, a signature on it
 * (p->probe).  The origin is not looked up (a reload may add it too).
 * 0, or the errno add would give (logged, naming the section and key).
 */
int tfs_cow_set_check_snapshot(struct tfs_cow_set *set, const struct tfs_cowsnap_params *p);

/* Whether id is a device of the set, and whether it came from pool.cfg. */
bool tfs_cow_set_has(struct tfs_cow_set *set, uint32_t id, bool *from_cfg);

/*
 * The device behind id (target.h), flags as tfs_linear_open.  -ENODATA no
 * such id (a merging snapshot has a status handle only).
 */
int tfs_cow_set_open_dev(struct tfs_cow_set *set, uint32_t id, unsigned flags,
			 struct tfs_dev **out);

/* Size in bytes of id's device (an origin's, a snapshot's origin's). */
int tfs_cow_set_size(struct tfs_cow_set *set, uint32_t id, uint64_t *bytes);

/*
 * Ids of every device, in no order; *ids malloc'ed (free it).  -ENOMEM.
 */
int tfs_cow_set_ids(struct tfs_cow_set *set, uint32_t **ids, unsigned *nr);

/*
 * thinfs-ctl resize cow NAME: take a grown COW device into use.
 * -ENOENT no such snapshot, -EINVAL it shrank (logged); *chunks gets the
 * new number of chunks.
 */
int tfs_cow_set_resize_cow(struct tfs_cow_set *set, const char *name, uint64_t *chunks);

/*
 * Call fn(wrapper, arg) (if fn is non-NULL) with the fault-injection
 * wrapper of NAME:cow (which "cow", a snapshot) or NAME:device ("device",
 * an origin), under the set's lock: fn must only set the wrapper's rules
 * (bdev.h), never do I/O.  0, or -ENOENT for no such device or faults off.
 */
int tfs_cow_set_with_fault_dev(struct tfs_cow_set *set, const char *name, const char *which,
			       void (*fn)(struct tfs_bdev *dev, void *arg), void *arg);

/*
 * thinfs-ctl merge NAME (dm's snapshot-merge, cowmerge.c): roll the
 * origin back to snapshot id.  merge_check changes nothing: 0, or -ENOENT
 * no such snapshot, -EPERM one from pool.cfg, -EOPNOTSUPP a transient
 * one, -EIO an invalid one, -EBUSY its origin merges another already
 * (each logged in one line naming the snapshot).  merge: the same checks,
 * then, with the origin's I/O held for the instant, the snapshot leaves
 * the origin's list (no file, no I/O of its own; its status handles stay
 * valid) and from its return the origin reads as the snapshot: a chunk
 * the store has an exception for is read from the COW device, and a
 * write to such a chunk goes into that COW chunk, until a thread copies
 * it into the origin (last exception first, as the kernel does; the
 * other snapshots get their copy of the origin's chunk first, under the
 * chunk's range lock, so origin I/O to chunks being merged waits) and
 * drops the exception.  *chunks: exceptions left; *origin_id (may be
 * NULL): the origin's id.  When none is left, a
 * TFS_COW_EVENT_MERGE_DONE event is recorded; tfs_cow_set_events reports
 * it and closes the snapshot.  A merge stopped by unmount resumes when the
 * snapshot is opened and merge is called again.  New snapshots of a
 * merging origin are refused (-EBUSY).
 */
int tfs_cow_set_merge_check(struct tfs_cow_set *set, uint32_t id);
int tfs_cow_set_merge(struct tfs_cow_set *set, uint32_t id, uint64_t *chunks,
		      uint32_t *origin_id);

/* A snapshot being merged: status lists it by these (tfs_cow_set_open_dev, status only). */
struct tfs_cow_merging {
	uint32_t id;
	char name[256];
};
/* Every merging snapshot; *out malloc'ed (free it), may be NULL when *nr is 0.  -ENOMEM. */
int tfs_cow_set_merging(struct tfs_cow_set *set, struct tfs_cow_merging **out, unsigned *nr);

/*
 * Hand each event recorded since the last call (a snapshot became
 * invalid, a store passed the low-water mark) to fn, oldest kind first
 * per snapshot, without engine locks held.
 */
void tfs_cow_set_events(struct tfs_cow_set *set, tfs_cow_event_fn fn, void *ctx);

/*
 * Suspend and resume (README "Suspend, resume, reload"; the semantics of
 * tfs_pool_suspend).  Each origin with its snapshots is one instance with
 * its own core (target.h): suspending an origin holds its requests and
 * its snapshots'; suspending a snapshot holds only its own.  ids[0..nr)
 * are origin and snapshot ids of the set; nr == 0 means every origin.
 * Nothing waits inside these targets, so noflush only skips the flush
 * that otherwise makes what was written durable once they are quiescent
 * (every valid snapshot's COW device, then the origin; a snapshot: its
 * COW device); a failed flush is a warning in why, the suspend stands.
 * Returns how many of the named instances or snapshots were active (0:
 * all were suspended already), or -ENOENT (an id not in the set),
 * -ETIMEDOUT / -EINTR / -ESHUTDOWN / -ENOMEM as tfs_pool_suspend (the
 * suspend is abandoned: everything it began is active again), with why.
 * Blocks until in-flight requests are done.
 */
int tfs_cow_set_suspend(struct tfs_cow_set *set, const uint32_t *ids, unsigned nr,
			const struct tfs_suspend_opts *opts, char *why, size_t why_len);
/*
 * Resume ids[0..nr) (nr == 0: every origin, its snapshots with it).  An
 * origin's resume resumes its snapshots too; a snapshot resumed while
 * its origin is suspended stays held until the origin resumes.  Returns
 * how many were suspended, or -ENOENT.
 */
int tfs_cow_set_resume(struct tfs_cow_set *set, const uint32_t *ids, unsigned nr);
/* Requests held by suspends of every origin and snapshot now. */
unsigned tfs_cow_set_held(struct tfs_cow_set *set);
/*
 * Shutting down: every held request goes in, and nothing is suspended
 * again (tfs_core_close); origins added later start closed too.
 */
void tfs_cow_set_stop_holding(struct tfs_cow_set *set);

#endif
