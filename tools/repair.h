/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * repair.h - `thinfs check --repair`: rebuild thin-pool metadata in place
 * from whatever of it can still be read.
 *
 * Owns: salvaging devices and mappings with the independent reader
 * (raw-meta.h), skipping subtrees that fail validation, and rebuilding the
 * metadata through the thin-metadata API.  What was lost is reported, one
 * line per damaged subtree.  The result has needs_check clear.
 * Never: touches the device before the salvage pass has finished; recovers
 * snapshot sharing (every device gets its own tree, as with thin_repair).
 */
#ifndef TFS_TOOLS_REPAIR_H
#define TFS_TOOLS_REPAIR_H

#include <stdint.h>
#include <stdio.h>

struct tfs_bdev;

/*
 * nr_data_blocks: the data device's size in blocks (0 = as the old data
 * space map says).  Mappings to blocks past it are dropped.  Returns 0 or
 * -errno; -EUCLEAN when the superblock is too damaged to start from.
 */
int tfs_repair_metadata(struct tfs_bdev *bdev, uint64_t nr_data_blocks, FILE *report);

#endif
