# SPDX-License-Identifier: GPL-2.0-or-later
"""Buffered writes through the kernel's writeback cache (pool.cfg
writeback_cache, issue 10): what write(2) left in a volume's page cache
reaches the pool at fsync, close, a snapshot group's mkdir and a suspend;
errors of the later writeback (ENOSPC, EIO) reach the writer; O_DIRECT
opens bypass the cache and stay coherent with buffered ones; sizes and
times are the kernel's and survive a remount.

The cache is on by default.  A writeback the pool would hold (a suspend,
a pool out of data space in queue mode) is stashed in the daemon and
answered at once, so no close(2) waits for it, the close of each inherited
descriptor in a child about to exec included; reads see stashed bytes, and
fsync waits for them and reports their failure."""
import errno
import json
import os
import socket
import threading
import time

import pytest

from ctl_socket import ctl_socket_path
from daemon_util import BS, MiB, bounded, create, fsync_path, pattern, read_at, read_direct, \
    wait_for, write_at, write_direct


WB = {"writeback_cache": "on"}


def ctl_in_process(p, *args):
    """A control command without a child process; the response's json or output."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(ctl_socket_path(p.mnt))
        s.sendall(json.dumps({"cmd": args[0], "args": list(args[1:])}).encode() + b"\n")
        reply = s.makefile("rb").readline()
    r = json.loads(reply)
    assert r["ok"], r
    return r.get("json", r.get("output"))


def wb_volume(pool, size, **options):
    """A mounted pool with the writeback cache on, and its volume vm1 of size bytes."""
    p = pool(options={**WB, **options})
    return p, create(p.mnt / "vm1", size)


def data_written(p):
    return p.status()["pool"]["io"]["data"]["write_bytes"]


def open_dirty(path, off, data):
    """A descriptor whose pwrite of data at off was not fsynced (closing it
    would write it back)."""
    fd = os.open(path, os.O_WRONLY)
    assert os.pwrite(fd, data, off) == len(data)
    return fd


def assert_writeback_fails(path, off, data, err):
    """pwrite(2) of data succeeds (into the cache); fsync(2) reports err."""
    fd = open_dirty(path, off, data)
    try:
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == err, ei.value
    finally:
        os.close(fd)


def bdi_knob(p, knob):
    st_dev = os.stat(p.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/{knob}") as f:
        return int(f.read())


def bdi_max_ratio(p):
    """The share of the system's dirty limit the kernel gives the mount, in percent."""
    return bdi_knob(p, "max_ratio")


def test_writeback_cache_is_on_by_default_and_off_when_asked(pool):
    on = pool("on")
    assert on.status()["pool"]["writeback_cache"] is True
    # A fifth of the system's dirty limit, not FUSE's 1%: a buffered
    # writer is not throttled after some 45 MiB.
    assert bdi_max_ratio(on) == 20
    create(on.mnt / "vm1", 4 * MiB)
    fd = open_dirty(on.mnt / "vm1", 0, pattern(1, 16 * BS))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_direct(on.mnt / "vm1", 0, 16 * BS) == pattern(1, 16 * BS)
    off = pool("off", options={"writeback_cache": "off"})
    assert off.status()["pool"]["writeback_cache"] is False
    assert bdi_max_ratio(off) < 20    # nothing cached: the kernel's FUSE share stays
    # Off, each write(2) reaches the pool before it returns.
    create(off.mnt / "vm1", 4 * MiB)
    before = data_written(off)
    fd = open_dirty(off.mnt / "vm1", 0, pattern(1, BS))
    try:
        assert data_written(off) >= before + BS
    finally:
        os.close(fd)


def test_the_dirty_share_is_raised_on_a_mountpoint_with_odd_characters(pool, tmp_path):
    # /proc/self/mountinfo escapes a space as \040 and a backslash as \134.
    mnt = tmp_path / "mount point\\x"
    mnt.mkdir()
    p = pool(options=WB, mnt=mnt)
    assert bdi_max_ratio(p) == 20
    assert bdi_knob(p, "read_ahead_kb") == 4096


def test_every_mount_reads_ahead_4_mib(pool):
    """FUSE's 128 KiB would leave a sequential reader one small READ in
    flight; the cache off and a read-only mount get the read-ahead too."""
    off = pool("off", options={"writeback_cache": "off"})
    assert bdi_knob(off, "read_ahead_kb") == 4096
    off.unmount()
    off.mount("-o", "ro")
    assert bdi_knob(off, "read_ahead_kb") == 4096


