#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The workers of scripts/soak.sh (crash, powercut, stress); stdlib only.

    soak.py crash|powercut N --build DIR --workdir DIR [options]
    soak.py stress MINUTES --build DIR --workdir DIR [options]

What each mode does and checks is in docs/reliability.md.  In short:

crash / powercut: one pool over sparse files, reused by every iteration.  An
iteration runs writer threads (patterned 512-byte sectors: volume, offset,
generation, CRC-32 in each) and a snapshot-group thread (mkdir / rmdir in
.snapshots every ~100 ms) against the mounted pool, then ends the daemon at
a random moment (SIGKILL, or `thinfs-ctl fault power-cut [tear]`), runs
thin_check and `thinfs check` on the metadata, remounts and reads
everything back.

stress: 4 volumes under fio --verify=crc32c, snapshot groups made and removed
every 100 ms, status --json polled every 200 ms, suspend/resume every few
seconds, the daemon's RSS sampled every second; clean unmount and checkers
at the end.
"""
import argparse
import array
import errno
import itertools
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/integration"))
from ctl_socket import ctl_socket_path, socket_peer_pid  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SECTOR = 512
BLOCK = 4096
SPB = BLOCK // SECTOR
MAGIC = b"TFSOAK01"
HDR = struct.Struct("<8sIIQQ")          # magic, volume, pad, byte offset, generation
CRC = struct.Struct("<I")               # CRC-32 of the first 508 bytes, at 508
ZERO_BLOCK = bytes(BLOCK)
SANITIZER_MARKS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer",
                   "runtime error:")
MOUNT_TIMEOUT = 60
EXIT_TIMEOUT = 60
THIN_CHECK_PROGRESS = ("TRANSACTION_ID=", "METADATA_FREE_BLOCKS=", "examining ",
                       "checking space map")
# errnos a FUSE request gets when the daemon dies under it
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV)


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


# ---- patterned sectors ---------------------------------------------------

def make_sector(vol, off, gen):
    hdr = HDR.pack(MAGIC, vol, 0, off, gen)
    body = (hdr * 16)[:SECTOR - 4]
    return body + CRC.pack(zlib.crc32(body))


def make_blocks(vol, first_block, nblocks, gen):
    base = first_block * BLOCK
    return b"".join(make_sector(vol, base + i * SECTOR, gen) for i in range(nblocks * SPB))


def parse_sector(buf, pos, vol, off):
    """The generation in the sector at buf[pos:], 0 for an all-zero sector,
    or None when it is garbage (bad checksum, wrong volume or offset)."""
    if buf[pos:pos + 8] != MAGIC:
        return 0 if not any(buf[pos:pos + SECTOR]) else None
    if zlib.crc32(buf[pos:pos + SECTOR - 4]) != CRC.unpack_from(buf, pos + SECTOR - 4)[0]:
        return None
    _, v, _, o, gen = HDR.unpack_from(buf, pos)
    if v != vol or o != off or gen == 0:
        return None
    return gen


def block_gens(buf, b, vol, blk):
    """Generations of the SPB sectors of block blk (at buf[b*BLOCK:]): a list,
    None for a garbage sector.  An all-zero block is [0]*SPB."""
    pos = b * BLOCK
    if buf[pos:pos + BLOCK] == ZERO_BLOCK:
        return [0] * SPB
    return [parse_sector(buf, pos + i * SECTOR, vol, blk * BLOCK + i * SECTOR)
            for i in range(SPB)]


def read_all(path, size):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, min(4 * MiB, size - len(out)), len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


# ---- one pool and its daemon --------------------------------------------

def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == path:
                return True
    return False


def run(args, timeout=600, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          errors="replace", timeout=timeout, **kw)


class SoakError(Exception):
    """Something that ends the run (the pool cannot be mounted again)."""


class Pool:
    def __init__(self, dir, build, *, data_size, meta_size, faults, options=None):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.thinfs = Path(build) / "tools/thinfs"
        self.ctl_bin = Path(build) / "tools/thinfs-ctl"
        self.meta, self.data = self.dir / "meta.img", self.dir / "data.img"
        self.catalog = self.dir / "catalog.db"
        self.cfg = self.dir / "pool.cfg"
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.faults = faults
        self.proc = None
        self.log = None
        self.nmounts = 0
        for path, size in ((self.meta, meta_size), (self.data, data_size)):
            with open(path, "wb") as f:
                f.truncate(size)
        lines = ["[pool]", f"metadata = {self.meta}", f"data = {self.data}",
                 f"catalog = {self.catalog}"]
        lines += [f"{k} = {v}" for k, v in (options or {}).items()]
        if faults:
            lines += ["[fault]", "allow = yes"]
        self.cfg.write_text("\n".join(lines) + "\n")
        p = run([self.thinfs, "mkpool", self.cfg])
        if p.returncode != 0:
            raise SoakError(f"thinfs mkpool failed:\n{p.stdout}{p.stderr}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def mount(self, log):
        """thinfs mount -f, its output in log; returns once mount and control
        socket answer."""
        self.nmounts += 1
        self.log = Path(log)
        args = [self.thinfs, "mount", "-f", self.cfg, self.mnt]
        if self.faults:
            args.append("--allow-faults")
        with open(self.log, "a") as lf:
            self.proc = subprocess.Popen([str(a) for a in args], stdout=lf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise SoakError(f"thinfs mount exited {rc} before the mount was ready:\n"
                                + self.log.read_text(errors="replace")[-4000:])
            if is_mounted(self.mnt):
                try:
                    if socket_peer_pid(ctl_socket_path(self.mnt)) == self.proc.pid:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise SoakError(f"mount not ready after {MOUNT_TIMEOUT}s")

    def wait_exit(self, timeout=EXIT_TIMEOUT):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL (only our own daemon, by pid) and drop the dead mount."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.after_death()

    def after_death(self):
        run(["fusermount3", "-uz", self.mnt], timeout=60)
        rc = self.proc.returncode if self.proc else None
        self.proc = None
        return rc

    def unmount(self):
        """Clean unmount: the daemon must exit 0."""
        p = run(["fusermount3", "-u", self.mnt], timeout=60)
        if p.returncode != 0:
            return f"fusermount3 -u: {p.stderr.strip()}"
        rc = self.wait_exit()
        if rc is None:
            self.kill()
            return f"the daemon did not exit within {EXIT_TIMEOUT}s of the unmount"
        self.proc = None
        return None if rc == 0 else f"the daemon exited {rc} after unmount"

    def ctl(self, *args, timeout=120):
        return subprocess.run([str(self.ctl_bin), str(self.mnt), *map(str, args)],
                              capture_output=True, timeout=timeout)

    def check_metadata(self, out_dir):
        """thin_check and thinfs check: a list of problems (empty = clean)."""
        problems = []
        p = run(["thin_check", self.meta])
        (out_dir / "thin_check.txt").write_text(p.stdout + p.stderr)
        noise = [l for l in (p.stdout + p.stderr).splitlines()
                 if l and not l.startswith(THIN_CHECK_PROGRESS)]
        if p.returncode != 0 or noise:
            problems.append(f"thin_check exited {p.returncode}: " + "; ".join(noise[:5]))
        p = run([self.thinfs, "check", self.meta])
        (out_dir / "thinfs_check.txt").write_text(p.stdout + p.stderr)
        if p.returncode != 0 or any(m in p.stdout + p.stderr for m in SANITIZER_MARKS):
            problems.append(f"thinfs check exited {p.returncode}: "
                            + "; ".join((p.stdout + p.stderr).splitlines()[:5]))
        return problems


def log_findings(text):
    """(sanitizer report?, error/warning lines) of a daemon log."""
    san = any(m in text for m in SANITIZER_MARKS)
    lines = [l.strip() for l in text.splitlines() if "error:" in l or "warning:" in l]
    return san, lines


def tally(lines, counted):
    """Count log lines alike but for their numbers."""
    for l in lines:
        key = re.sub(r"\d+", "N", l)
        counted[key] = counted.get(key, 0) + 1


def print_tally(counted):
    if counted:
        print("  daemon error/warning lines (digits as N):")
        for line, n in sorted(counted.items(), key=lambda x: -x[1])[:20]:
            print(f"    {n:5}x {line[:200]}")


def copy_sparse(src, dst):
    run(["cp", "--sparse=always", src, dst])


# ---- crash / powercut ----------------------------------------------------

class Volume:
    """What the soak knows about one volume, per 4 KiB block (arrays of u64
    generations; 0 = nothing)."""

    def __init__(self, index, nblocks):
        self.index = index
        self.name = f"v{index}"
        self.nblocks = nblocks
        zeros = [0] * nblocks
        self.issued = array.array("Q", zeros)  # last generation handed to pwrite
        self.low = array.array("Q", zeros)     # the block holds at least this (see Crash)
        self.acked = array.array("Q", zeros)   # last generation an fsync acknowledged
        # Blocks a power cut with tear left holding sectors of two writes, as
        # read back: {block: sector generations}, until a write replaces them.
        self.torn = {}


class Group:
    # states: creating (mkdir running), present (mkdir returned), mkdir-cut
    # and rmdir-cut (cut by the crash), removing (rmdir running), removed
    # (rmdir returned), failed (mkdir failed with the daemon alive)
    def __init__(self, name, vols):
        self.name = name
        self.state = "creating"
        # at the start of the mkdir, by volume name: low bounds, torn blocks
        self.low = {v.name: array.array("Q", v.low) for v in vols}
        self.torn = {v.name: dict(v.torn) for v in vols}
        self.high = None    # {volume name: array} at its end


class Crash:
    """crash and powercut modes."""

    def __init__(self, a):
        self.a = a
        self.mode = a.mode
        self.rng = random.Random(a.seed)
        self.work = Path(a.workdir)
        self.nblocks = a.volume_mib * MiB // BLOCK
        self.vols = [Volume(i, self.nblocks) for i in range(a.volumes)]
        self.by_name = {v.name: v for v in self.vols}
        self.gen = itertools.count(1)
        self.groups = {}
        self.group_seq = itertools.count(1)
        self.lock = threading.Lock()
        self.totals = dict(iterations=0, failed_iterations=0, writes=0, acked_writes=0,
                           acked_blocks_checked=0, mismatches=0, checker_failures=0,
                           crashes=0, stray_volumes=0, bad_groups=0, groups_made=0,
                           groups_removed=0, groups_checked=0, member_blocks_checked=0,
                           lost_mkdirs=0, back_after_rmdir=0, unacked_survived=0,
                           torn_origin_blocks=0)
        self.daemon_lines = {}
        self.kept = []

    # -- the workload ------------------------------------------------------
    def writer(self, w, it):
        rng = random.Random(self.rng.random())
        fds = {v.name: os.open(self.pool.mnt / v.name, os.O_WRONLY) for v in self.vols}
        pending = {v.name: [] for v in self.vols}
        acks, writes = [], 0
        chunk = self.a.chunk_blocks
        nchunks = self.nblocks // chunk
        hot = max(1, nchunks // 16)
        try:
            while not self.stop.is_set():
                v = rng.choice(self.vols)
                # chunks of this writer: (c + v.index) % writers == w
                c = rng.randrange(hot if rng.random() < 0.5 else nchunks)
                c += (w - c - v.index) % self.a.writers      # the next chunk of ours
                if c >= nchunks:
                    c -= self.a.writers
                if c < 0:
                    continue
                first = c * chunk + rng.randrange(chunk)
                n = rng.randint(1, c * chunk + chunk - first)
                gen = next(self.gen)
                for b in range(first, first + n):
                    v.issued[b] = gen
                os.pwrite(fds[v.name], make_blocks(v.index, first, n, gen), first * BLOCK)
                writes += 1
                for b in range(first, first + n):
                    v.low[b] = gen
                    v.torn.pop(b, None)
                    pending[v.name].append((b, gen))
                if rng.random() < self.a.fsync_prob:
                    todo, pending[v.name] = pending[v.name], []
                    (os.fdatasync if rng.random() < 0.5 else os.fsync)(fds[v.name])
                    # Only now, with fsync returned, are these acknowledged.
                    for b, g in todo:
                        if g > v.acked[b]:
                            v.acked[b] = g
                    acks.append((v.name, todo))
        except OSError as e:
            if not self.killed.is_set():
                self.errors.append(f"writer {w}: {e}")
        finally:
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            with self.lock:
                self.it_writes += writes
                self.it_acks += sum(len(t) for _, t in acks)
                with open(self.it_dir / f"acks-{w}.txt", "a") as f:
                    for name, todo in acks:
                        f.write(name + " " + " ".join(f"{b}:{g}" for b, g in todo) + "\n")

    def snapshotter(self, it):
        rng = random.Random(self.rng.random())
        snaps = self.pool.mnt / ".snapshots"
        glog = open(self.it_dir / "groups.txt", "a")
        try:
            while not self.stop.is_set():
                time.sleep(rng.uniform(0.05, 0.15))
                live = [g for g in self.groups.values() if g.state == "present"]
                if live and (len(live) >= self.a.max_groups or rng.random() < 0.4):
                    g = rng.choice(live)
                    g.state = "removing"
                    glog.write(f"{time.time():.3f} rmdir {g.name} start\n")
                    try:
                        os.rmdir(snaps / g.name)
                        g.state = "removed"
                        self.it_removed += 1
                    except OSError as e:
                        g.state = "rmdir-cut" if self.killed.is_set() or \
                            e.errno in DEAD_ERRNOS else "present"
                        if g.state == "present":
                            self.errors.append(f"rmdir {g.name}: {e}")
                    glog.write(f"{time.time():.3f} rmdir {g.name} {g.state}\n")
                    if g.state == "rmdir-cut":
                        break
                else:
                    name = f"g{it:04d}-{next(self.group_seq)}"
                    g = Group(name, self.vols)
                    self.groups[name] = g
                    glog.write(f"{time.time():.3f} mkdir {name} start\n")
                    try:
                        os.mkdir(snaps / name)
                        g.high = {v.name: array.array("Q", v.issued) for v in self.vols}
                        g.state = "present"
                        self.it_made += 1
                    except OSError as e:
                        g.high = {v.name: array.array("Q", v.issued) for v in self.vols}
                        dead = self.killed.is_set() or e.errno in DEAD_ERRNOS
                        g.state = "mkdir-cut" if dead else "failed"
                        if not dead:
                            self.errors.append(f"mkdir {name}: {e}")
                    glog.write(f"{time.time():.3f} mkdir {name} {g.state}\n")
                    if g.state == "mkdir-cut":
                        break
        finally:
            glog.close()

    # -- one iteration -----------------------------------------------------
    def setup(self):
        self.pool = Pool(self.work / "pool", self.a.build, data_size=self.a.data_mib * MiB,
                         meta_size=64 * MiB, faults=self.mode == "powercut",
                         options={"commit_interval": "1s"})
        self.pool.mount(self.work / "daemon-0000.log")
        for v in self.vols:
            fd = os.open(self.pool.mnt / v.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.ftruncate(fd, self.nblocks * BLOCK)
            os.fsync(fd)
            os.close(fd)

    def end_daemon(self):
        """Kill (crash) or power-cut the daemon; whether it died on its own before."""
        died_before = not self.pool.alive()
        self.killed.set()
        how = "died on its own"
        if not died_before:
            if self.mode == "crash":
                how = "SIGKILL"
                os.kill(self.pool.pid, signal.SIGKILL)
            else:
                tear = self.rng.random() < 0.5
                how = "power-cut tear" if tear else "power-cut"
                self.pool.ctl("fault", "power-cut", *(["tear"] if tear else []), timeout=30)
            if self.pool.wait_exit(30) is None:
                # power-cut not taken: end it anyway, count it as a problem
                self.errors.append("the daemon did not exit after the power cut")
                os.kill(self.pool.pid, signal.SIGKILL)
        self.pool.proc.wait()
        self.pool.after_death()
        return died_before, how

    def iteration(self, it):
        self.it_dir = self.work / f"iter-{it:04d}"
        self.it_dir.mkdir(exist_ok=True)
        self.errors, self.findings = [], []
        self.it_writes = self.it_acks = self.it_made = self.it_removed = 0
        self.stop, self.killed = threading.Event(), threading.Event()
        daemon_log = self.pool.log

        threads = [threading.Thread(target=self.writer, args=(w, it))
                   for w in range(self.a.writers)]
        threads.append(threading.Thread(target=self.snapshotter, args=(it,)))
        for t in threads:
            t.start()
        delay = self.rng.uniform(self.a.min_run, self.a.max_run)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and self.pool.alive():
            time.sleep(0.02)
        died_before, how = self.end_daemon()
        self.stop.set()
        for t in threads:
            t.join(60)
            if t.is_alive():
                raise SoakError("a worker thread hangs after the daemon died")
        if died_before:
            self.totals["crashes"] += 1
            self.errors.append("the daemon died on its own (crash)")
        self.totals["writes"] += self.it_writes
        self.totals["acked_writes"] += self.it_acks
        self.totals["groups_made"] += self.it_made
        self.totals["groups_removed"] += self.it_removed

        # metadata and catalog as the crash left them
        copy_sparse(self.pool.meta, self.it_dir / "meta.img")
        copy_sparse(self.pool.catalog, self.it_dir / "catalog.db")
        probs = self.pool.check_metadata(self.it_dir)
        if probs:
            self.totals["checker_failures"] += 1
            self.errors += probs

        self.pool.mount(self.work / f"daemon-{it + 1:04d}.log")
        counts = self.verify(it)
        san, lines = log_findings(daemon_log.read_text(errors="replace"))
        if san:
            self.totals["crashes"] += 1
            self.errors.append(f"sanitizer report in {daemon_log.name}")
        tally(lines, self.daemon_lines)

        ok = not self.errors
        self.totals["iterations"] += 1
        log(f"iter {it + 1}/{self.a.n}: {how} after {delay:.2f}s; {self.it_writes} writes, "
            f"{self.it_acks} block writes acked; groups +{self.it_made} -{self.it_removed}; "
            f"checked {counts['acked']} acked blocks, {counts['groups']} groups; "
            + ("ok" if ok else f"FAILED: {len(self.errors)} problem(s)"))
        if ok:
            shutil.rmtree(self.it_dir)
        else:
            self.totals["failed_iterations"] += 1
            (self.it_dir / "report.txt").write_text("\n".join(self.errors + self.findings) + "\n")
            for e in self.errors[:20]:
                log("    " + e)
            if len(self.errors) > 20:
                log(f"    ... {len(self.errors) - 20} more in {self.it_dir}/report.txt")
            self.kept.append(str(self.it_dir))
            shutil.copy(daemon_log, self.it_dir / "daemon-killed.log")
            shutil.copy(self.pool.log, self.it_dir / "daemon-remount.log")
        daemon_log.unlink()
        return ok

    # -- verification after the remount -------------------------------------
    def verify(self, it):
        mnt = self.pool.mnt
        counts = dict(acked=0, groups=0)
        names = set(os.listdir(mnt)) - {".snapshots"}
        for name in sorted(names - set(self.by_name)):
            size = os.stat(mnt / name).st_size
            self.totals["stray_volumes"] += 1
            self.errors.append(f"stray volume {name} (size {size}) appeared")
            try:
                os.unlink(mnt / name)
                self.findings.append(f"removed stray volume {name} to go on")
            except OSError as e:
                self.errors.append(f"cannot remove stray volume {name}: {e}")
        for v in self.vols:
            if v.name not in names:
                self.errors.append(f"volume {v.name} is missing")
                raise SoakError(f"volume {v.name} is missing after the remount")
            counts["acked"] += self.verify_origin(v)
        self.totals["acked_blocks_checked"] += counts["acked"]
        present = set(os.listdir(mnt / ".snapshots"))
        for name in sorted(present):
            g = self.groups.get(name)
            if g is None:
                self.totals["bad_groups"] += 1
                self.errors.append(f"unknown snapshot group {name} appeared")
                self.remove_group(Group(name, []))
                continue
            if g.state == "failed":
                self.totals["bad_groups"] += 1
                self.errors.append(f"group {name}: mkdir failed, yet the group exists")
            if g.state == "removed":
                self.totals["back_after_rmdir"] += 1
                self.findings.append(f"group {name}: back after an rmdir that returned")
            if self.verify_group(g):
                counts["groups"] += 1
                g.state = "present"
            else:
                self.totals["bad_groups"] += 1
                self.remove_group(g)
        for name in list(self.groups):
            g = self.groups[name]
            if name in present:
                continue
            if g.state == "present":
                self.totals["lost_mkdirs"] += 1
                self.findings.append(f"group {name}: gone although its mkdir returned and "
                                     "no rmdir was made")
            del self.groups[name]
        self.totals["groups_checked"] += counts["groups"]
        return counts

    def remove_group(self, g):
        try:
            os.rmdir(self.pool.mnt / ".snapshots" / g.name)
            self.findings.append(f"removed bad group {g.name} to go on")
        except OSError as e:
            self.errors.append(f"cannot remove bad group {g.name}: {e}")
        self.groups.pop(g.name, None)

    def verify_origin(self, v):
        """Every acknowledged block reads as that generation or a later one
        (each sector), never garbage; then the new lower bounds."""
        path = self.pool.mnt / v.name
        size = os.stat(path).st_size
        if size != self.nblocks * BLOCK:
            self.totals["mismatches"] += 1
            self.errors.append(f"{v.name}: size {size}, expected {self.nblocks * BLOCK}")
        buf = read_all(path, self.nblocks * BLOCK)
        checked = 0
        for b in range(self.nblocks):
            gens = block_gens(buf, b, v.index, b) if b * BLOCK < len(buf) else [None] * SPB
            acked, issued = v.acked[b], v.issued[b]
            if acked:
                checked += 1
            bad = [g for g in gens if g is None or g > issued or (acked and g < acked)]
            if bad:
                self.totals["mismatches"] += 1
                self.errors.append(
                    f"{v.name} block {b} (offset {b * BLOCK}): sector generations {gens}, "
                    f"acknowledged {acked}, last issued {issued}"
                    + (" (garbage: bad checksum, volume or offset)" if None in gens else
                       " (older than acknowledged)" if any(g < acked for g in gens) else
                       " (a generation never written there)"))
                v.low[b] = acked
                v.torn.pop(b, None)
                continue
            if len(set(gens)) > 1:
                if v.torn.get(b) != tuple(gens):
                    self.totals["torn_origin_blocks"] += 1
                v.torn[b] = tuple(gens)
            else:
                v.torn.pop(b, None)
            if min(gens) > acked:
                self.totals["unacked_survived"] += 1
            v.low[b] = min(gens)
        return checked

    def verify_group(self, g):
        """Whole: one member per volume, each block within what its origin
        held during the mkdir."""
        gdir = self.pool.mnt / ".snapshots" / g.name
        members = set(os.listdir(gdir))
        expected = set(self.by_name)
        if members != expected:
            self.errors.append(f"group {g.name} ({g.state}) is partial: members "
                               f"{sorted(members)}, expected {sorted(expected)}")
            return False
        ok = True
        for v in self.vols:
            low, high = g.low[v.name], g.high[v.name]
            buf = read_all(gdir / v.name, self.nblocks * BLOCK)
            if len(buf) != self.nblocks * BLOCK:
                self.errors.append(f"group {g.name}: member {v.name} has {len(buf)} bytes")
                ok = False
                continue
            self.totals["member_blocks_checked"] += self.nblocks
            for b in range(self.nblocks):
                gens = block_gens(buf, b, v.index, b)
                bad = [x for x in gens if x is None or x > high[b] or x < low[b]]
                # mixed, and not as an earlier power cut left the origin
                torn = len(set(gens)) > 1 and g.torn[v.name].get(b) != tuple(gens)
                if bad or torn:
                    self.totals["mismatches"] += 1
                    ok = False
                    self.errors.append(
                        f"group {g.name} ({g.state}) member {v.name} block {b}: sector "
                        f"generations {gens}, origin held {low[b]}..{high[b]} during the mkdir"
                        + (" (torn: one 4 KiB write split by the snapshot)" if torn and not bad
                           else ""))
        return ok

    # -- the run -----------------------------------------------------------
    def run(self):
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"{self.mode} soak: {self.a.n} iterations, {len(self.vols)} volumes of "
            f"{self.a.volume_mib} MiB, {self.a.writers} writers, seed {self.a.seed}, in {self.work}")
        self.setup()
        failed = False
        fatal = None
        try:
            for it in range(self.a.n):
                if not self.iteration(it):
                    failed = True
                    if self.a.stop_on_failure:
                        break
        except (SoakError, OSError) as e:
            # the pool cannot go on (no remount, the daemon died while read back)
            fatal = str(e)
            failed = True
            if self.pool.proc is not None and not self.pool.alive():
                self.totals["crashes"] += 1
                fatal += " (the daemon died)"
                self.pool.after_death()
            it_dir = getattr(self, "it_dir", None)
            if it_dir is not None and it_dir.exists():
                (it_dir / "report.txt").write_text("\n".join(self.errors + [fatal]) + "\n")
                self.kept.append(str(it_dir))
        finally:
            if self.pool.proc is not None:
                err = self.pool.unmount()
                if err:
                    fatal = (fatal + "; " if fatal else "") + err
                    failed = True
        if self.pool.log is not None:
            san, lines = log_findings(self.pool.log.read_text(errors="replace"))
            tally(lines, self.daemon_lines)
            if san:
                self.totals["crashes"] += 1
                failed = True
                log(f"sanitizer report in {self.pool.log}")
        if fatal is None:
            probs = self.pool.check_metadata(self.work)
            if probs:
                self.totals["checker_failures"] += 1
                failed = True
                log("final check: " + "; ".join(probs))
        return self.summary(failed, fatal)

    def summary(self, failed, fatal):
        t = self.totals
        print()
        print(f"==== {self.mode} soak summary (seed {self.a.seed})")
        for k in ("iterations", "failed_iterations", "writes", "acked_writes",
                  "acked_blocks_checked", "mismatches", "checker_failures", "crashes",
                  "stray_volumes", "bad_groups", "groups_made", "groups_removed",
                  "groups_checked", "member_blocks_checked", "lost_mkdirs",
                  "back_after_rmdir", "unacked_survived", "torn_origin_blocks"):
            print(f"  {k:24} {t[k]}")
        print_tally(self.daemon_lines)
        if fatal:
            print(f"  run ended early: {fatal}")
        if self.kept:
            print("  failing iterations kept (logs, metadata and catalog as the crash left them):")
            for k in self.kept:
                print(f"    {k}")
        print(f"RESULT: {'FAILED' if failed else 'ok'}")
        return 1 if failed else 0


# ---- stress --------------------------------------------------------------

def strict_json(raw):
    """status --json must be strict JSON: valid UTF-8, no NaN/Infinity."""
    def no_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(raw.decode("utf-8", "strict"), parse_constant=no_constant)


def check_status(s):
    pool = s["pool"]
    assert pool["mode"] in ("write", "out_of_data_space", "read_only", "fail"), pool["mode"]
    for k in ("needs_check", "suspended"):
        assert isinstance(pool[k], bool), k
    for dev in ("data", "metadata"):
        d = pool[dev]
        assert 0 <= d["used_blocks"] <= d["total_blocks"], d
    assert isinstance(s["volumes"], list) and isinstance(s["snapshot_groups"], list)
    for v in s["volumes"]:
        assert isinstance(v["name"], str) and isinstance(v["size"], int), v


def rss_kib(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


class Stress:
    def __init__(self, a):
        self.a = a
        self.work = Path(a.workdir)
        self.rng = random.Random(a.seed)
        self.stop = threading.Event()
        self.c = dict(groups_made=0, groups_removed=0, snapshot_busy=0,
                      partial_after_refused_rmdir=0, status_polls=0, status_bad=0, suspends=0,
                      suspend_failures=0)
        self.errors = []
        self.rss = []
        self.lat = {}   # operation -> [count, total seconds, max seconds]

    def timed(self, op, fn, *args, **kw):
        t = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            d = time.monotonic() - t
            c = self.lat.setdefault(op, [0, 0.0, 0.0])
            c[0] += 1
            c[1] += d
            c[2] = max(c[2], d)

    def snapshotter(self):
        snaps = self.pool.mnt / ".snapshots"
        live, seq = [], itertools.count(1)
        while not self.stop.wait(0.1):
            try:
                if len(live) >= 3 or (live and self.rng.random() < 0.4):
                    self.timed("rmdir", os.rmdir, snaps / live[0])
                    live.pop(0)
                    self.c["groups_removed"] += 1
                else:
                    name = f"s{next(seq)}"
                    self.timed("mkdir", os.mkdir, snaps / name)
                    live.append(name)
                    self.c["groups_made"] += 1
            except OSError as e:
                if e.errno == errno.EBUSY:   # the pool is suspended
                    self.c["snapshot_busy"] += 1
                    if e.filename and os.path.basename(e.filename) in live:
                        self.check_refused_rmdir(e.filename)
                else:
                    self.errors.append(f"snapshot group: {e}")

    def check_refused_rmdir(self, gdir):
        """A refused rmdir changes nothing: the group is still whole."""
        members = sorted(os.listdir(gdir))
        if members != [f"v{i}" for i in range(4)]:
            self.errors.append(f"{gdir}: members {members} after a refused rmdir")
            return
        for m in members:
            try:
                fd = os.open(os.path.join(gdir, m), os.O_RDONLY)
                try:
                    os.pread(fd, BLOCK, 0)
                finally:
                    os.close(fd)
            except OSError as e:
                self.c["partial_after_refused_rmdir"] += 1
                self.errors.append(f"{gdir}/{m} after a refused rmdir (EBUSY): {e}")
                return

    def poller(self):
        while not self.stop.wait(0.2):
            p = self.timed("status --json", self.pool.ctl, "status", "--json")
            self.c["status_polls"] += 1
            try:
                if p.returncode != 0:
                    raise ValueError(f"exit {p.returncode}: {p.stderr.decode(errors='replace')}")
                check_status(strict_json(p.stdout))
            except (ValueError, KeyError, TypeError, AssertionError) as e:
                self.c["status_bad"] += 1
                if self.c["status_bad"] <= 5:
                    self.errors.append(f"status --json: {type(e).__name__}: {e}")

    def suspender(self):
        while not self.stop.wait(self.rng.uniform(2, 5)):
            p = self.timed("suspend", self.pool.ctl, "suspend", "--timeout", "60", timeout=120)
            self.c["suspends"] += 1
            if p.returncode != 0:
                self.c["suspend_failures"] += 1
                self.errors.append(f"suspend: {p.stderr.decode(errors='replace').strip()}")
            time.sleep(self.rng.uniform(0.05, 0.5))
            p = self.pool.ctl("resume", timeout=120)
            if p.returncode != 0:
                self.c["suspend_failures"] += 1
                self.errors.append(f"resume: {p.stderr.decode(errors='replace').strip()}")

    def sampler(self):
        while True:
            r = rss_kib(self.pool.pid)
            if r:
                self.rss.append((round(time.monotonic() - self.t0, 1), r.get("VmRSS", 0),
                                 r.get("VmHWM", 0)))
            if self.stop.wait(1):
                return

    def run(self):
        a = self.a
        self.work.mkdir(parents=True, exist_ok=True)
        secs = int(a.minutes * 60)
        log(f"stress soak: {secs}s, 4 volumes of {a.volume_mib} MiB under fio, in {self.work}")
        self.pool = Pool(self.work / "pool", a.build, data_size=a.data_mib * MiB,
                         meta_size=256 * MiB, faults=False)
        self.pool.mount(self.work / "daemon.log")
        self.t0 = time.monotonic()
        jobs = []
        for i in range(4):
            path = self.pool.mnt / f"v{i}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.ftruncate(fd, a.volume_mib * MiB)
            os.close(fd)
            jobs += [f"--name=v{i}", f"--filename={path}"]
        fio = ["fio", "--output-format=json", f"--output={self.work}/fio.json",
               "--ioengine=psync", "--direct=1", "--rw=randrw", "--rwmixread=50",
               "--bssplit=4k/40:16k/20:64k/20:128k/10:1m/10", f"--size={a.volume_mib}M",
               "--verify=crc32c", "--verify_backlog=512", "--verify_state_save=0",
               "--time_based", f"--runtime={secs}", "--randrepeat=0"] + jobs
        threads = [threading.Thread(target=t) for t in
                   (self.snapshotter, self.poller, self.suspender, self.sampler)]
        with open(self.work / "fio.stderr", "w") as ferr:
            fproc = subprocess.Popen(fio, stdout=ferr, stderr=subprocess.STDOUT)
            for t in threads:
                t.start()
            try:
                frc = fproc.wait(timeout=secs + 600)
            except subprocess.TimeoutExpired:
                fproc.kill()
                frc = fproc.wait()
                self.errors.append("fio did not finish within 10 minutes of its runtime")
        self.stop.set()
        for t in threads:
            t.join(180)
        self.pool.ctl("resume")
        final = rss_kib(self.pool.pid)
        verify_errors, fio_errors = self.fio_results(frc)
        crashed = not self.pool.alive()
        if crashed:
            self.errors.append("the daemon died during the run")
            self.pool.after_death()
        else:
            err = self.pool.unmount()
            if err:
                self.errors.append(err)
        san, lines = log_findings(self.pool.log.read_text(errors="replace"))
        if san:
            crashed = True
            self.errors.append(f"sanitizer report in {self.pool.log}")
        # Nothing here is a crash or a fault: an error the daemon logs is a bug.
        bad = [l for l in lines if "error:" in l]
        if bad:
            self.errors.append(f"{len(bad)} error line(s) in the daemon log, the first: {bad[0]}")
        probs = self.pool.check_metadata(self.work)
        self.errors += probs
        with open(self.work / "rss.csv", "w") as f:
            f.write("seconds,VmRSS_kib,VmHWM_kib\n")
            f.writelines(f"{t},{r},{h}\n" for t, r, h in self.rss)
        peak = max([h for _, _, h in self.rss] + [final.get("VmHWM", 0)])
        print()
        print(f"==== stress soak summary ({secs}s, seed {a.seed})")
        print(f"  fio verify errors        {verify_errors}")
        print(f"  fio other errors         {fio_errors}")
        print(f"  checker failures         {len(probs)}")
        print(f"  crashes                  {int(crashed)}")
        for k, v in self.c.items():
            print(f"  {k:24} {v}")
        if self.rss:
            third = [self.rss[len(self.rss) * i // 3][1] for i in range(3)]
            print(f"  daemon VmRSS (MiB)       start {self.rss[0][1] / 1024:.0f}, at 1/3 "
                  f"{third[1] / 1024:.0f}, at 2/3 {third[2] / 1024:.0f}, end "
                  f"{self.rss[-1][1] / 1024:.0f}")
        print(f"  daemon peak RSS (VmHWM)  {peak / 1024:.0f} MiB (series in {self.work}/rss.csv)")
        for op, (n, total, worst) in sorted(self.lat.items()):
            print(f"  {op + ' latency':24} {n} calls, mean {total / n * 1000:.0f} ms, "
                  f"max {worst * 1000:.0f} ms")
        counted = {}
        tally(lines, counted)
        print_tally(counted)
        for e in self.errors[:20]:
            print(f"  problem: {e}")
        failed = bool(self.errors) or verify_errors or fio_errors or crashed
        print(f"RESULT: {'FAILED' if failed else 'ok'}")
        return 1 if failed else 0

    def fio_results(self, rc):
        """(verify errors, other errors) from fio's JSON and its stderr."""
        text = (self.work / "fio.stderr").read_text(errors="replace")
        verify = sum(1 for l in text.splitlines() if "verify" in l.lower() and
                     ("bad" in l.lower() or "fail" in l.lower() or "mismatch" in l.lower()))
        other = 0
        try:
            res = json.loads((self.work / "fio.json").read_text())
            for j in res["jobs"]:
                if j.get("error"):
                    if j["error"] == errno.EILSEQ:
                        verify = max(verify, 1)
                    else:
                        other += 1
        except (OSError, ValueError, KeyError) as e:
            other += 1
            self.errors.append(f"fio output unreadable: {e}")
        if rc != 0 and not (verify or other):
            other += 1
        if verify or other:
            self.errors.append(f"fio exited {rc}: " + " | ".join(text.splitlines()[-5:]))
        return verify, other


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("crash", "powercut", "stress"))
    ap.add_argument("size", type=float, help="iterations (crash, powercut) or minutes (stress)")
    ap.add_argument("--build", required=True, help="build directory (tools/thinfs)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--volume-mib", type=int, default=None)
    ap.add_argument("--data-mib", type=int, default=None)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--chunk-blocks", type=int, default=4,
                    help="4 KiB blocks per writer chunk (writers alternate chunks)")
    ap.add_argument("--fsync-prob", type=float, default=0.15)
    ap.add_argument("--max-groups", type=int, default=3)
    ap.add_argument("--min-run", type=float, default=0.3, help="seconds before the kill, at least")
    ap.add_argument("--max-run", type=float, default=3.0, help="seconds before the kill, at most")
    ap.add_argument("--stop-on-failure", action="store_true")
    a = ap.parse_args()
    if os.path.isdir(a.workdir) and os.listdir(a.workdir):
        ap.error(f"--workdir {a.workdir} is not empty (a soak starts from a fresh pool)")
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    if a.mode == "stress":
        a.minutes = a.size
        a.volume_mib = a.volume_mib or 128
        a.data_mib = a.data_mib or 8192
        return Stress(a).run()
    a.n = int(a.size)
    a.volume_mib = a.volume_mib or 8
    a.data_mib = a.data_mib or 1024
    if a.writers < 2:
        ap.error("--writers: at least 2")
    return Crash(a).run()


if __name__ == "__main__":
    sys.exit(main())
