# SPDX-License-Identifier: GPL-2.0-or-later
"""dm-cache metadata (src/meta/cache-metadata.c) against thin-provisioning-tools,
an independent implementation of the format, both ways: every image thinfs
writes passes cache_check and cache_dump shows what thinfs wrote; what
cache_restore writes opens in thinfs with exactly the mappings, dirty bits and
hints of the XML it was given, and takes thinfs changes.  Driven through
tests/helpers/cache-meta-tool; no mount.

cache_dump 0.9.0 reads dirty bits only from version 1 mappings (it prints
dirty="false" for every version 2 block), so version 2 dirty bitsets are read
here with a few lines of Python that follow docs/cache-format.md instead."""
import base64
import json
import os
import random
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("THINFS_BUILD_DIR", ROOT / "build"))
TOOL = Path(os.environ.get("CACHE_META_TOOL_BIN", BUILD / "tests/helpers/cache-meta-tool"))
META_SIZE = 8 << 20
BLOCK = 4096
CACHE_CHECK_PROGRESS = ("examining ",)


@pytest.fixture(scope="module", autouse=True)
def cache_tools():
    for tool in ("cache_check", "cache_dump", "cache_restore"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    if not os.access(TOOL, os.X_OK):
        pytest.fail(f"cache-meta-tool not found at {TOOL} (build it, or set CACHE_META_TOOL_BIN)")


def run(*args, ok=(0,)):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert p.returncode in ok, f"{args} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def image(tmp_path, name="meta.bin"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(META_SIZE)
    return path


def tool_format(img, version, cache_blocks=1100, block_sectors=128, *extra):
    run(TOOL, "format", img, "--block-sectors", block_sectors, "--cache-blocks", cache_blocks,
        "--metadata-version", version, *extra)


def tool_run(img, *ops, ok=(0,)):
    return run(TOOL, "run", img, *ops, ok=ok)


def tool_dump(img):
    return json.loads(run(TOOL, "dump", img).stdout)


def cache_check_clean(img):
    p = run("cache_check", img, ok=(0, 1))
    assert p.returncode == 0, f"cache_check failed:\n{p.stdout}\n{p.stderr}"
    noise = [line for line in (p.stdout + p.stderr).splitlines()
             if line and not line.startswith(CACHE_CHECK_PROGRESS)]
    assert not noise, f"cache_check complained:\n{p.stdout}\n{p.stderr}"


def cache_dump(img):
    sb = ET.fromstring(run("cache_dump", img).stdout)
    maps = {int(m.get("cache_block")): (int(m.get("origin_block")), m.get("dirty") == "true")
            for m in sb.find("mappings")}
    hints = {int(h.get("cache_block")): base64.b64decode(h.get("data"))
             for h in (sb.find("hints") if sb.find("hints") is not None else [])}
    return sb.attrib, maps, hints


# ---- an independent reader of the version 2 dirty bitset -------------------

def read_block(data, n):
    return data[n * BLOCK:(n + 1) * BLOCK]


def array_blocks(data, root):
    """Array block numbers of a dm-array, in index order (btree walk)."""
    node = read_block(data, root)
    flags, _, nr, max_entries, vsize = struct.unpack_from("<IQIII", node, 4)
    keys = struct.unpack_from(f"<{nr}Q", node, 32)
    values = struct.unpack_from(f"<{nr}Q", node, 32 + 8 * max_entries)
    assert list(keys) == sorted(keys)
    if flags == 1:  # internal
        return [b for child in values for b in array_blocks(data, child)]
    return list(values)


def dirty_bits(img, nr_cache_blocks):
    data = Path(img).read_bytes()
    (dirty_root,) = struct.unpack_from("<Q", data, 284)
    words = []
    for b in array_blocks(data, dirty_root):
        blk = read_block(data, b)
        _, nr, vsize, blocknr = struct.unpack_from("<IIIQ", blk, 4)
        assert vsize == 8 and blocknr == b
        words += struct.unpack_from(f"<{nr}Q", blk, 24)
    return {c for c in range(nr_cache_blocks) if words[c // 64] >> (c % 64) & 1}


# ---- superblock surgery for the refusal tests ------------------------------

def crc32c_raw(buf):
    crc = 0xFFFFFFFF
    for byte in buf:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


def poke_superblock(img, offset, fmt, value, reseal=True):
    with open(img, "r+b") as f:
        sb = bytearray(f.read(BLOCK))
        struct.pack_into(fmt, sb, offset, value)
        if reseal:
            struct.pack_into("<I", sb, 0, crc32c_raw(sb[4:]) ^ 9031977)
        f.seek(0)
        f.write(sb)


# ---- helpers ---------------------------------------------------------------

def random_population(seed, nr_cache_blocks, n):
    rng = random.Random(seed)
    cblocks = rng.sample(range(nr_cache_blocks), n)
    oblocks = rng.sample(range(1 << 20), n)
    return {c: (o, rng.random() < 0.4, rng.getrandbits(32)) for c, o in zip(cblocks, oblocks)}


def populate_ops(pop):
    ops = []
    for c, (o, dirty, hint) in sorted(pop.items()):
        ops.append(f"insert:{c}:{o}")
        if dirty:
            ops.append(f"dirty:{c}")
        ops.append(f"hint:{c}:{hint.to_bytes(4, 'little').hex()}")
    return ops


def assert_tools_see(img, version, pop, nr_cache_blocks):
    """cache_check is clean and cache_dump (plus the dirty bitset for v2) shows pop."""
    cache_check_clean(img)
    attrs, maps, hints = cache_dump(img)
    assert int(attrs["nr_cache_blocks"]) == nr_cache_blocks
    assert {c: o for c, (o, _) in maps.items()} == {c: o for c, (o, _, _) in pop.items()}
    want_dirty = {c for c, (_, d, _) in pop.items() if d}
    if version == 1:
        assert {c for c, (_, d) in maps.items() if d} == want_dirty
    else:
        assert not any(d for _, d in maps.values())  # 0.9.0 reads no v2 dirty bits
        assert dirty_bits(img, nr_cache_blocks) == want_dirty
    for c, (_, _, hint) in pop.items():
        assert hints[c] == hint.to_bytes(4, "little")


def assert_thinfs_sees(img, pop, clean=True):
    d = tool_dump(img)
    got = {m[0]: m for m in d["mappings"]}
    assert sorted(got) == sorted(pop)
    for c, (o, dirty, hint) in pop.items():
        _, oblock, eff_dirty, stored_dirty, h = got[c]
        assert oblock == o and stored_dirty == dirty
        if clean:
            assert eff_dirty == dirty and h == hint.to_bytes(4, "little").hex()
        else:
            assert eff_dirty and h is None  # unclean: all dirty, hints ignored
    return d


# ---- thinfs writes, the tools read ----------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_formatted_empty_cache_passes_cache_check(tmp_path, version):
    img = image(tmp_path)
    tool_format(img, version, 1100, 128)
    cache_check_clean(img)
    attrs, maps, _ = cache_dump(img)
    assert attrs["block_size"] == "128" and attrs["nr_cache_blocks"] == "1100"
    assert attrs["policy"] == "smq" and attrs["hint_width"] == "4"
    assert maps == {}
    d = tool_dump(img)
    assert d["version"] == version and d["clean_shutdown"] and not d["needs_check"]


@pytest.mark.parametrize("version", [1, 2])
def test_populated_cache_dumps_what_thinfs_wrote(tmp_path, version):
    img = image(tmp_path)
    tool_format(img, version, 1100)
    pop = random_population(version, 1100, 300)
    tool_run(img, *populate_ops(pop), "stats:10:20:30:40", "commit-clean")
    assert_tools_see(img, version, pop, 1100)
    d = assert_thinfs_sees(img, pop)
    assert d["stats"] == {"read_hits": 10, "read_misses": 20, "write_hits": 30, "write_misses": 40}


@pytest.mark.parametrize("version", [1, 2])
def test_large_cache_with_internal_btree_nodes_passes_cache_check(tmp_path, version):
    # 200,000 blocks: 393 mapping array blocks, more than one btree leaf holds.
    img = image(tmp_path)
    tool_format(img, version, 200000)
    pop = random_population(10 + version, 200000, 150)
    tool_run(img, *populate_ops(pop), "commit-clean")
    assert_tools_see(img, version, pop, 200000)
    assert_thinfs_sees(img, pop)


@pytest.mark.parametrize("version", [1, 2])
def test_dirty_cache_after_unclean_stop_passes_cache_check(tmp_path, version):
    img = image(tmp_path)
    tool_format(img, version, 1100)
    pop = random_population(20 + version, 1100, 200)
    # A commit that is not the last one of a clean stop, and an open that never closes cleanly.
    tool_run(img, *populate_ops(pop), "commit")
    assert_tools_see(img, version, pop, 1100)
    assert_thinfs_sees(img, pop, clean=False)
    tool_run(img, "commit-clean")
    tool_run(img)  # opened read-write: CLEAN_SHUTDOWN cleared on disk at once
    assert not tool_dump(img)["clean_shutdown"]
    assert_tools_see(img, version, pop, 1100)


@pytest.mark.parametrize("version", [1, 2])
def test_resized_cache_and_discards_pass_cache_check(tmp_path, version):
    img = image(tmp_path)
    tool_format(img, version, 1100)
    pop = random_population(30 + version, 1100, 250)
    tool_run(img, *populate_ops(pop), "commit-clean")

    tool_run(img, "resize:5000", "discard-size:1024:3000", "discard:3", "discard:2999",
             "insert:4999:77777777", "commit-clean")
    pop[4999] = (77777777, False, 0)
    assert_tools_see(img, version, pop, 5000)
    assert tool_dump(img)["discards"] == [3, 2999]

    # Shrinking past a dirty block is refused and changes nothing.
    late_dirty = [c for c, (_, d, _) in pop.items() if c >= 800 and d]
    tool_run(img, *[f"clean:{c}" for c in late_dirty], "insert:900:88888888", "dirty:900",
             "commit-clean")
    pop = {c: (o, d and c not in late_dirty, h) for c, (o, d, h) in pop.items()}
    pop[900] = (88888888, True, pop.get(900, (0, 0, 0))[2])
    p = tool_run(img, "resize:800", ok=(1,))
    assert "cache block 900 is dirty" in p.stderr
    assert_tools_see(img, version, pop, 5000)

    # Clean blocks past the new end are dropped.
    tool_run(img, "clean:900", "resize:800", "discard-size:1024:500", "commit-clean")
    pop = {c: v for c, v in pop.items() if c < 800}
    assert_tools_see(img, version, pop, 800)
    d = assert_thinfs_sees(img, pop)
    assert d["discards"] == [3] and d["discard_nr_blocks"] == 500


def test_needs_check_is_cleared_by_cache_check(tmp_path):
    img = image(tmp_path)
    tool_format(img, 2, 1100)
    tool_run(img, "insert:1:2", "commit-clean", "needs-check")
    assert tool_dump(img)["needs_check"]
    cache_check_clean(img)
    run("cache_check", "--clear-needs-check-flag", img)
    d = tool_dump(img)
    assert not d["needs_check"] and d["mappings"] == [[1, 2, False, False, "00000000"]]


# ---- the tools write, thinfs reads -----------------------------------------

def restore_xml(pop, nr_cache_blocks):
    lines = [f'<superblock uuid="" block_size="128" nr_cache_blocks="{nr_cache_blocks}" '
             'policy="smq" hint_width="4">', "  <mappings>"]
    for c, (o, dirty, _) in sorted(pop.items()):
        lines.append(f'    <mapping cache_block="{c}" origin_block="{o}" '
                     f'dirty="{"true" if dirty else "false"}"/>')
    lines += ["  </mappings>", "  <hints>"]
    for c, (_, _, hint) in sorted(pop.items()):
        data = base64.b64encode(hint.to_bytes(4, "little")).decode()
        lines.append(f'    <hint cache_block="{c}" data="{data}"/>')
    lines += ["  </hints>", "</superblock>"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "unclean"])
@pytest.mark.parametrize("version", [1, 2])
def test_cache_restore_image_opens_with_exactly_its_mappings(tmp_path, version, clean):
    pop = random_population(40 + version + 2 * clean, 3000, 400)
    xml = tmp_path / "in.xml"
    xml.write_text(restore_xml(pop, 3000))
    img = image(tmp_path)
    run("cache_restore", "-i", xml, "-o", img, "--metadata-version", version,
        *([] if clean else ["--omit-clean-shutdown"]))
    d = assert_thinfs_sees(img, pop, clean=clean)
    assert d["version"] == version and d["nr_cache_blocks"] == 3000
    assert d["clean_shutdown"] == clean and d["policy"] == "smq" and d["hint_size"] == 4

    # thinfs changes to it are seen by the tools too.
    gone = sorted(pop)[:50]
    ops = [f"remove:{c}" for c in gone] + ["insert:2999:99999999", "dirty:2999"]
    for c in gone:
        del pop[c]
    pop[2999] = (99999999, True, pop.get(2999, (0, 0, 0))[2])
    tool_run(img, *ops, "commit-clean")
    assert_tools_see(img, version, pop, 3000)
    assert_thinfs_sees(img, pop)


# ---- refusals ----------------------------------------------------------------

@pytest.mark.parametrize("offset,fmt,value,reseal,words", [
    (40, "<I", 3, True, "unsupported cache metadata version 3"),
    (32, "<Q", 27022010, True, "not dm-cache metadata"),
    (240, "<I", 5, False, "cache superblock checksum is wrong"),
], ids=["version", "magic", "checksum"])
def test_bad_superblock_is_refused_naming_the_problem(tmp_path, offset, fmt, value, reseal, words):
    img = image(tmp_path)
    tool_format(img, 2, 1100)
    before = Path(img).read_bytes()[:BLOCK]
    poke_superblock(img, offset, fmt, value, reseal)
    poked = Path(img).read_bytes()[:BLOCK]
    for cmd in ("dump", "run"):
        p = run(TOOL, cmd, img, ok=(1,))
        assert words in p.stderr, p.stderr
    assert Path(img).read_bytes()[:BLOCK] == poked != before


def test_corrupt_mapping_array_block_is_refused_naming_it(tmp_path):
    img = image(tmp_path)
    tool_format(img, 1, 1100)
    tool_run(img, "insert:3:30", "insert:700:70", "commit-clean")
    data = Path(img).read_bytes()
    (mapping_root,) = struct.unpack_from("<Q", data, 192)
    second = array_blocks(data, mapping_root)[1]
    with open(img, "r+b") as f:  # a checksummed block that claims another location
        blk = bytearray(read_block(data, second))
        struct.pack_into("<Q", blk, 16, second + 1000)
        struct.pack_into("<I", blk, 0, crc32c_raw(blk[4:]) ^ 595846735)
        f.seek(second * BLOCK)
        f.write(blk)
    p = run("cache_check", img, ok=(1,))
    assert "bad block nr in array block" in p.stdout + p.stderr
    p = run(TOOL, "dump", img, ok=(1,))
    assert f"block {second}" in p.stderr and "array block" in p.stderr, p.stderr
