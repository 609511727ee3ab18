# SPDX-License-Identifier: GPL-2.0-or-later
"""A COW file is preallocated (fallocate KEEP_SIZE) a region ahead of its
store's allocator, and its free data chunks there written with zeros, so
that copies into it are host overwrites of written extents: what the
snapshot reads, what the store reports and what survives a crash are
unchanged by it, and the file never grows past its size."""
import os
import threading

import pytest

from daemon_util import pattern, read_at, wait_for, write_at
from test_cow_snapshots import check_cfg, cow_pool, ctl_snapshot, sections, sparse, vol

MiB = 1 << 20
CHUNK = 4096
REGION = 4 * MiB  # cowsnap.c PREALLOC_BYTES
# The host's extent tree of a file written in many places: not data, may come on top.
HOST_META = 256 << 10


def host_bytes(path):
    return os.stat(path).st_blocks * 512


def data_chunks(lo, hi):
    """COW chunks in [lo, hi) that are neither the header nor an area (4 KiB chunks:
    an area every 257 chunks from chunk 1)."""
    return sum(1 for c in range(lo, hi) if c != 0 and (c - 1) % 257 != 0)


def store_sectors(n):
    """allocated_sectors of a fresh persistent store with 4 KiB chunks after
    n exceptions: header, area 0, the data chunks and an area per 256."""
    return (2 + n + n // 256) * (CHUNK // 512)


def break_chunks(path, chunks, data, writers=8):
    """First writes of 4 KiB to each of chunks, from parallel writers, fsync'ed."""
    def run(part):
        for c in part:
            write_at(path, c * CHUNK, data[c * CHUNK:(c + 1) * CHUNK])
    threads = [threading.Thread(target=run, args=(chunks[i::writers],))
               for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def prealloc_when(p, pred, name="s"):
    """The snapshot's preallocate counts once pred holds of them, or as they
    are after a bounded wait: the region ahead of the writers is filled by a
    thread of the snapshot's own, after the break that asked for it returned."""
    wait_for(lambda: pred(vol(p, name)["preallocate"]))
    return vol(p, name)["preallocate"]


def origin_and_snapshot(pool, tmp_path, seed, size, cow_size):
    """A mounted origin "db" of size bytes of pattern(seed) and a snapshot "s"
    of it with 4 KiB chunks on a sparse COW file of cow_size bytes."""
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(seed, size)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", cow_size)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "4k")
    return p, base, cow


def test_cow_breaks_into_a_preallocated_cow_file_read_back_right_after_kill9(pool, tmp_path):
    size = 16 * MiB
    p, base, cow = origin_and_snapshot(pool, tmp_path, 1, size, 10 * MiB)
    assert vol(p, "s")["preallocate"]["active"] is True
    # 1500 chunks (about 6 MiB of the COW file: two regions and the start of a third).
    chunks = list(range(0, 3000, 2))
    new = pattern(2, size)
    break_chunks(p.mnt / "db", chunks, new)
    cur = bytearray(base)
    for c in chunks:
        cur[c * CHUNK:(c + 1) * CHUNK] = new[c * CHUNK:(c + 1) * CHUNK]
    # The store's numbers, not the file's: preallocation is not usage.
    assert vol(p, "s")["cow"]["allocated_sectors"] == store_sectors(len(chunks))
    # The regions the store reached, and the one ahead of it, the last cut at the file's end.
    pa = prealloc_when(p, lambda pa: pa["chunks"] == 3)
    assert pa["chunk_bytes"] == REGION and pa["failures"] == 0
    assert pa["fallocates"] == pa["chunks"] == 3
    assert os.path.getsize(cow) == 10 * MiB
    assert 8 * MiB <= host_bytes(cow) <= 10 * MiB + HOST_META
    assert read_at(p.mnt / "s", 0, size) == base
    assert read_at(p.mnt / "db", 0, size) == bytes(cur)
    # Every break was fsync'ed: a crash loses none of them, nor reads zeros of a region.
    p.kill9()
    p.mount()
    assert read_at(p.mnt / "s", 0, size) == base
    assert read_at(p.mnt / "db", 0, size) == bytes(cur)
    assert vol(p, "s")["cow"]["allocated_sectors"] == store_sectors(len(chunks))
    p.unmount()
    assert "clean, 1500 exception(s)" in check_cfg(p).stdout


def test_zeros_ahead_start_at_the_allocation_point_and_spare_copies_made_before_a_crash(
        pool, tmp_path):
    size = 16 * MiB
    p, base, cow = origin_and_snapshot(pool, tmp_path, 6, size, 10 * MiB)
    first = list(range(0, 3000, 2))
    new = pattern(7, size)
    break_chunks(p.mnt / "db", first, new)
    assert vol(p, "s")["preallocate"]["zeroed_bytes"] > 0
    p.kill9()
    p.mount()
    # 1500 copies in chunks 2..1506 (areas 258..1286 skipped): region 1 (chunks
    # 1024..2047) holds 478 of them, and its fill starts again after the mount.
    assert vol(p, "s")["preallocate"]["zeroed_bytes"] == 0
    write_at(p.mnt / "db", 3001 * CHUNK, new[3001 * CHUNK:3002 * CHUNK])
    # Chunk 1507 went to that write; zeros went past it only, areas skipped,
    # in region 1 (by that write) and in region 2 ahead (to the file's end).
    want = (data_chunks(1508, 2048) + data_chunks(2048, 2560)) * CHUNK
    pa = prealloc_when(p, lambda pa: pa["zeroed_bytes"] >= want)
    assert pa["zeroed_bytes"] == want
    more = list(range(3003, 4000, 2))
    break_chunks(p.mnt / "db", more, new)
    cur = bytearray(base)
    for c in first + [3001] + more:
        cur[c * CHUNK:(c + 1) * CHUNK] = new[c * CHUNK:(c + 1) * CHUNK]
    assert read_at(p.mnt / "s", 0, size) == base
    assert read_at(p.mnt / "db", 0, size) == bytes(cur)
    p.unmount()
    assert "clean, 2000 exception(s)" in check_cfg(p).stdout


def test_large_chunks_are_reserved_ahead_but_not_zeroed(pool, tmp_path):
    size = 8 * MiB
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(8, size)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 10 * MiB)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "64k")
    break_chunks(p.mnt / "db", list(range(0, 16 * 64, 16)), pattern(9, size))
    pa = prealloc_when(p, lambda pa: pa["fallocates"] >= 2)
    # 64 KiB chunks: the zeros would cost more than the conversions they spare.
    assert pa["fallocates"] >= 2 and pa["failures"] == 0 and pa["zeroed_bytes"] == 0
    assert read_at(p.mnt / "s", 0, size) == base
    p.unmount()
    check_cfg(p)


