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
 * The stream's order (plan_batch): version 1 promises ascending volume
 * offsets; version 2 allows any order, and the records come in the order
 * of their data on the data device, so that changed blocks written in a
 * random order are read sequentially, not at random.  The records of a
 * batch (at most BATCH) are made and sorted at once, so the records in
 * memory are bounded whatever the diff's size (its extents are held
 * whole, as the diff made them); thinfs-ctl's path through the mount gets the
 * same records in the same order (tfs_fs_send_plan, "diff --send-order").
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
/*
 * Records sorted at once, at most (32 bytes each, 2 MiB): a stream of up
 * to 4 GiB of scattered 64 KiB blocks, or 64 GiB of 1 MiB runs, is in
 * device order whole; a larger one batch by batch.
 */
#define BATCH 65536u
/* An extent is located (its mappings looked up) this much at a time, so a batch can end in it. */
#define LOCATE_SPAN (64ull << 20)

/* An extent of the diff, in bytes, cut to the volume's size. */
struct extent {
	uint64_t off, len;
	bool zero;
};

/*
 * The stream's records, batch by batch: the diff's extents (volume order),
 * and where the next batch starts in them.
 */
struct plan {
	struct tfs_fs *fs;
	unsigned version;
	uint64_t size;
	struct extent *ext;
	size_t nr_ext, cap_ext;
	uint64_t data;         /* bytes of data extents: the header's "changed data" */
	size_t next;           /* the next batch starts in ext[next], */
	uint64_t next_off;     /* this many bytes into it */
	struct tfs_thin_bulk *bulk; /* looks TO's blocks up */
	struct tfs_stream_chunks chunks; /* the batch's records, in the stream's order */
	int (*going)(void *ctx, uint64_t vblock);
	void *going_ctx;
};

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
	struct plan plan;     /* its chunks: the batch being sent */

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
	json_object_object_add(o, "total", json_object_new_uint64(j->plan.data));
	line = json_object_new_object();
	json_object_object_add(line, "ok", json_object_new_boolean(1));
	json_object_object_add(line, "progress", json_object_new_string("send"));
	json_object_object_add(line, "json", o);
	json_object_object_add(line, "done", json_object_new_boolean(0));
	tfs_ctl_send_line(j->sock, line);
	json_object_put(line);
}

/* ---- the writer thread: a batch's windows out in order ---- */

static void fail_write(struct job *j, int r)
{
	if (r == -ECONNRESET || r == -ECANCELED)
		fail(j, r, "the client went away");
	else
		fail(j, r, "send: writing the stream: %s", strerror(-r));
}

static void *writer(void *arg)
{
	struct job *j = arg;
	int r = 0;

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
			const struct tfs_stream_chunk *x = &j->plan.chunks.v[c];

			r = tfs_stream_put_chunk(&j->o, x, x->zero ? NULL : win->buf +
						 win->at[c - c0]);
			j->done += x->zero ? 0 : x->len;
			progress(j, false);
		}
		if (r) {
			fail_write(j, r);
			return NULL;
		}
		pthread_mutex_lock(&j->lock);
		win->full = false;
		j->emitted = w + 1;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
	}
	return NULL;
}

/* ---- reading: windows in ---- */

