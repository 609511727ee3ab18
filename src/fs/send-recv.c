/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-recv.c - the daemon's half of `thinfs-ctl send` and `receive`
 * (docs/send-receive.md).
 *
 * For send, the daemon writes the stream itself into the client's
 * descriptor (send-data.c) when the client asks (--stream) and may read
 * TO; otherwise, and for receive, thinfs-ctl moves the bytes itself,
 * through the mountpoint, with the extents of `diff`.  The daemon says
 * what to read or where to write,
 * keeps each volume's identity (the catalog's volume_uuids), and makes
 * the temporary volumes both commands need whole-or-gone: a temporary
 * name is recorded in the catalog before its volume exists, the volume
 * lives as long as the client's connection, and it is deleted when the
 * client leaves without committing, or at the next mount after a crash
 * (tfs_fs_settle_temp_names).
 *
 * Never: writes volume data (receive's client does, through FUSE).
 */
#include <errno.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl-internal.h"
#include "ctl-protocol.h"
#include "fs.h"
#include "fuse-ops.h"
#include "log.h"
#include "send-stream.h"

static int random_bytes(void *buf, size_t len)
{
	ssize_t n = getrandom(buf, len, 0);

	return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

/*
 * A volume's identity, made and stored at its first send.  A read-only
 * mount cannot store one: the stream then gets a one-off identity that no
 * later incremental can name as its base.
 */
static int identity(struct tfs_fs *fs, uint32_t dev_id, uint8_t u[16])
{
	int r = tfs_catalog_get_uuid(fs->cat, dev_id, u);

	if (r != -ENOENT)
		return r;
	r = random_bytes(u, 16);
	if (r == 0 && !fs->read_only)
		r = tfs_catalog_set_uuid(fs->cat, dev_id, u);
	return r;
}

/* ".send.<16 hex digits>" or ".receive.<...>": hidden from ls, never a user's name. */
static int temp_name(const char *what, char *out, size_t len)
{
	uint8_t b[8];
	int r = random_bytes(b, sizeof(b));

	if (r < 0)
		return r;
	snprintf(out, len, ".%s.%02x%02x%02x%02x%02x%02x%02x%02x", what, b[0], b[1], b[2], b[3],
		 b[4], b[5], b[6], b[7]);
	return 0;
}

/* The kernel may hold the name in its dentry cache. */
static void forget_name(struct tfs_fs *fs, const char *name)
{
	if (fs->se)
		fuse_lowlevel_notify_inval_entry(fs->se, TFS_INO_ROOT, name, strlen(name));
}

/* Delete a temporary volume if it is still there, then its record. */
static void drop_temp(struct tfs_fs *fs, const char *name)
{
	struct tfs_vol_row row;
	int r = 0;

	if (tfs_fs_get_volume(fs, name, &row) == 0) {
		r = tfs_fs_unlink_volume(fs, name);
		forget_name(fs, name);
	}
	if (r < 0 && r != -ENOENT) {
		/* Kept on record: the next mount deletes it. */
		tfs_warn("temporary volume %s: %s: deleted at the next mount", name, strerror(-r));
		return;
	}
	tfs_catalog_remove_temp_name(fs->cat, name);
}

/*
 * Wait for the client's next request line; true when it is the command
 * want.  False when it hung up or sent anything else (the daemon's stop
 * shuts the socket, which ends the wait too).
 */
static bool wait_for(int fd, const char *want)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct tfs_ctl_request req;
	char line[256], why[128];
	bool ok = false;
	ssize_t n;

	while (poll(&p, 1, -1) < 0)
		if (errno != EINTR)
			return false;
	n = tfs_ctl_read_line(fd, line, sizeof(line));
	if (n <= 0 || tfs_ctl_parse_request(line, &req, why, sizeof(why)) < 0)
		return false;
	ok = !strcmp(req.argv[0], want);
	tfs_ctl_request_free(&req);
	return ok;
}

static const char *why(struct tfs_fs *fs, int r)
{
	return r == -EBUSY && tfs_pool_is_suspended(fs->pool) ? "the pool is suspended" :
	       strerror(-r);
}

static int find(struct tfs_fs *fs, int fd, const char *cmd, const char *spec,
		struct tfs_vol_row *row)
{
	if (tfs_fs_find_volume(fs, spec, row) == 0)
		return 0;
	tfs_ctl_send_error(fd, "%s: no volume named '%s' (a volume or GROUP/NAME)", cmd, spec);
	return -1;
}

/*
 * Whether the client may read TO, as the kernel would judge its file
 * (default_permissions) from the client's uid and primary gid.  Without
 * its other groups this may say no where the kernel says yes: the client
 * then reads through the mount, where the kernel decides.
 */
static bool may_read(int fd, const struct tfs_vol_row *row)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return false;
	if (cred.uid == 0)
		return true;
	if (cred.uid == row->uid)
		return row->mode & 0400;
	if (cred.gid == row->gid)
		return row->mode & 0040;
	return row->mode & 0004;
}

