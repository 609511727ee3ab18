#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install every Debian 12 package thinfs needs to build and run its tests.
#
# Idempotent: when every package is already installed (checked with
# dpkg-query) it does nothing and never touches apt.  Otherwise it runs
# `apt-get update` and one non-interactive `apt-get install`.  Run it as
# root; as another user it uses sudo for the apt-get calls.
#
#   scripts/install-deps.sh          install what is missing
#   scripts/install-deps.sh --list   print the package list and exit
set -euo pipefail

packages=(
	# toolchain and build system
	build-essential meson ninja-build pkg-config
	# clang builds the libFuzzer targets (fuzz/); libclang-rt-dev holds
	# libFuzzer and the clang sanitizer runtimes, only a Recommends of clang
	clang libclang-rt-dev
	# libraries (the -dev packages pull in their runtime libraries)
	libfuse3-dev libcmocka-dev libsqlite3-dev libblkid-dev libinih-dev
	libjson-c-dev libsystemd-dev libexpat1-dev
	# runtime tools the tests drive (mount has losetup)
	fuse3 thin-provisioning-tools fio e2fsprogs util-linux mount
	# the pytest integration suite (run with /usr/bin/python3)
	python3 python3-pytest python3-hypothesis
)

if [[ "${1:-}" == "--list" ]]; then
	printf '%s\n' "${packages[@]}"
	exit 0
fi

missing=()
for p in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
	# "ii " = installed and configured; anything else needs apt-get.
	[[ "$status" == "ii "* ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
	echo "install-deps: all ${#packages[@]} packages already installed"
	exit 0
fi

as_root=()
if ((EUID != 0)); then
	if ! command -v sudo >/dev/null 2>&1; then
		echo "install-deps: missing packages: ${missing[*]}" >&2
		echo "install-deps: run as root (sudo is not installed)" >&2
		exit 1
	fi
	as_root=(sudo --preserve-env=DEBIAN_FRONTEND)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	"${missing[@]}" </dev/null
echo "install-deps: done"
