/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cowmerge.c - merging a classic snapshot back into its origin (dm's
 * snapshot-merge; see origin.h, tfs_cow_set_merge).
 *
 * The merging snapshot leaves its origin's list, so origin writes no
 * longer copy out for it, and the origin's I/O goes through it instead:
 * reads of a chunk it has an exception for come from its COW chunk, and
 * writes to such a chunk go into that COW chunk, which the merge will
 * copy back.  So the origin reads as the snapshot (plus what was written
 * since) from the first instant, and no origin write can be overwritten
 * by the merge: nothing the merge copies was written to the origin's
 * device since the merge began.
 *
 * One thread per merge takes the store's last run of exceptions (the
 * kernel's order, snap-store.h), and under the run's exclusive range
 * lock (so origin I/O to those chunks waits, as dm holds it) has every
 * other valid snapshot copy the origin's chunks out first, copies the run
 * from the COW device into the origin, flushes the origin, and only then
 * drops the run's records (merge_commit).  A crash anywhere in between
 * leaves the records, and the copy is done again at the next mount.
 * Between runs it sleeps as long as the run took, so at least half of the
 * devices' time stays with the origin's own I/O.
 */
#include "origin-internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "scratch.h"

/* At most this many bytes merged per step (one range lock, one flush). */
#define STEP_BYTES ((uint64_t)1 << 20)
/* The pause after a step is as long as the step, up to this. */
#define MAX_PAUSE_NS 100000000LL

struct tfs_cow_merge {
	struct tfs_cowsnap *snap;  /* the set's reference, out of the origin's list */
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t wake;
	bool stop;                 /* mu */
	atomic_bool finished;      /* every exception merged (or merge_failed): the thread ended */
	bool claimed;              /* set->lock: a reaper took it */
};

struct tfs_cowsnap *tfs_cow_merge_snap(struct tfs_origin *o)
{
	return o->merge->snap;
}

struct tfs_cowsnap *tfs_cow_merge_find(struct tfs_cow_set *set, const char *name, uint32_t id)
{
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_cow_merge *m = set->origins[i]->merge;

		if (m && (name ? !strcmp(m->snap->name, name) : m->snap->id == id))
			return m->snap;
	}
	return NULL;
}

/* ---- the origin's I/O while merging ---- */

/*
 * Bytes of the origin that s has no exception for: the other snapshots
 * copy them out first, then the origin's device takes them, as an origin
 * write without a merge.  Range lock held exclusively.
 */
static int write_through(struct tfs_origin *o, const void *buf, size_t len, uint64_t off)
{
	for (unsigned i = 0; i < o->nr_snaps; i++)
		if (!atomic_load(&o->snaps[i]->invalid))
			tfs_cowsnap_copy_out(o->snaps[i], off, len, NULL);
	return tfs_dev_write(o->dev, buf, len, off);
}

int tfs_cow_merge_write(struct tfs_origin *o, const void *buf, size_t len, uint64_t off)
{
	struct tfs_cowsnap *s = o->merge->snap;
	uint64_t cb = s->chunk_bytes, b, e, pos = off, end = off + len, to;
	int r;

	tfs_origin_lock_range(o, off, len, &b, &e);
	r = tfs_prison_lock(o->prison, 0, b, e);
	if (r < 0)
		return r;
	while (!r && pos < end) {
		uint64_t c = pos / cb, in = pos % cb;
		size_t n = (size_t)(cb - in < end - pos ? cb - in : end - pos);
		const uint8_t *src = (const uint8_t *)buf + (pos - off);

		if (tfs_snap_store_lookup(s->store, c, &to) == 0) {
			/* Not merged yet: the merge will carry this into the origin. */
			r = tfs_bdev_write(s->cow, src, n, to * cb + in);
		} else {
			/* A run of chunks that read from the origin's device already. */
			while (pos + n < end && tfs_snap_store_lookup(s->store, (pos + n) / cb, &to) < 0)
				n += (size_t)(cb < end - pos - n ? cb : end - pos - n);
			r = write_through(o, src, n, pos);
		}
		pos += n;
	}
	tfs_prison_unlock(o->prison, 0, b, e);
	return r;
}

