/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Writebacks the engine would hold, taken off the kernel (wb-stash.h).
 */
#include "wb-stash.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "fs.h"
#include "log.h"
#include "target.h"

/* A stashed writeback, or (an overlay) a copy of a record's bytes within a read's range. */
struct tfs_wb_rec {
	struct tfs_wb_rec *next;
	uint64_t off;
	size_t len;
	unsigned char data[];
};

static struct tfs_wb_rec *rec_new(uint64_t off, const void *data, size_t len)
{
	struct tfs_wb_rec *rec = malloc(sizeof(*rec) + len);

	if (rec) {
		rec->next = NULL;
		rec->off = off;
		rec->len = len;
		memcpy(rec->data, data, len);
	}
	return rec;
}

static void recs_free(struct tfs_wb_rec *rec)
{
	while (rec) {
		struct tfs_wb_rec *next = rec->next;

		free(rec);
		rec = next;
	}
}

void tfs_wb_inode_init(struct tfs_inode *ino)
{
	pthread_mutex_init(&ino->wb_lock, NULL);
	pthread_cond_init(&ino->wb_cv, NULL);
	atomic_init(&ino->wb_nr, 0);
}

void tfs_wb_inode_destroy(struct tfs_inode *ino)
{
	pthread_cond_destroy(&ino->wb_cv);
	pthread_mutex_destroy(&ino->wb_lock);
}

static bool overlaps(const struct tfs_wb_rec *rec, uint64_t off, uint64_t len)
{
	return len == 0 || (rec->off < off + len && off < rec->off + rec->len);
}

/*
 * Without the lock: every read and write of a volume asks, and almost
 * always nothing is stashed.  A record answered to the kernel was counted
 * before the answer, so a request that came after it sees it.
 */
static bool has_records(struct tfs_inode *ino)
{
	return atomic_load_explicit(&ino->wb_nr, memory_order_acquire) != 0;
}

/* Room for len more bytes: waits while the mount's stash is full (but takes one record always). */
static void room_take(struct tfs_fs *fs, size_t len)
{
	pthread_mutex_lock(&fs->wb_lock);
	while (fs->wb_bytes > 0 && fs->wb_bytes + len > TFS_WB_STASH_MAX)
		pthread_cond_wait(&fs->wb_cv, &fs->wb_lock);
	fs->wb_bytes += len;
	pthread_mutex_unlock(&fs->wb_lock);
}

static void room_give(struct tfs_fs *fs, size_t len)
{
	pthread_mutex_lock(&fs->wb_lock);
	fs->wb_bytes -= len;
	pthread_cond_broadcast(&fs->wb_cv);
	pthread_mutex_unlock(&fs->wb_lock);
}

/* Into the device; held until the engine takes it, unless nowait (-EAGAIN then). */
static int write_through(struct tfs_fs *fs, struct tfs_inode *ino, const void *buf, size_t len,
			 uint64_t off, bool nowait)
{
	int r;

	pthread_rwlock_rdlock(&ino->io_lock);
	r = nowait ? tfs_dev_write_nowait(ino->dev, buf, len, off) :
		     tfs_dev_write(ino->dev, buf, len, off);
	/* A writeback leaves the times alone: the kernel sends its own. */
	if (r == 0)
		tfs_fs_extend(fs, ino, off + len, false);
	pthread_rwlock_unlock(&ino->io_lock);
	return r;
}

static int write_rec(struct tfs_fs *fs, struct tfs_inode *ino, const struct tfs_wb_rec *rec)
{
	int r = write_through(fs, ino, rec->data, rec->len, rec->off, false);

	if (r < 0)
		tfs_warn("%s: a cached write of %zu bytes at offset %" PRIu64 " failed at "
			 "writeback (%s): the file's next fsync or close reports it",
			 ino->row.name, rec->len, rec->off, strerror(-r));
	return r;
}

struct writer_arg {
	struct tfs_fs *fs;
	struct tfs_inode *ino;
};

/* The volume's writer: its records in order, until none is left; then it lets the volume go. */
static void writer_loop(struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct tfs_wb_rec *rec;
	int r;

	for (;;) {
		pthread_mutex_lock(&ino->wb_lock);
		rec = ino->wb_head;
		if (!rec)
			ino->wb_writer = false;
		pthread_mutex_unlock(&ino->wb_lock);
		if (!rec)
			break;
		r = write_rec(fs, ino, rec);
		pthread_mutex_lock(&ino->wb_lock);
		if (r < 0 && !ino->wb_err)
			ino->wb_err = r;
		ino->wb_head = rec->next;
		if (!ino->wb_head)
			ino->wb_tail = NULL;
		atomic_fetch_sub_explicit(&ino->wb_nr, 1, memory_order_release);
		pthread_cond_broadcast(&ino->wb_cv);
		pthread_mutex_unlock(&ino->wb_lock);
		room_give(fs, rec->len);
		free(rec);
	}
	tfs_fs_unpin(fs, ino);
	pthread_mutex_lock(&fs->wb_lock);
	fs->wb_writers--;
	pthread_cond_broadcast(&fs->wb_cv);
	pthread_mutex_unlock(&fs->wb_lock);
}

static void *writer_thread(void *p)
{
	struct writer_arg a = *(struct writer_arg *)p;

	free(p);
	writer_loop(a.fs, a.ino);
	return NULL;
}

