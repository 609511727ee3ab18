/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * origin.c - the origin target and the set of origins a mount holds (see
 * origin.h).  An origin is its raw device, exported whole; its one twist
 * is that a write first has every valid snapshot copy out the chunks it
 * is about to change (tfs_cowsnap_copy_out), under an exclusive range lock
 * wide enough for the largest chunk of any snapshot, so a reader of a
 * snapshot never sees the origin's new data where the old belongs.
 */
#include "origin-internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "pool.h"
#include "scratch.h"

/* Zeros written from here by zero_range, in pieces. */
#define ZERO_PIECE (64u * 1024)
static _Alignas(4096) const uint8_t zeros[ZERO_PIECE];

#define MIN_LOCK_ALIGN 4096u

/* ---- the set ---- */

int tfs_cow_set_create(bool direct, bool faults, unsigned low_water_percent,
		       void (*notify)(void *arg), void *arg, struct tfs_cow_set **out)
{
	struct tfs_cow_set *set = calloc(1, sizeof(*set));

	if (!set)
		return -ENOMEM;
	pthread_mutex_init(&set->lock, NULL);
	pthread_mutex_init(&set->events_lock, NULL);
	pthread_mutex_init(&set->suspend_mutex, NULL);
	set->direct = direct;
	set->faults = faults;
	atomic_init(&set->low_water_percent, low_water_percent);
	set->notify = notify;
	set->notify_arg = arg;
	*out = set;
	return 0;
}

void tfs_cow_set_set_low_water(struct tfs_cow_set *set, unsigned percent)
{
	atomic_store(&set->low_water_percent, percent);
}

void tfs_cow_set_destroy(struct tfs_cow_set *set)
{
	if (!set)
		return;
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_origin *o = set->origins[i];

		tfs_cow_merge_stop(o);
		for (unsigned j = 0; j < o->nr_snaps; j++)
			tfs_cowsnap_put(o->snaps[j]);
		o->nr_snaps = 0;
		tfs_origin_put(o);
	}
	free(set->origins);
	pthread_mutex_destroy(&set->suspend_mutex);
	pthread_mutex_destroy(&set->events_lock);
	pthread_mutex_destroy(&set->lock);
	free(set);
}

/* set->lock held. */
static struct tfs_origin *find_origin(struct tfs_cow_set *set, const char *name)
{
	for (unsigned i = 0; i < set->nr_origins; i++)
		if (!strcmp(set->origins[i]->name, name))
			return set->origins[i];
	return NULL;
}

/* set->lock held.  The snapshot with that name (name non-NULL) or id. */
static struct tfs_cowsnap *find_snap(struct tfs_cow_set *set, const char *name, uint32_t id)
{
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_origin *o = set->origins[i];

		for (unsigned j = 0; j < o->nr_snaps; j++)
			if (name ? !strcmp(o->snaps[j]->name, name) : o->snaps[j]->id == id)
				return o->snaps[j];
	}
	return NULL;
}

/* set->lock held.  Whether name or id is taken by any device of the set. */
static bool taken(struct tfs_cow_set *set, const char *name, uint32_t id)
{
	for (unsigned i = 0; i < set->nr_origins; i++)
		if (!strcmp(set->origins[i]->name, name) || set->origins[i]->id == id)
			return true;
	return find_snap(set, name, 0) || find_snap(set, NULL, id);
}

/* set->lock held.  Who uses path already ("[snapshot \"s\"] cow"), or NULL. */
static const char *device_user(struct tfs_cow_set *set, const char *path, char *buf,
			       size_t len)
{
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_origin *o = set->origins[i];

		if (tfs_config_same_device(tfs_bdev_name(o->bdev), path)) {
			snprintf(buf, len, "[origin \"%s\"] device", o->name);
			return buf;
		}
		for (unsigned j = 0; j < o->nr_snaps; j++) {
			if (tfs_config_same_device(o->snaps[j]->cow_path, path)) {
				snprintf(buf, len, "[snapshot \"%s\"] cow", o->snaps[j]->name);
				return buf;
			}
		}
	}
	return NULL;
}

static int open_device(struct tfs_cow_set *set, const char *path, struct tfs_bdev **bdev,
		       struct tfs_bdev **fault)
{
	struct tfs_bdev *b, *w;
	int r;

	r = tfs_bdev_open_direct(path, false, set->direct, &b);
	if (r < 0)
		return r;
	*fault = NULL;
	if (set->faults) {
		r = tfs_bdev_fault_wrap(b, false, &w);
		if (r < 0) {
			tfs_bdev_close(b);
			return r;
		}
		b = *fault = w;
	}
	*bdev = b;
	return 0;
}

