# SPDX-License-Identifier: GPL-2.0-or-later
"""The COW exception store (src/meta/snap-store.c, driven by the
cow-store-probe helper) against kernel_cow.py, an independent model of the
kernel's dm-snapshot layout: a COW device written in the kernel's layout
opens with every exception, and what the store writes reads back in the
kernel's way.  No mount, no daemon."""
import errno
import json
import os
import random
from pathlib import Path

import kernel_cow
from test_engine_interop import BUILD, run

PROBE = Path(os.environ.get("COW_STORE_PROBE_BIN", BUILD / "tests/helpers/cow-store-probe"))


def probe(*args, check=True):
    p = run(PROBE, *args, check=check)
    return json.loads(p.stdout) if p.returncode == 0 else p


def assert_data(path, chunk_sectors, mapping):
    cb = chunk_sectors * kernel_cow.SECTOR
    for old, new in mapping.items():
        assert kernel_cow.read_chunk(path, chunk_sectors, new) == kernel_cow.chunk_pattern(old, cb)


def test_store_opens_a_kernel_layout_cow_with_every_exception(tmp_path):
    cow = tmp_path / "cow"
    olds = random.Random(11).sample(range(1_000_000), 600)  # three areas of 256
    recs = kernel_cow.write_cow(cow, 1000 * 4096, 8, [(o, None) for o in olds])
    out = probe("lookup", cow, 8, *olds, 1_000_001)
    assert out["valid"] and out["chunk_sectors"] == 8 and out["count"] == 600
    assert out["map"] == {**{str(o): n for o, n in recs}, "1000001": None}
    assert out["allocated_sectors"] == (recs[-1][1] + 1) * 8
    assert out["metadata_sectors"] == (600 // 256 + 2) * 8
    check = probe("check", cow, 1_000_000)
    assert (check["rc"], check["exceptions"]) == (0, 600)


def test_header_chunk_size_wins_and_an_invalid_header_opens_invalid(tmp_path):
    cow = tmp_path / "cow"
    recs = kernel_cow.write_cow(cow, 64 * 16384, 32, [(7, None), (3, None)])
    out = probe("lookup", cow, 8, 7, 3)
    assert out["chunk_sectors"] == 32
    assert out["map"] == {"7": recs[0][1], "3": recs[1][1]}
    kernel_cow.write_cow(cow, 64 * 16384, 32, [(7, None)], valid=False)
    out = probe("lookup", cow, 32, 7)
    assert (out["valid"], out["count"], out["map"]) == (False, 0, {"7": None})


def test_kernel_reader_finds_what_the_store_commits(tmp_path):
    # Start from a kernel-written store that ends exactly at an area's end,
    # so the store's first commit goes to a new area.
    cow = tmp_path / "cow"
    first = kernel_cow.write_cow(cow, 1000 * 4096, 8, [(o, None) for o in range(256)])
    more = list(range(5000, 5300))
    out = probe("commit", cow, 8, *more)
    assert out["count"] == 556
    got = kernel_cow.read_cow(cow)
    assert (got["valid"], got["chunk_sectors"]) == (1, 8)
    assert [tuple(r) for r in got["records"]] == first + [(o, out["map"][str(o)]) for o in more]
    assert_data(cow, 8, {o: n for o, n in got["records"]})
    # Chunk numbers step over area 1 (258) and area 2 (515).
    assert {n for _, n in got["records"]}.isdisjoint({0, 1, 258, 515})


def test_store_written_from_scratch_reads_back_in_the_kernel_way(tmp_path):
    cow = tmp_path / "cow"
    with open(cow, "wb") as f:
        f.truncate(64 * 65536)
    out = probe("commit", cow, 128, 42, 9, 100)
    got = kernel_cow.read_cow(cow)
    header = (got["magic"], got["valid"], got["version"], got["chunk_sectors"])
    assert header == (kernel_cow.MAGIC, 1, 1, 128)
    assert [tuple(r) for r in got["records"]] == [(42, 2), (9, 3), (100, 4)]
    assert out["map"] == {"42": 2, "9": 3, "100": 4}
    assert_data(cow, 128, {42: 2, 9: 3, 100: 4})


def test_a_foreign_device_is_refused_naming_it_and_left_alone(tmp_path):
    cow = tmp_path / "cow"
    kernel_cow.write_cow(cow, 64 * 4096, 8, [])
    with open(cow, "r+b") as f:
        f.write(kernel_cow.header(True, 8, magic=0xEF53))
    before = cow.read_bytes()
    p = probe("lookup", cow, 8, 1, check=False)
    assert p.returncode == 1
    assert str(cow) in p.stderr and "not a COW store" in p.stderr
    assert cow.read_bytes() == before



def test_random_damage_is_named_and_open_refuses_exactly_what_check_refuses(tmp_path):
    cow = tmp_path / "cow"
    rng = random.Random(4)
    named = 0
    for seed in range(40):
        kernel_cow.write_cow(cow, 600 * 4096, 8, [(o, None) for o in range(300)])
        with open(cow, "r+b") as f:
            for _ in range(rng.randint(1, 4)):
                # the header, area 0, or the start of area 1
                f.seek(rng.choice([rng.randrange(16), 4096 + rng.randrange(4096),
                                   258 * 4096 + rng.randrange(1024)]))
                f.write(bytes([rng.randrange(256)]))
        check = probe("check", cow)
        opened = probe("lookup", cow, 8, 0, check=False)
        if check["rc"] == 0:
            assert isinstance(opened, dict), f"seed {seed}: clean, yet refused: {opened.stderr}"
        else:
            named += 1
            assert check["rc"] == -errno.EINVAL and check["msg"], f"seed {seed}: {check}"
            assert not isinstance(opened, dict) and check["msg"] in opened.stderr, f"seed {seed}"
    assert named > 0