def test_buffered_writes_of_any_size_fsynced_survive_a_remount(pool):
    p, vol = wb_volume(pool, 8 * MiB)
    # Part of a page that is on the device, not in the cache, through a
    # write-only open: the kernel reads the page first on that handle.
    under = pattern(7, BS)
    write_direct(vol, 6 * MiB, under)
    wo = os.open(vol, os.O_WRONLY)
    try:
        os.pwrite(wo, b"z" * 100, 6 * MiB + 77)
        os.fsync(wo)
    finally:
        os.close(wo)
    assert read_direct(vol, 6 * MiB, BS) == under[:77] + b"z" * 100 + under[177:]
    fd = os.open(vol, os.O_RDWR)
    try:
        # Partial pages at odd offsets: the kernel reads the rest of each page first.
        for i in range(64):
            assert os.pwrite(fd, pattern(i, 1000), i * 123457 % (8 * MiB - 1000)) == 1000
        os.pwrite(fd, pattern(99, 3 * BS), 2 * MiB)
        os.fsync(fd)
        want = os.pread(fd, 8 * MiB, 0)
    finally:
        os.close(fd)
    st = os.stat(vol)
    p.remount()
    assert read_direct(vol, 0, 8 * MiB) == want
    after = os.stat(vol)
    # Size and times are the kernel's while cached; they reached the catalog.
    assert after.st_size == 8 * MiB
    assert after.st_mtime_ns == st.st_mtime_ns and after.st_ctime_ns == st.st_ctime_ns


