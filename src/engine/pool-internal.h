/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pool-internal.h - what pool.c (lifecycle, commit, modes, devices) and
 * thin-io.c (the thin target's devices) share.  Not for use outside src/engine.
 *
 * Locks, in the order they are taken (never the other way round):
 *   0. pool->diff_mutex (one diff at a time, holding the held-root slot;
 *      metadata snapshot reserve and release wait for it)
 *   1. prison cells (one per request; snapshot creation takes one per
 *      origin, in ascending device id order)
 *   2. pool->commit_mutex (one commit at a time)
 *   3. pool->lock, the metadata lock: every tfs_pmd_* / tfs_thin_* / tfs_td_*
 *      call and every field marked [lock] below.  Never held across data
 *      I/O, nor across a commit's data flush and metadata writes
 *      (commit_io: lookups and changes go on, into the next transaction;
 *      an abort waits), except in the metadata snapshot commands' commits.
 *      Evicting a dirty metadata block writes it under the lock.
 */
#ifndef TFS_ENGINE_POOL_INTERNAL_H
#define TFS_ENGINE_POOL_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "bdev.h"
#include "config.h"
#include "core.h"
#include "pool.h"
#include "prealloc.h"
#include "prison.h"
#include "thin-metadata.h"

/* Blocks looked up and planned per step of a request: bounds stack use and lock hold times. */
#define TFS_POOL_CHUNK 128

enum tfs_pool_mode {
	TFS_POOL_WRITE,
	TFS_POOL_OUT_OF_DATA_SPACE, /* writes needing a block are held or fail (error_if_no_space) */
	TFS_POOL_READ_ONLY,
	TFS_POOL_FAIL,
};

/* A run of data blocks [begin, begin + len). */
struct tfs_extent {
	uint64_t begin, len;
};

struct tfs_extents {
	struct tfs_extent *v;
	size_t nr, cap;
};

/*
 * Data blocks one request step (a chunk, thin-io.c) allocated and has
 * neither mapped nor freed yet: linked into the pool (pending) from
 * tfs_pool_alloc to tfs_pool_alloc_done, while their data is written with
 * the lock dropped.  A commit leaves them out of the state it writes
 * (pool.c, commit_metadata).
 */
struct tfs_pool_allocs {
	struct tfs_pool_allocs *prev, *next; /* [lock] both point to itself: not linked */
	unsigned n;
	uint64_t blocks[TFS_POOL_CHUNK];
};

/* One metadata handle per open device, shared by every tfs_thin_dev on it. */
struct tfs_thin_ref {
	struct tfs_thin_ref *next;
	uint32_t id;
	unsigned refs;
	struct tfs_td *td;
};

struct tfs_pool {
	/*
	 * Changed only by a resume that takes a reloaded configuration, with
	 * the pool suspended (nothing in flight, no background work) and
	 * under lock and timer_lock; read without a lock by requests.
	 */
	struct tfs_pool_config cfg;
	uint64_t block_size;          /* bytes */
	bool opened_read_only;
	struct tfs_bdev *meta, *data; /* fault wrappers over the devices */
	struct tfs_prison *prison;

	pthread_mutex_t lock;
	struct tfs_pmd *pmd;          /* [lock] */
	enum tfs_pool_mode mode;      /* [lock] */
	char reason[256];             /* [lock] why the last mode change happened */
	bool dirty;                   /* [lock] metadata changed since the last commit */
	uint64_t abort_gen;           /* [lock] transactions aborted, ever */
	struct tfs_pool_allocs pending; /* [lock] list head: allocated, not yet inserted or freed */
	bool commit_io;               /* [lock] a commit flushes and writes, lock dropped: no abort */
	bool abort_pending;           /* [lock] a failed change waits for commit_io: no I/O, no changes */
	pthread_cond_t commit_io_cv;  /* commit_io or abort_pending went false */
	struct tfs_extents passdown;  /* [lock] freed in this transaction: discard after commit */
	/*
	 * Every free data block reads as zeros, so a new block needs no
	 * zeroing: the data device is a file whose free blocks were all
	 * punched at open, and every block freed since is punched (passdown)
	 * before it can be allocated again.  Read under the lock after an
	 * allocation; goes false for good on an abort, a punch or a queueing
	 * that fails, or discard_passdown turned off by a reload.
	 */
	atomic_bool free_zero;
	/*
	 * Chunks of a data file fallocated ahead of the allocator (NULL: off,
	 * a block device, or opened read-only).  Set at open; locked inside.
	 */
	struct tfs_prealloc *prealloc;
	/* New blocks written partly, only the request's bytes (free_zero, preallocated). */
	atomic_uint_fast64_t new_written_partly;
	/* New blocks written whole, zeros (or the copied block) around the request's bytes. */
	atomic_uint_fast64_t new_filled_whole;
	struct tfs_thin_ref *thins;   /* [lock] open devices */
	struct tfs_pmd_space space;   /* [lock] last known, for status in fail mode */
	pthread_cond_t space_cv;      /* the mode changed, or the pool is closing: held writes look */
	struct timespec oods_since;   /* [lock] CLOCK_MONOTONIC: when out_of_data_space began */
	uint64_t oods_free;           /* [lock] free data blocks then: leaving needs more */
	struct tfs_pool_low_water lw_data, lw_meta; /* [lock] */
	bool no_space_error;          /* [lock] no_space_timeout passed: fail, don't hold, until resize */
	bool closing;                 /* [lock] tfs_pool_close began: nothing is held any more */
	unsigned held;                /* [lock] writes waiting for data space now */
	/* [lock] the last TFS_POOL_TRANSITIONS mode changes; number seq is at seq % size */
	struct tfs_pool_transition transitions[TFS_POOL_TRANSITIONS];
	uint64_t nr_transitions;      /* [lock] mode changes since open */
	void (*notify)(void *arg);    /* [lock] told of each transition and low-water crossing */
	void *notify_arg;             /* [lock] */
	bool shut_down;               /* tfs_pool_shutdown ran: close only frees */

	uint64_t flush_ticket;        /* [lock] FLUSH requests, ever */
	atomic_bool data_unflushed;   /* written in place since the last data flush */
	pthread_mutex_t commit_mutex;
	uint64_t flush_done;          /* [commit_mutex] FLUSH tickets a finished flush covers */
	bool discard_warned;          /* [commit_mutex] told once that passdown fails */

	pthread_mutex_t resize_mutex; /* one resize at a time; taken before everything else */
	pthread_mutex_t diff_mutex;   /* one diff at a time (thin-diff.c) */

	/* Suspend, resume and reload, one at a time; taken before resize_mutex. */
	struct tfs_core *core;
	pthread_mutex_t suspend_mutex;
	struct tfs_pool_config *staged; /* [suspend_mutex] reloaded, taken at the pool's resume */
	char staged_changes[1024];      /* [suspend_mutex] what taking it changes, for messages */
	bool reload_staged;             /* [lock] staged != NULL, for status */

	pthread_t commit_thread;
	bool thread_started;
	pthread_mutex_t timer_lock;
	pthread_cond_t timer_cv;      /* CLOCK_MONOTONIC */
	bool stopping;                /* [timer_lock] */
};

/* The thin target's device handle (thin-io.c): one per tfs_thin_open. */
struct tfs_thin_dev {
	struct tfs_dev dev;        /* first: what callers hold (target.h) */
	struct tfs_pool *pool;
	struct tfs_thin_ref *ref;  /* NULL for a status handle (TFS_DEV_STATUS_ONLY) */
	uint32_t id;
	bool read_only;
};

/* The thin device behind a device handle, or NULL for another target's (thin-io.c). */
struct tfs_thin_dev *tfs_thin_dev_of(struct tfs_dev *dev);
/*
 * The mappings of blocks [b0, b0 + nr), nr <= TFS_POOL_CHUNK, under the
 * pool's lock (taken here): how many, or -EIO (logged) / -ENODEV, or the
 * pool's refusal of I/O (thin-io.c).
 */
int tfs_thin_lookup_chunk(struct tfs_thin_dev *vol, uint64_t b0, unsigned nr,
			  struct tfs_thin_mapping *maps);

/* ---- called with pool->lock held ---- */

/*
 * 0 when I/O may run at all; -EIO in fail mode.  First waits (dropping
 * the lock) while a failed change waits to be aborted (abort_pending).
 */
int tfs_pool_may_io(struct tfs_pool *pool);
/*
 * 0 when metadata may change; -EROFS opened read-only; -EIO read_only or
 * fail mode.  Waits as tfs_pool_may_io does; not for a commit's metadata
 * I/O (changes go into the next transaction).
 */
int tfs_pool_may_change(struct tfs_pool *pool);
/*
 * A call that changes metadata failed with err: abort the transaction, set
 * needs_check, go read_only (fail if either of those fails).  During a
 * commit's metadata I/O, first waits for it to end (dropping the lock;
 * -EIO at once if that commit failed and so aborted this change).  Logs the
 * transition with what (e.g. "inserting a mapping").  Returns the errno
 * for the request: -ENOSPC when metadata space ran out, else -EIO.
 */
int tfs_pool_meta_failed(struct tfs_pool *pool, int err, const char *what);
/*
 * n (1..TFS_POOL_CHUNK) new data blocks into a->blocks, a linked into
 * pool->pending.  Never waits for a commit.  On success the caller owes
 * tfs_pool_alloc_done(a) once it has inserted or freed them (or an abort
 * rolled them back: then a is already unlinked, and done is a no-op).
 * -ENOSPC: no data block (nothing allocated, no mode change); other
 * errors come from tfs_pool_may_change/meta_failed.
 */
int tfs_pool_alloc(struct tfs_pool *pool, struct tfs_pool_allocs *a, unsigned n);
void tfs_pool_alloc_done(struct tfs_pool *pool, struct tfs_pool_allocs *a);
/* Count low-water crossings (pool.h, struct tfs_pool_low_water) for the space now. */
void tfs_pool_check_low_water(struct tfs_pool *pool);
/* A resume: both marks armed again, and a crossing counted now if space is still low. */
void tfs_pool_rearm_low_water(struct tfs_pool *pool);
/* Queue block for discard after the next commit if nothing maps it now. */
void tfs_pool_passdown_if_free(struct tfs_pool *pool, uint64_t block);
/* Free blocks stop being known zeros (see free_zero), saying why once. */
void tfs_pool_free_not_zero(struct tfs_pool *pool, const char *why);
/* A handle on device id (opened or shared); -ENODATA no such device. */
int tfs_pool_get_thin(struct tfs_pool *pool, uint32_t id, struct tfs_thin_ref **out);
void tfs_pool_put_thin(struct tfs_pool *pool, struct tfs_thin_ref *ref);

/* ---- called with no pool lock held ---- */

/*
 * Commit what changed (nothing when nothing did): data flush, metadata
 * commit, then passdown of freed blocks.  flush_data: flush the data
 * device even when no metadata changed (FLUSH requests).
 */
int tfs_pool_commit_now(struct tfs_pool *pool, bool flush_data);
/*
 * An allocation answered -ENOSPC on attempt (0, 1, ...).  Returns 0 to
 * retry (a commit made blocks freed in this transaction usable),
 * TFS_POOL_HOLD when the request must wait for space (error_if_no_space
 * false, no_space_timeout not passed yet): the caller drops its prison
 * cell and calls tfs_pool_hold_for_space; or the error for the request.
 */
#define TFS_POOL_HOLD 1
int tfs_pool_space_exhausted(struct tfs_pool *pool, unsigned attempt);
/*
 * Wait, holding no lock and no cell, until the pool leaves
 * out_of_data_space (0: retry), no_space_timeout passes (-ENOSPC, and
 * later writes fail at once until a resize), the pool goes read_only,
 * fail or closes (-EIO), or a suspend of the request's device begins:
 * TFS_POOL_PUSHBACK (noflush; the request io is in the core's held list
 * and must leave the target, then tfs_core_reissue) or -EIO.
 */
#define TFS_POOL_PUSHBACK TFS_CORE_PUSHBACK
int tfs_pool_hold_for_space(struct tfs_pool *pool, struct tfs_core_io *io);

/* tfs_pool_resize without the core's admission (a resume's own use). */
int tfs_pool_grow(struct tfs_pool *pool, bool data, uint64_t bytes, char *why, size_t why_len);

/* CLOCK_MONOTONIC times for the pool's condition variables. */
struct timespec tfs_timespec_add_ms(struct timespec t, uint64_t ms);

int tfs_extents_add(struct tfs_extents *x, uint64_t begin, uint64_t len);
void tfs_extents_free(struct tfs_extents *x);

#endif
