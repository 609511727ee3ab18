# SPDX-License-Identifier: GPL-2.0-or-later
"""Snapshot groups across a crash (issue 9, items 3 and 4), and devices
without catalog rows on a read-only mount (item 2).

`thinfs-ctl MNT fault crash-at POINT` makes the daemon exit when the
mkdir or rmdir of a group reaches POINT, so each crash lands inside the
operation, at a known step.  After the remount the group is whole (every
member reads as its origin did at the mkdir) or absent, no thin-<id>
volume appears, the space accounting holds, a later mkdir works, and the
checkers (teardown) are clean."""
import errno
import os
import re
import sqlite3

import pytest

from daemon_util import BS, MiB, create, pattern, read_at, write_at
from conftest import run_cmd

SIZES = {"vm1": MiB, "vm2": 2 * MiB}
BLOCKS = {"vm1": 3, "vm2": 5}      # written at the start of each volume


def fault_pool(pool):
    p = pool(mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    return p


def fill(p, gen):
    data = {}
    for i, (name, size) in enumerate(SIZES.items()):
        if not (p.mnt / name).exists():
            create(p.mnt / name, size)
        data[name] = pattern(gen * 100 + i, BLOCKS[name] * BS)
        write_at(p.mnt / name, 0, data[name])
    return data


def snapdir(p, group=None):
    d = p.mnt / ".snapshots"
    return d / group if group else d


def crash_inside(p, point, how, op):
    """Arm POINT, run op (which the crash interrupts), remount."""
    p.ctl("fault", "crash-at", point, *how)
    with pytest.raises(OSError) as ei:
        op()
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), ei.value
    p.crashed()
    p.mount("--allow-faults")


def device_count(p):
    """Thin devices in the committed metadata (read while unmounted)."""
    return len(re.findall(r"<device ", run_cmd("thin_dump", p.meta).stdout))


def assert_no_strays(p):
    assert sorted(os.listdir(p.mnt)) == [".snapshots"] + sorted(SIZES)
    log = p.log_text()
    assert "had no catalog row" not in log, log
    assert "has no thin device" not in log, log


def assert_quiet_remount(p):
    """The mount after the crash finished the job without alarming anyone."""
    text = p.logs[-1].read_text(errors="replace")
    noise = "PR_SET_IO_FLUSHER"     # unprivileged runs cannot set it; unrelated
    assert not [l for l in text.splitlines()
                if ("warning:" in l or "error:" in l) and noise not in l], text


def assert_group_whole(p, group, data):
    assert sorted(os.listdir(snapdir(p, group))) == sorted(SIZES)
    for name, d in data.items():
        assert os.stat(snapdir(p, group) / name).st_size == SIZES[name]
        assert read_at(snapdir(p, group) / name, 0, len(d)) == d


def later_mkdir_works(p, data):
    os.mkdir(snapdir(p, "later"))
    assert_group_whole(p, "later", data)
    os.rmdir(snapdir(p, "later"))


MKDIR_CASES = [
    # point, how, whole afterwards?
    ("group-create-after-intent", (), False),
    ("group-create-between-rows", (), False),
    ("group-create-after-devices", (), True),
    ("group-create-after-intent", ("power-cut",), False),
    ("group-create-between-rows", ("power-cut", "tear"), False),
    ("group-create-after-devices", ("power-cut",), True),
]


@pytest.mark.parametrize("point,how,whole", MKDIR_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1]) or 'crash'}" for c in MKDIR_CASES])
def test_crash_inside_mkdir_leaves_the_group_whole_or_absent(pool, point, how, whole):
    p = fault_pool(pool)
    data = fill(p, 1)
    used = p.used()
    crash_inside(p, point, how, lambda: os.mkdir(snapdir(p, "g")))
    assert_no_strays(p)
    assert_quiet_remount(p)
    events = p.ctl("events").stdout
    if point != "group-create-between-rows":   # else nothing reached the catalog
        assert ("group g: half made before this mount: " +
                ("completed" if whole else "removed")) in events, events
    if whole:
        assert os.listdir(snapdir(p)) == ["g"]
        assert_group_whole(p, "g", data)
    else:
        assert os.listdir(snapdir(p)) == []
    # Snapshots share every block: the group costs no data space either way.
    assert p.used() == used
    for name in SIZES:
        assert read_at(p.mnt / name, 0, len(data[name])) == data[name]
    later_mkdir_works(p, data)
    if not whole:
        os.mkdir(snapdir(p, "g"))       # the name is free again
        assert_group_whole(p, "g", data)
    p.unmount()
    assert device_count(p) == 2 * len(SIZES)


