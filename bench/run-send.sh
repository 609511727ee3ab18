#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# send benchmark (issue 13, "Performance"): thinfs-ctl send of a 1%
# incremental of a VOL_GIB volume (default 64 GiB, every 64 KiB block
# mapped) must be bounded by the changed data, at >= 0.8x the data
# device's sequential read rate.
#
#     sudo bench/run-send.sh
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
# Environment: WORK=/var/tmp/thinfs-bench-send (the pool removed at exit),
# OUT=$WORK/results-<date>, VOL_GIB=64, CHANGE_PCT=1, REPS=3.
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

# send_row LABEL FROM TO: REPS sends to /dev/null, page cache dropped first.
send_row() {
	local label=$1 from=$2 to=$3 r t0 t1 data note seq c0 c1 ctl_cpu
	data=$(awk '$3 == "data" {s += $2} END {print s + 0}' < <("$ctl" "$MNT" diff "$from" "$to"))
	for r in $(seq 1 "$REPS"); do
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
		echo "$label,$r,$data,$(((t1 - t0) / 1000)),$seq,$(awk '{print $8}' <<<"$note"),$ctl_cpu,$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')" >>"$OUT/send.csv"
		log "$label rep $r: $((data >> 20)) MiB changed, send $(((t1 - t0) / 1000000)) ms" \
			"($(awk -v d="$data" -v t=$((t1 - t0)) 'BEGIN {printf "%.0f", d / 1048576 / (t / 1e9)}') MiB/s," \
			"cpu: thinfs-ctl $ctl_cpu s, daemon $(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}') s);" \
			"dd of the data: $seq MiB/s; $note"
	done
}

pool_env "VOL_GIB=$VOL_GIB CHANGE_PCT=$CHANGE_PCT REPS=$REPS"
echo "label,rep,changed_bytes,send_us,dd_mib_s,diff_ms,ctl_cpu_s,daemon_cpu_s" >"$OUT/send.csv"

pool_build send || { log "build failed"; exit 1; }
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

send_row scattered a/vol b/vol || exit 1
send_row runs b/vol c/vol || exit 1
send_row contiguous c/vol d/vol || exit 1
fusermount3 -u "$MNT"
for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
T_PID=""
thin_check -q "$WORK/pool/meta.img" || log "thin_check of the pool failed"
"$thinfs" check -q "$WORK/pool/meta.img" || log "thinfs check of the pool failed"
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

/usr/bin/python3 - "$OUT/send.csv" <<'EOF' | tee "$OUT/table.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| incremental | changed data | diff (median) | send wall (median) | send MiB/s | dd MiB/s (median) | ratio | ratio per rep | CPU s: thinfs-ctl + daemon (median) |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
for label in dict.fromkeys(r["label"] for r in rows):
    rs = [r for r in rows if r["label"] == label]
    mib = int(rs[0]["changed_bytes"]) / 1048576
    wall = statistics.median(int(r["send_us"]) for r in rs) / 1e6
    dd = statistics.median(float(r["dd_mib_s"]) for r in rs)
    diff = statistics.median(float(r["diff_ms"]) for r in rs)
    per = ", ".join(f"{mib / (int(r['send_us']) / 1e6) / float(r['dd_mib_s']):.2f}" for r in rs)
    cpu = statistics.median(float(r["ctl_cpu_s"]) for r in rs)
    dcpu = statistics.median(float(r["daemon_cpu_s"]) for r in rs)
    print(f"| {label} | {mib:.0f} MiB | {diff:.0f} ms | {wall:.2f} s | {mib / wall:.0f} | {dd:.0f} | "
          f"{mib / wall / dd:.2f}x | {per} | {cpu:.2f} + {dcpu:.2f} |")
EOF
log "results in $OUT"
