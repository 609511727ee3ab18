/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * catalog.h - the pool's admin catalog (sqlite): names and attributes.
 *
 * Owns: volume names <-> thin device ids, virtual sizes, modes, owners and
 * times, snapshot groups (mkdir .snapshots/NAME) and their members, the
 * event log, and volumes unlinked but still open (deleted at last close,
 * or at the next mount after a crash).  SQL only with bound parameters.
 *
 * Never: holds block mappings or anything else the thin metadata owns.
 * The metadata is the truth about which devices exist: the caller
 * reconciles at mount (tfs_catalog_reconcile) and changes the catalog only
 * after the metadata commit that made the change durable.
 *
 * Thread safety: one connection, serialised by an internal mutex; every
 * call is one sqlite transaction (or part of one opened with begin/commit).
 * Errors: -ENOENT no such name/id; -EEXIST name taken; -EINVAL bad name
 * (logged with the reason); -EIO sqlite failure (logged with its message).
 * Also: -EROFS a change to a catalog opened read-only; -ENOSPC the disk
 * holding it is full (both logged).
 *
 * Storage (schema version 1): WAL, synchronous=FULL (a call that returned
 * 0 survives a crash), foreign keys on.  Names are unique per directory:
 * among top-level volumes, and among the members of one group; an
 * unlinked row has given its name up.  Names are stored byte for byte.
 * Listing functions copy the rows and call back without the catalog's
 * lock held, so a callback may call the catalog again; a non-zero return
 * from a callback stops the listing and is returned.
 */
#ifndef TFS_META_CATALOG_H
#define TFS_META_CATALOG_H

#include <stdbool.h>
#include <stdint.h>

struct tfs_catalog;

#define TFS_NAME_MAX 255

enum tfs_vol_kind { TFS_VOL_THIN, TFS_VOL_SNAPSHOT /* writable thin snapshot */, TFS_VOL_GROUP_MEMBER /* read-only, in a group */ };

struct tfs_vol_row {
	char name[TFS_NAME_MAX + 1];
	uint32_t dev_id;
	enum tfs_vol_kind kind;
	uint64_t size;            /* virtual size in bytes */
	uint32_t mode;            /* permission bits only */
	uint32_t uid, gid;
	int64_t atime_ns, mtime_ns, ctime_ns;
	int64_t group_id;         /* snapshot group, or 0 */
	bool unlinked;            /* name gone, device still open */
};

/* What is unfinished about a group (a crash came in the middle of it), if anything. */
enum tfs_group_intent { TFS_GROUP_WHOLE, TFS_GROUP_CREATING, TFS_GROUP_REMOVING };

struct tfs_group_row {
	int64_t id;
	char name[TFS_NAME_MAX + 1];
	int64_t created_ns;
	enum tfs_group_intent intent; /* WHOLE except from list_unfinished_groups */
};

struct tfs_event_row {
	int64_t id;
	int64_t time_ns;
	char kind[64];
	char detail[512];
};

/*
 * Create (mkpool) or open.  create refuses an existing non-empty catalog unless force.
 * create: -EEXIST (logged) when path holds volumes, groups or events, or is
 * not a thinfs catalog; force removes the file (and its -wal/-shm) first.
 * It makes the parent directory if missing (one level: /var/lib/thinfs).
 * open: -ENOENT no such file; -EINVAL not a thinfs catalog; -EPROTO a
 * newer schema version.  A read-only open never writes the file: volume
 * and group changes go to a private in-memory copy of those tables
 * (events to the file are refused with -EROFS).
 */
int tfs_catalog_create(const char *path, bool force, struct tfs_catalog **out);
int tfs_catalog_open(const char *path, bool read_only, struct tfs_catalog **out);
/* An empty catalog in memory, for a read-only mount of a pool whose catalog is lost. */
int tfs_catalog_open_empty(struct tfs_catalog **out);
void tfs_catalog_close(struct tfs_catalog *cat);

/*
 * Name rules: 1..255 bytes of well-formed UTF-8 (utf8.h), no '/', not "." or "..",
 * no NUL or control characters (U+0001..U+001F, U+007F..U+009F).
 * check_name logs the reason at info level (a refused name is the
 * client's mistake, not the daemon's).  name_error returns the reason
 * ("name contains '/'") or NULL, logging nothing: for replies to
 * thinfs-ctl.
 */
int tfs_catalog_check_name(const char *name);
const char *tfs_catalog_name_error(const char *name);

/*
 * Several changes as one sqlite transaction (e.g. a snapshot group).
 * begin holds the catalog's lock until commit or rollback: other threads'
 * calls wait, the calling thread's go into the transaction.  No nesting
 * (-EINVAL).  A failed commit rolls back and ends the transaction, so a
 * rollback after it is a harmless no-op, as is rollback without begin.
 */
