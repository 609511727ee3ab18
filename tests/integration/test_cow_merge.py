# SPDX-License-Identifier: GPL-2.0-or-later
"""thinfs-ctl MNT merge NAME: a classic snapshot merged back into its origin
(dm snapshot-merge, lvconvert --merge), on real mounts.  Origin and COW
devices are sparse files next to the pool."""
import os
import random
import re
import threading

import pytest

from daemon_util import pattern, read_at, wait_for, write_at
from test_cow_snapshots import (MiB, check_cfg, cow_pool, ctl_snapshot, events_of,
                                ext4_origin_and_snapshot, one_line, sparse, vol, wait_events,
                                wait_for_line, write_hook)

CHUNK = 4096


def merged(p, name, n=1):
    """Wait (bounded) for the n-th merge_done; it names the snapshot."""
    ev = wait_events(p, "merge_done", n, timeout=60)
    assert name in ev[-1]["detail"], ev
    return ev


def scattered_writes(path, seed, first, count, step=2):
    """One 4 KiB write to every step-th chunk from chunk first: exceptions
    that are not consecutive, so the merge takes them one step each."""
    for i in range(count):
        write_at(path, (first + i * step) * CHUNK, pattern(seed * 1000 + i, CHUNK), fsync=False)
    os.sync()


def faulty_pool(pool, tmp_path, origin_size=8 * MiB):
    origin = sparse(tmp_path / "origin.img", origin_size)
    write_at(origin, 0, pattern(1, origin_size))
    p = cow_pool(pool, [("db", origin)], mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    return p, origin


def test_merge_reads_the_snapshot_at_once_and_keeps_concurrent_origin_writes(pool, tmp_path):
    p, origin = faulty_pool(pool, tmp_path)
    cow = sparse(tmp_path / "s.cow", 8 * MiB)
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "4k")
    scattered_writes(p.mnt / "db", 2, 0, 300)          # the snapshot keeps the old chunks
    write_at(p.mnt / "s", 5 * MiB + 10, pattern(3, 200000))  # and has changes of its own
    snap = read_at(p.mnt / "s", 0, 8 * MiB)
    assert snap != read_at(p.mnt / "db", 0, 8 * MiB)
    # A slow COW device: the merge is still running while the writes below come.
    p.ctl("fault", "s:cow", "read", "delay", "3000")
    p.ctl("merge", "s")
    assert not (p.mnt / "s").exists()
    model = bytearray(snap)
    assert read_at(p.mnt / "db", 0, 8 * MiB) == snap
    rng = random.Random(4)
    lock = threading.Lock()
    errors = []

    def writer(seed):
        r = random.Random(seed)
        try:
            for i in range(60):
                off = r.randrange(0, 8 * MiB - 20000)
                data = pattern(seed * 100 + i, r.choice((512, 4096, 5000, 16384)))
                with lock:
                    write_at(p.mnt / "db", off, data, fsync=(i % 10 == 0))
                    model[off:off + len(data)] = data
        except Exception as e:      # noqa: B902 - reported below
            errors.append(e)

    def reader():
        try:
            for _ in range(30):
                off = rng.randrange(0, 8 * MiB - 65536)
                with lock:
                    assert read_at(p.mnt / "db", off, 65536) == bytes(model[off:off + 65536])
        except Exception as e:      # noqa: B902 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (5, 6)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    p.ctl("fault", "s:cow", "read", "ok")
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 8 * MiB) == bytes(model)
    assert "s" not in [v["name"] for v in p.status()["volumes"]]
    # The name and the COW device are free again: a new snapshot takes both.
    ctl_snapshot(p, "db", "s", cow)
    assert read_at(p.mnt / "s", 0, 8 * MiB) == bytes(model)
    p.unmount()
    assert read_at(origin, 0, 8 * MiB) == bytes(model)
    check_cfg(p)


