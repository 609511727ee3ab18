/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dm-snapshot exception store: persistent (the kernel's COW layout) and
 * transient.  docs/cow-store.md describes the layout in prose.
 *
 * On disk, all little-endian, chunk = chunk_sectors * 512 bytes:
 *
 *   chunk 0, the header (rest of the chunk zero)
 *     OFFSET SIZE DESCRIPTION
 *          0    4 magic 0x70416E53 ("SnAp" as bytes)
 *          4    4 valid: 1 usable, 0 invalidated for good
 *          8    4 version: 1
 *         12    4 chunk size in sectors (wins over the configured one)
 *
 *   area i at chunk 1 + (E + 1) * i, E = chunk bytes / 16, followed by the
 *   E data chunks it describes; an area is E records of
 *          0    8 old_chunk (origin)
 *          8    8 new_chunk (COW); 0 ends the whole table
 *   A full area (no 0) means the table goes on in the next one.
 *
 * What we write differs from the kernel only in how much: the kernel writes
 * whole chunks (an area of a 1 GiB chunk is 1 GiB), we write the 4 KiB
 * blocks whose records changed plus the block holding the terminator, and
 * zero only the first block of a new area.  A reader stops at the first
 * terminator, so what lies after it never matters, and both layouts read
 * the same in either implementation.
 */
#include "snap-store.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"
#include "log.h"

#define SNAP_MAGIC 0x70416E53u
#define SNAP_VERSION 1u
#define SNAP_HDR_VALID 4
#define SNAP_HDR_VERSION 8
#define SNAP_HDR_CHUNK 12
#define SNAP_REC_SIZE 16u
/* Unit of area I/O: the alignment O_DIRECT needs, and at most a chunk. */
#define SNAP_IO_BLOCK 4096u
#define SNAP_RECS_PER_BLOCK (SNAP_IO_BLOCK / SNAP_REC_SIZE)
/* One area write moves at most this much at a time (preallocated). */
#define SNAP_WBUF_SIZE ((size_t)64 << 10)
/* Areas are read in pieces of this size, so a 1 GiB chunk costs 1 MiB of memory. */
#define SNAP_READ_PIECE ((uint64_t)1 << 20)
/* Never an origin chunk: the hash table's empty slot. */
#define NO_CHUNK UINT64_MAX
/*
 * In the exception table's value: the exception is allocated but not yet
 * durable (its copy may be in progress).  COW chunk numbers never get
 * near it; lookups strip it, tfs_snap_store_durable tests it.
 */
#define NOT_DURABLE ((uint64_t)1 << 63)

_Static_assert(SNAP_IO_BLOCK <= TFS_SNAP_MIN_CHUNK_SECTORS << TFS_SECTOR_SHIFT,
	       "an I/O block must fit in the smallest chunk");
_Static_assert(SNAP_WBUF_SIZE % SNAP_IO_BLOCK == 0, "write buffer holds whole blocks");

struct rec {
	uint64_t old_chunk, new_chunk;
};

/*
 * A committer waiting for its records to become durable, on its own
 * stack.  Each has its own semaphore, so the stager wakes exactly the
 * committers a stage finished, and they return without taking mu (which
 * the stager holds into the next stage): a broadcast woke every waiter
 * on the 2-core bench, most of them to sleep again, and the few that
 * could go on queued for mu behind the others (bench/README.md, cowlat
 * branch).
 */
struct waiter {
	uint64_t upto; /* durable once n_durable reaches this */
	int r;	       /* 0, or -EIO: the store became invalid */
	sem_t done;
	/* On the list: the next waiter; once woken: the next one to post. */
	struct waiter *next;
};

/*
 * Open addressing with linear probing; deletion shifts the cluster back,
 * so there are no tombstones and lookups stay O(1) through a merge.
 */
struct xtable {
	uint64_t *keys, *vals;
	unsigned bits;
	size_t n;
};

struct tfs_snap_store {
	struct tfs_bdev *cow;
	bool persistent;
	uint32_t chunk_sectors;
	uint64_t chunk_bytes;
	uint64_t per_area; /* E: records in an area */
	atomic_bool valid;
	atomic_bool invalidated; /* tfs_snap_store_invalidate has run */
	/* The header with valid = 0, ready so that invalidation needs no memory. */
	uint8_t *invalid_hdr;
	/* Area writes; used only by the thread that set writing. */
	uint8_t *wbuf;

	pthread_rwlock_t table_lock;
	struct xtable table; /* old -> new (| NOT_DURABLE), every exception; under table_lock */

	pthread_mutex_t mu;
	/*
	 * A persistent store's commit stages run on a thread of its own, one
	 * after the other with no hand-off between them (a committer woken to
	 * run the next stage cost about 15% of each stage's time under COW
	 * breaks: bench/README.md, cowflush branch).  Committers only add
	 * their records and wait.
	 */
	pthread_t stager;
	bool has_stager; /* persistent stores, from open to close */
	bool stopping;       /* under mu: close is waiting for the stager to end */
	pthread_cond_t work; /* records await a stage, or stopping */
	/* Under mu: */
	uint64_t dev_bytes, total_chunks, next_free;
	struct xtable pending; /* old -> new, allocated and not yet committed */
	struct rec *recs;      /* committed, in area order (persistent only) */
	uint64_t n_recs, cap_recs;
	uint64_t n_durable; /* recs[0..n_durable) are on disk and flushed */
	bool writing;       /* a thread runs a commit stage or a merge's area write */
	uint64_t n_flushed; /* recs[0..n_flushed) have their chunks' data flushed */
	/* Committers waiting, in the order of their records (upto ascending). */
	struct waiter *waiters, **waiters_tail;
};

static void *stager_main(void *arg);

/* ---- the hash table ------------------------------------------------------ */

static size_t xt_home(const struct xtable *t, uint64_t key)
{
	return (size_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - t->bits));
}

