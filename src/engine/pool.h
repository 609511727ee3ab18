/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pool.h - the thin-pool target: thin volumes' I/O on top of the metadata.
 *
 * Owns: the open pool (metadata, data device, catalog handle is NOT here),
 * the metadata lock, block-granular range locks (prison.h) so requests to
 * one block are serialised and different blocks run in parallel, the write
 * path (write in place / allocate + zero the rest of a new block / copy a
 * block shared with a snapshot, then map it), discard with passdown,
 * provisioning, SEEK_DATA/SEEK_HOLE, truncation, the periodic commit
 * (commit_interval; an idle pool writes nothing) and FLUSH (data device
 * flush, then metadata commit).
 *
 * Rules kept: a write is acknowledged only after its data is written to
 * the data device (page cache or further); a mapping is committed only
 * after the data it points at was flushed; blocks freed since the last
 * commit are never reused before it (the space map guarantees it).
 *
 * Never: knows FUSE, names, sizes of volumes (the catalog and src/fs own
 * those) or sqlite.  Calls are thread-safe.
 *
 * Errors: -ENOSPC data or metadata space exhausted; -EROFS pool read-only;
 * -EIO device error; -ENODEV volume deleted; -EEXIST; -ENODATA no such
 * device; -EINVAL bad argument (logged).
 *
 * Modes (status "mode"): write; read_only after a metadata failure (the
 * transaction is aborted and needs_check set): reads and overwrites of
 * blocks mapped exclusively still work, anything needing a metadata change
 * (allocation, discard, create, snapshot, delete) fails with -EIO; fail
 * when even that could not be done: every call -EIO.  A pool opened
 * read-only also shows read_only; changes there fail with -EROFS.  A pool
 * whose metadata has needs_check opens only read-only (-EROFS otherwise).
 *
 * Thin devices are reached through the device interface (target.h):
 * tfs_thin_open at the end of this header.
 */
#ifndef TFS_ENGINE_POOL_H
#define TFS_ENGINE_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "prealloc.h"
#include "target.h"

struct tfs_pool_config;
struct tfs_pool;

/* Format the metadata for cfg (data size from the data device). Destroys what was there. */
int tfs_pool_format(const struct tfs_pool_config *cfg);

int tfs_pool_open(const struct tfs_pool_config *cfg, bool read_only, struct tfs_pool **out);
/*
 * Added: the last I/O of a pool going away.  Stops holding writes
 * (tfs_pool_stop_holding), stops the commit thread and commits with a
 * data flush (unless read-only).  Afterwards the pool can still be read
 * (status, transitions, configuration) until tfs_pool_close, but changes
 * nothing.  Volumes must be closed.  Returns the commit's error (logged);
 * a second call does nothing and returns 0.
 */
int tfs_pool_shutdown(struct tfs_pool *pool);
/* tfs_pool_shutdown unless done already, then frees everything. */
int tfs_pool_close(struct tfs_pool *pool);

uint64_t tfs_pool_block_size(struct tfs_pool *pool); /* bytes */

/*
 * Added: the pool's metadata (data = false) or data device, which is the
 * fault-injecting wrapper (bdev.h: tfs_bdev_fault_set, _power_cut,
 * _counts).  Owned by the pool; valid until tfs_pool_close.  With
 * cfg->allow_faults the wrappers hold writes in memory until a flush
 * (volatile_cache), so tfs_bdev_fault_power_cut drops what was not
 * flushed; the commit timer flushes at least every commit_interval while
 * anything is written, which bounds that memory.
 */
struct tfs_bdev *tfs_pool_bdev(struct tfs_pool *pool, bool data);

/* ---- devices ---- */
/* Lowest free device id; the device exists once this returns (committed). */
int tfs_pool_create_thin(struct tfs_pool *pool, uint32_t *id_out);
/* Snapshots of nr origins in ONE metadata transaction (atomic across volumes), committed. */
int tfs_pool_create_snaps(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
			  uint32_t *ids_out);
/*
 * As create_snaps, with ids chosen beforehand (tfs_pool_free_ids), so the
 * caller can record them before they exist: -EEXIST (logged) if one is
 * taken, and then nothing is created.
 */
int tfs_pool_create_snaps_as(struct tfs_pool *pool, const uint32_t *origins, unsigned nr,
			     const uint32_t *ids);
