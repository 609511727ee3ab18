/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "pool-cfg.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && !strcmp(s + n - m, suffix);
}

static int copy_out(const char *s, char *out, size_t out_len)
{
	if (strlen(s) >= out_len) {
		tfs_err("path too long: %s", s);
		return -ENAMETOOLONG;
	}
	strcpy(out, s);
	return 0;
}

int tfs_pool_cfg_metadata_path(const char *arg, char *out, size_t out_len)
{
	struct tfs_pool_config *cfg;
	int r;

	if (!ends_with(arg, ".cfg"))
		return copy_out(arg, out, out_len);
	cfg = malloc(sizeof(*cfg));
	if (!cfg) {
		tfs_err("out of memory");
		return -ENOMEM;
	}
	/* Every problem is logged there, with file:line, and a file with one is not used. */
	r = tfs_config_load(arg, cfg);
	if (!r)
		r = copy_out(cfg->metadata, out, out_len);
	free(cfg);
	return r;
}
