/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Plain files, block devices and memory devices.  pread/pwrite are
 * thread-safe on one descriptor, so the file device needs no lock; the
 * memory device takes a lock only to grow.  Under O_DIRECT the file device
 * stages what is not aligned in the calling thread's scratch buffer
 * (scratch.h), so no state is shared between threads.
 */
#include "bdev.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "log.h"
#include "scratch.h"

/* AIO contexts a file device keeps for batch reads at once. */
#define AIO_CONTEXTS 4

struct file_dev {
	struct tfs_bdev base;
	int fd;
	/* With O_DIRECT: offsets, lengths and buffers are multiples of it (a power of 2). */
	size_t align;
	/*
	 * AIO contexts of batch reads, each made at its first use and kept:
	 * making and destroying one per batch costs milliseconds (io_destroy
	 * waits for an RCU grace period).  A batch takes a free one; when all
	 * are busy it makes its own.
	 */
	pthread_mutex_t aio_lock[AIO_CONTEXTS];
	aio_context_t aio[AIO_CONTEXTS]; /* aio_lock[i]; 0: none yet */
};

/* Largest staging buffer for an unaligned request under O_DIRECT; bigger ones go piecewise. */
#define BOUNCE_MAX (1u << 20)

static struct file_dev *to_file(struct tfs_bdev *d)
{
	return (struct file_dev *)d;
}