int tfs_catalog_begin(struct tfs_catalog *cat);
int tfs_catalog_commit(struct tfs_catalog *cat);
void tfs_catalog_rollback(struct tfs_catalog *cat);

/*
 * ---- volumes (unlinked rows are invisible to get/find/list unless asked) ----
 * add_volume: group_id 0 and kind THIN or SNAPSHOT, or a group_id and kind
 * GROUP_MEMBER (else -EINVAL); -EEXIST dev_id or name taken; -ENOENT no
 * such group; -EFBIG size above INT64_MAX.  mode is stored & 07777.
 * get_by_name: top-level volumes only.  get_member: a member of a group
 * by name.  get_by_id is "asked": it finds unlinked rows too (out->unlinked
 * says so), since an open handle on an unlinked volume still has attributes.
 */
int tfs_catalog_add_volume(struct tfs_catalog *cat, const struct tfs_vol_row *row);
int tfs_catalog_get_by_name(struct tfs_catalog *cat, const char *name, struct tfs_vol_row *out);
int tfs_catalog_get_member(struct tfs_catalog *cat, int64_t group_id, const char *name,
			   struct tfs_vol_row *out);
int tfs_catalog_get_by_id(struct tfs_catalog *cat, uint32_t dev_id, struct tfs_vol_row *out);
/* Update size, mode, uid, gid and times of the row with row->dev_id. */
int tfs_catalog_update_volume(struct tfs_catalog *cat, const struct tfs_vol_row *row);
/* Atomic rename of a top-level volume; replaces nothing: -EEXIST when new_name is taken. */
int tfs_catalog_rename(struct tfs_catalog *cat, const char *old_name, const char *new_name);
/* Hide the name now; the row stays (unlinked) until tfs_catalog_remove_volume.
 * Unlinking an unlinked row again is a no-op (0). */
int tfs_catalog_unlink(struct tfs_catalog *cat, uint32_t dev_id);
int tfs_catalog_remove_volume(struct tfs_catalog *cat, uint32_t dev_id);

/* Visit rows in name order (group members included, unlinked only if with_unlinked).
 * Equal names: top level first, then by group id. */
typedef int (*tfs_catalog_vol_fn)(void *ctx, const struct tfs_vol_row *row);
int tfs_catalog_list_volumes(struct tfs_catalog *cat, bool with_unlinked, tfs_catalog_vol_fn fn,
			     void *ctx);

/*
 * ---- snapshot groups ----
 * A group is made or removed whole across a crash by an intent stored with
 * it: add_unfinished_group records the group as being made (its member
 * rows follow in the same transaction, naming device ids chosen before the
 * devices exist); set_group_intent(WHOLE) ends that once the devices are
 * committed, set_group_intent(REMOVING) starts a removal before any device
 * goes.  A group with an intent is invisible to get_group and list_groups
 * (its name stays taken); the next mount lists it with
 * list_unfinished_groups and finishes or undoes it.
 */
int tfs_catalog_add_group(struct tfs_catalog *cat, const char *name, int64_t created_ns,
			  int64_t *id_out);
int tfs_catalog_add_unfinished_group(struct tfs_catalog *cat, const char *name,
				     int64_t created_ns, int64_t *id_out);
/* -ENOENT no such group (setting WHOLE on a group without an intent is a no-op). */
int tfs_catalog_set_group_intent(struct tfs_catalog *cat, int64_t id, enum tfs_group_intent what);
int tfs_catalog_get_group(struct tfs_catalog *cat, const char *name, struct tfs_group_row *out);
/* Removes the group's member rows and intent too (the caller deleted their devices first). */
int tfs_catalog_remove_group(struct tfs_catalog *cat, int64_t id);
/* Whole groups in name order. */
typedef int (*tfs_catalog_group_fn)(void *ctx, const struct tfs_group_row *row);
int tfs_catalog_list_groups(struct tfs_catalog *cat, tfs_catalog_group_fn fn, void *ctx);
/* Groups with an intent (row->intent says which), in id order. */
int tfs_catalog_list_unfinished_groups(struct tfs_catalog *cat, tfs_catalog_group_fn fn,
				       void *ctx);

/*
 * ---- send/receive ----
 * A volume's identity (16 bytes) names what a stream was made from, so a
 * receive can check its base.  get: -ENOENT none stored yet.  set
 * replaces; -ENOENT no such volume.  The row goes with its volume.
 * Temporary names: volumes made only for a send or receive in progress
 * (the name is recorded before the volume exists and dropped after it is
 * renamed or deleted); the next mount deletes those still there.  add:
 * -EEXIST recorded already.  Listing calls fn without the lock.
 */