/* The n lowest ids no device uses, ascending (nothing is reserved: the caller serialises). */
int tfs_pool_free_ids(struct tfs_pool *pool, unsigned n, uint32_t *ids_out);
/* Deletes and commits; -EBUSY while an I/O handle (tfs_thin_open) is open on it. */
int tfs_pool_delete(struct tfs_pool *pool, uint32_t id);
/*
 * Deletes those of ids that exist in ONE metadata transaction, committed;
 * ids without a device are skipped.  -EBUSY (nothing deleted) if one is open.
 */
int tfs_pool_delete_devices(struct tfs_pool *pool, const uint32_t *ids, unsigned nr);
/* Device ids in ascending order; returns the total (may exceed max). */
int tfs_pool_list(struct tfs_pool *pool, uint32_t *ids, unsigned max);

int tfs_pool_commit(struct tfs_pool *pool);
int tfs_pool_set_transaction_id(struct tfs_pool *pool, uint64_t old_id, uint64_t new_id);
int tfs_pool_reserve_metadata_snap(struct tfs_pool *pool);
int tfs_pool_release_metadata_snap(struct tfs_pool *pool);

struct tfs_io_counts {
	uint64_t reads, writes, flushes, discards;
	/* Bytes pread/pwrite moved: with direct, what the device itself transferred. */
	uint64_t read_bytes, write_bytes;
	bool direct; /* opened O_DIRECT (host_cache off and the file system took it) */
};

/* A low-water mark's state: crossings counted since the pool was opened. */
struct tfs_pool_low_water {
	uint64_t crossings;       /* times free space fell below the mark */
	uint64_t free_then;       /* free blocks at the last crossing */
	bool disarmed;            /* below the mark: no crossing until it rises above mark + margin */
};

struct tfs_pool_status {
	const char *mode;         /* "write", "read_only", ... */
	bool needs_check;
	uint64_t transaction_id;
	uint64_t held_root;       /* 0 = none */
	uint64_t data_block_size, data_used, data_total; /* blocks */
	uint64_t meta_used, meta_total;                  /* 4 KiB blocks */
	uint64_t low_water_blocks;
	struct tfs_io_counts io_meta, io_data;
	/* Added: why the last mode change happened ("" in write mode since open). */
	char reason[256];
	unsigned held_writes;     /* writes waiting for data space now */
	bool no_space_error;      /* no_space_timeout passed: behaving as error_if_no_space */
	/* Added with suspend/resume (issue 5). */
	bool suspended;           /* the pool itself (being) suspended */
	bool reload_staged;       /* a reloaded configuration waits for the pool's resume */
	unsigned held_in_core;    /* requests held in the core (suspended devices, pushed back) */
	bool error_if_no_space;   /* as configured now (a reload may change it) */
	bool discard_passdown;
	/* Free data blocks read as zeros (punched), so new blocks are not zeroed. */
	bool free_blocks_read_zero;
	/* Low water, checked by the engine where space changes (and re-armed by a resume). */
	uint64_t meta_low_water_blocks;
	struct tfs_pool_low_water low_water_data, low_water_meta;
	/* Added with data-file preallocation (issue 10). */
	struct tfs_prealloc_counts prealloc;
	uint64_t new_written_partly; /* new blocks that got only the request's bytes */
	uint64_t new_filled_whole;   /* new blocks written whole (zeros or a copy around them) */
};
void tfs_pool_status(struct tfs_pool *pool, struct tfs_pool_status *out);

/*
 * Resize the data (data = true) or metadata device to bytes (rounded down
 * to whole blocks), online.  Growing: a file-backed device is extended
 * first (tfs_bdev_grow), then the space map, then the transaction is
 * committed; writes held for space then run.  A device already that large
 * (grown from outside) is only taken into use.  The same size is a no-op.
 * Shrinking the data device: down to the highest block in use + 1; the
 * space map shrinks, the change is committed, then a file-backed device is
 * truncated (a block device is left as it is).
 * Metadata past the format's limit (TFS_MAX_METADATA_BLOCKS, about 15.9
 * GiB): grown only to the limit (a file is extended only that far), and
 * why says so on success ("grown to 4161600 blocks, not N: ..."); why is
 * "" after any other success.
 * Refused, with the reason in why and logged: -EINVAL shrinking the data
 * device below a block in use ("block M is in use ... the smallest
 * possible size is M+1 blocks") or to 0 blocks, shrinking the metadata
 * device (not supported), growing metadata already at the format's
 * limit; -EROFS opened read-only or needs_check; -EIO read_only or fail
 * mode; device errors from growing it.
 */
