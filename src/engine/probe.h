/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * probe.h - what a device or file already holds, before mkpool formats it.
 *
 * Owns: asking libblkid for filesystems, partition tables, RAID/LVM
 * members and other signatures, and recognising a dm-thin superblock, so
 * that `thinfs mkpool` can refuse to destroy something (unless --force)
 * and name what it found.
 *
 * Never: writes, locks or keeps a device open; decides policy (the caller
 * chooses whether a signature is fatal); logs (the caller knows which
 * pool.cfg key named the device, so it writes the message).
 *
 * Both calls read a few blocks from the start (and, for some signatures,
 * the end) of the device: cost is a handful of small reads.  Thread-safe.
 */
#ifndef TFS_ENGINE_PROBE_H
#define TFS_ENGINE_PROBE_H

#include <stddef.h>

/*
 * Probe path with libblkid (superblocks and partition tables, "safe"
 * probing: ambiguous results count as found).  Returns 1 and a one-line
 * description in what (always NUL-terminated, truncated to what_len), e.g.
 * "ext4 filesystem (UUID=..., LABEL=...)", "dos partition table",
 * "LVM2_member RAID or volume manager member", "several signatures";
 * 0 when nothing is found (what = ""); -errno when path cannot be opened
 * or read (-ENOENT, -EACCES, -EIO).
 */
int tfs_probe_signature(const char *path, char *what, size_t what_len);

/*
 * 1 when block 0 carries the dm-thin superblock magic (a thinfs or kernel
 * dm-thin pool: mkpool says "already a thin pool" and wants --force),
 * 0 when not (including a file too short to hold a superblock), -errno
 * on error.
 * The checksum is not checked: a damaged pool is still a pool.
 */
int tfs_probe_thin_metadata(const char *path);

#endif
