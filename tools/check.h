/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * check.h - `thinfs check`: an independent, offline checker of thin-pool
 * metadata.
 *
 * Owns: every invariant of docs/ondisk-formats.md sections 1-2 that can be
 * verified from the metadata alone: superblock fields, the structure of
 * every btree (checksums, locations, sizes, fill, key order, key ranges,
 * uniform depth), device details vs mapping trees, and both space maps
 * against reference counts rebuilt from scratch (metadata: once per distinct
 * parent reference; data: once per distinct level-1 leaf).  Problems are
 * reported one per line, naming the block or device, and the walk goes on
 * so that one run shows as much as it can.
 *
 * Never: uses src/meta's btree or space-map code (see raw-meta.h), crashes
 * or loops on any input, or writes anything but the needs_check flag (and
 * only on clean metadata).
 *
 * Memory: about 10 bytes per metadata block (at most ~42 MB for the
 * largest metadata device, 4,161,600 blocks), plus 4 bytes per data block
 * of one counting window (default 16,776,960 blocks = 64 MiB).  Pools with
 * more data blocks than one window are checked in several passes, each of
 * which re-reads the mapping leaves (documented cost: one extra read of
 * every distinct leaf per further window).
 */
#ifndef TFS_TOOLS_CHECK_H
#define TFS_TOOLS_CHECK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct tfs_bdev;

struct tfs_check_opts {
	bool quiet;             /* print nothing */
	bool strict;            /* summary fields (nr_allocated, nr_free, none_free_before)
				   must be exact: errors instead of warnings */
	bool clear_needs_check; /* clear NEEDS_CHECK when the metadata is clean */
	uint64_t max_reports;   /* lines printed at most (0 = 10000); all are counted */
	uint64_t data_window;   /* data blocks counted per pass (0 = default) */
	FILE *out;              /* findings go here (NULL = stdout) */
};

struct tfs_check_result {
	uint64_t errors;
	uint64_t warnings;
	uint64_t nr_devices;
	uint64_t meta_used, meta_total; /* from the bitmaps, not nr_allocated */
	uint64_t data_used, data_total;
	bool needs_check;         /* the flag was set when we looked */
	bool cleared_needs_check; /* ... and we cleared it */
};

/*
 * Check the metadata on dev.  Returns 0 when the check ran to the end
 * (result says what it found), or -ENOMEM, or the error from writing the
 * superblock when clearing NEEDS_CHECK (dev must then be writable).
 */
int tfs_check_metadata(struct tfs_bdev *dev, const struct tfs_check_opts *opts,
		       struct tfs_check_result *result);

/* `thinfs check METADATA|POOL.cfg [options]`; exit 0 clean, 1 problems, 2 usage/operational. */
int tfs_cmd_check(int argc, char **argv);

#endif
