# SPDX-License-Identifier: GPL-2.0-or-later
"""copy_file_range between volumes of one pool (and within one file):
whole blocks that line up on both sides are shared, not copied: the
destination maps the source's data block and its reference count goes up;
the unaligned head and tail are copied.  A later write to either side
copies the block first, as after a snapshot.  Teardown runs thin_check and
`thinfs check`, which count every data block's references."""
import errno
import os
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET

import pytest

from conftest import run_cmd
from daemon_util import (BS, create, expect_errno, fsync_path, pattern, read_at, read_direct,
                         wait_for, write_at, write_direct)


def copy_range(src, dst, n, off_in=0, off_out=0):
    """os.copy_file_range until n bytes are copied (a call may copy less)."""
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        done = 0
        while done < n:
            got = os.copy_file_range(fi, fo, n - done, off_in + done, off_out + done)
            assert got > 0, f"copy_file_range returned {got} after {done} of {n} bytes"
            done += got
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def mappings(p, vol):
    """{vblock: data block} of volume vol (committed metadata, thin_dump)."""
    dev = p.volume(vol)["id"]
    root = ET.fromstring(run_cmd("thin_dump", p.meta).stdout)
    out = {}
    for d in root.findall("device"):
        if int(d.get("dev_id")) != dev:
            continue
        for m in d:
            if m.tag == "range_mapping":
                b, db, n = (int(m.get(k)) for k in ("origin_begin", "data_begin", "length"))
                out.update({b + i: db + i for i in range(n)})
            else:
                out[int(m.get("origin_block"))] = int(m.get("data_block"))
    return out


def filled(p, name, nblocks, seed, size=None):
    """A volume whose first nblocks blocks hold pattern(seed, ...), committed."""
    vol = create(p.mnt / name, size or nblocks * BS)
    if nblocks:
        write_at(vol, 0, pattern(seed, nblocks * BS))
    return vol


def pool_time(p):
    """The pool's time, as committed (thin_dump)."""
    return int(ET.fromstring(run_cmd("thin_dump", p.meta).stdout).get("time"))


def test_copy_file_range_shares_whole_blocks_and_allocates_nothing(pool):
    p = pool()
    src = filled(p, "src", 16, 1)
    dst = create(p.mnt / "dst", 16 * BS)
    used = p.used()
    copy_range(src, dst, 16 * BS)
    assert read_at(dst, 0, 16 * BS) == pattern(1, 16 * BS)
    assert p.used() == used
    for name in ("src", "dst"):
        v = p.volume(name)
        assert v["mapped_blocks"] == 16 and v["exclusive_blocks"] == 0, v
    assert mappings(p, "dst") == mappings(p, "src")
    assert len(set(mappings(p, "src").values())) == 16


def test_a_length_past_the_source_end_copies_to_the_end(pool):
    p = pool()
    src = filled(p, "src", 4, 1)
    os.truncate(src, 4 * BS - 100)
    dst = create(p.mnt / "dst")
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        assert os.copy_file_range(fi, fo, 1 << 62, 0, 0) == 4 * BS - 100
        assert os.copy_file_range(fi, fo, 1 << 62, 4 * BS - 100, 0) == 0
    finally:
        os.close(fi)
        os.close(fo)
    assert os.stat(dst).st_size == 4 * BS - 100
    assert read_at(dst, 0, 4 * BS) == pattern(1, 4 * BS)[:4 * BS - 100]
    assert p.volume("dst")["mapped_blocks"] == 4
    fsync_path(dst)
    assert [b for b in range(4) if mappings(p, "dst")[b] == mappings(p, "src")[b]] == [0, 1, 2]


