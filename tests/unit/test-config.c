/* SPDX-License-Identifier: GPL-2.0-or-later */
/* pool.cfg: every key, defaults, and every kind of mistake named by file:line. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "log.h"

/* ---- fixture: a temporary directory with meta.img, data.img and pool.cfg ---- */

struct env {
	char dir[64];
	char cfg[128];        /* dir/pool.cfg */
	char meta[128];       /* dir/meta.img */
	char data[128];       /* dir/data.img */
	char log[16384];      /* every message logged during the test */
	unsigned nr_msgs;
};

static void capture(void *ctx, enum tfs_log_level level, const char *msg)
{
	struct env *e = ctx;
	size_t used = strlen(e->log);

	(void)level;
	snprintf(e->log + used, sizeof(e->log) - used, "%s\n", msg);
	e->nr_msgs++;
}

static void make_file(const char *path, off_t size, mode_t mode)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, mode);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, size), 0);
	close(fd);
}

static int setup(void **state)
{
	struct env *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	snprintf(e->dir, sizeof(e->dir), "/tmp/tfs-config-XXXXXX");
	assert_non_null(mkdtemp(e->dir));
	snprintf(e->cfg, sizeof(e->cfg), "%s/pool.cfg", e->dir);
	snprintf(e->meta, sizeof(e->meta), "%s/meta.img", e->dir);
	snprintf(e->data, sizeof(e->data), "%s/data.img", e->dir);
	make_file(e->meta, 8 << 20, 0644);
	make_file(e->data, 64 << 20, 0644);
	/* Devices for [origin] and [snapshot] sections, named relative to the .cfg. */
	for (const char *const *n = (const char *const[]){ "sdb", "sdc", "sdd", "sde", "my disk",
							    NULL }; *n; n++) {
		char path[PATH_MAX];

		snprintf(path, sizeof(path), "%s/%s", e->dir, *n);
		make_file(path, 1 << 20, 0644);
	}
	/* Devices of [cache] sections, named relative to the .cfg: o1 c1 m1 o2 c2 m2. */
	for (int i = 0; i < 6; i++) {
		char dev[160];

		snprintf(dev, sizeof(dev), "%s/%c%d", e->dir, "ocm"[i % 3], 1 + i / 3);
		make_file(dev, 1 << 20, 0644);
	}
	tfs_log_set_sink(capture, e);
	*state = e;
	return 0;
}

static int teardown(void **state)
{
	struct env *e = *state;
	char cmd[PATH_MAX + 16];

	tfs_log_set_sink(NULL, NULL);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
	assert_int_equal(system(cmd), 0);
	free(e);
	return 0;
}

static void write_cfg(struct env *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void write_cfg(struct env *e, const char *fmt, ...)
{
	FILE *f = fopen(e->cfg, "w");
	va_list ap;

	assert_non_null(f);
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	fclose(f);
	e->log[0] = '\0';
	e->nr_msgs = 0;
}

/* The log must contain "<cfg>:<line>:" and every given fragment on one message line. */
static void assert_logged(struct env *e, unsigned line, const char *frag1, const char *frag2)
{
	char prefix[PATH_MAX + 32];
	const char *p = e->log;

	if (line)
		snprintf(prefix, sizeof(prefix), "%s:%u: ", e->cfg, line);
	else
		snprintf(prefix, sizeof(prefix), "%s: ", e->cfg);
	while ((p = strstr(p, prefix))) {
		const char *end = strchr(p, '\n');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		char msg[2048];

		snprintf(msg, sizeof(msg), "%.*s", (int)len, p);
		if ((!frag1 || strstr(msg, frag1)) && (!frag2 || strstr(msg, frag2)))
			return;
		p += len;
	}
	fail_msg("no message \"%s...\" with '%s' and '%s' in:\n%s", prefix, frag1 ? frag1 : "",
		 frag2 ? frag2 : "", e->log);
}

/* Load a [pool] with the two devices and one more line (line 4); expect failure. */
static void expect_bad_line(struct env *e, const char *line, const char *key, const char *why,
			    int err)
{
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n%s\n", e->meta, e->data, line);
	assert_int_equal(tfs_config_load(e->cfg, &c), err);
	assert_logged(e, 4, key, why);
}

/* ---- a good file ---- */

static void test_minimal_cfg_gets_the_documented_defaults(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char want[PATH_MAX + 16];

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(e->nr_msgs, 0);
	assert_string_equal(c.path, e->cfg);
	assert_string_equal(c.metadata, e->meta);
	assert_string_equal(c.data, e->data);
	snprintf(want, sizeof(want), "%s.catalog.db", e->meta);
	assert_string_equal(c.catalog, want);
	assert_string_equal(c.on_event, "");
	assert_int_equal(c.block_size, 65536);
	assert_true(c.low_water_is_percent);
	assert_int_equal(c.low_water_percent, 10);
	assert_false(c.error_if_no_space);
	assert_int_equal(c.no_space_timeout_ms, 60000);
	assert_true(c.discard_passdown);
	assert_false(c.skip_block_zeroing);
	assert_false(c.detect_zeroes);
	assert_int_equal(c.commit_interval_ms, 1000);
	assert_int_equal(c.metadata_cache_bytes, 64 << 20);
	assert_false(c.host_cache);
	assert_int_equal(c.max_threads, 512);
	assert_true(c.writeback_cache);
	assert_false(c.allow_faults);
	assert_int_equal(c.preallocate_bytes, 32 << 20);
}

static void test_every_pool_key_is_parsed(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char hook[PATH_MAX + 16], cat[PATH_MAX + 16];

	snprintf(hook, sizeof(hook), "%s/hook.sh", e->dir);
	make_file(hook, 0, 0755);
	snprintf(cat, sizeof(cat), "%s/my.db", e->dir);
	write_cfg(e,
		  "; the pool\n"
		  "# another comment style\n"
		  "[pool]\n"
		  "metadata = %s   ; inline comment\n"
		  "data     = \"%s\"\n"
		  "block_size = 1M\n"
		  "catalog  = %s\n"
		  "low_water_mark = 4096\n"
		  "error_if_no_space = YES\n"
		  "no_space_timeout = 2m\n"
		  "discard_passdown = off\n"
		  "skip_block_zeroing = true\n"
		  "commit_interval = 500ms\n"
		  "on_event = %s\n"
		  "metadata_cache = 128MiB\n"
		  "host_cache = on\n"
		  "max_threads = 64\n"
		  "detect_zeroes = unmap\n"
		  "writeback_cache = off\n"
		  "preallocate = 64m\n"
		  "\n"
		  "[fault]\n"
		  "allow = on\n",
		  e->meta, e->data, cat, hook);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(e->nr_msgs, 0);
	assert_string_equal(c.metadata, e->meta);
	assert_string_equal(c.data, e->data);
	assert_string_equal(c.catalog, cat);
	assert_string_equal(c.on_event, hook);
	assert_int_equal(c.block_size, 1 << 20);
	assert_false(c.low_water_is_percent);
	assert_int_equal(c.low_water_blocks, 4096);
	assert_true(c.error_if_no_space);
	assert_int_equal(c.no_space_timeout_ms, 120000);
	assert_false(c.discard_passdown);
	assert_true(c.skip_block_zeroing);
	assert_int_equal(c.commit_interval_ms, 500);
	assert_int_equal(c.metadata_cache_bytes, 128 << 20);
	assert_true(c.host_cache);
	assert_int_equal(c.max_threads, 64);
	assert_true(c.detect_zeroes);
	assert_false(c.writeback_cache);
	assert_true(c.allow_faults);
	assert_int_equal(c.preallocate_bytes, 64 << 20);
}

static void test_times_bools_and_percentages_in_every_spelling(void **state)
{
	static const struct {
		const char *v;
		uint64_t ms;
	} times[] = { { "0", 0 }, { "1", 1000 }, { "60s", 60000 }, { "60S", 60000 },
		      { "2m", 120000 }, { "500ms", 500 }, { "1h", 3600000 } };
	static const struct {
		const char *v;
		bool b;
	} bools[] = { { "yes", true }, { "no", false }, { "true", true }, { "false", false },
		      { "on", true }, { "off", false }, { "1", true }, { "0", false },
		      { "True", true }, { "OFF", false } };
	struct env *e = *state;
	struct tfs_pool_config c;

	for (size_t i = 0; i < sizeof(times) / sizeof(times[0]); i++) {
		write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nno_space_timeout = %s\n", e->meta,
			  e->data, times[i].v);
		assert_int_equal(tfs_config_load(e->cfg, &c), 0);
		assert_int_equal(c.no_space_timeout_ms, times[i].ms);
	}
	for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++) {
		write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nerror_if_no_space = %s\n", e->meta,
			  e->data, bools[i].v);
		assert_int_equal(tfs_config_load(e->cfg, &c), 0);
		assert_int_equal(c.error_if_no_space, bools[i].b);
	}
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nlow_water_mark = 0%%\nblock_size = 1g\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_true(c.low_water_is_percent);
	assert_int_equal(c.low_water_percent, 0);
	assert_int_equal(c.block_size, 1ull << 30);
}

