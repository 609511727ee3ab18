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
/*
 * Block until no held cell of dev overlaps [begin, end), then hold it.
 * -ENOMEM; also -EINVAL (logged) for an empty range, begin >= end, which
 * is a caller's bug.
 */
int tfs_prison_lock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);
/* Release exactly a cell taken with the same arguments. */
void tfs_prison_unlock(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);

/*
 * Added for reads: a shared cell overlaps other shared cells but no
 * exclusive one, so reads of the same blocks run in parallel while a
 * write, discard or copy of them waits (and is waited for).
 *
 * Fairness (both kinds): cells are granted in arrival order among those
 * that overlap, so a waiting cell also holds back later overlapping ones
 * and a whole-device cell (snapshot creation) is not starved by a stream
 * of small requests.  A cell only ever waits for cells that arrived
 * before it, which is why taking one cell per request cannot deadlock.
 */
int tfs_prison_lock_shared(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);
void tfs_prison_unlock_shared(struct tfs_prison *p, uint32_t dev, uint64_t begin, uint64_t end);

#endif
