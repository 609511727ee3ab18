# SPDX-License-Identifier: GPL-2.0-or-later
"""send/receive (issue 13): `thinfs-ctl MNT send [--from FROM] TO` piped
into `thinfs-ctl MNT receive NAME [--base BASE]` makes a volume identical
to TO, byte for byte, for full streams, chains of incrementals and pools of
other block sizes; a cut, corrupted or mismatched stream, and a receive
killed or crashed half way, leave nothing behind.  The daemon writes the
stream itself (into the client's stdout, passed over the socket); the old
path through the mount (--through-mount) gives the same bytes."""
import errno
import json
import os
import pty
import random
import socket
import struct
import subprocess

from ctl_socket import ctl_socket_path
from daemon_util import (BS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KiB, MiB, create,
                         fallocate, pattern, read_at, wait_for, write_at)
from test_clone import mappings
from thin_image import crc32c_raw

HEADER = 96


def send_to_file(p, path, *args, ok=(0,)):
    with open(path, "wb") as f:
        r = subprocess.run([str(p.ctl_bin), str(p.mnt), "send", *map(str, args)], stdout=f,
                           stderr=subprocess.PIPE, timeout=120)
    assert r.returncode in ok, r.stderr.decode()
    return r


def receive_file(p, path, name, *args, ok=(0,)):
    with open(path, "rb") as f:
        r = subprocess.run([str(p.ctl_bin), str(p.mnt), "receive", name, *args], stdin=f,
                           stderr=subprocess.PIPE, timeout=120)
    assert r.returncode in ok, r.stderr.decode()
    return r.stderr.decode()