static void test_crlf_line_endings_and_a_bom_are_accepted(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "\xEF\xBB\xBF[pool]\r\nmetadata = %s\r\ndata = %s\r\nblock_size = 128k\r\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_string_equal(c.data, e->data);
	assert_int_equal(c.block_size, 128 << 10);
}

static void test_relative_paths_are_relative_to_the_cfg_directory(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char cwd[PATH_MAX], want[PATH_MAX + 16], sub[PATH_MAX + 16], hook[PATH_MAX + 32];

	snprintf(sub, sizeof(sub), "%s/sub", e->dir);
	assert_int_equal(mkdir(sub, 0755), 0);
	snprintf(hook, sizeof(hook), "%s/sub/hook", e->dir);
	make_file(hook, 0, 0755);
	write_cfg(e, "[pool]\nmetadata = meta.img\ndata = ./sub/../data.img\n"
		     "catalog = sub/cat.db\non_event = sub/hook\n");
	assert_non_null(getcwd(cwd, sizeof(cwd)));
	assert_int_equal(chdir("/"), 0);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(chdir(cwd), 0);
	assert_string_equal(c.metadata, e->meta);
	assert_string_equal(c.data, e->data); /* canonical: no "sub/.." */
	snprintf(want, sizeof(want), "%s/sub/cat.db", e->dir);
	assert_string_equal(c.catalog, want);
	assert_string_equal(c.on_event, hook);
}

static void test_named_sections_accept_their_keys(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e,
		  "[pool]\nmetadata = %s\ndata = %s\n"
		  "[origin \"db\"]\ndevice = sdc\n"
		  "[snapshot \"db-before-upgrade\"]\norigin = db\ncow = sdd\n"
		  "persistent = yes\nchunk_size = 8k\n"
		  "[cache \"fast1\"]\norigin = o1\ncache = c1\n"
		  "metadata = m1\nmode = writeback\npolicy = smq\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(e->nr_msgs, 0);
	assert_string_equal(c.targets,
			    "origin \"db\": device=sdc\n"
			    "snapshot \"db-before-upgrade\": chunk_size=8k cow=sdd origin=db "
			    "persistent=yes\n"
			    "cache \"fast1\": cache=c1 metadata=m1 mode=writeback "
			    "origin=o1 policy=smq\n");
}

/* The same sections in another order, keys shuffled, a value quoted: the same text. */
static void test_named_section_text_ignores_the_order_in_the_file(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e,
		  "[cache \"fast1\"]\npolicy = smq\nmode = writeback\nmetadata = m1\n"
		  "cache = c1\norigin = o1\n"
		  "[snapshot \"db-before-upgrade\"]\npersistent = yes\nchunk_size = 8k\n"
		  "cow = sdd\norigin = db\n"
		  "[pool]\nmetadata = %s\ndata = %s\n"
		  "[origin \"b\"]\ndevice = sdb\n"
		  "[origin \"db\"]\ndevice = \"sdc\"\n"
		  "[origin \"a b\"]\ndevice = my disk\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(e->nr_msgs, 0);
	assert_string_equal(c.targets,
			    "origin \"a b\": device=my disk\n"
			    "origin \"b\": device=sdb\n"
			    "origin \"db\": device=sdc\n"
			    "snapshot \"db-before-upgrade\": chunk_size=8k cow=sdd origin=db "
			    "persistent=yes\n"
			    "cache \"fast1\": cache=c1 metadata=m1 mode=writeback "
			    "origin=o1 policy=smq\n");

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_string_equal(c.targets, "");
}

