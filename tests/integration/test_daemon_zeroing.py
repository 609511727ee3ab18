# SPDX-License-Identifier: GPL-2.0-or-later
"""New data blocks and zeroing.  On a data *file* with discard_passdown
(the default), the daemon punches every free block at a read-write mount
and every freed block before it can be handed out again, so free blocks
read as zeros and fallocate maps blocks without writing them; a partial
write to a new block still writes the block whole (zeros around the data).
Whatever the data device held before, the rest of a new block must read as
zeros: these tests fill blocks with data, free them in each way a block can
become free (rm, an uncommitted transaction lost to a crash), and make the
allocator hand exactly those blocks out again."""
import os

from daemon_util import BS, create, fsync_path, pattern, read_at, read_direct, write_direct

SMALL = 32 * BS  # a data device of 32 blocks: reuse is forced


def data_io(p):
    return p.status()["pool"]["io"]["data"]


def fill_blocks(path, nr, seed):
    """Every block of path (nr of them) written whole with random data."""
    for i in range(nr):
        write_direct(path, i * BS, pattern(seed + i, BS))


def assert_partial_blocks(path, nr, seed):
    """Block i holds 4 KiB of pattern(seed + i) at 8 KiB, zeros around it."""
    for i in range(nr):
        want = bytes(8192) + pattern(seed + i, 4096) + bytes(BS - 12288)
        assert read_at(path, i * BS, BS) == want, f"block {i} is not zero around the write"
        assert read_direct(path, i * BS, BS) == want


def write_partial_blocks(path, nr, seed):
    for i in range(nr):
        write_direct(path, i * BS + 8192, pattern(seed + i, 4096))
    fsync_path(path)


def test_a_4k_write_to_a_new_block_writes_the_block_and_the_rest_reads_zero(pool):
    p = pool()
    assert p.status()["pool"]["free_blocks_read_zero"] is True
    assert "free data blocks punched" in p.log_text()
    vol = create(p.mnt / "v", 4 * BS)
    w0 = data_io(p)["write_bytes"]
    write_direct(vol, BS + 8192, pattern(1, 4096))
    # the whole block: one host allocation, later writes to it overwrite
    assert data_io(p)["write_bytes"] - w0 == BS
    fsync_path(vol)
    want = bytes(8192) + pattern(1, 4096) + bytes(BS - 12288)
    assert read_direct(vol, BS, BS) == want
    p.remount()
    assert read_at(vol, 0, 2 * BS) == bytes(BS) + want


def provision_all(path, size):
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fallocate_maps_blocks_without_writing_them(pool):
    p = pool()
    vol = create(p.mnt / "v", 8 * BS)
    w0 = data_io(p)["write_bytes"]
    provision_all(vol, 8 * BS)
    assert data_io(p)["write_bytes"] == w0
    assert p.volume("v")["mapped_blocks"] == 8
    assert read_direct(vol, 0, 8 * BS) == bytes(8 * BS)


def test_blocks_of_a_removed_volume_read_zero_when_handed_out_again(pool):
    p = pool(data_size=SMALL)
    a = create(p.mnt / "a", SMALL)
    fill_blocks(a, 32, 100)
    fsync_path(a)
    assert p.used() == 32
    os.unlink(a)
    b = create(p.mnt / "b", SMALL)
    fsync_path(b)  # commits the delete: the freed blocks are punched
    provision_all(b, SMALL)  # maps every block without writing: they must read as zeros
    assert p.used() == 32
    assert read_direct(b, 0, SMALL) == bytes(SMALL)


def test_blocks_written_in_a_transaction_lost_to_a_crash_read_zero_later(pool):
    # No commit before the kill: the blocks were written on the data file
    # but are free again in the committed metadata.
    p = pool(data_size=SMALL, options={"commit_interval": "600s"})
    a = create(p.mnt / "a", SMALL)
    b = create(p.mnt / "b", SMALL)
    fsync_path(b)
    fill_blocks(a, 32, 300)  # O_DIRECT: on the data file, no fsync, no commit
    p.kill9()
    p.mount()
    assert p.used() == 0
    provision_all(b, SMALL)
    assert read_direct(b, 0, SMALL) == bytes(SMALL)
    c = create(p.mnt / "c", SMALL)
    os.unlink(b)
    fsync_path(c)
    write_partial_blocks(c, 32, 400)  # zeroed around the data, whatever the block held
    assert_partial_blocks(c, 32, 400)


def test_without_discard_passdown_new_blocks_are_zeroed_on_the_device(pool):
    p = pool(data_size=SMALL, options={"discard_passdown": "no"})
    assert p.status()["pool"]["free_blocks_read_zero"] is False
    a = create(p.mnt / "a", SMALL)
    fill_blocks(a, 32, 500)
    fsync_path(a)
    os.unlink(a)
    b = create(p.mnt / "b", SMALL)
    fsync_path(b)
    w0 = data_io(p)["write_bytes"]
    write_partial_blocks(b, 32, 600)
    assert data_io(p)["write_bytes"] - w0 == 32 * BS  # each block written whole
    assert_partial_blocks(b, 32, 600)