static bool xt_find(const struct xtable *t, uint64_t key, uint64_t *val)
{
	if (!t->n)
		return false;
	size_t mask = ((size_t)1 << t->bits) - 1;
	for (size_t i = xt_home(t, key);; i = (i + 1) & mask) {
		if (t->keys[i] == NO_CHUNK)
			return false;
		if (t->keys[i] == key) {
			if (val)
				*val = t->vals[i];
			return true;
		}
	}
}

/* Insert a key that is not there; room must have been reserved. */
static void xt_put(struct xtable *t, uint64_t key, uint64_t val)
{
	size_t mask = ((size_t)1 << t->bits) - 1;
	size_t i = xt_home(t, key);
	while (t->keys[i] != NO_CHUNK)
		i = (i + 1) & mask;
	t->keys[i] = key;
	t->vals[i] = val;
	t->n++;
}

static int xt_rehash(struct xtable *t, unsigned bits)
{
	size_t cap = (size_t)1 << bits;
	uint64_t *keys = malloc(cap * sizeof(*keys));
	uint64_t *vals = malloc(cap * sizeof(*vals));
	if (!keys || !vals) {
		free(keys);
		free(vals);
		return -ENOMEM;
	}
	memset(keys, 0xFF, cap * sizeof(*keys));
	struct xtable old = *t;
	*t = (struct xtable){ .keys = keys, .vals = vals, .bits = bits };
	if (old.keys) {
		for (size_t i = 0; i < (size_t)1 << old.bits; i++)
			if (old.keys[i] != NO_CHUNK)
				xt_put(t, old.keys[i], old.vals[i]);
	}
	free(old.keys);
	free(old.vals);
	return 0;
}

/* Make room for more keys, keeping the load at most one half. */
static int xt_reserve(struct xtable *t, size_t more)
{
	unsigned bits = t->bits ? t->bits : 4;
	while ((t->n + more) * 2 > (size_t)1 << bits)
		bits++;
	return bits != t->bits ? xt_rehash(t, bits) : 0;
}

/* Clear bits of key's value, if key is there. */
static void xt_clear_bits(struct xtable *t, uint64_t key, uint64_t bits)
{
	if (!t->n)
		return;
	size_t mask = ((size_t)1 << t->bits) - 1;
	for (size_t i = xt_home(t, key); t->keys[i] != NO_CHUNK; i = (i + 1) & mask) {
		if (t->keys[i] == key) {
			t->vals[i] &= ~bits;
			return;
		}
	}
}

static void xt_del(struct xtable *t, uint64_t key)
{
	if (!t->n)
		return;
	size_t mask = ((size_t)1 << t->bits) - 1;
	size_t i = xt_home(t, key);
	while (t->keys[i] != key) {
		if (t->keys[i] == NO_CHUNK)
			return;
		i = (i + 1) & mask;
	}
	/* Pull back every later member of the cluster that may live at i. */
	for (size_t j = (i + 1) & mask; t->keys[j] != NO_CHUNK; j = (j + 1) & mask) {
		size_t home = xt_home(t, t->keys[j]);
		bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
		if (!stays) {
			t->keys[i] = t->keys[j];
			t->vals[i] = t->vals[j];
			i = j;
		}
	}
	t->keys[i] = NO_CHUNK;
	t->n--;
}

static void xt_free(struct xtable *t)
{
	free(t->keys);
	free(t->vals);
	*t = (struct xtable){ 0 };
}

/* ---- geometry ------------------------------------------------------------ */

bool tfs_snap_chunk_sectors_ok(uint64_t sectors)
{
	return sectors >= TFS_SNAP_MIN_CHUNK_SECTORS && sectors <= TFS_SNAP_MAX_CHUNK_SECTORS &&
	       (sectors & (sectors - 1)) == 0;
}

static uint64_t area_chunk(const struct tfs_snap_store *s, uint64_t area)
{
	return 1 + (s->per_area + 1) * area;
}

/* The header or an area: never a data chunk. */
static bool is_meta_chunk(const struct tfs_snap_store *s, uint64_t chunk)
{
	return chunk == 0 || (chunk - 1) % (s->per_area + 1) == 0;
}

static void set_geometry(struct tfs_snap_store *s, uint32_t chunk_sectors, uint64_t dev_bytes)
{
	s->chunk_sectors = chunk_sectors;
	s->chunk_bytes = (uint64_t)chunk_sectors << TFS_SECTOR_SHIFT;
	s->per_area = s->chunk_bytes / SNAP_REC_SIZE;
	s->dev_bytes = dev_bytes;
	s->total_chunks = dev_bytes / s->chunk_bytes;
}

static int store_new(struct tfs_bdev *cow, bool persistent, struct tfs_snap_store **out)
{
	struct tfs_snap_store *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->cow = cow;
	s->persistent = persistent;
	atomic_init(&s->valid, true);
	atomic_init(&s->invalidated, false);
	if (posix_memalign((void **)&s->invalid_hdr, SNAP_IO_BLOCK, SNAP_IO_BLOCK) ||
	    posix_memalign((void **)&s->wbuf, SNAP_IO_BLOCK, SNAP_WBUF_SIZE)) {
		free(s->invalid_hdr);
		free(s);
		return -ENOMEM;
	}
	pthread_rwlock_init(&s->table_lock, NULL);
	pthread_mutex_init(&s->mu, NULL);
	pthread_cond_init(&s->work, NULL);
	s->waiters_tail = &s->waiters;
	*out = s;
	return 0;
}

