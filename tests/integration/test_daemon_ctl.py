# SPDX-License-Identifier: GPL-2.0-or-later
"""thinfs-ctl and the catalog (issue 3): status --json with exactly the
keys design.md's "Interfaces that scripts rely on" gives, list, snapshot,
delete, set-transaction-id, reserve/release-metadata-snap (and thinfs dump
of a live pool through the held root), one-line errors with a non-zero
exit, who may use the control socket, an idle pool doing no I/O, and the
catalog's reconciliation with the metadata at mount."""
import json
import socket
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import ctl_socket_path, run_cmd
from daemon_util import BS, GiB, MiB, create, pattern, read_at, wait_for, write_at

# The contract: design.md, "Interfaces that scripts rely on".
# design.md's keys, plus those added since (the contract allows additions, no renames):
# held_writes (issue 4); held_in_core, reload_staged and the volumes' held_in_core (issue 5);
# direct_io and the io read_bytes/write_bytes (issue 10); max_threads (issue 9); the volumes'
# target, the engine's kind of device behind the file (issue 11); free_blocks_read_zero and
# writeback_cache (issue 10); preallocate and new_block_writes (issue 10);
# stashed_writeback_bytes (issue 10).
POOL_KEYS = {"mode", "needs_check", "reason", "transaction_id", "held_root", "suspended",
             "error_if_no_space", "discard_passdown", "data", "metadata", "io", "held_writes",
             "held_in_core", "reload_staged", "direct_io", "max_threads", "free_blocks_read_zero",
             "writeback_cache", "preallocate", "new_block_writes", "stashed_writeback_bytes"}
PREALLOC_KEYS = {"active", "chunk_bytes", "chunks", "fallocates", "failures"}
NEW_BLOCK_KEYS = {"written_partly", "filled_whole"}
SPACE_KEYS = {"block_size", "used_blocks", "total_blocks", "low_water_blocks"}
IO_KEYS = {"reads", "writes", "flushes", "discards", "read_bytes", "write_bytes"}
VOLUME_KEYS = {"name", "id", "kind", "size", "mapped_blocks", "exclusive_blocks", "suspended",
               "held_in_core", "target"}
GROUP_KEYS = {"name", "created", "volumes"}
MODES = {"write", "out_of_data_space", "read_only", "fail"}


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def one_line_error(p):
    """A failed thinfs-ctl: non-zero exit, nothing on stdout, one line on stderr."""
    assert p.returncode != 0, f"exit 0:\n{p.stdout}"
    assert p.stdout == "", f"stdout on error: {p.stdout!r}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"not one line: {p.stderr!r}"
    assert lines[0].startswith("thinfs-ctl: "), lines[0]
    return lines[0]


# ---- status --json ------------------------------------------------------------------

