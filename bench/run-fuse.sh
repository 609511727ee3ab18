#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# FUSE volume benchmark (issue 3, "Performance"): the same fio jobs against
#
#   T  a thinfs volume (this tree, release build in build-bench-fuse/)
#   B  a plain sparse file through libfuse's passthrough_ll example (the FUSE
#      floor), built at run time from the libfuse3-dev examples with the shared
#      harness's O_DIRECT bounce patch
#   C  qemu-storage-daemon's FUSE export of a fresh qcow2 (64 KiB clusters,
#      cache.direct=on, aio=native: the peer)
#   A  the plain sparse file itself (not in the default list)
#   snap  thinfs snapshot creation time (mkdir .snapshots/NAME) at several
#      amounts of mapped data, and at SNAP_SPARSE_GIB mapped (see suite_snap)
#   Tcow Ccow  first 4 KiB writes (libaio QD16) to blocks shared with a
#      snapshot: thinfs after mkdir .snapshots/N, qemu after an internal
#      qcow2 snapshot (qemu-img snapshot -c with the export stopped, as the
#      shared harness does); with COW_STRIDE=1 also the stride job (one
#      write per 64 KiB cluster, every one a COW break: bench/run-cow.sh)
#   Tlong Clong  4 KiB random allocating writes over a LONG_GIB volume for
#      LONG_RUNTIME seconds (libaio QD16, O_DIRECT, norandommap)
#
#     sudo bench/run-fuse.sh [T B C A snap Tcow Ccow Tlong Clong]
#                                        (default: T B C snap)
#     sudo bench/run-fuse.sh T B C Tcow Ccow Tlong Clong snap   # issue 10's table
#
# The fio job files, region layout, cache dropping, quiet gate and result
# format come from the shared reference harness (SHARED_BENCH, default
# ../shared/bench next to this repository), so the figures line up with its
# baseline. The workloads, per mode (MODES_WANTED, default "psync aio": psync
# = buffered QD1 with end_fsync, aio = libaio + O_DIRECT, QD16):
#   1 MiB sequential write into never-written space (seqwrite-alloc), then
#   overwrite (seqwrite-over) and read (seqread) of the prefilled region W;
#   4 KiB random write into never-written space (randwrite-alloc-nj1), then
#   overwrite (randwrite-over) and read (randread) of W.
# Regions are small by default (see the R_*_MIB defaults below) and every job
# is capped at RUNTIME seconds, so a run takes minutes, not the hour of the
# shared harness; figures with different region sizes are not comparable.
#
# Environment:
#   WORK=/var/tmp/thinfs-bench-fuse   backing files, mountpoints (removed at exit)
#   OUT=$WORK/results-<date>           results.csv, JSON per job, tables.md
#   RUNTIME=5  MODES_WANTED="psync aio"  QUIET_MAX_WAIT=10 (seconds the quiet
#   gate waits for an idle machine before running anyway)
#   SNAP_SIZES_GIB="0 1 4"  SNAP_REPS=3  (a size is skipped unless df shows room)
#   SNAP_SPARSE_GIB=64  (0: skip) the mapped size of the sparse snapshot point
#   LONG_GIB=24  LONG_RUNTIME=40  the long allocating job
#   POOL_CFG_EXTRA="writeback_cache = on"  lines added to T's pool.cfg [pool]
#                       (default none: thinfs on its default settings)
#   BENCH_REV=<commit>  build that revision (git archive into
#                       build-bench-fuse-rev-src/, built in build-bench-fuse-rev/)
#                       instead of the working tree in build-bench-fuse/
#
# Needs root (mounts, drop_caches). Only processes this script started are
# signalled (by pid) and only its own mountpoints are unmounted.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(realpath -m "$root/../shared/bench")}
WORK=${WORK:-/var/tmp/thinfs-bench-fuse}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
FUSE_EXAMPLES=${FUSE_EXAMPLES:-/usr/share/doc/libfuse3-dev/examples}
TARGETS=${*:-T B C snap}

if ((EUID != 0)); then
	echo "run-fuse: needs root (mounts, drop_caches)" >&2
	exit 1
fi
if [[ ! -f $SHARED_BENCH/lib.sh ]]; then
	echo "run-fuse: shared harness not found in $SHARED_BENCH (set SHARED_BENCH)" >&2
	exit 1
fi

