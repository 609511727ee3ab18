#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Issue 10: 1 MiB buffered sequential reads of a thin volume against the
# mount's read-ahead (/sys/class/bdi/MAJ:MIN/read_ahead_kb), written
# between passes; host caches dropped before each.  Root.
#
#   sudo bench/run-readahead.sh            # RA_KBS="128 1024 4096 16384" ROUNDS=2
#   BIN=path/to/thinfs sudo -E bench/run-readahead.sh
set -u
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${RA_KBS:=128 1024 4096 16384}" "${ROUNDS:=2}" "${WORK:=/var/tmp/thinfs-bench-ra}"
if [[ -z ${BIN:-} ]]; then
	meson setup "$root/build-bench-ra" "$root" --buildtype=release -Db_sanitize=none >/dev/null 2>&1
	meson compile -C "$root/build-bench-ra" thinfs >/dev/null || exit 1
	BIN=$root/build-bench-ra/tools/thinfs
fi
rm -rf "$WORK"; mkdir -p "$WORK/pool" "$WORK/mnt"
cd "$WORK/pool" || exit 1
truncate -s 256M meta.img; truncate -s 2G data.img
printf '[pool]\nmetadata = meta.img\ndata = data.img\ncatalog = catalog.db\nblock_size = 64k\n' >pool.cfg
"$BIN" mkpool pool.cfg >/dev/null || exit 1
"$BIN" mount pool.cfg "$WORK/mnt" -f >"$WORK/daemon.log" 2>&1 &
pid=$!
trap 'fusermount3 -u "$WORK/mnt" 2>/dev/null; wait $pid; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
truncate -s 1G "$WORK/mnt/vol"
fio --eta=never --name=fill --filename="$WORK/mnt/vol" --ioengine=libaio --direct=1 --iodepth=16 \
	--rw=write --bs=1M --size=1G >/dev/null || exit 1
knob=/sys/class/bdi/$(mountpoint -d "$WORK/mnt")/read_ahead_kb
echo "load $(cut -d' ' -f1-3 /proc/loadavg); the mount's read_ahead_kb: $(cat "$knob")"
for round in $(seq "$ROUNDS"); do
	for ra in $RA_KBS; do
		echo "$ra" >"$knob"
		sync; echo 3 >/proc/sys/vm/drop_caches
		mibs=$(fio --eta=never --name=read --filename="$WORK/mnt/vol" --ioengine=psync --direct=0 \
			--rw=read --bs=1M --size=1G --output-format=json |
			python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['bw']/1024))")
		echo "round $round read_ahead_kb=$ra: $mibs MiB/s"
	done
done
