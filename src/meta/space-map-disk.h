/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * space-map-disk.h - reference counts of data blocks.
 *
 * Owns: the data space map of a pool: bitmap blocks and an overflow
 * ref-count btree reached through an index btree (key: bitmap number,
 * value: 16-byte index entry), all kept in metadata blocks via the
 * transaction manager.  The index entries are cached in memory (16 bytes
 * per 16320 data blocks) and written back into the index btree at commit.
 *
 * Never: hands out a data block that was freed since the last commit, so
 * data the committed mappings point at is never overwritten.
 */
#ifndef TFS_META_SPACE_MAP_DISK_H
#define TFS_META_SPACE_MAP_DISK_H

#include <stdint.h>

struct tfs_sm;
struct tfs_tm;

int tfs_smd_create(struct tfs_tm *tm, uint64_t nr_blocks, struct tfs_sm **out);
int tfs_smd_open(struct tfs_tm *tm, const void *root32, struct tfs_sm **out);

#endif