int tfs_cow_set_add_origin(struct tfs_cow_set *set, const char *name, uint32_t id,
			   const char *path)
{
	struct tfs_origin *o, **grown;
	pthread_rwlockattr_t ra;
	char user[COW_NAME_MAX + 32];
	int r;

	pthread_mutex_lock(&set->lock);
	r = taken(set, name, id) ? -EEXIST : 0;
	if (!r && device_user(set, path, user, sizeof(user))) {
		tfs_err("[origin \"%s\"] device: %s is used by %s", name, path, user);
		r = -EEXIST;
	}
	pthread_mutex_unlock(&set->lock);
	if (r < 0)
		return r;

	o = calloc(1, sizeof(*o));
	if (!o)
		return -ENOMEM;
	o->set = set;
	snprintf(o->name, sizeof(o->name), "%s", name);
	o->id = id;
	o->lock_align = MIN_LOCK_ALIGN;
	atomic_init(&o->refs, 1);
	r = open_device(set, path, &o->bdev, &o->fault);
	if (r < 0) {
		tfs_err("[origin \"%s\"] device: cannot open %s: %s", name, path, strerror(-r));
		goto err_free;
	}
	r = tfs_bdev_size(o->bdev, &o->size);
	if (r < 0) {
		tfs_err("[origin \"%s\"] device: %s: cannot read its size: %s", name, path,
			strerror(-r));
		goto err_close;
	}
	/* Through target.h, so that the origin could sit on another target one day. */
	r = tfs_linear_open(o->bdev, true, 0, &o->dev);
	if (r < 0)
		goto err_close;
	r = tfs_prison_create(&o->prison);
	if (r < 0) {
		tfs_dev_close(o->dev);
		goto err_free;
	}
	r = tfs_core_create(&o->core);
	if (r < 0) {
		tfs_prison_destroy(o->prison);
		tfs_dev_close(o->dev);
		goto err_free;
	}
	/* A snapshot being added must not wait behind an endless stream of I/O. */
	pthread_rwlockattr_init(&ra);
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&o->lock, &ra);
	pthread_rwlockattr_destroy(&ra);

	pthread_mutex_lock(&set->lock);
	if (set->stop_holding)
		tfs_core_close(o->core);
	grown = realloc(set->origins, (set->nr_origins + 1) * sizeof(*grown));
	if (grown)
		set->origins = grown;
	if (!grown || taken(set, name, id)) {
		pthread_mutex_unlock(&set->lock);
		tfs_origin_put(o);
		return grown ? -EEXIST : -ENOMEM;
	}
	set->origins[set->nr_origins++] = o;
	pthread_mutex_unlock(&set->lock);
	return 0;

err_close:
	tfs_bdev_close(o->bdev);
err_free:
	free(o);
	return r;
}

void tfs_origin_put(struct tfs_origin *o)
{
	int r;

	if (atomic_fetch_sub(&o->refs, 1) != 1)
		return;
	r = tfs_dev_flush(o->dev);
	if (r < 0)
		tfs_err("origin %s: final flush of %s failed: %s", o->name, tfs_bdev_name(o->bdev),
			strerror(-r));
	free(o->snaps);
	pthread_rwlock_destroy(&o->lock);
	tfs_core_destroy(o->core);
	tfs_prison_destroy(o->prison);
	tfs_dev_close(o->dev);
	free(o);
}

int tfs_cow_set_add_snapshot(struct tfs_cow_set *set, const struct tfs_cowsnap_params *p)
{
	struct tfs_cowsnap *s, **grown;
	struct tfs_origin *o;
	char user[COW_NAME_MAX + 32];
	int r;

	pthread_mutex_lock(&set->lock);
	o = find_origin(set, p->origin);
	if (!o) {
		pthread_mutex_unlock(&set->lock);
		tfs_err("[snapshot \"%s\"] origin: no origin named '%s'", p->name, p->origin);
		return -ENOENT;
	}
	if (taken(set, p->name, p->id)) {
		pthread_mutex_unlock(&set->lock);
		return -EEXIST;
	}
	if (device_user(set, p->cow, user, sizeof(user))) {
		pthread_mutex_unlock(&set->lock);
		tfs_err("[snapshot \"%s\"] cow: %s is used by %s", p->name, p->cow, user);
		return -EEXIST;
	}
	if (o->merge) {
		/* Its copies would be of the origin's device, not of what the origin reads as. */
		pthread_mutex_unlock(&set->lock);
		tfs_err("[snapshot \"%s\"] origin: %s is being rolled back by a merge: take the "
			"snapshot after merge_done", p->name, p->origin);
		return -EBUSY;
	}
	atomic_fetch_add(&o->refs, 1);
	pthread_mutex_unlock(&set->lock);

	r = tfs_cowsnap_create(set, o, p, &s);
	if (r < 0)
		goto out_put;

	/*
	 * The hold: no request of the origin or its snapshots is in flight
	 * from here, so the origin's content now is the snapshot's.  The
	 * flush makes that content durable before the snapshot can be used.
	 */
	pthread_rwlock_wrlock(&o->lock);
	r = tfs_dev_flush(o->dev);
	if (r < 0) {
		tfs_err("origin %s: flush before snapshot %s failed: %s", o->name, p->name,
			strerror(-r));
		goto out_unlock;
	}
	pthread_mutex_lock(&set->lock);
	grown = realloc(o->snaps, (o->nr_snaps + 1) * sizeof(*grown));
	if (grown)
		o->snaps = grown;
	if (!grown || taken(set, p->name, p->id) || o->merge) {
		r = !grown ? -ENOMEM : o->merge ? -EBUSY : -EEXIST;
		pthread_mutex_unlock(&set->lock);
		goto out_unlock;
	}
	o->snaps[o->nr_snaps++] = s;
	if (s->chunk_bytes > o->lock_align)
		o->lock_align = s->chunk_bytes;
	pthread_mutex_unlock(&set->lock);
	pthread_rwlock_unlock(&o->lock);
	tfs_origin_put(o); /* the snapshot holds the origin through the set */
	return 0;

out_unlock:
	pthread_rwlock_unlock(&o->lock);
	tfs_cowsnap_put(s);
out_put:
	tfs_origin_put(o);
	return r;
}

