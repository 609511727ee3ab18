/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libFuzzer target: the pool.cfg parser (src/engine/config.c).  Whatever the
 * text, tfs_config_load must return (never crash, hang or leak), and a
 * config it accepts must be one tfs_config_reload_diff can compare.
 *
 * Input: one pool.cfg, or two separated by a line "%%" (then both are
 * parsed and, when both are accepted, diffed both ways, into buffers of
 * every interesting size).  The files are written into a private directory
 * that also holds the regular files "meta", "data" and "data2" and the
 * executable "hook", so that relative device paths and on_event resolve and
 * the parser gets past them to everything else.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[] = "/tmp/thinfs-fuzz-config-XXXXXX";
static char cfg_a[sizeof(dir) + 16], cfg_b[sizeof(dir) + 16];
/* Static: each is tens of kilobytes. */
static struct tfs_pool_config a, b;

static void discard(void *ctx, enum tfs_log_level level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

static void make_file(const char *name, mode_t mode)
{
	char path[sizeof(dir) + 16];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	if (!f || fclose(f) || chmod(path, mode))
		abort();
}

static void remove_dir(void)
{
	static const char *const names[] = { "meta", "data", "data2", "hook", "co", "cc", "cm",
					     "a.cfg", "b.cfg" };
	char path[sizeof(dir) + 16];

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	if (!mkdtemp(dir))
		abort();
	atexit(remove_dir);
	make_file("meta", 0644);
	make_file("data", 0644);
	make_file("data2", 0644);
	make_file("hook", 0755);
	/* A [cache]'s origin, cache and metadata devices. */
	make_file("co", 0644);
	make_file("cc", 0644);
	make_file("cm", 0644);
	snprintf(cfg_a, sizeof(cfg_a), "%s/a.cfg", dir);
	snprintf(cfg_b, sizeof(cfg_b), "%s/b.cfg", dir);
	tfs_log_set_sink(discard, NULL);
	return 0;
}

static void write_file(const char *path, const uint8_t *data, size_t size)
{
	FILE *f = fopen(path, "w");

	if (!f)
		abort();
	if (size && fwrite(data, 1, size, f) != size)
		abort();
	if (fclose(f))
		abort();
}

/* Where the second config starts (after a line "%%"), or NULL. */
static const uint8_t *split(const uint8_t *data, size_t size, size_t *first_len)
{
	for (size_t i = 0; i + 2 <= size; i++) {
		if ((i == 0 || data[i - 1] == '\n') && data[i] == '%' && data[i + 1] == '%' &&
		    (i + 2 == size || data[i + 2] == '\n')) {
			*first_len = i;
			return data + (i + 2 < size ? i + 3 : i + 2);
		}
	}
	return NULL;
}

static void diff(const struct tfs_pool_config *run, const struct tfs_pool_config *next)
{
	static const size_t sizes[] = { 0, 1, 4, 64, 4096 };
	char why[4096], changes[4096];

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		size_t n = sizes[i];
		int r = tfs_config_reload_diff(run, next, n ? why : NULL, n, n ? changes : NULL, n);

		/* A cut text still ends in NUL inside its buffer. */
		if (n && (memchr(why, '\0', n) == NULL || memchr(changes, '\0', n) == NULL))
			abort();
		if (n == 4096 && r == 0 && why[0])
			abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t first_len = size;
	const uint8_t *second = split(data, size, &first_len);
	int ra, rb;

	write_file(cfg_a, data, first_len);
	ra = tfs_config_load(cfg_a, &a);
	if (!second)
		return 0;
	write_file(cfg_b, second, size - (size_t)(second - data));
	rb = tfs_config_load(cfg_b, &b);
	if (ra == 0 && rb == 0) {
		diff(&a, &b);
		diff(&b, &a);
		diff(&a, &a);
	}
	return 0;
}
