/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * core.h - the device-mapper core's share of every request: admission,
 * in-flight accounting, suspend and resume, and the list of requests the
 * core holds (new ones while their device is suspended, and ones a target
 * pushed back during a noflush suspend).
 *
 * A request is one calling thread.  It calls tfs_core_enter before going
 * into the target and tfs_core_exit after; a held request is a thread
 * blocked in tfs_core_enter (or tfs_core_reissue).  Held requests go into
 * the target in arrival order: a request never overtakes an earlier one
 * that may go too.
 *
 * A target that keeps a request waiting inside it (a write held for data
 * space) calls tfs_core_hold_check each time it wakes, under the lock its
 * waits use.  Once a suspend of the request's device has begun the answer
 * is "leave": pushed back into the core's held list when the suspend is a
 * noflush one still flushing (the check and the queueing are one step
 * under the core's lock, so no request is stranded between them), -EIO
 * otherwise, also for a request that was told to leave by a noflush
 * suspend that was then interrupted.
 *
 * Devices are the target's numbers (thin device ids).  TFS_CORE_POOL is
 * the pool itself: while it is suspended every device's requests are held,
 * and pool-level changes (tfs_core_enter_admin) are refused with -EBUSY.
 * A core belongs to one target instance (target.h): a later target (an
 * origin and its snapshots, a cache) creates its own, numbers its devices
 * within it and is TFS_CORE_POOL there.
 *
 * Never: knows targets, metadata or FUSE; calls out or sleeps on anything
 * but its own condition variables while holding its lock.  Its lock is a
 * leaf: it may be taken under a target's lock, never the other way round.
 * Suspend and resume calls are serialised by the caller.
 */
#ifndef TFS_ENGINE_CORE_H
#define TFS_ENGINE_CORE_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define TFS_CORE_POOL UINT32_MAX

/* tfs_core_hold_check: the request is in the core's held list now. */
#define TFS_CORE_PUSHBACK 2

struct tfs_core;

/* One request, on its thread's stack; the core owns the fields. */
struct tfs_core_io {
	struct tfs_core_io *prev, *next;
	uint64_t ticket;   /* arrival order */
	uint32_t dev;
	int state;
	bool must_leave;   /* a suspend of its device began while it was in the target */
};

int tfs_core_create(struct tfs_core **out);
void tfs_core_destroy(struct tfs_core *core);

/* Admit a request to dev, waiting while dev or the pool is suspended or earlier ones wait. */
void tfs_core_enter(struct tfs_core *core, struct tfs_core_io *io, uint32_t dev);
void tfs_core_exit(struct tfs_core *core, struct tfs_core_io *io);
/* tfs_core_enter, or -EAGAIN (nothing changed) where it would be held. */
int tfs_core_try_enter(struct tfs_core *core, struct tfs_core_io *io, uint32_t dev);
/* A pool-level change: 0 (exit with tfs_core_exit), or -EBUSY while the pool is suspended. */
int tfs_core_enter_admin(struct tfs_core *core, struct tfs_core_io *io);

/* See above: 0 go on waiting, TFS_CORE_PUSHBACK, or -EIO. */
int tfs_core_hold_check(struct tfs_core *core, struct tfs_core_io *io);
/* A pushed-back request that has left the target waits for its turn to go in again. */
void tfs_core_reissue(struct tfs_core *core, struct tfs_core_io *io);

/*
 * Suspend devs[0..nr) (nr == 0: the pool), in three steps.  begin: new
 * requests to them are held, requests in the target are told to leave,
 * and with noflush those that leave are pushed back; returns how many of
 * the named devices were active (0: all were suspended already).  drain:
 * wait until none of their requests is in the target; -ETIMEDOUT at
 * deadline (CLOCK_MONOTONIC, NULL = none), -EINTR when cancelled(arg)
 * turns true (polled every 100 ms), -ESHUTDOWN when tfs_core_close came
 * first (begin too: nothing is suspended then).  end: ok -> they are suspended; !ok
 * -> the suspend is abandoned and what begin changed is active again
 * (pushed-back requests go in again in order).  Either way noflush ends.
 * begin may also fail with -ENOMEM, changing nothing.
 */
int tfs_core_suspend_begin(struct tfs_core *core, const uint32_t *devs, unsigned nr,
				bool noflush);
int tfs_core_drain(struct tfs_core *core, const uint32_t *devs, unsigned nr,
		   const struct timespec *deadline, bool (*cancelled)(void *arg), void *arg);
void tfs_core_suspend_end(struct tfs_core *core, bool ok);

/* Resume devs[0..nr) (nr == 0: the pool and every device); returns how many were suspended. */
unsigned tfs_core_resume(struct tfs_core *core, const uint32_t *devs, unsigned nr);
/* Shutting down: everything is admitted from now on and nothing is suspended again. */
void tfs_core_close(struct tfs_core *core);

/* dev's own state (TFS_CORE_POOL: the pool's): suspended or being suspended. */
bool tfs_core_suspended(struct tfs_core *core, uint32_t dev);
/* Requests of dev (TFS_CORE_POOL: all) held in the core now. */
unsigned tfs_core_nr_held(struct tfs_core *core, uint32_t dev);

#endif
