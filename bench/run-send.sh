#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# send benchmark (issue 13, "Performance"): thinfs-ctl send of a 1%
# incremental of a VOL_GIB volume (default 64 GiB, every 64 KiB block
# mapped) must be bounded by the changed data, at >= 0.8x the data
# device's sequential read rate.
#
#     sudo bench/run-send.sh
#     sudo REVS="main HEAD" bench/run-send.sh    # before and after, interleaved
#
# The full mapping is made without writing data, as run-diff.sh does
# (thin_dump, bench/full-mapping.py, thin_restore): the data file stays
# sparse.  Then, mounted: group snapshot "a"; CHANGE_PCT % of the blocks
# rewritten with random data as whole 64 KiB blocks at random distinct
# places (O_DIRECT), group snapshot "b"; the same amount again as random
# runs of 16 blocks (1 MiB), group snapshot "c"; and once more as one run
# at a random place, group snapshot "d".  The new data blocks are real
# data on the data file, past the sparse mapping, allocated in the order
# written: so the scattered and 1 MiB-run changes lie in random order on
# the data device too, and their send reads it at random.  Measured, each
# REPS times with the page cache dropped first:
#   - the data device's sequential read rate: dd of the region holding the
#     changed data, 1 MiB O_DIRECT reads;
#   - send --from a/vol b/vol > /dev/null (scattered blocks),
#     send --from b/vol c/vol (1 MiB runs), send --from c/vol d/vol (one
#     run): wall time, the changed data over it in MiB/s, and the CPU
#     time of thinfs-ctl and of the daemon;
#   - the diff alone (thinfs-ctl diff --stats), the part of a send that is
#     not reading data.
#
# With REVS (git revisions, e.g. "main HEAD"), each is built from a clean
# export and every repetition mounts the same pool with each revision's
# daemon in turn and sends with its thinfs-ctl (A, B, A, B, ...): the
# figures of one row are then taken on the same pool and machine state.
#
# Environment: WORK=/var/tmp/thinfs-bench-send (the pool removed at exit),
# OUT=$WORK/results-<date>, VOL_GIB=64, CHANGE_PCT=1, REPS=3, REVS (none:
# this tree).
# Needs root (drop_caches).  Only the daemon this script started is
# signalled and only its own mountpoint unmounted (bench/pool-lib.sh).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-send}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
: "${VOL_GIB:=64}"
: "${CHANGE_PCT:=1}"
: "${REPS:=3}"

if ((EUID != 0)); then
	echo "run-send: needs root (drop_caches)" >&2
	exit 1
fi
mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
OUT=$(realpath "$OUT")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"

drop() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# seq_rate: MiB/s of dd reading the changed data's region of the data file.
seq_rate() {
	local out
	drop
	out=$(dd if="$WORK/pool/data.img" of=/dev/null bs=1M iflag=direct skip=$((VOL_GIB * 1024)) \
		count="$new_mib" 2>&1 | tail -1)
	awk -v mib="$new_mib" '{for (i = 1; i <= NF; i++) if ($i == "s,") s = $(i-1)} END {printf "%.0f", mib / s}' <<<"$out"
}

# CPU seconds (user + system) the daemon has used so far.
daemon_cpu() {
	awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$T_PID/stat"
}

# send_once LABEL FROM TO REP: one send to /dev/null, page cache dropped
# first, after a dd of the changed data's region; $rev names the build.
send_once() {
	local label=$1 from=$2 to=$3 r=$4 t0 t1 data note seq c0 c1 ctl_cpu dcpu
	data=$(awk '$3 == "data" {s += $2} END {print s + 0}' < <("$ctl" "$MNT" diff "$from" "$to"))
	seq=$(seq_rate)
	note=$("$ctl" "$MNT" diff "$from" "$to" --stats 2>&1 >/dev/null)
	drop
	c0=$(daemon_cpu)
	t0=$(date +%s%N)
	/usr/bin/time -f "%U %S" -o "$OUT/time.txt" \
		"$ctl" "$MNT" send --from "$from" "$to" >/dev/null 2>"$OUT/send-$label.err" || {
		log "send $from $to failed: $(cat "$OUT/send-$label.err")"
		return 1
	}
	t1=$(date +%s%N)
	c1=$(daemon_cpu)
	ctl_cpu=$(awk '{printf "%.2f", $1 + $2}' "$OUT/time.txt")
	dcpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')
	echo "$label,$rev,$r,$data,$(((t1 - t0) / 1000)),$seq,$(awk '{print $8}' <<<"$note"),$ctl_cpu,$dcpu,$(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/send.csv"
	log "$label $rev rep $r: $((data >> 20)) MiB changed, send $(((t1 - t0) / 1000000)) ms" \
		"($(awk -v d="$data" -v t=$((t1 - t0)) 'BEGIN {printf "%.0f", d / 1048576 / (t / 1e9)}') MiB/s," \
		"cpu: thinfs-ctl $ctl_cpu s, daemon $dcpu s); dd of the data: $seq MiB/s; $note"
}

