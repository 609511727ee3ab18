# SPDX-License-Identifier: GPL-2.0-or-later
"""I/O through volumes (issue 3): fio with crc32c verification and two jobs,
concurrent writes to the same blocks (range locks), copy-on-write races
between an origin and its snapshot, discard passdown reaching the data
file, losetup --direct-io=on, running out of data space; O_DIRECT writers
of one file in parallel, O_DIRECT at any alignment (issue 10)."""
import errno
import mmap
import os
import re
import shutil
import threading

import pytest

from conftest import run_cmd
from daemon_util import (BS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MiB, aligned, create,
                         du, fallocate, fsync_path, pattern, read_at, read_direct, wait_for,
                         write_at, write_direct)


def fio(*args, timeout=300):
    """fio, run in the pool's directory so that nothing lands in the cwd
    (fio saves verify state files there unless told not to)."""
    if not shutil.which("fio"):
        pytest.fail("fio not installed (scripts/install-deps.sh)")
    filename = next(a for a in args if a.startswith("--filename="))
    r = run_cmd("fio", "--output-format=terse", "--verify_state_save=0", *args, check=False,
                timeout=timeout, cwd=os.path.dirname(os.path.dirname(filename[11:])))
    assert r.returncode == 0, f"fio {args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


# ---- fio -------------------------------------------------------------------------------

