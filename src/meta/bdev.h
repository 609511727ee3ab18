/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * bdev.h - backing devices: the seam between thinfs and storage.
 *
 * Owns: byte-addressed I/O on a plain file, a block device or a memory
 * buffer (unit tests, fuzzing), and a fault-injecting wrapper that can fail
 * the Nth read/write/flush, fail everything after a trigger, report ENOSPC,
 * hold ops in flight, and simulate power loss by dropping or tearing writes
 * not yet flushed.
 * Every implementation is safe to call from several threads at once.
 *
 * Never: caches, interprets or reorders data.  Any offset, length and
 * buffer work on every device.  A file or block device opened direct
 * (O_DIRECT) moves aligned requests straight between the caller's buffer
 * and the device; others go through an aligned bounce buffer, and a write
 * that does not cover whole sectors (the device's alignment unit) rewrites
 * the sectors around it: two threads must not write parts of one sector at
 * once.  Metadata I/O is whole 4 KiB blocks and the engine's range locks
 * keep data writes to one block apart, so thinfs never does.
 *
 * All calls return 0 or -errno.  A short read past the end of a device
 * fills the rest with zeros (sparse files grow on write).
 */
#ifndef TFS_META_BDEV_H
#define TFS_META_BDEV_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_bdev;

/* One read of a batch (tfs_bdev_read_batch). */
struct tfs_bdev_req {
	void *buf;
	size_t len;
	uint64_t off;
};

struct tfs_bdev_ops {
	int (*read)(struct tfs_bdev *dev, void *buf, size_t len, uint64_t off);
	int (*write)(struct tfs_bdev *dev, const void *buf, size_t len, uint64_t off);
	int (*flush)(struct tfs_bdev *dev);
	/* Give the range back to the host (punch a file, BLKDISCARD a device). */
	int (*discard)(struct tfs_bdev *dev, uint64_t off, uint64_t len);
	/*
	 * Reserve host space for the range without changing what it reads
	 * (fallocate mode KEEP_SIZE on a file: holes become unwritten extents,
	 * which read as zeros; written data stays).  -EOPNOTSUPP where that
	 * means nothing (a block device) or the file system cannot.
	 */
	int (*preallocate)(struct tfs_bdev *dev, uint64_t off, uint64_t len);
	int (*get_size)(struct tfs_bdev *dev, uint64_t *bytes);
	/* Grow a file-backed device; block devices return -ENOTSUP. */
	int (*grow)(struct tfs_bdev *dev, uint64_t new_bytes);
	/*
	 * Cut a file-backed device down to new_bytes (what lay past it is
	 * gone); -EINVAL when that is larger than now, block devices -ENOTSUP.
	 */
	int (*shrink)(struct tfs_bdev *dev, uint64_t new_bytes);
	void (*destroy)(struct tfs_bdev *dev);
	/*
	 * Added: every read of reqs[0..nr), several in flight at once where
	 * the device can, up to max_bytes of them (NULL: one after the other
	 * through read).
	 */
	int (*read_batch)(struct tfs_bdev *dev, const struct tfs_bdev_req *reqs, unsigned nr,
			  size_t max_bytes);
};

struct tfs_bdev {
	const struct tfs_bdev_ops *ops;
	char name[256]; /* for messages: the path or "memory" */
	/* Bypasses the host page cache (O_DIRECT); a wrapper copies its lower's. */
	bool direct;
	/*
	 * A block device, not a regular file: discard promises no zeros and
	 * fallocate is not there.  A wrapper copies its lower's, so that a
	 * device under fault injection is treated as the device it is.
	 */
	bool blockdev;
	/*
	 * Bytes moved to (written) or from (read) the storage below, as
	 * pread/pwrite saw them: with direct, what the device transferred,
	 * sectors rewritten around an unaligned write included.  Wrappers
	 * leave theirs at 0 (tfs_bdev_fault_counts reports the lower's).
	 */
	atomic_uint_fast64_t read_bytes, write_bytes;
};

struct tfs_bdev_io_counts {
	uint64_t reads, writes, flushes, discards;
	uint64_t read_bytes, write_bytes; /* of the device below, see struct tfs_bdev */
};

/* Open a plain file or block device read-write (or read-only), through the page cache. */
int tfs_bdev_open(const char *path, bool read_only, struct tfs_bdev **out);
/*
 * The same, with direct: O_DIRECT, so that the page cache holds no second
 * copy of what the caller caches (the volume's page cache, the metadata
 * block cache).  Alignment: the logical sector size of a block device
 * (BLKSSZGET), 4 KiB for a file.  A file system that refuses O_DIRECT
 * (EINVAL) gets the page cache instead, with one info line in the log;
 * dev->direct tells which.  Flushes still fdatasync: the device's own
 * write cache needs it.
 */
int tfs_bdev_open_direct(const char *path, bool read_only, bool direct, struct tfs_bdev **out);
/* A zero-filled in-memory device of size bytes (grows on grow()). */
int tfs_bdev_open_mem(uint64_t size, struct tfs_bdev **out);
/* Whether the device (or the one under a wrapper) is a block device (discard = BLKDISCARD). */
bool tfs_bdev_is_blockdev(const struct tfs_bdev *dev);

static inline int tfs_bdev_read(struct tfs_bdev *d, void *b, size_t l, uint64_t o)
{
	return d->ops->read(d, b, l, o);
}
/*
 * Added (bulk reads, send): the reads of reqs[0..nr), as tfs_bdev_read
 * each, in any order and overlapping in time: a direct file or block
 * device keeps up to TFS_BDEV_BATCH_DEPTH of them in flight with the
 * kernel's native AIO from the calling thread alone (an unaligned one is
 * read on its own as usual); others, or when AIO is not to be had, read
 * them one after the other.  Blocks until all are done; 0, or the first
 * -errno (the others are still waited for, their buffers undefined).
 *
 * _bounded: also no more than max_bytes of them in flight (always at least
 * one read).  Why a caller bounds it: the virtio disk measured for send
 * (bench/README.md) read 1 MiB pieces fastest with 2 to 4 MiB in flight,
 * and a quarter slower with 16 or 32 MiB; a bound in bytes still lets
 * many small scattered reads (64 KiB blocks) overlap.
 */
#define TFS_BDEV_BATCH_DEPTH 32
static inline int tfs_bdev_read_batch_bounded(struct tfs_bdev *d, const struct tfs_bdev_req *reqs,
					      unsigned nr, size_t max_bytes)
{
	int r = 0;

	if (d->ops->read_batch)
		return d->ops->read_batch(d, reqs, nr, max_bytes);
	for (unsigned i = 0; i < nr && !r; i++)
		r = d->ops->read(d, reqs[i].buf, reqs[i].len, reqs[i].off);
	return r;
}
static inline int tfs_bdev_read_batch(struct tfs_bdev *d, const struct tfs_bdev_req *reqs,
				      unsigned nr)
{
	return tfs_bdev_read_batch_bounded(d, reqs, nr, SIZE_MAX);
}
static inline int tfs_bdev_write(struct tfs_bdev *d, const void *b, size_t l, uint64_t o)
{
	return d->ops->write(d, b, l, o);
}
static inline int tfs_bdev_flush(struct tfs_bdev *d)
{
	return d->ops->flush(d);
}
static inline int tfs_bdev_discard(struct tfs_bdev *d, uint64_t o, uint64_t l)
{
	return d->ops->discard(d, o, l);
}
static inline int tfs_bdev_preallocate(struct tfs_bdev *d, uint64_t o, uint64_t l)
{
	return d->ops->preallocate(d, o, l);
}
static inline int tfs_bdev_size(struct tfs_bdev *d, uint64_t *bytes)
{
	return d->ops->get_size(d, bytes);
}
static inline int tfs_bdev_grow(struct tfs_bdev *d, uint64_t bytes)
{
	return d->ops->grow(d, bytes);
}
static inline int tfs_bdev_shrink(struct tfs_bdev *d, uint64_t bytes)
{
	return d->ops->shrink(d, bytes);
}
void tfs_bdev_close(struct tfs_bdev *dev);
static inline const char *tfs_bdev_name(const struct tfs_bdev *d)
{
	return d->name;
}

/* ---- fault injection ---------------------------------------------------- */

enum tfs_fault_op { TFS_FAULT_READ, TFS_FAULT_WRITE, TFS_FAULT_FLUSH, TFS_FAULT_NR_OPS };
enum tfs_fault_mode {
	TFS_FAULT_OK,     /* pass through */
	TFS_FAULT_EIO,    /* fail with -EIO */
	TFS_FAULT_ENOSPC, /* fail with -ENOSPC */
	/*
	 * Block the op, so a test can do something (suspend, close a volume)
	 * while I/O is in flight at a moment it chose.
	 */
	TFS_FAULT_STALL,
	/* Pass, after waiting the rule's delay (a slow disk): tfs_bdev_fault_set_delay. */
	TFS_FAULT_DELAY,
};

/*
 * Wrap lower (ownership passes to the wrapper).  With volatile_cache, writes
 * are held in memory until a flush writes them through, so a power cut can
 * drop them; without it, writes go straight down.
 */
int tfs_bdev_fault_wrap(struct tfs_bdev *lower, bool volatile_cache, struct tfs_bdev **out);

/*
 * From the (after+1)-th op of this kind on, fail with mode, until set back
 * to TFS_FAULT_OK.  once: fail only that single op, then pass again.
 *
 * A stalled op waits, holding nothing other ops need, until this is called
 * for its kind with a mode other than TFS_FAULT_STALL; it then meets that
 * rule as if it had just arrived (so OK lets it do its I/O).  A power cut
 * or closing the wrapper fails it with -EIO instead, so that no test hangs.
 */
void tfs_bdev_fault_set(struct tfs_bdev *dev, enum tfs_fault_op op, enum tfs_fault_mode mode,
			uint64_t after, bool once);

/*
 * Every op of this kind waits usec microseconds first, then passes (a
 * slow disk, for tests and benchmarks), until another mode is set.  The
 * wait holds nothing other ops need, so ops in parallel wait together.
 */
void tfs_bdev_fault_set_delay(struct tfs_bdev *dev, enum tfs_fault_op op, uint64_t usec);
/*
 * Power loss: writes not yet flushed are dropped; with tear, a prefix of
 * each unflushed write (whole 512-byte sectors, chosen from seed) reaches
 * the lower device instead.  Afterwards every op, stalled ones included,
 * fails with -EIO until the wrapper is closed.  Only meaningful with
 * volatile_cache.
 */
int tfs_bdev_fault_power_cut(struct tfs_bdev *dev, bool tear, uint32_t seed);

/*
 * Counts of ops that reached the wrapper (failed and stalled ones
 * included), and the bytes its lower device moved.
 */
void tfs_bdev_fault_counts(struct tfs_bdev *dev, struct tfs_bdev_io_counts *out);

/*
 * How many ops are stalled right now: a test polls this to know its thread
 * really is in flight before acting, rather than sleeping and hoping.
 */
unsigned tfs_bdev_fault_stalled(struct tfs_bdev *dev);

#endif
