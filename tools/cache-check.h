/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-check.h - `thinfs check POOL.cfg` for the pool's [cache] sections.
 *
 * Owns: opening each cache's metadata (src/meta/cache-metadata.h), loading
 * every mapping and discard bit (which validates every block on the way),
 * refusing an origin block mapped twice, reporting needs_check, and with
 * clear clearing it when all of that passed.
 * Never: touches the cache or origin devices, or metadata that did not pass.
 */
#ifndef TFS_TOOLS_CACHE_CHECK_H
#define TFS_TOOLS_CACHE_CHECK_H

#include <stdbool.h>

/*
 * For an argument ending in ".cfg": check every cache of it, one line each
 * on stdout (unless quiet), problems on stderr.  0 all clean (also when the
 * argument is not a .cfg or has no caches), 1 a cache's metadata has errors,
 * 2 it could not be read.
 */
int tfs_check_caches(const char *arg, bool clear, bool quiet);

#endif
