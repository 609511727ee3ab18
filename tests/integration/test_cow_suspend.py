# SPDX-License-Identifier: GPL-2.0-or-later
"""Suspend and resume of origins and classic snapshots (issue 11, with
issue 5's semantics): `suspend ORIGIN` holds the origin's I/O and its
snapshots', `suspend SNAPSHOT` only that snapshot's, a pool-wide suspend
holds origins too; resume releases, and nothing held is lost.

Held I/O is observed from threads whose calls block in the kernel while the
daemon holds their FUSE requests (the helpers of test_suspend.py); every
wait is bounded, and the guard resumes everything and clears the origin's
stall fault before the pool fixture's teardown."""
import os
import signal
import time

import pytest

from daemon_util import MiB, create, pattern, read_direct, write_at
from test_suspend import Call, Guard, Reader, Writer, events, fsync_file, joined, resume, \
    suspend, vst, wait_for

CHUNK = 4096
SIZE = 4 * MiB


class CowGuard(Guard):
    def release(self):
        for p in self.pools:
            if p.alive() and getattr(p, "faults", False):
                for op in ("read", "write", "flush"):
                    p.ctl("fault", "db:device", op, "ok", ok=None, timeout=30)
        super().release()


@pytest.fixture
def guard():
    g = CowGuard()
    yield g
    g.release()


def cow_pool(pool, g, tmp_path, faults=False):
    """Origin db (4 MiB of pattern 1) with snapshot s1 (4 KiB chunks), both
    from pool.cfg, and a thin volume vm1."""
    origin = tmp_path / "origin.img"
    cow = tmp_path / "cow.img"
    for path in (origin, cow):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    write_at(origin, 0, pattern(1, SIZE))
    p = pool(mount=False)
    p.faults = faults
    text = p.cfg.read_text() + (f'[origin "db"]\ndevice = {origin}\n'
                                f'[snapshot "s1"]\norigin = db\ncow = {cow}\n'
                                f'chunk_size = {CHUNK // 1024}k\n')
    if faults:
        text += "[fault]\nallow = yes\n"
    p.cfg.write_text(text)
    p.mount(*(("--allow-faults",) if faults else ()))
    g.pools.append(p)
    create(p.mnt / "vm1", SIZE)
    return p


def test_origin_suspend_holds_origin_and_snapshot_io_until_resume(pool, guard, tmp_path):
    p = cow_pool(pool, guard, tmp_path)
    assert vst(p, "db")["suspended"] is False and vst(p, "db")["held_in_core"] == 0
    assert vst(p, "s1")["suspended"] is False and vst(p, "s1")["held_in_core"] == 0
    r = suspend(p, "db")
    assert "suspended: db" in r.stdout, r.stdout
    suspend(p, "db")                                # already suspended: exit 0
    st = p.status()
    assert st["pool"]["suspended"] is False, st["pool"]
    vols = {v["name"]: v for v in st["volumes"]}
    assert vols["db"]["suspended"] is True and vols["s1"]["suspended"] is True, vols
    assert vols["vm1"]["suspended"] is False
    assert "suspended" in p.ctl("status").stdout
    w = guard.start(Writer(p.mnt / "db", 8 * CHUNK, pattern(2, 2 * CHUNK), direct=True))
    rd = guard.start(Reader(p.mnt / "db", 0, CHUNK))
    rs = guard.start(Reader(p.mnt / "s1", 8 * CHUNK, 2 * CHUNK))
    fs = guard.start(Call(p.mnt / "s1", fsync_file, p.mnt / "s1"))
    time.sleep(1)
    assert w.is_alive() and not w.wrote, "a write to a suspended origin must wait"
    assert rd.is_alive(), "a read of a suspended origin must wait"
    assert rs.is_alive(), "a read of a suspended origin's snapshot must wait"
    assert fs.is_alive(), "an fsync of a suspended origin's snapshot must wait"
    wait_for(lambda: vst(p, "db")["held_in_core"] >= 2 and vst(p, "s1")["held_in_core"] >= 2,
             what="held_in_core of db and s1")
    st = p.status()
    assert st["pool"]["held_in_core"] == sum(v["held_in_core"] for v in st["volumes"]), st
    # A thin volume of the pool goes on.
    write_at(p.mnt / "vm1", 0, pattern(3, CHUNK))
    resume(p, "db")
    assert joined(w).err is None and w.wrote
    assert joined(rd).err is None and rd.data == pattern(1, SIZE)[:CHUNK]
    # The snapshot read ran after the origin write or before it: old data either way.
    assert joined(rs).err is None and rs.data == pattern(1, SIZE)[8 * CHUNK:10 * CHUNK]
    assert joined(fs).err is None and fs.done
    assert read_direct(p.mnt / "db", 8 * CHUNK, 2 * CHUNK) == pattern(2, 2 * CHUNK)
    assert read_direct(p.mnt / "s1", 0, SIZE) == pattern(1, SIZE)
    st = p.status()
    assert st["pool"]["held_in_core"] == 0
    assert all(v["suspended"] is False and v["held_in_core"] == 0 for v in st["volumes"])
    assert resume(p, "db").stdout.strip() == "not suspended"
    k = [e["kind"] for e in events(p)]
    assert "suspend" in k and "resume" in k, k
    p.unmount()


