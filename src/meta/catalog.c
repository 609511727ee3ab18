/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * catalog.c - the pool's admin catalog in sqlite (see catalog.h).
 *
 * One connection per catalog, behind one recursive mutex: recursive so
 * that tfs_catalog_begin() can hold it until commit or rollback while the
 * same thread goes on calling the other functions, and no other thread's
 * statement lands inside that transaction.  Functions that run several
 * statements wrap them in a SAVEPOINT, which nests inside begin/commit and
 * is a transaction of its own outside one.  Listing functions copy rows
 * out and call back without the mutex, so a callback may call the catalog
 * or take its own locks without deadlocking against another thread.
 *
 * Durability: WAL with synchronous=FULL, so a call that returned 0 (or a
 * commit) survives a crash.  Every value reaches SQL through a bound
 * parameter; the SQL text is always a constant.
 */
#include "catalog.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "utf8.h"

#define SCHEMA_VERSION 1
/* Keep the newest events only: the log would otherwise grow for ever. */
#define EVENTS_KEPT 10000
/* Events are handed to callbacks in batches of this many rows. */
#define EVENT_BATCH 256
#define EVENT_KIND_MAX (sizeof(((struct tfs_event_row *)0)->kind) - 1)
#define EVENT_DETAIL_MAX (sizeof(((struct tfs_event_row *)0)->detail) - 1)
/* A writer that finds the database locked (thinfs-ctl reading) waits this long. */
#define BUSY_TIMEOUT_MS 5000

struct tfs_catalog {
	pthread_mutex_t lock; /* recursive; protects everything below */
	sqlite3 *db;
	char *path;
	bool read_only;
	bool overlay_writable; /* read-only: the in-memory copy may change now (open, reconcile) */
	bool in_txn;          /* tfs_catalog_begin() holds lock until commit/rollback */
};

/* Table bodies shared by the schema and the read-only overlay (open_overlay). */
#define GROUPS_TABLE                                                                       \
	"groups ("                                                                         \
	"  id INTEGER PRIMARY KEY AUTOINCREMENT,"                                          \
	"  name TEXT NOT NULL UNIQUE,"                                                     \
	"  created_ns INTEGER NOT NULL)"
#define VOLUMES_TABLE                                                                      \
	"volumes ("                                                                        \
	"  dev_id INTEGER PRIMARY KEY CHECK (dev_id BETWEEN 0 AND 4294967295),"            \
	"  name TEXT NOT NULL,"                                                            \
	"  kind TEXT NOT NULL CHECK (kind IN ('thin', 'snapshot', 'group_member')),"       \
	"  size INTEGER NOT NULL,"                                                         \
	"  mode INTEGER NOT NULL,"                                                         \
	"  uid INTEGER NOT NULL,"                                                          \
	"  gid INTEGER NOT NULL,"                                                          \
	"  atime_ns INTEGER NOT NULL,"                                                     \
	"  mtime_ns INTEGER NOT NULL,"                                                     \
	"  ctime_ns INTEGER NOT NULL,"                                                     \
	"  group_id INTEGER REFERENCES groups(id) ON DELETE CASCADE,"                      \
	"  unlinked INTEGER NOT NULL DEFAULT 0,"                                           \
	"  CHECK ((kind = 'group_member') = (group_id IS NOT NULL)))"
/*
 * Names are unique within their directory: the top level (group 0, as
 * NULL never compares equal) or one snapshot group.  Unlinked rows have
 * given their name up, so they are outside the index.
 */
#define DIR_NAME_INDEX "volumes_dir_name ON volumes(ifnull(group_id, 0), name) WHERE unlinked = 0"
/*
 * A group being made or removed: written (with the group's rows) before its
 * devices change, dropped once they have.  Such a group is invisible, and
 * the next mount finishes or undoes it (tfs_catalog_list_unfinished_groups).
 * Added to version 1 without a version bump: an older thinfs ignores it.
 */
#define INTENTS_TABLE                                                                      \
	"group_intents ("                                                                  \
	"  group_id INTEGER PRIMARY KEY REFERENCES groups(id) ON DELETE CASCADE,"          \
	"  action TEXT NOT NULL CHECK (action IN ('create', 'remove')))"

/*
 * A volume's identity for send/receive streams: 16 random bytes given at
 * its first send, or the stream's when receive made it.  Added to
 * version 1 without a version bump, as group_intents.
 */
#define UUIDS_TABLE                                                                        \
	"volume_uuids ("                                                                   \
	"  dev_id INTEGER PRIMARY KEY REFERENCES volumes(dev_id) ON DELETE CASCADE,"       \
	"  uuid BLOB NOT NULL CHECK (length(uuid) = 16))"
/*
 * Names of volumes that exist only for a send or a receive in progress:
 * written before the volume is made, dropped after it is renamed or
 * deleted, so the next mount deletes what a crash left (by name).
 */
#define TEMP_NAMES_TABLE "temp_names (name TEXT PRIMARY KEY)"

/*
 * Classic snapshots made with thinfs-ctl (those of pool.cfg are in the
 * file): what the next mount needs to open them again, the name included,
 * so that one that could not be opened for a while (its origin section
 * was missing) comes back under it.  While open, their names and
 * attributes are rows of volumes with the same dev_id.  Added to version
 * 1 without a version bump: an older thinfs ignores it.
 */
#define COW_SNAPSHOTS_TABLE                                                                \
	"cow_snapshots ("                                                                  \
	"  dev_id INTEGER PRIMARY KEY,"                                                    \
	"  name TEXT NOT NULL,"                                                            \
	"  origin TEXT NOT NULL,"                                                          \
	"  cow TEXT NOT NULL,"                                                             \
	"  chunk_sectors INTEGER NOT NULL,"                                                \
	"  persistent INTEGER NOT NULL)"

/*
 * Classic snapshots found invalid whose store's header may still say
 * valid (its write failed): the next mount opens them invalid anyway.
 * Added to version 1 without a version bump.
 */
#define COW_INVALID_TABLE "cow_invalid (name TEXT PRIMARY KEY)"

/*
 * Classic snapshots made with thinfs-ctl that are being merged into their
 * origin (by dev_id): the next mount resumes the merge.  Added to version
 * 1 without a version bump.
 */
#define COW_MERGING_TABLE "cow_merging (dev_id INTEGER PRIMARY KEY)"

static const char *const schema_sql =
	"CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);"
	"CREATE TABLE IF NOT EXISTS " UUIDS_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " TEMP_NAMES_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " GROUPS_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " VOLUMES_TABLE ";"
	"CREATE UNIQUE INDEX IF NOT EXISTS " DIR_NAME_INDEX ";"
	"CREATE INDEX IF NOT EXISTS volumes_group ON volumes(group_id);"
	"CREATE TABLE IF NOT EXISTS " INTENTS_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " COW_SNAPSHOTS_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " COW_INVALID_TABLE ";"
	"CREATE TABLE IF NOT EXISTS " COW_MERGING_TABLE ";"
	"CREATE TABLE IF NOT EXISTS events ("
	"  id INTEGER PRIMARY KEY AUTOINCREMENT,"
	"  time_ns INTEGER NOT NULL,"
	"  kind TEXT NOT NULL,"
	"  detail TEXT NOT NULL);";

/*
 * A read-only catalog works on copies of its name tables in sqlite's
 * private temp database, which unqualified names resolve to before the
 * file's: the mount's reconcile can add rows for devices the file does
 * not know, and they live in memory only.  Events stay the file's.
 */
