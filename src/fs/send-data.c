/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-data.c - the daemon writes a send stream itself (ctl-internal.h,
 * docs/send-receive.md "Who moves the bytes").
 *
 * Through the mount every byte is copied twice (data device -> daemon ->
 * reader) and scattered blocks cost a FUSE request each.  Here the daemon
 * reads TO's changed blocks from the data device (tfs_thin_bulk_read:
 * looked up together, read in data-block order, neighbours merged,
 * several reads in flight) into windows of WINDOW bytes (huge pages where
 * the system gives them: window_map), READERS threads
 * reading alternate windows, and a writer thread emits each window's
 * records in the stream's order into the descriptor the client passed,
 * while the next windows are read.
 *
 * The descriptor is the client's own output: a pipe is reopened here
 * non-blocking (a new open file description, so the client's flags do not
 * change) and a socket written with MSG_DONTWAIT, so that a consumer that
 * stops reading never holds a daemon thread past the client's hang-up or
 * the daemon's stop; a file or device is written as it is.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl-internal.h"
#include "ctl-protocol.h"
#include "fs.h"
#include "log.h"
#include "send-stream.h"

/*
 * Data read ahead per window, and windows (one emitted while the others
 * are read); a window holds at most WINDOW_CHUNKS records.
 */
#define WINDOW (16u << 20)
#define WINDOW_CHUNKS (WINDOW / 4096)
#define WINDOWS 3
/*
 * Threads reading windows, each every READERS-th: while one waits for its
 * last reads, the other looks up and submits the next window's, so the
 * device's queue does not run dry between windows.
 */
#define READERS 2

struct window {
	size_t w;             /* job->lock: the stream's window it holds, once full */
	uint8_t *buf;         /* its chunks' data, packed in order */
	size_t *at;           /* where its i-th chunk lies in buf */
	bool full;            /* job->lock: read, waiting to be emitted */
};

struct job {
	struct tfs_fs *fs;
	int sock, out;
	bool out_is_sock;
	bool progress;
	struct tfs_stream_chunks chunks;
	uint64_t size;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct window win[WINDOWS]; /* window w of the stream goes in win[w % WINDOWS] */
	size_t *starts;       /* window w is chunks [starts[w], starts[w + 1]) */
	size_t nr_windows;
	size_t emitted;       /* lock: windows emitted */
	int err;              /* lock: the first failure; -ECONNRESET the client left */
	char why[256];        /* lock: what failed, for the client */

	struct tfs_stream_out o;
	uint8_t header[TFS_STREAM_HEADER_SIZE];
	uint64_t done;        /* writer: data bytes emitted */
	int64_t next_progress_ns;
};

static void fail(struct job *j, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void fail(struct job *j, int err, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&j->lock);
	if (!j->err) {
		j->err = err;
		va_start(ap, fmt);
		vsnprintf(j->why, sizeof(j->why), fmt, ap);
		va_end(ap);
	}
	pthread_cond_broadcast(&j->cond);
	pthread_mutex_unlock(&j->lock);
}

static int failed(struct job *j)
{
	int r;

	pthread_mutex_lock(&j->lock);
	r = j->err;
	pthread_mutex_unlock(&j->lock);
	return r;
}

/* ---- the output ---- */

/*
 * Wait until out takes more, or the client hangs up or the daemon stops
 * (it shuts the connection down): -ECONNRESET.  Bytes the client might
 * send meanwhile do not wake us (POLLRDHUP, not POLLIN).
 */
static int wait_writable(struct job *j)
{
	struct pollfd p[2] = {
		{ .fd = j->out, .events = POLLOUT },
		{ .fd = j->sock, .events = POLLRDHUP },
	};

	for (;;) {
		int n = poll(p, 2, 1000);

		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0 && p[1].revents)
			return -ECONNRESET;
		if (n > 0 && p[0].revents)
			return 0;
		if (failed(j))
			return -ECANCELED;
	}
}

static int out_write(void *ctx, const void *buf, size_t len)
{
	struct job *j = ctx;
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = j->out_is_sock ? send(j->out, p, len, MSG_NOSIGNAL | MSG_DONTWAIT) :
					     write(j->out, p, len);
		int r;

		if (n > 0) {
			p += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN)
			return -errno;
		if (n == 0)
			return -EIO;
		r = wait_writable(j);
		if (r)
			return r;
	}
	return 0;
}

