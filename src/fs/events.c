/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * events.c - the event log and the on_event hook.  See fs.h.
 *
 * The pool records its mode changes and low-water crossings itself (where
 * they happen, under its lock) and calls a notify callback; the callback
 * only wakes the event thread here, which logs each one in the catalog
 * and starts the hook for it.  So an event is logged moments after the
 * change, whatever the daemon does next, and at shutdown whatever the
 * pool recorded up to its final commit is reported before the catalog
 * closes (tfs_fs_events_stop).
 */
#include "fs.h"

#include <errno.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "log.h"
#include "origin.h"
#include "utf8.h"

/* How long the daemon's exit waits for on_event programs still running. */
#define HOOK_WAIT_S 10

extern char **environ;

struct tfs_events {
	struct tfs_fs *fs;
	pthread_t thread;
	/* Held by report() and by a command logging a change it made (tfs_fs_events_hold). */
	pthread_mutex_t order;

	/*
	 * A leaf lock: the pool's notify callback takes it with the pool's
	 * own lock held, so nothing here calls the pool while holding it.
	 */
	pthread_mutex_t lock;
	pthread_cond_t cond;      /* pending or stop set; a hook ended */
	bool pending;             /* lock: the pool recorded something since the last report */
	bool stop;                /* lock */
	unsigned hooks;           /* lock: on_event programs not yet reaped */
	unsigned refs;            /* lock: the daemon's and each running hook's reaper */

	/* The event thread's own (the caller's after it stopped). */
	char last_mode[32];       /* THINFS_OLD_MODE of low-water hooks */
	uint64_t last_transition; /* the pool's mode changes reported */
	uint64_t low_water_data_seen, low_water_meta_seen; /* crossings reported */
};

int tfs_fs_event(struct tfs_fs *fs, const char *kind, const char *fmt, ...)
{
	char detail[512];
	int64_t id = 0;
	va_list ap;
	int r;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	/* A long detail is cut: not inside a name's multi-byte character. */
	detail[tfs_utf8_whole_prefix(detail, strlen(detail))] = '\0';
	tfs_info("%s: %s", kind, detail);
	if (!fs->cat || fs->read_only)
		return 0; /* a read-only catalog keeps no log */
	r = tfs_catalog_add_event(fs->cat, kind, detail, &id);
	if (r < 0)
		return r;
	pthread_mutex_lock(&fs->event_lock);
	if (id > fs->last_event_id)
		fs->last_event_id = id;
	pthread_cond_broadcast(&fs->event_cond);
	pthread_mutex_unlock(&fs->event_lock);
	return 0;
}

static void events_put(struct tfs_events *ev)
{
	bool last;

	pthread_mutex_lock(&ev->lock);
	last = --ev->refs == 0;
	pthread_mutex_unlock(&ev->lock);
	if (!last)
		return;
	pthread_cond_destroy(&ev->cond);
	pthread_mutex_destroy(&ev->lock);
	pthread_mutex_destroy(&ev->order);
	free(ev);
}

static unsigned percent(uint64_t used, uint64_t total)
{
	return total ? (unsigned)(used * 100 / total) : 0;
}

struct hook {
	struct tfs_events *ev;
	pid_t pid;
};

