#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Where the time goes (issue 10: "profile each row that falls short"): one
# fio job of bench/run-fuse.sh against a fresh thinfs volume, with
# `perf record -a -g` over the job, then a report of the thinfs daemon's
# and fio's samples (kernel and user), split by process and by symbol.
#
#     sudo bench/run-profile.sh JOB
#
# JOB: randwrite-alloc-psync | randwrite-alloc-aio | randwrite-over-aio |
#      randread-aio | randwrite-cow-aio | seqwrite-alloc-aio |
#      origin-cow4k-aio (issue 11: 4 KiB random writes to an origin with one
#      classic snapshot of 4 KiB chunks, each a COW break) |
#      origin-8snap-seq-aio (1 MiB sequential writes to an origin with 8
#      snapshots of 64 KiB chunks) | origin-over-aio (4 KiB random overwrites of
#      an origin whose one snapshot (64 KiB chunks) has every chunk copied)
# The origin jobs also record the daemon's system calls with `perf trace -s`
# (counts and time per call, per thread), where the time spent waiting for
# the devices shows, which a CPU profile does not.
# Environment: WORK=/var/tmp/thinfs-bench-profile, RUNTIME=10 (seconds),
# REGION_MIB=1024, OUT=$WORK/results-<date>-JOB.  Builds a release build
# with frame pointers in build-bench-profile/ (call graphs of the daemon).
# Signals only the daemon it started, unmounts only its own mountpoint.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB=${1:-}
WORK=${WORK:-/var/tmp/thinfs-bench-profile}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)-$JOB}
: "${RUNTIME:=10}"
: "${REGION_MIB:=1024}"

case $JOB in
randwrite-alloc-psync) rw=randwrite engine=psync direct=0 qd=1 prefill=0 snap=0 ;;
randwrite-alloc-aio) rw=randwrite engine=libaio direct=1 qd=16 prefill=0 snap=0 ;;
randwrite-over-aio) rw=randwrite engine=libaio direct=1 qd=16 prefill=1 snap=0 ;;
randread-aio) rw=randread engine=libaio direct=1 qd=16 prefill=1 snap=0 ;;
randwrite-cow-aio) rw=randwrite engine=libaio direct=1 qd=16 prefill=1 snap=1 ;;
seqwrite-alloc-aio) rw=write engine=libaio direct=1 qd=16 prefill=0 snap=0 ;;
origin-cow4k-aio) rw=randwrite engine=libaio direct=1 qd=16 prefill=1 snap=0 origin_snaps=1 chunk=4k ;;
origin-8snap-seq-aio) rw=write engine=libaio direct=1 qd=16 prefill=1 snap=0 origin_snaps=8 chunk=64k ;;
origin-over-aio) rw=randwrite engine=libaio direct=1 qd=16 prefill=1 snap=0 origin_snaps=1 chunk=64k copied=1 ;;
*)
	echo "usage: run-profile.sh randwrite-alloc-psync|randwrite-alloc-aio|randwrite-over-aio|randread-aio|randwrite-cow-aio|seqwrite-alloc-aio|origin-cow4k-aio|origin-8snap-seq-aio|origin-over-aio" >&2
	exit 2
	;;
esac
if ((EUID != 0)); then
	echo "run-profile: needs root (mount, perf -a, drop_caches)" >&2
	exit 1
