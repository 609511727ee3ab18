# SPDX-License-Identifier: GPL-2.0-or-later
"""Classic COW snapshots (dm-snapshot): [origin] and [snapshot] sections,
thinfs-ctl snapshot --cow, the origin and cow-snapshot targets on real
mounts.  Origin and COW devices are sparse files next to the pool."""
import errno
import json
import mmap
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

import kernel_cow
from daemon_util import pattern, read_at, write_at

MiB = 1 << 20


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sections(origins=(), snapshots=()):
    """pool.cfg text for origins {name: device} and snapshots [(name, {key: value})]."""
    out = []
    for name, dev in origins:
        out += [f'[origin "{name}"]', f"device = {dev}"]
    for name, keys in snapshots:
        out.append(f'[snapshot "{name}"]')
        out += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(out) + "\n"


def cow_pool(pool, origins=(), snapshots=(), options=None, mount=True, **kw):
    """A pool whose pool.cfg has these origins and snapshots (added after mkpool)."""
    p = pool(mount=False, options=options, **kw)
    p.cfg.write_text(p.cfg.read_text() + sections(origins, snapshots))
    if mount:
        p.mount()
    return p


def vol(p, name):
    return next(v for v in p.status()["volumes"] if v["name"] == name)


def check_cfg(p):
    """thinfs check pool.cfg: the metadata and every persistent COW store."""
    r = p.thinfs_run("check", p.cfg, ok=None)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_bring_up_origin_and_snapshot(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 16 * MiB)
    write_at(origin, 0, pattern(1, 4 * MiB))
    cow = sparse(tmp_path / "cow.img", 8 * MiB)
    p = cow_pool(pool, [("db", origin)],
                 [("s1", {"origin": "db", "cow": cow, "chunk_size": "8k"})])
    assert os.path.getsize(p.mnt / "db") == 16 * MiB
    assert os.path.getsize(p.mnt / "s1") == 16 * MiB
    o, s = vol(p, "db"), vol(p, "s1")
    assert (o["kind"], o["target"], o["snapshots"]) == ("origin", "origin", ["s1"])
    assert (s["kind"], s["target"], s["origin"]) == ("cow-snapshot", "cow-snapshot", "db")
    assert s["persistent"] is True and s["valid"] is True and s["merging"] is False
    assert s["chunk_size"] == 8192
    assert s["cow"] == {"total_sectors": 16384, "allocated_sectors": 16 * 2,
                        "metadata_sectors": 2 * 16}
    assert s["dm_status"] == "32/16384 32"
    kinds = {v["name"]: v["kind"] for v in json.loads(p.ctl("list", "--json").stdout)}
    assert kinds == {"db": "origin", "s1": "cow-snapshot"}
    assert read_at(p.mnt / "s1", 0, 4 * MiB) == pattern(1, 4 * MiB)
    # An origin write: the snapshot keeps the old chunk.
    write_at(p.mnt / "db", 8192 + 100, b"N" * 4096)
    assert read_at(p.mnt / "db", 8192 + 100, 4096) == b"N" * 4096
    assert read_at(p.mnt / "s1", 0, 3 * 8192) == pattern(1, 3 * 8192)
    assert vol(p, "s1")["cow"]["allocated_sectors"] == (16 + 2 * 16)
    # copy_file_range between an origin and a thin volume: not shared, but copied.
    src = os.open(p.mnt / "s1", os.O_RDONLY)
    dst = os.open(p.mnt / "copy", os.O_CREAT | os.O_WRONLY)
    try:
        done = 0
        while done < 1 * MiB:
            n = os.copy_file_range(src, dst, 1 * MiB - done, done, done)
            assert n > 0
            done += n
    finally:
        os.close(src)
        os.close(dst)
    assert read_at(p.mnt / "copy", 0, 1 * MiB) == pattern(1, 4 * MiB)[:1 * MiB]
    p.unmount()
    assert "snapshot s1 (COW device" in check_cfg(p).stdout
    assert "clean, 1 exception(s)" in check_cfg(p).stdout


def ctl_snapshot(p, origin, name, cow, *args, ok=(0,)):
    return p.ctl("snapshot", origin, name, "--cow", str(cow), *args, ok=ok)


@pytest.mark.parametrize("persistent", [True, False])
def test_snapshot_and_origin_writes_do_not_touch_each_other(pool, tmp_path, persistent):
    origin = sparse(tmp_path / "origin.img", 8 * MiB)
    base = pattern(2, 8 * MiB)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "cow.img", 8 * MiB)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, *(() if persistent else ("--transient",)))
    assert vol(p, "s")["persistent"] is persistent
    # The snapshot's writes: partial chunks, whole chunks, across chunk edges.
    for off, n in ((100, 10), (4096, 4096), (3 * 4096 - 7, 20), (1 * MiB, 256 << 10)):
        write_at(p.mnt / "s", off, b"S" * n)
    assert read_at(p.mnt / "db", 0, 8 * MiB) == base
    assert read_at(origin, 0, 8 * MiB) == base
    snap = bytearray(base)
    for off, n in ((100, 10), (4096, 4096), (3 * 4096 - 7, 20), (1 * MiB, 256 << 10)):
        snap[off:off + n] = b"S" * n
    # The origin's writes, some to chunks the snapshot wrote, some not.
    for off, n in ((0, 4096), (5000, 3), (2 * MiB + 1, 70000), (8 * MiB - 10, 10)):
        write_at(p.mnt / "db", off, b"O" * n)
    cur = bytearray(base)
    for off, n in ((0, 4096), (5000, 3), (2 * MiB + 1, 70000), (8 * MiB - 10, 10)):
        cur[off:off + n] = b"O" * n
    assert read_at(p.mnt / "db", 0, 8 * MiB) == bytes(cur)
    assert read_at(p.mnt / "s", 0, 8 * MiB) == bytes(snap)
    p.unmount()
    assert read_at(origin, 0, 8 * MiB) == bytes(cur)
    p.mount()
    if persistent:
        assert read_at(p.mnt / "s", 0, 8 * MiB) == bytes(snap)
    else:
        # A transient snapshot is gone with the mount.
        assert not (p.mnt / "s").exists()
    p.unmount()
    check_cfg(p)


