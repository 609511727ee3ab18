/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * self-fsync.h - fsync(2) of files of the daemon's own mount, done by a
 * short-lived child process, never by a thread of the daemon.
 *
 * Why: a thread that waits for its own mount's writeback waits
 * uninterruptibly in the kernel (an open drops the file's cached pages
 * and writes the dirty ones first; fsync waits for them too).  If the
 * daemon is killed meanwhile, that thread never ends, so the process
 * never closes /dev/fuse, so the kernel never aborts the connection that
 * would fail the writeback it waits for: the daemon can no longer exit
 * and the mount hangs.  A child holds nothing but the mount's root: the
 * daemon dies whole, the connection goes down, and the child's wait ends
 * with it.
 *
 * Never: lets the child take a lock, allocate or log (the daemon's other
 * threads may hold any lock at the fork); only system calls run there.
 */
#ifndef TFS_FS_SELF_FSYNC_H
#define TFS_FS_SELF_FSYNC_H

#include <stdint.h>

/* One file to fsync, and what happened to it. */
struct tfs_self_fsync {
	const char *name;  /* relative to the root given */
	uint64_t ino;      /* expected: a name that is another file now is skipped */
	int open_err;      /* out: 0, or -errno of the open (-ENOENT: gone meanwhile) */
	int err;           /* out: 0, or -errno of the fsync */
};

/*
 * fsync of each of f[0..nr), opened relative to the directory dir (whose
 * inode must be dir_ino: a directory overmounted or gone is not ours), in
 * that order, by one child process.  0; -ENOENT dir could not be reached
 * or is not ours (nothing done); or -errno when the child could not run
 * (fork failed) or did not finish (killed): then no f[i] says more.
 */
int tfs_self_fsync(const char *dir, uint64_t dir_ino, struct tfs_self_fsync *f, unsigned nr);

#endif
