#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Commit stalls (issue 10): latency of I/O while the periodic commit runs.
# Two fio jobs at once on one fresh thinfs pool (default settings,
# commit_interval 1s):
#   alloc   4 KiB random writes, libaio QD16, O_DIRECT, --norandommap over
#           a VOL_GIB volume nobody wrote yet: nearly every write allocates
#           a block and inserts a mapping (a VM filling a fresh disk)
#   mapped  4 KiB random reads and overwrites (50/50), libaio QD4, O_DIRECT,
#           of a MAPPED_MIB volume written whole beforehand: no allocation
# and prints p50 / p99 / p99.9 / max completion latency of each, with the
# load average.
#
#     sudo bench/run-commit-stall.sh                  # this working tree
#     sudo BENCH_REV=<commit> bench/run-commit-stall.sh   # a clean export
#
# Environment: WORK=/var/tmp/thinfs-bench-stall, RUNTIME=30, VOL_GIB=24,
# MAPPED_MIB=256, OUT=$WORK/results-<date>.  Builds a release build in
# build-bench-stall/ (build-bench-stall-rev/ for BENCH_REV).  Signals only
# the daemon it started, unmounts only its own mountpoint.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-stall}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
: "${RUNTIME:=30}"
: "${VOL_GIB:=24}"
: "${MAPPED_MIB:=256}"

if ((EUID != 0)); then
	echo "run-commit-stall: needs root (mount, drop_caches)" >&2
	exit 1
fi
mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"

pool_build stall || { log "build failed"; exit 1; }
pool_start $((VOL_GIB + 1)) || exit 1

truncate -s "${VOL_GIB}G" "$MNT/alloc"
truncate -s "${MAPPED_MIB}M" "$MNT/mapped"
dd if=/dev/urandom of="$MNT/mapped" bs=1M count="$MAPPED_MIB" oflag=direct conv=fsync status=none
sync
echo 3 >/proc/sys/vm/drop_caches

cat >"$OUT/stall.fio" <<EOF
[global]
ioengine=libaio
direct=1
bs=4k
time_based=1
runtime=$RUNTIME
group_reporting=0
percentile_list=50:99:99.9

[alloc]
filename=$MNT/alloc
rw=randwrite
iodepth=16
norandommap=1
randrepeat=0

[mapped]
filename=$MNT/mapped
rw=randrw
rwmixread=50
iodepth=4
randrepeat=0
EOF

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
log "thinfs $VERSION; load before: $load_before"
fio --output-format=json --output="$OUT/stall.json" "$OUT/stall.fio" || { log "fio failed"; exit 1; }
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
log "load after: $load_after"

python3 - "$OUT/stall.json" "$VERSION" "$load_before" "$load_after" <<'EOF' | tee "$OUT/table.md"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"thinfs {sys.argv[2]}; load average before {sys.argv[3]}, after {sys.argv[4]}")
print()
print("| job | op | IOPS | p50 | p99 | p99.9 | max |")
print("|---|---|---|---|---|---|---|")
def ms(ns):
    return f"{ns / 1e6:.2f} ms"
for j in d["jobs"]:
    for op in ("read", "write"):
        s = j[op]
        if not s["total_ios"]:
            continue
        p = s["clat_ns"]["percentile"]
        print(f"| {j['jobname']} | {op} | {s['iops']:.0f} | {ms(p['50.000000'])} | "
              f"{ms(p['99.000000'])} | {ms(p['99.900000'])} | {ms(s['clat_ns']['max'])} |")
EOF
