/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirty-limits.c - how much of the volumes' written data the kernel may keep
 * cached before it makes writers wait: our mount's backing-dev limits.
 *
 * Owns: finding the mount's backing-dev info (bdi) and raising the share of
 * the system's dirty limit (vm.dirty_ratio) the kernel gives a FUSE mount,
 * so that with writeback_cache the volume files' buffered writes are
 * cached as a block device's are, up to a bounded share.
 *
 * Never: fails the mount (without the knobs the mount still works, with
 * the FUSE defaults); touches any other mount's limits.
 */
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

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

static int write_max_ratio(const char *dev, const char *value)
{
	char path[128];
	int fd, r = 0;

	snprintf(path, sizeof(path), "/sys/class/bdi/%s/max_ratio", dev);
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

void tfs_fs_lift_dirty_limits(struct tfs_fs *fs)
{
	char dev[32];
	int r;

	r = mount_dev(fs->mountpoint, dev, sizeof(dev));
	if (r < 0) {
		tfs_warn("writeback_cache: cannot find the mount of %s in /proc/self/mountinfo "
			 "(%s): the kernel's FUSE dirty limit stays (1%% of the system's)",
			 fs->mountpoint, strerror(-r));
		return;
	}
	r = write_max_ratio(dev, MOUNT_DIRTY_PERCENT);
	if (r < 0)
		tfs_warn("writeback_cache: cannot raise /sys/class/bdi/%s/max_ratio (%s): "
			 "buffered writers wait for writeback once a few tens of MiB are cached",
			 dev, strerror(-r));
}
