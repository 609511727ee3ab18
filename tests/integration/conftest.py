# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures of the integration suite.

Offline tools (thinfs check / dump): `thinfs_bin`, `run_thinfs`,
`restored_image`.  Add fixtures for other parts in their own section.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Sanitizer builds exit with this (scripts/test.sh sets ASAN_OPTIONS/UBSAN_OPTIONS).
SANITIZER_EXIT = 86
SANITIZER_MARKS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer",
                   "runtime error:")


# ---- offline tools ---------------------------------------------------------

@pytest.fixture(scope="session")
def thinfs_bin():
    """The thinfs tool under test: $THINFS_BIN, else build/tools/thinfs."""
    path = Path(os.environ.get("THINFS_BIN", REPO_ROOT / "build/tools/thinfs"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"thinfs tool not found at {path} (build it, or set THINFS_BIN)")
    return path


@pytest.fixture(scope="session")
def run_thinfs(thinfs_bin):
    """run_thinfs(*args, ok=(0,)) -> CompletedProcess; fails the test on a
    crash, a sanitizer report or a hang, and on an exit status not in ok."""
    def run(*args, ok=(0,), timeout=300):
        p = subprocess.run([str(thinfs_bin), *map(str, args)], capture_output=True,
                           text=True, errors="replace", timeout=timeout)
        out = p.stdout + p.stderr
        assert p.returncode >= 0, f"thinfs {args} killed by signal {-p.returncode}\n{out}"
        assert p.returncode != SANITIZER_EXIT and not any(m in out for m in SANITIZER_MARKS), \
            f"sanitizer report from thinfs {args}:\n{out}"
        if ok is not None:
            assert p.returncode in ok, f"thinfs {args} exited {p.returncode}\n{out}"
        return p
    return run


@pytest.fixture(scope="session")
def thin_tools():
    """thin-provisioning-tools 0.9.0, the reference implementation."""
    for tool in ("thin_restore", "thin_check", "thin_dump"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")


@pytest.fixture
def restored_image(tmp_path, thin_tools):
    """restored_image(xml, size=8 MiB, name=...) -> path of a sparse metadata
    file written by thin_restore from xml."""
    counter = [0]

    def make(xml, size=8 << 20, name=None):
        counter[0] += 1
        name = name or f"meta{counter[0]}"
        xml_path = tmp_path / f"{name}.xml"
        img = tmp_path / f"{name}.bin"
        xml_path.write_text(xml)
        with open(img, "wb") as f:
            f.truncate(size)
        p = subprocess.run(["thin_restore", "-i", str(xml_path), "-o", str(img)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"thin_restore failed:\n{p.stdout}\n{p.stderr}"
        return img
    return make


# ---- daemon (issue 3): pools mounted by `thinfs mount` -----------------------
#
# `pool(...)` makes a pool over sparse files under tmp_path, runs
# `thinfs mkpool` and mounts it (by default `thinfs mount -f` in a Popen, its
# stderr in a log file; foreground=False runs the daemonizing form, which
# returns when the mount is ready).  The handle drives the mount: .ctl(),
# .status(), .unmount(), .remount(), .kill9(), .losetup(), .mount_fs().
#
# Teardown, always, even when the test failed: unmount what the test mounted
# over volumes, detach the loop devices it created (by device path), unmount
# the pool (lazily if busy), kill only the daemon it started (by pid), then
# fail the test if the daemon died unexpectedly, exited non-zero, or logged a
# sanitizer report or an "error:" line the test did not declare with
# .expect_log(), and finally require thin_check and `thinfs check` to be
# clean on the metadata.  Like libfuse's own pytest harness.

import errno  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from ctl_socket import ctl_socket_path, socket_peer_pid  # noqa: E402,F401

MOUNT_TIMEOUT = 60      # ASan builds start slowly
EXIT_TIMEOUT = 60
THIN_CHECK_PROGRESS = ("TRANSACTION_ID=", "METADATA_FREE_BLOCKS=", "examining ",
                       "checking space map")


def _build_dir():
    if os.environ.get("THINFS_BUILD_DIR"):
        return Path(os.environ["THINFS_BUILD_DIR"])
    if os.environ.get("THINFS_BIN"):
        return Path(os.environ["THINFS_BIN"]).resolve().parent.parent
    return REPO_ROOT / "build"


@pytest.fixture(scope="session")
def thinfs_ctl_bin():
    """thinfs-ctl under test: $THINFS_CTL_BIN, else $THINFS_BUILD_DIR/tools/thinfs-ctl
    (the build dir of $THINFS_BIN, else build/)."""
    path = Path(os.environ.get("THINFS_CTL_BIN", _build_dir() / "tools/thinfs-ctl"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"thinfs-ctl not found at {path} (build it, or set THINFS_CTL_BIN)")
    return path


@pytest.fixture(scope="session")
def fuse_dev():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse missing: FUSE tests need it")
    for tool in ("fusermount3", "thin_check"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} not installed (scripts/install-deps.sh)")


def _mountinfo():
    """(MAJ:MIN, mount point unescaped) of each line of /proc/self/mountinfo, oldest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((fields[2], mp))
    return out


def _mounts():
    """Mount points (unescaped) in /proc/self/mountinfo."""
    return [mp for _, mp in _mountinfo()]


def _canon(path):
    # realpath of the parent only: the mountpoint itself may be a dead mount.
    path = Path(path)
    return str(Path(os.path.realpath(path.parent)) / path.name)


def is_mounted(path):
    return _canon(path) in _mounts()


def mount_count(path):
    """How many mounts are stacked on path."""
    return _mounts().count(_canon(path))


def pid_alive(pid):
    """Whether any thread of pid runs: a zombie's main thread with another
    thread still in the kernel (a daemon stuck in its own mount) is alive."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state not in ("Z", "X"):
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return False


def abort_fuse_connection(mnt):
    """Abort the FUSE connection of the newest mount at mnt (fusectl), so
    that a daemon that cannot exit lets everything waiting on it go."""
    devs = [dev for dev, mp in _mountinfo() if mp == _canon(mnt)]
    if not devs:
        return
    dev = devs[-1]
    conns = Path("/sys/fs/fuse/connections")
    if not any(conns.iterdir()):
        run_cmd("mount", "-t", "fusectl", "fusectl", str(conns), check=False)
    abort = conns / dev.split(":")[1] / "abort"
    if abort.exists():
        abort.write_text("1")


def run_cmd(*args, timeout=120, check=True, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       errors="replace", timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout: {p.stdout}\n"
                             f"stderr: {p.stderr}")
    return p


def assert_thin_check_clean(meta):
    p = run_cmd("thin_check", meta, check=False, timeout=600)
    noise = [l for l in (p.stdout + p.stderr).splitlines()
             if l and not l.startswith(THIN_CHECK_PROGRESS)]
    assert p.returncode == 0 and not noise, \
        f"thin_check {meta} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"


class Pool:
    """One pool over sparse files in `dir`, and its mount at `mnt`."""

    def __init__(self, dir, thinfs, ctl, *, data_size, meta_size, block_size, options,
                 mnt=None, mkpool=True):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.thinfs, self.ctl_bin = Path(thinfs), Path(ctl)
        self.meta = self.dir / "meta.img"
        self.data = self.dir / "data.img"
        self.catalog = self.dir / "catalog.db"
        self.cfg = self.dir / "pool.cfg"
        self.mnt = Path(mnt) if mnt else self.dir / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.block_size = block_size
        self.proc = None          # Popen of `thinfs mount -f`, or None
        self.pid = None           # the daemon's pid while mounted
        self.logs = []            # every daemon log of this pool
        self.expected_log = []    # regexes of "error:" lines the test expects
        self.problems = []        # what teardown must fail the test for
        self.reported = set()     # log problems a test already failed for
        self.loops = []           # loop devices we attached
        self.fs_mounts = []       # filesystems we mounted over volumes
        self.nmounts = 0
        self.formatted = False    # teardown checks the metadata once mkpool succeeded
        self.cache_metas = []     # [cache] metadata devices: cache_check at teardown
        for path, size in ((self.meta, meta_size), (self.data, data_size)):
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(size)
        self.write_cfg(options)
        if mkpool:
            self.mkpool()

    # ---- configuration and formatting ----
    def write_cfg(self, options=None, text=None):
        if text is None:
            lines = ["[pool]", f"metadata = {self.meta}", f"data = {self.data}",
                     f"catalog = {self.catalog}", f"block_size = {self.block_size // 1024}k"]
            lines += [f"{k} = {v}" for k, v in (options or {}).items()]
            text = "\n".join(lines) + "\n"
        self.cfg.write_text(text)

    def thinfs_run(self, *args, ok=(0,), timeout=300):
        p = run_cmd(self.thinfs, *args, check=False, timeout=timeout)
        self._no_sanitizer(p, ("thinfs",) + args)
        if ok is not None:
            assert p.returncode in ok, f"thinfs {args} exited {p.returncode}\n{p.stdout}{p.stderr}"
        return p

    def mkpool(self, *args, ok=(0,)):
        p = self.thinfs_run("mkpool", self.cfg, *args, ok=ok)
        if p.returncode == 0:
            self.formatted = True
        return p

    # ---- mounting ----
    def mount(self, *opts, foreground=True, ok=True, mnt=None, env=None):
        """Mount and wait until the mount and its control socket are ready.
        opts go after the mountpoint (e.g. "-o", "ro").  With ok=False the
        mount is expected to fail: returns the CompletedProcess."""
        assert self.pid is None or not ok, "already mounted"
        mnt = Path(mnt) if mnt else self.mnt
        self.nmounts += 1
        if not ok:
            # Its errors are the point: not checked for "error:" lines.
            log = self.dir / f"refused-mount-{self.nmounts}.log"
            return self._failing_mount(mnt, log, opts, foreground)
        log = self.dir / f"daemon-{self.nmounts}.log"
        self.logs.append(log)
        if foreground:
            with open(log, "a") as lf:   # O_APPEND: nothing overwrites a report
                self.proc = subprocess.Popen(
                    [str(a) for a in (self.thinfs, "mount", "-f", self.cfg, mnt, *opts)],
                    stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=None if env is None else {**os.environ, **env})
            self.pid = self.proc.pid
            self._wait_ready(mnt, log)
        else:
            with open(log, "a") as lf:   # O_APPEND: nothing overwrites a report
                p = subprocess.run([str(a) for a in (self.thinfs, "mount", self.cfg, mnt, *opts)],
                                   stdout=lf, stderr=subprocess.STDOUT, timeout=MOUNT_TIMEOUT,
                                   stdin=subprocess.DEVNULL,
                                   env=None if env is None else {**os.environ, **env})
            text = log.read_text(errors="replace")
            assert p.returncode == 0, f"thinfs mount exited {p.returncode}:\n{text}"
            # The command returns only once the mount is ready: no polling.
            assert is_mounted(mnt), f"thinfs mount returned but {mnt} is not mounted\n{text}"
            self.pid = socket_peer_pid(ctl_socket_path(mnt))
        self.cur_mnt = mnt
        return self

    def _failing_mount(self, mnt, log, opts, foreground):
        """A mount that must be refused.  If it mounts after all: unmount it,
        end its daemon (by pid) and fail the test."""
        before = mount_count(mnt)
        fg = ["-f"] if foreground else []
        args = [str(a) for a in (self.thinfs, "mount", *fg, self.cfg, mnt, *opts)]
        with open(log, "a") as lf:   # O_APPEND: nothing overwrites a report
            proc = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if mount_count(mnt) > before:
                break
            time.sleep(0.05)
        if mount_count(mnt) > before:
            pid = proc.pid if proc.poll() is None else None
            if pid is None:
                try:
                    pid = socket_peer_pid(ctl_socket_path(mnt))
                except OSError:
                    pass
            run_cmd("fusermount3", "-u", mnt, check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if pid is not None and pid != self.pid and pid_alive(pid):
                time.sleep(1)
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self.problems.append(f"a mount that should be refused mounted {mnt}")
            pytest.fail(f"thinfs mount {opts} at {mnt} should have been refused but mounted:\n"
                        f"{log.read_text(errors='replace')}")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"thinfs mount at {mnt} neither mounted nor exited in {MOUNT_TIMEOUT}s")
        text = log.read_text(errors="replace")
        self._no_sanitizer_text(text, "thinfs mount (expected to fail)")
        return subprocess.CompletedProcess(args, proc.returncode, text, text)

    def _wait_ready(self, mnt, log):
        deadline = time.monotonic() + MOUNT_TIMEOUT
        sock = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = log.read_text(errors="replace")
                self.pid = None
                pytest.fail(f"thinfs mount -f exited {self.proc.returncode} before the mount "
                            f"was ready:\n{text}")
            if is_mounted(mnt):
                sock = sock or ctl_socket_path(mnt)
                try:
                    if socket_peer_pid(sock) == self.pid:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.problems.append(f"mount at {mnt} not ready after {MOUNT_TIMEOUT}s")
        pytest.fail(f"mount at {mnt} not ready after {MOUNT_TIMEOUT}s:\n"
                    f"{log.read_text(errors='replace')}")

    def _wait_exit(self, timeout=EXIT_TIMEOUT):
        """Wait for the daemon to exit; returns its exit status when it is our child."""
        deadline = time.monotonic() + timeout
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        while time.monotonic() < deadline:
            if not pid_alive(self.pid):
                return 0   # not our child: its status is unknown, the log tells
            time.sleep(0.05)
        return None

    def alive(self):
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def unmount(self, check_log=True):
        """fusermount3 -u, then the daemon must exit 0 within EXIT_TIMEOUT."""
        assert self.pid is not None, "not mounted"
        mnt = self.cur_mnt
        if not self.alive():
            self._forget()
            pytest.fail(f"the daemon died before unmount:\n{self.log_text()}")
        p = run_cmd("fusermount3", "-u", mnt, check=False, timeout=60)
        assert p.returncode == 0, f"fusermount3 -u {mnt}: {p.stderr}"
        rc = self._wait_exit()
        if rc is None:
            self._kill()
            pytest.fail(f"the daemon did not exit within {EXIT_TIMEOUT}s of the unmount")
        self._forget()
        assert rc == 0, f"the daemon exited {rc} after unmount:\n{self.log_text()}"
        if check_log:
            self.check_logs()
        return rc

    def remount(self, *opts, **kw):
        self.unmount()
        return self.mount(*opts, **kw)

    def kill9(self, timeout=EXIT_TIMEOUT):
        """SIGKILL the daemon (a crash), then lazily unmount the dead mount.
        Its control socket stays behind, as after a real crash: the next
        mount must replace it."""
        os.kill(self.pid, signal.SIGKILL)
        if self._wait_exit(timeout) is None:
            # Stuck: let it go, so that the run does not hang, and fail.
            abort_fuse_connection(self.cur_mnt)
            self._wait_exit(10)
            run_cmd("fusermount3", "-uz", self.cur_mnt, check=False)
            self._forget()
            pytest.fail(f"the daemon did not exit within {timeout}s of SIGKILL")
        run_cmd("fusermount3", "-uz", self.cur_mnt, check=False)
        self._forget()
        self.killed_at = self.cur_mnt

    def crashed(self, timeout=30):
        """The daemon is expected to exit on its own (fault power-cut): wait
        for it, then lazily unmount the dead mount."""
        rc = self._wait_exit(timeout)
        if rc is None:
            self._kill()
            pytest.fail(f"the daemon did not exit within {timeout}s")
        run_cmd("fusermount3", "-uz", self.cur_mnt, check=False)
        self._forget()
        self.killed_at = self.cur_mnt
        return rc

    def terminate(self):
        """SIGTERM: the daemon must commit, unmount and exit 0."""
        os.kill(self.pid, signal.SIGTERM)
        rc = self._wait_exit()
        mnt = self.cur_mnt
        if rc is None:
            self._kill()
            pytest.fail("the daemon did not exit on SIGTERM")
        still = is_mounted(mnt)
        if still:
            run_cmd("fusermount3", "-uz", mnt, check=False)
        self._forget()
        assert not still, "the daemon exited on SIGTERM but left its mount behind"
        return rc

    def _kill(self):
        if self.pid is not None and self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self._wait_exit(10)

    def _remove_dead_socket(self, mnt):
        """A daemon killed by a signal cannot remove its control socket;
        remove ours (the one for mnt) once no daemon answers on it."""
        path = ctl_socket_path(mnt)
        try:
            socket_peer_pid(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError:
            pass

    def _forget(self):
        self.pid = None
        self.proc = None

    # ---- control ----
    def ctl(self, *args, ok=(0,), timeout=120, mnt=None):
        mnt = mnt or getattr(self, "cur_mnt", self.mnt)
        p = run_cmd(self.ctl_bin, mnt, *args, check=False, timeout=timeout)
        self._no_sanitizer(p, ("thinfs-ctl",) + args)
        if ok is not None:
            assert p.returncode in ok, \
                f"thinfs-ctl {args} exited {p.returncode}\n{p.stdout}{p.stderr}"
        return p

    def status(self):
        return json.loads(self.ctl("status", "--json").stdout)

    @staticmethod
    def _is_group_member(v):
        # design.md does not say whether the members of snapshot groups are
        # in "volumes" (they share their origin's name); if they are, their
        # kind tells them apart.
        return any(w in v.get("kind", "") for w in ("group", "member"))

    def volumes(self):
        """status --json volumes, group members left out."""
        return [v for v in self.status()["volumes"] if not self._is_group_member(v)]

    def volume(self, name):
        found = [v for v in self.volumes() if v["name"] == name]
        assert len(found) == 1, f"{len(found)} volumes named {name!r} in status --json"
        return found[0]

    def used(self):
        return self.status()["pool"]["data"]["used_blocks"]

    def wait_used(self, n, timeout=5):
        """used_blocks must become n.  Blocks of an unlinked or deleted
        volume are freed at its last close, and FUSE sends RELEASE after
        close(2) has returned: allow a bounded wait."""
        deadline = time.monotonic() + timeout
        while self.used() != n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.used() == n, f"used_blocks {self.used()}, expected {n}"

    # ---- block devices and filesystems over volumes (root only) ----
    def losetup(self, path, *opts):
        if os.geteuid() != 0:
            pytest.skip("loop devices need root")
        dev = run_cmd("losetup", "-f", "--show", *opts, path).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev):
        run_cmd("losetup", "-d", dev)
        self.loops.remove(dev)

    def mount_fs(self, dev, where, *opts):
        Path(where).mkdir(parents=True, exist_ok=True)
        run_cmd("mount", *opts, dev, where)
        self.fs_mounts.append(Path(where))
        return Path(where)

    def umount_fs(self, where):
        run_cmd("umount", where)
        self.fs_mounts.remove(Path(where))

    # ---- logs ----
    def expect_log(self, regex):
        """Declare an "error:" line this test expects the daemon to log."""
        self.expected_log.append(re.compile(regex))

    def log_text(self):
        return "".join(l.read_text(errors="replace") for l in self.logs if l.exists())

    def _no_sanitizer_text(self, text, what):
        if any(m in text for m in SANITIZER_MARKS):
            self.problems.append(f"sanitizer report from {what}")
            pytest.fail(f"sanitizer report from {what}:\n{text}")

    def _no_sanitizer(self, p, args):
        assert p.returncode >= 0, f"{args} killed by signal {-p.returncode}\n{p.stdout}{p.stderr}"
        self._no_sanitizer_text(p.stdout + p.stderr, " ".join(map(str, args)))
        assert p.returncode != SANITIZER_EXIT, f"{args} exited {SANITIZER_EXIT} (sanitizer)"

    def log_problems(self):
        out = []
        for log in self.logs:
            if not log.exists():
                continue
            text = log.read_text(errors="replace")
            if any(m in text for m in SANITIZER_MARKS):
                out.append(f"sanitizer report in {log.name}:\n{text}")
                continue
            bad = [l for l in text.splitlines() if "error:" in l
                   and not any(r.search(l) for r in self.expected_log)]
            if bad:
                out.append(f"unexpected error lines in {log.name}:\n" + "\n".join(bad))
        return out

    def check_logs(self):
        probs = self.log_problems()
        self.reported.update(probs)     # teardown does not report them twice
        assert not probs, "\n".join(probs)

    # ---- metadata checks (unmounted) ----
    def check_metadata(self):
        assert_thin_check_clean(self.meta)
        for m in self.cache_metas:
            p = run_cmd("cache_check", m, check=False, timeout=600)
            assert p.returncode == 0, f"cache_check {m} exited {p.returncode}:\n" \
                                      f"{p.stdout}{p.stderr}"
        p = run_cmd(self.thinfs, "check", self.meta, check=False, timeout=600)
        self._no_sanitizer(p, ("thinfs", "check"))
        assert p.returncode == 0, f"thinfs check {self.meta} exited {p.returncode}:\n" \
                                  f"{p.stdout}{p.stderr}"

    def dump(self, *args):
        return self.thinfs_run("dump", *args, self.meta).stdout

    # ---- teardown ----
    def teardown(self):
        """Release everything; returns the list of problems found."""
        problems = list(self.problems)
        for where in reversed(self.fs_mounts):
            if run_cmd("umount", where, check=False, timeout=60).returncode != 0:
                run_cmd("umount", "-l", where, check=False, timeout=60)
        self.fs_mounts = []
        for dev in reversed(self.loops):
            p = run_cmd("losetup", "-d", dev, check=False, timeout=60)
            if p.returncode != 0:
                problems.append(f"losetup -d {dev}: {p.stderr.strip()}")
        self.loops = []
        if self.pid is not None:
            mnt = self.cur_mnt
            rc, killed = None, False
            if not self.alive():
                killed = True
                problems.append(f"the daemon (pid {self.pid}) died during the test:\n"
                                f"{self.log_text()[-4000:]}")
                run_cmd("fusermount3", "-uz", mnt, check=False)
            else:
                p = run_cmd("fusermount3", "-u", mnt, check=False, timeout=60)
                lazy = p.returncode != 0
                if lazy:
                    # Busy: something (a failed test's open fd, a lazily
                    # unmounted filesystem over a loop device) still holds a
                    # volume.  Detach; the daemon exits when that goes away,
                    # or is killed below.
                    run_cmd("fusermount3", "-uz", mnt, check=False, timeout=60)
                rc = self._wait_exit(10 if lazy else EXIT_TIMEOUT)
                if rc is None:
                    problems.append(f"the daemon (pid {self.pid}) did not exit after unmount: "
                                    "killed")
                    killed = True
                    self._kill()
                    if is_mounted(mnt):
                        run_cmd("fusermount3", "-uz", mnt, check=False)
                elif rc != 0:
                    problems.append(f"the daemon exited {rc} after unmount")
            self._forget()
            if os.path.exists(ctl_socket_path(mnt)):
                if rc is None or rc < 0 or killed:
                    self._remove_dead_socket(mnt)
                else:
                    problems.append(f"the daemon exited but left {ctl_socket_path(mnt)}")
                    self._remove_dead_socket(mnt)
        elif getattr(self, "killed_at", None) is not None:
            self._remove_dead_socket(self.killed_at)   # kill9() and no remount
        problems += [x for x in self.log_problems() if x not in self.reported]
        if self.formatted:
            try:
                self.check_metadata()
            except AssertionError as e:
                problems.append(str(e))
        return problems


@pytest.fixture
def pool(tmp_path, thinfs_bin, thinfs_ctl_bin, fuse_dev, request):
    """pool(name="pool", data_size=2 GiB, meta_size=64 MiB, block_size=64 KiB,
    options={pool.cfg key: value}, mount=True, foreground=True, mkpool=True,
    mnt=None) -> Pool, mounted unless mount=False."""
    made = []

    def make(name="pool", *, data_size=2 << 30, meta_size=64 << 20, block_size=64 << 10,
             options=None, mount=True, foreground=True, mkpool=True, mnt=None, mount_opts=()):
        p = Pool(tmp_path / name, thinfs_bin, thinfs_ctl_bin, data_size=data_size,
                 meta_size=meta_size, block_size=block_size, options=options, mnt=mnt,
                 mkpool=mkpool)
        made.append(p)
        if mount:
            p.mount(*mount_opts, foreground=foreground)
        return p

    yield make
    problems = []
    for p in reversed(made):
        problems += p.teardown()
    if problems:
        pytest.fail("pool teardown:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def open_dir():
    """A directory every user may search, outside pytest's 0700 tmp tree, for
    mountpoints that another user (setpriv --reuid=65534) must reach.  List it
    before `pool` so that it outlives the pool's unmount."""
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="thinfs-test-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    for d in sorted(top.iterdir(), reverse=True) + [top]:
        try:
            d.rmdir()
        except OSError:
            pass
