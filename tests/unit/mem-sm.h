/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * mem-sm.h - an in-memory metadata space map for unit tests.
 *
 * Owns: one u32 count per block plus a copy of the counts as of the last
 * checkpoint (the test's stand-in for "the last commit").  It behaves like
 * the metadata space map the transaction manager expects: is_new(b) is true
 * iff b's checkpointed count is 0, new_block hands out only blocks free now
 * and at the checkpoint, rollback returns to the checkpoint.
 *
 * Never: touches a device.  commit() does nothing (the map has no blocks of
 * its own); the test calls mem_sm_checkpoint() after tfs_tm_commit().
 */
#ifndef TFS_TEST_MEM_SM_H
#define TFS_TEST_MEM_SM_H

#include <stdint.h>

#include "space-map.h"

/* Blocks [0, reserved) start with count 1 (superblock and the like). */
int mem_sm_create(uint64_t nr_blocks, uint64_t reserved, struct tfs_sm **out);
/* Make the current counts the committed state. */
void mem_sm_checkpoint(struct tfs_sm *sm);
uint32_t mem_sm_count(struct tfs_sm *sm, uint64_t b);
/* Blocks with a non-zero count. */
uint64_t mem_sm_nr_allocated(struct tfs_sm *sm);
/* Fault injection: new_block fails with -ENOSPC after n more successes (UINT64_MAX: never). */
void mem_sm_fail_after(struct tfs_sm *sm, uint64_t n);
/* Count of a dec below zero or an inc of a block past the end (test failures). */
uint64_t mem_sm_errors(struct tfs_sm *sm);

#endif