def test_fio_verify_crc32c_two_jobs_buffered(pool):
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 64 * MiB)
    fio("--name=verify", f"--filename={vol}", "--rw=randwrite", "--bsrange=4k-192k",
        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--ioengine=psync",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--fsync_on_close=1")
    # A second pass over what is now mapped: overwrite in place, verify again.
    fio("--name=overwrite", f"--filename={vol}", "--rw=randwrite", "--bs=4k",
        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--ioengine=psync",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
    p.remount()
    # Verify only, after the remount: what was written last is still there.
    fio("--name=overwrite", f"--filename={vol}", "--rw=randwrite", "--bs=4k",
        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--ioengine=psync",
        "--verify=crc32c", "--verify_fatal=1", "--verify_only=1")


def test_fio_verify_crc32c_two_jobs_direct_libaio(pool):
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 64 * MiB)
    fio("--name=direct", f"--filename={vol}", "--rw=randwrite", "--bs=64k",
        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--ioengine=libaio",
        "--iodepth=8", "--direct=1", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
    fio("--name=direct-1m", f"--filename={vol}", "--rw=write", "--bs=1M",
        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--ioengine=libaio",
        "--iodepth=4", "--direct=1", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")


def test_fio_verify_four_direct_writers_of_one_file(pool):
    """Synchronous O_DIRECT writers of one file run in parallel (the kernel
    takes the inode lock shared: FOPEN_PARALLEL_DIRECT_WRITES); each job
    writes and verifies its own quarter, first allocating, then overwriting."""
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 32 * MiB)
    for name in ("allocate", "overwrite"):
        fio(f"--name={name}", f"--filename={vol}", "--rw=randwrite", "--bsrange=4k-128k",
            "--size=8M", "--numjobs=4", "--offset_increment=8M", "--ioengine=psync",
            "--direct=1", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
    fsync_path(vol)
    assert p.used() == 32 * MiB // BS


def test_fio_verify_on_a_snapshot_leaves_the_origin(pool):
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 64 * MiB)
    base = pattern(1, 8 * MiB)
    write_at(vol, 0, base)
    p.ctl("snapshot", "vm1", "clone")
    fio("--name=clone", f"--filename={p.mnt / 'clone'}", "--rw=randwrite", "--bsrange=4k-128k",
        "--size=8M", "--numjobs=2", "--offset_increment=4M", "--ioengine=psync",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
    assert read_at(vol, 0, 8 * MiB) == base


# ---- concurrency on the same blocks ----------------------------------------------------

def run_threads(fns):
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:      # noqa: B902 - reported below
            errors.append(e)
    ts = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_concurrent_partial_writes_into_fresh_blocks_lose_nothing(pool):
    """Four writers fill the four quarters of the same unmapped blocks at
    once (O_DIRECT: each write reaches the daemon as it is, and writes to
    one file run in parallel): allocation and zeroing of the rest of the
    block must not race with the other quarters."""
    p = pool()
    vol = p.mnt / "vm1"
    nblk = 64
    create(vol, nblk * BS)
    part = BS // 4

    def writer(which):
        def run():
            buf = aligned(part)
            buf[:] = bytes([0x11 + which]) * part
            fd = os.open(vol, os.O_RDWR | os.O_DIRECT)
            try:
                for b in range(nblk):
                    os.pwritev(fd, [buf], b * BS + which * part)
            finally:
                os.close(fd)
        return run
    run_threads([writer(i) for i in range(4)])
    got = read_at(vol, 0, nblk * BS)
    assert got == b"".join(bytes([0x11 + i]) * part for i in range(4)) * nblk
    assert p.volume("vm1")["mapped_blocks"] == nblk
    fsync_path(vol)
    assert p.used() == nblk


def test_concurrent_writes_to_origin_and_snapshot_break_sharing_once_each(pool):
    p = pool()
    nblk = 32
    create(p.mnt / "vm1", nblk * BS)
    base = pattern(1, nblk * BS)
    write_at(p.mnt / "vm1", 0, base)
    p.ctl("snapshot", "vm1", "clone")

    def writer(name, byte):
        def run():
            buf = aligned(4096)
            buf[:] = bytes([byte]) * 4096
            fd = os.open(p.mnt / name, os.O_RDWR | os.O_DIRECT)
            try:
                for b in range(nblk):
                    os.pwritev(fd, [buf], b * BS + 8192)
            finally:
                os.close(fd)
        return run
    run_threads([writer("vm1", 0xA1), writer("clone", 0xC1)])
    for name, byte in (("vm1", 0xA1), ("clone", 0xC1)):
        want = bytearray(base)
        for b in range(nblk):
            want[b * BS + 8192:b * BS + 8192 + 4096] = bytes([byte]) * 4096
        assert read_at(p.mnt / name, 0, nblk * BS) == bytes(want), name
    fsync_path(p.mnt / "vm1")
    assert p.used() == 2 * nblk
    for name in ("vm1", "clone"):
        v = p.volume(name)
        assert (v["mapped_blocks"], v["exclusive_blocks"]) == (nblk, nblk), v


# ---- O_DIRECT alignment -----------------------------------------------------------------

def test_direct_io_at_any_offset_length_and_address_is_served_exactly(pool):
    """FUSE holds O_DIRECT to no alignment: the kernel sends an odd offset,
    length or buffer address to the daemon as it is (a block device's
    filesystem would answer EINVAL), and the engine serves it byte-exact,
    as it serves buffered I/O at any offset.  The volume is made by an
    O_CREAT|O_DIRECT open, which takes the create path."""
    p = pool()
    vol = p.mnt / "vm1"
    size = 8 * BS
    fd = os.open(vol, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        os.ftruncate(fd, size)
        model = bytearray(size)
        base = pattern(1, 4 * BS)
        os.pwrite(fd, base, 0)              # an aligned bytes object: fine for FUSE too
        model[:4 * BS] = base
        # offset, length, buffer misalignment; the last two allocate a block
        cases = [(17, 100, 0), (BS - 3, 10, 0), (4096, 4096, 3), (2 * BS + 511, BS + 1, 1),
                 (5 * BS + 4095, 3, 0), (6 * BS, 4096, 7)]
        for i, (off, n, skew) in enumerate(cases):
            data = pattern(100 + i, n)
            buf = aligned(n + 4096)
            buf[skew:skew + n] = data
            assert os.pwritev(fd, [memoryview(buf)[skew:skew + n]], off) == n
            model[off:off + n] = data
            back = aligned(n + 4096)
            assert os.preadv(fd, [memoryview(back)[skew:skew + n]], off) == n
            assert back[skew:skew + n] == data, (off, n, skew)
        # Buffered I/O at odd offsets, through another open of the same file.
        write_at(vol, 3 * BS + 1, b"buffered", fsync=False)
        model[3 * BS + 1:3 * BS + 9] = b"buffered"
        assert read_at(vol, 0, size) == bytes(model)
        whole = aligned(size)
        assert os.preadv(fd, [whole], 0) == size and bytes(whole) == bytes(model)
        # FOPEN_DIRECT_IO: the kernel refuses a shared mapping of such a
        # descriptor (libfuse 3.14 cannot ask it to allow one); a buffered
        # descriptor of the same file maps as usual.
        with pytest.raises(OSError) as ei:
            mmap.mmap(fd, 4096, mmap.MAP_SHARED)
        assert ei.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    bfd = os.open(vol, os.O_RDONLY)
    try:
        with mmap.mmap(bfd, 4096, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == bytes(model[:4096])
    finally:
        os.close(bfd)
    p.remount()
    assert read_at(vol, 0, size) == bytes(model)


def test_buffered_and_direct_opens_of_one_file_see_each_others_writes(pool):
    """An O_DIRECT open bypasses the page cache on its own path
    (FOPEN_DIRECT_IO); a buffered open of the same file that has the block
    cached still reads what the direct write left, and a direct read sees a
    buffered write."""
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 4 * MiB)
    write_at(vol, 0, pattern(1, 2 * BS))
    fd = os.open(vol, os.O_RDONLY)
    try:
        assert os.pread(fd, BS, 0) == pattern(1, 2 * BS)[:BS]      # now in the page cache
        write_direct(vol, 0, pattern(2, BS))
        assert os.pread(fd, BS, 0) == pattern(2, BS)
        write_at(vol, BS, pattern(3, BS), fsync=False)
        assert read_direct(vol, BS, BS) == pattern(3, BS)
    finally:
        os.close(fd)


# ---- discard passdown ---------------------------------------------------------------------

def punch(path, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_discard_reaches_the_data_file(pool):
    n = 32
    p = pool()
    create(p.mnt / "vm1", 8 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, n * BS))
    before = du(p.data)
    assert before >= n * BS
    discards0 = p.status()["pool"]["io"]["data"]["discards"]
    punch(p.mnt / "vm1", 0, n * BS)
    assert p.used() == 0
    # Passdown may follow the commit that freed the blocks: bounded wait.
    assert wait_for(lambda: du(p.data) <= before - n * BS, timeout=5), \
        f"data file du {before} -> {du(p.data)}, expected to drop by {n * BS}"
    assert p.status()["pool"]["io"]["data"]["discards"] > discards0
    assert read_at(p.mnt / "vm1", 0, n * BS) == bytes(n * BS)


def test_discard_of_a_shared_block_frees_nothing(pool):
    n = 8
    p = pool()
    create(p.mnt / "vm1", 8 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, n * BS))
    os.mkdir(p.mnt / ".snapshots" / "g")
    before = du(p.data)
    punch(p.mnt / "vm1", 0, n * BS)
    assert p.used() == n
    assert p.volume("vm1")["mapped_blocks"] == 0
    fsync_path(p.mnt / "vm1")
    assert du(p.data) == before
    assert read_at(p.mnt / ".snapshots" / "g" / "vm1", 0, n * BS) == pattern(1, n * BS)
    os.rmdir(p.mnt / ".snapshots" / "g")
    assert p.used() == 0
    assert wait_for(lambda: du(p.data) <= before - n * BS, timeout=5), \
        "deleting the last sharer did not pass the discard down"


def test_no_discard_passdown_keeps_the_data_file(pool):
    n = 16
    p = pool(options={"discard_passdown": "false"})
    create(p.mnt / "vm1", 8 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, n * BS))
    before = du(p.data)
    punch(p.mnt / "vm1", 0, n * BS)
    assert p.used() == 0
    assert p.status()["pool"]["discard_passdown"] is False
    p.unmount()
    assert du(p.data) == before
    p.mount()


def test_freed_blocks_are_reused(pool):
    p = pool(data_size=8 * MiB)         # 128 blocks
    create(p.mnt / "vm1", 8 * MiB)
    for seed in range(4):                # 4 x 100 blocks through a 128-block pool
        write_at(p.mnt / "vm1", 0, pattern(seed, 100 * BS))
        assert p.used() == 100
        punch(p.mnt / "vm1", 0, 100 * BS)
        assert p.used() == 0


# ---- loop devices ---------------------------------------------------------------------------

def test_losetup_direct_io_on_a_volume(pool):
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 32 * MiB)
    dev = p.losetup(vol, "--direct-io=on")
    name = os.path.basename(dev)
    with open(f"/sys/block/{name}/loop/dio") as f:
        assert f.read().strip() == "1", "the loop device fell back to buffered I/O"
    data = pattern(1, 4 * MiB)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], 3 * MiB) == len(data)
        os.fsync(fd)
        rbuf = aligned(len(data))
        assert os.preadv(fd, [rbuf], 3 * MiB) == len(data)
        assert rbuf[:] == data
    finally:
        os.close(fd)
    assert read_at(vol, 3 * MiB, len(data)) == data
    run_cmd("mkfs.ext4", "-q", "-F", dev, timeout=300)
    r = run_cmd("fsck.ext4", "-fn", dev, check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    p.detach(dev)


def test_loop_device_discard_unmaps_volume_blocks(pool):
    """blkdiscard on a loop device over a volume punches the volume's file:
    the pool frees the blocks."""
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 32 * MiB)
    write_at(vol, 0, pattern(1, 4 * MiB))
    assert p.used() == 4 * MiB // BS
    dev = p.losetup(vol)
    run_cmd("blkdiscard", dev)
    p.detach(dev)
    fsync_path(vol)
    assert p.used() == 0
    assert read_at(vol, 0, 4 * MiB) == bytes(4 * MiB)


