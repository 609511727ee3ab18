/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Two passes over the XML: the first only validates (so bad input changes
 * nothing on the output device), the second formats and fills the pool.
 */
#include "restore.h"

#include <errno.h>
#include <expat.h>
#include <getopt.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "format.h"
#include "log.h"
#include "thin-metadata.h"

struct restore {
	XML_Parser parser;
	const char *xml_path;
	struct tfs_bdev *meta; /* NULL in the validation pass */
	struct tfs_pmd *pmd;
	struct tfs_td *td;
	struct tfs_thin_details details;
	uint64_t nr_data_blocks;
	uint32_t data_block_sectors;
	bool seen_superblock;
	bool in_device;
	uint64_t nr_devices, nr_mappings;
	int err;
};

static void fail(struct restore *rs, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void fail(struct restore *rs, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (rs->err)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "thinfs restore: %s line %lu: %s\n", rs->xml_path,
		(unsigned long)XML_GetCurrentLineNumber(rs->parser), msg);
	rs->err = err ? err : -EINVAL;
	XML_StopParser(rs->parser, XML_FALSE);
}

static const char *attr(const char **atts, const char *name)
{
	for (int i = 0; atts[i]; i += 2)
		if (!strcmp(atts[i], name))
			return atts[i + 1];
	return NULL;
}

/* A required unsigned attribute no larger than max. */
static bool num(struct restore *rs, const char **atts, const char *el, const char *name,
		uint64_t max, uint64_t *out)
{
	const char *s = attr(atts, name);
	char *end;

	if (!s) {
		fail(rs, -EINVAL, "<%s> lacks the %s attribute", el, name);
		return false;
	}
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || v > max) {
		fail(rs, -EINVAL, "<%s %s=\"%s\">: not a number in 0..%" PRIu64, el, name, s, max);
		return false;
	}
	*out = v;
	return true;
}

static void on_superblock(struct restore *rs, const char **atts)
{
	uint64_t time, trans, flags, bs, nr;

	if (rs->seen_superblock) {
		fail(rs, -EINVAL, "a second <superblock>");
		return;
	}
	rs->seen_superblock = true;
	if (!num(rs, atts, "superblock", "time", TFS_TIME_MASK, &time) ||
	    !num(rs, atts, "superblock", "transaction", UINT64_MAX, &trans) ||
	    !num(rs, atts, "superblock", "data_block_size", UINT32_MAX, &bs) ||
	    !num(rs, atts, "superblock", "nr_data_blocks", TFS_MAX_DATA_BLOCK + 1, &nr))
		return;
	flags = 0;
	if (attr(atts, "flags") && !num(rs, atts, "superblock", "flags", 1, &flags))
		return;
	if (bs < TFS_DATA_BLOCK_MIN_SECTORS || bs > TFS_DATA_BLOCK_MAX_SECTORS ||
	    bs % TFS_DATA_BLOCK_MIN_SECTORS) {
		fail(rs, -EINVAL, "data_block_size %" PRIu64 " sectors: must be a multiple of 128 "
			"between 128 and 2097152", bs);
		return;
	}
	rs->data_block_sectors = (uint32_t)bs;
	rs->nr_data_blocks = nr;
	if (!rs->meta)
		return;

	struct tfs_pmd_options opt = { .data_block_sectors = (uint32_t)bs, .nr_data_blocks = nr };
	int r = tfs_pmd_format(rs->meta, &opt, &rs->pmd);
	if (!r)
		r = tfs_pmd_restore_superblock(rs->pmd, (uint32_t)time, trans, (uint32_t)flags);
	if (r)
		fail(rs, r, "formatting the metadata failed: %s", strerror(-r));
}

