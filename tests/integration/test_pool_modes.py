# SPDX-License-Identifier: GPL-2.0-or-later
"""Pool modes and failure handling (issue 4): out of data space (held or
failing writes), no_space_timeout, resize, metadata failures, low-water
events.  Small pools keep them fast; the fixture checks thin_check and
`thinfs check` at the end of each."""
import errno
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_thin_check_clean, run_cmd

from daemon_util import BS, MiB, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, bounded, create, \
    fallocate, pattern, read_at, read_direct, write_at, write_direct

DATA = 8 * MiB               # 128 blocks of 64 KiB


def full_pool(pool, **options):
    """A mounted pool whose volumes vm1 and vm2 (8 blocks) map every data block."""
    # Each buffered write one request the pool holds or fails, as these
    # tests watch; the writeback cache's stash: test_writeback_cache.py.
    opts = {"low_water_mark": "0", "writeback_cache": "off"}
    opts.update({k: str(v) for k, v in options.items()})
    fault = opts.pop("fault", None)
    p = pool(data_size=DATA, meta_size=16 * MiB, options=opts, mount=False)
    if fault:
        p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
        p.mount("--allow-faults")
    else:
        p.mount()
    create(p.mnt / "vm1", 4 * DATA)
    create(p.mnt / "vm2", DATA)
    create(p.mnt / "vm3", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, DATA - 8 * BS))
    write_at(p.mnt / "vm2", 0, pattern(9, 8 * BS))
    assert p.status()["pool"]["data"]["used_blocks"] == DATA // BS
    return p