/*
 * A pipe gets a descriptor of its own, non-blocking; a socket is written
 * with MSG_DONTWAIT; anything else as it came.  Takes fd.
 */
static int prepare_out(struct job *j, int fd)
{
	struct stat st;
	char path[64];
	int nfd;

	if (fstat(fd, &st) < 0) {
		close(fd);
		return -errno;
	}
	j->out = fd;
	j->out_is_sock = S_ISSOCK(st.st_mode);
	if (!S_ISFIFO(st.st_mode))
		return 0;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	nfd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	if (nfd >= 0) {
		close(fd);
		j->out = nfd;
	}
	return 0;
}

/* ---- progress, on the control connection ---- */

static void progress(struct job *j, bool last)
{
	struct json_object *line, *o;
	int64_t now = tfs_now_ns();

	if (!j->progress || (!last && now < j->next_progress_ns))
		return;
	j->next_progress_ns = now + 500000000;
	o = json_object_new_object();
	json_object_object_add(o, "done", json_object_new_uint64(j->done));
	json_object_object_add(o, "total", json_object_new_uint64(j->chunks.data));
	line = json_object_new_object();
	json_object_object_add(line, "ok", json_object_new_boolean(1));
	json_object_object_add(line, "progress", json_object_new_string("send"));
	json_object_object_add(line, "json", o);
	json_object_object_add(line, "done", json_object_new_boolean(0));
	tfs_ctl_send_line(j->sock, line);
	json_object_put(line);
}

/* ---- the writer thread: windows out in order ---- */

static void *writer(void *arg)
{
	struct job *j = arg;
	int r = tfs_stream_put(&j->o, j->header, sizeof(j->header));

	if (r)
		goto out_fail;
	for (size_t w = 0; w < j->nr_windows; w++) {
		struct window *win = &j->win[w % WINDOWS];
		size_t c0 = j->starts[w];

		pthread_mutex_lock(&j->lock);
		while (!j->err && !(win->full && win->w == w))
			pthread_cond_wait(&j->cond, &j->lock);
		if (j->err) {
			pthread_mutex_unlock(&j->lock);
			break;
		}
		pthread_mutex_unlock(&j->lock);
		for (size_t c = c0; c < j->starts[w + 1] && !r; c++) {
			const struct tfs_stream_chunk *x = &j->chunks.v[c];

			r = tfs_stream_put_chunk(&j->o, x, x->zero ? NULL : win->buf +
						 win->at[c - c0]);
			j->done += x->zero ? 0 : x->len;
			progress(j, false);
		}
		if (r)
			goto out_fail;
		pthread_mutex_lock(&j->lock);
		win->full = false;
		j->emitted = w + 1;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
	}
	if (failed(j))
		return NULL;
	r = tfs_stream_finish(&j->o);
	if (!r) {
		progress(j, true);
		return NULL;
	}
out_fail:
	if (r == -ECONNRESET || r == -ECANCELED)
		fail(j, r, "the client went away");
	else
		fail(j, r, "send: writing the stream: %s", strerror(-r));
	return NULL;
}

/* ---- reading: windows in ---- */

/* Cut the chunks into windows: as many chunks as fit in WINDOW bytes each. */
static int plan_windows(struct job *j)
{
	size_t cap = 16, used = 0, c0 = 0;

	j->starts = malloc(cap * sizeof(*j->starts));
	if (!j->starts)
		return -ENOMEM;
	j->starts[0] = 0;
	for (size_t c = 0; c <= j->chunks.nr; c++) {
		const struct tfs_stream_chunk *x = c < j->chunks.nr ? &j->chunks.v[c] : NULL;
		/* Each chunk on a 4 KiB boundary: a direct data device reads into it as it is. */
		size_t need = !x || x->zero ? 0 : ((size_t)x->len + 4095) & ~(size_t)4095;

		if (x && used + need <= WINDOW && c - c0 < WINDOW_CHUNKS) {
			used += need;
			continue;
		}
		if (c == c0)
			break; /* no chunk left */
		if (j->nr_windows + 2 > cap) {
			size_t *v = realloc(j->starts, 2 * cap * sizeof(*v));

			if (!v)
				return -ENOMEM;
			j->starts = v;
			cap *= 2;
		}
		j->starts[++j->nr_windows] = c;
		c0 = c;
		used = need;
	}
	return 0;
}

