/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache.h - the cache target: a fast cache device in front of a slow
 * origin, with dm-cache's metadata (src/meta/cache-metadata.h), its three
 * modes, the smq and cleaner policies and its failure semantics
 * (README "Cached origins").
 *
 * Owns: one cache instance (struct tfs_cache): its three devices (each
 * inside a fault wrapper), the metadata, the in-memory mapping (origin
 * block <-> cache block, dirty bits), the policy's state, the range locks
 * on origin blocks and a background worker thread that commits, promotes,
 * demotes and writes back.  tfs_cache_open_dev hands out struct tfs_dev
 * handles (target.h, kind "cache") on it; any number may be open.
 *
 * Ordering rules (why the data is never lost or stale):
 *  - writethrough writes the origin first and the cache only after that
 *    completed, and acknowledges after both;
 *  - a promotion or demotion commits the metadata before the block's range
 *    lock is released, so a later write never lands in a cache block the
 *    metadata on disk does not map (or still maps after a demotion);
 *  - a writeback copies cache -> origin, flushes the origin, then clears
 *    the dirty bit; an unclean stop makes every mapped block dirty.
 *
 * Never: knows FUSE, names or the catalog.  Thread-safe.
 */
#ifndef TFS_ENGINE_CACHE_H
#define TFS_ENGINE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache-config.h"

struct tfs_cache;
struct tfs_dev;
struct tfs_bdev;
struct tfs_status_sink;

/*
 * Whether metadata looks used (its first 4 KiB are not all zero): 1 yes,
 * 0 no, -errno.  mkpool and open both ask it.
 */
int tfs_cache_metadata_used(const char *path);
/* Write new, empty cache metadata for c (mkpool).  Logs what failed. */
int tfs_cache_format(const struct tfs_cache_cfg *c);

struct tfs_cache_open_options {
	bool direct;       /* O_DIRECT on the three devices */
	bool allow_faults; /* wrappers hold writes until a flush (power-cut tests) */
	/*
	 * A read-only mount: nothing is written (no format, resize, commit,
	 * migration or worker); metadata that would need a change to start
	 * (new, resized, needs_check) keeps the cache from starting.
	 */
	bool read_only;
	/* Called (from any thread, no lock held) when the metadata mode changed or cleaning finished. */
	void (*notify)(void *arg);
	void *notify_arg;
};

/*
 * Open the cache of section c: its devices, its metadata (formatted when
 * the first 4 KiB are zero), its mappings, then start its worker.
 * A cache that cannot start for a reason of its metadata (needs_check,
 * a version or superblock refused, a device too small) still opens, in
 * metadata mode fail with that reason in status (logged once, naming the
 * cache): its devices answer -EIO, the daemon and the pool go on.  Errors
 * that stop the open: -ENOMEM, a device that cannot be opened (-errno,
 * logged).
 */
int tfs_cache_open(const struct tfs_cache_cfg *c, const struct tfs_cache_open_options *o,
		   struct tfs_cache **out);
/*
 * Stop the worker, write hints and dirty bits and commit with the
 * clean-shutdown flag (unless the metadata mode is ro or fail), close the
 * devices.  Every handle must be closed.  -errno of the final commit.
 */
int tfs_cache_close(struct tfs_cache *cache);
/* A device handle (target.h); flags TFS_DEV_*.  -ENOMEM. */
int tfs_cache_open_dev(struct tfs_cache *cache, unsigned flags, struct tfs_dev **out);
/* The origin's size in bytes (the exported file's size). */
uint64_t tfs_cache_size(const struct tfs_cache *cache);
const char *tfs_cache_name(const struct tfs_cache *cache);

/* The fault wrapper of "origin", "cache" or "metadata"; NULL for another word. */
struct tfs_bdev *tfs_cache_bdev(struct tfs_cache *cache, const char *which);

/*
 * Control (thinfs-ctl MNT cache NAME ...).  Each returns 0, or -errno with
 * msg telling why in one line; nothing changes on error.
 *  -EROFS metadata mode ro or fail; -EBUSY passthrough while blocks are
 *  dirty, or invalidate outside passthrough; -EINVAL bad argument.
 */
int tfs_cache_set_mode(struct tfs_cache *cache, enum tfs_cache_mode m, char *msg, size_t len);
int tfs_cache_set_policy(struct tfs_cache *cache, enum tfs_cache_policy_kind p, char *msg,
			 size_t len);
int tfs_cache_set_migration_threshold(struct tfs_cache *cache, uint64_t sectors, char *msg,
				      size_t len);
/* Drop the mappings of cache blocks [begin, end) (passthrough only; all ranges checked first). */
int tfs_cache_invalidate(struct tfs_cache *cache, const uint64_t (*ranges)[2], unsigned nr,
			 char *msg, size_t len);
/*
 * Switch to the cleaner; with wait, block until no block is dirty
 * (progress(arg, dirty) called as it drops, at most once a second), or
 * -EIO when the cache fails meanwhile.
 */
int tfs_cache_clean(struct tfs_cache *cache, bool wait, void (*progress)(void *arg, uint64_t dirty),
		    void *arg, char *msg, size_t len);

/*
 * resize NAME: take the cache and origin devices' sizes now into use, with
 * all I/O of the cache held meanwhile.  Growing keeps every mapping;
 * blocks past a shrunk cache or origin lose their clean mappings, and a
 * dirty one there refuses the whole resize (-EBUSY, nothing changed);
 * the discard bitset follows the origin.  *origin_size: the origin's size
 * now (the file's).  -EROFS metadata mode ro or fail; msg says what
 * happened or why not.
 */
int tfs_cache_resize(struct tfs_cache *cache, uint64_t *origin_size, char *msg, size_t len);

/*
 * suspend CACHE: new I/O of the cache is held (core.h), I/O in flight
 * finishes (o->timeout_ms, o->cancelled as the pool's), the worker pauses,
 * then unless o->noflush the devices are flushed and the metadata
 * committed.  1 suspended now, 0 it was already; -ETIMEDOUT / -EINTR the
 * suspend was abandoned (nothing held); -errno of the flush or commit
 * (it stays suspended); why says what went wrong.  resume: 1 resumed, 0 it
 * was not suspended.
 */
struct tfs_suspend_opts;
int tfs_cache_suspend(struct tfs_cache *cache, const struct tfs_suspend_opts *o, char *why,
		      size_t why_len);
int tfs_cache_resume(struct tfs_cache *cache);
/* Shutting down: everything held goes in, and nothing is suspended again. */
void tfs_cache_stop_holding(struct tfs_cache *cache);

/* The settings a reload may change, as in force now. */
void tfs_cache_get_settings(struct tfs_cache *cache, enum tfs_cache_mode *mode,
			    enum tfs_cache_policy_kind *policy, uint64_t *migration_threshold);
/* The section the cache was opened with. */
const struct tfs_cache_cfg *tfs_cache_cfg(const struct tfs_cache *cache);

/* Events since the last call: metadata mode changes and "clean" completions. */
struct tfs_cache_event {
	bool mode_change; /* else: cache_clean */
	char old_mode[8], new_mode[8];
	char detail[256];
};
/* Copies up to max events into out and forgets them; returns how many. */
unsigned tfs_cache_take_events(struct tfs_cache *cache, struct tfs_cache_event *out, unsigned max);

/* dm's status line: "<meta block size> <used>/<total> <block sectors> <used>/<total> ...". */
void tfs_cache_dm_line(struct tfs_cache *cache, char *out, size_t len);

#endif
