/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The cache target (cache.h): I/O by mode, migrations, metadata modes.
 * The policy's bookkeeping lives in cache-policy.c.
 *
 * Locks, outermost first: a range lock (prison) on the origin block; then
 * c->lock, which protects everything in struct tfs_cache below it and
 * every call into the metadata.  Device I/O is never done under c->lock,
 * except metadata commits (one completes each promotion and demotion).
 * A resize holds the range lock of every block at once.
 */
#include "cache.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "cache-metadata.h"
#include "cache-policy.h"
#include "core.h"
#include "log.h"
#include "pool.h"
#include "prison.h"
#include "target.h"

#define SECTOR 512u
#define COPY_PIECE (1024u * 1024)
#define COMMIT_INTERVAL_MS 1000
#define WORKER_TICK_MS 100
/* The cache is idle (background writeback may start) after this long without I/O. */
#define IDLE_MS 500
#define NO_CBLOCK UINT32_MAX
#define WB_RETRY_MS 1000
#define MAX_EVENTS 16

enum meta_mode { META_RW, META_RO, META_FAIL };
static const char *const meta_mode_name[] = { "rw", "ro", "fail" };

struct tfs_cache {
	struct tfs_cache_cfg cfg;
	struct tfs_bdev *origin, *cdev, *meta; /* fault wrappers */
	struct tfs_dev *origin_dev;            /* linear over origin: discards, zeroing */
	struct tfs_prison *prison;
	struct tfs_core *core;                 /* suspend and resume: the cache is its one device */
	uint64_t block_size;                   /* bytes */
	uint64_t origin_size;                  /* bytes */
	uint64_t nr_oblocks;                   /* whole blocks of the origin; the tail is uncached */
	uint32_t nr_cblocks;

	pthread_mutex_t lock;
	pthread_cond_t cond;                   /* worker wake-ups, clean progress */
	struct tfs_cmd *cmd;                   /* NULL when the metadata could not be opened */
	enum meta_mode meta_mode;
	bool needs_check;
	bool read_only;                        /* a read-only mount: nothing is ever written */
	char reason[TFS_CACHE_PATH_MAX + 256];
	enum tfs_cache_mode mode;
	enum tfs_cache_policy_kind policy_kind;
	uint64_t migration_threshold;
	struct tfs_cache_policy_state *policy;
	uint64_t *discard;                     /* a bit per origin block */
	bool meta_changed;                     /* uncommitted metadata changes */
	uint64_t read_hits, read_misses, write_hits, write_misses, promotions, demotions;
	uint64_t writebacks;                   /* blocks copied back to the origin */
	int64_t last_io_ms, last_commit_ms;
	bool cleaning;                         /* clean was asked: report when dirty reaches 0 */
	int wb_error;                          /* the last writeback's, 0 once one succeeds */
	int64_t wb_retry_ms;                   /* after a failed writeback: not before this */
	struct tfs_cache_event events[MAX_EVENTS];
	unsigned nr_events;
	bool stop;
	bool suspended;                        /* the worker does nothing meanwhile */
	bool migrating;                        /* the worker is in a migration (lock dropped) */
	pthread_t worker;
	bool worker_started;
	uint8_t *copy_buf;                     /* the worker's: promotions, blocks > WB_SLOT_BYTES */
	struct wb_pool *wb;                    /* the writeback writer, from the first writeback */

	void (*notify)(void *arg);
	void *notify_arg;
};

struct cache_handle {
	struct tfs_dev dev; /* first */
	struct tfs_cache *c;
	bool read_only, status_only;
};

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- events and metadata modes (c->lock held) ---- */

static void add_event(struct tfs_cache *c, bool mode_change, const char *old_mode,
		      const char *new_mode, const char *detail)
{
	struct tfs_cache_event *e;

	if (c->nr_events == MAX_EVENTS)
		memmove(c->events, c->events + 1, sizeof(*e) * --c->nr_events);
	e = &c->events[c->nr_events++];
	memset(e, 0, sizeof(*e));
	e->mode_change = mode_change;
	snprintf(e->old_mode, sizeof(e->old_mode), "%s", old_mode);
	snprintf(e->new_mode, sizeof(e->new_mode), "%s", new_mode);
	snprintf(e->detail, sizeof(e->detail), "%s", detail);
}

static void set_meta_mode(struct tfs_cache *c, enum meta_mode m, const char *reason)
{
	char detail[sizeof(c->events[0].detail)]; /* as the event keeps it */

	if (m == c->meta_mode)
		return;
	snprintf(detail, sizeof(detail), "cache %.64s: %s -> %s: %.160s", c->cfg.name,
		 meta_mode_name[c->meta_mode], meta_mode_name[m], reason);
	tfs_err("%s", detail);
	add_event(c, true, meta_mode_name[c->meta_mode], meta_mode_name[m], detail);
	snprintf(c->reason, sizeof(c->reason), "%s", reason);
	c->meta_mode = m;
}

/*
 * A metadata operation failed: nothing more may change the metadata.  The
 * transaction is dropped and needs_check written, so the next start is
 * refused until a checker looked; if even that fails, all I/O fails.
 */
static void meta_failed(struct tfs_cache *c, const char *what, int err)
{
	char reason[200];

	if (c->meta_mode != META_RW)
		return;
	snprintf(reason, sizeof(reason), "metadata %s failed: %s", what, strerror(-err));
	tfs_cmd_abort(c->cmd);
	if (tfs_cmd_set_needs_check(c->cmd, true) < 0) {
		set_meta_mode(c, META_FAIL, reason);
	} else {
		c->needs_check = true;
		set_meta_mode(c, META_RO, reason);
	}
	c->meta_changed = false;
}

static int commit_locked(struct tfs_cache *c, bool clean_shutdown)
{
	struct tfs_cache_stats st = {
		.read_hits = (uint32_t)c->read_hits, .read_misses = (uint32_t)c->read_misses,
		.write_hits = (uint32_t)c->write_hits, .write_misses = (uint32_t)c->write_misses,
	};
	int r;

	if (c->meta_mode != META_RW || c->read_only)
		return c->meta_mode == META_FAIL ? -EIO : 0;
	r = tfs_cmd_set_stats(c->cmd, &st);
	if (r == 0)
		r = tfs_cmd_commit(c->cmd, clean_shutdown);
	if (r < 0) {
		meta_failed(c, "commit", r);
		return c->meta_mode == META_FAIL ? -EIO : 0;
	}
	c->meta_changed = false;
	c->last_commit_ms = now_ms();
	return 0;
}

static void notify(struct tfs_cache *c)
{
	if (c->notify && c->nr_events)
		c->notify(c->notify_arg);
}

/* ---- discard bits ---- */

static bool discarded(const struct tfs_cache *c, uint64_t ob)
{
	return c->discard[ob / 64] >> (ob % 64) & 1;
}

static void set_discarded(struct tfs_cache *c, uint64_t ob, bool on)
{
	int r;

	if (discarded(c, ob) == on)
		return;
	if (on)
		c->discard[ob / 64] |= 1ull << (ob % 64);
	else
		c->discard[ob / 64] &= ~(1ull << (ob % 64));
	if (c->meta_mode != META_RW)
		return;
	r = tfs_cmd_set_discard(c->cmd, ob, on);
	if (r < 0)
		meta_failed(c, "discard bit", r);
	else
		c->meta_changed = true;
}

/* ---- copying between the devices (the worker, no lock held) ---- */

static int copy_block(struct tfs_cache *c, struct tfs_bdev *from, uint64_t from_off,
		      struct tfs_bdev *to, uint64_t to_off)
{
	for (uint64_t done = 0; done < c->block_size;) {
		size_t n = c->block_size - done < COPY_PIECE ? (size_t)(c->block_size - done)
							     : COPY_PIECE;
		int r = tfs_bdev_read(from, c->copy_buf, n, from_off + done);

		if (r == 0)
			r = tfs_bdev_write(to, c->copy_buf, n, to_off + done);
		if (r < 0)
			return r;
		done += n;
	}
	return tfs_bdev_flush(to);
}

static uint64_t cache_off(const struct tfs_cache *c, uint32_t cb)
{
	return (uint64_t)cb * c->block_size;
}

static void cell_lock(struct tfs_cache *c, uint64_t ob, bool shared)
{
	/* -ENOMEM only; then go on unlocked rather than fail the I/O (as rare as malloc failing). */
	if (shared)
		tfs_prison_lock_shared(c->prison, 0, ob, ob + 1);
	else
		tfs_prison_lock(c->prison, 0, ob, ob + 1);
}

static void cell_unlock(struct tfs_cache *c, uint64_t ob, bool shared)
{
	if (shared)
		tfs_prison_unlock_shared(c->prison, 0, ob, ob + 1);
	else
		tfs_prison_unlock(c->prison, 0, ob, ob + 1);
}

/* ---- migrations ---- */

/*
 * Drop cb's mapping and commit (c->lock held).  Only a committed removal
 * is forgotten in memory: were the commit to fail, the mapping would come
 * back at the next start, dirty, and its old copy written back over
 * whatever reached the origin since; kept, writes keep updating it.
 * -EROFS / -EIO when the metadata mode is (or became) ro / fail.
 */
static int unmap_locked(struct tfs_cache *c, uint32_t cb)
{
	int r;

	if (c->meta_mode != META_RW)
		return c->meta_mode == META_FAIL ? -EIO : -EROFS;
	r = tfs_cmd_remove(c->cmd, cb);
	if (r < 0)
		meta_failed(c, "remove", r);
	else
		c->meta_changed = true;
	if (r == 0)
		commit_locked(c, false);
	if (c->meta_mode != META_RW)
		return c->meta_mode == META_FAIL ? -EIO : -EROFS;
	tfs_cache_policy_remove(c->policy, cb);
	return 0;
}

static bool migrations_allowed(const struct tfs_cache *c)
{
	/* Promotions go one at a time, writebacks a batch within the threshold. */
	return c->meta_mode == META_RW && !c->read_only &&
	       c->migration_threshold >= c->cfg.block_sectors;
}

/* Demote the coldest clean block; false when there is none. */
static bool demote_one(struct tfs_cache *c, uint32_t hotter_than)
{
	uint32_t cb;
	uint64_t ob;
	bool done = false;

	pthread_mutex_lock(&c->lock);
	cb = tfs_cache_policy_coldest_clean(c->policy, hotter_than);
	ob = tfs_cache_policy_oblock(c->policy, cb);
	pthread_mutex_unlock(&c->lock);
	if (cb == NO_CBLOCK)
		return false;
	cell_lock(c, ob, false);
	pthread_mutex_lock(&c->lock);
	if (migrations_allowed(c) && tfs_cache_policy_oblock(c->policy, cb) == ob &&
	    !tfs_cache_policy_dirty(c->policy, cb)) {
		done = unmap_locked(c, cb) == 0;
		c->demotions += done;
	}
	pthread_mutex_unlock(&c->lock);
	cell_unlock(c, ob, false);
	return done;
}

