/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * fuse-ops.h - the FUSE low-level operations of a mounted pool.
 *
 * Owns: turning each FUSE request into namespace calls (fs.h) or volume
 * I/O (pool.h), and replying to it exactly once.  The session's userdata
 * is the struct tfs_fs.
 *
 * Never: keeps state of its own (everything is in struct tfs_fs), or
 * changes the catalog except through fs.h.
 */
#ifndef TFS_FS_FUSE_OPS_H
#define TFS_FS_FUSE_OPS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

extern const struct fuse_lowlevel_ops tfs_fuse_ops;

/* Largest write the daemon asks the kernel for (conn->max_write). */
#define TFS_FUSE_MAX_WRITE (1u << 20)

#endif