def wait_for(pred, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Writer(threading.Thread):
    """pwrite + fsync in a thread; .err is the errno it failed with, or None."""

    def __init__(self, path, off, data):
        super().__init__(daemon=True)
        self.path, self.off, self.data, self.err = path, off, data, None

    def run(self):
        try:
            write_at(self.path, self.off, self.data)
        except OSError as e:
            self.err = e.errno


def assert_space_mode_io_works(p):
    """Reads and overwrites of exclusive blocks keep working.  Overwrites go
    to vm2: the kernel holds a file's inode lock across a buffered FUSE
    write, so a buffered write held on vm1 queues later writes to vm1 in the
    kernel (O_DIRECT writes pass: test_held_direct_write_...)."""
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == pattern(1, DATA)[:4 * BS]
    write_at(p.mnt / "vm2", BS, pattern(2, BS))
    assert read_at(p.mnt / "vm2", BS, BS) == pattern(2, BS)


def test_queue_mode_holds_writes_until_resize(pool):
    p = full_pool(pool, no_space_timeout="0")
    writers = [Writer(p.mnt / ("vm1" if i % 2 else "vm3"), DATA + i * 3 * BS,
                      pattern(10 + i, 2 * BS)) for i in range(4)]
    for w in writers:
        w.start()
    wait_for(lambda: p.status()["pool"]["held_writes"] >= 2, what="held writes")
    st = p.status()["pool"]
    assert st["mode"] == "out_of_data_space", st
    time.sleep(0.5)
    assert all(w.is_alive() for w in writers), "writes must be held, not failed"
    # Reads and overwrites go on while writes wait (other FUSE threads serve them).
    assert_space_mode_io_works(p)
    # A snapshot is not blocked by the held writes' range locks.
    p.ctl("snapshot", "vm1", "snap1", timeout=10)
    p.ctl("delete", "snap1", timeout=10)
    p.ctl("resize", "data", "+4M")
    for w in writers:
        w.join(timeout=20)
        assert not w.is_alive() and w.err is None, w.err
    st = p.status()["pool"]
    assert st["mode"] == "write" and st["data"]["total_blocks"] == (DATA + 4 * MiB) // BS, st
    assert os.path.getsize(p.data) == DATA + 4 * MiB
    for i in range(4):
        assert read_at(p.mnt / ("vm1" if i % 2 else "vm3"), DATA + i * 3 * BS, 2 * BS) == \
            pattern(10 + i, 2 * BS)
    assert read_at(p.mnt / "vm1", 0, BS) == pattern(1, DATA)[:BS]
    def kinds():
        return [e["kind"] for e in map(json.loads, p.ctl("events", "--json").stdout.splitlines())]
    # Both transitions are reported, however quickly the pool went back (1 s housekeeping).
    wait_for(lambda: kinds().count("mode_change") == 2, what="two mode_change events")
    assert "resize" in kinds()
    # The resized pool's new blocks take a verified write (blocks none had before).
    fio_verify(p.mnt / "vm1", 2 * DATA, 2 * MiB)
    p.unmount()


def direct_punch(path, off, n):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
    finally:
        os.close(fd)


def test_held_direct_write_lets_direct_io_to_the_same_file_through(pool):
    """O_DIRECT opens are answered with FOPEN_PARALLEL_DIRECT_WRITES, so the
    kernel takes a file's inode lock shared for their writes: allocating
    dd oflag=direct writes held for data space leave an O_DIRECT overwrite
    of a mapped block and an O_DIRECT read of the same file going, and
    several of them wait in the daemon at once."""
    p = full_pool(pool, no_space_timeout="0")
    vol = p.mnt / "vm1"
    src = p.dir / "held.bin"
    src.write_bytes(pattern(20, BS))
    fresh = [DATA // BS, DATA // BS + 5]          # unmapped blocks of vm1
    held = [subprocess.Popen(["dd", f"if={src}", f"of={vol}", f"bs={BS}", f"seek={b}", "count=1",
                              "oflag=direct", "conv=notrunc", "status=none"],
                             stderr=subprocess.PIPE, text=True) for b in fresh]
    # Both wait in the daemon: a second write to the file got past the kernel.
    wait_for(lambda: p.status()["pool"]["held_writes"] == 2, what="two held writes")
    bounded(write_direct, vol, BS, pattern(21, BS), timeout=20, what="an O_DIRECT overwrite")
    assert bounded(read_direct, vol, 0, 2 * BS, timeout=20, what="an O_DIRECT read") == \
        pattern(1, DATA)[:BS] + pattern(21, BS)
    assert all(h.poll() is None for h in held) and p.status()["pool"]["held_writes"] == 2
    p.ctl("resize", "data", "+4M")
    for h in held:
        assert h.wait(timeout=20) == 0, h.stderr.read()
    for b in fresh:
        assert read_direct(vol, b * BS, BS) == pattern(20, BS)
        assert read_at(vol, b * BS, BS) == pattern(20, BS)
    assert read_at(vol, BS, BS) == pattern(21, BS)
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()


def test_max_threads_held_writes_leave_the_control_socket_to_resize(pool):
    """max_threads = 8 and 8 O_DIRECT writes held for space: every FUSE
    worker is taken (README, Memory), but the control socket needs none, so
    status answers and `resize data` brings the space that completes them,
    after which the mount serves everything again."""
    p = full_pool(pool, no_space_timeout="0", max_threads="8")
    vol = p.mnt / "vm1"
    src = p.dir / "held.bin"
    src.write_bytes(pattern(30, BS))
    fresh = [DATA // BS + 2 * i for i in range(8)]      # unmapped blocks of vm1
    held = [subprocess.Popen(["dd", f"if={src}", f"of={vol}", f"bs={BS}", f"seek={b}", "count=1",
                              "oflag=direct", "conv=notrunc", "status=none"],
                             stderr=subprocess.PIPE, text=True) for b in fresh]
    wait_for(lambda: p.status()["pool"]["held_writes"] == 8, timeout=30,
             what="eight held writes")
    st = p.status()["pool"]
    assert st["max_threads"] == 8 and st["mode"] == "out_of_data_space", st
    p.ctl("resize", "data", "+4M", timeout=20)
    for h in held:
        assert h.wait(timeout=30) == 0, h.stderr.read()
    for b in fresh:
        assert read_direct(vol, b * BS, BS) == pattern(30, BS)
    assert read_at(vol, 0, BS) == pattern(1, DATA)[:BS]
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()


def test_discard_passes_a_held_libaio_write_to_the_same_file(pool):
    """The kernel takes the inode lock exclusively for fallocate, so a
    discard waits behind a *synchronous* held direct write (docs/daemon.md);
    an asynchronous one (libaio) does not keep the lock while it waits, and
    in the daemon a held write holds no range lock: a discard and an
    overwrite of the same file finish while it is held.  The discard frees a
    block, so the held write may take that block at the next commit; fio
    verifies what it wrote either way."""
    p = full_pool(pool, no_space_timeout="0")
    vol = p.mnt / "vm1"
    job = subprocess.Popen(
        ["fio", "--name=held", f"--filename={vol}", "--rw=write", f"--bs={BS}",
         f"--offset={DATA}", f"--size={2 * BS}", "--ioengine=libaio", "--iodepth=2",
         "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         "--verify_state_save=0", "--output-format=terse"],
        cwd=p.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: p.status()["pool"]["held_writes"] >= 1, what="a held write")
    # Nothing else frees space: had these waited for the held write, they never would end.
    bounded(direct_punch, vol, 5 * BS, BS, timeout=20, what="an O_DIRECT discard")
    bounded(write_direct, vol, BS, pattern(22, BS), timeout=20, what="an O_DIRECT overwrite")
    assert read_direct(vol, 4 * BS, 3 * BS) == \
        pattern(1, DATA)[4 * BS:5 * BS] + bytes(BS) + pattern(1, DATA)[6 * BS:7 * BS]
    assert read_at(vol, BS, BS) == pattern(22, BS)
    p.ctl("resize", "data", "+4M")
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, f"fio exited {job.returncode}:\n{out}\n{err}"
    p.unmount()


def fio_verify(vol, offset, size):
    """A sequential fio write of [offset, offset + size) read back with crc32c checks."""
    r = run_cmd("fio", "--name=verify", f"--filename={vol}", "--rw=write", "--bs=64k",
                f"--offset={offset}", f"--size={size}", "--verify=crc32c", "--do_verify=1",
                "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse",
                check=False, timeout=300, cwd=os.path.dirname(os.path.dirname(vol)))
    assert r.returncode == 0, f"fio exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


def test_data_shrinks_down_to_the_highest_used_block(pool):
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"})
    create(p.mnt / "vm1", DATA)
    data = pattern(5, 24 * BS)
    write_at(p.mnt / "vm1", 0, data)
    # Blocks freed in the running transaction do not stand in the way.
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * BS, 8 * BS)
    finally:
        os.close(fd)
    used = p.status()["pool"]["data"]["used_blocks"]
    assert used == 16, used
    r = p.ctl("resize", "data", str(4 * BS), ok=None)
    assert r.returncode != 0, r.stdout
    m = re.search(r"cannot shrink the data device to 4 blocks: block (\d+) is in use "
                  r"\(highest used\); the smallest possible size is (\d+) blocks", r.stderr)
    assert m and int(m.group(2)) == int(m.group(1)) + 1, r.stderr
    smallest = int(m.group(2))
    assert used <= smallest < DATA // BS, r.stderr
    assert p.status()["pool"]["data"]["total_blocks"] == DATA // BS
    assert os.path.getsize(p.data) == DATA
    p.ctl("resize", "data", str(smallest * BS))
    st = p.status()["pool"]
    assert st["data"]["total_blocks"] == smallest and st["mode"] == "write", st
    assert os.path.getsize(p.data) == smallest * BS
    assert read_at(p.mnt / "vm1", 0, 16 * BS) == data[:16 * BS]
    assert read_at(p.mnt / "vm1", 16 * BS, 8 * BS) == bytes(8 * BS)
    wait_for(lambda: any(e["kind"] == "resize" for e in
                         map(json.loads, p.ctl("events", "--json").stdout.splitlines())),
             what="resize event")
    p.unmount()
    assert_thin_check_clean(p.meta)
    p.thinfs_run("check", p.meta)
    p.mount()
    st = p.status()["pool"]
    assert st["data"]["total_blocks"] == smallest and st["data"]["used_blocks"] == 16, st
    assert read_at(p.mnt / "vm1", 0, 16 * BS) == data[:16 * BS]
    # Grown again, the space past the old end takes new data.
    p.ctl("resize", "data", str(DATA))
    assert os.path.getsize(p.data) == DATA
    fio_verify(p.mnt / "vm1", 16 * BS, 32 * BS)
    assert read_at(p.mnt / "vm1", 0, 16 * BS) == data[:16 * BS]
    p.unmount()


def test_error_if_no_space_fails_at_once_and_freeing_returns_to_write(pool):
    p = full_pool(pool, error_if_no_space="true")
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm1", DATA, pattern(3, BS))
    assert ei.value.errno == errno.ENOSPC and time.monotonic() - t0 < 5
    st = p.status()["pool"]
    assert st["mode"] == "out_of_data_space" and st["held_writes"] == 0, st
    assert_space_mode_io_works(p)
    # Punching blocks frees them: the next commit returns the pool to write.
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * BS, 8 * BS)
    finally:
        os.close(fd)
    wait_for(lambda: p.status()["pool"]["mode"] == "write", what="write mode")
    write_at(p.mnt / "vm1", DATA, pattern(3, BS))
    assert read_at(p.mnt / "vm1", DATA, BS) == pattern(3, BS)
    p.unmount()


def test_no_space_timeout_fails_held_writes_with_enospc(pool):
    p = full_pool(pool, no_space_timeout="3s")
    w = Writer(p.mnt / "vm1", DATA, pattern(4, BS))
    t0 = time.monotonic()
    w.start()
    w.join(timeout=30)
    took = time.monotonic() - t0
    assert not w.is_alive() and w.err == errno.ENOSPC, w.err
    assert 2 <= took < 15, took
    st = p.status()["pool"]
    assert st["error_if_no_space"] is True and st["mode"] == "out_of_data_space", st
    # Behaves as error_if_no_space now: the next one fails at once.
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm1", DATA + 2 * BS, pattern(5, BS))
    assert ei.value.errno == errno.ENOSPC and time.monotonic() - t0 < 2
    assert_space_mode_io_works(p)
    p.ctl("resize", "data", str(DATA + 2 * MiB))
    st = p.status()["pool"]
    assert st["mode"] == "write" and st["error_if_no_space"] is False, st
    write_at(p.mnt / "vm1", DATA, pattern(4, BS))
    assert read_at(p.mnt / "vm1", DATA, BS) == pattern(4, BS)
    p.unmount()


def test_resize_refusals_and_external_growth(pool):
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"})
    r = p.ctl("resize", "data", "0", ok=None)
    assert r.returncode != 0 and "at least one" in r.stderr, r.stderr
    r = p.ctl("resize", "metadata", str(4 * MiB), ok=None)
    assert r.returncode != 0 and \
        "shrinking the metadata device is not supported" in r.stderr, r.stderr
    r = p.ctl("resize", "data", "lots", ok=None)
    assert r.returncode != 0 and "bad size" in r.stderr, r.stderr
    # Growing the file from outside changes nothing until resize.
    os.truncate(p.data, 2 * DATA)
    time.sleep(1.2)
    assert p.status()["pool"]["data"]["total_blocks"] == DATA // BS
    p.ctl("resize", "data", str(2 * DATA))
    assert p.status()["pool"]["data"]["total_blocks"] == 2 * DATA // BS
    p.ctl("resize", "metadata", "+4M")
    assert p.status()["pool"]["metadata"]["total_blocks"] == 12 * MiB // 4096
    assert os.path.getsize(p.meta) == 12 * MiB
    # Online, while a writer runs.
    create(p.mnt / "vm1", 4 * DATA)
    data = pattern(7, 2 * DATA)
    w = Writer(p.mnt / "vm1", 0, data)
    w.start()
    p.ctl("resize", "data", "+1M")
    w.join(timeout=30)
    assert w.err is None
    assert read_at(p.mnt / "vm1", 0, len(data)) == data
    p.remount()
    st = p.status()["pool"]
    assert st["data"]["total_blocks"] == (2 * DATA + MiB) // BS, st
    assert st["metadata"]["total_blocks"] == 12 * MiB // 4096, st
    p.unmount()


MAX_META_BLOCKS = 4161600    # 255 bitmaps x 16320 blocks: the format's limit


def test_metadata_resize_past_the_format_limit_grows_only_to_it(pool):
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"})
    r = p.ctl("resize", "metadata", "+1T")
    assert r.stdout.strip() == f"grown to {MAX_META_BLOCKS} blocks, not " \
        f"{(8 * MiB + (1 << 40)) // 4096}: the format uses at most {MAX_META_BLOCKS} " \
        "metadata blocks (about 15.9 GiB)", r.stdout
    assert p.status()["pool"]["metadata"]["total_blocks"] == MAX_META_BLOCKS
    assert os.path.getsize(p.meta) == MAX_META_BLOCKS * 4096   # not 1 TiB
    # At the limit already: refused, nothing changes.
    r = p.ctl("resize", "metadata", "+4k", ok=None)
    assert r.returncode == 1 and r.stderr.strip() == \
        f"thinfs-ctl: resize metadata: cannot grow the metadata device to " \
        f"{MAX_META_BLOCKS + 1} blocks: the format uses at most {MAX_META_BLOCKS} metadata " \
        "blocks (about 15.9 GiB), and it has that many already", r.stderr
    assert os.path.getsize(p.meta) == MAX_META_BLOCKS * 4096
    kinds = [e["kind"] for e in map(json.loads, p.ctl("events", "--json").stdout.splitlines())]
    assert kinds.count("resize") == 1, kinds
    p.unmount()


def test_metadata_write_error_goes_read_only_then_repair(pool):
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"}, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the injected failure is logged as an error
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 4 * BS))
    p.ctl("fault", "metadata", "write", "error", "once")   # the commit fails, needs_check not
    with pytest.raises(OSError):
        write_at(p.mnt / "vm1", 10 * BS, pattern(2, BS))
    st = p.status()["pool"]
    assert st["mode"] == "read_only" and st["needs_check"] is True, st
    assert "metadata write failed at block" in st["reason"] and \
        "Input/output error" in st["reason"], st
    # Reads from the last commit work; allocation fails with EIO, never hangs.
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == pattern(1, 4 * BS)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm1", 20 * BS, pattern(3, BS))
    assert ei.value.errno == errno.EIO and time.monotonic() - t0 < 5
    r = p.ctl("resize", "data", "+1M", ok=None)
    assert r.returncode != 0 and "thinfs check --repair" in r.stderr, r.stderr
    assert p.alive()
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    r = p.mount("--allow-faults", ok=False)
    assert r.returncode != 0 and \
        "metadata needs checking: run thinfs check --repair" in r.stdout, r.stdout
    # Read-only it mounts, and the data committed before the failure is there.
    p.mount("--allow-faults", "-o", "ro")
    assert p.status()["pool"]["needs_check"] is True
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == pattern(1, 4 * BS)
    p.unmount()
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))
    p.thinfs_run("check", p.meta)
    p.mount("--allow-faults")
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == pattern(1, 4 * BS)
    write_at(p.mnt / "vm1", 10 * BS, pattern(2, BS))
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()


