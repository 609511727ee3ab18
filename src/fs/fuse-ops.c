/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * fuse-ops.c - FUSE low-level operations: the mount root holds one regular
 * file per volume and the .snapshots directory, which holds one directory
 * per snapshot group.  See fuse-ops.h.
 *
 * Every handler replies exactly once: the last statement of each path is
 * a fuse_reply_* call, and helpers below return 0 or -errno instead of
 * replying.
 */
#include "fuse-ops.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fs.h"
#include "log.h"
#include "scratch.h"
#include "wb-stash.h"

/*
 * Attributes and names change only through this daemon: the kernel's own
 * writes keep its cache right, and the control socket invalidates the
 * entries it removes.  A second of caching saves a round trip per stat.
 */
#define ENTRY_TIMEOUT 1.0
#define ATTR_TIMEOUT 1.0

/* Linux 6.2, protocol 7.36; older UAPI headers lack it, older kernels ignore it. */
#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES (1 << 6)
#endif
#define PARALLEL_DIO_MINOR 36

enum ino_kind { INO_ROOT, INO_SNAPSHOTS, INO_GROUP, INO_VOL, INO_BAD };

static enum ino_kind kind_of(fuse_ino_t ino)
{
	if (ino == TFS_INO_ROOT)
		return INO_ROOT;
	if (ino == TFS_INO_SNAPSHOTS)
		return INO_SNAPSHOTS;
	if (ino >= TFS_INO_GROUP_BASE)
		return INO_GROUP;
	if (ino >= TFS_INO_VOL_BASE && ino - TFS_INO_VOL_BASE <= UINT32_MAX)
		return INO_VOL;
	return INO_BAD;
}

static uint32_t dev_of(fuse_ino_t ino)
{
	return (uint32_t)(ino - TFS_INO_VOL_BASE);
}

static int64_t group_of(fuse_ino_t ino)
{
	return (int64_t)(ino - TFS_INO_GROUP_BASE);
}