static void on_device(struct restore *rs, const char **atts)
{
	uint64_t id, mapped, trans, ctime, stime;
	int r;

	if (!rs->seen_superblock || rs->in_device) {
		fail(rs, -EINVAL, "<device> outside <superblock> or inside another <device>");
		return;
	}
	if (!num(rs, atts, "device", "dev_id", TFS_MAX_DEV_ID, &id) ||
	    !num(rs, atts, "device", "mapped_blocks", UINT64_MAX, &mapped) ||
	    !num(rs, atts, "device", "transaction", UINT64_MAX, &trans) ||
	    !num(rs, atts, "device", "creation_time", TFS_TIME_MASK, &ctime) ||
	    !num(rs, atts, "device", "snap_time", TFS_TIME_MASK, &stime))
		return;
	rs->details = (struct tfs_thin_details){ .mapped_blocks = mapped, .transaction_id = trans,
						 .creation_time = (uint32_t)ctime,
						 .snapshotted_time = (uint32_t)stime };
	rs->nr_devices++;
	rs->in_device = true;
	if (!rs->pmd)
		return;
	r = tfs_pmd_create_thin(rs->pmd, (tfs_dev_id)id);
	if (!r)
		r = tfs_pmd_open_thin(rs->pmd, (tfs_dev_id)id, &rs->td);
	if (r)
		fail(rs, r, "creating device %" PRIu64 " failed: %s", id, strerror(-r));
}

static void map_run(struct restore *rs, uint64_t vbegin, uint64_t dbegin, uint64_t len,
		    uint64_t time)
{
	if (!len) {
		fail(rs, -EINVAL, "a mapping of length 0");
		return;
	}
	if (dbegin + len > rs->nr_data_blocks || dbegin + len < dbegin) {
		fail(rs, -EINVAL, "data blocks %" PRIu64 "..%" PRIu64 " lie past nr_data_blocks %" PRIu64,
		     dbegin, dbegin + len - 1, rs->nr_data_blocks);
		return;
	}
	if (vbegin + len < vbegin) {
		fail(rs, -EINVAL, "virtual block range overflows");
		return;
	}
	rs->nr_mappings += len;
	if (!rs->pmd)
		return;
	for (uint64_t i = 0; i < len; i++) {
		int r = tfs_pmd_data_block_inc(rs->pmd, dbegin + i);
		if (!r)
			r = tfs_thin_insert_timed(rs->td, vbegin + i, dbegin + i, (uint32_t)time);
		if (r) {
			fail(rs, r, "mapping block %" PRIu64 " failed: %s", vbegin + i, strerror(-r));
			return;
		}
	}
}

static void on_mapping(struct restore *rs, const char *el, const char **atts)
{
	uint64_t v, d, len = 1, time;

	if (!rs->in_device) {
		fail(rs, -EINVAL, "<%s> outside <device>", el);
		return;
	}
	if (!strcmp(el, "range_mapping")) {
		if (!num(rs, atts, el, "origin_begin", UINT64_MAX, &v) ||
		    !num(rs, atts, el, "data_begin", TFS_MAX_DATA_BLOCK, &d) ||
		    !num(rs, atts, el, "length", UINT64_MAX, &len))
			return;
	} else if (!num(rs, atts, el, "origin_block", UINT64_MAX, &v) ||
		   !num(rs, atts, el, "data_block", TFS_MAX_DATA_BLOCK, &d)) {
		return;
	}
	if (!num(rs, atts, el, "time", TFS_TIME_MASK, &time))
		return;
	map_run(rs, v, d, len, time);
}

static void XMLCALL start_el(void *ctx, const char *el, const char **atts)
{
	struct restore *rs = ctx;

	if (rs->err)
		return;
	if (!strcmp(el, "superblock"))
		on_superblock(rs, atts);
	else if (!strcmp(el, "device"))
		on_device(rs, atts);
	else if (!strcmp(el, "range_mapping") || !strcmp(el, "single_mapping"))
		on_mapping(rs, el, atts);
	else
		fail(rs, -EINVAL, "unknown element <%s>", el);
}

