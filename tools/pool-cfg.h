/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pool-cfg.h - what the offline tools need of a pool.cfg: where the
 * metadata device is.
 *
 * Owns: turning a tool argument that may be a pool.cfg into a metadata path.
 * Never: writes devices.  The file is parsed and checked by the daemon's own
 * configuration code (src/engine/config.c), so a tool reports exactly the
 * problems `thinfs mount` would, and uses nothing from a file that has one;
 * only the metadata is read by the tools' own reader.
 */
#ifndef TFS_TOOLS_POOL_CFG_H
#define TFS_TOOLS_POOL_CFG_H

#include <stddef.h>

/*
 * If arg ends in ".cfg", load it as the daemon does (tfs_config_load: every
 * key and value checked, devices resolved, relative paths taken from the
 * .cfg's directory) and copy its [pool] metadata path into out.  Otherwise
 * copy arg itself.  On failure every problem has been logged ("file:line:
 * ..." for the configuration) and -errno is returned.
 */
int tfs_pool_cfg_metadata_path(const char *arg, char *out, size_t out_len);

/*
 * For a .cfg argument (anything else: 0 at once): check every persistent
 * COW store, of pool.cfg's [snapshot] sections and of the snapshots made
 * with thinfs-ctl that the catalog records, with tfs_snap_store_check,
 * read-only.  Prints one line per store (only problems when quiet),
 * naming the snapshot.  0 all clean, 1 a store has a problem, 2 one could
 * not be read (or the .cfg loaded).
 */
#include <stdbool.h>
int tfs_pool_cfg_check_cow_stores(const char *arg, bool quiet);

#endif