def test_snapshot_suspend_holds_only_its_io(pool, guard, tmp_path):
    p = cow_pool(pool, guard, tmp_path)
    suspend(p, "s1")
    vols = {v["name"]: v for v in p.status()["volumes"]}
    assert vols["s1"]["suspended"] is True and vols["db"]["suspended"] is False, vols
    rs = guard.start(Reader(p.mnt / "s1", 0, CHUNK))
    ws = guard.start(Writer(p.mnt / "s1", CHUNK, pattern(4, CHUNK), direct=True))
    time.sleep(1)
    assert rs.is_alive() and ws.is_alive() and not ws.wrote
    # The origin is not held, and its writes still copy out for the snapshot.
    w = joined(guard.start(Writer(p.mnt / "db", 0, pattern(5, CHUNK), direct=True)), timeout=20)
    assert w.err is None
    assert rs.is_alive()
    # An unknown name: exit 1, named, nothing else suspended.
    r = suspend(p, "db", "nosuch", ok=(1,))
    assert "nosuch" in r.stderr
    assert vst(p, "db")["suspended"] is False
    # The origin suspended too: a resume of the snapshot alone keeps it held.
    suspend(p, "db")
    resume(p, "s1")
    time.sleep(0.5)
    assert rs.is_alive() and ws.is_alive(), "the origin's suspend still holds its snapshot"
    resume(p, "db")
    assert joined(rs).err is None and rs.data == pattern(1, CHUNK)
    assert joined(ws).err is None
    assert read_direct(p.mnt / "s1", 0, 2 * CHUNK) == pattern(1, CHUNK) + pattern(4, CHUNK)
    assert read_direct(p.mnt / "db", 0, 2 * CHUNK) == pattern(5, CHUNK) + \
        pattern(1, SIZE)[CHUNK:2 * CHUNK]
    assert all(v["suspended"] is False for v in p.volumes())
    p.unmount()


@pytest.mark.parametrize("noflush", [False, True])
def test_pool_suspend_holds_origins_too(pool, guard, tmp_path, noflush):
    p = cow_pool(pool, guard, tmp_path)
    suspend(p, *(("--noflush",) if noflush else ()))
    st = p.status()
    assert st["pool"]["suspended"] is True
    assert all(v["suspended"] is True for v in st["volumes"]), st["volumes"]
    wd = guard.start(Writer(p.mnt / "db", 4 * CHUNK, pattern(6, CHUNK), direct=True))
    ws = guard.start(Writer(p.mnt / "s1", 5 * CHUNK, pattern(7, CHUNK), direct=True))
    wt = guard.start(Writer(p.mnt / "vm1", 0, pattern(8, CHUNK), direct=True))
    time.sleep(1)
    assert all(t.is_alive() and not t.wrote for t in (wd, ws, wt))
    wait_for(lambda: p.status()["pool"]["held_in_core"] >= 3, what="3 requests held")
    resume(p)
    for t in (wd, ws, wt):
        assert joined(t).err is None
    assert read_direct(p.mnt / "db", 4 * CHUNK, CHUNK) == pattern(6, CHUNK)
    assert read_direct(p.mnt / "s1", 4 * CHUNK, 2 * CHUNK) == \
        pattern(1, SIZE)[4 * CHUNK:5 * CHUNK] + pattern(7, CHUNK)
    assert read_direct(p.mnt / "vm1", 0, CHUNK) == pattern(8, CHUNK)
    st = p.status()
    assert st["pool"]["held_in_core"] == 0 and st["pool"]["suspended"] is False
    assert all(v["suspended"] is False for v in st["volumes"])
    p.unmount()


