# SPDX-License-Identifier: GPL-2.0-or-later
"""thinfs check and thinfs dump against thin-provisioning-tools 0.9.0.

Images are written by thin_restore from generated XML (and then reshaped
by hand where thin_restore cannot produce a layout, e.g. shared subtrees or
a metadata snapshot).  `thinfs dump` must print exactly what thin_dump
prints; `thinfs check` must pass every image thin_check passes and fail,
naming the block, on every corruption, without ever crashing."""
import random
import shutil
import struct
import subprocess

import pytest

import thin_image as ti
from thin_image import Device, Image, pool_xml, random_pool


def thin_dump(*args):
    p = subprocess.run(["thin_dump", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout


def thin_check_ok(img, *args):
    return subprocess.run(["thin_check", *map(str, args), str(img)], capture_output=True,
                          timeout=600).returncode == 0


def assert_dump_matches(run_thinfs, img, *args):
    ours = run_thinfs("dump", *args, img).stdout
    assert ours == thin_dump(*args, img)
    return ours


def assert_clean(run_thinfs, img, *args):
    p = run_thinfs("check", *args, img)
    assert "error:" not in p.stdout
    return p


def assert_problem(run_thinfs, img, *needles):
    """check must exit 1 and print an error line containing every needle."""
    p = run_thinfs("check", img, ok=(1,))
    errors = [l for l in p.stdout.splitlines() if l.startswith("error:")]
    assert errors, p.stdout
    assert any(all(n in l for n in needles) for l in errors), \
        f"no error line with {needles}:\n{p.stdout}"
    return p


# ---- clean images: check passes, dump matches --------------------------------

SHAPES = {
    # name: kwargs of random_pool, metadata size
    "small": (dict(seed=1, nr_devices=3, max_mappings=50), 8 << 20),
    "internal-nodes": (dict(seed=2, nr_devices=4, max_mappings=3000), 8 << 20),
    "many-devices": (dict(seed=3, nr_devices=300, max_mappings=20), 16 << 20),
    "heavily-shared": (dict(seed=4, nr_devices=12, max_mappings=900, nr_data_blocks=600,
                            shared_fraction=0.9), 16 << 20),
    "data-bitmaps": (dict(seed=5, nr_devices=6, max_mappings=5000,
                          nr_data_blocks=3 * ti.ENTRIES_PER_BITMAP + 77), 16 << 20),
    "two-metadata-bitmaps": (dict(seed=6, nr_devices=2, max_mappings=100), 80 << 20),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_restored_pool_is_clean_and_dumps_like_thin_dump(shape, restored_image, run_thinfs):
    kwargs, size = SHAPES[shape]
    nr_data = kwargs.get("nr_data_blocks", 4096)
    xml = pool_xml(random_pool(**kwargs), time=7, transaction=42, nr_data_blocks=nr_data)
    img = restored_image(xml, size=size)
    assert thin_check_ok(img)
    assert_clean(run_thinfs, img)
    assert_dump_matches(run_thinfs, img)


def test_dump_collapses_runs_exactly_like_thin_dump(restored_image, run_thinfs):
    d = Device(1, creation_time=0, snap_time=3)
    # a long run, a run broken by time, one broken by a data gap, singles
    for v in range(0, 5000):
        d.mappings[v] = (v + 10, 0)
    for v in range(5000, 5010):
        d.mappings[v] = (v + 10, 1 if v % 2 else 2)
    for v in range(6000, 6010):
        d.mappings[v] = (v + (0 if v < 6005 else 1), 3)
    d.mappings[10 ** 9] = (7, 3)
    e = Device(2)  # no mappings at all
    img = restored_image(pool_xml([d, e], time=3, nr_data_blocks=20000))
    out = assert_dump_matches(run_thinfs, img)
    assert 'length="5000"' in out
    assert_clean(run_thinfs, img)


def test_dump_of_an_empty_pool(restored_image, run_thinfs):
    img = restored_image(pool_xml([], nr_data_blocks=0))
    assert_dump_matches(run_thinfs, img)
    assert_clean(run_thinfs, img)


def test_dump_options_match_thin_dump(restored_image, run_thinfs, tmp_path):
    devs = random_pool(seed=11, nr_devices=5, max_mappings=300)
    img = restored_image(pool_xml(devs, time=7, version=1, flags=1, transaction=9))
    assert_dump_matches(run_thinfs, img, "--skip-mappings")
    assert_dump_matches(run_thinfs, img, "--dev-id", devs[2].dev_id)
    assert_dump_matches(run_thinfs, img, "--dev-id", 123456789)
    out = tmp_path / "out.xml"
    run_thinfs("dump", "-o", out, img)
    assert out.read_text() == thin_dump(img)


def test_dump_and_check_of_a_metadata_snapshot(restored_image, run_thinfs):
    devs = random_pool(seed=12, nr_devices=4, max_mappings=400)
    img = restored_image(pool_xml(devs, time=7, nr_data_blocks=4096))
    run_thinfs("dump", "-m", img, ok=(1,))  # none held yet
    image = Image(img)
    held = image.make_metadata_snapshot()
    image.save()
    assert thin_check_ok(img)
    assert_clean(run_thinfs, img)
    assert_dump_matches(run_thinfs, img, "-m")
    assert 'nr_data_blocks="0"' in run_thinfs("dump", f"--metadata-snap={held}", img).stdout
    assert_dump_matches(run_thinfs, img)


def test_metadata_snapshot_without_its_reference_counts_is_caught(restored_image, run_thinfs):
    img = restored_image(pool_xml(random_pool(seed=13, nr_devices=2, max_mappings=50)))
    image = Image(img)
    root = image.mapping_root
    image.make_metadata_snapshot()
    image.set_sm_entry("meta", root, 1)  # forget the copy's reference
    image.save()
    assert not thin_check_ok(img)
    assert_problem(run_thinfs, img, f"block {root} ", "count 1, expected 2")


def share_subtree(image, from_dev, new_dev, count=True):
    """Add new_dev sharing from_dev's level-1 root (a snapshot as the kernel
    makes it): top-level and details entries, and the root's count 2.
    Data counts stay: the shared leaves are still one leaf each."""
    top = dict(image.tree_entries(image.mapping_root))
    det = dict(image.tree_entries(image.details_root))
    root = struct.unpack("<Q", top[from_dev])[0]
    top_leaf = [b for b, n, _ in image.tree_nodes(image.mapping_root) if n.leaf][-1]
    det_leaf = [b for b, n, _ in image.tree_nodes(image.details_root) if n.leaf][-1]
    image.leaf_insert(top_leaf, new_dev, struct.pack("<Q", root))
    image.leaf_insert(det_leaf, new_dev, det[from_dev])
    if count:
        image.set_sm_entry("meta", root, image.sm_entry("meta", root) + 1)
    return root


def test_shared_subtree_counts_once_per_parent_and_once_per_leaf(restored_image, run_thinfs):
    devs = [Device(1), Device(2)]
    for v in range(700):  # internal root + leaves
        devs[0].mappings[v] = (v, 0)
    devs[1].mappings[5] = (900, 0)
    img = restored_image(pool_xml(devs, time=1, nr_data_blocks=1024))
    image = Image(img)
    share_subtree(image, 1, 1000)
    image.save()
    assert thin_check_ok(img)
    assert_clean(run_thinfs, img)
    assert_dump_matches(run_thinfs, img)


def test_shared_subtree_with_root_count_one_is_caught(restored_image, run_thinfs):
    devs = [Device(1), Device(2)]
    for v in range(300):
        devs[0].mappings[v] = (v, 0)
    img = restored_image(pool_xml(devs, time=1))
    image = Image(img)
    root = share_subtree(image, 1, 7)
    image.set_sm_entry("meta", root, 1)
    image.save()
    assert not thin_check_ok(img)
    assert_problem(run_thinfs, img, f"block {root} ", "count 1, expected 2")


# ---- what thin_check 0.9.0 does not check, but we do ---------------------------------

def small_pool(restored_image, **kw):
    d1, d2 = Device(1, snap_time=1), Device(2, creation_time=1, snap_time=1)
    for v in range(100):
        d1.mappings[v] = (v, 0)
        d2.mappings[v] = (v, 0)
    d2.mappings[99] = (300, 1)
    return restored_image(pool_xml([d1, d2], time=2, nr_data_blocks=1024, **kw))


def test_data_reference_counts_are_checked(restored_image, run_thinfs):
    img = small_pool(restored_image)
    image = Image(img)
    image.set_sm_entry("data", 500, 1)  # leak
    image.set_sm_entry("data", 20, 1)   # under-count (2 leaves map it)
    image.set_sm_entry("data", 300, 0)  # mapped but free
    image.save()
    assert thin_check_ok(img)  # 0.9.0 ignores data counts
    assert_problem(run_thinfs, img, "data block 500", "leaked")
    assert_problem(run_thinfs, img, "data block 20", "count 1, expected 2")
    assert_problem(run_thinfs, img, "data block 300", "free in the data space map")


def test_data_counts_in_several_windows(restored_image, run_thinfs):
    devs = random_pool(seed=21, nr_devices=5, max_mappings=4000,
                       nr_data_blocks=3 * ti.ENTRIES_PER_BITMAP)
    img = restored_image(pool_xml(devs, time=7, nr_data_blocks=3 * ti.ENTRIES_PER_BITMAP),
                         size=16 << 20)
    run_thinfs("check", "--data-window", ti.ENTRIES_PER_BITMAP, img)
    image = Image(img)
    mapped = {db for d in devs for db, _t in d.mappings.values()}
    victim = max(mapped)
    assert victim >= ti.ENTRIES_PER_BITMAP  # in a later window
    image.set_sm_entry("data", victim, 0)
    image.save()
    p = run_thinfs("check", "--data-window", ti.ENTRIES_PER_BITMAP, img, ok=(1,))
    assert f"data block {victim}:" in p.stdout


def edit_details(image, dev, field_off, value, size=8):
    for b, n, _ in image.tree_nodes(image.details_root):
        if n.leaf:
            for i in range(n.nr):
                if n.key(i) == dev:
                    pack = "<Q" if size == 8 else "<I"
                    struct.pack_into(pack, image.block(b), n.value_off(i) + field_off, value)
                    image.seal(b, ti.SALT_BTREE)
                    return
    raise KeyError(dev)


def edit_mapping(image, dev, vblock, dblock, time):
    top = dict(image.tree_entries(image.mapping_root))
    for b, n, _ in image.tree_nodes(struct.unpack("<Q", top[dev])[0]):
        if n.leaf:
            for i in range(n.nr):
                if n.key(i) == vblock:
                    struct.pack_into("<Q", image.block(b), n.value_off(i), dblock << 24 | time)
                    image.seal(b, ti.SALT_BTREE)
                    return b
    raise KeyError(vblock)


def test_mapped_blocks_must_match_the_mappings(restored_image, run_thinfs):
    img = small_pool(restored_image)
    image = Image(img)
    edit_details(image, 2, 0, 99)
    image.save()
    assert thin_check_ok(img)
    assert_problem(run_thinfs, img, "device 2", "mapped_blocks is 99", "100 mappings")


def test_mapping_beyond_the_data_device_and_from_the_future(restored_image, run_thinfs):
    img = small_pool(restored_image)
    image = Image(img)
    leaf = edit_mapping(image, 2, 99, 5000, 1)
    image.save()
    assert thin_check_ok(img)
    assert_problem(run_thinfs, img, f"block {leaf} ", "data block 5000", "beyond the data device")
    edit_mapping(image, 2, 99, 300, 9)
    image.save()
    assert_problem(run_thinfs, img, f"block {leaf} ", "time 9", "pool's time 2")


def test_details_and_top_level_must_name_the_same_devices(restored_image, run_thinfs):
    img = small_pool(restored_image)
    image = Image(img)
    det_leaf = [b for b, n, _ in image.tree_nodes(image.details_root) if n.leaf][0]
    value = dict(image.tree_entries(image.details_root))[1]
    image.leaf_insert(det_leaf, 77, value)
    image.save()
    assert thin_check_ok(img)
    assert_problem(run_thinfs, img, "device 77", "no mapping tree")
    assert_dump_matches(run_thinfs, img)  # thin_dump lists mapping-tree devices only


# ---- needs_check -------------------------------------------------------------

def test_clear_needs_check_flag_like_thin_check(restored_image, run_thinfs, tmp_path):
    img = small_pool(restored_image, flags=1)
    ref = tmp_path / "ref.bin"
    shutil.copy(img, ref)
    assert subprocess.run(["thin_check", "--clear-needs-check-flag", str(ref)],
                           capture_output=True).returncode == 0
    p = run_thinfs("check", img)
    assert "needs_check flag is set" in p.stdout
    assert Image(img).u32(0, 4) == 1  # a plain check changes nothing
    run_thinfs("check", "--clear-needs-check", img)
    assert Image(img).u32(0, 4) == 0
    assert img.read_bytes()[:4096] == ref.read_bytes()[:4096]


def test_needs_check_stays_set_on_damaged_metadata(restored_image, run_thinfs):
    img = small_pool(restored_image, flags=1)
    image = Image(img)
    image.set_sm_entry("data", 500, 1)
    image.save()
    run_thinfs("check", "--clear-needs-check", img, ok=(1,))
    assert Image(img).u32(0, 4) == 1


# ---- corruption: every block type, with and without a good checksum ----------

LABELS = ["superblock", "msm_index", "msm_bitmap", "msm_rc", "dsm_index", "dsm_bitmap",
          "dsm_rc", "details", "top", "l1_leaf", "l1_internal"]


@pytest.fixture(scope="module")
def rich_image_template(tmp_path_factory, thin_tools):
    """An image with every block type, including non-empty ref-count trees."""
    d = tmp_path_factory.mktemp("rich")
    devs = random_pool(seed=31, nr_devices=6, max_mappings=1500, nr_data_blocks=2000,
                       shared_fraction=0.8)
    xml = d / "rich.xml"
    xml.write_text(pool_xml(devs, time=7, nr_data_blocks=2000))
    img = d / "rich.bin"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["thin_restore", "-i", str(xml), "-o", str(img)], check=True,
                   capture_output=True)
    image = Image(img)
    labels = image.classify()
    # The metadata ref-count tree only has entries if some metadata block is shared:
    # thin_restore never shares, so its tree is the empty root leaf.  Still a node.
    assert set(LABELS) <= set(labels.values()), set(labels.values())
    return img, labels


def blocks_labelled(labels, label):
    return sorted(b for b, l in labels.items() if l == label)


@pytest.mark.parametrize("label", LABELS)
def test_corrupt_checksum_is_reported_with_the_block(label, rich_image_template, tmp_path,
                                                       run_thinfs):
    src, labels = rich_image_template
    b = blocks_labelled(labels, label)[0]
    img = tmp_path / "c.bin"
    shutil.copy(src, img)
    image = Image(img)
    image.block(b)[100] ^= 0x40
    image.save()
    p = run_thinfs("check", img, ok=(1,))
    assert f"block {b} " in p.stdout and "checksum" in p.stdout, p.stdout
    run_thinfs("dump", img, ok=(0, 1))


SALTS = {"superblock": ti.SALT_SB, "msm_index": ti.SALT_INDEX, "msm_bitmap": ti.SALT_BITMAP,
         "dsm_bitmap": ti.SALT_BITMAP}


def structural_edits(image, b, label):
    """(description, edit, needle) triples that keep the checksum valid; an
    error line must contain needle (default: the block's number)."""
    if label == "superblock":
        return [("magic", lambda: image.put_u64(0, 32, 1234), "bad magic"),
                ("version", lambda: image.put_u32(0, 40, 7), "version 7"),
                ("blocknr", lambda: image.put_u64(0, 8, 5), "wrong block number 5"),
                ("data block size", lambda: image.put_u32(0, 336, 100), "data block size 100"),
                ("metadata block size", lambda: image.put_u32(0, 340, 16), "metadata block size"),
                ("incompat", lambda: image.put_u32(0, 360, 1), "incompatible"),
                ("metadata_nr_blocks", lambda: image.put_u64(0, 344, 1 << 40), "metadata_nr_blocks"),
                ("mapping root", lambda: image.put_u64(0, 320, 1 << 30), f"block {1 << 30}"),
                ("details root -> superblock", lambda: image.put_u64(0, 328, 0), "block 0"),
                ("held root -> garbage", lambda: image.put_u64(0, 56, 3), "block 3")]
    if label in ("msm_index",):
        return [("bitmap pointer", lambda: image.put_u64(b, 16, image.mapping_root), None),
                ("blocknr", lambda: image.put_u64(b, 8, b + 1), None)]
    if label in ("msm_bitmap", "dsm_bitmap"):
        def flip_count():
            w = image.u64(b, 16 + 8 * 3)
            image.put_u64(b, 16 + 8 * 3, w ^ 0b10)
        bitmaps = image.metadata_bitmaps() if label == "msm_bitmap" else image.data_bitmaps()
        first = bitmaps.index(b) * ti.ENTRIES_PER_BITMAP + 3 * 32
        what = "block" if label == "msm_bitmap" else "data block"
        return [("a count", flip_count, f"{what} {first}"),
                ("blocknr", lambda: image.put_u64(b, 8, 1), None)]
    # btree nodes
    n = ti.Node(image, b)
    edits = [("blocknr", lambda: image.put_u64(b, 8, b + 1), None),
             ("flags", lambda: image.put_u32(b, 4, 3), None),
             ("max_entries", lambda: image.put_u32(b, 20, n.max - 2), None),
             ("value_size", lambda: image.put_u32(b, 24, 16 if n.vsize != 16 else 8), None),
             ("nr_entries too big", lambda: image.put_u32(b, 16, n.max + 3), None)]
    if n.nr >= 2:
        def swap_keys():
            k0, k1 = n.key(0), n.key(1)
            image.put_u64(b, 32, k1)
            image.put_u64(b, 40, k0)
        edits.append(("keys swapped", swap_keys, None))
        # Losing the last entry leaves a valid node: what it held goes missing.
        lost = {"details": f"device {n.key(n.nr - 1)} has a mapping tree but no entry",
                "top": f"device {n.key(n.nr - 1)} is in the device details tree but has no",
                "l1_leaf": "mapped_blocks is",
                "l1_internal": "mapped_blocks is",
                "dsm_rc": f"block {n.key(n.nr - 1)} has bitmap entry 3",
                "msm_rc": f"block {n.key(n.nr - 1)} (",
                "dsm_index": f"no entry for bitmap {n.key(n.nr - 1)}"}[label]
        edits.append(("nr_entries lowered", lambda: image.put_u32(b, 16, n.nr - 1), lost))
    if not n.leaf:
        edits.append(("child -> itself", lambda: image.put_u64(b, n.value_off(0), b), None))
        edits.append(("child -> superblock", lambda: image.put_u64(b, n.value_off(0), 0), None))
    elif n.nr and label == "top":
        edits.append(("subtree root -> top node",
                      lambda: image.put_u64(b, n.value_off(0), b), None))
    return edits


@pytest.mark.parametrize("label", LABELS)
def test_structural_corruption_with_a_valid_checksum_is_reported(label, rich_image_template,
                                                                   tmp_path, run_thinfs):
    src, labels = rich_image_template
    b = blocks_labelled(labels, label)[0]
    for i, (what, _edit, needle) in enumerate(structural_edits(Image(src), b, label)):
        img = tmp_path / "s.bin"
        shutil.copy(src, img)
        image = Image(img)
        structural_edits(image, b, label)[i][1]()
        image.seal(b, SALTS.get(label, ti.SALT_BTREE))
        image.save()
        p = run_thinfs("check", img, ok=(1,))
        needle = needle or f"block {b}"
        errors = [l for l in p.stdout.splitlines() if l.startswith("error:")]
        assert any(needle in l for l in errors), f"{label}/{what}: no '{needle}' in\n{p.stdout}"
        run_thinfs("dump", img, ok=(0, 1))


def test_random_damage_never_crashes_and_never_passes_what_thin_check_fails(
        rich_image_template, tmp_path, run_thinfs):
    src, labels = rich_image_template
    rng = random.Random(4242)
    blocks = sorted(labels)
    img = tmp_path / "r.bin"
    for _ in range(150):
        shutil.copy(src, img)
        image = Image(img)
        b = rng.choice(blocks)
        for _ in range(rng.choice([1, 1, 2, 8])):
            off = rng.choice([rng.randrange(4, 64), rng.randrange(4, 4096)])
            image.block(b)[off] ^= 1 << rng.randrange(8)
        if rng.random() < 0.8:
            label = labels[b]
            image.seal(b, SALTS.get(label, ti.SALT_SB if label == "superblock" else ti.SALT_BTREE))
        image.save()
        ours = run_thinfs("check", img, ok=(0, 1)).returncode
        if not thin_check_ok(img):
            assert ours == 1, f"thin_check fails block {b} ({labels[b]}), thinfs check passes"
        run_thinfs("dump", img, ok=(0, 1))


def test_garbage_and_tiny_devices_do_not_crash(tmp_path, run_thinfs):
    rng = random.Random(7)
    for size in (0, 100, 4096, 3 * 4096, 64 * 4096):
        img = tmp_path / f"g{size}.bin"
        img.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
        run_thinfs("check", img, ok=(1,))
        run_thinfs("dump", img, ok=(1,))


# ---- command line -----------------------------------------------------------

def test_help_and_usage(run_thinfs):
    for cmd in ("check", "dump"):
        assert "Usage" in run_thinfs(cmd, "--help").stdout
        run_thinfs(cmd, ok=(2,))
    assert "check" in run_thinfs("--help").stdout
    run_thinfs("frobnicate", ok=(2,))
    run_thinfs("check", "no-such-file", ok=(2,))
    run_thinfs("dump", "no-such-file", ok=(1,))


def test_pool_cfg_names_the_metadata(restored_image, run_thinfs, tmp_path):
    img = small_pool(restored_image)
    (img.parent / "data.bin").write_bytes(b"")
    cfg = tmp_path / "pool.cfg"
    (tmp_path / "origin.img").write_bytes(b"")
    cfg.write_text(f"[pool]\nmetadata = {img.name}   ; next to the cfg\ndata = data.bin\n"
                   f'\n[origin "db"]\ndevice = {tmp_path / "origin.img"}\n')
    run_thinfs("check", cfg)
    assert run_thinfs("dump", cfg).stdout == thin_dump(img)
    (tmp_path / "nometa.cfg").write_text("[pool]\ndata = data.bin\n")
    assert "metadata" in run_thinfs("check", tmp_path / "nometa.cfg", ok=(2,)).stderr
    run_thinfs("check", tmp_path / "missing.cfg", ok=(2,))


def test_a_bad_pool_cfg_is_reported_as_mount_reports_it_and_nothing_is_read(
        restored_image, run_thinfs, tmp_path):
    img = small_pool(restored_image)
    (img.parent / "data.bin").write_bytes(b"")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"[pool]\nmetadata = {img.name}\ndata = data.bin\nblock_size = 64k\n"
                   "block_size = 128k\nerror_if_no_space = maybe\n")
    expected = [f"thinfs: error: {cfg}:5: block_size: given twice (first on line 4)",
                f"thinfs: error: {cfg}:6: error_if_no_space: 'maybe' is not a boolean "
                "(yes/no, true/false, on/off, 1/0)"]
    for cmd, rc in (("check", 2), ("dump", 2)):
        r = run_thinfs(cmd, cfg, ok=(rc,))
        assert r.stdout == "" and r.stderr.splitlines() == expected, (cmd, r.stderr)
    # A missing data device is the cfg's problem (line 3), not a missing cfg.
    cfg.write_text(f"[pool]\nmetadata = {img.name}\ndata = nodata.bin\n")
    r = run_thinfs("check", cfg, ok=(2,))
    assert r.stderr.splitlines() == [f"thinfs: error: {cfg}:3: data: nodata.bin: no such file "
                                     f"or device (relative to {tmp_path})"], r.stderr


def test_a_missing_file_is_reported_once(run_thinfs, tmp_path):
    for args, rc in ((("check", "/nonexistent"), 2), (("dump", "/nonexistent"), 1),
                     (("check", tmp_path / "missing.cfg"), 2),
                     (("dump", tmp_path / "missing.cfg"), 2)):
        r = run_thinfs(*args, ok=(rc,))
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and args[1].__str__() in lines[0] and \
            "No such file or directory" in lines[0], (args, r.stderr)


def test_quiet_prints_nothing(restored_image, run_thinfs):
    img = small_pool(restored_image)
    assert run_thinfs("check", "-q", img).stdout == ""
    image = Image(img)
    image.set_sm_entry("data", 500, 1)
    image.save()
    assert run_thinfs("check", "-q", img, ok=(1,)).stdout == ""


def test_subtree_grafted_at_the_wrong_height_is_caught(restored_image, run_thinfs):
    devs = [Device(1), Device(2)]
    for v in range(1000):
        devs[0].mappings[v] = (v, 0)
        devs[1].mappings[v] = (v + 1000, 0)
    img = restored_image(pool_xml(devs, time=1, nr_data_blocks=4096))
    image = Image(img)
    top = dict(image.tree_entries(image.mapping_root))
    root1, root2 = (struct.unpack("<Q", top[d])[0] for d in (1, 2))
    n = ti.Node(image, root1)
    assert not n.leaf and not ti.Node(image, root2).leaf
    image.put_u64(root1, n.value_off(n.nr - 1), root2)  # an internal node where a leaf was
    image.seal(root1, ti.SALT_BTREE)
    image.save()
    assert not thin_check_ok(img)
    assert_problem(run_thinfs, img, f"block {root1} ", "different heights")
    run_thinfs("dump", img, ok=(1,))


def test_strict_makes_thin_restore_summary_fields_errors(restored_image, run_thinfs):
    # thin_restore leaves an orphan block in this shape: nr_allocated one too
    # high, none_free_before above a free block (ondisk-formats.md 5.1).
    d1, d2, d7 = Device(1, snap_time=1), Device(2, creation_time=1, snap_time=1), Device(7, 2, 2)
    for v in range(100):
        d1.mappings[v] = (v, 0)
    d1.mappings[1000] = (200, 1)
    for v in range(99):
        d2.mappings[v] = (v, 0)
    d2.mappings[99] = (300, 2)
    for v in range(10):
        d7.mappings[v] = (v, 0)
    img = restored_image(pool_xml([d1, d2, d7], time=2, transaction=7, nr_data_blocks=1024))
    p = run_thinfs("check", img)
    assert "warning: metadata space map: nr_allocated is 13" in p.stdout
    p = run_thinfs("check", "--strict", img, ok=(1,))
    assert "error: metadata space map: nr_allocated is 13" in p.stdout


def test_metadata_counts_above_two_live_in_the_ref_count_tree(restored_image, run_thinfs):
    devs = [Device(1)]
    for v in range(50):
        devs[0].mappings[v] = (v, 0)
    img = restored_image(pool_xml(devs, time=1, nr_data_blocks=1024))
    image = Image(img)
    for new in (2, 3, 4):
        root = share_subtree(image, 1, new, count=False)
    # Four references: the bitmap says 3 (look it up), the overflow tree says 4.
    image.set_sm_entry("meta", root, 3)
    rc_root = image.sm_root("meta")[3]
    image.leaf_insert(rc_root, root, struct.pack("<I", 4))
    image.save()
    assert thin_check_ok(img)
    assert_clean(run_thinfs, img)
    assert_dump_matches(run_thinfs, img)
    # The same with a wrong overflow count.
    n = ti.Node(image, rc_root)
    struct.pack_into("<I", image.block(rc_root), n.value_off(0), 5)
    image.seal(rc_root, ti.SALT_BTREE)
    image.save()
    assert not thin_check_ok(img)
    assert_problem(run_thinfs, img, f"block {root} ", "count 5, expected 4")
