/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cowsnap.c - the cow-snapshot target (see origin.h): a writable file of
 * its origin's size whose chunks come from its COW store once copied and
 * from the origin until then.
 *
 * Every request takes the origin's lock shared and a range lock on the
 * origin's bytes (shared to read, exclusive to write), the same cells an
 * origin write takes before it copies out: a chunk is never read from
 * the origin while an origin write is replacing it, nor looked up while
 * its copy is half made.  Copies follow the store's ordering contract
 * (snap-store.h): allocate, write the data, commit (whose group commit
 * flushes the data of every writer in the group once, then writes and
 * flushes their exceptions).
 */
#include "origin-internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "log.h"
#include "probe.h"
#include "scratch.h"

/* Chunks are copied through a buffer of at most this many bytes. */
#define COPY_PIECE ((size_t)1 << 20)
/* Copies made before one commit (one group's flush pair). */
#define BATCH 64u
#define ZERO_PIECE (64u * 1024)
/*
 * The COW file is fallocated this much at a time (at least one chunk),
 * one region ahead of the store's allocator.  ext4 holds the inode lock
 * exclusively for each fallocate and waits for the direct I/O in flight,
 * so a region is many copies' worth; past a few MiB the gain is flat
 * (bench/README.md) and the host space held beyond what the store uses
 * only grows.
 */
#define PREALLOC_BYTES ((uint64_t)4 << 20)
/* Zeros are written ahead through a buffer of this many bytes. */
#define ZERO_AHEAD_PIECE ((size_t)1 << 20)
/*
 * ... and only for chunks up to this size.  The host's conversion that the
 * zeros spare costs the same per copy whatever its size, the zeros cost
 * their bytes: measured (bench/README.md, cowrate branch), 4 KiB chunks
 * gain 1.16-1.27x, 64 KiB chunks gain nothing with one snapshot and lose
 * 0.58x with eight (each write then copies and zeros 8 chunks).  Sizes
 * between are not measured; the line is drawn in between.
 */
#define ZERO_AHEAD_MAX_CHUNK ((uint64_t)16 << 10)
static _Alignas(4096) const uint8_t zeros[ZERO_PIECE];

/* ---- life ---- */

/*
 * After a region of the COW file is fallocated: write zeros over its free
 * data chunks (small chunks only, see ZERO_AHEAD_MAX_CHUNK), so that
 * copies go into written extents.  A copy into an
 * unwritten extent leaves the host a conversion to make durable, and on
 * ext4 the store's data flush then writes the extent tree besides flushing
 * the device (bench/README.md: flushes 2.4x slower under COW breaks).
 * Only chunks at or past the store's allocation point as it is now are
 * written, never the header or an area: chunks below it may hold copies
 * (from an earlier mount, or of a region filled again after a resize), and
 * areas hold records.  A chunk handed out from here on waits for this fill
 * before its copy (prealloc_ahead), so the zeros never land on a copy.
 * Zeros are what a reserved chunk reads as anyway: nothing changes
 * meaning, and the data flush makes them durable with the copies.  Runs on
 * the snapshot's fill thread (fill_main) or on a writer that caught up
 * with it; stops between pieces when the snapshot goes (the region is then
 * not marked, and nothing relies on it any more).  The zeros come from an
 * anonymous mapping that is only read, so they are the kernel's zero page:
 * no memory is filled or kept for them (a scratch buffer would stay
 * mapped, 1 MiB a snapshot, for as long as its fill thread lives).
 */