def test_status_json_has_exactly_the_contract_keys(pool):
    p = pool()
    create(p.mnt / "vm1", 20 * GiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 3 * BS))
    os.mkdir(p.mnt / ".snapshots" / "nightly")
    st = p.status()
    assert set(st) == {"pool", "volumes", "snapshot_groups"}
    pl = st["pool"]
    assert set(pl) == POOL_KEYS
    assert pl["mode"] in MODES and pl["mode"] == "write"
    assert pl["needs_check"] is False
    assert isinstance(pl["reason"], str)
    assert is_int(pl["transaction_id"])
    assert pl["held_root"] is None
    assert pl["suspended"] is False
    assert pl["error_if_no_space"] is False
    assert pl["discard_passdown"] is True
    for space in ("data", "metadata"):
        assert set(pl[space]) == SPACE_KEYS, space
        assert all(is_int(v) for v in pl[space].values()), pl[space]
    assert set(pl["io"]) == {"metadata", "data"}
    for dev in ("metadata", "data"):
        assert set(pl["io"][dev]) == IO_KEYS
        assert all(is_int(v) and v >= 0 for v in pl["io"][dev].values())
    # Values for this pool: 2 GiB of 64 KiB blocks, 64 MiB of metadata.
    assert pl["data"]["block_size"] == BS
    assert pl["data"]["total_blocks"] == 2 * GiB // BS
    assert pl["data"]["used_blocks"] == 3
    assert pl["data"]["low_water_blocks"] == (2 * GiB // BS) // 10   # default 10%
    assert pl["metadata"]["block_size"] == 4096
    assert pl["metadata"]["total_blocks"] == 64 * MiB // 4096
    assert 0 < pl["metadata"]["used_blocks"] < pl["metadata"]["total_blocks"]
    assert pl["io"]["data"]["writes"] > 0
    assert pl["io"]["metadata"]["writes"] > 0
    assert pl["io"]["data"]["write_bytes"] >= 3 * BS
    assert pl["io"]["metadata"]["write_bytes"] >= 4096 * pl["io"]["metadata"]["writes"]
    assert pl["direct_io"] is True
    assert pl["max_threads"] == 512   # the default
    assert set(pl["preallocate"]) == PREALLOC_KEYS
    assert pl["preallocate"]["active"] is True
    assert all(is_int(pl["preallocate"][k]) for k in PREALLOC_KEYS - {"active"})
    assert set(pl["new_block_writes"]) == NEW_BLOCK_KEYS
    assert all(is_int(v) for v in pl["new_block_writes"].values())

    vols = st["volumes"]
    assert vols, st
    for v in vols:
        assert set(v) == VOLUME_KEYS, v
        assert isinstance(v["name"], str) and isinstance(v["kind"], str)
        assert all(is_int(v[k]) for k in ("id", "size", "mapped_blocks", "exclusive_blocks"))
        assert v["suspended"] is False
        assert v["target"] == "thin"
    vm1 = p.volume("vm1")
    assert (vm1["kind"], vm1["size"], vm1["mapped_blocks"]) == ("thin", 20 * GiB, 3)

    groups = st["snapshot_groups"]
    assert len(groups) == 1 and set(groups[0]) == GROUP_KEYS
    assert groups[0]["name"] == "nightly" and groups[0]["volumes"] == ["vm1"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", groups[0]["created"])


def test_status_reflects_pool_cfg(pool):
    p = pool(block_size=256 << 10, data_size=1 * GiB,
             options={"discard_passdown": "false", "error_if_no_space": "true",
                      "low_water_mark": "100"})
    pl = p.status()["pool"]
    assert pl["data"]["block_size"] == 256 << 10
    assert pl["data"]["total_blocks"] == GiB // (256 << 10)
    assert pl["data"]["low_water_blocks"] == 100
    assert pl["discard_passdown"] is False
    assert pl["error_if_no_space"] is True


def test_status_text_starts_with_a_dmsetup_style_line(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    out = p.ctl("status").stdout
    first = out.splitlines()[0]
    # thin-pool <trans id> <used>/<total meta> <used>/<total data> <held root|-> rw|ro|...
    assert re.match(r"thin-pool \d+ \d+/\d+ \d+/\d+ (-|\d+) (rw|ro|out_of_data_space)\b",
                    first), first
    # The table's row: VOLUME ID KIND SIZE MAPPED EXCLUSIVE STATE, the last three from the
    # device's own status fields (target.h), nothing after them for a thin volume.
    write_at(p.mnt / "vm1", 0, pattern(1, 100))
    out = p.ctl("status").stdout
    assert re.search(rf"^vm1 +\d+ +thin +{MiB} +1 +1 +active *$", out, re.M), out


def test_list_names_the_volumes(pool):
    p = pool()
    for n in ("vm1", "db", "web"):
        create(p.mnt / n, MiB)
    out = p.ctl("list").stdout
    for n in ("vm1", "db", "web"):
        assert re.search(rf"(^|\s){n}(\s|$)", out, re.M), out


def test_delete_removes_a_volume(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    p.ctl("delete", "vm1")
    assert "vm1" not in os.listdir(p.mnt)
    assert p.status()["volumes"] == []
    p.wait_used(0)
    e = one_line_error(p.ctl("delete", "vm1", ok=None))
    assert "vm1" in e


def test_set_transaction_id(pool):
    p = pool()
    t0 = p.status()["pool"]["transaction_id"]
    assert t0 == 0
    p.ctl("set-transaction-id", "0", "5")
    assert p.status()["pool"]["transaction_id"] == 5
    one_line_error(p.ctl("set-transaction-id", "0", "6", ok=None))
    assert p.status()["pool"]["transaction_id"] == 5
    p.unmount()
    assert 'transaction="5"' in run_cmd("thin_dump", p.meta).stdout
    p.mount()
    assert p.status()["pool"]["transaction_id"] == 5


def test_metadata_snapshot_lets_dump_read_a_live_pool(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 5 * BS))
    vid = p.volume("vm1")["id"]
    p.ctl("reserve-metadata-snap")
    held = p.status()["pool"]["held_root"]
    assert isinstance(held, int) and held > 0
    one_line_error(p.ctl("reserve-metadata-snap", ok=None))   # one at a time, as dm-thin
    # Writes after the reservation do not show in the held root.
    write_at(p.mnt / "vm1", 10 * BS, pattern(2, BS))
    xml = p.dump("-m")
    dev = ET.fromstring(xml).find(f"device[@dev_id='{vid}']")
    assert dev is not None, xml
    assert dev.get("mapped_blocks") == "5"
    p.ctl("release-metadata-snap")
    assert p.status()["pool"]["held_root"] is None
    one_line_error(p.ctl("release-metadata-snap", ok=None))


# ---- errors ---------------------------------------------------------------------------

def test_ctl_errors_are_one_line_and_a_nonzero_exit(pool, tmp_path):
    p = pool()
    create(p.mnt / "vm1", MiB)
    cases = [
        ("no-such-command",),
        ("delete", "nosuch"),
        ("snapshot", "nosuch", "x"),
        ("snapshot", "vm1", "vm1"),
        ("snapshot", "vm1", "a/b"),
        ("snapshot", "vm1", ".."),
        ("snapshot", "vm1", "x" * 256),
        ("snapshot", "vm1", "bad\nname"),
        ("snapshot", "vm1"),
        ("set-transaction-id", "x", "y"),
        ("set-transaction-id", "7", "8"),
        ("status", "--bogus"),
    ]
    for args in cases:
        one_line_error(p.ctl(*args, ok=None))
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1"]
    # Not a thinfs mount at all.
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line_error(run_cmd(p.ctl_bin, plain, "status", check=False))
    one_line_error(run_cmd(p.ctl_bin, tmp_path / "missing", "status", check=False))
    r = run_cmd(p.ctl_bin, check=False)
    assert r.returncode != 0 and r.stderr.strip()


def raw_request(p, line):
    """One request line straight to the control socket; the first response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(ctl_socket_path(p.mnt))
        s.sendall(line)
        return json.loads(s.makefile("rb").readline())


def test_oversized_requests_are_refused_naming_the_limit(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    # thinfs-ctl refuses them itself ...
    err = one_line_error(p.ctl("delete", "a" * 100_000, ok=None))
    assert err == "thinfs-ctl: the command is too large: 100029 bytes as a request, the " \
        "daemon takes at most 65536", err
    err = one_line_error(p.ctl("suspend", *["vm1"] * 20_000, ok=None))
    assert err == "thinfs-ctl: too many arguments: 20000 (the daemon takes at most 4096)", err
    # ... and the daemon, for any other client, answers before it hangs up.
    r = raw_request(p, json.dumps({"cmd": "delete", "args": ["a" * 100_000]}).encode() + b"\n")
    assert r["ok"] is False and r["error"] == "request too large: more than 65536 bytes " \
        "(the limit of one request, newline included)", r
    r = raw_request(p, json.dumps({"cmd": "suspend", "args": ["vm1"] * 5000}).encode() + b"\n")
    assert r["ok"] is False and r["error"] == "too many arguments: 5000 (at most 4096)", r
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    assert p.status()["pool"]["suspended"] is False
    p.unmount()


def test_control_socket_is_root_only(pool, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run thinfs-ctl as another user")
    # The mountpoint must be reachable for the other user: a world-searchable
    # directory outside pytest's 0700 tmp tree, and allow_other.
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="thinfs-test-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "mnt").mkdir()
        p = pool(mnt=top / "mnt", mount_opts=("-o", "allow_other"))
        create(p.mnt / "vm1", MiB)
        sock = ctl_socket_path(p.mnt)
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0
        ctl = os.path.realpath(p.ctl_bin)
        # The other user must be able to run the binary at all.
        probe = run_cmd("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        ctl, "--help", check=False)
        if "Permission denied" in probe.stderr and probe.returncode == 126:
            pytest.skip(f"{ctl} is not executable by uid 65534")
        r = run_cmd("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    ctl, p.mnt, "status", check=False)
        one_line_error(r)
        r = run_cmd("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    ctl, p.mnt, "delete", "vm1", check=False)
        one_line_error(r)
        assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
        p.unmount()
    finally:
        for d in (top / "mnt", top):
            try:
                d.rmdir()
            except OSError:
                pass


# ---- idle pool ---------------------------------------------------------------------------

def test_idle_pool_does_no_io(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 4 * BS), fsync=False)
    time.sleep(1.5)                   # one commit interval (default 1 s) and a bit
    io0 = p.status()["pool"]["io"]
    m0, d0 = os.stat(p.meta).st_mtime_ns, os.stat(p.data).st_mtime_ns
    time.sleep(3)
    io1 = p.status()["pool"]["io"]
    assert io1 == io0, f"I/O while idle: {io0} -> {io1}"
    assert os.stat(p.meta).st_mtime_ns == m0
    assert os.stat(p.data).st_mtime_ns == d0


def test_writes_are_committed_within_the_commit_interval(pool):
    """Without a flush, a commit (a metadata flush) follows a write within
    commit_interval."""
    p = pool(options={"commit_interval": "500ms"})
    create(p.mnt / "vm1", MiB)
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        time.sleep(1)
        flushes = p.status()["pool"]["io"]["metadata"]["flushes"]
        os.pwrite(fd, pattern(1, 3 * BS), 0)    # no fsync, file kept open
        assert wait_for(lambda: p.status()["pool"]["io"]["metadata"]["flushes"] > flushes,
                        timeout=3), "no metadata commit within 3 s of a write"
    finally:
        os.close(fd)
    p.kill9()                                   # what was committed survives a crash
    p.mount()
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == pattern(1, 3 * BS)


# ---- catalog reconciliation ----------------------------------------------------------------

def catalog_delete_name(db, name):
    """Delete every catalog row named `name` (whatever the schema calls the
    table: the test must not depend on it)."""
    con = sqlite3.connect(db)
    try:
        n = 0
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        for t in tables:
            cols = [r[1] for r in con.execute(f'pragma table_info("{t}")')]
            if "name" in cols:
                n += con.execute(f'delete from "{t}" where name = ?', (name,)).rowcount
        con.commit()
        return n
    finally:
        con.close()


def test_device_without_a_catalog_row_appears_as_thin_id(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    data = pattern(1, 3 * BS)
    write_at(p.mnt / "vm1", 0, data)
    vid = p.volume("vm1")["id"]
    p.unmount()
    assert catalog_delete_name(p.catalog, "vm1") >= 1
    p.mount()
    name = f"thin-{vid}"
    assert sorted(os.listdir(p.mnt)) == [".snapshots", name]
    v = p.volume(name)
    assert v["id"] == vid and v["mapped_blocks"] == 3
    # Its data is all there: give it its size back and read it.
    os.truncate(p.mnt / name, MiB)
    assert read_at(p.mnt / name, 0, 3 * BS) == data
    os.rename(p.mnt / name, p.mnt / "vm1")
    p.remount()
    assert read_at(p.mnt / "vm1", 0, 3 * BS) == data


def test_catalog_row_without_a_device_is_dropped_with_a_warning(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    create(p.mnt / "vm2", MiB)
    write_at(p.mnt / "vm1", 0, b"keep")
    p.unmount()
    saved = {f: f.read_bytes() for f in p.catalog.parent.glob(p.catalog.name + "*")}
    p.mount()
    os.unlink(p.mnt / "vm2")
    p.unmount()
    for f in p.catalog.parent.glob(p.catalog.name + "*"):
        f.unlink()
    for f, b in saved.items():
        f.write_bytes(b)              # the old catalog still has vm2
    p.mount()
    assert sorted(os.listdir(p.mnt)) == [".snapshots", "vm1"]
    assert [v["name"] for v in p.status()["volumes"]] == ["vm1"]
    assert read_at(p.mnt / "vm1", 0, 4) == b"keep"
    log = p.log_text()
    assert re.search(r"warn.*vm2|vm2.*warn", log, re.I), f"no warning naming vm2:\n{log}"


# ---- events (design.md) ------------------------------------------------------------------

def events(p):
    out = p.ctl("events", "--json").stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def test_events_json_one_object_per_line(pool):
    p = pool()
    create(p.mnt / "vm1", MiB)
    os.mkdir(p.mnt / ".snapshots" / "nightly")
    evs = events(p)
    assert evs, "no events after a snapshot"
    for e in evs:
        assert set(e) >= {"id", "time", "kind", "detail"}, e
        assert is_int(e["id"]) and isinstance(e["kind"], str) and isinstance(e["detail"], str)
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert any(e["kind"] == "snapshot" for e in evs), [e["kind"] for e in evs]
    last = ids[-1]
    p.ctl("wait-event", str(last))
    t = time.monotonic()
    one_line_error(p.ctl("wait-event", str(last + 1000), "--timeout", "1", ok=None))
    assert time.monotonic() - t < 10


# ---- fault injection (design.md, for tests) ----------------------------------------------

def fault_pool(pool):
    p = pool(mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    return p


def test_fault_section_needs_allow_faults(pool):
    p = fault_pool(pool)
    r = p.mount(ok=False)
    assert r.returncode != 0 and "--allow-faults" in r.stdout, r.stdout
    p.mount("--allow-faults")
    create(p.mnt / "vm1", MiB)
    p2 = pool("nofault")
    one_line_error(p2.ctl("fault", "data", "write", "error", ok=None))


def test_power_cut_keeps_flushed_data(pool):
    p = fault_pool(pool)
    p.mount("--allow-faults")
    create(p.mnt / "vm1", 4 * MiB)
    synced = pattern(1, 6 * BS)
    write_at(p.mnt / "vm1", 0, synced)                       # fsync
    os.mkdir(p.mnt / ".snapshots" / "g")
    write_at(p.mnt / "vm1", 0, pattern(2, 6 * BS), fsync=False)
    p.ctl("fault", "power-cut", ok=None)
    p.crashed()
    p.check_metadata()
    p.mount("--allow-faults")
    assert read_at(p.mnt / ".snapshots" / "g" / "vm1", 0, 6 * BS) == synced
    got = read_at(p.mnt / "vm1", 0, 6 * BS)
    for i in range(6):
        blk = got[i * BS:(i + 1) * BS]
        assert blk in (synced[i * BS:(i + 1) * BS], pattern(2, 6 * BS)[i * BS:(i + 1) * BS]), \
            f"block {i} is neither the old nor the new data"


def test_data_write_error_is_eio_and_the_pool_goes_on(pool):
    import errno as _errno
    p = fault_pool(pool)
    p.mount("--allow-faults")
    p.expect_log(r".")          # error lines about the injected failures are expected
    create(p.mnt / "vm1", 4 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 2 * BS))
    p.ctl("fault", "data", "write", "error")
    fd = os.open(p.mnt / "vm1", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, pattern(2, BS), 10 * BS)
            os.fsync(fd)
        assert ei.value.errno == _errno.EIO, ei.value
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    p.ctl("fault", "data", "write", "ok")
    assert read_at(p.mnt / "vm1", 0, 2 * BS) == pattern(1, 2 * BS)
    mode = p.status()["pool"]["mode"]
    if mode == "write":
        write_at(p.mnt / "vm1", 20 * BS, pattern(3, BS))
        assert read_at(p.mnt / "vm1", 20 * BS, BS) == pattern(3, BS)
    p.remount("--allow-faults")
    assert read_at(p.mnt / "vm1", 0, 2 * BS) == pattern(1, 2 * BS)
