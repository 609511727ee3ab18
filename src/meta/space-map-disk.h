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
 * Never: hands out a data block that was in use at any moment since the
 * last commit, so data the committed mappings point at is never
 * overwritten (nor a block born and freed in this transaction).
 *
 * Costs (ops table, space-map.h): get_count one bitmap lookup (plus one
 * btree lookup for counts >= 3); inc/dec one bitmap lookup and, on the
 * first change to a bitmap in a transaction, one shadow (plus one btree
 * update when the count is or was >= 3); new_block scans from a rolling
 * hint, skipping full bitmaps and the prefix below none_free_before, O(1)
 * block locks amortised; once a scan finds nothing, -ENOSPC is immediate
 * until the next commit or extend.  commit: one index btree insert per
 * bitmap changed in the transaction.  Memory: 24 bytes per bitmap, plus
 * 4 KiB per bitmap changed in the running transaction (the allocation
 * barrier).
 * Errors: -EINVAL block past nr_blocks, dec below zero (logged), extend past
 * 2^40 blocks; -EOVERFLOW inc past 2^32 - 1; -ENOSPC no data block (or no
 * metadata block for a shadow); -EUCLEAN corrupt bitmap or ref-count tree;
 * -EIO; -ENOMEM.  After any error from inc, dec, new_block, extend or
 * commit the transaction must be aborted.
 *
 * No rollback: to abort, destroy the map after tfs_tm_abort and
 * tfs_smd_open it again from the committed superblock's root.  commit()
 * must be followed by the metadata commit (tfs_tm_commit) before any other
 * call; if that fails, reopen likewise.
 */
#ifndef TFS_META_SPACE_MAP_DISK_H
#define TFS_META_SPACE_MAP_DISK_H

#include <stdint.h>

struct tfs_sm;
struct tfs_tm;

/*
 * A new map of nr_blocks (0 is fine: extend later) with empty index and
 * ref-count trees and zeroed bitmaps, all allocated through tm.  Until the
 * first commit, copy_root gives the root of an empty map.
 */
int tfs_smd_create(struct tfs_tm *tm, uint64_t nr_blocks, struct tfs_sm **out);
/*
 * Load from a committed root: walks the index btree and reads every bitmap
 * once (one 4 KiB read per 16320 data blocks), so that nr_allocated and the
 * hints are exact whatever the writer stored.  -EUCLEAN (logged) when the
 * index tree does not hold exactly bitmaps 0 .. n-1 or a bitmap is corrupt.
 */
int tfs_smd_open(struct tfs_tm *tm, const void *root32, struct tfs_sm **out);

/*
 * The highest data block with a non-zero count in the current transaction,
 * UINT64_MAX when none.  Reads only bitmaps that are not wholly free, from
 * the end down.  -EINVAL when sm is not a data space map.
 */
int tfs_smd_highest_used(struct tfs_sm *sm, uint64_t *highest);
/*
 * Call fn(arg, begin, len) for every run of blocks with a zero count in the
 * current transaction, in block order, each run whole; a non-zero return
 * from fn stops the walk and is returned.  Reads only bitmaps that are
 * neither wholly free nor wholly used.  -EINVAL when sm is not a data
 * space map.
 */
int tfs_smd_walk_free(struct tfs_sm *sm, int (*fn)(void *arg, uint64_t begin, uint64_t len),
		      void *arg);
/*
 * Shrink the domain to nr_blocks, in the running transaction (see the
 * comment in space-map-disk.c for why a crash before the commit leaves the
 * old, larger map whole).  Refused with -EINVAL, nothing changed, when a
 * block >= nr_blocks has a non-zero count now (or nr_blocks is larger than
 * the map); *highest_used (may be NULL) gets the highest block in use,
 * UINT64_MAX when none, whenever the scan ran.  Otherwise the index entries
 * of the bitmaps wholly past the end are removed and those bitmaps
 * released in the metadata space map; the last bitmap keeps its content
 * (entries past the end are zero) with its hints clamped to the new
 * length; the allocation hint is clamped.  Errors after the scan (-ENOSPC,
 * -EIO, -ENOMEM, -EUCLEAN) need an abort, as for extend.
 */
int tfs_smd_shrink(struct tfs_sm *sm, uint64_t nr_blocks, uint64_t *highest_used);

#endif
