/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * daemon.h - the `thinfs mkpool` and `thinfs mount` subcommands.
 *
 * Owns: the daemon's life: argument parsing, the metadata lock (one daemon
 * per pool), opening the pool and catalog and reconciling them, the FUSE
 * session and its mount, daemonizing with a readiness report to the
 * command that started it (or sd_notify under systemd), the control
 * socket's lifetime, and the orderly shutdown on unmount or SIGTERM
 * (close volumes, commit, exit 0).
 *
 * Both take the subcommand's argv (argv[0] is "mkpool" / "mount") and
 * return the process exit status: 0 success, 1 failure (one message on
 * stderr says why), 2 usage error.
 */
#ifndef TFS_FS_DAEMON_H
#define TFS_FS_DAEMON_H

int tfs_cmd_mkpool(int argc, char **argv);
int tfs_cmd_mount(int argc, char **argv);

#endif
