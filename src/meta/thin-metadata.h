/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thin-metadata.h - the dm-thin-pool metadata schema.
 *
 * Owns: the superblock, the device-details tree, the two-level mapping tree
 * (device id -> virtual block -> data block + time) and both space maps of a
 * pool, and the rules tying them together: data block reference counts
 * follow the leaves that map them, snapshots share subtrees in O(1), a
 * mapping is shared with a snapshot iff its time is older than the device's
 * snapshotted time, commit writes the superblock last.
 *
 * Never: touches data blocks' contents, FUSE or policy (modes, queueing).
 * Not thread-safe: the caller serialises every call with one lock.
 *
 * Errors: -ENODATA no such mapping/device; -EEXIST device id in use;
 * -ENOSPC out of data (tfs_thin_alloc_data_block) or metadata space;
 * -EINVAL bad argument (logged with what was wrong); -EUCLEAN corrupt
 * metadata; -EIO device error; -EROFS opened read-only.  After any error
 * from a call that modifies metadata, the transaction must be aborted.
 */
#ifndef TFS_META_THIN_METADATA_H
#define TFS_META_THIN_METADATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tfs_bdev;
struct tfs_pmd;
struct tfs_td;

typedef uint32_t tfs_dev_id;

struct tfs_pmd_options {
	uint32_t data_block_sectors; /* required: 128 .. 2097152, multiple of 128 */
	uint64_t nr_data_blocks;     /* format: data device size in blocks; open: grow to this if larger (0 = keep) */
	size_t cache_blocks;         /* block manager cache; 0 = default */
	bool read_only;
};

/* Format: write an empty pool (all previous contents of the superblock lost). */
int tfs_pmd_format(struct tfs_bdev *meta, const struct tfs_pmd_options *opt, struct tfs_pmd **out);
/*
 * Open existing metadata.  Refuses (-EINVAL, logged) a zero/unformatted
 * superblock, a bad magic, unknown incompat flags, compat_ro flags when not
 * read-only, or a data block size different from opt->data_block_sectors
 * (0 there = accept the stored one).
 */
int tfs_pmd_open(struct tfs_bdev *meta, const struct tfs_pmd_options *opt, struct tfs_pmd **out);
/* Closes without committing (commit first to keep changes). */
void tfs_pmd_close(struct tfs_pmd *pmd);

int tfs_pmd_commit(struct tfs_pmd *pmd);
/*
 * tfs_pmd_commit in three steps, so that a caller can do the metadata I/O
 * outside its lock (transaction-manager.h).  begin: everything in memory
 * (details, both space maps, the superblock's contents), under the lock;
 * write: the blocks, flush, superblock, flush, with no lock (blocks);
 * end: under the lock, returns r (write's result).  Between begin and end
 * the next transaction runs: lookups and changes (under the lock) go on,
 * into it.  Blocks freed in the committing transaction are not handed out
 * again before end succeeds (metadata) or tfs_pmd_release_freed_data
 * (data, so that the caller can discard them first).  A failed begin or
 * write leaves the transaction, and the next one with it, to abort
 * (tfs_pmd_abort, after end).
 */
struct tfs_pmd_commit;
int tfs_pmd_commit_begin(struct tfs_pmd *pmd, struct tfs_pmd_commit **out);
int tfs_pmd_commit_write(struct tfs_pmd_commit *c);
/* write in two halves (transaction-manager.h): the blocks, then the superblock. */
int tfs_pmd_commit_write_blocks(struct tfs_pmd_commit *c);
int tfs_pmd_commit_write_super(struct tfs_pmd_commit *c);
int tfs_pmd_commit_end(struct tfs_pmd *pmd, struct tfs_pmd_commit *c, int r);
/* After a successful end: data blocks freed in that commit may be allocated again. */
void tfs_pmd_release_freed_data(struct tfs_pmd *pmd);
/* Back to the last committed state; open device handles stay valid. */
int tfs_pmd_abort(struct tfs_pmd *pmd);

