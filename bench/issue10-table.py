#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Issue 10's target table from one bench/run-fuse.sh run
(`run-fuse.sh T B C Tcow Ccow Tlong Clong snap`):

    bench/issue10-table.py RESULTS_DIR > table.md

One row per target of the issue: thinfs (T), libfuse passthrough_ll (B) and
qemu-storage-daemon (C) from the same run, the ratio to the better peer, the
target and whether it is met, and the bytes thinfs's data device moved in
that job (status --json io.data, thinfs-io.csv)."""
import csv
import os
import sys

out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
io = {}
io_path = os.path.join(out, "thinfs-io.csv")
if os.path.exists(io_path):
    for r in csv.DictReader(open(io_path)):
        key = (r["target"], r["workload"], r["mode"])
        io[key] = (int(r["read1"]) - int(r["read0"]), int(r["write1"]) - int(r["write0"]))


def result(target, workload, mode):
    for r in rows:
        if (r["target"], r["workload"], r["mode"]) == (target, workload, mode) and r["status"] == "ok":
            return r
    return None


def value(r, mib):
    if r is None:
        return None
    return float(r["bw_mbs"]) * 1e6 / 1048576 if mib else float(r["iops"])


def fmt(v, mib):
    if v is None:
        return "-"
    return "%.0f MiB/s" % v if mib else "%.1fk" % (v / 1000)


def dev_bytes(target, workload, mode):
    b = io.get((target, workload, mode))
    if not b:
        return "-"
    return "%.0f / %.0f MiB" % (b[0] / 1048576, b[1] / 1048576)


print("| workload | mode | T | B | C | T / better peer | target | met? | T data device read / written |")
print("|---|---|---|---|---|---|---|---|---|")


def row(label, workload, mode, mib, need, peers=("B", "C"), t="T", names=None):
    names = names or {}
    t_r = result(t, workload, mode)
    tv = value(t_r, mib)
    pv = {p: value(result(p, workload, mode), mib) for p in peers}
    best = max((v for v in pv.values() if v is not None), default=None)
    ratio = tv / best if tv is not None and best else None
    met = "-" if ratio is None else ("yes" if ratio >= need else "**no**")
    cells = [fmt(tv, mib)] + [fmt(pv.get(p), mib) if p in pv else "" for p in ("B", "C")]
    print("| %s | %s | %s | %s | %s | %s | >= %sx | %s | %s |" % (
        label, mode, *cells, "-" if ratio is None else "%.2fx" % ratio, need, met,
        dev_bytes(t, workload, mode)))
    return t_r


for mode in ("aio", "psync"):
    need = 1.5
    row("randwrite-alloc 4 KiB", "randwrite-alloc-nj1", mode, False, need)
    row("randwrite-over 4 KiB", "randwrite-over", mode, False, need)
    if mode == "aio":
        row("randread 4 KiB", "randread", mode, False, need)
for mode in ("aio", "psync"):
    row("seqwrite-alloc 1 MiB", "seqwrite-alloc", mode, True, 0.9)
    row("seqwrite-over 1 MiB", "seqwrite-over", mode, True, 0.9)
    row("seqread 1 MiB", "seqread", mode, True, 0.9)

def row_vs_c(label, t_name, c_name, workload, need):
    """A job run only against qemu (C): T's own target name and C's."""
    t, c = result(t_name, workload, "aio"), result(c_name, workload, "aio")
    tv, cv = value(t, False), value(c, False)
    ratio = tv / cv if tv and cv else None
    print("| %s | aio | %s | | %s | %s (vs C) | >= %sx | %s | %s |" % (
        label, fmt(tv, False), fmt(cv, False), "-" if ratio is None else "%.2fx" % ratio, need,
        "-" if ratio is None else ("yes" if ratio >= need else "**no**"),
        dev_bytes(t_name, workload, "aio")))
    return t, c


# The long allocating job, and its latency spread.
t, c = row_vs_c("randwrite-alloc 4 KiB, 24 GiB, 40 s", "Tlong", "Clong", "randwrite-alloc-long", 1.5)
if t:
    p50, p999 = float(t["lat_p50_us"]), float(t["lat_p999_us"])
    c_lat = "%.0f / %.0f us" % (float(c["lat_p999_us"]), float(c["lat_p50_us"])) if c else "-"
    print("| the same, p99.9 / p50 | | %.0f / %.0f us | | %s | %.1fx (T) | <= 3x | %s | |" % (
        p999, p50, c_lat, p999 / p50, "yes" if p999 <= 3 * p50 else "**no**"))
# First writes to blocks shared with a snapshot.
row_vs_c("first write to a snapshot-shared block 4 KiB", "Tcow", "Ccow", "randwrite-cow-nj1", 3)

# Snapshot creation: the largest mapped size taken.
snap = os.path.join(out, "snaptime.csv")
if os.path.exists(snap):
    by_size = {}
    for r in csv.DictReader(open(snap)):
        by_size.setdefault((r["label"], int(r["data_gib"])), []).append(float(r["mkdir_ms"]))
    for (label, g), ms in sorted(by_size.items(), key=lambda kv: kv[0][1]):
        worst = max(ms)
        print("| snapshot creation (mkdir), %d GiB mapped%s | | %s ms (worst of %d) | | | | < 10 ms | %s | |" % (
            g, " (sparse)" if label == "snap-sparse" else "",
            " / ".join("%.1f" % m for m in ms), len(ms), "yes" if worst < 10 else "**no**"))