static int zero_ahead(void *arg, uint64_t first, uint64_t nr)
{
	struct tfs_cowsnap *s = arg;
	uint64_t c = tfs_snap_store_next_free(s->store), end = first + nr;
	uint8_t *buf = mmap(NULL, ZERO_AHEAD_PIECE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int r = 0;

	if (buf == MAP_FAILED)
		return -ENOMEM;
	if (c < first)
		c = first;
	while (!r && c < end) {
		uint64_t run = 0, off, len;

		if (tfs_snap_store_is_meta(s->store, c)) {
			c++;
			continue;
		}
		while (c + run < end && !tfs_snap_store_is_meta(s->store, c + run))
			run++;
		off = c * s->chunk_bytes;
		len = run * s->chunk_bytes;
		while (!r && len) {
			size_t n = len < ZERO_AHEAD_PIECE ? (size_t)len : ZERO_AHEAD_PIECE;

			if (atomic_load(&s->ahead_stop)) {
				r = -ECANCELED;
				break;
			}
			r = tfs_bdev_write(s->cow, buf, n, off);
			if (!r)
				atomic_fetch_add(&s->zeroed_bytes, n);
			off += n;
			len -= n;
		}
		c += run;
	}
	munmap(buf, ZERO_AHEAD_PIECE);
	return r;
}

/*
 * The fill thread: fills the region writers last asked for (prealloc_ahead),
 * one at a time, until the last put stops it.  A region a writer reaches
 * before the thread has filled it is filled by that writer (or waited for,
 * if the thread is at it), as without the thread; failures are the fill's
 * (counted in status, they cost speed only).
 */
static void *fill_main(void *arg)
{
	struct tfs_cowsnap *s = arg;
	uint64_t want;

	pthread_mutex_lock(&s->ahead_lock);
	for (;;) {
		while (!atomic_load(&s->ahead_stop) && s->ahead_done == s->ahead_want)
			pthread_cond_wait(&s->ahead_work, &s->ahead_lock);
		if (atomic_load(&s->ahead_stop))
			break;
		want = s->ahead_done = s->ahead_want;
		pthread_mutex_unlock(&s->ahead_lock);
		if (!atomic_load(&s->invalid))
			tfs_prealloc_fill(s->prealloc, want);
		pthread_mutex_lock(&s->ahead_lock);
	}
	pthread_mutex_unlock(&s->ahead_lock);
	return NULL;
}

/* The last put: no writer is left to ask; a fill under way stops at its next zero piece. */
static void stop_fill_thread(struct tfs_cowsnap *s)
{
	if (!s->has_ahead)
		return;
	pthread_mutex_lock(&s->ahead_lock);
	atomic_store(&s->ahead_stop, true);
	pthread_cond_signal(&s->ahead_work);
	pthread_mutex_unlock(&s->ahead_lock);
	pthread_join(s->ahead, NULL);
	s->has_ahead = false;
}

/* What the COW device holds and its size, before a store is opened on it. */
static int check_device(const struct tfs_cowsnap_params *p, struct tfs_bdev *cow, uint64_t size,
			bool *fresh)
{
	uint64_t chunk_bytes = (uint64_t)p->chunk_sectors * 512;
	uint64_t need = (p->persistent ? 3 : 1) * chunk_bytes;
	uint8_t head[16];
	char what[256];
	int r;

	if (size < need) {
		tfs_err("[snapshot \"%s\"] cow: %s is %" PRIu64 " bytes, less than the %" PRIu64
			" a %s store with %" PRIu64 "-byte chunks needs (%s)", p->name,
			p->cow, size, need, p->persistent ? "persistent" : "transient",
			chunk_bytes, p->persistent ? "header, one area, one chunk" : "one chunk");
		return -EINVAL;
	}
	r = tfs_bdev_read(cow, head, sizeof(head), 0);
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: cannot read %s: %s", p->name, p->cow,
			strerror(-r));
		return r;
	}
	/* "SnAp": a store already (ours or the kernel's); the store checks the rest. */
	*fresh = !(head[0] == 'S' && head[1] == 'n' && head[2] == 'A' && head[3] == 'p');
	if (!*fresh)
		return 0;
	/*
	 * A transient store's device is scratch between mounts (copies of
	 * origin chunks, file system signatures included), so only a new one
	 * is probed.
	 */
	if (!p->persistent && !p->probe)
		return 0;
	r = tfs_probe_signature(p->cow, what, sizeof(what));
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: cannot probe %s: %s", p->name, p->cow,
			strerror(-r));
		return r;
	}
	if (r > 0) {
		tfs_err("[snapshot \"%s\"] cow: %s holds %s; refusing to use it as a COW device "
			"(wipe it first, e.g. wipefs -a)", p->name, p->cow, what);
		return -EINVAL;
	}
	return 0;
}

int tfs_cowsnap_check(const struct tfs_cowsnap_params *p)
{
	struct tfs_bdev *b;
	uint64_t size;
	bool fresh;
	int r;

	if (!tfs_snap_chunk_sectors_ok(p->chunk_sectors)) {
		tfs_err("[snapshot \"%s\"] chunk_size: %" PRIu64 " bytes is not %s", p->name,
			(uint64_t)p->chunk_sectors * 512, TFS_SNAP_CHUNK_RULE);
		return -EINVAL;
	}
	r = tfs_bdev_open(p->cow, true, &b);
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: cannot open %s: %s", p->name, p->cow, strerror(-r));
		return r;
	}
	r = tfs_bdev_size(b, &size);
	if (r == 0)
		r = check_device(p, b, size, &fresh);
	tfs_bdev_close(b);
	return r;
}