static struct tfs_fs *fs_of(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static struct tfs_inode *handle_of(struct fuse_file_info *fi)
{
	return (struct tfs_inode *)(uintptr_t)fi->fh;
}

static void set_time(struct timespec *ts, int64_t ns)
{
	ts->tv_sec = ns / 1000000000;
	ts->tv_nsec = ns % 1000000000;
}

/* ---- attributes ---- */

static void dir_attr(struct tfs_fs *fs, fuse_ino_t ino, mode_t mode, nlink_t nlink,
		     int64_t time_ns, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = S_IFDIR | mode;
	st->st_nlink = nlink;
	st->st_uid = fs->owner_uid;
	st->st_gid = fs->owner_gid;
	st->st_blksize = 4096;
	set_time(&st->st_atim, time_ns);
	set_time(&st->st_mtim, time_ns);
	set_time(&st->st_ctim, time_ns);
}

static void group_attr(struct tfs_fs *fs, const struct tfs_group_row *g, struct stat *st)
{
	/* Members are read-only, so is their directory; created time as mtime. */
	dir_attr(fs, tfs_ino_of_group(g->id), 0555, 2, g->created_ns, st);
}

static int vol_attr(struct tfs_fs *fs, struct tfs_inode *ino, struct stat *st)
{
	struct tfs_vol_row row;
	uint64_t allocated;
	int r;

	r = tfs_fs_inode_attr(fs, ino, &row, &allocated);
	if (r < 0)
		return r;
	memset(st, 0, sizeof(*st));
	st->st_ino = tfs_ino_of_dev(row.dev_id);
	st->st_mode = S_IFREG | (row.mode & 07777);
	st->st_nlink = row.unlinked ? 0 : 1;
	st->st_uid = row.uid;
	st->st_gid = row.gid;
	st->st_size = (off_t)row.size;
	st->st_blocks = (blkcnt_t)(allocated / 512);
	/* cp and friends size their buffers by this; a 1 GiB block would be silly. */
	st->st_blksize = fs->block_size < (1u << 20) ? (blksize_t)fs->block_size : (1 << 20);
	set_time(&st->st_atim, row.atime_ns);
	set_time(&st->st_mtim, row.mtime_ns);
	set_time(&st->st_ctim, row.ctime_ns);
	return 0;
}

static int any_attr(struct tfs_fs *fs, fuse_ino_t ino, struct stat *st)
{
	struct tfs_group_row g;
	struct tfs_inode *vi;
	int r;

	switch (kind_of(ino)) {
	case INO_ROOT:
		dir_attr(fs, ino, 0755, 3, fs->mount_time_ns, st);
		return 0;
	case INO_SNAPSHOTS:
		dir_attr(fs, ino, 0755, 2, fs->mount_time_ns, st);
		return 0;
	case INO_GROUP:
		r = tfs_fs_group_by_id(fs, group_of(ino), &g);
		if (r == 0)
			group_attr(fs, &g, st);
		return r;
	case INO_VOL:
		vi = tfs_fs_inode_get(fs, dev_of(ino));
		return vi ? vol_attr(fs, vi, st) : -ENOENT;
	default:
		return -ENOENT;
	}
}

/* ---- entries ---- */

static void reply_vol_entry(fuse_req_t req, struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct fuse_entry_param e;
	int r;

	memset(&e, 0, sizeof(e));
	r = vol_attr(fs, ino, &e.attr);
	if (r < 0) {
		tfs_fs_forget(fs, ino->dev_id, 1);
		fuse_reply_err(req, -r);
		return;
	}
	e.ino = e.attr.st_ino;
	e.generation = ino->generation;
	e.attr_timeout = ATTR_TIMEOUT;
	e.entry_timeout = ENTRY_TIMEOUT;
	if (fuse_reply_entry(req, &e) != 0)
		tfs_fs_forget(fs, ino->dev_id, 1); /* the kernel did not take the reference */
}

static void reply_dir_entry(fuse_req_t req, const struct stat *st)
{
	struct fuse_entry_param e;

	memset(&e, 0, sizeof(e));
	e.ino = st->st_ino;
	e.generation = 1;
	e.attr = *st;
	e.attr_timeout = ATTR_TIMEOUT;
	e.entry_timeout = ENTRY_TIMEOUT;
	fuse_reply_entry(req, &e);
}

/* Count a lookup of the volume with this row and reply its entry. */
static void lookup_row(fuse_req_t req, struct tfs_fs *fs, const struct tfs_vol_row *row)
{
	struct tfs_inode *ino;
	int r;

	pthread_mutex_lock(&fs->lock);
	r = tfs_fs_inode_lookup(fs, row, &ino);
	pthread_mutex_unlock(&fs->lock);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	reply_vol_entry(req, fs, ino);
}

static int find_member(struct tfs_fs *fs, int64_t gid, const char *name, struct tfs_vol_row *out)
{
	struct tfs_vol_row *rows;
	unsigned nr;
	int r;

	r = tfs_fs_list(fs, gid, &rows, &nr);
	if (r < 0)
		return r;
	r = -ENOENT;
	for (unsigned i = 0; i < nr; i++) {
		if (!strcmp(rows[i].name, name)) {
			*out = rows[i];
			r = 0;
			break;
		}
	}
	free(rows);
	return r;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_vol_row row;
	struct tfs_group_row g;
	struct stat st;
	int r;

	/* Invalid names simply do not exist; overlong ones say so, as on any fs. */
	if (strlen(name) > TFS_NAME_MAX) {
		fuse_reply_err(req, ENAMETOOLONG);
		return;
	}
	switch (kind_of(parent)) {
	case INO_ROOT:
		if (!strcmp(name, TFS_SNAPSHOTS_NAME)) {
			dir_attr(fs, TFS_INO_SNAPSHOTS, 0755, 2, fs->mount_time_ns, &st);
			reply_dir_entry(req, &st);
			return;
		}
		r = tfs_catalog_get_by_name(fs->cat, name, &row);
		break;
	case INO_SNAPSHOTS:
		r = tfs_catalog_get_group(fs->cat, name, &g);
		if (r == 0) {
			group_attr(fs, &g, &st);
			reply_dir_entry(req, &st);
			return;
		}
		break;
	case INO_GROUP:
		r = find_member(fs, group_of(parent), name, &row);
		break;
	case INO_VOL:
		r = -ENOTDIR;
		break;
	default:
		r = -ENOENT;
		break;
	}
	if (r == -EINVAL)
		r = -ENOENT;
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	lookup_row(req, fs, &row);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	if (kind_of(ino) == INO_VOL)
		tfs_fs_forget(fs_of(req), dev_of(ino), nlookup);
	fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		if (kind_of(forgets[i].ino) == INO_VOL)
			tfs_fs_forget(fs_of(req), dev_of(forgets[i].ino), forgets[i].nlookup);
	fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	int r;

	if (fi && kind_of(ino) == INO_VOL)
		r = vol_attr(fs_of(req), handle_of(fi), &st); /* open, maybe unlinked */
	else
		r = any_attr(fs_of(req), ino, &st);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static int64_t ns_of(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

static int setattr_vol(struct tfs_fs *fs, fuse_ino_t ino, const struct stat *attr, int to_set,
		       struct fuse_file_info *fi, struct stat *out)
{
	struct tfs_inode *vi;
	int64_t now = tfs_now_ns();
	int r;

	vi = fi ? handle_of(fi) : tfs_fs_inode_get(fs, dev_of(ino));
	if (!vi)
		return -ENOENT;
	if (vi->row.kind == TFS_VOL_GROUP_MEMBER || fs->read_only)
		return -EROFS;

	if (to_set & FUSE_SET_ATTR_SIZE) {
		struct tfs_inode *pinned;

		if (attr->st_size < 0)
			return -EINVAL;
		/* A pin keeps the engine device open for the truncation. */
		r = tfs_fs_pin(fs, vi->dev_id, true, &pinned);
		if (r < 0)
			return r;
		/* A stashed writeback past the new end must not land after the truncate. */
		tfs_wb_wait(pinned, 0, 0);
		r = tfs_fs_set_size(fs, pinned, (uint64_t)attr->st_size);
		tfs_fs_unpin(fs, pinned);
		if (r < 0)
			return r;
	}

	pthread_mutex_lock(&vi->attr_lock);
	if (to_set & FUSE_SET_ATTR_MODE)
		vi->row.mode = attr->st_mode & 07777;
	if (to_set & FUSE_SET_ATTR_UID)
		vi->row.uid = attr->st_uid;
	if (to_set & FUSE_SET_ATTR_GID)
		vi->row.gid = attr->st_gid;
	if (to_set & FUSE_SET_ATTR_ATIME_NOW)
		vi->row.atime_ns = now;
	else if (to_set & FUSE_SET_ATTR_ATIME)
		vi->row.atime_ns = ns_of(&attr->st_atim);
	if (to_set & FUSE_SET_ATTR_MTIME_NOW)
		vi->row.mtime_ns = now;
	else if (to_set & FUSE_SET_ATTR_MTIME)
		vi->row.mtime_ns = ns_of(&attr->st_mtim);
	if (to_set & FUSE_SET_ATTR_CTIME)
		vi->row.ctime_ns = ns_of(&attr->st_ctim);
	else if (to_set & ~(FUSE_SET_ATTR_SIZE))
		vi->row.ctime_ns = now;
	vi->dirty = true;
	pthread_mutex_unlock(&vi->attr_lock);

	r = tfs_fs_persist(fs, vi);
	if (r < 0)
		return r;
	return vol_attr(fs, vi, out);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	struct tfs_fs *fs = fs_of(req);
	struct stat st;
	int r;

	if (kind_of(ino) == INO_VOL) {
		r = setattr_vol(fs, ino, attr, to_set, fi, &st);
	} else if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID |
			     FUSE_SET_ATTR_SIZE)) {
		/* Directories are the daemon's: their mode and owner are fixed. */
		r = -EPERM;
	} else {
		r = any_attr(fs, ino, &st); /* touch on a directory: accepted, not stored */
	}
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

/* ---- namespace ---- */

/* Errors for creating something under a parent that is not the root. */
static int not_root_create_error(fuse_ino_t parent)
{
	switch (kind_of(parent)) {
	case INO_SNAPSHOTS:
		return -EPERM;  /* only directories (groups) live there */
	case INO_GROUP:
		return -EROFS;  /* a group is frozen */
	case INO_VOL:
		return -ENOTDIR;
	default:
		return -ENOENT;
	}
}

static int create_common(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
			 struct tfs_inode **out)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);

	if (kind_of(parent) != INO_ROOT)
		return not_root_create_error(parent);
	if (!S_ISREG(mode))
		return -EPERM; /* volumes are regular files; nothing else is stored */
	return tfs_fs_create_volume(fs_of(req), name, mode & 07777, ctx->uid, ctx->gid, out);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		     dev_t rdev)
{
	struct tfs_inode *ino;
	int r;

	r = create_common(req, parent, name, mode, &ino);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		reply_vol_entry(req, fs_of(req), ino);
}

