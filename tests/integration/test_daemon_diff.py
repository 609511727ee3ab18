# SPDX-License-Identifier: GPL-2.0-or-later
"""Changed-block diffs (issue 13): `thinfs-ctl MNT diff FROM TO` against a
model of which data block each volume block maps, over random writes,
discards and snapshots; against thin_delta on the same metadata; against a
writer running during the diff (the answer is the volume at one instant);
bad names refused; and the offline `thinfs diff`."""
import json
import os
import re
import threading

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_cmd
from daemon_util import (BS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, create, fallocate,
                         fsync_path, pattern, write_at)

NBLOCKS = 24


def diff(p, frm, to, *extra, json_too=True):
    """[(offset, length, kind)] from the text output; the JSON output must agree."""
    text = p.ctl("diff", frm, to, *extra).stdout
    runs = [(int(o), int(n), k) for o, n, k in (line.split() for line in text.splitlines())]
    if json_too:
        as_json = json.loads(p.ctl("diff", frm, to, "--json", *extra).stdout)
        assert [(x["offset"], x["length"], x["kind"]) for x in as_json] == runs
    return runs


def runs_of(kinds):
    """{block: kind} -> merged [(offset, length, kind)] in bytes."""
    out = []
    for b in sorted(kinds):
        k = kinds[b]
        if out and out[-1][2] == k and out[-1][0] + out[-1][1] == b * BS:
            out[-1] = (out[-1][0], out[-1][1] + BS, k)
        else:
            out.append((b * BS, BS, k))
    return out


class Model:
    """Which data block each volume block maps, as the engine decides it: a
    write goes in place unless the mapping predates the volume's last
    snapshot (then it is copied to a new block), so snapshots share blocks
    until either side writes them."""

    def __init__(self):
        self.time = 0
        self.next_block = 0
        self.vols = {}            # name -> {"snap_time": t, "map": {vblock: (block, time)}}

    def new_volume(self, name):
        self.vols[name] = {"snap_time": self.time, "map": {}}

    def write(self, name, b):
        v = self.vols[name]
        old = v["map"].get(b)
        if old is None or old[1] < v["snap_time"]:
            self.next_block += 1
            v["map"][b] = (self.next_block, self.time)

    def discard(self, name, b):
        self.vols[name]["map"].pop(b, None)

    def snapshot(self, origin, name):
        self.time += 1
        self.vols[origin]["snap_time"] = self.time
        self.vols[name] = {"snap_time": self.time, "map": dict(self.vols[origin]["map"])}

    def diff(self, frm, to):
        a = self.vols[frm]["map"] if frm != "-" else {}
        b = self.vols[to]["map"] if to != "-" else {}
        kinds = {v: "data" for v, m in b.items() if v not in a or a[v][0] != m[0]}
        kinds.update({v: "zero" for v in a if v not in b})
        return runs_of(kinds)


ops = st.lists(st.tuples(st.sampled_from(["write", "write", "write", "discard", "group",
                                          "clone"]),
                         st.integers(0, NBLOCKS - 1), st.integers(1, 4), st.integers(0, 1)),
               min_size=3, max_size=14)


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=ops)
def test_diff_matches_a_model_of_the_mappings(pool, ops):
    # One mount for every example (the fixture is made once per test), each
    # example in volumes of its own.
    if not hasattr(pool, "shared"):
        pool.shared, pool.examples = pool(), 0
    p = pool.shared
    pool.examples += 1
    ex = pool.examples
    m = Model()
    tops = [f"a{ex}", f"b{ex}"]
    for name in tops:
        create(p.mnt / name, NBLOCKS * BS)
        m.new_volume(name)
    names = list(tops)
    for i, (op, b, n, which) in enumerate(ops):
        vol = tops[which]
        n = min(n, NBLOCKS - b)
        if op == "write":
            write_at(p.mnt / vol, b * BS, pattern(i, n * BS))
            for k in range(b, b + n):
                m.write(vol, k)
        elif op == "discard":
            fd = os.open(p.mnt / vol, os.O_RDWR)
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b * BS, n * BS)
                os.fsync(fd)
            finally:
                os.close(fd)
            for k in range(b, b + n):
                m.discard(vol, k)
        elif op == "group":
            group = f"g{ex}x{i}"
            os.mkdir(p.mnt / ".snapshots" / group)
            for t in tops:
                m.snapshot(t, f"{group}/{t}")
                names.append(f"{group}/{t}")
        else:
            clone = f"c{ex}x{i}"
            p.ctl("snapshot", vol, clone)
            m.snapshot(vol, clone)
            names.append(clone)
            tops.append(clone)
    # Every volume against nothing, the first volume and the one made before it.
    for i, to in enumerate(names + ["-"]):
        for frm in {"-", names[0], names[i - 1]}:
            assert diff(p, frm, to) == m.diff(frm, to), f"diff {frm} {to}"


