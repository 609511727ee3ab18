/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-config.h - a [cache "NAME"] section of pool.cfg as the cache
 * target needs it (README "pool.cfg reference").  config.c reads the
 * INI and reports problems with file:line; cache-config.c knows the keys.
 *
 * Never: opens a device for I/O.
 */
#ifndef TFS_ENGINE_CACHE_CONFIG_H
#define TFS_ENGINE_CACHE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TFS_CACHE_PATH_MAX 4096 /* TFS_PATH_MAX (config.h includes this header) */

enum tfs_cache_mode { TFS_CACHE_WRITETHROUGH, TFS_CACHE_WRITEBACK, TFS_CACHE_PASSTHROUGH };
enum tfs_cache_policy_kind { TFS_CACHE_SMQ, TFS_CACHE_CLEANER };

/* A [cache "NAME"] section of pool.cfg, checked (cache-config.c). */
struct tfs_cache_cfg {
	char name[256];
	/* resolved paths */
	char origin[TFS_CACHE_PATH_MAX], cache[TFS_CACHE_PATH_MAX], metadata[TFS_CACHE_PATH_MAX];
	uint32_t block_sectors;           /* default 128 (64 KiB) */
	enum tfs_cache_mode mode;         /* default writethrough */
	enum tfs_cache_policy_kind policy; /* default smq */
	uint64_t migration_threshold;     /* sectors, default 2048 */
	uint32_t metadata_version;        /* default 2 */
	bool discard_passdown;            /* default no */
};

/* Defaults for section name. */
void tfs_cache_cfg_defaults(struct tfs_cache_cfg *c, const char *name);
/*
 * One key of the section: 0, or -EINVAL with why (e.g. "block_size: 100k is
 * not a multiple of 32k") for the caller to report with file and line;
 * -ENOENT a device that does not exist (why says so).  Devices are
 * resolved relative to base_dir.
 */
int tfs_cache_cfg_set(struct tfs_cache_cfg *c, const char *key, const char *value,
		      const char *base_dir, char *why, size_t why_len);
/* After all keys: required devices present and all three different.  -EINVAL with why. */
int tfs_cache_cfg_check(const struct tfs_cache_cfg *c, char *why, size_t why_len);

const char *tfs_cache_mode_name(enum tfs_cache_mode m);
const char *tfs_cache_policy_name(enum tfs_cache_policy_kind p);
/* "writeback" -> mode; -EINVAL for any other word. */
int tfs_cache_mode_parse(const char *s, enum tfs_cache_mode *out);
/* "smq", "mq" (its alias), "cleaner". */
int tfs_cache_policy_parse(const char *s, enum tfs_cache_policy_kind *out);

#endif
