/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cache-meta-tool: drive src/meta/cache-metadata on a metadata file, so the
 * integration tests can hold cache_check / cache_dump / cache_restore (an
 * independent implementation of the format) against it.  Not installed.
 *
 *   cache-meta-tool format IMAGE --block-sectors N --cache-blocks N
 *                   --metadata-version 1|2 [--policy NAME] [--policy-version A.B.C]
 *                   [--hint-size N]
 *   cache-meta-tool run IMAGE OP...      open read-write, apply OPs in order
 *   cache-meta-tool dump IMAGE           open read-only, print JSON
 *
 * OPs (numbers decimal; a hint is hex bytes):
 *   insert:C:O  remove:C  dirty:C  clean:C  hint:C:HEX  resize:N
 *   discard-size:SECTORS:N  discard:D  undiscard:D  stats:RH:RM:WH:WM
 *   policy:NAME:A.B.C:HINT_SIZE  commit  commit-clean  abort
 *   needs-check  clear-needs-check
 * run stops at the first failing OP and exits 1 (nothing is committed
 * that an OP before it did not commit).
 *
 * dump prints {"version", "block_sectors", "nr_cache_blocks", "policy",
 * "policy_version", "hint_size", "discard_block_sectors",
 * "discard_nr_blocks", "needs_check", "clean_shutdown", "stats":{...},
 * "mappings":[[cblock, oblock, dirty, stored_dirty, hint_hex|null], ...],
 * "discards":[dblock, ...]}: dirty and hints as a restart sees them
 * (tfs_cmd_load_mappings with the stored policy), stored_dirty as stored.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "cache-metadata.h"
#include "log.h"

static int usage(void)
{
	fprintf(stderr, "usage: cache-meta-tool format|run|dump IMAGE [ARGS...]\n");
	return 2;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 10);
	if (errno || end == s || *end) {
		fprintf(stderr, "cache-meta-tool: '%s' is not a number\n", s);
		return -EINVAL;
	}
	return 0;
}

static int parse_u32(const char *s, uint32_t *out)
{
	uint64_t v;
	int r = parse_u64(s, &v);

	if (!r && v > UINT32_MAX) {
		fprintf(stderr, "cache-meta-tool: %s is too large\n", s);
		r = -EINVAL;
	}
	if (!r)
		*out = (uint32_t)v;
	return r;
}

static int parse_version(const char *s, uint32_t v[3])
{
	if (sscanf(s, "%" SCNu32 ".%" SCNu32 ".%" SCNu32, &v[0], &v[1], &v[2]) != 3) {
		fprintf(stderr, "cache-meta-tool: policy version '%s' is not A.B.C\n", s);
		return -EINVAL;
	}
	return 0;
}

static int set_name(struct tfs_cache_policy *p, const char *name)
{
	if (strlen(name) >= sizeof(p->name)) {
		fprintf(stderr, "cache-meta-tool: policy name '%s' is too long\n", name);
		return -EINVAL;
	}
	strcpy(p->name, name);
	return 0;
}

static int cmd_format(const char *image, int argc, char **argv)
{
	struct tfs_cmd_format_options opt = { .metadata_version = 2,
					      .policy = { .name = "smq", .version = { 2, 0, 0 },
							  .hint_size = 4 } };
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	int r = 0;

	for (int i = 0; i < argc && !r; i += 2) {
		const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			return usage();
		if (!strcmp(k, "--block-sectors"))
			r = parse_u32(v, &opt.block_sectors);
		else if (!strcmp(k, "--cache-blocks"))
			r = parse_u32(v, &opt.nr_cache_blocks);
		else if (!strcmp(k, "--metadata-version"))
			r = parse_u32(v, &opt.metadata_version);
		else if (!strcmp(k, "--policy"))
			r = set_name(&opt.policy, v);
		else if (!strcmp(k, "--policy-version"))
			r = parse_version(v, opt.policy.version);
		else if (!strcmp(k, "--hint-size"))
			r = parse_u32(v, &opt.policy.hint_size);
		else
			return usage();
	}
	if (r)
		return 1;
	r = tfs_bdev_open(image, false, &dev);
	if (r) {
		fprintf(stderr, "cache-meta-tool: %s: %s\n", image, strerror(-r));
		return 1;
	}
	r = tfs_cmd_format(dev, &opt, &cmd);
	if (!r)
		tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
	return r ? 1 : 0;
}

