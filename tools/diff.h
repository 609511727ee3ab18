/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * diff.h - `thinfs diff`: the changed blocks between two thin devices of a
 * pool that is not mounted, with the walk the daemon's `thinfs-ctl diff`
 * uses (src/meta, tfs_thin_diff).
 */
#ifndef TFS_TOOLS_DIFF_H
#define TFS_TOOLS_DIFF_H

/* `thinfs diff METADATA|POOL.cfg FROM TO [--json] [--stats]`; exit 0, 1 failed, 2 usage. */
int tfs_cmd_diff(int argc, char **argv);

#endif
