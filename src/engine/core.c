/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The core: admission of requests, in-flight accounting, suspend/resume
 * and the held list.  See core.h.
 *
 * Requests are intrusive list entries on their threads' stacks: the
 * in-flight list (in the target) and the held list (waiting, sorted by
 * ticket).  One mutex guards both, with two condition variables: turn_cv
 * for held requests (their device may have become active, or the one
 * ahead of them left) and drain_cv for a suspend waiting for requests to
 * leave the target.
 */
#include "core.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

enum dev_state { ACTIVE, SUSPENDING, SUSPENDED };
enum io_state { IO_HELD, IO_INFLIGHT, IO_PUSHED };

struct list {
	struct tfs_core_io *head, *tail;
};

/* A device that is not active (active ones have no entry). */
struct dev_entry {
	uint32_t dev;
	enum dev_state state;
	bool in_op; /* changed by the suspend in progress: rolled back if it is abandoned */
};

struct tfs_core {
	pthread_mutex_t lock;
	pthread_cond_t turn_cv;  /* CLOCK_MONOTONIC */
	pthread_cond_t drain_cv; /* CLOCK_MONOTONIC */
	uint64_t next_ticket;
	struct list inflight, held;
	unsigned drainers;       /* threads in tfs_core_drain */

	enum dev_state pool_state;
	bool pool_in_op;
	struct dev_entry *devs;  /* devices not active */
	unsigned nr_devs, cap_devs;
	bool noflush;            /* a noflush suspend is flushing: leaving requests are pushed back */
	bool closing;
};

/* ---- lists ---- */

static void list_remove(struct list *l, struct tfs_core_io *io)
{
	if (io->prev)
		io->prev->next = io->next;
	else
		l->head = io->next;
	if (io->next)
		io->next->prev = io->prev;
	else
		l->tail = io->prev;
	io->prev = io->next = NULL;
}

static void list_append(struct list *l, struct tfs_core_io *io)
{
	io->next = NULL;
	io->prev = l->tail;
	if (l->tail)
		l->tail->next = io;
	else
		l->head = io;
	l->tail = io;
}

/* Into the held list by ticket: a pushed-back request keeps its place in the arrival order. */
static void held_insert(struct tfs_core *core, struct tfs_core_io *io)
{
	struct tfs_core_io *after = core->held.tail;

	while (after && after->ticket > io->ticket)
		after = after->prev;
	if (!after) {
		io->prev = NULL;
		io->next = core->held.head;
		if (core->held.head)
			core->held.head->prev = io;
		else
			core->held.tail = io;
		core->held.head = io;
		return;
	}
	io->prev = after;
	io->next = after->next;
	if (after->next)
		after->next->prev = io;
	else
		core->held.tail = io;
	after->next = io;
}

/* ---- states ---- */

static struct dev_entry *dev_find(struct tfs_core *core, uint32_t dev)
{
	for (unsigned i = 0; i < core->nr_devs; i++)
		if (core->devs[i].dev == dev)
			return &core->devs[i];
	return NULL;
}

static void dev_drop(struct tfs_core *core, struct dev_entry *e)
{
	*e = core->devs[--core->nr_devs];
}

/* Requests to dev may go into the target now. */
static bool eligible(struct tfs_core *core, uint32_t dev)
{
	if (core->closing)
		return true;
	return core->pool_state == ACTIVE && (dev == TFS_CORE_POOL || !dev_find(core, dev));
}

/* An eligible held request ahead of io (NULL: any in the list) must go first. */
static bool earlier_waiting(struct tfs_core *core, const struct tfs_core_io *io)
{
	for (struct tfs_core_io *h = core->held.head; h && h != io; h = h->next)
		if (eligible(core, h->dev))
			return true;
	return false;
}

static bool dev_listed(const uint32_t *devs, unsigned nr, uint32_t dev)
{
	for (unsigned i = 0; i < nr; i++)
		if (devs[i] == dev)
			return true;
	return false;
}

/* The suspend in progress covers io. */
static bool in_op(struct tfs_core *core, const struct tfs_core_io *io)
{
	const struct dev_entry *e;

	if (core->pool_in_op)
		return true;
	e = dev_find(core, io->dev);
	return e && e->in_op;
}

/* ---- lifecycle ---- */

int tfs_core_create(struct tfs_core **out)
{
	struct tfs_core *core = calloc(1, sizeof(*core));
	pthread_condattr_t attr;

	if (!core)
		return -ENOMEM;
	pthread_mutex_init(&core->lock, NULL);
	/* Deadlines are intervals: they must not jump with the wall clock. */
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&core->turn_cv, &attr);
	pthread_cond_init(&core->drain_cv, &attr);
	pthread_condattr_destroy(&attr);
	*out = core;
	return 0;
}

