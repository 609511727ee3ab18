/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The linear target: a whole backing device behind the device interface
 * (target.h), the bottom of any stack of targets.
 */
#include "target.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "bdev.h"

/* Zeros are written from here in pieces: never written itself. */
#define ZERO_PIECE (64u * 1024)
static _Alignas(4096) const uint8_t zeros[ZERO_PIECE];

struct linear {
	struct tfs_dev dev; /* first: the handle callers hold */
	struct tfs_bdev *bdev;
	bool own, read_only, status_only;
};

static struct linear *linear_of(struct tfs_dev *dev)
{
	return (struct linear *)dev;
}

static int may_io(const struct linear *l, bool write)
{
	if (l->status_only)
		return -EBADF;
	return write && l->read_only ? -EROFS : 0;
}

static int linear_read(struct tfs_dev *dev, void *buf, size_t len, uint64_t off)
{
	struct linear *l = linear_of(dev);
	int r = may_io(l, false);

	return r ? r : tfs_bdev_read(l->bdev, buf, len, off);
}

static int linear_write(struct tfs_dev *dev, const void *buf, size_t len, uint64_t off)
{
	struct linear *l = linear_of(dev);
	int r = may_io(l, true);

	return r ? r : tfs_bdev_write(l->bdev, buf, len, off);
}

static int linear_flush(struct tfs_dev *dev)
{
	struct linear *l = linear_of(dev);
	int r = may_io(l, false);

	return r ? r : tfs_bdev_flush(l->bdev);
}

static int linear_zero_range(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	struct linear *l = linear_of(dev);
	int r = may_io(l, true);

	while (!r && len) {
		size_t n = len < ZERO_PIECE ? (size_t)len : ZERO_PIECE;

		r = tfs_bdev_write(l->bdev, zeros, n, off);
		off += n;
		len -= n;
	}
	return r;
}

static int linear_provision(struct tfs_dev *dev, uint64_t off, uint64_t len)
{
	(void)off;
	(void)len;
	return may_io(linear_of(dev), true);
}

static int linear_get_size(struct tfs_dev *dev, uint64_t *bytes)
{
	return tfs_bdev_size(linear_of(dev)->bdev, bytes);
}

static int linear_seek(struct tfs_dev *dev, uint64_t off, int whence, uint64_t size,
		       uint64_t *out)
{
	int r = may_io(linear_of(dev), false);

	return r ? r : tfs_dev_seek_all_data(off, whence, size, out);
}

int tfs_dev_seek_all_data(uint64_t off, int whence, uint64_t size, uint64_t *out)
{
	if (whence != SEEK_DATA && whence != SEEK_HOLE)
		return -EINVAL;
	if (off >= size)
		return -ENXIO;
	*out = whence == SEEK_DATA ? off : size;
	return 0;
}

int tfs_dev_truncate_fixed(struct tfs_dev *dev, uint64_t new_size)
{
	(void)dev;
	(void)new_size;
	return -ENOTSUP;
}

static int linear_allocated(struct tfs_dev *dev, uint64_t *bytes)
{
	return linear_get_size(dev, bytes);
}

static void linear_status(struct tfs_dev *dev, struct tfs_status_sink *sink)
{
	tfs_status_text(sink, "device", tfs_bdev_name(linear_of(dev)->bdev));
}

static void linear_close(struct tfs_dev *dev)
{
	struct linear *l = linear_of(dev);

	if (l->own)
		tfs_bdev_close(l->bdev);
	free(l);
}

static const struct tfs_dev_ops linear_ops = {
	.kind = "linear",
	.read = linear_read,
	.write = linear_write,
	.flush = linear_flush,
	.discard = linear_zero_range,
	.zero_range = linear_zero_range,
	.provision = linear_provision,
	.seek = linear_seek,
	.get_size = linear_get_size,
	.truncate = tfs_dev_truncate_fixed,
	.allocated = linear_allocated,
	.status = linear_status,
	.close = linear_close,
};

int tfs_linear_open(struct tfs_bdev *bdev, bool own, unsigned flags, struct tfs_dev **out)
{
	struct linear *l = calloc(1, sizeof(*l));

	if (!l)
		return -ENOMEM;
	l->dev.ops = &linear_ops;
	l->bdev = bdev;
	l->own = own;
	l->read_only = flags & TFS_DEV_READ_ONLY;
	l->status_only = flags & TFS_DEV_STATUS_ONLY;
	*out = &l->dev;
	return 0;
}