int tfs_cowsnap_create(struct tfs_cow_set *set, struct tfs_origin *o,
		       const struct tfs_cowsnap_params *p, struct tfs_cowsnap **out)
{
	struct tfs_cowsnap *s;
	struct tfs_bdev *b, *w;
	uint64_t size;
	bool fresh = true;
	uint32_t cs;
	int r;

	if (!tfs_snap_chunk_sectors_ok(p->chunk_sectors)) {
		tfs_err("[snapshot \"%s\"] chunk_size: %" PRIu64 " bytes is not %s", p->name,
			(uint64_t)p->chunk_sectors * 512, TFS_SNAP_CHUNK_RULE);
		return -EINVAL;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->origin = o;
	snprintf(s->name, sizeof(s->name), "%s", p->name);
	snprintf(s->cow_path, sizeof(s->cow_path), "%s", p->cow);
	s->id = p->id;
	s->from_cfg = p->from_cfg;
	s->persistent = p->persistent;
	s->chunk_bytes = (uint64_t)p->chunk_sectors * 512;
	atomic_init(&s->refs, 1);
	pthread_mutex_init(&s->ahead_lock, NULL);
	pthread_cond_init(&s->ahead_work, NULL);

	r = tfs_bdev_open_direct(p->cow, false, set->direct, &b);
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: cannot open %s: %s", p->name, p->cow, strerror(-r));
		goto err_free;
	}
	if (set->faults) {
		r = tfs_bdev_fault_wrap(b, false, &w);
		if (r < 0) {
			tfs_bdev_close(b);
			goto err_free;
		}
		b = s->fault = w;
	}
	s->cow = b;
	r = tfs_bdev_size(b, &size);
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: %s: cannot read its size: %s", p->name, p->cow,
			strerror(-r));
		goto err_close;
	}
	r = check_device(p, b, size, &fresh);
	if (r < 0)
		goto err_close;
	if (p->persistent)
		r = tfs_snap_store_open(b, p->chunk_sectors, &s->store);
	else
		r = tfs_snap_store_open_transient(b, p->chunk_sectors, &s->store);
	if (r < 0) {
		tfs_err("[snapshot \"%s\"] cow: %s cannot be used: %s", p->name, p->cow,
			strerror(-r));
		goto err_close;
	}
	cs = tfs_snap_store_chunk_sectors(s->store);
	if (cs != p->chunk_sectors)
		tfs_warn("[snapshot \"%s\"] chunk_size: the store on %s has %" PRIu64
			 "-byte chunks: using them, not the %" PRIu64 " configured", p->name,
			 p->cow, (uint64_t)cs * 512, (uint64_t)p->chunk_sectors * 512);
	s->chunk_bytes = (uint64_t)cs * 512;
	/* KEEP_SIZE within the file: never more host space than the COW device's size. */
	r = tfs_prealloc_create(b, s->chunk_bytes, PREALLOC_BYTES, size / s->chunk_bytes,
				"copies into its holes are host allocations, one at a time",
				&s->prealloc);
	if (r < 0)
		goto err_store;
	if (s->chunk_bytes <= ZERO_AHEAD_MAX_CHUNK)
		tfs_prealloc_set_then(s->prealloc, zero_ahead, s);
	if (s->prealloc) {
		struct tfs_prealloc_counts pc;

		tfs_prealloc_counts(s->prealloc, &pc);
		s->region_chunks = pc.chunk_bytes / s->chunk_bytes;
		r = -pthread_create(&s->ahead, NULL, fill_main, s);
		if (r) {
			tfs_err("[snapshot \"%s\"] cow: %s: cannot start the thread that fills it "
				"ahead of its store: %s", p->name, p->cow, strerror(-r));
			goto err_prealloc;
		}
		s->has_ahead = true;
	}
	if (p->fresh)
		*p->fresh = fresh;
	if (tfs_snap_store_valid(s->store) && p->known_invalid && !fresh && p->persistent) {
		/* The header write of the last invalidation failed: try it again. */
		tfs_snap_store_invalidate(s->store);
		tfs_warn("snapshot %s: invalidated before this mount (its header did not say so)",
			 p->name);
	}
	if (!tfs_snap_store_valid(s->store)) {
		/* Invalidated before this mount: listed, its I/O refused, no event again. */
		atomic_store(&s->invalid, true);
		snprintf(s->invalid_why, sizeof(s->invalid_why), "invalidated before this mount");
		s->invalid_reported = true;
		tfs_warn("snapshot %s: the store on %s is marked invalid: its reads and writes "
			 "fail until it is removed", p->name, p->cow);
	}
	s->lw_above = false;
	tfs_cowsnap_check_low_water(s);
	s->lw_reported = s->lw_crossings; /* already past the mark: not a crossing now */
	*out = s;
	return 0;

