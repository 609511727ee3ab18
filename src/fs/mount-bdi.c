/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * mount-bdi.c - our mount's backing-dev settings: how much of the volumes'
 * written data the kernel may keep cached before it makes writers wait,
 * and how far ahead it reads for a sequential reader.
 *
 * Owns: finding the mount's backing-dev info (bdi), raising the share of
 * the system's dirty limit (vm.dirty_ratio) the kernel gives a FUSE mount,
 * so that with writeback_cache the volume files' buffered writes are
 * cached as a block device's are, up to a bounded share, and setting the
 * mount's read-ahead.
 *
 * Never: fails the mount (without the knobs the mount still works, with
 * the FUSE defaults); touches any other mount's limits.
 */
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "own-mount.h"

/* Undo mountinfo's octal escapes (\040 for a space, \011, \012, \134) in place. */
static void unescape_mountinfo(char *s)
{
	char *out = s;

	while (*s) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 4;
		} else {
			*out++ = *s++;
		}
	}
	*out = '\0';
}

/*
 * The "MAJ:MIN" of the newest mount on @mountpoint (an absolute, resolved
 * path), from /proc/self/mountinfo: asking the mount itself (stat) would
 * wait for a daemon that is not serving yet.
 */
static int mount_dev(const char *mountpoint, char *dev, size_t dev_len)
{
	char *line = NULL;
	size_t cap = 0;
	int r = -ENOENT;
	FILE *f = fopen("/proc/self/mountinfo", "re");

	if (!f)
		return -errno;
	while (getline(&line, &cap, f) > 0) {
		char majmin[32], mnt[4096];

		/* id parent MAJ:MIN root mountpoint ... */
		if (sscanf(line, "%*s %*s %31s %*s %4095s", majmin, mnt) != 2)
			continue;
		unescape_mountinfo(mnt);
		if (strcmp(mnt, mountpoint) != 0 || !strstr(line, " - fuse.thinfs "))
			continue;
		/* Later lines are newer mounts: the last match is ours. */
		snprintf(dev, dev_len, "%s", majmin);
		r = 0;
	}
	free(line);
	fclose(f);
	return r;
}

static int write_bdi(const char *dev, const char *knob, const char *value)
{
	char path[128];
	int fd, r = 0;

	snprintf(path, sizeof(path), "/sys/class/bdi/%s/%s", dev, knob);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (write(fd, value, strlen(value)) < 0)
		r = -errno;
	close(fd);
	return r;
}

/*
 * The kernel caps a FUSE mount at 1% of the dirty limit and, with
 * strict_limit, throttles its writers against that share alone: with
 * writeback_cache, a few tens of MiB of buffered writes and every further
 * write(2) waits for writeback of 4 KiB pages one request at a time.  A
 * fifth keeps strict_limit's guarantee that matters here: only this daemon
 * can clean these pages, so they must never fill the system's limit, or
 * every buffered writer on the host (the daemon's own catalog writes
 * among them) would wait for writebacks the pool may be holding.
 */
#define MOUNT_DIRTY_PERCENT "20"

/*
 * A FUSE mount reads ahead 128 KiB, so a buffered sequential reader has at
 * most one small READ in flight and waits for the device at each.  A FUSE
 * READ carries at most 1 MiB (max_pages); 4 MiB keeps about four in
 * flight.  1 MiB buffered reads of a volume, host caches dropped: 897-930
 * MiB/s at 128 KiB, 1313-1633 at 1 MiB, 1344-1958 at 4 MiB (bench/README.md).
 * A random reader's window starts at a few pages whatever this says.
 */
#define MOUNT_READ_AHEAD_KB "4096"

/*
 * The kernel sets the read-ahead from FUSE's INIT reply (the smaller of the
 * two), which the session loop sends; so it is raised once a request of
 * our own has come back, which proves INIT done.
 */
static void *read_ahead_after_init(void *arg)
{
	struct tfs_fs *fs = arg;
	int r;

	/* By a child (own-mount.h): this thread must never wait on our own mount. */
	if (tfs_own_mount_stat(fs->mountpoint, TFS_INO_ROOT) < 0)
		return NULL; /* gone before it served: nothing to tune */
	r = write_bdi(fs->bdi_dev, "read_ahead_kb", MOUNT_READ_AHEAD_KB);
	if (r < 0)
		tfs_warn("cannot set /sys/class/bdi/%s/read_ahead_kb (%s): sequential buffered "
			 "reads wait for the device every 128 KiB", fs->bdi_dev, strerror(-r));
	return NULL;
}

void tfs_fs_tune_bdi(struct tfs_fs *fs, bool lift_dirty)
{
	int r;

	r = mount_dev(fs->mountpoint, fs->bdi_dev, sizeof(fs->bdi_dev));
	if (r < 0) {
		tfs_warn("cannot find the mount of %s in /proc/self/mountinfo (%s): the kernel's "
			 "FUSE read-ahead and dirty limit stay (128 KiB, 1%% of the system's)",
			 fs->mountpoint, strerror(-r));
		return;
	}
	r = pthread_create(&fs->bdi_thread, NULL, read_ahead_after_init, fs);
	if (r)
		tfs_warn("no thread to raise the read-ahead (%s): it stays 128 KiB", strerror(r));
	fs->bdi_thread_started = r == 0;
	if (!lift_dirty)
		return;
	r = write_bdi(fs->bdi_dev, "max_ratio", MOUNT_DIRTY_PERCENT);
	if (r < 0)
		tfs_warn("writeback_cache: cannot raise /sys/class/bdi/%s/max_ratio (%s): "
			 "buffered writers wait for writeback once a few tens of MiB are cached",
			 fs->bdi_dev, strerror(-r));
}

void tfs_fs_tune_bdi_end(struct tfs_fs *fs)
{
	if (fs->bdi_thread_started)
		pthread_join(fs->bdi_thread, NULL);
	fs->bdi_thread_started = false;
}
