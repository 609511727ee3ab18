#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Cached-origin benchmark (issue 12, "Performance"): one pool with a
# [cache "c"] over sparse files, the origin made a slow disk with
# `fault c:origin read delay DELAY_US` (and write delay for the cleaning
# run), the cache on the local file.  fio (O_DIRECT, psync) against
# $MNT/c.  Prints a markdown table with the cache's counters per row.
#
#     bench/run-cache.sh
#
# Environment:
#   WORK=/var/tmp/thinfs-bench-cache   backing files, mountpoint (removed at exit)
#   CACHE_MIB=256 ORIGIN_GIB=2         device sizes
#   DELAY_US=2000                      the origin's delay per read (and write)
#   RUNTIME=10                         seconds per measured fio job
#   THINFS_BUILD=build-bench-cache     release build directory
#
# Not a test: nothing times it in scripts/test.sh.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-cache}
CACHE_MIB=${CACHE_MIB:-256}
ORIGIN_GIB=${ORIGIN_GIB:-2}
DELAY_US=${DELAY_US:-2000}
RUNTIME=${RUNTIME:-10}
BUILD=${THINFS_BUILD:-build-bench-cache}
MNT=$WORK/mnt
OUT=$WORK/out
mkdir -p "$WORK" "$OUT"

if [[ ! -d $ROOT/$BUILD ]]; then
	meson setup "$ROOT/$BUILD" "$ROOT" --buildtype=release -Db_sanitize=none >/dev/null
fi
meson compile -C "$ROOT/$BUILD" thinfs thinfs-ctl >/dev/null
thinfs=$ROOT/$BUILD/tools/thinfs
ctl=$ROOT/$BUILD/tools/thinfs-ctl
# shellcheck source=bench/pool-lib.sh
source "$ROOT/bench/pool-lib.sh"

cache_start() {
	rm -rf "$WORK/pool"
	mkdir -p "$WORK/pool" "$MNT"
	truncate -s 64M "$WORK/pool/meta.img"
	truncate -s 1G "$WORK/pool/data.img"
	truncate -s "${ORIGIN_GIB}G" "$WORK/pool/origin.img"
	truncate -s "${CACHE_MIB}M" "$WORK/pool/cache.img"
	truncate -s 16M "$WORK/pool/cmeta.img"
	cat >"$WORK/pool/pool.cfg" <<CFG
[pool]
metadata = meta.img
data = data.img
catalog = catalog.db
[cache "c"]
origin = origin.img
cache = cache.img
metadata = cmeta.img
mode = writeback
[fault]
allow = yes
CFG
	"$thinfs" mkpool "$WORK/pool/pool.cfg" >/dev/null
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f --allow-faults >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/c" >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT" || { log "thinfs did not mount"; return 1; }
}

counters() {
	"$ctl" "$MNT" status --json | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin)["volumes"] if v["name"] == "c"][0]
print("promotions %d, demotions %d, read hits %d / misses %d, write hits %d / misses %d, dirty %d"
      % (v["promotions"], v["demotions"], v["read_hits"], v["read_misses"],
         v["write_hits"], v["write_misses"], v["dirty"]))'
}

# fio NAME RW BS OFFSET SIZE [extra...]: prints "IOPS MiB/s"
run_fio() {
	local name=$1 rw=$2 bs=$3 off=$4 size=$5
	shift 5
	fio --name="$name" --filename="$MNT/c" --rw="$rw" --bs="$bs" --offset="$off" --size="$size" \
		--direct=1 --ioengine=psync --runtime="$RUNTIME" --time_based=1 --randrepeat=1 \
		--output-format=json "$@" >"$OUT/$name.json"
	python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.0f %.1f" % (d["iops"], d["bw"] / 1024))' "$OUT/$name.json"
}

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }

HOT=$((CACHE_MIB / 4))M
log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); commit $(git -C "$ROOT" rev-parse --short HEAD)"
cache_start
"$ctl" "$MNT" fault c:origin read delay "$DELAY_US" >/dev/null

echo "| measurement | result | cache counters after it |"
echo "|---|---|---|"
"$ctl" "$MNT" cache c migration_threshold 0 >/dev/null
read -r iops _ < <(run_fio uncached randread 4k 0 "$HOT")
row "4 KiB random reads, hot set of $HOT, no promotions (origin ${DELAY_US} µs)" "$iops IOPS" "$(counters)"
uncached=$iops
"$ctl" "$MNT" cache c migration_threshold 2048 >/dev/null
run_fio warm1 randread 4k 0 "$HOT" >/dev/null
run_fio warm2 randread 4k 0 "$HOT" >/dev/null
read -r iops _ < <(run_fio hot randread 4k 0 "$HOT")
row "the same after two warming runs" "$iops IOPS ($(python3 -c "print(round($iops / max($uncached, 1), 1))")x)" "$(counters)"

"$ctl" "$MNT" cache c migration_threshold 0 >/dev/null
read -r _ origin_bw < <(run_fio seq-origin read 1m 1G 512M)
row "1 MiB sequential reads of cold data, no promotions" "$origin_bw MiB/s" "$(counters)"
"$ctl" "$MNT" cache c migration_threshold 2048 >/dev/null
read -r _ bw < <(run_fio seq-cold read 1m 1536M 512M)
row "1 MiB sequential reads of other cold data, smq on" "$bw MiB/s" "$(counters)"

read -r iops _ < <(run_fio wb randwrite 4k 0 "$HOT")
row "writeback: 4 KiB random writes to the hot set" "$iops IOPS" "$(counters)"

# Fill: written twice the blocks are promoted, the last pass (no writebacks) dirties them.
"$ctl" "$MNT" fault c:origin read ok >/dev/null
run_fio fill write 1m 0 "${CACHE_MIB}M" --runtime=600 --time_based=0 --loops=3 >/dev/null
"$ctl" "$MNT" cache c migration_threshold 0 >/dev/null
run_fio fill2 write 1m 0 "${CACHE_MIB}M" --runtime=600 --time_based=0 >/dev/null
"$ctl" "$MNT" fault c:origin write delay "$DELAY_US" >/dev/null
dirty=$("$ctl" "$MNT" status --json | python3 -c '
import json, sys
print([v for v in json.load(sys.stdin)["volumes"] if v["name"] == "c"][0]["dirty"])')
"$ctl" "$MNT" cache c migration_threshold 2048 >/dev/null
start=$(date +%s.%N)
"$ctl" "$MNT" cache c clean --wait >/dev/null
secs=$(python3 -c "print($(date +%s.%N) - $start)")
row "clean $dirty dirty 64 KiB blocks (origin writes ${DELAY_US} µs each)" \
	"$(python3 -c "print('%.1f s, %.1f MiB/s' % ($secs, $dirty * 64 / 1024 / $secs))")" "$(counters)"