int tfs_pool_resize(struct tfs_pool *pool, bool data, uint64_t bytes, char *why, size_t why_len);

/*
 * Mode changes are kept in a small ring, read by the daemon's event
 * thread when the notify callback below wakes it; a burst of changes
 * (out of space, resized, out again) is still reported one by one.
 */
#define TFS_POOL_TRANSITIONS 16
struct tfs_pool_transition {
	uint64_t seq;             /* 1, 2, ... since open */
	const char *old_mode, *new_mode;
	char reason[256];
};
/*
 * Copies the transitions numbered after `after` (oldest first, at most
 * max; older ones than the ring holds are lost) into out; returns how many.
 */
unsigned tfs_pool_transitions(struct tfs_pool *pool, uint64_t after,
			      struct tfs_pool_transition *out, unsigned max);
/*
 * Added: fn(arg) is called each time a mode change is recorded (above)
 * or a low-water crossing counted (tfs_pool_status's low_water_data and
 * low_water_meta), so that the caller reports it at once, not on a
 * timer.  It runs in whichever thread made the change, with the pool's
 * internal lock held: it may only note the fact and wake a waiter (a
 * leaf mutex and a condition variable), never call into the pool.  NULL
 * stops the calls; none are made after this returns with NULL.
 */
void tfs_pool_set_event_notify(struct tfs_pool *pool, void (*fn)(void *arg), void *arg);

/* ---- suspend, resume, reload (the core: core.h) ---- */
struct tfs_suspend_opts {
	bool noflush;             /* push requests held in the pool back into the core, not EIO */
	uint64_t timeout_ms;      /* abandon the suspend if in-flight I/O lasts longer; 0 = none */
	bool (*cancelled)(void *arg); /* polled while waiting: true abandons the suspend */
	void *arg;
};
/* The CLOCK_MONOTONIC time ms from now (a suspend's deadline for tfs_core_drain). */
struct timespec tfs_deadline_in(uint64_t ms);
/*
 * Why a suspend that drain ended with r (-ETIMEDOUT, -ESHUTDOWN, other:
 * cancelled) was abandoned, in words, into why; for every target's suspend.
 */
void tfs_suspend_abandoned_why(int r, const struct tfs_suspend_opts *opts, char *why,
			       size_t why_len);
/*
 * Suspend devices ids[0..nr) (nr == 0: the pool, which holds every
 * device): new requests to them are held until resume; writes waiting
 * inside the pool for data space fail with -EIO, or with noflush are
 * pushed back and held; then, once nothing of theirs is in flight, the
 * pool commits (not in read_only or fail mode).  A suspended pool does no
 * background work and refuses pool-level changes (create, snapshot,
 * delete, resize, ...) with -EBUSY.  Returns how many of them were newly
 * suspended (0: all were already), or -ETIMEDOUT / -EINTR / -ESHUTDOWN
 * (timeout, cancelled, or the pool is closing: the suspend is abandoned, they are active again, requests
 * pushed back go in again and ones told to leave that had not yet been
 * pushed back fail with -EIO), -ENOMEM.  why says what happened.
 */
int tfs_pool_suspend(struct tfs_pool *pool, const uint32_t *ids, unsigned nr,
		     const struct tfs_suspend_opts *opts, char *why, size_t why_len);
/*
 * Resume ids[0..nr) (nr == 0: the pool and every device): held requests go
 * in again in arrival order.  The pool's resume first takes a staged
 * reload (new settings, devices grown to their size now) and restarts the
 * no_space_timeout clock.  Returns how many were suspended; msg lists what
 * the reload changed ("" when nothing), including a grow that failed.
 */
int tfs_pool_resume(struct tfs_pool *pool, const uint32_t *ids, unsigned nr, char *msg,
		    size_t msg_len);
