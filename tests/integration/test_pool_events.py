# SPDX-License-Identifier: GPL-2.0-or-later
"""Pool events reach the event log and the on_event hook when the change
happens, not on a timer: a change right before the unmount is in
`thinfs-ctl events` after the next mount, and its hook ran (issue 9)."""
import errno
import json
import os

import pytest

from daemon_util import BS, MiB, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, create, \
    fallocate, pattern, write_at
from test_pool_modes import DATA, full_pool


def write_hook(dir):
    """An on_event program that appends "EVENT OLD NEW" to DIR/hook.log."""
    dir.mkdir(parents=True, exist_ok=True)
    log = dir / "hook.log"
    hook = dir / "hook.sh"
    hook.write_text("#!/bin/sh\n"
                    f'echo "$THINFS_EVENT $THINFS_OLD_MODE $THINFS_NEW_MODE" >> "{log}"\n')
    hook.chmod(0o755)
    return hook, log


def events(p, mount_nr):
    """Events of the mount_nr-th mount (1, 2, ...) up to its unmount: a
    pool still short of space says so again when it is mounted."""
    out, nr = [], 0
    for e in map(json.loads, p.ctl("events", "--json").stdout.splitlines()):
        nr += e["kind"] == "mount"
        if nr == mount_nr:
            out.append(e)
    return out


def hook_lines(log):
    return log.read_text().splitlines() if log.exists() else []


def test_mode_changes_right_before_unmount_are_logged_and_hooked(pool, tmp_path):
    hook, log = write_hook(tmp_path / "hook")
    p = full_pool(pool, error_if_no_space="true", on_event=hook)
    with pytest.raises(OSError) as ei:
        write_at(p.mnt / "vm1", DATA, pattern(3, BS))
    assert ei.value.errno == errno.ENOSPC
    p.unmount()                         # at once: no second passes
    assert hook_lines(log) == ["mode_change write out_of_data_space"]

    p.mount()
    ev = [e["detail"] for e in events(p, 1) if e["kind"] == "mode_change"]
    assert len(ev) == 1 and ev[0].startswith("write -> out_of_data_space: "), ev
    # Out of space again, then space freed and committed (fsync): back to write.
    with pytest.raises(OSError):
        write_at(p.mnt / "vm1", DATA, pattern(3, BS))
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()
    # Hooks are not waited for, so two close together may finish in either
    # order; the event log below has the order.
    assert sorted(hook_lines(log)) == ["mode_change out_of_data_space write"] + \
        ["mode_change write out_of_data_space"] * 2

    p.mount()
    ev = [e["detail"].split(":")[0] for e in events(p, 2) if e["kind"] == "mode_change"]
    assert ev == ["write -> out_of_data_space", "out_of_data_space -> write"], ev
    p.unmount()


def test_low_water_data_right_before_unmount_is_logged_and_hooked(pool, tmp_path):
    hook, log = write_hook(tmp_path / "hook")
    p = pool(data_size=DATA, meta_size=16 * MiB,
             options={"low_water_mark": "16", "on_event": hook})
    create(p.mnt / "vm1", 2 * DATA)
    write_at(p.mnt / "vm1", 0, pattern(1, 120 * BS))      # 8 free: below 16
    p.unmount()
    assert hook_lines(log) == ["low_water_data write write"]

    p.mount()
    ev = [e["detail"] for e in events(p, 1) if e["kind"] == "low_water_data"]
    assert ev == ["8 of 128 data blocks free (low water mark 16)"], ev
    p.unmount()


def test_low_water_metadata_right_before_unmount_is_logged_and_hooked(pool, tmp_path):
    """1280 KiB of metadata: 320 blocks, low water 80 (a quarter), above
    the 65 blocks the pool keeps in reserve for a commit (a smaller pool's
    reserve is its low-water mark: unreachable).  Each new volume with a
    written block takes about one more metadata block."""
    hook, log = write_hook(tmp_path / "hook")
    p = pool(data_size=64 * MiB, meta_size=1280 * 1024,
             options={"low_water_mark": "0", "on_event": hook})

    def free_and_mark():
        m = p.status()["pool"]["metadata"]
        return m["total_blocks"] - m["used_blocks"], m["low_water_blocks"]

    free, mark = free_and_mark()
    assert mark == 80
    n = 0
    while free >= mark:
        # Half the distance at a time: never past the reserve below the mark.
        for _ in range(max(1, (free - mark) // 2)):
            n += 1
            create(p.mnt / f"v{n}")
            write_at(p.mnt / f"v{n}", 0, b"x" * 4096, fsync=False)
        free, mark = free_and_mark()
    p.unmount()
    assert hook_lines(log) == ["low_water_metadata write write"]

    p.mount()
    ev = [e["detail"] for e in events(p, 1) if e["kind"] == "low_water_metadata"]
    assert ev == [f"{free} of 320 metadata blocks free (low water mark 80)"], ev
    assert p.status()["pool"]["mode"] == "write"
    p.unmount()