/* The descriptor the client passes after our answer, or -errno. */
static int receive_fd(int fd)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(int))];
	} u;
	struct cmsghdr *c;
	char byte;
	struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
			    .msg_controllen = sizeof(u.b) };
	int out = -1;
	ssize_t n;

	do
		n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
		    c->cmsg_len == CMSG_LEN(sizeof(int)) && out < 0)
			memcpy(&out, CMSG_DATA(c), sizeof(int));
	}
	if (n != 1 || out < 0 || (m.msg_flags & MSG_CTRUNC)) {
		if (out >= 0)
			close(out);
		return -EPROTO;
	}
	return out;
}

/*
 * The daemon writes the stream: ask for the descriptor, write.  from may
 * be NULL.  0 and *stats, or -errno and why (empty: the client left).
 */
static int send_stream(struct tfs_fs *fs, int fd, bool progress, unsigned version,
		       const struct tfs_vol_row *from, const struct tfs_vol_row *to,
		       const uint8_t *fu, const uint8_t *tu, struct tfs_fs_send_stats *stats,
		       char *why, size_t why_len)
{
	struct json_object *o = json_object_new_object();
	int out, r;

	why[0] = '\0';
	json_object_object_add(o, "stream", json_object_new_boolean(1));
	tfs_ctl_send_ok(fd, "", o, false);
	out = receive_fd(fd);
	if (out < 0) {
		snprintf(why, why_len, "send: the client did not pass the stream's descriptor: %s",
			 strerror(-out));
		return out;
	}
	r = tfs_fs_send_data(fs, &(struct tfs_fs_send){ .sock = fd, .out = out,
		.progress = progress, .from = from, .to = to, .from_id = fu, .to_id = tu,
		.version = version, .stats = stats }, why, why_len);
	if (r == -ECONNRESET || r == -ECANCELED)
		why[0] = '\0';
	return r;
}

/* ---- diff --send-order: the stream's records for the path through the mount ---- */

static int order_going(void *ctx, uint64_t vblock)
{
	(void)vblock;
	return !tfs_ctl_client_alive(*(int *)ctx);
}

/* A batch of records as diff lines ("OFFSET LENGTH data|zero"), one each. */
static int order_emit(void *ctx, const struct tfs_stream_chunks *batch)
{
	int fd = *(int *)ctx, r;
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return -ENOMEM;
	for (size_t i = 0; i < batch->nr; i++)
		fprintf(f, "%" PRIu64 " %" PRIu64 " %s\n", batch->v[i].off, batch->v[i].len,
			batch->v[i].zero ? "zero" : "data");
	fclose(f);
	r = buf ? tfs_ctl_send_ok(fd, buf, NULL, false) : -ENOMEM;
	free(buf);
	return r < 0 ? r : 0;
}

