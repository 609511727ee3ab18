/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pool-cfg.h - the little of pool.cfg the offline tools need: where the
 * metadata device is.
 *
 * Owns: turning a tool argument that may be a pool.cfg into a metadata path.
 * Never: opens devices, or understands any other key (the daemon's own
 * configuration code owns pool.cfg as a whole).
 */
#ifndef TFS_TOOLS_POOL_CFG_H
#define TFS_TOOLS_POOL_CFG_H

#include <stddef.h>

/*
 * If arg ends in ".cfg", parse it (INI, libinih) and copy [pool] metadata
 * into out; a relative metadata path is taken relative to the directory of
 * the .cfg file; UUID= and LABEL= names are resolved with libblkid, as the
 * daemon resolves them.  Otherwise copy arg itself.  On failure
 * prints the reason to stderr, prefixed "thinfs: ", and returns -errno.
 */
int tfs_pool_cfg_metadata_path(const char *arg, char *out, size_t out_len);

#endif