def test_merge_done_runs_the_hook_and_cached_origin_pages_go(pool, tmp_path):
    hook, log = write_hook(tmp_path / "hook")
    origin = sparse(tmp_path / "origin.img", 2 * MiB)
    write_at(origin, 0, pattern(7, 2 * MiB))
    cow = sparse(tmp_path / "s.cow", 2 * MiB)
    p = cow_pool(pool, [("db", origin)], options={"on_event": hook})
    ctl_snapshot(p, "db", "s", cow)
    write_at(p.mnt / "db", 0, b"n" * (1 * MiB))
    # A handle open across the merge: the kernel's cached pages of the origin go too.
    fd = os.open(p.mnt / "db", os.O_RDONLY)
    try:
        assert os.pread(fd, 1 * MiB, 0) == b"n" * (1 * MiB)
        p.ctl("merge", "s")
        assert os.pread(fd, 1 * MiB, 0) == pattern(7, 1 * MiB)
    finally:
        os.close(fd)
    merged(p, "s")
    wait_for_line(log, "merge_done s")
    assert read_at(p.mnt / "db", 0, 2 * MiB) == pattern(7, 2 * MiB)
    p.unmount()
    check_cfg(p)


def test_merge_leaves_other_snapshots_exactly_as_they_were(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    write_at(origin, 0, pattern(10, 4 * MiB))
    cows = {n: sparse(tmp_path / f"{n}.cow", 8 * MiB) for n in ("old", "s", "t")}
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "old", cows["old"])            # before everything
    write_at(p.mnt / "db", 100 * CHUNK, pattern(11, 50 * CHUNK))
    ctl_snapshot(p, "db", "s", cows["s"], "--chunk-size", "8k")
    scattered_writes(p.mnt / "db", 12, 0, 200)
    write_at(p.mnt / "s", 3 * MiB, pattern(13, 100000))
    ctl_snapshot(p, "db", "t", cows["t"], "--chunk-size", "16k")   # after, with other chunks
    write_at(p.mnt / "db", 1 * MiB, pattern(14, 300000))
    want = {n: read_at(p.mnt / n, 0, 4 * MiB) for n in ("old", "s", "t")}
    p.ctl("merge", "s")
    assert read_at(p.mnt / "db", 0, 4 * MiB) == want["s"]
    for n in ("old", "t"):
        assert read_at(p.mnt / n, 0, 4 * MiB) == want[n]
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 4 * MiB) == want["s"]
    for n in ("old", "t"):
        assert read_at(p.mnt / n, 0, 4 * MiB) == want[n]
        assert vol(p, n)["valid"] is True
    assert vol(p, "db")["snapshots"] == ["old", "t"]
    p.unmount()
    p.mount()
    for n in ("old", "t"):
        assert read_at(p.mnt / n, 0, 4 * MiB) == want[n]
    p.unmount()
    check_cfg(p)


def stalled_merge(p, tmp_path, after, other=None):
    """A snapshot s with many one-chunk runs, merged until the COW device's
    reads stall after `after` of them: the merge is then in progress.
    other: the name of a snapshot of db taken after s (made before the merge);
    then (s's content, other's content) is returned."""
    cow = sparse(tmp_path / "s.cow", 8 * MiB)
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "4k")
    scattered_writes(p.mnt / "db", 20, 0, 150)
    write_at(p.mnt / "s", 2 * MiB + 7, pattern(21, 30000))
    if other:
        ctl_snapshot(p, "db", other, sparse(tmp_path / f"{other}.cow", 8 * MiB))
        write_at(p.mnt / "db", 6 * MiB, pattern(22, 100000))
    snap = read_at(p.mnt / "s", 0, 8 * MiB)
    # Read before the stall: a merge step held up on s's COW device keeps its
    # chunk locked, and other's read of that chunk would wait with it.
    other_data = read_at(p.mnt / other, 0, 8 * MiB) if other else None
    p.ctl("fault", "s:cow", "read", "stall", "after", str(after))
    p.ctl("merge", "s")
    assert not (p.mnt / "s").exists()
    detail = events_of(p, "merge")[-1]["detail"]
    assert re.fullmatch(r"snapshot s into db: \d+ chunk\(s\) to merge", detail), detail
    # Listed while merging: no file, its progress in status.
    s = vol(p, "s")
    assert s["kind"] == "cow-snapshot" and s["merging"] is True
    assert s["merge_remaining_chunks"] > 0
    assert re.fullmatch(r"\d+/16384 \d+", s["dm_status"]), s["dm_status"]
    return (snap, other_data) if other else snap


