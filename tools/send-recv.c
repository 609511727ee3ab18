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

/* ---- little-endian fields ---- */

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Header field offsets (docs/send-receive.md). */
enum {
	H_MAGIC = 0, H_VERSION = 8, H_LENGTH = 12, H_SIZE = 16, H_BLOCK = 24, H_FLAGS = 28,
	H_FROM = 32, H_TO = 48, H_DATA = 64, H_CRC = 92,
};
/* Record header offsets. */
enum { R_TYPE = 0, R_OFFSET = 8, R_LENGTH = 16 };

/* The stream's CRC-32C runs over every byte before the trailer. */
static uint32_t crc_update(uint32_t crc, const void *p, size_t n)
{
	return tfs_crc32c(crc, p, n);
}

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

/*
 * The next response line: its object (the caller puts it), or NULL after
 * printing the daemon's error (and details) or why none came.
 */
static struct json_object *conn_response(struct conn *c)
{
	struct json_object *o, *v;
	char *line = NULL;
	size_t cap = 0;

	for (;;) {
		if (getline(&line, &cap, c->in) < 0) {
			free(line);
			fail("the daemon closed the connection without an answer");
			return NULL;
		}
		o = json_tokener_parse(line);
		if (!o || !json_object_object_get_ex(o, "ok", &v)) {
			json_object_put(o);
			free(line);
			fail("bad response from the daemon");
			return NULL;
		}
		/* A progress line of the daemon's (a long diff): ours say more. */
		if (!json_object_object_get_ex(o, "progress", NULL))
			break;
		json_object_put(o);
	}
	free(line);
	if (json_object_get_boolean(v))
		return o;
	if (json_object_object_get_ex(o, "error", &v))
		fail("%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "details", &v) && json_object_is_type(v, json_type_array))
		for (size_t i = 0; i < json_object_array_length(v); i++)
			fail("%s", json_object_get_string(json_object_array_get_idx(v, i)));
	json_object_put(o);
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

struct extent {
	uint64_t off, len;
	bool zero;
};

struct extents {
	struct extent *v;
	size_t nr, cap;
};

static int extents_add(struct extents *e, uint64_t off, uint64_t len, bool zero)
{
	if (e->nr == e->cap) {
		size_t cap = e->cap ? 2 * e->cap : 256;
		struct extent *v = realloc(e->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		e->v = v;
		e->cap = cap;
	}
	e->v[e->nr++] = (struct extent){ off, len, zero };
	return 0;
}

/* The daemon's diff FROM TO, cut to the volume's size. */
static int get_extents(const char *mnt, const char *from, const char *to, uint64_t size,
		       struct extents *e)
{
	const char *args[] = { "diff", from, to, NULL };
	struct json_object *o;
	struct conn c;
	int r = -1;

	if (conn_open(&c, mnt) < 0)
		return -1;
	if (conn_request(&c, args) < 0)
		goto out;
	while ((o = conn_response(&c)) != NULL) {
		const char *text = jstr(o, "output"), *p = text ? text : "";
		bool done = !json_object_object_get_ex(o, "done", NULL) || jbool(o, "done");

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
			if (off >= size)
				continue;
			if (len > size - off)
				len = size - off;
			if (extents_add(e, off, len, !strcmp(kind, "zero")) < 0) {
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

struct out {
	uint32_t crc;
	uint64_t bytes;
};

static int out_write(struct out *o, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	o->crc = crc_update(o->crc, buf, len);
	o->bytes += len;
	while (len) {
		ssize_t n = write(STDOUT_FILENO, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("send: writing the stream: %s", strerror(errno)), -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int out_record(struct out *o, uint32_t type, uint64_t off, uint64_t len)
{
	uint8_t h[TFS_STREAM_RECORD_SIZE] = { 0 };

	put32(h + R_TYPE, type);
	put64(h + R_OFFSET, off);
	put64(h + R_LENGTH, len);
	return out_write(o, h, sizeof(h));
}

static bool all_zero(const uint8_t *p, size_t n)
{
	static const uint8_t z[4096];

	for (; n >= sizeof(z); p += sizeof(z), n -= sizeof(z))
		if (memcmp(p, z, sizeof(z)))
			return false;
	return !n || !memcmp(p, z, n);
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
	const struct extent *chunk; /* data chunks of at most TFS_STREAM_CHUNK, zero ranges */
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

/* The extents cut into chunks: data in pieces of at most TFS_STREAM_CHUNK. */
static int chunks_of(const struct extents *e, struct extents *c)
{
	for (size_t i = 0; i < e->nr; i++) {
		const struct extent *x = &e->v[i];

		for (uint64_t off = x->off; off < x->off + x->len;) {
			uint64_t n = x->zero ? x->len : x->off + x->len - off;

			n = n < TFS_STREAM_CHUNK || x->zero ? n : TFS_STREAM_CHUNK;
			if (extents_add(c, off, n, x->zero) < 0)
				return -ENOMEM;
			off += n;
		}
	}
	return 0;
}

/* Chunk j: a ZERO record, or DATA (a chunk of zeros travels as ZERO, unmapped on receive). */
static int emit_chunk(struct out *o, const struct extent *x, const uint8_t *buf, uint64_t *sent)
{
	if (x->zero || all_zero(buf, (size_t)x->len))
		return out_record(o, TFS_REC_ZERO, x->off, x->len);
	if (out_record(o, TFS_REC_DATA, x->off, x->len) < 0 || out_write(o, buf, x->len) < 0)
		return -1;
	*sent += x->len;
	return 0;
}

/* Header, the chunks in order, END, trailer. */
static int write_stream(int vol, const struct extents *e, struct json_object *info,
			uint64_t size)
{
	uint8_t h[TFS_STREAM_HEADER_SIZE] = { 0 }, tail[4];
	uint64_t data = 0, done = 0, sent = 0;
	struct out o = { .crc = 0xFFFFFFFFu };
	struct reader rd = { .vol = vol };
	struct extents c = { 0 };
	pthread_t th[READERS];
	unsigned started = 0;
	struct progress pr;
	int r = -1;

	for (size_t i = 0; i < e->nr; i++)
		data += e->v[i].zero ? 0 : e->v[i].len;
	memcpy(h + H_MAGIC, TFS_STREAM_MAGIC, 8);
	put32(h + H_VERSION, TFS_STREAM_VERSION);
	put32(h + H_LENGTH, TFS_STREAM_HEADER_SIZE);
	put64(h + H_SIZE, size);
	put32(h + H_BLOCK, (uint32_t)ju64(info, "block_size"));
	if (jstr(info, "from")) {
		put32(h + H_FLAGS, TFS_STREAM_INCREMENTAL);
		tfs_ctl_id_parse(jstr(info, "from"), h + H_FROM);
	}
	tfs_ctl_id_parse(jstr(info, "to"), h + H_TO);
	put64(h + H_DATA, data);
	put32(h + H_CRC, tfs_crc32c(0xFFFFFFFFu, h, H_CRC));

	pthread_mutex_init(&rd.lock, NULL);
	pthread_cond_init(&rd.cond, NULL);
	if (chunks_of(e, &c) < 0)
		goto out_nomem;
	rd.chunk = c.v;
	rd.nr = c.nr;
	for (int i = 0; i < SLOTS; i++)
		if (posix_memalign((void **)&rd.buf[i], 4096, TFS_STREAM_CHUNK))
			goto out_nomem;
	for (; started < READERS; started++)
		if (pthread_create(&th[started], NULL, reader_thread, &rd))
			break;
	if (!started)
		goto out_nomem;

	progress_init(&pr, "send", data);
	if (out_write(&o, h, sizeof(h)) < 0)
		goto out;
	for (size_t j = 0; j < c.nr; j++) {
		const struct extent *x = &c.v[j];
		int e2;

		pthread_mutex_lock(&rd.lock);
		while (!(rd.ready[j % SLOTS] && rd.slot_chunk[j % SLOTS] == j))
			pthread_cond_wait(&rd.cond, &rd.lock);
		e2 = rd.err[j % SLOTS];
		pthread_mutex_unlock(&rd.lock);
		if (e2 < 0) {
			fail("send: reading the volume at byte %" PRIu64 ": %s", x->off,
			     strerror(-e2));
			goto out;
		}
		if (emit_chunk(&o, x, rd.buf[j % SLOTS], &sent) < 0)
			goto out;
		pthread_mutex_lock(&rd.lock);
		rd.ready[j % SLOTS] = false;
		rd.written = j + 1;
		pthread_cond_broadcast(&rd.cond);
		pthread_mutex_unlock(&rd.lock);
		done += x->zero ? 0 : x->len;
		progress_show(&pr, done, false);
	}
	if (out_record(&o, TFS_REC_END, sent, c.nr) < 0)
		goto out;
	put32(tail, o.crc);
	if (out_write(&o, tail, sizeof(tail)) < 0)
		goto out;
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
	free(c.v);
	pthread_cond_destroy(&rd.cond);
	pthread_mutex_destroy(&rd.lock);
	return r;
}

int tfs_ctlc_send(const char *mnt, int argc, char **argv)
{
	static const char usage[] = "usage: send [--from FROM] TO > STREAM (volumes or GROUP/NAME)";
	const char *from = NULL, *to = NULL, *req[6] = { "send" };
	struct extents e = { 0 };
	struct json_object *info = NULL, *fin;
	struct conn c;
	char path[8192];
	int vol = -1, status = 1, n = 1;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--from") && i + 1 < argc && !from)
			from = argv[++i];
		else if (argv[i][0] != '-' && !to)
			to = argv[i];
		else
			return fail("%s", usage), 2;
	}
	if (!to)
		return fail("%s", usage), 2;
	if (isatty(STDOUT_FILENO))
		return fail("send: the stream is binary: redirect it to a file or a pipe");
	if (from) {
		req[n++] = "--from";
		req[n++] = from;
	}
	req[n++] = to;
	if (conn_open(&c, mnt) < 0)
		return 1;
	if (conn_request(&c, req) < 0 || !(info = conn_response(&c)))
		goto out;
	{
		struct json_object *j;

		if (!json_object_object_get_ex(info, "json", &j) || !jstr(j, "path") ||
		    !jstr(j, "to")) {
			fail("bad response from the daemon");
			goto out;
		}
		json_object_get(j);
		json_object_put(info);
		info = j;
	}
	if (get_extents(mnt, from ? from : "-", jstr(info, "diff_to"), ju64(info, "size"), &e) < 0)
		goto out;
	snprintf(path, sizeof(path), "%s/%s", mnt, jstr(info, "path"));
	vol = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (vol < 0 && errno == EINVAL)
		vol = open(path, O_RDONLY | O_CLOEXEC);
	if (vol < 0) {
		fail("send: %s: %s", path, strerror(errno));
		goto out;
	}
	if (write_stream(vol, &e, info, ju64(info, "size")) < 0)
		goto out;
	status = 0;
out:
	if (vol >= 0)
		close(vol);
	/* Let the daemon drop its snapshot of TO (it does so too if we just leave). */
	if (info && jbool(info, "hold")) {
		const char *end[] = { "end", NULL };

		if (conn_request(&c, end) == 0 && (fin = conn_response(&c)) != NULL)
			json_object_put(fin);
	}
	json_object_put(info);
	conn_close(&c);
	free(e.v);
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
	s->crc = crc_update(s->crc, buf, len);
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
	if (memcmp(h + H_MAGIC, TFS_STREAM_MAGIC, 8))
		return fail("receive: not a thinfs send stream (bad magic)"), -1;
	if (get32(h + H_VERSION) != TFS_STREAM_VERSION)
		return fail("receive: stream version %" PRIu32 ": this thinfs-ctl reads version %u",
			    get32(h + H_VERSION), TFS_STREAM_VERSION), -1;
	if (get32(h + H_LENGTH) != TFS_STREAM_HEADER_SIZE)
		return fail("receive: bad header length %" PRIu32, get32(h + H_LENGTH)), -1;
	if (in_read(s, h + 16, sizeof(h) - 16) < 0)
		return -1;
	if (get32(h + H_CRC) != tfs_crc32c(0xFFFFFFFFu, h, H_CRC))
		return fail("receive: the stream's header is corrupt (checksum mismatch)"), -1;
	hd->size = get64(h + H_SIZE);
	hd->data = get64(h + H_DATA);
	hd->block_size = get32(h + H_BLOCK);
	hd->incremental = get32(h + H_FLAGS) & TFS_STREAM_INCREMENTAL;
	memcpy(hd->from, h + H_FROM, 16);
	memcpy(hd->to, h + H_TO, 16);
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
	uint64_t sent = 0, records = 0;
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
		type = get32(rh + R_TYPE);
		off = get64(rh + R_OFFSET);
		len = get64(rh + R_LENGTH);
		if (type == TFS_REC_END) {
			uint32_t crc = s->crc;

			if (in_read(s, tail, sizeof(tail)) < 0)
				goto out;
			if (get32(tail) != crc) {
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
			break;
		}
		if ((type != TFS_REC_DATA && type != TFS_REC_ZERO) || get32(rh + 4) ||
		    off > hd->size || len > hd->size - off ||
		    (type == TFS_REC_DATA && len > TFS_STREAM_CHUNK)) {
			fail("receive: the stream is corrupt (bad record at byte %" PRIu64 ")", at);
			goto out;
		}
		records++;
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