# ---- max_threads: the bound on FUSE workers ------------------------------------------------

# The daemon's threads that are not FUSE workers: the main thread (waiting in
# libfuse's session loop), the commit thread, the event thread and the control
# server's accept thread.  A control client or a running on_event hook adds one
# while it lasts; this test has neither while it samples.
OWN_THREADS = 4
# ...and one that comes and goes: each commit runs its data flush on a thread
# of its own beside the metadata writes (pool.c, write_commit), and the
# writes below make commits.
COMMIT_FLUSH_THREAD = 1


def test_max_threads_bounds_the_fuse_workers_under_concurrent_io(pool):
    """max_threads = 8 under 4 fio jobs at queue depth 16 (64 requests at
    once, over two volumes): the data verifies, and the daemon never has
    more than 8 workers alive (sampled from /proc/PID/task throughout)."""
    p = pool(options={"max_threads": "8"})
    assert p.status()["pool"]["max_threads"] == 8
    for name in ("vm1", "vm2"):
        create(p.mnt / name, 64 * MiB)
    counts, failures = [], []
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                counts.append(len(os.listdir(f"/proc/{p.pid}/task")))
            except FileNotFoundError:
                failures.append("the daemon is gone")
                return
            done.wait(0.01)

    def run(name):
        try:
            fio(f"--name={name}", f"--filename={p.mnt / name}", "--rw=randwrite",
                "--bsrange=4k-128k", "--size=24M", "--numjobs=2", "--offset_increment=32M",
                "--ioengine=libaio", "--iodepth=16", "--direct=1", "--verify=crc32c",
                "--verify_fatal=1", "--do_verify=1")
        except BaseException as e:   # noqa: B902 - reported by the main thread
            failures.append(f"{name}: {e}")

    sampler = threading.Thread(target=sample)
    sampler.start()
    writers = [threading.Thread(target=run, args=(n,)) for n in ("vm1", "vm2")]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    sampler.join()
    assert not failures, failures
    assert counts and min(counts) > OWN_THREADS, counts[:20]
    assert max(counts) <= 8 + OWN_THREADS + COMMIT_FLUSH_THREAD, \
        f"{max(counts)} threads with max_threads = 8 (+{OWN_THREADS} of the daemon's own " \
        f"and {COMMIT_FLUSH_THREAD} for a commit's data flush)"
    assert p.status()["pool"]["max_threads"] == 8