def test_writes_after_a_clone_break_the_sharing_both_ways(pool):
    p = pool()
    src = filled(p, "src", 8, 1)
    dst = create(p.mnt / "dst", 8 * BS)
    copy_range(src, dst, 8 * BS)
    used = p.used()
    write_at(src, 3 * BS + 100, b"s" * 5000)
    write_at(dst, 5 * BS, b"d" * BS)
    want_src = bytearray(pattern(1, 8 * BS))
    want_src[3 * BS + 100:3 * BS + 5100] = b"s" * 5000
    want_dst = bytearray(pattern(1, 8 * BS))
    want_dst[5 * BS:6 * BS] = b"d" * BS
    assert p.used() == used + 2     # one copy per side
    p.remount()
    assert read_at(src, 0, 8 * BS) == want_src
    assert read_at(dst, 0, 8 * BS) == want_dst
    s, d = mappings(p, "src"), mappings(p, "dst")
    assert [b for b in range(8) if s[b] != d[b]] == [3, 5]
    # Written once, the copies are the writer's own: a second write goes in place.
    write_at(dst, 5 * BS, b"e" * BS)
    assert p.used() == used + 2
    assert p.volume("dst")["exclusive_blocks"] == 2


def test_a_committed_clone_survives_a_crash_and_still_breaks_on_write(pool):
    p = pool()
    src = filled(p, "src", 4, 1)
    dst = create(p.mnt / "dst", 4 * BS)
    copy_range(src, dst, 4 * BS)      # fsyncs dst: the commit
    p.kill9()
    p.mount()
    assert mappings(p, "dst") == mappings(p, "src")
    write_at(src, 0, pattern(2, 4 * BS))
    write_at(dst, BS, pattern(3, BS))
    assert read_at(dst, 0, 4 * BS) == pattern(1, BS) + pattern(3, BS) + pattern(1, 4 * BS)[2 * BS:]
    assert read_at(src, 0, 4 * BS) == pattern(2, 4 * BS)


def test_an_uncommitted_clone_is_whole_or_absent_after_a_crash(pool):
    p = pool(options={"commit_interval": "1h"})
    src = filled(p, "src", 4, 1)
    dst = filled(p, "dst", 4, 2)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        assert os.copy_file_range(fi, fo, 4 * BS, 0, 0) == 4 * BS
    finally:
        os.close(fi)
        os.close(fo)
    p.kill9()
    p.mount()
    assert read_at(dst, 0, 4 * BS) in (pattern(1, 4 * BS), pattern(2, 4 * BS))
    assert read_at(src, 0, 4 * BS) == pattern(1, 4 * BS)


def test_unaligned_head_and_tail_are_copied_and_the_rest_shared(pool):
    p = pool()
    src = filled(p, "src", 8, 1)
    dst = filled(p, "dst", 8, 2)
    off, n = BS // 2 + 100, 5 * BS     # head: half a block; 4 whole blocks; tail
    used = p.used()
    copy_range(src, dst, n, off, off)
    want = bytearray(pattern(2, 8 * BS))
    want[off:off + n] = pattern(1, 8 * BS)[off:off + n]
    assert read_at(dst, 0, 8 * BS) == want
    # dst's blocks 1-4 now are src's; its old ones are free again.
    assert p.used() == used - 4
    s, d = mappings(p, "src"), mappings(p, "dst")
    assert [b for b in range(8) if s[b] == d[b]] == [1, 2, 3, 4]


def test_ranges_whose_blocks_do_not_line_up_are_copied(pool):
    p = pool()
    src = filled(p, "src", 4, 1)
    dst = create(p.mnt / "dst", 8 * BS)
    used = p.used()
    copy_range(src, dst, 3 * BS, 0, 4096)
    assert read_at(dst, 0, 8 * BS) == \
        bytes(4096) + pattern(1, 3 * BS) + bytes(5 * BS - 4096)
    assert p.used() == used + 4
    assert not set(mappings(p, "dst").values()) & set(mappings(p, "src").values())


