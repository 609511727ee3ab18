#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Cached-origin benchmark (issue 12, "Performance"): one pool with a
# [cache "c"] over sparse files, the origin made a slow disk with
# `fault c:origin read delay DELAY_US`, the cache on the local file.
# The cache device's own 4 KiB random write rate is measured first, with
# the same fio job on cache.img (before the pool exists).  fio (O_DIRECT, psync) against
# $MNT/c.  Prints a markdown table with the cache's counters per row.
#
#     bench/run-cache.sh
#
# Environment:
#   WORK=/var/tmp/thinfs-bench-cache   backing files, mountpoint (removed at exit)
#   CACHE_MIB=256 ORIGIN_GIB=2         device sizes
#   DELAY_US=2000                      the origin's delay per read
#   RUNTIME=10                         seconds per measured fio job
#   THINFS_BUILD=build-bench-cache     release build directory
#   BENCH_REV=                         a commit to measure instead (clean export)
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

# shellcheck source=bench/cache-lib.sh
source "$ROOT/bench/cache-lib.sh"

cache_start() {
	rm -rf "$WORK/pool"
	mkdir -p "$WORK/pool" "$MNT"
	truncate -s 64M "$WORK/pool/meta.img"
	truncate -s 1G "$WORK/pool/data.img"
	truncate -s "${ORIGIN_GIB}G" "$WORK/pool/origin.img"
	truncate -s "${CACHE_MIB}M" "$WORK/pool/cache.img"
	truncate -s 16M "$WORK/pool/cmeta.img"
	# The hot set's cache blocks are written (allocated) by promotions: so here.
	fio --name=cdev-fill --filename="$WORK/pool/cache.img" --rw=write --bs=1m --size="$HOT" \
		--direct=1 --ioengine=psync --output-format=json >/dev/null
	fio --name=cdev-randwrite --filename="$WORK/pool/cache.img" --rw=randwrite --bs=4k \
		--size="$HOT" --direct=1 --ioengine=psync --runtime="$RUNTIME" --time_based=1 \
		--randrepeat=1 --output-format=json >"$OUT/cdev-randwrite.json"
	cdev_iops=$(python3 -c '
import json, sys
print("%.0f" % json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$OUT/cdev-randwrite.json")
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
	cache_mount --allow-faults
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
log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); build $VERSION"
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

row "the cache device itself (cache.img): 4 KiB random writes over $HOT" "$cdev_iops IOPS" "-"
read -r iops _ < <(run_fio wb randwrite 4k 0 "$HOT")
row "writeback: 4 KiB random writes to the hot set" "$iops IOPS ($(python3 -c "print(round(100 * $iops / max($cdev_iops, 1)))")% of the cache device's)" "$(counters)"

# Cleaning a 100% dirty cache: bench/run-cache-clean.sh (no delay; the origin file's own rates).
