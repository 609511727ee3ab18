/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * snap-store.h - the exception store of a classic (dm-snapshot) COW snapshot.
 *
 * Owns: which origin chunk has been copied to which chunk of the COW device
 * (the "exceptions"), the allocation of COW chunks, and, for a persistent
 * store, the kernel's on-disk layout of them: a "SnAp" header in chunk 0
 * and metadata areas of {old_chunk, new_chunk} records interleaved with the
 * data chunks (docs/cow-store.md).  A transient store keeps the same table
 * in memory only and hands out COW chunks from chunk 0.
 *
 * Never: reads or writes chunk data (the caller copies the origin's chunk to
 * the COW chunk it was given), knows the origin device, takes range locks,
 * or decides policy: it does not emit events, and a full store is reported
 * with -ENOSPC for the caller to invalidate.
 *
 * Threads: every call may come from any thread at once, except open/close.
 * The exception table has its own rwlock, so lookups run in parallel with
 * each other and with area writes; allocation and commit share one mutex
 * that is never held across I/O.  A persistent store runs its commits'
 * area writes and flushes on a thread of its own, from open to close.
 *
 * Ordering contract (what makes a persistent store crash-safe):
 *   1. tfs_snap_store_allocate(old) -> new.  From here lookups of old find
 *      new, so the caller must hold the origin's range lock on old from
 *      allocate until commit returns: nobody else may see the mapping while
 *      the chunk is not yet written.
 *   2. The caller writes the chunk's data to COW chunk new (no flush).
 *   3. tfs_snap_store_commit(old) records the exception, then flushes the
 *      COW device (so the data of step 2 is durable first), writes the
 *      area and flushes again before it returns 0.  Only then may the
 *      write that caused the copy be acknowledged.
 *   If step 2 fails the caller invalidates the store; there is no undo.
 *   Commits are grouped: a flush serves the data of every exception
 *   committed before it began, and one area write and flush carries every
 *   exception whose data is flushed; the flush ending one group's area
 *   write is the next group's data flush, so under parallel writers a
 *   group costs one area write and one flush.
 *
 * All functions return 0 or -errno.  Problems with a device's content are
 * logged once here (tfs_err, naming the device) and returned as -EINVAL.
 */
#ifndef TFS_META_SNAP_STORE_H
#define TFS_META_SNAP_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bdev.h"

/* chunk_size: a power of two from 4 KiB to 1 GiB, in 512-byte sectors. */
#define TFS_SNAP_MIN_CHUNK_SECTORS 8u
#define TFS_SNAP_MAX_CHUNK_SECTORS 2097152u
#define TFS_SNAP_CHUNK_RULE "a power of two from 4 KiB to 1 GiB"

struct tfs_snap_store;

/* The three numbers of dm's snapshot status line, in 512-byte sectors. */
struct tfs_snap_usage {
	uint64_t total_sectors;     /* size of the COW device */
	uint64_t allocated_sectors; /* chunks handed out, header and areas included */
	uint64_t metadata_sectors;  /* header and areas up to the current one (0 if transient) */
};

/* Whether sectors is a valid chunk size (TFS_SNAP_CHUNK_RULE).  O(1). */
bool tfs_snap_chunk_sectors_ok(uint64_t sectors);

/*
 * Open the persistent store on cow (borrowed: the caller closes it after
 * tfs_snap_store_close).  chunk_sectors is the configured chunk size.
 *   - chunk 0 all zero: a new store; area 0's first block is zeroed, then
 *     the header (valid 1, version 1, chunk_sectors) written and flushed.
 *   - a SnAp header: its chunk size wins over chunk_sectors (compare with
 *     tfs_snap_store_chunk_sectors to warn); with valid = 1 every exception
 *     is loaded, O(exceptions) time and memory, reading each area once.
 *     With valid = 0 the store opens INVALID, empty, as the kernel loads
 *     it: it can report its usage and be listed, but allocate and commit
 *     fail with -EIO.  The caller refuses the snapshot's I/O.
 *   - anything else (other magic, version, valid field or chunk size, an
 *     exception pointing outside the device or at the header or an area,
 *     one origin or COW chunk recorded twice): -EINVAL, logged naming the
 *     device and the problem.  A device smaller than three chunks (header,
 *     one area, one data chunk): -EINVAL.  I/O errors, or a commit thread
 *     that cannot be started: their -errno.
 * Blocks on I/O.
 */
int tfs_snap_store_open(struct tfs_bdev *cow, uint32_t chunk_sectors,
			struct tfs_snap_store **out);

/*
 * A transient store: nothing is read or written, chunks are handed out
 * from chunk 0, and the exceptions live only as long as the store.
 * -EINVAL for a bad chunk size or a device smaller than one chunk.
 */
int tfs_snap_store_open_transient(struct tfs_bdev *cow, uint32_t chunk_sectors,
				  struct tfs_snap_store **out);

/* Frees the store.  No call may be in flight.  The device stays open. */
void tfs_snap_store_close(struct tfs_snap_store *s);

uint32_t tfs_snap_store_chunk_sectors(const struct tfs_snap_store *s);
bool tfs_snap_store_persistent(const struct tfs_snap_store *s);
/* False once invalidated (in memory, by a failed commit, or loaded so).  Lock-free. */
bool tfs_snap_store_valid(const struct tfs_snap_store *s);

/*
 * The COW chunk holding old_chunk's copy: 0 and *new_chunk, or -ENODATA.
 * Finds exceptions from allocate on (see the ordering contract), whatever
 * the store's validity: the caller checks that.  O(1), shared lock only.
 */