def test_a_grown_cow_file_is_preallocated_up_to_its_new_end_only(pool, tmp_path):
    size = 16 * MiB
    p, base, cow = origin_and_snapshot(pool, tmp_path, 3, size, 5 * MiB)
    break_chunks(p.mnt / "db", list(range(0, 1200)), pattern(4, size))
    assert prealloc_when(p, lambda pa: pa["chunks"] == 2)["chunks"] == 2
    assert host_bytes(cow) <= 5 * MiB + HOST_META
    os.truncate(cow, 9 * MiB)
    p.ctl("resize", "cow", "s")
    break_chunks(p.mnt / "db", list(range(1200, 2000)), pattern(4, size))
    pa = prealloc_when(p, lambda pa: pa["fallocates"] == 4)
    # The region cut at the old end is filled again up to the new end, and the new last one.
    assert pa["fallocates"] == 4 and pa["chunks"] == 3 and pa["failures"] == 0
    assert os.path.getsize(cow) == 9 * MiB and host_bytes(cow) <= 9 * MiB + HOST_META
    assert read_at(p.mnt / "s", 0, size) == base
    p.unmount()
    check_cfg(p)


@pytest.mark.parametrize("faults", [False, True], ids=["plain", "under-fault-injection"])
def test_a_cow_block_device_is_not_preallocated(pool, tmp_path, faults):
    """Also under the fault wrapper, which is still a block device: no
    fallocate is tried (it would fail and log), the copies are right."""
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(6 if faults else 5, 4 * MiB)
    write_at(origin, 0, base)
    p = pool(mount=False)
    cow = p.losetup(sparse(tmp_path / "s.cow", 4 * MiB))
    p.cfg.write_text(p.cfg.read_text() + sections([("db", origin)]) +
                     ("[fault]\nallow = yes\n" if faults else ""))
    p.mount(*(["--allow-faults"] if faults else []))
    ctl_snapshot(p, "db", "s", cow)
    write_at(p.mnt / "db", 0, b"x" * (256 << 10))
    assert vol(p, "s")["preallocate"] == {"active": False, "chunk_bytes": 0, "chunks": 0,
                                          "fallocates": 0, "failures": 0, "zeroed_bytes": 0}
    assert "cannot preallocate" not in p.log_text()
    assert read_at(p.mnt / "s", 0, 4 * MiB) == base
    p.unmount()
    check_cfg(p)


@pytest.mark.parametrize("how", ["rm", "unmount"])
def test_a_snapshot_goes_while_its_fill_thread_writes_zeros_ahead(pool, tmp_path, how):
    """The region ahead of the writers is filled by a thread of the
    snapshot's own: removing the snapshot (or unmounting) while that thread
    is between two delayed zero writes stops it and waits for it before the
    COW device and the store are closed; the origin, the store and (after
    unmount) the snapshot are as they were."""
    size = 8 * MiB
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(10, size)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 16 * MiB)
    p = cow_pool(pool, [("db", origin)], mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "4k")
    # Every write to the COW file takes 0.4 s: region 0's zeros (by this
    # write, 1 MiB at a time), its copy and its record, then region 1's by
    # the thread, which the snapshot's end finds between two pieces.
    p.ctl("fault", "s:cow", "write", "delay", "400000")
    new = b"n" * CHUNK
    write_at(p.mnt / "db", 0, new)
    region0 = data_chunks(3, REGION // CHUNK) * CHUNK
    prealloc_when(p, lambda pa: pa["zeroed_bytes"] > region0)
    # The thread is at region 1: keep it there (its next pieces take 1.5 s each).
    p.ctl("fault", "s:cow", "write", "delay", "1500000")
    assert region0 < vol(p, "s")["preallocate"]["zeroed_bytes"] < region0 + REGION
    if how == "rm":
        os.unlink(p.mnt / "s")
        assert "s" not in [v["name"] for v in p.status()["volumes"]]
        assert read_at(p.mnt / "db", 0, CHUNK) == new
        p.unmount()
    else:
        p.unmount()
        out = check_cfg(p).stdout
        assert "clean, 1 exception(s)" in out
        p.mount("--allow-faults")
        assert read_at(p.mnt / "s", 0, size) == base
        assert read_at(p.mnt / "db", 0, CHUNK) == new
        p.unmount()
    check_cfg(p)