/* Window w: its chunks' data read into win. */
static int fill(struct job *j, struct tfs_thin_bulk *bulk, struct window *win, size_t w,
		struct tfs_thin_range *ranges)
{
	size_t used = 0, c0 = j->starts[w];
	unsigned nr = 0;
	int r;

	for (size_t c = c0; c < j->starts[w + 1]; c++) {
		const struct tfs_stream_chunk *x = &j->chunks.v[c];
		size_t need = x->zero ? 0 : ((size_t)x->len + 4095) & ~(size_t)4095;

		win->at[c - c0] = used;
		if (need)
			ranges[nr++] = (struct tfs_thin_range){ x->off, (size_t)x->len, win->buf + used };
		used += need;
	}
	r = tfs_thin_bulk_read(bulk, ranges, nr);
	if (r)
		fail(j, r, "send: reading the volume at byte %" PRIu64 ": %s", ranges[0].off,
		     strerror(-r));
	return r;
}

struct reader {
	struct job *j;
	unsigned k;                   /* reads windows k, k + READERS, ... */
	struct tfs_thin_bulk *bulk;
	struct tfs_thin_range *ranges; /* WINDOW_CHUNKS of them */
	pthread_t th;
	bool started;
};

static void *reader(void *arg)
{
	struct reader *rd = arg;
	struct job *j = rd->j;

	for (size_t w = rd->k; w < j->nr_windows; w += READERS) {
		struct window *win = &j->win[w % WINDOWS];

		pthread_mutex_lock(&j->lock);
		while (!j->err && w >= j->emitted + WINDOWS)
			pthread_cond_wait(&j->cond, &j->lock);
		pthread_mutex_unlock(&j->lock);
		if (failed(j))
			break;
		if (!tfs_ctl_client_alive(j->sock)) {
			fail(j, -ECONNRESET, "the client went away");
			break;
		}
		if (fill(j, rd->bulk, win, w, rd->ranges))
			break;
		pthread_mutex_lock(&j->lock);
		win->w = w;
		win->full = true;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
	}
	return NULL;
}

/* ---- the diff ---- */

/* Under the pool's lock: only records. */
static int note_extent(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct job *j = ctx;
	uint64_t bs = j->fs->block_size;

	return tfs_stream_add_extent(&j->chunks, vblock * bs, len * bs, zero, j->size);
}

static int diff_going(void *ctx, uint64_t vblock)
{
	struct job *j = ctx;

	(void)vblock;
	return !tfs_ctl_client_alive(j->sock);
}

static const char *diff_why(int r)
{
	return r == -EBUSY ? "a metadata snapshot is held (reserve-metadata-snap) and the diff "
			     "needs its slot: release it first" :
	       r == -ENOSPC ? "metadata too full to hold the trees for the diff" :
	       r == -ENODATA ? "the volume has no thin device (deleted meanwhile?)" :
	       strerror(-r);
}

/*
 * A window's memory, WINDOW bytes on huge-page boundaries and asked to be
 * huge pages (MAP_FAILED, or the window; munmap(WINDOW) frees it).  Why: a
 * 1 MiB direct read into 4 KiB pages is pinned page by page and handed to
 * the device as up to 256 pieces (a virtio disk takes 254 per request, so
 * a read can become two); into a huge page it is one.  The send's reads
 * ran 15-25% faster so (bench/README.md).  Where huge pages are not to be
 * had, the window is ordinary memory.
 */
static void *window_map(void)
{
	const size_t huge = 2u << 20;
	uint8_t *m = mmap(NULL, WINDOW + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			  -1, 0);
	size_t head;

	if (m == MAP_FAILED)
		return m;
	head = (huge - (uintptr_t)m % huge) % huge;
	if (head)
		munmap(m, head);
	munmap(m + head + WINDOW, huge - head);
	madvise(m + head, WINDOW, MADV_HUGEPAGE);
	return m + head;
}

