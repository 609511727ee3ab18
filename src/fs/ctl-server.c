/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * ctl-server.c - control socket server: one JSON request line in, one or
 * more JSON response lines out (ctl-protocol.h).  See ctl-server.h.
 */
#include "ctl-server.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "cache.h"
#include "ctl-internal.h"
#include "ctl-protocol.h"
#include "fs.h"
#include "fuse-ops.h"
#include "log.h"
#include "origin.h"
#include "snap-store.h"
#include "utf8.h"
#include "wb-stash.h"

#define MAX_CLIENTS 64
#define MAX_DROPPED (64u << 20) /* of an oversized request, before answering */
#define CLIENT_TIMEOUT_S 10

struct tfs_ctl_server {
	struct tfs_fs *fs;
	char path[108];
	int listen_fd;
	int stop_pipe[2];
	pthread_t thread;

	pthread_mutex_t lock;
	pthread_cond_t idle;
	int clients[MAX_CLIENTS]; /* lock: fds being served, -1 = free slot */
	unsigned nclients;        /* lock */
};

struct client {
	struct tfs_ctl_server *srv;
	int fd;
	int slot;
};

/* ---- responses ---- */

/* Text being built for "output". */
struct text {
	char *buf;
	size_t len;
	FILE *f;
};

static int text_open(struct text *t)
{
	t->buf = NULL;
	t->len = 0;
	t->f = open_memstream(&t->buf, &t->len);
	return t->f ? 0 : -ENOMEM;
}

static const char *text_close(struct text *t)
{
	fclose(t->f);
	return t->buf;
}

static int send_line(int fd, struct json_object *o)
{
	const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
						       JSON_C_TO_STRING_NOSLASHESCAPE);
	size_t len = strlen(s), off = 0;
	char *repaired = NULL;
	int r = 0;

	/*
	 * json-c copies a string's bytes >= 0x80 as they are.  A name from an
	 * older catalog, or a request's argument echoed in an error, may not be
	 * UTF-8: what we send must parse in strict JSON parsers all the same.
	 */
	if (!tfs_utf8_valid(s, len)) {
		repaired = tfs_utf8_repair(s, len);
		if (!repaired)
			return -ENOMEM;
		s = repaired;
		len = strlen(s);
	}

	while (off <= len) {
		/* The newline is sent with the object: one write per line usually. */
		char nl = '\n';
		const void *p = off < len ? (const void *)(s + off) : (const void *)&nl;
		size_t n = off < len ? len - off : 1;
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			r = -errno;
			break;
		}
		off += (size_t)w;
	}
	free(repaired);
	return r;
}

/*
 * {"ok":false,"error":...}, and with details (a reload's configuration
 * problems, one per line of details) a "details" array of those lines.
 */
static int send_error_details(int fd, const char *details, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int send_error_details(int fd, const char *details, const char *fmt, ...)
{
	struct json_object *o = json_object_new_object();
	char msg[1024];
	va_list ap;
	int r;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	json_object_object_add(o, "ok", json_object_new_boolean(0));
	json_object_object_add(o, "error", json_object_new_string(msg));
	if (details) {
		struct json_object *a = json_object_new_array();

		while (*details) {
			size_t n = strcspn(details, "\n");

			if (n)
				json_object_array_add(a, json_object_new_string_len(details, (int)n));
			details += n + (details[n] == '\n');
		}
		json_object_object_add(o, "details", a);
	}
	json_object_object_add(o, "done", json_object_new_boolean(1));
	r = send_line(fd, o);
	json_object_put(o);
	return r;
}

#define send_error(fd, ...) send_error_details(fd, NULL, __VA_ARGS__)

/* Send {"ok":true,"output":text,"json":json,"done":done}; takes json's reference. */
static int send_ok(int fd, const char *text, struct json_object *json, bool done)
{
	struct json_object *o = json_object_new_object();
	int r;

	json_object_object_add(o, "ok", json_object_new_boolean(1));
	json_object_object_add(o, "output", json_object_new_string(text ? text : ""));
	if (json)
		json_object_object_add(o, "json", json);
	json_object_object_add(o, "done", json_object_new_boolean(done));
	r = send_line(fd, o);
	json_object_put(o);
	return r;
}

static const char *pretty(struct json_object *o)
{
	return json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
					      JSON_C_TO_STRING_NOSLASHESCAPE);
}

/* ---- commands ---- */

struct cmd_ctx {
	struct tfs_fs *fs;
	int fd;
	int argc;
	const char **argv; /* argv[0] is the command */
};

static bool has_flag(const struct cmd_ctx *c, const char *flag)
{
	for (int i = 1; i < c->argc; i++)
		if (!strcmp(c->argv[i], flag))
			return true;
	return false;
}

/* Every argument is one of the known flags: else an error was sent. */
static bool only_flags(const struct cmd_ctx *c, const char *const *flags)
{
	for (int i = 1; i < c->argc; i++) {
		bool known = false;

		for (const char *const *f = flags; *f; f++)
			known |= !strcmp(c->argv[i], *f);
		if (!known) {
			send_error(c->fd, "%s: unexpected argument '%s'", c->argv[0], c->argv[i]);
			return false;
		}
	}
	return true;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!*s || *s == '-')
		return -EINVAL;
	errno = 0;
	*out = strtoull(s, &end, 0);
	return errno || *end ? -EINVAL : 0;
}

static const char *kind_name(enum tfs_vol_kind k)
{
	return k == TFS_VOL_SNAPSHOT ? "snapshot" : k == TFS_VOL_GROUP_MEMBER ? "member" : "thin";
}

static const char *dm_mode(const char *mode)
{
	if (!strcmp(mode, "write"))
		return "rw";
	if (!strcmp(mode, "read_only"))
		return "ro";
	if (!strcmp(mode, "fail"))
		return "Fail";
	return mode;
}

static struct json_object *io_json(const struct tfs_io_counts *io)
{
	struct json_object *o = json_object_new_object();

	json_object_object_add(o, "reads", json_object_new_uint64(io->reads));
	json_object_object_add(o, "writes", json_object_new_uint64(io->writes));
	json_object_object_add(o, "flushes", json_object_new_uint64(io->flushes));
	json_object_object_add(o, "discards", json_object_new_uint64(io->discards));
	json_object_object_add(o, "read_bytes", json_object_new_uint64(io->read_bytes));
	json_object_object_add(o, "write_bytes", json_object_new_uint64(io->write_bytes));
	return o;
}

/*
 * A device's status fields (target.h) go into its JSON object and its row
 * of the text table.  The table has columns for the fields most devices
 * report (mapped_blocks, exclusive_blocks, suspended: "-" when a device
 * does not); held_in_core is summed in the pool's line; any other field
 * follows the row as key=value ("a.b=" inside a nested object), so a new
 * kind shows up in full without changes here.
 */
#define STATUS_DEPTH 8
struct dev_status {
	struct tfs_status_sink sink;
	struct json_object *obj[STATUS_DEPTH]; /* obj[depth]: the object being filled */
	size_t prefix_len[STATUS_DEPTH];       /* prefix's length at each depth */
	unsigned depth;
	char prefix[256];                      /* text: "key." of each open object */
	char mapped[24], exclusive[24];
	const char *state;
	char extra[1024];
};

static struct dev_status *dev_status_of(struct tfs_status_sink *s)
{
	return (struct dev_status *)s;
}

static void status_field(struct dev_status *ds, const char *key, struct json_object *jv,
			 const char *text)
{
	size_t n = strlen(ds->extra);

	json_object_object_add(ds->obj[ds->depth], key, jv);
	if (ds->depth == 0 && !strcmp(key, "mapped_blocks"))
		snprintf(ds->mapped, sizeof(ds->mapped), "%s", text);
	else if (ds->depth == 0 && !strcmp(key, "exclusive_blocks"))
		snprintf(ds->exclusive, sizeof(ds->exclusive), "%s", text);
	else if (ds->depth == 0 && !strcmp(key, "suspended") && !strcmp(text, "true"))
		ds->state = "suspended";
	else if (ds->depth == 0 && !strcmp(key, "suspended"))
		ds->state = "active";
	else if (ds->depth > 0 || strcmp(key, "held_in_core"))
		snprintf(ds->extra + n, sizeof(ds->extra) - n, " %s%s=%s", ds->prefix, key, text);
}

static void status_u64(struct tfs_status_sink *s, const char *key, uint64_t v)
{
	char text[24];

	snprintf(text, sizeof(text), "%" PRIu64, v);
	status_field(dev_status_of(s), key, json_object_new_uint64(v), text);
}

static void status_flag(struct tfs_status_sink *s, const char *key, bool v)
{
	status_field(dev_status_of(s), key, json_object_new_boolean(v), v ? "true" : "false");
}

static void status_text(struct tfs_status_sink *s, const char *key, const char *v)
{
	status_field(dev_status_of(s), key, v ? json_object_new_string(v) : NULL, v ? v : "null");
}

static void status_texts(struct tfs_status_sink *s, const char *key, const char *const *v,
			 size_t n)
{
	struct json_object *a = json_object_new_array();
	char list[512] = "";

	for (size_t i = 0; i < n; i++) {
		size_t used = strlen(list);

		json_object_array_add(a, json_object_new_string(v[i]));
		snprintf(list + used, sizeof(list) - used, "%s%s", i ? "," : "", v[i]);
	}
	status_field(dev_status_of(s), key, a, list);
}

static void status_begin(struct tfs_status_sink *s, const char *key)
{
	struct dev_status *ds = dev_status_of(s);
	struct json_object *o = json_object_new_object();
	size_t n = strlen(ds->prefix);

	json_object_object_add(ds->obj[ds->depth], key, o);
	if (ds->depth + 1 == STATUS_DEPTH)
		return; /* deeper than any target nests: its fields stay one level up */
	ds->prefix_len[ds->depth] = n;
	ds->obj[++ds->depth] = o;
	snprintf(ds->prefix + n, sizeof(ds->prefix) - n, "%s.", key);
}

static void status_end(struct tfs_status_sink *s)
{
	struct dev_status *ds = dev_status_of(s);

	if (ds->depth == 0)
		return;
	ds->depth--;
	ds->prefix[ds->prefix_len[ds->depth]] = '\0';
}

static const struct tfs_status_sink_ops dev_status_ops = {
	.u64 = status_u64,
	.flag = status_flag,
	.text = status_text,
	.texts = status_texts,
	.begin = status_begin,
	.end = status_end,
};

/* What data-file preallocation did, and how partial writes to new blocks were written. */
static void add_prealloc_status(struct json_object *pool, const struct tfs_pool_status *st)
{
	struct json_object *pa = json_object_new_object(), *nb = json_object_new_object();

	json_object_object_add(pa, "active", json_object_new_boolean(st->prealloc.active));
	json_object_object_add(pa, "chunk_bytes", json_object_new_uint64(st->prealloc.chunk_bytes));
	json_object_object_add(pa, "chunks", json_object_new_uint64(st->prealloc.chunks));
	json_object_object_add(pa, "fallocates", json_object_new_uint64(st->prealloc.fallocates));
	json_object_object_add(pa, "failures", json_object_new_uint64(st->prealloc.failures));
	json_object_object_add(pool, "preallocate", pa);
	json_object_object_add(nb, "written_partly", json_object_new_uint64(st->new_written_partly));
	json_object_object_add(nb, "filled_whole", json_object_new_uint64(st->new_filled_whole));
	json_object_object_add(pool, "new_block_writes", nb);
}

