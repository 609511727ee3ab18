"""The cache target on real mounts: [cache "NAME"] sections, modes, policies,
migrations, failure semantics, control commands (README "Cached origins").

Devices are sparse files in tmp_path.  Reads and writes that must reach the
target go through O_DIRECT (the page cache would answer repeated reads
itself).  Every test ends with cache_check on the cache's metadata (pool
teardown)."""
import base64
import ctypes
import mmap
import os
import random
import re
import subprocess
import threading
import time

import pytest

from test_cache_metadata import poke_superblock

BS = 64 << 10              # the cache block size these tests use
ORIGIN = 8 << 20           # 128 origin blocks
CACHE = 1 << 20            # 16 cache blocks


@pytest.fixture(scope="module", autouse=True)
def cache_tools():
    for tool in ("cache_check", "cache_dump"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"{tool} (thin-provisioning-tools) not installed")


def make_cache(pool, *, mode="writeback", keys=None, faults=False, mount=True,
               origin_size=ORIGIN, cache_size=CACHE, options=None, extra=""):
    p = pool(mount=False, mkpool=False, options=options)
    d = p.dir
    p.origin, p.cdev, p.cmeta = d / "origin.img", d / "cache.img", d / "cmeta.img"
    for path, size in ((p.origin, origin_size), (p.cdev, cache_size), (p.cmeta, 4 << 20)):
        with open(path, "wb") as f:
            f.truncate(size)
    lines = [f'[cache "c"]', f"origin = {p.origin}", f"cache = {p.cdev}",
             f"metadata = {p.cmeta}", f"mode = {mode}", "block_size = 64k"]
    lines += [f"{k} = {v}" for k, v in (keys or {}).items()]
    if faults:
        lines += ["[fault]", "allow = yes"]
    p.cfg.write_text(p.cfg.read_text() + "\n".join(lines) + "\n" + extra)
    p.cache_metas.append(p.cmeta)
    p.mkpool()
    p.faults = faults
    if mount:
        mount_cache(p)
    return p


def mount_cache(p):
    p.mount(*(("--allow-faults",) if p.faults else ()))


def cstat(p):
    return p.volume("c")


def dio_write(path, off, data):
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)


def dio_read(path, off, length):
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], off) == length
    finally:
        os.close(fd)
    return bytes(buf)