/* ---- pool-wide ---- */
uint64_t tfs_pmd_transaction_id(struct tfs_pmd *pmd);
/* Compare-and-swap: -EINVAL (logged) unless the current id is old_id. Takes effect at commit. */
int tfs_pmd_set_transaction_id(struct tfs_pmd *pmd, uint64_t old_id, uint64_t new_id);
uint32_t tfs_pmd_data_block_sectors(struct tfs_pmd *pmd);
uint32_t tfs_pmd_time(struct tfs_pmd *pmd);
bool tfs_pmd_needs_check(struct tfs_pmd *pmd);
/* tfs_bm_take_write_error of the metadata device: the last failed block write, in words. */
void tfs_pmd_take_write_error(struct tfs_pmd *pmd, char *buf, size_t len);
/* Set or clear NEEDS_CHECK and write the superblock now, outside any transaction (as the kernel). */
int tfs_pmd_set_needs_check(struct tfs_pmd *pmd, bool on);

struct tfs_pmd_space {
	uint64_t data_total, data_free;
	uint64_t meta_total, meta_free;
};
void tfs_pmd_space(struct tfs_pmd *pmd, struct tfs_pmd_space *out);
/* Grow the data space map to nr_blocks (-EINVAL when smaller than now: see shrink). */
int tfs_pmd_resize_data(struct tfs_pmd *pmd, uint64_t nr_blocks);
/*
 * Shrink the data space map to nr_blocks (down to the highest block in use
 * + 1), taking effect at the next commit; the same size is a no-op.  The
 * data size is stored only in the data space map root, so that is the one
 * copy to change.  Refused with -EINVAL and nothing changed (the
 * transaction stays usable) when nr_blocks is larger than now, or when a
 * block >= nr_blocks is in use in the current transaction: then
 * *highest_used (may be NULL) is the highest block in use, so the caller
 * can say "block N is in use".  It is also set on success (UINT64_MAX when
 * no block is in use).  Blocks freed earlier in this transaction do not
 * count: the committed state that still maps them stays intact until the
 * commit (space-map-disk.c says why).  A data device must be truncated
 * only after the commit.  Other errors (-EIO, -ENOSPC of metadata,
 * -ENOMEM, -EUCLEAN) need an abort; -EROFS read-only.
 */
int tfs_pmd_shrink_data(struct tfs_pmd *pmd, uint64_t nr_blocks, uint64_t *highest_used);
/* Grow the metadata space map to nr_blocks (capped at the format's maximum, with a warning). */
int tfs_pmd_resize_metadata(struct tfs_pmd *pmd, uint64_t nr_blocks);

/* Metadata snapshot (held root) for consistent reads of a live pool. -EBUSY if one is held. */
int tfs_pmd_reserve_metadata_snap(struct tfs_pmd *pmd);
int tfs_pmd_release_metadata_snap(struct tfs_pmd *pmd);
/* 0 when none. */
uint64_t tfs_pmd_held_root(struct tfs_pmd *pmd);

/*
 * The held-root slot without reserve's and release's commits, for a reader
 * that walks the trees of the transaction in memory while the pool goes
 * on changing them (thinfs-ctl diff): hold makes a held copy of the
 * current roots (details of open devices saved first), so that from then
 * on every change shadows them and they stay as they are; drop releases
 * them.  A commit in between writes the hold, which is valid on disk
 * (thin_check accepts it) and makes the drop a change to commit; with no
 * commit in between, hold and drop change nothing on net
 * (tfs_pmd_commit_count tells the two apart).  hold: -EBUSY a metadata
 * snapshot is held, -ENOSPC metadata too full (nothing changed either
 * way), -EROFS; drop: -EINVAL nothing held.  Other errors: abort.
 */