static const char *const overlay_sql =
	"CREATE TEMP TABLE " GROUPS_TABLE ";"
	"CREATE TEMP TABLE " VOLUMES_TABLE ";"
	"CREATE UNIQUE INDEX temp." DIR_NAME_INDEX ";"
	"CREATE TEMP TABLE " INTENTS_TABLE ";"
	"INSERT INTO temp.groups (id, name, created_ns) SELECT id, name, created_ns FROM main.groups;"
	"INSERT INTO temp.volumes SELECT * FROM main.volumes;";
static const char *const overlay_intents_sql =
	"INSERT INTO temp.group_intents (group_id, action) "
	"SELECT group_id, action FROM main.group_intents;";

/* Groups that are whole: no create or remove of theirs is unfinished. */
#define GROUP_IS_WHOLE "id NOT IN (SELECT group_id FROM group_intents)"

#define VOL_COLS                                                                           \
	"dev_id, name, kind, size, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, "          \
	"ifnull(group_id, 0), unlinked"

static const char *const kind_name[] = {
	[TFS_VOL_THIN] = "thin",
	[TFS_VOL_SNAPSHOT] = "snapshot",
	[TFS_VOL_GROUP_MEMBER] = "group_member",
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void lock(struct tfs_catalog *cat)
{
	pthread_mutex_lock(&cat->lock);
}

static void unlock(struct tfs_catalog *cat)
{
	pthread_mutex_unlock(&cat->lock);
}

/*
 * Turn a sqlite result into -errno.  Expected outcomes (a name taken, a
 * missing group) are the caller's to report; real failures are logged here,
 * where sqlite's own message is still at hand.
 */
static int sql_error(struct tfs_catalog *cat, int rc, const char *what)
{
	int ext = sqlite3_extended_errcode(cat->db);

	switch (rc & 0xff) {
	case SQLITE_CONSTRAINT:
		if (ext == SQLITE_CONSTRAINT_UNIQUE || ext == SQLITE_CONSTRAINT_PRIMARYKEY)
			return -EEXIST;
		if (ext == SQLITE_CONSTRAINT_FOREIGNKEY)
			return -ENOENT;
		tfs_err("catalog %s: %s: %s", cat->path, what, sqlite3_errmsg(cat->db));
		return -EINVAL;
	case SQLITE_READONLY:
	case SQLITE_AUTH: /* authorize() */
		tfs_err("catalog %s: %s: the catalog is read-only", cat->path, what);
		return -EROFS;
	case SQLITE_FULL:
		tfs_err("catalog %s: %s: %s", cat->path, what, sqlite3_errmsg(cat->db));
		return -ENOSPC;
	case SQLITE_NOMEM:
		return -ENOMEM;
	default:
		tfs_err("catalog %s: %s: %s", cat->path, what, sqlite3_errmsg(cat->db));
		return -EIO;
	}
}

/* Constant SQL only (schema, pragmas, transaction control). */
static int exec(struct tfs_catalog *cat, const char *sql, const char *what)
{
	int rc = sqlite3_exec(cat->db, sql, NULL, NULL, NULL);

	return rc == SQLITE_OK ? 0 : sql_error(cat, rc, what);
}

static int prepare(struct tfs_catalog *cat, const char *sql, sqlite3_stmt **st)
{
	int rc = sqlite3_prepare_v2(cat->db, sql, -1, st, NULL);

	if (rc != SQLITE_OK) {
		*st = NULL;
		return sql_error(cat, rc, "prepare");
	}
	return 0;
}

/* Run a statement that returns no rows; *changes gets the rows it touched. */
static int step_done(struct tfs_catalog *cat, sqlite3_stmt *st, const char *what, int *changes)
{
	int rc = sqlite3_step(st);

	if (rc != SQLITE_DONE)
		return sql_error(cat, rc, what);
	if (changes)
		*changes = sqlite3_changes(cat->db);
	return 0;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s)
{
	sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT);
}

/* Savepoints make a multi-statement call atomic, inside begin() or not. */
static int savepoint(struct tfs_catalog *cat)
{
	return exec(cat, "SAVEPOINT tfs_call", "savepoint");
}

static int release(struct tfs_catalog *cat, int r)
{
	if (r == 0)
		return exec(cat, "RELEASE tfs_call", "release savepoint");
	/* Undo this call's statements only; an outer begin() stays open. */
	sqlite3_exec(cat->db, "ROLLBACK TO tfs_call; RELEASE tfs_call", NULL, NULL, NULL);
	return r;
}

/* ---- names ---- */

/* U+0080..U+009F encoded: 8-bit terminals take U+009B as CSI, as ESC [. */
static bool is_c1_control(const unsigned char *c)
{
	return c[0] == 0xc2 && c[1] >= 0x80 && c[1] <= 0x9f;
}

/* The reason a name is refused, or NULL. */
const char *tfs_catalog_name_error(const char *name)
{
	size_t len;

	if (!name || !name[0])
		return "name is empty";
	len = strlen(name);
	if (len > TFS_NAME_MAX)
		return "name is longer than 255 bytes";
	if (!strcmp(name, ".") || !strcmp(name, ".."))
		return "name is '.' or '..'";
	if (strchr(name, '/'))
		return "name contains '/'";
	for (const unsigned char *c = (const unsigned char *)name; *c; c++)
		if (*c < 0x20 || *c == 0x7f || is_c1_control(c))
			return "name contains a control character";
	/* Names go out in JSON (status, list, events), which must be UTF-8. */
	if (!tfs_utf8_valid(name, len))
		return "name is not valid UTF-8";
	return NULL;
}

/* A name fit for a log line: control bytes and ill-formed UTF-8 escaped, long ones cut. */
static void printable(const char *name, char *out, size_t len)
{
	const unsigned char *c = (const unsigned char *)name;
	size_t o = 0;

	/* Room is kept for one escape or character (4), "..." (3) and the NUL. */
	while (*c && o + 8 < len) {
		size_t l = tfs_utf8_seq_len((const char *)c, strnlen((const char *)c, 4));

		if (*c < 0x20 || *c == 0x7f || *c == '\\' || !l || is_c1_control(c)) {
			o += (size_t)snprintf(out + o, len - o, "\\x%02x", *c);
			c++;
		} else {
			memcpy(out + o, c, l);
			o += l;
			c += l;
		}
	}
	if (*c)
		o += (size_t)snprintf(out + o, len - o, "...");
	out[o] = '\0';
}

int tfs_catalog_check_name(const char *name)
{
	const char *why = tfs_catalog_name_error(name);
	char shown[96];

	if (!why)
		return 0;
	printable(name ? name : "", shown, sizeof(shown));
	/* Info, not error: a refused name is the client's mistake, not the pool's. */
	tfs_info("invalid name \"%s\": %s", shown, why);
	return -EINVAL;
}

/* ---- open, create, close ---- */

/*
 * A read-only catalog refuses changes as sqlite refuses them to the file,
 * also to its in-memory copy (overlay_sql), except while it is set up and
 * while the mount reconciles it.
 */
static int authorize(void *ctx, int action, const char *a, const char *b, const char *db,
		     const char *trigger)
{
	const struct tfs_catalog *cat = ctx;

	if (!cat->read_only || cat->overlay_writable)
		return SQLITE_OK;
	return action == SQLITE_INSERT || action == SQLITE_UPDATE || action == SQLITE_DELETE ?
	       SQLITE_DENY : SQLITE_OK;
}