static void promote(struct tfs_cache *c, uint64_t ob)
{
	uint32_t cb, hits, nr_free;
	int r;

	pthread_mutex_lock(&c->lock);
	hits = tfs_cache_policy_candidate_hits(c->policy, ob);
	nr_free = tfs_cache_policy_nr_free(c->policy);
	r = tfs_cache_policy_lookup(c->policy, ob) != NO_CBLOCK || !migrations_allowed(c);
	pthread_mutex_unlock(&c->lock);
	if (r || (!nr_free && !demote_one(c, hits)))
		return;
	cell_lock(c, ob, false);
	pthread_mutex_lock(&c->lock);
	cb = NO_CBLOCK;
	/* A resize may have come in between: the block is still within the origin? */
	if (migrations_allowed(c) && ob < c->nr_oblocks &&
	    tfs_cache_policy_lookup(c->policy, ob) == NO_CBLOCK && !discarded(c, ob))
		cb = tfs_cache_policy_take_free(c->policy);
	pthread_mutex_unlock(&c->lock);
	if (cb == NO_CBLOCK)
		goto out;
	r = copy_block(c, c->origin, ob * c->block_size, c->cdev, cache_off(c, cb));
	pthread_mutex_lock(&c->lock);
	if (r < 0) {
		tfs_warn("cache %s: promotion of block %" PRIu64 " failed: %s", c->cfg.name, ob,
			 strerror(-r));
		tfs_cache_policy_put_free(c->policy, cb);
	} else if (c->meta_mode != META_RW) {
		tfs_cache_policy_put_free(c->policy, cb);
	} else if ((r = tfs_cmd_insert(c->cmd, cb, ob)) < 0) {
		meta_failed(c, "insert", r);
		tfs_cache_policy_put_free(c->policy, cb);
	} else {
		tfs_cache_policy_insert(c->policy, cb, ob, false, hits);
		c->meta_changed = true;
		/* Committed before any write may reach the block through this mapping. */
		if (commit_locked(c, false) == 0 && c->meta_mode == META_RW)
			c->promotions++;
	}
	pthread_mutex_unlock(&c->lock);
out:
	cell_unlock(c, ob, false);
}

/*
 * Cleaning writes back a group at a time: the dirty blocks of a window of
 * origin blocks (at most WB_GROUP_MAX, in origin order from the policy's
 * cursor, within a window of twice that many origin blocks), under one
 * shared range lock over the window (one cell per request is what keeps
 * the prison deadlock-free).  The group goes out in batches of half the
 * migration_threshold, through two buffers: while one batch is written to
 * the origin, the next one is read from the cache device, so the cache's
 * reads and the origin's writes overlap with no more than the threshold in
 * flight.  Blocks adjacent on the origin go out as one write, one writer at
 * a time in origin order (a spinning or thin origin sees sequential
 * writes).  Then one flush of the origin makes the whole group durable,
 * and only then are its blocks marked clean and the metadata committed: a
 * crash at any point leaves no block clean on disk whose origin copy is
 * not.
 *
 * A batch's cache reads go out together from the worker
 * (tfs_bdev_read_batch: native AIO on a direct device, one read per run of
 * consecutive cache blocks): a cache device that shares its disk with the
 * origin gives the random reads their share of the disk only at a queue
 * depth of several (a sequential writer beside 1 reader left the reader
 * 180 MiB/s, beside 8 readers 900), and one thread submitting them all
 * needs no CPU hand-over per read, which a busy machine makes slow.  The
 * writes go to one helper thread (struct wb_pool), which lives as long as
 * the cache, started at its first writeback; the worker runs a queued
 * write itself while it waits.
 */
#define WB_THREADS 1u
#define WB_SLOT_BYTES (4u * 1024 * 1024)
#define WB_GROUP_BATCHES 32u
/* While the cache serves I/O: writes to the window wait for its group. */
#define WB_GROUP_BATCHES_BUSY 4u
#define WB_GROUP_MAX 1024u
/* The batch written while the next one is read. */
#define WB_QUEUE 2u

struct wb_slot {
	uint32_t first, n;  /* the batch: group blocks first..first+n-1 */
	uint8_t *buf;       /* WB_SLOT_BYTES, block i of the batch at i * block_size */
	unsigned pending;   /* jobs queued or running (pool lock) */
	int r;              /* the first error of its jobs (pool lock) */
	/* Its cache reads, a run of consecutive cache blocks each (the worker's). */
	struct tfs_bdev_req reqs[WB_SLOT_BYTES / (32u * 1024)];
};

struct wb_pool {
	pthread_mutex_t lock;
	pthread_cond_t work, done;
	struct wb_slot *queue[WB_QUEUE]; /* batches to write */
	unsigned head, len;
	bool stop;
	pthread_t threads[WB_THREADS];
	unsigned nr_threads;
	struct wb_slot slot[2];
	/* The group being written back (the worker's; read by the writes). */
	uint32_t n;
	uint32_t cb[WB_GROUP_MAX];
	uint64_t ob[WB_GROUP_MAX];
};

/* Blocks per batch: half the threshold, so that two batches fit (1 when one block is all). */
static uint32_t wb_batch_max(const struct tfs_cache *c)
{
	uint64_t n = c->migration_threshold / c->cfg.block_sectors / 2;

	if (n > WB_SLOT_BYTES / c->block_size)
		n = WB_SLOT_BYTES / c->block_size;
	return n ? (uint32_t)n : 1;
}

/* Whether a batch may be read while the one before it is written. */
static bool wb_pipelined(const struct tfs_cache *c)
{
	return c->migration_threshold >= 2 * c->cfg.block_sectors;
}

/* c->lock held: the dirty blocks of the window [first, first + span). */
static void wb_gather(struct tfs_cache *c, struct wb_pool *w, uint64_t first, uint32_t max,
		      uint64_t span)
{
	w->n = 0;
	for (uint64_t ob = first; ob < first + span && ob < c->nr_oblocks && w->n < max; ob++) {
		uint32_t cb = tfs_cache_policy_lookup(c->policy, ob);

		if (cb == NO_CBLOCK || !tfs_cache_policy_dirty(c->policy, cb))
			continue;
		w->cb[w->n] = cb;
		w->ob[w->n++] = ob;
	}
}

/* Read the slot's batch from the cache device, consecutive cache blocks in one read. */
static int wb_read(struct tfs_cache *c, struct wb_pool *w, struct wb_slot *s)
{
	uint64_t bs = c->block_size;
	uint32_t end = s->first + s->n;
	unsigned nr = 0;

	for (uint32_t k = s->first, l; k < end; k = l) {
		for (l = k + 1; l < end && w->cb[l] == w->cb[l - 1] + 1; l++)
			;
		s->reqs[nr++] = (struct tfs_bdev_req){ .buf = s->buf + (k - s->first) * bs,
						       .len = (size_t)((l - k) * bs),
						       .off = cache_off(c, w->cb[k]) };
	}
	return tfs_bdev_read_batch(c->cdev, s->reqs, nr);
}

/* Write the slot's batch to the origin, consecutive origin blocks in one write. */
static int wb_write(struct tfs_cache *c, struct wb_pool *w, const struct wb_slot *s)
{
	uint64_t bs = c->block_size;
	uint32_t end = s->first + s->n;
	int r = 0;

	for (uint32_t k = s->first, l; k < end && r == 0; k = l) {
		for (l = k + 1; l < end && w->ob[l] == w->ob[l - 1] + 1; l++)
			;
		r = tfs_bdev_write(c->origin, s->buf + (k - s->first) * bs,
				   (size_t)((l - k) * bs), w->ob[k] * bs);
	}
	return r;
}

/* Pool lock held: write the batch at the queue's head (the lock is dropped meanwhile). */
static void wb_run_one(struct tfs_cache *c, struct wb_pool *w)
{
	struct wb_slot *s = w->queue[w->head];
	int r;

	w->head = (w->head + 1) % WB_QUEUE;
	w->len--;
	pthread_mutex_unlock(&w->lock);
	r = wb_write(c, w, s);
	pthread_mutex_lock(&w->lock);
	if (r < 0 && !s->r)
		s->r = r;
	if (!--s->pending)
		pthread_cond_broadcast(&w->done);
}