static void test_named_section_keys_are_given_once(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[origin \"db\"]\ndevice = /a\ndevice = /b\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 6, "device", "given twice (first on line 5)");
}

/* [origin] and [snapshot]: parsed into cow_targets, origins first, defaults filled in. */
static void test_origin_and_snapshot_sections_are_parsed(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config *c = calloc(1, sizeof(*c));
	char want[PATH_MAX];

	assert_non_null(c);
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nsnapshot_low_water = 70%%\n"
		     "[snapshot \"s1\"]\norigin = db\ncow = sdd\nchunk_size = 64k\npersistent = no\n"
		     "[snapshot \"s0\"]\norigin = db\ncow = sde\n"
		     "[origin \"db\"]\ndevice = sdc\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, c), 0);
	assert_int_equal(c->snapshot_low_water, 70);
	assert_int_equal(c->nr_cow_targets, 3);
	assert_false(c->cow_targets[0].is_snapshot);
	assert_string_equal(c->cow_targets[0].name, "db");
	snprintf(want, sizeof(want), "%s/sdc", e->dir);
	assert_string_equal(c->cow_targets[0].device, want);
	assert_string_equal(c->cow_targets[1].name, "s0");
	assert_int_equal(c->cow_targets[1].chunk_sectors, 8);
	assert_true(c->cow_targets[1].persistent);
	assert_string_equal(c->cow_targets[2].name, "s1");
	assert_string_equal(c->cow_targets[2].origin, "db");
	assert_int_equal(c->cow_targets[2].chunk_sectors, 128);
	assert_false(c->cow_targets[2].persistent);
	free(c);
}

/* Each mistake in an [origin] or [snapshot] section: file:line, the section and key. */
static void test_origin_and_snapshot_mistakes_are_named(void **state)
{
	static const struct {
		const char *sections;
		unsigned line;
		const char *frag1, *frag2;
	} bad[] = {
		{ "[snapshot \"s\"]\norigin = nope\ncow = sdd\n", 5,
		  "[snapshot \"s\"] origin", "no [origin \"nope\"] section" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\ncow = sdd\n"
		  "chunk_size = 2g\n", 9, "[snapshot \"s\"] chunk_size", "a power of two from 4 KiB" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\ncow = sdd\n"
		  "chunk_size = 12k\n", 9, "chunk_size: 12k", "a power of two from 4 KiB to 1 GiB" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\ncow = sdd\n"
		  "chunk_size = 2k\n", 9, "chunk_size: 2k", "power of two" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\ncow = sdc\n", 8,
		  "[snapshot \"s\"] cow: sdc", "already [origin \"db\"] device" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"a\"]\norigin = db\ncow = sdd\n"
		  "[snapshot \"b\"]\norigin = db\ncow = sdd\n", 11, "[snapshot \"b\"] cow",
		  "already [snapshot \"a\"] cow" },
		{ "[origin \"db\"]\ndevice = data.img\n", 5, "[origin \"db\"] device",
		  "already [pool] data" },
		{ "[origin \"db\"]\n", 4, "[origin \"db\"]", "required key 'device'" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\n", 6,
		  "[snapshot \"s\"]", "required key 'cow'" },
		{ "[origin \"db\"]\ndevice = nope\n", 5, "[origin \"db\"] device: nope",
		  "no such file" },
		{ "[origin \"db\"]\ndevice = sdc\n[snapshot \"s\"]\norigin = db\ncow = sdd\n"
		  "persistent = maybe\n", 9, "[snapshot \"s\"] persistent", "yes or no" },
		{ "snapshot_low_water = 101\n", 4, "snapshot_low_water", "more than 100%" },
	};
	struct env *e = *state;
	struct tfs_pool_config *c = calloc(1, sizeof(*c));

	assert_non_null(c);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n%s", e->meta, e->data,
			  bad[i].sections);
		assert_int_not_equal(tfs_config_load(e->cfg, c), 0);
		assert_logged(e, bad[i].line, bad[i].frag1, bad[i].frag2);
	}
	free(c);
}

/* A file in the test's directory named prefix followed by n 'v's; its name in out. */
static void long_named_file(struct env *e, const char *prefix, size_t n, char *out, size_t len)
{
	char path[512];
	size_t p = strlen(prefix);

	assert_true(p + n < len);
	memcpy(out, prefix, p);
	memset(out + p, 'v', n);
	out[p + n] = '\0';
	snprintf(path, sizeof(path), "%s/%s", e->dir, out);
	make_file(path, 4096, 0644);
}

/*
 * Write 32 [origin "aNN"] sections (lines 4, 6, ..., 66; device aNN + 185
 * 'v's), then nc [cache "sN"] sections (lines 68, 72, ...; origin oN + k
 * 'v's, the last one's last_k, cache cN, metadata mN), every device made.
 */
static void write_origins(struct env *e, unsigned nc, size_t k, size_t last_k)
{
	char value[256], prefix[8];
	FILE *f = fopen(e->cfg, "w");

	assert_non_null(f);
	fprintf(f, "[pool]\nmetadata = %s\ndata = %s\n", e->meta, e->data);
	for (unsigned i = 0; i < 32; i++) {
		snprintf(prefix, sizeof(prefix), "a%02u", i);
		long_named_file(e, prefix, 185, value, sizeof(value));
		fprintf(f, "[origin \"a%02u\"]\ndevice = %s\n", i, value);
	}
	for (unsigned i = 0; i < nc; i++) {
		char c[8], m[8];

		snprintf(prefix, sizeof(prefix), "o%u", i);
		long_named_file(e, prefix, i + 1 == nc ? last_k : k, value, sizeof(value));
		snprintf(prefix, sizeof(prefix), "c%u", i);
		long_named_file(e, prefix, 0, c, sizeof(c));
		snprintf(prefix, sizeof(prefix), "m%u", i);
		long_named_file(e, prefix, 0, m, sizeof(m));
		fprintf(f, "[cache \"s%u\"]\norigin = %s\ncache = %s\nmetadata = %s\n", i, value, c, m);
	}
	fclose(f);
	e->log[0] = '\0';
	e->nr_msgs = 0;
}

/*
 * `origin "a00": device=a00` + 185 'v's is 210 bytes with its newline, 32
 * of them 6720; `cache "s0": cache=c0 metadata=m0 origin=o0` + 180 'v's is
 * 223: six of them make 8058 with the NUL, and a seventh of 133 bytes (90
 * 'v's) fills the 8192; a byte more does not fit.
 */
static void test_named_section_text_is_at_most_8192_bytes(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_origins(e, 7, 180, 90);
	if (tfs_config_load(e->cfg, &c))
		fail_msg("does not load:\n%s", e->log);
	assert_int_equal(strlen(c.targets), 8191);
	assert_int_equal(e->nr_msgs, 0);

	write_origins(e, 7, 180, 91);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 68 + 4 * 6,
		      "too many or too long [origin/snapshot/cache] sections: at most 8192 bytes",
		      NULL);
	assert_int_equal(e->nr_msgs, 1);

	/* Eight long caches: the seventh goes past. */
	write_origins(e, 8, 180, 180);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 68 + 4 * 6, "at most 8192 bytes", NULL); /* where it went past */
}

/* ---- values that are wrong ---- */

static void test_bad_values_name_file_line_and_key(void **state)
{
	static const struct {
		const char *line, *key, *why;
	} bad[] = {
		{ "block_size = 100k", "block_size", "not a multiple of 64k" },
		{ "block_size = 32k", "block_size", "smaller than 64k" },
		{ "block_size = 2g", "block_size", "larger than 1g" },
		{ "block_size = 0", "block_size", "smaller" },
		{ "block_size = 64q", "block_size", "not a size" },
		{ "block_size = 99999999999999999999999", "block_size", "too large" },
		{ "low_water_mark = 150%", "low_water_mark", "100%" },
		{ "low_water_mark = -1", "low_water_mark", "percentage" },
		{ "low_water_mark = 10.5%", "low_water_mark", "percentage" },
		{ "low_water_mark = 1g", "low_water_mark", "blocks" },
		{ "error_if_no_space = 2", "error_if_no_space", "not a boolean" },
		{ "discard_passdown = perhaps", "discard_passdown", "not a boolean" },
		{ "skip_block_zeroing = y", "skip_block_zeroing", "not a boolean" },
		{ "detect_zeroes = on", "detect_zeroes", "'on' is not off or unmap" },
		{ "no_space_timeout = -1", "no_space_timeout", "not a time" },
		{ "no_space_timeout = 5 days", "no_space_timeout", "not a time" },
		{ "commit_interval = soon", "commit_interval", "not a time" },
		{ "commit_interval = 0", "commit_interval", "more than 0" },
		{ "commit_interval = 2h", "commit_interval", "more than an hour" },
		{ "metadata_cache = lots", "metadata_cache", "not a size" },
		{ "metadata_cache = 4k", "metadata_cache", "minimum 64k" },
		{ "host_cache = sometimes", "host_cache", "not a boolean" },
		{ "writeback_cache = 2", "writeback_cache", "not a boolean" },
		{ "preallocate = lots", "preallocate", "'lots' is not a size" },
		{ "preallocate = 64k", "preallocate", "64k is not off or a size from 1m to 1g" },
		{ "preallocate = 2g", "preallocate", "2g is not off or a size from 1m to 1g" },
		{ "max_threads = 7", "max_threads", "less than 8 (each write held for data space" },
		{ "max_threads = 0", "max_threads", "less than 8" },
		{ "max_threads = 4097", "max_threads", "4097 is more than 4096" },
		{ "max_threads = 99999999999999999999999", "max_threads", "more than 4096" },
		{ "max_threads = 64k", "max_threads", "'64k' is not a number of threads" },
		{ "max_threads = -1", "max_threads", "not a number" },
		{ "max_threads = 1e3", "max_threads", "not a number" },
		{ "max_threads = 99999999999999999999x", "max_threads", "not a number" },
		{ "max_threads = many", "max_threads", "not a number" },
		{ "on_event = meta.img", "on_event", "not an executable" },
		{ "catalog = /", "catalog", "not a regular file" },
		{ "catalog =", "catalog", "empty value" },
		{ "metadata = /x", "metadata", "given twice (first on line 2)" },
		{ "colour = blue", "colour", "unknown key" },
		{ "Metadata = x", "Metadata", "unknown key" },
	};
	struct env *e = *state;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_bad_line(e, bad[i].line, bad[i].key, bad[i].why, -EINVAL);
	expect_bad_line(e, "on_event = /nonexistent/hook", "on_event", "No such file", -ENOENT);
}