int tfs_cow_set_remove_snapshot(struct tfs_cow_set *set, uint32_t id, bool from_cfg_too)
{
	struct tfs_cowsnap *s;
	struct tfs_origin *o;
	bool found = false;

	pthread_mutex_lock(&set->lock);
	s = find_snap(set, NULL, id);
	if (!s || (s->from_cfg && !from_cfg_too)) {
		pthread_mutex_unlock(&set->lock);
		return s ? -EPERM : -ENOENT;
	}
	o = s->origin;
	atomic_fetch_add(&o->refs, 1);
	pthread_mutex_unlock(&set->lock);

	/* Origin writes in flight may be copying for it: they finish first. */
	pthread_rwlock_wrlock(&o->lock);
	pthread_mutex_lock(&set->lock);
	for (unsigned j = 0; j < o->nr_snaps; j++) {
		if (o->snaps[j] == s) {
			memmove(&o->snaps[j], &o->snaps[j + 1],
				(o->nr_snaps - j - 1) * sizeof(o->snaps[0]));
			o->nr_snaps--;
			found = true;
			break;
		}
	}
	pthread_mutex_unlock(&set->lock);
	pthread_rwlock_unlock(&o->lock);
	/* A suspend of it ends with it (nothing of it can be held: no handle is open). */
	if (found)
		tfs_core_resume(o->core, &id, 1);
	if (found)
		tfs_cowsnap_put(s);
	tfs_origin_put(o);
	return found ? 0 : -ENOENT;
}

int tfs_cow_set_remove_origin(struct tfs_cow_set *set, uint32_t id)
{
	struct tfs_origin *o = NULL;
	int r = -ENOENT;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++) {
		if (set->origins[i]->id != id)
			continue;
		r = set->origins[i]->nr_snaps || set->origins[i]->merge ? -EBUSY : 0;
		if (!r) {
			o = set->origins[i];
			memmove(&set->origins[i], &set->origins[i + 1],
				(set->nr_origins - i - 1) * sizeof(set->origins[0]));
			set->nr_origins--;
		}
		break;
	}
	pthread_mutex_unlock(&set->lock);
	if (o)
		tfs_origin_put(o);
	return r;
}

int tfs_cow_set_check_snapshot(struct tfs_cow_set *set, const struct tfs_cowsnap_params *p)
{
	char user[COW_NAME_MAX + 32];
	bool used;

	pthread_mutex_lock(&set->lock);
	used = device_user(set, p->cow, user, sizeof(user)) != NULL;
	pthread_mutex_unlock(&set->lock);
	if (used) {
		tfs_err("[snapshot \"%s\"] cow: %s is used by %s", p->name, p->cow, user);
		return -EEXIST;
	}
	return tfs_cowsnap_check(p);
}

bool tfs_cow_set_has(struct tfs_cow_set *set, uint32_t id, bool *from_cfg)
{
	struct tfs_cowsnap *s;
	bool found = false;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++)
		if (set->origins[i]->id == id)
			found = true;
	s = find_snap(set, NULL, id);
	if (from_cfg)
		*from_cfg = !s || s->from_cfg;
	pthread_mutex_unlock(&set->lock);
	return found || s;
}

int tfs_cow_set_open_dev(struct tfs_cow_set *set, uint32_t id, unsigned flags,
			 struct tfs_dev **out)
{
	struct tfs_cowsnap *s;
	int r = -ENODATA;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++)
		if (set->origins[i]->id == id)
			r = tfs_origin_open_dev(set->origins[i], flags, out);
	s = r == -ENODATA ? find_snap(set, NULL, id) : NULL;
	if (!s && r == -ENODATA && (flags & TFS_DEV_STATUS_ONLY))
		s = tfs_cow_merge_find(set, NULL, id);
	if (s)
		r = tfs_cowsnap_open_dev(s, flags, out);
	pthread_mutex_unlock(&set->lock);
	return r;
}

int tfs_cow_set_size(struct tfs_cow_set *set, uint32_t id, uint64_t *bytes)
{
	struct tfs_cowsnap *s;
	int r = -ENODATA;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++) {
		if (set->origins[i]->id == id) {
			*bytes = set->origins[i]->size;
			r = 0;
		}
	}
	s = r ? find_snap(set, NULL, id) : NULL;
	if (!s && r)
		s = tfs_cow_merge_find(set, NULL, id);
	if (s) {
		*bytes = s->origin->size;
		r = 0;
	}
	pthread_mutex_unlock(&set->lock);
	return r;
}