def pipe(src, send_args, dst, recv_args):
    """send | receive through a pipe, as over ssh; both must succeed, quietly."""
    s = subprocess.Popen([str(src.ctl_bin), str(src.mnt), "send", *send_args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = subprocess.run([str(dst.ctl_bin), str(dst.mnt), "receive", *recv_args], stdin=s.stdout,
                       stderr=subprocess.PIPE, timeout=120)
    s.stdout.close()
    serr = s.stderr.read()
    assert s.wait(timeout=120) == 0, serr.decode()
    assert r.returncode == 0, r.stderr.decode()
    # Piped stderr: no progress lines.
    assert serr == b"" and r.stderr == b""


def entries(p):
    """Every name at the root, the hidden ones included, and every volume the daemon has."""
    return sorted(os.listdir(p.mnt)), sorted(v["name"] for v in p.volumes())


def scribble(path, size, seed, n=12):
    """Random writes of odd sizes and offsets, and a few hole punches."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(n):
            off = rnd.randrange(size)
            length = min(rnd.choice([1, 4 * KiB, BS, 3 * BS + 17, 300 * KiB]), size - off)
            if i % 4 == 3:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
            else:
                os.pwrite(fd, pattern(seed * 100 + i, length), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def same(a, b):
    assert os.path.getsize(a) == os.path.getsize(b)
    assert a.read_bytes() == b.read_bytes(), f"{a} and {b} differ"


def test_full_send_and_three_incrementals_give_identical_volumes(pool):
    p = pool()
    size = 6 * MiB
    create(p.mnt / "vm1", size)
    scribble(p.mnt / "vm1", size, 1, n=20)
    os.mkdir(p.mnt / ".snapshots" / "n0")
    pipe(p, ["n0/vm1"], p, ["r0"])
    same(p.mnt / ".snapshots" / "n0" / "vm1", p.mnt / "r0")
    for k in (1, 2, 3):
        if k == 2:
            os.truncate(p.mnt / "vm1", size - 2 * BS - 1)     # shrinks: the size travels
        if k == 3:
            os.truncate(p.mnt / "vm1", size + 3 * BS + 5)     # and grows past a cut block
        cur = os.path.getsize(p.mnt / "vm1")
        scribble(p.mnt / "vm1", cur, 10 + k)
        os.mkdir(p.mnt / ".snapshots" / f"n{k}")
        pipe(p, ["--from", f"n{k - 1}/vm1", f"n{k}/vm1"], p, [f"r{k}", "--base", f"r{k - 1}"])
        same(p.mnt / ".snapshots" / f"n{k}" / "vm1", p.mnt / f"r{k}")
    # An incremental writes only the change: r3 shares the rest with r2.
    assert p.volume("r3")["exclusive_blocks"] < p.volume("r3")["mapped_blocks"]
    # The earlier ones are untouched by the later receives.
    for k in (0, 1, 2):
        same(p.mnt / ".snapshots" / f"n{k}" / "vm1", p.mnt / f"r{k}")
    assert [n for n in os.listdir(p.mnt) if n.startswith(".")] == [".snapshots"]


def test_send_of_a_live_volume_reads_a_snapshot_and_leaves_none(pool, tmp_path):
    p = pool()
    create(p.mnt / "vm1", 2 * MiB)
    write_at(p.mnt / "vm1", 123, pattern(5, 200 * KiB))
    before = entries(p)
    pipe(p, ["vm1"], p, ["copy"])
    same(p.mnt / "vm1", p.mnt / "copy")
    names, vols = entries(p)
    assert names == sorted(before[0] + ["copy"]) and vols == sorted(before[1] + ["copy"])
    # Its identity is the vanished snapshot's: nothing can be based on it by mistake.
    os.mkdir(p.mnt / ".snapshots" / "g")
    send_to_file(p, tmp_path / "inc", "--from", "vm1", "g/vm1")
    err = receive_file(p, tmp_path / "inc", "x", "--base", "copy", ok=(1,))
    assert "'copy' is not the stream's base" in err


def test_send_receive_across_block_sizes(pool):
    a = pool("a", block_size=64 * KiB)
    b = pool("b", block_size=256 * KiB)
    size = 4 * MiB + 7 * KiB
    create(a.mnt / "vm", size)
    write_at(a.mnt / "vm", 0, pattern(1, size))
    os.mkdir(a.mnt / ".snapshots" / "s1")
    pipe(a, ["s1/vm"], b, ["vm"])
    same(a.mnt / ".snapshots" / "s1" / "vm", b.mnt / "vm")
    # One 64 KiB block unmapped inside a 256 KiB one, and a write across two of them.
    fd = os.open(a.mnt / "vm", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * BS, BS)
        os.pwrite(fd, pattern(2, 100 * KiB), 3 * 256 * KiB - 50 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.mkdir(a.mnt / ".snapshots" / "s2")
    pipe(a, ["--from", "s1/vm", "s2/vm"], b, ["vm2", "--base", "vm"])
    same(a.mnt / ".snapshots" / "s2" / "vm", b.mnt / "vm2")
    same(a.mnt / ".snapshots" / "s1" / "vm", b.mnt / "vm")
    # And back into the pool of smaller blocks.
    os.mkdir(b.mnt / ".snapshots" / "t")
    pipe(b, ["t/vm2"], a, ["back"])
    same(b.mnt / "vm2", a.mnt / "back")


def streams(p, tmp_path):
    """A full stream of n1/vm1 received as base, and an incremental one to n2/vm1."""
    create(p.mnt / "vm1", 3 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(1, 3 * MiB))
    os.mkdir(p.mnt / ".snapshots" / "n1")
    write_at(p.mnt / "vm1", MiB + 5, pattern(2, 2 * BS))
    fd = os.open(p.mnt / "vm1", os.O_RDWR)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * MiB, BS)
    os.close(fd)
    os.mkdir(p.mnt / ".snapshots" / "n2")
    full, inc = tmp_path / "full", tmp_path / "inc"
    send_to_file(p, full, "n1/vm1")
    send_to_file(p, inc, "--from", "n1/vm1", "n2/vm1")
    receive_file(p, full, "base")
    return full, inc


def test_truncated_stream_is_refused_and_nothing_is_made(pool, tmp_path):
    p = pool()
    full, inc = streams(p, tmp_path)
    before = entries(p)
    for src, args in ((full, []), (inc, ["--base", "base"])):
        data = src.read_bytes()
        for cut in (0, 10, HEADER, HEADER + 30, len(data) // 2, len(data) - 4, len(data) - 1):
            cut_file = tmp_path / "cut"
            cut_file.write_bytes(data[:cut])
            err = receive_file(p, cut_file, "new", *args, ok=(1,))
            assert "nothing was made" in err, err
            assert "ends early" in err, err
            assert entries(p) == before, f"cut at {cut}"
    # Trailing bytes after the end are refused too.
    (tmp_path / "long").write_bytes(full.read_bytes() + b"x")
    err = receive_file(p, tmp_path / "long", "new", ok=(1,))
    assert "after the stream's end" in err and entries(p) == before
    receive_file(p, inc, "new", "--base", "base")
    same(p.mnt / ".snapshots" / "n2" / "vm1", p.mnt / "new")


def test_corrupted_stream_is_refused_and_nothing_is_made(pool, tmp_path):
    p = pool()
    full, inc = streams(p, tmp_path)
    before = entries(p)
    for src, args in ((full, []), (inc, ["--base", "base"])):
        data = src.read_bytes()
        for at in (3, 20, 70, HEADER + 2, HEADER + 12, HEADER + 24 + 1000, len(data) // 2,
                   len(data) - 30, len(data) - 2):
            bad = bytearray(data)
            bad[at] ^= 0x40
            (tmp_path / "bad").write_bytes(bytes(bad))
            err = receive_file(p, tmp_path / "bad", "new", *args, ok=(1,))
            assert "nothing was made" in err, err
            assert any(w in err for w in ("corrupt", "bad magic", "version", "header length",
                                          "is not the stream's base", "incremental",
                                          "ends early")), err
            assert entries(p) == before, f"byte {at} flipped"


def test_receive_refuses_a_mismatched_or_missing_base(pool, tmp_path):
    p = pool()
    full, inc = streams(p, tmp_path)
    create(p.mnt / "other", MiB)
    before = entries(p)
    err = receive_file(p, inc, "new", "--base", "other", ok=(1,))
    assert "'other' is not the stream's base" in err and "not a volume any stream" in err
    receive_file(p, full, "base2")
    before = entries(p)
    # base2 came from the same stream as base: the same identity, so it is a base too;
    # n1/vm1 itself is the volume the stream was made from.
    receive_file(p, inc, "new1", "--base", "base2")
    receive_file(p, inc, "new2", "--base", "n1/vm1")
    same(p.mnt / "new1", p.mnt / "new2")
    err = receive_file(p, inc, "new3", "--base", "new1", ok=(1,))
    assert "'new1' is not the stream's base: the stream was made from" in err
    err = receive_file(p, inc, "new3", ok=(1,))
    assert "the stream is incremental" in err
    err = receive_file(p, full, "new3", "--base", "base", ok=(1,))
    assert "the stream is a full one" in err
    err = receive_file(p, inc, "new3", "--base", "nosuch", ok=(1,))
    assert "no volume named 'nosuch'" in err
    assert entries(p)[1] == sorted(before[1] + ["new1", "new2"])


def test_receive_into_an_existing_name_is_refused(pool, tmp_path):
    p = pool()
    full, _ = streams(p, tmp_path)
    before = (p.mnt / "base").read_bytes()
    names = entries(p)
    for name in ("base", "vm1", ".snapshots"):
        err = receive_file(p, full, name, ok=(1,))
        assert "exists already" in err, err
    err = receive_file(p, full, "a/b", ok=(1,))
    assert "bad name" in err
    assert entries(p) == names and (p.mnt / "base").read_bytes() == before


def test_receive_killed_half_way_leaves_nothing(pool, tmp_path):
    p = pool()
    full, _ = streams(p, tmp_path)
    before = entries(p)
    data = full.read_bytes()
    r = subprocess.Popen([str(p.ctl_bin), str(p.mnt), "receive", "new"], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    r.stdin.write(data[:len(data) // 2])
    r.stdin.flush()
    wait_for(lambda: any(n.startswith(".receive.") for n in os.listdir(p.mnt)))
    r.kill()
    r.wait()
    r.stdin.close()
    r.stderr.close()
    wait_for(lambda: entries(p) == before)
    assert entries(p) == before


def test_crash_during_receive_is_cleaned_at_the_next_mount(pool, tmp_path):
    p = pool()
    full, inc = streams(p, tmp_path)
    before = entries(p)
    data = inc.read_bytes()
    r = subprocess.Popen([str(p.ctl_bin), str(p.mnt), "receive", "new", "--base", "base"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    r.stdin.write(data[:len(data) // 2])
    r.stdin.flush()
    wait_for(lambda: any(n.startswith(".receive.") for n in os.listdir(p.mnt)))
    p.kill9()
    r.kill()
    r.wait()
    r.stdin.close()
    r.stderr.close()
    p.mount()
    assert entries(p) == before
    events = p.ctl("events").stdout
    assert "left by a send or receive cut short before this mount: deleted" in events
    receive_file(p, inc, "new", "--base", "base")
    same(p.mnt / ".snapshots" / "n2" / "vm1", p.mnt / "new")


def test_progress_shows_on_a_terminal(pool, tmp_path):
    p = pool()
    create(p.mnt / "vm1", 2 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(3, 2 * MiB))
    os.mkdir(p.mnt / ".snapshots" / "n")
    out = tmp_path / "s"
    for cmd, stdin, stdout in ((["send", "n/vm1"], None, out), (["receive", "c"], out, None)):
        master, slave = pty.openpty()
        with open(stdout or os.devnull, "wb") as so, open(stdin or os.devnull, "rb") as si:
            r = subprocess.run([str(p.ctl_bin), str(p.mnt), *cmd], stdin=si, stdout=so,
                               stderr=slave, timeout=60)
        os.close(slave)
        text = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
        os.close(master)
        assert r.returncode == 0, text
        assert f"{cmd[0]}: 2.0 of 2.0 MiB (".encode() in text and b"MiB/s)" in text, text
    same(p.mnt / "vm1", p.mnt / "c")


def daemon_stream(p, path, *args):
    """The daemon's path spoken by hand: send --stream, then a file's descriptor
    over the socket (SCM_RIGHTS); the daemon writes the whole stream into it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, open(path, "wb") as f:
        s.settimeout(60)
        s.connect(ctl_socket_path(p.mnt))
        s.sendall(json.dumps({"cmd": "send", "args": ["--stream", *args]}).encode() + b"\n")
        r = s.makefile("rb")
        first = json.loads(r.readline())
        assert first["ok"] and first["json"]["stream"] is True, first
        socket.send_fds(s, [b"F"], [f.fileno()])
        last = json.loads(r.readline())
    assert last["ok"] and last["done"], last
    return last["json"]


def test_the_daemon_and_the_mount_path_give_the_same_stream(pool, tmp_path):
    p = pool()
    size = 5 * MiB + 3 * BS + 100                     # not a whole number of blocks
    create(p.mnt / "vm1", size)
    write_at(p.mnt / "vm1", 0, pattern(1, size))
    write_at(p.mnt / "vm1", 2 * MiB, bytes(3 * BS))   # mapped zeros: a ZERO record
    # vm2's blocks written in a shuffled order: its data blocks lie out of order on the device.
    create(p.mnt / "vm2", 64 * BS)
    order = list(range(64))
    random.Random(3).shuffle(order)
    for b in order:
        write_at(p.mnt / "vm2", b * BS, pattern(100 + b, BS))
    os.mkdir(p.mnt / ".snapshots" / "n1")
    scribble(p.mnt / "vm1", size, 7, n=30)
    for b in order[:20]:
        write_at(p.mnt / "vm2", b * BS + 5, pattern(300 + b, 2 * BS))
    os.mkdir(p.mnt / ".snapshots" / "n2")
    old, new, raw = tmp_path / "old", tmp_path / "new", tmp_path / "raw"
    for args in (["n1/vm1"], ["--from", "n1/vm1", "n2/vm1"], ["n2/vm1"], ["n1/vm2"],
                 ["--from", "n1/vm2", "n2/vm2"]):
        send_to_file(p, old, "--through-mount", *args)
        send_to_file(p, new, *args)
        stats = daemon_stream(p, raw, *args)
        assert old.read_bytes() == new.read_bytes() == raw.read_bytes(), args
        assert stats["bytes"] == len(raw.read_bytes())
    send_to_file(p, new, "n2/vm2")
    receive_file(p, new, "copy")
    same(p.mnt / ".snapshots" / "n2" / "vm2", p.mnt / "copy")


def test_a_send_of_many_windows_read_out_of_order_gives_the_same_stream(pool, tmp_path):
    """A stream of several read windows (16 MiB each, more than the three in
    memory, two readers), whose blocks lie shuffled on the data device so
    that each window's reads complete out of order, 64 KiB ones and 1 MiB
    ones (runs), more of them than the 2 MiB kept in flight: the daemon's
    stream is the mount path's, byte for byte, and receives as the volume."""
    p = pool()
    nblocks = 1100                                     # 68.75 MiB: 5 windows
    create(p.mnt / "vm", nblocks * BS)
    order = list(range(nblocks))
    random.Random(11).shuffle(order)
    # Half the blocks in shuffled order, the rest in runs of 48 (3 MiB) in order.
    for b in order[:nblocks // 2]:
        write_at(p.mnt / "vm", b * BS, pattern(b, BS), fsync=False)
    rest = sorted(order[nblocks // 2:])
    for i in range(0, len(rest), 48):
        for b in rest[i:i + 48]:
            write_at(p.mnt / "vm", b * BS, pattern(b, BS), fsync=False)
    os.mkdir(p.mnt / ".snapshots" / "n1")
    for b in order[::3]:
        write_at(p.mnt / "vm", b * BS + 7, pattern(5000 + b, BS - 7), fsync=False)
    os.mkdir(p.mnt / ".snapshots" / "n2")
    old, new = tmp_path / "old", tmp_path / "new"
    for args in (["n1/vm"], ["--from", "n1/vm", "n2/vm"]):
        send_to_file(p, old, "--through-mount", *args)
        send_to_file(p, new, *args)
        assert old.read_bytes() == new.read_bytes(), args
    send_to_file(p, new, "n1/vm")
    receive_file(p, new, "copy1")
    send_to_file(p, new, "--from", "n1/vm", "n2/vm")
    receive_file(p, new, "copy2", "--base", "copy1")
    same(p.mnt / ".snapshots" / "n2" / "vm", p.mnt / "copy2")


def test_a_send_in_progress_keeps_its_snapshot_whole(pool, tmp_path):
    p = pool()
    # More than the daemon's three 16 MiB windows: the last is read after the rewrite below.
    size = 56 * MiB
    create(p.mnt / "vm1", size)
    write_at(p.mnt / "vm1", 0, pattern(4, size))
    g = p.mnt / ".snapshots" / "g"
    os.mkdir(g)
    expected = (g / "vm1").read_bytes()
    # A pipe read only a little: the daemon waits, mid-stream, for room in it.
    s = subprocess.Popen([str(p.ctl_bin), str(p.mnt), "send", "g/vm1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    head = s.stdout.read(HEADER + 24)
    # The daemon writes it: thinfs-ctl has no file of the mount open (through the mount it would).
    fds = os.listdir(f"/proc/{s.pid}/fd")
    assert not [f for f in fds if os.readlink(f"/proc/{s.pid}/fd/{f}").startswith(str(p.mnt))]
    # The group cannot go while it is sent; rewriting its origin moves the origin's blocks.
    try:
        os.rmdir(g)
        raise AssertionError("rmdir of a group being sent succeeded")
    except OSError as e:
        assert e.errno == errno.EBUSY
    r = p.ctl("delete", ".snapshots/g", ok=(1,))
    assert "a send is reading it" in r.stderr
    write_at(p.mnt / "vm1", 0, pattern(5, size))
    stream = head + s.stdout.read()
    assert s.wait(timeout=60) == 0, s.stderr.read().decode()
    s.stderr.close()
    (tmp_path / "s").write_bytes(stream)
    receive_file(p, tmp_path / "s", "copy")
    assert (p.mnt / "copy").read_bytes() == expected
    os.rmdir(g)


def test_send_killed_half_way_leaves_nothing(pool):
    p = pool()
    create(p.mnt / "vm1", 8 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(6, 8 * MiB))
    before = entries(p)
    s = subprocess.Popen([str(p.ctl_bin), str(p.mnt), "send", "vm1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    s.stdout.read(HEADER)
    assert any(n.startswith(".send.") for n in entries(p)[1])
    s.kill()
    s.wait()
    s.stdout.close()
    s.stderr.close()
    wait_for(lambda: entries(p) == before)
    # A reader that stops early: the daemon's write fails, it says so and cleans up.
    s = subprocess.Popen([str(p.ctl_bin), str(p.mnt), "send", "vm1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    s.stdout.read(HEADER)
    s.stdout.close()
    assert s.wait(timeout=60) == 1
    assert b"send: writing the stream: Broken pipe" in s.stderr.read()
    s.stderr.close()
    wait_for(lambda: entries(p) == before)
    # The daemon is none the worse: the next send works.
    with open(os.devnull, "wb") as null:
        assert subprocess.run([str(p.ctl_bin), str(p.mnt), "send", "vm1"], stdout=null,
                              timeout=60).returncode == 0


def test_send_reports_a_data_read_error(pool, tmp_path):
    p = pool(mount=False)
    p.cfg.write_text(p.cfg.read_text() + "[fault]\nallow = yes\n")
    p.mount("--allow-faults")
    create(p.mnt / "vm1", 2 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(7, 2 * MiB))
    os.mkdir(p.mnt / ".snapshots" / "g")
    p.expect_log(r"thin device \d+: reading data blocks failed: Input/output error")
    p.ctl("fault", "data", "read", "error")
    r = send_to_file(p, tmp_path / "s", "g/vm1", ok=(1,))
    p.ctl("fault", "data", "read", "ok")
    assert "send: reading the volume at byte 0: Input/output error" in r.stderr.decode()
    send_to_file(p, tmp_path / "s", "g/vm1")
    receive_file(p, tmp_path / "s", "copy")
    same(p.mnt / ".snapshots" / "g" / "vm1", p.mnt / "copy")


def test_send_on_a_read_only_mount_reads_the_volume_itself(pool, tmp_path):
    p = pool()
    create(p.mnt / "vm1", 3 * MiB + 5)
    write_at(p.mnt / "vm1", 7, pattern(8, 3 * MiB - 7))
    # Named as FROM once, vm1 has an identity that lasts: both streams carry it.
    os.mkdir(p.mnt / ".snapshots" / "g")
    send_to_file(p, tmp_path / "a", "--from", "vm1", "g/vm1")
    p.unmount()
    p.mount("-o", "ro")
    before = entries(p)
    send_to_file(p, tmp_path / "a", "vm1")
    send_to_file(p, tmp_path / "b", "--through-mount", "vm1")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert entries(p) == before
    p.unmount()
    p.mount()
    receive_file(p, tmp_path / "a", "copy")
    same(p.mnt / "vm1", p.mnt / "copy")


# ---- stream version 2: records in the data device's order ----

def records(data):
    """The stream's version and its (type, offset, length) records before END, checked whole."""
    version, = struct.unpack_from("<I", data, 8)
    at, out = HEADER, []
    while True:
        kind, _, off, length = struct.unpack_from("<IIQQ", data, at)
        at += 24
        if kind == 3:
            assert at + 4 == len(data)
            return version, out
        out.append((kind, off, length))
        at += length if kind == 1 else 0


def covered(recs):
    """The records' ranges, sorted: none overlaps."""
    spans = sorted((off, off + length) for _, off, length in recs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "records overlap"
    return spans


def shuffled_volume(p, name, nblocks, seed):
    """A volume whose blocks were written in a random order: its data lies shuffled on the device."""
    create(p.mnt / name, nblocks * BS)
    order = list(range(nblocks))
    random.Random(seed).shuffle(order)
    for b in order:
        write_at(p.mnt / name, b * BS, pattern(seed * 1000 + b, BS), fsync=False)
    return order


def rewrite_scattered(p, name, blocks, seed):
    """Whole blocks rewritten in the order given (a random one), as the bench's scattered change."""
    for b in blocks:
        write_at(p.mnt / name, b * BS, pattern(seed * 1000 + b, BS), fsync=False)


def in_device_order(recs, where):
    """The DATA records' blocks, by where they lie on the data device (where: vblock -> data
    block): ascending."""
    blocks = [where[off // BS] for kind, off, _ in recs if kind == 1]
    assert blocks == sorted(blocks), blocks


def test_v2_streams_of_random_order_writes_come_in_device_order_and_receive_identical(pool,
                                                                                      tmp_path):
    a, b = pool("a"), pool("b")
    nblocks = 96
    shuffled_volume(a, "vm", nblocks, 1)
    os.mkdir(a.mnt / ".snapshots" / "n0")
    # vm's mappings as committed with each snapshot: the snapshot's.
    where = [mappings(a, "vm")]
    rnd = random.Random(2)
    for k in (1, 2, 3):
        # A tenth of the blocks rewritten in a random order, and one block unmapped.
        rewrite_scattered(a, "vm", rnd.sample(range(nblocks), nblocks // 10), 10 + k)
        fd = os.open(a.mnt / "vm", os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rnd.randrange(nblocks) * BS,
                      BS)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.mkdir(a.mnt / ".snapshots" / f"n{k}")
        where.append(mappings(a, "vm"))
    full = tmp_path / "full"
    send_to_file(a, full, "n0/vm")
    version, recs = records(full.read_bytes())
    assert version == 2
    # Every block once, as 64 KiB records (no two neighbours in the volume lie together on
    # the device), not in the volume's order: the order they were written in.
    assert covered(recs) == [(x * BS, (x + 1) * BS) for x in range(nblocks)]
    assert [off for _, off, _ in recs] != sorted(off for _, off, _ in recs)
    in_device_order(recs, where[0])
    receive_file(a, full, "r0")
    pipe(a, ["n0/vm"], b, ["r0"])
    same(a.mnt / ".snapshots" / "n0" / "vm", b.mnt / "r0")
    for k in (1, 2, 3):
        inc = tmp_path / f"inc{k}"
        send_to_file(a, inc, "--from", f"n{k - 1}/vm", f"n{k}/vm")
        version, recs = records(inc.read_bytes())
        assert version == 2
        covered(recs)
        assert [off for kind, off, _ in recs if kind == 1] != \
            sorted(off for kind, off, _ in recs if kind == 1)
        in_device_order(recs, where[k])
        receive_file(b, inc, f"r{k}", "--base", f"r{k - 1}")
        same(a.mnt / ".snapshots" / f"n{k}" / "vm", b.mnt / f"r{k}")
    # The earlier ones are untouched by the later receives.
    for k in (0, 1, 2):
        same(a.mnt / ".snapshots" / f"n{k}" / "vm", b.mnt / f"r{k}")


def test_stream_version_1_is_still_made_on_request_and_received(pool, tmp_path):
    p = pool()
    nblocks = 48
    shuffled_volume(p, "vm", nblocks, 3)
    os.mkdir(p.mnt / ".snapshots" / "n1")
    rewrite_scattered(p, "vm", random.Random(4).sample(range(nblocks), 9), 5)
    os.mkdir(p.mnt / ".snapshots" / "n2")
    old, new = tmp_path / "old", tmp_path / "new"
    for args in (["n1/vm"], ["--from", "n1/vm", "n2/vm"]):
        for version in (1, 2):
            ver = [] if version == 2 else ["--stream-version", "1"]
            send_to_file(p, old, "--through-mount", *ver, *args)
            send_to_file(p, new, *ver, *args)
            # Both paths, the same bytes, in either version.
            assert old.read_bytes() == new.read_bytes(), (args, version)
            got, recs = records(new.read_bytes())
            assert got == version
            offs = [off for _, off, _ in recs]
            if version == 1:
                assert offs == sorted(offs)
            else:
                assert offs != sorted(offs)
    send_to_file(p, new, "--stream-version", "1", "n1/vm")
    receive_file(p, new, "c1")
    send_to_file(p, new, "--stream-version", "1", "--from", "n1/vm", "n2/vm")
    receive_file(p, new, "c2", "--base", "c1")
    same(p.mnt / ".snapshots" / "n2" / "vm", p.mnt / "c2")
    # A bad version is refused before anything is asked of the daemon.
    r = subprocess.run([str(p.ctl_bin), str(p.mnt), "send", "--stream-version", "3", "n1/vm"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 2 and b"--stream-version 1|2" in r.stderr


def crafted(version, recs, size=4 * MiB):
    """A stream made by hand: (type, offset, data or length) records, checksums right."""
    h = bytearray(HEADER)
    h[0:8] = b"THINSEND"
    struct.pack_into("<IIQI", h, 8, version, HEADER, size, BS)
    h[48:64] = bytes(range(16))
    struct.pack_into("<Q", h, 64, sum(len(x) for k, _, x in recs if k == 1))
    struct.pack_into("<I", h, 92, crc32c_raw(bytes(h[:92])))
    body, sent = bytes(h), 0
    for kind, off, x in recs:
        if kind == 1:
            body += struct.pack("<IIQQ", 1, 0, off, len(x)) + x
            sent += len(x)
        else:
            body += struct.pack("<IIQQ", 2, 0, off, x)
    body += struct.pack("<IIQQ", 3, 0, sent, len(recs))
    return body + struct.pack("<I", crc32c_raw(body))


def test_overlapping_records_are_refused_and_any_order_is_taken(pool, tmp_path):
    p = pool()
    before = entries(p)
    d = [pattern(40 + i, BS) for i in range(4)]
    f = tmp_path / "s"
    # Out of order, not overlapping, a ZERO last: version 2 takes it (and so does 1, as ever).
    for version in (1, 2):
        f.write_bytes(crafted(version, [(1, 3 * BS, d[0]), (1, 0, d[1]), (1, 2 * BS, d[2]),
                                        (2, BS, BS)]))
        receive_file(p, f, f"ok{version}")
        got = (p.mnt / f"ok{version}").read_bytes()
        assert got[:4 * BS] == d[1] + bytes(BS) + d[2] + d[0] and not any(got[4 * BS:])
    before = entries(p)
    # Overlapping: the later record named by its byte in the stream, nothing made.
    second = HEADER + 24 + BS
    for version in (1, 2):
        for recs, at in (([(1, 2 * BS, d[0]), (1, 2 * BS + 4096, d[1])], second),
                         # The ZERO follows on from the record before it, which is named.
                         ([(1, 2 * BS, d[0]), (1, 0, d[1]), (2, BS, 2 * BS)], second),
                         ([(1, 5 * BS, d[0]), (1, 0, d[1]), (1, BS, d[2]), (1, 5 * BS, d[3])],
                          HEADER + 3 * (24 + BS))):
            f.write_bytes(crafted(version, recs))
            err = receive_file(p, f, "new", ok=(1,))
            assert f"the record at byte {at}, or one following on from it, overlaps" in err, err
            assert "nothing was made" in err
            assert entries(p) == before


def test_streams_with_no_records_are_sent_and_received(pool, tmp_path):
    """An incremental with nothing changed and a full stream of a volume
    with nothing mapped have no records: both versions send and receive
    them (the sender's and receiver's sorts once had no array to work on)."""
    p = pool()
    create(p.mnt / "vm1", 2 * MiB)
    write_at(p.mnt / "vm1", 0, pattern(3, 300 * KiB))
    create(p.mnt / "empty", 1 * MiB)
    os.mkdir(p.mnt / ".snapshots" / "a")
    os.mkdir(p.mnt / ".snapshots" / "b")
    pipe(p, ["a/vm1"], p, ["base"])
    for v in ("1", "2"):
        path = tmp_path / f"nothing-v{v}"
        send_to_file(p, path, "--stream-version", v, "--from", "a/vm1", "b/vm1")
        assert records(path.read_bytes()) == (int(v), [])
        receive_file(p, path, f"inc{v}", "--base", "base")
        same(p.mnt / ".snapshots" / "b" / "vm1", p.mnt / f"inc{v}")
        path = tmp_path / f"empty-v{v}"
        send_to_file(p, path, "--stream-version", v, "b/empty")
        assert records(path.read_bytes()) == (int(v), [])
        receive_file(p, path, f"empty{v}")
        assert os.path.getsize(p.mnt / f"empty{v}") == 1 * MiB
        same(p.mnt / "empty", p.mnt / f"empty{v}")


def test_a_stream_of_more_records_than_one_batch_comes_whole_and_receives(pool, tmp_path):
    """More records than the daemon makes and sorts at once (65,536 a batch):
    65,600 single blocks mapped in FROM at every other block and unmapped in
    TO (a ZERO record each, no data to move), and blocks written in TO
    among them (DATA records) on both sides of the batches' cut. Versions 2
    and 1 have every change once, the mount path gives the same bytes, and
    the incremental receives as TO."""
    p = pool(data_size=6 << 30)
    holes = 65_600
    nblocks = 2 * holes
    create(p.mnt / "vm", nblocks * BS)
    fd = os.open(p.mnt / "vm", os.O_RDWR)
    try:
        for k in range(holes):
            fallocate(fd, 0, 2 * k * BS, BS)              # mapped, nothing written
        os.fsync(fd)
        os.mkdir(p.mnt / ".snapshots" / "n1")
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, nblocks * BS)
        written = sorted(random.Random(9).sample(range(1, nblocks, 2), 40))
        for b in written:
            os.pwrite(fd, pattern(b, 4 * KiB), b * BS + 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.mkdir(p.mnt / ".snapshots" / "n2")
    inc, old, v1 = tmp_path / "inc", tmp_path / "old", tmp_path / "v1"
    send_to_file(p, inc, "--from", "n1/vm", "n2/vm")
    send_to_file(p, old, "--through-mount", "--from", "n1/vm", "n2/vm")
    assert inc.read_bytes() == old.read_bytes()
    zeros = [(2 * k * BS, (2 * k + 1) * BS) for k in range(holes)]
    data = [(b * BS, (b + 1) * BS) for b in written]
    for path, args, version in ((inc, [], 2), (v1, ["--stream-version", "1"], 1)):
        if args:
            send_to_file(p, path, *args, "--from", "n1/vm", "n2/vm")
        got, recs = records(path.read_bytes())
        assert got == version
        assert len(recs) == holes + len(written) > 65_536
        assert covered(recs) == sorted(zeros + data)
        assert sorted((off, off + n) for kind, off, n in recs if kind == 2) == zeros
        if version == 1:
            assert [off for _, off, _ in recs] == sorted(off for _, off, _ in recs)
    receive_file(p, inc, "r2", "--base", "n1/vm")
    assert p.volume("r2")["mapped_blocks"] == len(written)
    want = bytearray(BS)
    for b in written + [0, 2 * (holes // 2), nblocks - 2]:
        want[512:512 + 4 * KiB] = pattern(b, 4 * KiB) if b in written else bytes(4 * KiB)
        assert read_at(p.mnt / "r2", b * BS, BS) == bytes(want), b
        assert read_at(p.mnt / ".snapshots" / "n2" / "vm", b * BS, BS) == bytes(want), b
    assert os.path.getsize(p.mnt / "r2") == nblocks * BS
