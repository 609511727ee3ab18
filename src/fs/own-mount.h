/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * own-mount.h - what the daemon does through its own mount: fsync(2) of
 * its volumes (the kernel's cached writes, before a snapshot or a
 * suspend) and a stat(2) of its root (INIT done).  Always from a
 * short-lived child process, never from a thread of the daemon.
 *
 * Why: a thread waiting for its own mount can wait uninterruptibly in the
 * kernel (an open drops the file's cached pages and writes the dirty ones
 * first; fsync waits for writeback; any request a worker had read when
 * the daemon died is waited out).  If the daemon is killed meanwhile,
 * that thread never ends, so the process never closes /dev/fuse, so the
 * kernel never aborts the connection that would end the wait: the daemon
 * can no longer exit and the mount hangs.  A child (vfork: the daemon's
 * memory, none of its descriptors) holds nothing but what it opens there:
 * the daemon dies whole, the connection goes down, and the child's wait
 * ends with it.
 *
 * Never: lets the child take a lock, allocate or log (the daemon's other
 * threads may hold any lock at the fork); only system calls run there.
 */
#ifndef TFS_FS_OWN_MOUNT_H
#define TFS_FS_OWN_MOUNT_H

#include <stdint.h>

/* One file to fsync, and what happened to it. */
struct tfs_own_fsync {
	const char *name;  /* relative to the directory given */
	uint64_t ino;      /* expected: a name that is another file now is skipped */
	int open_err;      /* out: 0, or -errno of the open (-ENOENT: gone meanwhile) */
	int err;           /* out: 0, or -errno of the fsync */
};

/*
 * fsync of each of f[0..nr), opened relative to the directory dir (whose
 * inode must be dir_ino: a directory overmounted or gone is not ours), in
 * that order, by one child process.  0; -ENOENT dir could not be reached
 * or is not ours (nothing done); or -errno when the child could not run
 * (vfork failed) or did not finish (killed): then f[] is not to be read.
 */
int tfs_own_mount_fsync(const char *dir, uint64_t dir_ino, struct tfs_own_fsync *f, unsigned nr);

/* stat(2) of dir by a child: 0 when it answered with inode dir_ino, else -errno (-ENOENT not ours). */
int tfs_own_mount_stat(const char *dir, uint64_t dir_ino);

#endif