err_prealloc:
	tfs_prealloc_destroy(s->prealloc);
err_store:
	tfs_snap_store_close(s->store);
err_close:
	tfs_bdev_close(b);
err_free:
	pthread_cond_destroy(&s->ahead_work);
	pthread_mutex_destroy(&s->ahead_lock);
	free(s);
	return r;
}

void tfs_cowsnap_put(struct tfs_cowsnap *s)
{
	int r;

	if (atomic_fetch_sub(&s->refs, 1) != 1)
		return;
	if (!atomic_load(&s->invalid)) {
		r = tfs_bdev_flush(s->cow);
		if (r < 0)
			tfs_err("snapshot %s: final flush of %s failed: %s", s->name, s->cow_path,
				strerror(-r));
	}
	stop_fill_thread(s);
	tfs_prealloc_destroy(s->prealloc);
	tfs_snap_store_close(s->store);
	tfs_bdev_close(s->cow);
	pthread_cond_destroy(&s->ahead_work);
	pthread_mutex_destroy(&s->ahead_lock);
	free(s);
}

void tfs_cowsnap_resized(struct tfs_cowsnap *s, uint64_t total_chunks)
{
	/* Without memory for a longer map the grown part is only never preallocated. */
	if (tfs_prealloc_resize(s->prealloc, total_chunks))
		tfs_warn("snapshot %s: out of memory: the grown part of %s is not preallocated",
			 s->name, s->cow_path);
	/*
	 * The region ahead may have been past the old end (nothing filled) or
	 * cut by it (forgotten now): the next break asks the fill thread again.
	 */
	pthread_mutex_lock(&s->ahead_lock);
	s->ahead_want = s->ahead_done = 0;
	atomic_store(&s->ahead_asked, 0);
	pthread_mutex_unlock(&s->ahead_lock);
}

/* ---- invalidation and low water ---- */

void tfs_cowsnap_invalidate(struct tfs_cowsnap *s, const char *why, int err)
{
	struct tfs_cow_set *set = s->origin->set;

	if (atomic_exchange(&s->invalid, true))
		return;
	tfs_err("snapshot %s: invalidated: %s%s%s", s->name, why, err ? ": " : "",
		err ? strerror(-err) : "");
	/* Header valid = 0 (a failure there is logged by the store; it stays invalid in memory). */
	tfs_snap_store_invalidate(s->store);
	pthread_mutex_lock(&set->events_lock);
	snprintf(s->invalid_why, sizeof(s->invalid_why), "%s%s%s", why, err ? ": " : "",
		 err ? strerror(-err) : "");
	pthread_mutex_unlock(&set->events_lock);
	if (set->notify)
		set->notify(set->notify_arg);
}

/*
 * The same rule as the pool's marks: one crossing when usage passes the
 * mark, re-armed only once it is back below the mark minus 1% of the
 * device, so a store hovering at the mark does not flood the log.
 */
void tfs_cowsnap_check_low_water(struct tfs_cowsnap *s)
{
	struct tfs_cow_set *set = s->origin->set;
	unsigned pct = atomic_load(&set->low_water_percent);
	struct tfs_snap_usage u;
	uint64_t mark, margin;
	bool crossed = false;

	tfs_snap_store_usage(s->store, &u);
	if (!u.total_sectors || !pct)
		return;
	mark = u.total_sectors / 100 * pct + u.total_sectors % 100 * pct / 100;
	margin = u.total_sectors / 100 ? u.total_sectors / 100 : 1;
	pthread_mutex_lock(&set->events_lock);
	if (!s->lw_above && u.allocated_sectors > mark) {
		s->lw_above = true;
		s->lw_crossings++;
		crossed = true;
	} else if (s->lw_above && u.allocated_sectors + margin < mark) {
		s->lw_above = false;
	}
	pthread_mutex_unlock(&set->events_lock);
	if (crossed && set->notify)
		set->notify(set->notify_arg);
}

/* ---- copies ---- */

/*
 * Copy origin chunk `chunk` to COW chunk `to`: what the origin has of it
 * (its last chunk may be short; the rest of that COW chunk is never read).
 * -errno; the caller invalidates.
 */
