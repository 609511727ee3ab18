/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * prealloc.h - keeping a data file's blocks allocated ahead of the pool's
 * allocator (and a COW file's ahead of its exception store's, cowsnap.c).
 *
 * Owns: which chunks (a run of data blocks, `preallocate` in pool.cfg) of
 * one pool's data file (or one COW file) have been fallocated since they
 * were last punched, and counters of what it did.  A write into a hole of a sparse file is an
 * allocation of the host file system, which ext4 serialises against all
 * direct I/O to the file; the same write into a preallocated (unwritten)
 * extent is an overwrite, and unwritten extents read as zeros.  So a
 * partial write to a new block in a preallocated chunk may write only its
 * own bytes.
 *
 * What it knows is a hint, never a promise: a block marked may still be a
 * hole (a punch raced with the mark), which reads as zeros too and costs
 * only speed.  Correctness of reading zeros comes from the pool's
 * free_zero, not from here.  Preallocation never changes data.
 *
 * Never: holds its mutex across I/O; takes any other lock (it is a leaf,
 * taken after every pool lock or with none).
 */
#ifndef TFS_ENGINE_PREALLOC_H
#define TFS_ENGINE_PREALLOC_H

#include <stdbool.h>
#include <stdint.h>

#include "bdev.h"

struct tfs_prealloc;

struct tfs_prealloc_counts {
	uint64_t chunk_bytes;  /* 0: off */
	uint64_t chunks;       /* marked preallocated now */
	uint64_t fallocates;   /* calls that succeeded, ever */
	uint64_t failures;     /* calls that failed, ever */
	bool active;           /* false once the device refused (EOPNOTSUPP) */
};

/*
 * For data device dev (not owned) of nr_blocks blocks of block_size
 * bytes, preallocating chunk_bytes at a time (rounded up to whole
 * blocks).  off_note (static) ends the log line when dev refuses: what
 * that costs.  *out is NULL, and 0 returned, when there is nothing to do:
 * chunk_bytes 0, or dev is a block device.  -ENOMEM.
 */
int tfs_prealloc_create(struct tfs_bdev *dev, uint64_t block_size, uint64_t chunk_bytes,
			uint64_t nr_blocks, const char *off_note, struct tfs_prealloc **out);
void tfs_prealloc_destroy(struct tfs_prealloc *p);

/*
 * Have each fill, once its fallocate succeeded, also call fn(arg, block,
 * nr) for the chunk's blocks [block, block + nr), with no lock held, before
 * the chunk is marked: for a file whose reserved space is better written
 * than only reserved (a COW file writes zeros ahead of its store, see
 * cowsnap.c).  An error from fn fails the fill like the fallocate's (counted
 * in failures, the chunk not marked).  Call before the first fill; p may be
 * NULL (nothing to do).
 */
typedef int (*tfs_prealloc_then_fn)(void *arg, uint64_t block, uint64_t nr);
void tfs_prealloc_set_then(struct tfs_prealloc *p, tfs_prealloc_then_fn fn, void *arg);

/* Whether block's chunk is marked preallocated.  O(1), takes the mutex; p may be NULL (false). */
bool tfs_prealloc_ready(struct tfs_prealloc *p, uint64_t block);
/*
 * Preallocate block's chunk (up to the device's end) and mark it; 0 at
 * once when it is marked already, so callers need not ask first.  One
 * fallocate, which on ext4 waits for direct I/O in flight to the file and
 * reserves host space: call it with no lock held, once per chunk.  While
 * another thread fills the chunk this waits for that fill instead.
 * 0: the chunk is preallocated; -EAGAIN: the fill waited for did not
 * succeed; -errno of the fallocate (counted in failures; EOPNOTSUPP also
 * turns p off for good, with one line in the log).
 */
int tfs_prealloc_fill(struct tfs_prealloc *p, uint64_t block);
/*
 * The same for a chunk the caller will need soon, without waiting: 0 at
 * once when it is marked already (or p is NULL), -EAGAIN while another
 * thread fills it, else what tfs_prealloc_fill returns.
 */
int tfs_prealloc_fill_ahead(struct tfs_prealloc *p, uint64_t block);
/* Blocks [begin, begin + len) were punched: their chunks are holes in part again. */
void tfs_prealloc_forget(struct tfs_prealloc *p, uint64_t begin, uint64_t len);
/*
 * The device now holds nr_blocks.  Growing: the chunk that held the old
 * end is forgotten (it was filled only up to it).  -ENOMEM leaves the
 * chunks past the old end unmarkable (never filled), which costs speed.
 */
int tfs_prealloc_resize(struct tfs_prealloc *p, uint64_t nr_blocks);
/* p may be NULL: all zero, inactive. */
void tfs_prealloc_counts(struct tfs_prealloc *p, struct tfs_prealloc_counts *out);

#endif
