/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libFuzzer target: thinfs check and thinfs dump on arbitrary metadata.
 * Both must return (never crash, hang or leak) whatever the bytes are.
 *
 * Input layout, so that mutations reach past the checksums:
 *   byte 0   flags: bit 0 = reseal every block's checksum before checking
 *                   (the salt is picked from the block itself, see reseal());
 *                   bit 1 = also try --clear-needs-check (writes block 0)
 *   byte 1   extra zero blocks appended to the device (so a seed image can be
 *            stored without its empty tail)
 *   rest     the metadata device, 4 KiB blocks (a partial last block is padded)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "check.h"
#include "crc32c.h"
#include "dump.h"
#include "format.h"

#define MAX_INPUT_BLOCKS 256u

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Pick the salt a block most likely wants: the superblock at 0, a btree node
 * when the flags word says INTERNAL or LEAF, else a bitmap or an index block
 * as byte 6 (inside a field both leave unused) says.
 */
static void reseal(uint8_t *block, uint64_t nr)
{
	uint32_t flags = tfs_le32(block + 4);
	uint32_t salt;

	if (nr == 0)
		salt = TFS_SALT_THIN_SB;
	else if (flags == TFS_BTREE_INTERNAL || flags == TFS_BTREE_LEAF)
		salt = TFS_SALT_BTREE;
	else
		salt = block[6] & 1 ? TFS_SALT_INDEX : TFS_SALT_BITMAP;
	tfs_put_le32(block, tfs_block_csum(block, salt));
}

static void run_dump(struct tfs_bdev *dev, FILE *sink, bool snap)
{
	struct tfs_dump_opts o = { .metadata_snap = snap };

	tfs_dump_metadata(dev, &o, sink);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static FILE *sink;
	struct tfs_check_opts co = { .quiet = true };
	struct tfs_check_result res;
	struct tfs_bdev *dev;
	uint8_t *image;
	size_t nr_blocks, image_size;

	if (size < 2)
		return 0;
	nr_blocks = (size - 2 + TFS_BLOCK_SIZE - 1) / TFS_BLOCK_SIZE + data[1];
	if (nr_blocks > MAX_INPUT_BLOCKS + 255)
		return 0;
	if (!sink)
		sink = fopen("/dev/null", "w");
	if (!sink)
		abort();

	image_size = nr_blocks * TFS_BLOCK_SIZE;
	image = calloc(1, image_size ? image_size : 1);
	if (!image)
		return 0;
	memcpy(image, data + 2, size - 2);
	if (data[0] & 1)
		for (size_t b = 0; b < nr_blocks; b++)
			reseal(image + b * TFS_BLOCK_SIZE, b);

	if (tfs_bdev_open_mem(image_size, &dev) < 0)
		goto out_free;
	if (image_size && tfs_bdev_write(dev, image, image_size, 0) < 0)
		goto out_close;

	tfs_check_metadata(dev, &co, &res);
	run_dump(dev, sink, false);
	run_dump(dev, sink, true);
	if (data[0] & 2) {
		co.clear_needs_check = true;
		tfs_check_metadata(dev, &co, &res);
	}
out_close:
	tfs_bdev_close(dev);
out_free:
	free(image);
	return 0;
}