# use_build I: thinfs and ctl of build I, and the pool mounted by its daemon.
use_build() {
	thinfs=${builds_thinfs[$1]}
	ctl=${builds_ctl[$1]}
	rev=${builds_rev[$1]}
	[[ -n $T_PID && $(readlink "/proc/$T_PID/exe") == "$(realpath "$thinfs")" ]] && return 0
	fusermount3 -u "$MNT"
	for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/." >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT" || { log "thinfs ($rev) did not mount"; return 1; }
}

pool_env "VOL_GIB=$VOL_GIB CHANGE_PCT=$CHANGE_PCT REPS=$REPS REVS=${REVS:-}"
echo "label,rev,rep,changed_bytes,send_us,dd_mib_s,diff_ms,ctl_cpu_s,daemon_cpu_s,load1" >"$OUT/send.csv"

builds_thinfs=() builds_ctl=() builds_rev=()
if [[ -n ${REVS:-} ]]; then
	i=0
	for r in $REVS; do
		BENCH_REV=$r pool_build "send-$i" || { log "build of $r failed"; exit 1; }
		builds_thinfs+=("$thinfs") builds_ctl+=("$ctl") builds_rev+=("$r")
		echo "build $i: $VERSION" >>"$OUT/env.txt"
		i=$((i + 1))
	done
	thinfs=${builds_thinfs[0]} ctl=${builds_ctl[0]}
else
	pool_build send || { log "build failed"; exit 1; }
	builds_thinfs=("$thinfs") builds_ctl=("$ctl") builds_rev=("$VERSION")
fi
blocks=$((VOL_GIB * 16384))
changed=$((blocks * CHANGE_PCT / 100))
new_mib=$((3 * changed / 16 + 1))
pool_start $((VOL_GIB + VOL_GIB / 8 + 2)) || exit 1
pool_full_volume "$VOL_GIB" || exit 1
log "volume of $VOL_GIB GiB, $blocks blocks mapped; changing $changed blocks three times"

# rewrite RUN SEED: $changed blocks of random data, in runs of RUN blocks at
# random distinct run-aligned places, O_DIRECT, 1 MiB writes at most.
rewrite() {
	/usr/bin/python3 - "$MNT/vol" "$blocks" "$changed" "$1" "$2" <<'EOF'
import mmap, os, random, sys
path, n, k, run, seed = sys.argv[1], *map(int, sys.argv[2:])
rnd = random.Random(seed)
buf = mmap.mmap(-1, run * 65536)
buf.write(os.urandom(run * 65536))
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
for r in rnd.sample(range(n // run), k // run):
    os.pwrite(fd, buf, r * run * 65536)
os.fsync(fd)
os.close(fd)
EOF
}
mkdir "$MNT/.snapshots/a"
rewrite 1 13 || exit 1
mkdir "$MNT/.snapshots/b"
rewrite 16 14 || exit 1
mkdir "$MNT/.snapshots/c"
rewrite "$changed" 15 || exit 1
mkdir "$MNT/.snapshots/d"

for r in $(seq 1 "$REPS"); do
	for i in "${!builds_thinfs[@]}"; do
		use_build "$i" || exit 1
		send_once scattered a/vol b/vol "$r" || exit 1
		send_once runs b/vol c/vol "$r" || exit 1
		send_once contiguous c/vol d/vol "$r" || exit 1
	done
done
fusermount3 -u "$MNT"
for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
T_PID=""
thin_check -q "$WORK/pool/meta.img" || log "thin_check of the pool failed"
"$thinfs" check -q "$WORK/pool/meta.img" || log "thinfs check of the pool failed"
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

/usr/bin/python3 - "$OUT/send.csv" <<'EOF' | tee "$OUT/table.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| incremental | build | changed data | diff (median) | send wall (median) | send MiB/s | dd MiB/s (median) | ratio (median of reps) | ratio per rep | CPU s: thinfs-ctl + daemon (median) | load (1 min) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
for label in dict.fromkeys(r["label"] for r in rows):
    for rev in dict.fromkeys(r["rev"] for r in rows):
        rs = [r for r in rows if r["label"] == label and r["rev"] == rev]
        mib = int(rs[0]["changed_bytes"]) / 1048576
        wall = statistics.median(int(r["send_us"]) for r in rs) / 1e6
        dd = statistics.median(float(r["dd_mib_s"]) for r in rs)
        diff = statistics.median(float(r["diff_ms"]) for r in rs)
        ratios = [mib / (int(r["send_us"]) / 1e6) / float(r["dd_mib_s"]) for r in rs]
        per = ", ".join(f"{x:.2f}" for x in ratios)
        cpu = statistics.median(float(r["ctl_cpu_s"]) for r in rs)
        dcpu = statistics.median(float(r["daemon_cpu_s"]) for r in rs)
        load = f"{min(float(r['load1']) for r in rs):.1f}-{max(float(r['load1']) for r in rs):.1f}"
        print(f"| {label} | {rev} | {mib:.0f} MiB | {diff:.0f} ms | {wall:.2f} s | {mib / wall:.0f} | {dd:.0f} | "
              f"{statistics.median(ratios):.2f}x | {per} | {cpu:.2f} + {dcpu:.2f} | {load} |")
EOF
log "results in $OUT"