static void add_bytes(atomic_uint_fast64_t *c, uint64_t n)
{
	atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/*
 * pread until done.  Reading nothing (or, direct, less than asked: the
 * next offset might not be aligned any more) means the end of a sparse
 * file: the rest reads as zeros.
 */
static int raw_read(struct file_dev *f, uint8_t *p, size_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pread(f->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		add_bytes(&f->base.read_bytes, (uint64_t)n);
		if (n == 0 || (f->base.direct && (size_t)n < len)) {
			memset(p + n, 0, len - (size_t)n);
			return 0;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int raw_write(struct file_dev *f, const uint8_t *p, size_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(f->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		add_bytes(&f->base.write_bytes, (uint64_t)n);
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static bool aligned(const struct file_dev *f, const void *buf, size_t len, uint64_t off)
{
	return !f->base.direct ||
	       !(((uintptr_t)buf | (uintptr_t)len | (uintptr_t)off) & (f->align - 1));
}

/*
 * A staging buffer for [off, off + len): whole sectors, at most BOUNCE_MAX.
 * The thread's scratch buffer, which is page-aligned, unless sectors are
 * larger than a page.  Given back with bounce_put.
 */
static uint8_t *bounce_for(const struct file_dev *f, size_t len, uint64_t off, size_t *cap)
{
	size_t want = (size_t)(off & (f->align - 1)) + len + f->align - 1;
	void *b;

	want &= ~(f->align - 1);
	*cap = want < BOUNCE_MAX ? want : BOUNCE_MAX;
	if (f->align <= TFS_SCRATCH_ALIGN)
		return tfs_scratch_get(*cap);
	return posix_memalign(&b, f->align, *cap) ? NULL : b;
}

static void bounce_put(const struct file_dev *f, uint8_t *b, size_t cap)
{
	if (f->align <= TFS_SCRATCH_ALIGN)
		tfs_scratch_put(b, cap);
	else
		free(b);
}

/*
 * The piece of [off, off + len) staged next: it starts at the sector
 * *start, holds *n of the caller's bytes after *head bytes that are not
 * theirs, and is *span bytes of whole sectors.
 */
static void next_piece(const struct file_dev *f, size_t cap, size_t len, uint64_t off,
		       uint64_t *start, size_t *head, size_t *n, size_t *span)
{
	*head = (size_t)(off & (f->align - 1));
	*start = off - *head;
	*n = len < cap - *head ? len : cap - *head;
	*span = (*head + *n + f->align - 1) & ~(f->align - 1);
}

static int file_read(struct tfs_bdev *d, void *buf, size_t len, uint64_t off)
{
	struct file_dev *f = to_file(d);
	uint8_t *p = buf, *bounce;
	size_t cap, head, n, span;
	uint64_t start;
	int r = 0;

	if (aligned(f, buf, len, off))
		return raw_read(f, buf, len, off);
	bounce = bounce_for(f, len, off, &cap);
	if (!bounce)
		return -ENOMEM;
	while (len && !r) {
		next_piece(f, cap, len, off, &start, &head, &n, &span);
		r = raw_read(f, bounce, span, start);
		memcpy(p, bounce + head, n);
		p += n;
		len -= n;
		off += n;
	}
	bounce_put(f, bounce, cap);
	return r;
}

/*
 * Direct and unaligned: each piece is staged in whole sectors; the bytes
 * around the caller's in its first and last sector are read first so the
 * write keeps them.
 */
static int file_write(struct tfs_bdev *d, const void *buf, size_t len, uint64_t off)
{
	struct file_dev *f = to_file(d);
	const uint8_t *p = buf;
	size_t cap, head, n, span;
	uint8_t *bounce;
	uint64_t start;
	int r = 0;

	if (aligned(f, buf, len, off))
		return raw_write(f, buf, len, off);
	bounce = bounce_for(f, len, off, &cap);
	if (!bounce)
		return -ENOMEM;
	while (len && !r) {
		next_piece(f, cap, len, off, &start, &head, &n, &span);
		if (head)
			r = raw_read(f, bounce, f->align, start);
		if (!r && (head + n) % f->align && (!head || span > f->align))
			r = raw_read(f, bounce + span - f->align, f->align, start + span - f->align);
		if (r)
			break;
		memcpy(bounce + head, p, n);
		r = raw_write(f, bounce, span, start);
		p += n;
		len -= n;
		off += n;
	}
	bounce_put(f, bounce, cap);
	return r;
}

static int file_flush(struct tfs_bdev *d)
{
	return fdatasync(to_file(d)->fd) ? -errno : 0;
}

static int file_discard(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	struct file_dev *f = to_file(d);

	if (f->base.blockdev) {
		uint64_t range[2] = { off, len };
		return ioctl(f->fd, BLKDISCARD, range) ? -errno : 0;
	}
	if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
		return -errno;
	return 0;
}

static int file_preallocate(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	struct file_dev *f = to_file(d);

	if (f->base.blockdev)
		return -EOPNOTSUPP;
	if (fallocate(f->fd, FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
		return -errno;
	return 0;
}

static int file_size(struct tfs_bdev *d, uint64_t *bytes)
{
	struct file_dev *f = to_file(d);
	struct stat st;

	if (f->base.blockdev)
		return ioctl(f->fd, BLKGETSIZE64, bytes) ? -errno : 0;
	if (fstat(f->fd, &st))
		return -errno;
	*bytes = (uint64_t)st.st_size;
	return 0;
}

/* ftruncate to new_bytes, which must not be smaller (grow) or larger (shrink) than now. */
static int file_set_size(struct tfs_bdev *d, uint64_t new_bytes, bool grow)
{
	struct file_dev *f = to_file(d);
	uint64_t cur;
	int r;

	if (f->base.blockdev)
		return -ENOTSUP;
	r = file_size(d, &cur);
	if (r)
		return r;
	if (grow ? new_bytes < cur : new_bytes > cur)
		return -EINVAL;
	return ftruncate(f->fd, (off_t)new_bytes) ? -errno : 0;
}

static int file_grow(struct tfs_bdev *d, uint64_t new_bytes)
{
	return file_set_size(d, new_bytes, true);
}

static int file_shrink(struct tfs_bdev *d, uint64_t new_bytes)
{
	return file_set_size(d, new_bytes, false);
}

static void file_destroy(struct tfs_bdev *d)
{
	struct file_dev *f = to_file(d);

	for (int i = 0; i < AIO_CONTEXTS; i++) {
		if (f->aio[i])
			syscall(SYS_io_destroy, f->aio[i]);
		pthread_mutex_destroy(&f->aio_lock[i]);
	}
	close(f->fd);
	free(f);
}

/*
 * Native AIO (io_submit), called directly: glibc has no wrappers, and with
 * O_DIRECT the kernel really does these reads asynchronously, so one
 * thread keeps a queue of them in flight without a thread per read.
 */
static int aio_submit(aio_context_t ctx, long n, struct iocb **cbs)
{
	return (int)syscall(SYS_io_submit, ctx, n, cbs);
}

static int aio_wait(aio_context_t ctx, long min, long max, struct io_event *ev)
{
	return (int)syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

/*
 * The reads of a batch from next on, submitted while there is room (a free
 * slot, and max_bytes not passed unless nothing is in flight): how many
 * went.  *bytes: the bytes in flight; above max_bytes after a read larger
 * than it went alone, and then nothing joins it.
 */
static int batch_submit(struct file_dev *f, aio_context_t ctx, const struct tfs_bdev_req *reqs,
			unsigned nr, unsigned *next, struct iocb *cbs, unsigned *free_slots,
			unsigned *nr_free, size_t *bytes, size_t max_bytes)
{
	struct iocb *ptrs[TFS_BDEV_BATCH_DEPTH];
	unsigned n = 0, first = *next;
	int r;

	while (*next < nr && *nr_free > 0 &&
	       (!*bytes || (*bytes <= max_bytes && reqs[*next].len <= max_bytes - *bytes)) &&
	       aligned(f, reqs[*next].buf, reqs[*next].len, reqs[*next].off)) {
		const struct tfs_bdev_req *q = &reqs[*next];
		struct iocb *cb = &cbs[free_slots[--*nr_free]];

		memset(cb, 0, sizeof(*cb));
		cb->aio_data = *next;
		cb->aio_lio_opcode = IOCB_CMD_PREAD;
		cb->aio_fildes = (uint32_t)f->fd;
		cb->aio_buf = (uint64_t)(uintptr_t)q->buf;
		cb->aio_nbytes = q->len;
		cb->aio_offset = (int64_t)q->off;
		ptrs[n++] = cb;
		*bytes += q->len;
		++*next;
	}
	if (!n)
		return 0;
	do
		r = aio_submit(ctx, n, ptrs);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		r = errno == EAGAIN ? 0 : -errno;
	/* Those not taken go back, to be submitted again (or read alone). */
	for (unsigned i = r > 0 ? (unsigned)r : 0; i < n; i++) {
		free_slots[(*nr_free)++] = (unsigned)(ptrs[i] - cbs);
		*bytes -= (size_t)ptrs[i]->aio_nbytes;
	}
	if (r >= 0)
		*next = first + (unsigned)r;
	return r;
}

/* The batch's reads through ctx; -errno of io_getevents leaves ctx unusable (*broken). */
static int aio_batch(struct file_dev *f, aio_context_t ctx, const struct tfs_bdev_req *reqs,
		     unsigned nr, size_t max_bytes, bool *broken)
{
	struct iocb cbs[TFS_BDEV_BATCH_DEPTH];
	struct io_event ev[TFS_BDEV_BATCH_DEPTH];
	unsigned free_slots[TFS_BDEV_BATCH_DEPTH], nr_free = TFS_BDEV_BATCH_DEPTH, next = 0;
	unsigned inflight = 0;
	size_t bytes = 0;
	int err = 0;

	for (unsigned i = 0; i < TFS_BDEV_BATCH_DEPTH; i++)
		free_slots[i] = i;
	while ((next < nr && !err) || inflight) {
		int n;

		if (!err && next < nr) {
			n = batch_submit(f, ctx, reqs, nr, &next, cbs, free_slots, &nr_free,
					 &bytes, max_bytes);
			if (n < 0)
				err = n;
			else
				inflight += (unsigned)n;
			/* Unaligned, or nothing in flight to make room: read it here. */
			if (!err && next < nr && (!inflight || !aligned(f, reqs[next].buf,
					reqs[next].len, reqs[next].off))) {
				err = file_read(&f->base, reqs[next].buf, reqs[next].len,
						reqs[next].off);
				next++;
				continue;
			}
		}
		if (!inflight)
			continue;
		n = aio_wait(ctx, 1, TFS_BDEV_BATCH_DEPTH, ev);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			/* Nothing more can be learnt of them: io_destroy waits for them. */
			*broken = true;
			return err ? err : -errno;
		}
		for (int i = 0; i < n; i++) {
			const struct tfs_bdev_req *q = &reqs[ev[i].data];
			struct iocb *cb = (struct iocb *)(uintptr_t)ev[i].obj;

			free_slots[nr_free++] = (unsigned)(cb - cbs);
			inflight--;
			bytes -= (size_t)cb->aio_nbytes;
			if (ev[i].res < 0) {
				err = err ? err : (int)ev[i].res;
				continue;
			}
			add_bytes(&f->base.read_bytes, (uint64_t)ev[i].res);
			/* Short: the end of a sparse file, as raw_read. */
			if ((size_t)ev[i].res < q->len)
				memset((uint8_t *)q->buf + ev[i].res, 0, q->len - (size_t)ev[i].res);
		}
	}
	return err;
}

static int file_read_batch(struct tfs_bdev *d, const struct tfs_bdev_req *reqs, unsigned nr,
			   size_t max_bytes)
{
	struct file_dev *f = to_file(d);
	aio_context_t own = 0, *ctx = &own;
	bool broken = false;
	int err = 0, shared = -1;

	for (int i = 0; f->base.direct && nr > 1 && i < AIO_CONTEXTS && shared < 0; i++)
		if (pthread_mutex_trylock(&f->aio_lock[i]) == 0)
			shared = i;
	if (shared >= 0)
		ctx = &f->aio[shared];
	if (f->base.direct && nr > 1 && !*ctx && syscall(SYS_io_setup, TFS_BDEV_BATCH_DEPTH, ctx) < 0)
		*ctx = 0;
	if (!*ctx) {
		for (unsigned i = 0; i < nr && !err; i++)
			err = file_read(d, reqs[i].buf, reqs[i].len, reqs[i].off);
	} else {
		err = aio_batch(f, *ctx, reqs, nr, max_bytes, &broken);
	}
	if (*ctx && (broken || shared < 0)) {
		syscall(SYS_io_destroy, *ctx);
		*ctx = 0;
	}
	if (shared >= 0)
		pthread_mutex_unlock(&f->aio_lock[shared]);
	return err;
}

static const struct tfs_bdev_ops file_ops = {
	.read = file_read,
	.write = file_write,
	.flush = file_flush,
	.discard = file_discard,
	.preallocate = file_preallocate,
	.get_size = file_size,
	.grow = file_grow,
	.shrink = file_shrink,
	.destroy = file_destroy,
	.read_batch = file_read_batch,
};

/*
 * O_DIRECT when asked and the file system takes it; EINVAL at open is how
 * one that cannot (tmpfs before Linux 6.6, some FUSE file systems) refuses.
 */
static int open_fd(const char *path, bool read_only, bool *direct)
{
	int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
	int fd;

	if (*direct) {
		fd = open(path, flags | O_DIRECT);
		if (fd >= 0 || errno != EINVAL)
			return fd;
		tfs_info("%s: O_DIRECT refused (%s): using the host page cache", path,
			 strerror(errno));
		*direct = false;
	}
	return open(path, flags);
}

/* A block device's logical sector size; files: 4 KiB, which every file system takes. */
static int direct_align(int fd, bool blockdev, size_t *align)
{
	int sector;

	*align = 4096;
	if (!blockdev)
		return 0;
	if (ioctl(fd, BLKSSZGET, &sector))
		return -errno;
	if (sector < 512 || (sector & (sector - 1)))
		return -EINVAL;
	*align = (size_t)sector;
	return 0;
}

int tfs_bdev_open_direct(const char *path, bool read_only, bool direct, struct tfs_bdev **out)
{
	struct file_dev *f;
	struct stat st;
	size_t align;
	int fd, r;

	fd = open_fd(path, read_only, &direct);
	if (fd < 0) {
		r = -errno;
		tfs_err("cannot open %s: %s", path, strerror(errno));
		return r;
	}
	if (fstat(fd, &st)) {
		r = -errno;
		tfs_err("cannot stat %s: %s", path, strerror(errno));
		goto err_close;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		tfs_err("%s is neither a regular file nor a block device", path);
		r = -EINVAL;
		goto err_close;
	}
	r = direct_align(fd, S_ISBLK(st.st_mode), &align);
	if (r) {
		tfs_err("%s: cannot get its logical sector size: %s", path, strerror(-r));
		goto err_close;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		r = -ENOMEM;
		tfs_err("opening %s: out of memory", path);
		goto err_close;
	}
	f->base.ops = &file_ops;
	snprintf(f->base.name, sizeof(f->base.name), "%s", path);
	f->base.direct = direct;
	f->fd = fd;
	for (int i = 0; i < AIO_CONTEXTS; i++)
		pthread_mutex_init(&f->aio_lock[i], NULL);
	f->base.blockdev = S_ISBLK(st.st_mode);
	f->align = align;
	*out = &f->base;
	return 0;

err_close:
	close(fd);
	return r;
}

int tfs_bdev_open(const char *path, bool read_only, struct tfs_bdev **out)
{
	return tfs_bdev_open_direct(path, read_only, false, out);
}

bool tfs_bdev_is_blockdev(const struct tfs_bdev *dev)
{
	return dev->blockdev;
}

/* ---- memory device --------------------------------------------------- */

struct mem_dev {
	struct tfs_bdev base;
	pthread_rwlock_t lock; /* protects buf/size against grow */
	uint8_t *buf;
	uint64_t size;
};

static struct mem_dev *to_mem(struct tfs_bdev *d)
{
	return (struct mem_dev *)d;
}

static int mem_read(struct tfs_bdev *d, void *buf, size_t len, uint64_t off)
{
	struct mem_dev *m = to_mem(d);

	pthread_rwlock_rdlock(&m->lock);
	memset(buf, 0, len); /* past the end reads zeros, as on a sparse file */
	if (off < m->size)
		memcpy(buf, m->buf + off, len < m->size - off ? len : m->size - off);
	pthread_rwlock_unlock(&m->lock);
	add_bytes(&d->read_bytes, len);
	return 0;
}

static int mem_write(struct tfs_bdev *d, const void *buf, size_t len, uint64_t off)
{
	struct mem_dev *m = to_mem(d);
	int r = 0;

	pthread_rwlock_rdlock(&m->lock);
	if (off > m->size || len > m->size - off)
		r = -ENOSPC;
	else
		memcpy(m->buf + off, buf, len);
	pthread_rwlock_unlock(&m->lock);
	if (!r)
		add_bytes(&d->write_bytes, len);
	return r;
}

static int mem_flush(struct tfs_bdev *d)
{
	(void)d;
	return 0;
}

static int mem_discard(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	struct mem_dev *m = to_mem(d);

	pthread_rwlock_rdlock(&m->lock);
	if (off < m->size)
		memset(m->buf + off, 0, len > m->size - off ? m->size - off : len);
	pthread_rwlock_unlock(&m->lock);
	return 0;
}

/* Memory is all there already, reading zeros where nothing was written. */
static int mem_preallocate(struct tfs_bdev *d, uint64_t off, uint64_t len)
{
	(void)d;
	(void)off;
	(void)len;
	return 0;
}

static int mem_size(struct tfs_bdev *d, uint64_t *bytes)
{
	struct mem_dev *m = to_mem(d);

	pthread_rwlock_rdlock(&m->lock);
	*bytes = m->size;
	pthread_rwlock_unlock(&m->lock);
	return 0;
}

static int mem_grow(struct tfs_bdev *d, uint64_t new_bytes)
{
	struct mem_dev *m = to_mem(d);
	uint8_t *nb;
	int r = 0;

	pthread_rwlock_wrlock(&m->lock);
	if (new_bytes < m->size) {
		r = -EINVAL;
		goto out;
	}
	nb = realloc(m->buf, new_bytes ? new_bytes : 1);
	if (!nb) {
		r = -ENOMEM;
		goto out;
	}
	memset(nb + m->size, 0, new_bytes - m->size);
	m->buf = nb;
	m->size = new_bytes;
out:
	pthread_rwlock_unlock(&m->lock);
	return r;
}

static int mem_shrink(struct tfs_bdev *d, uint64_t new_bytes)
{
	struct mem_dev *m = to_mem(d);
	uint8_t *nb;
	int r = 0;

	pthread_rwlock_wrlock(&m->lock);
	if (new_bytes > m->size) {
		r = -EINVAL;
	} else {
		/* Keeping the larger buffer is fine if realloc cannot give it back. */
		nb = realloc(m->buf, new_bytes ? new_bytes : 1);
		if (nb)
			m->buf = nb;
		m->size = new_bytes;
	}
	pthread_rwlock_unlock(&m->lock);
	return r;
}

static void mem_destroy(struct tfs_bdev *d)
{
	struct mem_dev *m = to_mem(d);
	pthread_rwlock_destroy(&m->lock);
	free(m->buf);
	free(m);
}

static const struct tfs_bdev_ops mem_ops = {
	.read = mem_read,
	.write = mem_write,
	.flush = mem_flush,
	.discard = mem_discard,
	.preallocate = mem_preallocate,
	.get_size = mem_size,
	.grow = mem_grow,
	.shrink = mem_shrink,
	.destroy = mem_destroy,
};

int tfs_bdev_open_mem(uint64_t size, struct tfs_bdev **out)
{
	struct mem_dev *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->buf = calloc(1, size ? size : 1);
	if (!m->buf) {
		free(m);
		return -ENOMEM;
	}
	m->size = size;
	pthread_rwlock_init(&m->lock, NULL);
	m->base.ops = &mem_ops;
	snprintf(m->base.name, sizeof(m->base.name), "memory");
	*out = &m->base;
	return 0;
}

void tfs_bdev_close(struct tfs_bdev *dev)
{
	if (dev)
		dev->ops->destroy(dev);
}