def test_low_water_event_once_per_crossing(pool):
    p = pool(data_size=DATA, meta_size=16 * MiB, options={"low_water_mark": "16"})
    create(p.mnt / "vm1", 2 * DATA)

    def nr_events():
        return sum(1 for line in p.ctl("events").stdout.splitlines()
                   if " low_water_data " in line)

    def punch(off, n):
        fd = os.open(p.mnt / "vm1", os.O_WRONLY)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
        finally:
            os.close(fd)

    write_at(p.mnt / "vm1", 0, pattern(1, 120 * BS))      # 8 free: below 16
    wait_for(lambda: nr_events() == 1, what="the first low_water_data event")
    # Hovering around the mark (within the margin) fires nothing more.
    for _ in range(2):
        punch(112 * BS, 8 * BS)                            # 16 free: at the mark
        time.sleep(1.5)
        write_at(p.mnt / "vm1", 112 * BS, pattern(2, 8 * BS))
        time.sleep(1.5)
    assert nr_events() == 1
    # Well above the mark re-arms it; falling below fires once more.
    punch(64 * BS, 56 * BS)
    time.sleep(1.5)
    write_at(p.mnt / "vm1", 64 * BS, pattern(3, 56 * BS))
    wait_for(lambda: nr_events() == 2, what="the second low_water_data event")
    time.sleep(1.5)
    assert nr_events() == 2
    p.unmount()