static int copy_chunk(struct tfs_cowsnap *s, uint64_t chunk, uint64_t to)
{
	struct tfs_origin *o = s->origin;
	uint64_t from = chunk * s->chunk_bytes, len, done = 0;
	size_t piece;
	void *buf;
	int r = 0;

	if (from >= o->size)
		return 0;
	len = o->size - from < s->chunk_bytes ? o->size - from : s->chunk_bytes;
	piece = len < COPY_PIECE ? (size_t)len : COPY_PIECE;
	buf = tfs_scratch_get(piece);
	if (!buf)
		return -ENOMEM;
	while (!r && done < len) {
		size_t n = len - done < piece ? (size_t)(len - done) : piece;

		r = tfs_dev_read(o->dev, buf, n, from + done);
		if (r == 0)
			r = tfs_bdev_write(s->cow, buf, n, to * s->chunk_bytes + done);
		done += n;
	}
	tfs_scratch_put(buf, piece);
	return r;
}

/* Copies waiting for their commit. */
struct batch {
	uint64_t chunk[BATCH];
	unsigned n;
};

/*
 * Step 3 of the ordering contract (the store flushes the data first).
 * 0, or -EIO after invalidating s.
 */
static int batch_commit(struct tfs_cowsnap *s, struct batch *b)
{
	int r;

	if (!b->n)
		return 0;
	r = tfs_snap_store_commit_batch(s->store, b->chunk, b->n);
	if (r < 0)
		tfs_cowsnap_invalidate(s, "writing an exception to the COW store failed", r);
	b->n = 0;
	return r < 0 ? -EIO : 0;
}

/*
 * The store hands out COW chunks in order: make sure the region of `to`
 * is preallocated (normally it is: the fill thread did it while the
 * writers were in the region before) and have the thread start on the
 * next one, once per region (an atomic load on every other break).
 * Failures cost only speed (the copy then allocates on the host as it
 * writes) and are counted in status.
 */
static void prealloc_ahead(struct tfs_cowsnap *s, uint64_t to)
{
	uint64_t next;

	if (!s->prealloc)
		return;
	tfs_prealloc_fill(s->prealloc, to);
	next = (to / s->region_chunks + 1) * s->region_chunks;
	if (atomic_load(&s->ahead_asked) >= next)
		return;
	pthread_mutex_lock(&s->ahead_lock);
	if (s->ahead_want < next) {
		s->ahead_want = next;
		pthread_cond_signal(&s->ahead_work);
	}
	atomic_store(&s->ahead_asked, s->ahead_want);
	pthread_mutex_unlock(&s->ahead_lock);
}

/*
 * Give chunk a COW chunk (step 1), copying the origin's data into it
 * unless the caller overwrites the whole chunk.  0 and *to, or -EIO
 * after invalidating s.
 */
static int new_exception(struct tfs_cowsnap *s, uint64_t chunk, bool copy, uint64_t *to)
{
	int r = tfs_snap_store_allocate(s->store, chunk, to);

	if (r == -ENOSPC) {
		tfs_cowsnap_invalidate(s, "the COW store is full", 0);
		return -EIO;
	}
	if (r < 0) {
		tfs_cowsnap_invalidate(s, "cannot allocate a COW chunk", r);
		return -EIO;
	}
	tfs_cowsnap_check_low_water(s);
	prealloc_ahead(s, *to);
	if (!copy)
		return 0;
	r = copy_chunk(s, chunk, *to);
	if (r < 0) {
		tfs_cowsnap_invalidate(s, "copying a chunk to the COW device failed", r);
		return -EIO;
	}
	return 0;
}

/*
 * Copy origin chunks old .. old + n - 1 (n * chunk size at most COPY_PIECE)
 * to their new COW chunks to[]: one read of the origin, one write per run
 * of consecutive COW chunks (usually one: allocation goes in order).
 */
static int copy_run(struct tfs_cowsnap *s, uint64_t old, const uint64_t *to, unsigned n,
		    struct tfs_origin_bytes *src)
{
	struct tfs_origin *o = s->origin;
	uint64_t cb = s->chunk_bytes, from = old * cb, len;
	size_t size = (size_t)(n * cb);
	uint8_t *buf = NULL;
	int r;

	if (from >= o->size)
		return 0;
	len = o->size - from < n * cb ? o->size - from : n * cb;
	if (src && src->len && from >= src->begin && from + len <= src->begin + src->len) {
		tfs_origin_bytes_read(o, src);
		r = src->err;
		if (!r)
			buf = src->buf + (from - src->begin);
		size = 0;
	} else {
		buf = tfs_scratch_get(size);
		r = buf ? tfs_dev_read(o->dev, buf, (size_t)len, from) : -ENOMEM;
	}
	for (unsigned i = 0, j; !r && i < n && i * cb < len; i = j + 1) {
		uint64_t bytes;

		for (j = i; j + 1 < n && to[j + 1] == to[j] + 1 && (j + 1) * cb < len; j++)
			;
		bytes = (j + 1) * cb < len ? (j + 1 - i) * cb : len - i * cb;
		r = tfs_bdev_write(s->cow, buf + i * cb, (size_t)bytes, to[i] * cb);
	}
	if (size)
		tfs_scratch_put(buf, size);
	return r;
}