def test_merge_interrupted_by_unmount_resumes_at_the_next_mount(pool, tmp_path):
    p, origin = faulty_pool(pool, tmp_path)
    snap = stalled_merge(p, tmp_path, after=5)
    # 158 exceptions: a run of 8 (the snapshot's write) merged first, then one by one.
    assert wait_for(lambda: vol(p, "s")["merge_remaining_chunks"] == 158 - 8 - 4)
    # The merging snapshot keeps its name: a thin volume made or renamed to
    # it now would meet the resumed merge at the next mount.
    with pytest.raises(FileExistsError):
        os.close(os.open(p.mnt / "s", os.O_CREAT | os.O_WRONLY))
    os.close(os.open(p.mnt / "other", os.O_CREAT | os.O_WRONLY))
    with pytest.raises(PermissionError):
        os.rename(p.mnt / "other", p.mnt / "s")
    os.unlink(p.mnt / "other")
    p.unmount()                          # the stalled step finishes; the rest waits
    p.mount("--allow-faults")
    ev = events_of(p, "merge")
    assert "resumed" in ev[-1]["detail"], ev
    left = int(re.search(r"(\d+) chunk", ev[-1]["detail"]).group(1))
    assert left == 158 - 8 - 5
    assert read_at(p.mnt / "db", 0, 8 * MiB) == snap   # before and after it is done
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 8 * MiB) == snap
    os.close(os.open(p.mnt / "s", os.O_CREAT | os.O_WRONLY))   # merged: the name is free
    os.unlink(p.mnt / "s")
    p.unmount()
    assert read_at(origin, 0, 8 * MiB) == snap
    check_cfg(p)


def test_merge_interrupted_by_kill9_resumes_at_the_next_mount(pool, tmp_path):
    p, origin = faulty_pool(pool, tmp_path)
    snap, t = stalled_merge(p, tmp_path, after=8, other="t")
    p.kill9()
    p.mount("--allow-faults")
    ev = events_of(p, "merge")
    assert "resumed" in ev[-1]["detail"], ev
    assert read_at(p.mnt / "db", 0, 8 * MiB) == snap
    assert read_at(p.mnt / "t", 0, 8 * MiB) == t       # opened too, its content kept
    # An origin write during the resumed merge survives it.
    write_at(p.mnt / "db", 3 * CHUNK + 5, b"W" * 9000)
    want = bytearray(snap)
    want[3 * CHUNK + 5:3 * CHUNK + 5 + 9000] = b"W" * 9000
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 8 * MiB) == bytes(want)
    assert read_at(p.mnt / "t", 0, 8 * MiB) == t
    p.unmount()
    assert read_at(origin, 0, 8 * MiB) == bytes(want)
    check_cfg(p)


def test_a_failed_merge_says_so_and_resumes_at_the_next_mount(pool, tmp_path):
    p, origin = faulty_pool(pool, tmp_path, origin_size=2 * MiB)
    p.expect_log(r"snapshot s: merge: reading its COW device .* failed")
    p.expect_log(r"snapshot s: the merge into db stopped \(Merge failed\)")
    cow = sparse(tmp_path / "s.cow", 2 * MiB)
    ctl_snapshot(p, "db", "s", cow)
    scattered_writes(p.mnt / "db", 50, 0, 40)
    snap = read_at(p.mnt / "s", 0, 2 * MiB)
    p.ctl("fault", "s:cow", "read", "error", "after", "3")
    p.ctl("merge", "s")
    assert wait_for(lambda: vol(p, "s")["dm_status"] == "Merge failed")
    s = vol(p, "s")
    assert s["merging"] is True and s["merge_remaining_chunks"] == 40 - 3
    p.ctl("fault", "s:cow", "read", "ok")
    assert read_at(p.mnt / "db", 0, 2 * MiB) == snap   # what is left is read from the COW
    p.unmount()
    p.mount("--allow-faults")
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 2 * MiB) == snap
    p.unmount()
    check_cfg(p)