/* [cache] values: parsed with their defaults, and each bad one named with its section and line. */
static void test_cache_sections_are_parsed_and_checked(void **state)
{
	static const struct {
		const char *line, *why;
		unsigned lineno;
	} bad[] = {
		{ "block_size = 100k", "[cache \"c\"] block_size: 100k is not 32k .. 1g", 7 },
		{ "block_size = 16k", "block_size: 16k is not 32k", 7 },
		{ "block_size = 2g", "block_size: 2g is not 32k", 7 },
		{ "mode = fast", "[cache \"c\"] mode: 'fast' (expected writethrough", 7 },
		{ "policy = lru", "policy: 'lru' (expected smq, mq or cleaner)", 7 },
		{ "migration_threshold = -5", "migration_threshold: '-5' is not a number", 7 },
		{ "metadata_version = 3", "metadata_version: '3' (expected 1 or 2)", 7 },
		{ "discard_passdown = maybe", "discard_passdown: 'maybe' is not yes or no", 7 },
		{ "metadata = c1", "[cache \"c\"] cache and metadata are the same device", 3 },
	};
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\norigin = o1\n"
		  "cache = c1\nmetadata = m1\n[cache \"b\"]\norigin = o2\ncache = c2\n"
		  "metadata = m2\nmode = writeback\npolicy = mq\nblock_size = 96k\n"
		  "migration_threshold = 0\nmetadata_version = 1\ndiscard_passdown = yes\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	assert_int_equal(c.nr_caches, 2); /* in name order */
	assert_string_equal(c.caches[1].name, "c");
	assert_int_equal(c.caches[1].block_sectors, 128);
	assert_int_equal(c.caches[1].mode, TFS_CACHE_WRITETHROUGH);
	assert_int_equal(c.caches[1].policy, TFS_CACHE_SMQ);
	assert_int_equal(c.caches[1].migration_threshold, 2048);
	assert_int_equal(c.caches[1].metadata_version, 2);
	assert_false(c.caches[1].discard_passdown);
	assert_non_null(strstr(c.caches[1].origin, "/o1"));
	assert_int_equal(c.caches[0].block_sectors, 192);
	assert_int_equal(c.caches[0].mode, TFS_CACHE_WRITEBACK);
	assert_int_equal(c.caches[0].policy, TFS_CACHE_SMQ);
	assert_int_equal(c.caches[0].migration_threshold, 0);
	assert_int_equal(c.caches[0].metadata_version, 1);
	assert_true(c.caches[0].discard_passdown);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char where[32];

		e->log[0] = '\0';
		e->nr_msgs = 0;
		if (bad[i].lineno == 3)
			write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\norigin = o1\n"
				  "cache = c1\n%s\n", e->meta, e->data, bad[i].line);
		else
			write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\norigin = o1\n"
				  "cache = c1\nmetadata = m1\n%s\n", e->meta, e->data, bad[i].line);
		assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
		snprintf(where, sizeof(where), "pool.cfg:%u:", bad[i].lineno + 1);
		if (e->nr_msgs != 1 || !strstr(e->log, bad[i].why) || !strstr(e->log, where))
			fail_msg("'%s': want one message with '%s' at %s, got:\n%s", bad[i].line,
				 bad[i].why, where, e->log);
	}
	e->log[0] = '\0';
	e->nr_msgs = 0;
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\norigin = o1\ncache = c1\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_non_null(strstr(e->log, "[cache \"c\"] metadata: required"));
	/* Every bad key is reported, in file order. */
	e->log[0] = '\0';
	e->nr_msgs = 0;
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\npolicy = lru\norigin = o1\n"
		  "cache = c1\nmetadata = m1\nblock_size = 1k\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_int_equal(e->nr_msgs, 2);
	assert_true(strstr(e->log, "pool.cfg:5: [cache \"c\"] policy") <
		    strstr(e->log, "pool.cfg:9: [cache \"c\"] block_size"));
	assert_non_null(strstr(e->log, "pool.cfg:5: [cache \"c\"] policy"));
	/* A device of the pool's, or of another cache, is refused. */
	e->log[0] = '\0';
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"c\"]\norigin = data.img\n"
		  "cache = c1\nmetadata = m1\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_non_null(strstr(e->log, "[cache \"c\"] origin: "));
	assert_non_null(strstr(e->log, "data.img is already [pool] data"));
	e->log[0] = '\0';
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[cache \"a\"]\norigin = o1\n"
		  "cache = c1\nmetadata = m1\n[cache \"b\"]\norigin = o2\ncache = c2\n"
		  "metadata = c1\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_non_null(strstr(e->log, "[cache \"b\"] metadata: "));
	assert_non_null(strstr(e->log, "c1 is already [cache \"a\"] cache"));
}

static void test_a_failed_load_leaves_the_output_untouched(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	memset(&c, 0xA5, sizeof(c));
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nblock_size = 100k\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	for (size_t i = 0; i < sizeof(c); i++)
		assert_int_equal(((unsigned char *)&c)[i], 0xA5);
}

static void test_every_problem_is_reported_not_just_the_first(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nblock_size = 100k\n"
		     "colour = blue\ncommit_interval = soon\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_int_equal(e->nr_msgs, 3);
	assert_logged(e, 4, "block_size", NULL);
	assert_logged(e, 5, "colour", NULL);
	assert_logged(e, 6, "commit_interval", NULL);
}

/* ---- structure ---- */

static void test_unknown_sections_are_errors_even_when_empty(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[bogus]\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 4, "unknown section [bogus]", NULL);

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[volume \"x\"]\nsize = 1\n", e->meta,
		  e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 4, "unknown section", "volume");
	assert_int_equal(e->nr_msgs, 1); /* nothing more about the keys of a bad section */
}