void tfs_origin_bytes_read(struct tfs_origin *o, struct tfs_origin_bytes *src)
{
	if (!src->len || src->buf || src->err)
		return;
	src->buf = tfs_scratch_get((size_t)src->len);
	src->err = !src->buf ? -ENOMEM : tfs_dev_read(o->dev, src->buf, (size_t)src->len, src->begin);
}

void tfs_cowsnap_copy_out(struct tfs_cowsnap *s, uint64_t off, uint64_t len,
			  struct tfs_origin_bytes *src)
{
	uint64_t first = off / s->chunk_bytes, last = (off + len - 1) / s->chunk_bytes, to;
	unsigned max_run = s->chunk_bytes < COPY_PIECE ? (unsigned)(COPY_PIECE / s->chunk_bytes) : 1;
	struct batch b = { .n = 0 };
	uint64_t run_to[BATCH];
	int r;

	if (max_run > BATCH)
		max_run = BATCH;
	for (uint64_t c = first; c <= last;) {
		unsigned n = 0;

		if (atomic_load(&s->invalid))
			return;
		if (tfs_snap_store_lookup(s->store, c, &to) == 0) {
			c++;
			continue;
		}
		/* A run of chunks none of which is copied yet, allocated in order. */
		while (n < max_run && b.n + n < BATCH && c + n <= last &&
		       (n == 0 || tfs_snap_store_lookup(s->store, c + n, &to) < 0)) {
			if (new_exception(s, c + n, false, &run_to[n]) < 0)
				return;
			b.chunk[b.n + n] = c + n;
			n++;
		}
		r = s->chunk_bytes <= COPY_PIECE ? copy_run(s, c, run_to, n, src)
						  : copy_chunk(s, c, run_to[0]);
		if (r < 0) {
			tfs_cowsnap_invalidate(s, "copying a chunk to the COW device failed", r);
			return;
		}
		b.n += n;
		c += n;
		if (b.n == BATCH && batch_commit(s, &b) < 0)
			return;
	}
	batch_commit(s, &b);
}

/* ---- the cow-snapshot target ---- */

struct snap_handle {
	struct tfs_dev dev; /* first: the handle callers hold */
	struct tfs_cowsnap *s;
	bool read_only, status_only;
};

static struct snap_handle *sh_of(struct tfs_dev *dev)
{
	return (struct snap_handle *)dev;
}

static int may_io(const struct snap_handle *h, bool write)
{
	if (h->status_only)
		return -EBADF;
	if (write && h->read_only)
		return -EROFS;
	/* A merging snapshot's file is gone; a handle opened before cannot reach its chunks. */
	return atomic_load(&h->s->invalid) || atomic_load(&h->s->merging) ? -EIO : 0;
}

int tfs_cowsnap_read_locked(struct tfs_cowsnap *s, void *buf, size_t len, uint64_t off)
{
	struct tfs_origin *o = s->origin;
	uint64_t pos = off, end = off + len, to;
	int r = 0;

	while (!r && pos < end) {
		uint64_t c = pos / s->chunk_bytes, in = pos % s->chunk_bytes, next, t;
		uint64_t n = s->chunk_bytes - in < end - pos ? s->chunk_bytes - in : end - pos;
		uint8_t *dst = (uint8_t *)buf + (pos - off);
		bool copied = tfs_snap_store_lookup(s->store, c, &to) == 0;

		/* One read for a run of chunks from the same place, contiguous there. */
		for (next = c + 1; pos + n < end; next++) {
			bool more = tfs_snap_store_lookup(s->store, next, &t) == 0;

			if (more != copied || (copied && t != to + (next - c)))
				break;
			n += s->chunk_bytes < end - pos - n ? s->chunk_bytes : end - pos - n;
		}
		if (copied) {
			r = tfs_bdev_read(s->cow, dst, (size_t)n, to * s->chunk_bytes + in);
			if (r < 0) {
				tfs_cowsnap_invalidate(s, "reading the COW device failed", r);
				r = -EIO;
			}
		} else {
			r = tfs_dev_read(o->dev, dst, (size_t)n, pos);
		}
		pos += n;
	}
	return r;
}

