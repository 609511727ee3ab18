/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * cow-store-probe: drive src/meta/snap-store on a COW file for the
 * integration tests, which compare it with tests/integration/kernel_cow.py.
 *
 *   cow-store-probe lookup COW CHUNK_SECTORS OLD...   open, print the mapping
 *   cow-store-probe commit COW CHUNK_SECTORS OLD...   allocate + commit each OLD,
 *                                                    after writing its chunk
 *                                                    with kernel_cow's pattern
 *   cow-store-probe check COW [ORIGIN_CHUNKS]
 *
 * Prints one JSON object on stdout; exit 0 unless the store refused to open
 * or an operation failed (the error is logged on stderr).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "snap-store.h"

/* The same bytes as kernel_cow.chunk_pattern(old_chunk, chunk_bytes). */
static void fill_pattern(uint8_t *buf, uint64_t len, uint64_t old_chunk)
{
	char word[32];
	int n = snprintf(word, sizeof(word), "chunk %020" PRIu64 "\n", old_chunk);
	for (uint64_t i = 0; i < len; i++)
		buf[i] = (uint8_t)word[i % (uint64_t)n];
}

static void print_usage(struct tfs_snap_store *s)
{
	struct tfs_snap_usage u;
	tfs_snap_store_usage(s, &u);
	printf("\"valid\": %s, \"chunk_sectors\": %" PRIu32 ", \"count\": %" PRIu64
	       ", \"total_sectors\": %" PRIu64 ", \"allocated_sectors\": %" PRIu64
	       ", \"metadata_sectors\": %" PRIu64,
	       tfs_snap_store_valid(s) ? "true" : "false", tfs_snap_store_chunk_sectors(s),
	       tfs_snap_store_count(s), u.total_sectors, u.allocated_sectors, u.metadata_sectors);
}

static int do_check(struct tfs_bdev *dev, int argc, char **argv)
{
	struct tfs_snap_check_info info = { 0 };
	char msg[512];
	uint64_t origin_chunks = argc > 3 ? strtoull(argv[3], NULL, 0) : 0;
	int r = tfs_snap_store_check(dev, origin_chunks, &info, msg, sizeof(msg));
	printf("{\"rc\": %d, \"msg\": \"", r);
	for (const char *p = msg; *p; p++)
		printf(*p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
	printf("\", \"fresh\": %s, \"valid\": %s, \"exceptions\": %" PRIu64 "}\n",
	       info.fresh ? "true" : "false", info.valid ? "true" : "false", info.exceptions);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: cow-store-probe lookup|commit|check COW ...\n");
		return 2;
	}
	struct tfs_bdev *dev;
	int r = tfs_bdev_open(argv[2], false, &dev);
	if (r) {
		fprintf(stderr, "%s: %s\n", argv[2], strerror(-r));
		return 1;
	}
	if (!strcmp(argv[1], "check")) {
		r = do_check(dev, argc, argv);
		tfs_bdev_close(dev);
		return r ? 1 : 0;
	}
	if (argc < 4)
		return 2;
	struct tfs_snap_store *s;
	r = tfs_snap_store_open(dev, (uint32_t)strtoul(argv[3], NULL, 0), &s);
	if (r) {
		tfs_bdev_close(dev);
		return 1;
	}
	uint64_t chunk_bytes = (uint64_t)tfs_snap_store_chunk_sectors(s) * 512;
	uint8_t *buf = NULL;
	bool commit = !strcmp(argv[1], "commit");
	if (commit && !(buf = malloc(chunk_bytes))) {
		r = -ENOMEM;
		goto out;
	}
	printf("{\"map\": {");
	for (int i = 4; i < argc; i++) {
		uint64_t old = strtoull(argv[i], NULL, 0), new;
		if (commit) {
			r = tfs_snap_store_allocate(s, old, &new);
			if (!r) {
				fill_pattern(buf, chunk_bytes, old);
				r = tfs_bdev_write(dev, buf, chunk_bytes, new * chunk_bytes);
			}
			if (!r)
				r = tfs_bdev_flush(dev);
			if (!r)
				r = tfs_snap_store_commit(s, old);
			if (r) {
				fprintf(stderr, "chunk %" PRIu64 ": %s\n", old, strerror(-r));
				break;
			}
		}
		printf("%s\"%" PRIu64 "\": ", i > 4 ? ", " : "", old);
		if (tfs_snap_store_lookup(s, old, &new) == 0)
			printf("%" PRIu64, new);
		else
			printf("null");
	}
	printf("}, ");
	print_usage(s);
	printf("}\n");
out:
	free(buf);
	tfs_snap_store_close(s);
	tfs_bdev_close(dev);
	return r ? 1 : 0;
}
