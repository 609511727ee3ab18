/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The device interface (target.h) on the linear target: a backing device
 * behind struct tfs_dev, the bottom of a stack of targets.  The thin
 * target's side is in test-pool.c.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "bdev.h"
#include "record-sink.h"
#include "target.h"

#define SIZE (1024u * 1024)

static struct tfs_dev *open_linear(unsigned flags, struct tfs_bdev **bdev)
{
	struct tfs_dev *dev;

	assert_int_equal(tfs_bdev_open_mem(SIZE, bdev), 0);
	assert_int_equal(tfs_linear_open(*bdev, true, flags, &dev), 0);
	return dev;
}

static void test_linear_passes_io_through_to_its_device(void **state)
{
	struct tfs_bdev *bdev;
	struct tfs_dev *dev = open_linear(0, &bdev);
	uint8_t buf[5000], got[5000];

	(void)state;
	assert_string_equal(tfs_dev_kind(dev), "linear");
	memset(buf, 0xa5, sizeof(buf));
	assert_int_equal(tfs_dev_write(dev, buf, sizeof(buf), 777), 0);
	assert_int_equal(tfs_dev_flush(dev), 0);
	assert_int_equal(tfs_bdev_read(bdev, got, sizeof(got), 777), 0);
	assert_memory_equal(got, buf, sizeof(buf));
	memset(got, 0, sizeof(got));
	assert_int_equal(tfs_dev_read(dev, got, sizeof(got), 777), 0);
	assert_memory_equal(got, buf, sizeof(buf));
	tfs_dev_close(dev); /* own = true: closes the memory device too */
}

static void test_linear_discard_and_zero_range_read_back_as_zeros(void **state)
{
	struct tfs_bdev *bdev;
	struct tfs_dev *dev = open_linear(0, &bdev);
	static uint8_t buf[3 * 65536 + 10], zero[sizeof(buf)];

	(void)state;
	memset(buf, 0x77, sizeof(buf));
	assert_int_equal(tfs_dev_write(dev, buf, sizeof(buf), 0), 0);
	assert_int_equal(tfs_dev_zero_range(dev, 1, sizeof(buf) - 2), 0);
	assert_int_equal(tfs_dev_read(dev, buf, sizeof(buf), 0), 0);
	assert_int_equal(buf[0], 0x77);
	assert_memory_equal(buf + 1, zero, sizeof(buf) - 2);
	assert_int_equal(buf[sizeof(buf) - 1], 0x77);
	assert_int_equal(tfs_dev_discard(dev, 0, 1), 0);
	assert_int_equal(tfs_dev_read(dev, buf, 1, 0), 0);
	assert_int_equal(buf[0], 0);
	tfs_dev_close(dev);
}

static void test_linear_is_one_data_extent_of_its_device_size(void **state)
{
	struct tfs_bdev *bdev;
	struct tfs_dev *dev = open_linear(0, &bdev);
	uint64_t v;

	(void)state;
	assert_int_equal(tfs_dev_get_size(dev, &v), 0);
	assert_int_equal(v, SIZE);
	assert_int_equal(tfs_dev_allocated(dev, &v), 0);
	assert_int_equal(v, SIZE);
	assert_int_equal(tfs_dev_provision(dev, 0, SIZE), 0);
	assert_int_equal(tfs_dev_seek(dev, 100, SEEK_DATA, SIZE, &v), 0);
	assert_int_equal(v, 100);
	assert_int_equal(tfs_dev_seek(dev, 100, SEEK_HOLE, SIZE, &v), 0);
	assert_int_equal(v, SIZE);
	assert_int_equal(tfs_dev_seek(dev, SIZE, SEEK_DATA, SIZE, &v), -ENXIO);
	assert_int_equal(tfs_dev_truncate(dev, 4096), -ENOTSUP);
	tfs_dev_close(dev);
}

static void test_linear_read_only_and_status_handles_refuse_io(void **state)
{
	struct tfs_bdev *bdev;
	struct tfs_dev *ro = open_linear(TFS_DEV_READ_ONLY, &bdev), *st;
	struct record_sink rec;
	uint8_t buf[512] = { 0 };

	(void)state;
	assert_int_equal(tfs_dev_read(ro, buf, sizeof(buf), 0), 0);
	assert_int_equal(tfs_dev_write(ro, buf, sizeof(buf), 0), -EROFS);
	assert_int_equal(tfs_dev_zero_range(ro, 0, 1), -EROFS);
	assert_int_equal(tfs_dev_provision(ro, 0, 1), -EROFS);
	assert_int_equal(tfs_linear_open(bdev, false, TFS_DEV_STATUS_ONLY, &st), 0);
	assert_int_equal(tfs_dev_read(st, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(tfs_dev_flush(st), -EBADF);
	record_sink_init(&rec);
	tfs_dev_status(st, &rec.sink);
	assert_string_equal(record_sink_line(&rec), "device=memory ");
	tfs_dev_close(st); /* own = false: the device stays open */
	assert_int_equal(tfs_dev_read(ro, buf, sizeof(buf), 0), 0);
	tfs_dev_close(ro);
	tfs_dev_close(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_linear_passes_io_through_to_its_device),
		cmocka_unit_test(test_linear_discard_and_zero_range_read_back_as_zeros),
		cmocka_unit_test(test_linear_is_one_data_extent_of_its_device_size),
		cmocka_unit_test(test_linear_read_only_and_status_handles_refuse_io),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