static int snap_read(struct tfs_dev *dev, void *buf, size_t len, uint64_t off)
{
	struct snap_handle *h = sh_of(dev);
	struct tfs_cowsnap *s = h->s;
	struct tfs_origin *o = s->origin;
	struct tfs_core_io io;
	uint64_t b, e;
	int r = may_io(h, false);

	if (r || !len)
		return r;
	tfs_origin_io_begin(o, &io, s->id);
	tfs_origin_lock_range(o, off, len, &b, &e);
	r = tfs_prison_lock_shared(o->prison, 0, b, e);
	if (r < 0)
		goto out;
	r = tfs_cowsnap_read_locked(s, buf, len, off);
	tfs_prison_unlock_shared(o->prison, 0, b, e);
	/* Invalidated meanwhile (a full store): what was read may be half of it. */
	if (!r && atomic_load(&s->invalid))
		r = -EIO;
out:
	tfs_origin_io_end(o, &io);
	return r;
}

/* o->lock held shared. */
static int snap_write_locked(struct tfs_cowsnap *s, const void *buf, size_t len, uint64_t off)
{
	struct tfs_origin *o = s->origin;
	uint64_t b, e, pos = off, end = off + len, to;
	struct batch batch = { .n = 0 };
	int r;

	tfs_origin_lock_range(o, off, len, &b, &e);
	r = tfs_prison_lock(o->prison, 0, b, e);
	if (r < 0)
		return r;
	while (!r && pos < end) {
		uint64_t c = pos / s->chunk_bytes, in = pos % s->chunk_bytes;
		size_t n = (size_t)(s->chunk_bytes - in < end - pos ? s->chunk_bytes - in
								       : end - pos);
		bool whole = in == 0 && n == s->chunk_bytes;

		if (atomic_load(&s->invalid)) {
			r = -EIO;
			break;
		}
		if (tfs_snap_store_lookup(s->store, c, &to) < 0) {
			r = new_exception(s, c, !whole, &to);
			if (r < 0)
				break;
			batch.chunk[batch.n++] = c;
		}
		r = tfs_bdev_write(s->cow, (const uint8_t *)buf + (pos - off), n,
				   to * s->chunk_bytes + in);
		if (r < 0) {
			tfs_cowsnap_invalidate(s, "writing the COW device failed", r);
			r = -EIO;
			break;
		}
		if (batch.n == BATCH)
			r = batch_commit(s, &batch);
		pos += n;
	}
	if (!r)
		r = batch_commit(s, &batch);
	tfs_prison_unlock(o->prison, 0, b, e);
	return r;
}

static int snap_write(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	struct snap_handle *h = sh_of(dev);
	struct tfs_cowsnap *s = h->s;
	struct tfs_core_io io;
	int r = may_io(h, true);

	if (r || !len)
		return r;
	if (off > s->origin->size || len > s->origin->size - off)
		return -ENOSPC;
	tfs_origin_io_begin(s->origin, &io, s->id);
	r = snap_write_locked(s, buf, len, off);
	tfs_origin_io_end(s->origin, &io);
	return r;
}

static int snap_flush(struct tfs_dev *dev)
{
	struct snap_handle *h = sh_of(dev);
	struct tfs_core_io io;
	int r = may_io(h, false);

	if (r)
		return r;
	tfs_origin_io_begin(h->s->origin, &io, h->s->id);
	r = tfs_bdev_flush(h->s->cow);
	tfs_origin_io_end(h->s->origin, &io);
	if (r < 0) {
		tfs_cowsnap_invalidate(h->s, "COW device flush failed", r);
		return -EIO;
	}
	return 0;
}

static int snap_zero_range(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	struct snap_handle *h = sh_of(dev);
	struct tfs_cowsnap *s = h->s;
	struct tfs_core_io io;
	int r = may_io(h, true);

	if (r)
		return r;
	if (off > s->origin->size || len > s->origin->size - off)
		return -ENOSPC;
	tfs_origin_io_begin(s->origin, &io, s->id);
	while (!r && len) {
		size_t n = len < ZERO_PIECE ? (size_t)len : ZERO_PIECE;

		r = snap_write_locked(s, zeros, n, off);
		off += n;
		len -= n;
	}
	tfs_origin_io_end(s->origin, &io);
	return r;
}

/* A COW chunk, once handed out, is never given back (as in the kernel). */
static int snap_discard(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	int r = may_io(sh_of(dev), true);

	(void)off;
	(void)len;
	return r ? r : -EOPNOTSUPP;
}

/* COW chunks are taken as they are written; nothing lies past the origin's end. */
static int snap_provision(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	struct snap_handle *h = sh_of(dev);
	int r = may_io(h, true);

	if (!r && (off > h->s->origin->size || len > h->s->origin->size - off))
		r = -ENOSPC;
	return r;
}