def test_low_water_dips_shorter_than_a_second_are_each_reported(pool):
    """The engine counts crossings where space changes, so dips that begin
    and end between two of the daemon's 1-second ticks are not lost."""
    p = pool(data_size=DATA, meta_size=16 * MiB, options={"low_water_mark": "16"})
    create(p.mnt / "vm1", 2 * DATA)

    def nr_events():
        return sum(1 for line in p.ctl("events").stdout.splitlines()
                   if " low_water_data " in line)

    def dip(n):
        write_at(p.mnt / "vm1", 0, pattern(n, 120 * BS))   # 8 free: below 16
        fd = os.open(p.mnt / "vm1", os.O_WRONLY)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 120 * BS)
            os.fsync(fd)                                    # the commit frees them
        finally:
            os.close(fd)

    dip(1)
    dip(2)
    wait_for(lambda: nr_events() == 2, what="two low_water_data events")
    time.sleep(1.5)
    assert nr_events() == 2
    assert p.status()["pool"]["data"]["used_blocks"] == 0
    p.unmount()


def test_metadata_failure_without_needs_check_is_fail_mode(pool):
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"}, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 4 * BS))
    p.ctl("fault", "metadata", "write", "error")   # needs_check cannot be written either
    with pytest.raises(OSError):
        write_at(p.mnt / "vm1", 10 * BS, pattern(2, BS))
    st = p.status()["pool"]
    assert st["mode"] == "fail" and st["reason"], st
    with pytest.raises(OSError) as ei:
        read_at(p.mnt / "vm1", 0, BS)
    assert ei.value.errno == errno.EIO
    # Opening for write fails, and the log says why.
    time.sleep(1.5)                        # the kernel forgets the last open (RELEASE)
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm1", 0, b"x")
    assert ei.value.errno == errno.EIO
    assert "the pool is in fail mode" in p.log_text()
    assert "metadata write failed at block" in p.status()["pool"]["reason"]
    assert p.alive()
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    # Nothing after the last commit reached the disk: the pool is as it was then.
    p.mount("--allow-faults")
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == pattern(1, 4 * BS)
    p.unmount()