RMDIR_CASES = [
    ("group-remove-after-intent", ()),
    ("group-remove-after-devices", ()),
    ("group-remove-between-rows", ()),
    ("group-remove-after-intent", ("power-cut",)),
    ("group-remove-after-devices", ("power-cut",)),
    ("group-remove-between-rows", ("power-cut", "tear")),
]


@pytest.mark.parametrize("point,how", RMDIR_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1]) or 'crash'}" for c in RMDIR_CASES])
def test_crash_inside_rmdir_finishes_the_removal(pool, point, how):
    p = fault_pool(pool)
    fill(p, 1)
    used_origins = p.used()
    os.mkdir(snapdir(p, "g"))
    # New data in the origins: the group's old blocks become its own.
    data = fill(p, 2)
    assert p.used() == used_origins + sum(BLOCKS.values())
    crash_inside(p, point, how, lambda: os.rmdir(snapdir(p, "g")))
    assert_no_strays(p)
    assert os.listdir(snapdir(p)) == []
    # The group's own blocks were freed with its devices.
    assert p.used() == used_origins
    assert sum(v["mapped_blocks"] for v in p.volumes()) == used_origins
    for name in SIZES:
        assert read_at(p.mnt / name, 0, len(data[name])) == data[name]
    events = p.ctl("events").stdout
    assert "snapshot group g: half removed before this mount: removal finished" in events, \
        events
    assert_quiet_remount(p)
    later_mkdir_works(p, data)
    os.mkdir(snapdir(p, "g"))
    assert_group_whole(p, "g", data)
    p.unmount()
    assert device_count(p) == 2 * len(SIZES)


def test_mkdir_whose_metadata_commit_fails_leaves_no_group_after_repair(pool):
    p = fault_pool(pool)
    p.expect_log(r".")          # the injected metadata failure is logged as an error
    data = fill(p, 1)
    p.ctl("fault", "metadata", "write", "error", "once")   # the snapshots' commit fails
    with pytest.raises(OSError):
        os.mkdir(snapdir(p, "g"))
    assert os.listdir(snapdir(p)) == []
    assert p.status()["pool"]["needs_check"] is True
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))
    p.mount("--allow-faults")
    assert_no_strays(p)
    assert os.listdir(snapdir(p)) == []
    # The failed mkdir marked it for removal: the mount finished that.
    assert "group g: half removed before this mount: removal finished" in \
        p.ctl("events").stdout
    later_mkdir_works(p, data)
    p.unmount()
    assert device_count(p) == len(SIZES)


def test_crash_at_refuses_unknown_points_and_needs_faults(pool):
    p = fault_pool(pool)
    r = p.ctl("fault", "crash-at", "nowhere", ok=None)
    assert r.returncode != 0 and "no crash point 'nowhere'" in r.stderr \
        and "group-create-after-intent" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = p.ctl("fault", "crash-at", "group-remove-after-intent", "sideways", ok=None)
    assert r.returncode != 0 and "usage: fault crash-at POINT" in r.stderr, r.stderr
    # An armed point elsewhere does not fire on other operations.
    p.ctl("fault", "crash-at", "group-remove-after-intent")
    os.mkdir(snapdir(p, "g"))
    assert p.alive()
    p2 = pool("nofault")
    r = p2.ctl("fault", "crash-at", "group-create-after-intent", ok=None)
    assert r.returncode != 0 and "fault injection is off" in r.stderr, r.stderr


# ---- read-only mounts and devices without catalog rows ---------------------------

def drop_rows(catalog):
    con = sqlite3.connect(catalog)
    try:
        con.execute("delete from volumes")
        con.commit()
    finally:
        con.close()


def catalog_bytes(p):
    """The catalog's content: the database file and what its log holds (a
    reader of a WAL database may leave an empty -wal and a -shm behind)."""
    wal = p.catalog.with_name(p.catalog.name + "-wal")
    return p.catalog.read_bytes(), wal.read_bytes() if wal.exists() else b""


def written_volume(p):
    """vm1 with blocks 2..4 written (so its end is block 5), its id and data."""
    create(p.mnt / "vm1", 4 * MiB)
    data = pattern(7, 3 * BS)
    write_at(p.mnt / "vm1", 2 * BS, data)
    return p.volume("vm1")["id"], data