int tfs_pmd_hold_roots(struct tfs_pmd *pmd);
int tfs_pmd_drop_held_roots(struct tfs_pmd *pmd);
/*
 * The held copy was made by tfs_pmd_hold_roots (it carries a tag), not by
 * reserve_metadata_snap: after a crash during a diff whose hold a commit
 * wrote, the next read-write open drops it.  False when nothing is held
 * or the copy cannot be read.
 */
bool tfs_pmd_held_for_diff(struct tfs_pmd *pmd);
/* Commits since open. */
uint64_t tfs_pmd_commit_count(struct tfs_pmd *pmd);

/*
 * ---- changed blocks between two devices (thinfs-ctl diff) ----
 * The runs of virtual blocks of device *to that differ from device *from
 * (a NULL device is one that maps nothing): zero = false where to maps a block that
 * from leaves unmapped or maps to another data block, zero = true where
 * from maps a block that to leaves unmapped.  Neighbouring blocks of one
 * kind are one run; runs come in ascending order, each once.  The two
 * mapping trees are walked together and subtrees they share skipped
 * unread (tfs_btree_diff_begin): cost O(changed leaves x depth).
 *
 * The trees walked are those of begin's instant: the caller keeps them
 * unchanged until end, by holding its lock throughout, by a read-only
 * pool, or by tfs_pmd_hold_roots before begin (then it may drop its lock
 * between steps).  begin: -ENODATA (logged) no such device, -EUCLEAN,
 * -EIO, -ENOMEM; nothing is changed.  step: call until it returns 0
 * (done; 1 = more to do); reads about max_reads nodes, calling fn for
 * each finished run; fn's non-zero return is returned; -EIO (logged) when
 * the transaction was aborted since begin (what was held may be gone).
 * Every call under the caller's lock.
 */
struct tfs_thin_diff;
typedef int (*tfs_thin_diff_fn)(void *ctx, uint64_t vblock, uint64_t len, bool zero);
int tfs_thin_diff_begin(struct tfs_pmd *pmd, const tfs_dev_id *from, const tfs_dev_id *to,
			struct tfs_thin_diff **out);
int tfs_thin_diff_step(struct tfs_thin_diff *d, unsigned max_reads, tfs_thin_diff_fn fn,
		       void *ctx);
/* Mapping-tree nodes the walk read, and the first virtual block not yet compared. */
uint64_t tfs_thin_diff_nodes_read(const struct tfs_thin_diff *d);
uint64_t tfs_thin_diff_position(const struct tfs_thin_diff *d);
void tfs_thin_diff_end(struct tfs_thin_diff *d);

/* ---- devices ---- */
int tfs_pmd_create_thin(struct tfs_pmd *pmd, tfs_dev_id id);
/* New device id sharing everything origin maps; bumps the pool time. */
int tfs_pmd_create_snap(struct tfs_pmd *pmd, tfs_dev_id id, tfs_dev_id origin);
/* Releases the device's tree; data blocks whose count reaches 0 become free. -EBUSY if open. */
int tfs_pmd_delete_thin(struct tfs_pmd *pmd, tfs_dev_id id);
/* Ids in ascending order into ids (up to max); returns the total number of devices. */
int tfs_pmd_list_devices(struct tfs_pmd *pmd, tfs_dev_id *ids, unsigned max);

struct tfs_thin_details {
	uint64_t mapped_blocks;
	uint64_t transaction_id;
	uint32_t creation_time;
	uint32_t snapshotted_time;
};
int tfs_pmd_device_details(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_thin_details *out);

/* Open a device handle for mapping calls; -ENODATA when no such device. */
int tfs_pmd_open_thin(struct tfs_pmd *pmd, tfs_dev_id id, struct tfs_td **out);
void tfs_pmd_close_thin(struct tfs_td *td);
tfs_dev_id tfs_td_id(const struct tfs_td *td);