int tfs_cow_set_ids(struct tfs_cow_set *set, uint32_t **ids, unsigned *nr)
{
	unsigned n = 0, cap;
	uint32_t *v;

	pthread_mutex_lock(&set->lock);
	cap = set->nr_origins;
	for (unsigned i = 0; i < set->nr_origins; i++)
		cap += set->origins[i]->nr_snaps;
	v = malloc((cap ? cap : 1) * sizeof(*v));
	if (!v) {
		pthread_mutex_unlock(&set->lock);
		return -ENOMEM;
	}
	for (unsigned i = 0; i < set->nr_origins; i++) {
		v[n++] = set->origins[i]->id;
		for (unsigned j = 0; j < set->origins[i]->nr_snaps; j++)
			v[n++] = set->origins[i]->snaps[j]->id;
	}
	pthread_mutex_unlock(&set->lock);
	*ids = v;
	*nr = n;
	return 0;
}

int tfs_cow_set_resize_cow(struct tfs_cow_set *set, const char *name, uint64_t *chunks)
{
	struct tfs_cowsnap *s;
	uint64_t total = 0;
	int r;

	pthread_mutex_lock(&set->lock);
	s = find_snap(set, name, 0);
	if (s)
		atomic_fetch_add(&s->refs, 1);
	pthread_mutex_unlock(&set->lock);
	if (!s)
		return -ENOENT;
	r = tfs_snap_store_resize(s->store, &total);
	if (r == 0) {
		tfs_cowsnap_resized(s, total);
		tfs_cowsnap_check_low_water(s);
	}
	if (chunks)
		*chunks = total;
	tfs_cowsnap_put(s);
	return r;
}

int tfs_cow_set_with_fault_dev(struct tfs_cow_set *set, const char *name, const char *which,
			       void (*fn)(struct tfs_bdev *dev, void *arg), void *arg)
{
	struct tfs_bdev *dev = NULL;
	struct tfs_cowsnap *s;

	/* Under the set's lock: a snapshot removed meanwhile cannot take the wrapper away. */
	pthread_mutex_lock(&set->lock);
	if (!strcmp(which, "cow")) {
		s = find_snap(set, name, 0);
		if (!s)
			s = tfs_cow_merge_find(set, name, 0);
		dev = s ? s->fault : NULL;
	} else if (!strcmp(which, "device")) {
		struct tfs_origin *o = find_origin(set, name);

		dev = o ? o->fault : NULL;
	}
	if (dev && fn)
		fn(dev, arg);
	pthread_mutex_unlock(&set->lock);
	return dev ? 0 : -ENOENT;
}

/* One recorded event, copied out so that fn runs with no lock held. */
struct pending_event {
	enum tfs_cow_event what;
	char name[COW_NAME_MAX];
	char detail[COW_NAME_MAX + 256];
};

void tfs_cow_set_events(struct tfs_cow_set *set, tfs_cow_event_fn fn, void *ctx)
{
	struct pending_event *ev = NULL, *grown;
	unsigned n = 0;

	pthread_mutex_lock(&set->lock);
	pthread_mutex_lock(&set->events_lock);
	for (unsigned i = 0; i < set->nr_origins; i++) {
		struct tfs_origin *o = set->origins[i];

		for (unsigned j = 0; j < o->nr_snaps; j++) {
			struct tfs_cowsnap *s = o->snaps[j];

			while (s->lw_reported < s->lw_crossings ||
			       (atomic_load(&s->invalid) && !s->invalid_reported &&
				s->invalid_why[0])) {
				grown = realloc(ev, (n + 1) * sizeof(*ev));
				if (!grown)
					goto out;
				ev = grown;
				snprintf(ev[n].name, sizeof(ev[n].name), "%s", s->name);
				if (s->lw_reported < s->lw_crossings) {
					ev[n].what = TFS_COW_EVENT_LOW_WATER;
					snprintf(ev[n].detail, sizeof(ev[n].detail),
						 "COW store of %s passed %u%% full", s->name,
						 atomic_load(&set->low_water_percent));
					s->lw_reported++;
				} else {
					ev[n].what = TFS_COW_EVENT_INVALID;
					snprintf(ev[n].detail, sizeof(ev[n].detail),
						 "snapshot %s is invalid: %s", s->name,
						 s->invalid_why);
					s->invalid_reported = true;
				}
				n++;
			}
		}
	}
out:
	pthread_mutex_unlock(&set->events_lock);
	pthread_mutex_unlock(&set->lock);
	for (unsigned i = 0; i < n; i++)
		fn(ctx, ev[i].what, ev[i].name, ev[i].detail);
	free(ev);
	tfs_cow_merge_reap(set, fn, ctx);
}

/* ---- suspend and resume ---- */

void tfs_origin_io_begin(struct tfs_origin *o, struct tfs_core_io *io, uint32_t dev)
{
	tfs_core_enter(o->core, io, dev);
	pthread_rwlock_rdlock(&o->lock);
}

void tfs_origin_io_end(struct tfs_origin *o, struct tfs_core_io *io)
{
	pthread_rwlock_unlock(&o->lock);
	tfs_core_exit(o->core, io);
}

static int origin_flush_locked(struct tfs_origin *o);

/* What one suspend does to one origin's core: all of it, or some snapshots. */
struct suspend_part {
	struct tfs_origin *o;      /* a reference taken for the suspend */
	bool whole;
	uint32_t *devs;            /* snapshot ids, unless whole */
	unsigned nr;
	int began;                 /* tfs_core_suspend_begin's count */
};

