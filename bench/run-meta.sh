#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build and run the metadata engine benchmark (bench/meta-bench.c) in an
# optimised, unsanitised build directory of its own, build-bench/.
# Arguments go to meta-bench (e.g. --n 200000, --mem, --cache-blocks 4096).
# Prints the machine, the commit and a markdown table for bench/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dir=build-bench
if [[ ! -f $dir/meson-private/coredata.dat ]]; then
	meson setup "$dir" --buildtype=release -Db_sanitize=none >/dev/null
fi
meson compile -C "$dir" meta-bench >/dev/null

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
echo "machine: ${cpu:-unknown CPU}, $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -sr)"
echo "load:    $(cut -d" " -f1-3 /proc/loadavg) (1, 5, 15 min; figures are only comparable on an idle machine)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
echo "build:   $(meson introspect --buildoptions "$dir" | /usr/bin/python3 -c 'import json,sys; o={x["name"]: x["value"] for x in json.load(sys.stdin)}; print(o["buildtype"], "b_sanitize=" + o["b_sanitize"])')"
echo
# The metadata file goes in the build directory (a real disk, not tmpfs,
# so the cold-cache figures read from the device).
exec "$dir/bench/meta-bench" --file "$dir/meta-bench.img" "$@"
