# SPDX-License-Identifier: GPL-2.0-or-later
"""The metadata engine against thin-provisioning-tools, an independent
implementation of the same format: what thinfs writes must pass thin_check
with no complaint and thin_dump must list exactly what the engine believes
it wrote; what thin_restore writes must open in thinfs, read back
identically and take thinfs changes."""
import json
import os
import random
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("THINFS_BUILD_DIR", ROOT / "build"))
WORKLOAD = Path(os.environ.get("META_WORKLOAD_BIN", BUILD / "tests/helpers/meta-workload"))
THINFS = Path(os.environ.get("THINFS_BIN", BUILD / "tools/thinfs"))


def run(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def workload(image, *args):
    return json.loads(run(WORKLOAD, image, *args).stdout)


def thin_check_clean(image, *extra):
    p = run("thin_check", *extra, image, check=False)
    assert p.returncode == 0, f"thin_check failed:\n{p.stdout}\n{p.stderr}"
    # No warnings either: only the progress lines 0.9.0 prints.
    progress = ("TRANSACTION_ID=", "METADATA_FREE_BLOCKS=", "examining ", "checking space map")
    noise = [l for l in (p.stdout + p.stderr).splitlines() if l and not l.startswith(progress)]
    assert not noise, f"thin_check complained:\n{p.stdout}\n{p.stderr}"


def thinfs_check_clean(image):
    p = run(THINFS, "check", image, check=False)
    assert p.returncode == 0, f"thinfs check failed:\n{p.stdout}\n{p.stderr}"


def parse_dump(xml_text):
    sb = ET.fromstring(xml_text)
    devs = {}
    for d in sb.findall("device"):
        maps = []
        for m in d:
            if m.tag == "range_mapping":
                ob, db, n, t = (int(m.get(k)) for k in ("origin_begin", "data_begin", "length", "time"))
                maps += [[ob + i, db + i, t] for i in range(n)]
            else:
                maps.append([int(m.get("origin_block")), int(m.get("data_block")), int(m.get("time"))])
        devs[d.get("dev_id")] = {"mapped_blocks": int(d.get("mapped_blocks")), "mappings": maps,
                                 "attrs": dict(d.attrib)}
    return sb.attrib, devs


def assert_dump_matches(image, model, *dump_args):
    attrs, devs = parse_dump(run("thin_dump", *dump_args, image).stdout)
    assert int(attrs["transaction"]) == model["transaction_id"]
    assert int(attrs["time"]) == model["time"]
    assert sorted(devs) == sorted(model["devices"])
    for dev_id, want in model["devices"].items():
        got = devs[dev_id]
        assert got["mappings"] == want["mappings"], f"device {dev_id} mappings differ"
        assert got["mapped_blocks"] == want["mapped_blocks"] == len(want["mappings"])
    return attrs, devs


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_engine_images_pass_thin_check_and_dump_as_modelled(tmp_path, seed):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    model = workload(img, "--format", 200000, "--seed", seed, "--ops", 400)
    assert model["devices"], "the workload created no device"
    thin_check_clean(img)
    assert_dump_matches(img, model)
    # Reopening and continuing keeps it clean.
    model = workload(img, "--seed", seed + 100, "--ops", 300)
    thin_check_clean(img)
    assert_dump_matches(img, model)
    thinfs_check_clean(img)


def test_big_devices_with_deep_trees_pass_thin_check(tmp_path):
    img = sparse(tmp_path / "meta.bin", 64 << 20)
    model = workload(img, "--format", 2000000, "--seed", 9, "--ops", 3000,
                     "--devices", 4, "--span", 400000)
    thin_check_clean(img)
    assert_dump_matches(img, model)
    thinfs_check_clean(img)


def test_random_writes_around_a_snapshot_fill_leaves_and_pass_thin_check(tmp_path):
    # 60,000 random single-block writes, a snapshot, then 15,000 more into
    # each: full leaves get room by moving entries into siblings or splitting
    # two into three, and after the snapshot the shared neighbours are left
    # alone.  The kernel's checker accepts every node.
    img = sparse(tmp_path / "meta.bin", 64 << 20)
    model = workload(img, "--format", 2000000, "--seed", 11, "--ops", 0,
                     "--span", 1000000, "--fill", 60000)
    assert sorted(model["devices"]) == ["0", "1"]
    thin_check_clean(img)
    assert_dump_matches(img, model)
    thinfs_check_clean(img)
    for dev_id, dev in model["devices"].items():
        fill = dev["mapped_blocks"] / (dev["leaves"] * dev["leaf_capacity"])
        # Plain splits would leave leaves about 70% full.
        assert fill > 0.8, f"device {dev_id}: leaves only {fill:.0%} full"


def test_block_size_is_recorded_in_sectors(tmp_path):
    img = sparse(tmp_path / "meta.bin", 8 << 20)
    workload(img, "--format", 1000, "--block-sectors", 2048, "--ops", 50)
    attrs, _ = parse_dump(run("thin_dump", img).stdout)
    assert attrs["data_block_size"] == "2048"
    assert attrs["nr_data_blocks"] == "1000"
    thin_check_clean(img)


def test_metadata_snapshot_is_readable_by_thin_dump_m(tmp_path):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    model = workload(img, "--format", 100000, "--seed", 11, "--ops", 300, "--held-root")
    assert model["held_root"] > 0
    thin_check_clean(img)
    # The held copy describes the same committed state.
    _, devs = parse_dump(run("thin_dump", "-m", img).stdout)
    assert sorted(devs) == sorted(model["devices"])
    for dev_id, want in model["devices"].items():
        assert devs[dev_id]["mappings"] == want["mappings"]
    # Changes after the snapshot leave the held copy as it was.
    model2 = workload(img, "--seed", 12, "--ops", 300)
    thin_check_clean(img)
    assert_dump_matches(img, model2)
    _, devs2 = parse_dump(run("thin_dump", "-m", img).stdout)
    assert devs2 == devs


def test_needs_check_shows_in_thin_dump_and_clears_with_thin_check(tmp_path):
    img = sparse(tmp_path / "meta.bin", 8 << 20)
    workload(img, "--format", 10000, "--ops", 100, "--needs-check")
    attrs, _ = parse_dump(run("thin_dump", img).stdout)
    assert attrs["flags"] == "1"
    run("thin_check", "--clear-needs-check-flag", img)
    attrs, _ = parse_dump(run("thin_dump", img).stdout)
    assert attrs["flags"] == "0"
    model = workload(img, "--ops", 0)
    assert model["needs_check"] is False
    thin_check_clean(img)


def random_xml(rng, nr_data=100000, nr_devs=5):
    """A thin_restore input: devices with runs and single mappings, times <= pool time."""
    pool_time = rng.randint(0, 20)
    next_d = 0
    lines = [f'<superblock uuid="" time="{pool_time}" transaction="{rng.randint(0, 99)}" '
             f'flags="0" version="2" data_block_size="128" nr_data_blocks="{nr_data}">']
    model = {}
    for dev in rng.sample(range(1, 1000), nr_devs):
        v = rng.randint(0, 50)
        maps = []
        for _ in range(rng.randint(0, 40)):
            t = rng.randint(0, pool_time)
            n = rng.randint(1, 300) if rng.random() < 0.5 else 1
            maps += [[v + i, next_d + i, t] for i in range(n)]
            next_d += n + rng.randint(0, 3)
            v += n + rng.randint(1, 30)
        model[str(dev)] = {"mappings": maps}
        ctime = rng.randint(0, pool_time)
        lines.append(f'  <device dev_id="{dev}" mapped_blocks="{len(maps)}" transaction="0" '
                     f'creation_time="{ctime}" snap_time="{rng.randint(ctime, pool_time)}">')
        for vb, db, t in maps:
            lines.append(f'    <single_mapping origin_block="{vb}" data_block="{db}" time="{t}"/>')
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n", model


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_thin_restore_images_open_read_back_and_take_changes(tmp_path, seed):
    rng = random.Random(seed)
    xml, want = random_xml(rng)
    (tmp_path / "in.xml").write_text(xml)
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    run("thin_restore", "-i", tmp_path / "in.xml", "-o", img)
    got = workload(img, "--ops", 0)
    assert sorted(got["devices"]) == sorted(want)
    for dev_id, w in want.items():
        assert got["devices"][dev_id]["mappings"] == sorted(w["mappings"])
    model = workload(img, "--seed", seed, "--ops", 400, "--devices", 1000, "--span", 20000)
    thin_check_clean(img)
    assert_dump_matches(img, model)
    thinfs_check_clean(img)


def test_thinfs_restore_round_trips_thin_dump_output(tmp_path):
    img = sparse(tmp_path / "meta.bin", 16 << 20)
    workload(img, "--format", 100000, "--seed", 31, "--ops", 500)
    first = run("thin_dump", img).stdout
    (tmp_path / "a.xml").write_text(first)
    img2 = sparse(tmp_path / "meta2.bin", 16 << 20)
    run(THINFS, "restore", "-i", tmp_path / "a.xml", "-o", img2)
    thin_check_clean(img2)
    assert run("thin_dump", img2).stdout == first
    thinfs_check_clean(img2)


def test_thinfs_restore_refuses_bad_xml_and_writes_nothing(tmp_path):
    img = sparse(tmp_path / "meta.bin", 8 << 20)
    bad = tmp_path / "bad.xml"
    bad.write_text('<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
                   'data_block_size="100" nr_data_blocks="10">\n</superblock>\n')
    p = run(THINFS, "restore", "-i", bad, "-o", img, check=False)
    assert p.returncode != 0
    assert "data_block_size" in p.stderr
    assert img.read_bytes() == b"\0" * (8 << 20)
    bad.write_text('<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
                   'data_block_size="128" nr_data_blocks="10">\n<device dev_id="1" mapped_blocks="1" '
                   'transaction="0" creation_time="0" snap_time="0">\n'
                   '<single_mapping origin_block="0" data_block="10" time="0"/>\n</device>\n</superblock>\n')
    p = run(THINFS, "restore", "-i", bad, "-o", img, check=False)
    assert p.returncode != 0
    assert "line 3" in p.stderr and "nr_data_blocks" in p.stderr
    assert img.read_bytes() == b"\0" * (8 << 20)


def test_oversized_metadata_device_is_capped_with_one_warning(tmp_path):
    img = sparse(tmp_path / "meta.bin", 17 << 30)
    p = run(WORKLOAD, img, "--format", 10000, "--ops", 50)
    warnings = [l for l in p.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 1 and "4161600" in warnings[0], p.stderr
    thin_check_clean(img)
    with open(img, "rb") as f:  # metadata_nr_blocks in the superblock
        f.seek(344)
        assert int.from_bytes(f.read(8), "little") == 4161600
    # Reopening does not warn again: the cap is recorded in the superblock.
    p = run(WORKLOAD, img, "--ops", 10)
    assert "warning" not in p.stderr
    thin_check_clean(img)
