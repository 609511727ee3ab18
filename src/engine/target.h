/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * target.h - the one interface every exported device implements, so that
 * src/fs drives a thin volume, and later an origin, a classic snapshot or
 * a cached origin, without knowing which it holds.
 *
 * A device handle (struct tfs_dev) is what a target's constructor returns
 * (tfs_thin_open in pool.h; tfs_linear_open below).  Its first member is
 * the ops table; a target embeds struct tfs_dev as the first member of its
 * own handle and casts back in its ops.  Callers use only the tfs_dev_*
 * wrappers.  The kind ("thin", "linear"; later "origin", "cow-snapshot",
 * "cache") is a string for status and messages, never a thing to switch
 * on: anything a caller needs to know about a device is an op here.
 *
 * Offsets and lengths are bytes, any alignment, within what the namespace
 * says the device's size is.  Every op returns 0 (all of the request
 * done) or -errno (a failed write may have written part of its range), and
 * is thread-safe; serialising requests to one block is the
 * target's job (range locks, prison.h).  Common errors: -EROFS a read-only
 * handle or device; -EIO device error or a target in fail mode; -ENOSPC;
 * -EBADF an I/O op on a status handle (TFS_DEV_STATUS_ONLY); -ENOTSUP an op
 * that means nothing for this kind (each op says when).
 *
 * Stacking: a target that sits on another device (an origin on its raw
 * device, a snapshot's COW store, a pool's data device on a cache) should
 * hold that device as a struct tfs_dev too, and do its I/O through the
 * same wrappers; tfs_linear_open makes one of a backing device (bdev.h),
 * so a plain device and a target are interchangeable underneath.  An
 * origin does its I/O through a linear target over its device; the thin
 * pool and a snapshot's COW store (whose format needs a struct tfs_bdev)
 * still do theirs on struct tfs_bdev.
 *
 * Device numbers: the namespace (src/fs, the catalog, inode numbers) knows
 * a device by a 32-bit id.  Thin devices use their metadata ids, 0 to
 * TFS_MAX_DEV_ID (2^24 - 1, the format's limit).  Other targets' devices
 * take ids from TFS_DEV_ID_OTHER up, so the two never meet and inode
 * numbers stay stable.  Suspend and resume (core.h) are per target
 * instance: each instance (the pool, an origin with its snapshots, a
 * cache) owns its own struct tfs_core, numbers its devices within it, and
 * is itself TFS_CORE_POOL there, so suspending an origin holds its
 * snapshots' I/O as dm requires.
 *
 * Never: knows FUSE, names or the catalog.
 */
#ifndef TFS_ENGINE_TARGET_H
#define TFS_ENGINE_TARGET_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_bdev;
struct tfs_dev;

/* The first device id of targets other than thin (see above). */
#define TFS_DEV_ID_OTHER (1u << 24)

/* Constructor flags. */
enum {
	TFS_DEV_READ_ONLY = 1u << 0,   /* writes, discards, provisioning fail with -EROFS */
	/*
	 * For status and allocated only, at any time (fail mode too): takes
	 * nothing that would keep the device from being deleted, and its I/O
	 * ops fail with -EBADF.
	 */
	TFS_DEV_STATUS_ONLY = 1u << 1,
};

/*
 * Where a target reports its status fields, so that the caller prints
 * JSON or text without knowing the kind.  Keys are status --json keys
 * (the README's contract: extend, never rename).  begin opens a nested
 * object under key, end closes the innermost one.
 */
struct tfs_status_sink;
struct tfs_status_sink_ops {
	void (*u64)(struct tfs_status_sink *s, const char *key, uint64_t v);
	void (*flag)(struct tfs_status_sink *s, const char *key, bool v);
	void (*text)(struct tfs_status_sink *s, const char *key, const char *v);
	/* A list of strings (a JSON array; an origin's "snapshots"). */
	void (*texts)(struct tfs_status_sink *s, const char *key, const char *const *v, size_t n);
	void (*begin)(struct tfs_status_sink *s, const char *key);
	void (*end)(struct tfs_status_sink *s);
};
struct tfs_status_sink {
	const struct tfs_status_sink_ops *ops;
};

struct tfs_dev_ops {
	const char *kind;
	int (*read)(struct tfs_dev *dev, void *buf, size_t len, uint64_t off);
	int (*write)(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off);
	/* Everything acknowledged so far is durable when this returns (FLUSH/FUA). */
	int (*flush)(struct tfs_dev *dev);
	/* Punch: the range reads as zeros and gives its space back where the target can. */
	int (*discard)(struct tfs_dev *dev, uint64_t off, uint64_t len);
	/* FALLOC_FL_ZERO_RANGE: reads as zeros afterwards. */
	int (*zero_range)(struct tfs_dev *dev, uint64_t off, uint64_t len);
	/* fallocate mode 0: later writes to the range need no new space. */
	int (*provision)(struct tfs_dev *dev, uint64_t off, uint64_t len);
	/*
	 * copy_file_range: dst (the device the op is called on) reads at
	 * [dst_off, dst_off + len) what src reads at [src_off, ...), shared
	 * rather than copied where the target can (whole blocks of one pool).
	 * -EXDEV: src is a device this one cannot share with (another kind or
	 * instance); -EOPNOTSUPP: nothing of the range can be shared.  On
	 * either the caller copies instead.  -EINVAL: the ranges overlap in
	 * one device.  NULL: the kind never shares (the wrapper says
	 * -EOPNOTSUPP).
	 */
	int (*clone_range)(struct tfs_dev *dst, struct tfs_dev *src, uint64_t src_off,
			   uint64_t dst_off, uint64_t len);
	/* SEEK_DATA / SEEK_HOLE within [off, size) (size: the namespace's); -ENXIO as lseek(2). */
	int (*seek)(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size, uint64_t *out);
	/*
	 * The device's own size in bytes; -ENOTSUP when it has none and the
	 * namespace sets it (a thin volume: any size, see truncate).
	 */
	int (*get_size)(struct tfs_dev *dev, uint64_t *bytes);
	/*
	 * The namespace shrank the device to new_size: what lies past it is
	 * dropped.  -ENOTSUP for a device of fixed size.
	 */
	int (*truncate)(struct tfs_dev *dev, uint64_t new_size);
	/*
	 * Bytes of storage the device holds for itself (st_blocks).  Cheap on
	 * an I/O handle; a status handle may walk the target's metadata.
	 */
	int (*allocated)(struct tfs_dev *dev, uint64_t *bytes);
	/* The kind's own status fields (README, status --json), into sink. */
	void (*status)(struct tfs_dev *dev, struct tfs_status_sink *sink);
	void (*close)(struct tfs_dev *dev);
	/*
	 * write, but -EAGAIN where it would be held (its device or pool
	 * suspended, or waiting for data space): for a caller that keeps the
	 * data and writes it later, whole (a part may have been written
	 * already).  NULL: the wrapper writes, held or not.
	 */
	int (*write_nowait)(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off);
};

struct tfs_dev {
	const struct tfs_dev_ops *ops;
};

static inline const char *tfs_dev_kind(const struct tfs_dev *d)
{
	return d->ops->kind;
}
static inline int tfs_dev_read(struct tfs_dev *d, void *buf, size_t len, uint64_t off)
{
	return d->ops->read(d, buf, len, off);
}
static inline int tfs_dev_write(struct tfs_dev *d, const void *buf, size_t len, uint64_t off)
{
	return d->ops->write(d, buf, len, off);
}
static inline int tfs_dev_flush(struct tfs_dev *d)
{
	return d->ops->flush(d);
}
static inline int tfs_dev_discard(struct tfs_dev *d, uint64_t off, uint64_t len)
{
	return d->ops->discard(d, off, len);
}
static inline int tfs_dev_zero_range(struct tfs_dev *d, uint64_t off, uint64_t len)
{
	return d->ops->zero_range(d, off, len);
}
static inline int tfs_dev_provision(struct tfs_dev *d, uint64_t off, uint64_t len)
{
	return d->ops->provision(d, off, len);
}
static inline int tfs_dev_clone_range(struct tfs_dev *dst, struct tfs_dev *src,
				      uint64_t src_off, uint64_t dst_off, uint64_t len)
{
	if (!dst->ops->clone_range)
		return -EOPNOTSUPP;
	return dst->ops->clone_range(dst, src, src_off, dst_off, len);
}
static inline int tfs_dev_seek(struct tfs_dev *d, uint64_t off, int whence, uint64_t size,
			       uint64_t *out)
{
	return d->ops->seek(d, off, whence, size, out);
}
static inline int tfs_dev_get_size(struct tfs_dev *d, uint64_t *bytes)
{
	return d->ops->get_size(d, bytes);
}
static inline int tfs_dev_truncate(struct tfs_dev *d, uint64_t new_size)
{
	return d->ops->truncate(d, new_size);
}
static inline int tfs_dev_allocated(struct tfs_dev *d, uint64_t *bytes)
{
	return d->ops->allocated(d, bytes);
}
static inline void tfs_dev_status(struct tfs_dev *d, struct tfs_status_sink *sink)
{
	d->ops->status(d, sink);
}
static inline int tfs_dev_write_nowait(struct tfs_dev *d, const void *buf, size_t len,
				       uint64_t off)
{
	if (!d->ops->write_nowait)
		return d->ops->write(d, buf, len, off);
	return d->ops->write_nowait(d, buf, len, off);
}
/* NULL is allowed. */
static inline void tfs_dev_close(struct tfs_dev *d)
{
	if (d)
		d->ops->close(d);
}

/* For targets' status ops: one field each. */
static inline void tfs_status_u64(struct tfs_status_sink *s, const char *key, uint64_t v)
{
	s->ops->u64(s, key, v);
}
static inline void tfs_status_flag(struct tfs_status_sink *s, const char *key, bool v)
{
	s->ops->flag(s, key, v);
}
static inline void tfs_status_text(struct tfs_status_sink *s, const char *key, const char *v)
{
	s->ops->text(s, key, v);
}
static inline void tfs_status_texts(struct tfs_status_sink *s, const char *key,
				    const char *const *v, size_t n)
{
	s->ops->texts(s, key, v, n);
}
static inline void tfs_status_begin(struct tfs_status_sink *s, const char *key)
{
	s->ops->begin(s, key);
}
static inline void tfs_status_end(struct tfs_status_sink *s)
{
	s->ops->end(s);
}

/*
 * The linear target: a backing device as a struct tfs_dev, all of it, so
 * a target can stack on a plain device or on another target alike.  I/O
 * goes straight through; discard and zero_range write zeros (a punched
 * range must read as zeros, which a block device's discard does not
 * promise); provision does nothing (every byte exists); seek sees one data
 * extent up to size; the size is the device's and truncate is -ENOTSUP.
 * own: close the bdev with the handle (on failure the caller keeps it).
 * flags: TFS_DEV_READ_ONLY, TFS_DEV_STATUS_ONLY.  Status: "device" (its
 * name).  -ENOMEM.
 */
int tfs_linear_open(struct tfs_bdev *bdev, bool own, unsigned flags, struct tfs_dev **out);

/*
 * For targets of a fixed size that is data everywhere (linear, origin,
 * cow-snapshot): seek's answer (one data extent up to size), and a
 * truncate that is -ENOTSUP.
 */
int tfs_dev_seek_all_data(uint64_t off, int whence, uint64_t size, uint64_t *out);
int tfs_dev_truncate_fixed(struct tfs_dev *dev, uint64_t new_size);

#endif