def test_truncate_and_a_partial_last_page_keep_the_size(pool):
    p, vol = wb_volume(pool, 5000)
    fd = os.open(vol, os.O_RDWR)
    try:
        # The page past 5000 is cached whole; only 5000 bytes are the file's.
        os.pwrite(fd, b"x" * 904, 4096)
        os.fsync(fd)
        assert os.fstat(fd).st_size == 5000 and p.volume("vm1")["size"] == 5000
        os.pwrite(fd, pattern(2, 2 * BS), 0)
        os.ftruncate(fd, 3000)
        assert os.fstat(fd).st_size == 3000
        os.ftruncate(fd, 2 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    p.remount()
    assert os.path.getsize(vol) == 2 * BS
    assert read_at(vol, 0, 2 * BS) == pattern(2, 2 * BS)[:3000] + bytes(2 * BS - 3000)


def test_enospc_of_cached_writes_surfaces_at_fsync_and_close(pool):
    p = pool(data_size=4 * MiB, options={"error_if_no_space": "true", **WB})   # 64 blocks
    p.expect_log(r"(?i)space|ENOSPC")
    vol = p.mnt / "vm1"
    create(vol, 16 * MiB)
    keep = pattern(1, 32 * BS)
    write_at(vol, 0, keep)
    # write(2) returns: the pages are cached; the pool answers at writeback.
    assert_writeback_fails(vol, 32 * BS, pattern(2, 64 * BS), errno.ENOSPC)
    # A writer that only closes learns it there.
    fd = open_dirty(vol, 128 * BS, pattern(3, 64 * BS))
    with pytest.raises(OSError) as ei:
        os.close(fd)
    assert ei.value.errno == errno.ENOSPC, ei.value
    assert read_at(vol, 0, 32 * BS) == keep


def test_direct_and_buffered_opens_of_a_file_stay_coherent(pool):
    p, vol = wb_volume(pool, 4 * MiB)
    one, two = pattern(1, 4 * BS), pattern(2, BS)
    buffered = os.open(vol, os.O_RDWR)
    try:
        os.pwrite(buffered, one, 0)
        os.fsync(buffered)
        assert read_direct(vol, 0, 4 * BS) == one
        # A direct write over cached pages: the buffered open reads it, not the old cache.
        assert os.pread(buffered, 4 * BS, 0) == one
        write_direct(vol, BS, two)
        assert os.pread(buffered, 4 * BS, 0) == one[:BS] + two + one[2 * BS:]
        # And buffered over direct, part of a page, read back directly after fsync.
        os.pwrite(buffered, b"y" * 100, BS + 10)
        os.fsync(buffered)
        assert read_direct(vol, BS, BS) == two[:10] + b"y" * 100 + two[110:]
    finally:
        os.close(buffered)


def test_snapshot_group_holds_buffered_writes_not_yet_written_back(pool):
    p, vol = wb_volume(pool, 4 * MiB)
    fd = open_dirty(vol, BS, pattern(5, 3 * BS))
    try:
        os.mkdir(p.mnt / ".snapshots" / "g")
        assert read_at(p.mnt / ".snapshots" / "g" / "vm1", BS, 3 * BS) == pattern(5, 3 * BS)
    finally:
        os.close(fd)


def test_suspend_writes_back_cached_writes_first_and_noflush_after_resume(pool):
    """The kernel may write back by itself any time: what is checked is that
    nothing is left after the suspend, and that a noflush suspend holds a
    writeback until the resume instead of failing or losing it."""
    p, vol = wb_volume(pool, 4 * MiB)
    fd = open_dirty(vol, 0, pattern(6, 4 * BS))
    try:
        p.ctl("suspend", "vm1")
        flushed = data_written(p)
        p.ctl("resume", "vm1")
        os.fsync(fd)
        assert data_written(p) == flushed     # nothing was left in the cache
        # Under a noflush suspend, cached writes wait for the resume, then go in.
        p.ctl("suspend", "vm1", "--noflush")
        assert os.pwrite(fd, pattern(7, 4 * BS), 0) == 4 * BS     # whole cached pages
        done = threading.Event()
        syncer = threading.Thread(target=lambda: (os.fsync(fd), done.set()), daemon=True)
        syncer.start()
        held = wait_for(lambda: ctl_in_process(p, "status", "--json")["pool"]["held_in_core"])
        assert held and not done.is_set()
        ctl_in_process(p, "resume", "vm1")
        bounded(syncer.join, what="fsync after resume")
        assert done.is_set()
    finally:
        os.close(fd)
    p.remount()
    assert read_at(vol, 0, 4 * BS) == pattern(7, 4 * BS)


def test_a_failed_writeback_is_reported_at_fsync_and_the_old_data_stays(pool):
    p = pool(options=WB, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the injected write error is logged
    vol = create(p.mnt / "vm1", 4 * MiB)
    old = pattern(1, 4 * BS)
    write_at(vol, 0, old)
    p.ctl("fault", "data", "write", "error")
    assert_writeback_fails(vol, BS, pattern(2, BS), errno.EIO)
    p.ctl("fault", "data", "write", "ok")
    assert read_direct(vol, 0, 4 * BS) == old
    p.remount("--allow-faults")
    assert read_at(vol, 0, 4 * BS) == old


def test_close_and_a_childs_exec_do_not_wait_for_a_suspended_volumes_writeback(pool):
    """Cached writes to a suspended volume: the descriptor's close, and the
    exec of a child that inherits it (thinfs-ctl run by the writer), return
    at once; the writes go in at the resume."""
    p, vol = wb_volume(pool, 4 * MiB)
    fd = open_dirty(vol, 0, pattern(1, 4 * BS))
    closed = False
    try:
        p.ctl("suspend", "vm1", timeout=20)        # writes the cache back first
        assert os.pwrite(fd, pattern(2, 4 * BS), 0) == 4 * BS
        # The child closes its copy of fd at exec: the kernel writes back, the daemon stashes.
        assert p.ctl("status", "--json", timeout=20).returncode == 0
        bounded(os.close, fd, what="close of a file with a held writeback")
        closed = True
        assert p.volume("vm1")["suspended"] is True
        p.ctl("resume", "vm1", timeout=20)
    finally:
        if not closed:
            os.close(fd)
    bounded(fsync_path, vol, what="fsync after the resume")
    assert read_direct(vol, 0, 4 * BS) == pattern(2, 4 * BS)
    assert p.volume("vm1")["held_in_core"] == 0
    p.remount()
    assert read_direct(vol, 0, 4 * BS) == pattern(2, 4 * BS)


def full_queue_pool(pool, timeout_ms):
    """Writeback cache on; vm1 (16 MiB) maps all 64 data blocks but its last 16."""
    p = pool(data_size=4 * MiB, options={**WB, "no_space_timeout": str(timeout_ms),
                                         "low_water_mark": "0"})
    vol = create(p.mnt / "vm1", 16 * MiB)
    write_at(vol, 0, pattern(1, 4 * MiB))
    d = p.status()["pool"]["data"]
    assert d["used_blocks"] == d["total_blocks"], d
    return p, vol


def test_a_full_pool_stashes_writebacks_that_reads_see_and_a_resize_takes(pool):
    p, vol = full_queue_pool(pool, 0)
    new = pattern(3, 2 * BS)
    fd = open_dirty(vol, 4 * MiB + BS, new)
    bounded(os.close, fd, what="close of a file whose writeback waits for space")
    wait_for(lambda: p.status()["pool"]["held_writes"] == 1)
    assert p.status()["pool"]["mode"] == "out_of_data_space"
    assert p.status()["pool"]["stashed_writeback_bytes"] == len(new)
    # An O_DIRECT read reaches the daemon: it serves the stashed bytes over the device's.
    assert read_direct(vol, 4 * MiB, 4 * BS) == bytes(BS) + new + bytes(BS)
    assert read_direct(vol, 0, BS) == pattern(1, BS)
    # An O_DIRECT overwrite of a mapped block goes on meanwhile.
    write_direct(vol, 0, pattern(4, BS))
    fsyncer = threading.Thread(target=fsync_path, args=(vol,), daemon=True)
    fsyncer.start()
    fsyncer.join(0.5)
    assert fsyncer.is_alive(), "fsync must wait for the stashed write"
    p.ctl("resize", "data", "+4M")
    bounded(fsyncer.join, what="fsync after the resize")
    assert p.status()["pool"]["held_writes"] == 0
    assert p.status()["pool"]["stashed_writeback_bytes"] == 0
    p.remount()
    assert read_direct(vol, 4 * MiB, 4 * BS) == bytes(BS) + new + bytes(BS)
    assert read_direct(vol, 0, BS) == pattern(4, BS)


def test_a_stashed_writeback_that_fails_is_reported_at_the_next_fsync(pool):
    p, vol = full_queue_pool(pool, "1s")
    p.expect_log(r"(?i)space|ENOSPC|writeback")
    fd = open_dirty(vol, 4 * MiB, pattern(5, BS))
    try:
        with pytest.raises(OSError) as ei:
            bounded(os.fsync, fd, what="fsync of a write that fails after no_space_timeout")
        assert ei.value.errno == errno.ENOSPC, ei.value
        os.fsync(fd)                  # reported once
    finally:
        os.close(fd)
    assert read_direct(vol, 4 * MiB, BS) == bytes(BS)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_buffered_writes_across_noflush_suspends_match_a_model(pool, seed):
    """Random buffered writes, some while vm1 is suspended (closing the
    descriptor then makes the kernel write back: the daemon stashes those
    writebacks, in order, behind one another), fsyncs and reads between
    suspends: the file always reads as the model, and so it does after the
    last resume, from the device and after a remount.  Writes while
    suspended cover whole pages: the rest of a page the kernel does not
    hold would be read first, and that read waits for the resume."""
    import random
    rnd = random.Random(seed)
    size = 2 * MiB
    p, vol = wb_volume(pool, size)
    model = bytearray(size)
    fd = os.open(vol, os.O_RDWR)
    suspended = dirty = False
    stashed = 0
    try:
        for step in range(60):
            op = rnd.choice(["write", "write", "write", "reopen", "toggle", "check"])
            if op == "write" and suspended:
                # Whole pages: part of an uncached page would be read first, held.
                off = rnd.randrange(0, size // 4096) * 4096
                n = min(rnd.choice([4096, 3 * 4096, BS]), size - off)
            elif op == "write":
                off = rnd.randrange(0, size - 1)
                n = min(rnd.choice([1, 100, 4096, 5000, 3 * BS]), size - off)
            if op == "write":
                data = pattern(seed * 1000 + step, n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
                dirty = dirty or suspended     # surely still cached at the next close
            elif op == "reopen":
                # The close writes the file's dirty pages back: stashed while suspended.
                bounded(os.close, fd, what=f"close at step {step} (suspended={suspended})")
                fd = os.open(vol, os.O_RDWR)
                if suspended and dirty:
                    # The stash's writer (a thread started for it) waits in the core.
                    assert wait_for(lambda: ctl_in_process(p, "status", "--json")["pool"]
                                    ["held_in_core"] >= 1)
                    stashed += 1
                dirty = False
            elif op == "toggle":
                if suspended:
                    ctl_in_process(p, "resume", "vm1")
                    dirty = False
                else:
                    ctl_in_process(p, "suspend", "vm1", "--noflush")
                suspended = not suspended
            elif not suspended:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, size, 0) == bytes(model), f"step {step}"
        if suspended:
            bounded(os.close, fd, what="the last close while suspended")
            fd = os.open(vol, os.O_RDWR)
            ctl_in_process(p, "resume", "vm1")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert stashed > 0
    assert read_direct(vol, 0, size) == bytes(model)
    p.remount()
    assert read_direct(vol, 0, size) == bytes(model)


def test_past_the_stash_bound_a_close_waits_for_the_resume_and_nothing_is_lost(pool):
    """96 MiB cached for a suspended volume: the daemon stashes 64 MiB of the
    writeback and the rest waits for room, so the close waits, as it would
    for the pool itself; after the resume all of it is there."""
    import hashlib
    p, vol = wb_volume(pool, 128 * MiB)
    data = b"".join(pattern(100 + i, MiB) for i in range(96))
    fd = os.open(vol, os.O_WRONLY)
    closed = threading.Event()
    try:
        p.ctl("suspend", "vm1", timeout=20)
        assert os.pwrite(fd, data, 0) == len(data)     # whole pages: nothing is read
        closer = threading.Thread(target=lambda: (os.close(fd), closed.set()), daemon=True)
        closer.start()
        closer.join(1.0)
        assert not closed.is_set(), "past 64 MiB the writeback must wait for room"
        assert wait_for(lambda: ctl_in_process(p, "status", "--json")["pool"]["held_in_core"] >= 1)
        stashed = ctl_in_process(p, "status", "--json")["pool"]["stashed_writeback_bytes"]
        assert 0 < stashed <= 64 * MiB, stashed
        ctl_in_process(p, "resume", "vm1")
        bounded(closer.join, timeout=60, what="the close after the resume")
    finally:
        if not closed.is_set():
            ctl_in_process(p, "resume", "vm1")
    fsync_path(vol)
    want = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(read_direct(vol, 0, len(data))).hexdigest() == want
    p.remount()
    assert hashlib.sha256(read_direct(vol, 0, len(data))).hexdigest() == want


def test_a_daemon_killed_while_a_snapshot_writes_back_cached_pages_exits(pool):
    """mkdir .snapshots/NAME first writes back what the kernel caches of open
    volumes, by an fsync through the mount.  Killed (SIGKILL) while that
    waits for a writeback the daemon is slow to finish, the daemon still
    exits, the kernel ends the mount's connection (the mkdir fails), and the
    pool mounts again with what was fsynced.  A daemon thread waiting for
    its own mount's writeback would wait uninterruptibly and keep the
    daemon from ever exiting; the fsync is a child's."""
    p = pool(options=WB, mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    vol = create(p.mnt / "vm1", 4 * MiB)
    write_at(vol, 0, pattern(1, 4 * BS))
    # First: thinfs-ctl's exec would close an inherited copy of fd, which writes back.
    p.ctl("fault", "data", "write", "delay", "5000000")
    fd = open_dirty(vol, 0, pattern(2, 4 * BS))
    errors = []

    def snapshot():
        try:
            os.mkdir(p.mnt / ".snapshots" / "g1")
        except OSError as e:
            errors.append(e.errno)

    try:
        t = threading.Thread(target=snapshot)
        t.start()
        time.sleep(1)                      # its writeback in the daemon, delayed 5 s
        assert t.is_alive()
        p.kill9(timeout=20)
        bounded(t.join, what="the mkdir after the kill")
        assert errors and errors[0] in (errno.ENOTCONN, errno.ECONNABORTED), errors
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    p.mount("--allow-faults")
    got, old, new = read_at(vol, 0, 4 * BS), pattern(1, 4 * BS), pattern(2, 4 * BS)
    for at in range(0, 4 * BS, 4096):      # each page as fsynced, or as written after
        assert got[at:at + 4096] in (old[at:at + 4096], new[at:at + 4096]), at