void tfs_core_destroy(struct tfs_core *core)
{
	if (!core)
		return;
	pthread_mutex_destroy(&core->lock);
	pthread_cond_destroy(&core->turn_cv);
	pthread_cond_destroy(&core->drain_cv);
	free(core->devs);
	free(core);
}

void tfs_core_close(struct tfs_core *core)
{
	pthread_mutex_lock(&core->lock);
	core->closing = true;
	core->pool_state = ACTIVE;
	core->nr_devs = 0;
	pthread_cond_broadcast(&core->turn_cv);
	pthread_cond_broadcast(&core->drain_cv);
	pthread_mutex_unlock(&core->lock);
}

/* ---- requests ---- */

static void go_in(struct tfs_core *core, struct tfs_core_io *io)
{
	io->state = IO_INFLIGHT;
	io->must_leave = false;
	list_append(&core->inflight, io);
}

/* With the lock held: io is in the held list; wait until it may go, then let it in. */
static void wait_turn(struct tfs_core *core, struct tfs_core_io *io)
{
	while (!eligible(core, io->dev) || earlier_waiting(core, io))
		pthread_cond_wait(&core->turn_cv, &core->lock);
	list_remove(&core->held, io);
	go_in(core, io);
	/* The next one in line may be waiting for this one to go first. */
	if (core->held.head)
		pthread_cond_broadcast(&core->turn_cv);
}

void tfs_core_enter(struct tfs_core *core, struct tfs_core_io *io, uint32_t dev)
{
	pthread_mutex_lock(&core->lock);
	io->ticket = ++core->next_ticket;
	io->dev = dev;
	if (eligible(core, dev) && !earlier_waiting(core, NULL)) {
		go_in(core, io);
	} else {
		io->state = IO_HELD;
		list_append(&core->held, io);
		wait_turn(core, io);
	}
	pthread_mutex_unlock(&core->lock);
}

int tfs_core_try_enter(struct tfs_core *core, struct tfs_core_io *io, uint32_t dev)
{
	int r = -EAGAIN;

	pthread_mutex_lock(&core->lock);
	if (eligible(core, dev) && !earlier_waiting(core, NULL)) {
		io->ticket = ++core->next_ticket;
		io->dev = dev;
		go_in(core, io);
		r = 0;
	}
	pthread_mutex_unlock(&core->lock);
	return r;
}

int tfs_core_enter_admin(struct tfs_core *core, struct tfs_core_io *io)
{
	int r = 0;

	pthread_mutex_lock(&core->lock);
	io->ticket = ++core->next_ticket;
	io->dev = TFS_CORE_POOL;
	if (core->pool_state != ACTIVE && !core->closing)
		r = -EBUSY;
	else
		go_in(core, io);
	pthread_mutex_unlock(&core->lock);
	return r;
}

void tfs_core_exit(struct tfs_core *core, struct tfs_core_io *io)
{
	pthread_mutex_lock(&core->lock);
	list_remove(&core->inflight, io);
	if (core->drainers)
		pthread_cond_broadcast(&core->drain_cv);
	pthread_mutex_unlock(&core->lock);
}

int tfs_core_hold_check(struct tfs_core *core, struct tfs_core_io *io)
{
	int r = 0;

	pthread_mutex_lock(&core->lock);
	if (core->closing || (!io->must_leave && eligible(core, io->dev)))
		goto out;
	if (!core->noflush) {
		r = -EIO;
		goto out;
	}
	/* Pushed back: out of the target's count and into the held list in one step. */
	list_remove(&core->inflight, io);
	io->state = IO_PUSHED;
	held_insert(core, io);
	if (core->drainers)
		pthread_cond_broadcast(&core->drain_cv);
	r = TFS_CORE_PUSHBACK;
out:
	pthread_mutex_unlock(&core->lock);
	return r;
}

void tfs_core_reissue(struct tfs_core *core, struct tfs_core_io *io)
{
	pthread_mutex_lock(&core->lock);
	wait_turn(core, io);
	pthread_mutex_unlock(&core->lock);
}

/* ---- suspend and resume ---- */

