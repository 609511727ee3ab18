/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * ctl-protocol.h - how thinfs-ctl finds and talks to a mounted pool.
 *
 * Owns: the control socket's location and framing, shared by the daemon
 * (src/fs) and the thinfs-ctl client (tools/).
 *
 * Location: /run/thinfs/<16 hex digits>.sock, the digits being the FNV-1a
 * 64-bit hash of the mountpoint's canonical path (realpath), so any path
 * naming the mountpoint finds it and sun_path never overflows.  The socket
 * is mode 0600, owned by the mount's owner; the daemon also checks
 * SO_PEERCRED (root or the owner).
 *
 * Framing: one JSON object per line each way.  Request:
 *   {"cmd": "status", "args": ["--json"]}           (argv after MOUNTPOINT)
 * Response, possibly several lines for streaming commands (events --follow),
 * the last one carrying "done": true:
 *   {"ok": true, "output": "text for the terminal", "json": {...}, "done": true}
 *   {"ok": false, "error": "one clear line", "done": true}
 * Added: a line may carry "progress" (a long command's state, printed by
 * thinfs-ctl on stderr when that is a terminal, each over the last) or
 * "note" (a remark printed on stderr, so stdout keeps only the result).
 * thinfs-ctl prints "output" (or "json" with --json) and exits 0, or prints
 * "thinfs-ctl: <error>" to stderr and exits 1.  An error may come with
 *   "details": ["one line", ...]    (a reload's configuration problems)
 * each printed as a "thinfs-ctl: " line of its own after the error.
 * A request longer than TFS_CTL_MAX_REQUEST or with more than
 * TFS_CTL_MAX_ARGS args is refused naming the limit (by thinfs-ctl before
 * it sends, by the daemon for any other client).
 */
#ifndef TFS_FS_CTL_PROTOCOL_H
#define TFS_FS_CTL_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#define TFS_CTL_DIR "/run/thinfs"
/* Limits of one request: its line in bytes (newline included), and its args. */
#define TFS_CTL_MAX_REQUEST 65536
#define TFS_CTL_MAX_ARGS 4096

struct json_object;

/* Socket path for a mountpoint (must exist); -errno from realpath, -ENAMETOOLONG. */
int tfs_ctl_socket_path(const char *mountpoint, char *out, size_t out_len);

/*
 * A request as the daemon received it: argv[0] the command, then its
 * arguments, argv[argc] NULL.  The strings belong to json.
 */
struct tfs_ctl_request {
	struct json_object *json;
	const char **argv;
	int argc;
};

/*
 * Parse one request line (NUL-terminated, any bytes).  0 and *req filled
 * (release it with tfs_ctl_request_free); -EINVAL when the line is not a
 * request, -ENOMEM; after a failure why holds a one-line answer for the
 * client (cut to why_len) and *req is empty.  O(length of the line); logs
 * nothing.
 */
int tfs_ctl_parse_request(const char *line, struct tfs_ctl_request *req, char *why,
			  size_t why_len);

/* Free what a successful parse holds; an empty request is fine. */
void tfs_ctl_request_free(struct tfs_ctl_request *req);

/*
 * A volume's identity (send/receive, docs/send-receive.md) travels in
 * requests and responses as 32 lower-case hex digits.  parse: -EINVAL
 * unless s is exactly that (either case).
 */
#define TFS_CTL_ID_HEX 33 /* the digits and the NUL */
int tfs_ctl_id_parse(const char *s, uint8_t id[16]);
void tfs_ctl_id_format(const uint8_t id[16], char out[TFS_CTL_ID_HEX]);

#endif