static int setup_connection(struct tfs_catalog *cat)
{
	sqlite3_set_authorizer(cat->db, authorize, cat);
	sqlite3_extended_result_codes(cat->db, 1);
	sqlite3_busy_timeout(cat->db, BUSY_TIMEOUT_MS);
	return exec(cat, "PRAGMA foreign_keys = ON", "enable foreign keys");
}

/* Only once the file is known to be ours: these pragmas write to it. */
static int make_durable(struct tfs_catalog *cat)
{
	int r = exec(cat, "PRAGMA journal_mode = WAL", "enable WAL");

	if (r)
		return r;
	return exec(cat, "PRAGMA synchronous = FULL", "set synchronous");
}

static int read_version(struct tfs_catalog *cat, int *version)
{
	sqlite3_stmt *st;
	int rc, r;

	*version = 0;
	rc = sqlite3_prepare_v2(cat->db, "SELECT max(version) FROM schema_version", -1, &st, NULL);
	if (rc != SQLITE_OK) {
		/* No such table (a sqlite file, but not ours), or not sqlite at all. */
		if ((rc & 0xff) == SQLITE_ERROR || (rc & 0xff) == SQLITE_NOTADB)
			return -ENODATA;
		return sql_error(cat, rc, "read the schema version");
	}
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		*version = sqlite3_column_int(st, 0);
	r = rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sql_error(cat, rc, "read the schema version");
	sqlite3_finalize(st);
	return r;
}

/* Tables created if missing, then the version checked (and set when new). */
static int setup_schema(struct tfs_catalog *cat)
{
	int version, r;

	r = savepoint(cat);
	if (r)
		return r;
	r = exec(cat, schema_sql, "create the schema");
	if (r)
		goto out;
	r = read_version(cat, &version);
	if (r)
		goto out;
	if (!version)
		r = exec(cat, "INSERT INTO schema_version (version) VALUES (1)", "set the schema version");
	else if (version > SCHEMA_VERSION) {
		tfs_err("catalog %s: schema version %d is newer than this thinfs understands (%d)",
			cat->path, version, SCHEMA_VERSION);
		r = -EPROTO;
	}
out:
	return release(cat, r);
}

static int cat_connect(const char *path, bool read_only, bool create, struct tfs_catalog **out)
{
	struct tfs_catalog *cat;
	pthread_mutexattr_t attr;
	int flags, rc, r;

	cat = calloc(1, sizeof(*cat));
	if (!cat)
		return -ENOMEM;
	cat->path = strdup(path);
	if (!cat->path) {
		r = -ENOMEM;
		goto err_free;
	}
	cat->read_only = read_only;
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
	r = -pthread_mutex_init(&cat->lock, &attr);
	pthread_mutexattr_destroy(&attr);
	if (r)
		goto err_free_path;

	flags = read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE;
	if (create)
		flags |= SQLITE_OPEN_CREATE;
	rc = sqlite3_open_v2(path, &cat->db, flags, NULL);
	if (rc != SQLITE_OK) {
		tfs_err("catalog %s: cannot open: %s", path,
			cat->db ? sqlite3_errmsg(cat->db) : sqlite3_errstr(rc));
		r = (rc & 0xff) == SQLITE_CANTOPEN ? -ENOENT : -EIO;
		goto err_close;
	}
	r = setup_connection(cat);
	if (r)
		goto err_close;
	*out = cat;
	return 0;

err_close:
	sqlite3_close_v2(cat->db);
	pthread_mutex_destroy(&cat->lock);
err_free_path:
	free(cat->path);
err_free:
	free(cat);
	return r;
}

static void disconnect(struct tfs_catalog *cat)
{
	sqlite3_close_v2(cat->db);
	pthread_mutex_destroy(&cat->lock);
	free(cat->path);
	free(cat);
}

static int count_rows(struct tfs_catalog *cat, const char *sql, int64_t *n)
{
	sqlite3_stmt *st;
	int rc, r;

	r = prepare(cat, sql, &st);
	if (r)
		return r;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*n = sqlite3_column_int64(st, 0);
		r = 0;
	} else {
		r = sql_error(cat, rc, "count rows");
	}
	sqlite3_finalize(st);
	return r;
}

/*
 * A catalog mkpool may reuse without --force: no file, an empty file, or
 * a thinfs catalog with nothing in it.  Anything else could be the
 * catalog of a pool still in use (or someone's database).
 */
static int check_reusable(const char *path)
{
	struct tfs_catalog *cat;
	int64_t vols = 0, groups = 0, events = 0;
	struct stat st;
	int version, r;

	if (stat(path, &st)) {
		if (errno == ENOENT)
			return 0;
		tfs_err("catalog %s: %s", path, strerror(errno));
		return -errno;
	}
	if (!S_ISREG(st.st_mode)) {
		tfs_err("catalog %s: not a regular file", path);
		return -EINVAL;
	}
	if (st.st_size == 0)
		return 0;
	r = cat_connect(path, true, false, &cat);
	if (r)
		return r;
	r = read_version(cat, &version);
	if (r == -ENODATA || (r == 0 && !version)) {
		tfs_err("catalog %s: the file exists and is not a thinfs catalog "
			"(mkpool --force replaces it)", path);
		r = -EEXIST;
		goto out;
	}
	if (r) {
		tfs_err("catalog %s: the file exists and cannot be read as a catalog "
			"(mkpool --force replaces it)", path);
		r = -EEXIST;
		goto out;
	}
	r = count_rows(cat, "SELECT count(*) FROM volumes", &vols);
	if (!r)
		r = count_rows(cat, "SELECT count(*) FROM groups", &groups);
	if (!r)
		r = count_rows(cat, "SELECT count(*) FROM events", &events);
	if (r)
		goto out;
	if (vols || groups || events) {
		tfs_err("catalog %s already holds %" PRId64 " volume(s), %" PRId64
			" snapshot group(s) and %" PRId64 " event(s) of a pool "
			"(mkpool --force replaces it)",
			path, vols, groups, events);
		r = -EEXIST;
	}
out:
	disconnect(cat);
	return r;
}

static int remove_files(const char *path)
{
	static const char *const suffixes[] = { "", "-wal", "-shm", "-journal" };
	char name[PATH_MAX];
	struct stat st;

	if (!stat(path, &st) && !S_ISREG(st.st_mode)) {
		tfs_err("catalog %s: not a regular file", path);
		return -EINVAL;
	}
	for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
		if (snprintf(name, sizeof(name), "%s%s", path, suffixes[i]) >= (int)sizeof(name))
			return -ENAMETOOLONG;
		if (unlink(name) && errno != ENOENT) {
			tfs_err("catalog %s: cannot remove: %s", name, strerror(errno));
			return -errno;
		}
	}
	return 0;
}

/* The default catalog lives in /var/lib/thinfs, which may not exist yet. */
static int make_parent_dir(const char *path)
{
	char dir[PATH_MAX];
	char *slash;

	if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	if (mkdir(dir, 0755) && errno != EEXIST) {
		tfs_err("catalog %s: cannot create directory %s: %s", path, dir, strerror(errno));
		return -errno;
	}
	return 0;
}

int tfs_catalog_create(const char *path, bool force, struct tfs_catalog **out)
{
	struct tfs_catalog *cat;
	int r;

	r = force ? remove_files(path) : check_reusable(path);
	if (r)
		return r;
	r = make_parent_dir(path);
	if (r)
		return r;
	r = cat_connect(path, false, true, &cat);
	if (r)
		return r;
	r = make_durable(cat);
	if (!r)
		r = setup_schema(cat);
	if (r) {
		disconnect(cat);
		return r;
	}
	*out = cat;
	return 0;
}

