/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Fault-injecting wrapper: fail the Nth op, fail everything after a
 * trigger, ENOSPC, and a volatile write cache whose unflushed contents a
 * simulated power cut drops or tears (as SQLite's test6.c does for files).
 *
 * Every data and metadata device of a pool sits in this wrapper for its I/O
 * counters.  While nothing is armed (no rule, no volatile cache, no power
 * cut) an op only bumps its counter and goes straight down without the
 * lock, so concurrent reads and writes of the data device run in parallel
 * (under one mutex they were serialised: 4 KiB reads at QD16 ran at the
 * QD1 rate, and a data flush stalled every read and write).  Arming and
 * disarming happen under the lock; an op that read "not armed" just before
 * a rule was set counts as having happened before it.
 *
 * A stalled op waits on a condition variable, which gives the lock up, so
 * other ops, set, power cut and close all go on while it waits.
 */
#include "bdev.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pending_write {
	uint64_t off;
	size_t len;
	uint8_t *data;
};

struct fault_rule {
	enum tfs_fault_mode mode;
	uint64_t delay_us; /* TFS_FAULT_DELAY */
	uint64_t after; /* ops of this kind still to pass before failing */
	bool once;
	/*
	 * Bumped by every set: a once-stall has already put mode back to OK,
	 * so the mode alone cannot tell its op that it was released.
	 */
	uint64_t gen;
};

struct fault_dev {
	struct tfs_bdev base;
	struct tfs_bdev *lower;
	pthread_mutex_t lock;
	bool volatile_cache;
	bool dead; /* after a power cut */
	bool closing; /* releases stalled ops so that close can free the wrapper */
	pthread_cond_t stall_cv; /* stalled ops and a close waiting for them */
	unsigned nr_stalled;
	struct fault_rule rules[TFS_FAULT_NR_OPS];
	atomic_bool armed; /* volatile_cache || dead || a rule not OK; written under lock */
	atomic_uint_fast64_t reads, writes, flushes, discards;
	struct pending_write *pending;
	size_t nr_pending, cap_pending;
};

static struct fault_dev *to_fault(struct tfs_bdev *d)
{
	return (struct fault_dev *)d;
}

static bool armed(struct fault_dev *f)
{
	return atomic_load_explicit(&f->armed, memory_order_acquire);
}

/* Called with the lock held, after anything that arms or disarms changed. */
static void update_armed(struct fault_dev *f)
{
	bool a = f->volatile_cache || f->dead;

	for (int op = 0; op < TFS_FAULT_NR_OPS; op++)
		a = a || f->rules[op].mode != TFS_FAULT_OK;
	atomic_store_explicit(&f->armed, a, memory_order_release);
}

