/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * prison.h - range locks ("cells") on (device, block range) keys.
 *
 * Owns: serialising requests that touch the same blocks while they are
 * being provisioned, copied, read or discarded; requests on disjoint
 * ranges never wait for each other.  A request takes its whole range as
 * one cell, atomically, so two requests can never deadlock on each other.
 * Cost: O(cells held on the device) per lock; memory O(cells held).
 *
 * Never: does I/O, or sleeps while holding its internal mutex.
 */
#ifndef TFS_ENGINE_PRISON_H
#define TFS_ENGINE_PRISON_H

#include <stdint.h>

struct tfs_prison;

int tfs_prison_create(struct tfs_prison **out);
void tfs_prison_destroy(struct tfs_prison *p);
/* Block until no held cell of dev overlaps [begin, end), then hold it. -ENOMEM only. */
int tfs_prison_lock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);
/* Release exactly a cell taken with the same arguments. */
void tfs_prison_unlock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);

#endif
