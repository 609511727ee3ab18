# SPDX-License-Identifier: GPL-2.0-or-later
"""Snapshots (issue 3): snapshot groups under .snapshots/ (mkdir, ls,
rmdir), writable thin snapshots (thinfs-ctl snapshot SRC NEW), copy on
write of shared blocks, and exact used-block accounting through
`thinfs-ctl status --json`.  Also ext4 over a loop device over a volume:
fsck clean, and a group snapshot of it taken while mounted fscks clean and
shows the files as of the snapshot."""
import calendar
import errno
import os
import re
import stat
import threading
import time

import pytest

from daemon_util import (BS, MiB, aligned, create, expect_errno, fsync_path, pattern, read_at,
                         read_direct, write_at, write_direct)
from conftest import run_cmd

N = 8   # blocks written in the accounting tests


def snapdir(p, group):
    return p.mnt / ".snapshots" / group


# ---- group snapshots --------------------------------------------------------------

def test_group_snapshot_lists_every_volume_sharing_all_blocks(pool):
    p = pool()
    data = {}
    for i, name in enumerate(("vm1", "vm2", "vm3")):
        create(p.mnt / name, (i + 1) * MiB)
        data[name] = pattern(i, (i + 1) * 2 * BS)
        write_at(p.mnt / name, 0, data[name])
    used = p.used()
    os.mkdir(snapdir(p, "nightly"))
    assert os.listdir(p.mnt / ".snapshots") == ["nightly"]
    assert sorted(os.listdir(snapdir(p, "nightly"))) == ["vm1", "vm2", "vm3"]
    assert p.used() == used                     # sharing all blocks
    for i, name in enumerate(("vm1", "vm2", "vm3")):
        st = os.stat(snapdir(p, "nightly") / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == (i + 1) * MiB
        assert read_at(snapdir(p, "nightly") / name, 0, len(data[name])) == data[name]
    groups = p.status()["snapshot_groups"]
    assert [g["name"] for g in groups] == ["nightly"]
    assert sorted(groups[0]["volumes"]) == ["vm1", "vm2", "vm3"]
    p.remount()
    assert sorted(os.listdir(snapdir(p, "nightly"))) == ["vm1", "vm2", "vm3"]
    assert read_at(snapdir(p, "nightly") / "vm2", 0, len(data["vm2"])) == data["vm2"]


def test_group_snapshot_files_are_read_only(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, b"origin")
    os.mkdir(snapdir(p, "g"))
    f = snapdir(p, "g") / "vm1"
    assert stat.S_IMODE(os.stat(f).st_mode) & 0o222 == 0
    ro = (errno.EROFS, errno.EACCES, errno.EPERM)
    expect_errno(ro, os.open, f, os.O_WRONLY)
    expect_errno(ro, os.open, f, os.O_RDWR)
    expect_errno(ro, os.truncate, f, 0)
    expect_errno(ro, os.unlink, f)
    expect_errno(ro, os.open, snapdir(p, "g") / "new", os.O_CREAT | os.O_WRONLY)
    expect_errno(ro + (errno.ENOTSUP,), os.chmod, f, 0o666)
    assert read_at(f, 0, 6) == b"origin"


def test_members_keep_their_origins_owner_group_and_read_bits(open_dir, pool):
    """With allow_other, a snapshot of a private volume stays private: a member
    has its origin's owner, group and read/execute bits of the moment of the
    mkdir, never a write bit (issue 9)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    p = pool(mnt=open_dir / "mnt", mount_opts=("-o", "allow_other"))
    want = {}   # volume -> (mode, uid, gid) of its member
    for name, mode, owner, member_mode in (("private", 0o600, (0, 0), 0o400),
                                           ("public", 0o644, (0, 0), 0o444),
                                           ("nobodys", 0o600, (65534, 65534), 0o400),
                                           ("group", 0o640, (0, 65534), 0o440),
                                           ("suid", 0o4775, (0, 0), 0o555)):
        create(p.mnt / name, MiB)
        write_at(p.mnt / name, 0, name.encode())
        os.chown(p.mnt / name, *owner)
        os.chmod(p.mnt / name, mode)
        want[name] = (member_mode,) + owner
    os.mkdir(snapdir(p, "g"))
    # Later changes to an origin do not reach its members.
    os.chmod(p.mnt / "public", 0o600)
    os.chown(p.mnt / "nobodys", 0, 0)

    def check():
        for name, (mode, uid, gid) in want.items():
            st = os.stat(snapdir(p, "g") / name)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), \
                f"member {name}: {oct(st.st_mode)} {st.st_uid}:{st.st_gid}"
        # nobody reads what its bits allow, and writes no member.
        for name, readable in (("private", False), ("public", True), ("nobodys", True),
                               ("group", True), ("suid", True)):
            f = snapdir(p, "g") / name
            r = run_cmd(*as_nobody, "head", "-c", len(name), f, check=False)
            assert (r.returncode == 0) == readable, f"nobody reading {name}: {r.stderr}"
            if readable:
                assert r.stdout == name
            r = run_cmd(*as_nobody, "dd", "if=/dev/zero", f"of={f}", "bs=1", "count=1",
                        "conv=notrunc", check=False)
            assert r.returncode != 0 and "ermission denied" in r.stderr, r.stderr
        # Not even root writes a member, or changes its attributes.
        f = snapdir(p, "g") / "private"
        expect_errno(errno.EROFS, os.open, f, os.O_WRONLY)
        expect_errno(errno.EROFS, os.chmod, f, 0o644)
        expect_errno(errno.EROFS, os.chown, f, 65534, 65534)

    check()
    p.remount("-o", "allow_other")
    check()
    # A writable clone of a member is no wider than the member, plus the owner's write.
    p.ctl("snapshot", "g/private", "clone")
    st = os.stat(p.mnt / "clone")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)


def test_writes_after_a_group_snapshot_land_only_in_the_origin(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    before = pattern(1, 4 * BS)
    write_at(p.mnt / "vm1", 0, before)
    os.mkdir(snapdir(p, "g"))
    after = pattern(2, 2 * BS)
    write_at(p.mnt / "vm1", BS, after)              # shared blocks: copied first
    write_at(p.mnt / "vm1", 8 * BS, after)          # unmapped in both
    assert read_at(snapdir(p, "g") / "vm1", 0, MiB) == before + bytes(MiB - 4 * BS)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == before[:BS] + after + before[3 * BS:]
    assert read_at(p.mnt / "vm1", 8 * BS, 2 * BS) == after
    p.remount()
    assert read_at(snapdir(p, "g") / "vm1", 0, MiB) == before + bytes(MiB - 4 * BS)


def test_snapshot_includes_writes_that_returned_before_it(pool):
    """One instant: a write() that returned before mkdir is in the snapshot,
    even with the file still open and never fsynced (no page-cache lag)."""
    p = pool()
    create(p.mnt / "vm1", MiB)
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    try:
        os.pwrite(fd, b"written before the snapshot", 0)
        os.mkdir(snapdir(p, "g"))
        os.pwrite(fd, b"WRITTEN AFTER  THE SNAPSHOT", 0)
    finally:
        os.close(fd)
    assert read_at(snapdir(p, "g") / "vm1", 0, 27) == b"written before the snapshot"
    assert read_at(p.mnt / "vm1", 0, 27) == b"WRITTEN AFTER  THE SNAPSHOT"


def test_group_snapshot_is_atomic_across_volumes(pool):
    """A writer stamps counter k into vm1 and then into vm2 with O_DIRECT
    (each write answered by the daemon before the next).  In any snapshot,
    vm2's counter is vm1's or one less: a snapshot of vm1 taken before vm2's
    would show vm2 ahead."""
    p = pool()
    for name in ("vm1", "vm2"):
        create(p.mnt / name, MiB)
    stop = threading.Event()
    errors = []

    def writer():
        fds = [os.open(p.mnt / n, os.O_RDWR | os.O_DIRECT) for n in ("vm1", "vm2")]
        buf = aligned(4096)
        k = 0
        try:
            while not stop.is_set():
                k += 1
                buf[:8] = k.to_bytes(8, "little")
                for fd in fds:
                    os.pwritev(fd, [buf], 0)
        except OSError as e:
            errors.append(e)
        finally:
            for fd in fds:
                os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(10):
            time.sleep(0.05)
            os.mkdir(snapdir(p, f"s{i}"))
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    for i in range(10):
        k1 = int.from_bytes(read_at(snapdir(p, f"s{i}") / "vm1", 0, 8), "little")
        k2 = int.from_bytes(read_at(snapdir(p, f"s{i}") / "vm2", 0, 8), "little")
        assert k2 in (k1, k1 - 1), f"snapshot s{i}: vm1 at {k1}, vm2 at {k2}"


def test_ls_snapshots_shows_creation_times_as_mtime(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    t0 = time.time()
    os.mkdir(snapdir(p, "first"))
    time.sleep(1.1)
    os.mkdir(snapdir(p, "second"))
    t1 = time.time()
    m1 = os.stat(snapdir(p, "first")).st_mtime
    m2 = os.stat(snapdir(p, "second")).st_mtime
    assert int(t0) <= m1 <= t1 + 1
    assert m1 < m2 <= t1 + 1
    assert sorted(os.listdir(p.mnt / ".snapshots")) == ["first", "second"]
    # status --json "created" is the same instant, as UTC ISO 8601.
    created = {g["name"]: g["created"] for g in p.status()["snapshot_groups"]}
    for name, m in (("first", m1), ("second", m2)):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", created[name]), created
        c = calendar.timegm(time.strptime(created[name][:19], "%Y-%m-%dT%H:%M:%S"))
        assert c == int(m), (created[name], m)
    p.remount()
    assert os.stat(snapdir(p, "first")).st_mtime == m1
    assert os.stat(snapdir(p, "second")).st_mtime == m2


def test_rmdir_deletes_the_group_and_frees_its_blocks(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    os.mkdir(snapdir(p, "g"))
    write_at(p.mnt / "vm1", 0, pattern(2, N * BS))       # breaks all sharing
    assert p.used() == 2 * N
    os.rmdir(snapdir(p, "g"))
    assert os.listdir(p.mnt / ".snapshots") == []
    assert p.status()["snapshot_groups"] == []
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    assert p.used() == N
    assert read_at(p.mnt / "vm1", 0, N * BS) == pattern(2, N * BS)
    expect_errno(errno.ENOENT, os.rmdir, snapdir(p, "g"))
    p.remount()
    assert os.listdir(p.mnt / ".snapshots") == []


def test_snapshot_group_names_are_validated_and_unique(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    os.mkdir(snapdir(p, "g"))
    expect_errno(errno.EEXIST, os.mkdir, snapdir(p, "g"))
    expect_errno((errno.EINVAL, errno.EPERM), os.mkdir, snapdir(p, "bad\nname"))
    assert os.listdir(p.mnt / ".snapshots") == ["g"]


def test_group_snapshot_of_an_empty_pool(pool):
    p = pool()
    os.mkdir(snapdir(p, "empty"))
    assert os.listdir(snapdir(p, "empty")) == []
    os.rmdir(snapdir(p, "empty"))


def test_volumes_created_after_a_group_are_not_in_it(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    os.mkdir(snapdir(p, "g"))
    create(p.mnt / "vm2", MiB)
    os.unlink(p.mnt / "vm1")
    assert os.listdir(snapdir(p, "g")) == ["vm1"]
    assert [v["name"] for v in p.volumes()] == ["vm2"]
    assert p.status()["snapshot_groups"][0]["volumes"] == ["vm1"]


# ---- writable snapshots -------------------------------------------------------------

def test_writable_snapshot_is_a_volume_of_its_own(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    orig = pattern(3, 4 * BS)
    write_at(p.mnt / "vm1", 0, orig)
    p.ctl("snapshot", "vm1", "clone")
    assert sorted(n for n in os.listdir(p.mnt) if n != ".snapshots") == ["clone", "vm1"]
    clone = p.volume("clone")
    assert clone["id"] != p.volume("vm1")["id"]
    assert clone["size"] == MiB and os.stat(p.mnt / "clone").st_size == MiB
    assert read_at(p.mnt / "clone", 0, 4 * BS) == orig
    # Writes to the snapshot never reach the origin...
    write_at(p.mnt / "clone", BS, pattern(4, 2 * BS))
    write_at(p.mnt / "clone", 10 * BS, pattern(5, BS))
    os.truncate(p.mnt / "clone", 2 * MiB)
    assert read_at(p.mnt / "vm1", 0, MiB) == orig + bytes(MiB - 4 * BS)
    assert os.stat(p.mnt / "vm1").st_size == MiB
    # ...and writes to the origin never reach the snapshot.
    write_at(p.mnt / "vm1", 3 * BS, pattern(6, BS))
    want = orig[:BS] + pattern(4, 2 * BS) + orig[3 * BS:]
    assert read_at(p.mnt / "clone", 0, 4 * BS) == want
    p.remount()
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == orig[:3 * BS] + pattern(6, BS)
    assert read_at(p.mnt / "clone", 0, 4 * BS) == want
    assert read_at(p.mnt / "clone", 10 * BS, BS) == pattern(5, BS)


def test_punch_in_a_snapshot_leaves_the_origin(pool):
    from daemon_util import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
    p = pool()
    create(p.mnt / "vm1", MiB)
    orig = pattern(7, 4 * BS)
    write_at(p.mnt / "vm1", 0, orig)
    p.ctl("snapshot", "vm1", "clone")
    fd = os.open(p.mnt / "clone", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_at(p.mnt / "clone", 0, 4 * BS) == bytes(4 * BS)
    assert read_at(p.mnt / "vm1", 0, 4 * BS) == orig
    assert p.used() == 4


def test_snapshot_of_a_snapshot(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    p.ctl("snapshot", "vm1", "s1")
    write_at(p.mnt / "s1", 0, pattern(2, BS))
    p.ctl("snapshot", "s1", "s2")
    write_at(p.mnt / "s2", BS, pattern(3, BS))
    assert read_at(p.mnt / "vm1", 0, 2 * BS) == pattern(1, 2 * BS)
    assert read_at(p.mnt / "s1", 0, 2 * BS) == pattern(2, BS) + pattern(1, 2 * BS)[BS:]
    assert read_at(p.mnt / "s2", 0, 2 * BS) == pattern(2, BS) + pattern(3, BS)
    assert p.used() == 4


# ---- used-block accounting -------------------------------------------------------------

def test_used_blocks_exact_with_a_writable_snapshot(pool):
    p = pool()
    assert p.used() == 0
    create(p.mnt / "vm1", 64 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    assert p.used() == N
    assert p.volume("vm1")["mapped_blocks"] == N
    p.ctl("snapshot", "vm1", "snap")
    assert p.used() == N
    assert p.volume("snap")["mapped_blocks"] == N
    write_at(p.mnt / "snap", 0, pattern(2, N * BS))
    assert p.used() == 2 * N
    assert read_at(p.mnt / "vm1", 0, N * BS) == pattern(1, N * BS)
    p.ctl("delete", "snap")
    p.wait_used(N)
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    assert "snap" not in os.listdir(p.mnt)
    p.remount()
    assert p.used() == N


def test_exclusive_blocks_follow_sharing_with_a_writable_snapshot(pool):
    """exclusive_blocks: mapped blocks no other device shares (pool.h).
    Sharing ends when the other device rewrites or drops the block."""
    p = pool()
    create(p.mnt / "vm1", 64 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    v = p.volume("vm1")
    assert (v["mapped_blocks"], v["exclusive_blocks"]) == (N, N)
    p.ctl("snapshot", "vm1", "snap")
    for name in ("vm1", "snap"):
        v = p.volume(name)
        assert (v["mapped_blocks"], v["exclusive_blocks"]) == (N, 0), v
    write_at(p.mnt / "snap", 0, pattern(2, N * BS))
    for name in ("vm1", "snap"):
        v = p.volume(name)
        assert (v["mapped_blocks"], v["exclusive_blocks"]) == (N, N), v


def test_used_blocks_exact_with_a_group_snapshot(pool):
    p = pool()
    create(p.mnt / "vm1", 64 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    assert p.used() == N
    os.mkdir(snapdir(p, "g"))
    assert p.used() == N
    # Half the blocks rewritten in place: each copy breaks one share.
    write_at(p.mnt / "vm1", 0, pattern(2, (N // 2) * BS))
    assert p.used() == N + N // 2
    # A partial write to a shared block copies the whole block: +1.
    write_at(p.mnt / "vm1", (N - 1) * BS + 10, b"x" * 10)
    assert p.used() == N + N // 2 + 1
    assert read_at(snapdir(p, "g") / "vm1", 0, N * BS) == pattern(1, N * BS)
    os.rmdir(snapdir(p, "g"))
    assert p.used() == N


def test_exclusive_blocks_follow_sharing_with_a_group_snapshot(pool):
    p = pool()
    create(p.mnt / "vm1", 64 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    os.mkdir(snapdir(p, "g"))
    assert p.volume("vm1")["exclusive_blocks"] == 0
    write_at(p.mnt / "vm1", 0, pattern(2, (N // 2) * BS))
    assert p.volume("vm1")["exclusive_blocks"] == N // 2
    os.rmdir(snapdir(p, "g"))
    assert p.volume("vm1")["exclusive_blocks"] == N, "the group is gone: nothing shares"


def test_overwrite_of_an_exclusive_block_allocates_nothing(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    for seed in (2, 3):
        write_at(p.mnt / "vm1", 0, pattern(seed, N * BS))
        assert p.used() == N


# ---- first writes to blocks shared with a snapshot ------------------------------------

# (offset, length, O_DIRECT) of each first write below, in a volume of 8
# blocks shared whole with a snapshot: the start, middle and end of a
# block, 8 KiB across the boundary of two shared blocks, a whole block,
# and a buffered write at an odd offset and length.
FIRST_WRITES = [(0, 4096, True), (BS + 28 * 1024, 4096, True), (3 * BS - 4096, 4096, True),
                (4 * BS - 4096, 8192, True), (5 * BS, BS, True), (6 * BS + 1000, 3000, False)]


def data_io(p):
    return p.status()["pool"]["io"]["data"]


def shared_volume(p, seed):
    """vm1 of 8 blocks of pattern(seed), fsynced, shared whole with snapshot s1."""
    vol = create(p.mnt / "vm1", 8 * BS)
    write_direct(vol, 0, pattern(seed, 8 * BS))
    fsync_path(vol)
    p.ctl("snapshot", "vm1", "s1")
    return vol


def overlay(old, writes, seed):
    """old with each write's pattern(seed + i) laid over it."""
    want = bytearray(old)
    for i, (off, n, _) in enumerate(writes):
        want[off:off + n] = pattern(seed + i, n)
    return bytes(want)


def test_first_writes_to_shared_blocks_read_old_data_around_new(pool):
    """Each partial first write reads the shared block once and writes the
    new block once, whole (the old data with the new bytes laid over it in
    memory); a write covering a block whole reads nothing.  The snapshot
    keeps the old data.  Without the writeback cache, so that each buffered
    write reaches the pool as written (the cache would read whole pages
    first and send them back later, merged)."""
    p = pool(options={"writeback_cache": "off"})
    vol = shared_volume(p, 30)
    old = pattern(30, 8 * BS)
    io0 = data_io(p)
    for i, (off, n, direct) in enumerate(FIRST_WRITES):
        if direct:
            write_direct(vol, off, pattern(40 + i, n))
        else:
            write_at(vol, off, pattern(40 + i, n), fsync=False)
    io1 = data_io(p)
    partial = 6  # blocks 0, 1, 2, 3 and 4 (the straddling write), 6
    assert io1["read_bytes"] - io0["read_bytes"] == partial * BS
    assert io1["write_bytes"] - io0["write_bytes"] == (partial + 1) * BS
    assert p.used() == 8 + partial + 1
    want = overlay(old, FIRST_WRITES, 40)
    assert read_direct(vol, 0, 8 * BS) == want
    assert read_direct(p.mnt / "s1", 0, 8 * BS) == old
    # the second write to a broken block goes in place: nothing copied or allocated
    io1 = data_io(p)
    write_direct(vol, BS, pattern(50, 4096))
    assert data_io(p)["read_bytes"] == io1["read_bytes"]
    assert data_io(p)["write_bytes"] - io1["write_bytes"] == 4096
    assert p.used() == 8 + partial + 1
    want = want[:BS] + pattern(50, 4096) + want[BS + 4096:]
    fsync_path(vol)
    p.remount()
    assert read_direct(vol, 0, 8 * BS) == want
    assert read_at(p.mnt / "s1", 0, 8 * BS) == old


def test_fsynced_first_writes_to_shared_blocks_survive_a_kill9(pool):
    """A first write to a shared block is committed only after the new
    block is written: fsynced, it survives a crash; not fsynced, it may be
    lost whole (the volume then reads the old block, still shared), never
    half-copied.  The snapshot never sees the new data."""
    p = pool(options={"commit_interval": "600s"})
    vol = shared_volume(p, 60)
    old = pattern(60, 8 * BS)
    synced = [w for w in FIRST_WRITES if w[0] < 4 * BS - 4096]
    for i, (off, n, _) in enumerate(synced):
        write_direct(vol, off, pattern(70 + i, n))
    fsync_path(vol)
    write_direct(vol, 7 * BS + 4096, pattern(80, 4096))  # never flushed
    p.kill9()
    p.mount()
    got = read_direct(vol, 0, 8 * BS)
    want = overlay(old, synced, 70)
    assert got[:7 * BS] == want[:7 * BS]
    unsynced = want[7 * BS:7 * BS + 4096] + pattern(80, 4096) + want[7 * BS + 8192:]
    assert got[7 * BS:] in (want[7 * BS:], unsynced)
    assert read_direct(p.mnt / "s1", 0, 8 * BS) == old
    # the pool goes on: the lost break is made again
    write_direct(vol, 7 * BS + 4096, pattern(81, 4096))
    fsync_path(vol)
    assert read_direct(vol, 7 * BS, BS) == old[7 * BS:7 * BS + 4096] + pattern(81, 4096) + \
        old[7 * BS + 8192:]
    assert read_direct(p.mnt / "s1", 0, 8 * BS) == old


def test_delete_volume_frees_only_unshared_blocks(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, N * BS))
    p.ctl("snapshot", "vm1", "snap")
    write_at(p.mnt / "vm1", 0, pattern(2, 2 * BS))
    assert p.used() == N + 2
    os.unlink(p.mnt / "vm1")
    p.wait_used(N)
    assert read_at(p.mnt / "snap", 0, N * BS) == pattern(1, N * BS)