static void test_named_sections_need_a_quoted_valid_unique_name(void **state)
{
	static const struct {
		const char *header, *why;
	} bad[] = {
		{ "[origin]", "needs a quoted name" },
		{ "[origin db]", "needs a quoted name" },
		{ "[cache \"\"]", "1 to 255 bytes" },
		{ "[snapshot \"a/b\"]", "may not contain '/'" },
		{ "[origin \"..\"]", "not '.' or '..'" },
		{ "[pool \"x\"]", "unknown section" },
		{ "[pool]", "[pool] given twice (first on line 1)" },
	};
	struct env *e = *state;
	struct tfs_pool_config c;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n%s\n", e->meta, e->data,
			  bad[i].header);
		assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
		assert_logged(e, 4, bad[i].why, NULL);
	}
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[origin \"db\"]\n[cache \"db\"]\n",
		  e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 5, "taken by [origin \"db\"] on line 4", NULL);
}

static void test_unknown_keys_in_every_section_are_errors(void **state)
{
	static const struct {
		const char *section, *key;
	} bad[] = {
		{ "[origin \"db\"]", "cow" },
		{ "[snapshot \"s\"]", "device" },
		{ "[cache \"c\"]", "chunk_size" },
		{ "[fault]", "enable" },
	};
	struct env *e = *state;
	struct tfs_pool_config c;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n%s\n%s = 1\n", e->meta, e->data,
			  bad[i].section, bad[i].key);
		assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
		assert_logged(e, 5, "unknown key", bad[i].key);
	}
	write_cfg(e, "block_size = 64k\n[pool]\nmetadata = %s\ndata = %s\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 1, "block_size", "outside any section");
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n[fault]\nallow = maybe\n", e->meta,
		  e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 5, "allow", "not a boolean");
}

static void test_syntax_errors_name_their_lines(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char longline[400];

	memset(longline, 'x', sizeof(longline) - 1);
	longline[sizeof(longline) - 1] = '\0';
	memcpy(longline, "on_event = /", 12);
	write_cfg(e,
		  "[pool]\n"                       /* 1 */
		  "metadata = %s\n"                /* 2 */
		  "  data = %s\n"                  /* 3: continuation in inih */
		  "this line has no equals sign\n" /* 4 */
		  "[fault\n"                       /* 5 */
		  "[pool] trailing\n"              /* 6 */
		  "%s\n",                          /* 7 */
		  e->meta, e->data, longline);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 3, "continuation", NULL);
	assert_logged(e, 4, "expected 'key = value'", NULL);
	assert_logged(e, 5, "closing ']'", NULL);
	assert_logged(e, 6, "after ']'", NULL);
	assert_logged(e, 7, "longer than", NULL);
	/* The data line was never taken as a key: data is missing too. */
	assert_logged(e, 1, "'data' is missing", NULL);
}

static void test_missing_required_keys_are_named(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "; only metadata\n[pool]\nmetadata = %s\n", e->meta);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 2, "required key 'data' is missing", NULL);

	write_cfg(e, "[pool]\ndata = %s\n", e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 1, "required key 'metadata' is missing", NULL);

	write_cfg(e, "[fault]\nallow = no\n");
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 0, "no [pool] section", NULL);

	write_cfg(e, "%s", "");
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 0, "no [pool] section", NULL);
}

/* ---- devices ---- */

static void test_missing_device_file_is_named_with_its_line(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s/nope.img\n", e->meta, e->dir);
	assert_int_equal(tfs_config_load(e->cfg, &c), -ENOENT);
	assert_logged(e, 3, "data", "nope.img: no such file");

	write_cfg(e, "[pool]\nmetadata = nope.img\ndata = %s\n", e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -ENOENT);
	assert_logged(e, 2, "nope.img", e->dir); /* says where a relative path was looked for */
}

static void test_unknown_label_or_uuid_fails_naming_it(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	/* blkid_evaluate_tag finds block devices only; nothing carries these. */
	write_cfg(e, "[pool]\nmetadata = %s\ndata = LABEL=tfs-unit-no-such-label\n", e->meta);
	assert_int_equal(tfs_config_load(e->cfg, &c), -ENOENT);
	assert_logged(e, 3, "LABEL=tfs-unit-no-such-label", "no such device");

	write_cfg(e, "[pool]\nmetadata = UUID=00000000-dead-beef-0000-000000000000\ndata = %s\n",
		  e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -ENOENT);
	assert_logged(e, 2, "UUID=00000000-dead-beef-0000-000000000000", "UUID");

	write_cfg(e, "[pool]\nmetadata = %s\ndata = LABEL=\n", e->meta);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 3, "LABEL=", "empty");
}

/*
 * The real thing, where the machine allows it (root, loop devices): an
 * ext4 image on a loop device is found by its label and by its UUID.
 */
static void test_label_and_uuid_resolve_to_a_loop_device(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char cmd[PATH_MAX * 2], dev[64] = "", got1[TFS_PATH_MAX];
	FILE *f;
	int r1, r2;

	if (geteuid() != 0)
		skip();
	snprintf(cmd, sizeof(cmd),
		 "PATH=$PATH:/sbin:/usr/sbin mkfs.ext4 -q -F -L tfs-unit-label "
		 "-U 5ca1ab1e-0000-4000-8000-0123456789ab '%s' >/dev/null 2>&1 && "
		 "losetup -f --show '%s' 2>/dev/null",
		 e->data, e->data);
	f = popen(cmd, "r");
	assert_non_null(f);
	if (!fgets(dev, sizeof(dev), f))
		dev[0] = '\0';
	pclose(f);
	dev[strcspn(dev, "\n")] = '\0';
	if (strncmp(dev, "/dev/", 5))
		skip(); /* no loop devices here */

	write_cfg(e, "[pool]\nmetadata = %s\ndata = LABEL=tfs-unit-label\n", e->meta);
	r1 = tfs_config_load(e->cfg, &c);
	snprintf(got1, sizeof(got1), "%s", c.data);
	write_cfg(e, "[pool]\nmetadata = %s\ndata = UUID=5ca1ab1e-0000-4000-8000-0123456789ab\n",
		  e->meta);
	r2 = tfs_config_load(e->cfg, &c);

	snprintf(cmd, sizeof(cmd), "losetup -d '%s'", dev);
	assert_int_equal(system(cmd), 0);
	assert_int_equal(r1, 0);
	assert_string_equal(got1, dev);
	assert_int_equal(r2, 0);
	assert_string_equal(c.data, dev);
}

static void test_devices_must_be_files_or_block_devices_and_differ(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n", e->meta, e->dir);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 3, "data", "is a directory");

	write_cfg(e, "[pool]\nmetadata = /dev/null\ndata = %s\n", e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 2, "metadata", "neither a regular file nor a block device");

	write_cfg(e, "[pool]\nmetadata = %s\ndata = ./meta.img\n", e->meta);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 3, "data", "the metadata device too (line 2)");

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\ncatalog = data.img\n", e->meta, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), -EINVAL);
	assert_logged(e, 4, "catalog", "metadata or data device");
}

