# SPDX-License-Identifier: GPL-2.0-or-later
"""Classic COW snapshots (dm-snapshot): [origin] and [snapshot] sections,
thinfs-ctl snapshot --cow, the origin and cow-snapshot targets on real
mounts.  Origin and COW devices are sparse files next to the pool."""
import json
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
    assert read_at(p.mnt / "s1", 0, 4 * MiB) == pattern(1, 4 * MiB)
    # An origin write: the snapshot keeps the old chunk.
    write_at(p.mnt / "db", 8192 + 100, b"N" * 4096)
    assert read_at(p.mnt / "db", 8192 + 100, 4096) == b"N" * 4096
    assert read_at(p.mnt / "s1", 0, 3 * 8192) == pattern(1, 3 * 8192)
    assert vol(p, "s1")["cow"]["allocated_sectors"] == (16 + 2 * 16)
    p.unmount()
    assert "snapshot s1 (COW device" in check_cfg(p).stdout
    assert "clean, 1 exception(s)" in check_cfg(p).stdout
