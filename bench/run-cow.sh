#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Classic snapshot benchmark (issue 11, "Performance"): an origin ([origin]
# over a sparse file in $WORK/pool) exported by thinfs, with 0, 1 or 8
# classic snapshots made with `thinfs-ctl snapshot --cow`, against the
# same origin without snapshots and against qemu-storage-daemon's qcow2
# internal snapshot (bench/run-fuse.sh Ccow with COW_STRIDE=1).
#
#   O    the origin, no snapshot: the reference rows
#   O1   one snapshot, 64 KiB chunks: 4 KiB writes at a 64 KiB stride
#        (stridewrite-cow: each the first write to its chunk, a COW break),
#        then, once every chunk of W has been copied (one untimed 1 MiB
#        pass), 4 KiB random and 1 MiB sequential overwrites of W
#   O1c4 one snapshot, 4 KiB chunks: 4 KiB random writes, each to a chunk
#        not copied yet (randwrite-cow-nj1; fio's random map)
#   O8   eight snapshots, 64 KiB chunks: 1 MiB sequential writes of a
#        prefilled region (every chunk copied 8 times: seqwrite-cow8)
#   C    qemu-storage-daemon, qcow2 64 KiB clusters, after an internal
#        snapshot: the stride and random COW jobs (run-fuse.sh Ccow)
#   snap thinfs-ctl snapshot time at origins of SNAP_SIZES_GIB (sparse)
#
#     sudo bench/run-cow.sh [O O1 O1c4 O8 C snap]     (default: all)
#
# Job files, region layout, modes, cache dropping, quiet gate and the
# results.csv format are the shared harness's (SHARED_BENCH, default
# ../shared/bench), as in run-fuse.sh; every job is libaio + O_DIRECT,
# QD16. The machine's load is recorded in env.txt (start, per target, end)
# and per job in results.csv (cpu busy, steal, the quiet gate's wait).
#
# Environment: WORK=/var/tmp/thinfs-bench-cow, OUT=$WORK/results-<date>,
# RUNTIME=5, R_W_MIB=256 R_SEQ_MIB=256 R_RAND_MIB=64 R_ST_MIB=256 (regions),
# SNAP_SIZES_GIB="1 16 256", SNAP_REPS=5, QUIET_MAX_WAIT=10, BENCH_REV
# (as pool-lib.sh). Needs root. Signals only the daemons it started and
# unmounts only its own mountpoints.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(realpath -m "$root/../shared/bench")}
WORK=${WORK:-/var/tmp/thinfs-bench-cow}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
TARGETS=${*:-O O1 O1c4 O8 C snap}

if ((EUID != 0)); then
	echo "run-cow: needs root (mounts, drop_caches)" >&2
	exit 1
fi
if [[ ! -f $SHARED_BENCH/lib.sh ]]; then
	echo "run-cow: shared harness not found in $SHARED_BENCH (set SHARED_BENCH)" >&2
	exit 1
fi
: "${RUNTIME:=5}"
: "${R_W_MIB:=256}"
: "${R_SEQ_MIB:=256}"
: "${R_RAND_MIB:=64}"
: "${R_D_MIB:=16}"
: "${R_ST_MIB:=256}"
: "${QUIET_MAX_WAIT:=10}"
: "${SNAP_SIZES_GIB:=1 16 256}"
: "${SNAP_REPS:=5}"
MODES_WANTED=aio
export RUNTIME R_W_MIB R_SEQ_MIB R_RAND_MIB R_D_MIB R_ST_MIB MODES_WANTED QUIET_MAX_WAIT

mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
OUT=$(realpath "$OUT")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"
# the origins' and COW devices live beside the pool (pool_start empties it)
trap 'pool_cleanup; rm -rf "$WORK/dev"' EXIT
BENCH_DIR=$SHARED_BENCH
# shellcheck source=/dev/null
source "$SHARED_BENCH/lib.sh"

load() { cut -d' ' -f1-3 /proc/loadavg; }