/* set->lock held.  The part for o, added if new. */
static struct suspend_part *part_of(struct suspend_part *parts, unsigned *nr_parts,
				    struct tfs_origin *o)
{
	for (unsigned i = 0; i < *nr_parts; i++)
		if (parts[i].o == o)
			return &parts[i];
	atomic_fetch_add(&o->refs, 1);
	parts[*nr_parts] = (struct suspend_part){ .o = o };
	return &parts[(*nr_parts)++];
}

/* The parts of one suspend or resume. */
struct suspend_plan {
	struct suspend_part *parts;
	unsigned nr_parts;
	uint32_t *devs;
};

/*
 * The parts of ids[0..nr) (every origin whole when nr == 0), each with a
 * reference to its origin.  -ENOENT an id not in the set, -ENOMEM.
 */
static int plan_make(struct tfs_cow_set *set, const uint32_t *ids, unsigned nr,
		     struct suspend_plan *plan)
{
	struct suspend_part *parts;
	int r = 0;

	memset(plan, 0, sizeof(*plan));
	pthread_mutex_lock(&set->lock);
	if (!set->nr_origins)
		goto out;
	parts = plan->parts = calloc(set->nr_origins, sizeof(*parts));
	plan->devs = calloc((size_t)set->nr_origins * (nr ? nr : 1), sizeof(*plan->devs));
	if (!parts || !plan->devs) {
		r = -ENOMEM;
		goto out;
	}
	for (unsigned i = 0; i < set->nr_origins; i++)
		parts[i].devs = plan->devs + (size_t)i * nr;
	for (unsigned i = 0; !nr && i < set->nr_origins; i++)
		part_of(parts, &plan->nr_parts, set->origins[i])->whole = true;
	for (unsigned k = 0; k < nr; k++) {
		struct tfs_cowsnap *s = find_snap(set, NULL, ids[k]);
		struct tfs_origin *o = s ? s->origin : NULL;
		struct suspend_part *p;
		uint32_t *slot;

		for (unsigned i = 0; !o && i < set->nr_origins; i++)
			if (set->origins[i]->id == ids[k])
				o = set->origins[i];
		if (!o) {
			r = -ENOENT;
			goto out;
		}
		slot = parts[plan->nr_parts].devs; /* a new part takes the next slot */
		p = part_of(parts, &plan->nr_parts, o);
		p->devs = p->devs ? p->devs : slot;
		if (!s)
			p->whole = true;
		else
			p->devs[p->nr++] = s->id;
	}
out:
	pthread_mutex_unlock(&set->lock);
	return r;
}

static void plan_free(struct suspend_plan *plan)
{
	for (unsigned i = 0; i < plan->nr_parts; i++)
		tfs_origin_put(plan->parts[i].o);
	free(plan->parts);
	free(plan->devs);
}

/* Quiescent: what the suspended devices acknowledged becomes durable. */
static void suspend_flush(struct suspend_part *p, char *why, size_t why_len)
{
	struct tfs_origin *o = p->o;
	size_t used = strlen(why);
	int r = 0;

	pthread_rwlock_rdlock(&o->lock);
	if (p->whole) {
		r = origin_flush_locked(o);
	} else {
		for (unsigned i = 0; i < o->nr_snaps; i++) {
			struct tfs_cowsnap *s = o->snaps[i];
			bool named = false;

			for (unsigned k = 0; k < p->nr; k++)
				named |= p->devs[k] == s->id;
			if (!named || atomic_load(&s->invalid) || tfs_bdev_flush(s->cow) >= 0)
				continue;
			tfs_cowsnap_invalidate(s, "COW device flush failed", -EIO);
			r = -EIO;
		}
	}
	pthread_rwlock_unlock(&o->lock);
	if (r < 0 && used + 1 < why_len)
		snprintf(why + used, why_len - used, "%sthe flush of origin %s at suspend failed "
			 "(%s)", used ? "; " : "", o->name, strerror(-r));
}

int tfs_cow_set_suspend(struct tfs_cow_set *set, const uint32_t *ids, unsigned nr,
			const struct tfs_suspend_opts *opts, char *why, size_t why_len)
{
	struct suspend_plan plan;
	struct suspend_part *parts;
	struct timespec deadline;
	int r, n = 0;

	why[0] = '\0';
	pthread_mutex_lock(&set->suspend_mutex);
	r = plan_make(set, ids, nr, &plan);
	parts = plan.parts;
	if (r < 0) {
		snprintf(why, why_len, "%s", r == -ENOENT ? "no such origin or snapshot"
			 : "out of memory");
		goto out;
	}
	/* Every core first, then the waits: one deadline for all of them. */
	for (unsigned i = 0; !r && i < plan.nr_parts; i++) {
		struct suspend_part *p = &parts[i];

		r = p->began = tfs_core_suspend_begin(p->o->core, p->devs, p->whole ? 0 : p->nr,
						      opts->noflush);
		if (r > 0) {
			n += r;
			r = 0;
		}
	}
	if (opts->timeout_ms)
		deadline = tfs_deadline_in(opts->timeout_ms);
	for (unsigned i = 0; !r && i < plan.nr_parts; i++)
		if (parts[i].began > 0)
			r = tfs_core_drain(parts[i].o->core, parts[i].devs,
					   parts[i].whole ? 0 : parts[i].nr,
					   opts->timeout_ms ? &deadline : NULL, opts->cancelled,
					   opts->arg);
	if (r < 0) {
		for (unsigned i = 0; i < plan.nr_parts; i++)
			if (parts[i].began > 0)
				tfs_core_suspend_end(parts[i].o->core, false);
		tfs_suspend_abandoned_why(r, opts, why, why_len);
		tfs_warn("origins: %s", why);
		goto out;
	}
	for (unsigned i = 0; i < plan.nr_parts; i++) {
		if (parts[i].began <= 0)
			continue;
		if (!opts->noflush)
			suspend_flush(&parts[i], why, why_len);
		tfs_core_suspend_end(parts[i].o->core, true);
		tfs_info("origin %s: suspended %s%s", parts[i].o->name,
			 parts[i].whole ? "with its snapshots" : "snapshots of it",
			 opts->noflush ? " (noflush)" : "");
	}
	r = n;
out:
	plan_free(&plan);
	pthread_mutex_unlock(&set->suspend_mutex);
	return r;
}

