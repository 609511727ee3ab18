# SPDX-License-Identifier: GPL-2.0-or-later
"""Suspend, resume and reload (issue 5): `thinfs-ctl MNT suspend [NAME...]
[--noflush] [--timeout S]`, `resume [NAME...]`, `reload POOL.CFG`.

Held I/O is observed from threads (or fio subprocesses) whose calls block
in the kernel while the daemon holds their FUSE requests; every wait is
bounded, and the `guard` fixture resumes the pool, clears stall faults and
releases writers held for space (by growing the data device) before the
pool fixture's teardown, which unmounts and requires thin_check clean.
Small pools (8 MiB of data, 128 blocks of 64 KiB) keep the out-of-space
cases fast."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import assert_thin_check_clean, ctl_socket_path, is_mounted, run_cmd
from daemon_util import BS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MiB, aligned, bounded, \
    create, fallocate, pattern, read_at, read_direct, write_at

DATA = 8 * MiB               # 128 blocks of 64 KiB
NBLK = DATA // BS


# ---- helpers ---------------------------------------------------------------------------

def wait_for(pred, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Writer(threading.Thread):
    """One pwrite (O_DIRECT with direct=True: exactly one FUSE request) then
    fsync.  .err: errno it failed with (or None); .wrote: the pwrite returned."""

    def __init__(self, path, off, data, direct=False, fsync=True):
        super().__init__(daemon=True)
        self.path, self.off, self.data = path, off, data
        self.direct, self.fsync = direct, fsync
        self.err, self.wrote = None, False

    def run(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | (os.O_DIRECT if self.direct else 0))
        except OSError as e:
            self.err = e.errno
            return
        try:
            if self.direct:
                buf = aligned(len(self.data))
                buf[:] = self.data
                n = os.pwritev(fd, [buf], self.off)
            else:
                n = os.pwrite(fd, self.data, self.off)
            assert n == len(self.data), n
            self.wrote = True
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            self.err = e.errno
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


class Reader(threading.Thread):
    """One O_DIRECT read; .data or .err."""

    def __init__(self, path, off, n):
        super().__init__(daemon=True)
        self.path, self.off, self.n = path, off, n
        self.data, self.err = None, None

    def run(self):
        try:
            self.data = read_direct(self.path, self.off, self.n)
        except OSError as e:
            self.err = e.errno


class Call(threading.Thread):
    """fn(*args) in a thread; .err: the errno it failed with, .done."""

    def __init__(self, path, fn, *args):
        super().__init__(daemon=True)
        self.path, self.fn, self.args = path, fn, args
        self.err, self.done = None, False

    def run(self):
        try:
            self.fn(*self.args)
            self.done = True
        except OSError as e:
            self.err = e.errno


def fsync_file(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def punch(path, off, n):
    fd = os.open(path, os.O_WRONLY)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
    finally:
        os.close(fd)


def joined(t, timeout=30):
    t.join(timeout)
    assert not t.is_alive(), f"{t.__class__.__name__} on {t.path} still blocked after {timeout}s"
    return t


class Guard:
    """Started threads and processes of one test, released at its end
    whatever happened, before the pool fixture's teardown."""

    def __init__(self):
        self.pools, self.threads, self.procs = [], [], []

    def start(self, t):
        self.threads.append(t)
        t.start()
        return t

    def popen(self, args, **kw):
        pr = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, **kw)
        self.procs.append(pr)
        return pr

    def release(self):
        for pr in self.procs:
            if pr.poll() is None:
                pr.kill()
                try:
                    pr.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        live = [p for p in self.pools if p.alive()]
        for p in live:
            p.ctl("resume", ok=None, timeout=30)
            if getattr(p, "faults", False):
                for op in ("read", "write"):
                    p.ctl("fault", "data", op, "ok", ok=None, timeout=30)
        deadline = time.monotonic() + 3
        while any(t.is_alive() for t in self.threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        if any(t.is_alive() for t in self.threads):
            # Writers held for data space: give them room.
            for p in live:
                p.ctl("resize", "data", "+64M", ok=None, timeout=30)
        for t in self.threads:
            t.join(30)


@pytest.fixture
def guard():
    g = Guard()
    yield g
    g.release()


def cfg_options(p, **changes):
    """Rewrite p's pool.cfg: the options it was made with, changed by changes
    (None removes a key); the [fault] section kept."""
    opts = dict(p.sus_opts)
    for k, v in changes.items():
        if v is None:
            opts.pop(k, None)
        else:
            opts[k] = str(v)
    p.write_cfg(opts)
    if p.faults:
        p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    return p.cfg.read_text()


def make_pool(pool, g, *, data_size=DATA, meta_size=16 * MiB, faults=False, **options):
    # Without the writeback cache each buffered write is one request the
    # pool holds or fails, which is what these tests watch; with it (the
    # default) a held writeback is stashed: test_writeback_cache.py.
    opts = {"low_water_mark": "0", "writeback_cache": "off"}
    opts.update({k: str(v) for k, v in options.items()})
    p = pool(data_size=data_size, meta_size=meta_size, options=opts, mount=False)
    p.sus_opts, p.faults, p.guard = opts, faults, g
    g.pools.append(p)
    if faults:
        p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
        p.mount("--allow-faults")
    else:
        p.mount()
    return p


def full_pool(pool, g, free=0, faults=False, **options):
    """Queue mode (error_if_no_space false, no_space_timeout 0, unless
    options say otherwise); vm1 (32 MiB) and vm2 and vm3 (8 MiB); every data
    block but `free` mapped: vm1 blocks [0, 120 - free), vm2 blocks [0, 8)."""
    opts = {"error_if_no_space": "false", "no_space_timeout": "0"}
    opts.update(options)
    p = make_pool(pool, g, faults=faults, **opts)
    create(p.mnt / "vm1", 4 * DATA)
    create(p.mnt / "vm2", DATA)
    create(p.mnt / "vm3", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, (NBLK - 8 - free) * BS))
    write_at(p.mnt / "vm2", 0, pattern(9, 8 * BS))
    assert pst(p)["data"]["used_blocks"] == NBLK - free
    return p


def pst(p):
    return p.status()["pool"]


def vst(p, name):
    return p.volume(name)


def suspend(p, *args, ok=(0,), timeout=60):
    return p.ctl("suspend", *args, ok=ok, timeout=timeout)


def resume(p, *args, ok=(0,), timeout=60):
    return p.ctl("resume", *args, ok=ok, timeout=timeout)


def events(p):
    """events --json: a JSON list, or one object per line."""
    out = p.ctl("events", "--json").stdout.strip()
    if not out:
        return []
    try:
        data = json.loads(out)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def kinds(p):
    return [e["kind"] for e in events(p)]


def held_writers(p, specs):
    """Start a Writer per (volume, offset, seed) writing 2 blocks; wait until
    the pool holds them all for data space."""
    ws = [Writer(p.mnt / name, off, pattern(seed, 2 * BS)) for name, off, seed in specs]
    for w in ws:
        p.guard.start(w)
    wait_for(lambda: pst(p)["held_writes"] >= len(ws), what=f"{len(ws)} held writes")
    return ws