static void count(atomic_uint_fast64_t *c)
{
	atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* Positive, so that it can never be mistaken for a -errno verdict. */
#define STALL 1

/* Called with the lock held: 0 to pass, -errno to fail, or STALL. */
static int verdict(struct fault_dev *f, enum tfs_fault_op op)
{
	struct fault_rule *r = &f->rules[op];

	if (f->dead || f->closing)
		return -EIO;
	if (r->mode == TFS_FAULT_OK || r->mode == TFS_FAULT_DELAY)
		return 0; /* a delay was waited out before (lock_after_delay) */
	if (r->after) {
		r->after--;
		return 0;
	}
	int v = r->mode == TFS_FAULT_STALL ? STALL : r->mode == TFS_FAULT_ENOSPC ? -ENOSPC : -EIO;
	if (r->once) {
		r->mode = TFS_FAULT_OK;
		update_armed(f);
	}
	return v;
}

/*
 * Called with the lock held.  A set that stalls again is no release: the
 * test that armed the stall has not let go yet.
 */
static void stall(struct fault_dev *f, enum tfs_fault_op op)
{
	uint64_t gen = f->rules[op].gen;

	f->nr_stalled++;
	while (!f->dead && !f->closing &&
	       (f->rules[op].gen == gen || f->rules[op].mode == TFS_FAULT_STALL))
		pthread_cond_wait(&f->stall_cv, &f->lock);
	f->nr_stalled--;
	pthread_cond_broadcast(&f->stall_cv); /* close may be waiting for the last one */
}

/* Called with the lock held: decides whether this op fails, and how. */
static int consult(struct fault_dev *f, enum tfs_fault_op op)
{
	int r;

	while ((r = verdict(f, op)) == STALL)
		stall(f, op);
	return r;
}

/*
 * Take the lock for an op of this kind, first waiting out its delay
 * without the lock, so that a slow disk's ops overlap as a real one's do.
 */
static void lock_after_delay(struct fault_dev *f, enum tfs_fault_op op)
{
	uint64_t us;

	pthread_mutex_lock(&f->lock);
	us = f->rules[op].mode == TFS_FAULT_DELAY ? f->rules[op].delay_us : 0;
	if (!us)
		return;
	pthread_mutex_unlock(&f->lock);
	while (us) {
		uint64_t step = us < 1000000 ? us : 1000000;

		usleep((useconds_t)step);
		us -= step;
	}
	pthread_mutex_lock(&f->lock);
}

static void overlay_pending(struct fault_dev *f, uint8_t *buf, size_t len, uint64_t off)
{
	for (size_t i = 0; i < f->nr_pending; i++) {
		struct pending_write *w = &f->pending[i];
		uint64_t s = w->off > off ? w->off : off;
		uint64_t e = w->off + w->len < off + len ? w->off + w->len : off + len;
		if (s < e)
			memcpy(buf + (s - off), w->data + (s - w->off), e - s);
	}
}

static int fault_read(struct tfs_bdev *d, void *buf, size_t len, uint64_t off)
{
	struct fault_dev *f = to_fault(d);
	int r;

	count(&f->reads);
	if (!armed(f))
		return tfs_bdev_read(f->lower, buf, len, off);
	lock_after_delay(f, TFS_FAULT_READ);
	r = consult(f, TFS_FAULT_READ);
	if (!r)
		r = tfs_bdev_read(f->lower, buf, len, off);
	if (!r)
		overlay_pending(f, buf, len, off);
	pthread_mutex_unlock(&f->lock);
	return r;
}

/* Unarmed, the lower device's batch; armed, each read meets the rules as ever. */
static int fault_read_batch(struct tfs_bdev *d, const struct tfs_bdev_req *reqs, unsigned nr,
			    size_t max_bytes)
{
	struct fault_dev *f = to_fault(d);
	int r = 0;

	if (!armed(f)) {
		atomic_fetch_add_explicit(&f->reads, nr, memory_order_relaxed);
		return tfs_bdev_read_batch_bounded(f->lower, reqs, nr, max_bytes);
	}
	for (unsigned i = 0; i < nr && !r; i++)
		r = fault_read(d, reqs[i].buf, reqs[i].len, reqs[i].off);
	return r;
}

static int hold_write(struct fault_dev *f, const void *buf, size_t len, uint64_t off)
{
	struct pending_write *w;
	void *data;

	if (f->nr_pending == f->cap_pending) {
		size_t cap = f->cap_pending ? f->cap_pending * 2 : 64;
		w = realloc(f->pending, cap * sizeof(*w));
		if (!w)
			return -ENOMEM;
		f->pending = w;
		f->cap_pending = cap;
	}
	w = &f->pending[f->nr_pending];
	/* Page-aligned, so that writing it back to a direct device needs no bounce. */
	if (posix_memalign(&data, 4096, len ? len : 1))
		return -ENOMEM;
	w->data = data;
	memcpy(w->data, buf, len);
	w->off = off;
	w->len = len;
	f->nr_pending++;
	return 0;
}

static int fault_write(struct tfs_bdev *d, const void *buf, size_t len, uint64_t off)
{
	struct fault_dev *f = to_fault(d);
	int r;

	count(&f->writes);
	if (!armed(f))
		return tfs_bdev_write(f->lower, buf, len, off);
	lock_after_delay(f, TFS_FAULT_WRITE);
	r = consult(f, TFS_FAULT_WRITE);
	if (!r)
		r = f->volatile_cache ? hold_write(f, buf, len, off)
				      : tfs_bdev_write(f->lower, buf, len, off);
	pthread_mutex_unlock(&f->lock);
	return r;
}

static void drop_pending(struct fault_dev *f)
{
	for (size_t i = 0; i < f->nr_pending; i++)
		free(f->pending[i].data);
	f->nr_pending = 0;
}

static int write_back(struct fault_dev *f)
{
	for (size_t i = 0; i < f->nr_pending; i++) {
		struct pending_write *w = &f->pending[i];
		int r = tfs_bdev_write(f->lower, w->data, w->len, w->off);
		if (r)
			return r;
	}
	drop_pending(f);
	return 0;
}

static int fault_flush(struct tfs_bdev *d)
{
	struct fault_dev *f = to_fault(d);
	int r;

	count(&f->flushes);
	if (!armed(f))
		return tfs_bdev_flush(f->lower);
	lock_after_delay(f, TFS_FAULT_FLUSH);
	r = consult(f, TFS_FAULT_FLUSH);
	if (!r)
		r = write_back(f);
	if (!r)
		r = tfs_bdev_flush(f->lower);
	pthread_mutex_unlock(&f->lock);
	return r;
}

static int fault_discard(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	struct fault_dev *f = to_fault(d);
	int r;

	count(&f->discards);
	if (!armed(f))
		return tfs_bdev_discard(f->lower, off, len);
	pthread_mutex_lock(&f->lock);
	/* A discard is a write as far as failure goes. */
	r = consult(f, TFS_FAULT_WRITE);
	if (!r)
		r = write_back(f); /* keep ordering simple: earlier writes land first */
	if (!r)
		r = tfs_bdev_discard(f->lower, off, len);
	pthread_mutex_unlock(&f->lock);
	return r;
}

/*
 * Straight down, never failed nor held: it changes no data, so its order
 * against held writes does not matter and a power cut has nothing to drop.
 */
static int fault_preallocate(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	return tfs_bdev_preallocate(to_fault(d)->lower, off, len);
}

static int fault_size(struct tfs_bdev *d, uint64_t *bytes)
{
	return tfs_bdev_size(to_fault(d)->lower, bytes);
}

static int fault_grow(struct tfs_bdev *d, uint64_t bytes)
{
	return tfs_bdev_grow(to_fault(d)->lower, bytes);
}

/*
 * Straight down: the caller shrinks after a commit, whose flush wrote every
 * held write through, and nothing is written past the new end afterwards.
 */
static int fault_shrink(struct tfs_bdev *d, uint64_t bytes)
{
	return tfs_bdev_shrink(to_fault(d)->lower, bytes);
}

/* Stalled ops still point at the wrapper: they must be gone before it is freed. */
static void release_stalled(struct fault_dev *f)
{
	pthread_mutex_lock(&f->lock);
	f->closing = true;
	pthread_cond_broadcast(&f->stall_cv);
	while (f->nr_stalled)
		pthread_cond_wait(&f->stall_cv, &f->lock);
	pthread_mutex_unlock(&f->lock);
}

static void fault_destroy(struct tfs_bdev *d)
{
	struct fault_dev *f = to_fault(d);

	release_stalled(f);
	drop_pending(f);
	free(f->pending);
	tfs_bdev_close(f->lower);
	pthread_cond_destroy(&f->stall_cv);
	pthread_mutex_destroy(&f->lock);
	free(f);
}

static const struct tfs_bdev_ops fault_ops = {
	.read = fault_read,
	.write = fault_write,
	.flush = fault_flush,
	.discard = fault_discard,
	.preallocate = fault_preallocate,
	.get_size = fault_size,
	.grow = fault_grow,
	.shrink = fault_shrink,
	.destroy = fault_destroy,
	.read_batch = fault_read_batch,
};

int tfs_bdev_fault_wrap(struct tfs_bdev *lower, bool volatile_cache, struct tfs_bdev **out)
{
	struct fault_dev *f = calloc(1, sizeof(*f));

	if (!f)
		return -ENOMEM;
	f->base.ops = &fault_ops;
	snprintf(f->base.name, sizeof(f->base.name), "%s", lower->name);
	f->base.direct = lower->direct;
	f->base.blockdev = lower->blockdev;
	f->lower = lower;
	f->volatile_cache = volatile_cache;
	pthread_mutex_init(&f->lock, NULL);
	pthread_cond_init(&f->stall_cv, NULL);
	atomic_init(&f->armed, volatile_cache);
	*out = &f->base;
	return 0;
}

void tfs_bdev_fault_set(struct tfs_bdev *dev, enum tfs_fault_op op, enum tfs_fault_mode mode,
			uint64_t after, bool once)
{
	struct fault_dev *f = to_fault(dev);

	if (dev->ops != &fault_ops || op >= TFS_FAULT_NR_OPS)
		return;
	pthread_mutex_lock(&f->lock);
	f->rules[op] = (struct fault_rule){
		.mode = mode, .after = after, .once = once, .gen = f->rules[op].gen + 1
	};
	update_armed(f);
	pthread_cond_broadcast(&f->stall_cv);
	pthread_mutex_unlock(&f->lock);
}

void tfs_bdev_fault_set_delay(struct tfs_bdev *dev, enum tfs_fault_op op, uint64_t usec)
{
	struct fault_dev *f = to_fault(dev);

	if (dev->ops != &fault_ops || op >= TFS_FAULT_NR_OPS)
		return;
	pthread_mutex_lock(&f->lock);
	f->rules[op] = (struct fault_rule){
		.mode = usec ? TFS_FAULT_DELAY : TFS_FAULT_OK, .delay_us = usec,
		.gen = f->rules[op].gen + 1
	};
	update_armed(f);
	pthread_cond_broadcast(&f->stall_cv); /* a stalled op is released, as by any set */
	pthread_mutex_unlock(&f->lock);
}

/* xorshift32: deterministic tears for a given seed, so failures replay. */
static uint32_t next_rand(uint32_t *s)
{
	uint32_t x = *s ? *s : 0x9E3779B9u;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	*s = x;
	return x;
}

int tfs_bdev_fault_power_cut(struct tfs_bdev *dev, bool tear, uint32_t seed)
{
	struct fault_dev *f = to_fault(dev);
	int r = 0;

	if (dev->ops != &fault_ops)
		return -EINVAL;
	pthread_mutex_lock(&f->lock);
	for (size_t i = 0; tear && i < f->nr_pending; i++) {
		struct pending_write *w = &f->pending[i];
		size_t sectors = (w->len + 511) / 512;
		size_t keep = next_rand(&seed) % (sectors + 1);
		size_t bytes = keep * 512 < w->len ? keep * 512 : w->len;
		if (bytes && !r)
			r = tfs_bdev_write(f->lower, w->data, bytes, w->off);
	}
	drop_pending(f);
	f->dead = true;
	update_armed(f);
	pthread_cond_broadcast(&f->stall_cv);
	pthread_mutex_unlock(&f->lock);
	return r;
}

void tfs_bdev_fault_counts(struct tfs_bdev *dev, struct tfs_bdev_io_counts *out)
{
	struct fault_dev *f = to_fault(dev);

	if (dev->ops != &fault_ops) {
		memset(out, 0, sizeof(*out));
		return;
	}
	out->reads = atomic_load_explicit(&f->reads, memory_order_relaxed);
	out->writes = atomic_load_explicit(&f->writes, memory_order_relaxed);
	out->flushes = atomic_load_explicit(&f->flushes, memory_order_relaxed);
	out->discards = atomic_load_explicit(&f->discards, memory_order_relaxed);
	out->read_bytes = atomic_load_explicit(&f->lower->read_bytes, memory_order_relaxed);
	out->write_bytes = atomic_load_explicit(&f->lower->write_bytes, memory_order_relaxed);
}

unsigned tfs_bdev_fault_stalled(struct tfs_bdev *dev)
{
	struct fault_dev *f = to_fault(dev);
	unsigned n;

	if (dev->ops != &fault_ops)
		return 0;
	pthread_mutex_lock(&f->lock);
	n = f->nr_stalled;
	pthread_mutex_unlock(&f->lock);
	return n;
}
