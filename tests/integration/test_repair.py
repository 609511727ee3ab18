# SPDX-License-Identifier: GPL-2.0-or-later
"""thinfs check --repair: salvage what can be read, rebuild in place, report
what was lost; the result passes both checkers and keeps every readable
mapping."""
import json
import os
import subprocess
from pathlib import Path

from test_engine_interop import (THINFS, WORKLOAD, parse_dump, run, sparse, thin_check_clean,
                                 thinfs_check_clean, workload)

BTREE_SALT = 121107


def leaves_of(img, device_blocks):
    """Block numbers of btree leaves whose values look like mappings (value_size 8)."""
    data = Path(img).read_bytes()
    out = []
    for b in range(1, len(data) // 4096):
        blk = data[b * 4096:(b + 1) * 4096]
        flags = int.from_bytes(blk[4:8], "little")
        if (flags == 2 and int.from_bytes(blk[8:16], "little") == b
                and int.from_bytes(blk[24:28], "little") == 8
                and int.from_bytes(blk[16:20], "little") > 50):
            out.append(b)
    return out


def smash(img, block):
    with open(img, "r+b") as f:
        f.seek(block * 4096 + 40)
        old = f.read(64)
        f.seek(block * 4096 + 40)
        f.write(b"\xff" * 64)
    return old


def smash_live_leaf(img):
    """Damage a mapping leaf the live trees use (free blocks keep stale leaves too)."""
    for b in leaves_of(img, None):
        old = smash(img, b)
        if run(THINFS, "check", "-q", img, check=False).returncode != 0:
            return b
        with open(img, "r+b") as f:
            f.seek(b * 4096 + 40)
            f.write(old)
    raise AssertionError("no live mapping leaf found")


def test_repair_rebuilds_what_can_be_read_and_reports_the_loss(tmp_path):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    model = workload(img, "--format", 100000, "--seed", 5, "--ops", 400)
    before_mappings = sum(len(d["mappings"]) for d in model["devices"].values())
    bad = smash_live_leaf(img)
    p = run(THINFS, "check", img, check=False)
    assert p.returncode != 0
    assert str(bad) in p.stdout + p.stderr

    p = run(THINFS, "check", "--repair", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "lost" in p.stdout + p.stderr
    thin_check_clean(img)
    thinfs_check_clean(img)
    _, devs = parse_dump(run("thin_dump", img).stdout)
    assert sorted(devs) == sorted(model["devices"])
    after_mappings = sum(len(d["mappings"]) for d in devs.values())
    assert 0 < after_mappings < before_mappings
    # Every mapping that survived is one the pool really had.
    for dev_id, d in devs.items():
        want = {tuple(m) for m in model["devices"][dev_id]["mappings"]}
        assert {tuple(m) for m in d["mappings"]} <= want
        assert d["mapped_blocks"] == len(d["mappings"])
    # And the repaired pool takes changes.
    workload(img, "--seed", 6, "--ops", 200)
    thin_check_clean(img)


def test_repair_of_clean_metadata_keeps_everything(tmp_path):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    model = workload(img, "--format", 100000, "--seed", 7, "--ops", 300, "--needs-check")
    assert model["needs_check"]
    run(THINFS, "check", "--repair", img)
    thin_check_clean(img)
    attrs, devs = parse_dump(run("thin_dump", img).stdout)
    assert attrs["flags"] == "0"
    assert int(attrs["transaction"]) == model["transaction_id"]
    for dev_id, want in model["devices"].items():
        assert devs[dev_id]["mappings"] == want["mappings"]


def test_clear_needs_check_only_when_clean(tmp_path):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    workload(img, "--format", 10000, "--seed", 8, "--ops", 100, "--needs-check")
    run(THINFS, "check", "--clear-needs-check", img)
    assert parse_dump(run("thin_dump", img).stdout)[0]["flags"] == "0"
    workload(img, "--seed", 9, "--ops", 10, "--needs-check")
    smash_live_leaf(img)
    p = run(THINFS, "check", "--clear-needs-check", img, check=False)
    assert p.returncode != 0
    with open(img, "rb") as f:
        f.seek(4)
        assert int.from_bytes(f.read(4), "little") & 1


def test_check_resolves_device_names_in_pool_cfg_and_names_a_missing_one(tmp_path):
    cfg = tmp_path / "pool.cfg"
    cfg.write_text("[pool]\nmetadata = LABEL=thinfs-no-such-label-7c1\ndata = data.img\n")
    p = run(THINFS, "check", cfg, check=False)
    assert p.returncode == 2
    assert "pool.cfg:2: metadata: LABEL=thinfs-no-such-label-7c1: no such device" in p.stderr