static bool wants_write(int flags)
{
	return (flags & O_ACCMODE) != O_RDONLY;
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	struct tfs_fs *fs = fs_of(req);
	struct fuse_entry_param e;
	struct tfs_inode *ino, *pinned;
	int r;

	r = create_common(req, parent, name, S_IFREG | (mode & 07777), &ino);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	r = tfs_fs_pin(fs, ino->dev_id, wants_write(fi->flags), &pinned);
	if (r == 0) {
		memset(&e, 0, sizeof(e));
		r = vol_attr(fs, ino, &e.attr);
		if (r < 0)
			tfs_fs_unpin(fs, pinned);
	}
	if (r < 0) {
		tfs_fs_forget(fs, ino->dev_id, 1);
		fuse_reply_err(req, -r);
		return;
	}
	e.ino = e.attr.st_ino;
	e.generation = ino->generation;
	e.attr_timeout = ATTR_TIMEOUT;
	e.entry_timeout = ENTRY_TIMEOUT;
	fi->fh = (uintptr_t)pinned;
	fi->keep_cache = 0;
	/*
	 * An O_DIRECT create gets FOPEN_DIRECT_IO alone, as libfuse can send
	 * it, so it does not put the inode in the kernel's cached mode, which
	 * would make every other open's direct writes exclusive.  The new
	 * volume is empty, and direct writes past EOF are exclusive anyway.
	 */
	fi->direct_io = (fi->flags & O_DIRECT) && fs->parallel_dio;
	if (fuse_reply_create(req, &e, fi) != 0) {
		/* Interrupted: the kernel holds neither the file nor the reference. */
		tfs_fs_unpin(fs, pinned);
		tfs_fs_forget(fs, ino->dev_id, 1);
	}
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_group_row g;
	struct stat st;
	int r;

	if (kind_of(parent) != INO_SNAPSHOTS) {
		/* The root holds volumes only; .snapshots is where directories go. */
		fuse_reply_err(req, EPERM);
		return;
	}
	/*
	 * The group must hold what was written before the mkdir, also what
	 * writers left in the kernel's cache (dm's suspend of an origin
	 * syncs its page cache before lvcreate -s snapshots it).
	 */
	r = tfs_fs_flush_cached_writes(fs, NULL, 0, "mkdir .snapshots");
	if (r == 0)
		r = tfs_fs_create_group(fs, name, &g);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	group_attr(fs, &g, &st);
	reply_dir_entry(req, &st);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	int r;

	if (kind_of(parent) == INO_ROOT)
		r = tfs_fs_unlink_volume(fs_of(req), name);
	else if (kind_of(parent) == INO_GROUP)
		r = -EROFS; /* members go with their group: rmdir .snapshots/NAME */
	else
		r = -EPERM;
	fuse_reply_err(req, -r);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	int r;

	switch (kind_of(parent)) {
	case INO_SNAPSHOTS:
		r = tfs_fs_remove_group(fs_of(req), name);
		break;
	case INO_ROOT:
		r = !strcmp(name, TFS_SNAPSHOTS_NAME) ? -EPERM : -ENOTDIR;
		break;
	case INO_GROUP:
		r = -ENOTDIR;
		break;
	default:
		r = -ENOENT;
		break;
	}
	fuse_reply_err(req, -r);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	int r;

	if (kind_of(parent) == INO_ROOT && kind_of(newparent) == INO_ROOT)
		r = tfs_fs_rename_volume(fs_of(req), name, newname, flags);
	else if (kind_of(parent) != kind_of(newparent) || parent != newparent)
		r = -EXDEV; /* volumes live at the root only */
	else
		r = -EPERM; /* groups and their members keep their names */
	fuse_reply_err(req, -r);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	fuse_reply_err(req, EPERM); /* one name per volume: the catalog maps names to devices 1:1 */
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, EPERM);
}