/* The default catalog of a pool on a block device is under /var/lib/thinfs. */
static void test_block_device_metadata_puts_the_catalog_in_var_lib(void **state)
{
	static const char *const candidates[] = { "/dev/loop0", "/dev/loop1", "sda",
						  "/dev/vda", "/dev/nvme0n1", "/dev/xvda" };
	struct env *e = *state;
	struct tfs_pool_config c;
	const char *dev = NULL, *base;
	char want[PATH_MAX];
	struct stat st;

	for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]) && !dev; i++)
		if (!stat(candidates[i], &st) && S_ISBLK(st.st_mode))
			dev = candidates[i];
	if (!dev)
		skip();
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n", dev, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &c), 0);
	base = strrchr(c.metadata, '/') + 1;
	snprintf(want, sizeof(want), "/var/lib/thinfs/%s.db", base);
	assert_string_equal(c.catalog, want);
}

static void test_a_missing_cfg_is_named(void **state)
{
	struct env *e = *state;
	struct tfs_pool_config c;
	char path[PATH_MAX + 16];

	snprintf(path, sizeof(path), "%s/absent.cfg", e->dir);
	e->log[0] = '\0';
	assert_int_equal(tfs_config_load(path, &c), -ENOENT);
	assert_non_null(strstr(e->log, "absent.cfg"));
}

static void test_resolve_device_reports_without_logging(void **state)
{
	struct env *e = *state;
	char out[PATH_MAX];

	e->log[0] = '\0';
	assert_int_equal(tfs_config_resolve_device("data.img", e->dir, out, sizeof(out)), 0);
	assert_string_equal(out, e->data);
	assert_int_equal(tfs_config_resolve_device(e->meta, NULL, out, sizeof(out)), 0);
	assert_string_equal(out, e->meta);
	assert_int_equal(tfs_config_resolve_device("nope", e->dir, out, sizeof(out)), -ENOENT);
	assert_int_equal(tfs_config_resolve_device(".", e->dir, out, sizeof(out)), -EISDIR);
	assert_int_equal(tfs_config_resolve_device("/dev/null", NULL, out, sizeof(out)), -ENOTBLK);
	assert_int_equal(tfs_config_resolve_device("LABEL=tfs-unit-none", NULL, out, sizeof(out)),
			 -ENOENT);
	assert_int_equal(tfs_config_resolve_device("UUID=", NULL, out, sizeof(out)), -EINVAL);
	assert_int_equal(tfs_config_resolve_device("", NULL, out, sizeof(out)), -EINVAL);
	assert_int_equal(tfs_config_resolve_device("data.img", e->dir, out, 4), -ENAMETOOLONG);
	assert_string_equal(e->log, "");
}

/* ---- tfs_config_reload_diff ---- */

struct reload {
	struct tfs_pool_config run, next;
	char why[512];
	char changes[1024];
};

/* Load [pool] with the two devices and then `extra` (more keys, sections) into c. */
static void load_with(struct env *e, struct tfs_pool_config *c, const char *extra)
{
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n%s", e->meta, e->data, extra);
	if (tfs_config_load(e->cfg, c))
		fail_msg("'%s' does not load:\n%s", extra, e->log);
}

static void test_max_threads_takes_8_to_4096(void **state)
{
	static const struct {
		const char *v;
		unsigned n;
	} good[] = { { "8", 8 }, { "4096", 4096 }, { "0016", 16 }, { "\"100\"", 100 } };
	struct env *e = *state;
	struct tfs_pool_config c;
	char line[64];

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(line, sizeof(line), "max_threads = %s\n", good[i].v);
		load_with(e, &c, line);
		assert_int_equal(c.max_threads, good[i].n);
	}
}

/* Diff two configs (the devices plus run_extra, and plus next_extra): what it says. */
static int reload(struct env *e, struct reload *rl, const char *run_extra, const char *next_extra)
{
	load_with(e, &rl->run, run_extra);
	load_with(e, &rl->next, next_extra);
	memset(rl->why, 'X', sizeof(rl->why));
	memset(rl->changes, 'X', sizeof(rl->changes));
	e->log[0] = '\0';
	return tfs_config_reload_diff(&rl->run, &rl->next, rl->why, sizeof(rl->why), rl->changes,
				      sizeof(rl->changes));
}

static void expect_reloadable(struct env *e, struct reload *rl, const char *run_extra,
			      const char *next_extra, const char *changes)
{
	int r = reload(e, rl, run_extra, next_extra);

	if (r || strcmp(rl->changes, changes) || rl->why[0])
		fail_msg("'%s' -> '%s': got %d, why '%s', changes '%s'; want 0, '', '%s'", run_extra,
			 next_extra, r, rl->why, rl->changes, changes);
	assert_string_equal(e->log, ""); /* logs nothing */
}

static void expect_refused(struct env *e, struct reload *rl, const char *run_extra,
			   const char *next_extra, const char *why)
{
	int r = reload(e, rl, run_extra, next_extra);

	if (r != -EINVAL || strcmp(rl->why, why) || rl->changes[0])
		fail_msg("'%s' -> '%s': got %d, why '%s', changes '%s'; want -EINVAL, '%s', ''",
			 run_extra, next_extra, r, rl->why, rl->changes, why);
	assert_string_equal(e->log, "");
}

static void test_reload_of_the_same_cfg_changes_nothing(void **state)
{
	static const char sections[] = "low_water_mark = 100\n[origin \"db\"]\ndevice = sdb\n"
				       "[cache \"c\"]\nmode = writeback\norigin = o1\ncache = c1\n"
				       "metadata = m1\n";
	struct env *e = *state;
	struct reload *rl = calloc(1, sizeof(*rl));
	char other[PATH_MAX + 16];

	assert_non_null(rl);
	expect_reloadable(e, rl, "", "", "");
	expect_reloadable(e, rl, sections, sections, "");
	/* The same settings spelt otherwise are the same settings. */
	expect_reloadable(e, rl, "no_space_timeout = 1m\nerror_if_no_space = on\n",
			  "no_space_timeout = 60000ms\nerror_if_no_space = yes\n", "");
	/* The .cfg may move. */
	load_with(e, &rl->run, sections);
	snprintf(other, sizeof(other), "%s/moved.cfg", e->dir);
	assert_int_equal(rename(e->cfg, other), 0);
	assert_int_equal(tfs_config_load(other, &rl->next), 0);
	assert_string_not_equal(rl->run.path, rl->next.path);
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, rl->why, sizeof(rl->why),
						rl->changes, sizeof(rl->changes)),
			 0);
	assert_string_equal(rl->changes, "");
	free(rl);
}