def test_autoextend_hook_grows_the_data_device_up_to_its_cap(pool, thinfs_ctl_bin):
    hook = Path(__file__).resolve().parents[2] / "contrib" / "thinfs-autoextend"
    p = pool(data_size=DATA, meta_size=16 * MiB, mount=False,
             options={"low_water_mark": "16", "on_event": str(hook)})
    p.mount(env={"THINFS_CTL": str(thinfs_ctl_bin), "THINFS_AUTOEXTEND_STEP": "4M",
                 "THINFS_AUTOEXTEND_MAX": "12M"})
    create(p.mnt / "vm1", 4 * DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 120 * BS))       # below the mark: +4 MiB
    wait_for(lambda: p.status()["pool"]["data"]["total_blocks"] == 12 * MiB // BS,
             what="the hook's resize")
    # No further growth while above the mark, and never past the cap.
    write_at(p.mnt / "vm1", 120 * BS, pattern(2, 60 * BS))  # below again: capped at 12M
    time.sleep(3)
    assert p.status()["pool"]["data"]["total_blocks"] == 12 * MiB // BS
    assert os.path.getsize(p.data) == 12 * MiB
    p.unmount()


# ---- metadata out of space, metadata write errors, idle pool ------------------------------

META_TINY = 128 * 1024       # 32 metadata blocks: mkpool accepts down to 64 KiB (16)
SCATTER = 4096


def faulty_pool(pool, **kw):
    """A pool mounted with fault injection allowed."""
    p = pool(options={"low_water_mark": "0"}, mount=False, **kw)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the injected or real metadata failure is logged as an error
    return p


