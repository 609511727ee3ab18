#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Changed-block diff benchmark (issue 13, "Performance"): thinfs-ctl diff
# of two snapshots of a VOL_GIB volume (default 64 GiB, every 64 KiB block
# mapped) that differ in CHANGE_PCT percent of their blocks (default 1;
# target < 1 s) and in nothing (target < 10 ms), with the metadata blocks
# the walk read.  Also the diff from nothing (every mapping) and the same
# diffs offline (thinfs diff, after the unmount, page cache dropped).
#
#     sudo bench/run-diff.sh
#
# The full mapping is made without writing data (the data file stays
# sparse): thinfs makes the volume and writes one block, thin_dump's XML of
# the pool gets one range mapping over the whole volume instead, and
# thin_restore writes it back (as run-fuse.sh's snap_sparse_point).  Then,
# mounted: group snapshot "a", CHANGE_PCT % of the blocks rewritten (4 KiB
# each at random distinct blocks, O_DIRECT, so each block is copied away
# from the snapshot), group snapshots "b" and "c"; the diffs are a/vol ->
# b/vol (the change) and b/vol -> c/vol (nothing), REPS times each.
#
# Environment: WORK=/var/tmp/thinfs-bench-diff (removed at exit),
# OUT=$WORK/results-<date>, VOL_GIB=64, CHANGE_PCT=1, REPS=5, COLD_REPS=1
# (remounts, each followed by one cold diff: the median is reported).
# Needs root (drop_caches).  Only the daemon this script started is
# signalled and only its own mountpoint unmounted (bench/pool-lib.sh).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-diff}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
: "${VOL_GIB:=64}"
: "${CHANGE_PCT:=1}"
: "${REPS:=5}"
: "${COLD_REPS:=1}"

if ((EUID != 0)); then
	echo "run-diff: needs root (drop_caches)" >&2
	exit 1
fi
mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
OUT=$(realpath "$OUT")
MNT=$WORK/mnt
# shellcheck source=bench/pool-lib.sh
source "$root/bench/pool-lib.sh"

build() {
	local dir=$root/build-bench-diff
	if [[ ! -f $dir/meson-private/coredata.dat ]]; then
		meson setup "$dir" "$root" --buildtype=release -Db_sanitize=none >/dev/null || return 1
	fi
	meson compile -C "$dir" thinfs thinfs-ctl >/dev/null || return 1
	thinfs=$dir/tools/thinfs
	ctl=$dir/tools/thinfs-ctl
}

remount() {
	fusermount3 -u "$MNT" || return 1
	for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/." >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT"
}

# diff_row LABEL FROM TO [N]: N (default REPS) runs through the daemon; the
# note on stderr has the figures.
diff_row() {
	local label=$1 from=$2 to=$3 n=${4:-$REPS} r note t0 t1
	for r in $(seq 1 "$n"); do
		t0=$(date +%s%N)
		note=$("$ctl" "$MNT" diff "$from" "$to" --stats 2>&1 >"$OUT/diff-$label.txt") || {
			log "diff $from $to failed: $note"
			return 1
		}
		t1=$(date +%s%N)
		# diff: N extents, M metadata blocks read, T ms
		echo "$label,live,$r,$(awk '{print $2 "," $4 "," $8}' <<<"$note"),$(((t1 - t0) / 1000))" >>"$OUT/diff.csv"
		log "$label rep $r: $note; thinfs-ctl wall $(((t1 - t0) / 1000)) us"
	done
}

offline_row() {
	local label=$1 from=$2 to=$3 note
	sync
	echo 3 >/proc/sys/vm/drop_caches
	note=$("$thinfs" diff "$WORK/pool/pool.cfg" "$from" "$to" --stats 2>&1 >/dev/null) || {
		log "thinfs diff $from $to failed: $note"
		return 1
	}
	echo "$label,offline-cold,1,$(awk '{print $2 "," $4 "," $8}' <<<"$note")," >>"$OUT/diff.csv"
	log "$label offline, cold page cache: $note"
}

pool_env "VOL_GIB=$VOL_GIB CHANGE_PCT=$CHANGE_PCT REPS=$REPS COLD_REPS=$COLD_REPS"
echo "label,where,rep,extents,nodes_read,walk_ms,wall_us" >"$OUT/diff.csv"

build || { log "build failed"; exit 1; }
blocks=$((VOL_GIB * 16384))
pool_start $((VOL_GIB + VOL_GIB / 8 + 2)) || exit 1
pool_full_volume "$VOL_GIB" || exit 1
log "volume of $VOL_GIB GiB, $blocks blocks mapped"

mkdir "$MNT/.snapshots/a"
changed=$((blocks * CHANGE_PCT / 100))
log "rewriting $changed random blocks (4 KiB each, O_DIRECT)"
/usr/bin/python3 - "$MNT/vol" "$blocks" "$changed" <<'EOF' || exit 1
import mmap, os, random, sys
path, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = mmap.mmap(-1, 4096)
buf.write(os.urandom(4096))
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
for b in random.Random(13).sample(range(n), k):
    os.pwrite(fd, buf, b * 65536)
os.fsync(fd)
os.close(fd)
EOF
mkdir "$MNT/.snapshots/b" "$MNT/.snapshots/c"

diff_row change a/vol b/vol || exit 1
diff_row nothing b/vol c/vol || exit 1
diff_row all - b/vol || exit 1
# read_io: the daemon's read syscalls and bytes read from storage (/proc/PID/io)
read_io() { awk '$1=="syscr:"{c=$2} $1=="read_bytes:"{b=$2} END{print c, b}' "/proc/$T_PID/io"; }
for _ in $(seq 1 "$COLD_REPS"); do
	remount || exit 1
	log "after a remount (metadata cache empty; O_DIRECT, so the reads go to the device):"
	read -r c0 b0 < <(read_io)
	diff_row change-cold a/vol b/vol 1 || exit 1
	read -r c1 b1 < <(read_io)
	log "the daemon meanwhile: $((c1 - c0)) read calls, $(((b1 - b0) / 4096)) blocks of 4 KiB from storage"
done
fusermount3 -u "$MNT"
for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
T_PID=""
offline_row change a/vol b/vol
offline_row nothing b/vol c/vol
thin_check -q "$WORK/pool/meta.img" || log "thin_check of the pool failed"
"$thinfs" check -q "$WORK/pool/meta.img" || log "thinfs check of the pool failed"

/usr/bin/python3 - "$OUT/diff.csv" <<'EOF' | tee "$OUT/table.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| diff | where | extents | metadata blocks read | walk (median) | thinfs-ctl wall (median) |")
print("|---|---|---:|---:|---:|---:|")
seen = []
for r in rows:
    key = (r["label"], r["where"])
    if key not in seen:
        seen.append(key)
for label, where in seen:
    rs = [r for r in rows if (r["label"], r["where"]) == (label, where)]
    walk = statistics.median(float(r["walk_ms"]) for r in rs)
    wall = [float(r["wall_us"]) / 1000 for r in rs if r["wall_us"]]
    print(f"| {label} | {where} | {rs[0]['extents']} | {rs[0]['nodes_read']} | {walk:.2f} ms | "
          + (f"{statistics.median(wall):.1f} ms |" if wall else "- |"))
EOF
log "results in $OUT"
