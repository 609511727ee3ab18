# SPDX-License-Identifier: GPL-2.0-or-later
"""Zero detection: with `detect_zeroes = unmap` in pool.cfg a write that
covers a whole block with zeros maps nothing where the block is unmapped,
and unmaps it (a discard) where it is mapped; with `off`, the default,
zeros are data like any other.  fallocate(FALLOC_FL_ZERO_RANGE) unmaps the
whole blocks of its range whatever the option."""
import os

from daemon_util import (BS, FALLOC_FL_ZERO_RANGE, create, fallocate, pattern, read_at,
                         write_at, write_direct)


def hole_at(path, off):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, off, os.SEEK_HOLE)
    finally:
        os.close(fd)


def reload(p, **options):
    p.write_cfg(options)
    p.ctl("suspend")
    p.ctl("reload", p.cfg)
    p.ctl("resume")


def test_zeros_written_to_unmapped_blocks_map_nothing(pool):
    p = pool(options={"detect_zeroes": "unmap"})
    vol = create(p.mnt / "v", 8 * BS)
    w0 = p.status()["pool"]["io"]["data"]["write_bytes"]
    write_direct(vol, 0, bytes(4 * BS))
    write_direct(vol, 4 * BS, pattern(1, BS))
    assert p.status()["pool"]["io"]["data"]["write_bytes"] - w0 == BS
    assert p.volume("v")["mapped_blocks"] == 1 and p.used() == 1
    assert read_at(vol, 0, 5 * BS) == bytes(4 * BS) + pattern(1, BS)
    assert hole_at(vol, 0) == 0


def test_zeros_written_over_mapped_blocks_unmap_them(pool):
    p = pool(options={"detect_zeroes": "unmap"})
    vol = create(p.mnt / "v", 4 * BS)
    write_at(vol, 0, pattern(1, 4 * BS))
    os.mkdir(p.mnt / ".snapshots" / "before")
    # Blocks 1 and 2 whole, and half of block 3.
    write_at(vol, BS, bytes(2 * BS + BS // 2))
    want = pattern(1, BS) + bytes(2 * BS + BS // 2) + pattern(1, 4 * BS)[-(BS // 2):]
    assert read_at(vol, 0, 4 * BS) == want
    assert p.volume("v")["mapped_blocks"] == 2
    assert hole_at(vol, 0) == BS
    # The snapshot keeps its blocks; once it goes they are free.
    assert read_at(p.mnt / ".snapshots" / "before" / "v", 0, 4 * BS) == pattern(1, 4 * BS)
    assert p.used() == 5      # four shared, one copy of block 3
    os.rmdir(p.mnt / ".snapshots" / "before")
    p.wait_used(2)
    p.remount()
    assert read_at(vol, 0, 4 * BS) == want
    # A block that is zeros but for one byte is data.
    almost = bytearray(BS)
    almost[BS - 1] = 7
    write_at(vol, BS, bytes(almost))
    assert p.volume("v")["mapped_blocks"] == 3


def test_detect_zeroes_off_writes_zeros_as_data(pool):
    p = pool()
    vol = create(p.mnt / "v", 4 * BS)
    write_at(vol, 0, bytes(2 * BS))
    assert p.volume("v")["mapped_blocks"] == 2


def test_reload_turns_detect_zeroes_on_and_off(pool):
    p = pool()
    vol = create(p.mnt / "v", 4 * BS)
    write_at(vol, 0, bytes(BS))
    assert p.volume("v")["mapped_blocks"] == 1
    reload(p, detect_zeroes="unmap")
    assert "detect_zeroes: off -> unmap" in p.log_text()
    write_at(vol, 0, bytes(2 * BS))
    assert p.volume("v")["mapped_blocks"] == 0
    reload(p, detect_zeroes="off")
    write_at(vol, 0, bytes(BS))
    assert p.volume("v")["mapped_blocks"] == 1


def test_a_bad_detect_zeroes_value_is_refused(pool):
    p = pool(options={"detect_zeroes": "yes"}, mkpool=False, mount=False)
    r = p.mkpool(ok=None)
    assert r.returncode != 0
    assert "detect_zeroes: 'yes' is not off or unmap" in r.stdout + r.stderr


def test_zero_range_unmaps_whole_blocks_whatever_detect_zeroes(pool):
    p = pool()
    vol = create(p.mnt / "v", 4 * BS)
    data = bytearray(pattern(1, 4 * BS))
    write_at(vol, 0, bytes(data))
    fd = os.open(vol, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE, BS // 2, 3 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    data[BS // 2:BS // 2 + 3 * BS] = bytes(3 * BS)
    assert read_at(vol, 0, 4 * BS) == bytes(data)
    assert p.volume("v")["mapped_blocks"] == 2
    assert hole_at(vol, 0) == BS
    p.wait_used(2)