# small regions (the shared defaults need 48 GiB virtual, ~45 GiB of disk)
: "${RUNTIME:=5}"
: "${R_W_MIB:=1024}"
: "${R_SEQ_MIB:=1024}"
: "${R_RAND_MIB:=256}"
: "${R_D_MIB:=64}"
: "${R_ST_MIB:=64}"
: "${MODES_WANTED:=psync aio}"
: "${QUIET_MAX_WAIT:=10}"
: "${SNAP_SIZES_GIB:=0 1 4}"
: "${SNAP_REPS:=3}"
: "${SNAP_SPARSE_GIB:=64}"
: "${LONG_GIB:=24}"
: "${LONG_RUNTIME:=40}"
: "${POOL_CFG_EXTRA:=}"
export RUNTIME R_W_MIB R_SEQ_MIB R_RAND_MIB R_D_MIB R_ST_MIB MODES_WANTED QUIET_MAX_WAIT

mkdir -p "$WORK" "$OUT"
WORK=$(realpath "$WORK")
BENCH_DIR=$SHARED_BENCH
# shellcheck source=/dev/null
source "$SHARED_BENCH/lib.sh"
# the long job's region (not in the shared layout): a volume of its own
REG_OFF[LONG]=0
REG_MIB[LONG]=$((LONG_GIB * 1024))

# thinfs's own data-device counters (status --json io.data) around every job
# of a thinfs target, into thinfs-io.csv: what the device moved per job,
# whatever else the host disk served meanwhile.
eval "lib_$(declare -f run_job)"
t_data_io() {
	[[ $TARGET == T* ]] || return 0
	"$ctl" "$WORK/tmnt" status --json 2>/dev/null | jq -r '.pool.io.data | "\(.read_bytes),\(.write_bytes)"' 2>/dev/null
}
run_job() {
	local before after rc
	before=$(t_data_io)
	lib_run_job "$@"
	rc=$?
	after=$(t_data_io)
	[[ -f $OUT/thinfs-io.csv ]] || echo "target,workload,mode,rep,read0,write0,read1,write1" >"$OUT/thinfs-io.csv"
	[[ -n $before && -n $after ]] && echo "$TARGET,$1,$3,$5,$before,$after" >>"$OUT/thinfs-io.csv"
	return $rc
}

STARTED_PIDS=""
OUR_MOUNTS=""
thinfs=$root/build-bench-fuse/tools/thinfs
ctl=$root/build-bench-fuse/tools/thinfs-ctl