int tfs_catalog_open_empty(struct tfs_catalog **out)
{
	struct tfs_catalog *cat;
	int r;

	r = cat_connect(":memory:", false, true, &cat);
	if (r)
		return r;
	r = setup_schema(cat);
	if (r) {
		disconnect(cat);
		return r;
	}
	*out = cat;
	return 0;
}

/* See overlay_sql. */
static int open_overlay(struct tfs_catalog *cat)
{
	int64_t n;
	int r;

	cat->overlay_writable = true;
	r = exec(cat, overlay_sql, "copy the names into memory");
	if (r)
		goto out;
	/* A catalog written before group_intents existed has none. */
	r = count_rows(cat,
		       "SELECT count(*) FROM main.sqlite_master "
		       "WHERE type = 'table' AND name = 'group_intents'",
		       &n);
	if (!r && n)
		r = exec(cat, overlay_intents_sql, "copy the names into memory");
out:
	cat->overlay_writable = false;
	return r;
}

int tfs_catalog_open(const char *path, bool read_only, struct tfs_catalog **out)
{
	struct tfs_catalog *cat;
	int version, r;

	if (access(path, F_OK)) {
		r = -errno;
		tfs_err("catalog %s: %s (thinfs mkpool creates it)", path, strerror(errno));
		return r;
	}
	r = cat_connect(path, read_only, false, &cat);
	if (r)
		return r;
	r = read_version(cat, &version);
	if (r == -ENODATA || (r == 0 && !version)) {
		tfs_err("catalog %s: not a thinfs catalog", path);
		r = -EINVAL;
		goto err_disconnect;
	}
	if (r)
		goto err_disconnect;
	if (version > SCHEMA_VERSION) {
		tfs_err("catalog %s: schema version %d is newer than this thinfs understands (%d)",
			path, version, SCHEMA_VERSION);
		r = -EPROTO;
		goto err_disconnect;
	}
	/* Idempotent; it is also where a later version would migrate. */
	if (!read_only) {
		r = make_durable(cat);
		if (!r)
			r = setup_schema(cat);
	} else {
		r = open_overlay(cat);
	}
	if (r)
		goto err_disconnect;
	*out = cat;
	return 0;

err_disconnect:
	disconnect(cat);
	return r;
}

void tfs_catalog_close(struct tfs_catalog *cat)
{
	if (!cat)
		return;
	if (cat->in_txn) {
		tfs_warn("catalog %s: closed inside a transaction; rolling it back", cat->path);
		sqlite3_exec(cat->db, "ROLLBACK", NULL, NULL, NULL);
	}
	disconnect(cat);
}

/* ---- transactions ---- */

int tfs_catalog_begin(struct tfs_catalog *cat)
{
	int r;

	lock(cat);
	if (cat->in_txn) {
		tfs_err("catalog %s: begin inside a transaction", cat->path);
		unlock(cat);
		return -EINVAL;
	}
	r = exec(cat, "BEGIN IMMEDIATE", "begin");
	if (r) {
		unlock(cat);
		return r;
	}
	cat->in_txn = true;
	return 0; /* the lock stays held until commit or rollback */
}

int tfs_catalog_commit(struct tfs_catalog *cat)
{
	int r;

	lock(cat);
	if (!cat->in_txn) {
		unlock(cat);
		return -EINVAL;
	}
	r = exec(cat, "COMMIT", "commit");
	if (r)
		sqlite3_exec(cat->db, "ROLLBACK", NULL, NULL, NULL);
	cat->in_txn = false;
	unlock(cat);
	unlock(cat); /* begin's */
	return r;
}

void tfs_catalog_rollback(struct tfs_catalog *cat)
{
	lock(cat);
	if (!cat->in_txn) {
		/* Callers roll back after a failed commit, which already did. */
		unlock(cat);
		return;
	}
	sqlite3_exec(cat->db, "ROLLBACK", NULL, NULL, NULL);
	cat->in_txn = false;
	unlock(cat);
	unlock(cat); /* begin's */
}

/* ---- volumes ---- */

static void copy_text(char *dst, size_t len, const unsigned char *src)
{
	snprintf(dst, len, "%s", src ? (const char *)src : "");
}

static enum tfs_vol_kind parse_kind(const unsigned char *s)
{
	for (unsigned k = 0; k < sizeof(kind_name) / sizeof(kind_name[0]); k++)
		if (s && !strcmp((const char *)s, kind_name[k]))
			return (enum tfs_vol_kind)k;
	return TFS_VOL_THIN; /* the CHECK constraint keeps other values out */
}

/* A row of VOL_COLS. */
static void read_vol(sqlite3_stmt *st, struct tfs_vol_row *row)
{
	memset(row, 0, sizeof(*row));
	row->dev_id = (uint32_t)sqlite3_column_int64(st, 0);
	copy_text(row->name, sizeof(row->name), sqlite3_column_text(st, 1));
	row->kind = parse_kind(sqlite3_column_text(st, 2));
	row->size = (uint64_t)sqlite3_column_int64(st, 3);
	row->mode = (uint32_t)sqlite3_column_int64(st, 4);
	row->uid = (uint32_t)sqlite3_column_int64(st, 5);
	row->gid = (uint32_t)sqlite3_column_int64(st, 6);
	row->atime_ns = sqlite3_column_int64(st, 7);
	row->mtime_ns = sqlite3_column_int64(st, 8);
	row->ctime_ns = sqlite3_column_int64(st, 9);
	row->group_id = sqlite3_column_int64(st, 10);
	row->unlinked = sqlite3_column_int(st, 11) != 0;
}

/* First row of a prepared single-row query, or -ENOENT. */
static int fetch_vol(struct tfs_catalog *cat, sqlite3_stmt *st, struct tfs_vol_row *out)
{
	int rc = sqlite3_step(st);

	if (rc == SQLITE_ROW) {
		read_vol(st, out);
		return 0;
	}
	return rc == SQLITE_DONE ? -ENOENT : sql_error(cat, rc, "read a volume");
}

static int insert_volume(struct tfs_catalog *cat, const struct tfs_vol_row *row)
{
	sqlite3_stmt *st;
	int r;

	r = prepare(cat,
		    "INSERT INTO volumes (dev_id, name, kind, size, mode, uid, gid, atime_ns, "
		    "mtime_ns, ctime_ns, group_id, unlinked) "
		    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
		    &st);
	if (r)
		return r;
	sqlite3_bind_int64(st, 1, row->dev_id);
	bind_text(st, 2, row->name);
	bind_text(st, 3, kind_name[row->kind]);
	sqlite3_bind_int64(st, 4, (int64_t)row->size);
	sqlite3_bind_int64(st, 5, row->mode & 07777);
	sqlite3_bind_int64(st, 6, row->uid);
	sqlite3_bind_int64(st, 7, row->gid);
	sqlite3_bind_int64(st, 8, row->atime_ns);
	sqlite3_bind_int64(st, 9, row->mtime_ns);
	sqlite3_bind_int64(st, 10, row->ctime_ns);
	if (row->group_id)
		sqlite3_bind_int64(st, 11, row->group_id);
	else
		sqlite3_bind_null(st, 11);
	sqlite3_bind_int(st, 12, row->unlinked);
	r = step_done(cat, st, "add a volume", NULL);
	sqlite3_finalize(st);
	return r;
}