void tfs_snap_store_close(struct tfs_snap_store *s)
{
	if (!s)
		return;
	if (s->has_stager) {
		pthread_mutex_lock(&s->mu);
		s->stopping = true;
		pthread_cond_signal(&s->work);
		pthread_mutex_unlock(&s->mu);
		pthread_join(s->stager, NULL);
	}
	xt_free(&s->table);
	xt_free(&s->pending);
	free(s->recs);
	free(s->invalid_hdr);
	free(s->wbuf);
	pthread_rwlock_destroy(&s->table_lock);
	pthread_mutex_destroy(&s->mu);
	pthread_cond_destroy(&s->work);
	free(s);
}

static int reserve_recs(struct tfs_snap_store *s, uint64_t want)
{
	if (want <= s->cap_recs)
		return 0;
	uint64_t cap = s->cap_recs ? s->cap_recs : 256;
	while (cap < want)
		cap *= 2;
	struct rec *r = realloc(s->recs, cap * sizeof(*r));
	if (!r)
		return -ENOMEM;
	s->recs = r;
	s->cap_recs = cap;
	return 0;
}

/* ---- reading the header and the areas ------------------------------------ */

struct snap_header {
	bool fresh; /* chunk 0 all zero */
	bool valid;
	uint32_t chunk_sectors;
};

static void build_header(uint8_t *block, bool valid, uint32_t chunk_sectors)
{
	memset(block, 0, SNAP_IO_BLOCK);
	tfs_put_le32(block, SNAP_MAGIC);
	tfs_put_le32(block + SNAP_HDR_VALID, valid ? 1 : 0);
	tfs_put_le32(block + SNAP_HDR_VERSION, SNAP_VERSION);
	tfs_put_le32(block + SNAP_HDR_CHUNK, chunk_sectors);
}

static bool all_zero(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return false;
	return true;
}

/*
 * Classify chunk 0.  zero_bytes: how much of it must be zero for a fresh
 * store (the configured chunk).  -EINVAL with the reason in why.
 */
static int read_header(struct tfs_bdev *cow, uint64_t zero_bytes, struct snap_header *h,
		       char *why, size_t why_len)
{
	uint64_t piece = zero_bytes < SNAP_READ_PIECE ? zero_bytes : SNAP_READ_PIECE;
	uint8_t *buf;
	if (posix_memalign((void **)&buf, SNAP_IO_BLOCK, piece))
		return -ENOMEM;
	int r = tfs_bdev_read(cow, buf, SNAP_IO_BLOCK, 0);
	if (r) {
		snprintf(why, why_len, "reading the COW header failed: %s", strerror(-r));
		goto out;
	}
	*h = (struct snap_header){ 0 };
	uint32_t magic = tfs_le32(buf);
	if (magic == 0) {
		/* The kernel looks at the magic only; a stray signature further on is refused too. */
		for (uint64_t off = 0; off < zero_bytes; off += piece) {
			r = tfs_bdev_read(cow, buf, piece, off);
			if (r) {
				snprintf(why, why_len, "reading chunk 0 failed: %s", strerror(-r));
				goto out;
			}
			if (!all_zero(buf, piece)) {
				snprintf(why, why_len,
					 "no SnAp header, yet chunk 0 is not all zero (byte %" PRIu64
					 " on holds data): not a COW store",
					 off);
				r = -EINVAL;
				goto out;
			}
		}
		h->fresh = true;
		goto out;
	}
	if (magic != SNAP_MAGIC) {
		snprintf(why, why_len, "not a COW store: chunk 0 starts with magic 0x%08" PRIx32
			 ", not SnAp (0x%08x)", magic, SNAP_MAGIC);
		r = -EINVAL;
		goto out;
	}
	uint32_t valid = tfs_le32(buf + SNAP_HDR_VALID);
	uint32_t version = tfs_le32(buf + SNAP_HDR_VERSION);
	uint32_t chunk = tfs_le32(buf + SNAP_HDR_CHUNK);
	r = -EINVAL;
	if (version != SNAP_VERSION)
		snprintf(why, why_len, "COW header version %" PRIu32 " is unknown (only %u is)",
			 version, SNAP_VERSION);
	else if (valid > 1)
		snprintf(why, why_len, "COW header valid field is %" PRIu32 " (0 or 1 expected)",
			 valid);
	else if (!tfs_snap_chunk_sectors_ok(chunk))
		snprintf(why, why_len, "COW header chunk size %" PRIu32 " sectors is not "
			 TFS_SNAP_CHUNK_RULE, chunk);
	else
		r = 0;
	h->valid = valid == 1;
	h->chunk_sectors = chunk;
out:
	free(buf);
	return r;
}

/*
 * Read every area into s->table and s->recs, checking each record.  The
 * COW side is always checked (a store pointing outside itself cannot be
 * used); origin_chunks, when not 0, bounds the old side too.
 */
