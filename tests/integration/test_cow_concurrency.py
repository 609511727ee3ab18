# SPDX-License-Identifier: GPL-2.0-or-later
"""Classic snapshots under concurrent origin writers: COW breaks that share
one group commit (the group's leader flushes every member's copies, writes
the areas, flushes), copies to several snapshots side by side, and
overwrites of copied chunks, which take no range lock, meeting a merge.
Every write is O_DIRECT, so each is one request the daemon answers, and
each thread owns its bytes, so the expected content is exact."""
import functools
import os
import random
import threading
import time

from daemon_util import aligned, pattern, read_at
from test_cow_merge import faulty_pool, merged
from test_cow_snapshots import MiB, check_cfg, ctl_snapshot, sparse, vol

SLOT = 4096


def pwrite_direct(fd, off, data):
    buf = aligned(len(data))
    buf[:] = data
    assert os.pwritev(fd, [buf], off) == len(data)


def run_threads(fns):
    errors = []

    def wrap(fn):
        try:
            fn()
        except Exception as e:      # noqa: B902 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_kill9_during_concurrent_cow_breaks_keeps_acked_writes_and_snapshots(pool, tmp_path):
    """Eight writers break chunks of two snapshots (64 KiB and 4 KiB chunks)
    while the first snapshot's flushes are slowed, so groups of commits are
    in flight when the daemon is killed: every acknowledged origin write is
    there after the next mount, a write in flight is either there or not,
    and both snapshots still read as the origin was."""
    size = 8 * MiB
    p, origin = faulty_pool(pool, tmp_path, origin_size=size)
    base = pattern(1, size)
    ctl_snapshot(p, "db", "a", sparse(tmp_path / "a.cow", 12 * MiB), "--chunk-size", "64k")
    ctl_snapshot(p, "db", "b", sparse(tmp_path / "b.cow", 12 * MiB), "--chunk-size", "4k")
    p.ctl("fault", "a:cow", "flush", "delay", "20000")
    nthreads, chunks = 8, size // (64 * 1024)
    acked, in_flight = {}, {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(k):
        fd = os.open(p.mnt / "db", os.O_WRONLY | os.O_DIRECT)
        rng = random.Random(k)
        try:
            # Chunk k, k + 8, ...: each write the first to its 64 KiB chunk.
            for c in range(k, chunks, nthreads):
                if stop.is_set():
                    return
                off = c * 64 * 1024 + rng.randrange(16) * SLOT
                data = pattern(10000 + c, SLOT)
                with lock:
                    in_flight[off] = data
                try:
                    pwrite_direct(fd, off, data)
                except OSError:
                    return          # the daemon is gone: this one may or may not be there
                with lock:
                    acked[off] = in_flight.pop(off)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 24 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    p.kill9()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 24
    p.mount("--allow-faults")
    got = read_at(p.mnt / "db", 0, size)
    want = bytearray(base)
    for off, data in acked.items():
        want[off:off + SLOT] = data
    for off, data in in_flight.items():
        if got[off:off + SLOT] == data:
            want[off:off + SLOT] = data
    assert got == bytes(want)
    for name in ("a", "b"):
        assert read_at(p.mnt / name, 0, size) == base, name
        assert vol(p, name)["valid"] is True
    p.unmount()
    check_cfg(p)


def test_concurrent_cow_breaks_and_overwrites_with_four_snapshots(pool, tmp_path):
    """Writers own interleaved 4 KiB slots, so neighbours in one chunk belong
    to different threads: every chunk is broken by several writers at once
    for four snapshots of different chunk sizes (copied side by side), then
    overwritten (nothing to copy) while readers check the snapshots."""
    size = 4 * MiB
    p, origin = faulty_pool(pool, tmp_path, origin_size=size)
    base = pattern(1, size)
    names = ["s4k", "s16k", "s64k", "t64k"]
    for name, chunk in zip(names, ["4k", "16k", "64k", "64k"]):
        extra = ("--transient",) if name.startswith("t") else ()
        ctl_snapshot(p, "db", name, sparse(tmp_path / f"{name}.cow", 6 * MiB),
                     "--chunk-size", chunk, *extra)
    nthreads, slots = 6, size // SLOT
    model = bytearray(base)

    def writer(k, rnd):
        def run():
            fd = os.open(p.mnt / "db", os.O_WRONLY | os.O_DIRECT)
            try:
                mine = list(range(k, slots, nthreads))
                random.Random(k * 10 + rnd).shuffle(mine)
                for s in mine:
                    data = pattern(rnd * 100000 + s, SLOT)
                    pwrite_direct(fd, s * SLOT, data)
                    model[s * SLOT:(s + 1) * SLOT] = data
            finally:
                os.close(fd)
        return run

    def checker(name):
        def run():
            rng = random.Random(name)
            for _ in range(30):
                off = rng.randrange(0, size - 65536)
                assert read_at(p.mnt / name, off, 65536) == base[off:off + 65536], name
        return run

    for rnd in (1, 2):      # 1: every chunk a COW break; 2: every chunk copied already
        errors = run_threads([writer(k, rnd) for k in range(nthreads)] +
                             [checker(n) for n in names])
        assert errors == []
        assert read_at(p.mnt / "db", 0, size) == bytes(model)
    for name in names:
        assert read_at(p.mnt / name, 0, size) == base, name
        assert vol(p, name)["valid"] is True
    p.unmount()
    p.mount("--allow-faults")
    assert read_at(p.mnt / "db", 0, size) == bytes(model)
    for name in names[:3]:
        assert read_at(p.mnt / name, 0, size) == base, name
    p.unmount()
    check_cfg(p)


def test_a_write_to_a_chunk_being_copied_waits_for_the_copy(pool, tmp_path):
    """A chunk whose exception is allocated but whose copy is still being
    made (the origin's reads slowed) is not "copied" yet: a second write to
    another part of it must wait for the copy, not go straight to the
    device, or the snapshot would get the new bytes."""
    size = 1 * MiB
    p, origin = faulty_pool(pool, tmp_path, origin_size=size)
    base = pattern(1, size)
    ctl_snapshot(p, "db", "s", sparse(tmp_path / "s.cow", 2 * MiB), "--chunk-size", "64k")
    p.ctl("fault", "db:device", "read", "delay", "200000")
    model = bytearray(base)

    def write(off):
        def run():
            fd = os.open(p.mnt / "db", os.O_WRONLY | os.O_DIRECT)
            try:
                data = pattern(off, SLOT)
                pwrite_direct(fd, off, data)
                model[off:off + SLOT] = data
            finally:
                os.close(fd)
        return run

    chunks = range(0, size, 128 * 1024)
    first = [threading.Thread(target=write(c)) for c in chunks]
    for t in first:
        t.start()
    time.sleep(0.05)        # the first writes are copying their chunks by now, as a rule
    errors = run_threads([write(c + SLOT) for c in chunks])
    for t in first:
        t.join()
    assert errors == []
    p.ctl("fault", "db:device", "read", "ok")
    assert read_at(p.mnt / "s", 0, size) == base
    assert read_at(p.mnt / "db", 0, size) == bytes(model)
    p.unmount()
    check_cfg(p)


def test_overwrites_of_copied_chunks_meet_a_merge(pool, tmp_path):
    """Every chunk is copied to both snapshots, so origin writes take no
    range lock; a merge of s starts while they run.  A write issued after
    the merge command returned is never undone by the merge; a write that
    ended before it began is (the origin rolls back to s); t keeps exactly
    its content."""
    size = 4 * MiB
    p, origin = faulty_pool(pool, tmp_path, origin_size=size)
    base = pattern(1, size)
    ctl_snapshot(p, "db", "s", sparse(tmp_path / "s.cow", 6 * MiB), "--chunk-size", "4k")
    fd = os.open(p.mnt / "db", os.O_WRONLY | os.O_DIRECT)
    try:
        first = pattern(2, size)
        for off in range(0, size, MiB):
            pwrite_direct(fd, off, first[off:off + MiB])
        ctl_snapshot(p, "db", "t", sparse(tmp_path / "t.cow", 6 * MiB), "--chunk-size", "64k")
        second = pattern(3, size)
        for off in range(0, size, MiB):
            pwrite_direct(fd, off, second[off:off + MiB])
    finally:
        os.close(fd)
    # A slow COW device: the merge runs for a while beside the writers.
    p.ctl("fault", "s:cow", "read", "delay", "100000")
    nthreads, slots = 4, size // SLOT
    writes = {}                     # slot -> [(start, end, data)], in order
    merge_times = {}
    merge_started = threading.Event()

    def writer(k):
        fd = os.open(p.mnt / "db", os.O_WRONLY | os.O_DIRECT)
        rng = random.Random(k)
        mine = list(range(k, slots, nthreads))
        after = 0
        try:
            for i in range(100000):
                s = rng.choice(mine)
                data = pattern(1000000 + k * 100000 + i, SLOT)
                t0 = time.monotonic()
                pwrite_direct(fd, s * SLOT, data)
                writes.setdefault(s, []).append((t0, time.monotonic(), data))
                if i == 20:
                    merge_started.set()
                if "end" in merge_times:
                    after += 1
                    if after == 40:
                        return
        finally:
            os.close(fd)

    def merger():
        merge_started.wait(60)
        merge_times["start"] = time.monotonic()
        p.ctl("merge", "s")
        merge_times["end"] = time.monotonic()

    errors = run_threads([functools.partial(writer, k) for k in range(nthreads)] + [merger])
    assert errors == []
    merged(p, "s")
    every = [w for ws in writes.values() for w in ws]
    # Lockless overwrites before the merge, and writes through it after.
    assert any(end < merge_times["start"] for _, end, _ in every)
    assert any(start > merge_times["end"] for start, _, _ in every)

    def check(got):
        for s in range(slots):
            have = got[s * SLOT:(s + 1) * SLOT]
            ws = writes.get(s, [])
            if ws and ws[-1][0] > merge_times["end"]:
                assert have == ws[-1][2], f"slot {s}: a write after the merge began was lost"
                continue
            allowed = [base[s * SLOT:(s + 1) * SLOT]]
            allowed += [d for (_, end, d) in ws if end >= merge_times["start"]]
            assert have in allowed, f"slot {s}"

    check(read_at(p.mnt / "db", 0, size))
    assert read_at(p.mnt / "t", 0, size) == first
    p.unmount()
    p.mount("--allow-faults")
    check(read_at(p.mnt / "db", 0, size))
    assert read_at(p.mnt / "t", 0, size) == first
    p.unmount()
    check_cfg(p)