int tfs_cow_set_resume(struct tfs_cow_set *set, const uint32_t *ids, unsigned nr)
{
	struct suspend_plan plan;
	int r, n = 0;

	pthread_mutex_lock(&set->suspend_mutex);
	r = plan_make(set, ids, nr, &plan);
	for (unsigned i = 0; !r && i < plan.nr_parts; i++)
		n += (int)tfs_core_resume(plan.parts[i].o->core, plan.parts[i].devs,
					  plan.parts[i].whole ? 0 : plan.parts[i].nr);
	plan_free(&plan);
	pthread_mutex_unlock(&set->suspend_mutex);
	return r < 0 ? r : n;
}

unsigned tfs_cow_set_held(struct tfs_cow_set *set)
{
	unsigned n = 0;

	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < set->nr_origins; i++)
		n += tfs_core_nr_held(set->origins[i]->core, TFS_CORE_POOL);
	pthread_mutex_unlock(&set->lock);
	return n;
}

void tfs_cow_set_stop_holding(struct tfs_cow_set *set)
{
	pthread_mutex_lock(&set->lock);
	set->stop_holding = true;
	for (unsigned i = 0; i < set->nr_origins; i++)
		tfs_core_close(set->origins[i]->core);
	pthread_mutex_unlock(&set->lock);
}

/* ---- the origin target ---- */

void tfs_origin_lock_range(struct tfs_origin *o, uint64_t off, uint64_t len, uint64_t *begin,
			   uint64_t *end)
{
	uint64_t a = o->lock_align;

	*begin = off / a * a;
	*end = (off + len + a - 1) / a * a;
}

struct origin_handle {
	struct tfs_dev dev; /* first: the handle callers hold */
	struct tfs_origin *o;
	bool read_only, status_only;
};

static struct origin_handle *oh_of(struct tfs_dev *dev)
{
	return (struct origin_handle *)dev;
}

static int may_io(const struct origin_handle *h, bool write)
{
	if (h->status_only)
		return -EBADF;
	return write && h->read_only ? -EROFS : 0;
}

static int origin_read(struct tfs_dev *dev, void *buf, size_t len, uint64_t off)
{
	struct origin_handle *h = oh_of(dev);
	struct tfs_origin *o = h->o;
	struct tfs_core_io io;
	uint64_t b, e;
	int r = may_io(h, false);

	if (r || !len)
		return r;
	tfs_origin_io_begin(o, &io, o->id);
	if (!o->nr_snaps && !o->merge) {
		r = tfs_dev_read(o->dev, buf, len, off);
		goto out;
	}
	/* Not in the middle of a write that is copying these chunks out first. */
	tfs_origin_lock_range(o, off, len, &b, &e);
	r = tfs_prison_lock_shared(o->prison, 0, b, e);
	if (r < 0)
		goto out;
	/* While a merge runs, the origin reads as the snapshot being merged. */
	r = o->merge ? tfs_cowsnap_read_locked(tfs_cow_merge_snap(o), buf, len, off)
		     : tfs_dev_read(o->dev, buf, len, off);
	tfs_prison_unlock_shared(o->prison, 0, b, e);
out:
	tfs_origin_io_end(o, &io);
	return r;
}

/* Whether snapshot s has a durable exception for every chunk of [off, off + len). */
static bool snap_has_all(const struct tfs_cowsnap *s, uint64_t off, uint64_t len)
{
	return tfs_snap_store_durable(s->store, off / s->chunk_bytes,
				      (off + len - 1) / s->chunk_bytes);
}