static int load_areas(struct tfs_snap_store *s, uint64_t origin_chunks, char *why, size_t why_len)
{
	uint64_t piece = s->chunk_bytes < SNAP_READ_PIECE ? s->chunk_bytes : SNAP_READ_PIECE;
	struct xtable used = { 0 }; /* new -> old, to catch a COW chunk used twice */
	uint8_t *buf;
	if (posix_memalign((void **)&buf, SNAP_IO_BLOCK, piece))
		return -ENOMEM;
	int r = 0;
	uint64_t max_new = 1;
	for (uint64_t area = 0;; area++) {
		uint64_t where = area_chunk(s, area);
		/* Full areas up to the device's end: the kernel would fail to read on. */
		if (where >= s->total_chunks)
			goto done;
		for (uint64_t off = 0; off < s->chunk_bytes; off += piece) {
			r = tfs_bdev_read(s->cow, buf, piece, where * s->chunk_bytes + off);
			if (r) {
				snprintf(why, why_len, "reading metadata area %" PRIu64 " failed: %s",
					 area, strerror(-r));
				goto out;
			}
			for (uint64_t i = 0; i < piece / SNAP_REC_SIZE; i++) {
				uint64_t old = tfs_le64(buf + i * SNAP_REC_SIZE);
				uint64_t new = tfs_le64(buf + i * SNAP_REC_SIZE + 8);
				uint64_t slot = off / SNAP_REC_SIZE + i, prev;
				if (new == 0)
					goto done;
				r = -EINVAL;
				if (new >= s->total_chunks || is_meta_chunk(s, new)) {
					snprintf(why, why_len, "exception %" PRIu64 " in area %" PRIu64
						 " points at COW chunk %" PRIu64 ", %s", slot, area, new,
						 new >= s->total_chunks ? "past the device's end"
									 : "a metadata chunk");
					goto out;
				}
				if (old == NO_CHUNK || (origin_chunks && old >= origin_chunks)) {
					snprintf(why, why_len, "exception %" PRIu64 " in area %" PRIu64
						 " is for origin chunk %" PRIu64 ", past the origin's end",
						 slot, area, old);
					goto out;
				}
				if (xt_find(&s->table, old, &prev)) {
					snprintf(why, why_len, "origin chunk %" PRIu64 " is recorded twice "
						 "(COW chunks %" PRIu64 " and %" PRIu64 ")", old, prev, new);
					goto out;
				}
				if (xt_find(&used, new, &prev)) {
					snprintf(why, why_len, "COW chunk %" PRIu64 " is used twice "
						 "(origin chunks %" PRIu64 " and %" PRIu64 ")", new, prev, old);
					goto out;
				}
				r = xt_reserve(&s->table, 1);
				if (!r)
					r = xt_reserve(&used, 1);
				if (!r)
					r = reserve_recs(s, s->n_recs + 1);
				if (r) {
					snprintf(why, why_len, "out of memory loading exceptions");
					goto out;
				}
				xt_put(&s->table, old, new);
				xt_put(&used, new, old);
				s->recs[s->n_recs++] = (struct rec){ old, new };
				if (new > max_new)
					max_new = new;
			}
		}
	}
done:
	r = 0;
	s->n_durable = s->n_flushed = s->n_recs;
	s->next_free = max_new + 1;
	if (is_meta_chunk(s, s->next_free))
		s->next_free++;
out:
	xt_free(&used);
	free(buf);
	return r;
}

/* ---- open ------------------------------------------------------------------ */

static int write_flush(struct tfs_snap_store *s, const void *buf, size_t len, uint64_t off)
{
	int r = tfs_bdev_write(s->cow, buf, len, off);
	return r ? r : tfs_bdev_flush(s->cow);
}

/* The checks both kinds of store make before touching anything; logged. */
static int open_prologue(struct tfs_bdev *cow, uint32_t chunk_sectors, uint64_t *dev_bytes)
{
	if (!tfs_snap_chunk_sectors_ok(chunk_sectors)) {
		tfs_err("%s: chunk size %" PRIu32 " sectors is invalid: it must be " TFS_SNAP_CHUNK_RULE,
			tfs_bdev_name(cow), chunk_sectors);
		return -EINVAL;
	}
	int r = tfs_bdev_size(cow, dev_bytes);
	if (r)
		tfs_err("%s: cannot get the COW device's size: %s", tfs_bdev_name(cow), strerror(-r));
	return r;
}

/*
 * What open and check share: classify chunk 0, size the store by the
 * header's chunk size (fresh_chunk if there is none yet) and, for a valid
 * header, load the areas.  Writes nothing; -EINVAL with the reason in why.
 */
static int read_store(struct tfs_bdev *cow, uint64_t dev_bytes, uint32_t fresh_chunk,
		      uint64_t origin_chunks, struct snap_header *h, struct tfs_snap_store **out,
		      char *why, size_t why_len)
{
	struct tfs_snap_store *s = NULL;
	const uint64_t smallest = 3 * (TFS_SNAP_MIN_CHUNK_SECTORS << TFS_SECTOR_SHIFT);
	/* Read no further than the device goes: a block device fails such a read. */
	uint64_t zero_bytes = (uint64_t)fresh_chunk << TFS_SECTOR_SHIFT;
	if (zero_bytes > dev_bytes / SNAP_IO_BLOCK * SNAP_IO_BLOCK)
		zero_bytes = dev_bytes / SNAP_IO_BLOCK * SNAP_IO_BLOCK;
	int r = dev_bytes < smallest ? 0 : read_header(cow, zero_bytes, h, why, why_len);
	if (!r)
		r = store_new(cow, true, &s);
	if (r)
		return r;
	if (dev_bytes < smallest)
		*h = (struct snap_header){ .fresh = true };
	set_geometry(s, h->fresh ? fresh_chunk : h->chunk_sectors, dev_bytes);
	s->next_free = 2;
	if (s->total_chunks < 3) {
		snprintf(why, why_len, "COW device too small: %" PRIu64 " bytes, it needs at least "
			 "3 chunks of %" PRIu64 " bytes (header, one metadata area, one data chunk)",
			 dev_bytes, s->chunk_bytes);
		r = -EINVAL;
	} else if (!h->fresh && h->valid) {
		r = load_areas(s, origin_chunks, why, why_len);
	}
	if (r) {
		tfs_snap_store_close(s);
		return r;
	}
	*out = s;
	return 0;
}