def test_sixteen_snapshots_under_parallel_verifying_io(pool, tmp_path):
    size = 4 * MiB
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(3, size)
    write_at(origin, 0, base)
    p = cow_pool(pool, [("db", origin)])
    names = [f"s{i:02d}" for i in range(16)]
    expect = {}
    cur = bytearray(base)
    # Each snapshot is taken after a few origin writes: each sees its own moment.
    for i, name in enumerate(names):
        off = random.Random(i).randrange(0, size - 8192)
        data = pattern(100 + i, 8192)
        write_at(p.mnt / "db", off, data, fsync=False)
        cur[off:off + 8192] = data
        ctl_snapshot(p, "db", name, sparse(tmp_path / f"{name}.cow", 6 * MiB),
                     "--chunk-size", ["4k", "8k", "16k", "64k"][i % 4])
        expect[name] = bytes(cur)
    assert vol(p, "db")["snapshots"] == names
    errors = []

    def origin_writer():
        rng = random.Random(7)
        for _ in range(150):
            off = rng.randrange(0, size - 5000)
            write_at(p.mnt / "db", off, rng.randbytes(5000), fsync=False)

    def snapshot_checker(name):
        try:
            rng = random.Random(name)
            for _ in range(40):
                off = rng.randrange(0, size - 20000)
                got = read_at(p.mnt / name, off, 20000)
                if got != expect[name][off:off + 20000]:
                    errors.append(f"{name} at {off}")
                    return
        except OSError as e:
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=origin_writer)]
    threads += [threading.Thread(target=snapshot_checker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name in names:
        assert read_at(p.mnt / name, 0, size) == expect[name], name
        assert vol(p, name)["valid"] is True
    p.unmount()
    check_cfg(p)


@pytest.mark.parametrize("size", ["2k", "12k", "2g", "4g", "1000", "0"])
def test_bad_chunk_sizes_are_refused_with_the_rule(pool, tmp_path, size):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    cow = sparse(tmp_path / "cow.img", 4 * MiB)
    p = cow_pool(pool, [("db", origin)])
    r = ctl_snapshot(p, "db", "s", cow, "--chunk-size", size, ok=(1,))
    assert "a power of two from 4 KiB to 1 GiB" in r.stderr
    assert not (p.mnt / "s").exists()
    p.unmount()
    text = p.cfg.read_text()
    p.cfg.write_text(text +
                     sections(snapshots=[("s", {"origin": "db", "cow": cow, "chunk_size": size})]))
    r = p.mount(ok=False)
    assert r.returncode != 0
    assert '[snapshot "s"] chunk_size' in r.stdout and "a power of two" in r.stdout
    assert read_at(cow, 0, 4 * MiB) == bytes(4 * MiB)
    p.cfg.write_text(text)
    check_cfg(p)


def test_largest_chunk_size_works(pool, tmp_path):
    # 1 GiB chunks on a 2 GiB sparse COW: header, one area, one chunk.
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    write_at(origin, 0, pattern(4, 4 * MiB))
    cow = sparse(tmp_path / "cow.img", 3 << 30)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "1g")
    assert vol(p, "s")["chunk_size"] == 1 << 30
    write_at(p.mnt / "db", 4096, b"x" * 100)
    assert read_at(p.mnt / "s", 0, 4 * MiB) == pattern(4, 4 * MiB)
    p.unmount()
    check_cfg(p)


def events_of(p, kind):
    return [e for e in map(json.loads, p.ctl("events", "--json").stdout.splitlines())
            if e["kind"] == kind]


def wait_events(p, kind, n, timeout=10):
    """The event thread logs an event moments after the change: wait (bounded) for n."""
    import time
    deadline = time.monotonic() + timeout
    while len(events_of(p, kind)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    ev = events_of(p, kind)
    assert len(ev) == n, ev
    return ev


def write_hook(dir):
    """An on_event program appending "EVENT VOLUME" to DIR/hook.log."""
    dir.mkdir(parents=True, exist_ok=True)
    log, hook = dir / "hook.log", dir / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$THINFS_EVENT $THINFS_VOLUME" >> "{log}"\n')
    hook.chmod(0o755)
    return hook, log


def wait_for_line(log, line, timeout=10):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and line in log.read_text().splitlines():
            return
        time.sleep(0.05)
    raise AssertionError(f"{line!r} not in {log}: {log.read_text() if log.exists() else ''}")


def test_overflow_invalidates_only_that_snapshot(pool, tmp_path):
    hook, log = write_hook(tmp_path / "hook")
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(5, 4 * MiB)
    write_at(origin, 0, base)
    small = sparse(tmp_path / "small.cow", 64 << 10)    # header, area, 14 chunks
    big = sparse(tmp_path / "big.cow", 8 * MiB)
    p = cow_pool(pool, [("db", origin)], options={"on_event": hook})
    p.expect_log(r"snapshot small: invalidated: the COW store is full")
    ctl_snapshot(p, "db", "small", small)
    ctl_snapshot(p, "db", "big", big)
    new = pattern(6, 1 * MiB)
    write_at(p.mnt / "db", 0, new)                 # 256 chunks: small overflows
    s = vol(p, "small")
    assert s["valid"] is False and s["dm_status"] == "Invalid"
    assert vol(p, "big")["valid"] is True
    for op in (lambda: read_at(p.mnt / "small", 0, 4096),
               lambda: write_at(p.mnt / "small", 0, b"x")):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EIO
    # The origin and the other snapshot lose nothing; the origin goes on.
    assert read_at(p.mnt / "db", 0, 1 * MiB) == new
    write_at(p.mnt / "db", 2 * MiB, b"z" * 8192)
    assert read_at(p.mnt / "big", 0, 4 * MiB) == base
    ev = wait_events(p, "snapshot_invalid", 1)
    assert "small" in ev[0]["detail"] and "full" in ev[0]["detail"]
    wait_for_line(log, "snapshot_invalid small")
    # The header says invalid: it stays listed, invalid, after a remount.
    assert kernel_cow.read_cow(small)["valid"] == 0
    p.unmount()
    p.mount()
    assert vol(p, "small")["valid"] is False
    assert events_of(p, "snapshot_invalid") == ev         # not reported again
    os.unlink(p.mnt / "small")
    assert not (p.mnt / "small").exists()
    p.unmount()
    check_cfg(p)


def test_injected_cow_write_error_invalidates(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(7, 4 * MiB)
    write_at(origin, 0, base)
    cow, other = sparse(tmp_path / "a.cow", 4 * MiB), sparse(tmp_path / "b.cow", 4 * MiB)
    p = cow_pool(pool, [("db", origin)],
                 [("a", {"origin": "db", "cow": cow}), ("b", {"origin": "db", "cow": other})],
                 mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r"snapshot a: invalidated|a.cow: marking the COW store invalid")
    p.ctl("fault", "a:cow", "write", "error")
    write_at(p.mnt / "db", 0, b"w" * 4096)
    assert vol(p, "a")["valid"] is False
    assert vol(p, "b")["valid"] is True
    with pytest.raises(OSError) as ei:
        read_at(p.mnt / "a", 0, 4096)
    assert ei.value.errno == errno.EIO
    assert read_at(p.mnt / "b", 0, 4 * MiB) == base
    assert read_at(p.mnt / "db", 0, 4096) == b"w" * 4096
    wait_events(p, "snapshot_invalid", 1)
    p.ctl("fault", "a:cow", "write", "ok")
    r = p.ctl("fault", "nope:cow", "write", "error", ok=(1,))
    assert "no device 'nope:cow'" in r.stderr
    assert kernel_cow.read_cow(cow)["valid"] == 1      # the header write failed too
    p.unmount()
    # The catalog remembers: it comes back invalid, and its header says so now.
    p.mount("--allow-faults")
    assert vol(p, "a")["valid"] is False and vol(p, "b")["valid"] is True
    assert kernel_cow.read_cow(cow)["valid"] == 0
    p.unmount()
    assert "marked invalid" in check_cfg(p).stdout


def test_low_water_cow_once_per_crossing_and_resize_cow(pool, tmp_path):
    hook, log = write_hook(tmp_path / "hook")
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    cow = sparse(tmp_path / "s.cow", 1 * MiB)           # 256 chunks of 4k
    p = cow_pool(pool, [("db", origin)],
                 options={"on_event": hook, "snapshot_low_water": "50%"})
    ctl_snapshot(p, "db", "s", cow)
    write_at(p.mnt / "db", 0, b"a" * (100 * 4096))      # about 40%: no event
    assert events_of(p, "low_water_cow") == []
    write_at(p.mnt / "db", 100 * 4096, b"b" * (40 * 4096))   # past 50%
    ev = wait_events(p, "low_water_cow", 1)
    assert "COW store of s passed 50% full" in ev[0]["detail"]
    wait_for_line(log, "low_water_cow s")
    write_at(p.mnt / "db", 140 * 4096, b"c" * (20 * 4096))   # still above: no new event
    # Grow the COW device: below the mark again, then past it once more.
    before = vol(p, "s")["cow"]["total_sectors"]
    os.truncate(cow, 4 * MiB)
    p.ctl("resize", "cow", "s")
    assert vol(p, "s")["cow"]["total_sectors"] == 4 * before
    write_at(p.mnt / "db", 200 * 4096, b"d" * (400 * 4096))
    wait_events(p, "low_water_cow", 2)
    assert vol(p, "s")["valid"] is True
    r = p.ctl("resize", "cow", "nope", ok=(1,))
    assert "no classic snapshot named 'nope'" in r.stderr
    p.unmount()
    check_cfg(p)


def test_persistent_snapshot_survives_kill9_after_fsync(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(8, 4 * MiB)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 4 * MiB)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", "16k")
    write_at(p.mnt / "db", 5000, pattern(9, 300000))           # fsync'ed
    write_at(p.mnt / "s", 1 * MiB + 3, pattern(10, 70000))     # fsync'ed
    snap = bytearray(base)
    snap[1 * MiB + 3:1 * MiB + 3 + 70000] = pattern(10, 70000)
    cur = bytearray(base)
    cur[5000:305000] = pattern(9, 300000)
    p.kill9()
    p.mount()
    assert read_at(p.mnt / "s", 0, 4 * MiB) == bytes(snap)
    assert read_at(p.mnt / "db", 0, 4 * MiB) == bytes(cur)
    assert vol(p, "s")["chunk_size"] == 16384
    p.unmount()
    check_cfg(p)


def test_a_kernel_layout_cow_store_opens_with_its_content(pool, tmp_path):
    chunk_sectors = 16
    cb = chunk_sectors * 512
    origin = sparse(tmp_path / "origin.img", 8 * MiB)
    base = pattern(11, 8 * MiB)
    write_at(origin, 0, base)
    cow = tmp_path / "kernel.cow"
    olds = random.Random(12).sample(range(8 * MiB // cb), 700)   # more than one area
    kernel_cow.write_cow(cow, 16 * MiB, chunk_sectors, [(o, None) for o in olds])
    p = cow_pool(pool, [("db", origin)],
                 [("k", {"origin": "db", "cow": cow, "chunk_size": "4k"})])
    assert vol(p, "k")["chunk_size"] == cb                      # the header wins
    want = bytearray(base)
    for o in olds:
        want[o * cb:(o + 1) * cb] = kernel_cow.chunk_pattern(o, cb)
    assert read_at(p.mnt / "k", 0, 8 * MiB) == bytes(want)
    # New exceptions go where the kernel's reader finds them.
    write_at(p.mnt / "db", 0, b"n" * (4 * cb))
    p.unmount()
    recs = dict(kernel_cow.read_cow(cow)["records"])
    fresh = [c for c in range(4) if c not in olds]
    assert len(recs) == 700 + len(fresh)
    for c in fresh:
        assert kernel_cow.read_chunk(cow, chunk_sectors, recs[c]) == base[c * cb:(c + 1) * cb]
    check_cfg(p)


def ext4_origin_and_snapshot(pool, tmp_path, seed):
    """Origin db holding ext4 with file a (pattern seed), snapshot s taken with
    the file system frozen, then a rewritten and b added; the file system
    unmounted again."""
    from conftest import run_cmd
    origin = sparse(tmp_path / "origin.img", 64 * MiB)
    run_cmd("mkfs.ext4", "-q", "-F", origin, timeout=300)
    cow = sparse(tmp_path / "s.cow", 64 * MiB)
    p = cow_pool(pool, [("db", origin)])
    dev = p.losetup(p.mnt / "db")
    m = p.mount_fs(dev, tmp_path / "fs")
    (m / "a").write_bytes(pattern(seed, 3 * MiB))
    os.sync()
    # A consistent moment: the file system frozen while the snapshot is taken.
    run_cmd("fsfreeze", "-f", m)
    try:
        ctl_snapshot(p, "db", "s", cow, "--chunk-size", "8k")
    finally:
        run_cmd("fsfreeze", "-u", m)
    (m / "a").write_bytes(pattern(seed + 1, 3 * MiB))
    (m / "b").write_bytes(pattern(seed + 2, 2 * MiB))
    os.sync()
    p.umount_fs(m)
    p.detach(dev)
    return p


def test_ext4_on_the_origin_and_its_snapshot_fsck_clean(pool, tmp_path):
    from conftest import run_cmd
    p = ext4_origin_and_snapshot(pool, tmp_path, 20)
    for name in ("s", "db"):
        r = run_cmd("e2fsck", "-fn", p.mnt / name, check=False, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    sdev = p.losetup(p.mnt / "s", "-r")
    sm = p.mount_fs(sdev, tmp_path / "sfs", "-o", "ro,noload")
    assert (sm / "a").read_bytes() == pattern(20, 3 * MiB)
    assert not (sm / "b").exists()
    p.umount_fs(sm)
    p.detach(sdev)
    assert vol(p, "s")["valid"] is True
    p.unmount()
    check_cfg(p)


def test_mkpool_leaves_origin_and_cow_devices_alone(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    write_at(origin, 0, pattern(30, 4 * MiB))
    cow = sparse(tmp_path / "s.cow", 4 * MiB)
    p = pool(mount=False, mkpool=False)
    p.cfg.write_text(p.cfg.read_text() +
                     sections([("db", origin)], [("s", {"origin": "db", "cow": cow})]))
    p.mkpool()
    assert read_at(origin, 0, 4 * MiB) == pattern(30, 4 * MiB)
    assert read_at(cow, 0, 4 * MiB) == bytes(4 * MiB)
    p.mount()
    assert kernel_cow.read_cow(cow)["magic"] == kernel_cow.MAGIC   # the mount made the store
    p.unmount()
    check_cfg(p)


def one_line(r):
    err = r.stderr.strip()
    assert r.returncode != 0 and err and "\n" not in err, r.stderr
    return err


def test_bad_run_time_requests_are_refused_and_change_nothing(pool, tmp_path):
    from conftest import run_cmd
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    write_at(origin, 0, pattern(31, 4 * MiB))
    p = cow_pool(pool, [("db", origin)])
    p.expect_log(r"\[snapshot \"s\"\] cow: .* holds|\[snapshot \"s\"\] cow: .* less than|"
                 r"is used by")
    open(p.mnt / "vm1", "wb").close()
    ext = sparse(tmp_path / "ext.img", 8 * MiB)
    run_cmd("mkfs.ext4", "-q", "-F", ext, timeout=300)
    before = read_at(ext, 0, 8 * MiB)
    err = one_line(ctl_snapshot(p, "db", "s", ext, ok=(1,)))
    assert '[snapshot "s"] cow' in err and "ext4" in err, err
    assert read_at(ext, 0, 8 * MiB) == before
    err = one_line(ctl_snapshot(p, "db", "s", sparse(tmp_path / "tiny", 8192), ok=(1,)))
    assert '[snapshot "s"] cow' in err and "less than" in err, err
    good, good2 = sparse(tmp_path / "a.cow", 4 * MiB), sparse(tmp_path / "b.cow", 4 * MiB)
    ctl_snapshot(p, "db", "s1", good)
    err = one_line(ctl_snapshot(p, "db", "s2", good, ok=(1,)))
    assert 'used by [snapshot "s1"] cow' in err, err
    err = one_line(ctl_snapshot(p, "db", "s2", origin, ok=(1,)))
    assert 'used by [origin "db"] device' in err, err
    assert "already exists" in one_line(ctl_snapshot(p, "db", "vm1", good2, ok=(1,)))
    assert "already exists" in one_line(ctl_snapshot(p, "db", "db", good2, ok=(1,)))
    assert "already exists" in one_line(ctl_snapshot(p, "db", ".snapshots", good2, ok=(1,)))
    assert "no origin named 'nope'" in one_line(ctl_snapshot(p, "nope", "s3", good2, ok=(1,)))
    assert "no origin named 'vm1'" in one_line(ctl_snapshot(p, "vm1", "s3", good2, ok=(1,)))
    assert "not a thin volume" in one_line(p.ctl("snapshot", "db", "t", ok=(1,)))
    assert "not a thin volume" in one_line(p.ctl("diff", "-", "db", ok=(1,)))
    assert "not a thin volume" in one_line(p.ctl("diff", "vm1", "s1", ok=(1,)))
    assert "usage" in one_line(p.ctl("snapshot", "db", "s3", "--cow", ok=(1,)))
    assert "usage" in one_line(p.ctl("snapshot", "db", "s3", "--cow", good2, "--x", ok=(1,)))
    assert read_at(good2, 0, 4 * MiB) == bytes(4 * MiB)
    # pool.cfg's origin: not removed, renamed or resized from the mount.
    for op, args in ((os.unlink, (p.mnt / "db",)), (os.rename, (p.mnt / "db", p.mnt / "x")),
                     (os.rename, (p.mnt / "s1", p.mnt / "x")),
                     (os.truncate, (p.mnt / "db", 4096)),
                     (os.truncate, (p.mnt / "s1", 8 * MiB))):
        with pytest.raises(OSError) as ei:
            op(*args)
        assert ei.value.errno == errno.EPERM, (op, args)
    assert "edit" in one_line(p.ctl("delete", "db", ok=(1,))) or \
        "pool.cfg" in one_line(p.ctl("delete", "db", ok=(1,)))
    names = sorted(v["name"] for v in p.status()["volumes"])
    assert names == ["db", "s1", "vm1"]
    # A snapshot made at run time goes with rm, and stays gone.
    os.unlink(p.mnt / "s1")
    assert vol(p, "db")["snapshots"] == []
    p.unmount()
    p.mount()
    assert sorted(v["name"] for v in p.status()["volumes"]) == ["db", "vm1"]
    p.unmount()
    check_cfg(p)


def test_bad_sections_refuse_the_mount_and_change_nothing(pool, tmp_path):
    from conftest import run_cmd
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    p = pool()
    open(p.mnt / "vm1", "wb").close()
    p.unmount()
    base = p.cfg.read_text()
    ext = sparse(tmp_path / "ext.img", 8 * MiB)
    run_cmd("mkfs.ext4", "-q", "-F", ext, timeout=300)
    before = read_at(ext, 0, 8 * MiB)
    tiny = sparse(tmp_path / "tiny.cow", 8192)
    cases = [
        (sections([("db", origin)], [("s", {"origin": "db", "cow": ext})]),
         '[snapshot "s"] cow', "ext4"),
        (sections([("db", origin)], [("s", {"origin": "db", "cow": tiny})]),
         '[snapshot "s"] cow', "less than"),
        (sections([("vm1", origin)]), '[origin "vm1"]', "taken by thin volume vm1"),
        (sections([("db", origin)], [("s", {"origin": "nope", "cow": tiny})]),
         '[snapshot "s"] origin', 'no [origin "nope"] section'),
        (sections([("db", origin)], [("s", {"origin": "db", "cow": origin})]),
         '[snapshot "s"] cow', 'already [origin "db"] device'),
        (sections([(".snapshots", origin)]), '[origin ".snapshots"]',
         "the snapshot groups' directory"),
    ]
    for text, where, why in cases:
        p.cfg.write_text(base + text)
        r = p.mount(ok=False)
        assert r.returncode != 0
        lines = [l for l in r.stdout.splitlines() if where in l and why in l]
        assert lines, (text, r.stdout)
    assert read_at(ext, 0, 8 * MiB) == before
    assert read_at(tiny, 0, 8192) == bytes(8192)
    p.cfg.write_text(base)
    p.mount()
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    p.unmount()


def test_reload_adds_and_removes_sections_while_suspended(pool, tmp_path):
    from conftest import run_cmd
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(50, 4 * MiB)
    write_at(origin, 0, base)
    cow, cow2 = sparse(tmp_path / "s.cow", 1 * MiB), sparse(tmp_path / "t.cow", 1 * MiB)
    ext = sparse(tmp_path / "ext.img", 8 * MiB)
    run_cmd("mkfs.ext4", "-q", "-F", ext, timeout=300)
    before = read_at(ext, 0, 8 * MiB)
    p = cow_pool(pool, [("db", origin)], [("s", {"origin": "db", "cow": cow})],
                 options={"snapshot_low_water": "90"})
    text = p.cfg.read_text()
    s_section = f'[snapshot "s"]\norigin = db\ncow = {cow}\n'
    p.ctl("suspend")
    # Refused, and nothing changes: a COW device with a file system ...
    p.cfg.write_text(text + sections(snapshots=[("t", {"origin": "db", "cow": ext})]))
    err = one_line(p.ctl("reload", p.cfg, ok=(1,)))
    assert '[snapshot "t"] cow' in err and "ext4" in err, err
    # ... a section that goes while its file is open ...
    p.cfg.write_text(text.replace(s_section, ""))
    fd = os.open(p.mnt / "s", os.O_RDONLY)
    try:
        err = one_line(p.ctl("reload", p.cfg, ok=(1,)))
        assert '[snapshot "s"] removed or changed: s is open' in err, err
    finally:
        os.close(fd)
    # ... an origin that goes while a snapshot made with thinfs-ctl is of it.
    ctl_snapshot(p, "db", "c", cow2)
    p.cfg.write_text(text.split('[origin "db"]')[0])
    err = one_line(p.ctl("reload", p.cfg, ok=(1,)))
    assert '[origin "db"] removed or changed: snapshot c made with thinfs-ctl' in err, err
    assert p.status()["pool"]["reload_staged"] is False
    assert sorted(v["name"] for v in p.status()["volumes"]) == ["c", "db", "s"]
    assert read_at(ext, 0, 8 * MiB) == before
    os.unlink(p.mnt / "c")          # a snapshot of an origin: the pool's suspend is not its
    # Accepted: s goes, t comes (with its COW device that c used), the mark changes.
    p.cfg.write_text(text.replace(s_section, "").replace("snapshot_low_water = 90",
                                                          "snapshot_low_water = 10%") +
                     sections(snapshots=[("t", {"origin": "db", "cow": cow2})]))
    msg = p.ctl("reload", p.cfg).stdout
    assert "snapshot_low_water: 90% -> 10%" in msg and '[snapshot "t"] added' in msg, msg
    assert "in effect now, not at resume" in msg, msg
    assert not (p.mnt / "s").exists()
    assert vol(p, "db")["snapshots"] == ["t"]
    p.ctl("resume")
    write_at(p.mnt / "db", 0, b"x" * (40 * 4096))       # about 17% of t's COW device
    wait_events(p, "low_water_cow", 1)
    assert read_at(p.mnt / "t", 0, 4 * MiB) == base
    p.unmount()
    p.mount()
    assert sorted(v["name"] for v in p.status()["volumes"]) == ["db", "t"]
    assert read_at(p.mnt / "t", 0, 4 * MiB) == base
    p.unmount()
    check_cfg(p)


@pytest.mark.parametrize("chunk", ["4k", "64k"])
def test_copies_across_areas_and_a_short_last_chunk(pool, tmp_path, chunk):
    size = 3 * MiB + 1000                     # the origin's last chunk is short
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(40, size)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 8 * MiB)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow, "--chunk-size", chunk)
    new = pattern(41, size)
    # One write over everything: runs of copies that step over metadata areas.
    write_at(p.mnt / "db", 0, new)
    assert read_at(p.mnt / "db", 0, size) == new
    assert read_at(p.mnt / "s", 0, size) == base
    assert read_at(p.mnt / "s", size - 1500, 1500) == base[-1500:]
    p.unmount()
    p.mount()
    assert read_at(p.mnt / "s", 0, size) == base
    p.unmount()
    check_cfg(p)


def test_check_names_the_snapshot_whose_store_is_corrupt(pool, tmp_path):
    import struct
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    cow = sparse(tmp_path / "s.cow", 4 * MiB)
    p = cow_pool(pool, [("db", origin)], [("s", {"origin": "db", "cow": cow})])
    write_at(p.mnt / "db", 0, b"x" * (3 * 4096))
    p.unmount()
    assert "snapshot s (COW device" in check_cfg(p).stdout
    # Record 2 of area 0 claims the COW chunk record 1 has.
    recs = kernel_cow.read_cow(cow)["records"]
    with open(cow, "r+b") as f:
        f.seek(4096 + 2 * 16)
        f.write(struct.pack("<QQ", 77, recs[1][1]))
    r = p.thinfs_run("check", p.cfg, ok=(1,))
    line = [l for l in r.stdout.splitlines() if l.startswith("snapshot s (COW device")]
    assert line and "clean" not in line[0], r.stdout
    r = p.mount(ok=False)
    assert '[snapshot "s"] cow' in r.stdout, r.stdout


def test_origin_writes_without_fsync_never_reach_the_snapshot_after_kill9(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    base = pattern(60, 4 * MiB)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 8 * MiB)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", cow)
    for i in range(30):
        write_at(p.mnt / "db", random.Random(i).randrange(0, 4 * MiB - 9000),
                 pattern(100 + i, 9000), fsync=False)
    p.kill9()
    p.mount()
    # Each exception was durable before the origin write it guarded.
    assert read_at(p.mnt / "s", 0, 4 * MiB) == base
    p.unmount()
    check_cfg(p)


def test_autoextend_hook_grows_a_cow_file_before_it_fills(pool, tmp_path, thinfs_ctl_bin):
    from daemon_util import wait_for
    hook = Path(__file__).resolve().parents[2] / "contrib" / "thinfs-autoextend"
    origin = sparse(tmp_path / "origin.img", 4 * MiB)
    cow = sparse(tmp_path / "s.cow", 1 * MiB)
    p = cow_pool(pool, [("db", origin)], [("s", {"origin": "db", "cow": cow})],
                 options={"on_event": str(hook), "snapshot_low_water": "50"}, mount=False)
    p.mount(env={"THINFS_CTL": str(thinfs_ctl_bin), "THINFS_AUTOEXTEND_COW_STEP": "1M",
                 "THINFS_AUTOEXTEND_COW_MAX": "2M"})
    write_at(p.mnt / "db", 0, b"a" * (150 * 4096))          # past 50% of 1 MiB
    assert wait_for(lambda: vol(p, "s")["cow"]["total_sectors"] == 4096), "the hook's resize"
    assert os.path.getsize(cow) == 2 * MiB
    write_at(p.mnt / "db", 150 * 4096, b"b" * (300 * 4096))  # past 50% of 2 MiB: capped
    wait_events(p, "low_water_cow", 2)
    assert vol(p, "s")["valid"] is True
    assert os.path.getsize(cow) == 2 * MiB
    p.unmount()
    check_cfg(p)


def test_concurrent_origin_and_snapshot_writes_to_shared_chunks(pool, tmp_path):
    """Origin writers and snapshot writers hit the same chunks at once, each
    on its own bytes: the origin ends as the base plus the origin's writes,
    each snapshot as the base plus its own."""
    size = 2 * MiB
    origin = sparse(tmp_path / "origin.img", size)
    base = pattern(70, size)
    write_at(origin, 0, base)
    p = cow_pool(pool, [("db", origin)])
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        ctl_snapshot(p, "db", name, sparse(tmp_path / f"{name}.cow", 4 * MiB),
                     "--chunk-size", ["4k", "16k", "64k"][i])
    # Slots of 512 bytes, dealt out round robin: neighbours belong to different writers.
    writers = ["db"] + names
    want = {w: bytearray(base) for w in writers}
    jobs = {w: [] for w in writers}
    for slot in range(size // 512):
        w = writers[slot % len(writers)]
        if random.Random(slot).random() < 0.5:
            data = pattern(1000 + slot, 512)
            jobs[w].append((slot * 512, data))
            want[w][slot * 512:slot * 512 + 512] = data
    errors = []

    def run(w):
        fd = os.open(p.mnt / w, os.O_WRONLY)
        try:
            for off, data in random.Random(w).sample(jobs[w], len(jobs[w])):
                os.pwrite(fd, data, off)
        except OSError as e:
            errors.append(f"{w}: {e}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for w in writers:
        assert read_at(p.mnt / w, 0, size) == bytes(want[w]), w
    p.unmount()
    p.mount()
    for w in writers:
        assert read_at(p.mnt / w, 0, size) == bytes(want[w]), w
    p.unmount()
    check_cfg(p)


def test_fixed_size_files_refuse_growth_and_holes(pool, tmp_path):
    from daemon_util import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
    FALLOC_FL_ZERO_RANGE = 0x10
    origin = sparse(tmp_path / "origin.img", 1 * MiB)
    write_at(origin, 0, pattern(80, 1 * MiB))
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "s", sparse(tmp_path / "s.cow", 1 * MiB))
    for name in ("db", "s"):
        fd = os.open(p.mnt / name, os.O_RDWR)
        try:
            for mode, off, n, err in ((0, 1 * MiB - 10, 20, errno.ENOSPC),
                                      (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096,
                                       errno.EOPNOTSUPP)):
                with pytest.raises(OSError) as ei:
                    fallocate(fd, mode, off, n)
                assert ei.value.errno == err, (name, mode)
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x", 1 * MiB)
            assert ei.value.errno == errno.ENOSPC
            fallocate(fd, 0, 0, 4096)                      # inside: nothing to do
            # Past the end: clipped with KEEP_SIZE, refused without (the file cannot grow).
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 1 * MiB - 4096, 8192)
            with pytest.raises(OSError) as ei:
                fallocate(fd, FALLOC_FL_ZERO_RANGE, 1 * MiB - 4096, 8192)
            assert ei.value.errno == errno.ENOSPC
            # Writable opens of a fixed-size file bypass the page cache: no shared mapping.
            with pytest.raises(OSError) as ei:
                mmap.mmap(fd, 4096, mmap.MAP_SHARED)
            assert ei.value.errno == errno.ENODEV
        finally:
            os.close(fd)
        assert os.path.getsize(p.mnt / name) == 1 * MiB
        assert read_at(p.mnt / name, 1 * MiB - 4096, 4096) == bytes(4096)
    assert read_at(p.mnt / "s", 0, 1 * MiB - 4096) == pattern(80, 1 * MiB)[:-4096]
    p.unmount()
    check_cfg(p)


def test_block_devices_as_origin_and_cow(pool, tmp_path):
    origin_file = sparse(tmp_path / "origin.img", 8 * MiB)
    base = pattern(90, 8 * MiB)
    write_at(origin_file, 0, base)
    p = pool(mount=False)
    origin = p.losetup(origin_file)
    cow = p.losetup(sparse(tmp_path / "s.cow", 8 * MiB))
    p.cfg.write_text(p.cfg.read_text() +
                     sections([("db", origin)], [("s", {"origin": "db", "cow": cow})]))
    p.mount()
    assert vol(p, "db")["device"] == origin and vol(p, "s")["device"] == cow
    write_at(p.mnt / "db", 12345, pattern(91, 300000))
    write_at(p.mnt / "s", 777, b"s" * 5000)
    want = bytearray(base)
    want[777:5777] = b"s" * 5000
    assert read_at(p.mnt / "s", 0, 8 * MiB) == bytes(want)
    p.unmount()
    check_cfg(p)
    p.mount()
    assert read_at(p.mnt / "s", 0, 8 * MiB) == bytes(want)
    p.unmount()


def test_fault_delay_on_a_cow_and_an_origin_device(pool, tmp_path):
    import time
    origin = sparse(tmp_path / "origin.img", 1 * MiB)
    base = pattern(95, 1 * MiB)
    write_at(origin, 0, base)
    cow = sparse(tmp_path / "s.cow", 1 * MiB)
    p = cow_pool(pool, [("db", origin)], [("s", {"origin": "db", "cow": cow})], mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.ctl("fault", "s:cow", "write", "delay", "300000")
    t = time.monotonic()
    write_at(p.mnt / "db", 0, b"x" * 4096)          # a copy to s's COW device first
    assert time.monotonic() - t >= 0.3             # a lower bound: the delay was waited
    p.ctl("fault", "s:cow", "write", "delay", "0")
    p.ctl("fault", "db:device", "read", "delay", "1000")
    assert read_at(p.mnt / "s", 0, 1 * MiB) == base
    p.ctl("fault", "db:device", "read", "ok")
    for args in (("delay",), ("delay", "soon"), ("delay", "1", "after", "2"),
                 ("delay", "3600000001")):
        assert "delay USEC" in one_line(p.ctl("fault", "s:cow", "write", *args, ok=(1,)))
    assert vol(p, "s")["valid"] is True
    p.unmount()
    check_cfg(p)


def test_read_only_mount_leaves_origins_and_snapshots_out(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 1 * MiB)
    cow = sparse(tmp_path / "s.cow", 1 * MiB)
    p = cow_pool(pool, [("db", origin)], [("s", {"origin": "db", "cow": cow})])
    open(p.mnt / "vm1", "wb").close()
    p.unmount()
    before = read_at(cow, 0, 1 * MiB)
    p.mount("-o", "ro")
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1"]
    p.unmount()
    assert read_at(cow, 0, 1 * MiB) == before
    p.mount()
    assert sorted(v["name"] for v in p.status()["volumes"]) == ["db", "s", "vm1"]
    p.unmount()
    check_cfg(p)


def test_a_run_time_snapshot_whose_origin_is_missing_comes_back_later(pool, tmp_path):
    origin = sparse(tmp_path / "origin.img", 1 * MiB)
    base = pattern(96, 1 * MiB)
    write_at(origin, 0, base)
    p = cow_pool(pool, [("db", origin)])
    ctl_snapshot(p, "db", "c", sparse(tmp_path / "c.cow", 1 * MiB))
    write_at(p.mnt / "db", 0, b"n" * 8192)
    write_at(p.mnt / "c", 8192, b"c" * 100)
    os.chmod(p.mnt / "c", 0o640)
    p.unmount()
    text = p.cfg.read_text()
    p.cfg.write_text(text.split('[origin "db"]')[0])
    p.mount()
    assert sorted(v["name"] for v in p.status()["volumes"]) == []
    p.unmount()
    assert "snapshot c (COW device" in check_cfg(p).stdout
    p.cfg.write_text(text)
    p.mount()
    want = bytearray(base)
    want[8192:8292] = b"c" * 100
    assert read_at(p.mnt / "c", 0, 1 * MiB) == bytes(want)
    assert vol(p, "db")["snapshots"] == ["c"]
    # Its name is kept meanwhile: a new snapshot may not take it.
    p.unmount()
    p.cfg.write_text(text + sections([("o2", sparse(tmp_path / "o2.img", 1 * MiB))]))
    p.mount()
    assert "already exists" in one_line(
        ctl_snapshot(p, "o2", "c", sparse(tmp_path / "x.cow", 1 * MiB), ok=(1,)))
    p.unmount()
    check_cfg(p)
