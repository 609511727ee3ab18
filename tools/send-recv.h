/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-recv.h - thinfs-ctl send and receive: a volume (or the change
 * between two) as a stream on stdout, and a stream on stdin made into a
 * new volume.  The stream format is docs/send-receive.md; its bytes are
 * src/fs/send-stream.h's, shared with the daemon.
 *
 * Owns: checking a stream (receive) and the data paths of the client:
 * send asks the daemon to write the stream into its stdout (passed over
 * the socket) and, when the daemon cannot, reads the volume file through
 * the mountpoint with the extents of the daemon's diff; receive writes
 * the volume file.  The daemon's half is src/fs/send-recv.c.
 *
 * Never: talks to the pool except through the control socket and the
 * mount.
 */
#ifndef TFS_TOOLS_SEND_RECV_H
#define TFS_TOOLS_SEND_RECV_H

#include <stdint.h>

#include "send-stream.h"

/* "thinfs-ctl: <message>" on one stderr line, as every failure is reported; returns 1. */
int tfs_ctlc_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Connect to the daemon of the pool mounted at mountpoint (thinfs-ctl.c);
 * the socket, or -1 after printing why.
 */
int tfs_ctlc_connect(const char *mountpoint);

/* thinfs-ctl MNT send [--from FROM] TO; argv[0] is "send".  The exit status. */
int tfs_ctlc_send(const char *mountpoint, int argc, char **argv);
/* thinfs-ctl MNT receive NAME [--base BASE]; argv[0] is "receive".  The exit status. */
int tfs_ctlc_receive(const char *mountpoint, int argc, char **argv);

#endif