static int parse_hex(const char *s, uint8_t *out, size_t len)
{
	if (strlen(s) != 2 * len) {
		fprintf(stderr, "cache-meta-tool: hint '%s' is not %zu hex bytes\n", s, len);
		return -EINVAL;
	}
	for (size_t i = 0; i < len; i++) {
		unsigned b;
		if (sscanf(s + 2 * i, "%2x", &b) != 1)
			return -EINVAL;
		out[i] = (uint8_t)b;
	}
	return 0;
}

/* Split "a:b:c" in place into at most max fields. */
static int split(char *op, char **f, int max)
{
	int n = 0;

	for (char *save = NULL, *t = strtok_r(op, ":", &save); t && n < max;
	     t = strtok_r(NULL, ":", &save))
		f[n++] = t;
	return n;
}

static int apply(struct tfs_cmd *cmd, char *op)
{
	char *f[6];
	int n = split(op, f, 6);
	uint32_t c = 0, x[4];
	uint64_t o = 0;
	int r = 0;

	if (n == 0)
		return -EINVAL;
#define NEED(k) do { if (n != (k)) return -EINVAL; } while (0)
	if (!strcmp(f[0], "insert")) {
		NEED(3);
		r = parse_u32(f[1], &c);
		if (!r)
			r = parse_u64(f[2], &o);
		return r ? r : tfs_cmd_insert(cmd, c, o);
	}
	if (!strcmp(f[0], "remove") || !strcmp(f[0], "dirty") || !strcmp(f[0], "clean")) {
		NEED(2);
		r = parse_u32(f[1], &c);
		if (r)
			return r;
		if (f[0][0] == 'r')
			return tfs_cmd_remove(cmd, c);
		return tfs_cmd_set_dirty(cmd, c, f[0][0] == 'd');
	}
	if (!strcmp(f[0], "hint")) {
		struct tfs_cmd_info info;
		uint8_t h[TFS_CACHE_MAX_HINT_SIZE];
		NEED(3);
		tfs_cmd_info(cmd, &info);
		r = parse_u32(f[1], &c);
		if (!r)
			r = parse_hex(f[2], h, info.policy.hint_size);
		return r ? r : tfs_cmd_set_hint(cmd, c, h);
	}
	if (!strcmp(f[0], "resize")) {
		NEED(2);
		r = parse_u32(f[1], &c);
		return r ? r : tfs_cmd_resize(cmd, c, NULL);
	}
	if (!strcmp(f[0], "discard-size")) {
		uint64_t bs;
		NEED(3);
		r = parse_u64(f[1], &bs);
		if (!r)
			r = parse_u64(f[2], &o);
		return r ? r : tfs_cmd_resize_discard(cmd, bs, o);
	}
	if (!strcmp(f[0], "discard") || !strcmp(f[0], "undiscard")) {
		NEED(2);
		r = parse_u64(f[1], &o);
		return r ? r : tfs_cmd_set_discard(cmd, o, f[0][0] == 'd');
	}
	if (!strcmp(f[0], "stats")) {
		NEED(5);
		for (int i = 0; i < 4 && !r; i++)
			r = parse_u32(f[i + 1], &x[i]);
		if (r)
			return r;
		return tfs_cmd_set_stats(cmd, &(struct tfs_cache_stats){ x[0], x[1], x[2], x[3] });
	}
	if (!strcmp(f[0], "policy")) {
		struct tfs_cache_policy p = { .name = "" };
		NEED(4);
		r = set_name(&p, f[1]);
		if (!r)
			r = parse_version(f[2], p.version);
		if (!r)
			r = parse_u32(f[3], &p.hint_size);
		return r ? r : tfs_cmd_set_policy(cmd, &p);
	}
#undef NEED
	if (n != 1)
		return -EINVAL;
	if (!strcmp(f[0], "commit") || !strcmp(f[0], "commit-clean"))
		return tfs_cmd_commit(cmd, !strcmp(f[0], "commit-clean"));
	if (!strcmp(f[0], "abort"))
		return tfs_cmd_abort(cmd);
	if (!strcmp(f[0], "needs-check") || !strcmp(f[0], "clear-needs-check"))
		return tfs_cmd_set_needs_check(cmd, f[0][0] == 'n');
	return -EINVAL;
}