# ---- ext4 over a loop device over a volume -------------------------------------------

def test_ext4_on_a_volume_and_a_group_snapshot_of_it_fsck_clean(pool, tmp_path):
    p = pool()
    vol = p.mnt / "vm1"
    create(vol, 256 * MiB)
    dev = p.losetup(vol)
    run_cmd("mkfs.ext4", "-q", "-F", dev, timeout=300)
    fs = p.mount_fs(dev, tmp_path / "fs")
    files = {f"file{i}": pattern(i, 10_000 * (i + 1)) for i in range(5)}
    for name, data in files.items():
        (fs / name).write_bytes(data)
    (fs / "dir").mkdir()
    (fs / "dir" / "nested").write_bytes(b"nested")
    run_cmd("sync", "-f", fs)
    # fsfreeze: ext4 flushes its journal and clears needs_recovery, so the
    # snapshot is a clean filesystem (what LVM does around a dm snapshot).
    run_cmd("fsfreeze", "-f", fs)
    try:
        os.mkdir(snapdir(p, "s1"))
    finally:
        run_cmd("fsfreeze", "-u", fs)
    # Later writes land only in the origin.
    (fs / "file0").write_bytes(b"changed after the snapshot")
    (fs / "late").write_bytes(pattern(99, 300_000))
    (fs / "file1").unlink()
    run_cmd("sync", "-f", fs)
    assert p.used() > 0

    # The snapshot: a read-only loop device, fsck clean, the files as they were.
    sdev = p.losetup(snapdir(p, "s1") / "vm1", "-r")
    r = run_cmd("fsck.ext4", "-fn", sdev, check=False, timeout=300)
    assert r.returncode == 0, f"fsck of the snapshot:\n{r.stdout}{r.stderr}"
    sfs = p.mount_fs(sdev, tmp_path / "snapfs", "-o", "ro,noload")
    for name, data in files.items():
        assert (sfs / name).read_bytes() == data, name
    assert (sfs / "dir" / "nested").read_bytes() == b"nested"
    assert not (sfs / "late").exists()
    p.umount_fs(sfs)
    p.detach(sdev)

    # The origin: the later state, fsck clean once unmounted.
    assert (fs / "file0").read_bytes() == b"changed after the snapshot"
    assert not (fs / "file1").exists()
    p.umount_fs(fs)
    r = run_cmd("fsck.ext4", "-fn", dev, check=False, timeout=300)
    assert r.returncode == 0, f"fsck of the origin:\n{r.stdout}{r.stderr}"
    p.detach(dev)

    # And everything again after a remount.
    p.remount()
    dev = p.losetup(vol, "-r")
    r = run_cmd("fsck.ext4", "-fn", dev, check=False, timeout=300)
    assert r.returncode == 0, f"fsck of the origin after remount:\n{r.stdout}{r.stderr}"
    fs = p.mount_fs(dev, tmp_path / "fs", "-o", "ro,noload")
    assert (fs / "late").read_bytes() == pattern(99, 300_000)
    assert (fs / "file2").read_bytes() == files["file2"]
