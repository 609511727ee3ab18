# SPDX-License-Identifier: GPL-2.0-or-later
"""Helpers of the daemon tests (test_daemon_*.py): volumes as files."""
import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import threading

import pytest

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB          # the default block_size

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, off, length):
    """fallocate(2) itself (os.posix_fallocate may fall back to writing)."""
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode={mode:#x}): {os.strerror(e)}")


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def create(path, size=0, mode=0o644):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        if size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def write_at(path, off, data, fsync=True):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < n:
            chunk = os.pread(fd, n - len(out), off + len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def du(path):
    """Bytes allocated (st_blocks * 512), what du shows."""
    return os.stat(path).st_blocks * 512


def aligned(n):
    """A page-aligned buffer for O_DIRECT."""
    return mmap.mmap(-1, n)


def expect_errno(codes, fn, *args):
    """fn(*args) must fail with one of codes (an errno or a tuple)."""
    codes = codes if isinstance(codes, tuple) else (codes,)
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno in codes, \
        f"{fn.__name__}{args}: errno {errno.errorcode.get(ei.value.errno)}, " \
        f"expected {[errno.errorcode[c] for c in codes]}"
    return ei.value


def wait_for(pred, timeout=10, step=0.1):
    """Poll pred() until true (bounded wait for asynchronous effects)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def bounded(fn, *args, timeout=10, what=None):
    """fn(*args) in a thread; fails the test if it is still blocked after
    timeout (whatever held it, a resume or a resize, releases the thread
    later, or the daemon's end does)."""
    res = {}

    def run():
        try:
            res["v"] = fn(*args)
        except BaseException as e:      # noqa: B902 - re-raised below
            res["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what or getattr(fn, '__name__', fn)} still blocked after "
                             f"{timeout}s")
    if "e" in res:
        raise res["e"]
    return res.get("v")


def read_direct(path, off, n):
    """An O_DIRECT read: reaches the daemon whatever the page cache holds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(n)
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def write_direct(path, off, data):
    """An O_DIRECT pwrite of data at off (one FUSE request up to max_write)."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = aligned(len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)