int tfs_snap_store_open(struct tfs_bdev *cow, uint32_t chunk_sectors, struct tfs_snap_store **out)
{
	char why[256] = "";
	struct tfs_snap_store *s = NULL;
	uint64_t dev_bytes;
	struct snap_header h;
	int r = open_prologue(cow, chunk_sectors, &dev_bytes);
	if (r)
		return r;
	r = read_store(cow, dev_bytes, chunk_sectors, 0, &h, &s, why, sizeof(why));
	if (r)
		goto err_why;
	build_header(s->invalid_hdr, false, s->chunk_sectors);
	if (h.fresh) {
		/* Area 0 must read as empty before a header says this is a store. */
		memset(s->wbuf, 0, SNAP_IO_BLOCK);
		r = write_flush(s, s->wbuf, SNAP_IO_BLOCK, s->chunk_bytes);
		if (!r) {
			build_header(s->wbuf, true, s->chunk_sectors);
			r = write_flush(s, s->wbuf, SNAP_IO_BLOCK, 0);
		}
		if (r) {
			snprintf(why, sizeof(why), "writing the new COW header failed: %s",
				 strerror(-r));
			goto err_why;
		}
	} else if (!h.valid) {
		/* As the kernel: an invalidated store loads empty and stays invalid. */
		atomic_store(&s->valid, false);
		atomic_store(&s->invalidated, true);
	}
	r = -pthread_create(&s->stager, NULL, stager_main, s);
	if (r) {
		snprintf(why, sizeof(why), "cannot start its commit thread: %s", strerror(-r));
		goto err_why;
	}
	s->has_stager = true;
	*out = s;
	return 0;
err_why:
	if (why[0])
		tfs_err("%s: %s", tfs_bdev_name(cow), why);
	tfs_snap_store_close(s);
	return r;
}

int tfs_snap_store_open_transient(struct tfs_bdev *cow, uint32_t chunk_sectors,
				  struct tfs_snap_store **out)
{
	const char *name = tfs_bdev_name(cow);
	uint64_t dev_bytes;
	int r = open_prologue(cow, chunk_sectors, &dev_bytes);
	if (r)
		return r;
	struct tfs_snap_store *s;
	r = store_new(cow, false, &s);
	if (r)
		return r;
	set_geometry(s, chunk_sectors, dev_bytes);
	if (s->total_chunks < 1) {
		tfs_err("%s: COW device too small: %" PRIu64 " bytes, less than one chunk of %" PRIu64
			" bytes", name, dev_bytes, s->chunk_bytes);
		tfs_snap_store_close(s);
		return -EINVAL;
	}
	*out = s;
	return 0;
}

/* ---- accessors ------------------------------------------------------------- */

uint32_t tfs_snap_store_chunk_sectors(const struct tfs_snap_store *s)
{
	return s->chunk_sectors;
}

bool tfs_snap_store_persistent(const struct tfs_snap_store *s)
{
	return s->persistent;
}

bool tfs_snap_store_valid(const struct tfs_snap_store *s)
{
	return atomic_load(&((struct tfs_snap_store *)s)->valid);
}

int tfs_snap_store_lookup(struct tfs_snap_store *s, uint64_t old_chunk, uint64_t *new_chunk)
{
	pthread_rwlock_rdlock(&s->table_lock);
	uint64_t v;
	bool found = xt_find(&s->table, old_chunk, &v);
	pthread_rwlock_unlock(&s->table_lock);
	if (found && new_chunk)
		*new_chunk = v & ~NOT_DURABLE;
	return found ? 0 : -ENODATA;
}

bool tfs_snap_store_durable(struct tfs_snap_store *s, uint64_t first, uint64_t last)
{
	bool durable = first <= last;
	uint64_t v;
	pthread_rwlock_rdlock(&s->table_lock);
	for (uint64_t c = first; durable && c <= last; c++)
		durable = xt_find(&s->table, c, &v) && !(v & NOT_DURABLE);
	pthread_rwlock_unlock(&s->table_lock);
	return durable;
}

uint64_t tfs_snap_store_count(struct tfs_snap_store *s)
{
	pthread_rwlock_rdlock(&s->table_lock);
	uint64_t n = s->table.n;
	pthread_rwlock_unlock(&s->table_lock);
	return n;
}

uint64_t tfs_snap_store_uncommitted(struct tfs_snap_store *s)
{
	pthread_mutex_lock(&s->mu);
	uint64_t n = s->pending.n;
	pthread_mutex_unlock(&s->mu);
	return n;
}

uint64_t tfs_snap_store_next_free(struct tfs_snap_store *s)
{
	pthread_mutex_lock(&s->mu);
	uint64_t n = s->next_free;
	pthread_mutex_unlock(&s->mu);
	return n;
}

