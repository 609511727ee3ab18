#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The disk's bound for the 8-snapshot row of run-cow.sh (O8): the bytes an
# origin write with eight snapshots moves, without thinfs.  Per MiB written
# to the origin the daemon reads 1 MiB of the origin, writes 1 MiB into each
# of eight COW files (fallocated ahead, unwritten extents, as a 64 KiB-chunk
# store's are) with an fdatasync of each every SYNC_MIB MiB, and writes
# 1 MiB into the origin: 10 MiB moved.  fio runs those ten streams at once
# (1 MiB, O_DIRECT, libaio QD16 each) over REGION_MIB, and the origin
# equivalent rate is REGION_MIB / the slowest stream's time.  The device's
# flushes are read from /sys/block/DEV/stat.
#
#     bench/run-cow8-bound.sh            (root; run under flock -x)
#
# Environment: WORK=/var/tmp/thinfs-cow8-bound, REGION_MIB=256,
# SYNC_MIBS="2 1 0" (0: no fdatasync), DEV=vda.
set -uo pipefail
WORK=${WORK:-/var/tmp/thinfs-cow8-bound}
: "${REGION_MIB:=256}"
: "${SYNC_MIBS:=2 1 0}"
: "${DEV:=vda}"

if ((EUID != 0)); then
	echo "run-cow8-bound: needs root (drop_caches)" >&2
	exit 1
fi
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
flushes() { awk '{print $16}' "/sys/block/$DEV/stat"; }

for sync in $SYNC_MIBS; do
	rm -f "$WORK"/*.img
	# the origin: written, as run-cow.sh's prefill leaves it
	dd if=/dev/urandom of="$WORK/origin.img" bs=1M count="$REGION_MIB" oflag=direct \
		status=none
	for i in 1 2 3 4 5 6 7 8; do
		truncate -s "$((REGION_MIB + 64))M" "$WORK/cow$i.img"
		fallocate -n -l "${REGION_MIB}M" "$WORK/cow$i.img"
	done
	sync
	echo 3 >/proc/sys/vm/drop_caches
	job=$WORK/job.fio
	{
		printf '[global]\ndirect=1\nioengine=libaio\niodepth=16\nbs=1M\nsize=%sM\n' \
			"$REGION_MIB"
		printf 'allow_file_create=0\nfallocate=none\ngroup_reporting=0\n'
		printf '[rd]\nfilename=%s\nrw=read\n' "$WORK/origin.img"
		printf '[ow]\nfilename=%s\nrw=write\n' "$WORK/origin.img"
		for i in 1 2 3 4 5 6 7 8; do
			printf '[c%s]\nfilename=%s\nrw=write\n' "$i" "$WORK/cow$i.img"
			((sync > 0)) && printf 'fdatasync=%s\n' "$sync"
		done
	} >"$job"
	f0=$(flushes)
	t0=$(date +%s.%N)
	fio --output-format=json "$job" >"$WORK/out.json" || exit 1
	t1=$(date +%s.%N)
	f1=$(flushes)
	/usr/bin/python3 - "$WORK/out.json" "$REGION_MIB" "$sync" "$((f1 - f0))" "$t0" "$t1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
mib, sync, fl = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
wall = float(sys.argv[6]) - float(sys.argv[5])
slow = max(j["job_runtime"] for j in d["jobs"]) / 1000.0
moved = sum(j["read"]["io_bytes"] + j["write"]["io_bytes"] for j in d["jobs"]) / 2**20
print("fdatasync every %s MiB per COW file: %d MiB moved in %.2f s (slowest stream; "
      "wall %.2f s) = %.0f MiB/s of device traffic, origin equivalent %.0f MiB/s; "
      "%d device flushes (%.2f per MiB of origin)" % (
          sync if sync != "0" else "-", moved, slow, wall, moved / slow, mib / slow, fl,
          fl / mib))
PY
done
