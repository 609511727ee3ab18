# SPDX-License-Identifier: GPL-2.0-or-later
"""New data blocks and zeroing.  On a data *file* with discard_passdown
(the default), the daemon punches every free block at a read-write mount
and every freed block before it can be handed out again, so free blocks
read as zeros and fallocate maps blocks without writing them.  The daemon
also keeps the data file preallocated a chunk (`preallocate`, 32 MiB) at a
time ahead of the allocator, so writing a new block is an overwrite of an
unwritten extent; a partial write to a new block larger than 64 KiB writes
only its own bytes there, one to a 64 KiB block (or without preallocation,
or without free blocks reading zero) writes the block whole, zeros around
the data.  Whatever the data device held before, the rest of a new block must read as
zeros: these tests fill blocks with data, free them in each way a block can
become free (rm, an uncommitted transaction lost to a crash), and make the
allocator hand exactly those blocks out again."""
import os

import pytest

from daemon_util import BS, KiB, create, fsync_path, pattern, read_at, read_direct, write_direct

SMALL = 32 * BS  # a data device of 32 blocks: reuse is forced
BIG = 128 * KiB  # the smallest block size whose new blocks take partial writes


def data_io(p):
    return p.status()["pool"]["io"]["data"]


def fill_blocks(path, nr, seed):
    """Every block of path (nr of them) written whole with random data."""
    for i in range(nr):
        write_direct(path, i * BS, pattern(seed + i, BS))


def assert_partial_blocks(path, nr, seed, bs=BS):
    """Block i holds 4 KiB of pattern(seed + i) at 8 KiB, zeros around it."""
    for i in range(nr):
        want = bytes(8192) + pattern(seed + i, 4096) + bytes(bs - 12288)
        assert read_at(path, i * bs, bs) == want, f"block {i} is not zero around the write"
        assert read_direct(path, i * bs, bs) == want


def write_partial_blocks(path, nr, seed, bs=BS):
    for i in range(nr):
        write_direct(path, i * bs + 8192, pattern(seed + i, 4096))
    fsync_path(path)


def prealloc(p):
    return p.status()["pool"]["preallocate"]


def new_writes(p):
    return p.status()["pool"]["new_block_writes"]


def test_a_4k_write_to_a_new_128k_block_writes_4k_into_a_preallocated_chunk(pool):
    p = pool(block_size=BIG)
    assert p.status()["pool"]["free_blocks_read_zero"] is True
    assert "free data blocks punched" in p.log_text()
    assert prealloc(p) == {"active": True, "chunk_bytes": 32 << 20, "chunks": 0,
                           "fallocates": 0, "failures": 0}
    vol = create(p.mnt / "v", 4 * BIG)
    w0 = data_io(p)["write_bytes"]
    write_direct(vol, BIG + 8192, pattern(1, 4096))
    assert data_io(p)["write_bytes"] - w0 == 4096
    assert new_writes(p) == {"written_partly": 1, "filled_whole": 0}
    # the first allocation preallocated its whole chunk of the data file
    assert prealloc(p) == {"active": True, "chunk_bytes": 32 << 20, "chunks": 1,
                           "fallocates": 1, "failures": 0}
    assert os.stat(p.data).st_blocks * 512 >= 32 << 20
    # the next new block of the chunk needs no fallocate
    write_direct(vol, 2 * BIG, pattern(2, 4096))
    assert prealloc(p)["fallocates"] == 1
    fsync_path(vol)
    want = bytes(8192) + pattern(1, 4096) + bytes(BIG - 12288)
    want2 = pattern(2, 4096) + bytes(BIG - 4096)
    assert read_direct(vol, BIG, 2 * BIG) == want + want2
    p.remount()
    assert read_at(vol, 0, 3 * BIG) == bytes(BIG) + want + want2
    assert read_direct(vol, 0, 4 * BIG) == bytes(BIG) + want + want2 + bytes(BIG)


def test_a_4k_write_to_a_new_64k_block_writes_it_whole_into_a_preallocated_chunk(pool):
    """Written whole, a 64 KiB block is one extent conversion for the host,
    and the later 4 KiB writes to it are overwrites in place."""
    p = pool()
    vol = create(p.mnt / "v", 4 * BS)
    w0 = data_io(p)["write_bytes"]
    write_direct(vol, BS + 8192, pattern(1, 4096))
    assert data_io(p)["write_bytes"] - w0 == BS
    assert new_writes(p) == {"written_partly": 0, "filled_whole": 1}
    assert prealloc(p) == {"active": True, "chunk_bytes": 32 << 20, "chunks": 1,
                           "fallocates": 1, "failures": 0}
    used = p.used()
    write_direct(vol, BS + 32768, pattern(2, 4096))
    assert data_io(p)["write_bytes"] - w0 == BS + 4096
    assert new_writes(p) == {"written_partly": 0, "filled_whole": 1}
    assert p.used() == used
    fsync_path(vol)
    want = (bytes(8192) + pattern(1, 4096) + bytes(32768 - 12288) + pattern(2, 4096)
            + bytes(BS - 36864))
    assert read_direct(vol, 0, 3 * BS) == bytes(BS) + want + bytes(BS)
    p.remount()
    assert read_at(vol, 0, 3 * BS) == bytes(BS) + want + bytes(BS)


def test_a_512_byte_direct_write_to_a_new_block_reads_back_with_zeros_around(pool):
    """Less than the data device's 4 KiB alignment: the daemon reads the
    aligned unit around it (zeros, from the unwritten extent) and writes it."""
    p = pool(block_size=BIG)
    vol = create(p.mnt / "v", 2 * BIG)
    write_direct(vol, BIG + 1536, pattern(3, 512))
    fsync_path(vol)
    want = bytes(1536) + pattern(3, 512) + bytes(BIG - 2048)
    assert read_direct(vol, BIG, BIG) == want
    assert new_writes(p)["written_partly"] == 1
    p.remount()
    assert read_at(vol, 0, 2 * BIG) == bytes(BIG) + want


