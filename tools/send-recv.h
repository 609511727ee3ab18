/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-recv.h - thinfs-ctl send and receive: a volume (or the change
 * between two) as a stream on stdout, and a stream on stdin made into a
 * new volume.  The stream format is docs/send-receive.md; the layout
 * below is that document's, field for field.
 *
 * Owns: the stream format (writing and checking it) and the data path:
 * thinfs-ctl reads and writes the volume files through the mountpoint,
 * with the extents the daemon's diff gives.  The daemon's half is
 * src/fs/send-recv.c.
 *
 * Never: talks to the pool except through the control socket and the
 * mount.
 */
#ifndef TFS_TOOLS_SEND_RECV_H
#define TFS_TOOLS_SEND_RECV_H

#include <stdint.h>

#define TFS_STREAM_MAGIC "THINSEND"
#define TFS_STREAM_VERSION 1u
#define TFS_STREAM_HEADER_SIZE 96u
#define TFS_STREAM_RECORD_SIZE 24u
/* A DATA record carries at most this many bytes, so a reader's buffer is bounded. */
#define TFS_STREAM_CHUNK (1u << 20)

enum tfs_stream_record { TFS_REC_DATA = 1, TFS_REC_ZERO = 2, TFS_REC_END = 3 };

/* Header flags. */
#define TFS_STREAM_INCREMENTAL 1u

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