/*
 * Stage cfg for the pool's next resume; only while the pool is suspended
 * (-EBUSY otherwise).  -EINVAL, changing nothing, when cfg changes what
 * the pool is (metadata or data device, block size, catalog, metadata
 * cache, fault injection) or names a device smaller than the pool uses.
 * A cfg with nothing new stages nothing (and drops an earlier staged one).
 * msg: the reason, or the changes that resume will make ("no changes").
 */
int tfs_pool_reload(struct tfs_pool *pool, const struct tfs_pool_config *cfg, char *msg,
		    size_t msg_len);
/* The pool itself is suspended (or being suspended). */
bool tfs_pool_is_suspended(struct tfs_pool *pool);
/* Thin device id is suspended, by itself or with the pool. */
bool tfs_pool_dev_suspended(struct tfs_pool *pool, uint32_t id);
/* Requests to device id held in the core now. */
unsigned tfs_pool_dev_held(struct tfs_pool *pool, uint32_t id);
/* A copy of the configuration in force (a resume may have taken a reload). */
void tfs_pool_get_config(struct tfs_pool *pool, struct tfs_pool_config *out);

/*
 * Shutting down: writes held for data space fail (-EIO) now and later ones
 * are not held; whatever is suspended is resumed and nothing can be
 * suspended again, so every pending request finishes.
 */
void tfs_pool_stop_holding(struct tfs_pool *pool);

struct tfs_dev_usage {
	uint64_t mapped_blocks;
	uint64_t exclusive_blocks; /* mapped blocks no other device shares */
};
/*
 * Walks the device's tree, one data space map lookup per mapping,
 * dropping the metadata lock every TFS_POOL_CHUNK mappings.  A mapping is
 * exclusive when its data block's count is 1 and no other device maps the
 * block; mappings made since the device's last snapshot are settled by the
 * count alone, older ones ("shared" by the time test, whose snapshot may
 * be gone) are looked up in the other devices too.  Cost: O(mappings) when
 * the device was never snapshotted or has rewritten its blocks since, up
 * to O(mappings x devices) range lookups otherwise.  A block shared only
 * with the held metadata snapshot counts as not exclusive.
 */
int tfs_pool_dev_usage(struct tfs_pool *pool, uint32_t id, struct tfs_dev_usage *out);
/*
 * One past the device's highest mapped virtual block (0 when nothing is
 * mapped): the size a device without a catalog row is shown with.
 * O(log(max blocks) x depth) lookups under the pool's lock; works on a
 * read-only pool.  -ENODATA no such device.
 */
int tfs_pool_dev_end(struct tfs_pool *pool, uint32_t id, uint64_t *blocks);

/*
 * Added: the runs of virtual blocks (in data blocks) of device *to that
 * differ from device *from (NULL: a device that maps nothing), as
 * tfs_thin_diff in thin-metadata.h: fn(ctx, vblock, len, zero), zero
 * meaning mapped in from and unmapped in to, in ascending order.  The
 * answer is the devices as they were at one instant, the call's start:
 * the mapping trees of that instant are held (tfs_pmd_hold_roots, the
 * held-root slot) and walked in steps of TFS_POOL_DIFF_STEP nodes with
 * the pool's lock dropped in between, so I/O, changes and commits go on.
 * In read_only or fail mode, or on a pool opened read-only, nothing
 * changes the metadata and nothing is held.  One diff at a time; a
 * metadata snapshot reserve or release waits for it.  fn runs under the
 * pool's lock: it only records (no I/O, no pool calls).  progress (may be
 * NULL) is called between steps with no lock held, with the first virtual
 * block not yet compared; non-zero stops the diff (-EINTR).  Costs:
 * stats->nodes_read mapping-tree nodes, about the changed leaves times
 * the trees' depth; stats->held says whether the trees were held.
 * Errors: -EBUSY (nothing done) a metadata snapshot is held
 * (reserve-metadata-snap) and the diff needs its slot; -ENOSPC metadata
 * too full to hold the trees; -ENODATA no such device; -EIO fail mode, or
 * the transaction was aborted during the walk; -EUCLEAN corrupt metadata.
 */
#define TFS_POOL_DIFF_STEP 64
struct tfs_pool_diff_stats {
	uint64_t nodes_read;
	bool held;
};
int tfs_pool_diff(struct tfs_pool *pool, const uint32_t *from, const uint32_t *to,
		  int (*fn)(void *ctx, uint64_t vblock, uint64_t len, bool zero),
		  int (*progress)(void *ctx, uint64_t vblock), void *ctx,
		  struct tfs_pool_diff_stats *stats);