def test_metadata_device_too_small_goes_read_only_then_repair_and_grow(pool):
    p = pool(data_size=2 << 30, meta_size=META_TINY, options={"low_water_mark": "0"},
             mount=False)
    p.expect_log(r".")          # running out of metadata space is logged as an error
    p.mount()
    vol = p.mnt / "vm1"
    create(vol, 2 << 30)
    # Fsynced first: must survive everything below.
    write_at(vol, 0, pattern(1, 4 * BS))
    # Scattered 4 KiB writes, one per data block, until the metadata runs out.
    nblocks = (2 << 30) // BS
    failed_at, err, synced = None, None, 0
    fd = os.open(vol, os.O_WRONLY)
    try:
        for i in range(4, nblocks):
            try:
                os.pwrite(fd, pattern(i, SCATTER), i * BS)
                if i % 64 == 0:
                    os.fsync(fd)
                    synced = i
            except OSError as e:
                failed_at, err = i, e.errno
                break
        if failed_at is None:
            try:
                os.fsync(fd)
            except OSError as e:
                failed_at, err = nblocks, e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert failed_at is not None, "the metadata never ran out"
    assert err in (errno.ENOSPC, errno.EIO), err
    assert synced >= 64, f"ran out after {failed_at} blocks, before the first fsync"

    def fsynced_data_readable():
        assert read_at(vol, 0, 4 * BS) == pattern(1, 4 * BS)
        for i in list(range(4, synced + 1, 61)) + [synced]:
            assert read_at(vol, i * BS, SCATTER) == pattern(i, SCATTER), i
    st = p.status()["pool"]
    assert st["mode"] == "read_only" and st["needs_check"] is True, st
    assert p.alive()
    fsynced_data_readable()
    p.unmount()
    r = p.mount(ok=False)
    assert r.returncode != 0 and \
        "metadata needs checking: run thinfs check --repair" in r.stdout, r.stdout
    p.mount("-o", "ro")
    assert p.status()["pool"]["needs_check"] is True
    fsynced_data_readable()
    p.unmount()
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))
    p.thinfs_run("check", p.meta)
    os.truncate(p.meta, 4 * META_TINY)
    p.mount()
    fsynced_data_readable()
    p.ctl("resize", "metadata", str(16 * MiB))
    st = p.status()["pool"]
    assert st["mode"] == "write" and st["metadata"]["total_blocks"] == 16 * MiB // 4096, st
    # A full write of the whole earlier range, now with room for its mappings.
    chunk = pattern(2, MiB)
    end = (failed_at + 1) * BS
    fd = os.open(vol, os.O_WRONLY)
    try:
        for off in range(0, end, MiB):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    for off in (0, end // 2 // MiB * MiB, (end - 1) // MiB * MiB):
        assert read_at(vol, off, MiB) == chunk, off
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()


def repair_and_remount(p, vol, committed):
    """After a metadata failure: the daemon answers, unmount, rw mount refused
    if needs_check was written, check --repair, rw remount works and writes."""
    assert p.alive()
    st = p.status()["pool"]
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    if st["needs_check"]:
        r = p.mount("--allow-faults", ok=False)
        assert r.returncode != 0 and \
            "metadata needs checking: run thinfs check --repair" in r.stdout, r.stdout
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))
    p.thinfs_run("check", p.meta)
    p.mount("--allow-faults")
    st = p.status()["pool"]
    assert st["mode"] == "write" and st["needs_check"] is False, st
    assert read_at(vol, 0, len(committed)) == committed
    write_at(vol, 40 * BS, pattern(99, 3 * BS))
    assert read_at(vol, 40 * BS, 3 * BS) == pattern(99, 3 * BS)
    p.unmount()


def assert_failed_mode(p):
    st = p.status()["pool"]
    assert (st["mode"] == "read_only" and st["needs_check"] is True) or st["mode"] == "fail", st
    assert "metadata write failed at block" in st["reason"], st
    return st