def test_diff_lists_what_changed_since_a_group_snapshot(pool):
    p = pool()
    vm = create(p.mnt / "vm1", 64 * BS)
    write_at(vm, 0, pattern(1, 8 * BS))
    os.mkdir(p.mnt / ".snapshots" / "night")
    write_at(vm, 2 * BS, pattern(2, 2 * BS))            # rewritten: copied, so data
    write_at(vm, 40 * BS + 100, b"x")                    # new block
    fd = os.open(vm, os.O_RDWR)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 6 * BS, BS)
    os.close(fd)
    fsync_path(vm)
    assert diff(p, "night/vm1", "vm1") == [(2 * BS, 2 * BS, "data"), (6 * BS, BS, "zero"),
                                           (40 * BS, BS, "data")]
    assert diff(p, ".snapshots/night/vm1", "vm1") == diff(p, "night/vm1", "vm1")
    assert diff(p, "vm1", "night/vm1") == [(2 * BS, 2 * BS, "data"), (6 * BS, BS, "data"),
                                           (40 * BS, BS, "zero")]
    assert diff(p, "-", "vm1") == [(0, 6 * BS, "data"), (7 * BS, BS, "data"),
                                   (40 * BS, BS, "data")]
    assert diff(p, "vm1", "-") == [(0, 6 * BS, "zero"), (7 * BS, BS, "zero"),
                                   (40 * BS, BS, "zero")]
    assert diff(p, "night/vm1", "night/vm1") == []
    # --stats: a summary on stderr, the extents alone on stdout.
    r = p.ctl("diff", "night/vm1", "vm1", "--stats")
    assert len(r.stdout.splitlines()) == 3
    assert re.fullmatch(r"diff: 3 extents, \d+ metadata blocks read, [0-9.]+ ms\n", r.stderr)
    # A diff changes nothing: no held root left, the pool idle again.
    assert p.status()["pool"]["held_root"] is None
    # It reads, so it works while the pool is suspended, and on a read-only mount.
    want = diff(p, "night/vm1", "vm1")
    p.ctl("suspend")
    try:
        assert diff(p, "night/vm1", "vm1") == want
    finally:
        p.ctl("resume")
    p.unmount()
    p.mount("-o", "ro")
    assert diff(p, "night/vm1", "vm1") == want


def test_diff_refuses_bad_names_and_a_held_metadata_snapshot(pool):
    p = pool()
    create(p.mnt / "vm1", BS)
    for args, msg in ((("nope", "vm1"), "no volume named 'nope'"),
                      (("vm1", "night/vm1"), "no volume named 'night/vm1'"),
                      (("vm1",), "usage: diff FROM TO"),
                      (("vm1", "vm1", "vm1"), "usage: diff FROM TO"),
                      (("vm1", "vm1", "--bogus"), "unknown option '--bogus'")):
        r = p.ctl("diff", *args, ok=(1,))
        assert r.stdout == ""
        assert msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    p.ctl("reserve-metadata-snap")
    r = p.ctl("diff", "-", "vm1", ok=(1,))
    assert "a metadata snapshot is held" in r.stderr
    p.ctl("release-metadata-snap")
    assert diff(p, "-", "vm1") == []


def diffs_during(p, work, check, most):
    """Diffs of vm1 from nothing while work(done) runs in a thread, each
    answer given to check(runs) (which returns what it saw), until work
    ends or `most` diffs; work must really have run meanwhile."""
    done = threading.Event()
    errors = []

    def run():
        try:
            work(done)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    seen = []
    try:
        while t.is_alive() and len(seen) < most:
            seen.append(check(diff(p, "-", "vm1", json_too=False)))
    finally:
        done.set()
        t.join()
    assert not errors
    assert len(set(seen)) > 2, seen


def test_diff_during_writes_is_the_volume_at_one_instant(pool):
    """A writer fills blocks in increasing order, syncing every 16: every
    diff taken meanwhile must be one run from block 0 (a prefix of what the
    writer did), and it must include what was synced before it began."""
    p = pool()
    n = 3000
    vm = create(p.mnt / "vm1", n * BS)
    written = [0]

    def writer(done):
        fd = os.open(vm, os.O_WRONLY)
        try:
            data = pattern(3, BS)
            for b in range(n):
                os.pwrite(fd, data, b * BS)
                if b % 16 == 15:
                    os.fsync(fd)
                    written[0] = b + 1
                if done.is_set():
                    break
        finally:
            os.close(fd)

    synced = [0]    # what written[] said before the diff being checked began

    def check(runs):
        assert len(runs) <= 1, runs
        assert runs == [] or runs[0][0] == 0 and runs[0][2] == "data", runs
        got = runs[0][1] // BS if runs else 0
        assert got >= synced[0], (got, synced[0])
        synced[0] = written[0]
        return got

    diffs_during(p, writer, check, 200)
    fsync_path(vm)
    assert p.status()["pool"]["held_root"] is None


