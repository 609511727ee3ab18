# SPDX-License-Identifier: GPL-2.0-or-later
"""A small, slow, obviously-correct Python model of dm-thin metadata images,
for tests: generate thin_restore XML, classify the blocks of an image by the
tree they belong to, and edit blocks (with or without resealing the
checksum) to build corrupt or hand-shaped images.

Written from docs/ondisk-formats.md, like tools/raw-meta.c but sharing no
code with it, so the two can check each other.
"""
import random
import struct

BLOCK = 4096
SALT_SB = 160774
SALT_BTREE = 121107
SALT_BITMAP = 240779
SALT_INDEX = 160478
ENTRIES_PER_BITMAP = 16320
LEAF, INTERNAL = 2, 1

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c_raw(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def checksum(block, salt):
    return crc32c_raw(block[4:BLOCK]) ^ salt


# --------------------------------------------------------------------------
# XML generation (thin_restore input)


class Device:
    def __init__(self, dev_id, creation_time=0, snap_time=0, transaction=0):
        self.dev_id = dev_id
        self.creation_time = creation_time
        self.snap_time = snap_time
        self.transaction = transaction
        self.mappings = {}  # vblock -> (dblock, time)


def pool_xml(devices, time=0, transaction=0, flags=0, version=2, data_block_size=128,
             nr_data_blocks=4096):
    out = [f'<superblock uuid="" time="{time}" transaction="{transaction}" flags="{flags}" '
           f'version="{version}" data_block_size="{data_block_size}" '
           f'nr_data_blocks="{nr_data_blocks}">']
    for d in devices:
        out.append(f'  <device dev_id="{d.dev_id}" mapped_blocks="{len(d.mappings)}" '
                   f'transaction="{d.transaction}" creation_time="{d.creation_time}" '
                   f'snap_time="{d.snap_time}">')
        # Single mappings only: thin_restore does not care how they are grouped.
        for v in sorted(d.mappings):
            db, t = d.mappings[v]
            out.append(f'    <single_mapping origin_block="{v}" data_block="{db}" time="{t}"/>')
        out.append('  </device>')
    out.append('</superblock>')
    return "\n".join(out) + "\n"


def random_pool(seed, nr_devices=5, max_mappings=600, nr_data_blocks=4096, pool_time=7,
                shared_fraction=0.3):
    """Devices with runs, isolated mappings, several times, and data blocks
    mapped by several devices (ref counts >= 3 go to the overflow tree)."""
    rng = random.Random(seed)
    devices = []
    used = {}  # dblock -> number of mappings
    ids = sorted(rng.sample(range(0, 1 << 20), nr_devices))
    for dev_id in ids:
        d = Device(dev_id, creation_time=rng.randint(0, pool_time),
                   transaction=rng.randint(0, 1000))
        d.snap_time = rng.randint(d.creation_time, pool_time)
        target = rng.randint(0, max_mappings)
        v = rng.randint(0, 50)
        while len(d.mappings) < target:
            run_len = rng.choice([1, 1, 2, 5, 17, 100, 300])
            t = rng.randint(0, pool_time)
            if used and rng.random() < shared_fraction:
                db = rng.choice(list(used))
            else:
                db = rng.randrange(nr_data_blocks)
            for i in range(run_len):
                if len(d.mappings) >= target or db + i >= nr_data_blocks:
                    break
                # a run, but sometimes broken by a different time
                tt = t if rng.random() > 0.05 else rng.randint(0, pool_time)
                d.mappings[v + i] = (db + i, tt)
                used[db + i] = used.get(db + i, 0) + 1
            v += run_len + rng.choice([0, 0, 1, 3, 1000])
        devices.append(d)
    return devices


# --------------------------------------------------------------------------
# Reading and editing images


class Node:
    def __init__(self, img, b):
        blk = img.block(b)
        (self.csum, self.flags, self.blocknr, self.nr, self.max, self.vsize,
         _pad) = struct.unpack_from("<IIQIIII", blk, 0)
        self.b = b
        self.img = img

    @property
    def leaf(self):
        return self.flags == LEAF

    def key(self, i):
        return struct.unpack_from("<Q", self.img.block(self.b), 32 + 8 * i)[0]

    def value_off(self, i):
        return 32 + 8 * self.max + self.vsize * i

    def value(self, i):
        blk = self.img.block(self.b)
        return bytes(blk[self.value_off(i):self.value_off(i) + self.vsize])

    def u64(self, i):
        return struct.unpack("<Q", self.value(i))[0]

    def entries(self):
        return [(self.key(i), self.value(i)) for i in range(self.nr)]


class Image:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())

    def save(self):
        with open(self.path, "r+b") as f:
            f.write(self.data)

    def block(self, b):
        return memoryview(self.data)[b * BLOCK:(b + 1) * BLOCK]

    def seal(self, b, salt):
        blk = self.block(b)
        struct.pack_into("<I", blk, 0, checksum(blk, salt))

    def u32(self, b, off):
        return struct.unpack_from("<I", self.block(b), off)[0]

    def u64(self, b, off):
        return struct.unpack_from("<Q", self.block(b), off)[0]

    def put_u32(self, b, off, v):
        struct.pack_into("<I", self.block(b), off, v)

    def put_u64(self, b, off, v):
        struct.pack_into("<Q", self.block(b), off, v)

    # superblock fields
    def sm_root(self, which):
        off = 64 if which == "data" else 192
        return struct.unpack_from("<4Q", self.block(0), off)  # nr, alloc, bitmap_root, rc_root

    @property
    def mapping_root(self):
        return self.u64(0, 320)

    @property
    def details_root(self):
        return self.u64(0, 328)

    def tree_nodes(self, root):
        """[(block, Node, depth)] of a one-level btree, preorder."""
        out = []

        def walk(b, depth):
            n = Node(self, b)
            out.append((b, n, depth))
            if not n.leaf:
                for i in range(n.nr):
                    walk(n.u64(i), depth + 1)
        walk(root, 0)
        return out

    def tree_entries(self, root):
        out = []
        for _b, n, _d in self.tree_nodes(root):
            if n.leaf:
                out.extend(n.entries())
        return out

    def metadata_bitmaps(self):
        idx = self.sm_root("meta")[2]
        nr = self.sm_root("meta")[0]
        return [self.u64(idx, 16 + 16 * k) for k in range((nr + ENTRIES_PER_BITMAP - 1) // ENTRIES_PER_BITMAP)]

    def data_bitmaps(self):
        return [struct.unpack_from("<Q", v, 0)[0]
                for _k, v in self.tree_entries(self.sm_root("data")[2])]

    def classify(self):
        """block -> label for every block reachable from the superblock."""
        labels = {0: "superblock"}
        msm = self.sm_root("meta")
        dsm = self.sm_root("data")
        labels[msm[2]] = "msm_index"
        for b in self.metadata_bitmaps():
            labels[b] = "msm_bitmap"
        for b, _n, _d in self.tree_nodes(msm[3]):
            labels[b] = "msm_rc"
        for b, _n, _d in self.tree_nodes(dsm[2]):
            labels[b] = "dsm_index"
        for b in self.data_bitmaps():
            labels[b] = "dsm_bitmap"
        for b, _n, _d in self.tree_nodes(dsm[3]):
            labels[b] = "dsm_rc"
        for b, _n, _d in self.tree_nodes(self.details_root):
            labels[b] = "details"
        for b, _n, _d in self.tree_nodes(self.mapping_root):
            labels[b] = "top"
        for _dev, v in self.tree_entries(self.mapping_root):
            for b, n, _d in self.tree_nodes(struct.unpack("<Q", v)[0]):
                labels[b] = "l1_leaf" if n.leaf else "l1_internal"
        return labels

    # space maps
    def _bitmap_for(self, which, blk):
        bitmaps = self.metadata_bitmaps() if which == "meta" else self.data_bitmaps()
        return bitmaps[blk // ENTRIES_PER_BITMAP], blk % ENTRIES_PER_BITMAP

    def sm_entry(self, which, blk):
        bm, i = self._bitmap_for(which, blk)
        w = self.u64(bm, 16 + 8 * (i // 32))
        s = 2 * (i % 32)
        return ((w >> s) & 1) << 1 | ((w >> (s + 1)) & 1)

    def set_sm_entry(self, which, blk, v):
        """Set a 2-bit entry (0..3; 3 = see the ref-count tree) and reseal the bitmap."""
        assert 0 <= v <= 3
        bm, i = self._bitmap_for(which, blk)
        off = 16 + 8 * (i // 32)
        s = 2 * (i % 32)
        w = self.u64(bm, off) & ~(3 << s)
        w |= ((v >> 1) & 1) << s | (v & 1) << (s + 1)
        self.put_u64(bm, off, w)
        self.seal(bm, SALT_BITMAP)

    def free_block(self):
        """A metadata block that is zero and free."""
        for b in range(1, self.sm_root("meta")[0]):
            if self.sm_entry("meta", b) == 0 and not any(self.block(b)):
                return b
        raise RuntimeError("no free metadata block")

    def leaf_insert(self, b, key, value):
        """Insert into a leaf that has room (keys stay sorted); reseal."""
        n = Node(self, b)
        assert n.leaf and n.nr < n.max
        entries = n.entries() + [(key, value)]
        entries.sort()
        blk = self.block(b)
        for i, (k, v) in enumerate(entries):
            struct.pack_into("<Q", blk, 32 + 8 * i, k)
            off = 32 + 8 * n.max + n.vsize * i
            blk[off:off + n.vsize] = v
        self.put_u32(b, 16, n.nr + 1)
        self.seal(b, SALT_BTREE)

    def make_metadata_snapshot(self):
        """Hold a metadata snapshot the way the kernel does (doc 2.7); returns its block."""
        c = self.free_block()
        copy = self.block(c)
        copy[:] = self.block(0)
        self.put_u64(c, 8, c)
        copy[64:320] = bytes(256)
        self.put_u64(c, 56, 0)
        self.seal(c, SALT_SB)
        for b in (c, self.mapping_root, self.details_root):
            self.set_sm_entry("meta", b, self.sm_entry("meta", b) + 1)
        self.put_u64(0, 200, self.sm_root("meta")[1] + 1)  # nr_allocated
        self.put_u64(0, 56, c)
        self.seal(0, SALT_SB)
        return c
