/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-recv.c - thinfs-ctl send and receive (send-recv.h,
 * docs/send-receive.md).
 */
#include "send-recv.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "ctl-protocol.h"

#define fail(...) tfs_ctlc_fail(__VA_ARGS__)

/* ---- progress on a terminal ---- */

struct progress {
	const char *what;
	bool on;
	uint64_t total;
	double start, next;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void progress_init(struct progress *p, const char *what, uint64_t total)
{
	p->what = what;
	p->on = isatty(STDERR_FILENO);
	p->total = total;
	p->start = now_s();
	p->next = p->start + 0.5;
}

static void progress_show(struct progress *p, uint64_t done, bool last)
{
	double t = now_s(), secs;

	if (!p->on || (!last && t < p->next))
		return;
	p->next = t + 0.5;
	secs = t - p->start;
	fprintf(stderr, "\r%s: %.1f of %.1f MiB (%.0f MiB/s)\033[K%s", p->what,
		(double)done / 1048576.0, (double)p->total / 1048576.0,
		(double)done / 1048576.0 / (secs > 0 ? secs : 1), last ? "\n" : "");
	fflush(stderr);
}

/* ---- talking to the daemon ---- */

struct conn {
	int fd;
	FILE *in;
};

static int conn_open(struct conn *c, const char *mnt)
{
	int dupfd;

	c->in = NULL;
	c->fd = tfs_ctlc_connect(mnt);
	if (c->fd < 0)
		return -1;
	dupfd = dup(c->fd);
	c->in = dupfd >= 0 ? fdopen(dupfd, "r") : NULL;
	if (!c->in) {
		if (dupfd >= 0)
			close(dupfd);
		close(c->fd);
		fail("%s", strerror(errno));
		return -1;
	}
	return 0;
}

static void conn_close(struct conn *c)
{
	if (c->in)
		fclose(c->in);
	if (c->fd >= 0)
		close(c->fd);
	c->in = NULL;
	c->fd = -1;
}

/* One request line from a NULL-terminated argument list. */
static int conn_request(struct conn *c, const char *const *args)
{
	struct json_object *req = json_object_new_object(), *a = json_object_new_array();
	const char *s;
	size_t len, off = 0;
	int r = 0;

	json_object_object_add(req, "cmd", json_object_new_string(args[0]));
	for (int i = 1; args[i]; i++)
		json_object_array_add(a, json_object_new_string(args[i]));
	json_object_object_add(req, "args", a);
	s = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN);
	len = strlen(s);
	while (off <= len && r == 0) {
		const char *p = off < len ? s + off : "\n";
		ssize_t n = send(c->fd, p, off < len ? len - off : 1, MSG_NOSIGNAL);

		if (n < 0 && errno != EINTR)
			r = -errno;
		else if (n > 0)
			off += (size_t)n;
	}
	json_object_put(req);
	if (r < 0)
		fail("sending the command: %s", strerror(-r));
	return r;
}

/* The next line as it came (progress lines too), or NULL after saying why none came. */
static struct json_object *conn_line(struct conn *c)
{
	struct json_object *o;
	char *line = NULL;
	size_t cap = 0;

	if (getline(&line, &cap, c->in) < 0) {
		free(line);
		fail("the daemon closed the connection without an answer");
		return NULL;
	}
	o = json_tokener_parse(line);
	free(line);
	if (!o || !json_object_object_get_ex(o, "ok", NULL)) {
		json_object_put(o);
		fail("bad response from the daemon");
		return NULL;
	}
	return o;
}