int tfs_catalog_get_uuid(struct tfs_catalog *cat, uint32_t dev_id, uint8_t uuid[16]);
int tfs_catalog_set_uuid(struct tfs_catalog *cat, uint32_t dev_id, const uint8_t uuid[16]);
int tfs_catalog_add_temp_name(struct tfs_catalog *cat, const char *name);
int tfs_catalog_remove_temp_name(struct tfs_catalog *cat, const char *name);
int tfs_catalog_list_temp_names(struct tfs_catalog *cat, int (*fn)(void *ctx, const char *name),
				void *ctx);

/*
 * ---- events ----
 * time_ns is the time of the add (CLOCK_REALTIME).  kind: 1..63 bytes
 * (-EINVAL); detail is cut to 511 bytes (at a UTF-8 character boundary).
 * Ids only grow, never reused; the oldest events beyond the newest 10000
 * are dropped.
 */
int tfs_catalog_add_event(struct tfs_catalog *cat, const char *kind, const char *detail,
			  int64_t *id_out);
/* Events with id > after_id in id order. */
typedef int (*tfs_catalog_event_fn)(void *ctx, const struct tfs_event_row *row);
int tfs_catalog_list_events(struct tfs_catalog *cat, int64_t after_id, tfs_catalog_event_fn fn,
			    void *ctx);

/*
 * ---- classic (dm-snapshot) snapshots made with thinfs-ctl ----
 * Their name and attributes are a volumes row with the same dev_id (added
 * in the same transaction by the caller) while they are open; this row
 * says what to open again at the next mount, and under which name.  remove: -ENOENT.  list: in dev_id order.
 */
struct tfs_cow_snap_row {
	uint32_t dev_id;
	char name[TFS_NAME_MAX + 1];
	char origin[TFS_NAME_MAX + 1];
	char cow[4096];           /* the COW device's path */
	uint32_t chunk_sectors;
	bool persistent;
};
int tfs_catalog_add_cow_snapshot(struct tfs_catalog *cat, const struct tfs_cow_snap_row *row);
int tfs_catalog_remove_cow_snapshot(struct tfs_catalog *cat, uint32_t dev_id);
typedef int (*tfs_catalog_cow_snap_fn)(void *ctx, const struct tfs_cow_snap_row *row);
int tfs_catalog_list_cow_snapshots(struct tfs_catalog *cat, tfs_catalog_cow_snap_fn fn,
				   void *ctx);

/*
 * A classic snapshot (by name) found invalid: recorded in case its store's
 * header could not be rewritten, so that the next mount opens it invalid
 * all the same.  set: insert (invalid) or drop the record.  cow_invalid:
 * whether name has one (false on any error).
 */
int tfs_catalog_set_cow_invalid(struct tfs_catalog *cat, const char *name, bool invalid);
bool tfs_catalog_cow_invalid(struct tfs_catalog *cat, const char *name);

/*
 * A classic snapshot made with thinfs-ctl (its cow_snapshots row's
 * dev_id) is being merged into its origin: its volumes row is gone, this
 * record and its cow_snapshots row stay until the merge is done, so the
 * next mount resumes it.  set: insert or drop (-ENOENT: nothing changed,
 * the record was there already or was not).  cow_merging: whether
 * dev_id has one (false on any error).
 */
int tfs_catalog_set_cow_merging(struct tfs_catalog *cat, uint32_t dev_id, bool merging);
bool tfs_catalog_cow_merging(struct tfs_catalog *cat, uint32_t dev_id);

/*
 * Mount-time reconciliation with the metadata's device list (ascending):
 * rows whose device is missing are dropped (each logged as a warning);
 * devices without a row get "thin-<id>" rows (size from size_fn, or 0
 * when it is NULL; mode 0600); unlinked rows are reported through
 * orphan_fn so the caller deletes their devices and then the rows.  Rows
 * of unfinished groups are left alone (the caller settles those first).
 * On a read-only catalog the changes are made in memory only: the file is
 * never written (pass no orphan_fn: nothing can be deleted).
 * Details: the row changes are one sqlite transaction, done before any
 * orphan_fn call; orphan_fn runs without the catalog's lock, and its first
 * non-zero return stops the walk and is returned.  A placeholder row is
 * top-level, kind THIN, size 0, mode 0600, uid/gid 0, times now, named
 * "thin-<id>" or, if that is taken, "thin-<id>-1", "-2", ...  Unlinked
 * rows without a device (crash after the delete) go quietly (info).
 */
int tfs_catalog_reconcile(struct tfs_catalog *cat, const uint32_t *dev_ids, unsigned nr,
			  uint64_t (*size_fn)(void *ctx, uint32_t dev_id),
			  int (*orphan_fn)(void *ctx, uint32_t dev_id), void *ctx);

#endif
