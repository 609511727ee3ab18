# SPDX-License-Identifier: GPL-2.0-or-later
"""Random operations on volumes against an in-memory model (issue 3):
writes of any size and alignment, punches, zero ranges, truncates,
writable and group snapshots, renames, deletes (also of open volumes),
remounts.  Every volume and
snapshot must read back exactly as the model says, and the pool's
accounting must agree with the metadata as thin_dump sees it: each
volume's mapped_blocks, and used_blocks == the distinct data blocks
mapped."""
import os
import random
import xml.etree.ElementTree as ET

import pytest

from conftest import run_cmd
from daemon_util import (BS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                         MiB, fallocate, read_at)

SIZE = 4 * MiB          # 64 blocks per volume: small, so that blocks are hit often


class Model:
    def __init__(self):
        self.vols = {}          # name -> bytearray (writable volumes)
        self.groups = {}        # group -> {name: bytes}


def dump_usage(p):
    """(distinct data blocks, {dev_id: mapped_blocks}) from thin_dump."""
    root = ET.fromstring(run_cmd("thin_dump", p.meta).stdout)
    blocks, mapped = set(), {}
    for d in root.findall("device"):
        mapped[int(d.get("dev_id"))] = int(d.get("mapped_blocks"))
        for m in d:
            if m.tag == "range_mapping":
                b, n = int(m.get("data_begin")), int(m.get("length"))
                blocks.update(range(b, b + n))
            else:
                blocks.add(int(m.get("data_block")))
    return blocks, mapped


def check_all(p, model):
    for name, data in model.vols.items():
        assert os.stat(p.mnt / name).st_size == len(data), name
        assert read_at(p.mnt / name, 0, len(data)) == bytes(data), f"volume {name} differs"
    for g, members in model.groups.items():
        assert sorted(os.listdir(p.mnt / ".snapshots" / g)) == sorted(members), g
        for name, data in members.items():
            assert read_at(p.mnt / ".snapshots" / g / name, 0, len(data)) == data, \
                f"snapshot {g}/{name} differs"


@pytest.mark.parametrize("seed", range(1, 6))
def test_random_operations_match_the_model(pool, seed):
    rng = random.Random(seed)
    p = pool()
    model = Model()
    fds = {}

    def fd_of(name):
        if name not in fds:
            fds[name] = os.open(p.mnt / name, os.O_RDWR)
        return fds[name]

    def close_all():
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    for i, name in enumerate(("a", "b")):
        with open(p.mnt / name, "wb") as f:
            f.truncate(SIZE)
        model.vols[name] = bytearray(SIZE)
    ngroups = nclones = 0
    for step in range(400):
        op = rng.choices(["write", "punch", "zero", "truncate", "clone", "group", "rmgroup",
                          "delete", "rename", "fsync", "remount"],
                         [40, 8, 4, 4, 3, 3, 2, 2, 2, 4, 1])[0]
        names = sorted(model.vols)
        name = rng.choice(names) if names else None
        if op == "write" and name:
            size = len(model.vols[name])
            off = rng.randrange(0, size + BS)
            n = rng.choice([1, 512, 4096, BS - 1, BS, 3 * BS + 17, rng.randrange(1, 4 * BS)])
            data = rng.randbytes(n)
            assert os.pwrite(fd_of(name), data, off) == n
            v = model.vols[name]
            if off + n > len(v):
                v.extend(bytes(off + n - len(v)))
            v[off:off + n] = data
        elif op in ("punch", "zero") and name:
            size = len(model.vols[name])
            if size == 0:
                continue
            off = rng.randrange(0, size)
            n = rng.randrange(1, min(size - off, 5 * BS) + 1)
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if op == "punch" \
                else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            fallocate(fd_of(name), mode, off, n)
            model.vols[name][off:off + n] = bytes(n)
        elif op == "truncate" and name:
            new = rng.choice([0, BS // 2, rng.randrange(0, 2 * SIZE), SIZE])
            os.ftruncate(fd_of(name), new)
            v = model.vols[name]
            if new < len(v):
                del v[new:]
            else:
                v.extend(bytes(new - len(v)))
        elif op == "clone" and name and len(model.vols) < 6:
            nclones += 1
            new = f"{name}-c{nclones}"
            p.ctl("snapshot", name, new)
            model.vols[new] = bytearray(model.vols[name])
        elif op == "group" and len(model.groups) < 4:
            ngroups += 1
            g = f"g{ngroups}"
            os.mkdir(p.mnt / ".snapshots" / g)
            model.groups[g] = {n: bytes(v) for n, v in model.vols.items()}
        elif op == "rmgroup" and model.groups:
            g = rng.choice(sorted(model.groups))
            os.rmdir(p.mnt / ".snapshots" / g)
            del model.groups[g]
        elif op == "delete" and name and len(model.vols) > 1:
            fd = fds.pop(name, None)
            os.unlink(p.mnt / name)
            data = bytes(model.vols.pop(name))
            if fd is not None:
                # Still open: readable until closed, then the device goes.
                assert os.pread(fd, len(data) + 1, 0) == data, f"unlinked {name} differs"
                os.close(fd)
        elif op == "rename" and name:
            new = f"r{step}"
            os.rename(p.mnt / name, p.mnt / new)
            model.vols[new] = model.vols.pop(name)
            if name in fds:
                fds[new] = fds.pop(name)
        elif op == "fsync" and name:
            os.fsync(fd_of(name))
        elif op == "remount":
            close_all()
            p.remount()
        if step % 100 == 99:
            check_all(p, model)
    close_all()
    check_all(p, model)

    # Accounting against the metadata itself, on a fresh mount (no release
    # of a closed volume still on its way).
    p.remount()
    st = p.status()
    used = st["pool"]["data"]["used_blocks"]
    vols = {v["id"]: v["mapped_blocks"] for v in st["volumes"]}
    p.unmount()
    blocks, mapped = dump_usage(p)
    assert used == len(blocks), f"used_blocks {used}, thin_dump maps {len(blocks)} blocks"
    for vid, n in vols.items():
        assert mapped.get(vid) == n, f"device {vid}: status says {n}, metadata {mapped.get(vid)}"
    p.mount()
    check_all(p, model)
