/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * space-map-metadata.h - reference counts of metadata blocks.
 *
 * Owns: the counts of every metadata block, held in memory for the whole
 * life of the pool (the format caps the domain at 255 bitmaps, so this is at
 * most ~1 MiB for the bitmaps plus the overflow counts, and twice that with
 * the committed copy the allocator consults).  At commit it writes shadowed
 * bitmaps, the overflow ref-count btree and a new index block, allocating
 * their locations from itself until the counts are stable.
 *
 * Never: lets a block freed since the last commit be allocated again.
 */
#ifndef TFS_META_SPACE_MAP_METADATA_H
#define TFS_META_SPACE_MAP_METADATA_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_bm;
struct tfs_sm;
struct tfs_tm;

/*
 * A fresh map for nr_blocks (capped at TFS_MAX_METADATA_BLOCKS by the
 * caller) in which the blocks [0, reserved) are already counted 1 (the
 * superblock).  Nothing is written until the first commit.
 */
int tfs_smm_create(struct tfs_bm *bm, uint64_t nr_blocks, uint64_t reserved, struct tfs_sm **out);
/* Load from a committed root (32 bytes as stored in the superblock). */
int tfs_smm_open(struct tfs_bm *bm, const void *root32, struct tfs_sm **out);
/* The transaction manager this map writes its blocks through (set once, after tm creation). */
void tfs_smm_bind(struct tfs_sm *sm, struct tfs_tm *tm);
/* is_new and rollback are provided through the ops table (space-map.h). */

#endif
