/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * self-fsync.c - fsync(2) through the daemon's own mount from a child
 * process (see self-fsync.h).
 */
#include "self-fsync.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"

/* What the child reports, in memory it shares with the parent. */
struct outcome {
	int dir_err;
	struct {
		int open_err, err;
	} f[];
};

/* Every descriptor but keep: the child must not hold /dev/fuse (nor anything else). */
static void close_all_but(int keep)
{
	if (keep > 0)
		close_range(0, (unsigned)keep - 1, 0);
	close_range((unsigned)keep + 1, ~0u, 0);
}

/*
 * The child: system calls only, then _exit (no atexit handlers, no
 * flushes).  Even the directory is opened here: a stat of the mount's
 * root asks the daemon too, and a thread waiting for an answer a killed
 * daemon had already taken would wait as uninterruptibly.
 */
static void child(const char *dir, uint64_t dir_ino, const struct tfs_self_fsync *f,
		  unsigned nr, struct outcome *out)
{
	struct stat st;
	int root = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (root < 0 || fstat(root, &st) < 0 || st.st_ino != dir_ino) {
		out->dir_err = -ENOENT;
		_exit(0);
	}
	close_all_but(root);
	for (unsigned i = 0; i < nr; i++) {
		int fd = openat(root, f[i].name, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);

		if (fd < 0) {
			out->f[i].open_err = -errno;
			continue;
		}
		/* Renamed meanwhile: that name is another volume now, whose writer is not ours. */
		if (fstat(fd, &st) == 0 && st.st_ino == f[i].ino && fsync(fd) < 0)
			out->f[i].err = -errno;
		close(fd);
	}
	_exit(0);
}

int tfs_self_fsync(const char *dir, uint64_t dir_ino, struct tfs_self_fsync *f, unsigned nr)
{
	size_t len = sizeof(struct outcome) + nr * sizeof(((struct outcome *)0)->f[0]);
	struct outcome *out;
	int status, r = 0;
	pid_t pid;

	out = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (out == MAP_FAILED)
		return -errno;
	pid = fork();
	if (pid == 0)
		child(dir, dir_ino, f, nr, out);
	if (pid < 0) {
		r = -errno;
		tfs_err("fsync through the mount: fork: %s", strerror(-r));
		goto out;
	}
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			r = -errno;
			tfs_err("fsync through the mount: waiting for child %d: %s", (int)pid,
				strerror(-r));
			goto out;
		}
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		r = -EIO;
		tfs_err("fsync through the mount: child %d ended %s %d", (int)pid,
			WIFSIGNALED(status) ? "by signal" : "with status",
			WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
		goto out;
	}
	r = out->dir_err;
	for (unsigned i = 0; i < nr && !r; i++) {
		f[i].open_err = out->f[i].open_err;
		f[i].err = out->f[i].err;
	}
out:
	munmap(out, len);
	return r;
}
