# SPDX-License-Identifier: GPL-2.0-or-later
"""Volume files in the mount root (issue 3, "file semantics"): create,
truncate, extend, read of holes, zeroing of new blocks, fallocate modes,
SEEK_DATA/SEEK_HOLE, st_blocks and statfs, rename, unlink while open,
refused operations, attributes that persist, names, O_DIRECT.

Every test ends, through the `pool` fixture, with the daemon exiting 0 on
unmount, no unexpected error in its log, and thin_check and thinfs check
clean on the metadata."""
import errno
import json
import os
import shutil
import stat
import subprocess

import pytest

from conftest import run_cmd
from daemon_util import (BS, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE,
                         FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, GiB,
                         KiB, MiB, aligned, create, du, expect_errno, fallocate, fsync_path,
                         pattern, read_at, write_at)


# ---- create, size, extend -----------------------------------------------------

def test_create_makes_an_empty_volume(pool):
    p = pool()
    with open(p.mnt / "vm1", "w"):
        pass
    (p.mnt / "vm2").touch()
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1", "vm2"]
    st = os.stat(p.mnt / "vm1")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_blocks == 0
    vols = {v["name"]: v for v in p.status()["volumes"]}
    assert set(vols) == {"vm1", "vm2"}
    assert vols["vm1"]["size"] == 0 and vols["vm1"]["mapped_blocks"] == 0
    assert vols["vm1"]["kind"] == "thin"
    assert vols["vm1"]["id"] != vols["vm2"]["id"]
    expect_errno(errno.EEXIST, os.open, p.mnt / "vm1", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_snapshots_dir_is_listed_in_the_root(pool):
    p = pool()
    assert ".snapshots" in os.listdir(p.mnt)
    assert stat.S_ISDIR(os.stat(p.mnt / ".snapshots").st_mode)


def test_truncate_sets_virtual_size_without_mapping_and_reads_zeros(pool):
    p = pool()
    create(p.mnt / "vm1", 20 * GiB)    # far more than the 2 GiB of data: thin
    st = os.stat(p.mnt / "vm1")
    assert st.st_size == 20 * GiB and st.st_blocks == 0
    assert read_at(p.mnt / "vm1", 7 * GiB + 12345, 3 * BS) == bytes(3 * BS)
    assert p.volume("vm1")["size"] == 20 * GiB
    assert p.volume("vm1")["mapped_blocks"] == 0
    assert p.used() == 0


def test_write_past_the_end_extends_the_volume(pool):
    p = pool()
    create(p.mnt / "vm1")
    data = pattern(1, 5000)
    write_at(p.mnt / "vm1", 3 * MiB + 100, data)
    assert os.stat(p.mnt / "vm1").st_size == 3 * MiB + 100 + len(data)
    assert read_at(p.mnt / "vm1", 3 * MiB + 100, len(data)) == data
    assert read_at(p.mnt / "vm1", 0, 3 * MiB + 100) == bytes(3 * MiB + 100)
    assert p.volume("vm1")["size"] == 3 * MiB + 100 + len(data)
    assert p.volume("vm1")["mapped_blocks"] == 1     # 5000 bytes inside one 64 KiB block
    p.remount()
    assert os.stat(p.mnt / "vm1").st_size == 3 * MiB + 100 + len(data)
    assert read_at(p.mnt / "vm1", 3 * MiB + 100, len(data)) == data


def test_shrink_unmaps_blocks_past_the_end_and_zeroes_the_tail(pool):
    p = pool()
    create(p.mnt / "vm1")
    write_at(p.mnt / "vm1", 0, pattern(2, 4 * BS))
    assert p.used() == 4
    os.truncate(p.mnt / "vm1", BS + BS // 2)
    fsync_path(p.mnt / "vm1")
    assert p.volume("vm1")["mapped_blocks"] == 2
    assert p.used() == 2
    # Growing again shows zeros, not the old content, past the cut.
    os.truncate(p.mnt / "vm1", 4 * BS)
    got = read_at(p.mnt / "vm1", 0, 4 * BS)
    assert got[:BS + BS // 2] == pattern(2, 4 * BS)[:BS + BS // 2]
    assert got[BS + BS // 2:] == bytes(4 * BS - BS - BS // 2)
    p.remount()
    assert read_at(p.mnt / "vm1", BS + BS // 2, BS // 2) == bytes(BS // 2)


def test_size_past_the_format_limit_is_efbig(pool):
    """Virtual sizes past what the format can map fail with EFBIG and change
    nothing.  The largest size the kernel passes to FUSE is 2^63-1; dm-thin
    maps 64-bit virtual block numbers, so the daemon's own limit must be at
    or below that; whatever it is, a too-large size is EFBIG, never another
    errno, never a crash."""
    p = pool()
    create(p.mnt / "vm1", MiB)
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        for size in (2**63 - 1, 2**63 - BS):
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                assert e.errno == errno.EFBIG, f"ftruncate({size}): {errno.errorcode[e.errno]}"
                assert os.fstat(fd).st_size == MiB, "a refused size changed the size"
            else:
                # Accepted: then the whole range must be usable up to the last byte.
                os.pwrite(fd, b"x", size - 1)
                assert os.pread(fd, 1, size - 1) == b"x"
                os.ftruncate(fd, MiB)
        # Past the kernel's limit: EFBIG (or EINVAL for a negative off_t in VFS).
        expect_errno((errno.EFBIG, errno.EINVAL), os.pwrite, fd, b"xx", 2**63 - 1)
    finally:
        os.close(fd)
    assert os.stat(p.mnt / "vm1").st_size == MiB


# ---- data: zeros, zeroing new blocks, sparseness ---------------------------------

def test_new_block_is_zeroed_around_a_partial_write(pool):
    """The data file holds garbage before mkpool: a 512-byte write into a
    fresh block must leave the rest of that block reading zeros."""
    p = pool(mount=False, mkpool=False)
    with open(p.data, "r+b") as f:
        f.write(b"\xaa" * (8 * MiB))
    p.mkpool()
    p.mount()
    create(p.mnt / "vm1", 4 * BS)
    write_at(p.mnt / "vm1", BS + 4096, b"\x55" * 512)
    want = bytes(BS + 4096) + b"\x55" * 512 + bytes(3 * BS - 4096 - 512)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == want
    p.remount()
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == want
    assert p.volume("vm1")["mapped_blocks"] == 1


def test_skip_block_zeroing_still_reads_back_what_was_written(pool):
    p = pool(options={"skip_block_zeroing": "true"})
    create(p.mnt / "vm1", 4 * BS)
    data = pattern(3, 2 * BS)
    write_at(p.mnt / "vm1", BS, data)
    assert read_at(p.mnt / "vm1", BS, 2 * BS) == data
    assert p.volume("vm1")["mapped_blocks"] == 2


def test_st_blocks_counts_mapped_blocks(pool):
    p = pool()
    create(p.mnt / "vm1", 64 * MiB)
    for blk in (0, 5, 6, 100):
        write_at(p.mnt / "vm1", blk * BS + 10, b"x" * 10)
    assert p.volume("vm1")["mapped_blocks"] == 4
    assert du(p.mnt / "vm1") == 4 * BS


def test_cp_sparse_always_keeps_the_volume_sparse(pool, tmp_path):
    p = pool()
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
        for off, seed in ((0, 1), (5 * MiB + 7, 2), (31 * MiB, 3)):
            f.seek(off)
            f.write(pattern(seed, 3000))
    subprocess.run(["cp", "--sparse=always", str(img), str(p.mnt / "vm1")], check=True,
                   timeout=120)
    fsync_path(p.mnt / "vm1")
    assert os.stat(p.mnt / "vm1").st_size == 32 * MiB
    assert read_at(p.mnt / "vm1", 0, 32 * MiB) == img.read_bytes()
    # Three 3000-byte runs: 0..3000 in block 0, 5 MiB+7 in block 80,
    # 31 MiB in block 496: three blocks, not 512.
    assert p.volume("vm1")["mapped_blocks"] == 3
    assert du(p.mnt / "vm1") == 3 * BS
    assert p.used() == 3


# ---- fallocate ---------------------------------------------------------------------

def test_punch_hole_unmaps_whole_blocks_and_zeroes_partial_ones(pool):
    p = pool()
    create(p.mnt / "vm1")
    data = bytearray(pattern(4, 4 * BS))
    write_at(p.mnt / "vm1", 0, bytes(data))
    assert p.used() == 4
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        # From the middle of block 0 to the middle of block 2: only block 1 is whole.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BS // 2, 2 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    data[BS // 2:BS // 2 + 2 * BS] = bytes(2 * BS)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == bytes(data)
    assert os.stat(p.mnt / "vm1").st_size == 4 * BS
    assert p.volume("vm1")["mapped_blocks"] == 3
    assert p.used() == 3
    assert du(p.mnt / "vm1") == 3 * BS
    p.remount()
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == bytes(data)
    assert p.used() == 3


def test_fallocate_mode_0_provisions_zeroed_blocks(pool):
    p = pool(mount=False, mkpool=False)
    with open(p.data, "r+b") as f:
        f.write(b"\xaa" * (8 * MiB))
    p.mkpool()
    p.mount()
    create(p.mnt / "vm1", BS)
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 3 * BS)   # past the end: extends the size too
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(p.mnt / "vm1").st_size == 3 * BS
    assert p.volume("vm1")["mapped_blocks"] == 3
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == bytes(3 * BS)
    assert p.used() == 3


def test_fallocate_keep_size_does_not_extend(pool):
    p = pool()
    create(p.mnt / "vm1", BS)
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, BS)
    finally:
        os.close(fd)
    assert os.stat(p.mnt / "vm1").st_size == BS
    assert p.volume("vm1")["mapped_blocks"] == 1


def test_zero_range_reads_zeros(pool):
    p = pool()
    create(p.mnt / "vm1")
    data = bytearray(pattern(5, 3 * BS))
    write_at(p.mnt / "vm1", 0, bytes(data))
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE, BS // 2, 2 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    data[BS // 2:BS // 2 + 2 * BS] = bytes(2 * BS)
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == bytes(data)
    assert 2 <= p.volume("vm1")["mapped_blocks"] <= 3
    assert os.stat(p.mnt / "vm1").st_size == 3 * BS


@pytest.mark.parametrize("mode", [FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE])
def test_other_fallocate_modes_are_eopnotsupp(pool, mode):
    p = pool()
    create(p.mnt / "vm1")
    data = pattern(6, 4 * BS)
    write_at(p.mnt / "vm1", 0, data)
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        expect_errno(errno.EOPNOTSUPP, fallocate, fd, mode, BS, BS)
    finally:
        os.close(fd)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == data


# ---- SEEK_DATA / SEEK_HOLE, statfs -----------------------------------------------

def test_seek_data_and_hole_follow_the_mapping(pool):
    p = pool()
    create(p.mnt / "vm1", 16 * BS)
    write_at(p.mnt / "vm1", 3 * BS + 100, b"a" * 100)
    write_at(p.mnt / "vm1", 10 * BS, b"b" * BS)
    write_at(p.mnt / "vm1", 11 * BS, b"c" * 10)
    fd = os.open(p.mnt / "vm1", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * BS
        assert os.lseek(fd, 3 * BS, os.SEEK_HOLE) == 4 * BS
        assert os.lseek(fd, 3 * BS + 5, os.SEEK_DATA) == 3 * BS + 5
        assert os.lseek(fd, 4 * BS, os.SEEK_DATA) == 10 * BS
        assert os.lseek(fd, 10 * BS, os.SEEK_HOLE) == 12 * BS
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 12 * BS, os.SEEK_HOLE) == 12 * BS
        expect_errno(errno.ENXIO, os.lseek, fd, 12 * BS, os.SEEK_DATA)
        expect_errno(errno.ENXIO, os.lseek, fd, 16 * BS, os.SEEK_DATA)
        expect_errno(errno.ENXIO, os.lseek, fd, 16 * BS, os.SEEK_HOLE)
    finally:
        os.close(fd)


def test_seek_hole_at_the_end_of_a_fully_mapped_volume_is_its_size(pool):
    p = pool()
    create(p.mnt / "vm1")
    write_at(p.mnt / "vm1", 0, b"z" * (2 * BS + 7))
    fd = os.open(p.mnt / "vm1", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 * BS + 7
    finally:
        os.close(fd)


def test_statfs_reports_the_pool_data_space(pool):
    p = pool()
    create(p.mnt / "vm1")
    write_at(p.mnt / "vm1", 0, pattern(7, 10 * BS))
    d = p.status()["pool"]["data"]
    sv = os.statvfs(p.mnt)
    assert d["total_blocks"] == (2 * GiB) // BS
    assert sv.f_blocks * sv.f_frsize == d["total_blocks"] * d["block_size"]
    assert sv.f_bfree * sv.f_frsize == (d["total_blocks"] - d["used_blocks"]) * d["block_size"]
    assert sv.f_bavail <= sv.f_bfree
    assert d["used_blocks"] == 10


# ---- names: rename, unlink, refused operations ------------------------------------

def test_rename_moves_the_volume_and_survives_remount(pool):
    p = pool()
    create(p.mnt / "vm1")
    data = pattern(8, 3 * BS)
    write_at(p.mnt / "vm1", 0, data)
    vid = p.volume("vm1")["id"]
    os.rename(p.mnt / "vm1", p.mnt / "db")
    assert "vm1" not in os.listdir(p.mnt) and "db" in os.listdir(p.mnt)
    assert p.volume("db")["id"] == vid
    assert read_at(p.mnt / "db", 0, 3 * BS) == data
    p.remount()
    assert "vm1" not in os.listdir(p.mnt)
    assert read_at(p.mnt / "db", 0, 3 * BS) == data
    assert p.volume("db")["id"] == vid


def test_rename_onto_an_existing_volume_replaces_it_or_refuses_cleanly(pool):
    """POSIX rename replaces the target; src/meta/catalog.h says the catalog
    refuses with EEXIST.  Either is acceptable here, but never a half-done
    rename: on success the target's old device is deleted and its blocks
    freed; on failure both volumes are untouched."""
    p = pool()
    a, b = pattern(9, 2 * BS), pattern(10, 3 * BS)
    create(p.mnt / "a")
    create(p.mnt / "b")
    write_at(p.mnt / "a", 0, a)
    write_at(p.mnt / "b", 0, b)
    ida = p.volume("a")["id"]
    try:
        os.rename(p.mnt / "a", p.mnt / "b")
    except OSError as e:
        assert e.errno in (errno.EEXIST, errno.EPERM, errno.ENOTEMPTY), errno.errorcode[e.errno]
        assert read_at(p.mnt / "a", 0, 2 * BS) == a
        assert read_at(p.mnt / "b", 0, 3 * BS) == b
        assert p.used() == 5
    else:
        assert sorted(n for n in os.listdir(p.mnt) if n != ".snapshots") == ["b"]
        assert os.stat(p.mnt / "b").st_size == 2 * BS
        assert read_at(p.mnt / "b", 0, 2 * BS) == a
        assert p.volume("b")["id"] == ida
        fsync_path(p.mnt / "b")
        p.wait_used(2)
        assert [v["name"] for v in p.status()["volumes"]] == ["b"]


def test_rename_into_snapshots_is_refused(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    os.mkdir(p.mnt / ".snapshots" / "g")
    expect_errno((errno.EPERM, errno.EXDEV, errno.EROFS, errno.EACCES), os.rename,
                 p.mnt / "vm1", p.mnt / ".snapshots" / "g" / "x")
    expect_errno((errno.EPERM, errno.EXDEV, errno.EROFS, errno.EACCES), os.rename,
                 p.mnt / ".snapshots" / "g" / "vm1", p.mnt / "x")
    assert os.path.exists(p.mnt / "vm1")


def test_unlink_frees_the_device(pool):
    p = pool()
    create(p.mnt / "vm1")
    write_at(p.mnt / "vm1", 0, pattern(11, 5 * BS))
    vid = p.volume("vm1")["id"]
    os.unlink(p.mnt / "vm1")
    assert "vm1" not in os.listdir(p.mnt)
    assert p.status()["volumes"] == []
    p.wait_used(0)
    p.unmount()
    assert f'dev_id="{vid}"' not in p.dump()
    p.mount()
    assert p.status()["volumes"] == []


def test_unlink_while_open_keeps_data_until_close(pool):
    p = pool()
    create(p.mnt / "vm1")
    data = pattern(12, 3 * BS)
    write_at(p.mnt / "vm1", 0, data)
    vid = p.volume("vm1")["id"]
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        os.unlink(p.mnt / "vm1")
        assert "vm1" not in os.listdir(p.mnt)
        assert not os.path.exists(p.mnt / "vm1")
        assert "vm1" not in [v["name"] for v in p.status()["volumes"]]
        # The name is free again at once.
        create(p.mnt / "vm1", BS)
        assert p.volume("vm1")["id"] != vid
        assert os.pread(fd, 3 * BS, 0) == data
        os.pwrite(fd, b"still here", BS)
        assert os.pread(fd, 10, BS) == b"still here"
        os.fsync(fd)
        assert p.used() == 3       # the unlinked device still holds its blocks
    finally:
        os.close(fd)
    # Last close: the device is deleted.  FUSE sends RELEASE asynchronously.
    p.wait_used(0)
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    p.unmount()
    assert f'dev_id="{vid}"' not in p.dump()
    p.mount()


def test_mkdir_outside_snapshots_is_eperm(pool):
    p = pool()
    expect_errno(errno.EPERM, os.mkdir, p.mnt / "dir")
    create(p.mnt / "vm1")
    expect_errno((errno.EPERM, errno.ENOTDIR), os.mkdir, p.mnt / "vm1" / "x")
    os.mkdir(p.mnt / ".snapshots" / "g")
    expect_errno(errno.EPERM, os.mkdir, p.mnt / ".snapshots" / "g" / "x")
    assert not os.path.exists(p.mnt / "dir")


def test_hard_links_and_symlinks_are_eperm(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    expect_errno(errno.EPERM, os.link, p.mnt / "vm1", p.mnt / "vm2")
    expect_errno(errno.EPERM, os.symlink, "vm1", p.mnt / "vm3")
    assert sorted(n for n in os.listdir(p.mnt) if n != ".snapshots") == ["vm1"]
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]


def test_special_files_are_refused(pool):
    p = pool()
    expect_errno((errno.EPERM, errno.EOPNOTSUPP), os.mkfifo, p.mnt / "fifo")
    assert not os.path.exists(p.mnt / "fifo")
    assert p.status()["volumes"] == []


def test_xattrs_are_enotsup(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    for name in ("user.test", "trusted.test", "security.test"):
        expect_errno(errno.ENOTSUP, os.setxattr, p.mnt / "vm1", name, b"v")
    try:
        assert os.listxattr(p.mnt / "vm1") == []
    except OSError as e:
        assert e.errno == errno.ENOTSUP
    expect_errno((errno.ENOTSUP, errno.ENODATA), os.getxattr, p.mnt / "vm1", "user.test")


def test_chmod_chown_utime_persist_across_remount(pool):
    p = pool()
    create(p.mnt / "vm1", MiB, mode=0o600)
    assert stat.S_IMODE(os.stat(p.mnt / "vm1").st_mode) == 0o600
    os.chmod(p.mnt / "vm1", 0o640)
    os.chown(p.mnt / "vm1", 1234, 5678)
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(p.mnt / "vm1", ns=(atime, mtime))
    for _ in range(2):
        st = os.stat(p.mnt / "vm1")
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_mtime_ns == mtime
        assert st.st_atime_ns == atime
        assert stat.S_ISREG(st.st_mode)
        p.remount()


def test_write_updates_mtime(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    os.utime(p.mnt / "vm1", ns=(10**18, 10**18))
    write_at(p.mnt / "vm1", 0, b"x")
    assert os.stat(p.mnt / "vm1").st_mtime_ns != 10**18


def test_bad_names_are_refused(pool):
    p = pool()
    for name in ("a\nb", "tab\there", "del\x7f", "esc\x1b", "csi\x9b31m"):
        expect_errno((errno.EINVAL, errno.EPERM), create, p.mnt / name)
    expect_errno((errno.ENAMETOOLONG, errno.EINVAL), create, p.mnt / ("x" * 256))
    create(p.mnt / ("y" * 255))
    assert p.status()["volumes"][0]["name"] == "y" * 255
    assert sorted(n for n in os.listdir(p.mnt) if n != ".snapshots") == ["y" * 255]


def test_names_with_sql_and_unicode_are_plain_names(pool):
    p = pool()
    names = ["x'); DROP TABLE volumes;--", 'q"uote', "naïve ☃", "%_*?", "-rf"]
    for i, n in enumerate(names):
        create(p.mnt / n, BS)
        write_at(p.mnt / n, 0, pattern(100 + i, 100))
    p.remount()
    assert sorted(v["name"] for v in p.status()["volumes"]) == sorted(names)
    for i, n in enumerate(names):
        assert read_at(p.mnt / n, 0, 100) == pattern(100 + i, 100)


# Not UTF-8: a stray byte, a cut sequence, an overlong '/', a surrogate, past U+10FFFF,
# Latin-1.  As str with surrogateescape, so that os and subprocess pass the bytes.
NOT_UTF8 = [os.fsdecode(b) for b in (b"bad\xff", b"cut\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80",
                                     b"\xf4\x90\x80\x80", b"caf\xe9")]


def ctl_strict(p, *args):
    """thinfs-ctl's stdout, decoded as strict UTF-8 (a bad byte raises)."""
    r = subprocess.run([str(p.ctl_bin), str(p.mnt), *args], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode("utf-8", errors="strict")


def json_outputs(p):
    """status --json, list --json and every line of events --json, parsed strictly."""
    status = json.loads(ctl_strict(p, "status", "--json"))
    listed = json.loads(ctl_strict(p, "list", "--json"))
    events = [json.loads(l) for l in ctl_strict(p, "events", "--json").splitlines()]
    return status, listed, events


def test_names_that_are_not_utf8_are_refused_at_every_entry(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    for name in NOT_UTF8:
        expect_errno(errno.EINVAL, create, p.mnt / name)
        expect_errno(errno.EINVAL, os.rename, p.mnt / "vm1", p.mnt / name)
        expect_errno(errno.EINVAL, os.mkdir, p.mnt / ".snapshots" / name)
        r = run_cmd(p.ctl_bin, p.mnt, "snapshot", "vm1", name, check=False)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == ["thinfs-ctl: snapshot: bad name: name is not "
                                                 "valid UTF-8"], r.stderr
    assert "not valid UTF-8" in p.log_text()
    status, _, _ = json_outputs(p)
    assert [v["name"] for v in status["volumes"]] == ["vm1"]
    assert status["snapshot_groups"] == []
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1"]


def test_multibyte_utf8_names_round_trip_through_json(pool):
    p = pool()
    names = ["naïve", "日本語", "emoji-😀", "\U0010ffff-last", "\ud7ff\ue000"]
    for i, n in enumerate(names):
        create(p.mnt / n, BS)
        write_at(p.mnt / n, 0, pattern(200 + i, 100))
    os.rename(p.mnt / "naïve", p.mnt / "naïve-ü")
    names[0] = "naïve-ü"
    os.mkdir(p.mnt / ".snapshots" / "grüppe-☃")
    p.ctl("snapshot", "日本語", "日本語-クローン")
    p.remount()
    status, listed, events = json_outputs(p)
    top = [v["name"] for v in status["volumes"] if v["kind"] != "member"]
    assert sorted(top) == sorted(names + ["日本語-クローン"])
    assert [g["name"] for g in status["snapshot_groups"]] == ["grüppe-☃"]
    assert sorted(status["snapshot_groups"][0]["volumes"]) == sorted(names)
    assert "日本語-クローン" in json.dumps(listed, ensure_ascii=False)
    details = " ".join(e["detail"] for e in events)
    assert "grüppe-☃" in details and "日本語-クローン" in details
    assert sorted(os.listdir(p.mnt / ".snapshots" / "grüppe-☃")) == sorted(names)
    for i, n in enumerate(names[1:], 1):
        assert read_at(p.mnt / ".snapshots" / "grüppe-☃" / n, 0, 100) == pattern(200 + i, 100)


def test_json_stays_valid_with_bad_names_from_an_older_catalog(pool):
    import sqlite3
    p = pool()
    create(p.mnt / "vm1", MiB)
    create(p.mnt / "vm2", MiB)
    os.mkdir(p.mnt / ".snapshots" / "g")
    p.unmount()
    # What an older thinfs let in: names and an event detail that are not UTF-8.
    db = sqlite3.connect(p.catalog)
    with db:
        db.execute("UPDATE volumes SET name = CAST(? AS TEXT) "
                   "WHERE name = 'vm1' AND group_id IS NULL", (b"old\xff",))
        db.execute("UPDATE groups SET name = CAST(? AS TEXT)", (b"g\xfe\xc3",))
        db.execute("INSERT INTO events (time_ns, kind, detail) VALUES (0, 'snapshot', "
                   "CAST(? AS TEXT))", (b"volume \xed\xa0\x80 made",))
    db.close()
    p.mount()
    status, listed, events = json_outputs(p)
    assert sorted(v["name"] for v in status["volumes"] if v["kind"] != "member") == \
        ["old\ufffd", "vm2"]
    assert [g["name"] for g in status["snapshot_groups"]] == ["g\ufffd\ufffd"]
    assert "old\ufffd" in json.dumps(listed, ensure_ascii=False)
    assert "volume \ufffd\ufffd\ufffd made" in [e["detail"] for e in events]
    # The file keeps its bytes, and can be given a valid name.
    assert os.fsencode(os.fsdecode(b"old\xff")) in os.listdir(os.fsencode(p.mnt))
    os.rename(p.mnt / os.fsdecode(b"old\xff"), p.mnt / "vm1")
    status, _, _ = json_outputs(p)
    assert sorted(v["name"] for v in status["volumes"] if v["kind"] != "member") == \
        ["vm1", "vm2"]


# ---- O_DIRECT ---------------------------------------------------------------------

def test_o_direct_read_and_write(pool):
    p = pool()
    create(p.mnt / "vm1", 4 * MiB)
    buf = aligned(2 * BS)
    data = pattern(13, 2 * BS)
    buf[:] = data
    fd = os.open(p.mnt / "vm1", os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], BS) == 2 * BS
        rbuf = aligned(4 * BS)
        assert os.preadv(fd, [rbuf], 0) == 4 * BS
        assert rbuf[:] == bytes(BS) + data + bytes(BS)
        # 4 KiB aligned, inside a block.
        small = aligned(4096)
        small[:] = b"\x77" * 4096
        assert os.pwritev(fd, [small], 8192) == 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    want = b"\0" * 8192 + b"\x77" * 4096 + bytes(BS - 12288) + data + bytes(BS)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == want
    assert p.volume("vm1")["mapped_blocks"] == 3