fi
command -v perf >/dev/null || { echo "run-profile: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"

dir=$root/build-bench-profile
if [[ ! -f $dir/meson-private/coredata.dat ]]; then
	meson setup "$dir" "$root" --buildtype=release -Db_sanitize=none \
		-Dc_args=-fno-omit-frame-pointer >/dev/null || exit 1
fi
meson compile -C "$dir" thinfs thinfs-ctl >/dev/null || exit 1
thinfs=$dir/tools/thinfs
ctl=$dir/tools/thinfs-ctl

: "${origin_snaps:=0}"
vol=$MNT/vol
if ((origin_snaps)); then
	# an origin over a sparse file beside the pool (pool_start empties the pool's directory)
	trap 'pool_cleanup; rm -rf "$WORK/dev"' EXIT
	mkdir -p "$WORK/dev"
	truncate -s "${REGION_MIB}M" "$WORK/dev/origin.img"
	POOL_CFG_EXTRA=$(printf '[origin "db"]\ndevice = %s\n' "$WORK/dev/origin.img")
	vol=$MNT/db
fi
pool_start $((REGION_MIB / 1024 + 2)) || exit 1
((origin_snaps)) || truncate -s "${REGION_MIB}M" "$vol"
if ((prefill)); then
	fio --eta=never --name=prefill --filename="$vol" --allow_file_create=0 --ioengine=libaio \
		--direct=1 --iodepth=16 --rw=write --bs=1M --size="${REGION_MIB}M" --end_fsync=1 >/dev/null || exit 1
fi
((snap)) && { mkdir "$MNT/.snapshots/s1" || exit 1; }
for i in $(seq 1 "$origin_snaps"); do
	truncate -s "$((REGION_MIB + 64))M" "$WORK/dev/cow$i.img"
	"$ctl" "$MNT" snapshot db "s$i" --cow "$WORK/dev/cow$i.img" --chunk-size "$chunk" >/dev/null || exit 1
done
if [[ -n ${copied:-} ]]; then
	# every chunk copied once: the job's overwrites copy nothing
	fio --eta=never --name=copy --filename="$vol" --allow_file_create=0 --ioengine=libaio \
		--direct=1 --iodepth=16 --rw=write --bs=1M --size="${REGION_MIB}M" --end_fsync=1 >/dev/null || exit 1
fi
# a CPU-bound job is profiled without the trace (its overhead would be most of the profile)
if ((origin_snaps)) && [[ -z ${copied:-} ]]; then
	perf trace -s -p "$T_PID" -o "$OUT/trace.txt" 2>/dev/null &
	trace_pid=$!
fi
sync
echo 3 >/proc/sys/vm/drop_caches

log "thinfs $(git -C "$root" rev-parse --short HEAD); job $JOB; load $(cut -d' ' -f1-3 /proc/loadavg)"
perf record -a -g -o "$OUT/perf.data" -- \
	fio --eta=never --output-format=json --output="$OUT/fio.json" --name="$JOB" --filename="$vol" \
	--allow_file_create=0 --fallocate=none --ioengine=$engine --direct=$direct --iodepth=$qd \
	--rw=$rw --bs="$([[ $JOB == seq* || $JOB == *-seq-* ]] && echo 1M || echo 4k)" --size="${REGION_MIB}M" \
	--runtime="$RUNTIME" --time_based="$([[ $JOB == *alloc* || $JOB == *cow* || $JOB == origin-*snap* ]] && echo 0 || echo 1)" \
	--end_fsync=$((1 - direct)) --randrepeat=1 2>"$OUT/perf-record.log" >/dev/null || { log "perf/fio failed"; exit 1; }
if [[ -n ${trace_pid:-} ]]; then
	kill -INT "$trace_pid" 2>/dev/null
	wait "$trace_pid" 2>/dev/null
fi
log "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
jq -r '.jobs[0] | (if .write.io_bytes > 0 then .write else .read end) | "iops \(.iops|floor)  clat p50 \(.clat_ns.percentile["50.000000"]/1000) us"' "$OUT/fio.json" | tee -a "$OUT/log.txt"

report() { perf report -i "$OUT/perf.data" --stdio -g none --percentage relative "$@" 2>/dev/null | grep -v '^#' | grep -v '^$'; }
{
	echo "## CPU samples by process (all CPUs, the whole job)"
	report --no-children --sort comm | head -12
	echo
	echo "## thinfs daemon: inclusive time (children), share of the daemon's samples"
	echo "## (above 100%: frames counted twice on recursive or unwound stacks)"
	report --children --comm thinfs --sort sym | head -45
	echo
	echo "## thinfs daemon: self time by symbol"
	report --no-children --comm thinfs --sort dso,sym | head -30
	echo
	echo "## fio: inclusive time"
	report --children --comm fio --sort sym | head -25
	if [[ -s $OUT/trace.txt ]]; then
		echo
		echo "## thinfs daemon: system calls (perf trace -s; msec totals per thread)"
		grep -v '^$' "$OUT/trace.txt" | head -120
	fi
} >"$OUT/report.txt"
cat "$OUT/report.txt"