int tfs_core_suspend_begin(struct tfs_core *core, const uint32_t *devs, unsigned nr, bool noflush)
{
	unsigned changed = 0;
	int r = 0;

	pthread_mutex_lock(&core->lock);
	if (core->closing) {
		r = -ESHUTDOWN;
		goto out;
	}
	if (core->nr_devs + nr > core->cap_devs) {
		unsigned cap = core->nr_devs + nr + 16;
		struct dev_entry *n = realloc(core->devs, cap * sizeof(*n));

		if (!n) {
			r = -ENOMEM;
			goto out;
		}
		core->devs = n;
		core->cap_devs = cap;
	}
	if (!nr && core->pool_state == ACTIVE) {
		core->pool_state = SUSPENDING;
		core->pool_in_op = true;
		changed = 1;
	}
	for (unsigned i = 0; i < nr; i++) {
		if (devs[i] == TFS_CORE_POOL || dev_find(core, devs[i]))
			continue;
		core->devs[core->nr_devs++] =
			(struct dev_entry){ .dev = devs[i], .state = SUSPENDING, .in_op = true };
		changed++;
	}
	core->noflush = noflush && changed;
	for (struct tfs_core_io *io = core->inflight.head; io; io = io->next)
		if (in_op(core, io))
			io->must_leave = true;
out:
	pthread_mutex_unlock(&core->lock);
	return r ? r : (int)changed;
}

/* With the lock held: a request of devs (nr == 0: any) is in the target. */
static bool busy(struct tfs_core *core, const uint32_t *devs, unsigned nr)
{
	for (struct tfs_core_io *io = core->inflight.head; io; io = io->next)
		if (!nr || dev_listed(devs, nr, io->dev))
			return true;
	return false;
}

static bool passed(const struct timespec *t, const struct timespec *now)
{
	return now->tv_sec > t->tv_sec || (now->tv_sec == t->tv_sec && now->tv_nsec >= t->tv_nsec);
}

int tfs_core_drain(struct tfs_core *core, const uint32_t *devs, unsigned nr,
		   const struct timespec *deadline, bool (*cancelled)(void *arg), void *arg)
{
	int r = 0;

	pthread_mutex_lock(&core->lock);
	core->drainers++;
	while (!core->closing && busy(core, devs, nr)) {
		struct timespec now, next;
		bool stop;

		clock_gettime(CLOCK_MONOTONIC, &now);
		if (deadline && passed(deadline, &now)) {
			r = -ETIMEDOUT;
			break;
		}
		next = now;
		next.tv_nsec += 100 * 1000000L;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_sec++;
			next.tv_nsec -= 1000000000L;
		}
		if (deadline && passed(deadline, &next))
			next = *deadline;
		pthread_cond_timedwait(&core->drain_cv, &core->lock, &next);
		if (!cancelled || !busy(core, devs, nr))
			continue;
		pthread_mutex_unlock(&core->lock);
		stop = cancelled(arg);
		pthread_mutex_lock(&core->lock);
		if (stop) {
			r = -EINTR;
			break;
		}
	}
	/* Everything is admitted now: what drained is not a quiescent device. */
	if (core->closing)
		r = -ESHUTDOWN;
	core->drainers--;
	pthread_mutex_unlock(&core->lock);
	return r;
}

void tfs_core_suspend_end(struct tfs_core *core, bool ok)
{
	pthread_mutex_lock(&core->lock);
	core->noflush = false;
	if (core->pool_in_op)
		core->pool_state = ok ? SUSPENDED : ACTIVE;
	core->pool_in_op = false;
	for (unsigned i = 0; i < core->nr_devs;) {
		struct dev_entry *e = &core->devs[i];

		if (e->in_op && !ok) {
			dev_drop(core, e);
			continue;
		}
		if (e->in_op)
			e->state = SUSPENDED;
		e->in_op = false;
		i++;
	}
	pthread_cond_broadcast(&core->turn_cv);
	pthread_mutex_unlock(&core->lock);
}

unsigned tfs_core_resume(struct tfs_core *core, const uint32_t *devs, unsigned nr)
{
	unsigned n = 0;

	pthread_mutex_lock(&core->lock);
	if (!nr) {
		n = core->nr_devs + (core->pool_state != ACTIVE);
		core->pool_state = ACTIVE;
		core->nr_devs = 0;
	}
	for (unsigned i = 0; i < nr; i++) {
		struct dev_entry *e = dev_find(core, devs[i]);

		if (e) {
			dev_drop(core, e);
			n++;
		}
	}
	pthread_cond_broadcast(&core->turn_cv);
	pthread_mutex_unlock(&core->lock);
	return n;
}

/* ---- queries ---- */

bool tfs_core_suspended(struct tfs_core *core, uint32_t dev)
{
	bool r;

	pthread_mutex_lock(&core->lock);
	r = dev == TFS_CORE_POOL ? core->pool_state != ACTIVE : dev_find(core, dev) != NULL;
	pthread_mutex_unlock(&core->lock);
	return r;
}

unsigned tfs_core_nr_held(struct tfs_core *core, uint32_t dev)
{
	unsigned n = 0;

	pthread_mutex_lock(&core->lock);
	for (struct tfs_core_io *h = core->held.head; h; h = h->next)
		if (dev == TFS_CORE_POOL || h->dev == dev)
			n++;
	pthread_mutex_unlock(&core->lock);
	return n;
}