/*
 * Whether an origin write of [off, off + len) can go to the device as on
 * an origin without snapshots: no range lock (and no cell to allocate),
 * because every valid snapshot has a durable exception for every chunk it
 * touches, so there is nothing to copy and nobody to protect.  Why that is
 * safe with o->lock held shared and no merge running:
 *  - the snapshot list only changes with o->lock held exclusively, so no
 *    snapshot appears that lacks these chunks before the write is done;
 *  - a durable exception stays until a merge drops it, and a merge runs
 *    only while o->merge is set, which is set (after every request in
 *    flight ended) and cleared with o->lock held exclusively: this write
 *    saw it NULL, so no merge step runs until it ends; origin writes
 *    during a merge go through tfs_cow_merge_write, which always locks,
 *    and the merge's own steps lock their run;
 *  - no copy of these chunks can be under way: a copy (origin write,
 *    snapshot write or merge step, all under the exclusive cell) allocates
 *    its exception not durable before it reads the origin, and the store
 *    marks it durable only after the data and the record are flushed;
 *  - snapshot readers find these chunks' exceptions and read their COW
 *    devices, never these bytes of the origin.
 * What the lock no longer gives is an order between this write and
 * concurrent origin reads or writes of the same bytes, which an origin
 * without snapshots does not give either.
 */
static bool nothing_to_copy(struct tfs_origin *o, uint64_t off, uint64_t len)
{
	for (unsigned i = 0; i < o->nr_snaps; i++) {
		struct tfs_cowsnap *s = o->snaps[i];

		if (!atomic_load(&s->invalid) && !snap_has_all(s, off, len))
			return false;
	}
	return true;
}

struct copy_job {
	struct tfs_cowsnap *s;
	uint64_t off, len;
	struct tfs_origin_bytes *src;
	pthread_t thread;
	bool threaded;
};

static void *copy_job_run(void *arg)
{
	struct copy_job *j = arg;

	tfs_cowsnap_copy_out(j->s, j->off, j->len, j->src);
	return NULL;
}

/*
 * Have every valid snapshot that lacks some of these chunks copy them
 * out.  Each copy_out ends with its store's group commit (data flush,
 * area write, flush), so with several snapshots they run side by side,
 * one thread each (the first on this one): the write waits for about one
 * store's flushes, not for each store's in turn.  A snapshot without a
 * thread copies here.  The origin's bytes are read before the threads
 * start, so that they only share the buffer.  Range lock held exclusively.
 */
static void copy_out_all(struct tfs_origin *o, uint64_t off, uint64_t len,
			 struct tfs_origin_bytes *src)
{
	struct copy_job *jobs = NULL;
	unsigned nr = 0, max;

	for (unsigned i = 0; i < o->nr_snaps; i++)
		if (!atomic_load(&o->snaps[i]->invalid) && !snap_has_all(o->snaps[i], off, len))
			nr++;
	if (nr > 1)
		jobs = calloc(nr, sizeof(*jobs));
	if (!jobs) {
		/* One snapshot to copy for (or no memory for more): here. */
		for (unsigned i = 0; i < o->nr_snaps; i++)
			if (!atomic_load(&o->snaps[i]->invalid))
				tfs_cowsnap_copy_out(o->snaps[i], off, len, src);
		return;
	}
	/* As many or fewer now: a snapshot may have become invalid, never valid again. */
	max = nr;
	nr = 0;
	for (unsigned i = 0; i < o->nr_snaps && nr < max; i++)
		if (!atomic_load(&o->snaps[i]->invalid) && !snap_has_all(o->snaps[i], off, len))
			jobs[nr++] = (struct copy_job){ .s = o->snaps[i], .off = off, .len = len,
							.src = src };
	tfs_origin_bytes_read(o, src);
	for (unsigned k = 1; k < nr; k++)
		jobs[k].threaded = !pthread_create(&jobs[k].thread, NULL, copy_job_run, &jobs[k]);
	for (unsigned k = 0; k < nr; k++)
		if (!jobs[k].threaded)
			copy_job_run(&jobs[k]);
	for (unsigned k = 1; k < nr; k++)
		if (jobs[k].threaded)
			pthread_join(jobs[k].thread, NULL);
	free(jobs);
}

/* o->lock held shared. */
static int origin_write_locked(struct tfs_origin *o, const void *buf, size_t len, uint64_t off)
{
	struct tfs_origin_bytes src = { .buf = NULL, .err = 0 };
	uint64_t b, e;
	int r;

	if (o->merge)
		return tfs_cow_merge_write(o, buf, len, off);
	if (!o->nr_snaps || nothing_to_copy(o, off, len))
		return tfs_dev_write(o->dev, buf, len, off);
	tfs_origin_lock_range(o, off, len, &b, &e);
	r = tfs_prison_lock(o->prison, 0, b, e);
	if (r < 0)
		return r;
	/* The locked bytes, read at most once for every snapshot's copies. */
	src.begin = b;
	src.len = e < o->size ? e - b : o->size - b;
	if (src.len > TFS_SCRATCH_MAX)
		src.len = 0;
	copy_out_all(o, off, len, &src);
	if (src.buf)
		tfs_scratch_put(src.buf, (size_t)src.len);
	r = tfs_dev_write(o->dev, buf, len, off);
	tfs_prison_unlock(o->prison, 0, b, e);
	return r;
}

static int origin_write(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	struct origin_handle *h = oh_of(dev);
	struct tfs_origin *o = h->o;
	struct tfs_core_io io;
	int r = may_io(h, true);

	if (r || !len)
		return r;
	if (off > o->size || len > o->size - off)
		return -ENOSPC; /* past the end of a device of fixed size */
	tfs_origin_io_begin(o, &io, o->id);
	r = origin_write_locked(o, buf, len, off);
	tfs_origin_io_end(o, &io);
	return r;
}

