/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thinfs diff: offline, read-only.  With a pool.cfg, FROM and TO are names
 * as thinfs-ctl takes them (NAME, GROUP/NAME, - for nothing), looked up in
 * the catalog; with a bare metadata file they are thin device ids.  A pool
 * a daemon has mounted is refused (its metadata changes under us): ask the
 * daemon instead, which answers from a consistent view.
 */
#include "diff.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "catalog.h"
#include "config.h"
#include "format.h"
#include "thin-metadata.h"

struct out {
	uint64_t block_size; /* bytes */
	bool json;
	uint64_t nr;
	uint64_t total;      /* blocks of the larger volume (0: unknown), for progress */
	double start, next;
	bool progress;
};

static void usage(FILE *f)
{
	fputs("Usage: thinfs diff METADATA|POOL.cfg FROM TO [--json] [--stats]\n\n"
	      "Prints the extents of TO that differ from FROM, one per line as\n"
	      "OFFSET LENGTH data|zero (bytes), or as a JSON list with --json: data\n"
	      "where TO maps other data than FROM, zero where FROM maps data and TO\n"
	      "does not.  With a pool.cfg FROM and TO are volumes, GROUP/NAME or - (nothing);\n"
	      "with a metadata file, thin device ids or -.  The pool must not be mounted\n"
	      "(use thinfs-ctl MOUNTPOINT diff then).  --stats: a summary line on stderr.\n", f);
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int print_run(void *ctx, uint64_t vblock, uint64_t len, bool zero)
{
	struct out *o = ctx;
	uint64_t off = vblock * o->block_size, bytes = len * o->block_size;
	const char *kind = zero ? "zero" : "data";

	if (o->json)
		printf("%s{\"offset\":%" PRIu64 ",\"length\":%" PRIu64 ",\"kind\":\"%s\"}",
		       o->nr ? ",\n" : "", off, bytes, kind);
	else
		printf("%" PRIu64 " %" PRIu64 " %s\n", off, bytes, kind);
	o->nr++;
	return 0;
}

/* On a terminal, once a second after the first: how far the walk is. */
static void show_progress(struct out *o, uint64_t vblock)
{
	double t = now_s(), done;

	if (!o->progress || t < o->next || !o->total)
		return;
	o->next = t + 1;
	done = (double)(vblock < o->total ? vblock : o->total) * (double)o->block_size;
	fprintf(stderr, "\rdiff: %.1f of %.1f GiB compared (%.0f MiB/s)\033[K",
		done / 1073741824.0, (double)o->total * (double)o->block_size / 1073741824.0,
		done / 1048576.0 / (t - o->start));
	fflush(stderr);
}

/* A name as thinfs-ctl takes it: NAME, GROUP/NAME or .snapshots/GROUP/NAME. */
static int find_name(struct tfs_catalog *cat, const char *spec, struct tfs_vol_row *row)
{
	struct tfs_group_row g;
	const char *slash;
	char gname[TFS_NAME_MAX + 1];

	if (!strncmp(spec, ".snapshots/", 11))
		spec += 11;
	slash = strchr(spec, '/');
	if (!slash)
		return tfs_catalog_get_by_name(cat, spec, row);
	if ((size_t)(slash - spec) > TFS_NAME_MAX)
		return -ENOENT;
	memcpy(gname, spec, (size_t)(slash - spec));
	gname[slash - spec] = '\0';
	if (tfs_catalog_get_group(cat, gname, &g) < 0)
		return -ENOENT;
	return tfs_catalog_get_member(cat, g.id, slash + 1, row);
}

/* One side: "-" (nothing), a name (catalog) or an id (bare metadata); 0, or 2 when refused. */
static int resolve(struct tfs_catalog *cat, const char *spec, tfs_dev_id *id, const tfs_dev_id **idp,
		   uint64_t *size)
{
	struct tfs_vol_row row;
	char *end;

	*idp = NULL;
	if (!strcmp(spec, "-"))
		return 0;
	if (cat) {
		if (find_name(cat, spec, &row) < 0) {
			fprintf(stderr, "thinfs diff: no volume named '%s' (a volume, GROUP/NAME, "
				"or - for nothing)\n", spec);
			return 2;
		}
		*id = row.dev_id;
		if (row.size > *size)
			*size = row.size;
	} else {
		errno = 0;
		unsigned long long v = strtoull(spec, &end, 10);

		if (errno || *end || !*spec || *spec == '-' || v > TFS_MAX_DEV_ID) {
			fprintf(stderr, "thinfs diff: '%s' is not a thin device id (with a metadata "
				"file FROM and TO are ids; names need the pool.cfg)\n", spec);
			return 2;
		}
		*id = (tfs_dev_id)v;
	}
	*idp = id;
	return 0;
}

/* A daemon holds an exclusive flock on the metadata while mounted (src/fs/daemon.c). */
static bool mounted(const char *meta)
{
	int fd = open(meta, O_RDONLY | O_CLOEXEC);
	bool busy;

	if (fd < 0)
		return false;
	busy = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
	close(fd);
	return busy;
}

int tfs_cmd_diff(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "stats", no_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct tfs_pmd_options po = { .read_only = true };
	struct tfs_pool_config *cfg = NULL;
	struct tfs_catalog *cat = NULL;
	struct tfs_thin_diff *d = NULL;
	struct tfs_bdev *bdev = NULL;
	struct tfs_pmd *pmd = NULL;
	struct out o = { 0 };
	const tfs_dev_id *from, *to;
	tfs_dev_id from_id, to_id;
	const char *meta;
	bool stats = false;
	uint64_t size = 0;
	size_t n;
	int c, r, rc = 2;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (c) {
		case 'j': o.json = true; break;
		case 's': stats = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind + 3 != argc) {
		usage(stderr);
		return 2;
	}
	meta = argv[optind];
	n = strlen(meta);
	if (n > 4 && !strcmp(meta + n - 4, ".cfg")) {
		cfg = malloc(sizeof(*cfg));
		if (!cfg || tfs_config_load(meta, cfg) < 0)
			goto out; /* every problem logged with file:line */
		meta = cfg->metadata;
		if (tfs_catalog_open(cfg->catalog, true, &cat) < 0) {
			fprintf(stderr, "thinfs diff: cannot open the catalog %s\n", cfg->catalog);
			goto out;
		}
	}
	if (mounted(meta)) {
		fprintf(stderr, "thinfs diff: %s is in use by a thinfs daemon: use thinfs-ctl "
			"MOUNTPOINT diff\n", meta);
		goto out;
	}
	if (resolve(cat, argv[optind + 1], &from_id, &from, &size) ||
	    resolve(cat, argv[optind + 2], &to_id, &to, &size))
		goto out;
	rc = 1;
	if (tfs_bdev_open(meta, true, &bdev) < 0 || tfs_pmd_open(bdev, &po, &pmd) < 0)
		goto out; /* logged */
	o.block_size = (uint64_t)tfs_pmd_data_block_sectors(pmd) * 512;
	o.total = (size + o.block_size - 1) / o.block_size;
	o.progress = isatty(STDERR_FILENO);
	o.start = now_s();
	o.next = o.start + 1;
	r = tfs_thin_diff_begin(pmd, from, to, &d);
	if (r < 0)
		goto out;
	if (o.json)
		fputs("[", stdout);
	while ((r = tfs_thin_diff_step(d, 256, print_run, &o)) == 1)
		show_progress(&o, tfs_thin_diff_position(d));
	if (o.progress && o.next > o.start + 1)
		fputs("\r\033[K", stderr);
	if (o.json)
		fputs("]\n", stdout);
	if (r < 0)
		goto out;
	if (stats)
		fprintf(stderr, "diff: %" PRIu64 " extents, %" PRIu64 " metadata blocks read, %.3f ms\n",
			o.nr, tfs_thin_diff_nodes_read(d), (now_s() - o.start) * 1e3);
	rc = fflush(stdout) ? 1 : 0;
out:
	tfs_thin_diff_end(d);
	tfs_pmd_close(pmd);
	tfs_bdev_close(bdev);
	if (cat)
		tfs_catalog_close(cat);
	free(cfg);
	return rc;
}