/* ---- files ---- */

/*
 * The reply to an O_DIRECT open: FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES.
 * On an open that may use the page cache the kernel holds the file's inode
 * lock exclusively for the whole of a synchronous direct write, so one
 * write waiting in the engine (held for data space) stops every
 * other write to the file in uninterruptible sleep, even an overwrite of a
 * mapped block the engine would let through.  With both flags, and while
 * no cached open of the inode exists, the kernel takes the lock shared and
 * the engine's range locks order writes per block.  libfuse 3.14 has no
 * fuse_file_info bit for the second flag (3.15 added one), so this builds
 * the reply from the kernel's struct as fuse_reply_open does there: the
 * handle and the flags, of which keep_cache, nonseekable, noflush and
 * cache_readdir are never set for a volume.  A later libfuse may keep
 * state in fuse_reply_open, so it is used wherever it can say this.
 * Returns what fuse_reply_open would: nonzero if the kernel did not take
 * the handle.
 */
static int reply_open_direct(fuse_req_t req, struct fuse_file_info *fi)
{
#if FUSE_VERSION >= FUSE_MAKE_VERSION(3, 15)
	fi->direct_io = 1;
	fi->parallel_direct_writes = 1;
	return fuse_reply_open(req, fi);
#else
	struct fuse_open_out out = {
		.fh = fi->fh,
		.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
	};
	struct iovec iov = { .iov_base = &out, .iov_len = sizeof(out) };

	return fuse_reply_iov(req, &iov, 1);
#endif
}

