# SPDX-License-Identifier: GPL-2.0-or-later
"""A small, slow, obviously-correct model of a dm-snapshot persistent COW
device, laid out as the kernel's persistent exception store writes it: the
SnAp header in chunk 0, metadata areas of (old_chunk, new_chunk) records
interleaved with data chunks, whole areas written, the next area zeroed when
one fills.

Written from ../shared/docs/ondisk-formats.md section 4, sharing no code
with src/meta/snap-store.c, so the two can check each other.  Tests use it
to make "a COW store written in the kernel's layout" and to read back what
thinfs wrote.

    python3 kernel_cow.py write COW SIZE CHUNK_SECTORS OLD...   # data: chunk_pattern
    python3 kernel_cow.py read COW                              # header and records, JSON
"""
import json
import struct
import sys

MAGIC = 0x70416E53
SECTOR = 512
RECORD = 16


def chunk_pattern(old_chunk, chunk_bytes):
    """The content a test gives the copy of origin chunk old_chunk."""
    word = b"chunk %020d\n" % old_chunk
    return (word * (chunk_bytes // len(word) + 1))[:chunk_bytes]


class Geometry:
    def __init__(self, chunk_sectors):
        self.chunk_sectors = chunk_sectors
        self.chunk_bytes = chunk_sectors * SECTOR
        self.per_area = self.chunk_bytes // RECORD
        self.stride = self.per_area + 1

    def area_chunk(self, area):
        return 1 + self.stride * area

    def offset(self, chunk):
        return chunk * self.chunk_bytes


def header(valid, chunk_sectors, version=1, magic=MAGIC):
    return struct.pack("<IIII", magic, 1 if valid else 0, version, chunk_sectors)


def write_cow(path, size, chunk_sectors, exceptions, valid=True):
    """Write a fresh COW device of size bytes holding exceptions, a list of
    (old_chunk, data) with data None for chunk_pattern.  Chunks are given
    out as the kernel does (from 2, stepping over areas), records go in in
    list order.  Returns the [(old_chunk, new_chunk)] written."""
    g = Geometry(chunk_sectors)
    next_free = 2
    records = []
    with open(path, "wb") as f:
        f.truncate(size)
        for old, data in exceptions:
            new = next_free
            next_free += 1
            if next_free % g.stride == 1:
                next_free += 1
            if (new + 1) * g.chunk_bytes > size:
                raise ValueError(f"{path}: no room for chunk {new}")
            f.seek(g.offset(new))
            f.write(data if data is not None else chunk_pattern(old, g.chunk_bytes))
            records.append((old, new))
        # Every area holding records, and the one after the last record
        # (zeroed: the kernel zeroes the next area whenever one fills).
        nr_areas = len(records) // g.per_area + 1
        for area in range(nr_areas):
            chunk = records[area * g.per_area:(area + 1) * g.per_area]
            body = b"".join(struct.pack("<QQ", o, n) for o, n in chunk)
            f.seek(g.offset(g.area_chunk(area)))
            f.write(body + bytes(g.chunk_bytes - len(body)))
        f.seek(0)
        f.write(header(valid, chunk_sectors) + bytes(g.chunk_bytes - RECORD))
    return records


def read_cow(path):
    """The header fields and the records, read as the kernel loads them."""
    with open(path, "rb") as f:
        magic, valid, version, chunk_sectors = struct.unpack("<IIII", f.read(16))
        out = {"magic": magic, "valid": valid, "version": version,
               "chunk_sectors": chunk_sectors, "records": []}
        if magic != MAGIC or not valid:
            return out
        g = Geometry(chunk_sectors)
        area = 0
        while True:
            f.seek(g.offset(g.area_chunk(area)))
            raw = f.read(g.chunk_bytes)
            for i in range(g.per_area):
                old, new = struct.unpack_from("<QQ", raw, i * RECORD)
                if new == 0:
                    return out
                out["records"].append((old, new))
            area += 1


def read_chunk(path, chunk_sectors, chunk):
    g = Geometry(chunk_sectors)
    with open(path, "rb") as f:
        f.seek(g.offset(chunk))
        return f.read(g.chunk_bytes)


def main(argv):
    if len(argv) >= 5 and argv[1] == "write":
        recs = write_cow(argv[2], int(argv[3], 0), int(argv[4], 0),
                         [(int(a, 0), None) for a in argv[5:]])
        print(json.dumps(recs))
        return 0
    if len(argv) == 3 and argv[1] == "read":
        print(json.dumps(read_cow(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
