#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Cleaning a 100% dirty cache (issue 12, "Performance"): a cache of
# CACHE_MIB whose every block is dirty (metadata made with cache_restore,
# the cache device filled with random data, cache blocks mapped to origin
# blocks in a shuffled order as a used cache has them), cleaned with
# `thinfs-ctl MNT cache c clean --wait`, timed.  Measured in the same run,
# on the same origin file made sparse again before each: fio 1 MiB
# sequential writes and 64 KiB random writes (O_DIRECT, psync, QD1, like
# the cache's writeback) over the same CACHE_MIB, the cache file's random
# reads, and those reads (8 jobs) beside sequential origin writes at once.  No fault delay: the
# origin is whatever disk WORK is on.
#
#     bench/run-cache-clean.sh
#
# Environment:
#   WORK=/var/tmp/thinfs-bench-cache-clean  backing files, mountpoint (removed at exit)
#   CACHE_MIB=1024                          the cache's size (all of it dirty)
#   CACHE_DIR=                              a directory for cache.img and cmeta.img
#                                           (default: beside the origin; a
#                                           subdirectory made and removed at exit)
#   MIGRATION_THRESHOLD=2048                sectors of writeback in flight
#   RUNTIME=20                              seconds for the random-write fio job
#   THINFS_BUILD=build-bench-cache          release build directory
#   BENCH_REV=                              a commit to measure instead (clean export)
#   TRACE=0                                 1: `perf trace -s` the daemon during the
#                                           clean (time per system call, in OUT/trace.txt)
#   PERF=0                                  1: `perf record -a -g` during the clean
#                                           (the whole machine: the helpers start late;
#                                           OUT/perf.data)
#
# Not a test: nothing times it in scripts/test.sh.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/thinfs-bench-cache-clean}
CACHE_MIB=${CACHE_MIB:-1024}
THRESHOLD=${MIGRATION_THRESHOLD:-2048}
RUNTIME=${RUNTIME:-20}
BUILD=${THINFS_BUILD:-build-bench-cache}
MNT=$WORK/mnt
OUT=$WORK/out
mkdir -p "$WORK" "$OUT"
command -v cache_restore >/dev/null || { echo "cache_restore (thin-provisioning-tools) is needed" >&2; exit 1; }

# shellcheck source=bench/cache-lib.sh
source "$ROOT/bench/cache-lib.sh"

P=$WORK/pool
# The cache device and its metadata: with the origin, or on a device of their own.
if [[ -n ${CACHE_DIR:-} ]]; then
	C=$CACHE_DIR/thinfs-bench-cache-clean.$$
	trap 'pool_cleanup; rm -rf "$C"' EXIT
else
	C=$P
fi
NR=$((CACHE_MIB * 16)) # 64 KiB blocks
fresh_origin() { rm -f "$P/origin.img"; truncate -s "$((CACHE_MIB * 2))M" "$P/origin.img"; }

# fio_origin NAME RW BS [extra...]: prints MiB/s
fio_origin() {
	local name=$1 rw=$2 bs=$3
	shift 3
	fio --name="$name" --filename="$P/origin.img" --rw="$rw" --bs="$bs" --size="${CACHE_MIB}M" \
		--direct=1 --ioengine=psync --randrepeat=1 --output-format=json "$@" >"$OUT/$name.json"
	python3 -c '
import json, sys
print("%.1f" % (json.load(open(sys.argv[1]))["jobs"][0]["write"]["bw"] / 1024))' "$OUT/$name.json"
}

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }

log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); build $VERSION"
rm -rf "$P"
mkdir -p "$P" "$C" "$MNT"
truncate -s 64M "$P/meta.img"
truncate -s 1G "$P/data.img"
truncate -s 64M "$C/cmeta.img"
log "origin in $P, cache device and its metadata in $C ($(df --output=source "$C" | tail -1))"
fresh_origin

echo "| measurement | result | cache counters after it |"
echo "|---|---|---|"
seq_bw=$(fio_origin seq write 1m)
row "origin file: 1 MiB sequential writes over ${CACHE_MIB} MiB (fio, O_DIRECT, QD1)" "$seq_bw MiB/s" "-"
fresh_origin
rand_bw=$(fio_origin rand randwrite 64k --runtime="$RUNTIME" --time_based=1)
row "origin file: 64 KiB random writes over ${CACHE_MIB} MiB (fio, O_DIRECT, QD1, ${RUNTIME} s)" "$rand_bw MiB/s" "-"
fresh_origin
seqf_bw=$(fio_origin seqfsync write 1m --fdatasync=$((THRESHOLD / 2048 > 0 ? THRESHOLD / 2048 : 1)))
row "origin file: the same sequential writes, fdatasync after each $((THRESHOLD / 2)) KiB (a writeback batch)" "$seqf_bw MiB/s" "-"
fresh_origin