static void test_reload_names_each_reloadable_change(void **state)
{
	static const struct {
		const char *run, *next, *changes;
	} cases[] = {
		{ "", "low_water_mark = 4096", "low_water_mark: 10% -> 4096 blocks" },
		{ "low_water_mark = 4096", "low_water_mark = 4097", "low_water_mark: 4096 blocks -> 4097 blocks" },
		{ "low_water_mark = 10", "low_water_mark = 10%", "low_water_mark: 10 blocks -> 10%" },
		{ "", "low_water_mark = 5%", "low_water_mark: 10% -> 5%" },
		{ "", "error_if_no_space = yes", "error_if_no_space: no -> yes" },
		{ "", "no_space_timeout = 0", "no_space_timeout: 60s -> 0s" },
		{ "", "no_space_timeout = 1500ms", "no_space_timeout: 60s -> 1500ms" },
		{ "", "discard_passdown = no", "discard_passdown: yes -> no" },
		{ "", "skip_block_zeroing = yes", "skip_block_zeroing: no -> yes" },
		{ "", "detect_zeroes = unmap", "detect_zeroes: off -> unmap" },
		{ "detect_zeroes = unmap", "detect_zeroes = off", "detect_zeroes: unmap -> off" },
		{ "", "commit_interval = 500ms", "commit_interval: 1s -> 500ms" },
		{ "commit_interval = 2m", "", "commit_interval: 120s -> 1s" },
		/* The example of config.h, word for word. */
		{ "",
		  "error_if_no_space = yes\nno_space_timeout = 0\nlow_water_mark = 4096\n"
		  "[origin \"db\"]\ndevice = sdb",
		  "error_if_no_space: no -> yes; no_space_timeout: 60s -> 0s; "
		  "low_water_mark: 10% -> 4096 blocks; [origin \"db\"] added" },
		{ "discard_passdown = no\nskip_block_zeroing = yes\ncommit_interval = 2s",
		  "commit_interval = 2s\n",
		  "discard_passdown: no -> yes; skip_block_zeroing: yes -> no" },
	};
	struct env *e = *state;
	struct reload *rl = calloc(1, sizeof(*rl));
	char run[256], next[256], hook[PATH_MAX + 16], hook2[PATH_MAX + 16], want[3 * PATH_MAX];

	assert_non_null(rl);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		snprintf(run, sizeof(run), "%s\n", cases[i].run);
		snprintf(next, sizeof(next), "%s\n", cases[i].next);
		expect_reloadable(e, rl, run, next, cases[i].changes);
	}

	snprintf(hook, sizeof(hook), "%s/hook.sh", e->dir);
	make_file(hook, 0, 0755);
	snprintf(hook2, sizeof(hook2), "%s/hook2.sh", e->dir);
	make_file(hook2, 0, 0755);
	snprintf(want, sizeof(want), "on_event: none -> %s", hook);
	expect_reloadable(e, rl, "", "on_event = hook.sh\n", want);
	snprintf(want, sizeof(want), "on_event: %s -> %s", hook, hook2);
	expect_reloadable(e, rl, "on_event = hook.sh\n", "on_event = hook2.sh\n", want);
	snprintf(want, sizeof(want), "on_event: %s -> none", hook2);
	expect_reloadable(e, rl, "on_event = hook2.sh\n", "", want);
	free(rl);
}

static void test_reload_refuses_to_change_what_the_pool_is(void **state)
{
	static const struct {
		const char *run, *next, *why;
	} cases[] = {
		{ "", "block_size = 128k\n", "block_size: 64k -> 128k cannot change while mounted" },
		{ "block_size = 1m\n", "", "block_size: 1m -> 64k cannot change while mounted" },
		{ "", "metadata_cache = 128m\n",
		  "metadata_cache: 64m -> 128m cannot change while mounted" },
		{ "", "host_cache = on\n", "host_cache: no -> yes cannot change while mounted" },
		{ "", "writeback_cache = off\n",
		  "writeback_cache: yes -> no cannot change while mounted" },
		{ "", "preallocate = off\n", "preallocate: 32m -> off cannot change while mounted" },
		{ "preallocate = 1m\n", "", "preallocate: 1m -> 32m cannot change while mounted" },
		{ "", "max_threads = 16\n", "max_threads: 512 -> 16 cannot change while mounted" },
		{ "max_threads = 4096\n", "", "max_threads: 4096 -> 512 cannot change while mounted" },
		{ "", "[fault]\nallow = yes\n", "[fault] allow: no -> yes cannot change while mounted" },
		{ "[fault]\nallow = yes\n", "[fault]\nallow = no\n",
		  "[fault] allow: yes -> no cannot change while mounted" },
		/* Several: the first in the documented order, and nothing of the rest. */
		{ "", "metadata_cache = 1g\nerror_if_no_space = yes\n[fault]\nallow = yes\n",
		  "metadata_cache: 64m -> 1g cannot change while mounted" },
		{ "", "metadata_cache = 1g\nblock_size = 256k\nerror_if_no_space = yes\n",
		  "block_size: 64k -> 256k cannot change while mounted" },
	};
	struct env *e = *state;
	struct reload *rl = calloc(1, sizeof(*rl));
	char meta2[PATH_MAX + 16], data2[PATH_MAX + 16], cat[PATH_MAX + 16];
	char want[3 * PATH_MAX + 64], next[2 * PATH_MAX];

	assert_non_null(rl);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		expect_refused(e, rl, cases[i].run, cases[i].next, cases[i].why);

	snprintf(meta2, sizeof(meta2), "%s/meta2.img", e->dir);
	make_file(meta2, 8 << 20, 0644);
	snprintf(data2, sizeof(data2), "%s/data2.img", e->dir);
	make_file(data2, 8 << 20, 0644);
	snprintf(cat, sizeof(cat), "%s/other.db", e->dir);

	/* Device paths: the first difference is named even when block_size differs too. */
	load_with(e, &rl->run, "");
	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\nblock_size = 128k\n", meta2, e->data);
	assert_int_equal(tfs_config_load(e->cfg, &rl->next), 0);
	snprintf(want, sizeof(want), "metadata: %s -> %s cannot change while mounted", e->meta,
		 meta2);
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, rl->why, sizeof(rl->why),
						rl->changes, sizeof(rl->changes)),
			 -EINVAL);
	assert_string_equal(rl->why, want);
	assert_string_equal(rl->changes, "");

	write_cfg(e, "[pool]\nmetadata = %s\ndata = %s\n", e->meta, data2);
	assert_int_equal(tfs_config_load(e->cfg, &rl->next), 0);
	snprintf(want, sizeof(want), "data: %s -> %s cannot change while mounted", e->data, data2);
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, rl->why, sizeof(rl->why),
						rl->changes, sizeof(rl->changes)),
			 -EINVAL);
	assert_string_equal(rl->why, want);

	snprintf(next, sizeof(next), "catalog = %s\n", cat);
	snprintf(want, sizeof(want), "catalog: %s.catalog.db -> %s cannot change while mounted",
		 e->meta, cat);
	expect_refused(e, rl, "", next, want);
	free(rl);
}

