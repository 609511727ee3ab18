/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * ctl-server.h - the daemon's side of the control socket (ctl-protocol.h).
 *
 * Owns: the listening socket, one thread that accepts clients and runs the
 * daemon's 1-second housekeeping (tfs_fs_tick), one short-lived thread per
 * client, and the commands: status, list, snapshot, delete,
 * set-transaction-id, reserve-metadata-snap, release-metadata-snap,
 * events, wait-event (send and receive: send-recv.c, through
 * ctl-internal.h).  Only root and the mount's owner are served
 * (SO_PEERCRED).
 *
 * Never: replies to FUSE; changes the namespace except through fs.h.
 */
#ifndef TFS_FS_CTL_SERVER_H
#define TFS_FS_CTL_SERVER_H

struct tfs_fs;
struct tfs_ctl_server;

/*
 * Create the socket for fs->mountpoint (mkdir TFS_CTL_DIR, replace a stale
 * socket, refuse a live one with -EADDRINUSE) and start serving.
 * Blocking; -errno.
 */
int tfs_ctl_server_start(struct tfs_fs *fs, struct tfs_ctl_server **out);
/* Wake and join every thread, remove the socket.  NULL is a no-op. */
void tfs_ctl_server_stop(struct tfs_ctl_server *srv);

#endif