def punch(path, b, n=1):
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b * BS, n * BS)
    finally:
        os.close(fd)


def test_diff_walk_in_steps_holds_one_instant_while_blocks_go(pool):
    """A volume big enough that the walk drops the pool's lock between
    steps.  A writer unmaps one block at the top end, then one at the
    bottom end, and so on: every state that was true at one instant has
    as many blocks gone at the top as at the bottom, or one more.  A walk
    that saw the bottom early and the top late would count more at the
    top.  Meanwhile commits run (the writer syncs), and a diff of the
    group snapshot against the volume reads only the changed paths."""
    p = pool(data_size=4 << 30)
    n = 40000
    vm = create(p.mnt / "vm1", n * BS)
    fd = os.open(vm, os.O_RDWR)
    os.posix_fallocate(fd, 0, n * BS)           # provisions every block (zeroed, no data written)
    os.fsync(fd)
    os.close(fd)
    os.mkdir(p.mnt / ".snapshots" / "base")
    full = p.ctl("diff", "-", "vm1", "--stats")
    assert full.stdout == f"0 {n * BS} data\n"
    leaves_read = int(re.search(r"(\d+) metadata blocks read", full.stderr).group(1))
    assert leaves_read > n // 252

    def writer(done):
        for i in range(n // 2 - 1):
            if done.is_set():
                break
            punch(vm, n - 1 - i)
            punch(vm, i)
            if i % 32 == 0:
                fsync_path(vm)

    def check(runs):
        assert len(runs) == 1, runs
        off, length, kind = runs[0]
        bottom, top = off // BS, n - (off + length) // BS
        assert kind == "data" and top - bottom in (0, 1), (bottom, top)
        return bottom

    diffs_during(p, writer, check, 60)
    # The snapshot still maps everything; from it, only the changed paths are read.
    fsync_path(vm)
    write_at(p.mnt / "vm1", n // 2 * BS, b"y")
    runs = p.ctl("diff", "base/vm1", "vm1", "--stats")
    read = int(re.search(r"(\d+) metadata blocks read", runs.stderr).group(1))
    assert read < leaves_read
    assert p.status()["pool"]["held_root"] is None


def thin_delta_runs(meta, left, right):
    """thin_delta's answer for left -> right, as diff's runs."""
    xml = run_cmd("thin_delta", "--snap1", str(left), "--snap2", str(right), meta).stdout
    kinds = {}
    for tag, begin, length in re.findall(r'<(\w+) begin="(\d+)" length="(\d+)"', xml):
        kind = {"different": "data", "right_only": "data", "left_only": "zero"}.get(tag)
        for b in range(int(begin), int(begin) + int(length)):
            if kind:
                kinds[b] = kind
    return runs_of(kinds)


def test_diff_agrees_with_thin_delta_and_offline_diff(pool):
    p = pool()
    vm = create(p.mnt / "vm1", 2000 * BS)
    write_at(vm, 0, pattern(4, 1500 * BS))
    os.mkdir(p.mnt / ".snapshots" / "s1")
    for b in (3, 4, 5, 700, 1499, 1600, 1601):
        write_at(vm, b * BS, pattern(b, BS))
    fd = os.open(vm, os.O_RDWR)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 900 * BS, 40 * BS)
    os.close(fd)
    fsync_path(vm)
    p.ctl("snapshot", "s1/vm1", "clone")
    write_at(p.mnt / "clone", 10 * BS, pattern(9, 3 * BS))
    pairs = [("s1/vm1", "vm1"), ("vm1", "s1/vm1"), ("s1/vm1", "clone"), ("clone", "vm1"),
             ("vm1", "vm1")]
    live = {pair: diff(p, *pair) for pair in pairs}
    status = p.status()
    ids = {v["name"]: v["id"] for v in status["volumes"]}
    ids["s1/vm1"] = next(i for i in range(16) if i not in ids.values())
    p.unmount()
    for (frm, to), runs in live.items():
        assert runs == thin_delta_runs(p.meta, ids[frm], ids[to]), (frm, to)
        off = p.thinfs_run("diff", p.cfg, frm, to).stdout
        assert [tuple(l.split()) for l in off.splitlines()] == \
            [(str(o), str(n), k) for o, n, k in runs]
        by_id = p.thinfs_run("diff", p.meta, str(ids[frm]), str(ids[to]), "--json").stdout
        assert [(x["offset"], x["length"], x["kind"]) for x in json.loads(by_id)] == runs
    assert live[("s1/vm1", "vm1")][0] == (3 * BS, 3 * BS, "data")
    r = p.thinfs_run("diff", p.cfg, "nope", "vm1", ok=(2,))
    assert "no volume named 'nope'" in r.stderr
    p.mount()
    r = p.thinfs_run("diff", p.cfg, "-", "vm1", ok=(2,))
    assert "in use by a thinfs daemon" in r.stderr