/* One volume of status: its row, then what its device reports about itself. */
static struct json_object *volume_status(struct tfs_fs *fs, const struct tfs_vol_row *row,
					 FILE *table)
{
	struct json_object *v = json_object_new_object();
	struct dev_status ds = { .sink.ops = &dev_status_ops, .obj = { v }, .mapped = "-",
				 .exclusive = "-", .state = "-" };
	struct tfs_dev *dev;
	const char *kind;
	int r;

	json_object_object_add(v, "name", json_object_new_string(row->name));
	json_object_object_add(v, "id", json_object_new_int64(row->dev_id));
	json_object_object_add(v, "size", json_object_new_uint64(row->size));
	r = tfs_fs_open_dev(fs, row->dev_id, TFS_DEV_STATUS_ONLY, &dev);
	/* An origin's or classic snapshot's row is its target's, not a thin kind. */
	kind = r == 0 && row->dev_id >= TFS_DEV_ID_OTHER ? tfs_dev_kind(dev) : kind_name(row->kind);
	json_object_object_add(v, "kind", json_object_new_string(kind));
	if (r == 0) {
		json_object_object_add(v, "target", json_object_new_string(tfs_dev_kind(dev)));
		tfs_dev_status(dev, &ds.sink);
		tfs_dev_close(dev);
	} else {
		tfs_warn("status: no device for volume %s: %s", row->name, strerror(-r));
	}
	fprintf(table, "%-24s %8" PRIu32 " %-8s %20" PRIu64 " %12s %12s %-9s%s\n", row->name,
		row->dev_id, kind, row->size, ds.mapped, ds.exclusive, ds.state,
		ds.extra);
	return v;
}

/*
 * Snapshots being merged have no file and no row, but are listed with
 * their progress (merging, merge_remaining_chunks) until merge_done.
 */
static void merging_status(struct tfs_fs *fs, struct json_object *vols, FILE *table)
{
	struct tfs_cow_merging *m = NULL;
	unsigned n = 0;

	if (!fs->cow || tfs_cow_set_merging(fs->cow, &m, &n) < 0)
		return;
	for (unsigned i = 0; i < n; i++) {
		struct tfs_vol_row row = { .dev_id = m[i].id, .kind = TFS_VOL_THIN };

		snprintf(row.name, sizeof(row.name), "%s", m[i].name);
		tfs_cow_set_size(fs->cow, m[i].id, &row.size);
		json_object_array_add(vols, volume_status(fs, &row, table));
	}
	free(m);
}

static void cmd_status(struct cmd_ctx *c)
{
	static const char *const flags[] = { "--json", NULL };
	struct tfs_fs *fs = c->fs;
	struct tfs_pool_status st;
	struct tfs_vol_row *rows = NULL;
	struct tfs_group_row *groups = NULL;
	unsigned nr = 0, ngroups = 0;
	struct json_object *root, *pool, *data, *meta, *io, *vols, *jgroups;
	struct text t;
	int r;

	if (!only_flags(c, flags))
		return;
	r = tfs_fs_list(fs, 0, &rows, &nr);
	if (r == 0)
		r = tfs_fs_list_groups(fs, &groups, &ngroups);
	if (r == 0 && text_open(&t) < 0)
		r = -ENOMEM;
	if (r < 0) {
		send_error(c->fd, "status: cannot read the catalog: %s", strerror(-r));
		free(rows);
		free(groups);
		return;
	}
	tfs_pool_status(fs->pool, &st);

	root = json_object_new_object();
	pool = json_object_new_object();
	json_object_object_add(pool, "mode", json_object_new_string(st.mode ? st.mode : "fail"));
	json_object_object_add(pool, "needs_check", json_object_new_boolean(st.needs_check));
	json_object_object_add(pool, "reason", json_object_new_string(st.reason));
	json_object_object_add(pool, "transaction_id", json_object_new_uint64(st.transaction_id));
	json_object_object_add(pool, "held_root",
			       st.held_root ? json_object_new_uint64(st.held_root) : NULL);
	json_object_object_add(pool, "suspended", json_object_new_boolean(st.suspended));
	json_object_object_add(pool, "reload_staged", json_object_new_boolean(st.reload_staged));
	/* Every request held, thin devices' and origins' alike. */
	if (fs->cow)
		st.held_in_core += tfs_cow_set_held(fs->cow);
	json_object_object_add(pool, "held_in_core", json_object_new_uint64(st.held_in_core));
	/* After no_space_timeout the pool behaves as error_if_no_space until a resize. */
	json_object_object_add(pool, "error_if_no_space",
			       json_object_new_boolean(st.error_if_no_space || st.no_space_error));
	json_object_object_add(pool, "held_writes", json_object_new_uint64(st.held_writes));
	json_object_object_add(pool, "discard_passdown",
			       json_object_new_boolean(st.discard_passdown));
	json_object_object_add(pool, "free_blocks_read_zero",
			       json_object_new_boolean(st.free_blocks_read_zero));
	add_prealloc_status(pool, &st);
	json_object_object_add(pool, "direct_io",
			       json_object_new_boolean(st.io_data.direct && st.io_meta.direct));
	json_object_object_add(pool, "max_threads", json_object_new_uint64(fs->cfg.max_threads));
	json_object_object_add(pool, "writeback_cache", json_object_new_boolean(fs->writeback));
	json_object_object_add(pool, "stashed_writeback_bytes",
			       json_object_new_uint64(tfs_wb_stashed_bytes(fs)));
	data = json_object_new_object();
	json_object_object_add(data, "block_size", json_object_new_uint64(st.data_block_size));
	json_object_object_add(data, "used_blocks", json_object_new_uint64(st.data_used));
	json_object_object_add(data, "total_blocks", json_object_new_uint64(st.data_total));
	json_object_object_add(data, "low_water_blocks", json_object_new_uint64(st.low_water_blocks));
	json_object_object_add(pool, "data", data);
	meta = json_object_new_object();
	json_object_object_add(meta, "block_size", json_object_new_uint64(4096));
	json_object_object_add(meta, "used_blocks", json_object_new_uint64(st.meta_used));
	json_object_object_add(meta, "total_blocks", json_object_new_uint64(st.meta_total));
	json_object_object_add(meta, "low_water_blocks",
			       json_object_new_uint64(st.meta_low_water_blocks));
	json_object_object_add(pool, "metadata", meta);
	io = json_object_new_object();
	json_object_object_add(io, "metadata", io_json(&st.io_meta));
	json_object_object_add(io, "data", io_json(&st.io_data));
	json_object_object_add(pool, "io", io);
	json_object_object_add(root, "pool", pool);

	/* dmsetup status's thin-pool line, then a table for people. */
	fprintf(t.f, "thin-pool %" PRIu64 " %" PRIu64 "/%" PRIu64 " %" PRIu64 "/%" PRIu64 " ",
		st.transaction_id, st.meta_used, st.meta_total, st.data_used, st.data_total);
	if (st.held_root)
		fprintf(t.f, "%" PRIu64, st.held_root);
	else
		fputc('-', t.f);
	fprintf(t.f, " %s %s %s %s %" PRIu64 "\n", dm_mode(st.mode ? st.mode : "fail"),
		st.discard_passdown ? "discard_passdown" : "no_discard_passdown",
		st.error_if_no_space || st.no_space_error ? "error_if_no_space"
							  : "queue_if_no_space",
		st.needs_check ? "needs_check" : "-", st.meta_low_water_blocks);
	for (unsigned i = 0; i < fs->nr_caches; i++) {
		char line[512];

		tfs_cache_dm_line(fs->caches[i], line, sizeof(line));
		fprintf(t.f, "cache %s: %s\n", tfs_cache_name(fs->caches[i]), line);
	}
	fprintf(t.f, "\npool: %s%s", st.suspended ? "suspended" : "active",
		st.reload_staged ? " (reloaded configuration staged for resume)" : "");
	if (st.held_in_core)
		fprintf(t.f, ", %u requests held", st.held_in_core);
	fprintf(t.f, ", devices %s",
		st.io_data.direct && st.io_meta.direct ? "O_DIRECT" : "through the host page cache");
	fprintf(t.f, ", at most %u FUSE worker threads", fs->cfg.max_threads);
	fprintf(t.f, "\n\n%-24s %8s %-8s %20s %12s %12s %-9s\n", "VOLUME", "ID", "KIND", "SIZE",
		"MAPPED", "EXCLUSIVE", "STATE");

	vols = json_object_new_array();
	for (unsigned i = 0; i < nr; i++)
		json_object_array_add(vols, volume_status(fs, &rows[i], t.f));
	merging_status(fs, vols, t.f);
	json_object_object_add(root, "volumes", vols);

	jgroups = json_object_new_array();
	if (ngroups)
		fprintf(t.f, "\n%-24s %-20s %s\n", "SNAPSHOT GROUP", "CREATED", "VOLUMES");
	for (unsigned i = 0; i < ngroups; i++) {
		struct json_object *g = json_object_new_object(), *members;
		struct tfs_vol_row *m = NULL;
		unsigned nm = 0;
		char created[32];

		tfs_format_time(groups[i].created_ns, created, sizeof(created));
		json_object_object_add(g, "name", json_object_new_string(groups[i].name));
		json_object_object_add(g, "created", json_object_new_string(created));
		members = json_object_new_array();
		fprintf(t.f, "%-24s %-20s", groups[i].name, created);
		if (tfs_fs_list(fs, groups[i].id, &m, &nm) == 0) {
			for (unsigned j = 0; j < nm; j++) {
				json_object_array_add(members, json_object_new_string(m[j].name));
				fprintf(t.f, " %s", m[j].name);
			}
			free(m);
		}
		fputc('\n', t.f);
		json_object_object_add(g, "volumes", members);
		json_object_array_add(jgroups, g);
	}
	json_object_object_add(root, "snapshot_groups", jgroups);

	if (has_flag(c, "--json")) {
		const char *s = text_close(&t);

		free((void *)s);
		send_ok(c->fd, pretty(root), root, true);
	} else {
		send_ok(c->fd, text_close(&t), root, true);
		free(t.buf);
	}
	free(rows);
	free(groups);
}

/* A row's kind: an origin's or classic snapshot's is its target's (a static string). */
static const char *row_kind(struct tfs_fs *fs, const struct tfs_vol_row *row)
{
	const char *kind = kind_name(row->kind);
	struct tfs_dev *dev;

	if (row->dev_id >= TFS_DEV_ID_OTHER &&
	    tfs_fs_open_dev(fs, row->dev_id, TFS_DEV_STATUS_ONLY, &dev) == 0) {
		kind = tfs_dev_kind(dev);
		tfs_dev_close(dev);
	}
	return kind;
}

static void cmd_list(struct cmd_ctx *c)
{
	static const char *const flags[] = { "--json", NULL };
	struct tfs_vol_row *rows;
	struct json_object *arr;
	struct text t;
	unsigned nr;
	int r;

	if (!only_flags(c, flags))
		return;
	r = tfs_fs_list(c->fs, 0, &rows, &nr);
	if (r == 0 && text_open(&t) < 0) {
		free(rows);
		r = -ENOMEM;
	}
	if (r < 0) {
		send_error(c->fd, "list: cannot read the catalog: %s", strerror(-r));
		return;
	}
	arr = json_object_new_array();
	for (unsigned i = 0; i < nr; i++) {
		struct json_object *v = json_object_new_object();

		json_object_object_add(v, "name", json_object_new_string(rows[i].name));
		json_object_object_add(v, "id", json_object_new_int64(rows[i].dev_id));
		json_object_object_add(v, "kind",
				       json_object_new_string(row_kind(c->fs, &rows[i])));
		json_object_object_add(v, "size", json_object_new_uint64(rows[i].size));
		json_object_array_add(arr, v);
		fprintf(t.f, "%s\n", rows[i].name);
	}
	free(rows);
	if (has_flag(c, "--json")) {
		free((void *)text_close(&t));
		send_ok(c->fd, pretty(arr), arr, true);
	} else {
		send_ok(c->fd, text_close(&t), arr, true);
		free(t.buf);
	}
}