# start_origin TARGET CHUNK: a fresh pool whose pool.cfg exports origin db
# (TOTAL_MIB, a sparse file in $WORK/dev), mounted; hook_snapshot makes a snapshot of CHUNK
# with a fresh sparse COW device big enough for every chunk of db.
start_origin() {
	TARGET=$1
	SNAP_CHUNK=$2
	csv_init
	mkdir -p "$WORK/dev"
	rm -f "$WORK/dev"/*.img
	truncate -s "${TOTAL_MIB}M" "$WORK/dev/origin.img"
	POOL_CFG_EXTRA=$(printf '[origin "db"]\ndevice = %s\n' "$WORK/dev/origin.img")
	pool_start 1 || return 1
	FILE=$MNT/db
	DAEMON_PIDS=$T_PID
	SNAP_N=0
	echo "$TARGET: thinfs $VERSION, origin db over a sparse file of $TOTAL_MIB MiB; snapshots: --chunk-size $SNAP_CHUNK, sparse COW files of $((TOTAL_MIB + 64)) MiB" >>"$OUT/targets.txt"
	hook_du() { du -skc "$WORK/dev"/cow*.img 2>/dev/null | tail -1 | cut -f1; }
	hook_snapshot() {
		SNAP_N=$((SNAP_N + 1))
		local cow=$WORK/dev/cow$SNAP_N.img t0 t1 rc
		truncate -s "$((TOTAL_MIB + 64))M" "$cow"
		t0=$(date +%s.%N)
		"$ctl" "$MNT" snapshot db "s$SNAP_N" --cow "$cow" --chunk-size "$SNAP_CHUNK" >/dev/null
		rc=$?
		t1=$(date +%s.%N)
		HOOK_SNAP_CMD_S=$(echo "$t0 $t1" | awk '{printf "%.4f", $2-$1}')
		return $rc
	}
	log "=== $TARGET (load $(load)) ==="
	echo "load before $TARGET: $(load)" >>"$OUT/env.txt"
	check_file && probe_caps
}
stop_origin() { pool_cleanup; rm -rf "$WORK/dev"; unset -f hook_du hook_snapshot; true; }

target_O() {
	start_origin O 64k || return 1
	prefill W && prefill ST.aio && prefill RA1.aio && prefill SA.aio
	run_job stridewrite-first stridewrite-alloc.fio aio ST.aio 1 1 single
	run_job randwrite-first-nj1 randwrite-alloc.fio aio RA1.aio 1 1 single
	run_job seqwrite-first seqwrite-alloc.fio aio SA.aio 1 1 single
	run_job randwrite-over randwrite-over.fio aio W 1 1 timed
	run_job seqwrite-over seqwrite-over.fio aio W 1 1 timed
}

target_O1() {
	start_origin O1 64k || return 1
	prefill W && prefill ST.aio
	timed_snapshot cow-1 1 "$TOTAL_MIB" || return 1
	run_job stridewrite-cow stridewrite-alloc.fio aio ST.aio 1 1 single
	# every chunk of W copied once: the overwrites below copy nothing
	run_job copy-W prefill.fio aio W 1 1 untimed
	run_job randwrite-over randwrite-over.fio aio W 1 1 timed
	run_job seqwrite-over seqwrite-over.fio aio W 1 1 timed
}

target_O1c4() {
	start_origin O1c4 4k || return 1
	prefill RA1.aio
	timed_snapshot cow-1-4k 1 "$TOTAL_MIB" || return 1
	run_job randwrite-cow-nj1 randwrite-alloc.fio aio RA1.aio 1 1 single
}

target_O8() {
	start_origin O8 64k || return 1
	prefill SA.aio
	local i
	for i in 1 2 3 4 5 6 7 8; do timed_snapshot "cow-8-$i" 1 "$TOTAL_MIB" || return 1; done
	run_job seqwrite-cow8 seqwrite-alloc.fio aio SA.aio 1 1 single
}

# The peer: run-fuse.sh's Ccow with the same regions, its rows merged here.
target_C() {
	log "=== C (load $(load)): bench/run-fuse.sh Ccow ==="
	echo "load before C: $(load)" >>"$OUT/env.txt"
	COW_STRIDE=1 WORK=$WORK/peer OUT=$OUT/peer "$root/bench/run-fuse.sh" Ccow >/dev/null 2>&1
	if [[ -f $OUT/peer/results.csv ]]; then
		# C alone (or first) finds no results.csv yet: take the header too
		if [[ -s $OUT/results.csv ]]; then
			tail -n +2 "$OUT/peer/results.csv" >>"$OUT/results.csv"
		else
			cat "$OUT/peer/results.csv" >"$OUT/results.csv"
		fi
		cat "$OUT/peer/targets.txt" >>"$OUT/targets.txt" 2>/dev/null
	else
		log "C: run-fuse.sh Ccow gave no results (see $OUT/peer)"
	fi
}

# Snapshot creation at several origin sizes: SNAP_REPS x (snapshot, rm).
target_snap() {
	TARGET=snap
	mkdir -p "$WORK/dev"
	local g extra="" r t0 t1
	for g in $SNAP_SIZES_GIB; do
		truncate -s "${g}G" "$WORK/dev/o$g.img"
		# some data at the start, so the flush at the hold has work
		dd if=/dev/urandom of="$WORK/dev/o$g.img" bs=1M count=16 conv=notrunc status=none
		extra+=$(printf '[origin "o%s"]\ndevice = %s\n' "$g" "$WORK/dev/o$g.img")$'\n'
	done
	POOL_CFG_EXTRA=$extra
	pool_start 1 || return 1
	echo "load before snap: $(load)" >>"$OUT/env.txt"
	echo "origin_gib,rep,chunk,ctl_ms" >"$OUT/snaptime.csv"
	for g in $SNAP_SIZES_GIB; do
		for r in $(seq 1 "$SNAP_REPS"); do
			truncate -s 64M "$WORK/dev/c$g-$r.img"
			t0=$(date +%s%N)
			"$ctl" "$MNT" snapshot "o$g" "s$g-$r" --cow "$WORK/dev/c$g-$r.img" >/dev/null ||
				{ log "snap: snapshot of o$g failed"; return 1; }
			t1=$(date +%s%N)
			echo "$g,$r,4k,$(awk -v n=$((t1 - t0)) 'BEGIN{printf "%.2f", n/1e6}')" >>"$OUT/snaptime.csv"
			rm "$MNT/s$g-$r"
		done
	done
	# the same command's cost without a snapshot: thinfs-ctl's own start and round trip
	for r in $(seq 1 "$SNAP_REPS"); do
		t0=$(date +%s%N)
		"$ctl" "$MNT" status >/dev/null
		t1=$(date +%s%N)
		echo "status,$r,-,$(awk -v n=$((t1 - t0)) 'BEGIN{printf "%.2f", n/1e6}')" >>"$OUT/snaptime.csv"
	done
	pool_cleanup
	rm -rf "$WORK/dev"
}

pool_build cow || { echo "run-cow: build failed" >&2; exit 1; }
pool_env "fio: $(fio --version)" "qemu: $(qemu-storage-daemon --version 2>/dev/null | head -1)" \
	"RUNTIME=$RUNTIME AIO_QD=$AIO_QD regions: W=$R_W_MIB SA=$R_SEQ_MIB RA=$R_RAND_MIB ST=$R_ST_MIB MiB" \
	"thinfs: $VERSION"
log "run-cow -> $OUT; targets: $TARGETS"
for t in $TARGETS; do
	case $t in
	O | O1 | O1c4 | O8) "target_$t"; stop_origin ;;
	C) target_C ;;
	snap) target_snap ;;
	*) log "unknown target $t" ;;
	esac
done
echo "load at end: $(load)" >>"$OUT/env.txt"

# One table: job, target, IOPS (4 KiB) or MiB/s (1 MiB), load figures.
/usr/bin/python3 - "$OUT/results.csv" >"$OUT/table.md" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]))
        if not r["workload"].startswith(("prefill", "copy"))]
print("| target | job | result | p50 us | p99 us | host busy % | steal % | daemon cpu s |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["status"] != "ok":
        v = r["status"]
    elif r["workload"].startswith("seq"):
        v = "%.0f MiB/s" % (float(r["bw_mbs"]) * 1e6 / 1048576)
    else:
        v = "%.0f IOPS" % float(r["iops"])
    print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
        r["target"], r["workload"], v, r["lat_p50_us"], r["lat_p99_us"], r["host_busy_pct"],
        r["steal_pct"], r["daemon_cpu_s"]))
EOF
cat "$OUT/table.md"
[[ -f $OUT/snaptime.csv ]] && cat "$OUT/snaptime.csv"
exit 0