/*
 * With the writeback cache the kernel would let a write past the end of a
 * fixed-size file (an origin, a COW snapshot, a cached origin) succeed
 * into the page cache and fail only at writeback, and it would keep the
 * larger size it made up.  So writable opens of those bypass the cache, as
 * O_DIRECT ones do: such a write fails at once with ENOSPC, as on a block
 * device.  The cost: no shared writable mmap of them (the kernel refuses
 * it on such opens), and their reads through that descriptor are not cached.
 */
static bool writes_fixed_size(const struct tfs_fs *fs, fuse_ino_t ino, int flags)
{
	return fs->writeback && wants_write(flags) && dev_of(ino) >= TFS_DEV_ID_OTHER;
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_inode *pinned;
	int r;

	if (kind_of(ino) != INO_VOL) {
		fuse_reply_err(req, kind_of(ino) == INO_BAD ? ENOENT : EISDIR);
		return;
	}
	r = tfs_fs_pin(fs, dev_of(ino), wants_write(fi->flags), &pinned);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	fi->fh = (uintptr_t)pinned;
	/*
	 * No keep_cache: data cached from an earlier open is dropped.  The
	 * page cache is not forced off for other opens, so mmap and buffered
	 * I/O work.
	 */
	fi->keep_cache = 0;
	fi->direct_io = (fi->flags & O_DIRECT) || writes_fixed_size(fs, ino, fi->flags);
	if (fi->direct_io && fs->parallel_dio)
		r = reply_open_direct(req, fi);
	else
		r = fuse_reply_open(req, fi);
	if (r != 0)
		tfs_fs_unpin(fs, pinned);
}