static void *reap_hook(void *arg)
{
	struct hook *h = arg;
	struct tfs_events *ev = h->ev;
	int status;

	while (waitpid(h->pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(status) && WEXITSTATUS(status))
		tfs_warn("on_event program exited %d", WEXITSTATUS(status));
	free(h);
	pthread_mutex_lock(&ev->lock);
	ev->hooks--;
	pthread_cond_broadcast(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
	events_put(ev);
	return NULL;
}

/* A detached thread reaps the program, so the event thread never waits for one. */
static void start_reaper(struct tfs_events *ev, pid_t pid)
{
	pthread_attr_t attr;
	struct hook *h;
	pthread_t t;

	h = malloc(sizeof(*h));
	if (!h)
		return; /* a zombie until we exit: better than blocking here */
	h->ev = ev;
	h->pid = pid;
	pthread_mutex_lock(&ev->lock);
	ev->hooks++;
	ev->refs++;
	pthread_mutex_unlock(&ev->lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, reap_hook, h) != 0) {
		free(h);
		pthread_mutex_lock(&ev->lock);
		ev->hooks--;
		ev->refs--; /* the daemon's reference remains */
		pthread_mutex_unlock(&ev->lock);
	}
	pthread_attr_destroy(&attr);
}

/*
 * Run pool.cfg's on_event program for a pool event, without waiting for
 * it.  The environment tells it what happened.
 */
static void run_hook(struct tfs_events *ev, const char *event, const struct tfs_pool_status *st,
		     const char *old_mode, const char *volume)
{
	enum { NR_VARS = 8 };
	char vars[NR_VARS][TFS_PATH_MAX + 32];
	int nr_vars = volume ? NR_VARS : NR_VARS - 1;
	struct tfs_fs *fs = ev->fs;
	struct tfs_pool_config *cfg;
	char **envp, *argv[2];
	size_t n = 0, nr_env = 0;
	pid_t pid;
	int r;

	cfg = malloc(sizeof(*cfg));
	if (!cfg)
		return;
	/* The configuration in force: a resume may have taken a reload with another hook. */
	tfs_pool_get_config(fs->pool, cfg);
	if (!cfg->on_event[0])
		goto out;
	snprintf(vars[0], sizeof(vars[0]), "THINFS_EVENT=%s", event);
	snprintf(vars[1], sizeof(vars[1]), "THINFS_POOL=%s", cfg->path);
	snprintf(vars[2], sizeof(vars[2]), "THINFS_MOUNT=%s", fs->mountpoint);
	snprintf(vars[3], sizeof(vars[3]), "THINFS_DATA_PERCENT=%u",
		 percent(st->data_used, st->data_total));
	snprintf(vars[4], sizeof(vars[4]), "THINFS_METADATA_PERCENT=%u",
		 percent(st->meta_used, st->meta_total));
	snprintf(vars[5], sizeof(vars[5]), "THINFS_OLD_MODE=%s", old_mode);
	snprintf(vars[6], sizeof(vars[6]), "THINFS_NEW_MODE=%s", st->mode ? st->mode : "");
	snprintf(vars[7], sizeof(vars[7]), "THINFS_VOLUME=%s", volume ? volume : "");
	/*
	 * The daemon's own environment goes along (PATH, and settings such as
	 * contrib/thinfs-autoextend's), minus any stale copies of ours.
	 */
	while (environ[nr_env])
		nr_env++;
	envp = calloc(nr_env + NR_VARS + 1, sizeof(*envp));
	if (!envp) {
		tfs_warn("on_event %s: out of memory", cfg->on_event);
		goto out;
	}
	for (size_t i = 0; i < nr_env; i++) {
		bool ours = false;

		for (int v = 0; v < NR_VARS && !ours; v++) /* a stale THINFS_VOLUME too */
			ours = !strncmp(environ[i], vars[v], (size_t)(strchr(vars[v], '=') - vars[v] + 1));
		if (!ours)
			envp[n++] = environ[i];
	}
	for (int v = 0; v < nr_vars; v++)
		envp[n++] = vars[v];
	argv[0] = cfg->on_event;
	argv[1] = NULL;
	r = posix_spawn(&pid, cfg->on_event, NULL, NULL, argv, envp);
	free(envp);
	if (r != 0) {
		tfs_warn("on_event %s: %s", cfg->on_event, strerror(r));
		goto out;
	}
	start_reaper(ev, pid);
out:
	free(cfg);
}

/* Each low-water crossing the engine counted since the last report: an event and a hook run. */
static void low_water_report(struct tfs_events *ev, const struct tfs_pool_status *st,
			     const char *kind, const char *what,
			     const struct tfs_pool_low_water *lw, uint64_t total, uint64_t mark,
			     uint64_t *seen)
{
	for (; *seen < lw->crossings; ++*seen) {
		tfs_fs_event(ev->fs, kind, "%" PRIu64 " of %" PRIu64 " %s blocks free (low water "
			     "mark %" PRIu64 ")", lw->free_then, total, what, mark);
		run_hook(ev, kind, st, ev->last_mode, NULL);
	}
}

struct cow_report {
	struct tfs_events *ev;
	const struct tfs_pool_status *st;
};

/* A classic snapshot's event: logged, and the hook told which volume (THINFS_VOLUME). */
static void cow_event(void *ctx, enum tfs_cow_event what, const char *name, const char *detail)
{
	struct cow_report *c = ctx;
	const char *kind = what == TFS_COW_EVENT_INVALID ? "snapshot_invalid" :
			   what == TFS_COW_EVENT_MERGE_DONE ? "merge_done" : "low_water_cow";

	/* The header may not say so (its write failed): the next mount reads this. */
	if (what == TFS_COW_EVENT_INVALID && c->ev->fs->cat && !c->ev->fs->read_only)
		tfs_catalog_set_cow_invalid(c->ev->fs->cat, name, true);
	if (what == TFS_COW_EVENT_MERGE_DONE)
		tfs_fs_cow_merged(c->ev->fs, name);
	tfs_fs_event(c->ev->fs, kind, "%s", detail);
	run_hook(c->ev, kind, c->st, c->ev->last_mode, name);
}

/* Everything the pool recorded since the last report, oldest first. */
static void report(struct tfs_events *ev)
{
	struct tfs_pool_transition tr[TFS_POOL_TRANSITIONS];
	struct tfs_fs *fs = ev->fs;
	struct tfs_pool_status st;
	unsigned n;

	pthread_mutex_lock(&ev->order);
	tfs_pool_status(fs->pool, &st);
	n = tfs_pool_transitions(fs->pool, ev->last_transition, tr, TFS_POOL_TRANSITIONS);
	if (n && tr[0].seq > ev->last_transition + 1)
		tfs_warn("%" PRIu64 " pool mode change(s) came too fast to be reported",
			 tr[0].seq - ev->last_transition - 1);
	for (unsigned i = 0; i < n; i++) {
		struct tfs_pool_status at = st;

		/* The hook sees each transition's own old and new mode. */
		at.mode = tr[i].new_mode;
		tfs_fs_event(fs, "mode_change", "%s -> %s%s%s", tr[i].old_mode, tr[i].new_mode,
			     tr[i].reason[0] ? ": " : "", tr[i].reason);
		run_hook(ev, "mode_change", &at, tr[i].old_mode, NULL);
		ev->last_transition = tr[i].seq;
		snprintf(ev->last_mode, sizeof(ev->last_mode), "%s", tr[i].new_mode);
	}
	low_water_report(ev, &st, "low_water_data", "data", &st.low_water_data, st.data_total,
			 st.low_water_blocks, &ev->low_water_data_seen);
	low_water_report(ev, &st, "low_water_metadata", "metadata", &st.low_water_meta,
			 st.meta_total, st.meta_low_water_blocks, &ev->low_water_meta_seen);
	if (fs->cow) {
		struct cow_report c = { .ev = ev, .st = &st };

		tfs_cow_set_events(fs->cow, cow_event, &c);
	}
	pthread_mutex_unlock(&ev->order);
}

void tfs_fs_events_hold(struct tfs_fs *fs)
{
	if (fs->events)
		pthread_mutex_lock(&fs->events->order);
}

void tfs_fs_events_release(struct tfs_fs *fs)
{
	if (fs->events)
		pthread_mutex_unlock(&fs->events->order);
}

/* The pool's notify callback: runs under the pool's lock, so it only wakes the thread. */
static void pool_changed(void *arg)
{
	struct tfs_events *ev = arg;

	pthread_mutex_lock(&ev->lock);
	ev->pending = true;
	pthread_cond_signal(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
}

void tfs_fs_events_run_hook(struct tfs_fs *fs, const char *event, const char *volume,
			    const char *old_mode, const char *new_mode)
{
	struct tfs_pool_status st;

	if (!fs->events)
		return; /* before the event thread: logged only */
	tfs_pool_status(fs->pool, &st);
	st.mode = new_mode;
	run_hook(fs->events, event, &st, old_mode, volume);
}

void tfs_fs_events_wake(void *arg)
{
	struct tfs_fs *fs = arg;
	struct tfs_events *ev = fs->events;

	/* Before the thread starts, its first report picks the event up. */
	if (ev)
		pool_changed(ev);
}

static void *event_thread(void *arg)
{
	struct tfs_events *ev = arg;

	pthread_mutex_lock(&ev->lock);
	while (!ev->stop) {
		if (!ev->pending) {
			pthread_cond_wait(&ev->cond, &ev->lock);
			continue;
		}
		ev->pending = false;
		pthread_mutex_unlock(&ev->lock);
		report(ev);
		pthread_mutex_lock(&ev->lock);
	}
	pthread_mutex_unlock(&ev->lock);
	return NULL;
}

int tfs_fs_events_start(struct tfs_fs *fs)
{
	struct tfs_events *ev;
	pthread_condattr_t ca;
	struct tfs_pool_status st;
	int r;

	ev = calloc(1, sizeof(*ev));
	if (!ev) {
		tfs_err("cannot start the event thread: out of memory");
		return -ENOMEM;
	}
	ev->fs = fs;
	ev->refs = 1;
	pthread_mutex_init(&ev->lock, NULL);
	pthread_mutex_init(&ev->order, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&ev->cond, &ca);
	pthread_condattr_destroy(&ca);
	tfs_pool_status(fs->pool, &st);
	snprintf(ev->last_mode, sizeof(ev->last_mode), "%s", st.mode ? st.mode : "");
	/*
	 * Told before the thread runs, so nothing recorded from now on waits
	 * for a later change; what the pool recorded while it opened (already
	 * short of space) is reported first.
	 */
	tfs_pool_set_event_notify(fs->pool, pool_changed, ev);
	ev->pending = true;
	r = -pthread_create(&ev->thread, NULL, event_thread, ev);
	if (r < 0) {
		tfs_err("cannot start the event thread: %s", strerror(-r));
		tfs_pool_set_event_notify(fs->pool, NULL, NULL);
		events_put(ev);
		return r;
	}
	fs->events = ev;
	return 0;
}

void tfs_fs_events_stop(struct tfs_fs *fs)
{
	struct tfs_events *ev = fs->events;
	struct timespec deadline;
	bool waited = false;

	if (!ev)
		return;
	fs->events = NULL;
	tfs_pool_set_event_notify(fs->pool, NULL, NULL);
	pthread_mutex_lock(&ev->lock);
	ev->stop = true;
	pthread_cond_signal(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
	pthread_join(ev->thread, NULL);
	/* The thread may have stopped with a change unreported: the drain is here. */
	report(ev);

	/*
	 * Hooks started just now (a change right before the unmount) get to
	 * run before the daemon is gone, within reason: one that hangs is
	 * left running, and the last reaper frees ev.
	 */
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += HOOK_WAIT_S;
	pthread_mutex_lock(&ev->lock);
	while (ev->hooks) {
		if (!waited)
			tfs_info("waiting for %u on_event program(s) to finish", ev->hooks);
		waited = true;
		if (pthread_cond_timedwait(&ev->cond, &ev->lock, &deadline) == ETIMEDOUT)
			break;
	}
	if (ev->hooks)
		tfs_warn("%u on_event program(s) still running after %d s: not waiting for them",
			 ev->hooks, HOOK_WAIT_S);
	pthread_mutex_unlock(&ev->lock);
	events_put(ev);
}
