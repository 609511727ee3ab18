/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dump.h - `thinfs dump`: thin-pool metadata as XML, byte-identical to what
 * thin_dump 0.9.0 prints for the same image.
 *
 * Owns: the XML emitter and the walk that feeds it (devices in mapping-tree
 * order, runs of consecutive virtual and data blocks with one time
 * collapsed into range_mapping).
 * Never: writes metadata; uses src/meta's btree code (see raw-meta.h).
 */
#ifndef TFS_TOOLS_DUMP_H
#define TFS_TOOLS_DUMP_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct tfs_bdev;

struct tfs_dump_opts {
	bool metadata_snap;    /* dump the held-root copy instead of the live trees */
	uint64_t snap_block;   /* ... at this block; 0 = the superblock's held_root */
	bool skip_mappings;    /* devices only, as thin_dump --skip-mappings */
	bool have_dev_id;      /* only this device, as thin_dump --dev-id */
	uint64_t dev_id;
	FILE *err;             /* where the reason of a failure goes; NULL = nowhere */
};

/*
 * Write the XML of the metadata on dev to out.  Returns 0, or -EUCLEAN
 * (corrupt metadata; the reason went to opts->err and out holds what was
 * written before the damage), -ENODATA (no metadata snapshot held),
 * -ENOMEM, -EIO.  Cost: one read per metadata node walked; memory grows
 * with the number of devices only.
 */
int tfs_dump_metadata(struct tfs_bdev *dev, const struct tfs_dump_opts *opts, FILE *out);

/* `thinfs dump METADATA [-o FILE] [-m[BLOCK]] [--dev-id ID] [--skip-mappings]` */
int tfs_cmd_dump(int argc, char **argv);

#endif