static void XMLCALL end_el(void *ctx, const char *el)
{
	struct restore *rs = ctx;
	int r;

	if (rs->err || strcmp(el, "device"))
		return;
	if (rs->td) {
		/* Details as dumped, mapped_blocks included, once every mapping is in. */
		r = tfs_pmd_restore_details(rs->pmd, tfs_td_id(rs->td), &rs->details);
		tfs_pmd_close_thin(rs->td);
		if (r)
			fail(rs, r, "setting device details failed: %s", strerror(-r));
	}
	rs->td = NULL;
	rs->in_device = false;
}

static int parse(struct restore *rs, FILE *in)
{
	char buf[65536];
	size_t n;
	int done;

	rs->parser = XML_ParserCreate(NULL);
	if (!rs->parser)
		return -ENOMEM;
	XML_SetUserData(rs->parser, rs);
	XML_SetElementHandler(rs->parser, start_el, end_el);
	do {
		n = fread(buf, 1, sizeof(buf), in);
		done = n < sizeof(buf);
		if (XML_Parse(rs->parser, buf, (int)n, done) == XML_STATUS_ERROR && !rs->err) {
			fprintf(stderr, "thinfs restore: %s line %lu: %s\n", rs->xml_path,
				(unsigned long)XML_GetCurrentLineNumber(rs->parser),
				XML_ErrorString(XML_GetErrorCode(rs->parser)));
			rs->err = -EINVAL;
		}
	} while (!done && !rs->err);
	if (!rs->err && ferror(in))
		rs->err = -EIO;
	if (!rs->err && !rs->seen_superblock) {
		fprintf(stderr, "thinfs restore: %s: no <superblock> element\n", rs->xml_path);
		rs->err = -EINVAL;
	}
	XML_ParserFree(rs->parser);
	return rs->err;
}

static int run_pass(struct restore *rs, struct tfs_bdev *meta)
{
	FILE *in = fopen(rs->xml_path, "r");
	int r;

	if (!in) {
		fprintf(stderr, "thinfs restore: cannot open %s: %s\n", rs->xml_path, strerror(errno));
		return -errno;
	}
	rs->meta = meta;
	r = parse(rs, in);
	fclose(in);
	return r;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: thinfs restore -i XML -o METADATA [-q]\n"
		   "  Builds thin-pool metadata from a thin_dump/thinfs dump XML file.\n"
		   "  The XML is validated completely before METADATA is written.\n");
}

int tfs_cmd_restore(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "input", required_argument, NULL, 'i' },
		{ "output", required_argument, NULL, 'o' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *input = NULL, *output = NULL;
	struct restore check = { 0 }, rs = { 0 };
	struct tfs_bdev *meta = NULL;
	bool quiet = false;
	int c, r;

	optind = 1;
	while ((c = getopt_long(argc, argv, "i:o:qh", longopts, NULL)) != -1) {
		switch (c) {
		case 'i': input = optarg; break;
		case 'o': output = optarg; break;
		case 'q': quiet = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!input || !output || optind != argc) {
		usage(stderr);
		return 2;
	}
	check.xml_path = rs.xml_path = input;
	if (run_pass(&check, NULL))
		return 1;
	r = tfs_bdev_open(output, false, &meta);
	if (r)
		return 1;
	r = run_pass(&rs, meta);
	if (!r)
		r = tfs_pmd_commit(rs.pmd);
	if (r && !rs.err)
		fprintf(stderr, "thinfs restore: writing %s failed: %s\n", output, strerror(-r));
	if (!r && !quiet)
		printf("restored %" PRIu64 " devices, %" PRIu64 " mappings into %s\n", rs.nr_devices,
		       rs.nr_mappings, output);
	if (rs.td && rs.pmd)
		tfs_pmd_close_thin(rs.td);
	tfs_pmd_close(rs.pmd);
	tfs_bdev_close(meta);
	return r ? 1 : 0;
}