int tfs_snap_store_lookup(struct tfs_snap_store *s, uint64_t old_chunk, uint64_t *new_chunk);

/*
 * Whether every chunk of first..last has a durable exception: committed
 * (persistent: its area written and flushed), not just allocated.  Such an
 * exception stays until a merge drops it, and no copy of it can be in
 * progress.  O(last - first + 1), shared lock only; false if first > last.
 */
bool tfs_snap_store_durable(struct tfs_snap_store *s, uint64_t first, uint64_t last);

/*
 * Give old_chunk a COW chunk (the next free one, skipping metadata areas
 * as the kernel does).  -EEXIST if it has one, -ENOSPC when the device is
 * full, -EIO if the store is invalid, -ENOMEM.  Memory for the commit is
 * reserved here, so commit never fails for lack of it.  O(1) amortised,
 * no I/O.
 */
int tfs_snap_store_allocate(struct tfs_snap_store *s, uint64_t old_chunk, uint64_t *new_chunk);

/*
 * Make old_chunk's exception (from allocate, data already written) durable:
 * returns once a flush of the COW device, then an area write + flush that
 * holds it, have succeeded; a transient store returns at once.  -ENOENT if old_chunk has
 * no allocation awaiting commit, -EIO if the store is or becomes invalid
 * (a failed area write marks it invalid in memory; the caller then calls
 * tfs_snap_store_invalidate to record it and learn if it came first).
 * Blocks on I/O, or on the write in flight.
 */
int tfs_snap_store_commit(struct tfs_snap_store *s, uint64_t old_chunk);
/*
 * The same for nr exceptions at once (all or none: -ENOENT, nothing
 * committed, when one has no allocation awaiting commit): one area write
 * and flush carries them all (more than one when they span areas), so a
 * request that copied many chunks waits for one write, not nr.
 */
int tfs_snap_store_commit_batch(struct tfs_snap_store *s, const uint64_t *old_chunks, size_t nr);

/*
 * Mark the store invalid.  Needs no memory and no I/O to take effect: from
 * the moment it returns, allocate and commit fail with -EIO.  The first call
 * then rewrites the header with valid = 0 and flushes (a persistent store;
 * a failure there is logged, the store stays invalid in memory).  Returns
 * true for that first call only, so that the caller reports it once.
 * Blocks on the header write.
 */
bool tfs_snap_store_invalidate(struct tfs_snap_store *s);

/* dm's status numbers (see struct tfs_snap_usage).  O(1), takes the mutex. */
void tfs_snap_store_usage(struct tfs_snap_store *s, struct tfs_snap_usage *u);

/* Exceptions in the table (committed or allocated).  O(1). */
uint64_t tfs_snap_store_count(struct tfs_snap_store *s);
/* Allocations whose commit has not been called yet (copies in progress).  O(1). */
uint64_t tfs_snap_store_uncommitted(struct tfs_snap_store *s);
/*
 * The first chunk allocate has not handed out: no exception points at it
 * or past it (until a merge moves it back, the chunks it gives up are
 * free too).  O(1), takes the mutex.
 */
uint64_t tfs_snap_store_next_free(struct tfs_snap_store *s);
/* Whether chunk is the header or a metadata area, never a data chunk (a transient store has none).  O(1). */
bool tfs_snap_store_is_meta(const struct tfs_snap_store *s, uint64_t chunk);

/*
 * Merge support (persistent stores only; -EOPNOTSUPP otherwise).  The
 * kernel merges from the end: the last committed exception first.
 *
 * merge_prepare: the longest run, at most max long, of the last committed
 * exceptions that lie in one area and are consecutive in both chunk
 * numbers: *old_chunk, *new_chunk are its first pair, the return value
 * its length (>= 1).  -ENODATA when the store is empty.  O(run).
 *
 * merge_commit: once the caller has copied those nr chunks back to the
 * origin and flushed it, drop them: their records are zeroed in their
 * area, which is written and flushed (the header is not touched), then
 * they leave the table.  -EBUSY while allocations or commits are pending
 * (a merging snapshot takes no new exceptions), -EINVAL if nr is more than
 * a run in one area, -EIO if invalid or the write fails (then invalid).
 */
int tfs_snap_store_merge_prepare(struct tfs_snap_store *s, uint32_t max, uint64_t *old_chunk,
				 uint64_t *new_chunk);
int tfs_snap_store_merge_commit(struct tfs_snap_store *s, uint32_t nr);

/*
 * Take a grown COW device into use: re-read its size.  -EINVAL (logged)
 * if it shrank; the store is unchanged then.  *total_chunks gets the new
 * number of chunks (may be NULL).
 */
int tfs_snap_store_resize(struct tfs_snap_store *s, uint64_t *total_chunks);

/* What tfs_snap_store_check found, when it returns 0. */
struct tfs_snap_check_info {
	bool fresh;             /* chunk 0 is all zero: no store written yet */
	bool valid;             /* the header's valid field */
	uint32_t chunk_sectors; /* from the header */
	uint64_t total_chunks;
	uint64_t exceptions;
};

/*
 * Read-only check of a persistent store for `thinfs check`: header,
 * every area, each exception's new chunk inside the device and not the
 * header or an area, old chunk below origin_chunks (0: not checked), no
 * origin or COW chunk recorded twice.  0 when clean (info filled in, may
 * be NULL), -EINVAL with one line naming the problem in msg, or an I/O
 * -errno.  Never writes, never logs the problem (the caller says which
 * snapshot it is).  O(exceptions) time and memory.
 */
int tfs_snap_store_check(struct tfs_bdev *cow, uint64_t origin_chunks,
			 struct tfs_snap_check_info *info, char *msg, size_t msg_len);

#endif
