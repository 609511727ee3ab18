#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# bench/run-memory.sh: the daemon's memory under a sustained load.
#
# Mounts a pool on sparse files in a temporary directory, runs one fio job
# on each of VOLS volumes (random read/write of mixed sizes, O_DIRECT,
# libaio), makes a snapshot group every SNAP_MS and removes the oldest so
# that KEEP groups remain, polls `status --json` every 200 ms, and samples
# the daemon's VmRSS, VmHWM and thread count from /proc every second.
# Prints the curve (one line per REPORT_S seconds) and, at the end, the
# mappings (pmap -x) grouped by kind and glibc's malloc_stats (via gdb,
# when it is installed).  Not a test: nothing checks the figures.
#
#   bench/run-memory.sh [MINUTES] [KEY=VALUE ...]    # KEY=VALUE lines go to [pool]
#   bench/run-memory.sh 8                           # the recorded run
#   bench/run-memory.sh 3 metadata_cache=1m         # a smaller metadata cache
#
# Environment: THINFS_BIN (default build/tools/thinfs), THINFS_CTL_BIN
# (default beside it), VOLS (4), VOL_MIB (256: the region each fio job
# uses), IODEPTH (4), SNAP_MS (100), KEEP (3), REPORT_S (30), WORK (a new
# directory under /var/tmp, removed at the end), DAEMON_ENV (variables for
# the daemon only, e.g. "MALLOC_ARENA_MAX=8" to compare glibc settings).
# Needs /dev/fuse, fio and jq.  It ends only the processes it started, by
# pid, and unmounts only its own mountpoint.
set -u

MINUTES=${1:-8}
shift || true
TOP=$(cd "$(dirname "$0")/.." && pwd)
THINFS_BIN=${THINFS_BIN:-$TOP/build/tools/thinfs}
THINFS_CTL_BIN=${THINFS_CTL_BIN:-$(dirname "$THINFS_BIN")/thinfs-ctl}
VOLS=${VOLS:-4}
VOL_MIB=${VOL_MIB:-256}
IODEPTH=${IODEPTH:-4}
SNAP_MS=${SNAP_MS:-100}
KEEP=${KEEP:-3}
REPORT_S=${REPORT_S:-30}
DAEMON_ENV=${DAEMON_ENV:-}
DAEMON_WRAP=${DAEMON_WRAP:-}

for tool in fio jq "$THINFS_BIN" "$THINFS_CTL_BIN"; do
	command -v "$tool" >/dev/null || { echo "run-memory: $tool not found" >&2; exit 2; }
done
WORK=${WORK:-$(mktemp -d /var/tmp/thinfs-memory.XXXXXX)}
mkdir -p "$WORK/mnt"
MNT=$WORK/mnt
PIDS=""
DAEMON=""

cleanup() {
	local p
	for p in $PIDS; do kill "$p" 2>/dev/null; done
	for p in $PIDS; do wait "$p" 2>/dev/null; done
	if mountpoint -q "$MNT"; then
		fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || umount -l "$MNT"
	fi
	if [[ -n $DAEMON ]]; then
		for _ in $(seq 1 300); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
		kill "$DAEMON" 2>/dev/null
		wait "$DAEMON"
		rc=$?
		if ((rc != 0)); then
			echo "run-memory: the daemon exited with status $rc; the end of its log:" >&2
			grep -v '^\(Arena\|system bytes\|in use bytes\|Total\|max mmap\)' "$WORK/daemon.log" | tail -20 >&2
			cp "$WORK/daemon.log" "${TMPDIR:-/tmp}/run-memory-daemon.log" &&
				echo "run-memory: its whole log: ${TMPDIR:-/tmp}/run-memory-daemon.log" >&2
		fi
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

truncate -s 64G "$WORK/data.img"
truncate -s 1G "$WORK/meta.img"
{
	echo "[pool]"
	echo "metadata = $WORK/meta.img"
	echo "data = $WORK/data.img"
	echo "block_size = 64k"
	for kv in "$@"; do echo "${kv%%=*} = ${kv#*=}"; done
} >"$WORK/pool.cfg"
"$THINFS_BIN" mkpool "$WORK/pool.cfg" >/dev/null || exit 1
# shellcheck disable=SC2086
env $DAEMON_ENV $DAEMON_WRAP "$THINFS_BIN" mount "$WORK/pool.cfg" "$MNT" -f 2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 1 200); do mountpoint -q "$MNT" && stat "$MNT/." >/dev/null 2>&1 && break; sleep 0.05; done
mountpoint -q "$MNT" || { echo "run-memory: the pool did not mount" >&2; cat "$WORK/daemon.log" >&2; exit 1; }