bool tfs_snap_store_is_meta(const struct tfs_snap_store *s, uint64_t chunk)
{
	return s->persistent && is_meta_chunk(s, chunk);
}

void tfs_snap_store_usage(struct tfs_snap_store *s, struct tfs_snap_usage *u)
{
	pthread_mutex_lock(&s->mu);
	u->total_sectors = s->dev_bytes >> TFS_SECTOR_SHIFT;
	u->allocated_sectors = s->next_free * s->chunk_sectors;
	/* The header and every area up to the one the next commit goes to. */
	u->metadata_sectors =
		s->persistent ? (s->n_recs / s->per_area + 2) * s->chunk_sectors : 0;
	pthread_mutex_unlock(&s->mu);
}

/* ---- allocation and commit --------------------------------------------------- */

int tfs_snap_store_allocate(struct tfs_snap_store *s, uint64_t old_chunk, uint64_t *new_chunk)
{
	if (old_chunk == NO_CHUNK)
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	int r = -EIO;
	if (!atomic_load(&s->valid))
		goto out;
	r = -EEXIST;
	if (tfs_snap_store_lookup(s, old_chunk, NULL) == 0)
		goto out;
	uint64_t chunk = s->next_free;
	r = -ENOSPC;
	if (chunk >= s->total_chunks)
		goto out;
	/*
	 * The last data chunk of an area fills it, and a reader then goes on
	 * to the next area: that area's chunk must exist to hold a terminator.
	 * (The kernel would try to zero it past the device's end and fail.)
	 */
	if (s->persistent && chunk % (s->per_area + 1) == 0 && chunk + 1 >= s->total_chunks)
		goto out;
	r = xt_reserve(&s->pending, 1);
	if (!r && s->persistent)
		r = reserve_recs(s, s->n_recs + s->pending.n + 1);
	if (r)
		goto out;
	pthread_rwlock_wrlock(&s->table_lock);
	r = xt_reserve(&s->table, 1);
	if (!r)
		xt_put(&s->table, old_chunk, chunk | NOT_DURABLE);
	pthread_rwlock_unlock(&s->table_lock);
	if (r)
		goto out;
	xt_put(&s->pending, old_chunk, chunk);
	s->next_free = chunk + 1;
	if (s->persistent && is_meta_chunk(s, s->next_free))
		s->next_free++;
	*new_chunk = chunk;
out:
	pthread_mutex_unlock(&s->mu);
	return r;
}

/*
 * Write blocks b0..b1 of area `area` from s->recs (records at index
 * `limit` and after as zero), then flush.  The caller set s->writing, so
 * s->wbuf is its own; mu is taken only to copy records out.  covers, if
 * not NULL, is set to the records committed before the flush began: their
 * data was written before they were added, so the flush makes it durable
 * too.
 */
static int write_area_blocks(struct tfs_snap_store *s, uint64_t area, uint64_t b0, uint64_t b1,
			     uint64_t limit, uint64_t *covers)
{
	const uint64_t per_buf = SNAP_WBUF_SIZE / SNAP_IO_BLOCK;
	uint64_t base = area_chunk(s, area) * s->chunk_bytes;
	for (uint64_t b = b0; b <= b1; b += per_buf) {
		uint64_t nb = b1 - b + 1 < per_buf ? b1 - b + 1 : per_buf;
		uint64_t first = area * s->per_area + b * SNAP_RECS_PER_BLOCK;
		memset(s->wbuf, 0, nb * SNAP_IO_BLOCK);
		pthread_mutex_lock(&s->mu);
		for (uint64_t i = 0; i < nb * SNAP_RECS_PER_BLOCK && first + i < limit; i++) {
			tfs_put_le64(s->wbuf + i * SNAP_REC_SIZE, s->recs[first + i].old_chunk);
			tfs_put_le64(s->wbuf + i * SNAP_REC_SIZE + 8, s->recs[first + i].new_chunk);
		}
		pthread_mutex_unlock(&s->mu);
		int r = tfs_bdev_write(s->cow, s->wbuf, nb * SNAP_IO_BLOCK, base + b * SNAP_IO_BLOCK);
		if (r)
			return r;
	}
	if (covers) {
		pthread_mutex_lock(&s->mu);
		*covers = s->n_recs;
		pthread_mutex_unlock(&s->mu);
	}
	return tfs_bdev_flush(s->cow);
}

/*
 * Put records [lo, hi) on disk.  Areas go last first, each flushed before
 * the one before it is written: an area that becomes full must never be
 * on disk while the next one still holds whatever was there before, or a
 * reader would take that for exceptions.
 */
static int write_batch(struct tfs_snap_store *s, uint64_t lo, uint64_t hi, uint64_t total_chunks,
		       uint64_t *covers)
{
	uint64_t e = s->per_area;
	int r;
	for (uint64_t a = hi / e + 1; a-- > lo / e;) {
		if (area_chunk(s, a) >= total_chunks)
			continue; /* see allocate: it holds no records */
		uint64_t s0 = a == lo / e ? lo - a * e : 0;
		uint64_t t = hi - a * e; /* the terminator's slot */
		uint64_t s1 = t < e ? t : e - 1;
		r = write_area_blocks(s, a, s0 / SNAP_RECS_PER_BLOCK, s1 / SNAP_RECS_PER_BLOCK, hi,
				      covers);
		if (r) {
			tfs_err("%s: writing COW metadata area %" PRIu64 " failed: %s; the snapshot "
				"is invalid now", tfs_bdev_name(s->cow), a, strerror(-r));
			return r;
		}
	}
	return 0;
}

