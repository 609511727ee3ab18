/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * wb-stash.h - writebacks of the kernel's page cache that the engine
 * would hold (a suspended volume, a pool out of data space in queue
 * mode), taken off the kernel: copied into the daemon's memory and
 * answered at once, then written by a thread of the volume's own once
 * the engine takes them.
 *
 * Why: with the writeback cache every close(2) of a file waits until its
 * dirty pages are written back.  A writeback the engine holds would hold
 * each close with it, the implicit ones of a child's exec included, so a
 * writer that runs `thinfs-ctl resume` as a child would wait for itself.
 * A block device's close does not wait; with the stash ours does not either.
 *
 * Owns: the records of each volume (in arrival order, written in that
 * order), the mount's byte count of them (bounded: past TFS_WB_STASH_MAX a
 * writeback waits for room, as it would have waited for the engine), and
 * the writeback error a failed record leaves for the file's next fsync
 * or close.  Reads see stashed bytes; writes, discards and truncates that
 * overlap a record wait for it, so nothing overtakes it.
 *
 * Never: stashes anything but a writeback (a write(2) of the page cache
 * the kernel already acknowledged), or answers an fsync before the
 * volume's records are written.
 */
#ifndef TFS_FS_WB_STASH_H
#define TFS_FS_WB_STASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_fs;
struct tfs_inode;
struct tfs_wb_rec;

/* Bytes of writebacks the mount keeps at most. */
#define TFS_WB_STASH_MAX (64ull << 20)

/* Per-volume state, in struct tfs_inode (fs.h). */
void tfs_wb_inode_init(struct tfs_inode *ino);
void tfs_wb_inode_destroy(struct tfs_inode *ino);

/*
 * A writeback of [off, off+len) of ino, opened by the caller: written now
 * if nothing is stashed and the engine takes it at once, else stashed and
 * written by the volume's writer; 0 either way, or the write's -errno.
 */
int tfs_wb_write(struct tfs_fs *fs, struct tfs_inode *ino, const void *buf, size_t len,
		 uint64_t off);

/* Wait until no record overlaps [off, off+len) (len 0: none at all is left). */
void tfs_wb_wait(struct tfs_inode *ino, uint64_t off, uint64_t len);
/* The error a failed record left for the file (0 if none), cleared: reported once. */
int tfs_wb_take_error(struct tfs_inode *ino);

/*
 * Reads: take copies of the records overlapping [off, off+len) before
 * reading the device (*out NULL: none; -ENOMEM), lay them over what was
 * read after (which frees them).
 */
int tfs_wb_overlay_take(struct tfs_inode *ino, uint64_t off, uint64_t len,
			struct tfs_wb_rec **out);
void tfs_wb_overlay_apply(struct tfs_wb_rec *ov, void *buf, uint64_t off);

/* Bytes of writebacks the mount holds in its stashes now (status). */
uint64_t tfs_wb_stashed_bytes(struct tfs_fs *fs);

/* Shutdown, after the engine stopped holding: wait for every volume's writer to finish. */
void tfs_wb_drain_all(struct tfs_fs *fs);

#endif
