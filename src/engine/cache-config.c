/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-config.c - the keys of a [cache "NAME"] section (cache.h).  The
 * INI reading, line numbers and "each key once" stay in config.c; this
 * file knows what the values mean.
 */
#include "cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config.h"

#define SECTOR 512u
#define BLOCK_MIN (32u * 1024)
#define BLOCK_MAX (1024u * 1024 * 1024)

static const char *const mode_names[] = {
	[TFS_CACHE_WRITETHROUGH] = "writethrough",
	[TFS_CACHE_WRITEBACK] = "writeback",
	[TFS_CACHE_PASSTHROUGH] = "passthrough",
};

const char *tfs_cache_mode_name(enum tfs_cache_mode m)
{
	return mode_names[m];
}

const char *tfs_cache_policy_name(enum tfs_cache_policy_kind p)
{
	return p == TFS_CACHE_SMQ ? "smq" : "cleaner";
}

int tfs_cache_mode_parse(const char *s, enum tfs_cache_mode *out)
{
	for (unsigned i = 0; i < sizeof(mode_names) / sizeof(mode_names[0]); i++) {
		if (!strcmp(s, mode_names[i])) {
			*out = (enum tfs_cache_mode)i;
			return 0;
		}
	}
	return -EINVAL;
}

int tfs_cache_policy_parse(const char *s, enum tfs_cache_policy_kind *out)
{
	/* The kernel took mq's name over for smq: old tables still say mq. */
	if (!strcmp(s, "smq") || !strcmp(s, "mq"))
		*out = TFS_CACHE_SMQ;
	else if (!strcmp(s, "cleaner"))
		*out = TFS_CACHE_CLEANER;
	else
		return -EINVAL;
	return 0;
}

void tfs_cache_cfg_defaults(struct tfs_cache_cfg *c, const char *name)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->name, sizeof(c->name), "%s", name);
	c->block_sectors = 64 * 1024 / SECTOR;
	c->mode = TFS_CACHE_WRITETHROUGH;
	c->policy = TFS_CACHE_SMQ;
	c->migration_threshold = 2048;
	c->metadata_version = 2;
	c->discard_passdown = false;
}

static int parse_bool(const char *s, bool *out)
{
	static const char *const yes[] = { "yes", "true", "on", "1" };
	static const char *const no[] = { "no", "false", "off", "0" };

	for (unsigned i = 0; i < 4; i++) {
		if (!strcasecmp(s, yes[i]) || !strcasecmp(s, no[i])) {
			*out = !strcasecmp(s, yes[i]);
			return 0;
		}
	}
	return -EINVAL;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!*s || *s == '-' || *s == '+')
		return -EINVAL;
	errno = 0;
	*out = strtoull(s, &end, 10);
	return errno || *end ? -EINVAL : 0;
}

static int set_device(char *dst, size_t dst_len, const char *key, const char *value,
		      const char *base_dir, char *why, size_t why_len)
{
	int r = tfs_config_resolve_device(value, base_dir, dst, dst_len);

	if (r < 0)
		snprintf(why, why_len, "%s: %s: %s", key, value,
			 r == -ENOENT ? "no such file or device" : strerror(-r));
	return r == -ENOENT ? -ENOENT : r < 0 ? -EINVAL : 0;
}

int tfs_cache_cfg_set(struct tfs_cache_cfg *c, const char *key, const char *value,
		      const char *base_dir, char *why, size_t why_len)
{
	uint64_t n;

	if (!strcmp(key, "origin"))
		return set_device(c->origin, sizeof(c->origin), key, value, base_dir, why, why_len);
	if (!strcmp(key, "cache"))
		return set_device(c->cache, sizeof(c->cache), key, value, base_dir, why, why_len);
	if (!strcmp(key, "metadata"))
		return set_device(c->metadata, sizeof(c->metadata), key, value, base_dir, why,
				  why_len);
	if (!strcmp(key, "block_size")) {
		if (tfs_parse_size(value, &n, NULL) < 0) {
			snprintf(why, why_len, "block_size: '%s' is not a size", value);
			return -EINVAL;
		}
		if (n < BLOCK_MIN || n > BLOCK_MAX || n % BLOCK_MIN) {
			snprintf(why, why_len, "block_size: %s is not 32k .. 1g in multiples of 32k",
				 value);
			return -EINVAL;
		}
		c->block_sectors = (uint32_t)(n / SECTOR);
		return 0;
	}
	if (!strcmp(key, "mode")) {
		if (tfs_cache_mode_parse(value, &c->mode) == 0)
			return 0;
		snprintf(why, why_len, "mode: '%s' (expected writethrough, writeback or passthrough)",
			 value);
		return -EINVAL;
	}
	if (!strcmp(key, "policy")) {
		if (tfs_cache_policy_parse(value, &c->policy) == 0)
			return 0;
		snprintf(why, why_len, "policy: '%s' (expected smq, mq or cleaner)", value);
		return -EINVAL;
	}
	if (!strcmp(key, "migration_threshold")) {
		if (parse_u64(value, &n) == 0 && n <= UINT32_MAX) {
			c->migration_threshold = n;
			return 0;
		}
		snprintf(why, why_len, "migration_threshold: '%s' is not a number of sectors", value);
		return -EINVAL;
	}
	if (!strcmp(key, "metadata_version")) {
		if (!strcmp(value, "1") || !strcmp(value, "2")) {
			c->metadata_version = (uint32_t)(value[0] - '0');
			return 0;
		}
		snprintf(why, why_len, "metadata_version: '%s' (expected 1 or 2)", value);
		return -EINVAL;
	}
	if (!strcmp(key, "discard_passdown")) {
		if (parse_bool(value, &c->discard_passdown) == 0)
			return 0;
		snprintf(why, why_len, "discard_passdown: '%s' is not yes or no", value);
		return -EINVAL;
	}
	snprintf(why, why_len, "unknown key '%s'", key);
	return -EINVAL;
}

int tfs_cache_cfg_check(const struct tfs_cache_cfg *c, char *why, size_t why_len)
{
	const char *const keys[] = { "origin", "cache", "metadata" };
	const char *const devs[] = { c->origin, c->cache, c->metadata };

	for (unsigned i = 0; i < 3; i++) {
		if (!devs[i][0]) {
			snprintf(why, why_len, "%s: required (a device or file)", keys[i]);
			return -EINVAL;
		}
	}
	for (unsigned i = 0; i < 3; i++) {
		for (unsigned j = i + 1; j < 3; j++) {
			if (!strcmp(devs[i], devs[j])) {
				snprintf(why, why_len, "%s and %s are the same device (%s)", keys[i],
					 keys[j], devs[i]);
				return -EINVAL;
			}
		}
	}
	return 0;
}
