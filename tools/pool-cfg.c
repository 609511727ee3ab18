/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "pool-cfg.h"

#include <blkid/blkid.h>
#include <errno.h>
#include <ini.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cfg_state {
	char metadata[4096];
	bool found;
	bool too_long;
};

static int on_entry(void *user, const char *section, const char *name, const char *value)
{
	struct cfg_state *st = user;

	if (strcmp(section, "pool") || strcmp(name, "metadata"))
		return 1;
	if (strlen(value) >= sizeof(st->metadata)) {
		st->too_long = true;
		return 0;
	}
	strcpy(st->metadata, value);
	st->found = true;
	return 1;
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && !strcmp(s + n - m, suffix);
}

static int copy_out(const char *s, char *out, size_t out_len)
{
	if (strlen(s) >= out_len) {
		fprintf(stderr, "thinfs: path too long: %s\n", s);
		return -ENAMETOOLONG;
	}
	strcpy(out, s);
	return 0;
}

int tfs_pool_cfg_metadata_path(const char *arg, char *out, size_t out_len)
{
	struct cfg_state st = { .found = false };
	const char *slash;
	int line;

	if (!ends_with(arg, ".cfg"))
		return copy_out(arg, out, out_len);

	line = ini_parse(arg, on_entry, &st);
	if (line < 0) {
		fprintf(stderr, "thinfs: cannot read %s\n", arg);
		return -ENOENT;
	}
	if (line > 0 && !st.too_long) {
		fprintf(stderr, "thinfs: %s:%d: syntax error\n", arg, line);
		return -EINVAL;
	}
	if (st.too_long || !st.found || !st.metadata[0]) {
		fprintf(stderr, "thinfs: %s: %s\n", arg,
			st.too_long ? "[pool] metadata is too long" : "no [pool] metadata = PATH");
		return -EINVAL;
	}
	if (!strncmp(st.metadata, "UUID=", 5) || !strncmp(st.metadata, "LABEL=", 6)) {
		/* The same resolution the daemon uses (libblkid), without linking the engine. */
		char *dev = blkid_evaluate_tag(st.metadata, NULL, NULL);
		if (!dev) {
			fprintf(stderr, "thinfs: %s: no device has %s\n", arg, st.metadata);
			return -ENOENT;
		}
		int n = snprintf(out, out_len, "%s", dev);
		free(dev);
		return n < 0 || (size_t)n >= out_len ? -ENAMETOOLONG : 0;
	}

	/* A relative path means: next to the .cfg file, wherever we run from. */
	slash = strrchr(arg, '/');
	if (st.metadata[0] == '/' || !slash)
		return copy_out(st.metadata, out, out_len);
	if ((size_t)(slash - arg) + 1 + strlen(st.metadata) >= out_len) {
		fprintf(stderr, "thinfs: path too long: %s\n", st.metadata);
		return -ENAMETOOLONG;
	}
	snprintf(out, out_len, "%.*s/%s", (int)(slash - arg), arg, st.metadata);
	return 0;
}
