# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures of the integration suite.

Offline tools (thinfs check / dump): `thinfs_bin`, `run_thinfs`,
`restored_image`.  Add fixtures for other parts in their own section.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Sanitizer builds exit with this (scripts/test.sh sets ASAN_OPTIONS/UBSAN_OPTIONS).
SANITIZER_EXIT = 86
SANITIZER_MARKS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer",
                   "runtime error:")


# ---- offline tools ---------------------------------------------------------

@pytest.fixture(scope="session")
def thinfs_bin():
    """The thinfs tool under test: $THINFS_BIN, else build/tools/thinfs."""
    path = Path(os.environ.get("THINFS_BIN", REPO_ROOT / "build/tools/thinfs"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"thinfs tool not found at {path} (build it, or set THINFS_BIN)")
    return path


@pytest.fixture(scope="session")
def run_thinfs(thinfs_bin):
    """run_thinfs(*args, ok=(0,)) -> CompletedProcess; fails the test on a
    crash, a sanitizer report or a hang, and on an exit status not in ok."""
    def run(*args, ok=(0,), timeout=300):
        p = subprocess.run([str(thinfs_bin), *map(str, args)], capture_output=True,
                           text=True, errors="replace", timeout=timeout)
        out = p.stdout + p.stderr
        assert p.returncode >= 0, f"thinfs {args} killed by signal {-p.returncode}\n{out}"
        assert p.returncode != SANITIZER_EXIT and not any(m in out for m in SANITIZER_MARKS), \
            f"sanitizer report from thinfs {args}:\n{out}"
        if ok is not None:
            assert p.returncode in ok, f"thinfs {args} exited {p.returncode}\n{out}"
        return p
    return run


@pytest.fixture(scope="session")
def thin_tools():
    """thin-provisioning-tools 0.9.0, the reference implementation."""
    for tool in ("thin_restore", "thin_check", "thin_dump"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")


@pytest.fixture
def restored_image(tmp_path, thin_tools):
    """restored_image(xml, size=8 MiB, name=...) -> path of a sparse metadata
    file written by thin_restore from xml."""
    counter = [0]

    def make(xml, size=8 << 20, name=None):
        counter[0] += 1
        name = name or f"meta{counter[0]}"
        xml_path = tmp_path / f"{name}.xml"
        img = tmp_path / f"{name}.bin"
        xml_path.write_text(xml)
        with open(img, "wb") as f:
            f.truncate(size)
        p = subprocess.run(["thin_restore", "-i", str(xml_path), "-o", str(img)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"thin_restore failed:\n{p.stdout}\n{p.stderr}"
        return img
    return make