static void test_reload_reports_sections_added_removed_and_changed(void **state)
{
	struct env *e = *state;
	struct reload *rl = calloc(1, sizeof(*rl));

	assert_non_null(rl);
	expect_reloadable(e, rl, "[origin \"db\"]\ndevice = sdb\n", "",
			  "[origin \"db\"] removed");
	expect_reloadable(e, rl, "[origin \"db\"]\ndevice = sdb\n",
			  "[origin \"db\"]\ndevice = sdb\n[snapshot \"s\"]\norigin = db\ncow = sdd\n",
			  "[snapshot \"s\"] added");
	expect_reloadable(e, rl, "[origin \"db\"]\ndevice = sdb\n",
			  "[origin \"db\"]\ndevice = sdc\n",
			  "[origin \"db\"] changed: device=sdb -> device=sdc");
	expect_reloadable(e, rl, "[cache \"c\"]\norigin = o1\ncache = c1\nmetadata = m1\n",
			  "[cache \"c\"]\norigin = o1\ncache = c1\nmetadata = m1\nmode = writeback\n",
			  "[cache \"c\"] changed: cache=c1 metadata=m1 origin=o1 -> "
			  "cache=c1 metadata=m1 mode=writeback origin=o1");
	/* A name that moves to another kind is one section gone and another new. */
	expect_reloadable(e, rl,
			  "[origin \"a\"]\ndevice = sdc\n[origin \"db\"]\ndevice = sdb\n"
			  "[cache \"c1\"]\nmode = writethrough\norigin = o1\ncache = c1\nmetadata = m1\n",
			  "no_space_timeout = 0\n"
			  "[cache \"c1\"]\norigin = o1\nmode = writeback\ncache = c1\nmetadata = m1\n"
			  "[cache \"a\"]\norigin = o2\ncache = c2\nmetadata = m2\n"
			  "[origin \"o2\"]\ndevice = sdc\n"
			  "[snapshot \"s1\"]\norigin = o2\ncow = sdd\n",
			  "no_space_timeout: 60s -> 0s; [origin \"a\"] removed; [origin \"db\"] removed; "
			  "[origin \"o2\"] added; [snapshot \"s1\"] added; [cache \"a\"] added; "
			  "[cache \"c1\"] changed: cache=c1 metadata=m1 mode=writethrough origin=o1 -> "
			  "cache=c1 metadata=m1 mode=writeback origin=o1");
	free(rl);
}

static void test_reload_texts_are_cut_safely(void **state)
{
	static const char all[] = "error_if_no_space: no -> yes; no_space_timeout: 60s -> 0s";
	struct env *e = *state;
	struct reload *rl = calloc(1, sizeof(*rl));
	char small[16];

	assert_non_null(rl);
	load_with(e, &rl->run, "");
	load_with(e, &rl->next, "error_if_no_space = yes\nno_space_timeout = 0\n");
	memset(small, 'X', sizeof(small));
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, NULL, 0, small, sizeof(small)),
			 0);
	assert_string_equal(small, "error_if_no_...");
	/* Exactly fitting is not cut. */
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, NULL, 0, rl->changes,
						sizeof(all)),
			 0);
	assert_string_equal(rl->changes, all);
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, NULL, 0, rl->changes,
						sizeof(all) - 1),
			 0);
	assert_string_equal(rl->changes, "error_if_no_space: no -> yes; no_space_timeout: 60s -...");
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, NULL, 0, NULL, 0), 0);
	small[0] = 'X';
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, NULL, 0, small, 1), 0);
	assert_int_equal(small[0], '\0');

	load_with(e, &rl->next, "block_size = 128k\n");
	memset(small, 'X', sizeof(small));
	assert_int_equal(tfs_config_reload_diff(&rl->run, &rl->next, small, sizeof(small), NULL, 0),
			 -EINVAL);
	assert_string_equal(small, "block_size: ...");
	free(rl);
}

/* ---- tfs_parse_size ---- */

static void test_parse_size_accepts_binary_units_and_relative_sizes(void **state)
{
	static const struct {
		const char *s;
		int r;
		uint64_t bytes;
		bool relative;
	} cases[] = {
		{ "0", 0, 0, false },
		{ "512", 0, 512, false },
		{ "512b", 0, 512, false },
		{ "64k", 0, 64 << 10, false },
		{ "64K", 0, 64 << 10, false },
		{ "64KiB", 0, 64 << 10, false },
		{ "64kb", 0, 64 << 10, false },
		{ "1m", 0, 1 << 20, false },
		{ "20G", 0, 20ull << 30, false },
		{ "3t", 0, 3ull << 40, false },
		{ "2p", 0, 2ull << 50, false },
		{ "15e", 0, 15ull << 60, false },
		{ "+50G", 0, 50ull << 30, true },
		{ "+0", 0, 0, true },
		{ "18446744073709551615", 0, UINT64_MAX, false },
		{ "18446744073709551616", -ERANGE, 0, false },
		{ "16e", -ERANGE, 0, false },
		{ "", -EINVAL, 0, false },
		{ "k", -EINVAL, 0, false },
		{ "+", -EINVAL, 0, false },
		{ "-1", -EINVAL, 0, false },
		{ "1.5g", -EINVAL, 0, false },
		{ "1x", -EINVAL, 0, false },
		{ "1 g", -EINVAL, 0, false },
		{ " 1g", -EINVAL, 0, false },
		{ "1gib2", -EINVAL, 0, false },
		{ "0x10", -EINVAL, 0, false },
	};
	uint64_t bytes;
	bool rel;

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		bytes = 12345;
		rel = !cases[i].relative;
		int r = tfs_parse_size(cases[i].s, &bytes, &rel);

		if (r != cases[i].r)
			fail_msg("'%s': got %d, want %d", cases[i].s, r, cases[i].r);
		if (!r) {
			assert_int_equal(bytes, cases[i].bytes);
			assert_int_equal(rel, cases[i].relative);
		}
	}
	/* Without a place to say "relative", '+' is refused. */
	assert_int_equal(tfs_parse_size("+1g", &bytes, NULL), -EINVAL);
	assert_int_equal(tfs_parse_size("1g", &bytes, NULL), 0);
	assert_int_equal(bytes, 1 << 30);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
		T(test_minimal_cfg_gets_the_documented_defaults),
		T(test_every_pool_key_is_parsed),
		T(test_times_bools_and_percentages_in_every_spelling),
		T(test_max_threads_takes_8_to_4096),
		T(test_crlf_line_endings_and_a_bom_are_accepted),
		T(test_relative_paths_are_relative_to_the_cfg_directory),
		T(test_named_sections_accept_their_keys),
		T(test_named_section_text_ignores_the_order_in_the_file),
		T(test_named_section_keys_are_given_once),
		T(test_origin_and_snapshot_sections_are_parsed),
		T(test_origin_and_snapshot_mistakes_are_named),
		T(test_named_section_text_is_at_most_8192_bytes),
		T(test_bad_values_name_file_line_and_key),
		T(test_cache_sections_are_parsed_and_checked),
		T(test_a_failed_load_leaves_the_output_untouched),
		T(test_every_problem_is_reported_not_just_the_first),
		T(test_unknown_sections_are_errors_even_when_empty),
		T(test_named_sections_need_a_quoted_valid_unique_name),
		T(test_unknown_keys_in_every_section_are_errors),
		T(test_syntax_errors_name_their_lines),
		T(test_missing_required_keys_are_named),
		T(test_missing_device_file_is_named_with_its_line),
		T(test_unknown_label_or_uuid_fails_naming_it),
		T(test_label_and_uuid_resolve_to_a_loop_device),
		T(test_devices_must_be_files_or_block_devices_and_differ),
		T(test_block_device_metadata_puts_the_catalog_in_var_lib),
		T(test_a_missing_cfg_is_named),
		T(test_resolve_device_reports_without_logging),
		T(test_reload_of_the_same_cfg_changes_nothing),
		T(test_reload_names_each_reloadable_change),
		T(test_reload_refuses_to_change_what_the_pool_is),
		T(test_reload_reports_sections_added_removed_and_changed),
		T(test_reload_texts_are_cut_safely),
		T(test_parse_size_accepts_binary_units_and_relative_sizes),
#undef T
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
