#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Long-running reliability soaks (not part of scripts/test.sh or CI).  From
# any directory, as root (FUSE mounts, /run/thinfs):
#
#     scripts/soak.sh crash [N]          N kill-and-remount iterations (default 200)
#     scripts/soak.sh powercut [N]       the same with fault power-cut (default 200)
#     scripts/soak.sh stress [MINUTES]   fio --verify under snapshots, status polls,
#                                        suspend/resume (default 10)
#     scripts/soak.sh fuzz [MINUTES]     every fuzz target for MINUTES each (default 10)
#
# What each one does and checks: docs/reliability.md.  crash, powercut and
# stress use build-soak/ (an optimised build of their own, so build/ is left
# alone); fuzz uses build-fuzz/ as scripts/test.sh does.  Each prints a
# summary ending "RESULT: ok" or "RESULT: FAILED" and exits non-zero on any
# failure.
#
# Environment:
#   THINFS_SOAK_DIR=DIR     where pools, logs and kept failures go
#                           (default /var/tmp/thinfs-soak-MODE-<time>); a
#                           passing run removes it (stress keeps its figures
#                           and logs, without the pool), a failing one keeps it
#   THINFS_SOAK_ASAN=1      run the daemon from build-soak-asan/ (ASan + UBSan)
#                           instead: slower, but a sanitizer report in a
#                           daemon log counts as a crash
#   THINFS_SOAK_ARGS="..."  extra arguments for scripts/soak.py (crash, powercut,
#                           stress), e.g. "--seed 42 --stop-on-failure"
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
python=/usr/bin/python3

usage() {
	sed -n '4,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

positive_int() {
	[[ $1 =~ ^[1-9][0-9]*$ ]] || {
		echo "soak.sh: $2 must be a positive whole number, not '$1'" >&2
		exit 2
	}
}

build_soak() {
	local dir=$1 sanitize=none werror=true
	if [[ $dir == build-soak-asan ]]; then
		# as scripts/test.sh's build-asan: GCC's sanitizers make some warnings spurious
		sanitize=address,undefined
		werror=false
	fi
	if [[ ! -f $dir/meson-private/coredata.dat ]]; then
		meson setup "$dir" -Dbuildtype=debugoptimized -Dwerror=$werror \
			-Db_sanitize=$sanitize -Db_lundef=false -Dfuzz=false >/dev/null || return 1
	fi
	meson compile -C "$dir" >/dev/null || {
		meson compile -C "$dir"
		return 1
	}
}

# fuzz MINUTES: build build-fuzz/ (clang, libFuzzer) as scripts/test.sh step
# 4 does, then run every target in it for MINUTES each.
run_fuzz() {
	local minutes=$1 dir=build-fuzz t name corpus rc failed=0 n=0 seeds
	# (meson 1.0's introspect cannot tell the compiler; its setup log can)
	if [[ -d $dir ]] && ! grep -qs '^C compiler for the host machine: .*clang' \
		"$dir/meson-logs/meson-log.txt"; then
		rm -rf "$dir"
	fi
	if [[ -f $dir/meson-private/coredata.dat ]]; then
		meson setup --reconfigure "$dir" -Dfuzz=true -Dwerror=true -Db_lundef=false >/dev/null
	else
		CC=clang meson setup "$dir" -Dfuzz=true -Dwerror=true -Db_lundef=false >/dev/null
	fi || {
		echo "soak.sh: meson setup $dir failed" >&2
		return 1
	}
	meson compile -C "$dir" || return 1
	mkdir -p "$dir/fuzz-artifacts"
	export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:print_summary=1}
	while IFS= read -r t; do
		name=$(basename "$t")
		n=$((n + 1))
		corpus=$dir/fuzz-corpus/$name
		mkdir -p "$corpus"
		seeds=()
		[[ -d fuzz/corpus/$name ]] && seeds=("fuzz/corpus/$name")
		echo "$(date +%T) fuzz $name for ${minutes} min (log $dir/soak-$name.log)"
		"$t" -max_total_time=$((minutes * 60)) -timeout=10 -rss_limit_mb=2048 \
			-print_final_stats=1 -artifact_prefix="$dir/fuzz-artifacts/$name-" \
			"$corpus" "${seeds[@]}" </dev/null 2>"$dir/soak-$name.log"
		rc=$?
		grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' \
			"$dir/soak-$name.log" | sed 's/^/    /'
		if ((rc != 0)); then
			failed=$((failed + 1))
			tail -n 40 "$dir/soak-$name.log"
			echo "    FAILED: $name exited $rc (reproducer in $dir/fuzz-artifacts/)"
		fi
	done < <(find "$dir/fuzz" -maxdepth 1 -type f -perm -u+x | sort)
	echo
	echo "==== fuzz soak summary: $n target(s), ${minutes} min each, $failed failed"
	((n > 0)) || {
		echo "no fuzz target was built"
		failed=1
	}
	if ((failed == 0)); then echo "RESULT: ok"; else echo "RESULT: FAILED"; fi
	((failed == 0))
}

mode=${1:-}
case $mode in
crash | powercut) size=${2:-200} ;;
stress | fuzz) size=${2:-10} ;;
*) usage ;;
esac
positive_int "$size" "${mode} size"
(($# <= 2)) || usage

if [[ $mode == fuzz ]]; then
	run_fuzz "$size"
	exit
fi

if [[ $(id -u) != 0 ]]; then
	echo "soak.sh: $mode mounts pools and needs root" >&2
	exit 2
fi
for tool in fusermount3 thin_check; do
	command -v $tool >/dev/null || {
		echo "soak.sh: $tool is missing (scripts/install-deps.sh)" >&2
		exit 2
	}
done
[[ $mode != stress ]] || command -v fio >/dev/null || {
	echo "soak.sh: fio is missing (apt-get install fio)" >&2
	exit 2
}
build=build-soak
if [[ ${THINFS_SOAK_ASAN:-0} == 1 ]]; then
	build=build-soak-asan
	# reports go to the daemon's log, where the soak looks for them
	export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:exitcode=86:print_summary=1}
	export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=86:print_summary=1}
fi
build_soak $build || {
	echo "soak.sh: building $build/ failed" >&2
	exit 1
}
workdir=${THINFS_SOAK_DIR:-/var/tmp/thinfs-soak-$mode-$(date +%Y%m%d-%H%M%S)}
read -r -a extra <<<"${THINFS_SOAK_ARGS:-}"
echo "soak.sh $mode $size on $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '+changes'), in $workdir"
"$python" scripts/soak.py "$mode" "$size" --build $build --workdir "$workdir" "${extra[@]}"
rc=$?
if ((rc == 0)); then
	# stress keeps its figures (rss.csv, fio.json, the daemon log)
	if [[ $mode == stress ]]; then rm -rf "$workdir/pool"; else rm -rf "$workdir"; fi
else
	echo "kept for debugging: $workdir"
fi
exit $rc
