/* SPDX-License-Identifier: GPL-2.0-or-later */
/* What mkpool finds on a device before it formats it: libblkid signatures, thin superblocks. */
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
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "format.h"
#include "log.h"
#include "probe.h"
#include "thin-metadata.h"

struct env {
	char dir[64];
	char img[PATH_MAX];
};

static int setup(void **state)
{
	struct env *e = calloc(1, sizeof(*e));
	int fd;

	assert_non_null(e);
	snprintf(e->dir, sizeof(e->dir), "/tmp/tfs-probe-XXXXXX");
	assert_non_null(mkdtemp(e->dir));
	snprintf(e->img, sizeof(e->img), "%s/disk.img", e->dir);
	fd = open(e->img, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 32 << 20), 0); /* sparse, reads as zeros */
	close(fd);
	*state = e;
	return 0;
}

static int teardown(void **state)
{
	struct env *e = *state;
	char cmd[PATH_MAX + 16];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
	assert_int_equal(system(cmd), 0);
	free(e);
	return 0;
}

static bool have(const char *tool)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1 || test -x /sbin/%s", tool,
		 tool);
	return system(cmd) == 0;
}

static void run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void run(const char *fmt, ...)
{
	char cmd[PATH_MAX * 2];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	if (system(cmd) != 0)
		fail_msg("command failed: %s", cmd);
}

static void pwrite_all(const char *path, const void *buf, size_t len, off_t off)
{
	int fd = open(path, O_WRONLY);

	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

static void test_zero_file_has_no_signature(void **state)
{
	struct env *e = *state;
	char what[256] = "junk";

	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 0);
	assert_string_equal(what, "");
	assert_int_equal(tfs_probe_thin_metadata(e->img), 0);
}

static void test_ext4_is_found_with_its_uuid_and_label(void **state)
{
	struct env *e = *state;
	char what[256];

	if (!have("mkfs.ext4"))
		skip();
	run("PATH=$PATH:/sbin:/usr/sbin mkfs.ext4 -q -F -L tfs-probe "
	    "-U 0badc0de-1234-4321-8765-0123456789ab '%s'",
	    e->img);
	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 1);
	assert_string_equal(what, "ext4 filesystem (UUID=0badc0de-1234-4321-8765-0123456789ab, "
				  "LABEL=tfs-probe)");
	assert_int_equal(tfs_probe_thin_metadata(e->img), 0);
}

static void test_description_is_cut_to_the_buffer(void **state)
{
	struct env *e = *state;
	char what[8];

	if (!have("mkfs.ext4"))
		skip();
	run("PATH=$PATH:/sbin:/usr/sbin mkfs.ext4 -q -F -L tfs-probe '%s'", e->img);
	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 1);
	assert_string_equal(what, "ext4 fi");
}

/*
 * An MBR as sfdisk writes it for "one Linux partition from 1 MiB": the
 * partition entry at 446, the 0x55AA signature at 510.  Written here
 * byte by byte so the test needs no partitioning tool.
 */
static void test_dos_partition_table_is_found(void **state)
{
	struct env *e = *state;
	uint8_t mbr[512] = { 0 };
	uint8_t *p = mbr + 446;
	char what[256];

	tfs_put_le32(mbr + 440, 0x7f5a1e55); /* disk identifier */
	p[0] = 0x00;                          /* not bootable */
	p[1] = 0xfe; p[2] = 0xff; p[3] = 0xff; /* CHS start: use LBA */
	p[4] = 0x83;                          /* Linux */
	p[5] = 0xfe; p[6] = 0xff; p[7] = 0xff; /* CHS end: use LBA */
	tfs_put_le32(p + 8, 2048);            /* first sector */
	tfs_put_le32(p + 12, (32 << 20) / 512 - 2048);
	mbr[510] = 0x55;
	mbr[511] = 0xaa;
	pwrite_all(e->img, mbr, sizeof(mbr), 0);
	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 1);
	assert_string_equal(what, "dos partition table");
}

static void test_swap_is_reported_as_a_signature(void **state)
{
	struct env *e = *state;
	char what[256];

	if (!have("mkswap"))
		skip();
	run("PATH=$PATH:/sbin:/usr/sbin mkswap -L tfs-swap '%s' >/dev/null 2>&1", e->img);
	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 1);
	assert_non_null(strstr(what, "swap"));
	assert_non_null(strstr(what, "LABEL=tfs-swap"));
}

static void test_missing_file_is_an_error(void **state)
{
	struct env *e = *state;
	char what[64], path[PATH_MAX + 16];

	snprintf(path, sizeof(path), "%s/absent", e->dir);
	assert_int_equal(tfs_probe_signature(path, what, sizeof(what)), -ENOENT);
	assert_int_equal(tfs_probe_thin_metadata(path), -ENOENT);
}

static void test_formatted_thin_metadata_is_recognised(void **state)
{
	struct env *e = *state;
	struct tfs_pmd_options opt = { .data_block_sectors = 128, .nr_data_blocks = 1024 };
	struct tfs_bdev *dev;
	struct tfs_pmd *pmd;
	char what[256];

	assert_int_equal(tfs_bdev_open(e->img, false, &dev), 0);
	assert_int_equal(tfs_pmd_format(dev, &opt, &pmd), 0);
	assert_int_equal(tfs_pmd_commit(pmd), 0);
	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	assert_int_equal(tfs_probe_thin_metadata(e->img), 1);
	/* libblkid does not know dm-thin metadata: mkpool needs both probes. */
	assert_int_equal(tfs_probe_signature(e->img, what, sizeof(what)), 0);
}

static void test_thin_magic_alone_counts_and_short_files_do_not(void **state)
{
	struct env *e = *state;
	uint8_t sb[TFS_BLOCK_SIZE] = { 0 };
	int fd;

	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, magic), TFS_THIN_MAGIC);
	pwrite_all(e->img, sb, sizeof(sb), 0);
	assert_int_equal(tfs_probe_thin_metadata(e->img), 1);

	/* The magic one block further is not a superblock. */
	memset(sb, 0, sizeof(sb));
	pwrite_all(e->img, sb, sizeof(sb), 0);
	tfs_put_le64(sb + offsetof(struct tfs_disk_thin_sb, magic), TFS_THIN_MAGIC);
	pwrite_all(e->img, sb, sizeof(sb), TFS_BLOCK_SIZE);
	assert_int_equal(tfs_probe_thin_metadata(e->img), 0);

	fd = open(e->img, O_WRONLY | O_TRUNC);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, "short", 5), 5);
	close(fd);
	assert_int_equal(tfs_probe_thin_metadata(e->img), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
		T(test_zero_file_has_no_signature),
		T(test_ext4_is_found_with_its_uuid_and_label),
		T(test_description_is_cut_to_the_buffer),
		T(test_dos_partition_table_is_found),
		T(test_swap_is_reported_as_a_signature),
		T(test_missing_file_is_an_error),
		T(test_formatted_thin_metadata_is_recognised),
		T(test_thin_magic_alone_counts_and_short_files_do_not),
#undef T
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