/* Cut the batch's chunks into windows: as many chunks as fit in WINDOW bytes each. */
static int plan_windows(struct job *j)
{
	size_t cap = 16, used = 0, c0 = 0;

	free(j->starts);
	j->nr_windows = 0;
	j->starts = malloc(cap * sizeof(*j->starts));
	if (!j->starts)
		return -ENOMEM;
	j->starts[0] = 0;
	for (size_t c = 0; c <= j->plan.chunks.nr; c++) {
		const struct tfs_stream_chunk *x = c < j->plan.chunks.nr ? &j->plan.chunks.v[c] : NULL;
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

static int range_by_off(const void *a, const void *b)
{
	const struct tfs_thin_range *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

/* Window w: its chunks' data read into win. */
static int fill(struct job *j, struct tfs_thin_bulk *bulk, struct window *win, size_t w,
		struct tfs_thin_range *ranges)
{
	size_t used = 0, c0 = j->starts[w];
	unsigned nr = 0;
	int r;

	for (size_t c = c0; c < j->starts[w + 1]; c++) {
		const struct tfs_stream_chunk *x = &j->plan.chunks.v[c];
		size_t need = x->zero ? 0 : ((size_t)x->len + 4095) & ~(size_t)4095;

		win->at[c - c0] = used;
		if (need)
			ranges[nr++] = (struct tfs_thin_range){ x->off, (size_t)x->len, win->buf + used };
		used += need;
	}
	/*
	 * The bulk read takes its ranges in volume order; their buffers stay
	 * laid out in the stream's order, device order in version 2, so that
	 * blocks next to each other on the device are read as one.
	 */
	if (j->plan.version > 1)
		qsort(ranges, nr, sizeof(*ranges), range_by_off);
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

/* ---- the plan: the diff, and the stream's records batch by batch ---- */

/* Under the pool's lock: only records. */
static int note_extent(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct plan *p = ctx;
	uint64_t bs = p->fs->block_size, off = vblock * bs;

	if (off >= p->size)
		return 0;
	len = len * bs < p->size - off ? len * bs : p->size - off;
	if (p->nr_ext == p->cap_ext) {
		size_t cap = p->cap_ext ? 2 * p->cap_ext : 256;
		struct extent *v = realloc(p->ext, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		p->ext = v;
		p->cap_ext = cap;
	}
	p->ext[p->nr_ext++] = (struct extent){ off, len, zero };
	if (!zero)
		p->data += len;
	return 0;
}

static int plan_going(void *ctx, uint64_t vblock)
{
	struct plan *p = ctx;

	return p->going(p->going_ctx, vblock);
}

static const char *diff_why(int r)
{
	return r == -EBUSY ? "a metadata snapshot is held (reserve-metadata-snap) and the diff "
			     "needs its slot: release it first" :
	       r == -ENOSPC ? "metadata too full to hold the trees for the diff" :
	       r == -ENODATA ? "the volume has no thin device (deleted meanwhile?)" :
	       strerror(-r);
}

/* A run of TO's bytes that lie together on the data device: its records. */
static int note_run(void *ctx, uint64_t off, uint64_t len, uint64_t dev)
{
	struct plan *p = ctx;

	return tfs_stream_add_data(&p->chunks, off, len, dev);
}

/* Zero ranges first (in volume order), then data in device order. */
static int by_stream_order(const void *a, const void *b)
{
	const struct tfs_stream_chunk *x = a, *y = b;

	if (x->zero != y->zero)
		return x->zero ? -1 : 1;
	if (!x->zero && x->dev != y->dev)
		return x->dev < y->dev ? -1 : 1;
	return x->off < y->off ? -1 : x->off > y->off;
}

/*
 * The next batch's records into p->chunks, in the stream's order (none:
 * the stream has had them all).  Version 1: the extents' data cut into
 * pieces of at most TFS_STREAM_CHUNK from each extent's start, in volume
 * order.  Version 2: each extent's data cut where it stops lying together
 * on the data device, and every such run into pieces of at most
 * TFS_STREAM_CHUNK from its start; the batch sorted by where each piece
 * lies on the device.  0 or -errno (-EIO the mappings could not be read).
 */
static int plan_batch(struct plan *p)
{
	int r = 0;

	p->chunks.nr = 0;
	while (!r && p->next < p->nr_ext && p->chunks.nr < BATCH) {
		const struct extent *x = &p->ext[p->next];
		uint64_t at = x->off + p->next_off, n = x->len - p->next_off;

		if (x->zero) {
			r = tfs_stream_add_extent(&p->chunks, at, n, true, p->size);
		} else {
			n = n < LOCATE_SPAN ? n : LOCATE_SPAN;
			r = p->version > 1 ? tfs_thin_bulk_locate(p->bulk, at, n, note_run, p) :
					     tfs_stream_add_data(&p->chunks, at, n, 0);
		}
		p->next_off += n;
		if (p->next_off == x->len) {
			p->next++;
			p->next_off = 0;
		}
	}
	/* An empty diff leaves no array at all, which qsort may not be given. */
	if (!r && p->version > 1 && p->chunks.nr > 1)
		qsort(p->chunks.v, p->chunks.nr, sizeof(*p->chunks.v), by_stream_order);
	return r;
}

/*
 * The diff FROM -> TO into p->ext, TO held (*ino, for the caller to unpin)
 * and p->bulk open on it.  0, -EINTR the client left, or -errno and why.
 */
static int plan_open(struct plan *p, const struct tfs_vol_row *from, const struct tfs_vol_row *to,
		     struct tfs_inode **ino, struct tfs_pool_diff_stats *st, char *why,
		     size_t why_len)
{
	struct tfs_fs *fs = p->fs;
	int r;

	/* TO stays as it is, and its blocks its own, until the stream is out. */
	r = tfs_fs_hold_volume(fs, to, ino);
	if (r) {
		snprintf(why, why_len, "send %s: %s", to->name,
			 r == -ENOENT ? "deleted meanwhile" : strerror(-r));
		return r;
	}
	r = tfs_pool_diff(fs->pool, from ? &from->dev_id : NULL, &to->dev_id, note_extent,
			  plan_going, p, st);
	if (r == -EINTR)
		return r;
	if (r) {
		snprintf(why, why_len, "send %s: %s", to->name, diff_why(r));
		return r;
	}
	r = tfs_thin_bulk_open((*ino)->dev, &p->bulk);
	if (r)
		snprintf(why, why_len, "send %s: %s", to->name, strerror(-r));
	return r;
}

static void plan_free(struct plan *p)
{
	tfs_thin_bulk_close(p->bulk);
	free(p->ext);
	tfs_stream_chunks_free(&p->chunks);
}

int tfs_fs_send_plan(struct tfs_fs *fs, const struct tfs_vol_row *from,
		     const struct tfs_vol_row *to, unsigned version,
		     int (*emit)(void *ctx, const struct tfs_stream_chunks *batch),
		     int (*going)(void *ctx, uint64_t vblock), void *ctx, char *why, size_t why_len)
{
	struct plan p = { .fs = fs, .version = version, .size = to->size, .going = going,
			  .going_ctx = ctx };
	struct tfs_pool_diff_stats st;
	struct tfs_inode *ino = NULL;
	int r;

	why[0] = '\0';
	r = plan_open(&p, from, to, &ino, &st, why, why_len);
	while (!r && !(r = plan_batch(&p)) && p.chunks.nr)
		r = emit(ctx, &p.chunks);
	if (r && r != -EINTR && !why[0])
		snprintf(why, why_len, "send %s: %s", to->name, strerror(-r));
	plan_free(&p);
	if (ino)
		tfs_fs_unpin(fs, ino);
	return r;
}

/* ---- the send ---- */

static int diff_going(void *ctx, uint64_t vblock)
{
	struct job *j = ctx;

	(void)vblock;
	return !tfs_ctl_client_alive(j->sock);
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
	plan_free(&j->plan);
	free(j->starts);
	pthread_cond_destroy(&j->cond);
	pthread_mutex_destroy(&j->lock);
	if (j->out >= 0)
		close(j->out);
}

/* One batch's windows read and written out: this thread is reader 0. */
static int send_batch(struct job *j, struct reader *rd)
{
	pthread_t th;

	if (plan_windows(j)) {
		fail(j, -ENOMEM, "send: out of memory");
		return -ENOMEM;
	}
	j->emitted = 0;
	for (unsigned i = 0; i < WINDOWS; i++)
		j->win[i].full = false;
	if (pthread_create(&th, NULL, writer, j)) {
		fail(j, -EAGAIN, "send: out of threads");
		return -EAGAIN;
	}
	for (unsigned k = 1; k < READERS; k++) {
		rd[k].started = !pthread_create(&rd[k].th, NULL, reader, &rd[k]);
		if (!rd[k].started)
			fail(j, -EAGAIN, "send: out of threads");
	}
	reader(&rd[0]);
	for (unsigned k = 1; k < READERS; k++)
		if (rd[k].started)
			pthread_join(rd[k].th, NULL);
	pthread_join(th, NULL);
	return failed(j);
}

int tfs_fs_send_data(struct tfs_fs *fs, const struct tfs_fs_send *s, char *why, size_t why_len)
{
	struct job j = { .fs = fs, .sock = s->sock, .out = -1, .progress = s->progress,
			 .plan = { .fs = fs, .version = s->version ? s->version : TFS_STREAM_VERSION,
				   .size = s->to->size, .going = diff_going } };
	struct tfs_pool_diff_stats st = { 0 };
	struct reader rd[READERS] = { 0 };
	struct tfs_inode *ino = NULL;
	int r;

	why[0] = '\0';
	j.plan.going_ctx = &j;
	pthread_mutex_init(&j.lock, NULL);
	pthread_cond_init(&j.cond, NULL);
	r = prepare_out(&j, s->out);
	if (r) {
		snprintf(why, why_len, "send: the stream's descriptor: %s", strerror(-r));
		goto out;
	}
	r = plan_open(&j.plan, s->from, s->to, &ino, &st, why, why_len);
	if (r)
		goto out; /* -EINTR: the client left */
	tfs_stream_header(j.header, j.plan.version, j.plan.size, (uint32_t)fs->block_size,
			  s->from ? s->from_id : NULL, s->to_id, j.plan.data);
	tfs_stream_out_init(&j.o, out_write, &j);

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
	r = tfs_stream_put(&j.o, j.header, sizeof(j.header));
	while (!r) {
		r = plan_batch(&j.plan);
		if (r) {
			fail(&j, r, "send %s: looking up its blocks: %s", s->to->name, strerror(-r));
			break;
		}
		if (!j.plan.chunks.nr) {
			r = tfs_stream_finish(&j.o);
			break;
		}
		r = send_batch(&j, rd);
	}
	if (r && !failed(&j))
		fail_write(&j, r);
	r = j.err;
	if (!r)
		progress(&j, true);
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
