/* SPDX-License-Identifier: GPL-2.0-or-later */
/* `thinfs check POOL.cfg` for caches (cache-check.h). */
#include "cache-check.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "cache-metadata.h"
#include "config.h"

struct scan {
	uint64_t *oblocks;
	uint32_t nr, dirty;
};

static int keep(void *ctx, uint32_t cb, uint64_t ob, bool dirty, const void *hint)
{
	struct scan *s = ctx;

	(void)cb;
	(void)hint;
	s->oblocks[s->nr++] = ob;
	s->dirty += dirty;
	return 0;
}

static int no_op(void *ctx, uint64_t db, bool on)
{
	(void)ctx;
	(void)db;
	(void)on;
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static bool is_zero(struct tfs_bdev *b)
{
	uint8_t buf[4096];

	if (tfs_bdev_read(b, buf, sizeof(buf), 0) < 0)
		return false;
	for (size_t i = 0; i < sizeof(buf); i++)
		if (buf[i])
			return false;
	return true;
}

/* Load everything; 0 clean, 1 errors (reported), 2 unreadable (reported). */
static int scan_cache(const struct tfs_cache_cfg *c, struct tfs_bdev *b, bool *needs_check,
		      bool quiet)
{
	struct tfs_cmd_open_options oo = { .block_sectors = c->block_sectors, .read_only = true };
	struct tfs_cmd_info info;
	struct scan s = { 0 };
	struct tfs_cmd *cmd;
	int r = tfs_cmd_open(b, &oo, &cmd), status = 0;

	if (r < 0) {
		fprintf(stderr, "thinfs check: cache %s: metadata %s refused: %s\n", c->name,
			c->metadata, strerror(-r));
		return r == -EIO ? 2 : 1;
	}
	tfs_cmd_info(cmd, &info);
	*needs_check = tfs_cmd_needs_check(cmd);
	s.oblocks = calloc(info.nr_cache_blocks + 1, sizeof(*s.oblocks));
	r = s.oblocks ? tfs_cmd_load_mappings(cmd, NULL, keep, &s) : -ENOMEM;
	if (r == 0)
		r = tfs_cmd_load_discards(cmd, no_op, NULL);
	if (r < 0) {
		fprintf(stderr, "thinfs check: cache %s: cannot read its metadata: %s\n", c->name,
			strerror(-r));
		status = r == -EUCLEAN ? 1 : 2;
	} else {
		qsort(s.oblocks, s.nr, sizeof(*s.oblocks), cmp_u64);
		for (uint32_t i = 1; i < s.nr && !status; i++) {
			if (s.oblocks[i] == s.oblocks[i - 1]) {
				fprintf(stderr, "thinfs check: cache %s: origin block %" PRIu64
					" is mapped twice\n", c->name, s.oblocks[i]);
				status = 1;
			}
		}
	}
	if (!status && !quiet)
		printf("cache %s: %s: clean: version %" PRIu32 ", %" PRIu32 "/%" PRIu32
		       " cache blocks mapped, %" PRIu32 " dirty%s%s\n", c->name, c->metadata,
		       info.version, s.nr, info.nr_cache_blocks, s.dirty,
		       tfs_cmd_clean_when_opened(cmd) ? "" : " (unclean shutdown: all count as dirty)",
		       *needs_check ? "; needs_check is set" : "");
	free(s.oblocks);
	tfs_cmd_close(cmd);
	return status;
}

static int check_one(const struct tfs_cache_cfg *c, bool clear, bool quiet)
{
	struct tfs_cmd_open_options oo = { .block_sectors = c->block_sectors };
	struct tfs_bdev *b;
	struct tfs_cmd *cmd;
	bool needs_check = false;
	int r = tfs_bdev_open(c->metadata, !clear, &b), status;

	if (r < 0)
		return 2; /* logged */
	if (is_zero(b)) {
		if (!quiet)
			printf("cache %s: %s: not formatted yet (a new cache)\n", c->name,
			       c->metadata);
		tfs_bdev_close(b);
		return 0;
	}
	status = scan_cache(c, b, &needs_check, quiet);
	if (!status && needs_check && clear) {
		/* Read-write clears the clean flag too: every mapped block counts as dirty. */
		r = tfs_cmd_open(b, &oo, &cmd);
		if (r == 0) {
			r = tfs_cmd_set_needs_check(cmd, false);
			tfs_cmd_close(cmd);
		}
		if (r < 0) {
			fprintf(stderr, "thinfs check: cache %s: cannot clear needs_check: %s\n",
				c->name, strerror(-r));
			status = 2;
		} else if (!quiet) {
			printf("cache %s: needs_check cleared\n", c->name);
		}
	} else if (!status && needs_check && !quiet) {
		printf("cache %s: needs_check stays set (--clear-needs-check clears it)\n", c->name);
	}
	tfs_bdev_close(b);
	return status;
}

int tfs_check_caches(const char *arg, bool clear, bool quiet)
{
	size_t n = strlen(arg);
	struct tfs_pool_config *cfg;
	int status = 0;

	if (n < 4 || strcmp(arg + n - 4, ".cfg"))
		return 0;
	cfg = malloc(sizeof(*cfg));
	if (!cfg || tfs_config_load(arg, cfg) < 0) {
		free(cfg);
		return 2; /* logged */
	}
	for (unsigned i = 0; i < cfg->nr_caches; i++) {
		int r = check_one(&cfg->caches[i], clear, quiet);

		status = r > status ? r : status;
	}
	free(cfg);
	return status;
}