def fio_args(vol, *args):
    return ["fio", "--output-format=terse", "--verify_state_save=0", f"--filename={vol}",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", *args]


def need_fio():
    if not shutil.which("fio"):
        pytest.fail("fio not installed (scripts/install-deps.sh)")


# ---- suspend and resume without pressure -----------------------------------------------

def test_idle_pool_suspend_resume_status_text_and_events(pool, guard):
    p = make_pool(pool, guard)
    vol = p.mnt / "vm1"
    create(vol, DATA)
    write_at(vol, 0, pattern(1, 4 * BS))
    st = pst(p)
    assert st["suspended"] is False and st["reload_staged"] is False and \
        st["held_in_core"] == 0, st
    v = vst(p, "vm1")
    assert v["suspended"] is False and v["held_in_core"] == 0, v
    assert "active" in p.ctl("status").stdout
    mode0 = st["mode"]

    suspend(p)
    st = pst(p)
    assert st["suspended"] is True and st["held_in_core"] == 0 and st["mode"] == mode0, st
    assert vst(p, "vm1")["suspended"] is True
    assert "suspended" in p.ctl("status").stdout
    # Already suspended: exit 0, still suspended.
    suspend(p)
    assert pst(p)["suspended"] is True
    # Attributes keep working.
    assert bounded(os.stat, vol).st_size == DATA
    assert set(bounded(os.listdir, p.mnt)) - {".snapshots"} == {"vm1"}
    p.ctl("list", timeout=10)

    resume(p)
    st = pst(p)
    assert st["suspended"] is False and st["held_in_core"] == 0 and st["mode"] == mode0, st
    assert vst(p, "vm1")["suspended"] is False
    assert "active" in p.ctl("status").stdout
    # I/O as before.
    write_at(vol, 8 * BS, pattern(2, 2 * BS))
    assert read_at(vol, 0, 4 * BS) == pattern(1, 4 * BS)
    assert read_direct(vol, 8 * BS, 2 * BS) == pattern(2, 2 * BS)
    k = kinds(p)
    assert "suspend" in k and "resume" in k, k
    assert k.index("suspend") < len(k) - 1 - k[::-1].index("resume"), k
    p.unmount()


def test_suspend_resume_with_open_idle_volumes_and_a_loop_device(pool, guard):
    p = make_pool(pool, guard, data_size=64 * MiB)
    for name in ("vm1", "vm2"):
        create(p.mnt / name, 4 * MiB)
    write_at(p.mnt / "vm2", 0, pattern(3, BS))
    dev = p.losetup(p.mnt / "vm2")
    time.sleep(0.5)                   # let anyone probing the new loop device finish
    fd1 = os.open(p.mnt / "vm1", os.O_RDWR)
    fd2 = os.open(p.mnt / "vm2", os.O_RDONLY)
    try:
        for _ in range(3):
            suspend(p)
            assert pst(p)["suspended"] is True
            resume(p)
            assert pst(p)["suspended"] is False
        # The handles opened before work after.
        assert os.pwrite(fd1, pattern(4, BS), 0) == BS
        os.fsync(fd1)
        assert os.pread(fd2, BS, 0) == pattern(3, BS)
    finally:
        os.close(fd1)
        os.close(fd2)
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(4, BS)
    assert read_direct(dev, 0, BS) == pattern(3, BS)
    p.detach(dev)
    p.unmount()


def test_io_to_a_suspended_pool_waits_and_completes_after_resume(pool, guard):
    """A write (vm1), an O_DIRECT read and an fsync (vm2) and a discard (vm3):
    each on its own file, as the kernel serialises writes, fsync and
    fallocate of one file on its inode lock."""
    p = make_pool(pool, guard)
    for name in ("vm1", "vm2", "vm3"):
        create(p.mnt / name, DATA)
    write_at(p.mnt / "vm2", 0, pattern(1, 2 * BS))
    write_at(p.mnt / "vm2", 4 * BS, pattern(5, BS), fsync=False)
    write_at(p.mnt / "vm3", 0, pattern(6, 2 * BS))
    used0 = pst(p)["data"]["used_blocks"]
    suspend(p)
    w = guard.start(Writer(p.mnt / "vm1", 4 * BS, pattern(2, BS)))
    r = guard.start(Reader(p.mnt / "vm2", BS, BS))
    f = guard.start(Call(p.mnt / "vm2", fsync_file, p.mnt / "vm2"))
    d = guard.start(Call(p.mnt / "vm3", punch, p.mnt / "vm3", 0, BS))
    time.sleep(1)
    assert w.is_alive() and not w.wrote, "a write to a suspended pool must wait"
    assert r.is_alive(), "a read from a suspended pool must wait"
    assert f.is_alive(), "an fsync on a suspended pool must wait"
    assert d.is_alive(), "a discard on a suspended pool must wait"
    wait_for(lambda: pst(p)["held_in_core"] >= 4, what="held_in_core >= 4")
    assert vst(p, "vm1")["held_in_core"] >= 1 and vst(p, "vm2")["held_in_core"] >= 2 and \
        vst(p, "vm3")["held_in_core"] >= 1
    st = p.status()
    assert st["pool"]["held_in_core"] == sum(v["held_in_core"] for v in st["volumes"]), st
    assert pst(p)["data"]["used_blocks"] == used0
    assert pst(p)["held_writes"] == 0
    # Attributes while I/O is held.
    assert bounded(os.stat, p.mnt / "vm1").st_size == DATA
    resume(p)
    assert joined(w).err is None
    assert joined(r).err is None and r.data == pattern(1, 2 * BS)[BS:]
    assert joined(f).err is None and f.done
    assert joined(d).err is None and d.done
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == bytes(BS) + pattern(6, 2 * BS)[BS:]
    assert vst(p, "vm3")["mapped_blocks"] == 1
    assert read_direct(p.mnt / "vm1", 4 * BS, BS) == pattern(2, BS)
    st = pst(p)
    assert st["held_in_core"] == 0 and st["suspended"] is False, st
    p.unmount()


def test_suspending_one_volume_holds_only_its_io(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    create(p.mnt / "vm2", DATA)
    write_at(p.mnt / "vm2", 0, pattern(1, 2 * BS))
    suspend(p, "vm1")
    suspend(p, "vm1")                 # already suspended: exit 0
    st = p.status()
    assert st["pool"]["suspended"] is False, st
    vols = {v["name"]: v for v in st["volumes"]}
    assert vols["vm1"]["suspended"] is True and vols["vm2"]["suspended"] is False, vols
    w1 = guard.start(Writer(p.mnt / "vm1", 0, pattern(2, BS)))
    # vm2 goes on.
    w2 = joined(guard.start(Writer(p.mnt / "vm2", 4 * BS, pattern(3, BS))), timeout=20)
    assert w2.err is None
    assert bounded(read_direct, p.mnt / "vm2", 0, 2 * BS) == pattern(1, 2 * BS)
    time.sleep(0.5)
    assert w1.is_alive() and not w1.wrote, "the write to suspended vm1 must wait"
    wait_for(lambda: vst(p, "vm1")["held_in_core"] >= 1, what="vm1 held_in_core")
    assert vst(p, "vm2")["held_in_core"] == 0
    assert pst(p)["held_in_core"] >= 1
    # An unknown name: exit 1, named, nothing suspended (vm2 stays active).
    r = suspend(p, "vm2", "nosuch", ok=(1,))
    assert "nosuch" in r.stderr, r.stderr
    assert vst(p, "vm2")["suspended"] is False
    joined(guard.start(Writer(p.mnt / "vm2", 5 * BS, pattern(4, BS))), timeout=20)
    resume(p, "vm1")
    assert joined(w1).err is None
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(2, BS)
    assert vst(p, "vm1")["suspended"] is False
    # resume without a name resumes every volume.
    suspend(p, "vm1")
    suspend(p, "vm2")
    assert vst(p, "vm1")["suspended"] is True and vst(p, "vm2")["suspended"] is True
    assert pst(p)["suspended"] is False
    resume(p)
    assert vst(p, "vm1")["suspended"] is False and vst(p, "vm2")["suspended"] is False
    joined(guard.start(Writer(p.mnt / "vm1", BS, pattern(5, BS))), timeout=20)
    assert read_direct(p.mnt / "vm2", 4 * BS, 2 * BS) == pattern(3, BS) + pattern(4, BS)
    p.unmount()


def test_a_snapshot_group_member_is_suspended_by_group_and_name(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    os.mkdir(p.mnt / ".snapshots" / "S")
    member = p.mnt / ".snapshots" / "S" / "vm1"
    suspend(p, "S/vm1")
    r = guard.start(Reader(member, 0, BS))
    # The origin is another device: its I/O goes on.
    assert bounded(read_direct, p.mnt / "vm1", 0, BS) == pattern(1, BS)
    time.sleep(0.5)
    assert r.is_alive(), "a read of the suspended member must wait"
    resume(p, ".snapshots/S/vm1")
    assert joined(r).data == pattern(1, BS)
    assert "nosuch" in suspend(p, "S/nosuch", ok=(1,)).stderr
    p.unmount()


def test_resume_of_a_volume_while_the_pool_is_suspended_keeps_it_held(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    create(p.mnt / "vm2", DATA)
    suspend(p, "vm1")
    suspend(p)
    w1 = guard.start(Writer(p.mnt / "vm1", 0, pattern(1, BS)))
    w2 = guard.start(Writer(p.mnt / "vm2", 0, pattern(2, BS)))
    time.sleep(1)
    assert w1.is_alive() and w2.is_alive()
    resume(p, "vm1")
    assert vst(p, "vm1")["suspended"] is True, "vm1 is held while the pool is suspended"
    time.sleep(1)
    assert w1.is_alive() and not w1.wrote, "vm1's write must wait for the pool's resume"
    assert w2.is_alive() and not w2.wrote
    resume(p)
    assert joined(w1).err is None and joined(w2).err is None
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(1, BS)
    assert read_direct(p.mnt / "vm2", 0, BS) == pattern(2, BS)
    st = p.status()
    assert st["pool"]["suspended"] is False and st["pool"]["held_in_core"] == 0
    assert all(v["suspended"] is False for v in st["volumes"]), st["volumes"]
    p.unmount()


def test_suspend_resume_cycles_while_fio_writers_verify(pool, guard):
    need_fio()
    p = make_pool(pool, guard, data_size=256 * MiB)
    for name in ("vm1", "vm2"):
        create(p.mnt / name, 32 * MiB)
    stop = threading.Event()
    runs = {"vm1": [], "vm2": []}

    def loop(name, extra):
        while not stop.is_set():
            r = run_cmd(*fio_args(p.mnt / name, "--name=cyc", "--rw=randwrite",
                                  "--size=8M", "--ioengine=psync", *extra),
                        check=False, timeout=300, cwd=p.dir)
            runs[name].append(r)
            if r.returncode != 0:
                return
    ts = [guard.start(threading.Thread(target=loop, args=("vm1", ["--bsrange=4k-128k"]),
                                       daemon=True)),
          guard.start(threading.Thread(target=loop, args=("vm2", ["--bs=64k", "--direct=1"]),
                                       daemon=True))]
    try:
        time.sleep(1)
        for _ in range(5):
            suspend(p)
            assert pst(p)["suspended"] is True
            time.sleep(0.3)
            resume(p)
            time.sleep(0.4)
    finally:
        stop.set()
    for t in ts:
        t.join(240)
        assert not t.is_alive(), "fio still running 240 s after the last resume"
    for name, rs in runs.items():
        assert rs, f"no fio run on {name}"
        bad = [r for r in rs if r.returncode != 0]
        assert not bad, f"fio on {name} failed:\n{bad[0].stdout}\n{bad[0].stderr}"
    st = pst(p)
    assert st["suspended"] is False and st["held_in_core"] == 0 and st["mode"] == "write", st
    p.unmount()


def test_a_suspended_pool_is_committed_and_quiescent(pool, guard):
    """What suspend is for: copying the backing devices.  Writes not yet
    fsynced (commit_interval 1 h) are committed by the suspend; while
    suspended nothing touches the metadata or data device, and the metadata
    checks clean as it is."""
    p = make_pool(pool, guard, commit_interval="1h")
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    write_at(p.mnt / "vm1", 4 * BS, pattern(2, 3 * BS), fsync=False)
    suspend(p)
    assert_thin_check_clean(p.meta)
    dump = run_cmd("thin_dump", p.meta).stdout
    assert 'mapped_blocks="4"' in dump, dump
    io0 = pst(p)["io"]
    m0, d0 = os.stat(p.meta).st_mtime_ns, os.stat(p.data).st_mtime_ns
    # A shrinking truncate unmaps blocks: held like a discard.
    t = guard.start(Call(p.mnt / "vm1", os.truncate, p.mnt / "vm1", 5 * BS))
    time.sleep(2.5)
    assert t.is_alive(), "a shrinking truncate of a suspended pool must wait"
    assert pst(p)["io"] == io0
    assert (os.stat(p.meta).st_mtime_ns, os.stat(p.data).st_mtime_ns) == (m0, d0)
    assert vst(p, "vm1")["mapped_blocks"] == 4
    resume(p)
    assert joined(t).err is None
    assert read_direct(p.mnt / "vm1", 4 * BS, BS) == pattern(2, 3 * BS)[:BS]
    assert os.stat(p.mnt / "vm1").st_size == 5 * BS
    assert vst(p, "vm1")["mapped_blocks"] == 2
    p.unmount()


def test_power_cut_after_a_suspend_keeps_what_it_committed(pool, guard):
    p = make_pool(pool, guard, faults=True, commit_interval="1h")
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    write_at(p.mnt / "vm1", 2 * BS, pattern(2, 2 * BS), fsync=False)   # acknowledged only
    suspend(p)
    p.ctl("fault", "power-cut", ok=None, timeout=30)
    p.crashed()
    p.mount("--allow-faults")
    assert pst(p)["suspended"] is False
    assert read_direct(p.mnt / "vm1", 0, 4 * BS) == pattern(1, BS) + bytes(BS) + \
        pattern(2, 2 * BS)
    assert vst(p, "vm1")["mapped_blocks"] == 3
    p.unmount()


def test_ext4_on_a_loop_device_through_suspend_resume_cycles(pool, guard):
    """The common use: a file system on a loop device over a volume, busy
    while the pool is suspended and resumed; it must come out clean."""
    if not (shutil.which("mkfs.ext4") and shutil.which("e2fsck")):
        pytest.fail("mkfs.ext4/e2fsck not installed")
    p = make_pool(pool, guard, data_size=256 * MiB)
    create(p.mnt / "vm1", 64 * MiB)
    dev = p.losetup(p.mnt / "vm1", "--direct-io=on")
    run_cmd("mkfs.ext4", "-q", "-F", dev)
    where = p.mount_fs(dev, p.dir / "fs")
    stop = threading.Event()
    errs, written = [], []

    def writer():
        i = 0
        try:
            while not stop.is_set() and i < 400:
                path = where / f"f{i}"
                with open(path, "wb") as f:
                    f.write(pattern(i, 64 * 1024))
                    f.flush()
                    os.fsync(f.fileno())
                written.append(i)
                i += 1
        except OSError as e:
            errs.append(e)
    t = guard.start(threading.Thread(target=writer, daemon=True))
    try:
        for _ in range(3):
            time.sleep(0.3)
            suspend(p)
            n = len(written)
            time.sleep(0.5)
            assert len(written) <= n + 1, "fsyncs completed while the pool was suspended"
            resume(p)
    finally:
        stop.set()
    t.join(60)
    assert not t.is_alive() and not errs, errs
    assert len(written) > 3
    for i in written[::7]:
        assert (where / f"f{i}").read_bytes() == pattern(i, 64 * 1024)
    p.umount_fs(where)
    r = run_cmd("e2fsck", "-fn", dev, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    p.detach(dev)
    p.unmount()


# ---- out of data space: held writes and suspend ----------------------------------------

def test_suspend_fails_writes_held_for_space_with_eio(pool, guard):
    p = full_pool(pool, guard)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    st = pst(p)
    assert st["mode"] == "out_of_data_space", st
    time.sleep(0.5)
    assert all(w.is_alive() for w in ws), "writes must be held, not failed"
    mapped = {n: vst(p, n)["mapped_blocks"] for n in ("vm1", "vm3")}
    suspend(p)
    for w in ws:
        assert joined(w).err == errno.EIO, w.err
    st = pst(p)
    assert st["suspended"] is True and st["held_writes"] == 0 and st["held_in_core"] == 0, st
    assert st["mode"] == "out_of_data_space", st
    resume(p)
    st = pst(p)
    assert st["mode"] == "out_of_data_space" and st["suspended"] is False, st
    assert st["data"]["used_blocks"] == NBLK, st
    assert {n: vst(p, n)["mapped_blocks"] for n in ("vm1", "vm3")} == mapped
    assert read_direct(p.mnt / "vm1", DATA, 2 * BS) == bytes(2 * BS)
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == bytes(2 * BS)
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(1, BS)
    p.ctl("resize", "data", "+4M")
    write_at(p.mnt / "vm3", 0, pattern(12, BS))
    assert read_direct(p.mnt / "vm3", 0, BS) == pattern(12, BS)
    p.unmount()


def test_noflush_keeps_held_writes_pending_and_resume_holds_them_again(pool, guard):
    p = full_pool(pool, guard)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    suspend(p, "--noflush")
    st = pst(p)
    assert st["suspended"] is True and st["held_writes"] == 0, st
    assert st["held_in_core"] >= 2, st
    assert vst(p, "vm1")["held_in_core"] >= 1 and vst(p, "vm3")["held_in_core"] >= 1
    time.sleep(1)
    assert all(w.is_alive() and w.err is None for w in ws), "noflush must not fail them"
    # Resumed without room: held by the pool again, not failed.
    resume(p)
    wait_for(lambda: pst(p)["held_writes"] >= 2, what="the writes held again")
    st = pst(p)
    assert st["held_in_core"] == 0 and st["mode"] == "out_of_data_space", st
    assert all(w.is_alive() for w in ws)
    p.ctl("resize", "data", "+4M")
    for w in ws:
        assert joined(w).err is None, w.err
    assert read_direct(p.mnt / "vm1", DATA, 2 * BS) == pattern(10, 2 * BS)
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == pattern(11, 2 * BS)
    assert pst(p)["mode"] == "write"
    p.unmount()


def test_a_volume_suspend_acts_on_that_volumes_held_writes_only(pool, guard):
    p = full_pool(pool, guard)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    suspend(p, "vm1", "--noflush")
    wait_for(lambda: vst(p, "vm1")["held_in_core"] >= 1, what="vm1's write pushed back")
    st = pst(p)
    assert st["held_writes"] == 1 and st["suspended"] is False, st
    assert vst(p, "vm3")["held_in_core"] == 0
    time.sleep(0.5)
    assert all(w.is_alive() for w in ws)
    resume(p, "vm1")
    wait_for(lambda: pst(p)["held_writes"] == 2, what="vm1's write held for space again")
    assert vst(p, "vm1")["held_in_core"] == 0
    # Without --noflush, vm1's write fails; vm3's keeps waiting.
    suspend(p, "vm1")
    assert joined(ws[0]).err == errno.EIO
    time.sleep(0.5)
    assert ws[1].is_alive()
    assert pst(p)["held_writes"] == 1
    resume(p, "vm1")
    p.ctl("resize", "data", "+4M")
    assert joined(ws[1]).err is None
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == pattern(11, 2 * BS)
    assert read_direct(p.mnt / "vm1", DATA, 2 * BS) == bytes(2 * BS)
    p.unmount()


def test_noflush_grow_reload_resume_completes_held_writes_and_fio_verifies(pool, guard):
    need_fio()
    p = make_pool(pool, guard, error_if_no_space="false", no_space_timeout="0")
    create(p.mnt / "vm1", 2 * DATA)
    create(p.mnt / "vm2", DATA)
    create(p.mnt / "vm3", DATA)
    write_at(p.mnt / "vm2", 0, pattern(1, (NBLK - 32) * BS))     # 32 blocks free
    fio = guard.popen(fio_args(p.mnt / "vm1", "--name=grow", "--rw=randwrite", "--bs=64k",
                               "--direct=1", "--ioengine=psync", "--size=4M"), cwd=p.dir)
    wait_for(lambda: pst(p)["held_writes"] >= 1 or fio.poll() is not None, timeout=60,
             what="fio's write held for space")
    assert fio.poll() is None, f"fio ended with the pool full:\n{fio.communicate()}"
    w = guard.start(Writer(p.mnt / "vm3", 0, pattern(2, 2 * BS)))
    wait_for(lambda: pst(p)["held_writes"] >= 2, what="two held writes")
    suspend(p, "--noflush")
    st = pst(p)
    assert st["held_writes"] == 0 and st["held_in_core"] >= 2, st
    os.truncate(p.data, 2 * DATA)
    p.ctl("reload", p.cfg)
    st = pst(p)
    assert st["reload_staged"] is True and st["suspended"] is True, st
    assert st["data"]["total_blocks"] == NBLK, "a staged reload is taken at resume only"
    time.sleep(0.5)
    assert fio.poll() is None and w.is_alive()
    resume(p)
    try:
        out, err = fio.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("fio still running 180 s after the resume")
    assert fio.returncode == 0, f"fio exited {fio.returncode}:\n{out}\n{err}"
    assert joined(w).err is None
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == pattern(2, 2 * BS)
    st = pst(p)
    assert st["data"]["total_blocks"] == 2 * NBLK and st["mode"] == "write", st
    assert st["reload_staged"] is False and st["suspended"] is False, st
    assert st["held_writes"] == 0 and st["held_in_core"] == 0, st
    assert "reload" in kinds(p)
    p.remount()
    assert pst(p)["data"]["total_blocks"] == 2 * NBLK
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == pattern(2, 2 * BS)
    p.unmount()


def test_fio_verify_through_repeated_noflush_grow_reload_resume(pool, guard):
    """Two fio jobs write 12 MiB with crc32c verification into an 8 MiB
    pool; every half second the pool is suspended --noflush, its data file
    grown by 1 MiB, reloaded and resumed, so writes keep running out of
    space, being pushed back and re-issued.  fio must see no error and read
    back what it wrote."""
    need_fio()
    p = make_pool(pool, guard, error_if_no_space="false", no_space_timeout="0")
    for name in ("vm1", "vm2"):
        create(p.mnt / name, 16 * MiB)
    fios = [guard.popen(fio_args(p.mnt / "vm1", "--name=b", "--rw=randwrite",
                                 "--bsrange=4k-128k", "--ioengine=psync", "--size=6M"),
                        cwd=p.dir),
            guard.popen(fio_args(p.mnt / "vm2", "--name=d", "--rw=randwrite", "--bs=64k",
                                 "--direct=1", "--ioengine=psync", "--size=6M"), cwd=p.dir)]
    size, pushed_back = DATA, 0
    for _ in range(60):
        if all(f.poll() is not None for f in fios):
            break
        time.sleep(0.5)
        suspend(p, "--noflush")
        pushed_back = max(pushed_back, pst(p)["held_in_core"])
        size += MiB
        os.truncate(p.data, size)
        p.ctl("reload", p.cfg)
        resume(p)
    else:
        size += 16 * MiB
        p.ctl("resize", "data", str(size))
    for f in fios:
        try:
            out, err = f.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            raise AssertionError("fio still running 180 s after the pool had room")
        assert f.returncode == 0, f"fio exited {f.returncode}:\n{out}\n{err}"
    assert pushed_back > 0, "no suspend found a write held for space: the test tested nothing"
    st = pst(p)
    assert st["data"]["total_blocks"] == size // BS and st["held_in_core"] == 0, st
    assert st["held_writes"] == 0 and st["suspended"] is False, st
    p.unmount()


@pytest.mark.parametrize("how", ["timeout", "kill"])
def test_interrupted_noflush_suspend_is_abandoned(pool, guard, how):
    """A stalled in-flight read keeps the suspend from draining: --timeout
    (or killing thinfs-ctl) abandons it; the pushed-back writes go back to
    waiting for space, the writes held meanwhile run, nothing is left."""
    p = full_pool(pool, guard, faults=True)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    p.ctl("fault", "data", "read", "stall")
    r = guard.start(Reader(p.mnt / "vm2", 0, BS))        # mapped and fsynced: reaches the data device
    time.sleep(0.5)
    assert r.is_alive(), "the read should be stalled"
    args = [p.ctl_bin, p.mnt, "suspend", "--noflush"]
    if how == "timeout":
        args += ["--timeout", "3"]
    sus = guard.popen(args)
    time.sleep(1)
    assert sus.poll() is None, f"suspend returned with a read in flight: {sus.communicate()}"
    # New I/O while the suspend waits is held.
    wn = guard.start(Writer(p.mnt / "vm2", BS, pattern(12, BS)))
    time.sleep(0.5)
    assert wn.is_alive() and not wn.wrote, "a write issued during the suspend must be held"
    if how == "timeout":
        out, err = sus.communicate(timeout=60)
        assert sus.returncode == 1 and "timed out" in err, (sus.returncode, out, err)
    else:
        sus.send_signal(signal.SIGKILL)
        sus.communicate(timeout=30)
    wait_for(lambda: pst(p)["suspended"] is False, what="the suspend abandoned")
    # Everything active again: the write held meanwhile ran...
    assert joined(wn, timeout=20).err is None
    # ... the pushed-back writes wait for space again (not failed) ...
    wait_for(lambda: pst(p)["held_writes"] >= 2, what="the pushed-back writes held again")
    assert all(w.is_alive() and w.err is None for w in ws)
    st = pst(p)
    assert st["held_in_core"] == 0 and st["mode"] == "out_of_data_space", st
    assert all(v["suspended"] is False and v["held_in_core"] == 0 for v in p.volumes())
    # ... and the stalled read completes once the device answers.
    p.ctl("fault", "data", "read", "ok")
    assert joined(r).err is None and r.data == pattern(9, 8 * BS)[:BS]
    p.ctl("resize", "data", "+4M")
    for w in ws:
        assert joined(w).err is None, w.err
    assert read_direct(p.mnt / "vm1", DATA, 2 * BS) == pattern(10, 2 * BS)
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == pattern(11, 2 * BS)
    assert read_direct(p.mnt / "vm2", 0, 2 * BS) == pattern(9, 8 * BS)[:BS] + pattern(12, BS)
    st = pst(p)
    assert st["held_writes"] == 0 and st["held_in_core"] == 0 and st["suspended"] is False, st
    # The pool suspends normally afterwards.
    suspend(p, "--timeout", "30")
    resume(p)
    p.unmount()


@pytest.mark.parametrize("free", [0, 1])
@pytest.mark.parametrize("noflush", [False, True], ids=["flush", "noflush"])
def test_two_block_write_short_of_space_fails_or_completes_whole(pool, guard, free, noflush):
    """One O_DIRECT write of two pool blocks.  free=0: its first block is
    mapped (an overwrite in place), the second needs a new block; free=1:
    both need one, and one is free.  Failed by a suspend, neither block
    changes; kept by --noflush and given room, it completes whole."""
    p = full_pool(pool, guard, free=free)
    vol = p.mnt / "vm1"
    off = (NBLK - 8 - 1) * BS if free == 0 else 200 * BS
    before = read_direct(vol, off, 2 * BS)
    if free == 0:
        assert before[:BS] == pattern(1, (NBLK - 8) * BS)[-BS:]
    mapped0, used0 = vst(p, "vm1")["mapped_blocks"], pst(p)["data"]["used_blocks"]
    new = pattern(50, 2 * BS)
    w = guard.start(Writer(vol, off, new, direct=True))
    wait_for(lambda: pst(p)["held_writes"] >= 1, what="the write held for space")
    time.sleep(0.3)
    assert w.is_alive()
    if not noflush:
        suspend(p)
        assert joined(w).err == errno.EIO, w.err
        resume(p)
        assert read_direct(vol, off, 2 * BS) == before, "a failed write changed a block"
        assert vst(p, "vm1")["mapped_blocks"] == mapped0
        assert pst(p)["data"]["used_blocks"] == used0
        p.remount()
        assert read_direct(vol, off, 2 * BS) == before
        assert vst(p, "vm1")["mapped_blocks"] == mapped0
        assert pst(p)["data"]["used_blocks"] == used0
    else:
        suspend(p, "--noflush")
        st = pst(p)
        assert st["held_writes"] == 0 and st["held_in_core"] >= 1, st
        time.sleep(0.5)
        assert w.is_alive()
        os.truncate(p.data, DATA + 4 * MiB)
        p.ctl("reload", p.cfg)
        resume(p)
        assert joined(w).err is None
        assert read_direct(vol, off, 2 * BS) == new
        assert vst(p, "vm1")["mapped_blocks"] == mapped0 + (1 if free == 0 else 2)
        st = pst(p)
        assert st["data"]["used_blocks"] == used0 + (1 if free == 0 else 2), st
        assert st["data"]["total_blocks"] == NBLK + 64, st
    p.unmount()


def test_two_block_write_breaking_sharing_short_of_space_fails_whole(pool, guard):
    """Both blocks shared with a snapshot group: breaking sharing needs two
    new blocks and one is free.  Failed by a suspend, neither the origin nor
    the snapshot changes, and the free block is still free."""
    p = full_pool(pool, guard, free=1)
    os.mkdir(p.mnt / ".snapshots" / "S")
    vol, snap = p.mnt / "vm1", p.mnt / ".snapshots" / "S" / "vm1"
    off = 100 * BS
    before = read_direct(vol, off, 2 * BS)
    assert before == pattern(1, (NBLK - 9) * BS)[off:off + 2 * BS]
    w = guard.start(Writer(vol, off, pattern(50, 2 * BS), direct=True))
    wait_for(lambda: pst(p)["held_writes"] >= 1, what="the write held for space")
    suspend(p)
    assert joined(w).err == errno.EIO, w.err
    resume(p)
    assert read_direct(vol, off, 2 * BS) == before
    assert read_direct(snap, off, 2 * BS) == before
    assert pst(p)["data"]["used_blocks"] == NBLK - 1
    assert vst(p, "vm1")["exclusive_blocks"] == 0
    p.unmount()


def test_two_block_write_stalled_midway_survives_a_timed_out_suspend(pool, guard):
    """vm1's blocks 0 and 1 sit on data blocks 0 and 2, so a two-block
    overwrite is two data writes; the second stalls.  suspend --timeout 1
    cannot drain it and is abandoned; once the device answers the write
    completes whole."""
    p = make_pool(pool, guard, faults=True)
    vol = p.mnt / "vm1"
    create(vol, DATA)
    create(p.mnt / "vm2", DATA)
    write_at(vol, 0, pattern(1, BS))
    write_at(p.mnt / "vm2", 0, pattern(2, BS))
    write_at(vol, BS, pattern(3, BS))
    p.ctl("fault", "data", "write", "stall", "after", "1")
    new = pattern(4, 2 * BS)
    w = guard.start(Writer(vol, 0, new, direct=True))
    time.sleep(1)
    assert w.is_alive() and not w.wrote, "the write should be stalled"
    r = suspend(p, "--timeout", "1", ok=(1,))
    assert "timed out" in r.stderr, r.stderr
    st = pst(p)
    assert st["suspended"] is False, st
    assert w.is_alive()
    p.ctl("fault", "data", "write", "ok")
    assert joined(w).err is None
    assert read_direct(vol, 0, 2 * BS) == new
    assert read_direct(p.mnt / "vm2", 0, BS) == pattern(2, BS)
    assert vst(p, "vm1")["mapped_blocks"] == 2
    assert pst(p)["data"]["used_blocks"] == 3
    suspend(p, "--timeout", "30")
    resume(p)
    p.unmount()


# ---- modes -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["write", "out_of_data_space", "read_only", "fail"])
def test_pool_mode_is_unchanged_across_suspend_resume(pool, guard, mode):
    if mode == "out_of_data_space":
        p = full_pool(pool, guard, error_if_no_space="true")
        with pytest.raises(OSError) as ei:
            write_at(p.mnt / "vm1", DATA, pattern(3, BS))
        assert ei.value.errno == errno.ENOSPC
        vol = p.mnt / "vm1"
        committed = pattern(1, 4 * BS)
    else:
        p = make_pool(pool, guard, faults=mode != "write")
        vol = p.mnt / "vm1"
        create(vol, DATA)
        committed = pattern(1, 4 * BS)
        write_at(vol, 0, committed)
        if mode != "write":
            p.expect_log(r".")          # the injected metadata failure is logged
            p.ctl("fault", "metadata", "write", "error", *(["once"] if mode == "read_only"
                                                           else []))
            with pytest.raises(OSError):
                write_at(vol, 10 * BS, pattern(2, BS))
    st = pst(p)
    assert st["mode"] == mode, st
    suspend(p)
    st = pst(p)
    assert st["mode"] == mode and st["suspended"] is True, st
    resume(p)
    st = pst(p)
    assert st["mode"] == mode and st["suspended"] is False, st
    if mode != "fail":
        assert read_direct(vol, 0, 4 * BS) == committed
    if mode in ("read_only", "fail"):
        p.ctl("fault", "metadata", "write", "ok")
        p.unmount()
        p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))
    else:
        p.unmount()


# ---- reload ----------------------------------------------------------------------------

def test_reload_refusals_and_the_identical_reload(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    orig = p.cfg.read_text()
    r = p.ctl("reload", p.cfg, ok=(1,))
    assert "not suspended" in r.stderr, r.stderr
    suspend(p)
    r = p.ctl("reload", p.cfg)
    assert "no change" in r.stdout.lower(), r.stdout
    assert pst(p)["reload_staged"] is False
    for name in ("other-meta.img", "other-data.img"):
        with open(p.dir / name, "wb") as f:
            f.truncate(DATA if "data" in name else 16 * MiB)
    refusals = [
        ("metadata", {"metadata": p.dir / "other-meta.img"}),
        ("data", {"data": p.dir / "other-data.img"}),
        ("block_size", {"block_size": "128k"}),
        ("catalog", {"catalog": p.dir / "other-catalog.db"}),
        ("metadata_cache", {"metadata_cache": "32M"}),
        ("max_threads", {"max_threads": "64"}),
    ]
    try:
        for key, change in refusals:
            # Each also carries a change that alone would be staged.
            lines = [l for l in orig.splitlines()
                     if l.split("=")[0].strip() not in change]
            lines += [f"{k} = {v}" for k, v in change.items()]
            lines = [l for l in lines if not l.startswith("error_if_no_space")]
            lines.append("error_if_no_space = true")
            p.cfg.write_text("\n".join(lines) + "\n")
            r = p.ctl("reload", p.cfg, ok=(1,))
            assert key in r.stderr, (key, r.stderr)
            assert pst(p)["reload_staged"] is False, key
        p.cfg.write_text(orig + "[fault]\nallow = yes\n")
        r = p.ctl("reload", p.cfg, ok=(1,))
        assert "fault" in r.stderr, r.stderr
        assert pst(p)["reload_staged"] is False
    finally:
        p.cfg.write_text(orig)
    resume(p)
    st = pst(p)
    assert st["error_if_no_space"] is False and st["data"]["block_size"] == BS, st
    assert st["reload_staged"] is False and st["suspended"] is False, st
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(1, BS)
    p.remount()
    p.unmount()


def test_reload_of_an_unparsable_file_is_refused_naming_file_and_line(pool, guard):
    """Refused like the other bad reloads: answered to the client, and (as
    refused control commands such as resize) no "error:" line in the daemon's
    log, which the fixture checks."""
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    orig = p.cfg.read_text()
    suspend(p)
    bad = orig + "error_if_no_space = true\nthis line is not ini\n"
    p.cfg.write_text(bad)
    try:
        r = p.ctl("reload", p.cfg, ok=(1,))
    finally:
        p.cfg.write_text(orig)
    lineno = len(bad.splitlines())
    assert f"pool.cfg:{lineno}" in r.stderr, r.stderr
    assert pst(p)["reload_staged"] is False
    resume(p)
    assert pst(p)["error_if_no_space"] is False
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    p.unmount()


def test_reload_config_errors_are_printed_one_per_line(pool, guard):
    p = make_pool(pool, guard)
    orig = p.cfg.read_text()
    suspend(p)
    bad = p.dir / "bad.cfg"
    bad.write_text(orig + "block_size = 128k\nno_space_timeout = soon\n")
    n = len(orig.splitlines())
    r = p.ctl("reload", bad, ok=(1,))
    assert r.stderr.splitlines() == [
        f"thinfs-ctl: reload: {bad} is not loadable (the running configuration stays):",
        f"thinfs-ctl: {bad}:{n + 1}: block_size: given twice (first on line 5)",
        f"thinfs-ctl: {bad}:{n + 2}: no_space_timeout: 'soon' is not a time "
        "(seconds, or a number with ms, s, m, h: 500ms, 60s, 2m)"], r.stderr
    # A relative name that is not there is named as the user meant it, not from the daemon's /.
    r = run_cmd(p.ctl_bin, p.mnt, "reload", "nosuch.cfg", check=False, cwd=p.dir)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"thinfs-ctl: reload: {p.dir}/nosuch.cfg is not loadable (the running configuration "
        "stays):", f"thinfs-ctl: {p.dir}/nosuch.cfg: No such file or directory"], r.stderr
    assert pst(p)["reload_staged"] is False
    resume(p)
    p.unmount()


def test_resume_and_suspend_of_an_unknown_volume_name_it(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    r = resume(p, "vm1", "nosuch", ok=(1,))
    assert r.stderr == "thinfs-ctl: resume: no volume named 'nosuch' (nothing was resumed)\n"
    r = suspend(p, "vm1", "nosuch", ok=(1,))
    assert r.stderr == \
        "thinfs-ctl: suspend: no volume named 'nosuch' (nothing was suspended)\n"
    assert vst(p, "vm1")["suspended"] is False
    p.unmount()


def test_reloaded_options_and_grown_metadata_take_effect_at_resume(pool, guard):
    p = make_pool(pool, guard, meta_size=8 * MiB)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 4 * BS))
    st = pst(p)
    assert st["discard_passdown"] is True and st["data"]["low_water_blocks"] == 0, st
    assert st["metadata"]["total_blocks"] == 8 * MiB // 4096, st
    suspend(p)
    os.truncate(p.meta, 16 * MiB)
    cfg_options(p, low_water_mark="25%", discard_passdown="false", commit_interval="2s",
                no_space_timeout="5s", on_event=shutil.which("true"))
    r = p.ctl("reload", p.cfg)
    assert "no change" not in r.stdout.lower(), r.stdout
    st = pst(p)
    assert st["reload_staged"] is True, st
    assert st["discard_passdown"] is True and st["data"]["low_water_blocks"] == 0, st
    assert st["metadata"]["total_blocks"] == 8 * MiB // 4096, st
    resume(p)
    st = pst(p)
    assert st["reload_staged"] is False, st
    assert st["discard_passdown"] is False, st
    assert st["data"]["low_water_blocks"] == NBLK // 4, st
    assert st["metadata"]["total_blocks"] == 16 * MiB // 4096, st
    assert "reload" in kinds(p)
    write_at(p.mnt / "vm1", 8 * BS, pattern(2, BS))
    assert read_direct(p.mnt / "vm1", 8 * BS, BS) == pattern(2, BS)
    p.remount()
    st = pst(p)
    assert st["metadata"]["total_blocks"] == 16 * MiB // 4096 and \
        st["discard_passdown"] is False, st
    p.unmount()


def test_reload_of_a_metadata_device_past_the_format_limit_uses_only_the_limit(pool, guard):
    max_blocks = 4161600                  # the format's limit (about 15.9 GiB)
    p = make_pool(pool, guard, meta_size=8 * MiB)
    suspend(p)
    os.truncate(p.meta, 1 << 40)          # grown from outside, far past the limit
    r = p.ctl("reload", p.cfg)
    assert f"metadata device: {8 * MiB // 4096} -> {max_blocks} blocks (the format uses at " \
        "most that many metadata blocks" in r.stdout, r.stdout
    resume(p)
    assert pst(p)["metadata"]["total_blocks"] == max_blocks
    p.unmount()


def test_reload_of_error_if_no_space_fails_held_writes_with_enospc(pool, guard):
    p = full_pool(pool, guard)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    suspend(p, "--noflush")
    assert all(w.is_alive() for w in ws)
    cfg_options(p, error_if_no_space="true")
    p.ctl("reload", p.cfg)
    assert pst(p)["reload_staged"] is True
    resume(p)
    for w in ws:
        assert joined(w).err == errno.ENOSPC, w.err
    st = pst(p)
    assert st["error_if_no_space"] is True and st["held_writes"] == 0, st
    assert st["mode"] == "out_of_data_space" and st["held_in_core"] == 0, st
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm3", 4 * BS, pattern(12, BS))
    assert ei.value.errno == errno.ENOSPC
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == bytes(2 * BS)
    p.unmount()


def test_reload_of_no_space_timeout_fails_held_writes_after_resume(pool, guard):
    p = full_pool(pool, guard)               # no_space_timeout 0: hold for ever
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    suspend(p, "--noflush")
    cfg_options(p, no_space_timeout="2s")
    p.ctl("reload", p.cfg)
    time.sleep(0.5)
    assert all(w.is_alive() for w in ws), "a staged no_space_timeout acts only after resume"
    resume(p)
    for w in ws:
        assert joined(w, timeout=60).err == errno.ENOSPC, w.err
    st = pst(p)
    assert st["error_if_no_space"] is True and st["held_writes"] == 0, st
    p.unmount()


def test_reload_refuses_a_data_device_smaller_than_the_pool(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    suspend(p)
    os.truncate(p.data, DATA // 2)
    try:
        r = p.ctl("reload", p.cfg, ok=(1,))
        assert "data" in r.stderr, r.stderr
        assert pst(p)["reload_staged"] is False
    finally:
        os.truncate(p.data, DATA)
    resume(p)
    st = pst(p)
    assert st["data"]["total_blocks"] == NBLK and st["mode"] == "write", st
    assert read_direct(p.mnt / "vm1", 0, 2 * BS) == pattern(1, 2 * BS)
    p.unmount()


def test_reloaded_on_event_and_low_water_mark_fire_at_resume(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", 2 * DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 120 * BS))        # 8 free; no mark yet
    out = p.dir / "hook.out"
    hook = p.dir / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$THINFS_EVENT" >> {out}\n')
    hook.chmod(0o755)
    time.sleep(1.5)
    assert "low_water_data" not in kinds(p)
    suspend(p)
    cfg_options(p, low_water_mark="16", on_event=hook)
    p.ctl("reload", p.cfg)
    time.sleep(1.5)
    assert "low_water_data" not in kinds(p), "staged, not yet taken"
    resume(p)
    wait_for(lambda: "low_water_data" in kinds(p), what="the low_water_data event")
    wait_for(lambda: out.exists() and "low_water_data" in out.read_text(),
             what="the reloaded on_event hook to run")
    assert pst(p)["data"]["low_water_blocks"] == 16
    p.unmount()


# ---- events, namespace, shutdown -------------------------------------------------------

def test_low_water_event_is_rearmed_by_resume(pool, guard):
    p = make_pool(pool, guard, low_water_mark="16")
    create(p.mnt / "vm1", 2 * DATA)

    def nr():
        return kinds(p).count("low_water_data")
    write_at(p.mnt / "vm1", 0, pattern(1, 120 * BS))        # 8 free: below 16
    wait_for(lambda: nr() == 1, what="the first low_water_data event")
    time.sleep(1.5)
    assert nr() == 1
    suspend(p)
    resume(p)
    wait_for(lambda: nr() == 2, what="low_water_data again after the resume")
    time.sleep(1.5)
    assert nr() == 2, "one event per resume, not one per tick"
    ev = [e for e in events(p) if e["kind"] in ("resume", "low_water_data")]
    assert [e["kind"] for e in ev][-2:] == ["resume", "low_water_data"], ev
    p.unmount()


def test_namespace_changes_fail_ebusy_while_suspended(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    os.mkdir(p.mnt / ".snapshots" / "G")
    tid = pst(p)["transaction_id"]
    suspend(p)

    def ebusy(fn, *args):
        with pytest.raises(OSError) as ei:
            bounded(fn, *args, what=f"{fn.__name__}{args}")
        assert ei.value.errno == errno.EBUSY, (fn.__name__, args, ei.value)
    ebusy(create, p.mnt / "new")
    ebusy(os.mkdir, p.mnt / ".snapshots" / "S")
    ebusy(os.rmdir, p.mnt / ".snapshots" / "G")
    answers = {args: p.ctl(*args, ok=None, timeout=20)
               for args in (("snapshot", "vm1", "clone"), ("delete", "vm1"),
                            ("resize", "data", "+1M"),
                            ("set-transaction-id", str(tid), str(tid + 1)))}
    wrong = {" ".join(a): (r.returncode, r.stderr.strip()) for a, r in answers.items()
             if r.returncode != 1 or "suspended" not in r.stderr}
    assert not wrong, f"expected exit 1 and 'suspended' in stderr: {wrong}"
    # Reads of attributes keep working, and nothing changed.
    assert set(bounded(os.listdir, p.mnt)) - {".snapshots"} == {"vm1"}
    assert bounded(os.listdir, p.mnt / ".snapshots") == ["G"]
    assert bounded(os.stat, p.mnt / "vm1").st_size == DATA
    st = p.status()
    assert [v["name"] for v in p.volumes()] == ["vm1"]
    assert [g["name"] for g in st["snapshot_groups"]] == ["G"]
    assert st["pool"]["transaction_id"] == tid
    assert st["pool"]["data"]["total_blocks"] == NBLK
    resume(p)
    create(p.mnt / "new", BS)
    os.mkdir(p.mnt / ".snapshots" / "S")
    os.rmdir(p.mnt / ".snapshots" / "G")
    p.ctl("snapshot", "vm1", "clone")
    assert read_direct(p.mnt / "clone", 0, BS) == pattern(1, BS)
    assert sorted(v["name"] for v in p.volumes()) == ["clone", "new", "vm1"]
    p.unmount()


def test_unlink_while_suspended_ebusy_when_closed_deferred_when_open(pool, guard):
    """A closed volume cannot be removed from a suspended pool (EBUSY); an
    open one can, and its device goes at the resume (or at the unmount, which
    resumes first), not while the pool is suspended."""
    p = make_pool(pool, guard)
    for name in ("vm1", "vm2", "vm3"):
        create(p.mnt / name, DATA)
        write_at(p.mnt / name, 0, pattern(1, 4 * BS))
    assert pst(p)["data"]["used_blocks"] == 12
    fd = os.open(p.mnt / "vm2", os.O_RDONLY)
    try:
        suspend(p)
        with pytest.raises(OSError) as ei:
            bounded(os.unlink, p.mnt / "vm3")
        assert ei.value.errno == errno.EBUSY
        assert os.path.exists(p.mnt / "vm3")
        bounded(os.unlink, p.mnt / "vm2")
        assert not os.path.exists(p.mnt / "vm2")
    finally:
        bounded(os.close, fd)
    time.sleep(1.5)                   # RELEASE comes after close(2) returned
    assert pst(p)["data"]["used_blocks"] == 12, "nothing is deleted while suspended"
    resume(p)
    p.wait_used(8)
    assert sorted(v["name"] for v in p.volumes()) == ["vm1", "vm3"]
    # The same, unmounted instead of resumed.
    fd = os.open(p.mnt / "vm3", os.O_RDONLY)
    try:
        suspend(p)
        bounded(os.unlink, p.mnt / "vm3")
    finally:
        bounded(os.close, fd)
    time.sleep(1.5)
    assert pst(p)["data"]["used_blocks"] == 8
    p.unmount()
    p.mount()
    assert [v["name"] for v in p.volumes()] == ["vm1"]
    assert pst(p)["data"]["used_blocks"] == 4
    assert read_direct(p.mnt / "vm1", 0, 4 * BS) == pattern(1, 4 * BS)
    p.unmount()


def test_a_snapshot_of_a_suspended_volume_has_none_of_its_held_writes(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    old = pattern(1, 2 * BS)[:BS]
    suspend(p, "vm1")
    w = guard.start(Writer(p.mnt / "vm1", 0, pattern(2, BS), direct=True))
    time.sleep(0.5)
    assert w.is_alive()
    bounded(os.mkdir, p.mnt / ".snapshots" / "S")      # only the pool's suspend forbids it
    p.ctl("snapshot", "vm1", "clone", timeout=20)
    resume(p, "vm1")
    assert joined(w).err is None
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(2, BS)
    assert read_direct(p.mnt / ".snapshots" / "S" / "vm1", 0, BS) == old
    assert read_direct(p.mnt / "clone", 0, BS) == old
    p.unmount()


def test_sigterm_with_pushed_back_writes_held_for_space_exits_0(pool, guard):
    p = full_pool(pool, guard)
    ws = held_writers(p, [("vm1", DATA, 10), ("vm3", 0, 11)])
    suspend(p, "--noflush")
    assert pst(p)["held_in_core"] >= 2
    assert p.terminate() == 0
    for w in ws:
        assert joined(w).err is not None, "there was no room: the write cannot have succeeded"
    p.mount()
    st = pst(p)
    assert st["data"]["used_blocks"] == NBLK and st["suspended"] is False, st
    assert read_direct(p.mnt / "vm3", 0, 2 * BS) == bytes(2 * BS)
    assert read_direct(p.mnt / "vm1", 0, BS) == pattern(1, (NBLK - 8) * BS)[:BS]
    p.unmount()


def test_unmount_of_a_suspended_pool_and_restart_resumes(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    suspend(p, "vm1")
    suspend(p)
    assert p.unmount() == 0
    p.mount()
    st = p.status()
    assert st["pool"]["suspended"] is False, st
    assert all(v["suspended"] is False for v in st["volumes"]), st["volumes"]
    write_at(p.mnt / "vm1", BS, pattern(2, BS))
    assert read_direct(p.mnt / "vm1", 0, 2 * BS) == pattern(1, BS) + pattern(2, BS)
    p.unmount()


def test_sigterm_of_a_suspended_pool_with_held_io_exits_0(pool, guard):
    p = make_pool(pool, guard)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    suspend(p)
    w = guard.start(Writer(p.mnt / "vm1", BS, pattern(2, BS), direct=True, fsync=False))
    time.sleep(0.5)
    assert w.is_alive()
    assert p.terminate() == 0
    joined(w)
    p.mount()
    assert pst(p)["suspended"] is False
    got = read_direct(p.mnt / "vm1", 0, 2 * BS)
    assert got[:BS] == pattern(1, BS)
    if w.wrote:
        # Re-issued and answered before the exit: the shutdown commit kept it.
        assert got[BS:] == pattern(2, BS)
    p.unmount()


def test_sigterm_during_a_suspend_that_cannot_drain_does_not_report_success(pool, guard):
    """A suspend waiting for a stalled read when the daemon gets SIGTERM
    never reached quiescence: its client must not be told it did (exit 0
    means "quiescent and committed", what a backup script copies on)."""
    p = make_pool(pool, guard, faults=True)
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, BS))
    sock = ctl_socket_path(p.mnt)     # now: the mount will not answer lookups later
    p.ctl("fault", "data", "read", "stall")
    r = guard.start(Reader(p.mnt / "vm1", 0, BS))
    time.sleep(0.5)
    sus = guard.popen([p.ctl_bin, p.mnt, "suspend"])
    time.sleep(1)
    assert sus.poll() is None and r.is_alive()
    os.kill(p.pid, signal.SIGTERM)
    try:
        out, _ = sus.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        out = None
    # Release the stalled read without forking (a child would inherit the
    # reader's descriptor and FLUSH it at exec) and without touching the mount.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(b'{"cmd": "fault", "args": ["data", "read", "ok"]}\n')
        s.recv(4096)
    rc = p._wait_exit(60)
    if rc is None:
        p._kill()
    mnt = p.cur_mnt
    p._forget()
    r.join(30)
    if is_mounted(mnt):
        run_cmd("fusermount3", "-uz", mnt, check=False)
    assert rc == 0, f"the daemon exited {rc} on SIGTERM"
    assert not r.is_alive()
    assert out is not None, "the suspend client never returned"
    assert sus.returncode != 0, \
        f"suspend exited 0 ({out!r}) although a read was still in flight"

