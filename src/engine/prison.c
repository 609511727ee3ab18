/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Range locks on (device, block range).
 *
 * Every cell, granted or waiting, sits in its device's bucket list in
 * arrival order.  A new cell is granted when no earlier cell in that list
 * conflicts with it (overlapping range, and at least one of the two
 * exclusive); otherwise it waits for the first conflicting earlier cell
 * to be released and looks again.  Waiting only ever points at earlier
 * cells, so waits cannot form a cycle, and a waiting cell keeps later
 * overlapping requests out, so nothing is starved.
 *
 * A waiter sleeps on the condition variable of the cell it waits for, so
 * releasing a cell wakes only the requests that wanted that cell.  The
 * cell's memory lives until its last waiter has looked at it.
 */
#include "prison.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "log.h"

#define NR_BUCKETS 64

struct cell {
	struct cell *next;     /* bucket list, arrival order */
	uint32_t dev;
	uint64_t begin, end;
	bool shared;
	bool granted;
	bool released;         /* out of the list; freed by its last waiter */
	unsigned waiters;
	pthread_cond_t released_cv;
};

struct bucket {
	struct cell *head, *tail;
};

struct tfs_prison {
	pthread_mutex_t lock; /* every list and every cell's fields */
	struct bucket buckets[NR_BUCKETS];
};

int tfs_prison_create(struct tfs_prison **out)
{
	struct tfs_prison *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->lock, NULL);
	*out = p;
	return 0;
}

static void free_cell(struct cell *c)
{
	pthread_cond_destroy(&c->released_cv);
	free(c);
}

void tfs_prison_destroy(struct tfs_prison *p)
{
	if (!p)
		return;
	for (unsigned i = 0; i < NR_BUCKETS; i++) {
		struct cell *c = p->buckets[i].head;

		if (c)
			tfs_err("prison destroyed with cells still held (device %u)", c->dev);
		while (c) {
			struct cell *next = c->next;
			free_cell(c);
			c = next;
		}
	}
	pthread_mutex_destroy(&p->lock);
	free(p);
}

static struct bucket *bucket_of(struct tfs_prison *p, uint32_t dev)
{
	/* Fibonacci hashing: consecutive ids (the usual case) spread out. */
	return &p->buckets[(uint32_t)(dev * 2654435761u) >> 26];
}

static bool conflicts(const struct cell *a, const struct cell *b)
{
	return a->dev == b->dev && a->begin < b->end && b->begin < a->end &&
	       !(a->shared && b->shared);
}

/* The first cell that arrived before c and stands in its way, or NULL. */
static struct cell *first_blocker(struct bucket *bk, struct cell *c)
{
	for (struct cell *o = bk->head; o != c; o = o->next)
		if (conflicts(o, c))
			return o;
	return NULL;
}

static void unlink_cell(struct bucket *bk, struct cell *c)
{
	struct cell *prev = NULL;

	for (struct cell *o = bk->head; o != c; o = o->next)
		prev = o;
	if (prev)
		prev->next = c->next;
	else
		bk->head = c->next;
	if (bk->tail == c)
		bk->tail = prev;
	c->next = NULL;
}

static int lock_cell(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end,
		     bool shared)
{
	struct bucket *bk = bucket_of(p, dev);
	struct cell *c, *blocker;

	if (begin >= end) {
		tfs_err("prison: empty or inverted range [%llu, %llu) on device %u",
			(unsigned long long)begin, (unsigned long long)end, dev);
		return -EINVAL;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->dev = dev;
	c->begin = begin;
	c->end = end;
	c->shared = shared;
	pthread_cond_init(&c->released_cv, NULL);

	pthread_mutex_lock(&p->lock);
	if (bk->tail)
		bk->tail->next = c;
	else
		bk->head = c;
	bk->tail = c;
	while ((blocker = first_blocker(bk, c))) {
		blocker->waiters++;
		while (!blocker->released)
			pthread_cond_wait(&blocker->released_cv, &p->lock);
		if (--blocker->waiters == 0)
			free_cell(blocker);
	}
	c->granted = true;
	pthread_mutex_unlock(&p->lock);
	return 0;
}

static void unlock_cell(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end,
			bool shared)
{
	struct bucket *bk = bucket_of(p, dev);
	struct cell *c;

	pthread_mutex_lock(&p->lock);
	for (c = bk->head; c; c = c->next)
		if (c->granted && c->dev == dev && c->begin == begin && c->end == end &&
		    c->shared == shared)
			break;
	if (!c) {
		pthread_mutex_unlock(&p->lock);
		tfs_err("prison: unlock of a cell not held: device %u [%llu, %llu)", dev,
			(unsigned long long)begin, (unsigned long long)end);
		return;
	}
	unlink_cell(bk, c);
	c->released = true;
	if (c->waiters)
		pthread_cond_broadcast(&c->released_cv);
	else
		free_cell(c);
	pthread_mutex_unlock(&p->lock);
}

int tfs_prison_lock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end)
{
	return lock_cell(p, dev, begin, end, false);
}

void tfs_prison_unlock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end)
{
	unlock_cell(p, dev, begin, end, false);
}

int tfs_prison_lock_shared(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end)
{
	return lock_cell(p, dev, begin, end, true);
}

void tfs_prison_unlock_shared(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end)
{
	unlock_cell(p, dev, begin, end, true);
}
