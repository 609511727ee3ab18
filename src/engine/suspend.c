/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Suspend, resume and reload of the pool and its thin devices: the pool's
 * side of the core's suspend (core.h).  The core holds and counts
 * requests; this file tells writes waiting inside the pool for data space
 * to leave, commits once the devices are quiescent, and takes a reloaded
 * configuration at the pool's resume, while nothing is in flight and no
 * background work runs, so a grow taken at resume races with nothing.
 *
 * The pool's mode is settled by the suspend's commit (space freed in the
 * transaction returns an out_of_data_space pool to write there and then);
 * a resume changes it only through what the reload grew.
 */
#include "pool-internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "format.h"
#include "log.h"

/* Requests waiting in tfs_pool_hold_for_space look at the core again. */
static void wake_held(struct tfs_pool *pool)
{
	pthread_mutex_lock(&pool->lock);
	pthread_cond_broadcast(&pool->space_cv);
	pthread_mutex_unlock(&pool->lock);
}

/* Quiescent: make what was written durable, unless the pool cannot change any more. */
static void suspend_commit(struct tfs_pool *pool, char *why, size_t why_len)
{
	enum tfs_pool_mode mode;
	int r;

	pthread_mutex_lock(&pool->lock);
	mode = pool->mode;
	pthread_mutex_unlock(&pool->lock);
	if (pool->opened_read_only || mode == TFS_POOL_READ_ONLY || mode == TFS_POOL_FAIL)
		return;
	r = tfs_pool_commit_now(pool, true);
	if (r)
		snprintf(why, why_len, "the commit at suspend failed (%s): see the pool's mode",
			 strerror(-r));
}

void tfs_suspend_abandoned_why(int r, const struct tfs_suspend_opts *opts, char *why,
			       size_t why_len)
{
	if (r == -ETIMEDOUT)
		snprintf(why, why_len, "in-flight I/O did not finish within %llu ms: the "
			 "suspend was abandoned and everything is active again",
			 (unsigned long long)opts->timeout_ms);
	else if (r == -ESHUTDOWN)
		snprintf(why, why_len, "the daemon is shutting down: the suspend was abandoned");
	else if (r == -ENOMEM)
		snprintf(why, why_len, "out of memory");
	else
		snprintf(why, why_len, "the suspend was interrupted and abandoned: everything "
			 "is active again");
}

int tfs_pool_suspend(struct tfs_pool *pool, const uint32_t *ids, unsigned nr,
		     const struct tfs_suspend_opts *opts, char *why, size_t why_len)
{
	struct timespec deadline;
	int n, r;

	why[0] = '\0';
	pthread_mutex_lock(&pool->suspend_mutex);
	n = tfs_core_suspend_begin(pool->core, ids, nr, opts->noflush);
	if (n <= 0) {
		if (n < 0)
			snprintf(why, why_len, "%s", n == -ESHUTDOWN ? "the daemon is shutting down"
				 : "out of memory");
		r = n;
		goto out;
	}
	wake_held(pool);
	if (opts->timeout_ms)
		deadline = tfs_deadline_in(opts->timeout_ms);
	r = tfs_core_drain(pool->core, ids, nr, opts->timeout_ms ? &deadline : NULL,
			   opts->cancelled, opts->arg);
	if (r) {
		tfs_core_suspend_end(pool->core, false);
		/* Requests told to leave that were not pushed back yet fail now. */
		wake_held(pool);
		tfs_suspend_abandoned_why(r, opts, why, why_len);
		tfs_warn("%s: %s", pool->cfg.metadata, why);
		goto out;
	}
	suspend_commit(pool, why, why_len);
	tfs_core_suspend_end(pool->core, true);
	tfs_info("%s: suspended %s%s", pool->cfg.metadata, nr ? "thin devices" : "the pool",
		 opts->noflush ? " (noflush)" : "");
	r = n;
out:
	pthread_mutex_unlock(&pool->suspend_mutex);
	return r;
}

/* ---- resume ------------------------------------------------------------------------ */