void tfs_ctl_cmd_send_order(struct tfs_fs *fs, int fd, const char *from, const char *to,
			    const char *version)
{
	unsigned v = tfs_stream_version_parse(version);
	struct tfs_vol_row frow, trow;
	char why[320];
	int r;

	if (!v) {
		tfs_ctl_send_error(fd, "diff: --send-order takes a stream version, 1 or 2");
		return;
	}
	if (find(fs, fd, "diff", to, &trow) < 0 ||
	    (strcmp(from, "-") && find(fs, fd, "diff", from, &frow) < 0))
		return;
	if (trow.dev_id >= TFS_DEV_ID_OTHER || (strcmp(from, "-") && frow.dev_id >= TFS_DEV_ID_OTHER)) {
		tfs_ctl_send_error(fd, "diff: --send-order is for thin volumes only");
		return;
	}
	r = tfs_fs_send_plan(fs, strcmp(from, "-") ? &frow : NULL, &trow, v,
			     order_emit, order_going, &fd, why, sizeof(why));
	if (r == -EINTR || r == -EPIPE || r == -ECONNRESET)
		return; /* the client left */
	if (r)
		tfs_ctl_send_error(fd, "%s", why);
	else
		tfs_ctl_send_ok(fd, "", NULL, true);
}

/*
 * send [--from FROM] TO: what to read.  A group member is read as it is;
 * any other volume may be written meanwhile, so it is read from a
 * temporary snapshot (with an identity of its own) that lives until the
 * client says "end" or leaves.
 */
void tfs_ctl_cmd_send(struct tfs_fs *fs, int fd, int argc, const char **argv)
{
	static const char usage[] = "usage: send [--from FROM] [--stream [--progress] "
				    "[--stream-version 1|2]] TO (volumes or GROUP/NAME)";
	const char *from = NULL, *to = NULL;
	bool stream = false, progress = false;
	unsigned version = TFS_STREAM_VERSION;
	struct tfs_vol_row frow, trow;
	struct tfs_group_row g;
	struct json_object *o;
	uint8_t fu[16], tu[16];
	char hex[TFS_CTL_ID_HEX], path[2 * TFS_NAME_MAX + 32], temp[64] = "";
	int r;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--from") && i + 1 < argc && !from) {
			from = argv[++i];
		} else if (!strcmp(argv[i], "--stream")) {
			stream = true;
		} else if (!strcmp(argv[i], "--progress")) {
			progress = true;
		} else if (!strcmp(argv[i], "--stream-version") && i + 1 < argc &&
			   tfs_stream_version_parse(argv[i + 1])) {
			version = tfs_stream_version_parse(argv[++i]);
		} else if (argv[i][0] == '-' || to) {
			tfs_ctl_send_error(fd, usage);
			return;
		} else {
			to = argv[i];
		}
	}
	if (!to) {
		tfs_ctl_send_error(fd, usage);
		return;
	}
	if (find(fs, fd, "send", to, &trow) < 0 || (from && find(fs, fd, "send", from, &frow) < 0))
		return;
	if (from && frow.dev_id == trow.dev_id) {
		tfs_ctl_send_error(fd, "send: FROM and TO are the same volume");
		return;
	}
	if (from && (r = identity(fs, frow.dev_id, fu)) < 0)
		goto fail;

	if (trow.kind == TFS_VOL_GROUP_MEMBER) {
		r = tfs_fs_group_by_id(fs, trow.group_id, &g);
		if (r < 0)
			goto fail;
		snprintf(path, sizeof(path), "%s/%s/%s", TFS_SNAPSHOTS_NAME, g.name, trow.name);
		r = identity(fs, trow.dev_id, tu);
	} else if (fs->read_only) {
		/* Nothing changes on a read-only mount: read the volume itself. */
		snprintf(path, sizeof(path), "%s", trow.name);
		r = identity(fs, trow.dev_id, tu);
	} else {
		r = temp_name("send", temp, sizeof(temp));
		if (r == 0)
			r = tfs_catalog_add_temp_name(fs->cat, temp);
		if (r < 0)
			goto fail;
		r = tfs_fs_snapshot_volume(fs, to, temp);
		if (r == 0)
			r = tfs_fs_get_volume(fs, temp, &trow);
		if (r == 0)
			r = random_bytes(tu, 16);
		if (r == 0)
			r = tfs_catalog_set_uuid(fs->cat, trow.dev_id, tu);
		if (r < 0) {
			drop_temp(fs, temp);
			goto fail;
		}
		snprintf(path, sizeof(path), "%s", temp);
	}
	if (r < 0)
		goto fail;

	/*
	 * The daemon reads thin devices only; any other send goes the old way
	 * and fails at the diff, as it always did.
	 */
	if (stream && trow.dev_id < TFS_DEV_ID_OTHER && (!from || frow.dev_id < TFS_DEV_ID_OTHER) &&
	    may_read(fd, &trow)) {
		struct tfs_fs_send_stats stats = { 0 };
		char msg[320];

		r = send_stream(fs, fd, progress, version, from ? &frow : NULL, &trow,
				from ? fu : NULL, tu, &stats, msg, sizeof(msg));
		/* Gone before the answer, as after "end" below. */
		if (temp[0])
			drop_temp(fs, temp);
		if (r && msg[0]) {
			tfs_ctl_send_error(fd, "%s", msg);
		} else if (!r) {
			o = json_object_new_object();
			json_object_object_add(o, "data", json_object_new_uint64(stats.data));
			json_object_object_add(o, "bytes", json_object_new_uint64(stats.bytes));
			tfs_ctl_send_ok(fd, "", o, true);
		}
		return;
	}

	o = json_object_new_object();
	json_object_object_add(o, "path", json_object_new_string(path));
	/* What thinfs-ctl names in its diff request: TO, or the snapshot of it. */
	json_object_object_add(o, "diff_to", json_object_new_string(temp[0] ? temp : to));
	json_object_object_add(o, "size", json_object_new_uint64(trow.size));
	json_object_object_add(o, "block_size", json_object_new_uint64(fs->block_size));
	if (from) {
		tfs_ctl_id_format(fu, hex);
		json_object_object_add(o, "from", json_object_new_string(hex));
	}
	tfs_ctl_id_format(tu, hex);
	json_object_object_add(o, "to", json_object_new_string(hex));
	json_object_object_add(o, "hold", json_object_new_boolean(temp[0] != 0));
	tfs_ctl_send_ok(fd, "", o, !temp[0]);
	if (!temp[0])
		return;
	wait_for(fd, "end");
	drop_temp(fs, temp);
	tfs_ctl_send_ok(fd, "", NULL, true);
	return;