def wait_for(p, what, cond):
    """Poll status until cond(status of c) holds (no time limit of ours: the
    suite's timeout catches a hang); returns that status."""
    for _ in range(100000):
        st = cstat(p)
        if cond(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def promote(p, blocks):
    """Read each block until the policy promoted it (used repeatedly)."""
    f = p.mnt / "c"
    for _ in range(3):
        for b in blocks:
            dio_read(f, b * BS, BS)
    wait_for(p, f"{len(blocks)} blocks cached",
             lambda st: st["cache_blocks"]["used"] >= len(blocks))


def clean_and_check_origin(p, data):
    """Decommission: clean --wait, unmount, and the origin alone holds data."""
    p.ctl("cache", "c", "clean", "--wait")
    p.unmount()
    assert p.origin.read_bytes()[:len(data)] == data


def mappings(cmeta):
    out = subprocess.run(["cache_dump", str(cmeta)], capture_output=True, text=True,
                         check=True).stdout
    return {int(m.group(1)): int(m.group(2)) for m in
            re.finditer(r'cache_block="(\d+)" origin_block="(\d+)"', out)}


def block_of(path, n):
    with open(path, "rb") as f:
        f.seek(n * BS)
        return f.read(BS)


# ---- configuration and status ------------------------------------------------

def test_cache_file_has_the_origins_size_and_reports_its_status(pool):
    p = make_cache(pool, mode="writethrough")
    st = cstat(p)
    assert st["kind"] == "cache" and st["size"] == ORIGIN
    assert (p.mnt / "c").stat().st_size == ORIGIN
    for key in ("mode", "policy", "metadata_mode", "needs_check", "block_size",
                "migration_threshold", "discard_passdown", "cache_blocks", "metadata_blocks",
                "read_hits", "read_misses", "write_hits", "write_misses", "demotions",
                "promotions", "dirty"):
        assert key in st, key
    assert (st["mode"], st["policy"], st["metadata_mode"], st["block_size"]) == \
        ("writethrough", "smq", "rw", BS)
    assert st["cache_blocks"] == {"used": 0, "total": CACHE // BS}
    text = p.ctl("status").stdout
    assert re.search(r"cache c: 8 \d+/\d+ 128 0/16 (0 ){7}3 metadata2 writethrough "
                     r"no_discard_passdown 2 migration_threshold 2048 smq 0 rw -", text), text


def test_bad_cache_value_is_refused_naming_section_and_key(pool):
    p = make_cache(pool, mount=False)
    text = p.cfg.read_text()
    p.cfg.write_text(text.replace("block_size = 64k", "block_size = 48k"))
    r = p.mkpool("--force", ok=(1,))
    assert '[cache "c"] block_size: 48k is not 32k .. 1g in multiples of 32k' in r.stderr
    p.cfg.write_text(text)


def test_mkpool_refuses_used_cache_metadata_without_force(pool):
    p = make_cache(pool, mount=False)
    # The pool's own metadata is refused first; a fresh pool with the used cache metadata:
    p.meta.write_bytes(b"")
    os.truncate(p.meta, 64 << 20)
    r = p.mkpool(ok=(1,))
    assert "metadata device" in r.stderr and "in use" in r.stderr, r.stderr
    p.mkpool("--force")


# ---- writeback, clean, decommissioning -----------------------------------------

def test_dirty_blocks_are_written_back_once_and_clean_ones_never(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    blocks = list(range(8))
    promote(p, blocks)
    assert cstat(p)["writebacks"] == 0
    data = os.urandom(len(blocks) * BS)
    dio_write(f, 0, data)
    st = cstat(p)
    assert st["write_hits"] >= len(blocks)
    r = p.ctl("cache", "c", "clean", "--wait")
    assert "the origin alone now holds all the data" in r.stdout
    st = cstat(p)
    assert st["dirty"] == 0 and st["writebacks"] == len(blocks) and st["policy"] == "cleaner"
    # Clean blocks are read and never copied back.
    for _ in range(3):
        assert dio_read(f, 0, len(data)) == data
    assert cstat(p)["writebacks"] == len(blocks)
    p.expect_log(r"never")
    events = p.ctl("events").stdout
    assert "cache_clean" in events
    p.unmount()
    # Decommissioned: the origin alone holds the data.
    assert p.origin.read_bytes()[:len(data)] == data


def test_passthrough_is_refused_while_dirty_and_invalidates_write_hits(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    promote(p, [0, 1, 2, 3])
    dio_write(f, 0, b"d" * BS)
    r = p.ctl("cache", "c", "mode", "passthrough", ok=(1,))
    assert "passthrough refused" in r.stdout + r.stderr
    assert p.ctl("cache", "c", "invalidate", "0", ok=(1,)).returncode == 1
    p.ctl("cache", "c", "clean", "--wait")
    p.ctl("cache", "c", "mode", "passthrough")
    before = cstat(p)
    dio_read(f, 2 * BS, BS)                # cached, yet read from the origin
    st = cstat(p)
    assert st["read_hits"] == before["read_hits"]
    assert st["io"]["origin"]["reads"] > before["io"]["origin"]["reads"]
    assert st["io"]["cache"]["reads"] == before["io"]["cache"]["reads"]
    used = st["cache_blocks"]["used"]
    dio_write(f, BS, b"e" * BS)            # a write hit: the cached copy goes
    assert cstat(p)["cache_blocks"]["used"] == used - 1
    assert dio_read(f, 0, 2 * BS) == b"d" * BS + b"e" * BS
    bad = p.ctl("cache", "c", "invalidate", "3-99", ok=(1,))
    assert "is not within 0-16" in bad.stdout + bad.stderr
    assert cstat(p)["cache_blocks"]["used"] == used - 1
    p.ctl("cache", "c", "invalidate", "0-16")
    assert cstat(p)["cache_blocks"]["used"] == 0
    p.unmount()
    assert mappings(p.cmeta) == {}
    assert p.origin.read_bytes()[:2 * BS] == b"d" * BS + b"e" * BS


# ---- writethrough ------------------------------------------------------------------

def test_writethrough_never_dirty_under_fio_verify(pool, tmp_path):
    p = make_cache(pool, mode="writethrough")
    r = subprocess.run(["fio", "--name=wt", f"--filename={p.mnt / 'c'}", "--rw=randrw",
                        "--bs=4k", "--size=2m", "--direct=1", "--verify=crc32c",
                        "--do_verify=1", "--loops=3", "--ioengine=psync",
                        "--randrepeat=1", "--verify_state_save=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    st = cstat(p)
    assert st["dirty"] == 0 and st["writebacks"] == 0
    # 2 MiB of random I/O over a 1 MiB cache: promotions and demotions churn.
    assert st["promotions"] > 0 and st["demotions"] > 0, st
    p.unmount()
    assert_cache_copies_equal_origin(p)


def assert_cache_copies_equal_origin(p):
    for cb, ob in mappings(p.cmeta).items():
        assert block_of(p.cdev, cb) == block_of(p.origin, ob), (cb, ob)


def test_writethrough_writes_the_cache_only_after_the_origin_write_completed(pool):
    p = make_cache(pool, mode="writethrough", faults=True)
    f = p.mnt / "c"
    promote(p, [0])
    io = cstat(p)["io"]
    p.ctl("fault", "c:origin", "write", "stall")
    t = threading.Thread(target=dio_write, args=(f, 0, b"n" * 4096))
    t.start()
    wait_for(p, "the origin write stalled",
             lambda st: st["io"]["origin"]["writes"] > io["origin"]["writes"])
    assert cstat(p)["io"]["cache"]["writes"] == io["cache"]["writes"]
    p.ctl("fault", "c:origin", "write", "ok")
    t.join()
    assert cstat(p)["io"]["cache"]["writes"] == io["cache"]["writes"] + 1
    assert dio_read(f, 0, 4096) == b"n" * 4096


def test_policy_and_mode_switches_under_a_verifying_writer(pool):
    p = make_cache(pool, mode="writeback")
    fio = subprocess.Popen(["fio", "--name=sw", f"--filename={p.mnt / 'c'}", "--rw=randrw",
                            "--bs=16k", "--size=3m", "--direct=1", "--verify=crc32c",
                            "--do_verify=1", "--loops=6", "--ioengine=psync",
                            "--randrepeat=1", "--verify_state_save=0"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    steps = [("policy", "cleaner"), ("mode", "writethrough"), ("policy", "smq"),
             ("mode", "writeback")]
    n = 0
    while fio.poll() is None or n < len(steps):
        p.ctl("cache", "c", *steps[n % len(steps)])
        n += 1
    out = fio.communicate()[0]
    assert fio.returncode == 0, out
    st = cstat(p)
    assert st["promotions"] > 0, st
    clean_and_check_origin(p, b"")
    assert_cache_copies_equal_origin(p)


# ---- policy ---------------------------------------------------------------------

def test_hot_set_is_promoted_and_served_from_the_cache(pool):
    p = make_cache(pool, mode="writethrough")
    f = p.mnt / "c"
    hot = list(range(20, 28))
    promote(p, hot)
    before = cstat(p)["read_hits"]
    for b in hot:
        dio_read(f, b * BS, BS)
    st = cstat(p)
    assert st["read_hits"] - before == len(hot)
    # One cold pass is not "used repeatedly": nothing of it is promoted.
    for b in range(64, 80):
        dio_read(f, b * BS, BS)
    p.unmount()
    assert set(mappings(p.cmeta).values()) == set(hot)


def test_migration_threshold_zero_stops_promotions(pool):
    p = make_cache(pool, mode="writethrough", keys={"migration_threshold": 0})
    f = p.mnt / "c"
    for _ in range(4):
        dio_read(f, 0, 4 * BS)
    p.ctl("cache", "c", "migration_threshold", "2048")
    assert cstat(p)["promotions"] == 0
    promote(p, [0, 1, 2, 3])


# ---- crashes and failures ----------------------------------------------------------

def test_kill9_in_writeback_loses_nothing(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    promote(p, [0, 1, 2, 3])
    p.ctl("cache", "c", "migration_threshold", "0")   # nothing written back before the kill
    data = os.urandom(4 * BS)
    dio_write(f, 0, data)
    assert cstat(p)["dirty"] == 4
    p.kill9()
    mount_cache(p)
    st = cstat(p)
    assert st["dirty"] == st["cache_blocks"]["used"] == 4   # unclean: every mapped block
    assert dio_read(f, 0, len(data)) == data
    clean_and_check_origin(p, data)


def test_metadata_write_error_sets_needs_check_and_the_cache_waits_for_the_checker(pool):
    p = make_cache(pool, mode="writeback", faults=True)
    f = p.mnt / "c"
    promote(p, [0, 1])
    data = os.urandom(2 * BS)
    p.ctl("fault", "c:metadata", "write", "error", "once")
    p.expect_log(r"cmeta.img: writing metadata block \d+ .* failed")
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = cstat(p)
    assert st["metadata_mode"] == "ro" and st["needs_check"], st
    assert "metadata commit failed" in st["reason"]
    p.expect_log(r"cache c: rw -> ro")
    assert "mode_change" in p.ctl("events").stdout
    # Still served; control commands are refused.
    assert dio_read(f, 0, len(data)) == data
    r = p.ctl("cache", "c", "mode", "writethrough", ok=(1,))
    assert "metadata mode is ro" in r.stdout + r.stderr
    p.unmount()
    # The next mount leaves the cache stopped until the checker cleared the flag.
    p.expect_log(r"cache c does not start")
    mount_cache(p)
    st = cstat(p)
    assert st["metadata_mode"] == "fail" and "needs_check" in st["reason"]
    with pytest.raises(OSError) as e:
        dio_read(f, 0, BS)
    assert e.value.errno == 5
    p.unmount()
    r = p.thinfs_run("check", p.cfg)
    assert "cache c: " in r.stdout and "needs_check stays set" in r.stdout, r.stdout
    r = p.thinfs_run("check", p.cfg, "--clear-needs-check")
    assert "cache c: needs_check cleared" in r.stdout, r.stdout
    mount_cache(p)
    assert cstat(p)["metadata_mode"] == "rw"
    assert dio_read(f, 0, len(data)) == data
    clean_and_check_origin(p, data)


def test_unknown_metadata_version_is_refused_naming_it(pool):
    p = make_cache(pool, mode="writethrough", mount=False)
    mount_cache(p)
    p.unmount()
    poke_superblock(p.cmeta, 40, "<I", 3)
    p.cache_metas.remove(p.cmeta)       # cache_check refuses it too
    p.expect_log(r"unsupported cache metadata version 3|cache c does not start")
    mount_cache(p)
    st = cstat(p)
    assert st["metadata_mode"] == "fail" and "metadata refused" in st["reason"]
    assert "unsupported cache metadata version 3" in p.log_text()
    p.unmount()
    r = p.thinfs_run("check", p.cfg, ok=(1,))
    assert "unsupported cache metadata version 3" in r.stderr, r.stderr
    assert "cache c: metadata" in r.stderr and "refused" in r.stderr, r.stderr


# ---- discard -------------------------------------------------------------------

def test_discard_drops_cached_blocks_and_reads_zeros(pool):
    p = make_cache(pool, mode="writeback", keys={"discard_passdown": "yes"})
    f = p.mnt / "c"
    dio_write(f, 0, b"x" * (8 * BS))
    promote(p, [2, 3, 4])
    p.ctl("cache", "c", "migration_threshold", "0")   # no promotions meanwhile
    used = cstat(p)["cache_blocks"]["used"]
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f, os.O_RDWR)
    try:
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, over blocks 2..5 and half of 1.
        assert libc.fallocate(fd, 3, ctypes.c_long(BS + BS // 2),
                              ctypes.c_long(4 * BS + BS // 2)) == 0
    finally:
        os.close(fd)
    assert cstat(p)["cache_blocks"]["used"] == used - 3
    got = dio_read(f, 0, 8 * BS)
    assert got == b"x" * (BS + BS // 2) + bytes(4 * BS + BS // 2) + b"x" * (2 * BS)
    # Writeback: the first (partial) write to a discarded block takes a cache
    # block without a copy, dirty, the rest of it zeros.
    p.ctl("cache", "c", "migration_threshold", "2048")
    before = cstat(p)
    dio_write(f, 3 * BS, b"y" * 4096)
    st = cstat(p)
    assert st["promotions"] == before["promotions"] + 1 and st["dirty"] == before["dirty"] + 1
    assert st["io"]["origin"]["reads"] == before["io"]["origin"]["reads"]
    assert dio_read(f, 3 * BS, BS) == b"y" * 4096 + bytes(BS - 4096)
    p.ctl("cache", "c", "clean", "--wait")
    p.unmount()
    assert p.origin.read_bytes()[:8 * BS] == got[:3 * BS] + b"y" * 4096 + \
        bytes(BS - 4096) + got[4 * BS:]


def test_metadata_that_cannot_take_needs_check_fails_the_cache_alone(pool):
    p = make_cache(pool, mode="writeback", faults=True)
    f = p.mnt / "c"
    promote(p, [0])
    (p.mnt / "thin").write_bytes(b"")
    p.ctl("fault", "c:metadata", "write", "error")
    p.expect_log(r"cmeta.img: writing .* failed|cache c: rw -> fail")
    dio_write(f, 0, b"z" * BS)           # the dirty bit: a metadata change
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.fsync(fd)                  # the commit fails, and so does needs_check
        assert e.value.errno == 5
    finally:
        os.close(fd)
    st = cstat(p)
    assert st["metadata_mode"] == "fail", st
    with pytest.raises(OSError) as e:
        dio_read(f, 0, BS)
    assert e.value.errno == 5
    assert "Fail" in p.ctl("status").stdout
    # The daemon and the pool's other volumes go on.
    (p.mnt / "thin").write_bytes(b"still here")
    assert (p.mnt / "thin").read_bytes() == b"still here"
    p.ctl("fault", "c:metadata", "write", "ok")
    p.unmount()
    # Nothing was committed after the failure: the last commit is intact and clean for the checker.


def test_power_cut_in_writeback_keeps_what_fsync_acknowledged(pool):
    p = make_cache(pool, mode="writeback", faults=True)
    f = p.mnt / "c"
    promote(p, [0, 1, 2, 3])
    p.ctl("cache", "c", "migration_threshold", "0")
    synced = os.urandom(2 * BS)
    dio_write(f, 0, synced)
    fd = os.open(f, os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    dio_write(f, 2 * BS, os.urandom(2 * BS))   # not fsynced: may be lost
    p.ctl("fault", "power-cut", ok=None)
    p.crashed()
    mount_cache(p)
    st = cstat(p)
    assert st["dirty"] == st["cache_blocks"]["used"] == 4
    assert dio_read(f, 0, len(synced)) == synced
    clean_and_check_origin(p, synced)


def test_delay_fault_makes_the_origin_a_slow_disk(pool):
    p = make_cache(pool, mode="writethrough", faults=True)
    f = p.mnt / "c"
    dio_write(f, 40 * BS, b"s" * (5 * BS))
    p.ctl("fault", "c:origin", "read", "delay", "2000")
    assert "c:origin read delay 2000 us" in p.ctl("events").stdout
    for b in range(5):
        assert dio_read(f, (40 + b) * BS, BS) == b"s" * BS    # slow, and right
    p.ctl("fault", "c:origin", "read", "ok")
    bad = p.ctl("fault", "c:origin", "read", "delay", "soon", ok=(1,))
    assert "usage: fault DEVICE read|write|flush delay USEC" in bad.stdout + bad.stderr
    bad = p.ctl("fault", "nosuch:origin", "read", "error", ok=(1,))
    assert "fault: no device 'nosuch:origin'" in bad.stdout + bad.stderr


def test_reload_changes_mode_policy_and_migration_threshold(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    promote(p, [0])
    p.ctl("cache", "c", "migration_threshold", "0")   # it stays dirty
    dio_write(f, 0, b"r" * BS)
    assert cstat(p)["dirty"] == 1
    text = p.cfg.read_text()
    p.cfg.write_text(text.replace("mode = writeback", "mode = passthrough\n"
                                  "migration_threshold = 0"))
    p.ctl("suspend")
    p.ctl("reload", p.cfg)
    r = p.ctl("resume")
    assert "passthrough refused: 1 dirty block(s)" in r.stdout, r.stdout
    assert cstat(p)["mode"] == "writeback"
    p.cfg.write_text(text.replace("mode = writeback", "mode = writethrough\n"
                                  "policy = cleaner\nmigration_threshold = 0"))
    p.ctl("suspend")
    p.ctl("reload", p.cfg)
    r = p.ctl("resume")
    assert "refused" not in r.stdout, r.stdout
    st = cstat(p)
    assert (st["mode"], st["policy"], st["migration_threshold"]) == \
        ("writethrough", "cleaner", 0), st
    assert dio_read(f, 0, BS) == b"r" * BS
    p.ctl("cache", "c", "migration_threshold", "2048")
    clean_and_check_origin(p, b"r" * BS)


def hints(cmeta):
    out = subprocess.run(["cache_dump", str(cmeta)], capture_output=True, text=True,
                         check=True).stdout
    return {int(m.group(1)): int.from_bytes(base64.b64decode(m.group(2)), "little")
            for m in re.finditer(r'<hint cache_block="(\d+)" data="([^"]*)"', out)}


def test_hotness_survives_a_clean_restart_and_not_an_unclean_one(pool):
    p = make_cache(pool, mode="writethrough")
    promote(p, [5, 6, 7])
    for _ in range(4):
        dio_read(p.mnt / "c", 5 * BS, BS)
    p.unmount()
    saved = hints(p.cmeta)
    hot = {cb: h for cb, h in saved.items() if h}
    assert set(mappings(p.cmeta)) == set(hot) and len(hot) == 3, saved
    mount_cache(p)
    p.unmount()
    assert hints(p.cmeta) == saved          # loaded at mount, saved again at unmount
    mount_cache(p)
    p.kill9()
    mount_cache(p)
    p.unmount()
    assert not any(hints(p.cmeta).values())  # an unclean stop's hints are not trusted
    assert set(mappings(p.cmeta)) == set(hot)


def test_a_clean_idle_cache_does_no_io(pool):
    p = make_cache(pool, mode="writeback")
    promote(p, [1, 2])
    dio_write(p.mnt / "c", BS, b"i" * BS)
    wait_for(p, "written back while idle", lambda st: st["dirty"] == 0)
    time.sleep(1.2)       # the commit of the clean bit (once a second)
    before = cstat(p)["io"]
    time.sleep(1.2)       # longer than the commit interval and the idle time
    assert cstat(p)["io"] == before


def test_metadata_from_cache_restore_serves_its_blocks_from_the_cache(pool, tmp_path):
    # No migrations until the clean: an idle writeback cache (500 ms after the mount on a
    # slow machine) would write the dirty block back before the first status.
    p = make_cache(pool, mode="writeback", mount=False, keys={"migration_threshold": 0})
    with open(p.origin, "r+b") as f:
        for b in (5, 7):
            f.seek(b * BS)
            f.write(bytes([b]) * BS)
    with open(p.cdev, "r+b") as f:
        f.write(b"D" * BS + b"C" * BS)     # cache block 0: dirty data; 1: a clean copy
    with open(p.origin, "r+b") as f:
        f.seek(7 * BS)
        f.write(b"C" * BS)
    xml = tmp_path / "cache.xml"
    xml.write_text('<superblock uuid="" block_size="128" nr_cache_blocks="16" policy="smq" '
                   'hint_width="4">\n  <mappings>\n'
                   '    <mapping cache_block="0" origin_block="5" dirty="true"/>\n'
                   '    <mapping cache_block="1" origin_block="7" dirty="false"/>\n'
                   '  </mappings>\n</superblock>\n')
    subprocess.run(["cache_restore", "-i", str(xml), "-o", str(p.cmeta)], check=True,
                   capture_output=True)
    mount_cache(p)
    st = cstat(p)
    assert st["cache_blocks"]["used"] == 2 and st["dirty"] == 1, st
    assert dio_read(p.mnt / "c", 5 * BS, BS) == b"D" * BS
    assert cstat(p)["read_hits"] == 1
    p.ctl("cache", "c", "migration_threshold", "2048")
    p.ctl("cache", "c", "clean", "--wait")
    assert cstat(p)["writebacks"] == 1        # only the dirty block
    p.unmount()
    assert block_of(p.origin, 5) == b"D" * BS and block_of(p.origin, 7) == b"C" * BS


def test_cache_device_errors_never_serve_a_stale_copy(pool):
    p = make_cache(pool, mode="writethrough", faults=True)
    f = p.mnt / "c"
    promote(p, [0, 1])
    used = cstat(p)["cache_blocks"]["used"]
    p.ctl("fault", "c:cache", "write", "error", "once")
    with pytest.raises(OSError) as e:
        dio_write(f, 0, b"w" * BS)     # reached the origin, not the cache
    assert e.value.errno == 5
    assert cstat(p)["cache_blocks"]["used"] == used - 1
    assert dio_read(f, 0, BS) == b"w" * BS
    # Writeback: a failed write of a clean cached block drops it too.
    p.ctl("cache", "c", "mode", "writeback")
    used = cstat(p)["cache_blocks"]["used"]
    p.ctl("fault", "c:cache", "write", "error", "once")
    with pytest.raises(OSError):
        dio_write(f, BS, b"u" * BS)
    assert cstat(p)["cache_blocks"]["used"] == used - 1
    p.ctl("cache", "c", "mode", "writethrough")
    promote(p, [1])
    # A clean block the cache device cannot read comes from the origin.
    dio_write(f, BS, b"v" * BS)
    p.ctl("fault", "c:cache", "read", "error", "once")
    assert dio_read(f, BS, BS) == b"v" * BS
    p.unmount()
    assert_cache_copies_equal_origin(p)


def test_resize_grows_and_shrinks_cache_and_origin(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    data = os.urandom(34 * BS)
    dio_write(f, 0, data)
    promote(p, [0, 1, 2, 3])
    os.truncate(p.cdev, 2 * CACHE)
    r = p.ctl("resize", "c")
    assert "16 -> 32 cache blocks" in r.stdout, r.stdout
    st = cstat(p)
    assert st["cache_blocks"] == {"used": 4, "total": 32}
    promote(p, list(range(20, 34)))                     # cache blocks 4 .. 17
    p.ctl("cache", "c", "migration_threshold", "0")
    data = data[:20 * BS] + os.urandom(14 * BS)
    dio_write(f, 20 * BS, data[20 * BS:])               # all dirty
    assert cstat(p)["dirty"] == 14
    os.truncate(p.cdev, CACHE)
    r = p.ctl("resize", "c", ok=(1,))
    assert "is dirty and would be lost (clean first)" in r.stdout + r.stderr
    assert cstat(p)["cache_blocks"]["total"] == 32      # nothing changed
    p.ctl("cache", "c", "migration_threshold", "2048")
    p.ctl("cache", "c", "clean", "--wait")
    p.ctl("resize", "c")
    st = cstat(p)
    assert st["cache_blocks"]["total"] == 16 and st["cache_blocks"]["used"] == 16, st
    # The origin grows: the file with it, new blocks cached as any others.
    os.truncate(p.origin, ORIGIN + (4 << 20))
    r = p.ctl("resize", "c")
    assert f"origin {ORIGIN} -> {ORIGIN + (4 << 20)} bytes" in r.stdout, r.stdout
    assert cstat(p)["size"] == ORIGIN + (4 << 20)
    assert f.stat().st_size == ORIGIN + (4 << 20)
    dio_write(f, ORIGIN + BS, b"g" * BS)
    assert dio_read(f, ORIGIN + BS, BS) == b"g" * BS
    # ... and shrinks: mappings past the end go (they are clean).
    os.truncate(p.origin, 24 * BS)
    p.ctl("resize", "c")
    st = cstat(p)
    assert st["size"] == 24 * BS and st["cache_blocks"]["used"] < 16, st
    assert dio_read(f, 0, 24 * BS) == data[:24 * BS]
    p.unmount()
    m = mappings(p.cmeta)
    assert m and all(cb < 16 and ob < 24 for cb, ob in m.items()), m
    assert_cache_copies_equal_origin(p)


def test_a_resized_origin_shows_its_size_with_the_writeback_cache(pool):
    """With writeback_cache the kernel keeps a regular file's size itself and
    ignores ours at getattr: a resize must make it forget the file."""
    p = make_cache(pool, options={"writeback_cache": "on"})
    f = p.mnt / "c"
    assert f.stat().st_size == ORIGIN
    os.truncate(p.origin, ORIGIN + (4 << 20))
    p.ctl("resize", "c")
    assert f.stat().st_size == ORIGIN + (4 << 20)
    os.truncate(p.origin, 24 * BS)
    p.ctl("resize", "c")
    assert f.stat().st_size == 24 * BS


def test_origin_shrunk_while_unmounted(pool):
    p = make_cache(pool, mode="writeback")
    promote(p, [2, 100])
    p.ctl("cache", "c", "migration_threshold", "0")
    dio_write(p.mnt / "c", 100 * BS, b"q" * BS)          # dirty, past the new end
    p.unmount()
    os.truncate(p.origin, 64 * BS)
    p.expect_log(r"cache c does not start: dirty cache block \d+ maps origin block 100")
    mount_cache(p)
    assert cstat(p)["metadata_mode"] == "fail"
    p.unmount()
    os.truncate(p.origin, ORIGIN)
    mount_cache(p)
    p.ctl("cache", "c", "clean", "--wait")
    p.unmount()
    os.truncate(p.origin, 64 * BS)
    mount_cache(p)                                        # clean: the mapping just goes
    st = cstat(p)
    assert st["metadata_mode"] == "rw" and st["size"] == 64 * BS
    assert st["cache_blocks"]["used"] == 1, st


def test_clean_wait_stops_on_a_failing_origin_and_loses_nothing(pool):
    p = make_cache(pool, mode="writeback", faults=True)
    f = p.mnt / "c"
    promote(p, [0, 1])
    p.ctl("cache", "c", "migration_threshold", "0")
    data = os.urandom(2 * BS)
    dio_write(f, 0, data)
    p.ctl("fault", "c:origin", "write", "error")
    p.ctl("cache", "c", "migration_threshold", "2048")
    r = p.ctl("cache", "c", "clean", "--wait", ok=(1,))
    assert "clean stopped: a writeback failed (Input/output error); 2 dirty" in \
        r.stdout + r.stderr, r.stdout + r.stderr
    assert cstat(p)["dirty"] == 2 and dio_read(f, 0, len(data)) == data
    p.ctl("fault", "c:origin", "write", "ok")
    clean_and_check_origin(p, data)


def test_suspend_holds_the_caches_io_until_resume(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    promote(p, [0])
    r = p.ctl("suspend", "c")
    assert "suspended: c" in r.stdout
    st = cstat(p)
    assert st["suspended"] is True
    io = st["io"]
    t = threading.Thread(target=dio_write, args=(f, 0, b"h" * BS))
    t.start()
    (p.mnt / "thin").write_bytes(b"the pool is not suspended")
    assert t.is_alive() and cstat(p)["io"] == io        # held: nothing reached a device
    bad = p.ctl("suspend", "c", "thin", ok=(1,))
    assert "separate commands" in bad.stdout + bad.stderr
    assert "resumed" in p.ctl("resume").stdout            # no name: the caches too
    t.join()
    assert cstat(p)["suspended"] is False
    assert dio_read(f, 0, BS) == b"h" * BS
    p.ctl("suspend", "c")
    p.unmount()                                           # a suspended cache still closes


def test_cache_events_run_the_on_event_hook(pool, tmp_path):
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n"
                    f'echo "$THINFS_EVENT $THINFS_VOLUME $THINFS_OLD_MODE $THINFS_NEW_MODE" '
                    f'>> "{log}"\n')
    hook.chmod(0o755)
    p = make_cache(pool, mode="writeback", faults=True, options={"on_event": hook})
    promote(p, [0])
    dio_write(p.mnt / "c", 0, b"e" * BS)
    p.ctl("cache", "c", "clean", "--wait")
    p.expect_log(r"cmeta.img: writing .* failed|cache c: rw -> ro")
    p.ctl("fault", "c:metadata", "write", "error", "once")
    dio_write(p.mnt / "c", 0, b"f" * BS)
    fd = os.open(p.mnt / "c", os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    assert cstat(p)["metadata_mode"] == "ro"
    p.unmount()                                   # waits for hooks still running
    lines = log.read_text().splitlines()
    assert "cache_clean c" in [l.strip() for l in lines], lines
    assert "mode_change c rw ro" in lines, lines
    p.cache_metas.remove(p.cmeta)                 # needs_check stays set: cleared below
    r = p.thinfs_run("check", p.cfg, "--clear-needs-check")
    assert "needs_check cleared" in r.stdout
    p.cache_metas.append(p.cmeta)


def test_invalidate_leaves_exactly_the_other_blocks(pool):
    p = make_cache(pool, mode="writethrough")
    promote(p, list(range(10, 18)))
    p.ctl("cache", "c", "migration_threshold", "0")
    p.unmount()
    before = mappings(p.cmeta)
    mount_cache(p)
    r = p.ctl("cache", "c", "invalidate", "1", ok=(1,))
    assert "invalidate works in passthrough mode only" in r.stdout + r.stderr
    p.ctl("cache", "c", "mode", "passthrough")
    for bad in ("5-3", "x", "2-", "16"):
        r = p.ctl("cache", "c", "invalidate", "1", bad, ok=(1,))
        assert "invalidate" in r.stdout + r.stderr, bad
    assert cstat(p)["cache_blocks"]["used"] == len(before)     # refused: nothing dropped
    r = p.ctl("cache", "c", "invalidate", "1", "3-6")
    assert "4 block(s) invalidated" in r.stdout, r.stdout
    p.unmount()
    assert mappings(p.cmeta) == {cb: ob for cb, ob in before.items() if cb not in (1, 3, 4, 5)}


def test_read_only_mount_serves_the_cache_and_writes_nothing(pool):
    p = make_cache(pool, mode="writeback")
    f = p.mnt / "c"
    promote(p, [0, 1])
    p.ctl("cache", "c", "migration_threshold", "0")
    data = os.urandom(2 * BS)
    dio_write(f, 0, data)                         # dirty: only the cache has it
    p.unmount()
    images = [x.read_bytes() for x in (p.cmeta, p.cdev, p.origin)]
    p.mount("-o", "ro")
    st = cstat(p)
    assert st["read_only"] is True and st["metadata_mode"] == "rw" and st["dirty"] == 2, st
    assert dio_read(f, 0, len(data)) == data
    for _ in range(3):
        dio_read(f, 10 * BS, BS)                  # would be promoted read-write
    with pytest.raises(OSError):
        dio_write(f, 0, b"n" * BS)
    r = p.ctl("cache", "c", "clean", ok=(1,))
    assert "mounted read-only" in r.stdout + r.stderr
    p.unmount()
    assert [x.read_bytes() for x in (p.cmeta, p.cdev, p.origin)] == images
    mount_cache(p)
    clean_and_check_origin(p, data)


def test_a_cache_and_an_origin_in_one_pool_keep_their_files(pool, tmp_path):
    dev = tmp_path / "raw.img"
    with open(dev, "wb") as f:
        f.truncate(4 << 20)
    p = make_cache(pool, mode="writeback", extra=f'[origin "db"]\ndevice = {dev}\n')
    (p.mnt / "thin").write_bytes(b"t")
    dio_write(p.mnt / "c", 0, b"c" * BS)
    dio_write(p.mnt / "db", 0, b"d" * BS)
    kinds = {v["name"]: (v["kind"], v["id"]) for v in p.status()["volumes"]}
    assert kinds["c"][0] == "cache" and kinds["db"][0] == "origin", kinds
    p.unmount()
    mount_cache(p)
    again = {v["name"]: (v["kind"], v["id"]) for v in p.status()["volumes"]}
    assert again == kinds
    assert dio_read(p.mnt / "c", 0, BS) == b"c" * BS
    assert dio_read(p.mnt / "db", 0, BS) == b"d" * BS
    assert (p.mnt / "thin").read_bytes() == b"t"


def restore_dirty(p, tmp_path, pairs, nr_cache_blocks=16):
    """Metadata made by cache_restore: cache block -> origin block, every one dirty."""
    xml = tmp_path / "dirty.xml"
    xml.write_text(f'<superblock uuid="" block_size="128" nr_cache_blocks="{nr_cache_blocks}" '
                   'policy="smq" '
                   'hint_width="4">\n  <mappings>\n' +
                   "".join(f'    <mapping cache_block="{cb}" origin_block="{ob}" dirty="true"/>\n'
                           for cb, ob in pairs) + '  </mappings>\n</superblock>\n')
    subprocess.run(["cache_restore", "-i", str(xml), "-o", str(p.cmeta)], check=True,
                   capture_output=True)


def test_batched_writeback_writes_each_dirty_block_once_under_a_racing_writer(pool, tmp_path):
    # 16 dirty blocks in three runs on the origin, in shuffled cache blocks: batches of
    # 6 (migration_threshold 768) merge runs on the origin and split them at the batch ends.
    obs = list(range(0, 6)) + list(range(8, 14)) + list(range(20, 24))
    cbs = [5, 12, 0, 3, 15, 9, 1, 14, 7, 2, 11, 6, 13, 4, 10, 8]
    holes = [6, 7, 14, 15, 16, 17, 18, 19]    # uncached, inside the batches' lock windows
    p = make_cache(pool, mode="writeback", faults=True, mount=False,
                   keys={"migration_threshold": 0})
    with open(p.cdev, "r+b") as f:
        for cb, ob in zip(cbs, obs):
            f.seek(cb * BS)
            f.write(bytes([ob + 1]) * BS)
    restore_dirty(p, tmp_path, zip(cbs, obs))
    mount_cache(p)
    f = p.mnt / "c"
    assert cstat(p)["dirty"] == 16
    want = {ob: bytes([ob + 1]) * BS for ob in obs}
    # A slow origin keeps the batches in flight while the writer runs.
    p.ctl("fault", "c:origin", "write", "delay", "20000")

    def race(blocks, tag):
        for ob in blocks:
            data = bytes([tag]) * (BS // 2) + os.urandom(BS // 2)
            dio_write(f, ob * BS, data)
            want[ob] = data

    # Round 1: the writer only writes the holes: each dirty block goes back exactly once.
    p.ctl("cache", "c", "migration_threshold", "768")
    p.ctl("cache", "c", "clean")
    race(holes, 0xAA)
    p.ctl("cache", "c", "clean", "--wait")
    st = cstat(p)
    assert st["dirty"] == 0 and st["writebacks"] == 16, st
    # Round 2: the writer rewrites the cached blocks while they are written back.
    p.ctl("cache", "c", "migration_threshold", "0")
    race(obs, 0xBB)
    assert cstat(p)["dirty"] == 16
    p.ctl("cache", "c", "migration_threshold", "768")
    p.ctl("cache", "c", "clean")
    race(reversed(obs), 0xCC)
    p.ctl("cache", "c", "clean", "--wait")
    st = cstat(p)
    # Once per block dirtied, plus once more for each block rewritten after its writeback.
    assert st["dirty"] == 0 and 32 <= st["writebacks"] <= 48, st
    for ob, data in want.items():
        assert dio_read(f, ob * BS, BS) == data, ob
    p.ctl("fault", "c:origin", "write", "ok")
    p.unmount()
    for ob in range(24):
        assert block_of(p.origin, ob) == want.get(ob, bytes(BS)), ob


def shuffled_dirty_cache(pool, tmp_path, nr, **kw):
    """A cache of 64 blocks whose cache blocks 0..nr-1 hold origin blocks 0..nr-1 in a
    shuffled order, every one dirty and holding its own bytes; returns (p, data by ob)."""
    cbs = list(range(64))
    random.Random(nr).shuffle(cbs)
    p = make_cache(pool, mode="writeback", mount=False, cache_size=64 * BS,
                   keys={"migration_threshold": 0}, **kw)
    data = {ob: os.urandom(BS) for ob in range(nr)}
    with open(p.cdev, "r+b") as f:
        for ob in range(nr):
            f.seek(cbs[ob] * BS)
            f.write(data[ob])
    restore_dirty(p, tmp_path, [(cbs[ob], ob) for ob in range(nr)], nr_cache_blocks=64)
    mount_cache(p)
    assert cstat(p)["dirty"] == nr
    return p, data


def origin_io(p):
    return cstat(p)["io"]["origin"]


@pytest.mark.parametrize("threshold, writes, flushes", [
    (1024, 12, 1),   # batches of 4 blocks (half the threshold), pipelined, one group
    (128, 48, 2),    # one block at a time, groups of 32 batches
])
def test_cleaning_coalesces_origin_writes_and_flushes_once_per_group(pool, tmp_path, threshold,
                                                                       writes, flushes):
    # 48 dirty blocks, adjacent on the origin, scattered on the cache device.
    p, data = shuffled_dirty_cache(pool, tmp_path, 48)
    before = origin_io(p)
    p.ctl("cache", "c", "clean")         # the cleaner from the first writeback on
    p.ctl("cache", "c", "migration_threshold", str(threshold))
    p.ctl("cache", "c", "clean", "--wait")
    after = origin_io(p)
    assert cstat(p)["writebacks"] == 48
    assert after["writes"] - before["writes"] == writes, (before, after)
    assert after["write_bytes"] - before["write_bytes"] == 48 * BS
    assert after["flushes"] - before["flushes"] == flushes, (before, after)
    for ob, want in data.items():
        assert dio_read(p.mnt / "c", ob * BS, BS) == want, ob
    p.unmount()
    for ob, want in data.items():
        assert block_of(p.origin, ob) == want, ob


def test_a_cache_read_error_in_batched_cleaning_leaves_the_group_dirty(pool, tmp_path):
    # 48 dirty blocks, one group in batches of 4 whose scattered cache reads go out
    # together; the 7th read fails (the second batch's, while the first is written).
    p, data = shuffled_dirty_cache(pool, tmp_path, 48, faults=True)
    before = origin_io(p)
    p.ctl("fault", "c:cache", "read", "error", "after", "6", "once")
    p.ctl("cache", "c", "migration_threshold", "1024")
    r = p.ctl("cache", "c", "clean", "--wait", ok=(1,))
    assert "clean stopped: a writeback failed (Input/output error); 48 dirty" in \
        r.stdout + r.stderr, r.stdout + r.stderr
    st = cstat(p)
    assert st["dirty"] == 48 and st["writebacks"] == 0, st
    # No flush of the origin for the failed group: nothing was marked clean.
    assert origin_io(p)["flushes"] == before["flushes"]
    for ob, want in data.items():
        assert dio_read(p.mnt / "c", ob * BS, BS) == want, ob
    # The fault passed: the retry writes the whole group back, each block once.
    p.ctl("cache", "c", "clean", "--wait")
    st = cstat(p)
    assert st["dirty"] == 0 and st["writebacks"] == 48, st
    p.unmount()
    for ob, want in data.items():
        assert block_of(p.origin, ob) == want, ob


def dirty_bits(cmeta):
    out = subprocess.run(["cache_dump", str(cmeta)], capture_output=True, text=True,
                         check=True).stdout
    return {int(m.group(2)): m.group(3) == "true" for m in re.finditer(
        r'cache_block="(\d+)" origin_block="(\d+)" dirty="(\w+)"', out)}


def test_power_cut_during_cleaning_leaves_no_block_clean_before_its_origin_flush(pool,
                                                                                  tmp_path):
    # Groups of 32 blocks (one block a batch): the first group's flush passes and it is
    # marked clean; the second group's flush stalls, its writes held in the origin's
    # volatile cache, and the power goes.
    p, data = shuffled_dirty_cache(pool, tmp_path, 64, faults=True)
    flushes = origin_io(p)["flushes"]
    p.ctl("fault", "c:origin", "flush", "stall", "after", "1")
    p.ctl("cache", "c", "clean")         # the cleaner from the first writeback on
    p.ctl("cache", "c", "migration_threshold", "128")
    wait_for(p, "the second group's flush", lambda st: st["io"]["origin"]["flushes"] >= flushes + 2)
    assert cstat(p)["dirty"] == 32
    p.ctl("fault", "power-cut", ok=None)
    p.crashed()
    bits = dirty_bits(p.cmeta)
    assert len(bits) == 64
    clean = [ob for ob, dirty in bits.items() if not dirty]
    # The first group is clean on disk, and its blocks are on the origin; no other is clean.
    assert sorted(clean) == list(range(32)), clean
    for ob in range(64):
        want = data[ob] if ob < 32 else bytes(BS)
        assert block_of(p.origin, ob) == want, ob
    mount_cache(p)
    assert cstat(p)["dirty"] == 64     # an unclean stop: every mapped block counts as dirty
    for ob, want in data.items():
        assert dio_read(p.mnt / "c", ob * BS, BS) == want, ob
    p.ctl("cache", "c", "migration_threshold", "2048")
    clean_and_check_origin(p, b"".join(data[ob] for ob in range(64)))


def test_an_origin_section_turned_into_a_cache_of_its_name_takes_it_over(pool):
    p = make_cache(pool, mount=False)
    cache_cfg = p.cfg.read_text()
    head, _, _ = cache_cfg.partition('[cache "c"]')
    p.cfg.write_text(head + f'[origin "c"]\ndevice = {p.origin}\n')
    p.mount()
    assert p.volume("c")["kind"] == "origin"
    dio_write(p.mnt / "c", BS, b"o" * BS)
    p.unmount()
    p.cfg.write_text(cache_cfg)
    mount_cache(p)
    assert "mode" in cstat(p)                    # the cache has the name now
    assert dio_read(p.mnt / "c", BS, BS) == b"o" * BS
    p.unmount()