int tfs_cow_merge_flush(struct tfs_origin *o)
{
	return tfs_bdev_flush(o->merge->snap->cow);
}

/* ---- the merge thread ---- */

/*
 * Merge the store's last run.  1: merged one, 0: nothing was left,
 * -errno: failed (logged).  o->lock held shared.
 */
static int merge_step(struct tfs_cowsnap *s)
{
	struct tfs_origin *o = s->origin;
	uint64_t cb = s->chunk_bytes, old, from, off, len, done = 0, b, e;
	uint32_t max = cb < STEP_BYTES ? (uint32_t)(STEP_BYTES / cb) : 1;
	size_t piece;
	void *buf;
	int n, r;

	n = tfs_snap_store_merge_prepare(s->store, max, &old, &from);
	if (n == -ENODATA)
		return 0;
	if (n < 0)
		return n;
	off = old * cb;
	/* An origin's last chunk may be short: the rest of the COW chunk is not its. */
	len = off >= o->size ? 0 : o->size - off < (uint64_t)n * cb ? o->size - off : (uint64_t)n * cb;
	tfs_origin_lock_range(o, off, (uint64_t)n * cb, &b, &e);
	r = tfs_prison_lock(o->prison, 0, b, e);
	if (r < 0)
		return r;
	piece = len < STEP_BYTES ? (size_t)len : (size_t)STEP_BYTES;
	buf = piece ? tfs_scratch_get(piece) : NULL;
	if (piece && !buf) {
		r = -ENOMEM;
		goto out;
	}
	/* The other snapshots' view of these chunks is the origin's device now: copied first. */
	for (unsigned i = 0; len && i < o->nr_snaps; i++)
		if (!atomic_load(&o->snaps[i]->invalid))
			tfs_cowsnap_copy_out(o->snaps[i], off, len, NULL);
	while (!r && done < len) {
		size_t k = len - done < piece ? (size_t)(len - done) : piece;

		r = tfs_bdev_read(s->cow, buf, k, from * cb + done);
		if (r < 0) {
			tfs_err("snapshot %s: merge: reading its COW device %s failed: %s", s->name,
				s->cow_path, strerror(-r));
			break;
		}
		r = tfs_dev_write(o->dev, buf, k, off + done);
		if (r < 0)
			tfs_err("snapshot %s: merge: writing origin %s failed: %s", s->name, o->name,
				strerror(-r));
		done += k;
	}
	if (r == 0 && len) {
		r = tfs_dev_flush(o->dev);
		if (r < 0)
			tfs_err("snapshot %s: merge: flushing origin %s failed: %s", s->name,
				o->name, strerror(-r));
	}
	/* Only with the data durable in the origin may the records go. */
	if (r == 0) {
		r = tfs_snap_store_merge_commit(s->store, (uint32_t)n);
		if (r < 0)
			tfs_err("snapshot %s: merge: dropping merged exceptions from %s failed: %s",
				s->name, s->cow_path, strerror(-r));
	}
out:
	if (buf)
		tfs_scratch_put(buf, piece);
	tfs_prison_unlock(o->prison, 0, b, e);
	return r < 0 ? r : 1;
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep ns unless stopped first.  Whether to go on. */
static bool pause_unless_stopped(struct tfs_cow_merge *m, int64_t ns)
{
	struct timespec until;
	bool stop;

	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += ns / 1000000000LL;
	until.tv_nsec += ns % 1000000000LL;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&m->mu);
	while (!m->stop && ns > 0 &&
	       pthread_cond_timedwait(&m->wake, &m->mu, &until) != ETIMEDOUT)
		;
	stop = m->stop;
	pthread_mutex_unlock(&m->mu);
	return !stop;
}

