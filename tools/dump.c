/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thinfs dump: XML in thin_dump 0.9.0's exact layout.
 *
 * thin_dump reads the whole device-details tree first, prints the
 * superblock line, then walks the top level of the mapping tree in key
 * order and prints each device with its details and its mappings.  A device
 * present only in the details tree is not printed; one present only in the
 * mapping tree is an error.  We follow the same order so the bytes match.
 */
#include "dump.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "crc32c.h"
#include "pool-cfg.h"
#include "raw-meta.h"

struct dev_details {
	uint64_t id;
	uint64_t mapped_blocks;
	uint64_t transaction_id;
	uint32_t creation_time;
	uint32_t snapshotted_time;
};

struct details_vec {
	struct dev_details *v;
	size_t n, cap;
};

/* A run of mappings waiting to be printed. */
struct run {
	bool open;
	uint64_t vblock, dblock, len;
	uint32_t time;
};

static void report(const struct tfs_dump_opts *o, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void report(const struct tfs_dump_opts *o, const char *fmt, ...)
{
	va_list ap;

	if (!o->err)
		return;
	va_start(ap, fmt);
	fputs("thinfs dump: ", o->err);
	vfprintf(o->err, fmt, ap);
	fputc('\n', o->err);
	va_end(ap);
}

static int details_push(struct details_vec *dv, const struct dev_details *d)
{
	if (dv->n == dv->cap) {
		size_t cap = dv->cap ? dv->cap * 2 : 64;
		struct dev_details *v = realloc(dv->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		dv->v = v;
		dv->cap = cap;
	}
	dv->v[dv->n++] = *d;
	return 0;
}

/* The iterator yields ids in ascending order, so the vector is sorted. */
static const struct dev_details *details_find(const struct details_vec *dv, uint64_t id)
{
	size_t lo = 0, hi = dv->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (dv->v[mid].id == id)
			return &dv->v[mid];
		if (dv->v[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

static int iter_error(const struct tfs_dump_opts *o, const char *tree, struct tfs_raw_iter *it,
		      int r)
{
	if (r == -ENOMEM)
		report(o, "out of memory");
	else
		report(o, "%s: %s", tree, it ? tfs_raw_iter_why(it) : "cannot walk");
	return r;
}

static int read_details(const struct tfs_raw_dev *d, uint64_t root, const struct tfs_dump_opts *o,
			struct details_vec *dv)
{
	struct tfs_raw_iter *it;
	const uint8_t *v;
	uint64_t key;
	int r;

	r = tfs_raw_iter_open(d, root, TFS_RAW_VSIZE_DETAILS, 0, &it);
	while (r >= 0 && (r = tfs_raw_iter_next(it, &key, &v)) > 0) {
		struct dev_details dd = {
			.id = key,
			.mapped_blocks = tfs_le64(v + offsetof(struct tfs_disk_device_details, mapped_blocks)),
			.transaction_id = tfs_le64(v + offsetof(struct tfs_disk_device_details, transaction_id)),
			.creation_time = tfs_le32(v + offsetof(struct tfs_disk_device_details, creation_time)),
			.snapshotted_time = tfs_le32(v + offsetof(struct tfs_disk_device_details, snapshotted_time)),
		};
		r = details_push(dv, &dd);
		if (r < 0)
			break;
	}
	if (r < 0)
		iter_error(o, "device details tree", it, r);
	tfs_raw_iter_close(it);
	return r;
}

static void run_flush(struct run *run, FILE *out)
{
	if (!run->open)
		return;
	if (run->len == 1)
		fprintf(out, "    <single_mapping origin_block=\"%" PRIu64 "\" data_block=\"%" PRIu64
			     "\" time=\"%" PRIu32 "\"/>\n",
			run->vblock, run->dblock, run->time);
	else
		fprintf(out, "    <range_mapping origin_begin=\"%" PRIu64 "\" data_begin=\"%" PRIu64
			     "\" length=\"%" PRIu64 "\" time=\"%" PRIu32 "\"/>\n",
			run->vblock, run->dblock, run->len, run->time);
	run->open = false;
}

/* Extend the current run when both block numbers follow on and the time matches. */
static void run_add(struct run *run, uint64_t vblock, uint64_t dblock, uint32_t time, FILE *out)
{
	if (run->open && vblock == run->vblock + run->len && dblock == run->dblock + run->len &&
	    time == run->time) {
		run->len++;
		return;
	}
	run_flush(run, out);
	run->open = true;
	run->vblock = vblock;
	run->dblock = dblock;
	run->time = time;
	run->len = 1;
}

static int emit_mappings(const struct tfs_raw_dev *d, uint64_t dev_id, uint64_t root,
			 const struct tfs_dump_opts *o, FILE *out)
{
	struct run run = { 0 };
	struct tfs_raw_iter *it;
	const uint8_t *v;
	uint64_t vblock;
	int r;

	r = tfs_raw_iter_open(d, root, TFS_RAW_VSIZE_U64, 0, &it);
	while (r >= 0 && (r = tfs_raw_iter_next(it, &vblock, &v)) > 0) {
		uint64_t dblock;
		uint32_t time;

		tfs_unpack_block_time(tfs_le64(v), &dblock, &time);
		run_add(&run, vblock, dblock, time, out);
	}
	run_flush(&run, out);
	if (r < 0) {
		char tree[64];

		snprintf(tree, sizeof(tree), "mapping tree of device %" PRIu64, dev_id);
		iter_error(o, tree, it, r);
	}
	tfs_raw_iter_close(it);
	return r;
}

static int emit_device(const struct tfs_raw_dev *d, const struct dev_details *dd, uint64_t root,
		       const struct tfs_dump_opts *o, FILE *out)
{
	int r = 0;

	fprintf(out, "  <device dev_id=\"%" PRIu64 "\" mapped_blocks=\"%" PRIu64
		     "\" transaction=\"%" PRIu64 "\" creation_time=\"%" PRIu32
		     "\" snap_time=\"%" PRIu32 "\">\n",
		dd->id, dd->mapped_blocks, dd->transaction_id, dd->creation_time,
		dd->snapshotted_time);
	if (!o->skip_mappings)
		r = emit_mappings(d, dd->id, root, o, out);
	fputs("  </device>\n", out);
	return r;
}

static int emit_devices(const struct tfs_raw_dev *d, uint64_t mapping_root,
			const struct details_vec *dv, const struct tfs_dump_opts *o, FILE *out)
{
	struct tfs_raw_iter *it;
	const uint8_t *v;
	uint64_t id;
	int r;

	r = tfs_raw_iter_open(d, mapping_root, TFS_RAW_VSIZE_U64, 0, &it);
	while (r >= 0 && (r = tfs_raw_iter_next(it, &id, &v)) > 0) {
		const struct dev_details *dd = details_find(dv, id);

		if (!dd) {
			report(o, "mappings present for device %" PRIu64
				  ", but it isn't present in device tree", id);
			r = -EUCLEAN;
			goto out;
		}
		if (o->have_dev_id && o->dev_id != id)
			continue;
		r = emit_device(d, dd, tfs_le64(v), o, out);
		if (r < 0)
			goto out;
	}
	if (r < 0)
		iter_error(o, "mapping tree", it, r);
out:
	tfs_raw_iter_close(it);
	return r;
}

/* Read a superblock (the live one or the held-root copy) at block b. */
static int read_sb(const struct tfs_raw_dev *d, uint64_t b, const struct tfs_dump_opts *o,
		   struct tfs_raw_sb *sb)
{
	uint8_t block[TFS_BLOCK_SIZE];
	int r = tfs_raw_read(d, b, block);

	if (r < 0) {
		report(o, "cannot read superblock at block %" PRIu64 ": %s", b,
		       r == -ERANGE ? "beyond the end of the device" : strerror(-r));
		return r == -ERANGE ? -EUCLEAN : r;
	}
	tfs_raw_sb_decode(block, sb);
	if (sb->csum != tfs_block_csum(block, TFS_SALT_THIN_SB)) {
		report(o, "bad checksum in superblock at block %" PRIu64, b);
		return -EUCLEAN;
	}
	if (sb->magic != TFS_THIN_MAGIC) {
		report(o, "block %" PRIu64 " is not a thin-pool superblock (magic %" PRIu64 ")", b,
		       sb->magic);
		return -EUCLEAN;
	}
	return 0;
}

int tfs_dump_metadata(struct tfs_bdev *bdev, const struct tfs_dump_opts *o, FILE *out)
{
	struct details_vec dv = { 0 };
	struct tfs_raw_dev d;
	struct tfs_raw_sb sb;
	uint64_t nr_data_blocks;
	int r;

	r = tfs_raw_dev_init(&d, bdev);
	if (r < 0) {
		report(o, "cannot get the device size: %s", strerror(-r));
		return r;
	}
	r = read_sb(&d, 0, o, &sb);
	if (r < 0)
		return r;
	nr_data_blocks = sb.data_sm.nr_blocks;
	if (o->metadata_snap) {
		uint64_t b = o->snap_block ? o->snap_block : sb.held_root;

		if (!b) {
			report(o, "no current metadata snap");
			return -ENODATA;
		}
		r = read_sb(&d, b, o, &sb);
		if (r < 0)
			return r;
		/* The copy carries no data space map, so thin_dump -m prints 0. */
		nr_data_blocks = 0;
	}

	r = read_details(&d, sb.details_root, o, &dv);
	if (r < 0)
		goto out;
	fprintf(out, "<superblock uuid=\"\" time=\"%" PRIu32 "\" transaction=\"%" PRIu64
		     "\" flags=\"%" PRIu32 "\" version=\"%" PRIu32 "\" data_block_size=\"%" PRIu32
		     "\" nr_data_blocks=\"%" PRIu64 "\">\n",
		sb.time, sb.trans_id, sb.flags, sb.version, sb.data_block_size, nr_data_blocks);
	r = emit_devices(&d, sb.mapping_root, &dv, o, out);
	if (r < 0)
		goto out;
	fputs("</superblock>\n", out);
	if (fflush(out) || ferror(out)) {
		report(o, "write error: %s", strerror(errno));
		r = -EIO;
	}
out:
	free(dv.v);
	return r;
}

/* ---- command line -------------------------------------------------------- */

static void dump_usage(FILE *f)
{
	fputs("Usage: thinfs dump [options] METADATA|POOL.cfg\n"
	      "Print thin-pool metadata as XML (the format of thin_dump 0.9.0).\n"
	      "\n"
	      "  -o FILE                    write to FILE instead of standard output\n"
	      "  -m, --metadata-snap[=BLOCK]  dump the metadata snapshot (held root), or\n"
	      "                             the superblock copy at BLOCK\n"
	      "      --dev-id ID            dump only thin device ID\n"
	      "      --skip-mappings        devices only, no mappings\n"
	      "  -f, --format xml           the only format\n"
	      "  -h, --help                 this text\n"
	      "\n"
	      "Exit status: 0 dumped, 1 corrupt or unreadable metadata, 2 usage error.\n",
	      f);
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!*s || *s == '-')
		return -EINVAL;
	errno = 0;
	*out = strtoull(s, &end, 0);
	return errno || *end ? -EINVAL : 0;
}

enum { OPT_DEV_ID = 256, OPT_SKIP_MAPPINGS };

int tfs_cmd_dump(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "metadata-snap", optional_argument, NULL, 'm' },
		{ "dev-id", required_argument, NULL, OPT_DEV_ID },
		{ "skip-mappings", no_argument, NULL, OPT_SKIP_MAPPINGS },
		{ "format", required_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct tfs_dump_opts o = { .err = stderr };
	const char *out_path = NULL;
	char meta_path[4096];
	struct tfs_bdev *bdev = NULL;
	FILE *out = stdout;
	int c, r, rc = 2;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:m::f:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			out_path = optarg;
			break;
		case 'm':
			o.metadata_snap = true;
			if (optarg && parse_u64(optarg, &o.snap_block) < 0) {
				fprintf(stderr, "thinfs dump: bad metadata snapshot block '%s'\n", optarg);
				return 2;
			}
			break;
		case OPT_DEV_ID:
			o.have_dev_id = true;
			if (parse_u64(optarg, &o.dev_id) < 0) {
				fprintf(stderr, "thinfs dump: bad device id '%s'\n", optarg);
				return 2;
			}
			break;
		case OPT_SKIP_MAPPINGS:
			o.skip_mappings = true;
			break;
		case 'f':
			if (strcmp(optarg, "xml")) {
				fprintf(stderr, "thinfs dump: unknown format '%s' (only xml)\n", optarg);
				return 2;
			}
			break;
		case 'h':
			dump_usage(stdout);
			return 0;
		default:
			dump_usage(stderr);
			return 2;
		}
	}
	if (optind + 1 != argc) {
		dump_usage(stderr);
		return 2;
	}
	if (tfs_pool_cfg_metadata_path(argv[optind], meta_path, sizeof(meta_path)) < 0)
		return 2;

	r = tfs_bdev_open(meta_path, true, &bdev);
	if (r < 0)
		return 1; /* logged by tfs_bdev_open */
	if (out_path) {
		out = fopen(out_path, "w");
		if (!out) {
			fprintf(stderr, "thinfs dump: cannot create %s: %s\n", out_path,
				strerror(errno));
			rc = 1;
			goto out_close_dev;
		}
	}
	r = tfs_dump_metadata(bdev, &o, out);
	rc = r < 0 ? 1 : 0;
	if (out != stdout && fclose(out)) {
		fprintf(stderr, "thinfs dump: writing %s: %s\n", out_path, strerror(errno));
		rc = 1;
	}
out_close_dev:
	tfs_bdev_close(bdev);
	return rc;
}
