#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The thinfs test command (README.md, .ci/run): install dependencies, build,
# run every test.  From any directory:
#
#     scripts/test.sh
#
# Steps, each counted in the closing "N passed, M failed" line:
#   1. scripts/install-deps.sh (apt-get; skipped with THINFS_SKIP_DEPS=1)
#   2. build/       normal build, warnings fatal; meson unit tests; pytest
#   3. build-asan/  ASan + UBSan build (warnings not fatal there: GCC's
#                   sanitizers make some spurious); unit tests; pytest again
#   4. build-fuzz/  clang + libFuzzer, each fuzz target for a short while
#                   (only when fuzz/ has sources)
# A build that fails counts as one failure and its tests are not run.  A
# test runner that ran no test (meson with no tests, pytest exit 5) counts
# as a failure too.  Exit status 0 only when nothing failed.
#
# Environment:
#   THINFS_SKIP_DEPS=1        do not run install-deps.sh
#   THINFS_SKIP_ASAN=1        skip step 3
#   THINFS_SKIP_FUZZ=1        skip step 4
#   THINFS_FUZZ_SECONDS=N     time per fuzz target (default 60)
#   THINFS_PYTEST_ARGS="..."  extra pytest arguments (e.g. "-k dump -x")
# pytest gets THINFS_BIN (the thinfs tool of the build under test) and
# THINFS_BUILD_DIR (that build directory), both absolute.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$PWD
python=/usr/bin/python3 # never a pyenv/venv python: pytest comes from Debian
fuzz_seconds=${THINFS_FUZZ_SECONDS:-60}
read -r -a pytest_extra <<<"${THINFS_PYTEST_ARGS:-}"

passed=0
failed=0
skipped=0
failures=()
start=$SECONDS

# Sanitizer reports must fail the run and be told apart from a tool's own
# exit status (thinfs check exits 1 for "problems found"): exit 86.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:exitcode=86:print_summary=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=86:print_summary=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-exitcode=86}

step() {
	printf '\n==== %s  (%ds)\n' "$*" $((SECONDS - start))
}

fail() {
	failed=$((failed + 1))
	failures+=("$1")
	echo "FAILED: $1"
}

# setup_build DIR MESON_OPTION... : configure (or reconfigure) and compile.
setup_build() {
	local dir=$1
	shift
	local log
	log=$(mktemp)
	if [[ -f $dir/meson-private/coredata.dat ]] &&
		meson setup --reconfigure "$dir" "$@" >"$log" 2>&1; then
		:
	else
		rm -rf "$dir"
		if ! meson setup "$dir" "$@" >"$log" 2>&1; then
			cat "$log"
			rm -f "$log"
			fail "meson setup $dir"
			return 1
		fi
	fi
	mv "$log" "$dir/meson-logs/setup.log" 2>/dev/null || rm -f "$log"
	if ! meson compile -C "$dir"; then
		fail "build $dir"
		return 1
	fi
}

# count_meson DIR RC : add the results of the last `meson test` in DIR.
count_meson() {
	local dir=$1 rc=$2 counts p f s
	counts=$("$python" - "$dir/meson-logs/testlog.json" <<'PY'
import json, sys
p = f = s = 0
try:
    with open(sys.argv[1]) as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line).get("result", "")
            if r in ("OK", "EXPECTEDFAIL"):
                p += 1
            elif r == "SKIP":
                s += 1
            else:
                f += 1
except FileNotFoundError:
    pass
print(p, f, s)
PY
	) || counts="0 0 0"
	read -r p f s <<<"$counts"
	passed=$((passed + p))
	skipped=$((skipped + s))
	if ((f > 0)); then
		failed=$((failed + f))
		failures+=("$f unit test(s) in $dir")
	fi
	if ((p + f + s == 0)); then
		fail "meson test -C $dir ran no test"
	elif ((rc != 0 && f == 0)); then
		fail "meson test -C $dir exited $rc"
	fi
}

run_unit_tests() {
	local dir=$1
	shift
	step "unit tests ($dir)"
	rm -f "$dir/meson-logs/testlog.json"
	meson test -C "$dir" --print-errorlogs "$@"
	count_meson "$dir" $?
}

# count_pytest XML RC LABEL
count_pytest() {
	local xml=$1 rc=$2 label=$3 counts p f s
	counts=$("$python" - "$xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
p = f = s = 0
try:
    root = ET.parse(sys.argv[1]).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    for ts in suites:
        n = int(ts.get("tests", 0))
        bad = int(ts.get("failures", 0)) + int(ts.get("errors", 0))
        sk = int(ts.get("skipped", 0))
        f += bad
        s += sk
        p += max(n - bad - sk, 0)
except (OSError, ET.ParseError):
    pass
print(p, f, s)
PY
	) || counts="0 0 0"
	read -r p f s <<<"$counts"
	passed=$((passed + p))
	skipped=$((skipped + s))
	if ((f > 0)); then
		failed=$((failed + f))
		failures+=("$f pytest test(s) against $label")
	fi
	case $rc in
	0) ((p + f + s > 0)) || fail "pytest against $label ran no test" ;;
	1) ((f > 0)) || fail "pytest against $label exited 1" ;;
	5) fail "pytest against $label collected no test (exit 5)" ;;
	*) fail "pytest against $label exited $rc" ;;
	esac
}