# ---- out of data space ----------------------------------------------------------------------

def test_error_if_no_space_fails_writes_with_enospc_and_keeps_data(pool):
    p = pool(data_size=4 * MiB, options={"error_if_no_space": "true"})   # 64 blocks
    p.expect_log(r"(?i)space|ENOSPC")
    create(p.mnt / "vm1", 8 * MiB)
    keep = pattern(1, 32 * BS)
    write_at(p.mnt / "vm1", 0, keep)
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            for b in range(32, 128):
                os.pwrite(fd, pattern(b, BS), b * BS)
            os.fsync(fd)
        assert ei.value.errno == errno.ENOSPC, ei.value
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    st = p.status()["pool"]
    assert st["data"]["used_blocks"] == st["data"]["total_blocks"] == 64
    assert read_at(p.mnt / "vm1", 0, 32 * BS) == keep
    p.remount()
    assert read_at(p.mnt / "vm1", 0, 32 * BS) == keep
    # As dm-thin: the pool reports running out (checked last, after the data).
    assert st["mode"] == "out_of_data_space", st


# ---- one cache: the devices with O_DIRECT (host_cache = off) ------------------------------

def data_io(p):
    return p.status()["pool"]["io"]["data"]


def direct_pread(path, off, n):
    data = read_direct(path, off, n)
    assert len(data) == n
    return data


def direct_pwrite(path, off, data):
    write_direct(path, off, data)
    fsync_path(path)


