/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * scratch.h - per-thread, page-aligned scratch buffers for the data path.
 *
 * Owns: the large short-lived buffers a request needs while it is served
 * (a read's reply, a new block being built, an O_DIRECT staging copy).
 * Each thread keeps up to TFS_SCRATCH_SLOTS of them, mapped outside the
 * malloc heap, grown to the largest size it has needed (at most
 * TFS_SCRATCH_MAX) and unmapped when the thread ends.
 * Never: shares a buffer between threads, or holds anything past put.
 */
#ifndef TFS_META_SCRATCH_H
#define TFS_META_SCRATCH_H

#include <stddef.h>

/* Buffers a thread keeps: the nesting depth of the data path (see scratch.c). */
#define TFS_SCRATCH_SLOTS 2
/* Every buffer starts on a page, so at least on this boundary. */
#define TFS_SCRATCH_ALIGN ((size_t)4096)
/* Larger requests get a buffer of their own, unmapped at put. */
#define TFS_SCRATCH_MAX ((size_t)2 << 20)

/*
 * A page-aligned buffer of at least size bytes (size > 0), of unspecified
 * content, for this thread alone until tfs_scratch_put; NULL if memory
 * cannot be mapped.  Nested gets return distinct buffers.
 */
void *tfs_scratch_get(size_t size);

/* Gives back buf, from tfs_scratch_get(size) on this thread.  NULL is ignored. */
void tfs_scratch_put(void *buf, size_t size);

/* Bytes this thread keeps between requests (its cached buffers). */
size_t tfs_scratch_kept(void);

#endif