/* Print a failed response's error and details, and put it. */
static void print_error(struct json_object *o)
{
	struct json_object *v;

	if (json_object_object_get_ex(o, "error", &v))
		fail("%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "details", &v) && json_object_is_type(v, json_type_array))
		for (size_t i = 0; i < json_object_array_length(v); i++)
			fail("%s", json_object_get_string(json_object_array_get_idx(v, i)));
	json_object_put(o);
}

static bool is_ok(struct json_object *o)
{
	struct json_object *v;

	return json_object_object_get_ex(o, "ok", &v) && json_object_get_boolean(v);
}

/*
 * The next response line: its object (the caller puts it), or NULL after
 * printing the daemon's error (and details) or why none came.
 */
static struct json_object *conn_response(struct conn *c)
{
	struct json_object *o;

	/* A progress line of the daemon's (a long diff): ours say more. */
	while ((o = conn_line(c)) != NULL && json_object_object_get_ex(o, "progress", NULL))
		json_object_put(o);
	if (!o || is_ok(o))
		return o;
	print_error(o);
	return NULL;
}

static const char *jstr(struct json_object *o, const char *key)
{
	struct json_object *v;

	return json_object_object_get_ex(o, key, &v) ? json_object_get_string(v) : NULL;
}

static uint64_t ju64(struct json_object *o, const char *key)
{
	struct json_object *v;

	return json_object_object_get_ex(o, key, &v) ? json_object_get_uint64(v) : 0;
}

static bool jbool(struct json_object *o, const char *key)
{
	struct json_object *v;

	return json_object_object_get_ex(o, key, &v) && json_object_get_boolean(v);
}

/* ---- send ---- */

/*
 * The stream's chunks, in its order: for version 2 the daemon's order
 * (diff --send-order, the records it would write itself); for version 1,
 * and from a daemon that has no --send-order, its diff FROM TO in volume
 * order, which either version allows.
 */
static int get_chunks(const char *mnt, unsigned version, const char *from, const char *to,
		      uint64_t size, struct tfs_stream_chunks *e)
{
	const char *plain[] = { "diff", from, to, NULL };
	const char *order[] = { "diff", "--send-order", "2", from, to, NULL };
	struct json_object *o, *first = NULL;
	struct conn c;
	int r = -1;

	if (conn_open(&c, mnt) < 0)
		return -1;
	if (conn_request(&c, version > 1 ? order : plain) < 0)
		goto out;
	if (version > 1) {
		first = conn_line(&c);
		if (!first)
			goto out;
		if (!is_ok(first)) {
			if (!jstr(first, "error") ||
			    !strstr(jstr(first, "error"), "unknown option '--send-order'")) {
				print_error(first);
				goto out;
			}
			/* A daemon from before stream version 2. */
			json_object_put(first);
			first = NULL;
			conn_close(&c);
			if (conn_open(&c, mnt) < 0)
				return -1;
			if (conn_request(&c, plain) < 0)
				goto out;
		}
	}
	while ((o = first ? first : conn_response(&c)) != NULL) {
		const char *text = jstr(o, "output"), *p = text ? text : "";
		bool done = !json_object_object_get_ex(o, "done", NULL) || jbool(o, "done");

		first = NULL;
		while (*p) {
			uint64_t off, len;
			char kind[8];
			int n;

			if (sscanf(p, "%" SCNu64 " %" SCNu64 " %7s%n", &off, &len, kind, &n) != 3) {
				fail("send: bad diff line from the daemon");
				json_object_put(o);
				goto out;
			}
			p += n;
			while (*p == '\n')
				p++;
			if (tfs_stream_add_extent(e, off, len, !strcmp(kind, "zero"), size) < 0) {
				fail("send: out of memory");
				json_object_put(o);
				goto out;
			}
		}
		json_object_put(o);
		if (done) {
			r = 0;
			break;
		}
	}
out:
	conn_close(&c);
	return r;
}

static int stdout_write(void *ctx, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	(void)ctx;
	while (len) {
		ssize_t n = write(STDOUT_FILENO, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read len bytes at off: the file is read with O_DIRECT when it allows it. */
static int read_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) {
			memset(buf + done, 0, len - done); /* past the end reads as zeros */
			break;
		}
		done += (size_t)n;
	}
	return 0;
}

/*
 * Reading ahead: one FUSE request at a time leaves the data device idle
 * while the daemon and the kernel copy, so READERS threads read the next
 * chunks into SLOTS buffers while the main thread writes them out in
 * order.  Chunk j goes into slot j % SLOTS, once chunk j - SLOTS is out.
 */
#define READERS 8
#define SLOTS 16

struct reader {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int vol;
	const struct tfs_stream_chunk *chunk;
	size_t nr;
	size_t next;                /* lock: the next chunk to claim */
	size_t written;             /* lock: chunks written out */
	bool stop;                  /* lock */
	uint8_t *buf[SLOTS];
	size_t slot_chunk[SLOTS];   /* lock: which chunk the slot holds, when ready */
	bool ready[SLOTS];          /* lock */
	int err[SLOTS];             /* lock */
};

static void *reader_thread(void *arg)
{
	struct reader *rd = arg;

	pthread_mutex_lock(&rd->lock);
	for (;;) {
		size_t j;
		int e = 0;

		while (!rd->stop && rd->next < rd->nr && rd->next - rd->written >= SLOTS)
			pthread_cond_wait(&rd->cond, &rd->lock);
		if (rd->stop || rd->next >= rd->nr)
			break;
		j = rd->next++;
		pthread_mutex_unlock(&rd->lock);
		if (!rd->chunk[j].zero)
			e = read_full(rd->vol, rd->buf[j % SLOTS], (size_t)rd->chunk[j].len,
				      rd->chunk[j].off);
		pthread_mutex_lock(&rd->lock);
		rd->slot_chunk[j % SLOTS] = j;
		rd->err[j % SLOTS] = e;
		rd->ready[j % SLOTS] = true;
		pthread_cond_broadcast(&rd->cond);
	}
	pthread_mutex_unlock(&rd->lock);
	return NULL;
}

/* Through the mount: the header, the chunks in order, END, trailer. */
static int write_stream(int vol, const struct tfs_stream_chunks *c, struct json_object *info,
			uint64_t size, unsigned version)
{
	uint8_t h[TFS_STREAM_HEADER_SIZE], fu[16], tu[16];
	uint64_t done = 0;
	struct tfs_stream_out o;
	struct reader rd = { .vol = vol, .chunk = c->v, .nr = c->nr };
	pthread_t th[READERS];
	unsigned started = 0;
	struct progress pr;
	int r = -1, e;

	if (jstr(info, "from"))
		tfs_ctl_id_parse(jstr(info, "from"), fu);
	tfs_ctl_id_parse(jstr(info, "to"), tu);
	tfs_stream_header(h, version, size, (uint32_t)ju64(info, "block_size"),
			  jstr(info, "from") ? fu : NULL, tu, c->data);
	tfs_stream_out_init(&o, stdout_write, NULL);

	pthread_mutex_init(&rd.lock, NULL);
	pthread_cond_init(&rd.cond, NULL);
	for (int i = 0; i < SLOTS; i++)
		if (posix_memalign((void **)&rd.buf[i], 4096, TFS_STREAM_CHUNK))
			goto out_nomem;
	for (; started < READERS; started++)
		if (pthread_create(&th[started], NULL, reader_thread, &rd))
			break;
	if (!started)
		goto out_nomem;

	progress_init(&pr, "send", c->data);
	e = tfs_stream_put(&o, h, sizeof(h));
	for (size_t j = 0; j < c->nr && !e; j++) {
		const struct tfs_stream_chunk *x = &c->v[j];

		pthread_mutex_lock(&rd.lock);
		while (!(rd.ready[j % SLOTS] && rd.slot_chunk[j % SLOTS] == j))
			pthread_cond_wait(&rd.cond, &rd.lock);
		e = rd.err[j % SLOTS];
		pthread_mutex_unlock(&rd.lock);
		if (e < 0) {
			fail("send: reading the volume at byte %" PRIu64 ": %s", x->off,
			     strerror(-e));
			goto out;
		}
		e = tfs_stream_put_chunk(&o, x, rd.buf[j % SLOTS]);
		pthread_mutex_lock(&rd.lock);
		rd.ready[j % SLOTS] = false;
		rd.written = j + 1;
		pthread_cond_broadcast(&rd.cond);
		pthread_mutex_unlock(&rd.lock);
		done += x->zero ? 0 : x->len;
		progress_show(&pr, done, false);
	}
	if (!e)
		e = tfs_stream_finish(&o);
	if (e) {
		fail("send: writing the stream: %s", strerror(-e));
		goto out;
	}
	progress_show(&pr, done, true);
	r = 0;
	goto out;

out_nomem:
	fail("send: out of memory");
out:
	pthread_mutex_lock(&rd.lock);
	rd.stop = true;
	pthread_cond_broadcast(&rd.cond);
	pthread_mutex_unlock(&rd.lock);
	while (started)
		pthread_join(th[--started], NULL);
	for (int i = 0; i < SLOTS; i++)
		free(rd.buf[i]);
	pthread_cond_destroy(&rd.cond);
	pthread_mutex_destroy(&rd.lock);
	return r;
}

/* The old way: the daemon names the file and the diff, we read and write. */
static int send_through_mount(const char *mnt, const char *from, unsigned version,
			      struct conn *c, struct json_object *info)
{
	struct tfs_stream_chunks e = { 0 };
	char path[8192];
	int vol = -1, r = -1;

	if (!jstr(info, "path") || !jstr(info, "to")) {
		fail("bad response from the daemon");
		goto out;
	}
	if (get_chunks(mnt, version, from ? from : "-", jstr(info, "diff_to"), ju64(info, "size"),
		       &e) < 0)
		goto out;
	snprintf(path, sizeof(path), "%s/%s", mnt, jstr(info, "path"));
	vol = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (vol < 0 && errno == EINVAL)
		vol = open(path, O_RDONLY | O_CLOEXEC);
	if (vol < 0) {
		fail("send: %s: %s", path, strerror(errno));
		goto out;
	}
	r = write_stream(vol, &e, info, ju64(info, "size"), version);
out:
	if (vol >= 0)
		close(vol);
	/* Let the daemon drop its snapshot of TO (it does so too if we just leave). */
	if (jbool(info, "hold")) {
		const char *end[] = { "end", NULL };
		struct json_object *fin;

		if (conn_request(c, end) == 0 && (fin = conn_response(c)) != NULL)
			json_object_put(fin);
	}
	tfs_stream_chunks_free(&e);
	return r;
}

/* Our stdout, passed to the daemon (SCM_RIGHTS), which writes the stream into it. */
static int pass_stdout(struct conn *c)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(int))];
	} u;
	struct iovec iov = { .iov_base = "F", .iov_len = 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
			    .msg_controllen = sizeof(u.b) };
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	int fd = STDOUT_FILENO;
	ssize_t n;

	memset(u.b, 0, sizeof(u.b));
	h->cmsg_level = SOL_SOCKET;
	h->cmsg_type = SCM_RIGHTS;
	h->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(h), &fd, sizeof(int));
	do
		n = sendmsg(c->fd, &m, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != 1)
		return fail("send: passing the stream's descriptor to the daemon: %s",
			    strerror(errno)), -1;
	return 0;
}