@pytest.mark.parametrize("bs", [BS, BIG], ids=["whole-64k", "partly-128k"])
def test_partial_writes_to_new_blocks_survive_a_kill9_once_flushed(pool, bs):
    # The data flush before the commit also makes the host's conversion of
    # the unwritten extents durable: committed blocks read back as written.
    p = pool(block_size=bs, options={"commit_interval": "600s"})
    a = create(p.mnt / "a", 16 * bs)
    b = create(p.mnt / "b", 16 * bs)
    fsync_path(b)
    write_partial_blocks(a, 16, 700, bs)  # fsync: data flush, then the commit
    for i in range(16):
        write_direct(b, i * bs + 8192, pattern(800 + i, 4096))  # never flushed
    p.kill9()
    p.mount()
    assert_partial_blocks(a, 16, 700, bs)
    assert read_direct(b, 0, 16 * bs) == bytes(16 * bs)
    assert p.used() == 16
    write_partial_blocks(b, 16, 900, bs)
    assert_partial_blocks(b, 16, 900, bs)


def test_with_preallocate_off_a_4k_write_writes_the_block_whole(pool):
    p = pool(options={"preallocate": "off"})
    assert p.status()["pool"]["free_blocks_read_zero"] is True
    assert prealloc(p) == {"active": False, "chunk_bytes": 0, "chunks": 0,
                           "fallocates": 0, "failures": 0}
    vol = create(p.mnt / "v", 4 * BS)
    w0 = data_io(p)["write_bytes"]
    write_direct(vol, BS + 8192, pattern(1, 4096))
    # into a hole of the sparse file: written whole, one host allocation
    assert data_io(p)["write_bytes"] - w0 == BS
    assert new_writes(p) == {"written_partly": 0, "filled_whole": 1}
    fsync_path(vol)
    assert read_direct(vol, BS, BS) == bytes(8192) + pattern(1, 4096) + bytes(BS - 12288)


def test_a_bad_preallocate_is_refused_and_a_change_needs_a_remount(pool):
    p = pool(mount=False)
    p.write_cfg({"preallocate": "64k"})
    r = p.mount(ok=False)
    assert "preallocate: 64k is not off or a size from 1m to 1g" in r.stdout
    p.write_cfg({"preallocate": "16m"})
    p.mount()
    assert prealloc(p)["chunk_bytes"] == 16 << 20
    p.write_cfg({"preallocate": "64m"})
    p.ctl("suspend")
    r = p.ctl("reload", p.cfg, ok=(1,))
    assert "preallocate: 16m -> 64m cannot change while mounted" in r.stderr
    p.ctl("resume")
    assert prealloc(p)["chunk_bytes"] == 16 << 20


def test_the_copy_of_a_shared_block_goes_into_a_preallocated_chunk(pool):
    p = pool()
    vol = create(p.mnt / "vm1", 4 * BS)
    write_direct(vol, 0, pattern(10, 4 * BS))
    fsync_path(vol)
    p.ctl("snapshot", "vm1", "s1")
    fills = prealloc(p)["fallocates"]
    w0 = data_io(p)["write_bytes"]
    write_direct(vol, BS + 4096, pattern(11, 4096))  # first write to a shared block
    assert data_io(p)["write_bytes"] - w0 == BS  # the copy is the whole block
    assert new_writes(p)["filled_whole"] == 1
    # the new block came from the chunk preallocated for the first blocks
    assert prealloc(p)["fallocates"] == fills
    fsync_path(vol)
    old = pattern(10, 4 * BS)
    assert read_direct(vol, 0, 4 * BS) == old[:BS + 4096] + pattern(11, 4096) + old[BS + 8192:]
    assert read_direct(p.mnt / "s1", 0, 4 * BS) == old


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
    # Punched again, which the preallocation map forgets: the next block
    # allocated there preallocates the chunk anew (and, 64 KiB, is written whole).
    fills = prealloc(p)["fallocates"]
    c = create(p.mnt / "c", SMALL)
    os.unlink(b)
    fsync_path(c)
    assert prealloc(p)["chunks"] == 0
    w0 = data_io(p)["write_bytes"]
    write_partial_blocks(c, 32, 200)
    assert data_io(p)["write_bytes"] - w0 == 32 * BS
    assert prealloc(p)["fallocates"] == fills + 1
    assert_partial_blocks(c, 32, 200)


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


def test_a_data_block_device_under_fault_injection_is_still_a_block_device(pool):
    """With faults allowed the data device sits under a fault wrapper; it must
    still be treated as the block device it is: a discard there promises no
    zeros, so free blocks are not punched and trusted to read zero, and a
    block device is not preallocated.  A new block is zeroed around a
    partial write whatever the device held."""
    p = pool(data_size=SMALL, mount=False, mkpool=False)
    with open(p.data, "r+b") as f:      # old contents a new block must not show
        f.write(pattern(700, SMALL))
    dev = p.losetup(p.data)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\ndata = {dev}\ncatalog = {p.catalog}\n"
                f"block_size = {BS // 1024}k\n[fault]\nallow = yes\n")
    p.mkpool("--force")
    p.mount("--allow-faults")
    assert p.status()["pool"]["free_blocks_read_zero"] is False
    assert "free data blocks punched" not in p.log_text()
    assert prealloc(p)["active"] is False
    b = create(p.mnt / "b", SMALL)
    write_partial_blocks(b, 32, 800)
    assert_partial_blocks(b, 32, 800)
    assert prealloc(p)["failures"] == 0
    p.unmount()                 # before teardown detaches the data device