static void append(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void append(char *msg, size_t len, const char *fmt, ...)
{
	size_t used = strlen(msg);
	va_list ap;

	if (used + 1 >= len)
		return;
	if (used)
		used += (size_t)snprintf(msg + used, len - used, "; ");
	if (used + 1 >= len)
		return;
	va_start(ap, fmt);
	vsnprintf(msg + used, len - used, fmt, ap);
	va_end(ap);
}

/* The settings a reload may change; what names the pool stays (tfs_config_reload_diff). */
static void take_settings(struct tfs_pool *pool, const struct tfs_pool_config *c)
{
	struct tfs_pool_config *run = &pool->cfg;

	/* timer_lock: the commit thread reads the interval under it. */
	pthread_mutex_lock(&pool->timer_lock);
	pthread_mutex_lock(&pool->lock);
	snprintf(run->path, sizeof(run->path), "%s", c->path);
	snprintf(run->on_event, sizeof(run->on_event), "%s", c->on_event);
	memcpy(run->targets, c->targets, sizeof(run->targets));
	/* The caches take theirs after the resume (tfs_fs_cache_reload). */
	run->nr_caches = c->nr_caches;
	memcpy(run->caches, c->caches, sizeof(run->caches));
	/* Origins and snapshots take it from the pool's config at resume (src/fs). */
	run->snapshot_low_water = c->snapshot_low_water;
	run->low_water_blocks = c->low_water_blocks;
	run->low_water_percent = c->low_water_percent;
	run->low_water_is_percent = c->low_water_is_percent;
	run->error_if_no_space = c->error_if_no_space;
	run->no_space_timeout_ms = c->no_space_timeout_ms;
	run->discard_passdown = c->discard_passdown;
	if (!c->discard_passdown)
		tfs_pool_free_not_zero(pool, "discard_passdown is off");
	run->skip_block_zeroing = c->skip_block_zeroing;
	run->detect_zeroes = c->detect_zeroes;
	run->commit_interval_ms = c->commit_interval_ms;
	pool->reload_staged = false;
	pthread_mutex_unlock(&pool->lock);
	pthread_mutex_unlock(&pool->timer_lock);
}

/*
 * Blocks the device holds now (*have; metadata capped at what the format
 * can use, and then *capped is set) and blocks the pool uses of it (*now).
 */
static int device_blocks(struct tfs_pool *pool, bool data, uint64_t *have, uint64_t *now,
			 bool *capped)
{
	uint64_t unit = data ? pool->block_size : TFS_BLOCK_SIZE;
	struct tfs_pmd_space sp;
	uint64_t bytes;
	int r;

	r = tfs_bdev_size(data ? pool->data : pool->meta, &bytes);
	if (r)
		return r;
	*have = bytes / unit;
	*capped = !data && *have > TFS_MAX_METADATA_BLOCKS;
	if (*capped)
		*have = TFS_MAX_METADATA_BLOCKS; /* the rest is never used */
	pthread_mutex_lock(&pool->lock);
	tfs_pmd_space(pool->pmd, &sp);
	pthread_mutex_unlock(&pool->lock);
	*now = data ? sp.data_total : sp.meta_total;
	return 0;
}

/* The device as large as it is now: grown from outside (or by the admin) before the reload. */
static void grow_to_device(struct tfs_pool *pool, bool data, char *msg, size_t len)
{
	uint64_t unit = data ? pool->block_size : TFS_BLOCK_SIZE;
	uint64_t have, now;
	bool capped;
	char why[256];

	if (device_blocks(pool, data, &have, &now, &capped) || have <= now)
		return;
	/* Success is already in msg, from the reload; tfs_pool_grow logs it. */
	if (tfs_pool_grow(pool, data, have * unit, why, sizeof(why)))
		append(msg, len, "growing the %s device failed: %s", data ? "data" : "metadata",
		       why);
}

/* Before the pool's requests go in again: the reload, and a fresh no_space_timeout. */
static void preresume(struct tfs_pool *pool, char *msg, size_t len)
{
	if (pool->staged) {
		take_settings(pool, pool->staged);
		if (pool->staged_changes[0])
			append(msg, len, "%s", pool->staged_changes);
		grow_to_device(pool, false, msg, len);
		grow_to_device(pool, true, msg, len);
		free(pool->staged);
		pool->staged = NULL;
		tfs_info("%s: resumed with the reloaded configuration: %s", pool->cfg.metadata,
			 msg[0] ? msg : "no changes");
	}
	pthread_mutex_lock(&pool->lock);
	/* Writes pushed back at suspend wait afresh: the admin's time suspended is not theirs. */
	if (pool->mode == TFS_POOL_OUT_OF_DATA_SPACE)
		clock_gettime(CLOCK_MONOTONIC, &pool->oods_since);
	/* As dm-thin: a resumed pool still short of space says so again. */
	tfs_pool_rearm_low_water(pool);
	pthread_mutex_unlock(&pool->lock);
}

int tfs_pool_resume(struct tfs_pool *pool, const uint32_t *ids, unsigned nr, char *msg,
		    size_t msg_len)
{
	unsigned n;

	msg[0] = '\0';
	pthread_mutex_lock(&pool->suspend_mutex);
	if (!nr && tfs_core_suspended(pool->core, TFS_CORE_POOL))
		preresume(pool, msg, msg_len);
	n = tfs_core_resume(pool->core, ids, nr);
	pthread_mutex_unlock(&pool->suspend_mutex);
	return (int)n;
}

/* ---- reload ------------------------------------------------------------------------- */

/* A device the pool already uses more of than it holds cannot be taken. */
static int check_size(struct tfs_pool *pool, bool data, char *msg, size_t len, char *changes,
		      size_t changes_len)
{
	struct tfs_bdev *dev = data ? pool->data : pool->meta;
	const char *what = data ? "data" : "metadata";
	uint64_t have, now;
	bool capped;
	int r;

	r = device_blocks(pool, data, &have, &now, &capped);
	if (r) {
		snprintf(msg, len, "cannot size the %s device %s: %s", what, tfs_bdev_name(dev),
			 strerror(-r));
		return r;
	}
	if (have < now) {
		snprintf(msg, len, "the %s device %s holds %llu blocks but the pool uses %llu: "
			 "shrinking is not supported", what, tfs_bdev_name(dev),
			 (unsigned long long)have, (unsigned long long)now);
		return -EINVAL;
	}
	if (have > now)
		append(changes, changes_len, "%s device: %llu -> %llu blocks%s", what,
		       (unsigned long long)now, (unsigned long long)have, capped ?
		       " (the format uses at most that many metadata blocks, about 15.9 GiB: "
		       "the rest of the device stays unused)" : "");
	return 0;
}

static int stage(struct tfs_pool *pool, const struct tfs_pool_config *cfg, const char *changes)
{
	if (!changes[0]) {
		free(pool->staged);
		pool->staged = NULL;
	} else {
		if (!pool->staged && !(pool->staged = malloc(sizeof(*pool->staged))))
			return -ENOMEM;
		*pool->staged = *cfg;
		snprintf(pool->staged_changes, sizeof(pool->staged_changes), "%s", changes);
	}
	pthread_mutex_lock(&pool->lock);
	pool->reload_staged = pool->staged != NULL;
	pthread_mutex_unlock(&pool->lock);
	return 0;
}

int tfs_pool_reload(struct tfs_pool *pool, const struct tfs_pool_config *cfg, char *msg,
		    size_t msg_len)
{
	char changes[1024] = "";
	int r;

	msg[0] = '\0';
	pthread_mutex_lock(&pool->suspend_mutex);
	if (!tfs_core_suspended(pool->core, TFS_CORE_POOL)) {
		snprintf(msg, msg_len, "the pool is not suspended: suspend it first, then reload "
			 "and resume");
		r = -EBUSY;
		goto out;
	}
	r = tfs_config_reload_diff(&pool->cfg, cfg, msg, msg_len, changes, sizeof(changes));
	if (!r)
		r = check_size(pool, false, msg, msg_len, changes, sizeof(changes));
	if (!r)
		r = check_size(pool, true, msg, msg_len, changes, sizeof(changes));
	if (!r)
		r = stage(pool, cfg, changes);
	if (r == -ENOMEM)
		snprintf(msg, msg_len, "out of memory");
	if (!r)
		snprintf(msg, msg_len, "%s", changes[0] ? changes : "no changes");
	if (r)
		tfs_info("%s: reload of %s refused: %s", pool->cfg.metadata, cfg->path, msg);
	else
		tfs_info("%s: reload of %s staged for resume: %s", pool->cfg.metadata, cfg->path,
			 msg);
out:
	pthread_mutex_unlock(&pool->suspend_mutex);
	return r;
}

/* ---- state ----------------------------------------------------------------------------- */

bool tfs_pool_is_suspended(struct tfs_pool *pool)
{
	return tfs_core_suspended(pool->core, TFS_CORE_POOL);
}

bool tfs_pool_dev_suspended(struct tfs_pool *pool, uint32_t id)
{
	return tfs_pool_is_suspended(pool) || tfs_core_suspended(pool->core, id);
}

unsigned tfs_pool_dev_held(struct tfs_pool *pool, uint32_t id)
{
	return tfs_core_nr_held(pool->core, id);
}

void tfs_pool_get_config(struct tfs_pool *pool, struct tfs_pool_config *out)
{
	pthread_mutex_lock(&pool->lock);
	*out = pool->cfg;
	pthread_mutex_unlock(&pool->lock);
}