struct tfs_thin_mapping {
	uint64_t vblock;
	uint64_t data_block;
	uint32_t time;
	bool shared; /* time < device's snapshotted_time: may be shared with a snapshot */
};

/* -ENODATA when vblock is unmapped. */
int tfs_thin_lookup(struct tfs_td *td, uint64_t vblock, struct tfs_thin_mapping *out);
/* Mappings with vblock in [begin, end), up to max, ascending.  Returns how many, or -errno. */
int tfs_thin_lookup_range(struct tfs_td *td, uint64_t begin, uint64_t end, unsigned max,
			  struct tfs_thin_mapping *out);
/*
 * Map vblock -> data_block at the current time.  The new data block's count
 * must already be held by the caller (tfs_thin_alloc_data_block gives it);
 * a previous mapping's data block is released.
 */
int tfs_thin_insert(struct tfs_td *td, uint64_t vblock, uint64_t data_block);
/*
 * Every mapping a and b (may be the same device) hold now becomes shared
 * (m.shared), as an origin's do at a snapshot: the pool time moves on one
 * and both devices' snapshotted_time becomes it.  For mappings shared by
 * reference (a clone: the data block's count raised and mapped in a
 * second place), which the time test alone decides, here as in the
 * kernel; insert them with tfs_thin_insert_timed at a time from before
 * this call (the source mapping's own).  O(1); rolled back by an abort.
 * -ENODEV a deleted device, -EROFS.
 */
int tfs_thin_mark_shared(struct tfs_td *a, struct tfs_td *b);
/* Unmap one block (-ENODATA if unmapped) / every block in [begin, end). */
int tfs_thin_remove(struct tfs_td *td, uint64_t vblock);
int tfs_thin_remove_range(struct tfs_td *td, uint64_t begin, uint64_t end, uint64_t *nr_removed);
/* mapped_blocks of this device (kept in memory, written at commit). */
uint64_t tfs_td_mapped_blocks(struct tfs_td *td);

/* Nodes of a device's mapping tree and how full its leaves are (meta-bench). */
struct tfs_thin_tree_shape {
	uint64_t leaves, mappings, internal_nodes;
	uint32_t leaf_capacity; /* mappings a leaf can hold */
	unsigned depth;
};
/* Reads every node of the device's tree. */
int tfs_thin_tree_shape(struct tfs_td *td, struct tfs_thin_tree_shape *out);

/* ---- data space ---- */
/* A data block free now and at the last commit; count 1.  -ENOSPC when full. */
int tfs_pmd_alloc_data_block(struct tfs_pmd *pmd, uint64_t *block);
/* Release a block the caller allocated but did not insert. */
int tfs_pmd_free_data_block(struct tfs_pmd *pmd, uint64_t block);
int tfs_pmd_data_block_count(struct tfs_pmd *pmd, uint64_t block, uint32_t *count);
/* Each run of free data blocks, in order (tfs_smd_walk_free). */
int tfs_pmd_walk_free_data(struct tfs_pmd *pmd,
			   int (*fn)(void *arg, uint64_t begin, uint64_t len), void *arg);

/* ---- restore (thinfs restore): set fields an XML dump carries ---- */
/* Pool time, transaction id and superblock flags, taken at the next commit. */
int tfs_pmd_restore_superblock(struct tfs_pmd *pmd, uint32_t time, uint64_t trans_id,
			       uint32_t flags);
/* Overwrite a device's details as dumped (mapped_blocks included). */
int tfs_pmd_restore_details(struct tfs_pmd *pmd, tfs_dev_id id, const struct tfs_thin_details *d);
/* Map vblock -> data_block with an explicit time; the caller holds data_block's count. */
int tfs_thin_insert_timed(struct tfs_td *td, uint64_t vblock, uint64_t data_block, uint32_t time);
/* One more reference to a data block (restore of blocks mapped by several devices). */
int tfs_pmd_data_block_inc(struct tfs_pmd *pmd, uint64_t block);

#endif