/*
 * Wake the committers whose records are durable now (all of them, with
 * -EIO, once the store is invalid).  mu held.  They leave the list as a
 * chain, and only the first is posted here: each one woken posts the
 * next (tfs_snap_store_commit_batch), so the stager goes on to its next
 * stage after one wake-up, not one per committer.  A waiter is never
 * touched after its post: from then on its stack may be gone.
 */
static void wake_waiters(struct tfs_snap_store *s)
{
	bool valid = atomic_load(&s->valid);
	struct waiter *first = s->waiters, *last = NULL;

	while (s->waiters && (!valid || s->waiters->upto <= s->n_durable)) {
		last = s->waiters;
		last->r = valid ? 0 : -EIO;
		s->waiters = last->next;
	}
	if (!s->waiters)
		s->waiters_tail = &s->waiters;
	if (last) {
		last->next = NULL;
		sem_post(&first->done);
	}
}

/*
 * One stage of the group commit; mu held (dropped for the I/O), s->writing
 * clear.  A stage is the area write of every record whose data is flushed,
 * then a flush; with no such record, a flush alone.  Each committer wrote
 * its data before it added its record, so a flush makes the data of every
 * record added before it began durable (the kernel's REQ_PREFLUSH): the
 * flush that ends one group's area write is also the next group's data
 * flush, and under parallel writers a group costs one area write and one
 * flush, not two flushes.  0, or -EIO with the store invalid.
 */
static int run_stage(struct tfs_snap_store *s)
{
	uint64_t lo = s->n_durable, hi = s->n_flushed, total = s->total_chunks;
	uint64_t covers = s->n_recs;
	int r;

	s->writing = true;
	pthread_mutex_unlock(&s->mu);
	if (hi > lo) {
		r = write_batch(s, lo, hi, total, &covers);
	} else {
		r = tfs_bdev_flush(s->cow);
		if (r)
			tfs_err("%s: flushing copied chunks before their exceptions failed: %s; "
				"the snapshot is invalid now", tfs_bdev_name(s->cow), strerror(-r));
	}
	pthread_mutex_lock(&s->mu);
	s->writing = false;
	if (r) {
		atomic_store(&s->valid, false);
		wake_waiters(s);
		return -EIO;
	}
	if (hi > lo) {
		pthread_rwlock_wrlock(&s->table_lock);
		for (uint64_t i = lo; i < hi; i++)
			xt_clear_bits(&s->table, s->recs[i].old_chunk, NOT_DURABLE);
		pthread_rwlock_unlock(&s->table_lock);
		s->n_durable = hi;
	}
	if (covers > s->n_flushed)
		s->n_flushed = covers;
	wake_waiters(s);
	return 0;
}

