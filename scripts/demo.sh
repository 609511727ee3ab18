#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The thinfs demo (README.md, "Quick start"): install dependencies, build,
# and start a pool on sparse backing files, with one thin volume in it.
#
#     scripts/demo.sh [BACKING_DIR [MOUNTPOINT]]
#
#   BACKING_DIR  where the sparse metadata and data files, pool.cfg and the
#                catalog go (default /var/tmp/thinfs-demo)
#   MOUNTPOINT   where the pool is mounted (default /mnt/thinfs-demo)
#
# Steps: scripts/install-deps.sh (skipped with THINFS_SKIP_DEPS=1), build
# build/ with meson, create BACKING_DIR/meta.img (64 MiB) and data.img
# (16 GiB, both sparse: they take almost no space), write pool.cfg, `thinfs
# mkpool` unless a pool is there already, `thinfs mount` (the daemon goes
# to the background), create the 1 GiB volume vm1 unless it exists, and
# print how to use, unmount and remove it all.  Running it again is safe:
# a mounted pool is left as it is and the script says so.
#
# Needs root (mounting, /run/thinfs for the control socket); re-runs itself
# with sudo otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$PWD
backing=${1:-/var/tmp/thinfs-demo}
mnt=${2:-/mnt/thinfs-demo}

if ((EUID != 0)); then
	if command -v sudo >/dev/null 2>&1; then
		echo "demo: re-running as root with sudo (mounting needs it)"
		exec sudo --preserve-env=THINFS_SKIP_DEPS "$0" "$@"
	fi
	echo "demo: run as root (sudo is not installed)" >&2
	exit 1
fi

say() { printf 'demo: %s\n' "$*"; }

is_mounted() {
	local want
	want=$(realpath -m "$1")
	# /proc/self/mountinfo field 5 is the mountpoint (octal escapes for spaces)
	awk -v m="$want" '{ gsub(/\\040/, " ", $5); if ($5 == m) found = 1 } END { exit !found }' \
		/proc/self/mountinfo
}

thinfs=$root/build/tools/thinfs
ctl=$root/build/tools/thinfs-ctl
backing=$(realpath -m "$backing")
mnt=$(realpath -m "$mnt")
cfg=$backing/pool.cfg

print_usage() {
	cat <<EOF

thinfs demo pool mounted at: $mnt
  backing files:  $backing (meta.img, data.img, catalog.db, pool.cfg)
  volume:         $mnt/vm1 (1 GiB virtual, thin)

Try:
  ls -ls $mnt
  $ctl $mnt status
  losetup -f --show $mnt/vm1
  mkdir $mnt/.snapshots/first
  $ctl $mnt snapshot vm1 vm1-clone
  truncate -s 20G $mnt/vm2

The daemon logs to syslog (journalctl -t thinfs); \`thinfs mount -f\` stays in the
foreground and logs to stderr instead.

Stop:      fusermount3 -u $mnt       (detach loop devices over its volumes first)
Clean up:  fusermount3 -u $mnt; rm -rf $backing; rmdir $mnt
EOF
}

if is_mounted "$mnt"; then
	say "$mnt is already mounted; leaving it as it is"
	print_usage
	exit 0
fi

# ---- dependencies and build -------------------------------------------------
if [[ ${THINFS_SKIP_DEPS:-0} != 1 ]]; then
	scripts/install-deps.sh
fi
if [[ ! -f build/meson-private/coredata.dat ]]; then
	say "configuring build/"
	meson setup build >/dev/null
fi
say "building build/"
meson compile -C build >/dev/null
for b in "$thinfs" "$ctl"; do
	if [[ ! -x $b ]]; then
		echo "demo: $b was not built" >&2
		exit 1
	fi
done

# ---- backing files, pool.cfg, mkpool ------------------------------------------
mkdir -p "$backing" "$mnt"
[[ -e $backing/meta.img ]] || truncate -s 64M "$backing/meta.img"
[[ -e $backing/data.img ]] || truncate -s 16G "$backing/data.img"
if [[ ! -e $cfg ]]; then
	cat >"$cfg" <<EOF
; thinfs demo pool (scripts/demo.sh); keys: README.md, "pool.cfg reference"
[pool]
metadata = meta.img
data = data.img
catalog = catalog.db
block_size = 64k
EOF
	say "wrote $cfg"
fi
if "$thinfs" check -q "$backing/meta.img" 2>/dev/null; then
	say "pool in $backing exists already"
else
	say "formatting the pool (thinfs mkpool $cfg)"
	"$thinfs" mkpool "$cfg"
fi

# ---- mount, volume -----------------------------------------------------------------
say "mounting at $mnt (thinfs mount $cfg $mnt)"
"$thinfs" mount "$cfg" "$mnt"
if [[ ! -e $mnt/vm1 ]]; then
	truncate -s 1G "$mnt/vm1"
	say "created volume vm1 (1 GiB)"
fi
"$ctl" "$mnt" status
print_usage