@pytest.mark.parametrize("after", [0, 3])
def test_metadata_write_error_while_provisioning(pool, after):
    # The fsyncs make the commits; the first after arming fails.
    p = faulty_pool(pool, data_size=DATA, meta_size=8 * MiB)
    vol = p.mnt / "vm1"
    create(vol, DATA)
    committed = pattern(1, 4 * BS)
    write_at(vol, 0, committed)
    p.ctl("fault", "metadata", "write", "error", "after", str(after), "once")
    errs = []

    def provision():
        fd = os.open(vol, os.O_WRONLY)
        try:
            for i in range(4, DATA // BS, 2):
                os.pwrite(fd, pattern(i, BS // 2), i * BS)
                if i % 8 == 0:
                    os.fsync(fd)
            os.fsync(fd)
        except OSError as e:
            errs.append(e.errno)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
    t = threading.Thread(target=provision, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "allocating writes hang after a metadata write error"
    assert errs and errs[0] in (errno.EIO, errno.ENOSPC), errs
    assert_failed_mode(p)
    repair_and_remount(p, vol, committed)


# These small commits are two metadata writes: the new blocks (neighbours, one
# write) and the superblock.
@pytest.mark.parametrize("after", [0, 1])
def test_metadata_write_error_during_snapshot_mkdir(pool, after):
    p = faulty_pool(pool, data_size=DATA, meta_size=8 * MiB)
    vol = p.mnt / "vm1"
    create(vol, DATA)
    committed = pattern(1, 4 * BS)
    write_at(vol, 0, committed)
    p.ctl("fault", "metadata", "write", "error", "after", str(after), "once")
    r = run_cmd("mkdir", p.mnt / ".snapshots" / "S", check=False, timeout=30)
    assert r.returncode != 0, "mkdir .snapshots/S succeeded although its commit failed"
    assert_failed_mode(p)
    assert read_at(vol, 0, len(committed)) == committed
    repair_and_remount(p, vol, committed)
    # The group was not made, or was made whole: a retry works either way.
    p.mount("--allow-faults")
    if not (p.mnt / ".snapshots" / "S").exists():
        os.mkdir(p.mnt / ".snapshots" / "S")
    assert read_at(p.mnt / ".snapshots" / "S" / "vm1", 0, len(committed)) == committed
    p.unmount()


@pytest.mark.parametrize("after", [0, 1])
def test_metadata_write_error_during_fsync_commit(pool, after):
    p = pool(data_size=DATA, meta_size=8 * MiB,
             options={"low_water_mark": "0", "commit_interval": "1h"}, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")
    vol = p.mnt / "vm1"
    create(vol, DATA)
    committed = pattern(1, 4 * BS)
    write_at(vol, 0, committed)
    fd = os.open(vol, os.O_WRONLY)
    try:
        for i in range(8, 40):
            os.pwrite(fd, pattern(i, BS), i * BS)    # provisioned, not committed
        p.ctl("fault", "metadata", "write", "error", "after", str(after), "once")
        res = []

        def do_fsync():
            try:
                os.fsync(fd)
                res.append(0)
            except OSError as e:
                res.append(e.errno)
        t = threading.Thread(target=do_fsync, daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "fsync hangs after a metadata write error"
        assert res == [errno.EIO], res
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert_failed_mode(p)
    assert read_at(vol, 0, len(committed)) == committed
    repair_and_remount(p, vol, committed)


def stall_a_commit(pool, dev, op):
    """A pool with vm1 (4 blocks mapped and committed) and vm2 (a new
    mapping), and a thread whose fsync of vm2 runs a commit that the fault
    `dev op stall` holds.  The fsync is of another volume than the one the
    test does I/O to: the kernel holds a file's inode lock across its
    fsync, which would hold that file's writes by itself.  Returns the
    pool, both volumes, the thread and its result list (the errno or 0)."""
    p = pool(data_size=DATA, meta_size=8 * MiB,
             options={"low_water_mark": "0", "commit_interval": "1h"}, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    vol = p.mnt / "vm1"
    create(vol, DATA)
    write_at(vol, 0, pattern(1, 4 * BS))                   # mapped and committed
    other = p.mnt / "vm2"
    create(other, DATA)
    write_at(other, 10 * BS, pattern(2, BS), fsync=False)  # a new mapping: the commit has work
    p.ctl("fault", dev, op, "stall")
    res = []

    def do_fsync():
        try:
            fd = os.open(other, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            res.append(0)
        except OSError as e:
            res.append(e.errno)
    t = threading.Thread(target=do_fsync, daemon=True)
    t.start()
    time.sleep(0.5)
    if not t.is_alive():
        p.ctl("fault", dev, op, "ok")
        pytest.fail("the fsync should wait for the stalled commit")
    return p, vol, other, t, res


@pytest.mark.parametrize("dev,op", [("metadata", "write"), ("data", "flush")])
def test_mapped_io_completes_while_a_commit_is_stalled(pool, dev, op):
    """A commit stalled in its metadata writes or its data flush holds no
    lock that reads and overwrites of mapped blocks need: they complete, and
    so does status, while the fsync that started the commit waits."""
    p, vol, other, t, res = stall_a_commit(pool, dev, op)
    try:
        assert bounded(read_direct, vol, 0, BS) == pattern(1, 4 * BS)[:BS]
        bounded(write_direct, vol, BS, pattern(3, BS), what="overwrite of a mapped block")
        assert bounded(read_direct, vol, BS, BS) == pattern(3, BS)
        assert bounded(p.status)["pool"]["mode"] == "write"
        assert t.is_alive(), "the commit should still be stalled"
    finally:
        p.ctl("fault", dev, op, "ok")
    t.join(timeout=30)
    assert not t.is_alive() and res == [0], res
    p.unmount()
    p.mount("--allow-faults")
    assert read_direct(vol, 0, 2 * BS) == pattern(1, 4 * BS)[:BS] + pattern(3, BS)
    assert read_direct(other, 10 * BS, BS) == pattern(2, BS)
    p.unmount()


@pytest.mark.parametrize("dev,op", [("metadata", "write"), ("data", "flush")])
def test_allocating_write_and_discard_complete_while_a_commit_is_stalled(pool, dev, op):
    """While a commit's metadata writes, or its data flush (which comes
    after its in-memory part), are held, the next transaction goes on: an
    allocating write to a new block and a discard of a committed block
    complete, and are durable after the release and an fsync (the remount
    reads them back; thin_check and thinfs check run at the end).  Before,
    both waited for the metadata writes to finish, and an allocating write
    for the drain of allocations in flight and a second data flush."""
    p, vol, other, t, res = stall_a_commit(pool, dev, op)
    try:
        bounded(write_direct, vol, 20 * BS, pattern(3, BS), what="allocating write")
        bounded(direct_punch, vol, 2 * BS, BS, what="discard of a committed block")
        assert bounded(read_direct, vol, 20 * BS, BS) == pattern(3, BS)
        assert bounded(read_direct, vol, 2 * BS, BS) == bytes(BS)
        assert t.is_alive(), "the commit should still be stalled"
    finally:
        p.ctl("fault", dev, op, "ok")
    t.join(timeout=30)
    assert not t.is_alive() and res == [0], res
    fd = os.open(vol, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    p.unmount()
    p.mount("--allow-faults")
    expect = bytearray(pattern(1, 4 * BS))
    expect[2 * BS:3 * BS] = bytes(BS)
    assert read_direct(vol, 0, 4 * BS) == bytes(expect)
    assert read_direct(vol, 20 * BS, BS) == pattern(3, BS)
    assert read_direct(other, 10 * BS, BS) == pattern(2, BS)
    p.unmount()


def test_a_commit_runs_past_an_allocating_write_in_flight(pool):
    """An allocating write is held in its data write (after its block was
    allocated); an fsync of another volume still commits, leaving that
    block out of the committed state.  A power cut then: the remount finds
    what the fsyncs made durable, the held write's block unmapped, and
    thin_check and thinfs check clean (no leaked block).  Before, the
    commit waited for the held write to map its block."""
    p = pool(data_size=DATA, meta_size=8 * MiB,
             options={"low_water_mark": "0", "commit_interval": "1h"}, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the cut fails the held write
    vol, other = p.mnt / "vm1", p.mnt / "vm2"
    create(vol, DATA)
    create(other, DATA)
    write_at(vol, 0, pattern(1, 4 * BS))                   # mapped and committed
    write_at(other, 0, pattern(2, BS))
    p.ctl("fault", "data", "write", "stall")
    res = []

    def held_write():
        try:
            write_direct(vol, 20 * BS, pattern(3, BS))
            res.append(0)
        except OSError as e:    # the cut ends the daemon under it
            res.append(e.errno)
    held = threading.Thread(target=held_write, daemon=True)
    held.start()
    time.sleep(0.5)
    assert held.is_alive(), "the allocating write should be held"

    def fsync_other():
        fd = os.open(other, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    bounded(fsync_other, what="fsync with an allocating write in flight")
    assert held.is_alive(), "the allocating write should still be held"
    p.ctl("fault", "power-cut", ok=None)
    p.crashed()
    held.join(timeout=30)
    assert res and res[0] != 0, res
    p.check_metadata()
    p.mount("--allow-faults")
    assert read_direct(vol, 0, 4 * BS) == pattern(1, 4 * BS)
    assert read_direct(other, 0, BS) == pattern(2, BS)
    assert read_direct(vol, 20 * BS, BS) == bytes(BS)
    p.unmount()


def test_a_failed_commit_aborts_the_transaction_that_ran_during_its_io(pool):
    """The commit's held metadata write then fails: the pool goes read_only
    as before, the fsync that ran the commit fails, and the allocating write
    made meanwhile (acknowledged, never fsynced) goes with the aborted next
    transaction.  What was committed before stays, and repair works."""
    p, vol, other, t, res = stall_a_commit(pool, "metadata", "write")
    p.expect_log(r"writing metadata block \d+ .* failed|committing the metadata failed")
    try:
        bounded(write_direct, vol, 20 * BS, pattern(3, BS), what="allocating write")
    finally:
        p.ctl("fault", "metadata", "write", "error", "once")
    t.join(timeout=30)
    assert not t.is_alive() and res == [errno.EIO], res
    assert_failed_mode(p)
    assert read_direct(vol, 20 * BS, BS) == bytes(BS)
    repair_and_remount(p, vol, pattern(1, 4 * BS))
    p.mount("--allow-faults")
    assert read_direct(vol, 20 * BS, BS) == bytes(BS)
    assert read_direct(other, 10 * BS, BS) == bytes(BS)
    p.unmount()


def test_idle_pool_writes_nothing_for_10s(pool):
    """Longer than test_daemon_ctl's 3 s idle test, with a snapshot group and
    unflushed writes behind it: after one commit interval nothing at all."""
    p = pool(data_size=DATA, meta_size=8 * MiB, options={"low_water_mark": "0"})
    create(p.mnt / "vm1", DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 4 * BS))
    os.mkdir(p.mnt / ".snapshots" / "S")
    write_at(p.mnt / "vm1", 8 * BS, pattern(2, 2 * BS), fsync=False)
    time.sleep(1.5)                   # one commit interval (default 1 s) and a bit
    io0 = p.status()["pool"]["io"]
    m0, d0 = os.stat(p.meta).st_mtime_ns, os.stat(p.data).st_mtime_ns
    for sec in range(10):
        time.sleep(1)
        io = p.status()["pool"]["io"]
        assert io == io0, f"I/O while idle, {sec + 1} s in: {io0} -> {io}"
    assert os.stat(p.meta).st_mtime_ns == m0
    assert os.stat(p.data).st_mtime_ns == d0
    p.unmount()