fail:
	tfs_ctl_send_error(fd, "send %s: %s", to, why(fs, r));
}

/*
 * receive NAME [--base BASE] --stream-from HEX|- --stream-to HEX: where to
 * write.  The volume is made under a temporary name (a snapshot of BASE,
 * or made by the client through the mount), and becomes NAME only when
 * the client, having checked the whole stream and fsynced, says "commit".
 */
void tfs_ctl_cmd_receive(struct tfs_fs *fs, int fd, int argc, const char **argv)
{
	static const char usage[] = "usage: receive NAME [--base BASE] (thinfs-ctl sends the "
				    "stream's identities)";
	const char *name = NULL, *base = NULL, *sfrom = NULL, *sto = NULL, *bad;
	struct tfs_vol_row row;
	struct json_object *o;
	uint8_t fu[16], tu[16], bu[16];
	char temp[64], hex[TFS_CTL_ID_HEX];
	int r;

	for (int i = 1; i < argc; i++) {
		const char **opt = !strcmp(argv[i], "--base") ? &base :
				   !strcmp(argv[i], "--stream-from") ? &sfrom :
				   !strcmp(argv[i], "--stream-to") ? &sto : NULL;

		if (opt && i + 1 < argc && !*opt) {
			*opt = argv[++i];
		} else if (opt || argv[i][0] == '-' || name) {
			tfs_ctl_send_error(fd, usage);
			return;
		} else {
			name = argv[i];
		}
	}
	if (!name || !sfrom || !sto || tfs_ctl_id_parse(sto, tu) < 0 ||
	    (strcmp(sfrom, "-") && tfs_ctl_id_parse(sfrom, fu) < 0)) {
		tfs_ctl_send_error(fd, usage);
		return;
	}
	if ((bad = tfs_catalog_name_error(name)) != NULL) {
		tfs_ctl_send_error(fd, "receive: bad name: %s", bad);
		return;
	}
	if (!strcmp(name, TFS_SNAPSHOTS_NAME) || tfs_fs_get_volume(fs, name, &row) == 0) {
		tfs_ctl_send_error(fd, "receive: a volume named '%s' exists already", name);
		return;
	}
	if (fs->read_only) {
		tfs_ctl_send_error(fd, "receive: the pool is mounted read-only");
		return;
	}
	if (strcmp(sfrom, "-") && !base) {
		tfs_ctl_send_error(fd, "receive: the stream is incremental (made from %s): "
				   "name the volume received from that with --base", sfrom);
		return;
	}
	if (!strcmp(sfrom, "-") && base) {
		tfs_ctl_send_error(fd, "receive: the stream is a full one: --base is for "
				   "incremental streams only");
		return;
	}
	if (base) {
		if (find(fs, fd, "receive", base, &row) < 0)
			return;
		r = tfs_catalog_get_uuid(fs->cat, row.dev_id, bu);
		if (r == -ENOENT || (r == 0 && memcmp(bu, fu, 16))) {
			if (r == 0)
				tfs_ctl_id_format(bu, hex);
			tfs_ctl_send_error(fd, "receive: '%s' is not the stream's base: the "
					   "stream was made from %s, '%s' is %s", base, sfrom, base,
					   r == 0 ? hex : "not a volume any stream was made from");
			return;
		}
		if (r < 0)
			goto fail;
	}

	r = temp_name("receive", temp, sizeof(temp));
	if (r == 0)
		r = tfs_catalog_add_temp_name(fs->cat, temp);
	if (r < 0)
		goto fail;
	if (base && (r = tfs_fs_snapshot_volume(fs, base, temp)) < 0) {
		drop_temp(fs, temp);
		goto fail;
	}
	o = json_object_new_object();
	json_object_object_add(o, "path", json_object_new_string(temp));
	tfs_ctl_send_ok(fd, "", o, false);

	if (!wait_for(fd, "commit")) {
		drop_temp(fs, temp);
		tfs_ctl_send_error(fd, "receive %s: abandoned: nothing was made", name);
		return;
	}
	r = tfs_fs_get_volume(fs, temp, &row);
	if (r == 0)
		r = tfs_catalog_set_uuid(fs->cat, row.dev_id, tu);
	if (r == 0)
		r = tfs_fs_rename_volume(fs, temp, name, 1u /* RENAME_NOREPLACE */);
	if (r < 0) {
		drop_temp(fs, temp);
		tfs_ctl_send_error(fd, "receive %s: %s: nothing was made", name,
				   r == -EEXIST ? "a volume of that name was made meanwhile" :
				   why(fs, r));
		return;
	}
	forget_name(fs, temp);
	forget_name(fs, name);
	tfs_catalog_remove_temp_name(fs->cat, temp);
	tfs_fs_event(fs, "receive", "volume %s (device %" PRIu32 ") received%s%s", name,
		     row.dev_id, base ? " on " : "", base ? base : "");
	tfs_ctl_send_ok(fd, "", NULL, true);
	return;

fail:
	tfs_ctl_send_error(fd, "receive %s: %s", name, why(fs, r));
}

/* ---- at mount ---- */

static int settle_one(void *ctx, const char *name)
{
	struct tfs_fs *fs = ctx;
	struct tfs_vol_row row;
	int r = 0;

	if (tfs_catalog_get_by_name(fs->cat, name, &row) == 0) {
		r = tfs_pool_delete(fs->pool, row.dev_id);
		if (r == 0 || r == -ENODATA)
			r = tfs_catalog_remove_volume(fs->cat, row.dev_id);
		if (r < 0) {
			tfs_warn("temporary volume %s: cannot delete it: %s", name, strerror(-r));
			return 0;
		}
		tfs_fs_event(fs, "delete", "volume %s: left by a send or receive cut short before "
			     "this mount: deleted", name);
	}
	tfs_catalog_remove_temp_name(fs->cat, name);
	return 0;
}

int tfs_fs_settle_temp_names(struct tfs_fs *fs)
{
	if (fs->read_only)
		return 0;
	return tfs_catalog_list_temp_names(fs->cat, settle_one, fs);
}