is_mounted() { awk -v m="$1" '$2==m{f=1} END{exit !f}' /proc/self/mounts; }
wait_mounted() {
	local i
	for i in $(seq 1 400); do is_mounted "$1" && return 0; sleep 0.05; done
	return 1
}
alive() {
	[[ -r /proc/$1/stat ]] || return 1
	[[ $(sed 's/^.*) //' "/proc/$1/stat" | cut -d' ' -f1) != Z ]]
}
forget_pid() { STARTED_PIDS=$(echo " $STARTED_PIDS " | sed "s/ $1 / /g; s/^ *//; s/ *$//"); }
stop_pid() { # PID [GRACE_S]: wait for a voluntary exit, then TERM, then KILL
	local pid=$1 grace=${2:-0} i
	for i in $(seq 1 $((grace * 10))); do alive "$pid" || break; sleep 0.1; done
	if alive "$pid"; then
		kill -TERM "$pid" 2>/dev/null
		for i in $(seq 1 600); do alive "$pid" || break; sleep 0.1; done
	fi
	if alive "$pid"; then
		log "pid $pid ignored SIGTERM for 60 s, sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	forget_pid "$pid"
}
umount_ours() {
	local m=$1
	if is_mounted "$m"; then
		fusermount3 -u "$m" 2>/dev/null || { sleep 1; fusermount3 -u "$m" 2>/dev/null; } ||
			fusermount3 -uz "$m"
	fi
	OUR_MOUNTS=$(echo " $OUR_MOUNTS " | sed "s| $m | |g; s/^ *//; s/ *$//")
}
cleanup() {
	local m p
	for m in $OUR_MOUNTS; do umount_ours "$m"; done
	for p in $STARTED_PIDS; do stop_pid "$p" 5; done
	rm -rf "$WORK/pool" "$WORK/psrc" "$WORK/c.qcow2" "$WORK/c.vol" "$WORK/a.img"
	rmdir "$WORK/tmnt" "$WORK/pmnt" 2>/dev/null
	true
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
clear_hooks() { unset -f hook_du hook_reset hook_snapshot 2>/dev/null; true; }

# The workloads (see the header), one region per first-allocation run.
suite_fuse() {
	csv_init
	check_file || return 1
	probe_caps
	prefill W
	local m
	for m in $MODES; do
		run_job seqwrite-alloc seqwrite-alloc.fio "$m" "SA.$m" 1 1 single
		run_job seqwrite-over seqwrite-over.fio "$m" W 1 1 timed
		run_job seqread seqread.fio "$m" W 1 1 timed
		run_job randwrite-alloc-nj1 randwrite-alloc.fio "$m" "RA1.$m" 1 1 single
		run_job randwrite-over randwrite-over.fio "$m" W 1 1 timed
		run_job randread randread.fio "$m" W 1 1 timed
	done
}

# First writes to blocks shared with a snapshot (the shared harness's
# randwrite-cow-nj1 in aio mode): prefill the region, snapshot through the
# target's hook_snapshot, then 4 KiB random writes over it, each to a block
# (cluster) nobody has written since the snapshot.
suite_cow_first() {
	check_file || return 1
	probe_caps
	has_mode aio || { log "$TARGET: no aio mode, COW suite skipped"; return 1; }
	prefill RA1.aio
	# stridewrite-cow: every 4 KiB write is the first to its 64 KiB cluster
	# (bench/run-cow.sh compares origins' COW breaks with it)
	[[ -n ${COW_STRIDE:-} ]] && prefill ST.aio
	timed_snapshot cow-aio 1 "${REG_MIB[RA1.aio]}" || return 1
	run_job randwrite-cow-nj1 randwrite-alloc.fio aio RA1.aio 1 1 single
	[[ -n ${COW_STRIDE:-} ]] && run_job stridewrite-cow stridewrite-alloc.fio aio ST.aio 1 1 single
	true
}

# The long allocating job (bench/fio/randwrite-alloc-long.fio) on a volume
# of LONG_GIB.
suite_long() {
	[[ $(stat -c %s "$FILE") -ge $((REG_MIB[LONG] * MIB)) ]] || { log "$TARGET: $FILE is smaller than LONG_GIB"; return 1; }
	probe_caps
	has_mode aio || { log "$TARGET: no aio mode, long job skipped"; return 1; }
	RUNTIME=$LONG_RUNTIME BENCH_DIR=$root/bench \
		run_job randwrite-alloc-long randwrite-alloc-long.fio aio LONG 1 1 timed
}

# ----------------------------------------------------------------- thinfs ---
build_thinfs() {
	local dir=$root/build-bench-fuse src=$root rev
	if [[ -n ${BENCH_REV:-} ]]; then
		# a clean export of one revision, so edits in progress in the
		# working tree do not end up in the figures
		dir=$root/build-bench-fuse-rev
		src=$dir-src
		rm -rf "$src" && mkdir -p "$src" || return 1
		git -C "$root" archive "$BENCH_REV" | tar -x -C "$src" || return 1
		if [[ -f $dir/meson-private/coredata.dat ]] &&
			! grep -qs "$src" "$dir/meson-info/intro-projectinfo.json" "$dir/build.ninja"; then
			rm -rf "$dir"
		fi
		# git archive stamps every file with its commit's time, so objects
		# built after that commit look newer than another revision's
		# sources: a different revision is built from scratch
		rev=$(git -C "$root" rev-parse "$BENCH_REV") || return 1
		[[ $(cat "$dir/bench-rev" 2>/dev/null) == "$rev" ]] || rm -rf "$dir"
	fi
	if [[ ! -f $dir/meson-private/coredata.dat ]]; then
		meson setup "$dir" "$src" --buildtype=release -Db_sanitize=none >/dev/null || return 1
	fi
	meson compile -C "$dir" thinfs thinfs-ctl >/dev/null || return 1
	[[ -n ${BENCH_REV:-} ]] && echo "$rev" >"$dir/bench-rev"
	thinfs=$dir/tools/thinfs
	ctl=$dir/tools/thinfs-ctl
	if [[ -n ${BENCH_REV:-} ]]; then
		THINFS_VERSION="$(git -C "$root" rev-parse --short "$BENCH_REV") (clean export)"
	else
		THINFS_VERSION="$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- src tools || echo ' + uncommitted changes in src/ tools/')"
	fi
	echo "thinfs: $THINFS_VERSION, built in $dir" >>"$OUT/env.txt"
}

# start_thinfs DATA_GIB: a fresh pool on sparse files in $WORK/pool, mounted
# (foreground daemon in the background, so its pid is ours) at $WORK/tmnt
start_thinfs() {
	local data_gib=$1
	rm -rf "$WORK/pool"
	mkdir -p "$WORK/pool" "$WORK/tmnt"
	truncate -s 1G "$WORK/pool/meta.img"
	truncate -s "${data_gib}G" "$WORK/pool/data.img"
	cat >"$WORK/pool/pool.cfg" <<EOF
[pool]
metadata = meta.img
data = data.img
catalog = catalog.db
block_size = 64k
$POOL_CFG_EXTRA
EOF
	"$thinfs" mkpool "$WORK/pool/pool.cfg" >/dev/null || return 1
	mount_thinfs
}
# mount the pool in $WORK/pool at $WORK/tmnt
mount_thinfs() {
	"$thinfs" mount "$WORK/pool/pool.cfg" "$WORK/tmnt" -f >>"$OUT/thinfs-daemon.log" 2>&1 &
	T_PID=$!
	STARTED_PIDS="$STARTED_PIDS $T_PID"
	wait_mounted "$WORK/tmnt" || { log "thinfs did not mount"; return 1; }
	OUR_MOUNTS="$OUR_MOUNTS $WORK/tmnt"
	# the mount appears before the daemon answers; wait for the root
	local i
	for i in $(seq 1 100); do stat "$WORK/tmnt/." >/dev/null 2>&1 && break; sleep 0.05; done
	DAEMON_PIDS=$T_PID
}
stop_thinfs() {
	umount_ours "$WORK/tmnt"
	[[ -n ${T_PID:-} ]] && stop_pid "$T_PID" 30 # commits and exits after the unmount
	T_PID=""
	DAEMON_PIDS=""
}

# setup_T [NAME [VOL_MIB]]: target NAME (T) on a fresh pool, one volume
setup_T() {
	TARGET=${1:-T}
	local vol_mib=${2:-$TOTAL_MIB}
	csv_init
	start_thinfs $((vol_mib / 1024 + 4)) || return 1
	FILE=$WORK/tmnt/vol0
	truncate -s "${vol_mib}M" "$FILE" || return 1
	echo "$TARGET: thinfs $THINFS_VERSION, release build, block_size 64k, pool on sparse files in $WORK/pool, volume ${vol_mib} MiB" >>"$OUT/targets.txt"
	hook_du() { du -skc "$WORK/pool/meta.img" "$WORK/pool/data.img" | tail -1 | cut -f1; }
	T_SNAP_N=0
	hook_snapshot() {
		T_SNAP_N=$((T_SNAP_N + 1))
		local t0 t1 rc
		t0=$(date +%s.%N)
		mkdir "$WORK/tmnt/.snapshots/s$T_SNAP_N"
		rc=$?
		t1=$(date +%s.%N)
		HOOK_SNAP_CMD_S=$(echo "$t0 $t1" | awk '{printf "%.4f", $2-$1}')
		return $rc
	}
}
teardown_T() { stop_thinfs; rm -rf "$WORK/pool"; clear_hooks; }

# ------------------------------------------------------- passthrough_ll ---
build_passthrough() {
	local b=$WORK/build
	[[ -x $b/passthrough_ll ]] && return 0
	mkdir -p "$b/src"
	cp "$FUSE_EXAMPLES/passthrough_ll.c" "$FUSE_EXAMPLES/passthrough_helpers.h" "$b/src/" || return 1
	# the stock example fails O_DIRECT writes with EINVAL; the shared
	# harness's patch bounces them through an aligned buffer
	patch -s -p1 -d "$b/src" <"$SHARED_BENCH/patches/passthrough_ll-odirect-bounce.patch" || return 1
	# shellcheck disable=SC2046
	gcc -O2 -Wall -o "$b/passthrough_ll" "$b/src/passthrough_ll.c" $(pkg-config --cflags --libs fuse3)
}
setup_B() {
	TARGET=B
	csv_init
	build_passthrough || { log "passthrough_ll build failed"; return 1; }
	mkdir -p "$WORK/psrc" "$WORK/pmnt"
	rm -f "$WORK/psrc/vol.img"
	truncate -s "${TOTAL_MIB}M" "$WORK/psrc/vol.img"
	"$WORK/build/passthrough_ll" -f -o "source=$WORK/psrc" "$WORK/pmnt" >"$OUT/B-daemon.log" 2>&1 &
	B_PID=$!
	STARTED_PIDS="$STARTED_PIDS $B_PID"
	wait_mounted "$WORK/pmnt" || { log "passthrough_ll did not mount"; return 1; }
	OUR_MOUNTS="$OUR_MOUNTS $WORK/pmnt"
	FILE=$WORK/pmnt/vol.img
	DAEMON_PIDS=$B_PID
	echo "B: libfuse $(pkg-config --modversion fuse3) passthrough_ll (O_DIRECT bounce patch) -f -o source=$WORK/psrc (multithreaded, cache=auto)" >>"$OUT/targets.txt"
	hook_du() { du -k "$WORK/psrc/vol.img" | cut -f1; }
}
teardown_B() {
	umount_ours "$WORK/pmnt"
	[[ -n ${B_PID:-} ]] && stop_pid "$B_PID" 10
	B_PID=""
	rm -rf "$WORK/psrc"
	clear_hooks
}

# -------------------------------------------------- qemu-storage-daemon ---
start_qsd() {
	touch "$VOL"
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=file0,filename=$IMG,cache.direct=on,aio=native" \
		--blockdev "driver=qcow2,node-name=disk0,file=file0" \
		--export "type=fuse,id=exp0,node-name=disk0,mountpoint=$VOL,writable=on" \
		>>"$OUT/C-qsd.log" 2>&1 &
	C_PID=$!
	STARTED_PIDS="$STARTED_PIDS $C_PID"
	wait_mounted "$VOL" || { log "qemu-storage-daemon did not mount $VOL"; return 1; }
	OUR_MOUNTS="$OUR_MOUNTS $VOL"
	DAEMON_PIDS=$C_PID
}
stop_qsd() {
	[[ -n ${C_PID:-} ]] && stop_pid "$C_PID" 0 # SIGTERM: flushes, unmounts the export
	C_PID=""
	[[ -n ${VOL:-} ]] && umount_ours "$VOL"
	true
}
# setup_C [NAME [VOL_MIB]]
setup_C() {
	TARGET=${1:-C}
	local vol_mib=${2:-$TOTAL_MIB}
	csv_init
	if ! command -v qemu-storage-daemon >/dev/null || ! command -v qemu-img >/dev/null; then
		log "C skipped: qemu-storage-daemon / qemu-img not installed (apt-get install qemu-system-common qemu-utils)"
		return 1
	fi
	IMG=$WORK/c.qcow2
	VOL=$WORK/c.vol
	rm -f "$IMG"
	qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" "${vol_mib}M" || return 1
	start_qsd || return 1
	FILE=$VOL
	echo "$TARGET: $(qemu-storage-daemon --version | head -1), qcow2 cluster_size=65536, file cache.direct=on,aio=native, FUSE export, volume ${vol_mib} MiB" >>"$OUT/targets.txt"
	hook_du() { du -k "$IMG" | cut -f1; }
	C_SNAP_N=0
	# an internal snapshot needs the image closed (the shared harness's way)
	hook_snapshot() {
		stop_qsd
		C_SNAP_N=$((C_SNAP_N + 1))
		local t0 t1 rc
		t0=$(date +%s.%N)
		qemu-img snapshot -c "s$C_SNAP_N" "$IMG"
		rc=$?
		t1=$(date +%s.%N)
		HOOK_SNAP_CMD_S=$(echo "$t0 $t1" | awk '{printf "%.4f", $2-$1}')
		start_qsd || return 1
		return $rc
	}
}
teardown_C() {
	stop_qsd
	rm -f "$WORK/c.qcow2" "$WORK/c.vol"
	clear_hooks
}

# ------------------------------------------------------------- raw file ---
setup_A() {
	TARGET=A
	csv_init
	FILE=$WORK/a.img
	rm -f "$FILE"
	truncate -s "${TOTAL_MIB}M" "$FILE"
	DAEMON_PIDS=""
	echo "A: sparse plain file $FILE" >>"$OUT/targets.txt"
	hook_du() { du -k "$WORK/a.img" | cut -f1; }
}
teardown_A() { rm -f "$WORK/a.img"; clear_hooks; }

# ------------------------------------------------------ snapshot timing ---
# One volume, filled densely (1 MiB O_DIRECT writes) up to each size in
# SNAP_SIZES_GIB; at each size SNAP_REPS times: time `mkdir .snapshots/N`
# (and the rmdir after it, so every rep snapshots the same mapping).
suite_snap() {
	TARGET=Tsnap
	csv_init
	local sizes="" g max=0 avail_gib
	avail_gib=$(df -Pk "$WORK" | awk 'NR==2{printf "%d", $4/1048576}')
	for g in $SNAP_SIZES_GIB; do
		if ((g + 8 > avail_gib)); then
			log "snap: skipping $g GiB mapped, only $avail_gib GiB free in $WORK"
			continue
		fi
		sizes="$sizes $g"
		((g > max)) && max=$g
	done
	start_thinfs $((max + 2)) || return 1
	local vol=$WORK/tmnt/snapvol filled=0 mapped
	SNAP_N=0
	truncate -s "$((max + 1))G" "$vol"
	echo "label,rep,data_gib,mapped_blocks,mkdir_ms,rmdir_ms" >"$OUT/snaptime.csv"
	for g in $sizes; do
		if ((g > filled)); then
			# fio: fast, O_DIRECT, non-zero data, only the new part
			fio --eta=never --name=fill --filename="$vol" --allow_file_create=0 \
				--ioengine=libaio --direct=1 --iodepth=16 --rw=write --bs=1M \
				--offset=$((filled * 1024 * MIB)) --size=$(((g - filled) * 1024 * MIB)) \
				--end_fsync=1 >/dev/null || { log "snap: fill to $g GiB failed"; return 1; }
			filled=$g
		fi
		sync
		mapped=$("$ctl" "$WORK/tmnt" status --json 2>/dev/null |
			jq -r '[.volumes[]? | select(.name=="snapvol") | .mapped_blocks] | first // ""' 2>/dev/null)
		time_snapshots snap "$g" "$mapped" || return 1
	done
	stop_thinfs
	rm -rf "$WORK/pool"
	((SNAP_SPARSE_GIB > 0)) && snap_sparse_point
	true
}

# time_snapshots LABEL GIB MAPPED: SNAP_REPS x (mkdir, rmdir) on $WORK/tmnt
time_snapshots() {
	local label=$1 g=$2 mapped=$3 r t0 t1 mk rm_s
	for r in $(seq 1 "$SNAP_REPS"); do
		SNAP_N=$((SNAP_N + 1))
		t0=$(date +%s%N)
		mkdir "$WORK/tmnt/.snapshots/s$SNAP_N" || { log "snap: mkdir failed"; return 1; }
		t1=$(date +%s%N)
		mk=$(((t1 - t0) / 1000))
		t0=$(date +%s%N)
		rmdir "$WORK/tmnt/.snapshots/s$SNAP_N"
		t1=$(date +%s%N)
		rm_s=$(((t1 - t0) / 1000))
		echo "$label,$r,$g,$mapped,$(awk -v u="$mk" 'BEGIN{printf "%.1f", u/1000}'),$(awk -v u="$rm_s" 'BEGIN{printf "%.1f", u/1000}')" >>"$OUT/snaptime.csv"
		log "Tsnap $label $g GiB mapped (mapped_blocks=$mapped) rep $r: mkdir $((mk / 1000)).$(((mk % 1000) / 100)) ms, rmdir $((rm_s / 1000)) ms"
	done
}

# The SNAP_SPARSE_GIB point: a volume with every 64 KiB block of
# SNAP_SPARSE_GIB mapped, made without writing the data (the data file stays
# sparse, so the point fits on a small disk): thinfs makes the volume and
# writes one block, thin_dump's XML of the pool gets one range mapping over
# the whole volume in place of that block, thin_restore writes the metadata
# back, and the pool is mounted again.  Reads of the volume return zeros.
snap_sparse_point() {
	local g=$SNAP_SPARSE_GIB xml=$WORK/pool/sparse.xml blocks mapped
	blocks=$((g * 16384))
	start_thinfs $((g + 2)) || return 1
	truncate -s "${g}G" "$WORK/tmnt/sparsevol"
	dd if=/dev/urandom of="$WORK/tmnt/sparsevol" bs=64k count=1 oflag=direct conv=fsync status=none
	stop_thinfs
	thin_dump "$WORK/pool/meta.img" >"$xml" || { log "snap: thin_dump failed"; return 1; }
	/usr/bin/python3 "$root/bench/full-mapping.py" "$xml" "$blocks" || return 1
	thin_restore -q -i "$xml" -o "$WORK/pool/meta.img" || { log "snap: thin_restore failed"; return 1; }
	mount_thinfs || return 1
	mapped=$("$ctl" "$WORK/tmnt" status --json 2>/dev/null |
		jq -r '[.volumes[]? | select(.name=="sparsevol") | .mapped_blocks] | first // ""' 2>/dev/null)
	time_snapshots snap-sparse "$g" "$mapped"
	stop_thinfs
	thin_check -q "$WORK/pool/meta.img" || log "snap: thin_check of the sparse pool failed"
	rm -rf "$WORK/pool"
}

# ------------------------------------------------------------------ main ---
env_record() { # machine, tools, load (the shared harness's env.txt, plus load)
	{
		echo "date: $(date -Is)"
		echo "kernel: $(uname -r)"
		echo "cpu: $(nproc) x $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
		echo "mem: $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
		echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
		echo "fio: $(fio --version)"
		echo "libfuse: $(pkg-config --modversion fuse3 2>/dev/null)"
		echo "qemu: $(qemu-storage-daemon --version 2>/dev/null | head -1)"
		echo "work fs: $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$WORK")"
		echo "RUNTIME=$RUNTIME MODES_WANTED=$MODES_WANTED QUIET_MAX_WAIT=$QUIET_MAX_WAIT AIO_QD=$AIO_QD"
		echo "layout:"
		layout_print
	} >"$OUT/env.txt"
}