int tfs_catalog_add_volume(struct tfs_catalog *cat, const struct tfs_vol_row *row)
{
	int r;

	r = tfs_catalog_check_name(row->name);
	if (r)
		return r;
	if ((unsigned)row->kind > TFS_VOL_GROUP_MEMBER ||
	    (row->kind == TFS_VOL_GROUP_MEMBER) != (row->group_id != 0)) {
		tfs_err("catalog %s: volume %s: kind %d does not fit group %" PRId64, cat->path,
			row->name, (int)row->kind, row->group_id);
		return -EINVAL;
	}
	if (row->size > INT64_MAX)
		return -EFBIG;
	lock(cat);
	r = insert_volume(cat, row);
	unlock(cat);
	return r;
}

int tfs_catalog_get_by_name(struct tfs_catalog *cat, const char *name, struct tfs_vol_row *out)
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat,
		    "SELECT " VOL_COLS " FROM volumes "
		    "WHERE group_id IS NULL AND name = ? AND unlinked = 0",
		    &st);
	if (!r) {
		bind_text(st, 1, name);
		r = fetch_vol(cat, st, out);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

int tfs_catalog_get_member(struct tfs_catalog *cat, int64_t group_id, const char *name,
			   struct tfs_vol_row *out)
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat,
		    "SELECT " VOL_COLS " FROM volumes "
		    "WHERE group_id = ? AND name = ? AND unlinked = 0",
		    &st);
	if (!r) {
		sqlite3_bind_int64(st, 1, group_id);
		bind_text(st, 2, name);
		r = fetch_vol(cat, st, out);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

int tfs_catalog_get_by_id(struct tfs_catalog *cat, uint32_t dev_id, struct tfs_vol_row *out)
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat, "SELECT " VOL_COLS " FROM volumes WHERE dev_id = ?", &st);
	if (!r) {
		sqlite3_bind_int64(st, 1, dev_id);
		r = fetch_vol(cat, st, out);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

int tfs_catalog_update_volume(struct tfs_catalog *cat, const struct tfs_vol_row *row)
{
	sqlite3_stmt *st;
	int changes = 0, r;

	if (row->size > INT64_MAX)
		return -EFBIG;
	lock(cat);
	r = prepare(cat,
		    "UPDATE volumes SET size = ?, mode = ?, uid = ?, gid = ?, atime_ns = ?, "
		    "mtime_ns = ?, ctime_ns = ? WHERE dev_id = ?",
		    &st);
	if (r)
		goto out_unlock;
	sqlite3_bind_int64(st, 1, (int64_t)row->size);
	sqlite3_bind_int64(st, 2, row->mode & 07777);
	sqlite3_bind_int64(st, 3, row->uid);
	sqlite3_bind_int64(st, 4, row->gid);
	sqlite3_bind_int64(st, 5, row->atime_ns);
	sqlite3_bind_int64(st, 6, row->mtime_ns);
	sqlite3_bind_int64(st, 7, row->ctime_ns);
	sqlite3_bind_int64(st, 8, row->dev_id);
	r = step_done(cat, st, "update a volume", &changes);
	sqlite3_finalize(st);
	if (!r && !changes)
		r = -ENOENT;
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_rename(struct tfs_catalog *cat, const char *old_name, const char *new_name)
{
	sqlite3_stmt *st;
	int changes = 0, r;

	r = tfs_catalog_check_name(new_name);
	if (r)
		return r;
	lock(cat);
	r = prepare(cat,
		    "UPDATE volumes SET name = ? "
		    "WHERE group_id IS NULL AND name = ? AND unlinked = 0",
		    &st);
	if (r)
		goto out_unlock;
	bind_text(st, 1, new_name);
	bind_text(st, 2, old_name);
	r = step_done(cat, st, "rename a volume", &changes);
	sqlite3_finalize(st);
	if (!r && !changes)
		r = -ENOENT;
out_unlock:
	unlock(cat);
	return r;
}

/* One statement on the row of dev_id; -ENOENT when there is none. */
/* One statement with a name as its only parameter; how many rows it changed does not matter. */
static int change_by_name(struct tfs_catalog *cat, const char *sql, const char *name,
			  const char *what)
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat, sql, &st);
	if (!r) {
		bind_text(st, 1, name);
		r = step_done(cat, st, what, NULL);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

static int change_by_id(struct tfs_catalog *cat, const char *sql, uint32_t dev_id,
			const char *what)
{
	sqlite3_stmt *st;
	int changes = 0, r;

	lock(cat);
	r = prepare(cat, sql, &st);
	if (r)
		goto out_unlock;
	sqlite3_bind_int64(st, 1, dev_id);
	r = step_done(cat, st, what, &changes);
	sqlite3_finalize(st);
	if (!r && !changes)
		r = -ENOENT;
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_unlink(struct tfs_catalog *cat, uint32_t dev_id)
{
	return change_by_id(cat, "UPDATE volumes SET unlinked = 1 WHERE dev_id = ?", dev_id,
			    "unlink a volume");
}

int tfs_catalog_remove_volume(struct tfs_catalog *cat, uint32_t dev_id)
{
	return change_by_id(cat, "DELETE FROM volumes WHERE dev_id = ?", dev_id, "remove a volume");
}

/* Every row of a query, copied out so callbacks run without the lock. */
static int collect_vols(struct tfs_catalog *cat, sqlite3_stmt *st, struct tfs_vol_row **rows,
			size_t *nr)
{
	struct tfs_vol_row *v = NULL, *grown;
	size_t n = 0, cap = 0;
	int rc;

	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			grown = realloc(v, cap * sizeof(*v));
			if (!grown) {
				free(v);
				return -ENOMEM;
			}
			v = grown;
		}
		read_vol(st, &v[n++]);
	}
	if (rc != SQLITE_DONE) {
		free(v);
		return sql_error(cat, rc, "list volumes");
	}
	*rows = v;
	*nr = n;
	return 0;
}

int tfs_catalog_list_volumes(struct tfs_catalog *cat, bool with_unlinked, tfs_catalog_vol_fn fn,
			     void *ctx)
{
	struct tfs_vol_row *rows = NULL;
	sqlite3_stmt *st;
	size_t nr = 0;
	int r;

	lock(cat);
	r = prepare(cat,
		    "SELECT " VOL_COLS " FROM volumes WHERE ? OR unlinked = 0 "
		    "ORDER BY name, ifnull(group_id, 0), dev_id",
		    &st);
	if (!r) {
		sqlite3_bind_int(st, 1, with_unlinked);
		r = collect_vols(cat, st, &rows, &nr);
		sqlite3_finalize(st);
	}
	unlock(cat);
	for (size_t i = 0; !r && i < nr; i++)
		r = fn(ctx, &rows[i]);
	free(rows);
	return r;
}

/* ---- snapshot groups ---- */

int tfs_catalog_add_group(struct tfs_catalog *cat, const char *name, int64_t created_ns,
			  int64_t *id_out)
{
	sqlite3_stmt *st;
	int r;

	r = tfs_catalog_check_name(name);
	if (r)
		return r;
	lock(cat);
	r = prepare(cat, "INSERT INTO groups (name, created_ns) VALUES (?, ?)", &st);
	if (r)
		goto out_unlock;
	bind_text(st, 1, name);
	sqlite3_bind_int64(st, 2, created_ns);
	r = step_done(cat, st, "add a snapshot group", NULL);
	sqlite3_finalize(st);
	if (!r && id_out)
		*id_out = sqlite3_last_insert_rowid(cat->db);
out_unlock:
	unlock(cat);
	return r;
}

/* Columns: id, name, created_ns and (optionally) the intent's action. */
static void read_group(sqlite3_stmt *st, struct tfs_group_row *g)
{
	const unsigned char *action = sqlite3_column_count(st) > 3 ?
				      sqlite3_column_text(st, 3) : NULL;

	memset(g, 0, sizeof(*g));
	g->id = sqlite3_column_int64(st, 0);
	copy_text(g->name, sizeof(g->name), sqlite3_column_text(st, 1));
	g->created_ns = sqlite3_column_int64(st, 2);
	if (action)
		g->intent = !strcmp((const char *)action, "create") ? TFS_GROUP_CREATING :
			    TFS_GROUP_REMOVING;
}

int tfs_catalog_get_group(struct tfs_catalog *cat, const char *name, struct tfs_group_row *out)
{
	sqlite3_stmt *st;
	int rc, r;

	lock(cat);
	r = prepare(cat, "SELECT id, name, created_ns FROM groups WHERE name = ? AND " GROUP_IS_WHOLE,
		    &st);
	if (r)
		goto out_unlock;
	bind_text(st, 1, name);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		read_group(st, out);
	else
		r = rc == SQLITE_DONE ? -ENOENT : sql_error(cat, rc, "read a snapshot group");
	sqlite3_finalize(st);
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_remove_group(struct tfs_catalog *cat, int64_t id)
{
	sqlite3_stmt *st;
	int changes = 0, r;

	lock(cat);
	/* ON DELETE CASCADE takes the member rows with it. */
	r = prepare(cat, "DELETE FROM groups WHERE id = ?", &st);
	if (r)
		goto out_unlock;
	sqlite3_bind_int64(st, 1, id);
	r = step_done(cat, st, "remove a snapshot group", &changes);
	sqlite3_finalize(st);
	if (!r && !changes)
		r = -ENOENT;
out_unlock:
	unlock(cat);
	return r;
}

static int list_groups(struct tfs_catalog *cat, const char *sql, tfs_catalog_group_fn fn,
		       void *ctx)
{
	struct tfs_group_row *rows = NULL, *grown;
	size_t nr = 0, cap = 0;
	sqlite3_stmt *st;
	int rc, r;

	lock(cat);
	r = prepare(cat, sql, &st);
	if (r) {
		unlock(cat);
		return r;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (nr == cap) {
			cap = cap ? cap * 2 : 16;
			grown = realloc(rows, cap * sizeof(*rows));
			if (!grown) {
				r = -ENOMEM;
				break;
			}
			rows = grown;
		}
		read_group(st, &rows[nr++]);
	}
	if (!r && rc != SQLITE_DONE)
		r = sql_error(cat, rc, "list snapshot groups");
	sqlite3_finalize(st);
	unlock(cat);
	for (size_t i = 0; !r && i < nr; i++)
		r = fn(ctx, &rows[i]);
	free(rows);
	return r;
}

int tfs_catalog_list_groups(struct tfs_catalog *cat, tfs_catalog_group_fn fn, void *ctx)
{
	return list_groups(cat,
			   "SELECT id, name, created_ns, NULL FROM groups WHERE " GROUP_IS_WHOLE
			   " ORDER BY name",
			   fn, ctx);
}

int tfs_catalog_list_unfinished_groups(struct tfs_catalog *cat, tfs_catalog_group_fn fn,
				       void *ctx)
{
	return list_groups(cat,
			   "SELECT id, name, created_ns, action FROM groups "
			   "JOIN group_intents ON group_id = id ORDER BY id",
			   fn, ctx);
}

int tfs_catalog_add_unfinished_group(struct tfs_catalog *cat, const char *name,
				     int64_t created_ns, int64_t *id_out)
{
	int64_t id;
	int r;

	lock(cat);
	r = savepoint(cat);
	if (r)
		goto out_unlock;
	r = tfs_catalog_add_group(cat, name, created_ns, &id);
	if (!r)
		r = tfs_catalog_set_group_intent(cat, id, TFS_GROUP_CREATING);
	if (!r && id_out)
		*id_out = id;
	r = release(cat, r);
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_set_group_intent(struct tfs_catalog *cat, int64_t id, enum tfs_group_intent what)
{
	static const char *const sql[] = {
		[TFS_GROUP_WHOLE] = "DELETE FROM group_intents WHERE group_id = ?1",
		[TFS_GROUP_CREATING] = "INSERT OR REPLACE INTO group_intents (group_id, action) "
				       "SELECT id, 'create' FROM groups WHERE id = ?1",
		[TFS_GROUP_REMOVING] = "INSERT OR REPLACE INTO group_intents (group_id, action) "
				       "SELECT id, 'remove' FROM groups WHERE id = ?1",
	};
	sqlite3_stmt *st;
	int changes = 0, r;

	if ((unsigned)what >= sizeof(sql) / sizeof(sql[0]))
		return -EINVAL;
	lock(cat);
	r = prepare(cat, sql[what], &st);
	if (!r) {
		sqlite3_bind_int64(st, 1, id);
		r = step_done(cat, st, "record a group's state", &changes);
		sqlite3_finalize(st);
	}
	if (!r && what != TFS_GROUP_WHOLE && !changes)
		r = -ENOENT;
	unlock(cat);
	return r;
}

/* ---- events ---- */

int tfs_catalog_add_event(struct tfs_catalog *cat, const char *kind, const char *detail,
			  int64_t *id_out)
{
	size_t dlen = detail ? strlen(detail) : 0;
	sqlite3_stmt *st;
	int64_t id;
	int r;

	if (!kind || !kind[0] || strlen(kind) > EVENT_KIND_MAX) {
		tfs_err("catalog %s: event kind must be 1 to %zu bytes", cat->path, EVENT_KIND_MAX);
		return -EINVAL;
	}
	/* Stored as it will be read back: cut to fit, never inside a UTF-8 sequence. */
	if (dlen > EVENT_DETAIL_MAX) {
		dlen = EVENT_DETAIL_MAX;
		while (dlen && ((unsigned char)detail[dlen] & 0xc0) == 0x80)
			dlen--;
	}
	lock(cat);
	r = savepoint(cat);
	if (r)
		goto out_unlock;
	r = prepare(cat, "INSERT INTO events (time_ns, kind, detail) VALUES (?, ?, ?)", &st);
	if (r)
		goto out_release;
	sqlite3_bind_int64(st, 1, now_ns());
	bind_text(st, 2, kind);
	sqlite3_bind_text(st, 3, detail ? detail : "", (int)dlen, SQLITE_TRANSIENT);
	r = step_done(cat, st, "add an event", NULL);
	sqlite3_finalize(st);
	if (r)
		goto out_release;
	id = sqlite3_last_insert_rowid(cat->db);
	r = prepare(cat, "DELETE FROM events WHERE id <= ?", &st);
	if (r)
		goto out_release;
	sqlite3_bind_int64(st, 1, id - EVENTS_KEPT);
	r = step_done(cat, st, "trim the event log", NULL);
	sqlite3_finalize(st);
	if (!r && id_out)
		*id_out = id;
out_release:
	r = release(cat, r);
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_list_events(struct tfs_catalog *cat, int64_t after_id, tfs_catalog_event_fn fn,
			    void *ctx)
{
	struct tfs_event_row *batch;
	sqlite3_stmt *st;
	size_t n;
	int rc, r = 0;

	batch = calloc(EVENT_BATCH, sizeof(*batch));
	if (!batch)
		return -ENOMEM;
	/* Batches keyed on id: memory stays bounded however long the log is. */
	do {
		n = 0;
		lock(cat);
		r = prepare(cat,
			    "SELECT id, time_ns, kind, detail FROM events WHERE id > ? "
			    "ORDER BY id LIMIT ?",
			    &st);
		if (r) {
			unlock(cat);
			break;
		}
		sqlite3_bind_int64(st, 1, after_id);
		sqlite3_bind_int(st, 2, EVENT_BATCH);
		while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
			struct tfs_event_row *e = &batch[n++];

			e->id = sqlite3_column_int64(st, 0);
			e->time_ns = sqlite3_column_int64(st, 1);
			copy_text(e->kind, sizeof(e->kind), sqlite3_column_text(st, 2));
			copy_text(e->detail, sizeof(e->detail), sqlite3_column_text(st, 3));
		}
		if (rc != SQLITE_DONE)
			r = sql_error(cat, rc, "list events");
		sqlite3_finalize(st);
		unlock(cat);
		for (size_t i = 0; !r && i < n; i++)
			r = fn(ctx, &batch[i]);
		if (n)
			after_id = batch[n - 1].id;
	} while (!r && n == EVENT_BATCH);
	free(batch);
	return r;
}

/* ---- reconciliation ---- */

static bool has_device(const uint32_t *ids, unsigned nr, uint32_t id)
{
	unsigned lo = 0, hi = nr;

	while (lo < hi) {
		unsigned mid = lo + (hi - lo) / 2;

		if (ids[mid] == id)
			return true;
		if (ids[mid] < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return false;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* A row for a device the catalog did not know: "thin-<id>", or the first free "thin-<id>-N". */
static int add_placeholder(struct tfs_catalog *cat, uint32_t id, uint64_t size, int64_t now)
{
	struct tfs_vol_row row = {
		.dev_id = id,
		.kind = TFS_VOL_THIN,
		.size = size,
		.mode = 0600,
		.atime_ns = now,
		.mtime_ns = now,
		.ctime_ns = now,
	};
	int r = -EEXIST;

	for (unsigned n = 0; r == -EEXIST && n < 1000; n++) {
		if (n)
			snprintf(row.name, sizeof(row.name), "thin-%" PRIu32 "-%u", id, n);
		else
			snprintf(row.name, sizeof(row.name), "thin-%" PRIu32, id);
		r = insert_volume(cat, &row);
	}
	if (!r)
		tfs_warn("catalog %s: thin device %" PRIu32 " had no catalog row; it appears as %s"
			 " (%" PRIu64 " bytes)%s", cat->path, id, row.name, size,
			 cat->read_only ? " on this read-only mount only" : "");
	else
		tfs_err("catalog %s: cannot add a row for thin device %" PRIu32 ": %s", cat->path,
			id, strerror(-r));
	return r;
}

/* Device ids of the members of groups being made or removed, ascending. */
static int unfinished_members(struct tfs_catalog *cat, uint32_t **ids, unsigned *nr)
{
	sqlite3_stmt *st;
	unsigned cap = 0;
	int rc, r;

	*ids = NULL;
	*nr = 0;
	r = prepare(cat,
		    "SELECT dev_id FROM volumes WHERE group_id IN "
		    "(SELECT group_id FROM group_intents) ORDER BY dev_id",
		    &st);
	if (r)
		return r;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (*nr == cap) {
			uint32_t *n = realloc(*ids, (cap = cap ? cap * 2 : 16) * sizeof(**ids));

			if (!n) {
				r = -ENOMEM;
				break;
			}
			*ids = n;
		}
		(*ids)[(*nr)++] = (uint32_t)sqlite3_column_int64(st, 0);
	}
	if (!r && rc != SQLITE_DONE)
		r = sql_error(cat, rc, "list unfinished groups");
	sqlite3_finalize(st);
	return r;
}

int tfs_catalog_reconcile(struct tfs_catalog *cat, const uint32_t *dev_ids, unsigned nr,
			  uint64_t (*size_fn)(void *ctx, uint32_t dev_id),
			  int (*orphan_fn)(void *ctx, uint32_t dev_id), void *ctx)
{
	struct tfs_vol_row *rows = NULL;
	uint32_t *ids = NULL, *orphans = NULL, *pending = NULL;
	size_t nr_rows = 0, nr_orphans = 0, k = 0;
	unsigned nr_pending = 0;
	char shown[96];
	sqlite3_stmt *st;
	int64_t now = now_ns();
	int r;

	/* The metadata lists ids ascending; a sorted copy costs little and trusts nothing. */
	ids = malloc((nr ? nr : 1) * sizeof(*ids));
	if (!ids)
		return -ENOMEM;
	if (nr)
		memcpy(ids, dev_ids, nr * sizeof(*ids));
	qsort(ids, nr, sizeof(*ids), cmp_u32);

	lock(cat);
	cat->overlay_writable = true;
	r = savepoint(cat);
	if (r)
		goto out_unlock;
	r = prepare(cat, "SELECT " VOL_COLS " FROM volumes ORDER BY dev_id", &st);
	if (r)
		goto out_release;
	r = collect_vols(cat, st, &rows, &nr_rows);
	sqlite3_finalize(st);
	if (r)
		goto out_release;
	r = unfinished_members(cat, &pending, &nr_pending);
	if (r)
		goto out_release;
	orphans = malloc((nr_rows ? nr_rows : 1) * sizeof(*orphans));
	if (!orphans) {
		r = -ENOMEM;
		goto out_release;
	}

	for (size_t i = 0; i < nr_rows; i++) {
		const struct tfs_vol_row *v = &rows[i];

		/* Those rows wait for their group to be finished or undone, devices or not. */
		if (has_device(pending, nr_pending, v->dev_id))
			continue;
		if (has_device(ids, nr, v->dev_id)) {
			if (v->unlinked)
				orphans[nr_orphans++] = v->dev_id;
			continue;
		}
		r = prepare(cat, "DELETE FROM volumes WHERE dev_id = ?", &st);
		if (r)
			goto out_release;
		sqlite3_bind_int64(st, 1, v->dev_id);
		r = step_done(cat, st, "drop a row without a device", NULL);
		sqlite3_finalize(st);
		if (r)
			goto out_release;
		printable(v->name, shown, sizeof(shown));
		if (v->unlinked)
			/* The crash came between deleting the device and its row: expected. */
			tfs_info("catalog %s: dropped the row of deleted volume %s (device %" PRIu32 ")",
				 cat->path, shown, v->dev_id);
		else
			tfs_warn("catalog %s: volume %s (device %" PRIu32
				 ") has no thin device in the metadata; its row is dropped",
				 cat->path, shown, v->dev_id);
	}

	/* rows are in dev_id order too: one merge pass finds devices without a row. */
	for (unsigned i = 0; i < nr; i++) {
		if (i && ids[i] == ids[i - 1])
			continue;
		while (k < nr_rows && rows[k].dev_id < ids[i])
			k++;
		if (k < nr_rows && rows[k].dev_id == ids[i])
			continue;
		r = add_placeholder(cat, ids[i], size_fn ? size_fn(ctx, ids[i]) : 0, now);
		if (r)
			goto out_release;
	}

out_release:
	r = release(cat, r);
out_unlock:
	cat->overlay_writable = false;
	unlock(cat);
	/* Outside the lock: the caller deletes each device, then its row. */
	for (size_t i = 0; !r && orphan_fn && i < nr_orphans; i++)
		r = orphan_fn(ctx, orphans[i]);
	free(orphans);
	free(pending);
	free(rows);
	free(ids);
	return r;
}

/* ---- identities and temporary names (send/receive) ---- */

int tfs_catalog_get_uuid(struct tfs_catalog *cat, uint32_t dev_id, uint8_t uuid[16])
{
	sqlite3_stmt *st;
	int rc, r = -ENOENT;

	lock(cat);
	/* A catalog opened read-only may predate the table: no identity then. */
	if (sqlite3_prepare_v2(cat->db, "SELECT uuid FROM volume_uuids WHERE dev_id = ?", -1, &st,
			       NULL) != SQLITE_OK)
		goto out_unlock;
	sqlite3_bind_int64(st, 1, dev_id);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 16) {
		memcpy(uuid, sqlite3_column_blob(st, 0), 16);
		r = 0;
	} else if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
		r = sql_error(cat, rc, "read a volume's identity");
	}
	sqlite3_finalize(st);
out_unlock:
	unlock(cat);
	return r;
}

int tfs_catalog_set_uuid(struct tfs_catalog *cat, uint32_t dev_id, const uint8_t uuid[16])
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat, "INSERT OR REPLACE INTO volume_uuids (dev_id, uuid) VALUES (?, ?)", &st);
	if (!r) {
		sqlite3_bind_int64(st, 1, dev_id);
		sqlite3_bind_blob(st, 2, uuid, 16, SQLITE_TRANSIENT);
		r = step_done(cat, st, "store a volume's identity", NULL);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

/* Insert (add) or delete a temporary name. */
static int temp_name(struct tfs_catalog *cat, const char *name, bool add)
{
	return change_by_name(cat, add ? "INSERT INTO temp_names (name) VALUES (?)"
				       : "DELETE FROM temp_names WHERE name = ?",
			      name, "record a temporary name");
}

int tfs_catalog_add_temp_name(struct tfs_catalog *cat, const char *name)
{
	return temp_name(cat, name, true);
}

int tfs_catalog_remove_temp_name(struct tfs_catalog *cat, const char *name)
{
	return temp_name(cat, name, false);
}

int tfs_catalog_list_temp_names(struct tfs_catalog *cat, int (*fn)(void *ctx, const char *name),
				void *ctx)
{
	char **names = NULL;
	size_t nr = 0, cap = 0;
	sqlite3_stmt *st;
	int rc, r;

	lock(cat);
	r = prepare(cat, "SELECT name FROM temp_names ORDER BY name", &st);
	if (r) {
		unlock(cat);
		return r;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *n = (const char *)sqlite3_column_text(st, 0);

		if (nr == cap) {
			size_t c = cap ? 2 * cap : 8;
			char **v = realloc(names, c * sizeof(*v));

			if (!v) {
				r = -ENOMEM;
				break;
			}
			names = v;
			cap = c;
		}
		names[nr] = strdup(n ? n : "");
		if (!names[nr]) {
			r = -ENOMEM;
			break;
		}
		nr++;
	}
	if (!r && rc != SQLITE_DONE)
		r = sql_error(cat, rc, "list temporary names");
	sqlite3_finalize(st);
	unlock(cat);
	for (size_t i = 0; i < nr; i++) {
		if (!r)
			r = fn(ctx, names[i]);
		free(names[i]);
	}
	free(names);
	return r;
}

/* ---- classic snapshots made at run time ---- */

int tfs_catalog_add_cow_snapshot(struct tfs_catalog *cat, const struct tfs_cow_snap_row *row)
{
	sqlite3_stmt *st;
	int r;

	lock(cat);
	r = prepare(cat,
		    "INSERT INTO cow_snapshots (dev_id, name, origin, cow, chunk_sectors, "
		    "persistent) VALUES (?, ?, ?, ?, ?, ?)",
		    &st);
	if (!r) {
		sqlite3_bind_int64(st, 1, row->dev_id);
		bind_text(st, 2, row->name);
		bind_text(st, 3, row->origin);
		bind_text(st, 4, row->cow);
		sqlite3_bind_int64(st, 5, row->chunk_sectors);
		sqlite3_bind_int(st, 6, row->persistent);
		r = step_done(cat, st, "add a classic snapshot", NULL);
		sqlite3_finalize(st);
	}
	unlock(cat);
	return r;
}

int tfs_catalog_remove_cow_snapshot(struct tfs_catalog *cat, uint32_t dev_id)
{
	return change_by_id(cat, "DELETE FROM cow_snapshots WHERE dev_id = ?", dev_id,
			    "remove a classic snapshot");
}

int tfs_catalog_list_cow_snapshots(struct tfs_catalog *cat, tfs_catalog_cow_snap_fn fn,
				   void *ctx)
{
	struct tfs_cow_snap_row *rows = NULL, *grown;
	size_t nr = 0, cap = 0;
	sqlite3_stmt *st;
	int rc, r;

	lock(cat);
	r = prepare(cat,
		    "SELECT dev_id, name, origin, cow, chunk_sectors, persistent "
		    "FROM main.cow_snapshots ORDER BY dev_id",
		    &st);
	if (r) {
		unlock(cat);
		return r;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (nr == cap) {
			cap = cap ? cap * 2 : 16;
			grown = realloc(rows, cap * sizeof(*rows));
			if (!grown) {
				r = -ENOMEM;
				break;
			}
			rows = grown;
		}
		rows[nr].dev_id = (uint32_t)sqlite3_column_int64(st, 0);
		copy_text(rows[nr].name, sizeof(rows[nr].name), sqlite3_column_text(st, 1));
		copy_text(rows[nr].origin, sizeof(rows[nr].origin), sqlite3_column_text(st, 2));
		copy_text(rows[nr].cow, sizeof(rows[nr].cow), sqlite3_column_text(st, 3));
		rows[nr].chunk_sectors = (uint32_t)sqlite3_column_int64(st, 4);
		rows[nr].persistent = sqlite3_column_int(st, 5) != 0;
		nr++;
	}
	if (!r && rc != SQLITE_DONE)
		r = sql_error(cat, rc, "list classic snapshots");
	sqlite3_finalize(st);
	unlock(cat);
	for (size_t i = 0; !r && i < nr; i++)
		r = fn(ctx, &rows[i]);
	free(rows);
	return r;
}

int tfs_catalog_set_cow_invalid(struct tfs_catalog *cat, const char *name, bool invalid)
{
	return change_by_name(cat, invalid ? "INSERT OR IGNORE INTO cow_invalid (name) VALUES (?)"
					   : "DELETE FROM cow_invalid WHERE name = ?",
			      name, "record a classic snapshot's validity");
}

bool tfs_catalog_cow_invalid(struct tfs_catalog *cat, const char *name)
{
	sqlite3_stmt *st;
	bool found = false;

	lock(cat);
	if (prepare(cat, "SELECT 1 FROM main.cow_invalid WHERE name = ?", &st) == 0) {
		bind_text(st, 1, name);
		found = sqlite3_step(st) == SQLITE_ROW;
		sqlite3_finalize(st);
	}
	unlock(cat);
	return found;
}

int tfs_catalog_set_cow_merging(struct tfs_catalog *cat, uint32_t dev_id, bool merging)
{
	return change_by_id(cat, merging ? "INSERT OR IGNORE INTO cow_merging (dev_id) VALUES (?)"
					 : "DELETE FROM cow_merging WHERE dev_id = ?",
			    dev_id, "record a classic snapshot's merge");
}

bool tfs_catalog_cow_merging(struct tfs_catalog *cat, uint32_t dev_id)
{
	sqlite3_stmt *st;
	bool found = false;

	lock(cat);
	if (prepare(cat, "SELECT 1 FROM main.cow_merging WHERE dev_id = ?", &st) == 0) {
		sqlite3_bind_int64(st, 1, dev_id);
		found = sqlite3_step(st) == SQLITE_ROW;
		sqlite3_finalize(st);
	}
	unlock(cat);
	return found;
}
