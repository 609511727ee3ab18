# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's life (issue 3): mkpool (signatures, --force), pool.cfg
errors with line numbers, mount (daemonized and ready when the command
returns, -f, -o ro, -o allow_other), one daemon per pool, commit and exit 0
on unmount and on SIGTERM, kill -9 after fsync (fsynced data intact, check
clean, orphans of unlinked-but-open volumes deleted), PR_SET_IO_FLUSHER,
multi-threaded."""
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ctl_socket_path, is_mounted, pid_alive, run_cmd
from daemon_util import BS, MiB, create, expect_errno, fsync_path, pattern, read_at, write_at


# ---- mkpool --------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["meta", "data"])
def test_mkpool_refuses_a_file_with_an_ext4_signature_unless_forced(pool, which):
    p = pool(mount=False, mkpool=False)
    target = p.meta if which == "meta" else p.data
    run_cmd("mkfs.ext4", "-q", "-F", "-L", "precious", target, timeout=300)
    before = hashlib.sha256(target.read_bytes()[:4 * MiB]).hexdigest()
    r = p.mkpool(ok=None)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "ext4" in err, err
    assert str(target) in err or target.name in err, f"does not name {target}:\n{err}"
    assert "--force" in err, f"does not say how to override:\n{err}"
    assert hashlib.sha256(target.read_bytes()[:4 * MiB]).hexdigest() == before
    assert not p.catalog.exists(), "a refused mkpool created the catalog"
    p.mkpool("--force")
    p.mount()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, b"over the old filesystem")
    assert read_at(p.mnt / "vm1", 0, 23) == b"over the old filesystem"


def test_mkpool_refuses_an_existing_pool_unless_forced(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    p.unmount()
    r = p.mkpool(ok=None)
    assert r.returncode != 0
    assert "--force" in r.stdout + r.stderr
    p.mount()
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1"]
    p.unmount()
    p.mkpool("--force")
    p.mount()
    assert sorted(os.listdir(p.mnt)) == [".snapshots"]
    assert p.status()["volumes"] == []


def test_mkpool_with_relative_paths_resolves_them_beside_the_cfg(pool, tmp_path):
    p = pool(mount=False, mkpool=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta.name}\ndata = {p.data.name}\n"
                     f"catalog = {p.catalog.name}\n")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        p.mkpool()
        p.mount()
    finally:
        os.chdir(cwd)
    create(p.mnt / "vm1", MiB)
    assert p.catalog.exists()


def test_default_catalog_lives_beside_the_metadata(pool):
    p = pool(mount=False, mkpool=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\ndata = {p.data}\n")
    p.mkpool()
    assert (p.meta.parent / (p.meta.name + ".catalog.db")).exists()
    p.mount()
    assert p.status()["pool"]["data"]["block_size"] == 64 * 1024   # default block_size


# ---- pool.cfg errors ------------------------------------------------------------------

CFG_ERRORS = [
    # (line to put on line 5, text the message must contain)
    ("colour = blue", "colour"),
    ("block_size = 100k", "block_size"),
    ("block_size = 32k", "block_size"),
    ("discard_passdown = perhaps", "discard_passdown"),
    ("low_water_mark = 150%", "low_water_mark"),
    ("commit_interval = soon", "commit_interval"),
    ("no_space_timeout = -1", "no_space_timeout"),
    ("error_if_no_space = 2", "error_if_no_space"),
    ("metadata_cache = lots", "metadata_cache"),
    ("max_threads = 4", "max_threads"),
    ("this line has no equals sign", ""),
]


@pytest.mark.parametrize("line,word", CFG_ERRORS, ids=[c[0].split()[0] for c in CFG_ERRORS])
def test_pool_cfg_errors_name_the_line(pool, line, word):
    p = pool(mount=False, mkpool=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\ndata = {p.data}\n"
                     f"catalog = {p.catalog}\n{line}\n")
    for r in (p.mkpool(ok=None), p.mount(ok=False)):
        assert r.returncode != 0
        err = r.stdout + r.stderr
        assert re.search(r"pool\.cfg:5:", err), f"no 'pool.cfg:5:' in:\n{err}"
        assert word in err, err
        assert "Traceback" not in err
    assert os.stat(p.meta).st_blocks == 0, "a refused pool.cfg wrote metadata"
    assert not is_mounted(p.mnt)


def test_pool_cfg_missing_required_key(pool):
    p = pool(mount=False, mkpool=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\n")
    r = p.mkpool(ok=None)
    assert r.returncode != 0 and "data" in r.stdout + r.stderr
    assert os.stat(p.meta).st_blocks == 0


def test_pool_cfg_device_that_does_not_exist(pool, tmp_path):
    p = pool(mount=False, mkpool=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\ndata = {tmp_path}/nope.img\n")
    r = p.mkpool(ok=None)
    # Only what is missing: not also a claim that the .cfg is.
    assert r.returncode != 0 and r.stdout == "" and r.stderr.splitlines() == \
        [f"thinfs: error: {p.cfg}:3: data: {tmp_path}/nope.img: no such file or device"], \
        r.stderr
    r = p.mount(ok=False)
    assert r.returncode != 0 and r.stdout.splitlines() == \
        [f"thinfs: error: {p.cfg}:3: data: {tmp_path}/nope.img: no such file or device"], \
        r.stdout
    p.write_cfg(text=f"[pool]\nmetadata = UUID=00000000-dead-beef-0000-000000000000\n"
                     f"data = {p.data}\n")
    r = p.mkpool(ok=None)
    err = r.stdout + r.stderr
    assert r.returncode != 0 and "UUID=00000000-dead-beef" in err and \
        re.search(r"pool\.cfg:2:", err), err


def test_pool_cfg_that_does_not_exist(pool, tmp_path):
    p = pool(mount=False, mkpool=False)
    for cmd in (("mkpool",), ("mount", "-f")):
        args = (*cmd, tmp_path / "absent.cfg") + ((p.mnt,) if cmd[0] == "mount" else ())
        r = run_cmd(p.thinfs, *args, check=False)
        assert r.returncode != 0 and r.stderr.splitlines() == \
            [f"thinfs: error: {tmp_path}/absent.cfg: No such file or directory"], r.stderr


@pytest.mark.parametrize("how", ["UUID", "LABEL"])
def test_data_device_by_uuid_or_label(pool, how):
    """UUID= and LABEL= resolve with libblkid: the data device is a loop
    device over a file that carries that ext4 UUID and label (hence --force).
    Both are random, so that concurrent runs never see each other's."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    import uuid
    u = uuid.uuid4()
    label = "tfs-" + u.hex[:8]
    how = f"UUID={u}" if how == "UUID" else f"LABEL={label}"
    p = pool(mount=False, mkpool=False)
    run_cmd("mkfs.ext4", "-q", "-F", "-L", label, "-U", str(u), p.data, timeout=300)
    dev = p.losetup(p.data)
    if shutil.which("udevadm"):
        run_cmd("udevadm", "settle", check=False)
    p.write_cfg(text=f"[pool]\nmetadata = {p.meta}\ndata = {how}\ncatalog = {p.catalog}\n")
    r = p.mkpool(ok=None)
    assert r.returncode != 0 and "ext4" in r.stdout + r.stderr and \
        (dev in r.stdout + r.stderr or how in r.stdout + r.stderr), r.stdout + r.stderr
    p.mkpool("--force")
    p.mount()
    assert p.status()["pool"]["data"]["total_blocks"] == (2 << 30) // BS
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    assert read_at(p.mnt / "vm1", 0, 2 * BS) == pattern(1, 2 * BS)
    p.unmount()                 # before teardown detaches the data device


