/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * ctl-internal.h - what ctl-server.c lends the commands kept in files of
 * their own (send-recv.c): the response lines of ctl-protocol.h and the
 * reading of a client's further request lines.
 *
 * Never: used outside src/fs.  Each call blocks on the client's socket
 * only; -errno from send/recv.
 */
#ifndef TFS_FS_CTL_INTERNAL_H
#define TFS_FS_CTL_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct json_object;
struct tfs_fs;
struct tfs_vol_row;

/* One response object as one line. */
int tfs_ctl_send_line(int fd, struct json_object *o);
/* {"ok":true,"output":text,"json":json,"done":done}; takes json's reference. */
int tfs_ctl_send_ok(int fd, const char *text, struct json_object *json, bool done);
/* {"ok":false,"error":...,"done":true} */
int tfs_ctl_send_error(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* False once the client hung up. */
bool tfs_ctl_client_alive(int fd);
/* One request line into buf (NUL-terminated): its length, 0 at EOF, -errno, -E2BIG. */
ssize_t tfs_ctl_read_line(int fd, char *buf, size_t max);

/* send-recv.c: the daemon's half of thinfs-ctl send and receive. */
void tfs_ctl_cmd_send(struct tfs_fs *fs, int fd, int argc, const char **argv);
void tfs_ctl_cmd_receive(struct tfs_fs *fs, int fd, int argc, const char **argv);
/*
 * diff --send-order VERSION FROM TO: the records of send's stream of that
 * version, in its order, as diff lines, for thinfs-ctl's send through the
 * mount (so that it writes the daemon's bytes).  FROM may be "-".
 */
void tfs_ctl_cmd_send_order(struct tfs_fs *fs, int fd, const char *from, const char *to,
			    const char *version);

/*
 * send-data.c: the daemon writes the stream of a send into the client's
 * descriptor out (taken: closed when done), TO read from the data device
 * (docs/send-receive.md).  TO is pinned for the whole send
 * (tfs_fs_hold_volume); the diff FROM -> TO is the daemon's own.  With
 * progress, a progress line ({"progress": "send", "json": {"done",
 * "total"}}) goes to sock every half second and at the end.  Blocks until
 * the stream is out.  0 and *stats; -ECONNRESET the client left (nothing
 * to say); any other -errno with why set to the client's one-line error.
 */
struct tfs_fs_send_stats {
	uint64_t data;       /* bytes of DATA records */
	uint64_t bytes;      /* of the whole stream */
	uint64_t nodes_read; /* by the diff */
};
struct tfs_fs_send {
	int sock, out;
	bool progress;
	const struct tfs_vol_row *from, *to; /* from NULL: a full stream */
	const uint8_t *from_id, *to_id;      /* identities, 16 bytes each */
	unsigned version;                    /* of the stream; 0: TFS_STREAM_VERSION */
	struct tfs_fs_send_stats *stats;
};
int tfs_fs_send_data(struct tfs_fs *fs, const struct tfs_fs_send *s, char *why, size_t why_len);

/*
 * send-data.c: the records of the stream tfs_fs_send_data would write
 * (FROM -> TO, version 1 or 2), in its order, for thinfs-ctl's path
 * through the mount ("diff --send-order"): emit(ctx, batch) for each
 * batch, in order; going(ctx, vblock) non-zero stops the diff (-EINTR).
 * TO is pinned meanwhile.  0, emit's or going's failure, or -errno with
 * why set.
 */
struct tfs_stream_chunks;
int tfs_fs_send_plan(struct tfs_fs *fs, const struct tfs_vol_row *from,
		     const struct tfs_vol_row *to, unsigned version,
		     int (*emit)(void *ctx, const struct tfs_stream_chunks *batch),
		     int (*going)(void *ctx, uint64_t vblock), void *ctx, char *why, size_t why_len);

#endif
