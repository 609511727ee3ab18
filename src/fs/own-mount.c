/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * own-mount.c - the daemon's I/O through its own mount, from a child
 * process (see own-mount.h).
 */
#include "own-mount.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"

/* Every descriptor but keep (-1: none): the child must not hold /dev/fuse, nor anything else. */
static void close_all_but(int keep)
{
	if (keep > 0)
		close_range(0, (unsigned)keep - 1, 0);
	close_range((unsigned)(keep + 1), ~0u, 0);
}

/*
 * Opens dir in the child and checks it is ours: its descriptor, or -1.
 * Even this is the child's: a stat of the mount's root asks the daemon.
 */
static int open_dir(const char *dir, uint64_t dir_ino)
{
	struct stat st;
	int root = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (root >= 0 && (fstat(root, &st) < 0 || st.st_ino != dir_ino)) {
		close(root);
		root = -1;
	}
	return root;
}

/*
 * A vfork child runs on its parent's stack and memory: a signal handler of
 * the daemon's must not run in it.
 */
static void child_begin(void)
{
	sigset_t all;

	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
}

/* The child of tfs_own_mount_fsync: system calls only, then _exit (no atexit handlers). */
static void fsync_child(const char *dir, uint64_t dir_ino, struct tfs_own_fsync *f,
			unsigned nr, int *dir_err)
{
	struct stat st;
	int root;

	child_begin();
	root = open_dir(dir, dir_ino);
	if (root < 0) {
		*dir_err = -ENOENT;
		_exit(0);
	}
	close_all_but(root);
	for (unsigned i = 0; i < nr; i++) {
		int fd = openat(root, f[i].name, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);

		if (fd < 0) {
			f[i].open_err = -errno;
			continue;
		}
		/* Renamed meanwhile: that name is another volume now, whose writer is not ours. */
		if (fstat(fd, &st) == 0 && st.st_ino == f[i].ino && fsync(fd) < 0)
			f[i].err = -errno;
		close(fd);
	}
	_exit(0);
}

/* The child of tfs_own_mount_stat. */
static void stat_child(const char *dir, uint64_t dir_ino, int *dir_err)
{
	child_begin();
	close_all_but(-1);
	if (open_dir(dir, dir_ino) < 0)
		*dir_err = -ENOENT;
	_exit(0);
}

/*
 * The child runs fsync_child (f non-NULL) or stat_child while the calling
 * thread waits (killably: a kill ends the wait, not the child).  vfork,
 * not fork: the child shares the daemon's memory, so no page tables are
 * copied and torn down again (fork made a snapshot's mkdir 3-5 ms
 * slower), but not its descriptors; it reports straight into f and
 * *dir_err.  0 when it ran to its end, else -errno.
 */
static int run_child(const char *dir, uint64_t dir_ino, struct tfs_own_fsync *f, unsigned nr,
		     int *dir_err)
{
	int status, r;
	pid_t pid = vfork();

	if (pid == 0) {
		if (f)
			fsync_child(dir, dir_ino, f, nr, dir_err);
		stat_child(dir, dir_ino, dir_err);
	}
	if (pid < 0) {
		r = -errno;
		tfs_err("%s: vfork: %s", dir, strerror(-r));
		return r;
	}
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			r = -errno;
			tfs_err("%s: waiting for child %d: %s", dir, (int)pid, strerror(-r));
			return r;
		}
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		tfs_err("%s: child %d ended %s %d", dir, (int)pid,
			WIFSIGNALED(status) ? "by signal" : "with status",
			WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
		return -EIO;
	}
	return 0;
}

int tfs_own_mount_fsync(const char *dir, uint64_t dir_ino, struct tfs_own_fsync *f, unsigned nr)
{
	int dir_err = 0, r;

	for (unsigned i = 0; i < nr; i++)
		f[i].open_err = f[i].err = 0;
	r = run_child(dir, dir_ino, f, nr, &dir_err);
	return r ? r : dir_err;
}

int tfs_own_mount_stat(const char *dir, uint64_t dir_ino)
{
	int dir_err = 0, r = run_child(dir, dir_ino, NULL, 0, &dir_err);

	return r ? r : dir_err;
}