# ---- mount ------------------------------------------------------------------------------

def test_mount_daemonizes_and_is_ready_when_the_command_returns(pool):
    p = pool(foreground=False)       # asserts is_mounted right after the command returned
    assert p.pid != os.getpid() and p.proc is None
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, b"daemon")
    assert p.status()["pool"]["mode"] == "write"
    pid = p.pid
    p.unmount()
    assert not pid_alive(pid)
    p.mount(foreground=False)
    assert read_at(p.mnt / "vm1", 0, 6) == b"daemon"


@pytest.mark.parametrize("foreground", [True, False], ids=["-f", "daemonized"])
def test_sd_notify_ready_once_mounted(pool, tmp_path, foreground):
    """Under systemd (NOTIFY_SOCKET set) the daemon sends READY=1, and only
    once the mount works."""
    import socket
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(60)
    try:
        p = pool(mount=False)
        p.mount(foreground=foreground, env={"NOTIFY_SOCKET": path})
        msgs = []
        while not any(b"READY=1" in m for m in msgs):
            msgs.append(srv.recv(4096))
        assert is_mounted(p.mnt)
        create(p.mnt / "vm1", MiB)
    finally:
        srv.close()


def test_second_mount_of_the_same_pool_is_refused(pool, tmp_path):
    p = pool()
    create(p.mnt / "vm1", MiB)
    other = tmp_path / "other"
    other.mkdir()
    for fg in (True, False):
        r = p.mount(ok=False, mnt=other, foreground=fg)
        assert r.returncode != 0
        assert r.stdout.strip(), "refused without a message"
        assert not is_mounted(other)
    # The first mount is unharmed.
    write_at(p.mnt / "vm1", 0, b"still mine")
    assert read_at(p.mnt / "vm1", 0, 10) == b"still mine"
    # And the same mountpoint twice is refused too.
    r = p.mount(ok=False)
    assert r.returncode != 0