env_record
log "run-fuse -> $OUT; targets: $TARGETS; $(layout_print | tail -1)"
build_thinfs || { log "thinfs build failed"; exit 1; }
for t in $TARGETS; do
	log "=== target $t (load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
	case $t in
	T) setup_T && suite_fuse; teardown_T ;;
	B) setup_B && suite_fuse; teardown_B ;;
	C) setup_C && suite_fuse; teardown_C ;;
	Tcow) setup_T Tcow && suite_cow_first; teardown_T ;;
	Ccow) setup_C Ccow && suite_cow_first; teardown_C ;;
	Tlong) setup_T Tlong $((LONG_GIB * 1024)) && suite_long; teardown_T ;;
	Clong) setup_C Clong $((LONG_GIB * 1024)) && suite_long; teardown_C ;;
	A) setup_A && suite_fuse; teardown_A ;;
	snap) suite_snap ;;
	*) log "unknown target $t" ;;
	esac
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

# one table: workload x mode, IOPS (4K) or MiB/s (1M), per target
/usr/bin/python3 - "$OUT/results.csv" >"$OUT/table.md" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if not r["workload"].startswith("prefill")]
targets = []
for r in rows:
    if r["target"] not in targets:
        targets.append(r["target"])
cell = {}
for r in rows:
    if r["status"] != "ok":
        v = r["status"]
    elif r["workload"].startswith(("seq",)):
        v = "%.0f MiB/s" % (float(r["bw_mbs"]) * 1e6 / 1048576)
    else:
        v = "%.1fk" % (float(r["iops"]) / 1000)
    cell[(r["workload"], r["mode"], r["target"])] = v
keys = []
for r in rows:
    k = (r["workload"], r["mode"])
    if k not in keys:
        keys.append(k)
print("| workload | mode | " + " | ".join(targets) + " |")
print("|---|---|" + "---|" * len(targets))
for w, m in keys:
    print("| %s | %s | %s |" % (w, m, " | ".join(cell.get((w, m, t), "") for t in targets)))
EOF
log "table: $OUT/table.md"
cat "$OUT/table.md"
[[ -f $OUT/snaptime.csv ]] && cat "$OUT/snaptime.csv"
# issue 10's targets, met or not, from what this run took
/usr/bin/python3 "$root/bench/issue10-table.py" "$OUT" >"$OUT/issue10-table.md" &&
	log "issue 10 targets: $OUT/issue10-table.md"
exit 0
