/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * crash-points.c - `thinfs-ctl MNT fault crash-at NAME`: the daemon exits
 * at a named point inside a namespace change, so a test can place a crash
 * exactly where the change is half done.  See fs.h.
 */
#include "fs.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "log.h"

/* Keep in step with the README's thinfs-ctl reference. */
static const char *const point_names[] = {
	"group-create-after-intent",  /* group, rows and intent stored; no device yet */
	"group-create-between-rows",  /* inside the catalog transaction, one row written */
	"group-create-after-devices", /* snapshots committed; the intent not cleared */
	"group-remove-after-intent",  /* removal recorded; every device still there */
	"group-remove-after-devices", /* devices deleted and committed; rows still there */
	"group-remove-between-rows",  /* inside the transaction removing the rows */
};
#define NR_POINTS (sizeof(point_names) / sizeof(point_names[0]))

/* fs->crash_at: 0 = disarmed, else (point index + 1) | how << 8. */
#define HOW_SHIFT 8

const char *tfs_fs_crash_point_name(unsigned i)
{
	return i < NR_POINTS ? point_names[i] : NULL;
}

int tfs_fs_crash_arm(struct tfs_fs *fs, const char *name, enum tfs_crash_how how)
{
	for (unsigned i = 0; i < NR_POINTS; i++)
		if (!strcmp(name, point_names[i])) {
			atomic_store(&fs->crash_at, (i + 1) | (unsigned)how << HOW_SHIFT);
			return 0;
		}
	return -EINVAL;
}

/* As a crash would: no commit, no unmount, no cleanup. */
_Noreturn static void die(struct tfs_fs *fs, enum tfs_crash_how how)
{
	uint32_t seed = (uint32_t)time(NULL);

	for (int data = 0; data < 2; data++) {
		struct tfs_bdev *dev = tfs_pool_bdev(fs->pool, data);

		/* A process crash: what was written reached the kernel and stays. */
		if (how == TFS_CRASH_PROCESS)
			tfs_bdev_flush(dev);
		else
			tfs_bdev_fault_power_cut(dev, how == TFS_CRASH_POWER_TEAR, seed);
	}
	_exit(0);
}

void tfs_fs_crash_point(struct tfs_fs *fs, const char *name)
{
	unsigned v = atomic_load(&fs->crash_at), i = (v & ((1u << HOW_SHIFT) - 1)) - 1;

	if (!v || i >= NR_POINTS || strcmp(name, point_names[i]))
		return;
	tfs_warn("fault crash-at %s: exiting at once", name);
	die(fs, (enum tfs_crash_how)(v >> HOW_SHIFT));
}