def test_unmount_commits_and_exits_0(pool):
    p = pool(options={"commit_interval": "1h"})   # no timer commit during the test
    create(p.mnt / "vm1", MiB)
    with open(p.mnt / "vm1", "r+b") as f:
        f.write(pattern(1, 3 * BS))               # no fsync
    sock = ctl_socket_path(p.mnt)
    assert os.path.exists(sock)
    assert p.unmount() == 0
    assert not os.path.exists(sock), "the daemon left its control socket behind"
    p.mount()
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == pattern(1, 3 * BS)


def test_sigterm_commits_unmounts_and_exits_0(pool):
    p = pool(options={"commit_interval": "1h"})
    create(p.mnt / "vm1", MiB)
    with open(p.mnt / "vm1", "r+b") as f:
        f.write(pattern(2, 3 * BS))
    assert p.terminate() == 0
    assert not is_mounted(p.mnt)
    p.check_logs()
    p.mount()
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == pattern(2, 3 * BS)


def test_read_only_mount_writes_nothing(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, b"before ro")
    p.unmount()
    meta_sum = hashlib.sha256(p.meta.read_bytes()).hexdigest()
    p.mount("-o", "ro")
    assert read_at(p.mnt / "vm1", 0, 9) == b"before ro"
    expect_errno(errno.EROFS, os.open, p.mnt / "vm1", os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, p.mnt / "vm2", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EROFS, os.mkdir, p.mnt / ".snapshots" / "g")
    expect_errno(errno.EROFS, os.unlink, p.mnt / "vm1")
    r = p.ctl("snapshot", "vm1", "clone", ok=None)
    assert r.returncode != 0
    p.unmount(check_log=False)
    assert hashlib.sha256(p.meta.read_bytes()).hexdigest() == meta_sum
    # A read-only mount the user asked for is not an error.
    p.check_logs()


def test_allow_other(pool):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    import tempfile
    from pathlib import Path
    top = Path(tempfile.mkdtemp(prefix="thinfs-test-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "a").mkdir()
        (top / "b").mkdir()
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        p = pool("p1", mnt=top / "a", mount_opts=("-o", "allow_other"))
        create(p.mnt / "vm1", MiB, mode=0o644)
        r = run_cmd(*as_nobody, "stat", p.mnt / "vm1", check=False)
        assert r.returncode == 0, r.stderr
        q = pool("p2", mnt=top / "b")
        create(q.mnt / "vm1", MiB, mode=0o644)
        r = run_cmd(*as_nobody, "stat", q.mnt / "vm1", check=False)
        assert r.returncode != 0, "without allow_other another user got in"
        p.unmount()
        q.unmount()
    finally:
        for d in (top / "a", top / "b", top):
            try:
                d.rmdir()
            except OSError:
                pass


def daemon_threads(pid):
    return os.listdir(f"/proc/{pid}/task")


def parallel_dd(p, vol, n=4):
    procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={vol}", "bs=64k", f"seek={i * 16}",
                               "count=16", "conv=notrunc"], stderr=subprocess.DEVNULL)
             for i in range(n)]
    for pr in procs:
        assert pr.wait(timeout=60) == 0


def test_daemon_is_multithreaded(pool):
    p = pool()
    create(p.mnt / "vm1", 4 * MiB)
    parallel_dd(p, p.mnt / "vm1")
    assert len(daemon_threads(p.pid)) > 1, "the daemon is single-threaded"


def has_cap(bit):
    with open("/proc/self/status") as f:
        eff = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    return bool(eff >> bit & 1)