static void job_free(struct job *j)
{
	for (unsigned i = 0; i < WINDOWS; i++) {
		if (j->win[i].buf)
			munmap(j->win[i].buf, WINDOW);
		free(j->win[i].at);
	}
	tfs_stream_chunks_free(&j->chunks);
	free(j->starts);
	pthread_cond_destroy(&j->cond);
	pthread_mutex_destroy(&j->lock);
	if (j->out >= 0)
		close(j->out);
}

int tfs_fs_send_data(struct tfs_fs *fs, const struct tfs_fs_send *s, char *why, size_t why_len)
{
	struct job j = { .fs = fs, .sock = s->sock, .out = -1, .progress = s->progress,
			 .size = s->to->size };
	struct tfs_pool_diff_stats st;
	struct reader rd[READERS] = { 0 };
	struct tfs_inode *ino = NULL;
	pthread_t th;
	int r;

	why[0] = '\0';
	pthread_mutex_init(&j.lock, NULL);
	pthread_cond_init(&j.cond, NULL);
	r = prepare_out(&j, s->out);
	if (r) {
		snprintf(why, why_len, "send: the stream's descriptor: %s", strerror(-r));
		goto out;
	}
	/* TO stays as it is, and its blocks its own, until the stream is out. */
	r = tfs_fs_hold_volume(fs, s->to, &ino);
	if (r) {
		snprintf(why, why_len, "send %s: %s", s->to->name,
			 r == -ENOENT ? "deleted meanwhile" : strerror(-r));
		goto out;
	}
	r = tfs_pool_diff(fs->pool, s->from ? &s->from->dev_id : NULL, &s->to->dev_id,
			  note_extent, diff_going, &j, &st);
	if (r == -EINTR)
		goto out; /* the client left */
	if (r) {
		snprintf(why, why_len, "send %s: %s", s->to->name, diff_why(r));
		goto out;
	}
	tfs_stream_header(j.header, j.size, (uint32_t)fs->block_size, s->from ? s->from_id : NULL,
			  s->to_id, j.chunks.data);
	tfs_stream_out_init(&j.o, out_write, &j);

	if (plan_windows(&j))
		goto out_nomem;
	for (unsigned i = 0; i < WINDOWS; i++) {
		void *m = window_map();

		j.win[i].at = calloc(WINDOW_CHUNKS, sizeof(size_t));
		if (m == MAP_FAILED || !j.win[i].at) {
			if (m != MAP_FAILED)
				munmap(m, WINDOW);
			goto out_nomem;
		}
		j.win[i].buf = m;
	}
	for (unsigned k = 0; k < READERS; k++) {
		rd[k] = (struct reader){ .j = &j, .k = k };
		rd[k].ranges = calloc(WINDOW_CHUNKS, sizeof(*rd[k].ranges));
		if (!rd[k].ranges)
			goto out_nomem;
		r = tfs_thin_bulk_open(ino->dev, &rd[k].bulk);
		if (r) {
			snprintf(why, why_len, "send %s: %s", s->to->name, strerror(-r));
			goto out;
		}
	}
	if (pthread_create(&th, NULL, writer, &j))
		goto out_nomem;
	/* This thread is reader 0. */
	for (unsigned k = 1; k < READERS; k++) {
		rd[k].started = !pthread_create(&rd[k].th, NULL, reader, &rd[k]);
		if (!rd[k].started)
			fail(&j, -EAGAIN, "send: out of threads");
	}
	reader(&rd[0]);
	for (unsigned k = 1; k < READERS; k++)
		if (rd[k].started)
			pthread_join(rd[k].th, NULL);
	pthread_join(th, NULL);
	r = j.err;
	if (r && r != -ECONNRESET && r != -ECANCELED)
		snprintf(why, why_len, "%s", j.why);
	s->stats->data = j.o.sent;
	s->stats->bytes = j.o.bytes;
	s->stats->nodes_read = st.nodes_read;
	goto out;

out_nomem:
	r = -ENOMEM;
	snprintf(why, why_len, "send: out of memory");
out:
	for (unsigned k = 0; k < READERS; k++) {
		tfs_thin_bulk_close(rd[k].bulk);
		free(rd[k].ranges);
	}
	if (ino)
		tfs_fs_unpin(fs, ino);
	job_free(&j);
	return r;
}