static int snap_seek(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size,
		     uint64_t *out)
{
	int r = may_io(sh_of(dev), false);

	return r ? r : tfs_dev_seek_all_data(off, whence, size, out);
}

static int snap_get_size(struct tfs_dev *dev, uint64_t *bytes)
{
	*bytes = sh_of(dev)->s->origin->size;
	return 0;
}

static int snap_allocated(struct tfs_dev *dev, uint64_t *bytes)
{
	struct tfs_snap_usage u;

	tfs_snap_store_usage(sh_of(dev)->s->store, &u);
	*bytes = u.allocated_sectors * 512;
	return 0;
}

static void snap_status(struct tfs_dev *dev, struct tfs_status_sink *sink)
{
	struct tfs_cowsnap *s = sh_of(dev)->s;
	bool valid = !atomic_load(&s->invalid), merging = atomic_load(&s->merging);
	struct tfs_prealloc_counts pc;
	struct tfs_snap_usage u;
	char line[80];

	tfs_snap_store_usage(s->store, &u);
	tfs_status_text(sink, "origin", s->origin->name);
	tfs_status_flag(sink, "persistent", s->persistent);
	tfs_status_u64(sink, "chunk_size", s->chunk_bytes);
	tfs_status_flag(sink, "valid", valid);
	tfs_status_flag(sink, "merging", merging);
	if (merging)
		tfs_status_u64(sink, "merge_remaining_chunks", tfs_snap_store_count(s->store));
	tfs_status_text(sink, "device", s->cow_path);
	tfs_status_flag(sink, "suspended", tfs_core_suspended(s->origin->core, TFS_CORE_POOL) ||
			tfs_core_suspended(s->origin->core, s->id));
	tfs_status_u64(sink, "held_in_core", tfs_core_nr_held(s->origin->core, s->id));
	tfs_status_begin(sink, "cow");
	tfs_status_u64(sink, "total_sectors", u.total_sectors);
	tfs_status_u64(sink, "allocated_sectors", u.allocated_sectors);
	tfs_status_u64(sink, "metadata_sectors", u.metadata_sectors);
	tfs_status_end(sink);
	/* The COW file's host space reserved ahead of the store (not part of its usage). */
	tfs_prealloc_counts(s->prealloc, &pc);
	tfs_status_begin(sink, "preallocate");
	tfs_status_flag(sink, "active", pc.active);
	tfs_status_u64(sink, "chunk_bytes", pc.chunk_bytes);
	tfs_status_u64(sink, "chunks", pc.chunks);
	tfs_status_u64(sink, "fallocates", pc.fallocates);
	tfs_status_u64(sink, "failures", pc.failures);
	tfs_status_u64(sink, "zeroed_bytes", atomic_load(&s->zeroed_bytes));
	tfs_status_end(sink);
	/* dm's snapshot status line (snapshot-merge's while merging: the same numbers). */
	if (atomic_load(&s->merge_failed))
		snprintf(line, sizeof(line), "Merge failed");
	else if (valid)
		snprintf(line, sizeof(line), "%" PRIu64 "/%" PRIu64 " %" PRIu64,
			 u.allocated_sectors, u.total_sectors, u.metadata_sectors);
	else
		snprintf(line, sizeof(line), "Invalid");
	tfs_status_text(sink, "dm_status", line);
}

static void snap_close(struct tfs_dev *dev)
{
	struct snap_handle *h = sh_of(dev);

	tfs_cowsnap_put(h->s);
	free(h);
}

static const struct tfs_dev_ops snap_ops = {
	.kind = "cow-snapshot",
	.read = snap_read,
	.write = snap_write,
	.flush = snap_flush,
	.discard = snap_discard,
	.zero_range = snap_zero_range,
	.provision = snap_provision,
	.seek = snap_seek,
	.get_size = snap_get_size,
	.truncate = tfs_dev_truncate_fixed,
	.allocated = snap_allocated,
	.status = snap_status,
	.close = snap_close,
};

/* set->lock held (the snapshot stays in the set meanwhile). */
int tfs_cowsnap_open_dev(struct tfs_cowsnap *s, unsigned flags, struct tfs_dev **out)
{
	struct snap_handle *h = calloc(1, sizeof(*h));

	if (!h)
		return -ENOMEM;
	h->dev.ops = &snap_ops;
	h->s = s;
	h->read_only = flags & TFS_DEV_READ_ONLY;
	h->status_only = flags & TFS_DEV_STATUS_ONLY;
	atomic_fetch_add(&s->refs, 1);
	*out = &h->dev;
	return 0;
}