/* ---- thin devices: the device interface (target.h), kind "thin" ---- */
/*
 * A handle on thin device id.  flags: TFS_DEV_READ_ONLY (writes fail with
 * -EROFS; so do they on a pool opened read-only, where a writable handle
 * still opens); TFS_DEV_STATUS_ONLY (no metadata handle: opens in any
 * mode, even for an id that does not exist, and does not make
 * tfs_pool_delete -EBUSY; allocated and status walk the tree).  An I/O
 * handle: -ENODATA no such device; -EIO in fail mode.  Several handles on
 * one device share its state and range locks.  Close with tfs_dev_close.
 *
 * The ops, as the thin target does them: unmapped ranges read as zeros;
 * discard and zero_range are one punch (whole blocks unmapped, freed ones
 * discarded with passdown after the next commit, partial ranges zeroed);
 * provision maps zeroed blocks where none are mapped; flush flushes the
 * data device, then commits the metadata; truncate unmaps every block
 * wholly past new_size and zeroes the tail of the last one; get_size is
 * -ENOTSUP (the namespace sizes a thin volume); allocated is mapped blocks
 * times the block size.  Status fields: mapped_blocks, exclusive_blocks
 * (tfs_pool_dev_usage), suspended, held_in_core.
 */
int tfs_thin_open(struct tfs_pool *pool, uint32_t id, unsigned flags, struct tfs_dev **out);

/*
 * Added (send, issue 13): bulk reads of a thin device, for a reader that
 * moves much data at once (thin-bulk.c says why).  open: a reader of the
 * device behind dev (an I/O handle from tfs_thin_open, which must outlive
 * it); -EOPNOTSUPP dev is not a thin device (read it with tfs_dev_read),
 * -EBADF a status handle, -ENOMEM.  read: fill every
 * range (ascending, not overlapping, each non-empty; bytes of the device,
 * unmapped ones read as zeros) and return when all are read: blocks until
 * then, and while the device is suspended, as a read does; holds one
 * shared range lock over the blocks from the first range to the last.
 * Buffers aligned to 4 KiB go to a direct data device as they are.  Reads
 * of up to TFS_THIN_BULK_READ bytes each, in data-block order, as one
 * batch (tfs_bdev_read_batch_bounded: up to TFS_BDEV_BATCH_DEPTH reads
 * and TFS_THIN_BULK_IN_FLIGHT bytes in flight; two readers, twice that).  0,
 * or -EIO (a device error, logged), -ENOMEM, -EINVAL ranges out of order
 * (logged).  One read call at a time per reader.
 */
#define TFS_THIN_BULK_READ (1u << 20)
#define TFS_THIN_BULK_IN_FLIGHT (2u << 20)
struct tfs_thin_range {
	uint64_t off;
	size_t len;
	uint8_t *buf;
};
struct tfs_thin_bulk;
int tfs_thin_bulk_open(struct tfs_dev *dev, struct tfs_thin_bulk **out);
int tfs_thin_bulk_read(struct tfs_thin_bulk *b, const struct tfs_thin_range *ranges, unsigned nr);
void tfs_thin_bulk_close(struct tfs_thin_bulk *b);
/*
 * Added (stream v2, issue 13): where the bytes [off, off + len) of the
 * device lie on the data device, for a reader that wants to read in the
 * device's order.  fn(ctx, off, len, dev_off) for each run whose bytes
 * follow on both in the device and on the data device, in the device's
 * order (dev_off TFS_THIN_UNMAPPED: unmapped, reads as zeros); fn only
 * records (it runs under the range lock, shared, as a read's).  0, fn's
 * non-zero, -EIO, -EINVAL the range wraps.  A mapping can change once
 * this returns: only a reader of a device nobody writes (a snapshot being
 * sent) may rely on it.
 */
#define TFS_THIN_UNMAPPED UINT64_MAX
int tfs_thin_bulk_locate(struct tfs_thin_bulk *b, uint64_t off, uint64_t len,
			 int (*fn)(void *ctx, uint64_t off, uint64_t len, uint64_t dev_off),
			 void *ctx);

#endif