SECS=${SECS:-$((MINUTES * 60))} # SECS overrides, for a quick try
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary:  $THINFS_BIN"
echo "commit:  $(git -C "$TOP" rev-parse --short HEAD 2>/dev/null)$(git -C "$TOP" diff --quiet 2>/dev/null || echo ' (modified)')"
echo "run:     $((SECS / 60)) min $((SECS % 60)) s, $VOLS volumes x $VOL_MIB MiB, fio randrw 4k/64k/1m iodepth $IODEPTH, snapshot every $SNAP_MS ms (keep $KEEP), status every 200 ms"
echo "pool:    $(grep -v '^\(\[pool\]\|metadata\|data\) ' "$WORK/pool.cfg" | paste -sd' ')${DAEMON_ENV:+, daemon env $DAEMON_ENV}"
echo "start:   VmRSS $(status_kib "$DAEMON" VmRSS) kB, threads $(status_kib "$DAEMON" Threads)"

for i in $(seq 1 "$VOLS"); do
	truncate -s "${VOL_MIB}M" "$MNT/vol$i"
	fio --eta=never --name="vol$i" --filename="$MNT/vol$i" --allow_file_create=0 \
		--ioengine=libaio --direct=1 --iodepth="$IODEPTH" --rw=randrw \
		--bssplit=4k/60:64k/30:1m/10 --size="${VOL_MIB}M" \
		--time_based --runtime="$SECS" >"$WORK/fio$i.log" 2>&1 &
	PIDS="$PIDS $!"
done

# snapshot groups: make one every SNAP_MS, keep the newest KEEP
(
	n=0
	while :; do
		n=$((n + 1))
		mkdir "$MNT/.snapshots/g$n" 2>/dev/null
		((n > KEEP)) && rmdir "$MNT/.snapshots/g$((n - KEEP))" 2>/dev/null
		sleep "$(awk -v m="$SNAP_MS" 'BEGIN{print m/1000}')"
	done
) &
PIDS="$PIDS $!"
(
	while :; do
		"$THINFS_CTL_BIN" "$MNT" status --json >/dev/null 2>&1
		sleep 0.2
	done
) &
PIDS="$PIDS $!"

printf '%6s %10s %10s %8s %8s %10s\n' "time_s" "VmRSS_MiB" "VmHWM_MiB" "threads" "groups" "meta_used"
peak_threads=0
t0=$(date +%s)
last=0
while :; do
	sleep 1
	t=$(($(date +%s) - t0))
	((t >= SECS)) && t=$SECS
	kill -0 "$DAEMON" 2>/dev/null || { echo "run-memory: the daemon died" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
	th=$(status_kib "$DAEMON" Threads)
	((th > peak_threads)) && peak_threads=$th
	if ((t / REPORT_S > last / REPORT_S || t == SECS)); then
		last=$t
		groups=$(find "$MNT/.snapshots" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
		meta=$("$THINFS_CTL_BIN" "$MNT" status --json 2>/dev/null | jq -r '.pool.metadata.used_blocks')
		printf '%6d %10.1f %10.1f %8d %8d %10s\n' "$t" \
			"$(awk -v k="$(status_kib "$DAEMON" VmRSS)" 'BEGIN{print k/1024}')" \
			"$(awk -v k="$(status_kib "$DAEMON" VmHWM)" 'BEGIN{print k/1024}')" \
			"$th" "$groups" "$meta"
	fi
	((t >= SECS)) && break
done

# the load stops here; the figures below are of the daemon at rest
for p in $PIDS; do kill "$p" 2>/dev/null; done
for p in $PIDS; do wait "$p" 2>/dev/null; done
PIDS=""
errs=$(grep -h "err=" "$WORK"/fio*.log | grep -cv "err= 0")
echo "fio:     $(grep -h 'WRITE: bw=' "$WORK"/fio*.log | sed 's/.*io=\([^,]*\),.*/\1/' | paste -sd' ') written; jobs with errors: $errs"
echo "peak threads: $peak_threads"
echo "after the load: VmRSS $(status_kib "$DAEMON" VmRSS) kB, VmHWM $(status_kib "$DAEMON" VmHWM) kB, threads $(status_kib "$DAEMON" Threads)"
echo "pmap -x (RSS kB by kind: heap = [heap], arena = anon 64 MiB-aligned heaps, stack = anon 8 MiB+guard, other anon, files):"
pmap -x "$DAEMON" | awk '
	$1 ~ /^[0-9a-f]+$/ && NF >= 6 {
		kb = $2; rss = $3
		if ($0 ~ /\[ heap \]/) k = "heap"
		else if ($0 ~ /\[ stack \]/) k = "stack"
		else if ($0 ~ /\[ anon \]/) {
			if (kb == 8192) k = "thread-stack"
			else if (kb >= 132 && kb <= 65536) k = "arena/mmap"
			else k = "anon-other"
		} else k = "file"
		sum[k] += rss; n[k]++
	}
	END { for (k in sum) printf "  %-12s %8d kB in %d mappings\n", k, sum[k], n[k] }'
if [[ ${MALLOC_STATS:-0} = 1 ]] && command -v gdb >/dev/null; then
	gdb -p "$DAEMON" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1
	echo "malloc_stats (from the daemon's stderr):"
	awk '/^Arena [0-9]+:/ {a++} /^Total \(incl. mmap\):/ {t=1} t && /system bytes|in use bytes/ {print "  " $0} /^max mmap/ {print "  " $0} END {print "  arenas: " a}' "$WORK/daemon.log"
fi