def test_read_only_mount_shows_devices_without_rows_and_writes_nothing(pool):
    p = pool()
    vid, data = written_volume(p)
    p.unmount()
    drop_rows(p.catalog)
    before = catalog_bytes(p)
    p.mount("-o", "ro")
    name = f"thin-{vid}"
    assert sorted(os.listdir(p.mnt)) == [".snapshots", name]
    assert os.stat(p.mnt / name).st_size == 5 * BS
    assert read_at(p.mnt / name, 0, 5 * BS) == bytes(2 * BS) + data
    v = p.volume(name)
    assert v["id"] == vid and v["size"] == 5 * BS and v["mapped_blocks"] == 3
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / name, 0, b"x")
    assert ei.value.errno == errno.EROFS
    p.unmount()
    assert catalog_bytes(p) == before, "a read-only mount changed the catalog"
    # Read-write, the row is made for good, with the same size.
    p.mount()
    assert os.stat(p.mnt / name).st_size == 5 * BS
    assert read_at(p.mnt / name, 2 * BS, 3 * BS) == data
    p.unmount()


def test_a_lost_catalog_still_mounts_read_only(pool):
    p = pool()
    vid, data = written_volume(p)
    p.unmount()
    for f in p.catalog.parent.glob(p.catalog.name + "*"):
        f.unlink()
    r = p.mount(ok=False)
    assert r.returncode != 0 and "mount -o ro to read the volumes" in r.stdout, r.stdout
    p.mount("-o", "ro")
    assert sorted(os.listdir(p.mnt)) == [".snapshots", f"thin-{vid}"]
    assert read_at(p.mnt / f"thin-{vid}", 0, 5 * BS) == bytes(2 * BS) + data
    p.unmount()
    assert not p.catalog.exists()


def test_thin_restored_metadata_shows_its_devices_read_only(pool):
    """Metadata from thin_restore over a fresh pool: the catalog knows none
    of its devices."""
    p = pool(mount=False)
    nr_data = p.data.stat().st_size // BS
    (p.dir / "in.xml").write_text(
        f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
        f'data_block_size="{BS // 512}" nr_data_blocks="{nr_data}">\n'
        '  <device dev_id="3" mapped_blocks="2" transaction="0" creation_time="0" '
        'snap_time="0">\n'
        '    <range_mapping origin_begin="4" data_begin="10" length="2" time="0"/>\n'
        '  </device>\n</superblock>\n')
    run_cmd("thin_restore", "-i", p.dir / "in.xml", "-o", p.meta)
    data = pattern(9, 2 * BS)
    with open(p.data, "r+b") as f:
        f.seek(10 * BS)
        f.write(data)
    before = catalog_bytes(p)
    p.mount("-o", "ro")
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "thin-3"]
    assert os.stat(p.mnt / "thin-3").st_size == 6 * BS
    assert read_at(p.mnt / "thin-3", 0, 6 * BS) == bytes(4 * BS) + data
    p.unmount()
    assert catalog_bytes(p) == before


def test_needs_check_pool_shows_devices_without_rows_read_only(pool):
    p = pool(mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    p.expect_log(r".")          # the injected metadata failure is logged as an error
    vid, data = written_volume(p)
    p.ctl("fault", "metadata", "write", "error", "once")   # the next commit fails
    with pytest.raises(OSError):
        write_at(p.mnt / "vm1", 40 * BS, pattern(2, BS))
    assert p.status()["pool"]["needs_check"] is True
    p.ctl("fault", "metadata", "write", "ok")
    p.unmount()
    drop_rows(p.catalog)
    before = catalog_bytes(p)
    p.mount("--allow-faults", "-o", "ro")
    assert p.status()["pool"]["needs_check"] is True
    name = f"thin-{vid}"
    assert sorted(os.listdir(p.mnt)) == [".snapshots", name]
    assert read_at(p.mnt / name, 0, 5 * BS) == bytes(2 * BS) + data
    p.unmount()
    assert catalog_bytes(p) == before
    p.thinfs_run("check", "--repair", p.meta, ok=(0, 1))


def test_read_only_mount_hides_a_half_made_group(pool):
    p = fault_pool(pool)
    data = fill(p, 1)
    p.ctl("fault", "crash-at", "group-create-after-devices")
    with pytest.raises(OSError):
        os.mkdir(snapdir(p, "g"))
    p.crashed()
    p.mount("--allow-faults", "-o", "ro")
    # Read-only nothing can be finished: the group is not shown half made.
    assert os.listdir(snapdir(p)) == []
    assert_no_strays(p)
    p.unmount()
    p.mount("--allow-faults")
    assert_group_whole(p, "g", data)
    p.unmount()