static uint64_t cur_size(struct tfs_inode *ino)
{
	uint64_t size;

	pthread_mutex_lock(&ino->attr_lock);
	size = ino->row.size;
	pthread_mutex_unlock(&ino->attr_lock);
	return size;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct tfs_inode *vi = handle_of(fi);
	struct tfs_wb_rec *ov = NULL;
	uint64_t fsize;
	void *buf;
	int r;

	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	pthread_rwlock_rdlock(&vi->io_lock);
	fsize = cur_size(vi);
	if ((uint64_t)off >= fsize || size == 0) {
		pthread_rwlock_unlock(&vi->io_lock);
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	if (size > fsize - (uint64_t)off)
		size = (size_t)(fsize - (uint64_t)off);
	/*
	 * The worker's scratch buffer, reused by its next read rather than
	 * left in its malloc arena; page-aligned, so an O_DIRECT data device
	 * reads straight into it.
	 */
	buf = tfs_scratch_get(size);
	if (!buf) {
		pthread_rwlock_unlock(&vi->io_lock);
		fuse_reply_err(req, ENOMEM);
		return;
	}
	/* Writebacks still stashed are newer than the device: copied before it is read. */
	r = tfs_wb_overlay_take(vi, (uint64_t)off, size, &ov);
	if (r == 0)
		r = tfs_dev_read(vi->dev, buf, size, (uint64_t)off);
	pthread_rwlock_unlock(&vi->io_lock);
	if (r == 0 && ov)
		tfs_wb_overlay_apply(ov, buf, (uint64_t)off);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_buf(req, buf, size);
	tfs_scratch_put(buf, size);
}

/* 0 if [off, off+len) fits the format's limit, else -EFBIG (or -EINVAL). */
static int check_range(struct tfs_fs *fs, off_t off, uint64_t len)
{
	if (off < 0)
		return -EINVAL;
	if ((uint64_t)off > fs->max_size || len > fs->max_size - (uint64_t)off)
		return -EFBIG;
	return 0;
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_inode *vi = handle_of(fi);
	int r;

	r = check_range(fs, off, size);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	/*
	 * A writeback the engine would hold is answered from the stash, so no
	 * close(2) waits for it; anything else goes behind stashed writebacks
	 * of the same bytes.
	 */
	if (fi->writepage && fs->writeback) {
		r = tfs_wb_write(fs, vi, buf, size, (uint64_t)off);
		if (r < 0)
			fuse_reply_err(req, -r);
		else
			fuse_reply_write(req, size);
		return;
	}
	tfs_wb_wait(vi, (uint64_t)off, size);
	pthread_rwlock_rdlock(&vi->io_lock);
	r = tfs_dev_write(vi->dev, buf, size, (uint64_t)off);
	/*
	 * Writes past EOF extend.  A writeback of cached pages leaves the
	 * times alone: the kernel keeps mtime and ctime as of the write(2)
	 * and sends them in a setattr of their own (at writeback, fsync and
	 * close), which a later writeback must not overwrite with its own time.
	 */
	if (r == 0)
		tfs_fs_extend(fs, vi, (uint64_t)off + size, !fi->writepage);
	pthread_rwlock_unlock(&vi->io_lock);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_write(req, size);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	/*
	 * close(2): the size a writer left becomes visible in the catalog now,
	 * and a stashed writeback that failed is reported (not waited for:
	 * what the engine holds must not hold the close).
	 */
	int r = tfs_fs_persist(fs_of(req), handle_of(fi));

	if (r == 0)
		r = tfs_wb_take_error(handle_of(fi));
	fuse_reply_err(req, -r);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	tfs_fs_unpin(fs_of(req), handle_of(fi));
	fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	struct tfs_inode *vi = handle_of(fi);
	int r;

	/* Stashed writebacks are acknowledged writes: in before the flush. */
	tfs_wb_wait(vi, 0, 0);
	/* The size first: after the commit below, data past the old EOF is durable. */
	r = tfs_fs_persist(fs_of(req), vi);
	if (r == 0)
		r = tfs_dev_flush(vi->dev);
	if (r == 0)
		r = tfs_wb_take_error(vi);
	fuse_reply_err(req, -r);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
			 struct fuse_file_info *fi)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_inode *vi = handle_of(fi);
	bool keep = mode & FALLOC_FL_KEEP_SIZE;
	uint64_t off = (uint64_t)offset, len = (uint64_t)length, size;
	int r;

	if (offset < 0 || length <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	r = check_range(fs, offset, len);
	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	tfs_wb_wait(vi, off, len);
	pthread_rwlock_rdlock(&vi->io_lock);
	size = cur_size(vi);
	switch (mode & ~FALLOC_FL_KEEP_SIZE) {
	case 0:
		/* Provision (zeroed blocks); without KEEP_SIZE the file grows too. */
		r = tfs_dev_provision(vi->dev, off, len);
		if (r == 0 && !keep)
			tfs_fs_extend(fs, vi, off + len, false);
		break;
	case FALLOC_FL_PUNCH_HOLE:
		if (!keep) {
			r = -EOPNOTSUPP; /* the kernel insists on KEEP_SIZE; so do we */
			break;
		}
		/* Nothing is mapped past EOF (a shrink unmaps it): clamp. */
		if (off < size) {
			r = tfs_dev_discard(vi->dev, off, off + len > size ? size - off : len);
			if (r == 0)
				tfs_fs_extend(fs, vi, 0, true);
		}
		break;
	case FALLOC_FL_ZERO_RANGE:
		/*
		 * A fixed-size file does not grow, as mode 0 says too; and with
		 * the writeback cache the kernel would take a success as its size.
		 */
		if (!keep && dev_of(ino) >= TFS_DEV_ID_OTHER && off + len > size) {
			r = -ENOSPC;
			break;
		}
		if (off < size)
			r = tfs_dev_zero_range(vi->dev, off, off + len > size ? size - off : len);
		if (r == 0)
			tfs_fs_extend(fs, vi, keep ? 0 : off + len, true);
		break;
	default:
		r = -EOPNOTSUPP; /* COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE */
		break;
	}
	pthread_rwlock_unlock(&vi->io_lock);
	fuse_reply_err(req, -r);
}

/*
 * copy_file_range between volumes of the pool (the kernel sends only pairs
 * of files of this mount, and refuses overlapping ranges of one file):
 * whole blocks are shared by the engine, the rest copied.  EXDEV and
 * EOPNOTSUPP make the kernel copy through read and write itself.  One
 * reply carries at most 4 GiB - 1 (struct fuse_write_out), so a longer
 * range is done in part and the caller asks again for the rest.
 */
static void op_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
			       struct fuse_file_info *fi_in, fuse_ino_t ino_out, off_t off_out,
			       struct fuse_file_info *fi_out, size_t len, int flags)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_inode *src = handle_of(fi_in), *dst = handle_of(fi_out);
	/* io_locks in device order, as truncate's write lock may wait between them. */
	struct tfs_inode *first = src->dev_id <= dst->dev_id ? src : dst;
	struct tfs_inode *second = first == src ? dst : src;
	uint64_t n = len, size, most = UINT32_MAX / fs->block_size * fs->block_size;
	int r;

	if (flags || off_in < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	/* The kernel wrote back both ranges first; what we stashed of them goes in first too. */
	tfs_wb_wait(src, (uint64_t)off_in, len);
	if (off_out >= 0)
		tfs_wb_wait(dst, (uint64_t)off_out, len);
	pthread_rwlock_rdlock(&first->io_lock);
	if (second != first)
		pthread_rwlock_rdlock(&second->io_lock);
	/* What the source holds, first: "to the end" may be asked as a huge length. */
	size = cur_size(src);
	if ((uint64_t)off_in >= size)
		n = 0;
	else if (n > size - (uint64_t)off_in)
		n = size - (uint64_t)off_in;
	if (n > most)
		n = most;
	r = check_range(fs, off_out, n);
	if (r == 0 && n)
		r = tfs_dev_clone_range(dst->dev, src->dev, (uint64_t)off_in, (uint64_t)off_out, n);
	if (r == 0 && n)
		tfs_fs_extend(fs, dst, (uint64_t)off_out + n, true);
	if (second != first)
		pthread_rwlock_unlock(&second->io_lock);
	pthread_rwlock_unlock(&first->io_lock);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_write(req, (size_t)n);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
		     struct fuse_file_info *fi)
{
	struct tfs_inode *vi = handle_of(fi);
	uint64_t out;
	int r;