static void *wb_helper(void *arg)
{
	struct tfs_cache *c = arg;
	struct wb_pool *w = c->wb;

	pthread_mutex_lock(&w->lock);
	while (!w->stop) {
		if (w->len)
			wb_run_one(c, w);
		else
			pthread_cond_wait(&w->work, &w->lock);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

/* Queue slot s's write (the queue has room: see WB_QUEUE). */
static void wb_start_write(struct wb_pool *w, struct wb_slot *s)
{
	pthread_mutex_lock(&w->lock);
	w->queue[(w->head + w->len++) % WB_QUEUE] = s;
	s->pending++;
	s->r = 0;
	pthread_cond_signal(&w->work);
	pthread_mutex_unlock(&w->lock);
}

/* Wait for slot s's write, running queued ones meanwhile; its error. */
static int wb_wait(struct tfs_cache *c, struct wb_pool *w, struct wb_slot *s)
{
	int r;

	pthread_mutex_lock(&w->lock);
	while (s->pending) {
		if (w->len)
			wb_run_one(c, w);
		else
			pthread_cond_wait(&w->done, &w->lock);
	}
	r = s->r;
	pthread_mutex_unlock(&w->lock);
	return r;
}

/* The helper and buffers, at the first writeback; -ENOMEM (no thread is fine). */
static int wb_pool_start(struct tfs_cache *c)
{
	struct wb_pool *w;

	if (c->wb)
		return 0;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	for (int i = 0; i < 2; i++) {
		if (posix_memalign((void **)&w->slot[i].buf, 4096, WB_SLOT_BYTES)) {
			free(w->slot[0].buf);
			free(w);
			return -ENOMEM;
		}
	}
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->work, NULL);
	pthread_cond_init(&w->done, NULL);
	c->wb = w;
	/* No helper at all still works: the worker runs every write in wb_wait. */
	while (w->nr_threads < WB_THREADS &&
	       pthread_create(&w->threads[w->nr_threads], NULL, wb_helper, c) == 0)
		w->nr_threads++;
	return 0;
}

static void wb_pool_stop(struct tfs_cache *c)
{
	struct wb_pool *w = c->wb;

	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_cond_broadcast(&w->work);
	pthread_mutex_unlock(&w->lock);
	for (unsigned i = 0; i < w->nr_threads; i++)
		pthread_join(w->threads[i], NULL);
	pthread_cond_destroy(&w->done);
	pthread_cond_destroy(&w->work);
	pthread_mutex_destroy(&w->lock);
	free(w->slot[0].buf);
	free(w->slot[1].buf);
	free(w);
	c->wb = NULL;
}

/* Blocks larger than a buffer: one at a time, a piece at a time, through copy_buf. */
static int wb_copy_large(struct tfs_cache *c, const struct wb_pool *w)
{
	int r = 0;

	for (uint32_t i = 0; i < w->n && r == 0; i++)
		for (uint64_t done = 0; done < c->block_size && r == 0; done += COPY_PIECE) {
			size_t n = c->block_size - done < COPY_PIECE
					   ? (size_t)(c->block_size - done) : COPY_PIECE;

			r = tfs_bdev_read(c->cdev, c->copy_buf, n, cache_off(c, w->cb[i]) + done);
			if (r == 0)
				r = tfs_bdev_write(c->origin, c->copy_buf, n,
						   w->ob[i] * c->block_size + done);
		}
	return r;
}

/*
 * Copy the group to the origin (not yet flushed).  Batch k + 1 is read
 * while batch k is written; a batch's write starts once the one before it
 * completed, so the origin sees one write at a time, in origin order.
 */
static int wb_copy_group(struct tfs_cache *c, struct wb_pool *w, uint32_t per, bool pipelined)
{
	struct wb_slot *writing = NULL;
	unsigned k = 0;
	int r = 0, wr;

	if (c->block_size > WB_SLOT_BYTES)
		return wb_copy_large(c, w);
	for (uint32_t i = 0; i < w->n && r == 0; i += per) {
		struct wb_slot *s = &w->slot[k];

		s->first = i;
		s->n = i + per < w->n ? per : w->n - i;
		r = wb_read(c, w, s);
		if (writing) {
			wr = wb_wait(c, w, writing);
			r = r ? r : wr;
		}
		if (r < 0)
			break;
		wb_start_write(w, s);
		writing = s;
		if (pipelined) {
			k ^= 1;
		} else {
			r = wb_wait(c, w, s);
			writing = NULL;
		}
	}
	if (writing) {
		wr = wb_wait(c, w, writing);
		r = r ? r : wr;
	}
	return r;
}

/*
 * Write back one group of dirty blocks (origin order); false when none is
 * dirty.  long_group: cleaning, or the cache is idle.
 */
static bool writeback_batch(struct tfs_cache *c, bool long_group)
{
	struct wb_pool *w;
	uint32_t cb, per = 1, max = 0;
	uint64_t first, span = 0;
	bool pipelined = false;
	int r;

	pthread_mutex_lock(&c->lock);
	cb = tfs_cache_policy_next_dirty(c->policy);
	first = tfs_cache_policy_oblock(c->policy, cb);
	if (cb != NO_CBLOCK) {
		per = wb_batch_max(c);
		pipelined = wb_pipelined(c);
		max = per * (long_group ? WB_GROUP_BATCHES : WB_GROUP_BATCHES_BUSY);
		if (max > WB_GROUP_MAX)
			max = WB_GROUP_MAX;
		/* A mapped block lies within the origin: the window is never empty. */
		span = 2 * (uint64_t)max;
		if (first + span > c->nr_oblocks)
			span = c->nr_oblocks - first;
	}
	pthread_mutex_unlock(&c->lock);
	if (cb == NO_CBLOCK)
		return false;
	r = wb_pool_start(c);
	if (r < 0)
		goto failed;
	w = c->wb;
	/* Shared: reads of the window go on; writes to it wait until the group is clean. */
	tfs_prison_lock_shared(c->prison, 0, first, first + span);
	pthread_mutex_lock(&c->lock);
	w->n = 0;
	if (migrations_allowed(c) && first < c->nr_oblocks)
		wb_gather(c, w, first, max, span);
	pthread_mutex_unlock(&c->lock);
	r = w->n ? wb_copy_group(c, w, per, pipelined) : 0;
	if (r == 0 && w->n)
		r = tfs_bdev_flush(c->origin);
	pthread_mutex_lock(&c->lock);
	if (r == 0 && w->n && c->meta_mode == META_RW) {
		/* The range lock kept every write out: each block is still what was copied. */
		c->wb_error = 0;
		for (uint32_t i = 0; i < w->n && c->meta_mode == META_RW; i++) {
			r = tfs_cmd_set_dirty(c->cmd, w->cb[i], false);
			if (r < 0) {
				meta_failed(c, "set dirty", r);
				r = 0;
				break;
			}
			tfs_cache_policy_set_dirty(c->policy, w->cb[i], false);
			c->meta_changed = true;
			c->writebacks++;
		}
		/* Clean on disk now, so that a crash does not write the group back again. */
		commit_locked(c, false);
	}
	pthread_mutex_unlock(&c->lock);
	tfs_prison_unlock_shared(c->prison, 0, first, first + span);
	if (r == 0)
		return true;
failed:
	pthread_mutex_lock(&c->lock);
	/* Once per run of failures, and a pause: a failing origin is not hammered. */
	if (!c->wb_error)
		tfs_warn("cache %s: writeback of %" PRIu32 " block(s) from origin block %" PRIu64
			 " failed: %s", c->cfg.name, c->wb ? c->wb->n : 1, first, strerror(-r));
	c->wb_error = r;
	c->wb_retry_ms = now_ms() + WB_RETRY_MS;
	pthread_cond_broadcast(&c->cond); /* clean --wait gives up */
	pthread_mutex_unlock(&c->lock);
	return false;
}

static void *worker(void *arg)
{
	struct tfs_cache *c = arg;

	pthread_mutex_lock(&c->lock);
	while (!c->stop) {
		int64_t now = now_ms();
		bool busy = false, cleaner = c->policy_kind == TFS_CACHE_CLEANER;
		uint64_t ob;

		if (c->suspended) {
			pthread_cond_wait(&c->cond, &c->lock);
			continue;
		}
		if (c->meta_changed && now - c->last_commit_ms >= COMMIT_INTERVAL_MS)
			commit_locked(c, false);
		if (migrations_allowed(c)) {
			bool idle = now - c->last_io_ms >= IDLE_MS;

			c->migrating = true;
			bool want_wb = tfs_cache_policy_nr_dirty(c->policy) && now >= c->wb_retry_ms &&
				       (cleaner || idle ||
					tfs_cache_policy_nr_dirty(c->policy) * 4 > c->nr_cblocks * 3);

			pthread_mutex_unlock(&c->lock);
			if (want_wb)
				busy = writeback_batch(c, cleaner || idle);
			pthread_mutex_lock(&c->lock);
			if (!cleaner && c->mode != TFS_CACHE_PASSTHROUGH &&
			    tfs_cache_policy_pop_candidate(c->policy, &ob)) {
				pthread_mutex_unlock(&c->lock);
				promote(c, ob);
				pthread_mutex_lock(&c->lock);
				busy = true;
			}
			c->migrating = false;
			pthread_cond_broadcast(&c->cond); /* a suspend may wait for this */
		}
		if (c->cleaning && !tfs_cache_policy_nr_dirty(c->policy)) {
			char detail[256];

			c->cleaning = false;
			snprintf(detail, sizeof(detail),
				 "cache %.64s: clean: no dirty blocks, the origin holds all the data",
				 c->cfg.name);
			add_event(c, false, "", "", detail);
			pthread_cond_broadcast(&c->cond);
		}
		if (c->nr_events) {
			pthread_mutex_unlock(&c->lock);
			notify(c);
			pthread_mutex_lock(&c->lock);
		}
		if (!busy && !c->stop) {
			struct timespec ts;

			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += WORKER_TICK_MS * 1000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&c->cond, &c->lock, &ts);
		}
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* ---- I/O ---- */

static struct cache_handle *handle_of(struct tfs_dev *dev)
{
	return (struct cache_handle *)dev;
}

static int may_io(const struct cache_handle *h, bool write)
{
	if (h->status_only)
		return -EBADF;
	if (write && h->read_only)
		return -EROFS;
	return 0;
}

/* Where block ob is (c->lock held): its cache block, or NO_CBLOCK; counts the access. */
static uint32_t lookup_locked(struct tfs_cache *c, uint64_t ob, bool write)
{
	uint32_t cb = tfs_cache_policy_lookup(c->policy, ob);
	bool promote_ok = c->mode != TFS_CACHE_PASSTHROUGH && c->policy_kind == TFS_CACHE_SMQ &&
			  migrations_allowed(c);

	c->last_io_ms = now_ms();
	if (!write && c->mode == TFS_CACHE_PASSTHROUGH)
		cb = NO_CBLOCK; /* every read from the origin (its cached copies are equal) */
	if (cb != NO_CBLOCK) {
		if (write)
			c->write_hits++;
		else
			c->read_hits++;
	} else if (write) {
		c->write_misses++;
	} else {
		c->read_misses++;
	}
	if (tfs_cache_policy_access(c->policy, ob, cb, promote_ok))
		pthread_cond_signal(&c->cond);
	return cb;
}

static int read_piece(struct tfs_cache *c, uint8_t *buf, size_t len, uint64_t off)
{
	uint64_t ob = off / c->block_size;
	uint32_t cb;
	bool zero;
	int r;

	cell_lock(c, ob, true);
	pthread_mutex_lock(&c->lock);
	if (ob >= c->nr_oblocks) {
		/* The origin's partial last block is never cached. */
		pthread_mutex_unlock(&c->lock);
		r = tfs_bdev_read(c->origin, buf, len, off);
		goto out;
	}
	cb = lookup_locked(c, ob, false);
	zero = cb == NO_CBLOCK && discarded(c, ob);
	pthread_mutex_unlock(&c->lock);
	if (zero) {
		memset(buf, 0, len);
		r = 0;
	} else if (cb != NO_CBLOCK) {
		r = tfs_bdev_read(c->cdev, buf, len, cache_off(c, cb) + off % c->block_size);
		/* A clean block's copy is also on the origin. */
		if (r < 0) {
			pthread_mutex_lock(&c->lock);
			zero = !tfs_cache_policy_dirty(c->policy, cb);
			pthread_mutex_unlock(&c->lock);
			if (zero)
				r = tfs_bdev_read(c->origin, buf, len, off);
		}
	} else {
		r = tfs_bdev_read(c->origin, buf, len, off);
	}
out:
	cell_unlock(c, ob, true);
	return r;
}

/*
 * Write buf at inner offset in of the block at dev offset start, and zeros
 * over the rest of that block: a discarded block's old content must not
 * come back.
 */
static int write_zero_filled(struct tfs_cache *c, struct tfs_bdev *dev, uint64_t start,
			     const uint8_t *buf, size_t len, uint64_t in)
{
	size_t zlen = c->block_size < COPY_PIECE ? (size_t)c->block_size : COPY_PIECE;
	uint8_t *z = len == c->block_size ? NULL : calloc(1, zlen);
	uint64_t spans[2][2] = { { 0, in }, { in + len, c->block_size } };
	int r = len == c->block_size || z ? 0 : -ENOMEM;

	for (int i = 0; i < 2 && r == 0; i++)
		for (uint64_t o = spans[i][0]; o < spans[i][1] && r == 0; o += zlen) {
			size_t n = spans[i][1] - o < zlen ? (size_t)(spans[i][1] - o) : zlen;

			r = tfs_bdev_write(dev, z, n, start + o);
		}
	free(z);
	return r ? r : tfs_bdev_write(dev, buf, len, start + in);
}

/*
 * Writeback, the first write to a discarded block: the block goes to a free
 * cache block without a copy from the origin (there is nothing to copy),
 * dirty.  -EAGAIN when no block is free or migrations are off: then the
 * caller writes to the origin.  The range lock on ob is held.
 */
static int promote_discarded(struct tfs_cache *c, uint64_t ob, const uint8_t *buf, size_t len,
			     uint64_t off)
{
	uint32_t cb = NO_CBLOCK;
	int r;

	pthread_mutex_lock(&c->lock);
	if (migrations_allowed(c) && c->policy_kind == TFS_CACHE_SMQ)
		cb = tfs_cache_policy_take_free(c->policy);
	pthread_mutex_unlock(&c->lock);
	if (cb == NO_CBLOCK)
		return -EAGAIN;
	r = write_zero_filled(c, c->cdev, cache_off(c, cb), buf, len, off % c->block_size);
	/* The data is durable before a committed mapping can point at it. */
	if (r == 0)
		r = tfs_bdev_flush(c->cdev);
	pthread_mutex_lock(&c->lock);
	if (r == 0 && c->meta_mode != META_RW)
		r = -EAGAIN;
	if (r == 0 && ((r = tfs_cmd_insert(c->cmd, cb, ob)) < 0 ||
		       (r = tfs_cmd_set_dirty(c->cmd, cb, true)) < 0)) {
		meta_failed(c, "insert", r);
		r = -EAGAIN; /* the origin takes it, as in ro mode */
	}
	if (r == 0) {
		tfs_cache_policy_insert(c->policy, cb, ob, true, 1);
		set_discarded(c, ob, false);
		c->meta_changed = true;
		r = commit_locked(c, false);
		if (c->meta_mode == META_RW) {
			c->promotions++;
		} else {
			/* Not committed: the origin takes the write (zeros around it) instead. */
			tfs_cache_policy_remove(c->policy, cb);
			c->discard[ob / 64] |= 1ull << (ob % 64);
			r = c->meta_mode == META_FAIL ? -EIO : -EAGAIN;
		}
	} else {
		tfs_cache_policy_put_free(c->policy, cb);
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

/*
 * The origin has the new data but the cache device failed the copy (or the
 * origin failed after part of it): the cached copy may be stale and must
 * go, or nothing may be served any more.  The range lock on ob is held.
 */
static int drop_stale_copy(struct tfs_cache *c, uint32_t cb, uint64_t ob, int err)
{
	int r;

	pthread_mutex_lock(&c->lock);
	r = unmap_locked(c, cb);
	if (r < 0)
		set_meta_mode(c, META_FAIL, "a cached copy could not be updated nor dropped");
	pthread_mutex_unlock(&c->lock);
	notify(c);
	tfs_warn("cache %s: block %" PRIu64 ": %s; %s", c->cfg.name, ob, strerror(-err),
		 r == 0 ? "its cached copy was dropped" : "the cache fails all I/O now");
	return err;
}

static int write_piece(struct tfs_cache *c, const uint8_t *buf, size_t len, uint64_t off)
{
	uint64_t ob = off / c->block_size, coff;
	enum tfs_cache_mode mode;
	bool was_discarded, dirty, rw;
	uint32_t cb;
	int r;

	cell_lock(c, ob, false);
	pthread_mutex_lock(&c->lock);
	if (ob >= c->nr_oblocks) {
		pthread_mutex_unlock(&c->lock);
		r = tfs_bdev_write(c->origin, buf, len, off);
		goto out;
	}
	cb = lookup_locked(c, ob, true);
	mode = c->mode;
	rw = c->meta_mode == META_RW;
	was_discarded = cb == NO_CBLOCK && discarded(c, ob);
	dirty = cb != NO_CBLOCK && tfs_cache_policy_dirty(c->policy, cb);
	/* Passthrough: the stale copy goes (durably) before the origin changes. */
	if (cb != NO_CBLOCK && mode == TFS_CACHE_PASSTHROUGH && rw && unmap_locked(c, cb) == 0) {
		pthread_mutex_unlock(&c->lock);
		r = tfs_bdev_write(c->origin, buf, len, off);
		goto out;
	}
	if (c->meta_mode == META_FAIL) {
		pthread_mutex_unlock(&c->lock);
		r = -EIO;
		goto out;
	}
	rw = c->meta_mode == META_RW;
	pthread_mutex_unlock(&c->lock);

	if (cb == NO_CBLOCK) {
		r = -EAGAIN;
		if (was_discarded && mode == TFS_CACHE_WRITEBACK)
			r = promote_discarded(c, ob, buf, len, off);
		if (r != -EAGAIN)
			goto out;
		r = was_discarded ? write_zero_filled(c, c->origin, ob * c->block_size, buf, len,
						      off % c->block_size)
				  : tfs_bdev_write(c->origin, buf, len, off);
		if (r == 0 && was_discarded) {
			pthread_mutex_lock(&c->lock);
			set_discarded(c, ob, false);
			pthread_mutex_unlock(&c->lock);
		}
		goto out;
	}
	coff = cache_off(c, cb) + off % c->block_size;
	if (mode == TFS_CACHE_WRITEBACK && (rw || dirty)) {
		r = tfs_bdev_write(c->cdev, buf, len, coff);
		/* A clean copy the failed write may have torn must not be served. */
		if (r < 0 && !dirty)
			r = drop_stale_copy(c, cb, ob, r);
		if (r == 0 && !dirty) {
			pthread_mutex_lock(&c->lock);
			if (c->meta_mode == META_RW) {
				r = tfs_cmd_set_dirty(c->cmd, cb, true);
				if (r < 0)
					meta_failed(c, "set dirty", r);
				else
					c->meta_changed = true;
			}
			/*
			 * Dirty in memory whatever happened: a failed metadata
			 * write left an unclean shutdown behind, which makes
			 * every block dirty at the next start.
			 */
			tfs_cache_policy_set_dirty(c->policy, cb, true);
			r = c->meta_mode == META_FAIL ? -EIO : 0;
			pthread_mutex_unlock(&c->lock);
		}
		goto out;
	}
	/*
	 * Writethrough (and whatever cannot change metadata): the origin
	 * first, the cache only once that completed, so the cached copy is
	 * never older than the origin's once this returns.
	 */
	r = tfs_bdev_write(c->origin, buf, len, off);
	if (r == 0)
		r = tfs_bdev_write(c->cdev, buf, len, coff);
	if (r < 0 && !dirty)
		r = drop_stale_copy(c, cb, ob, r);
out:
	cell_unlock(c, ob, false);
	return r;
}

typedef int (*piece_fn)(struct tfs_cache *c, uint8_t *buf, size_t len, uint64_t off);

static int split(struct tfs_cache *c, uint8_t *buf, size_t len, uint64_t off, piece_fn fn)
{
	while (len) {
		size_t n = c->block_size - off % c->block_size;
		int r;

		if (n > len)
			n = len;
		r = fn(c, buf, n, off);
		if (r < 0)
			return r;
		buf += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int check_range(const struct tfs_cache *c, uint64_t off, uint64_t len)
{
	if (c->meta_mode == META_FAIL)
		return -EIO;
	return off > c->origin_size || len > c->origin_size - off ? -EINVAL : 0;
}

static int write_piece_cb(struct tfs_cache *c, uint8_t *buf, size_t len, uint64_t off)
{
	return write_piece(c, buf, len, off);
}

static int flush_body(struct tfs_cache *c)
{
	int r = c->meta_mode == META_FAIL ? -EIO : 0;

	/* Data on both devices first, then the metadata that points at it. */
	if (r == 0)
		r = tfs_bdev_flush(c->cdev);
	if (r == 0)
		r = tfs_bdev_flush(c->origin);
	if (r == 0) {
		pthread_mutex_lock(&c->lock);
		if (c->meta_changed)
			r = commit_locked(c, false);
		else if (c->meta_mode == META_FAIL)
			r = -EIO;
		pthread_mutex_unlock(&c->lock);
		notify(c);
	}
	return r;
}

/* Zeros through the write path, a piece at a time. */
static int zero_pieces(struct tfs_cache *c, uint64_t off, uint64_t len)
{
	uint8_t *z = calloc(1, c->block_size < COPY_PIECE ? c->block_size : COPY_PIECE);
	int r = z ? 0 : -ENOMEM;

	while (r == 0 && len) {
		size_t n = c->block_size - off % c->block_size;

		if (n > COPY_PIECE)
			n = COPY_PIECE;
		if (n > len)
			n = len;
		r = write_piece(c, z, n, off);
		off += n;
		len -= n;
	}
	free(z);
	return r;
}

/*
 * Whole blocks: their cached copies go and the discard bit says they read
 * as zeros (passed down to the origin with discard_passdown); partial
 * blocks at either end are zeroed.
 */
static int discard_body(struct tfs_cache *c, uint64_t off, uint64_t len)
{
	uint64_t bs = c->block_size, first, end, head_end;
	int r;

	if (!len)
		return 0;
	if (c->meta_mode != META_RW)
		return zero_pieces(c, off, len);
	first = (off + bs - 1) / bs;
	end = (off + len) / bs;
	if (end > c->nr_oblocks)
		end = c->nr_oblocks;
	if (first >= end)
		return zero_pieces(c, off, len);
	head_end = first * bs;
	r = zero_pieces(c, off, head_end - off);
	for (uint64_t ob = first; r == 0 && ob < end; ob++) {
		uint32_t cb;

		cell_lock(c, ob, false);
		pthread_mutex_lock(&c->lock);
		if (ob >= c->nr_oblocks) { /* the origin shrank meanwhile */
			pthread_mutex_unlock(&c->lock);
			cell_unlock(c, ob, false);
			break;
		}
		cb = tfs_cache_policy_lookup(c->policy, ob);
		if (cb != NO_CBLOCK)
			r = unmap_locked(c, cb);
		if (r == 0)
			set_discarded(c, ob, true);
		pthread_mutex_unlock(&c->lock);
		if (r == 0 && c->cfg.discard_passdown)
			r = tfs_dev_discard(c->origin_dev, ob * bs, bs);
		cell_unlock(c, ob, false);
		/* The metadata failed meanwhile: zeros through the cache instead. */
		if (r == -EROFS)
			r = zero_pieces(c, ob * bs, bs);
	}
	if (r == 0)
		r = zero_pieces(c, end * bs, off + len - end * bs);
	return r;
}

enum io_kind { IO_READ, IO_WRITE, IO_FLUSH, IO_ZERO, IO_DISCARD, IO_PROVISION };

/*
 * Every I/O op goes through here: the handle's rights, the core's
 * admission (a suspended cache holds the request here), the range.
 */
static int run_io(struct tfs_dev *dev, enum io_kind k, uint8_t *buf, uint64_t len, uint64_t off)
{
	struct cache_handle *h = handle_of(dev);
	struct tfs_cache *c = h->c;
	struct tfs_core_io io;
	int r = may_io(h, k != IO_READ && k != IO_FLUSH);

	if (r)
		return r;
	tfs_core_enter(c->core, &io, 0);
	r = k == IO_FLUSH ? 0 : check_range(c, off, len);
	if (r == 0) {
		switch (k) {
		case IO_READ:
			r = split(c, buf, (size_t)len, off, read_piece);
			break;
		case IO_WRITE:
			r = split(c, buf, (size_t)len, off, write_piece_cb);
			break;
		case IO_FLUSH:
			r = flush_body(c);
			break;
		case IO_ZERO:
			r = zero_pieces(c, off, len);
			break;
		case IO_DISCARD:
			r = discard_body(c, off, len);
			break;
		case IO_PROVISION:
			break; /* every byte of the origin exists */
		}
	}
	tfs_core_exit(c->core, &io);
	return r;
}

static int cache_read(struct tfs_dev *dev, void *buf, size_t len, uint64_t off)
{
	return run_io(dev, IO_READ, buf, len, off);
}

static int cache_write(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	return run_io(dev, IO_WRITE, (uint8_t *)buf, len, off);
}

static int cache_flush(struct tfs_dev *dev)
{
	return run_io(dev, IO_FLUSH, NULL, 0, 0);
}

static int cache_zero_range(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	return run_io(dev, IO_ZERO, NULL, len, off);
}

static int cache_discard(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	return run_io(dev, IO_DISCARD, NULL, len, off);
}

static int cache_provision(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	return run_io(dev, IO_PROVISION, NULL, len, off);
}

static int cache_seek(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size,
		      uint64_t *out)
{
	int r = may_io(handle_of(dev), false);

	return r ? r : tfs_dev_seek_all_data(off, whence, size, out);
}

static int cache_get_size(struct tfs_dev *dev, uint64_t *bytes)
{
	*bytes = handle_of(dev)->c->origin_size;
	return 0;
}

static int cache_allocated(struct tfs_dev *dev, uint64_t *bytes)
{
	return cache_get_size(dev, bytes);
}

static void cache_status(struct tfs_dev *dev, struct tfs_status_sink *s)
{
	struct tfs_cache *c = handle_of(dev)->c;
	struct tfs_cmd_info info = { 0 };

	pthread_mutex_lock(&c->lock);
	if (c->cmd && c->meta_mode != META_FAIL)
		tfs_cmd_info(c->cmd, &info);
	tfs_status_flag(s, "suspended", c->suspended);
	tfs_status_text(s, "mode", tfs_cache_mode_name(c->mode));
	tfs_status_text(s, "policy", tfs_cache_policy_name(c->policy_kind));
	tfs_status_text(s, "metadata_mode", meta_mode_name[c->meta_mode]);
	tfs_status_flag(s, "needs_check", c->needs_check);
	tfs_status_flag(s, "read_only", c->read_only);
	tfs_status_text(s, "reason", c->reason);
	tfs_status_u64(s, "block_size", c->block_size);
	tfs_status_u64(s, "migration_threshold", c->migration_threshold);
	tfs_status_flag(s, "discard_passdown", c->cfg.discard_passdown);
	tfs_status_begin(s, "cache_blocks");
	tfs_status_u64(s, "used", c->nr_cblocks - tfs_cache_policy_nr_free(c->policy));
	tfs_status_u64(s, "total", c->nr_cblocks);
	tfs_status_end(s);
	tfs_status_begin(s, "metadata_blocks");
	tfs_status_u64(s, "used", info.meta_total - info.meta_free);
	tfs_status_u64(s, "total", info.meta_total);
	tfs_status_end(s);
	tfs_status_u64(s, "read_hits", c->read_hits);
	tfs_status_u64(s, "read_misses", c->read_misses);
	tfs_status_u64(s, "write_hits", c->write_hits);
	tfs_status_u64(s, "write_misses", c->write_misses);
	tfs_status_u64(s, "demotions", c->demotions);
	tfs_status_u64(s, "promotions", c->promotions);
	tfs_status_u64(s, "dirty", tfs_cache_policy_nr_dirty(c->policy));
	tfs_status_u64(s, "writebacks", c->writebacks);
	pthread_mutex_unlock(&c->lock);
	/* Per device: what reached it (stalled operations included), for tests and people. */
	tfs_status_begin(s, "io");
	for (int i = 0; i < 3; i++) {
		static const char *const names[] = { "origin", "cache", "metadata" };
		struct tfs_bdev_io_counts io;

		tfs_bdev_fault_counts(tfs_cache_bdev(c, names[i]), &io);
		tfs_status_begin(s, names[i]);
		tfs_status_u64(s, "reads", io.reads);
		tfs_status_u64(s, "writes", io.writes);
		tfs_status_u64(s, "flushes", io.flushes);
		tfs_status_u64(s, "read_bytes", io.read_bytes);
		tfs_status_u64(s, "write_bytes", io.write_bytes);
		tfs_status_end(s);
	}
	tfs_status_end(s);
}

static void cache_close_handle(struct tfs_dev *dev)
{
	free(handle_of(dev));
}

static const struct tfs_dev_ops cache_ops = {
	.kind = "cache",
	.read = cache_read,
	.write = cache_write,
	.flush = cache_flush,
	.discard = cache_discard,
	.zero_range = cache_zero_range,
	.provision = cache_provision,
	.seek = cache_seek,
	.get_size = cache_get_size,
	.truncate = tfs_dev_truncate_fixed,
	.allocated = cache_allocated,
	.status = cache_status,
	.close = cache_close_handle,
};

int tfs_cache_open_dev(struct tfs_cache *c, unsigned flags, struct tfs_dev **out)
{
	struct cache_handle *h = calloc(1, sizeof(*h));

	if (!h)
		return -ENOMEM;
	h->dev.ops = &cache_ops;
	h->c = c;
	h->read_only = flags & TFS_DEV_READ_ONLY;
	h->status_only = flags & TFS_DEV_STATUS_ONLY;
	*out = &h->dev;
	return 0;
}

uint64_t tfs_cache_size(const struct tfs_cache *c)
{
	return c->origin_size;
}

const char *tfs_cache_name(const struct tfs_cache *c)
{
	return c->cfg.name;
}

struct tfs_bdev *tfs_cache_bdev(struct tfs_cache *c, const char *which)
{
	if (!strcmp(which, "origin"))
		return c->origin;
	if (!strcmp(which, "cache"))
		return c->cdev;
	if (!strcmp(which, "metadata"))
		return c->meta;
	return NULL;
}

/* ---- open and close ---- */

static void policy_desc(enum tfs_cache_policy_kind k, struct tfs_cache_policy *out)
{
	memset(out, 0, sizeof(*out));
	snprintf(out->name, sizeof(out->name), "%s", tfs_cache_policy_name(k));
	/* The kernel's versions and hint sizes, so that cache_check and dm agree on the hints. */
	if (k == TFS_CACHE_SMQ) {
		out->version[0] = 2;
		out->hint_size = 4;
	} else {
		out->version[0] = 1;
	}
}

int tfs_cache_metadata_used(const char *path)
{
	uint8_t buf[4096];
	struct tfs_bdev *b;
	uint64_t size;
	int r = tfs_bdev_open(path, true, &b);

	if (r < 0)
		return r;
	r = tfs_bdev_size(b, &size);
	if (r == 0 && size < sizeof(buf))
		r = -ENOSPC;
	if (r == 0)
		r = tfs_bdev_read(b, buf, sizeof(buf), 0);
	tfs_bdev_close(b);
	if (r < 0)
		return r;
	for (size_t i = 0; i < sizeof(buf); i++)
		if (buf[i])
			return 1;
	return 0;
}

static int device_blocks(const char *path, uint64_t block_size, uint64_t *out)
{
	struct tfs_bdev *b;
	uint64_t size = 0;
	int r = tfs_bdev_open(path, true, &b);

	if (r < 0)
		return r;
	r = tfs_bdev_size(b, &size);
	tfs_bdev_close(b);
	*out = size / block_size;
	return r;
}

static int format_meta(struct tfs_bdev *meta, const struct tfs_cache_cfg *cfg, uint32_t nr,
		       struct tfs_cmd **out)
{
	struct tfs_cmd_format_options fo = { .block_sectors = cfg->block_sectors,
					     .nr_cache_blocks = nr,
					     .metadata_version = cfg->metadata_version };

	policy_desc(cfg->policy, &fo.policy);
	return tfs_cmd_format(meta, &fo, out);
}

int tfs_cache_format(const struct tfs_cache_cfg *cfg)
{
	struct tfs_bdev *meta;
	struct tfs_cmd *cmd;
	uint64_t nr;
	int r = device_blocks(cfg->cache, (uint64_t)cfg->block_sectors * SECTOR, &nr);

	if (r == 0 && (nr == 0 || nr > UINT32_MAX))
		r = -EINVAL;
	if (r < 0) {
		tfs_err("[cache \"%s\"]: cache device %s: %s", cfg->name, cfg->cache,
			r == -EINVAL ? "holds no whole block (or too many)" : strerror(-r));
		return r;
	}
	r = tfs_bdev_open(cfg->metadata, false, &meta);
	if (r < 0)
		return r;
	r = format_meta(meta, cfg, (uint32_t)nr, &cmd);
	if (r == 0)
		tfs_cmd_close(cmd);
	else
		tfs_err("[cache \"%s\"]: cannot format metadata %s: %s", cfg->name, cfg->metadata,
			strerror(-r));
	tfs_bdev_close(meta);
	return r;
}

static int open_wrapped(const char *path, const struct tfs_cache_open_options *o,
			struct tfs_bdev **out)
{
	struct tfs_bdev *raw;
	int r = tfs_bdev_open_direct(path, o->read_only, o->direct, &raw);

	if (r)
		return r;
	r = tfs_bdev_fault_wrap(raw, o->allow_faults, out);
	if (r)
		tfs_bdev_close(raw);
	return r;
}

static int load_one(void *ctx, uint32_t cb, uint64_t ob, bool dirty, const void *hint)
{
	struct tfs_cache *c = ctx;
	uint32_t hits = 0;

	/* Past the origin's end (it shrank while unmounted): see drop_past_origin. */
	if (hint)
		memcpy(&hits, hint, sizeof(hits));
	tfs_cache_policy_insert(c->policy, cb, ob, dirty, hits);
	return 0;
}

static int load_discard(void *ctx, uint64_t db, bool on)
{
	struct tfs_cache *c = ctx;

	if (on && db < c->nr_oblocks)
		c->discard[db / 64] |= 1ull << (db % 64);
	return 0;
}

static uint32_t dirty_beyond(struct tfs_cache *c, uint32_t nr_c, uint64_t nr_o);

/*
 * A read-only mount: the metadata as it is, or not at all.  Whatever would
 * need a change first (format, resize, needs_check, mappings past the
 * origin's end) keeps the cache from starting, with that reason.
 */
static int start_read_only(struct tfs_cache *c, int used,
			   struct tfs_cmd_open_options *oo, const struct tfs_cache_policy *pd)
{
	struct tfs_cmd_info info;
	int r;

	if (!used) {
		snprintf(c->reason, sizeof(c->reason),
			 "new metadata, not formatted on a read-only mount");
		return -EINVAL;
	}
	oo->read_only = true;
	r = tfs_cmd_open(c->meta, oo, &c->cmd);
	if (r < 0) {
		c->cmd = NULL;
		snprintf(c->reason, sizeof(c->reason), "metadata refused (see the log): %s",
			 strerror(-r));
		return -EINVAL;
	}
	tfs_cmd_info(c->cmd, &info);
	if (tfs_cmd_needs_check(c->cmd) || info.nr_cache_blocks != c->nr_cblocks ||
	    info.discard_nr_blocks != c->nr_oblocks ||
	    info.discard_block_sectors != c->cfg.block_sectors) {
		c->needs_check = tfs_cmd_needs_check(c->cmd);
		snprintf(c->reason, sizeof(c->reason), "%s: mount read-write once first",
			 c->needs_check ? "needs_check is set" : "the devices' sizes changed");
		return -EINVAL;
	}
	r = tfs_cmd_load_mappings(c->cmd, pd, load_one, c);
	if (r == 0 && dirty_beyond(c, c->nr_cblocks, c->nr_oblocks) != NO_CBLOCK)
		r = -EINVAL;
	if (r == 0)
		r = tfs_cmd_load_discards(c->cmd, load_discard, c);
	if (r < 0) {
		snprintf(c->reason, sizeof(c->reason), "cannot load metadata: %s", strerror(-r));
		return -EINVAL;
	}
	return 0;
}

/* The origin shrank while unmounted: clean mappings past its end go, a dirty one refuses. */
static int drop_past_origin(struct tfs_cache *c)
{
	uint32_t cb = dirty_beyond(c, c->nr_cblocks, c->nr_oblocks);
	int r = 0;

	if (cb != NO_CBLOCK) {
		snprintf(c->reason, sizeof(c->reason),
			 "dirty cache block %" PRIu32 " maps origin block %" PRIu64
			 ", past the origin's end (%" PRIu64 " blocks)", cb,
			 tfs_cache_policy_oblock(c->policy, cb), c->nr_oblocks);
		return -EINVAL;
	}
	for (cb = 0; cb < c->nr_cblocks && r == 0; cb++) {
		if (tfs_cache_policy_oblock(c->policy, cb) == UINT64_MAX ||
		    tfs_cache_policy_oblock(c->policy, cb) < c->nr_oblocks)
			continue;
		r = tfs_cmd_remove(c->cmd, cb);
		tfs_cache_policy_remove(c->policy, cb);
	}
	return r;
}

/* Metadata: format, or open and load.  A refusal sets c->reason and returns -EINVAL. */
static int start_metadata(struct tfs_cache *c)
{
	struct tfs_cmd_open_options oo = { .block_sectors = c->cfg.block_sectors };
	struct tfs_cache_policy pd;
	struct tfs_cmd_info info;
	int used = tfs_cache_metadata_used(c->cfg.metadata), r;

	policy_desc(c->policy_kind, &pd);
	if (used < 0)
		return used;
	if (c->read_only)
		return start_read_only(c, used, &oo, &pd);
	if (!used) {
		r = format_meta(c->meta, &c->cfg, c->nr_cblocks, &c->cmd);
		if (r < 0)
			snprintf(c->reason, sizeof(c->reason), "cannot format metadata: %s",
				 strerror(-r));
	} else {
		/*
		 * Read-only first: a read-write open clears the clean-shutdown
		 * flag at once, which a cache that must not start should keep.
		 */
		oo.read_only = true;
		r = tfs_cmd_open(c->meta, &oo, &c->cmd);
		if (r == 0 && !tfs_cmd_needs_check(c->cmd)) {
			tfs_cmd_close(c->cmd);
			oo.read_only = false;
			r = tfs_cmd_open(c->meta, &oo, &c->cmd);
			if (r < 0)
				c->cmd = NULL;
		}
		if (r < 0)
			snprintf(c->reason, sizeof(c->reason),
				 "metadata refused (see the log): %s", strerror(-r));
	}
	if (r < 0)
		return -EINVAL;
	if (tfs_cmd_needs_check(c->cmd)) {
		c->needs_check = true;
		snprintf(c->reason, sizeof(c->reason),
			 "metadata needs_check is set: run thinfs check --clear-needs-check "
			 "(or cache_check --clear-needs-check-flag) on %s", c->cfg.metadata);
		return -EINVAL;
	}
	tfs_cmd_info(c->cmd, &info);
	r = 0;
	if (info.nr_cache_blocks != c->nr_cblocks) {
		uint32_t dirty_cb;

		r = tfs_cmd_resize(c->cmd, c->nr_cblocks, &dirty_cb);
		if (r == -EINVAL)
			snprintf(c->reason, sizeof(c->reason),
				 "cache device shrank below dirty block %" PRIu32, dirty_cb);
	}
	if (r == 0 && (info.discard_block_sectors != c->cfg.block_sectors ||
		       info.discard_nr_blocks != c->nr_oblocks))
		r = tfs_cmd_resize_discard(c->cmd, c->cfg.block_sectors, c->nr_oblocks);
	if (r == 0)
		r = tfs_cmd_set_policy(c->cmd, &pd);
	if (r == 0)
		r = tfs_cmd_load_mappings(c->cmd, &pd, load_one, c);
	if (r == 0)
		r = drop_past_origin(c);
	if (r == 0)
		r = tfs_cmd_load_discards(c->cmd, load_discard, c);
	if (r < 0) {
		if (!c->reason[0])
			snprintf(c->reason, sizeof(c->reason), "cannot load metadata: %s",
				 strerror(-r));
		return -EINVAL;
	}
	if (c->mode == TFS_CACHE_PASSTHROUGH && tfs_cache_policy_nr_dirty(c->policy)) {
		snprintf(c->reason, sizeof(c->reason),
			 "passthrough refused: %u dirty block(s) (start in writeback and clean first)",
			 tfs_cache_policy_nr_dirty(c->policy));
		return -EINVAL;
	}
	if (!tfs_cmd_clean_when_opened(c->cmd) && tfs_cache_policy_nr_dirty(c->policy))
		tfs_info("cache %s: unclean shutdown: %u mapped block(s) count as dirty until written "
			 "back", c->cfg.name, tfs_cache_policy_nr_dirty(c->policy));
	{
		struct tfs_cache_stats st;

		tfs_cmd_get_stats(c->cmd, &st);
		c->read_hits = st.read_hits;
		c->read_misses = st.read_misses;
		c->write_hits = st.write_hits;
		c->write_misses = st.write_misses;
	}
	c->meta_changed = true;
	return commit_locked(c, false) < 0 ? -EINVAL : 0;
}

static int alloc_state(struct tfs_cache *c)
{
	int r;

	c->discard = calloc(c->nr_oblocks / 64 + 1, sizeof(uint64_t));
	if (!c->discard)
		return -ENOMEM;
	r = tfs_cache_policy_create(c->nr_cblocks, &c->policy);
	if (r == 0 && posix_memalign((void **)&c->copy_buf, 4096, COPY_PIECE))
		r = -ENOMEM;
	return r;
}

int tfs_cache_open(const struct tfs_cache_cfg *cfg, const struct tfs_cache_open_options *o,
		   struct tfs_cache **out)
{
	struct tfs_cache *c = calloc(1, sizeof(*c));
	uint64_t csize = 0;
	int r;

	if (!c)
		return -ENOMEM;
	c->cfg = *cfg;
	c->mode = cfg->mode;
	c->policy_kind = cfg->policy;
	c->migration_threshold = cfg->migration_threshold;
	c->block_size = (uint64_t)cfg->block_sectors * SECTOR;
	c->read_only = o->read_only;
	c->notify = o->notify;
	c->notify_arg = o->notify_arg;
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	r = open_wrapped(cfg->origin, o, &c->origin);
	if (r == 0)
		r = open_wrapped(cfg->cache, o, &c->cdev);
	if (r == 0)
		r = open_wrapped(cfg->metadata, o, &c->meta);
	if (r < 0) {
		tfs_err("[cache \"%s\"]: cannot open its devices: %s", cfg->name, strerror(-r));
		goto err;
	}
	r = tfs_linear_open(c->origin, false, 0, &c->origin_dev);
	if (r == 0)
		r = tfs_prison_create(&c->prison);
	if (r == 0)
		r = tfs_core_create(&c->core);
	if (r == 0)
		r = tfs_bdev_size(c->origin, &c->origin_size);
	if (r == 0)
		r = tfs_bdev_size(c->cdev, &csize);
	if (r < 0)
		goto err;
	c->nr_oblocks = c->origin_size / c->block_size;
	c->nr_cblocks = csize / c->block_size > UINT32_MAX - 1 ? UINT32_MAX - 1
							       : (uint32_t)(csize / c->block_size);
	r = alloc_state(c);
	if (r < 0)
		goto err;
	c->last_commit_ms = c->last_io_ms = now_ms();
	pthread_mutex_lock(&c->lock);
	if (!c->nr_cblocks) {
		snprintf(c->reason, sizeof(c->reason), "the cache device holds no whole block");
		r = -EINVAL;
	} else {
		r = start_metadata(c);
	}
	if (r < 0) {
		if (r != -EINVAL)
			snprintf(c->reason, sizeof(c->reason), "cannot start: %s", strerror(-r));
		c->meta_mode = META_FAIL;
		tfs_err("cache %s does not start: %s; its file answers EIO", cfg->name, c->reason);
	}
	pthread_mutex_unlock(&c->lock);
	if (c->meta_mode != META_FAIL && !c->read_only) {
		r = pthread_create(&c->worker, NULL, worker, c);
		if (r) {
			r = -r;
			goto err;
		}
		c->worker_started = true;
	}
	*out = c;
	return 0;
err:
	tfs_cache_close(c);
	return r;
}

static void save_hints(struct tfs_cache *c)
{
	if (c->policy_kind != TFS_CACHE_SMQ)
		return;
	for (uint32_t cb = 0; cb < c->nr_cblocks && c->meta_mode == META_RW; cb++) {
		uint32_t hits;
		int r;

		if (tfs_cache_policy_oblock(c->policy, cb) == UINT64_MAX)
			continue;
		hits = tfs_cache_policy_hits(c->policy, cb);
		r = tfs_cmd_set_hint(c->cmd, cb, &hits);
		if (r < 0)
			meta_failed(c, "hint", r);
	}
}

int tfs_cache_close(struct tfs_cache *c)
{
	int r = 0;

	if (!c)
		return 0;
	if (c->worker_started) {
		pthread_mutex_lock(&c->lock);
		c->stop = true;
		pthread_cond_broadcast(&c->cond);
		pthread_mutex_unlock(&c->lock);
		pthread_join(c->worker, NULL);
	}
	wb_pool_stop(c);
	if (c->cmd) {
		pthread_mutex_lock(&c->lock);
		if (c->meta_mode == META_RW && !c->read_only) {
			/* Data first: the clean flag vouches for the dirty bits and the copies. */
			r = tfs_bdev_flush(c->cdev);
			if (r == 0)
				r = tfs_bdev_flush(c->origin);
			if (r == 0) {
				save_hints(c);
				r = commit_locked(c, true);
			}
		}
		pthread_mutex_unlock(&c->lock);
		tfs_cmd_close(c->cmd);
	}
	tfs_dev_close(c->origin_dev);
	tfs_prison_destroy(c->prison);
	if (c->core)
		tfs_core_destroy(c->core);
	tfs_bdev_close(c->meta);
	tfs_bdev_close(c->cdev);
	tfs_bdev_close(c->origin);
	tfs_cache_policy_destroy(c->policy);
	free(c->discard);
	free(c->copy_buf);
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->lock);
	free(c);
	return r;
}

/* ---- control ---- */

static int refuse_mode(struct tfs_cache *c, char *msg, size_t len)
{
	if (c->read_only) {
		snprintf(msg, len, "cache %s: the pool is mounted read-only", c->cfg.name);
		return -EROFS;
	}
	if (c->meta_mode == META_RW)
		return 0;
	snprintf(msg, len, "cache %s: metadata mode is %s (%s): only status is served", c->cfg.name,
		 meta_mode_name[c->meta_mode], c->reason);
	return -EROFS;
}

int tfs_cache_set_mode(struct tfs_cache *c, enum tfs_cache_mode m, char *msg, size_t len)
{
	int r;

	pthread_mutex_lock(&c->lock);
	r = refuse_mode(c, msg, len);
	if (r == 0 && m == TFS_CACHE_PASSTHROUGH && tfs_cache_policy_nr_dirty(c->policy)) {
		snprintf(msg, len, "cache %s: passthrough refused: %u dirty block(s) (clean first)",
			 c->cfg.name, tfs_cache_policy_nr_dirty(c->policy));
		r = -EBUSY;
	}
	if (r == 0) {
		snprintf(msg, len, "cache %s: mode %s -> %s", c->cfg.name,
			 tfs_cache_mode_name(c->mode), tfs_cache_mode_name(m));
		c->mode = m;
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

int tfs_cache_set_policy(struct tfs_cache *c, enum tfs_cache_policy_kind p, char *msg, size_t len)
{
	struct tfs_cache_policy pd;
	int r;

	pthread_mutex_lock(&c->lock);
	r = refuse_mode(c, msg, len);
	if (r == 0 && p != c->policy_kind) {
		policy_desc(p, &pd);
		r = tfs_cmd_set_policy(c->cmd, &pd);
		if (r < 0) {
			meta_failed(c, "policy change", r);
			snprintf(msg, len, "cache %s: policy change failed: %s", c->cfg.name,
				 strerror(-r));
		} else {
			c->meta_changed = true;
		}
	}
	if (r == 0) {
		snprintf(msg, len, "cache %s: policy %s -> %s", c->cfg.name,
			 tfs_cache_policy_name(c->policy_kind), tfs_cache_policy_name(p));
		c->policy_kind = p;
		pthread_cond_broadcast(&c->cond);
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

int tfs_cache_set_migration_threshold(struct tfs_cache *c, uint64_t sectors, char *msg,
				      size_t len)
{
	int r;

	pthread_mutex_lock(&c->lock);
	r = refuse_mode(c, msg, len);
	if (r == 0) {
		snprintf(msg, len, "cache %s: migration_threshold %" PRIu64 " -> %" PRIu64,
			 c->cfg.name, c->migration_threshold, sectors);
		c->migration_threshold = sectors;
		pthread_cond_broadcast(&c->cond);
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

int tfs_cache_invalidate(struct tfs_cache *c, const uint64_t (*ranges)[2], unsigned nr, char *msg,
			 size_t len)
{
	unsigned dropped = 0;
	int r;

	pthread_mutex_lock(&c->lock);
	r = refuse_mode(c, msg, len);
	if (r == 0 && c->mode != TFS_CACHE_PASSTHROUGH) {
		snprintf(msg, len, "cache %s: invalidate works in passthrough mode only (now %s)",
			 c->cfg.name, tfs_cache_mode_name(c->mode));
		r = -EBUSY;
	}
	for (unsigned i = 0; r == 0 && i < nr; i++) {
		if (ranges[i][0] >= ranges[i][1] || ranges[i][1] > c->nr_cblocks) {
			snprintf(msg, len, "cache %s: invalidate: %" PRIu64 "-%" PRIu64
				 " is not within 0-%" PRIu32 " (END exclusive)", c->cfg.name,
				 ranges[i][0], ranges[i][1], c->nr_cblocks);
			r = -EINVAL;
		}
	}
	pthread_mutex_unlock(&c->lock);
	for (unsigned i = 0; r == 0 && i < nr; i++) {
		for (uint64_t cb = ranges[i][0]; r == 0 && cb < ranges[i][1]; cb++) {
			uint64_t ob;

			pthread_mutex_lock(&c->lock);
			ob = tfs_cache_policy_oblock(c->policy, (uint32_t)cb);
			pthread_mutex_unlock(&c->lock);
			if (ob == UINT64_MAX)
				continue;
			cell_lock(c, ob, false);
			pthread_mutex_lock(&c->lock);
			if (tfs_cache_policy_oblock(c->policy, (uint32_t)cb) == ob) {
				r = unmap_locked(c, (uint32_t)cb);
				dropped += r == 0;
			}
			pthread_mutex_unlock(&c->lock);
			cell_unlock(c, ob, false);
		}
	}
	pthread_mutex_lock(&c->lock);
	if (r == 0)
		snprintf(msg, len, "cache %s: %u block(s) invalidated", c->cfg.name, dropped);
	else if (!msg[0])
		snprintf(msg, len, "cache %s: invalidate failed: %s", c->cfg.name, strerror(-r));
	pthread_mutex_unlock(&c->lock);
	notify(c);
	return r;
}

int tfs_cache_clean(struct tfs_cache *c, bool wait, void (*progress)(void *arg, uint64_t dirty),
		    void *arg, char *msg, size_t len)
{
	int r = tfs_cache_set_policy(c, TFS_CACHE_CLEANER, msg, len);

	if (r < 0)
		return r;
	pthread_mutex_lock(&c->lock);
	c->cleaning = true;
	pthread_cond_broadcast(&c->cond);
	c->wb_error = 0;
	while (wait && c->meta_mode == META_RW && tfs_cache_policy_nr_dirty(c->policy) &&
	       !c->wb_error) {
		struct timespec ts;

		if (progress) {
			uint64_t d = tfs_cache_policy_nr_dirty(c->policy);

			pthread_mutex_unlock(&c->lock);
			progress(arg, d);
			pthread_mutex_lock(&c->lock);
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec++;
		pthread_cond_timedwait(&c->cond, &c->lock, &ts);
	}
	if (wait && c->meta_mode != META_RW) {
		r = -EIO;
		snprintf(msg, len, "cache %s: clean stopped: metadata mode %s (%s)", c->cfg.name,
			 meta_mode_name[c->meta_mode], c->reason);
	} else if (wait && c->wb_error) {
		r = c->wb_error;
		snprintf(msg, len, "cache %s: clean stopped: a writeback failed (%s); %u dirty "
			 "block(s) left, retried in the background", c->cfg.name,
			 strerror(-c->wb_error), tfs_cache_policy_nr_dirty(c->policy));
	} else if (wait) {
		snprintf(msg, len, "cache %s: clean: 0 dirty blocks; the origin alone now holds all "
			 "the data (remove the [cache] section to drop the cache at the next mount)",
			 c->cfg.name);
	} else {
		snprintf(msg, len, "cache %s: cleaning %u dirty block(s) with the cleaner policy",
			 c->cfg.name, tfs_cache_policy_nr_dirty(c->policy));
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

/* The first dirty mapping that a cache of nr_c blocks over nr_o origin blocks cannot keep. */
static uint32_t dirty_beyond(struct tfs_cache *c, uint32_t nr_c, uint64_t nr_o)
{
	for (uint32_t cb = 0; cb < c->nr_cblocks; cb++) {
		uint64_t ob = tfs_cache_policy_oblock(c->policy, cb);

		if (ob != UINT64_MAX && tfs_cache_policy_dirty(c->policy, cb) &&
		    (cb >= nr_c || ob >= nr_o))
			return cb;
	}
	return NO_CBLOCK;
}

/* The policy's state and the discard bits for the new sizes, the kept mappings moved over. */
static int rebuild_state(struct tfs_cache *c, uint32_t nr_c, uint64_t nr_o)
{
	struct tfs_cache_policy_state *p;
	uint64_t *bits = calloc(nr_o / 64 + 1, sizeof(uint64_t));
	int r = bits ? tfs_cache_policy_create(nr_c, &p) : -ENOMEM;

	if (r < 0) {
		free(bits);
		return r;
	}
	for (uint32_t cb = 0; cb < c->nr_cblocks && cb < nr_c; cb++) {
		uint64_t ob = tfs_cache_policy_oblock(c->policy, cb);

		if (ob != UINT64_MAX && ob < nr_o)
			tfs_cache_policy_insert(p, cb, ob, tfs_cache_policy_dirty(c->policy, cb),
						tfs_cache_policy_hits(c->policy, cb));
	}
	for (uint64_t ob = 0; ob < nr_o && ob < c->nr_oblocks; ob++)
		if (discarded(c, ob))
			bits[ob / 64] |= 1ull << (ob % 64);
	tfs_cache_policy_destroy(c->policy);
	free(c->discard);
	c->policy = p;
	c->discard = bits;
	return 0;
}

/* c->lock held, every range lock taken: the metadata and memory to the new sizes. */
static int resize_locked(struct tfs_cache *c, uint64_t osize, uint32_t nr_c, char *msg, size_t len)
{
	uint64_t nr_o = osize / c->block_size;
	uint32_t cb = dirty_beyond(c, nr_c, nr_o);
	int r = 0;

	if (cb != NO_CBLOCK) {
		snprintf(msg, len, "cache %s: cannot resize: cache block %" PRIu32 " (origin block %"
			 PRIu64 ") is dirty and would be lost (clean first)", c->cfg.name, cb,
			 tfs_cache_policy_oblock(c->policy, cb));
		return -EBUSY;
	}
	/* Clean mappings of origin blocks past the end go; the array drops those past nr_c. */
	for (cb = 0; cb < c->nr_cblocks && cb < nr_c && r == 0; cb++) {
		uint64_t ob = tfs_cache_policy_oblock(c->policy, cb);

		if (ob != UINT64_MAX && ob >= nr_o)
			r = tfs_cmd_remove(c->cmd, cb);
	}
	if (r == 0 && nr_c != c->nr_cblocks)
		r = tfs_cmd_resize(c->cmd, nr_c, NULL);
	if (r == 0 && nr_o != c->nr_oblocks)
		r = tfs_cmd_resize_discard(c->cmd, c->cfg.block_sectors, nr_o);
	if (r < 0) {
		meta_failed(c, "resize", r);
		snprintf(msg, len, "cache %s: resize failed: %s (metadata mode %s now)", c->cfg.name,
			 strerror(-r), meta_mode_name[c->meta_mode]);
		return -EIO;
	}
	c->meta_changed = true;
	commit_locked(c, false);
	if (c->meta_mode != META_RW) {
		snprintf(msg, len, "cache %s: resize failed: %s", c->cfg.name, c->reason);
		return -EIO;
	}
	r = rebuild_state(c, nr_c, nr_o);
	if (r < 0) {
		/* Committed but not in memory: nothing may go on on the old picture. */
		set_meta_mode(c, META_FAIL, "out of memory taking a resize into use");
		snprintf(msg, len, "cache %s: resize: %s", c->cfg.name, c->reason);
		return r;
	}
	snprintf(msg, len, "cache %s: %" PRIu32 " -> %" PRIu32 " cache blocks, origin %" PRIu64
		 " -> %" PRIu64 " bytes", c->cfg.name, c->nr_cblocks, nr_c, c->origin_size, osize);
	c->nr_cblocks = nr_c;
	c->nr_oblocks = nr_o;
	c->origin_size = osize;
	return 0;
}

int tfs_cache_resize(struct tfs_cache *c, uint64_t *origin_size, char *msg, size_t len)
{
	uint64_t osize, csize;
	int r = tfs_bdev_size(c->origin, &osize);

	if (r == 0)
		r = tfs_bdev_size(c->cdev, &csize);
	if (r < 0) {
		snprintf(msg, len, "cache %s: cannot read the devices' sizes: %s", c->cfg.name,
			 strerror(-r));
		return r;
	}
	if (csize / c->block_size == 0 || csize / c->block_size >= UINT32_MAX) {
		snprintf(msg, len, "cache %s: the cache device (%" PRIu64 " bytes) holds no whole "
			 "block, or too many", c->cfg.name, csize);
		return -EINVAL;
	}
	/* Every origin block, the uncached tail's too: all I/O of the cache waits. */
	r = tfs_prison_lock(c->prison, 0, 0, UINT64_MAX);
	if (r < 0)
		return r;
	pthread_mutex_lock(&c->lock);
	r = refuse_mode(c, msg, len);
	if (r == 0)
		r = resize_locked(c, osize, (uint32_t)(csize / c->block_size), msg, len);
	*origin_size = c->origin_size;
	pthread_mutex_unlock(&c->lock);
	tfs_prison_unlock(c->prison, 0, 0, UINT64_MAX);
	notify(c);
	return r;
}

int tfs_cache_suspend(struct tfs_cache *c, const struct tfs_suspend_opts *o, char *why,
		      size_t why_len)
{
	struct timespec deadline;
	int n, r;

	why[0] = '\0';
	/* The cache has no requests waiting inside it: noflush only skips the flush. */
	n = tfs_core_suspend_begin(c->core, NULL, 0, o->noflush);
	if (n <= 0) {
		if (n < 0)
			snprintf(why, why_len, "%s", n == -ESHUTDOWN ? "the daemon is shutting down"
				 : "out of memory");
		return n;
	}
	if (o->timeout_ms) {
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += (time_t)(o->timeout_ms / 1000);
		deadline.tv_nsec += (long)(o->timeout_ms % 1000) * 1000000L;
		if (deadline.tv_nsec >= 1000000000L) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000L;
		}
	}
	r = tfs_core_drain(c->core, NULL, 0, o->timeout_ms ? &deadline : NULL, o->cancelled,
			   o->arg);
	if (r) {
		tfs_core_suspend_end(c->core, false);
		snprintf(why, why_len, "%s: the suspend was abandoned and the cache is active again",
			 r == -ETIMEDOUT ? "in-flight I/O did not finish in time" : "interrupted");
		return r;
	}
	pthread_mutex_lock(&c->lock);
	c->suspended = true;
	while (c->migrating)
		pthread_cond_wait(&c->cond, &c->lock);
	pthread_mutex_unlock(&c->lock);
	/* The worker is between two steps now, or waits: nothing moves until resume. */
	r = 0;
	if (!o->noflush) {
		r = tfs_bdev_flush(c->cdev);
		if (r == 0)
			r = tfs_bdev_flush(c->origin);
		pthread_mutex_lock(&c->lock);
		if (r == 0 && c->meta_changed)
			r = commit_locked(c, false);
		pthread_mutex_unlock(&c->lock);
		if (r < 0)
			snprintf(why, why_len, "flushing before the suspend failed: %s", strerror(-r));
	}
	tfs_core_suspend_end(c->core, true);
	notify(c);
	return r < 0 ? r : 1;
}

int tfs_cache_resume(struct tfs_cache *c)
{
	int n = (int)tfs_core_resume(c->core, NULL, 0);

	pthread_mutex_lock(&c->lock);
	c->suspended = false;
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	return n > 0;
}

void tfs_cache_stop_holding(struct tfs_cache *c)
{
	tfs_core_close(c->core);
	tfs_cache_resume(c);
}

void tfs_cache_get_settings(struct tfs_cache *c, enum tfs_cache_mode *mode,
			    enum tfs_cache_policy_kind *policy, uint64_t *migration_threshold)
{
	pthread_mutex_lock(&c->lock);
	*mode = c->mode;
	*policy = c->policy_kind;
	*migration_threshold = c->migration_threshold;
	pthread_mutex_unlock(&c->lock);
}

const struct tfs_cache_cfg *tfs_cache_cfg(const struct tfs_cache *c)
{
	return &c->cfg;
}

unsigned tfs_cache_take_events(struct tfs_cache *c, struct tfs_cache_event *out, unsigned max)
{
	unsigned n;

	pthread_mutex_lock(&c->lock);
	n = c->nr_events < max ? c->nr_events : max;
	memcpy(out, c->events, n * sizeof(*out));
	memmove(c->events, c->events + n, (c->nr_events - n) * sizeof(*out));
	c->nr_events -= n;
	pthread_mutex_unlock(&c->lock);
	return n;
}

void tfs_cache_dm_line(struct tfs_cache *c, char *out, size_t len)
{
	struct tfs_cmd_info info = { 0 };

	pthread_mutex_lock(&c->lock);
	if (c->meta_mode == META_FAIL || !c->cmd) {
		snprintf(out, len, "Fail");
		pthread_mutex_unlock(&c->lock);
		return;
	}
	tfs_cmd_info(c->cmd, &info);
	snprintf(out, len,
		 "8 %" PRIu64 "/%" PRIu64 " %" PRIu32 " %" PRIu32 "/%" PRIu32 " %" PRIu64 " %" PRIu64
		 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %u %u %s%s%s 2 migration_threshold"
		 " %" PRIu64 " %s 0 %s ",
		 info.meta_total - info.meta_free, info.meta_total, c->cfg.block_sectors,
		 c->nr_cblocks - tfs_cache_policy_nr_free(c->policy), c->nr_cblocks, c->read_hits,
		 c->read_misses, c->write_hits, c->write_misses, c->demotions, c->promotions,
		 tfs_cache_policy_nr_dirty(c->policy),
		 1 + (info.version == 2) + !c->cfg.discard_passdown,
		 info.version == 2 ? "metadata2 " : "", tfs_cache_mode_name(c->mode),
		 c->cfg.discard_passdown ? "" : " no_discard_passdown", c->migration_threshold,
		 tfs_cache_policy_name(c->policy_kind), meta_mode_name[c->meta_mode]);
	snprintf(out + strlen(out), len - strlen(out), "%s",
		 c->needs_check ? "needs_check" : "-");
	pthread_mutex_unlock(&c->lock);
}