/* The stager: stages back to back while records wait for one. */
static void *stager_main(void *arg)
{
	struct tfs_snap_store *s = arg;

	pthread_mutex_lock(&s->mu);
	while (!s->stopping) {
		if (s->writing || s->n_durable == s->n_recs || !atomic_load(&s->valid))
			pthread_cond_wait(&s->work, &s->mu);
		else
			run_stage(s);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

int tfs_snap_store_commit(struct tfs_snap_store *s, uint64_t old_chunk)
{
	return tfs_snap_store_commit_batch(s, &old_chunk, 1);
}

int tfs_snap_store_commit_batch(struct tfs_snap_store *s, const uint64_t *old_chunks, size_t nr)
{
	uint64_t new_chunk;
	pthread_mutex_lock(&s->mu);
	int r = -EIO;
	if (!atomic_load(&s->valid))
		goto out;
	r = -ENOENT;
	for (size_t i = 0; i < nr; i++)
		if (!xt_find(&s->pending, old_chunks[i], &new_chunk))
			goto out;
	r = 0;
	for (size_t i = 0; i < nr; i++) {
		xt_find(&s->pending, old_chunks[i], &new_chunk);
		xt_del(&s->pending, old_chunks[i]);
		if (s->persistent)
			s->recs[s->n_recs++] = (struct rec){ old_chunks[i], new_chunk };
	}
	if (!s->persistent) {
		/* Nothing to write: the copies are done, which is all durable means here. */
		pthread_rwlock_wrlock(&s->table_lock);
		for (size_t i = 0; i < nr; i++)
			xt_clear_bits(&s->table, old_chunks[i], NOT_DURABLE);
		pthread_rwlock_unlock(&s->table_lock);
		goto out;
	}
	if (!nr)
		goto out;
	struct waiter w = { .upto = s->n_recs, .r = 0, .next = NULL };
	sem_init(&w.done, 0, 0);
	*s->waiters_tail = &w;
	s->waiters_tail = &w.next;
	pthread_cond_signal(&s->work);
	pthread_mutex_unlock(&s->mu);
	while (sem_wait(&w.done) && errno == EINTR)
		;
	if (w.next)
		sem_post(&w.next->done);
	sem_destroy(&w.done);
	return w.r;
out:
	pthread_mutex_unlock(&s->mu);
	return r;
}

bool tfs_snap_store_invalidate(struct tfs_snap_store *s)
{
	atomic_store(&s->valid, false);
	if (atomic_exchange(&s->invalidated, true))
		return false;
	/* Committers waiting for a write must not wait for one that will not come. */
	pthread_mutex_lock(&s->mu);
	wake_waiters(s);
	pthread_mutex_unlock(&s->mu);
	if (s->persistent) {
		int r = write_flush(s, s->invalid_hdr, SNAP_IO_BLOCK, 0);
		if (r)
			tfs_err("%s: marking the COW store invalid on disk failed: %s (it is "
				"invalid in memory)", tfs_bdev_name(s->cow), strerror(-r));
	}
	return true;
}

/* ---- merge ------------------------------------------------------------------- */

int tfs_snap_store_merge_prepare(struct tfs_snap_store *s, uint32_t max, uint64_t *old_chunk,
				 uint64_t *new_chunk)
{
	if (!s->persistent)
		return -EOPNOTSUPP;
	if (max > INT32_MAX)
		max = INT32_MAX;
	pthread_mutex_lock(&s->mu);
	int r = -ENODATA;
	if (!s->n_durable || !max)
		goto out;
	uint64_t last = s->n_durable - 1;
	uint64_t area_first = last / s->per_area * s->per_area;
	uint64_t nr = 1;
	while (nr < max && last - nr + 1 > area_first &&
	       s->recs[last - nr].old_chunk + 1 == s->recs[last - nr + 1].old_chunk &&
	       s->recs[last - nr].new_chunk + 1 == s->recs[last - nr + 1].new_chunk)
		nr++;
	*old_chunk = s->recs[last - nr + 1].old_chunk;
	*new_chunk = s->recs[last - nr + 1].new_chunk;
	r = (int)nr;
out:
	pthread_mutex_unlock(&s->mu);
	return r;
}

int tfs_snap_store_merge_commit(struct tfs_snap_store *s, uint32_t nr)
{
	if (!s->persistent)
		return -EOPNOTSUPP;
	pthread_mutex_lock(&s->mu);
	int r = -EIO;
	if (!atomic_load(&s->valid))
		goto out;
	r = -EBUSY;
	if (s->writing || s->pending.n || s->n_recs != s->n_durable)
		goto out;
	r = -EINVAL;
	uint64_t e = s->per_area;
	if (!nr || nr > s->n_recs)
		goto out;
	uint64_t keep = s->n_recs - nr, last = s->n_recs - 1, area = last / e;
	if (keep < area * e)
		goto out;
	s->writing = true;
	pthread_mutex_unlock(&s->mu);
	/* The removed records become zeros, the first of them the terminator. */
	r = write_area_blocks(s, area, (keep - area * e) / SNAP_RECS_PER_BLOCK,
			      (last - area * e) / SNAP_RECS_PER_BLOCK, keep, NULL);
	pthread_mutex_lock(&s->mu);
	s->writing = false;
	pthread_cond_signal(&s->work); /* commits made meanwhile wait for a stage */
	if (r) {
		tfs_err("%s: writing COW metadata area %" PRIu64 " during a merge failed: %s",
			tfs_bdev_name(s->cow), area, strerror(-r));
		atomic_store(&s->valid, false);
		wake_waiters(s);
		r = -EIO;
		goto out;
	}
	pthread_rwlock_wrlock(&s->table_lock);
	for (uint64_t i = keep; i <= last; i++)
		xt_del(&s->table, s->recs[i].old_chunk);
	pthread_rwlock_unlock(&s->table_lock);
	s->n_recs = s->n_durable = s->n_flushed = keep;
	/* As the kernel counts it: the chunks up to the last record still in use. */
	s->next_free = area_chunk(s, area) + (keep - area * e) + 1;
out:
	pthread_mutex_unlock(&s->mu);
	return r;
}

/* ---- resize and check ---------------------------------------------------------- */

int tfs_snap_store_resize(struct tfs_snap_store *s, uint64_t *total_chunks)
{
	uint64_t bytes;
	int r = open_prologue(s->cow, s->chunk_sectors, &bytes);
	if (r)
		return r;
	pthread_mutex_lock(&s->mu);
	if (bytes < s->dev_bytes) {
		tfs_err("%s: the COW device shrank from %" PRIu64 " to %" PRIu64 " bytes: a COW "
			"store can only grow", tfs_bdev_name(s->cow), s->dev_bytes, bytes);
		r = -EINVAL;
	} else {
		s->dev_bytes = bytes;
		s->total_chunks = bytes / s->chunk_bytes;
	}
	if (total_chunks)
		*total_chunks = s->total_chunks;
	pthread_mutex_unlock(&s->mu);
	return r;
}

int tfs_snap_store_check(struct tfs_bdev *cow, uint64_t origin_chunks,
			 struct tfs_snap_check_info *info, char *msg, size_t msg_len)
{
	struct snap_header h;
	struct tfs_snap_store *s = NULL;
	uint64_t dev_bytes;
	char why[256] = "";
	int r = tfs_bdev_size(cow, &dev_bytes);
	if (r) {
		snprintf(why, sizeof(why), "cannot get the COW device's size: %s", strerror(-r));
		goto out;
	}
	/* A fresh store is whatever the first block says: the chunk size is unknown. */
	r = read_store(cow, dev_bytes, TFS_SNAP_MIN_CHUNK_SECTORS, origin_chunks, &h, &s, why,
		       sizeof(why));
	if (r)
		goto out;
	if (info)
		*info = (struct tfs_snap_check_info){ .fresh = h.fresh,
						      .valid = h.fresh || h.valid,
						      .chunk_sectors = h.fresh ? 0 : h.chunk_sectors,
						      .total_chunks = s->total_chunks,
						      .exceptions = s->n_recs };
out:
	if (msg_len)
		snprintf(msg, msg_len, "%s", r ? why : "");
	tfs_snap_store_close(s);
	return r;
}