	if (whence != SEEK_DATA && whence != SEEK_HOLE) {
		fuse_reply_err(req, EINVAL); /* the kernel handles SET/CUR/END itself */
		return;
	}
	if (off < 0) {
		fuse_reply_err(req, ENXIO);
		return;
	}
	/* Stashed writebacks are data the mapping does not show yet. */
	tfs_wb_wait(vi, 0, 0);
	pthread_rwlock_rdlock(&vi->io_lock);
	r = tfs_dev_seek(vi->dev, (uint64_t)off, whence, cur_size(vi), &out);
	pthread_rwlock_unlock(&vi->io_lock);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_lseek(req, (off_t)out);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct tfs_fs *fs = fs_of(req);
	struct tfs_pool_status st;
	struct statvfs sv;

	tfs_pool_status(fs->pool, &st);
	memset(&sv, 0, sizeof(sv));
	sv.f_bsize = fs->block_size;
	sv.f_frsize = fs->block_size;
	sv.f_blocks = st.data_total;
	sv.f_bfree = st.data_total > st.data_used ? st.data_total - st.data_used : 0;
	sv.f_bavail = sv.f_bfree;
	sv.f_namemax = TFS_NAME_MAX;
	fuse_reply_statfs(req, &sv);
}

/* ---- directories ---- */

struct dir_entry {
	char *name;
	fuse_ino_t ino;
	mode_t type;
};

struct dir_list {
	struct dir_entry *e;
	size_t nr, cap;
};