static int cmd_run(const char *image, int argc, char **argv)
{
	struct tfs_cmd_open_options opt = { 0 };
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd = NULL;
	int r;

	r = tfs_bdev_open(image, false, &dev);
	if (r) {
		fprintf(stderr, "cache-meta-tool: %s: %s\n", image, strerror(-r));
		return 1;
	}
	r = tfs_cmd_open(dev, &opt, &cmd);
	for (int i = 0; i < argc && !r; i++) {
		char *op = strdup(argv[i]);
		r = op ? apply(cmd, op) : -ENOMEM;
		free(op);
		if (r)
			fprintf(stderr, "cache-meta-tool: %s failed: %s\n", argv[i], strerror(-r));
	}
	if (cmd)
		tfs_cmd_close(cmd);
	tfs_bdev_close(dev);
	return r ? 1 : 0;
}

struct dump_ctx {
	struct tfs_cmd *cmd;
	uint32_t hint_size;
	bool first;
	int err;
};

static int dump_mapping(void *ctx, uint32_t cblock, uint64_t oblock, bool dirty, const void *hint)
{
	struct dump_ctx *d = ctx;
	struct tfs_cache_mapping m;
	int r = tfs_cmd_lookup(d->cmd, cblock, &m);

	if (r)
		return r;
	printf("%s[%" PRIu32 ",%" PRIu64 ",%s,%s,", d->first ? "" : ",", cblock, oblock,
	       dirty ? "true" : "false", m.dirty ? "true" : "false");
	if (hint) {
		putchar('"');
		for (uint32_t i = 0; i < d->hint_size; i++)
			printf("%02x", ((const uint8_t *)hint)[i]);
		putchar('"');
	} else {
		fputs("null", stdout);
	}
	putchar(']');
	d->first = false;
	return 0;
}

static int dump_discard(void *ctx, uint64_t dblock, bool discarded)
{
	struct dump_ctx *d = ctx;

	if (discarded) {
		printf("%s%" PRIu64, d->first ? "" : ",", dblock);
		d->first = false;
	}
	return 0;
}

static int cmd_dump(const char *image)
{
	struct tfs_cmd_open_options opt = { .read_only = true };
	struct tfs_cache_stats st;
	struct tfs_cmd_info info;
	struct tfs_bdev *dev;
	struct tfs_cmd *cmd;
	struct dump_ctx d;
	int r;

	r = tfs_bdev_open(image, true, &dev);
	if (r) {
		fprintf(stderr, "cache-meta-tool: %s: %s\n", image, strerror(-r));
		return 1;
	}
	r = tfs_cmd_open(dev, &opt, &cmd);
	if (r)
		goto out_close_dev;
	tfs_cmd_info(cmd, &info);
	tfs_cmd_get_stats(cmd, &st);
	printf("{\"version\":%u,\"block_sectors\":%u,\"nr_cache_blocks\":%u,\"policy\":\"%s\","
	       "\"policy_version\":[%u,%u,%u],\"hint_size\":%u,\"discard_block_sectors\":%" PRIu64
	       ",\"discard_nr_blocks\":%" PRIu64 ",\"needs_check\":%s,\"clean_shutdown\":%s,"
	       "\"meta_total\":%" PRIu64 ",\"meta_free\":%" PRIu64 ","
	       "\"stats\":{\"read_hits\":%u,\"read_misses\":%u,\"write_hits\":%u,"
	       "\"write_misses\":%u},\"mappings\":[",
	       info.version, info.block_sectors, info.nr_cache_blocks, info.policy.name,
	       info.policy.version[0], info.policy.version[1], info.policy.version[2],
	       info.policy.hint_size, info.discard_block_sectors, info.discard_nr_blocks,
	       tfs_cmd_needs_check(cmd) ? "true" : "false",
	       tfs_cmd_clean_when_opened(cmd) ? "true" : "false", info.meta_total, info.meta_free,
	       st.read_hits, st.read_misses, st.write_hits, st.write_misses);
	d = (struct dump_ctx){ .cmd = cmd, .hint_size = info.policy.hint_size, .first = true };
	r = tfs_cmd_load_mappings(cmd, &info.policy, dump_mapping, &d);
	fputs("],\"discards\":[", stdout);
	d.first = true;
	if (!r)
		r = tfs_cmd_load_discards(cmd, dump_discard, &d);
	puts("]}");
	tfs_cmd_close(cmd);
out_close_dev:
	tfs_bdev_close(dev);
	return r ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return usage();
	if (!strcmp(argv[1], "format"))
		return cmd_format(argv[2], argc - 3, argv + 3);
	if (!strcmp(argv[1], "run"))
		return cmd_run(argv[2], argc - 3, argv + 3);
	if (!strcmp(argv[1], "dump") && argc == 3)
		return cmd_dump(argv[2]);
	return usage();
}