#define SUSPENDED_MSG "the pool is suspended: resume it first"

/* -EBUSY from a pool-level change means the pool is suspended, not a volume in use. */
static const char *pool_errmsg(struct cmd_ctx *c, int r)
{
	if (r == -EBUSY && tfs_pool_is_suspended(c->fs->pool))
		return SUSPENDED_MSG;
	return strerror(-r);
}

static const char *errmsg(struct cmd_ctx *c, int r)
{
	if (r == -EBUSY && tfs_pool_is_suspended(c->fs->pool))
		return SUSPENDED_MSG;
	switch (r) {
	case -ENOENT:
		return "no such volume";
	case -EEXIST:
		return "name already taken";
	case -EINVAL:
		return "invalid name";
	case -EBUSY:
		return "in use";
	case -EROFS:
		return "pool is read-only";
	default:
		return strerror(-r);
	}
}

/* snapshot ORIGIN NAME --cow DEVICE [--chunk-size S] [--transient]: a classic snapshot. */
static void cow_snapshot(struct cmd_ctx *c)
{
	static const char usage[] =
		"usage: snapshot ORIGIN NAME --cow DEVICE [--chunk-size S] [--transient]";
	struct tfs_fs_cow_request req = { .origin = c->argv[1], .name = c->argv[2],
					  .chunk_sectors = 8, .persistent = true };
	char cow[TFS_PATH_MAX], errors[1024];
	uint64_t bytes;
	int r;

	for (int i = 3; i < c->argc; i++) {
		if (!strcmp(c->argv[i], "--cow") && i + 1 < c->argc) {
			req.cow = c->argv[++i];
		} else if (!strcmp(c->argv[i], "--chunk-size") && i + 1 < c->argc) {
			i++;
			if (tfs_parse_size(c->argv[i], &bytes, NULL) || bytes % 512 ||
			    bytes / 512 > UINT32_MAX || !tfs_snap_chunk_sectors_ok(bytes / 512)) {
				send_error(c->fd, "snapshot: --chunk-size %s is not %s", c->argv[i],
					   TFS_SNAP_CHUNK_RULE);
				return;
			}
			req.chunk_sectors = (uint32_t)(bytes / 512);
		} else if (!strcmp(c->argv[i], "--transient")) {
			req.persistent = false;
		} else {
			send_error(c->fd, "%s", usage);
			return;
		}
	}
	if (c->argc < 5 || !req.cow) {
		send_error(c->fd, "%s", usage);
		return;
	}
	if (tfs_catalog_name_error(req.name)) {
		send_error(c->fd, "snapshot: bad name: %s", tfs_catalog_name_error(req.name));
		return;
	}
	r = tfs_config_resolve_device(req.cow, NULL, cow, sizeof(cow));
	if (r < 0 || cow[0] != '/') {
		send_error(c->fd, "snapshot: --cow %s: %s", req.cow,
			   r < 0 ? strerror(-r) : "name the device by an absolute path");
		return;
	}
	req.cow = cow;
	/* The engine says what is wrong with the device: the client gets the same line. */
	tfs_log_capture(errors, sizeof(errors));
	r = tfs_fs_cow_snapshot(c->fs, &req);
	tfs_log_capture(NULL, 0);
	if (r == -EEXIST && !errors[0])
		send_error(c->fd, "snapshot: '%s' already exists", req.name);
	else if (r == -ENXIO)
		send_error(c->fd, "snapshot: no origin named '%s'", req.origin);
	else if (r < 0)
		send_error(c->fd, "snapshot %s %s: %s", req.origin, req.name,
			   errors[0] ? errors : errmsg(c, r));
	else
		send_ok(c->fd, "", NULL, true);
}

static void cmd_snapshot(struct cmd_ctx *c)
{
	int r;

	if (c->argc > 3) {
		cow_snapshot(c);
		return;
	}
	if (c->argc != 3) {
		send_error(c->fd, "usage: snapshot SRC NEW");
		return;
	}
	if (tfs_catalog_name_error(c->argv[2])) {
		send_error(c->fd, "snapshot: bad name: %s", tfs_catalog_name_error(c->argv[2]));
		return;
	}
	r = tfs_fs_snapshot_volume(c->fs, c->argv[1], c->argv[2]);
	if (r == -EXDEV)
		send_error(c->fd, "snapshot: '%s' is not a thin volume (a classic snapshot of an "
			   "origin: snapshot ORIGIN NAME --cow DEVICE)", c->argv[1]);
	else if (r == -ENOENT)
		send_error(c->fd, "snapshot: no volume named '%s'", c->argv[1]);
	else if (r == -EEXIST)
		send_error(c->fd, "snapshot: '%s' already exists", c->argv[2]);
	else if (r < 0)
		send_error(c->fd, "snapshot %s %s: %s", c->argv[1], c->argv[2], errmsg(c, r));
	else
		send_ok(c->fd, "", NULL, true);
}

static void cmd_delete(struct cmd_ctx *c)
{
	const char *name;
	fuse_ino_t parent = TFS_INO_ROOT;
	int r;

	if (c->argc != 2) {
		send_error(c->fd, "usage: delete NAME");
		return;
	}
	name = c->argv[1];
	if (!strncmp(name, TFS_SNAPSHOTS_NAME "/", sizeof(TFS_SNAPSHOTS_NAME))) {
		/* delete .snapshots/GROUP = rmdir */
		name += sizeof(TFS_SNAPSHOTS_NAME);
		parent = TFS_INO_SNAPSHOTS;
		r = tfs_fs_remove_group(c->fs, name);
	} else {
		r = tfs_fs_unlink_volume(c->fs, name);
	}
	if (r == -ENOENT) {
		send_error(c->fd, "delete: no %s named '%s'",
			   parent == TFS_INO_ROOT ? "volume" : "snapshot group", name);
		return;
	}
	if (r == -EPERM) {
		send_error(c->fd, "delete %s: it comes from pool.cfg: remove its section from "
			   "pool.cfg and reload", c->argv[1]);
		return;
	}
	if (r == -EBUSY && parent == TFS_INO_SNAPSHOTS && !tfs_pool_is_suspended(c->fs->pool)) {
		send_error(c->fd, "delete %s: in use: a member is open, or a send is reading it; "
			   "delete it when that is done", c->argv[1]);
		return;
	}
	if (r < 0) {
		send_error(c->fd, "delete %s: %s", c->argv[1], errmsg(c, r));
		return;
	}
	/* The kernel may hold the name in its dentry cache: drop it. */
	if (c->fs->se)
		fuse_lowlevel_notify_inval_entry(c->fs->se, parent, name, strlen(name));
	send_ok(c->fd, "", NULL, true);
}

static void cmd_set_transaction_id(struct cmd_ctx *c)
{
	struct tfs_pool_status st;
	uint64_t old_id, new_id;
	int r;

	if (c->argc != 3 || parse_u64(c->argv[1], &old_id) || parse_u64(c->argv[2], &new_id)) {
		send_error(c->fd, "usage: set-transaction-id OLD NEW (unsigned integers)");
		return;
	}
	/*
	 * A wrong OLD is the caller's mistake, not the pool's: answer it here
	 * rather than have the engine log an error.  The engine still checks
	 * (a concurrent change can slip in between).
	 */
	tfs_pool_status(c->fs->pool, &st);
	if (st.transaction_id != old_id) {
		send_error(c->fd, "set-transaction-id: current transaction id is %" PRIu64 ", not %"
			   PRIu64, st.transaction_id, old_id);
		return;
	}
	r = tfs_pool_set_transaction_id(c->fs->pool, old_id, new_id);
	if (r == -EINVAL) {
		tfs_pool_status(c->fs->pool, &st);
		send_error(c->fd, "set-transaction-id: current transaction id is %" PRIu64 ", not %"
			   PRIu64, st.transaction_id, old_id);
		return;
	}
	if (r < 0) {
		send_error(c->fd, "set-transaction-id: %s", pool_errmsg(c, r));
		return;
	}
	tfs_fs_event(c->fs, "set_transaction_id", "%" PRIu64 " -> %" PRIu64, old_id, new_id);
	send_ok(c->fd, "", NULL, true);
}

static bool merging(struct tfs_fs *fs, const char *name)
{
	struct tfs_cow_merging *m = NULL;
	unsigned n = 0;
	bool found = false;

	if (fs->cow && tfs_cow_set_merging(fs->cow, &m, &n) == 0)
		for (unsigned i = 0; i < n; i++)
			found |= !strcmp(m[i].name, name);
	free(m);
	return found;
}

/* merge NAME: roll a classic snapshot's origin back to it (dm snapshot-merge). */
static void cmd_merge(struct cmd_ctx *c)
{
	char errors[1024];
	uint64_t chunks = 0;
	uint32_t origin = 0;
	int r;

	if (c->argc != 2) {
		send_error(c->fd, "usage: merge NAME");
		return;
	}
	tfs_log_capture(errors, sizeof(errors));
	r = tfs_fs_cow_merge(c->fs, c->argv[1], &chunks, &origin);
	tfs_log_capture(NULL, 0);
	if (r == -EROFS)
		send_error(c->fd, "merge: the pool is read-only");
	else if (r == -ENOENT && merging(c->fs, c->argv[1]))
		send_error(c->fd, "merge: %s is already being merged into its origin", c->argv[1]);
	else if (r == -ENOENT)
		send_error(c->fd, "merge: no classic snapshot named '%s'", c->argv[1]);
	else if (r == -EINVAL)
		send_error(c->fd, "merge: '%s' is not a classic snapshot (only a snapshot made with "
			   "thinfs-ctl snapshot ORIGIN NAME --cow DEVICE can be merged)", c->argv[1]);
	else if (r == -EBUSY && !errors[0])
		send_error(c->fd, "merge: %s is open: close it first", c->argv[1]);
	else if (r < 0)
		send_error(c->fd, "merge %s: %s", c->argv[1], errors[0] ? errors : strerror(-r));
	if (r < 0)
		return;
	if (c->fs->se) {
		fuse_lowlevel_notify_inval_entry(c->fs->se, TFS_INO_ROOT, c->argv[1],
						 strlen(c->argv[1]));
		/* Pages of the origin a handle still caches are the old content's. */
		fuse_lowlevel_notify_inval_inode(c->fs->se, tfs_ino_of_dev(origin), 0, 0);
	}
	send_ok(c->fd, "", NULL, true);
}

/* resize cow NAME: a classic snapshot's COW device grew. */
static void resize_cow(struct cmd_ctx *c)
{
	char errors[1024];
	uint64_t chunks = 0;
	int r;

	if (!c->fs->cow) {
		send_error(c->fd, "resize cow: the pool is read-only");
		return;
	}
	tfs_log_capture(errors, sizeof(errors));
	r = tfs_cow_set_resize_cow(c->fs->cow, c->argv[2], &chunks);
	tfs_log_capture(NULL, 0);
	if (r == -ENOENT) {
		send_error(c->fd, "resize cow: no classic snapshot named '%s'", c->argv[2]);
		return;
	}
	if (r < 0) {
		send_error(c->fd, "resize cow %s: %s", c->argv[2], errors[0] ? errors : strerror(-r));
		return;
	}
	tfs_fs_event(c->fs, "resize", "cow %s: %" PRIu64 " chunks", c->argv[2], chunks);
	send_ok(c->fd, "", NULL, true);
}