# Every cache block dirty, mapped to the origin in a shuffled order.
fio --name=fillcache --filename="$C/cache.img" --rw=write --bs=1m --size="${CACHE_MIB}M" \
	--direct=1 --ioengine=psync --refill_buffers=1 --output-format=json >/dev/null
fio --name=cread --filename="$C/cache.img" --rw=randread --bs=64k --size="${CACHE_MIB}M" \
	--direct=1 --ioengine=psync --runtime="$RUNTIME" --time_based=1 --randrepeat=1 \
	--output-format=json >"$OUT/cread.json"
cread_bw=$(python3 -c '
import json, sys
print("%.1f" % (json.load(open(sys.argv[1]))["jobs"][0]["read"]["bw"] / 1024))' "$OUT/cread.json")
row "cache file: 64 KiB random reads (what cleaning reads, in shuffled cache block order)" "$cread_bw MiB/s" "-"
# Both at once, as pipelined cleaning does them: when the two files share a
# disk, what the reads get beside the writes bounds cleaning.
fresh_origin
fio --output-format=json --direct=1 --ioengine=psync --runtime="$RUNTIME" --time_based=1 \
	--name=mixr --filename="$C/cache.img" --rw=randread --bs=64k --size="${CACHE_MIB}M" --numjobs=8 \
	--name=mixw --filename="$P/origin.img" --rw=write --bs=512k --size="${CACHE_MIB}M" \
	>"$OUT/mix.json"
mix=$(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"]
print("reads %.1f, writes %.1f MiB/s" % (sum(x["read"]["bw"] for x in j) / 1024,
                                        sum(x["write"]["bw"] for x in j) / 1024))' "$OUT/mix.json")
row "both at once: the cache file's 64 KiB random reads (8 jobs) beside 512 KiB sequential writes to the origin file (${RUNTIME} s)" "$mix" "-"
fresh_origin
python3 - "$NR" >"$OUT/dirty.xml" <<'PY'
import random, sys
n = int(sys.argv[1])
obs = list(range(n))
random.Random(12).shuffle(obs)
print(f'<superblock uuid="" block_size="128" nr_cache_blocks="{n}" policy="smq" hint_width="4">')
print("  <mappings>")
for cb, ob in enumerate(obs):
    print(f'    <mapping cache_block="{cb}" origin_block="{ob}" dirty="true"/>')
print("  </mappings>\n</superblock>")
PY
cat >"$P/pool.cfg" <<CFG
[pool]
metadata = meta.img
data = data.img
catalog = catalog.db
[cache "c"]
origin = origin.img
cache = $C/cache.img
metadata = $C/cmeta.img
mode = writeback
migration_threshold = 0
CFG
"$thinfs" mkpool "$P/pool.cfg" >/dev/null
cache_restore -i "$OUT/dirty.xml" -o "$C/cmeta.img" >/dev/null
# shellcheck disable=SC2119 # no mount options here
cache_mount || exit 1
dirty=$(cache_field dirty)
# Nothing moved until now (migration_threshold 0 from the start: writeback mode
# would begin writing back a cache this dirty at once).
if [[ ${TRACE:-0} == 1 ]]; then
	perf trace -s -p "$T_PID" -o "$OUT/trace.txt" &
	TRACE_PID=$!
	sleep 1
fi
if [[ ${PERF:-0} == 1 ]]; then
	perf record -a -g -o "$OUT/perf.data" >/dev/null 2>&1 &
	PERF_PID=$!
	sleep 1
fi
start=$(date +%s.%N)
"$ctl" "$MNT" cache c migration_threshold "$THRESHOLD" >/dev/null
"$ctl" "$MNT" cache c clean --wait >/dev/null
secs=$(python3 -c "print($(date +%s.%N) - $start)")
for pid in ${TRACE_PID:-} ${PERF_PID:-}; do
	kill -INT "$pid"
	wait "$pid"
done
bw=$(python3 -c "print('%.1f' % ($dirty * 64 / 1024 / $secs))")
row "clean --wait of $dirty dirty 64 KiB blocks (migration_threshold $THRESHOLD)" \
	"$(python3 -c "print('%.1f s, %s MiB/s' % ($secs, '$bw'))")" "$(counters)"
log "clean: $bw MiB/s against sequential $seq_bw and random $rand_bw MiB/s; load $(cut -d' ' -f1-3 /proc/loadavg)"