def test_merge_of_an_ext4_origin_gives_back_the_snapshots_file_system(pool, tmp_path):
    from conftest import run_cmd
    p = ext4_origin_and_snapshot(pool, tmp_path, 30)
    p.ctl("merge", "s")
    merged(p, "s")
    r = run_cmd("e2fsck", "-fn", p.mnt / "db", check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dev = p.losetup(p.mnt / "db", "-r")
    m = p.mount_fs(dev, tmp_path / "fs2", "-o", "ro,noload")
    assert (m / "a").read_bytes() == pattern(30, 3 * MiB)
    assert not (m / "b").exists()
    p.umount_fs(m)
    p.detach(dev)
    p.unmount()
    check_cfg(p)


def test_bad_merges_are_refused_and_change_nothing(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    write_at(origin, 0, pattern(40, 4 * MiB))
    cfg_cow = sparse(tmp_path / "cfg.cow", 4 * MiB)
    p = cow_pool(pool, [("db", origin)], [("c", {"origin": "db", "cow": cfg_cow})],
                 mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r"snapshot small: invalidated: the COW store is full")
    ctl_snapshot(p, "db", "tr", sparse(tmp_path / "tr.cow", 4 * MiB), "--transient")
    ctl_snapshot(p, "db", "small", sparse(tmp_path / "small.cow", 64 << 10))
    ctl_snapshot(p, "db", "s", sparse(tmp_path / "s.cow", 8 * MiB))
    write_at(p.mnt / "db", 0, pattern(41, 1 * MiB))     # small overflows
    assert vol(p, "small")["valid"] is False
    before = {n: read_at(p.mnt / n, 0, 4 * MiB) for n in ("db", "c", "tr", "s")}

    def refused(name, *words):
        err = one_line(p.ctl("merge", name, ok=(1,)))
        for w in words:
            assert w in err, err

    refused("c", "pool.cfg")
    refused("tr", "transient")
    refused("small", "invalid")
    refused("nosuch", "no classic snapshot named 'nosuch'")
    refused("db", "not a classic snapshot")
    assert "usage: merge NAME" in one_line(p.ctl("merge", ok=(1,)))
    fd = os.open(p.mnt / "s", os.O_RDONLY)
    try:
        refused("s", "s is open")
    finally:
        os.close(fd)
    for n, data in before.items():
        assert read_at(p.mnt / n, 0, 4 * MiB) == data
    assert {v["name"]: v["merging"] for v in p.status()["volumes"]
            if v["kind"] == "cow-snapshot"} == {"c": False, "tr": False, "small": False,
                                                "s": False}
    # While s merges (held by a stalled COW read): a second merge, a new snapshot of db
    # and a reload without db are refused.
    p.ctl("fault", "s:cow", "read", "stall")
    p.ctl("merge", "s")
    refused("s", "already being merged")
    err = one_line(ctl_snapshot(p, "db", "u", sparse(tmp_path / "u.cow", 4 * MiB), ok=(1,)))
    assert "merge" in err, err
    text = p.cfg.read_text()
    p.ctl("suspend")
    p.cfg.write_text(text.split('[origin "db"]')[0])      # db and c go
    err = one_line(p.ctl("reload", p.cfg, ok=(1,)))
    assert '[origin "db"] removed or changed: a snapshot is being merged' in err, err
    p.cfg.write_text(text)
    p.ctl("resume")
    p.ctl("fault", "s:cow", "read", "ok")
    merged(p, "s")
    assert read_at(p.mnt / "db", 0, 4 * MiB) == before["s"]
    p.unmount()
    check_cfg(p)
