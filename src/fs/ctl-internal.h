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
#include <sys/types.h>

struct json_object;
struct tfs_fs;

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

#endif