/* Every snapshot's copies and exceptions first, so that no acknowledged origin write
 * can become durable while the old data it replaced is not.  o->lock held shared. */
static int origin_flush_locked(struct tfs_origin *o)
{
	int r;

	for (unsigned i = 0; i < o->nr_snaps; i++) {
		struct tfs_cowsnap *s = o->snaps[i];

		if (atomic_load(&s->invalid))
			continue;
		r = tfs_bdev_flush(s->cow);
		if (r < 0)
			tfs_cowsnap_invalidate(s, "COW device flush failed", r);
	}
	r = o->merge ? tfs_cow_merge_flush(o) : 0;
	if (r == 0)
		r = tfs_dev_flush(o->dev);
	return r;
}

static int origin_flush(struct tfs_dev *dev)
{
	struct origin_handle *h = oh_of(dev);
	struct tfs_origin *o = h->o;
	struct tfs_core_io io;
	int r = may_io(h, false);

	if (r)
		return r;
	tfs_origin_io_begin(o, &io, o->id);
	r = origin_flush_locked(o);
	tfs_origin_io_end(o, &io);
	return r;
}

static int origin_zero_range(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	struct origin_handle *h = oh_of(dev);
	struct tfs_origin *o = h->o;
	struct tfs_core_io io;
	int r = may_io(h, true);

	if (r)
		return r;
	if (off > o->size || len > o->size - off)
		return -ENOSPC;
	tfs_origin_io_begin(o, &io, o->id);
	while (!r && len) {
		size_t n = len < ZERO_PIECE ? (size_t)len : ZERO_PIECE;

		r = origin_write_locked(o, zeros, n, off);
		off += n;
		len -= n;
	}
	tfs_origin_io_end(o, &io);
	return r;
}

/*
 * A punched hole would have to be copied out first and then could not be
 * given back to the device any more than zeros can: refused, so that the
 * caller (a file system's discard) knows nothing was freed.
 */
static int origin_discard(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	int r = may_io(oh_of(dev), true);

	(void)off;
	(void)len;
	return r ? r : -EOPNOTSUPP;
}

/* Every byte of a raw device exists already; none past its end can. */
static int origin_provision(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	struct origin_handle *h = oh_of(dev);
	int r = may_io(h, true);

	if (!r && (off > h->o->size || len > h->o->size - off))
		r = -ENOSPC;
	return r;
}

/* A raw device is data everywhere. */
static int origin_seek(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size,
		       uint64_t *out)
{
	int r = may_io(oh_of(dev), false);

	return r ? r : tfs_dev_seek_all_data(off, whence, size, out);
}

static int origin_get_size(struct tfs_dev *dev, uint64_t *bytes)
{
	*bytes = oh_of(dev)->o->size;
	return 0;
}

static int origin_allocated(struct tfs_dev *dev, uint64_t *bytes)
{
	return origin_get_size(dev, bytes);
}

static void origin_status(struct tfs_dev *dev, struct tfs_status_sink *sink)
{
	struct tfs_origin *o = oh_of(dev)->o;
	const char **names;
	unsigned n = 0;

	tfs_status_text(sink, "device", tfs_bdev_name(o->bdev));
	tfs_status_flag(sink, "suspended", tfs_core_suspended(o->core, TFS_CORE_POOL));
	tfs_status_u64(sink, "held_in_core", tfs_core_nr_held(o->core, o->id));
	pthread_mutex_lock(&o->set->lock);
	names = calloc(o->nr_snaps ? o->nr_snaps : 1, sizeof(*names));
	for (unsigned i = 0; names && i < o->nr_snaps; i++)
		names[n++] = o->snaps[i]->name;
	if (names)
		tfs_status_texts(sink, "snapshots", (const char *const *)names, n);
	pthread_mutex_unlock(&o->set->lock);
	free(names);
}

static void origin_close(struct tfs_dev *dev)
{
	struct origin_handle *h = oh_of(dev);

	tfs_origin_put(h->o);
	free(h);
}

static const struct tfs_dev_ops origin_ops = {
	.kind = "origin",
	.read = origin_read,
	.write = origin_write,
	.flush = origin_flush,
	.discard = origin_discard,
	.zero_range = origin_zero_range,
	.provision = origin_provision,
	.seek = origin_seek,
	.get_size = origin_get_size,
	.truncate = tfs_dev_truncate_fixed,
	.allocated = origin_allocated,
	.status = origin_status,
	.close = origin_close,
};

/* set->lock held (the origin stays in the set meanwhile). */
int tfs_origin_open_dev(struct tfs_origin *o, unsigned flags, struct tfs_dev **out)
{
	struct origin_handle *h = calloc(1, sizeof(*h));

	if (!h)
		return -ENOMEM;
	h->dev.ops = &origin_ops;
	h->o = o;
	h->read_only = flags & TFS_DEV_READ_ONLY;
	h->status_only = flags & TFS_DEV_STATUS_ONLY;
	atomic_fetch_add(&o->refs, 1);
	*out = &h->dev;
	return 0;
}

struct tfs_cowsnap *tfs_cow_set_find_snap(struct tfs_cow_set *set, const char *name, uint32_t id)
{
	return find_snap(set, name, id);
}