/* The daemon writes the stream; we show its progress and wait for its word. */
static int send_by_daemon(struct conn *c)
{
	uint64_t done = 0;
	struct json_object *o, *j;
	struct progress pr;

	progress_init(&pr, "send", 0);
	if (pass_stdout(c) < 0)
		return -1;
	while ((o = conn_line(c)) != NULL) {
		if (!is_ok(o)) {
			print_error(o);
			return -1;
		}
		if (!json_object_object_get_ex(o, "progress", NULL)) {
			json_object_put(o);
			progress_show(&pr, done, true);
			return 0;
		}
		if (json_object_object_get_ex(o, "json", &j)) {
			done = ju64(j, "done");
			pr.total = ju64(j, "total");
		}
		json_object_put(o);
		progress_show(&pr, done, false);
	}
	return -1;
}

int tfs_ctlc_send(const char *mnt, int argc, char **argv)
{
	static const char usage[] = "usage: send [--from FROM] [--through-mount] "
				    "[--stream-version 1|2] TO > STREAM (volumes or GROUP/NAME; "
				    "version 1 for a receiver older than version 2)";
	const char *from = NULL, *to = NULL, *ver = NULL, *req[10] = { "send" };
	unsigned version = TFS_STREAM_VERSION;
	bool mount_path = false;
	struct json_object *resp = NULL, *info;
	struct conn c = { .fd = -1 };
	int status = 1, n = 1;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--from") && i + 1 < argc && !from)
			from = argv[++i];
		else if (!strcmp(argv[i], "--through-mount"))
			mount_path = true;
		else if (!strcmp(argv[i], "--stream-version") && i + 1 < argc && !ver &&
			 tfs_stream_version_parse(argv[i + 1]))
			ver = argv[++i];
		else if (argv[i][0] != '-' && !to)
			to = argv[i];
		else
			return fail("%s", usage), 2;
	}
	if (!to)
		return fail("%s", usage), 2;
	if (isatty(STDOUT_FILENO))
		return fail("send: the stream is binary: redirect it to a file or a pipe");
	if (ver)
		version = tfs_stream_version_parse(ver);
	if (!mount_path) {
		req[n++] = "--stream";
		if (isatty(STDERR_FILENO))
			req[n++] = "--progress";
		/* Only when asked: a daemon from before version 2 writes version 1 unasked. */
		if (ver) {
			req[n++] = "--stream-version";
			req[n++] = ver;
		}
	}
	if (from) {
		req[n++] = "--from";
		req[n++] = from;
	}
	req[n++] = to;
	for (;;) {
		if (conn_open(&c, mnt) < 0)
			return 1;
		if (conn_request(&c, req) < 0 || !(resp = conn_line(&c)))
			goto out;
		if (is_ok(resp))
			break;
		/* A daemon from before --stream: ask it the old way. */
		if (!mount_path && jstr(resp, "error") &&
		    !strncmp(jstr(resp, "error"), "usage: send", 11)) {
			json_object_put(resp);
			resp = NULL;
			conn_close(&c);
			mount_path = true;
			n = 1;
			if (from) {
				req[n++] = "--from";
				req[n++] = from;
			}
			req[n++] = to;
			req[n] = NULL;
			continue;
		}
		print_error(resp);
		resp = NULL;
		goto out;
	}
	if (!json_object_object_get_ex(resp, "json", &info)) {
		fail("bad response from the daemon");
		goto out;
	}
	if (jbool(info, "stream"))
		status = send_by_daemon(&c) ? 1 : 0;
	else
		status = send_through_mount(mnt, from, version, &c, info) ? 1 : 0;