/* A writer for ino; without a thread the caller writes the records itself, held as before. */
static void writer_start(struct tfs_fs *fs, struct tfs_inode *ino)
{
	struct writer_arg *a = malloc(sizeof(*a));
	pthread_attr_t attr;
	pthread_t t;
	int r = ENOMEM;

	/* The writer keeps the volume open: a close does not take its device away. */
	tfs_fs_pin_again(fs, ino);
	pthread_mutex_lock(&fs->wb_lock);
	fs->wb_writers++;
	pthread_mutex_unlock(&fs->wb_lock);
	if (a) {
		*a = (struct writer_arg){ fs, ino };
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		r = pthread_create(&t, &attr, writer_thread, a);
		pthread_attr_destroy(&attr);
	}
	if (r == 0)
		return;
	free(a);
	tfs_warn("%s: no thread to write held writebacks (%s): this writeback waits for them",
		 ino->row.name, strerror(r));
	writer_loop(fs, ino);
}

static int stash(struct tfs_fs *fs, struct tfs_inode *ino, const void *buf, size_t len,
		 uint64_t off)
{
	struct tfs_wb_rec *rec = rec_new(off, buf, len);
	bool start;

	if (!rec)
		return -ENOMEM;
	room_take(fs, len);
	pthread_mutex_lock(&ino->wb_lock);
	if (ino->wb_tail)
		ino->wb_tail->next = rec;
	else
		ino->wb_head = rec;
	ino->wb_tail = rec;
	atomic_fetch_add_explicit(&ino->wb_nr, 1, memory_order_release);
	start = !ino->wb_writer;
	ino->wb_writer = true;
	pthread_mutex_unlock(&ino->wb_lock);
	if (start)
		writer_start(fs, ino);
	return 0;
}

int tfs_wb_write(struct tfs_fs *fs, struct tfs_inode *ino, const void *buf, size_t len,
		 uint64_t off)
{
	int r = -EAGAIN;

	/* Records waiting: a later writeback goes behind them, never past. */
	if (!has_records(ino))
		r = write_through(fs, ino, buf, len, off, true);
	if (r != -EAGAIN)
		return r;
	r = stash(fs, ino, buf, len, off);
	if (r == -ENOMEM)
		r = write_through(fs, ino, buf, len, off, false); /* held, as without the stash */
	return r;
}

static bool any_overlap(struct tfs_inode *ino, uint64_t off, uint64_t len)
{
	for (struct tfs_wb_rec *rec = ino->wb_head; rec; rec = rec->next)
		if (overlaps(rec, off, len))
			return true;
	return false;
}

void tfs_wb_wait(struct tfs_inode *ino, uint64_t off, uint64_t len)
{
	if (!has_records(ino))
		return;
	pthread_mutex_lock(&ino->wb_lock);
	while (any_overlap(ino, off, len))
		pthread_cond_wait(&ino->wb_cv, &ino->wb_lock);
	pthread_mutex_unlock(&ino->wb_lock);
}

int tfs_wb_take_error(struct tfs_inode *ino)
{
	int r;

	pthread_mutex_lock(&ino->wb_lock);
	r = ino->wb_err;
	ino->wb_err = 0;
	pthread_mutex_unlock(&ino->wb_lock);
	return r;
}

int tfs_wb_overlay_take(struct tfs_inode *ino, uint64_t off, uint64_t len,
			struct tfs_wb_rec **out)
{
	struct tfs_wb_rec *head = NULL, **tail = &head, *ov;
	int r = 0;

	*out = NULL;
	if (!has_records(ino))
		return 0;
	pthread_mutex_lock(&ino->wb_lock);
	for (struct tfs_wb_rec *rec = ino->wb_head; rec && len; rec = rec->next) {
		uint64_t from, to;

		if (!overlaps(rec, off, len))
			continue;
		from = rec->off > off ? rec->off : off;
		to = rec->off + rec->len < off + len ? rec->off + rec->len : off + len;
		ov = rec_new(from, rec->data + (from - rec->off), to - from);
		if (!ov) {
			r = -ENOMEM;
			break;
		}
		*tail = ov;
		tail = &ov->next;
	}
	pthread_mutex_unlock(&ino->wb_lock);
	if (r < 0)
		recs_free(head);
	else
		*out = head;
	return r;
}

void tfs_wb_overlay_apply(struct tfs_wb_rec *ov, void *buf, uint64_t off)
{
	/* In arrival order: a later record's bytes over an earlier one's. */
	for (struct tfs_wb_rec *o = ov; o; o = o->next)
		memcpy((unsigned char *)buf + (o->off - off), o->data, o->len);
	recs_free(ov);
}

uint64_t tfs_wb_stashed_bytes(struct tfs_fs *fs)
{
	uint64_t n;

	pthread_mutex_lock(&fs->wb_lock);
	n = fs->wb_bytes;
	pthread_mutex_unlock(&fs->wb_lock);
	return n;
}

void tfs_wb_drain_all(struct tfs_fs *fs)
{
	pthread_mutex_lock(&fs->wb_lock);
	while (fs->wb_writers > 0)
		pthread_cond_wait(&fs->wb_cv, &fs->wb_lock);
	pthread_mutex_unlock(&fs->wb_lock);
}