static int dir_add(struct dir_list *d, const char *name, fuse_ino_t ino, mode_t type)
{
	if (d->nr == d->cap) {
		size_t cap = d->cap ? d->cap * 2 : 32;
		struct dir_entry *n = realloc(d->e, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		d->e = n;
		d->cap = cap;
	}
	d->e[d->nr].name = strdup(name);
	if (!d->e[d->nr].name)
		return -ENOMEM;
	d->e[d->nr].ino = ino;
	d->e[d->nr].type = type;
	d->nr++;
	return 0;
}

static void dir_free(struct dir_list *d)
{
	for (size_t i = 0; i < d->nr; i++)
		free(d->e[i].name);
	free(d->e);
	free(d);
}

static int add_rows(struct tfs_fs *fs, struct dir_list *d, int64_t gid)
{
	struct tfs_vol_row *rows;
	unsigned nr;
	int r;

	r = tfs_fs_list(fs, gid, &rows, &nr);
	if (r < 0)
		return r;
	for (unsigned i = 0; r == 0 && i < nr; i++)
		r = dir_add(d, rows[i].name, tfs_ino_of_dev(rows[i].dev_id), S_IFREG);
	free(rows);
	return r;
}

/* The listing is taken at opendir so offsets stay stable while it is read. */
static int dir_build(struct tfs_fs *fs, fuse_ino_t ino, struct dir_list *d)
{
	fuse_ino_t parent = TFS_INO_ROOT;
	struct tfs_group_row *groups, g;
	unsigned nr;
	int r;

	if (kind_of(ino) == INO_GROUP) {
		parent = TFS_INO_SNAPSHOTS;
		r = tfs_fs_group_by_id(fs, group_of(ino), &g);
		if (r < 0)
			return r;
	}
	r = dir_add(d, ".", ino, S_IFDIR);
	if (r == 0)
		r = dir_add(d, "..", parent, S_IFDIR);
	if (r < 0)
		return r;
	switch (kind_of(ino)) {
	case INO_ROOT:
		r = dir_add(d, TFS_SNAPSHOTS_NAME, TFS_INO_SNAPSHOTS, S_IFDIR);
		return r < 0 ? r : add_rows(fs, d, 0);
	case INO_SNAPSHOTS:
		r = tfs_fs_list_groups(fs, &groups, &nr);
		if (r < 0)
			return r;
		for (unsigned i = 0; r == 0 && i < nr; i++)
			r = dir_add(d, groups[i].name, tfs_ino_of_group(groups[i].id), S_IFDIR);
		free(groups);
		return r;
	case INO_GROUP:
		return add_rows(fs, d, group_of(ino));
	default:
		return -ENOTDIR;
	}
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dir_list *d;
	int r;

	if (kind_of(ino) == INO_VOL || kind_of(ino) == INO_BAD) {
		fuse_reply_err(req, kind_of(ino) == INO_VOL ? ENOTDIR : ENOENT);
		return;
	}
	d = calloc(1, sizeof(*d));
	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	r = dir_build(fs_of(req), ino, d);
	if (r < 0) {
		dir_free(d);
		fuse_reply_err(req, -r);
		return;
	}
	fi->fh = (uintptr_t)d;
	if (fuse_reply_open(req, fi) != 0)
		dir_free(d);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct dir_list *d = (struct dir_list *)(uintptr_t)fi->fh;
	char *buf;
	size_t used = 0;

	buf = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (size_t i = off < 0 ? 0 : (size_t)off; i < d->nr; i++) {
		struct stat st = { .st_ino = d->e[i].ino, .st_mode = d->e[i].type };
		size_t n = fuse_add_direntry(req, buf + used, size - used, d->e[i].name, &st,
					     (off_t)(i + 1));

		if (n > size - used)
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	dir_free((struct dir_list *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	/* Namespace changes are committed before they are acknowledged. */
	fuse_reply_err(req, 0);
}

/* ---- xattrs: none are stored ---- */

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
			size_t size, int flags)
{
	fuse_reply_err(req, ENOTSUP);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	/*
	 * ENOSYS, not ENODATA: the kernel then answers every later getxattr
	 * itself (ENOTSUP to callers).  Otherwise each write(2) costs a
	 * round trip here, the kernel asking for security.capability before
	 * it may skip clearing privileges: measured, 4 KiB random overwrites
	 * ran at half the rate.
	 */
	fuse_reply_err(req, ENOSYS);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	if (size == 0)
		fuse_reply_xattr(req, 0);
	else
		fuse_reply_buf(req, NULL, 0);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	fuse_reply_err(req, ENODATA);
}

/* ---- session ---- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	struct tfs_fs *fs = userdata;

	/* The kernel's protocol: 7.36 (Linux 6.2) and later know the flag. */
	fs->parallel_dio = conn->proto_major == FUSE_KERNEL_VERSION &&
			   conn->proto_minor >= PARALLEL_DIO_MINOR;
	/*
	 * O_TRUNC comes as a setattr so truncation has one path, and nobody
	 * but us changes the data, so the kernel need not re-check attributes
	 * to keep its cache (no auto_inval_data).
	 */
	conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_ATOMIC_O_TRUNC |
			FUSE_CAP_AUTO_INVAL_DATA);
	/*
	 * writeback_cache: buffered writes stay in the volume file's page
	 * cache until writeback, fsync or close, as they do on a block
	 * device; their errors reach the writer at fsync and close.  The
	 * kernel then trusts its own size and times of a regular file over
	 * ours, which holds because both change only through it: a write
	 * past EOF, a truncate, a fallocate.  O_DIRECT opens keep
	 * FOPEN_DIRECT_IO and bypass the cache.  Off, every write(2) waits
	 * for the engine.
	 */
	fs->writeback = fs->cfg.writeback_cache && !fs->read_only &&
			(conn->capable & FUSE_CAP_WRITEBACK_CACHE);
	if (fs->writeback)
		conn->want |= FUSE_CAP_WRITEBACK_CACHE;
	if (conn->capable & FUSE_CAP_ASYNC_DIO)
		conn->want |= FUSE_CAP_ASYNC_DIO;
	/* libfuse asks the kernel for enough pages (max_pages) to carry this. */
	conn->max_write = TFS_FUSE_MAX_WRITE;
	/* Room for parallel O_DIRECT and readahead requests. */
	conn->max_background = 64;
	conn->congestion_threshold = 48;
}

const struct fuse_lowlevel_ops tfs_fuse_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.forget = op_forget,
	.forget_multi = op_forget_multi,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.mknod = op_mknod,
	.mkdir = op_mkdir,
	.unlink = op_unlink,
	.rmdir = op_rmdir,
	.symlink = op_symlink,
	.rename = op_rename,
	.link = op_link,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.fsync = op_fsync,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.releasedir = op_releasedir,
	.fsyncdir = op_fsyncdir,
	.statfs = op_statfs,
	.setxattr = op_setxattr,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.removexattr = op_removexattr,
	.create = op_create,
	.fallocate = op_fallocate,
	.copy_file_range = op_copy_file_range,
	.lseek = op_lseek,
};