CAP_SYS_RESOURCE = 24


def test_daemon_is_an_io_flusher(pool):
    """PR_SET_IO_FLUSHER sets PF_MEMALLOC_NOIO (0x00080000) in the task
    flags (field 9 of /proc/PID/task/TID/stat) of every thread.  It needs
    CAP_SYS_RESOURCE; without it the daemon must say so in its log."""
    p = pool()
    create(p.mnt / "vm1", 4 * MiB)
    parallel_dd(p, p.mnt / "vm1")
    if not has_cap(CAP_SYS_RESOURCE):
        assert "PR_SET_IO_FLUSHER" in p.log_text(), p.log_text()
        pytest.skip("no CAP_SYS_RESOURCE here: PR_SET_IO_FLUSHER is refused (the daemon "
                    "warned, which is all that can be checked)")
    for tid in daemon_threads(p.pid):
        with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
        assert flags & 0x00080000, f"thread {tid}: no PF_MEMALLOC_NOIO (flags {flags:#x})"


# ---- crashes ---------------------------------------------------------------------------

def test_kill_9_after_fsync_keeps_fsynced_data(pool):
    p = pool(options={"commit_interval": "1h"})
    create(p.mnt / "vm1", 4 * MiB)
    create(p.mnt / "vm2", 4 * MiB)
    synced = pattern(1, 5 * BS)
    write_at(p.mnt / "vm1", BS, synced)                      # fsync
    os.mkdir(p.mnt / ".snapshots" / "g")
    p.ctl("snapshot", "vm1", "clone")
    write_at(p.mnt / "vm2", 0, pattern(2, 5 * BS), fsync=False)   # may or may not survive
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    os.pwrite(fd, pattern(3, 2 * BS), 20 * BS)             # in flight, never fsynced
    p.kill9()
    try:
        os.close(fd)
    except OSError:
        pass
    assert not is_mounted(p.mnt)
    # The metadata as the crash left it is consistent.
    p.check_metadata()
    p.mount()
    assert read_at(p.mnt / "vm1", BS, 5 * BS) == synced
    assert read_at(p.mnt / "vm1", 0, BS) == bytes(BS)
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "clone", "vm1", "vm2"]
    assert os.listdir(p.mnt / ".snapshots") == ["g"]
    assert read_at(p.mnt / ".snapshots" / "g" / "vm1", BS, 5 * BS) == synced
    assert read_at(p.mnt / "clone", BS, 5 * BS) == synced
    got = read_at(p.mnt / "vm2", 0, 5 * BS)
    for i in range(5):                       # each block old or new, never garbage
        blk = got[i * BS:(i + 1) * BS]
        assert blk in (bytes(BS), pattern(2, 5 * BS)[i * BS:(i + 1) * BS]), f"vm2 block {i}"
    # Usable after the crash.
    write_at(p.mnt / "vm1", 30 * BS, pattern(4, BS))
    assert read_at(p.mnt / "vm1", 30 * BS, BS) == pattern(4, BS)


def test_kill_9_during_writes_leaves_checkable_metadata(pool):
    p = pool(options={"commit_interval": "100ms"})
    create(p.mnt / "vm1", 64 * MiB)
    w = subprocess.Popen(["dd", "if=/dev/urandom", f"of={p.mnt / 'vm1'}", "bs=64k",
                          "count=1024", "conv=notrunc"], stderr=subprocess.DEVNULL)
    time.sleep(0.7)
    p.kill9()
    w.wait(timeout=60)
    p.check_metadata()
    p.mount()
    assert p.volume("vm1")["mapped_blocks"] <= 1024


def test_unlinked_open_volume_is_deleted_at_the_next_mount_after_a_crash(pool):
    p = pool()
    create(p.mnt / "keep", MiB)
    write_at(p.mnt / "keep", 0, pattern(1, BS))
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(2, 4 * BS))
    vid = p.volume("vm1")["id"]
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    os.unlink(p.mnt / "vm1")
    fsync_path(p.mnt / "keep")               # commit the unlink
    time.sleep(1.5)
    p.kill9()
    try:
        os.close(fd)
    except OSError:
        pass
    p.mount()
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "keep"]
    assert [v["name"] for v in p.status()["volumes"]] == ["keep"]
    assert p.used() == 1
    p.unmount()
    assert f'dev_id="{vid}"' not in p.dump()
    p.mount()