def test_unmapped_source_blocks_unmap_the_destination(pool):
    p = pool()
    src = create(p.mnt / "src", 4 * BS)
    write_at(src, 0, pattern(1, BS))
    write_at(src, 2 * BS, pattern(2, BS))
    dst = filled(p, "dst", 4, 3)
    copy_range(src, dst, 4 * BS)
    assert read_at(dst, 0, 4 * BS) == pattern(1, BS) + bytes(BS) + pattern(2, BS) + bytes(BS)
    assert p.volume("dst")["mapped_blocks"] == 2
    p.wait_used(2)       # dst's own four blocks are free
    fd = os.open(dst, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == BS
    finally:
        os.close(fd)


def test_clone_within_one_file_and_overlapping_ranges_refused(pool):
    p = pool()
    vol = filled(p, "v", 4, 1, size=16 * BS)
    used = p.used()
    copy_range(vol, vol, 4 * BS, 0, 8 * BS)
    assert p.used() == used
    m = mappings(p, "v")
    assert [m[8 + b] for b in range(4)] == [m[b] for b in range(4)]
    write_at(vol, BS, b"x" * BS)
    assert read_at(vol, 8 * BS, 4 * BS) == pattern(1, 4 * BS)
    assert read_at(vol, BS, BS) == b"x" * BS
    # The kernel refuses overlapping ranges of one file before the daemon sees them.
    fd = os.open(vol, os.O_RDWR)
    try:
        expect_errno(errno.EINVAL, os.copy_file_range, fd, fd, 4 * BS, 0, 2 * BS)
    finally:
        os.close(fd)
    assert read_at(vol, 0, BS) == pattern(1, BS)


def test_a_clone_from_a_snapshot_outlives_its_source(pool):
    p = pool()
    src = filled(p, "src", 4, 1)
    os.mkdir(p.mnt / ".snapshots" / "g")
    write_at(src, 0, pattern(2, 4 * BS))
    dst = create(p.mnt / "restored", 4 * BS)
    used = p.used()
    copy_range(p.mnt / ".snapshots" / "g" / "src", dst, 4 * BS)
    assert read_at(dst, 0, 4 * BS) == pattern(1, 4 * BS)
    assert p.used() == used
    os.rmdir(p.mnt / ".snapshots" / "g")
    os.unlink(src)
    p.wait_used(4)
    assert read_at(dst, 0, 4 * BS) == pattern(1, 4 * BS)
    os.unlink(dst)
    p.wait_used(0)


def test_a_suspended_destination_holds_the_clone_until_resume(pool):
    p = pool()
    src = filled(p, "src", 4, 1)
    dst = create(p.mnt / "dst", 4 * BS)
    p.ctl("suspend", "dst")
    done = {}

    def run():
        try:
            copy_range(src, dst, 4 * BS)
            done["ok"] = True
        except OSError as e:
            done["err"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: p.volume("dst")["held_in_core"] >= 1), "the clone was not held"
        assert not done and p.volume("dst")["mapped_blocks"] == 0
    finally:
        p.ctl("resume", "dst")
    t.join(60)
    assert done == {"ok": True}
    assert read_at(dst, 0, 4 * BS) == pattern(1, 4 * BS)
    assert mappings(p, "dst") == mappings(p, "src")


def test_clones_during_whole_file_writes_see_one_write_or_the_other(pool):
    """The clone holds the source range for all of its chunks, and a write
    of the whole range is one request: each clone is some version whole."""
    p = pool()
    versions = [pattern(100 + i, 8 * BS) for i in range(8)]
    src = create(p.mnt / "src", 8 * BS)
    write_direct(src, 0, versions[0])
    dst = create(p.mnt / "dst", 8 * BS)
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        try:
            while not stop.is_set():
                i = (i + 1) % len(versions)
                write_direct(src, 0, versions[i])
        except OSError as e:
            errors.append(e)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(40):
            copy_range(src, dst, 8 * BS)
            got = read_direct(dst, 0, 8 * BS)
            assert got in versions, "a clone mixes two writes"
    finally:
        stop.set()
        t.join(60)
    assert not errors


def test_copy_from_another_pool_or_file_is_a_plain_copy(pool, tmp_path):
    a, b = pool("a"), pool("b")
    src = filled(a, "src", 4, 1)
    dst = create(b.mnt / "dst", 4 * BS)
    # Another FUSE mount: the kernel copies through read and write.
    copy_range(src, dst, 4 * BS)
    assert read_at(dst, 0, 4 * BS) == pattern(1, 4 * BS)
    assert b.used() == 4
    assert not mappings(b, "dst").keys() - set(range(4))
    # Another kind of filesystem: EXDEV, and cp copies by itself.
    plain = tmp_path / "plain"
    plain.write_bytes(pattern(2, 2 * BS))
    fi, fo = os.open(plain, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        expect_errno(errno.EXDEV, os.copy_file_range, fi, fo, BS, 0, 0)
    finally:
        os.close(fi)
        os.close(fo)
    run_cmd("cp", "--reflink=auto", plain, b.mnt / "copy")
    assert read_at(b.mnt / "copy", 0, 2 * BS) == pattern(2, 2 * BS)
    run_cmd("cp", "--reflink=auto", src, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == pattern(1, 4 * BS)


def test_a_read_only_pool_refuses_a_clone(pool):
    p = pool(mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the injected failure is logged as an error
    src = filled(p, "src", 4, 1)
    dst = create(p.mnt / "dst", 4 * BS)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        p.ctl("fault", "metadata", "write", "error", "once")
        with pytest.raises(OSError):
            write_at(src, 8 * BS, pattern(2, BS))
        assert p.status()["pool"]["mode"] == "read_only"
        expect_errno((errno.EIO, errno.EROFS), os.copy_file_range, fi, fo, 4 * BS, 0, 0)
    finally:
        os.close(fi)
        os.close(fo)
    assert read_at(dst, 0, 4 * BS) == bytes(4 * BS)
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))


def test_a_clone_needs_no_data_space(pool):
    p = pool(data_size=16 * BS, options={"error_if_no_space": "true"})
    src = filled(p, "src", 8, 1)
    filled(p, "filler", 8, 2)
    dst = create(p.mnt / "dst", 8 * BS)
    expect_errno(errno.ENOSPC, write_at, dst, 0, pattern(3, BS))
    assert p.status()["pool"]["mode"] == "out_of_data_space"
    copy_range(src, dst, 8 * BS)
    assert read_at(dst, 0, 8 * BS) == pattern(1, 8 * BS)
    # Breaking the sharing needs a block.
    expect_errno(errno.ENOSPC, write_at, dst, 0, pattern(3, BS))
    assert read_at(dst, 0, 8 * BS) == pattern(1, 8 * BS)
    os.unlink(p.mnt / "filler")
    p.wait_used(8)
    write_at(dst, 0, pattern(3, BS))
    assert read_at(src, 0, BS) == pattern(1, BS)


def test_cp_between_volumes_shares_blocks(pool):
    """coreutils 9.1 calls copy_file_range for a file without holes (its
    hole-aware path reads and writes)."""
    p = pool()
    src = filled(p, "src", 8, 1)
    used = p.used()
    run_cmd("cp", "--reflink=auto", src, p.mnt / "dst")
    fsync_path(p.mnt / "dst")
    assert read_at(p.mnt / "dst", 0, 8 * BS) == pattern(1, 8 * BS)
    assert p.used() == used
    assert mappings(p, "dst") == mappings(p, "src")


def test_a_run_of_clones_moves_the_pool_time_once(pool):
    p = pool()
    src = filled(p, "src", 8, 1)
    dst = create(p.mnt / "dst", 8 * BS)
    t0 = pool_time(p)
    for b in (0, 1, 4, 7):                  # one call per extent, as a hole-aware copy makes
        copy_range(src, dst, BS, b * BS, b * BS)
    assert pool_time(p) == t0 + 1
    copy_range(src, p.mnt / "dst", BS, 2 * BS, 2 * BS)
    assert pool_time(p) == t0 + 1
    # A block written since the mark is marked again when it is shared.
    write_at(src, 4 * BS, pattern(9, BS))
    copy_range(src, dst, BS, 5 * BS, 5 * BS)
    assert pool_time(p) == t0 + 1
    copy_range(src, dst, BS, 4 * BS, 4 * BS)
    assert pool_time(p) == t0 + 2
    write_at(dst, 4 * BS, pattern(10, BS))
    assert read_at(src, 4 * BS, BS) == pattern(9, BS)
    assert p.used() == 9      # src's 8, and dst's own block 4; its first one is free again


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")
def test_qemu_img_convert_between_volumes_shares_blocks(pool):
    p = pool()
    src = filled(p, "src", 8, 1, size=16 * BS)
    dst = create(p.mnt / "dst", 16 * BS)
    used = p.used()
    subprocess.run(["qemu-img", "convert", "-n", "-C", "-f", "raw", "-O", "raw", src, dst],
                   check=True, timeout=120)
    fsync_path(dst)
    assert read_at(dst, 0, 16 * BS) == pattern(1, 8 * BS) + bytes(8 * BS)
    assert p.used() == used