out:
	json_object_put(resp);
	conn_close(&c);
	return status;
}

/* ---- receive ---- */

struct in {
	uint32_t crc;
	uint64_t bytes;
};

/* Exactly len bytes of the stream, or a message saying where it ended. */
static int in_read(struct in *s, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(STDIN_FILENO, (uint8_t *)buf + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("receive: reading the stream: %s", strerror(errno)), -1;
		if (n == 0)
			return fail("receive: the stream ends early, at byte %" PRIu64
				    " (cut short?)", s->bytes + got), -1;
		got += (size_t)n;
	}
	s->crc = tfs_crc32c(s->crc, buf, len);
	s->bytes += len;
	return 0;
}

struct header {
	uint64_t size, data;
	uint32_t block_size;
	bool incremental;
	uint8_t from[16], to[16];
};

static int read_header(struct in *s, struct header *hd)
{
	uint8_t h[TFS_STREAM_HEADER_SIZE];

	if (in_read(s, h, 16) < 0)
		return -1;
	if (memcmp(h + TFS_SH_MAGIC, TFS_STREAM_MAGIC, 8))
		return fail("receive: not a thinfs send stream (bad magic)"), -1;
	if (tfs_stream_get32(h + TFS_SH_VERSION) < TFS_STREAM_VERSION_OLDEST ||
	    tfs_stream_get32(h + TFS_SH_VERSION) > TFS_STREAM_VERSION)
		return fail("receive: stream version %" PRIu32 ": this thinfs-ctl reads versions "
			    "%u to %u", tfs_stream_get32(h + TFS_SH_VERSION),
			    TFS_STREAM_VERSION_OLDEST, TFS_STREAM_VERSION), -1;
	if (tfs_stream_get32(h + TFS_SH_LENGTH) != TFS_STREAM_HEADER_SIZE)
		return fail("receive: bad header length %" PRIu32, tfs_stream_get32(h + TFS_SH_LENGTH)), -1;
	if (in_read(s, h + 16, sizeof(h) - 16) < 0)
		return -1;
	if (tfs_stream_get32(h + TFS_SH_CRC) != tfs_crc32c(0xFFFFFFFFu, h, TFS_SH_CRC))
		return fail("receive: the stream's header is corrupt (checksum mismatch)"), -1;
	hd->size = tfs_stream_get64(h + TFS_SH_SIZE);
	hd->data = tfs_stream_get64(h + TFS_SH_DATA);
	hd->block_size = tfs_stream_get32(h + TFS_SH_BLOCK);
	hd->incremental = tfs_stream_get32(h + TFS_SH_FLAGS) & TFS_STREAM_INCREMENTAL;
	memcpy(hd->from, h + TFS_SH_FROM, 16);
	memcpy(hd->to, h + TFS_SH_TO, 16);
	return 0;
}