def test_writes_through_repeated_origin_suspends_are_all_kept(pool, guard, tmp_path):
    """A writer to the origin and one to the snapshot, each chunk once, while
    the origin is suspended and resumed (with and without noflush): every
    acknowledged write is there afterwards, and the snapshot keeps the
    origin's old data wherever it did not write."""
    p = cow_pool(pool, guard, tmp_path)
    n = 96

    def write_chunks(name, seed, first):
        fd = os.open(p.mnt / name, os.O_WRONLY)
        try:
            for i in range(first, SIZE // CHUNK, 2):
                if (i - first) // 2 >= n:
                    break
                os.pwrite(fd, pattern(seed + i, CHUNK), i * CHUNK)
        finally:
            os.close(fd)

    a = guard.start(Call(p.mnt / "db", write_chunks, "db", 1000, 0))
    b = guard.start(Call(p.mnt / "s1", write_chunks, "s1", 5000, 1))
    for i in range(6):
        suspend(p, "db", *(("--noflush",) if i % 2 else ()))
        time.sleep(0.1)
        resume(p, "db")
    assert joined(a, timeout=60).err is None and a.done
    assert joined(b, timeout=60).err is None and b.done
    base = pattern(1, SIZE)
    got_o = read_direct(p.mnt / "db", 0, SIZE)
    got_s = read_direct(p.mnt / "s1", 0, SIZE)
    for i in range(SIZE // CHUNK):
        old = base[i * CHUNK:(i + 1) * CHUNK]
        o = got_o[i * CHUNK:(i + 1) * CHUNK]
        s = got_s[i * CHUNK:(i + 1) * CHUNK]
        mine = i % 2 == 0 and i // 2 < n
        theirs = i % 2 == 1 and i // 2 < n
        assert o == (pattern(1000 + i, CHUNK) if mine else old), f"origin chunk {i}"
        assert s == (pattern(5000 + i, CHUNK) if theirs else old), f"snapshot chunk {i}"
    p.unmount()


@pytest.mark.parametrize("how", ["timeout", "kill"])
def test_interrupted_origin_suspend_is_abandoned(pool, guard, tmp_path, how):
    """A stalled in-flight origin write keeps the suspend from draining:
    --timeout (or killing thinfs-ctl) abandons it; I/O held meanwhile runs,
    and the stalled write completes once the device answers."""
    p = cow_pool(pool, guard, tmp_path, faults=True)
    p.ctl("fault", "db:device", "write", "stall")
    w = guard.start(Writer(p.mnt / "db", 16 * CHUNK, pattern(9, CHUNK), direct=True))
    time.sleep(0.5)
    assert w.is_alive(), "the write should be stalled"
    args = [p.ctl_bin, p.mnt, "suspend", "db"]
    if how == "timeout":
        args += ["--timeout", "2"]
    sus = guard.popen(args)
    time.sleep(1)
    assert sus.poll() is None, f"suspend returned with a write in flight: {sus.communicate()}"
    # A read of the snapshot issued while the suspend waits is held.
    rs = guard.start(Reader(p.mnt / "s1", 0, CHUNK))
    time.sleep(0.5)
    assert rs.is_alive(), "a read issued during the suspend must be held"
    if how == "timeout":
        out, err = sus.communicate(timeout=60)
        assert sus.returncode == 1 and "timed out" in err, (sus.returncode, out, err)
    else:
        sus.send_signal(signal.SIGKILL)
        sus.communicate(timeout=30)
    wait_for(lambda: vst(p, "db")["suspended"] is False, what="the suspend abandoned")
    assert joined(rs, timeout=20).err is None and rs.data == pattern(1, CHUNK)
    assert w.is_alive() and w.err is None
    p.ctl("fault", "db:device", "write", "ok")
    assert joined(w).err is None
    assert read_direct(p.mnt / "db", 16 * CHUNK, CHUNK) == pattern(9, CHUNK)
    assert read_direct(p.mnt / "s1", 16 * CHUNK, CHUNK) == pattern(1, SIZE)[16 * CHUNK:17 * CHUNK]
    assert all(v["suspended"] is False and v["held_in_core"] == 0 for v in p.volumes())
    # The origin suspends normally afterwards.
    suspend(p, "db", "--timeout", "30")
    resume(p, "db")
    p.unmount()


def test_sigterm_with_held_origin_and_snapshot_io_exits_0(pool, guard, tmp_path):
    """Suspension does not survive the daemon: held requests are let go at
    shutdown, and the daemon exits cleanly; after a remount nothing is
    suspended and what was answered is there."""
    p = cow_pool(pool, guard, tmp_path)
    suspend(p, "db")
    suspend(p, "s1")
    wd = guard.start(Writer(p.mnt / "db", 0, pattern(11, CHUNK), direct=True, fsync=False))
    ws = guard.start(Writer(p.mnt / "s1", CHUNK, pattern(12, CHUNK), direct=True, fsync=False))
    wait_for(lambda: p.status()["pool"]["held_in_core"] >= 2, what="2 requests held")
    assert p.terminate() == 0
    joined(wd)
    joined(ws)
    p.mount()
    assert all(v["suspended"] is False for v in p.volumes())
    got_o = read_direct(p.mnt / "db", 0, CHUNK)
    got_s = read_direct(p.mnt / "s1", 0, 2 * CHUNK)
    assert got_o == (pattern(11, CHUNK) if wd.wrote else pattern(1, CHUNK))
    assert got_s[:CHUNK] == pattern(1, CHUNK)
    assert got_s[CHUNK:] == (pattern(12, CHUNK) if ws.wrote else pattern(1, 2 * CHUNK)[CHUNK:])
    p.unmount()
