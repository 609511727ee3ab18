# shellcheck shell=bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Sourced by the single-pool bench scripts (run-commit-stall.sh,
# run-profile.sh, run-diff.sh, run-send.sh): one fresh thinfs pool on sparse files in $WORK/pool,
# mounted at $MNT by a daemon whose pid is $T_PID, taken down at exit.
# The caller sets root (the tree), WORK, MNT and OUT (absolute), and thinfs
# (the binary) itself or with pool_build.
# Only that daemon is signalled and only $MNT is unmounted.

T_PID=""

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt" >&2; }
is_mounted() { awk -v m="$1" '$2==m{f=1} END{exit !f}' /proc/self/mounts; }

pool_cleanup() {
	if is_mounted "$MNT"; then
		fusermount3 -u "$MNT" 2>/dev/null || { sleep 1; fusermount3 -uz "$MNT"; }
	fi
	if [[ -n $T_PID ]]; then
		# the daemon commits and exits after the unmount; TERM if it does not
		for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
		kill -TERM "$T_PID" 2>/dev/null
		wait "$T_PID" 2>/dev/null
	fi
	rm -rf "$WORK/pool"
	rmdir "$MNT" 2>/dev/null
	true
}
trap pool_cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# pool_build NAME: a release build of this tree in build-bench-NAME/, or of
# the commit $BENCH_REV (a clean export) in build-bench-NAME-rev/.  Sets
# thinfs, ctl (the binaries) and VERSION (what was built, in words).
# shellcheck disable=SC2034,SC2154 # root comes from the caller, which uses the rest
pool_build() {
	local dir=$root/build-bench-$1 src=$root
	if [[ -n ${BENCH_REV:-} ]]; then
		dir=$root/build-bench-$1-rev
		src=$dir-src
		rm -rf "$src" "$dir" && mkdir -p "$src" || return 1
		git -C "$root" archive "$BENCH_REV" | tar -x -C "$src" || return 1
		VERSION="$(git -C "$root" rev-parse --short "$BENCH_REV") (clean export)"
	else
		VERSION="$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- src || echo ' + uncommitted changes in src/')"
	fi
	if [[ ! -f $dir/meson-private/coredata.dat ]]; then
		meson setup "$dir" "$src" --buildtype=release -Db_sanitize=none >/dev/null || return 1
	fi
	meson compile -C "$dir" thinfs thinfs-ctl >/dev/null || return 1
	thinfs=$dir/tools/thinfs
	ctl=$dir/tools/thinfs-ctl
}

# pool_start DATA_GIB: mkpool (defaults, block_size 64k, then the lines of
# POOL_CFG_EXTRA: more sections) and mount at $MNT
pool_start() {
	rm -rf "$WORK/pool"
	mkdir -p "$WORK/pool" "$MNT"
	truncate -s 1G "$WORK/pool/meta.img"
	truncate -s "${1}G" "$WORK/pool/data.img"
	cat >"$WORK/pool/pool.cfg" <<CFG
[pool]
metadata = meta.img
data = data.img
catalog = catalog.db
block_size = 64k
${POOL_CFG_EXTRA:-}
CFG
	# shellcheck disable=SC2154 # thinfs: set by the caller
	"$thinfs" mkpool "$WORK/pool/pool.cfg" >/dev/null || return 1
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/." >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT" || { log "thinfs did not mount"; return 1; }
}

# pool_env: what the figures were taken on, into $OUT/env.txt; extra
# lines (the script's settings) from the arguments.
pool_env() {
	{
		echo "date: $(date -Is)"
		echo "kernel: $(uname -r)"
		echo "cpu: $(nproc) x $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
		echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
		echo "work fs: $(findmnt -no SOURCE,FSTYPE -T "$WORK")"
		printf '%s\n' "$@"
	} >"$OUT/env.txt"
}

# pool_full_volume GIB: with the pool mounted (pool_start), a volume "vol"
# of GIB GiB with every 64 KiB block mapped, made without writing its
# data (the data file stays sparse): thinfs makes the volume and writes
# one block, the thin_dump XML gets one range mapping over the whole
# volume instead (bench/full-mapping.py), thin_restore writes it back, and
# the pool is mounted again.
pool_full_volume() {
	truncate -s "${1}G" "$MNT/vol"
	dd if=/dev/urandom of="$MNT/vol" bs=64k count=1 oflag=direct conv=fsync,notrunc status=none
	fusermount3 -u "$MNT"
	for _ in $(seq 1 300); do kill -0 "$T_PID" 2>/dev/null || break; sleep 0.1; done
	thin_dump "$WORK/pool/meta.img" >"$WORK/pool/full.xml" || { log "thin_dump failed"; return 1; }
	/usr/bin/python3 "$root/bench/full-mapping.py" "$WORK/pool/full.xml" $(($1 * 16384)) || return 1
	thin_restore -q -i "$WORK/pool/full.xml" -o "$WORK/pool/meta.img" ||
		{ log "thin_restore failed"; return 1; }
	"$thinfs" mount "$WORK/pool/pool.cfg" "$MNT" -f >>"$OUT/daemon.log" 2>&1 &
	T_PID=$!
	for _ in $(seq 1 200); do is_mounted "$MNT" && stat "$MNT/." >/dev/null 2>&1 && break; sleep 0.05; done
	is_mounted "$MNT" || { log "thinfs did not mount"; return 1; }
}