static void *merge_thread(void *arg)
{
	struct tfs_cow_merge *m = arg;
	struct tfs_cowsnap *s = m->snap;
	struct tfs_origin *o = s->origin;
	int r = 1;

	while (r > 0 && pause_unless_stopped(m, 0)) {
		int64_t t = now_ns(), took;

		pthread_rwlock_rdlock(&o->lock);
		r = merge_step(s);
		pthread_rwlock_unlock(&o->lock);
		took = now_ns() - t;
		if (r > 0 && !pause_unless_stopped(m, took < MAX_PAUSE_NS ? took : MAX_PAUSE_NS))
			return NULL; /* unmount: the next mount goes on from here */
	}
	if (r < 0) {
		atomic_store(&s->merge_failed, true);
		tfs_err("snapshot %s: the merge into %s stopped (Merge failed): %s; %" PRIu64
			" chunk(s) are still read from the COW device", s->name, o->name,
			strerror(-r), tfs_snap_store_count(s->store));
		return NULL;
	}
	if (r == 0) {
		atomic_store(&m->finished, true);
		if (o->set->notify)
			o->set->notify(o->set->notify_arg);
	}
	return NULL;
}

/* ---- starting, stopping, finishing ---- */

/* set->lock held.  The snapshot with id and the reason it cannot merge (logged), or 0. */
static int may_merge(struct tfs_cow_set *set, uint32_t id, struct tfs_cowsnap **out)
{
	struct tfs_cowsnap *s = tfs_cow_set_find_snap(set, NULL, id);

	if (!s)
		return -ENOENT;
	if (s->from_cfg) {
		tfs_err("snapshot %s comes from pool.cfg: a merge would leave its section naming "
			"a merged store: make the snapshot with thinfs-ctl snapshot to merge it",
			s->name);
		return -EPERM;
	}
	if (!s->persistent) {
		tfs_err("snapshot %s is transient: only a persistent store can be merged (its "
			"progress must survive a crash)", s->name);
		return -EOPNOTSUPP;
	}
	if (atomic_load(&s->invalid)) {
		tfs_err("snapshot %s is invalid: its content is incomplete and cannot be merged",
			s->name);
		return -EIO;
	}
	if (s->origin->merge) {
		tfs_err("origin %s is being rolled back to snapshot %s already: merge %s after "
			"merge_done", s->origin->name, s->origin->merge->snap->name, s->name);
		return -EBUSY;
	}
	*out = s;
	return 0;
}

int tfs_cow_set_merge_check(struct tfs_cow_set *set, uint32_t id)
{
	struct tfs_cowsnap *s;
	int r;

	pthread_mutex_lock(&set->lock);
	r = may_merge(set, id, &s);
	pthread_mutex_unlock(&set->lock);
	return r;
}

int tfs_cow_set_merge(struct tfs_cow_set *set, uint32_t id, uint64_t *chunks,
		      uint32_t *origin_id)
{
	struct tfs_cow_merge *m = calloc(1, sizeof(*m));
	struct tfs_cowsnap *s;
	struct tfs_origin *o = NULL;
	pthread_condattr_t ca;
	int r;

	if (!m)
		return -ENOMEM;
	pthread_mutex_init(&m->mu, NULL);
	/* The pauses are measured on the monotonic clock. */
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&m->wake, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_lock(&set->lock);
	r = may_merge(set, id, &s);
	if (r == 0) {
		o = s->origin;
		atomic_fetch_add(&o->refs, 1);
	}
	pthread_mutex_unlock(&set->lock);
	if (r < 0)
		goto err;
	/*
	 * The origin held: no request is in flight while its reads change
	 * meaning.  This hold is also what lets an origin write to chunks
	 * every snapshot has copied skip the range lock (origin.c,
	 * nothing_to_copy): no such write is in flight once o->merge is set,
	 * and none starts while it is, so the merge's steps never meet one.
	 */
	pthread_rwlock_wrlock(&o->lock);
	pthread_mutex_lock(&set->lock);
	r = may_merge(set, id, &s);
	if (r == 0 && tfs_snap_store_uncommitted(s->store)) {
		tfs_err("snapshot %s: copies in flight: try again", s->name);
		r = -EBUSY;
	}
	if (r == 0) {
		m->snap = s;
		atomic_store(&s->merging, true);
		r = pthread_create(&m->thread, NULL, merge_thread, m);
		if (r) {
			atomic_store(&s->merging, false);
			r = -r;
		}
	}
	if (r == 0) {
		for (unsigned j = 0; j < o->nr_snaps; j++) {
			if (o->snaps[j] == s) {
				memmove(&o->snaps[j], &o->snaps[j + 1],
					(o->nr_snaps - j - 1) * sizeof(o->snaps[0]));
				o->nr_snaps--;
				break;
			}
		}
		o->merge = m;
		*chunks = tfs_snap_store_count(s->store);
		if (origin_id)
			*origin_id = o->id;
	}
	pthread_mutex_unlock(&set->lock);
	pthread_rwlock_unlock(&o->lock);
	tfs_origin_put(o);
	if (r == 0)
		return 0;
err:
	pthread_cond_destroy(&m->wake);
	pthread_mutex_destroy(&m->mu);
	free(m);
	return r;
}