run_pytest() {
	local dir=$1 xml=$root/$1/pytest-junit.xml rc
	step "pytest tests/integration ($dir)"
	rm -f "$xml"
	if [[ ! -x $python ]]; then
		fail "pytest against $dir: $python missing"
		return
	fi
	THINFS_BIN=$root/$dir/tools/thinfs THINFS_BUILD_DIR=$root/$dir \
		"$python" -m pytest tests/integration -ra -p no:cacheprovider \
		--junitxml="$xml" "${pytest_extra[@]}" </dev/null
	rc=$?
	count_pytest "$xml" "$rc" "$dir"
}

run_fuzz() {
	local dir=build-fuzz t name corpus n=0 rc
	step "fuzz build ($dir, clang, -Dfuzz=true)"
	# The compiler of a build dir is fixed at its first setup: a build-fuzz/
	# made with gcc is rebuilt from scratch.
	# (meson 1.0's introspect cannot tell the compiler; its setup log can)
	if [[ -d $dir ]] && ! grep -qs '^C compiler for the host machine: .*clang' \
		"$dir/meson-logs/meson-log.txt"; then
		rm -rf "$dir"
	fi
	CC=clang setup_build "$dir" -Dfuzz=true -Dwerror=true -Db_lundef=false || return
	mkdir -p "$dir/fuzz-artifacts"
	while IFS= read -r t; do
		name=$(basename "$t")
		n=$((n + 1))
		step "fuzz $name for ${fuzz_seconds}s"
		corpus=$dir/fuzz-corpus/$name
		mkdir -p "$corpus"
		local seeds=()
		[[ -d fuzz/corpus/$name ]] && seeds=("fuzz/corpus/$name")
		# New inputs go to the scratch corpus, never into the tree.
		"$t" -max_total_time="$fuzz_seconds" -timeout=10 -rss_limit_mb=2048 \
			-print_final_stats=1 -artifact_prefix="$dir/fuzz-artifacts/$name-" \
			"$corpus" "${seeds[@]}" </dev/null 2>"$dir/fuzz-$name.log"
		rc=$?
		if ((rc == 0)); then
			grep -E '^(Done|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' \
				"$dir/fuzz-$name.log"
			passed=$((passed + 1))
		else
			tail -n 60 "$dir/fuzz-$name.log"
			fail "fuzz target $name exited $rc (log $dir/fuzz-$name.log, reproducer in $dir/fuzz-artifacts/)"
		fi
	done < <(find "$dir/fuzz" -maxdepth 1 -type f -perm -u+x | sort)
	((n > 0)) || fail "fuzz/ has sources but $dir/fuzz built no fuzz target"
}

# ---- 1. dependencies ----------------------------------------------------
if [[ ${THINFS_SKIP_DEPS:-0} == 1 ]]; then
	step "dependencies: skipped (THINFS_SKIP_DEPS=1)"
else
	step "dependencies"
	scripts/install-deps.sh || fail "scripts/install-deps.sh"
fi

# ---- 2. normal build ----------------------------------------------------
step "build (build/, -Dwerror=true)"
if setup_build build -Dwerror=true -Db_sanitize=none -Dfuzz=false; then
	run_unit_tests build
	run_pytest build
fi

# ---- 3. sanitizer build -------------------------------------------------
if [[ ${THINFS_SKIP_ASAN:-0} == 1 ]]; then
	step "ASan+UBSan: skipped (THINFS_SKIP_ASAN=1)"
else
	# Not -Werror: GCC's sanitizer instrumentation makes some warnings
	# (-Warray-bounds, -Wmaybe-uninitialized, ...) spurious, as its manual
	# says.  Warnings are fatal in build/ (gcc) and build-fuzz/ (clang).
	step "build (build-asan/, ASan+UBSan)"
	if setup_build build-asan -Dwerror=false -Db_sanitize=address,undefined \
		-Db_lundef=false -Dfuzz=false; then
		run_unit_tests build-asan --timeout-multiplier 3
		run_pytest build-asan
	fi
fi

# ---- 4. fuzz --------------------------------------------------------------
if [[ ${THINFS_SKIP_FUZZ:-0} == 1 ]]; then
	step "fuzz: skipped (THINFS_SKIP_FUZZ=1)"
elif compgen -G 'fuzz/*.c' >/dev/null; then
	run_fuzz
else
	step "fuzz: no fuzz target in fuzz/ yet"
fi

# ---- summary --------------------------------------------------------------
step "summary"
((skipped > 0)) && echo "$skipped test(s) skipped"
for f in "${failures[@]}"; do
	echo "  failed: $f"
done
if ((passed + failed == 0)); then
	fail "no test ran at all"
fi
echo "$passed passed, $failed failed"
((failed == 0))
