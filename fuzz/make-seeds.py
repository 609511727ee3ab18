#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Regenerate fuzz/corpus/fuzz-check/: small thin_restore images (plus one
with a metadata snapshot) in the input layout of fuzz-check.c.  Needs
thin_restore (thin-provisioning-tools).  Usage: fuzz/make-seeds.py"""
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests/integration"))
import thin_image as ti  # noqa: E402

BLOCKS = 256  # 1 MiB of metadata


def seed(name, devices, snapshot=False, **kw):
    with tempfile.TemporaryDirectory() as d:
        xml, img = Path(d) / "p.xml", Path(d) / "p.bin"
        xml.write_text(ti.pool_xml(devices, **kw))
        with open(img, "wb") as f:
            f.truncate(BLOCKS * ti.BLOCK)
        subprocess.run(["thin_restore", "-i", xml, "-o", img], check=True)
        if snapshot:
            image = ti.Image(img)
            image.make_metadata_snapshot()
            image.save()
        data = img.read_bytes()
    used = max(b for b in range(BLOCKS) if any(data[b * ti.BLOCK:(b + 1) * ti.BLOCK])) + 1
    out = HERE / "corpus/fuzz-check" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    # flags 1: reseal checksums, so mutations keep blocks readable
    out.write_bytes(bytes([1, BLOCKS - used]) + data[:used * ti.BLOCK])


def main():
    d1, d2 = ti.Device(1, snap_time=1), ti.Device(2, creation_time=1, snap_time=1)
    for v in range(40):
        d1.mappings[v] = (v, 0)
        d2.mappings[v] = (v, 0)
    d2.mappings[7] = (300, 1)
    seed("two-devices", [d1, d2], time=2, nr_data_blocks=1024)
    seed("snapshot", [d1, d2], snapshot=True, time=2, nr_data_blocks=1024)
    seed("internal-nodes", ti.random_pool(5, nr_devices=3, max_mappings=700,
                                          nr_data_blocks=800, shared_fraction=0.6),
         time=7, nr_data_blocks=800)
    seed("empty", [], nr_data_blocks=0)


if __name__ == "__main__":
    main()