static int write_full(int fd, const uint8_t *buf, size_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, buf, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		buf += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* Every record up to the trailer, applied to vol; 0 when the whole stream checked out. */
static int apply_records(struct in *s, const struct header *hd, int vol, bool fresh)
{
	uint64_t sent = 0, records = 0, bad_at, bad_off;
	struct tfs_stream_ranges seen = { 0 };
	struct progress pr;
	uint8_t *buf, rh[TFS_STREAM_RECORD_SIZE], tail[4];
	int r = -1;

	buf = malloc(TFS_STREAM_CHUNK);
	if (!buf)
		return fail("receive: out of memory"), -1;
	progress_init(&pr, "receive", hd->data);
	for (;;) {
		uint64_t at = s->bytes, off, len;
		uint32_t type;
		int e;

		if (in_read(s, rh, sizeof(rh)) < 0)
			goto out;
		type = tfs_stream_get32(rh + TFS_SR_TYPE);
		off = tfs_stream_get64(rh + TFS_SR_OFFSET);
		len = tfs_stream_get64(rh + TFS_SR_LENGTH);
		if (type == TFS_REC_END) {
			uint32_t crc = s->crc;

			if (in_read(s, tail, sizeof(tail)) < 0)
				goto out;
			if (tfs_stream_get32(tail) != crc) {
				fail("receive: the stream is corrupt (its checksum does not "
				     "match)");
				goto out;
			}
			if (off != sent || len != records) {
				fail("receive: the stream is corrupt (its end counts %" PRIu64
				     " records, %" PRIu64 " bytes of data; read %" PRIu64
				     ", %" PRIu64 ")", len, off, records, sent);
				goto out;
			}
			/*
			 * Records may come in any order (version 2), never twice
			 * over the same bytes: the one written last would win
			 * where the sender meant one.
			 */
			if (tfs_stream_ranges_check(&seen, &bad_at, &bad_off)) {
				fail("receive: the stream is corrupt (the record at byte %" PRIu64
				     ", or one following on from it, overlaps an earlier one at "
				     "volume byte %" PRIu64 ")", bad_at, bad_off);
				goto out;
			}
			break;
		}
		if ((type != TFS_REC_DATA && type != TFS_REC_ZERO) || tfs_stream_get32(rh + 4) ||
		    off > hd->size || len > hd->size - off ||
		    (type == TFS_REC_DATA && len > TFS_STREAM_CHUNK)) {
			fail("receive: the stream is corrupt (bad record at byte %" PRIu64 ")", at);
			goto out;
		}
		records++;
		if (tfs_stream_ranges_add(&seen, off, len, at) < 0) {
			fail("receive: out of memory");
			goto out;
		}
		if (type == TFS_REC_ZERO) {
			/* A new volume reads as zeros already. */
			if (fresh || !len)
				continue;
			if (fallocate(vol, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
				      (off_t)len) < 0) {
				fail("receive: unmapping %" PRIu64 " bytes at %" PRIu64 ": %s", len,
				     off, strerror(errno));
				goto out;
			}
			continue;
		}
		if (in_read(s, buf, (size_t)len) < 0)
			goto out;
		e = write_full(vol, buf, (size_t)len, off);
		if (e < 0) {
			fail("receive: writing %" PRIu64 " bytes at %" PRIu64 ": %s", len, off,
			     strerror(-e));
			goto out;
		}
		sent += len;
		progress_show(&pr, sent, false);
	}
	/* Anything after the trailer is not ours: refuse rather than guess. */
	{
		uint8_t extra;
		ssize_t n;

		while ((n = read(STDIN_FILENO, &extra, 1)) < 0 && errno == EINTR)
			;
		if (n != 0) {
			fail("receive: %s after the stream's end", n > 0 ? "unexpected bytes" :
			     "a read error");
			goto out;
		}
	}
	progress_show(&pr, sent, true);
	r = 0;
out:
	tfs_stream_ranges_free(&seen);
	free(buf);
	return r;
}

int tfs_ctlc_receive(const char *mnt, int argc, char **argv)
{
	const char *name = NULL, *base = NULL, *req[10] = { "receive" };
	char from[TFS_CTL_ID_HEX] = "-", to[TFS_CTL_ID_HEX], path[8192];
	struct json_object *resp = NULL, *j, *fin;
	struct in s = { .crc = 0xFFFFFFFFu };
	struct header hd;
	struct conn c = { .fd = -1 };
	int vol = -1, n = 1, status = 1;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--base") && i + 1 < argc && !base)
			base = argv[++i];
		else if (argv[i][0] != '-' && !name)
			name = argv[i];
		else
			return fail("usage: receive NAME [--base BASE] < STREAM"), 2;
	}
	if (!name)
		return fail("usage: receive NAME [--base BASE] < STREAM"), 2;
	if (isatty(STDIN_FILENO))
		return fail("receive: the stream comes on stdin: redirect it from a file or a "
			    "pipe");
	if (read_header(&s, &hd) < 0)
		return fail("receive: nothing was made");
	if (hd.incremental)
		tfs_ctl_id_format(hd.from, from);
	tfs_ctl_id_format(hd.to, to);
	req[n++] = name;
	if (base) {
		req[n++] = "--base";
		req[n++] = base;
	}
	req[n++] = "--stream-from";
	req[n++] = from;
	req[n++] = "--stream-to";
	req[n++] = to;
	if (conn_open(&c, mnt) < 0)
		return 1;
	if (conn_request(&c, req) < 0 || !(resp = conn_response(&c)))
		goto out;
	if (!json_object_object_get_ex(resp, "json", &j) || !jstr(j, "path")) {
		fail("bad response from the daemon");
		goto out;
	}
	snprintf(path, sizeof(path), "%s/%s", mnt, jstr(j, "path"));
	vol = open(path, O_RDWR | O_CLOEXEC | (base ? 0 : O_CREAT | O_EXCL), 0666);
	if (vol < 0) {
		fail("receive: %s: %s", path, strerror(errno));
		goto out;
	}
	if (ftruncate(vol, (off_t)hd.size) < 0) {
		fail("receive: setting the size to %" PRIu64 ": %s", hd.size, strerror(errno));
		goto out;
	}
	if (apply_records(&s, &hd, vol, !base) < 0)
		goto out;
	if (fsync(vol) < 0) {
		fail("receive: fsync: %s", strerror(errno));
		goto out;
	}
	close(vol);
	vol = -1;
	{
		const char *commit[] = { "commit", NULL };

		if (conn_request(&c, commit) < 0 || !(fin = conn_response(&c)))
			goto out;
		json_object_put(fin);
	}
	status = 0;
out:
	if (vol >= 0)
		close(vol);
	/*
	 * The daemon deletes what it made when we leave uncommitted; saying so
	 * and waiting for its answer means it is gone when we exit.
	 */
	if (status && resp) {
		const char *abort_req[] = { "abort", NULL };
		char *line = NULL;
		size_t cap = 0;

		if (conn_request(&c, abort_req) == 0 && getline(&line, &cap, c.in) < 0)
			clearerr(c.in);
		free(line);
	}
	json_object_put(resp);
	conn_close(&c);
	if (status)
		fail("receive: nothing was made");
	return status;
}
