#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Instant clones (issue 13): copy_file_range of a fully mapped VOL_GIB
# volume into another volume of the same pool.  Target: under a second,
# and no data block allocated.  The source is mapped with fallocate, which
# on a data file maps blocks without writing them (free blocks read as
# zeros), so making it costs metadata only; a few blocks of it are then
# written with a pattern that the copy must carry.  Prints, as a markdown
# table: the time to map the source, the copy_file_range calls and their
# time, the fsync of the destination after it (the commit of the new
# mappings), used_blocks before and after, and the load average; then
# thin_check of the metadata, unmounted.
#
#     sudo bench/run-clone.sh                  # this working tree
#     sudo BENCH_REV=<commit> bench/run-clone.sh
#
# Environment: WORK=/var/tmp/thinfs-bench-clone, VOL_GIB=8,
# OUT=$WORK/results-<date>.  Builds a release build in build-bench-clone/
# (build-bench-clone-rev/ for BENCH_REV).  Signals only the daemon it
# started, unmounts only its own mountpoint.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-clone}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
: "${VOL_GIB:=8}"

if ((EUID != 0)); then
	echo "run-clone: needs root (mount)" >&2
	exit 1
fi
mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"

pool_build clone || { log "build failed"; exit 1; }
pool_start $((VOL_GIB + 1)) || exit 1

log "thinfs $VERSION; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$MNT" "$VOL_GIB" "$ctl" "$VERSION" <<'EOF' | tee "$OUT/table.md"
import json, os, random, subprocess, sys, time

mnt, gib, ctl, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
size, bs = gib << 30, 64 << 10
src, dst = os.path.join(mnt, "src"), os.path.join(mnt, "dst")


def used():
    st = json.loads(subprocess.run([ctl, mnt, "status", "--json"], check=True,
                                   capture_output=True, text=True).stdout)
    return st["pool"]["data"]["used_blocks"]


# The source: every block mapped, a few written with a pattern.
fd = os.open(src, os.O_CREAT | os.O_RDWR, 0o644)
t = time.monotonic()
os.posix_fallocate(fd, 0, size)
os.fsync(fd)
t_map = time.monotonic() - t
marks = sorted(random.Random(1).sample(range(size // bs), 64))
for b in marks:
    os.pwrite(fd, random.Random(b).randbytes(4096), b * bs + 100)
os.fsync(fd)
os.close(fd)
u0 = used()
assert u0 == size // bs, f"used_blocks {u0}, expected {size // bs}"

fi = os.open(src, os.O_RDONLY)
fo = os.open(dst, os.O_CREAT | os.O_RDWR, 0o644)
os.ftruncate(fo, size)
calls, done = 0, 0
t = time.monotonic()
while done < size:
    n = os.copy_file_range(fi, fo, size - done, done, done)
    assert n > 0, f"copy_file_range returned {n} at {done}"
    done += n
    calls += 1
t_copy = time.monotonic() - t
t = time.monotonic()
os.fsync(fo)
t_sync = time.monotonic() - t
u1 = used()
for b in marks:
    assert os.pread(fo, 4096, b * bs + 100) == random.Random(b).randbytes(4096), f"block {b}"
os.close(fi)
os.close(fo)

load = open("/proc/loadavg").read().split()[:3]
print(f"thinfs {version}; {gib} GiB volume, block_size 64 KiB ({size // bs} blocks); "
      f"load average {' '.join(load)}")
print()
print("| step | time | data blocks used |")
print("|---|---|---|")
print(f"| fallocate the source (maps every block, writes none) + fsync | {t_map:.2f} s | {u0} |")
print(f"| copy_file_range, {calls} calls | {t_copy:.3f} s | {u1} ({u1 - u0:+d}) |")
print(f"| fsync of the destination (commit) | {t_sync:.3f} s | |")
EOF
rc=${PIPESTATUS[0]}
log "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
# The reference counts of 2 x VOL_GIB of mappings, checked offline.
fusermount3 -u "$MNT" && wait "$T_PID"
T_PID=""
if command -v thin_check >/dev/null; then
	if thin_check -q "$WORK/pool/meta.img"; then
		echo "thin_check: clean" | tee -a "$OUT/table.md"
	else
		echo "thin_check: FAILED" | tee -a "$OUT/table.md"
		rc=1
	fi
fi
exit "$rc"