int tfs_cow_set_merging(struct tfs_cow_set *set, struct tfs_cow_merging **out, unsigned *nr)
{
	struct tfs_cow_merging *v = NULL, *grown;
	unsigned n = 0;
	int r = 0;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_cow_merge *m = set->origins[i]->merge;

		if (!m)
			continue;
		grown = realloc(v, (n + 1) * sizeof(*v));
		if (!grown) {
			r = -ENOMEM;
			break;
		}
		v = grown;
		v[n].id = m->snap->id;
		snprintf(v[n].name, sizeof(v[n].name), "%s", m->snap->name);
		n++;
	}
	pthread_mutex_unlock(&set->lock);
	if (r < 0) {
		free(v);
		v = NULL;
		n = 0;
	}
	*out = v;
	*nr = n;
	return r;
}

static void release_faults(struct tfs_bdev *dev)
{
	for (int op = 0; dev && op < TFS_FAULT_NR_OPS; op++)
		tfs_bdev_fault_set(dev, (enum tfs_fault_op)op, TFS_FAULT_OK, 0, false);
}

/* The thread ended (or never will do more): o->merge cleared, the snapshot closed. */
static void drop(struct tfs_origin *o, struct tfs_cow_merge *m)
{
	pthread_rwlock_wrlock(&o->lock);
	pthread_mutex_lock(&o->set->lock);
	o->merge = NULL;
	pthread_mutex_unlock(&o->set->lock);
	pthread_rwlock_unlock(&o->lock);
	pthread_join(m->thread, NULL);
	tfs_cowsnap_put(m->snap);
	pthread_cond_destroy(&m->wake);
	pthread_mutex_destroy(&m->mu);
	free(m);
}

void tfs_cow_merge_stop(struct tfs_origin *o)
{
	struct tfs_cow_merge *m = o->merge;

	if (!m)
		return;
	pthread_mutex_lock(&m->mu);
	m->stop = true;
	pthread_cond_signal(&m->wake);
	pthread_mutex_unlock(&m->mu);
	/*
	 * A test's stalled fault would hold the step forever: at unmount the
	 * devices' faults end, and the step in progress completes.
	 */
	release_faults(m->snap->fault);
	release_faults(o->fault);
	pthread_join(m->thread, NULL);
	tfs_cowsnap_put(m->snap);
	pthread_cond_destroy(&m->wake);
	pthread_mutex_destroy(&m->mu);
	free(m);
	o->merge = NULL;
}

void tfs_cow_merge_reap(struct tfs_cow_set *set, tfs_cow_event_fn fn, void *ctx)
{
	for (;;) {
		struct tfs_cow_merge *m = NULL;
		struct tfs_origin *o = NULL;
		char name[COW_NAME_MAX], detail[2 * COW_NAME_MAX + 64];

		pthread_mutex_lock(&set->lock);
		for (unsigned i = 0; !m && i < set->nr_origins; i++) {
			struct tfs_cow_merge *c = set->origins[i]->merge;

			if (c && !c->claimed && atomic_load(&c->finished)) {
				m = c;
				o = set->origins[i];
				m->claimed = true;
				atomic_fetch_add(&o->refs, 1);
			}
		}
		pthread_mutex_unlock(&set->lock);
		if (!m)
			return;
		snprintf(name, sizeof(name), "%s", m->snap->name);
		snprintf(detail, sizeof(detail), "origin %s is snapshot %s again: merge done",
			 o->name, name);
		/* Closed before the event, so that its name and COW device are free when it is seen. */
		drop(o, m);
		tfs_origin_put(o);
		fn(ctx, TFS_COW_EVENT_MERGE_DONE, name, detail);
	}
}