/* resize data|metadata SIZE|+DELTA: sizes in bytes with the config's suffixes. */
/* resize NAME: a cache takes its devices' sizes now into use. */
static void cmd_resize_cache(struct cmd_ctx *c, struct tfs_cache *cache)
{
	char msg[512] = "", line[600];
	uint32_t id;
	int r = tfs_fs_cache_resize(c->fs, cache, &id, msg, sizeof(msg));

	if (r < 0) {
		send_error(c->fd, "resize %s: %s", c->argv[1], msg[0] ? msg : strerror(-r));
		return;
	}
	/*
	 * The kernel may hold the old size for a while: drop its attributes.
	 * With writeback_cache it keeps a regular file's size as its own and
	 * ignores ours at getattr, so also drop the name: a file nobody holds
	 * open is then forgotten and looked up afresh, with the new size.
	 */
	if (c->fs->se) {
		fuse_lowlevel_notify_inval_inode(c->fs->se, tfs_ino_of_dev(id), 0, 0);
		fuse_lowlevel_notify_inval_entry(c->fs->se, TFS_INO_ROOT, c->argv[1],
						 strlen(c->argv[1]));
	}
	snprintf(line, sizeof(line), "%s\n", msg);
	send_ok(c->fd, line, NULL, true);
}

static void cmd_resize(struct cmd_ctx *c)
{
	static const char usage[] = "usage: resize data|metadata SIZE|+DELTA | resize cow NAME | "
				    "resize CACHE";
	struct tfs_cache *cache = c->argc == 2 ? tfs_fs_cache_by_name(c->fs, c->argv[1]) : NULL;
	struct tfs_pool_status st;
	uint64_t bytes, unit, before, after;
	bool data, relative;
	char why[512];
	int r;

	if (cache) {
		cmd_resize_cache(c, cache);
		return;
	}
	if (c->argc == 3 && !strcmp(c->argv[1], "cow")) {
		resize_cow(c);
		return;
	}
	if (c->argc != 3 || (strcmp(c->argv[1], "data") && strcmp(c->argv[1], "metadata"))) {
		send_error(c->fd, "%s", usage);
		return;
	}
	data = !strcmp(c->argv[1], "data");
	if (tfs_parse_size(c->argv[2], &bytes, &relative) < 0) {
		send_error(c->fd, "resize: bad size '%s' (bytes with k/M/G/T, or +DELTA)",
			   c->argv[2]);
		return;
	}
	tfs_pool_status(c->fs->pool, &st);
	unit = data ? st.data_block_size : 4096;
	before = data ? st.data_total : st.meta_total;
	if (relative) {
		if (bytes > UINT64_MAX - before * unit) {
			send_error(c->fd, "resize: %s is too large", c->argv[2]);
			return;
		}
		bytes += before * unit;
	}
	tfs_fs_events_hold(c->fs);
	r = tfs_pool_resize(c->fs->pool, data, bytes, why, sizeof(why));
	if (r < 0) {
		tfs_fs_events_release(c->fs);
		send_error(c->fd, "resize %s: %s", c->argv[1], why[0] ? why : strerror(-r));
		return;
	}
	tfs_pool_status(c->fs->pool, &st);
	after = data ? st.data_total : st.meta_total;
	/* Before what the resize caused (out_of_data_space -> write). */
	if (after != before)
		tfs_fs_event(c->fs, "resize", "%s %" PRIu64 " -> %" PRIu64 " blocks of %" PRIu64
			     " bytes", c->argv[1], before, after, unit);
	tfs_fs_events_release(c->fs);
	/* A note on success: metadata grown only to the format's limit. */
	send_ok(c->fd, why, NULL, true);
}

static void cmd_metadata_snap(struct cmd_ctx *c, bool reserve)
{
	struct tfs_pool_status st;
	int r;

	if (c->argc != 1) {
		send_error(c->fd, "%s takes no arguments", c->argv[0]);
		return;
	}
	/* Answered here so that a caller's mistake is not logged as a pool error. */
	tfs_pool_status(c->fs->pool, &st);
	if (reserve && st.held_root) {
		send_error(c->fd, "%s: a metadata snapshot is already held (block %" PRIu64 ")",
			   c->argv[0], st.held_root);
		return;
	}
	if (!reserve && !st.held_root) {
		send_error(c->fd, "%s: no metadata snapshot is held", c->argv[0]);
		return;
	}
	r = reserve ? tfs_pool_reserve_metadata_snap(c->fs->pool)
		    : tfs_pool_release_metadata_snap(c->fs->pool);
	if (r < 0) {
		send_error(c->fd, "%s: %s", c->argv[0],
			   r == -EEXIST ? "a metadata snapshot is already held" :
			   r == -ENODATA || r == -ENOENT ? "no metadata snapshot is held" :
			   pool_errmsg(c, r));
		return;
	}
	tfs_fs_event(c->fs, reserve ? "reserve_metadata_snap" : "release_metadata_snap", "%s",
		     reserve ? "metadata snapshot held" : "metadata snapshot released");
	send_ok(c->fd, "", NULL, true);
}

/* One event as text and as an object. */
static struct json_object *event_json(const struct tfs_event_row *ev)
{
	struct json_object *o = json_object_new_object();
	char when[32];

	tfs_format_time(ev->time_ns, when, sizeof(when));
	json_object_object_add(o, "id", json_object_new_int64(ev->id));
	json_object_object_add(o, "time", json_object_new_string(when));
	json_object_object_add(o, "kind", json_object_new_string(ev->kind));
	json_object_object_add(o, "detail", json_object_new_string(ev->detail));
	return o;
}

struct event_out {
	struct text *t;
	struct json_object *arr;
	bool json;
	int64_t last_id;
	int64_t only_id; /* > 0: just this one */
};

static int collect_event(void *ctx, const struct tfs_event_row *ev)
{
	struct event_out *e = ctx;
	struct json_object *o;

	if (e->only_id > 0 && ev->id != e->only_id)
		return 0;
	o = event_json(ev);
	if (e->json) {
		fprintf(e->t->f, "%s\n", pretty(o));
	} else {
		char when[32];

		tfs_format_time(ev->time_ns, when, sizeof(when));
		fprintf(e->t->f, "%" PRId64 " %s %s %s\n", ev->id, when, ev->kind, ev->detail);
	}
	json_object_array_add(e->arr, o);
	e->last_id = ev->id;
	return e->only_id > 0 ? 1 : 0;
}

/* Events after after_id as one response line; done says whether it is the last. */
static int send_events(struct cmd_ctx *c, int64_t after_id, int64_t only_id, bool done,
		       int64_t *last_id)
{
	struct event_out e = { .json = has_flag(c, "--json"), .last_id = after_id,
			       .only_id = only_id };
	struct text t;
	int r;

	if (text_open(&t) < 0)
		return send_error(c->fd, "out of memory");
	e.t = &t;
	e.arr = json_object_new_array();
	r = tfs_catalog_list_events(c->fs->cat, after_id, collect_event, &e);
	if (r < 0) {
		free((void *)text_close(&t));
		json_object_put(e.arr);
		send_error(c->fd, "cannot read the event log: %s", strerror(-r));
		return r;
	}
	if (last_id)
		*last_id = e.last_id;
	r = send_ok(c->fd, text_close(&t), e.arr, done);
	free(t.buf);
	return r;
}