def storage_read_bytes(pid):
    """What the daemon's threads read from storage (not from the page cache)."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def test_a_direct_4k_read_of_a_volume_reads_4k_of_the_device_every_time(pool):
    """host_cache is off by default: an O_DIRECT read of a mapped block
    moves exactly what was asked from the data device, and a second read of
    it goes to the device again (no copy in the host's page cache)."""
    p = pool()
    st = p.status()["pool"]
    assert st["direct_io"] is True
    assert "devices O_DIRECT" in p.ctl("status").stdout
    assert re.search(r"data and metadata devices opened with O_DIRECT", p.log_text())
    vol = p.mnt / "vm1"
    create(vol, 4 * BS)
    direct_pwrite(vol, 0, pattern(3, BS))
    w0 = data_io(p)["write_bytes"]
    direct_pwrite(vol, 8192, pattern(4, 4096))  # an overwrite in place: 4 KiB down
    assert data_io(p)["write_bytes"] - w0 == 4096
    want = pattern(3, BS)[:8192] + pattern(4, 4096)
    on_block_storage = run_cmd("stat", "-f", "-c", "%T", p.data).stdout.strip() != "tmpfs"
    for _ in range(2):
        before, disk_before = data_io(p)["read_bytes"], storage_read_bytes(p.pid)
        assert direct_pread(vol, 8192, 4096) == want[8192:]
        assert data_io(p)["read_bytes"] - before == 4096
        if on_block_storage:
            assert storage_read_bytes(p.pid) - disk_before >= 4096
    assert direct_pread(vol, 0, 3 * 4096) == want


def odd_io_round(p, seed):
    """Buffered writes and reads at odd offsets and lengths (FUSE passes them
    on as they are), across block edges, into fresh blocks (zeroed around
    the data) and into blocks shared with a snapshot (copied first), checked
    against a model, read back buffered and with O_DIRECT."""
    import random
    rnd = random.Random(seed)
    size = 8 * BS
    vol = p.mnt / "odd"
    create(vol, size)
    model = bytearray(size)
    fd = os.open(vol, os.O_RDWR)
    try:
        for i in range(60):
            if i == 30:
                os.fsync(fd)
                os.mkdir(p.mnt / ".snapshots" / "before")
                frozen = bytes(model)
            n = rnd.randrange(1, 3 * BS // 2)
            off = rnd.randrange(0, size - n)
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            m = rnd.randrange(1, 20000)
            k = rnd.randrange(0, size - m)
            assert os.pread(fd, m, k) == bytes(model[k:k + m])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_at(vol, 0, size) == bytes(model)
    assert direct_pread(vol, 0, size) == bytes(model)
    assert read_at(p.mnt / ".snapshots" / "before" / "odd", 0, size) == frozen


def test_odd_direct_io_through_a_volume_works_over_direct_devices(pool):
    """FUSE passes O_DIRECT requests at odd offsets, of odd lengths and from
    odd addresses on as they are (the kernel refuses none): the data device,
    itself O_DIRECT, stages them in whole sectors."""
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 4 * BS)
    model = bytearray(4 * BS)
    buf = aligned(2 * BS)
    fd = os.open(vol, os.O_RDWR | os.O_DIRECT)
    try:
        for i, (off, skew, n) in enumerate(((7, 0, 4096), (BS - 3, 1, 100), (4096, 5, 4096),
                                            (2 * BS + 11, 3, BS + 17), (9, 0, 1))):
            data = pattern(10 + i, n)
            buf[skew:skew + n] = data
            assert os.pwritev(fd, [memoryview(buf)[skew:skew + n]], off) == n
            model[off:off + n] = data
        os.fsync(fd)
        for off, skew, n in ((0, 0, 4 * BS), (5, 1, 5000), (BS - 10, 7, 20)):
            got = memoryview(buf)[skew:skew + n] if n <= 2 * BS - skew else aligned(n)
            assert os.preadv(fd, [got], off) == n
            assert bytes(got) == bytes(model[off:off + n])
    finally:
        os.close(fd)
    assert read_at(vol, 0, 4 * BS) == bytes(model)


def test_odd_buffered_io_works_over_direct_devices(pool):
    p = pool()
    odd_io_round(p, 1)


def test_host_cache_on_uses_the_page_cache_and_works_alike(pool):
    p = pool(options={"host_cache": "on"})
    assert p.status()["pool"]["direct_io"] is False
    assert "devices through the host page cache" in p.ctl("status").stdout
    assert re.search(r"data and metadata devices opened through the host page cache",
                     p.log_text())
    odd_io_round(p, 2)
    before = data_io(p)["read_bytes"]
    assert direct_pread(p.mnt / "odd", 4096, 4096) == read_at(p.mnt / "odd", 4096, 4096)
    assert data_io(p)["read_bytes"] - before >= 4096
