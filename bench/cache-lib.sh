# shellcheck shell=bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Sourced by the cache bench scripts (run-cache.sh, run-cache-clean.sh)
# once ROOT, BUILD, WORK, MNT and OUT are set: builds thinfs in the release
# build directory BUILD (made if missing), or with BENCH_REV=COMMIT a clean
# export of that commit (pool_build), sets thinfs and ctl, sources
# pool-lib.sh, and gives mounting the pool in $WORK/pool that holds the
# cache "c", and its counters.

# shellcheck source=bench/pool-lib.sh disable=SC2153 # ROOT comes from the caller
source "$ROOT/bench/pool-lib.sh"
if [[ -n ${BENCH_REV:-} ]]; then
	# A clean export of that commit, built in build-bench-cache-rev/ (pool_build),
	# kept for the next run of the same commit (interleaved runs).
	# shellcheck disable=SC2034 # pool_build reads root
	root=$ROOT
	rev=$(git -C "$ROOT" rev-parse "$BENCH_REV") || exit 1
	revdir=$ROOT/build-bench-cache-rev
	if [[ -x $revdir/tools/thinfs && $(cat "$revdir/bench-rev" 2>/dev/null) == "$rev" ]]; then
		thinfs=$revdir/tools/thinfs
		ctl=$revdir/tools/thinfs-ctl
		VERSION="${rev:0:7} (clean export)"
	else
		pool_build cache || exit 1
		echo "$rev" >"$revdir/bench-rev"
	fi
else
	if [[ ! -d $ROOT/$BUILD ]]; then
		meson setup "$ROOT/$BUILD" "$ROOT" --buildtype=release -Db_sanitize=none >/dev/null
	fi
	meson compile -C "$ROOT/$BUILD" thinfs thinfs-ctl >/dev/null
	thinfs=$ROOT/$BUILD/tools/thinfs
	ctl=$ROOT/$BUILD/tools/thinfs-ctl
	# shellcheck disable=SC2034 # the scripts print it
	VERSION="$(git -C "$ROOT" rev-parse --short HEAD)"
fi

# cache_mount [mount options...]: the daemon's pid in T_PID
cache_mount() {
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f "$@" >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/c" >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT" || { log "thinfs did not mount"; return 1; }
}

# cache_field KEY: one key of c's status --json
cache_field() {
	"$ctl" "$MNT" status --json | python3 -c '
import json, sys
print([v for v in json.load(sys.stdin)["volumes"] if v["name"] == "c"][0][sys.argv[1]])' "$1"
}

counters() {
	"$ctl" "$MNT" status --json | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin)["volumes"] if v["name"] == "c"][0]
print("promotions %d, demotions %d, read hits %d / misses %d, write hits %d / misses %d, "
      "dirty %d, writebacks %d"
      % (v["promotions"], v["demotions"], v["read_hits"], v["read_misses"],
         v["write_hits"], v["write_misses"], v["dirty"], v["writebacks"]))'
}