/* False when the client hung up (checked while waiting, so waits end). */
static bool client_alive(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	char b;

	if (poll(&p, 1, 0) <= 0)
		return true;
	return recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

/* Wait until event id > seen exists, the deadline passes (0: none) or we stop. */
static bool wait_for_event(struct tfs_fs *fs, int fd, int64_t id, const struct timespec *deadline)
{
	bool ok;

	pthread_mutex_lock(&fs->event_lock);
	while (fs->last_event_id < id && !fs->stopping) {
		struct timespec now, next;

		clock_gettime(CLOCK_REALTIME, &now);
		if (deadline && (now.tv_sec > deadline->tv_sec ||
				 (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec)))
			break;
		/* Wake at least once a second to notice a client that left. */
		next = now;
		next.tv_sec += 1;
		if (deadline && (deadline->tv_sec < next.tv_sec ||
				 (deadline->tv_sec == next.tv_sec && deadline->tv_nsec < next.tv_nsec)))
			next = *deadline;
		pthread_cond_timedwait(&fs->event_cond, &fs->event_lock, &next);
		if (!client_alive(fd))
			break;
	}
	ok = fs->last_event_id >= id;
	pthread_mutex_unlock(&fs->event_lock);
	return ok;
}

static void cmd_events(struct cmd_ctx *c)
{
	static const char *const flags[] = { "--json", "--follow", NULL };
	int64_t last = 0;

	if (!only_flags(c, flags))
		return;
	if (!has_flag(c, "--follow")) {
		send_events(c, 0, 0, true, NULL);
		return;
	}
	if (send_events(c, 0, 0, false, &last) < 0)
		return;
	for (;;) {
		if (!wait_for_event(c->fs, c->fd, last + 1, NULL))
			break;
		if (send_events(c, last, 0, false, &last) < 0)
			return;
	}
	send_ok(c->fd, "", NULL, true);
}

static void cmd_wait_event(struct cmd_ctx *c)
{
	struct timespec deadline;
	bool has_deadline = false;
	uint64_t id = 0, secs;
	bool have_id = false;

	for (int i = 1; i < c->argc; i++) {
		if (!strcmp(c->argv[i], "--timeout") && i + 1 < c->argc) {
			char *end;
			double t = strtod(c->argv[++i], &end);

			if (*end || t < 0) {
				send_error(c->fd, "wait-event: bad timeout '%s'", c->argv[i]);
				return;
			}
			clock_gettime(CLOCK_REALTIME, &deadline);
			secs = (uint64_t)t;
			deadline.tv_sec += (time_t)secs;
			deadline.tv_nsec += (long)((t - (double)secs) * 1e9);
			if (deadline.tv_nsec >= 1000000000) {
				deadline.tv_sec++;
				deadline.tv_nsec -= 1000000000;
			}
			has_deadline = true;
		} else if (!have_id && !strcmp(c->argv[i], "--json")) {
			continue;
		} else if (!have_id && parse_u64(c->argv[i], &id) == 0 && id <= INT64_MAX) {
			have_id = true;
		} else {
			send_error(c->fd, "usage: wait-event N [--timeout SECONDS]");
			return;
		}
	}
	if (!have_id) {
		send_error(c->fd, "usage: wait-event N [--timeout SECONDS]");
		return;
	}
	if (!wait_for_event(c->fs, c->fd, (int64_t)id, has_deadline ? &deadline : NULL)) {
		send_error(c->fd, "wait-event: no event %" PRIu64 " yet (timed out)", id);
		return;
	}
	send_events(c, (int64_t)id - 1, (int64_t)id, true, NULL);
}

/* ---- suspend, resume, reload ---- */

/*
 * The device ids of the volumes named in argv[1..] (flags skipped): root
 * volumes or snapshot group members (GROUP/NAME); names gets them
 * comma-separated, or "pool" when none is named.  Thin devices come
 * first, *nr_thin of them; origins and classic snapshots (their own
 * suspend, origin.h) follow.  0, or -1 when answered.
 */
static int volume_ids(struct cmd_ctx *c, uint32_t **ids, unsigned *nr, unsigned *nr_thin,
		      char *names, size_t len)
{
	size_t used = 0;
	unsigned nr_cow = 0;

	*ids = calloc((size_t)c->argc * 2, sizeof(**ids));
	*nr = *nr_thin = 0;
	if (!*ids) {
		send_error(c->fd, "%s: out of memory", c->argv[0]);
		return -1;
	}
	snprintf(names, len, "pool");
	for (int i = 1; i < c->argc; i++) {
		struct tfs_vol_row row;
		const char *a = c->argv[i];

		if (!strcmp(a, "--noflush") || !strcmp(a, "--json"))
			continue;
		if (!strcmp(a, "--timeout")) {
			i++;
			continue;
		}
		if (a[0] == '-') {
			send_error(c->fd, "%s: unknown option '%s'", c->argv[0], a);
			goto fail;
		}
		if (tfs_fs_find_volume(c->fs, a, &row) < 0) {
			send_error(c->fd, "%s: no volume named '%s' (nothing was %s)", c->argv[0], a,
				   strcmp(c->argv[0], "resume") ? "suspended" : "resumed");
			goto fail;
		}
		/* Origins and classic snapshots go behind, in the second half. */
		if (row.dev_id >= TFS_DEV_ID_OTHER)
			(*ids)[c->argc + nr_cow++] = row.dev_id;
		else
			(*ids)[(*nr_thin)++] = row.dev_id;
		if (used < len)
			used += (size_t)snprintf(names + used, len - used, "%s%s", used ? ", " : "",
						 a);
	}
	memmove(*ids + *nr_thin, *ids + c->argc, nr_cow * sizeof(**ids));
	*nr = *nr_thin + nr_cow;
	return 0;
fail:
	free(*ids);
	*ids = NULL;
	return -1;
}

static bool client_gone(void *arg)
{
	return !client_alive(*(int *)arg);
}

/*
 * suspend/resume of caches (each its own instance, core.h): when every NAME
 * is a cache.  Returns false, having done nothing, when none is.
 */
static bool cache_suspend_resume(struct cmd_ctx *c, const struct tfs_suspend_opts *o)
{
	bool suspend = o != NULL;
	struct tfs_cache *list[TFS_CACHES_MAX];
	unsigned n = 0, named = 0, done = 0;
	char why[512] = "", names[512] = "";
	size_t used = 0;
	int r = 0;

	for (int i = 1; i < c->argc; i++) {
		struct tfs_cache *cache;

		if (!strcmp(c->argv[i], "--timeout")) {
			i++;
			continue;
		}
		if (c->argv[i][0] == '-')
			continue;
		named++;
		cache = tfs_fs_cache_by_name(c->fs, c->argv[i]);
		if (cache && n < TFS_CACHES_MAX) {
			list[n++] = cache;
			if (used < sizeof(names))
				used += (size_t)snprintf(names + used, sizeof(names) - used, "%s%s",
							 used ? ", " : "", c->argv[i]);
		}
	}
	if (!n)
		return false;
	if (n != named) {
		send_error(c->fd, "%s: name caches and thin volumes in separate commands (nothing "
			   "was %s)", c->argv[0], suspend ? "suspended" : "resumed");
		return true;
	}
	for (unsigned i = 0; i < n && r >= 0; i++) {
		r = suspend ? tfs_cache_suspend(list[i], o, why, sizeof(why))
			    : tfs_cache_resume(list[i]);
		done += r > 0;
	}
	if (r < 0) {
		send_error(c->fd, "%s %s: %s", c->argv[0], names, why[0] ? why : strerror(-r));
		tfs_fs_event(c->fs, c->argv[0], "%s: %s", names, why[0] ? why : strerror(-r));
		return true;
	}
	if (!done) {
		send_ok(c->fd, suspend ? "already suspended" : "not suspended", NULL, true);
		return true;
	}
	tfs_fs_event(c->fs, c->argv[0], "cache %s%s", names,
		     suspend && o->noflush ? " (noflush)" : "");
	{
		char text[600];

		snprintf(text, sizeof(text), "%s: %s", suspend ? "suspended" : "resumed", names);
		send_ok(c->fd, text, NULL, true);
	}
	return true;
}

/*
 * The pool's suspend for thin devices (nr == 0: the pool and every
 * origin), the origins' for the rest; should the origins' fail, the thin
 * devices this suspended are resumed.  As tfs_pool_suspend.
 */
static int suspend_ids(struct tfs_fs *fs, const uint32_t *ids, unsigned nr, unsigned nr_thin,
		       const struct tfs_suspend_opts *o, char *why, size_t len)
{
	uint32_t *undo = calloc(nr_thin ? nr_thin : 1, sizeof(*undo));
	unsigned nr_undo = 0;
	bool pool_was = tfs_pool_is_suspended(fs->pool);
	char msg[256];
	int n = 0, r;

	why[0] = '\0';
	if (!undo)
		return -ENOMEM;
	for (unsigned i = 0; i < nr_thin; i++)
		if (!tfs_pool_dev_suspended(fs->pool, ids[i]))
			undo[nr_undo++] = ids[i];
	if (!nr || nr_thin) {
		n = tfs_pool_suspend(fs->pool, ids, nr_thin, o, why, len);
		if (n < 0 || (!fs->cow) || (nr && nr == nr_thin))
			goto out;
	}
	r = tfs_cow_set_suspend(fs->cow, ids + nr_thin, nr - nr_thin, o, msg, sizeof(msg));
	if (r >= 0) {
		/* The pool's warning (a failed commit) and the origins' (a failed flush) both. */
		if (msg[0] && strlen(why) + 3 < len)
			snprintf(why + strlen(why), len - strlen(why), "%s%s", why[0] ? "; " : "",
				 msg);
		n += r;
		goto out;
	}
	snprintf(why, len, "%s", msg);
	if (!nr && !pool_was)
		tfs_pool_resume(fs->pool, NULL, 0, msg, sizeof(msg));
	else if (nr_undo)
		tfs_pool_resume(fs->pool, undo, nr_undo, msg, sizeof(msg));
	n = r;
out:
	free(undo);
	return n;
}

/* suspend [NAME...] [--noflush] [--timeout S] */
static void cmd_suspend(struct cmd_ctx *c)
{
	struct tfs_suspend_opts o = { .noflush = has_flag(c, "--noflush"), .cancelled = client_gone,
				      .arg = &c->fd };
	char why[512], names[512];
	uint32_t *ids;
	unsigned nr, nr_thin;
	int r;

	for (int i = 1; i < c->argc; i++) {
		char *end;
		double t;

		if (strcmp(c->argv[i], "--timeout"))
			continue;
		t = i + 1 < c->argc ? strtod(c->argv[i + 1], &end) : -1;
		if (t <= 0 || t > 1e6 || *end) {
			send_error(c->fd, "suspend: --timeout needs a number of seconds > 0");
			return;
		}
		o.timeout_ms = (uint64_t)(t * 1000) ? (uint64_t)(t * 1000) : 1;
	}
	if (cache_suspend_resume(c, &o))
		return;
	if (volume_ids(c, &ids, &nr, &nr_thin, names, sizeof(names)) < 0)
		return;
	/*
	 * As dm's suspend syncs the page cache unless noflush: what writers
	 * left in the kernel's cache goes in first, so it is not held
	 * while suspended (noflush leaves it there, to be written after resume).
	 */
	r = o.noflush ? 0 : tfs_fs_flush_cached_writes(c->fs, ids, nr, "suspend");
	if (r < 0) {
		free(ids);
		send_error(c->fd, "suspend %s: writing back cached writes: %s (nothing was "
			   "suspended)", names, strerror(-r));
		return;
	}
	r = suspend_ids(c->fs, ids, nr, nr_thin, &o, why, sizeof(why));
	free(ids);
	if (r < 0) {
		if (r == -ETIMEDOUT)
			send_error(c->fd, "suspend %s: timed out: %s", names, why);
		else
			send_error(c->fd, "suspend %s: %s", names, why[0] ? why : strerror(-r));
		tfs_fs_event(c->fs, "suspend", "%s: abandoned: %s", names, why);
		return;
	}
	if (r == 0) {
		send_ok(c->fd, "already suspended", NULL, true);
		return;
	}
	tfs_fs_event(c->fs, "suspend", "%s%s%s%s", names, o.noflush ? " (noflush)" : "",
		     why[0] ? ": " : "", why);
	{
		char text[1100];

		snprintf(text, sizeof(text), "suspended: %s%s%s", names, why[0] ? "\nwarning: " : "",
			 why);
		send_ok(c->fd, text, NULL, true);
	}
}

/* ---- diff FROM TO [--json] [--stats] ---- */

struct diff_run {
	uint64_t vblock, len;
	bool zero;
};

struct diff_out {
	struct diff_run *v;
	size_t nr, cap;
	int fd;
	uint64_t block_size;
	uint64_t total;          /* blocks of the larger volume, for progress */
	int64_t start_ns, next_ns;
};

/* Called under the pool's lock: only records. */
static int diff_note(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct diff_out *o = ctx;

	if (o->nr == o->cap) {
		size_t cap = o->cap ? 2 * o->cap : 256;
		struct diff_run *v = realloc(o->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		o->v = v;
		o->cap = cap;
	}
	o->v[o->nr++] = (struct diff_run){ vblock, len, zero };
	return 0;
}

/*
 * Between steps, no lock held: stop if the client left; past the first
 * second, a progress line (thinfs-ctl shows it on a terminal) each second.
 */
static int diff_progress(void *ctx, uint64_t vblock)
{
	struct diff_out *o = ctx;
	int64_t now = tfs_now_ns();
	struct json_object *line;
	double secs, done;
	char text[160];

	if (!client_alive(o->fd))
		return 1;
	if (now < o->next_ns)
		return 0;
	o->next_ns = now + 1000000000;
	secs = (double)(now - o->start_ns) / 1e9;
	done = (double)(vblock < o->total ? vblock : o->total) * (double)o->block_size;
	snprintf(text, sizeof(text), "diff: %.1f of %.1f GiB compared (%.0f MiB/s)",
		 done / 1073741824.0, (double)o->total * (double)o->block_size / 1073741824.0,
		 done / 1048576.0 / (secs > 0 ? secs : 1));
	line = json_object_new_object();
	json_object_object_add(line, "ok", json_object_new_boolean(1));
	json_object_object_add(line, "progress", json_object_new_string(text));
	json_object_object_add(line, "done", json_object_new_boolean(0));
	send_line(o->fd, line);
	json_object_put(line);
	return 0;
}

/* FROM or TO: "-" (nothing) or a volume; -1 when answered. */
static int diff_side(struct cmd_ctx *c, const char *spec, uint32_t *id, const uint32_t **idp,
		     uint64_t *size)
{
	struct tfs_vol_row row;

	*idp = NULL;
	if (!strcmp(spec, "-"))
		return 0;
	if (tfs_fs_find_volume(c->fs, spec, &row) < 0) {
		send_error(c->fd, "diff: no volume named '%s' (a volume, GROUP/NAME, or - for "
			   "nothing)", spec);
		return -1;
	}
	/* The diff walks thin mappings: an origin or classic snapshot has none. */
	if (row.dev_id >= TFS_DEV_ID_OTHER) {
		send_error(c->fd, "diff: '%s' is an origin or classic snapshot, not a thin volume",
			   spec);
		return -1;
	}
	*id = row.dev_id;
	*idp = id;
	if (row.size > *size)
		*size = row.size;
	return 0;
}

/* Runs in bytes, "OFFSET LENGTH data|zero" lines or a JSON list, a few thousand a line. */
static void diff_send(struct cmd_ctx *c, const struct diff_out *o, bool json, const char *stats)
{
	struct text t;
	size_t i = 0;

	do {
		size_t end = i + 4096 < o->nr ? i + 4096 : o->nr;
		bool last = end == o->nr;

		if (text_open(&t) < 0) {
			send_error(c->fd, "diff: out of memory");
			return;
		}
		if (json && i == 0)
			fputc('[', t.f);
		for (; i < end; i++) {
			const struct diff_run *x = &o->v[i];
			const char *kind = x->zero ? "zero" : "data";
			uint64_t off = x->vblock * o->block_size, len = x->len * o->block_size;

			if (json)
				fprintf(t.f, "{\"offset\":%" PRIu64 ",\"length\":%" PRIu64
					",\"kind\":\"%s\"}%s", off, len, kind, i + 1 < o->nr ? ",\n" : "");
			else
				fprintf(t.f, "%" PRIu64 " %" PRIu64 " %s\n", off, len, kind);
		}
		if (json && last)
			fputs("]\n", t.f);
		if (last && stats) {
			struct json_object *line = json_object_new_object();

			json_object_object_add(line, "ok", json_object_new_boolean(1));
			json_object_object_add(line, "output", json_object_new_string(text_close(&t)));
			json_object_object_add(line, "note", json_object_new_string(stats));
			json_object_object_add(line, "done", json_object_new_boolean(1));
			send_line(c->fd, line);
			json_object_put(line);
		} else {
			send_ok(c->fd, text_close(&t), NULL, last);
		}
		free(t.buf);
	} while (i < o->nr);
}

static void cmd_diff(struct cmd_ctx *c)
{
	struct diff_out o = { .fd = c->fd, .block_size = c->fs->block_size };
	const uint32_t *from, *to;
	struct tfs_pool_diff_stats st;
	uint32_t from_id, to_id;
	uint64_t size = 0;
	const char *names[2] = { NULL, NULL };
	char stats[160];
	const char *order = NULL;
	unsigned n = 0;
	int r;

	for (int i = 1; i < c->argc; i++) {
		if (!strcmp(c->argv[i], "--json") || !strcmp(c->argv[i], "--stats"))
			continue;
		/* thinfs-ctl send --through-mount: the stream's records, in its order. */
		if (!strcmp(c->argv[i], "--send-order") && i + 1 < c->argc) {
			order = c->argv[++i];
			continue;
		}
		if (c->argv[i][0] == '-' && c->argv[i][1]) {
			send_error(c->fd, "diff: unknown option '%s'", c->argv[i]);
			return;
		}
		if (n == 2) {
			n++;
			break;
		}
		names[n++] = c->argv[i];
	}
	if (n != 2) {
		send_error(c->fd, "usage: diff FROM TO [--json] [--stats] (FROM and TO: a volume, "
			   "GROUP/NAME, or - for nothing)");
		return;
	}
	if (order) {
		tfs_ctl_cmd_send_order(c->fs, c->fd, names[0], names[1], order);
		return;
	}
	if (diff_side(c, names[0], &from_id, &from, &size) < 0 ||
	    diff_side(c, names[1], &to_id, &to, &size) < 0)
		return;
	o.total = (size + o.block_size - 1) / o.block_size;
	o.start_ns = tfs_now_ns();
	o.next_ns = o.start_ns + 1000000000;
	r = tfs_pool_diff(c->fs->pool, from, to, diff_note, diff_progress, &o, &st);
	if (r == -EINTR) {
		free(o.v);
		return; /* the client left */
	}
	if (r < 0) {
		send_error(c->fd, "diff %s %s: %s", names[0], names[1],
			   r == -EBUSY ? "a metadata snapshot is held (reserve-metadata-snap) and "
					 "the diff needs its slot: release it first" :
			   r == -ENOSPC ? "metadata too full to hold the trees for the diff" :
			   r == -ENODATA ? "the volume has no thin device (deleted meanwhile?)" :
			   strerror(-r));
		free(o.v);
		return;
	}
	snprintf(stats, sizeof(stats), "diff: %zu extents, %" PRIu64 " metadata blocks read, %.3f ms",
		 o.nr, st.nodes_read, (double)(tfs_now_ns() - o.start_ns) / 1e6);
	diff_send(c, &o, has_flag(c, "--json"), has_flag(c, "--stats") ? stats : NULL);
	free(o.v);
}

/* resume [NAME...] */
static void cmd_resume(struct cmd_ctx *c)
{
	char msg[1024], names[512], text[2300], caches[512] = "";
	uint32_t *ids;
	unsigned nr, nr_thin, nr_caches = 0;
	int n = 0;

	if (cache_suspend_resume(c, NULL))
		return;
	if (volume_ids(c, &ids, &nr, &nr_thin, names, sizeof(names)) < 0)
		return;
	/* No name: the pool, every volume and every cache. */
	for (unsigned i = 0; !nr && i < c->fs->nr_caches; i++)
		nr_caches += (unsigned)tfs_cache_resume(c->fs->caches[i]);
	tfs_fs_events_hold(c->fs);
	msg[0] = '\0';
	if (!nr || nr_thin)
		n = tfs_pool_resume(c->fs->pool, ids, nr_thin, msg, sizeof(msg));
	if (c->fs->cow && (!nr || nr > nr_thin)) {
		int m = tfs_cow_set_resume(c->fs->cow, ids + nr_thin, nr - nr_thin);

		n += m > 0 ? m : 0;
	}
	free(ids);
	if (n == 0 && nr_caches) {
		tfs_fs_events_release(c->fs);
		tfs_fs_event(c->fs, "resume", "%u cache(s)", nr_caches);
		send_ok(c->fd, "resumed: the caches (the pool was not suspended)", NULL, true);
		return;
	}
	if (n == 0) {
		tfs_fs_events_release(c->fs);
		send_ok(c->fd, "not suspended", NULL, true);
		return;
	}
	if (!nr) {
		tfs_fs_after_resume(c->fs);
		tfs_fs_cow_after_resume(c->fs);
		tfs_fs_cache_reload(c->fs, caches, sizeof(caches));
	}
	/* Before what the resume caused (a low-water crossing again, taking a reload). */
	tfs_fs_event(c->fs, "resume", "%s%s%s%s%s", names, msg[0] || caches[0] ? ": " : "", msg,
		     msg[0] && caches[0] ? "; " : "", caches);
	tfs_fs_events_release(c->fs);
	snprintf(text, sizeof(text), "resumed: %s%s%s%s%s", names, msg[0] ? "\n" : "", msg,
		 caches[0] ? "\n" : "", caches);
	send_ok(c->fd, text, NULL, true);
}

/* reload POOL.CFG (an absolute path: thinfs-ctl resolves it) */
static void cmd_reload(struct cmd_ctx *c)
{
	struct tfs_pool_config *cfg;
	char errors[2048], msg[1024];
	int r;

	if (c->argc != 2) {
		send_error(c->fd, "usage: reload POOL.CFG");
		return;
	}
	cfg = malloc(sizeof(*cfg));
	if (!cfg) {
		send_error(c->fd, "reload: out of memory");
		return;
	}
	/* The parser reports each problem once, with file:line: the client gets the same text. */
	tfs_log_capture(errors, sizeof(errors));
	r = tfs_config_load(c->argv[1], cfg);
	tfs_log_capture(NULL, 0);
	if (r < 0) {
		/* The client's mistake, answered to the client: not an error of the pool. */
		tfs_info("reload of %s refused: %s", c->argv[1], errors[0] ? errors : strerror(-r));
		send_error_details(c->fd, errors[0] ? errors : strerror(-r), "reload: %s is not "
				   "loadable (the running configuration stays):", c->argv[1]);
		goto out;
	}
	r = tfs_fs_cow_reload_check(c->fs, cfg, msg, sizeof(msg));
	if (r == 0)
		r = tfs_pool_reload(c->fs->pool, cfg, msg, sizeof(msg));
	if (r == 0) {
		char why[512] = "";
		char **gone;
		unsigned nr_gone;

		r = tfs_fs_cow_reload_apply(c->fs, cfg, why, sizeof(why), &gone, &nr_gone);
		for (unsigned i = 0; i < nr_gone; i++) {
			if (r >= 0 && gone[i] && c->fs->se)
				fuse_lowlevel_notify_inval_entry(c->fs->se, TFS_INO_ROOT, gone[i],
								 strlen(gone[i]));
			free(gone[i]);
		}
		free(gone);
		if (r < 0) {
			/* Unstage: the pool's part of this reload must not be taken at resume. */
			tfs_pool_get_config(c->fs->pool, cfg);
			tfs_pool_reload(c->fs->pool, cfg, msg, sizeof(msg));
			snprintf(msg, sizeof(msg), "%s", why);
		} else if (r > 0) {
			size_t n = strlen(msg);

			snprintf(msg + n, sizeof(msg) - n, " (origins and classic snapshots: in "
				 "effect now, not at resume)");
			r = 0;
		}
	}
	if (r < 0) {
		send_error(c->fd, "reload refused (the running configuration stays): %s", msg);
		goto out;
	}
	tfs_fs_event(c->fs, "reload", "%s staged for resume: %s", c->argv[1], msg);
	send_ok(c->fd, msg, NULL, true);
out:
	free(cfg);
}

/* The caches' devices lose their unflushed writes with the pool's. */
static void power_cut_caches(struct tfs_fs *fs, bool tear)
{
	static const char *const which[] = { "origin", "cache", "metadata" };

	for (unsigned i = 0; i < fs->nr_caches; i++)
		for (int d = 0; d < 3; d++)
			tfs_bdev_fault_power_cut(tfs_cache_bdev(fs->caches[i], which[d]), tear,
						 (uint32_t)time(NULL));
}

/* fault crash-at POINT [power-cut [tear]]: arm a crash point (fs.h). */
static void fault_crash_at(struct cmd_ctx *c)
{
	enum tfs_crash_how how = TFS_CRASH_PROCESS;

	if (c->argc == 4 && !strcmp(c->argv[3], "power-cut"))
		how = TFS_CRASH_POWER;
	else if (c->argc == 5 && !strcmp(c->argv[3], "power-cut") && !strcmp(c->argv[4], "tear"))
		how = TFS_CRASH_POWER_TEAR;
	else if (c->argc != 3) {
		send_error(c->fd, "usage: fault crash-at POINT [power-cut [tear]]");
		return;
	}
	if (tfs_fs_crash_arm(c->fs, c->argv[2], how) < 0) {
		char names[512];
		size_t used = 0;
		const char *n;

		names[0] = '\0';
		for (unsigned i = 0; (n = tfs_fs_crash_point_name(i)) && used < sizeof(names); i++)
			used += (size_t)snprintf(names + used, sizeof(names) - used, "%s%s",
						 i ? ", " : "", n);
		send_error(c->fd, "fault: no crash point '%s' (%s)", c->argv[2], names);
		return;
	}
	tfs_fs_event(c->fs, "fault", "crash-at %s%s", c->argv[2],
		     how == TFS_CRASH_PROCESS ? "" : how == TFS_CRASH_POWER ? " power-cut" :
		     " power-cut tear");
	send_ok(c->fd, "", NULL, true);
}

/* A fault rule for a device: error/enospc/stall/ok, or a delay. */
struct fault_req {
	enum tfs_fault_op op;
	enum tfs_fault_mode mode;
	uint64_t after, usec;
	bool once, delay;
};

static void apply_fault(struct tfs_bdev *dev, void *arg)
{
	const struct fault_req *f = arg;

	if (f->delay)
		tfs_bdev_fault_set_delay(dev, f->op, f->usec);
	else
		tfs_bdev_fault_set(dev, f->op, f->mode, f->after, f->once);
}

/*
 * Apply f (NULL: only look) to the device a fault command names: the
 * pool's metadata or data, NAME:cow or NAME:device, or NAME:origin,
 * NAME:cache or NAME:metadata of a cache.  -ENOENT no such one.
 */
static int fault_device(struct cmd_ctx *c, const char *name, struct fault_req *f)
{
	const char *colon = strrchr(name, ':');
	char target[TFS_NAME_MAX + 1];

	if (!strcmp(name, "metadata") || !strcmp(name, "data")) {
		if (f)
			apply_fault(tfs_pool_bdev(c->fs->pool, !strcmp(name, "data")), f);
		return 0;
	}
	if (!colon || (size_t)(colon - name) > TFS_NAME_MAX)
		return -ENOENT;
	snprintf(target, sizeof(target), "%.*s", (int)(colon - name), name);
	/* NAME:origin, NAME:cache, NAME:metadata of a cache. */
	if (tfs_fs_cache_by_name(c->fs, target)) {
		struct tfs_bdev *dev = tfs_cache_bdev(tfs_fs_cache_by_name(c->fs, target), colon + 1);

		if (!dev)
			return -ENOENT;
		if (f)
			apply_fault(dev, f);
		return 0;
	}
	if (!c->fs->cow)
		return -ENOENT;
	return tfs_cow_set_with_fault_dev(c->fs->cow, target, colon + 1, f ? apply_fault : NULL,
					  f);
}

/*
 * fault metadata|data|NAME:cow|NAME:device read|write|flush error|enospc|stall|ok [after N] [once]
 * fault power-cut [tear]
 * fault crash-at POINT [power-cut [tear]]
 * Only for pools whose pool.cfg allows it and whose daemon was started
 * with --allow-faults (the mount refuses the first without the second).
 */
static void cmd_fault(struct cmd_ctx *c)
{
	static const char *const ops[] = { "read", "write", "flush" };
	const char *usage = "usage: fault metadata|data|NAME:cow|NAME:device|NAME:origin|"
			    "NAME:cache|NAME:metadata read|write|flush error|enospc|stall|ok "
			    "[after N] [once] | fault DEVICE OP delay USEC | "
			    "fault power-cut [tear] | fault crash-at POINT [power-cut [tear]]";
	enum tfs_fault_mode mode;
	enum tfs_fault_op op = TFS_FAULT_NR_OPS;
	uint64_t after = 0;
	bool once = false;
	int i;

	if (!c->fs->cfg.allow_faults) {
		send_error(c->fd, "fault injection is off (pool.cfg [fault] allow = yes and "
			   "thinfs mount --allow-faults turn it on)");
		return;
	}
	if (c->argc >= 2 && !strcmp(c->argv[1], "power-cut")) {
		bool tear = c->argc == 3 && !strcmp(c->argv[2], "tear");

		if (c->argc > 3 || (c->argc == 3 && !tear)) {
			send_error(c->fd, "%s", usage);
			return;
		}
		tfs_bdev_fault_power_cut(tfs_pool_bdev(c->fs->pool, false), tear, (uint32_t)time(NULL));
		tfs_bdev_fault_power_cut(tfs_pool_bdev(c->fs->pool, true), tear, (uint32_t)time(NULL));
		power_cut_caches(c->fs, tear);
		send_ok(c->fd, "", NULL, true);
		/*
		 * As if the machine lost power: no commit, no unmount, no
		 * cleanup.  What was not flushed is gone (or torn).
		 */
		tfs_warn("fault power-cut: exiting at once");
		_exit(0);
	}
	if (c->argc >= 2 && !strcmp(c->argv[1], "crash-at")) {
		fault_crash_at(c);
		return;
	}
	if (c->argc < 4) {
		send_error(c->fd, "%s", usage);
		return;
	}
	if (fault_device(c, c->argv[1], NULL) < 0) {
		send_error(c->fd, "fault: no device '%s' (metadata, data, NAME:cow of a classic "
			   "snapshot, NAME:device of an origin, or NAME:origin, NAME:cache, "
			   "NAME:metadata of a cache)", c->argv[1]);
		return;
	}
	for (i = 0; i < 3; i++)
		if (!strcmp(c->argv[2], ops[i]))
			op = (enum tfs_fault_op)i;
	if (op == TFS_FAULT_NR_OPS) {
		send_error(c->fd, "fault: no operation '%s' (read, write or flush)", c->argv[2]);
		return;
	}
	if (!strcmp(c->argv[3], "delay")) {
		uint64_t usec;

		/* A slow disk: at most an hour a request, or the mount would seem hung for good. */
		if (c->argc != 5 || parse_u64(c->argv[4], &usec) || usec > 3600ull * 1000000) {
			send_error(c->fd, "usage: fault DEVICE read|write|flush delay USEC "
				   "(0 to 3600000000 microseconds)");
			return;
		}
		fault_device(c, c->argv[1], &(struct fault_req){ .op = op, .usec = usec,
								  .delay = true });
		tfs_fs_event(c->fs, "fault", "%s %s delay %" PRIu64 " us", c->argv[1], c->argv[2],
			     usec);
		send_ok(c->fd, "", NULL, true);
		return;
	}
	if (!strcmp(c->argv[3], "error"))
		mode = TFS_FAULT_EIO;
	else if (!strcmp(c->argv[3], "enospc"))
		mode = TFS_FAULT_ENOSPC;
	else if (!strcmp(c->argv[3], "stall"))
		mode = TFS_FAULT_STALL;
	else if (!strcmp(c->argv[3], "ok"))
		mode = TFS_FAULT_OK;
	else {
		send_error(c->fd, "fault: no mode '%s' (error, enospc, stall, ok or delay USEC)",
			   c->argv[3]);
		return;
	}
	for (i = 4; i < c->argc; i++) {
		if (!strcmp(c->argv[i], "after") && i + 1 < c->argc &&
		    parse_u64(c->argv[i + 1], &after) == 0) {
			i++;
		} else if (!strcmp(c->argv[i], "once")) {
			once = true;
		} else {
			send_error(c->fd, "%s", usage);
			return;
		}
	}
	fault_device(c, c->argv[1], &(struct fault_req){ .op = op, .mode = mode, .after = after,
							  .once = once });
	tfs_fs_event(c->fs, "fault", "%s %s %s after %" PRIu64 "%s", c->argv[1], c->argv[2],
		     c->argv[3], after, once ? " once" : "");
	send_ok(c->fd, "", NULL, true);
}

/* clean --wait's progress, as the dirty count drops. */
static void cache_progress(void *arg, uint64_t dirty)
{
	struct cmd_ctx *c = arg;
	char line[64];

	snprintf(line, sizeof(line), "dirty blocks: %" PRIu64 "\n", dirty);
	send_ok(c->fd, line, NULL, false);
}

/* cache NAME mode|policy|migration_threshold|invalidate|clean ... (README "Cached origins"). */
static void cmd_cache(struct cmd_ctx *c)
{
	static const char usage[] =
		"usage: cache NAME mode writeback|writethrough|passthrough | policy smq|cleaner | "
		"migration_threshold SECTORS | invalidate CBLOCK|BEGIN-END ... | clean [--wait]";
	struct tfs_cache *cache;
	const char *what;
	char msg[512] = "", line[600];
	int r = -EINVAL;

	if (c->argc < 3) {
		send_error(c->fd, "%s", usage);
		return;
	}
	cache = tfs_fs_cache_by_name(c->fs, c->argv[1]);
	if (!cache) {
		send_error(c->fd, "cache: no cache named '%s' (a [cache] section of pool.cfg)",
			   c->argv[1]);
		return;
	}
	what = c->argv[2];
	if (!strcmp(what, "mode") && c->argc == 4) {
		enum tfs_cache_mode m;

		if (tfs_cache_mode_parse(c->argv[3], &m) == 0)
			r = tfs_cache_set_mode(cache, m, msg, sizeof(msg));
		else
			snprintf(msg, sizeof(msg), "cache: no mode '%s' (writeback, writethrough or "
				 "passthrough)", c->argv[3]);
	} else if (!strcmp(what, "policy") && c->argc == 4) {
		enum tfs_cache_policy_kind p;

		if (tfs_cache_policy_parse(c->argv[3], &p) == 0)
			r = tfs_cache_set_policy(cache, p, msg, sizeof(msg));
		else
			snprintf(msg, sizeof(msg), "cache: no policy '%s' (smq, mq or cleaner)",
				 c->argv[3]);
	} else if (!strcmp(what, "migration_threshold") && c->argc == 4) {
		uint64_t n;

		if (parse_u64(c->argv[3], &n) == 0 && n <= UINT32_MAX)
			r = tfs_cache_set_migration_threshold(cache, n, msg, sizeof(msg));
		else
			snprintf(msg, sizeof(msg), "cache: bad migration_threshold '%s' (sectors)",
				 c->argv[3]);
	} else if (!strcmp(what, "invalidate") && c->argc >= 4) {
		unsigned nr = (unsigned)c->argc - 3;
		uint64_t (*ranges)[2] = calloc(nr, sizeof(*ranges));

		for (unsigned i = 0; ranges && i < nr; i++) {
			char arg[64], *dash;

			snprintf(arg, sizeof(arg), "%s", c->argv[3 + i]);
			dash = strchr(arg, '-');
			if (dash)
				*dash = '\0';
			if (strlen(c->argv[3 + i]) >= sizeof(arg) ||
			    parse_u64(arg, &ranges[i][0]) < 0 ||
			    (dash && parse_u64(dash + 1, &ranges[i][1]) < 0)) {
				snprintf(msg, sizeof(msg), "cache: invalidate: bad block or range '%.64s' "
					 "(CBLOCK or BEGIN-END, END exclusive)", c->argv[3 + i]);
				nr = 0;
				break;
			}
			if (!dash)
				ranges[i][1] = ranges[i][0] + 1;
		}
		if (!ranges)
			snprintf(msg, sizeof(msg), "cache: out of memory");
		else if (nr)
			r = tfs_cache_invalidate(cache, (const uint64_t(*)[2])ranges, nr, msg,
						 sizeof(msg));
		free(ranges);
	} else if (!strcmp(what, "clean") && (c->argc == 3 ||
					       (c->argc == 4 && !strcmp(c->argv[3], "--wait")))) {
		r = tfs_cache_clean(cache, c->argc == 4, cache_progress, c, msg, sizeof(msg));
	} else {
		snprintf(msg, sizeof(msg), "%s", usage);
	}
	if (r < 0) {
		send_error(c->fd, "%s", msg);
		return;
	}
	tfs_fs_event(c->fs, "cache", "%s", msg);
	snprintf(line, sizeof(line), "%s\n", msg);
	send_ok(c->fd, line, NULL, true);
}

static void dispatch(struct cmd_ctx *c)
{
	const char *cmd = c->argv[0];

	if (!strcmp(cmd, "status"))
		cmd_status(c);
	else if (!strcmp(cmd, "list"))
		cmd_list(c);
	else if (!strcmp(cmd, "snapshot"))
		cmd_snapshot(c);
	else if (!strcmp(cmd, "delete"))
		cmd_delete(c);
	else if (!strcmp(cmd, "set-transaction-id"))
		cmd_set_transaction_id(c);
	else if (!strcmp(cmd, "reserve-metadata-snap"))
		cmd_metadata_snap(c, true);
	else if (!strcmp(cmd, "release-metadata-snap"))
		cmd_metadata_snap(c, false);
	else if (!strcmp(cmd, "events"))
		cmd_events(c);
	else if (!strcmp(cmd, "wait-event"))
		cmd_wait_event(c);
	else if (!strcmp(cmd, "fault"))
		cmd_fault(c);
	else if (!strcmp(cmd, "resize"))
		cmd_resize(c);
	else if (!strcmp(cmd, "merge"))
		cmd_merge(c);
	else if (!strcmp(cmd, "suspend"))
		cmd_suspend(c);
	else if (!strcmp(cmd, "resume"))
		cmd_resume(c);
	else if (!strcmp(cmd, "reload"))
		cmd_reload(c);
	else if (!strcmp(cmd, "diff"))
		cmd_diff(c);
	else if (!strcmp(cmd, "send"))
		tfs_ctl_cmd_send(c->fs, c->fd, c->argc, c->argv);
	else if (!strcmp(cmd, "receive"))
		tfs_ctl_cmd_receive(c->fs, c->fd, c->argc, c->argv);
	else if (!strcmp(cmd, "cache"))
		cmd_cache(c);
	else
		send_error(c->fd, "unknown command '%s' (status, list, snapshot, delete, resize, "
			   "merge, set-transaction-id, reserve-metadata-snap, release-metadata-snap, "
			   "events, wait-event, fault, suspend, resume, reload, diff, send, "
			   "receive, cache)", cmd);
}

/* ---- connections ---- */

/*
 * Read one request line; -errno, the length, or -E2BIG when no newline
 * came within max - 1 bytes.  The rest of an oversized line is read and
 * dropped first (up to MAX_DROPPED bytes, each read bounded by the
 * socket's receive timeout), so that a client still writing it is not cut
 * off with EPIPE before it can read why.
 */
static ssize_t read_line(int fd, char *buf, size_t max)
{
	size_t len = 0;

	while (len < max - 1) {
		ssize_t n = recv(fd, buf + len, max - 1 - len, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		len += (size_t)n;
		if (memchr(buf + len - (size_t)n, '\n', (size_t)n)) {
			buf[len] = '\0';
			return (ssize_t)len;
		}
	}
	buf[len] = '\0';
	if (len < max - 1)
		return (ssize_t)len; /* the client closed without a newline */
	for (size_t dropped = 0; dropped < MAX_DROPPED;) {
		ssize_t n = recv(fd, buf, max - 1, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0 || memchr(buf, '\n', (size_t)n))
			break;
		dropped += (size_t)n;
	}
	return -E2BIG;
}

static void serve(struct tfs_fs *fs, int fd)
{
	struct tfs_ctl_request req;
	struct cmd_ctx c = { .fs = fs, .fd = fd };
	char why[256];
	char *buf;
	ssize_t n;

	buf = malloc(TFS_CTL_MAX_REQUEST);
	if (!buf)
		return;
	n = read_line(fd, buf, TFS_CTL_MAX_REQUEST);
	if (n == -E2BIG)
		send_error(fd, "request too large: more than %d bytes (the limit of one request, "
			   "newline included)", TFS_CTL_MAX_REQUEST);
	if (n <= 0)
		goto out;
	if (tfs_ctl_parse_request(buf, &req, why, sizeof(why)) < 0) {
		send_error(fd, "%s", why);
		goto out;
	}
	c.argc = req.argc;
	c.argv = req.argv;
	dispatch(&c);
	tfs_ctl_request_free(&req);
out:
	free(buf);
}

static void *client_thread(void *arg)
{
	struct client *cl = arg;
	struct tfs_ctl_server *srv = cl->srv;

	serve(srv->fs, cl->fd);
	pthread_mutex_lock(&srv->lock);
	srv->clients[cl->slot] = -1;
	close(cl->fd);
	srv->nclients--;
	pthread_cond_broadcast(&srv->idle);
	pthread_mutex_unlock(&srv->lock);
	free(cl);
	return NULL;
}

static bool peer_allowed(struct tfs_fs *fs, int fd, uid_t *uid)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return false;
	*uid = cred.uid;
	return cred.uid == 0 || cred.uid == fs->owner_uid;
}

static void accept_one(struct tfs_ctl_server *srv)
{
	struct timeval tv = { .tv_sec = CLIENT_TIMEOUT_S };
	struct client *cl;
	pthread_attr_t attr;
	pthread_t t;
	uid_t uid = (uid_t)-1;
	int fd, slot = -1;

	fd = accept4(srv->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		return;
	if (!peer_allowed(srv->fs, fd, &uid)) {
		send_error(fd, "permission denied: only root or the mount's owner (uid %u) may "
			   "control this pool (you are uid %d)", (unsigned)srv->fs->owner_uid,
			   (int)uid);
		close(fd);
		return;
	}
	/* A client that never sends its request does not hold a thread forever. */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

	pthread_mutex_lock(&srv->lock);
	for (int i = 0; i < MAX_CLIENTS; i++) {
		if (srv->clients[i] < 0) {
			slot = i;
			break;
		}
	}
	if (slot >= 0) {
		srv->clients[slot] = fd;
		srv->nclients++;
	}
	pthread_mutex_unlock(&srv->lock);
	if (slot < 0) {
		send_error(fd, "too many control clients: try again");
		close(fd);
		return;
	}

	cl = malloc(sizeof(*cl));
	if (cl) {
		cl->srv = srv;
		cl->fd = fd;
		cl->slot = slot;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &attr, client_thread, cl) == 0) {
			pthread_attr_destroy(&attr);
			return;
		}
		pthread_attr_destroy(&attr);
		free(cl);
	}
	send_error(fd, "daemon out of resources");
	pthread_mutex_lock(&srv->lock);
	srv->clients[slot] = -1;
	srv->nclients--;
	close(fd);
	pthread_mutex_unlock(&srv->lock);
}

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *accept_thread(void *arg)
{
	struct tfs_ctl_server *srv = arg;
	int64_t next_tick = mono_ms() + 1000;

	for (;;) {
		struct pollfd p[2] = {
			{ .fd = srv->listen_fd, .events = POLLIN },
			{ .fd = srv->stop_pipe[0], .events = POLLIN },
		};
		int64_t now = mono_ms();
		int n;

		if (now >= next_tick) {
			/*
			 * A signal ends the FUSE loop, which then joins its
			 * workers: writes held for data space must give up or
			 * the daemon never exits.
			 */
			if (srv->fs->se && fuse_session_exited(srv->fs->se)) {
				tfs_pool_stop_holding(srv->fs->pool);
				if (srv->fs->cow)
					tfs_cow_set_stop_holding(srv->fs->cow);
			}
			tfs_fs_tick(srv->fs);
			next_tick = now + 1000;
		}
		n = poll(p, 2, (int)(next_tick - now > 0 ? next_tick - now : 0));
		if (n < 0 && errno != EINTR)
			break;
		if (n <= 0)
			continue;
		if (p[1].revents)
			break;
		if (p[0].revents & POLLIN)
			accept_one(srv);
	}
	return NULL;
}

/* Replace a stale socket; refuse one a live daemon answers on. */
static int claim_path(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, r;

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	close(fd);
	if (r == 0)
		return -EADDRINUSE;
	if (unlink(path) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

/* Create, bind and listen on srv->path; -errno (logged). */
static int open_socket(struct tfs_ctl_server *srv)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int r;

	if (mkdir(TFS_CTL_DIR, 0755) < 0 && errno != EEXIST) {
		r = -errno;
		tfs_log(r == -EACCES && getuid() ? TFS_LOG_WARN : TFS_LOG_ERR,
			"control socket: cannot create %s: %s", TFS_CTL_DIR, strerror(-r));
		return r;
	}
	r = claim_path(srv->path);
	if (r < 0) {
		if (r == -EADDRINUSE)
			tfs_err("control socket %s is served by another daemon: is %s mounted "
				"already?", srv->path, srv->fs->mountpoint);
		else
			tfs_log(r == -EACCES && getuid() ? TFS_LOG_WARN : TFS_LOG_ERR,
				"control socket %s: %s", srv->path, strerror(-r));
		return r;
	}
	srv->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (srv->listen_fd < 0)
		return -errno;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", srv->path);
	if (bind(srv->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = -errno;
		tfs_log(r == -EACCES && getuid() ? TFS_LOG_WARN : TFS_LOG_ERR,
			"control socket %s: %s", srv->path, strerror(-r));
		goto err_close;
	}
	if (chmod(srv->path, 0600) < 0 || listen(srv->listen_fd, 16) < 0) {
		r = -errno;
		tfs_err("control socket %s: %s", srv->path, strerror(-r));
		unlink(srv->path);
		goto err_close;
	}
	return 0;

err_close:
	close(srv->listen_fd);
	srv->listen_fd = -1;
	return r;
}

int tfs_ctl_server_start(struct tfs_fs *fs, struct tfs_ctl_server **out)
{
	struct tfs_ctl_server *srv;
	int r;

	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	srv->fs = fs;
	srv->listen_fd = -1;
	srv->stop_pipe[0] = srv->stop_pipe[1] = -1;
	for (int i = 0; i < MAX_CLIENTS; i++)
		srv->clients[i] = -1;
	pthread_mutex_init(&srv->lock, NULL);
	pthread_cond_init(&srv->idle, NULL);

	r = tfs_ctl_socket_path(fs->mountpoint, srv->path, sizeof(srv->path));
	if (r < 0) {
		tfs_err("control socket: %s: %s", fs->mountpoint, strerror(-r));
		goto err_free;
	}
	r = open_socket(srv);
	if (r == -EACCES && getuid() != 0) {
		/*
		 * An unprivileged mount cannot write /run/thinfs: the pool still
		 * works (and the housekeeping thread still runs), only
		 * thinfs-ctl cannot reach it.
		 */
		tfs_warn("no control socket for %s: thinfs-ctl will not reach this mount",
			 fs->mountpoint);
		srv->path[0] = '\0';
	} else if (r < 0) {
		goto err_free;
	}
	if (pipe2(srv->stop_pipe, O_CLOEXEC) < 0) {
		r = -errno;
		goto err_close;
	}
	r = -pthread_create(&srv->thread, NULL, accept_thread, srv);
	if (r < 0)
		goto err_pipe;
	*out = srv;
	return 0;

err_pipe:
	close(srv->stop_pipe[0]);
	close(srv->stop_pipe[1]);
err_close:
	if (srv->listen_fd >= 0) {
		unlink(srv->path);
		close(srv->listen_fd);
	}
err_free:
	pthread_cond_destroy(&srv->idle);
	pthread_mutex_destroy(&srv->lock);
	free(srv);
	return r;
}

void tfs_ctl_server_stop(struct tfs_ctl_server *srv)
{
	struct tfs_fs *fs;
	ssize_t w;

	if (!srv)
		return;
	fs = srv->fs;
	do
		w = write(srv->stop_pipe[1], "x", 1);
	while (w < 0 && errno == EINTR);
	pthread_join(srv->thread, NULL);

	/* Wake waiters (wait-event, events --follow) and cut slow clients short. */
	pthread_mutex_lock(&fs->event_lock);
	fs->stopping = true;
	pthread_cond_broadcast(&fs->event_cond);
	pthread_mutex_unlock(&fs->event_lock);
	pthread_mutex_lock(&srv->lock);
	for (int i = 0; i < MAX_CLIENTS; i++)
		if (srv->clients[i] >= 0)
			shutdown(srv->clients[i], SHUT_RD);
	while (srv->nclients > 0)
		pthread_cond_wait(&srv->idle, &srv->lock);
	pthread_mutex_unlock(&srv->lock);

	if (srv->listen_fd >= 0) {
		unlink(srv->path);
		close(srv->listen_fd);
	}
	close(srv->stop_pipe[0]);
	close(srv->stop_pipe[1]);
	pthread_cond_destroy(&srv->idle);
	pthread_mutex_destroy(&srv->lock);
	free(srv);
}

/* ---- for the commands of other files (ctl-internal.h) ---- */

int tfs_ctl_send_line(int fd, struct json_object *o)
{
	return send_line(fd, o);
}

int tfs_ctl_send_ok(int fd, const char *text, struct json_object *json, bool done)
{
	return send_ok(fd, text, json, done);
}

int tfs_ctl_send_error(int fd, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return send_error(fd, "%s", msg);
}

bool tfs_ctl_client_alive(int fd)
{
	return client_alive(fd);
}

ssize_t tfs_ctl_read_line(int fd, char *buf, size_t max)
{
	return read_line(fd, buf, max);
}
