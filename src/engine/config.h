/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * config.h - pool.cfg: what a pool is made of and how it behaves.
 *
 * Owns: parsing pool.cfg (INI, via libinih) into a validated struct, and
 * resolving device names (a path, UUID=... or LABEL=..., via libblkid).
 * Every problem is reported once with the file name and line number
 * ("pool.cfg:7: block_size: 100k is not a multiple of 64k") and the parse
 * fails as a whole: nothing half-parsed is ever used.
 *
 * Never: opens the devices for I/O or touches metadata.
 *
 * [pool] keys (see README "pool.cfg reference"):
 *   metadata, data            device path | UUID=... | LABEL=...  (required)
 *   block_size                64k .. 1g, multiple of 64k (default 64k)
 *   catalog                   sqlite file (default: <metadata path>.catalog.db)
 *   low_water_mark            blocks ("4096") or percent ("10%") of data (default 10%)
 *   error_if_no_space         bool (default false)
 *   no_space_timeout          seconds, "60s", "2m"; 0 = hold forever (default 60s)
 *   discard_passdown          bool (default true)
 *   skip_block_zeroing        bool (default false)
 *   commit_interval           seconds or "500ms" (default 1s)
 *   on_event                  program to run on events (default none)
 *   metadata_cache            metadata cache size, e.g. "64m" (default 64m)
 *   host_cache                bool: devices through the host page cache (default
 *                             false: O_DIRECT)
 *   max_threads               FUSE worker threads at most, 8 .. 4096 (default 512)
 *   detect_zeroes             off | unmap: whole blocks of zeros written are
 *                             unmapped, not stored (default off)
 *   writeback_cache           bool: the kernel caches buffered writes to volumes and
 *                             sends them at writeback/fsync/close (default false)
 * [fault] allow = yes|no      fault injection (needs --allow-faults too)
 *   snapshot_low_water        percent of a COW device ("80" or "80%", default 80;
 *                             0 = no low_water_cow events)
 * [origin "NAME"] device = PATH|UUID=|LABEL=   (required)
 * [snapshot "NAME"] origin = an [origin] section (required), cow = device
 *   (required), persistent = yes|no (default yes), chunk_size = 4k .. 1g,
 *   a power of two (default 4k).  Checked here: required keys, the origin
 *   exists, the chunk size, every device resolves and no device is named
 *   twice (by two sections, or by a section and [pool] metadata/data).
 *   What a device holds (a signature, its size) is checked by the engine
 *   when it opens it (origin.h).  Parsed into cow_targets.
 * [cache "NAME"] origin, cache, metadata (devices, required, all different,
 *   none the pool's metadata or data, an origin's, a snapshot's or another
 *   cache's),
 *   block_size 32k .. 1g in multiples of 32k (default 64k), mode
 *   writethrough|writeback|passthrough, policy smq|mq|cleaner,
 *   migration_threshold (sectors, default 2048), metadata_version 1|2
 *   (default 2), discard_passdown (bool, default no): checked by
 *   cache-config.c, parsed into caches[] (at most TFS_CACHES_MAX).
 * All three kinds of sections are also kept as text, in
 * `targets`: one line per section, sorted by kind (origin, snapshot,
 * cache) then by name (strcmp), each '\n'-terminated, keys sorted by name
 * and values as given (unquoted), e.g.
 *   origin "db": device=/dev/sdb
 *   snapshot "s1": chunk_size=8k cow=/dev/sdd origin=db
 * so that equal sections compare equal whatever their order in the file.
 * It is flat (the config is copied by value) and bounded: a file whose
 * text would not fit in TFS_TARGETS_MAX bytes (with its NUL) is refused.
 *
 * Syntax details: comments start with ';' or '#' (inline: " ;"); a value
 * may be wrapped in one pair of double quotes; continuation lines
 * (indented lines after a key) and lines longer than inih's 198 bytes are
 * errors; each key and section at most once.  Sizes: bytes or k/m/g/t/p/e
 * (also "kb", "kib"; binary, any case).  Times: seconds, or ms/s/m/h.
 * Bools: yes/no, true/false, on/off, 1/0.  Devices: a path (relative to
 * the .cfg's directory) to an existing regular file or block device, or
 * UUID=, LABEL=, PARTUUID=, PARTLABEL= (libblkid); stored canonical and
 * absolute.  metadata and data must differ.  catalog default:
 * "<metadata>.catalog.db", or /var/lib/thinfs/<basename>.db when the
 * metadata is a block device.  on_event: path of an executable file, no
 * arguments.  commit_interval: 1ms .. 1h.  metadata_cache: at least 64k.
 */
#ifndef TFS_ENGINE_CONFIG_H
#define TFS_ENGINE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache-config.h"

#define TFS_PATH_MAX 4096
#define TFS_TARGETS_MAX 8192
#define TFS_CACHES_MAX 8
#define TFS_COW_TARGETS_MAX 32

/* An [origin "NAME"] or [snapshot "NAME"] section, checked (see above). */
struct tfs_cow_target_cfg {
	bool is_snapshot;
	char name[256];
	char origin[256];              /* snapshot: its origin section's name */
	char device[TFS_PATH_MAX];     /* origin: device; snapshot: cow; resolved */
	uint32_t chunk_sectors;        /* snapshot: 512-byte sectors (default 8: 4 KiB) */
	bool persistent;               /* snapshot (default yes) */
};

struct tfs_pool_config {
	char path[TFS_PATH_MAX];          /* the pool.cfg itself, absolute */
	char metadata[TFS_PATH_MAX];      /* resolved device or file path */
	char data[TFS_PATH_MAX];
	char catalog[TFS_PATH_MAX];
	char on_event[TFS_PATH_MAX];      /* "" = none */
	uint64_t block_size;              /* bytes */
	uint64_t low_water_blocks;        /* when low_water_is_percent is false */
	unsigned low_water_percent;       /* when low_water_is_percent is true */
	bool low_water_is_percent;
	bool error_if_no_space;
	uint64_t no_space_timeout_ms;     /* 0 = forever */
	bool discard_passdown;
	bool skip_block_zeroing;
	uint64_t preallocate_bytes;       /* data file fallocated this much at a time; 0 = off */
	uint64_t commit_interval_ms;
	uint64_t metadata_cache_bytes;
	bool host_cache;                  /* false: the devices are opened O_DIRECT */
	unsigned max_threads;             /* FUSE worker threads at most */
	bool detect_zeroes;               /* "unmap" */
	bool writeback_cache;             /* FUSE_CAP_WRITEBACK_CACHE asked for at init */
	bool allow_faults;
	char targets[TFS_TARGETS_MAX];    /* [origin/snapshot/cache] sections, see above */
	unsigned nr_caches;               /* [cache] sections, checked, in name order */
	struct tfs_cache_cfg caches[TFS_CACHES_MAX];
	unsigned snapshot_low_water;      /* percent of a COW device (default 80; 0 = off) */
	unsigned nr_cow_targets;          /* origins (by name), then snapshots (by name) */
	struct tfs_cow_target_cfg cow_targets[TFS_COW_TARGETS_MAX];
};

/*
 * Parse and validate path.  Relative device paths are relative to the
 * directory of the .cfg.  Returns 0, or -EINVAL (bad content, reported on
 * stderr through tfs_err with file:line), -ENOENT (no such file or device
 * name that cannot be resolved), -errno.
 */
int tfs_config_load(const char *path, struct tfs_pool_config *out);

/*
 * A reload: may `next` replace `run` on a mounted pool?  -EINVAL when it
 * changes what the pool is, or what is fixed while it is mounted: metadata
 * or data device path, block_size, catalog, metadata_cache, host_cache, preallocate,
 * max_threads, writeback_cache, [fault] allow; why then names the first of them (in that
 * order) and both values, e.g. "block_size: 64k -> 128k cannot change
 * while mounted", and changes is "".  Otherwise 0, why is "", and
 * changes lists what differs, "; "-separated, e.g.
 * "error_if_no_space: no -> yes; no_space_timeout: 60s -> 0s; low_water_mark: 10% -> 4096 blocks; [origin \"db\"] added",
 * or "" when nothing does.  Reloadable: low_water_mark, error_if_no_space,
 * no_space_timeout, discard_passdown, skip_block_zeroing, detect_zeroes,
 * commit_interval, on_event, and the origin/snapshot/cache sections (added, removed,
 * changed: '[cache "c"] changed: mode=writethrough -> mode=writeback').
 * The path of the .cfg itself may differ.  Either text is cut to its
 * buffer (ending "..." when cut); a buffer may be NULL with length 0.
 * Logs nothing.
 */
int tfs_config_reload_diff(const struct tfs_pool_config *run, const struct tfs_pool_config *next,
			   char *why, size_t why_len, char *changes, size_t changes_len);

/*
 * Resolve "UUID=...", "LABEL=..." or a path (relative to base_dir) to a path.
 * Logs nothing (the caller knows the context).  -ENOENT no such file or no
 * device with that tag; -EISDIR a directory; -ENOTBLK neither a regular
 * file nor a block device; -EINVAL empty name or tag value; -ENAMETOOLONG;
 * -errno of realpath(3)/stat(2).  Blocks: a tag may make libblkid probe devices.
 */
int tfs_config_resolve_device(const char *name, const char *base_dir, char *out, size_t out_len);

/*
 * Whether two paths name the same file or block device (stat: the same
 * inode or device number; paths that cannot be stat'ed compare as text).
 */
bool tfs_config_same_device(const char *a, const char *b);

/*
 * Size parsing shared with thinfs-ctl: "64k", "20G", "+50G" (sets *relative).
 * Logs nothing.  -EINVAL not a size (or '+' with relative NULL); -ERANGE
 * more than 2^64-1 bytes.  *relative is set false when there is no '+'.
 */
int tfs_parse_size(const char *s, uint64_t *bytes, bool *relative);

#endif
