/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The sqlite catalog: names, groups, events, transactions and mount-time reconciliation. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "catalog.h"
#include "log.h"
#include "utf8.h"

struct env {
	char dir[64];
	char path[PATH_MAX];   /* dir/pool.catalog.db */
	struct tfs_catalog *cat;
	pthread_mutex_t log_lock;
	char log[16384];
};

static void capture(void *ctx, enum tfs_log_level level, const char *msg)
{
	struct env *e = ctx;
	size_t used;

	pthread_mutex_lock(&e->log_lock);
	used = strlen(e->log);
	snprintf(e->log + used, sizeof(e->log) - used, "%s%s\n",
		 level == TFS_LOG_ERR ? "E " : level == TFS_LOG_WARN ? "W " : "I ", msg);
	pthread_mutex_unlock(&e->log_lock);
}

static int setup(void **state)
{
	struct env *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	pthread_mutex_init(&e->log_lock, NULL);
	snprintf(e->dir, sizeof(e->dir), "/tmp/tfs-catalog-XXXXXX");
	assert_non_null(mkdtemp(e->dir));
	snprintf(e->path, sizeof(e->path), "%s/pool.catalog.db", e->dir);
	tfs_log_set_sink(capture, e);
	assert_int_equal(tfs_catalog_create(e->path, false, &e->cat), 0);
	*state = e;
	return 0;
}

static int teardown(void **state)
{
	struct env *e = *state;
	char cmd[PATH_MAX + 16];

	tfs_catalog_close(e->cat);
	tfs_log_set_sink(NULL, NULL);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
	assert_int_equal(system(cmd), 0);
	pthread_mutex_destroy(&e->log_lock);
	free(e);
	return 0;
}

static void reopen(struct env *e)
{
	tfs_catalog_close(e->cat);
	e->cat = NULL;
	assert_int_equal(tfs_catalog_open(e->path, false, &e->cat), 0);
}

static struct tfs_vol_row vol(const char *name, uint32_t id)
{
	struct tfs_vol_row r;

	memset(&r, 0, sizeof(r));
	snprintf(r.name, sizeof(r.name), "%s", name);
	r.dev_id = id;
	r.kind = TFS_VOL_THIN;
	r.size = (uint64_t)id << 30;
	r.mode = 0640;
	r.uid = 1000 + id;
	r.gid = 2000 + id;
	r.atime_ns = 1700000000000000001ll + id;
	r.mtime_ns = 1700000000000000002ll + id;
	r.ctime_ns = 1700000000000000003ll + id;
	return r;
}

static void assert_rows_equal(const struct tfs_vol_row *a, const struct tfs_vol_row *b)
{
	assert_string_equal(a->name, b->name);
	assert_int_equal(a->dev_id, b->dev_id);
	assert_int_equal(a->kind, b->kind);
	assert_int_equal(a->size, b->size);
	assert_int_equal(a->mode, b->mode);
	assert_int_equal(a->uid, b->uid);
	assert_int_equal(a->gid, b->gid);
	assert_int_equal(a->atime_ns, b->atime_ns);
	assert_int_equal(a->mtime_ns, b->mtime_ns);
	assert_int_equal(a->ctime_ns, b->ctime_ns);
	assert_int_equal(a->group_id, b->group_id);
	assert_int_equal(a->unlinked, b->unlinked);
}

/* ---- listing helpers ---- */

struct names {
	char s[4096];
	unsigned n;
};

static int add_name(void *ctx, const struct tfs_vol_row *row)
{
	struct names *l = ctx;
	size_t used = strlen(l->s);

	snprintf(l->s + used, sizeof(l->s) - used, "%s%s%s", l->n ? " " : "", row->name,
		 row->unlinked ? "(u)" : "");
	l->n++;
	return 0;
}

static const char *list(struct env *e, bool with_unlinked)
{
	static struct names l;

	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_volumes(e->cat, with_unlinked, add_name, &l), 0);
	return l.s;
}

/* ---- volumes ---- */

static void test_volume_rows_round_trip_every_field(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm2", 7), got;

	a.size = 1ull << 62;
	a.atime_ns = -5; /* before 1970 is a valid time */
	b.kind = TFS_VOL_SNAPSHOT;
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), 0);
	assert_rows_equal(&got, &a);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 7, &got), 0);
	assert_rows_equal(&got, &b);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm3", &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 3, &got), -ENOENT);
}

static void test_mode_keeps_permission_bits_only(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), got;

	a.mode = 0100644 | 04000;
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 1, &got), 0);
	assert_int_equal(got.mode, 04644);
}

static void test_names_and_ids_are_unique(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm1", 2), c = vol("other", 1);

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), -EEXIST);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &c), -EEXIST);
	assert_string_equal(list(e, true), "vm1");
}

static void test_update_changes_attributes_of_the_row_with_that_id(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), got;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	a.size = 20ull << 30;
	a.mode = 0600;
	a.uid = 0;
	a.gid = 5;
	a.atime_ns = 11;
	a.mtime_ns = 22;
	a.ctime_ns = 33;
	snprintf(a.name, sizeof(a.name), "ignored");
	assert_int_equal(tfs_catalog_update_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 1, &got), 0);
	snprintf(a.name, sizeof(a.name), "vm1"); /* update never renames */
	assert_rows_equal(&got, &a);
	a.dev_id = 99;
	assert_int_equal(tfs_catalog_update_volume(e->cat, &a), -ENOENT);
}

static void test_rename_is_atomic_and_replaces_nothing(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm2", 2), got;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), 0);
	assert_int_equal(tfs_catalog_rename(e->cat, "vm1", "vm3"), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm3", &got), 0);
	assert_int_equal(got.dev_id, 1);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), -ENOENT);
	assert_int_equal(tfs_catalog_rename(e->cat, "vm3", "vm2"), -EEXIST);
	assert_int_equal(tfs_catalog_rename(e->cat, "nope", "vm9"), -ENOENT);
	assert_int_equal(tfs_catalog_rename(e->cat, "vm3", "a/b"), -EINVAL);
	assert_int_equal(tfs_catalog_rename(e->cat, "vm3", "vm3"), 0);
	assert_string_equal(list(e, true), "vm2 vm3");
}

static void test_unlink_hides_the_name_and_frees_it(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm1", 2), got;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 1), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 1), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 42), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), -ENOENT);
	/* An open handle still needs the attributes of its unlinked volume. */
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 1, &got), 0);
	assert_true(got.unlinked);
	assert_string_equal(list(e, false), "");
	assert_string_equal(list(e, true), "vm1(u)");
	/* The name is free again while the old device waits for its last close. */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), 0);
	assert_int_equal(got.dev_id, 2);
	assert_int_equal(tfs_catalog_rename(e->cat, "vm1", "vm0"), 0);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 1, &got), 0);
	assert_string_equal(got.name, "vm1"); /* rename left the unlinked row alone */
	assert_int_equal(tfs_catalog_remove_volume(e->cat, 1), 0);
	assert_int_equal(tfs_catalog_remove_volume(e->cat, 1), -ENOENT);
	assert_string_equal(list(e, true), "vm0");
}

static void test_list_is_in_name_order_and_callbacks_may_reenter(void **state)
{
	static const char *const names[] = { "zeta", "alpha", "Mid", "beta", "alpha2" };
	struct env *e = *state;
	struct tfs_vol_row r;

	for (unsigned i = 0; i < 5; i++) {
		r = vol(names[i], i + 1);
		assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	}
	assert_string_equal(list(e, false), "Mid alpha alpha2 beta zeta");
}

static int reenter_and_stop(void *ctx, const struct tfs_vol_row *row)
{
	struct env *e = ctx;
	struct tfs_vol_row got, extra;
	char name[32];

	snprintf(name, sizeof(name), "added-by-%u", (unsigned)row->dev_id);
	extra = vol(name, 100 + row->dev_id);

	/* Without the lock held, a callback may read and even write. */
	assert_int_equal(tfs_catalog_get_by_id(e->cat, row->dev_id, &got), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &extra), 0);
	return row->dev_id == 2 ? -ECANCELED : 0;
}

static void test_listing_callbacks_may_call_the_catalog_and_stop_it(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row r;

	for (unsigned i = 1; i <= 3; i++) {
		char name[16];

		snprintf(name, sizeof(name), "v%u", i);
		r = vol(name, i);
		assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	}
	assert_int_equal(tfs_catalog_list_volumes(e->cat, false, reenter_and_stop, e), -ECANCELED);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 101, &r), 0);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 102, &r), 0);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 103, &r), -ENOENT);
}

/* ---- names ---- */

static void test_name_rules_with_reasons(void **state)
{
	static const struct {
		const char *name, *why;
	} bad[] = {
		{ "", "empty" },
		{ ".", "'.' or '..'" },
		{ "..", "'.' or '..'" },
		{ "a/b", "contains '/'" },
		{ "/", "contains '/'" },
		{ "a\x01" "b", "control character" },
		{ "tab\there", "control character" },
		{ "new\nline", "control character" },
		{ "del\x7f", "control character" },
		{ "\x1b[31mred", "control character" },
		{ "csi\xc2\x9b" "31m", "control character" },  /* U+009B */
		{ "\xc2\x80", "control character" },            /* U+0080 */
		{ "bad\xff", "not valid UTF-8" },
		{ "\xc3", "not valid UTF-8" },                 /* cut short */
		{ "\xc3(", "not valid UTF-8" },                /* bad continuation */
		{ "\xc0\xaf", "not valid UTF-8" },             /* overlong '/' */
		{ "\xe0\x80\xaf", "not valid UTF-8" },         /* overlong, 3 bytes */
		{ "\xf0\x80\x80\xaf", "not valid UTF-8" },     /* overlong, 4 bytes */
		{ "\xed\xa0\x80", "not valid UTF-8" },         /* surrogate U+D800 */
		{ "\xed\xbf\xbf", "not valid UTF-8" },         /* surrogate U+DFFF */
		{ "\xf4\x90\x80\x80", "not valid UTF-8" },     /* U+110000 */
		{ "\xf8\x88\x80\x80\x80", "not valid UTF-8" }, /* 5-byte form */
		{ "lat1-caf\xe9", "not valid UTF-8" },         /* Latin-1, not UTF-8 */
	};
	static const char *const good[] = { "a", "...", ".hidden", "with space", "ünïcödé",
					    "semi;colon", "quote'd", "-dash",
					    "\xed\x9f\xbf",          /* U+D7FF, below the surrogates */
					    "\xee\x80\x80",          /* U+E000, above them */
					    "\xf4\x8f\xbf\xbf",      /* U+10FFFF, the last */
					    "日本語", "emoji-😀",
					    "nbsp\xc2\xa0" /* U+00A0, just past the C1 controls */ };
	struct env *e = *state;
	char n255[256], n256[257];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		e->log[0] = '\0';
		assert_int_equal(tfs_catalog_check_name(bad[i].name), -EINVAL);
		if (!strstr(e->log, bad[i].why))
			fail_msg("name %zu: no '%s' in log: %s", i, bad[i].why, e->log);
		/* The log line shows the bad bytes escaped, never raw. */
		assert_true(tfs_utf8_valid(e->log, strlen(e->log)));
		assert_string_equal(strstr(tfs_catalog_name_error(bad[i].name), bad[i].why) ? "y" : "n",
				    "y");
	}
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		assert_int_equal(tfs_catalog_check_name(good[i]), 0);
		assert_null(tfs_catalog_name_error(good[i]));
	}
	memset(n255, 'n', 255);
	n255[255] = '\0';
	memset(n256, 'n', 256);
	n256[256] = '\0';
	assert_int_equal(tfs_catalog_check_name(n255), 0);
	e->log[0] = '\0';
	assert_int_equal(tfs_catalog_check_name(n256), -EINVAL);
	assert_non_null(strstr(e->log, "longer than 255 bytes"));
	assert_true(strlen(e->log) < 200); /* a long name is cut in the message */
	assert_null(strchr(e->log, '\x1b') ? "escape" : NULL);
	assert_int_equal(tfs_catalog_check_name(NULL), -EINVAL);
}

static void test_bad_names_are_refused_by_every_call_that_names(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("a/b", 1);
	int64_t gid;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), -EINVAL);
	assert_int_equal(tfs_catalog_add_group(e->cat, "..", 1, &gid), -EINVAL);
	a = vol("ok", 1);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_rename(e->cat, "ok", "bad\n"), -EINVAL);
	assert_string_equal(list(e, true), "ok");
}

static void test_sql_looking_names_are_stored_verbatim(void **state)
{
	static const char *const names[] = {
		"x'); DROP TABLE volumes; --",
		"Robert'); DROP TABLE groups;--",
		"\" OR 1=1 --",
		"%s%n%x",
		"a' || 'b",
		"?1",
	};
	struct env *e = *state;
	struct tfs_vol_row r, got;
	struct tfs_group_row g;
	int64_t gid;

	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		r = vol(names[i], i + 1);
		assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
		assert_int_equal(tfs_catalog_add_group(e->cat, names[i], 5, &gid), 0);
	}
	reopen(e);
	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		assert_int_equal(tfs_catalog_get_by_name(e->cat, names[i], &got), 0);
		assert_string_equal(got.name, names[i]);
		assert_int_equal(got.dev_id, i + 1);
		assert_int_equal(tfs_catalog_get_group(e->cat, names[i], &g), 0);
		assert_string_equal(g.name, names[i]);
	}
	assert_int_equal(tfs_catalog_rename(e->cat, names[0], "x' WHERE 1=1; --"), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "x' WHERE 1=1; --", &got), 0);
	assert_int_equal(got.dev_id, 1);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, names[1], &got), 0);
	assert_int_equal(got.dev_id, 2);
}

/* ---- snapshot groups ---- */

static void add_member(struct env *e, const char *name, uint32_t id, int64_t gid, int want)
{
	struct tfs_vol_row m = vol(name, id);

	m.kind = TFS_VOL_GROUP_MEMBER;
	m.group_id = gid;
	m.mode = 0444;
	assert_int_equal(tfs_catalog_add_volume(e->cat, &m), want);
}

static int add_group_name(void *ctx, const struct tfs_group_row *row)
{
	struct names *l = ctx;
	size_t used = strlen(l->s);

	snprintf(l->s + used, sizeof(l->s) - used, "%s%s", l->n++ ? " " : "", row->name);
	return 0;
}

static void test_group_members_are_unique_within_their_group_only(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row top = vol("vm1", 1), got;
	struct tfs_group_row g;
	struct names l = { .n = 0 };
	int64_t nightly, weekly;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &top), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 111, &nightly), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "weekly", 222, &weekly), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 333, NULL), -EEXIST);
	assert_true(nightly > 0 && weekly > nightly);

	add_member(e, "vm1", 10, nightly, 0); /* same name as the top-level volume */
	add_member(e, "vm1", 11, weekly, 0);  /* and as in another group */
	add_member(e, "vm1", 12, nightly, -EEXIST);
	add_member(e, "vm2", 13, 999, -ENOENT); /* no such group */

	/* kind and group must agree */
	struct tfs_vol_row odd = vol("odd", 14);

	odd.group_id = nightly;
	assert_int_equal(tfs_catalog_add_volume(e->cat, &odd), -EINVAL);
	odd.group_id = 0;
	odd.kind = TFS_VOL_GROUP_MEMBER;
	assert_int_equal(tfs_catalog_add_volume(e->cat, &odd), -EINVAL);

	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), 0);
	assert_int_equal(got.dev_id, 1); /* top level only */
	assert_int_equal(tfs_catalog_get_member(e->cat, weekly, "vm1", &got), 0);
	assert_int_equal(got.dev_id, 11);
	assert_int_equal(got.kind, TFS_VOL_GROUP_MEMBER);
	assert_int_equal(got.group_id, weekly);
	assert_int_equal(tfs_catalog_get_member(e->cat, weekly, "vm2", &got), -ENOENT);
	assert_string_equal(list(e, false), "vm1 vm1 vm1");
	/* Renaming a top-level volume leaves group members alone. */
	assert_int_equal(tfs_catalog_rename(e->cat, "vm1", "vm9"), 0);
	assert_int_equal(tfs_catalog_get_member(e->cat, nightly, "vm1", &got), 0);

	assert_int_equal(tfs_catalog_get_group(e->cat, "weekly", &g), 0);
	assert_int_equal(g.id, weekly);
	assert_int_equal(g.created_ns, 222);
	assert_string_equal(g.name, "weekly");
	assert_int_equal(tfs_catalog_get_group(e->cat, "monthly", &g), -ENOENT);
	assert_int_equal(tfs_catalog_list_groups(e->cat, add_group_name, &l), 0);
	assert_string_equal(l.s, "nightly weekly");

	/* Removing a group takes its members along. */
	assert_int_equal(tfs_catalog_remove_group(e->cat, nightly), 0);
	assert_int_equal(tfs_catalog_remove_group(e->cat, nightly), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 10, &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 11, &got), 0);
	assert_string_equal(list(e, true), "vm1 vm9");
}

/* ---- events ---- */

struct ev_list {
	int64_t ids[1024];
	char kinds[1024][64];
	unsigned n;
};

static int add_event_row(void *ctx, const struct tfs_event_row *row)
{
	struct ev_list *l = ctx;

	if (l->n < 1024) {
		l->ids[l->n] = row->id;
		snprintf(l->kinds[l->n], sizeof(l->kinds[0]), "%s", row->kind);
	}
	l->n++;
	return 0;
}

static void test_events_come_back_in_id_order_after_a_given_id(void **state)
{
	struct env *e = *state;
	static struct ev_list l;
	int64_t id[5];
	char kind[16];

	for (int i = 0; i < 5; i++) {
		snprintf(kind, sizeof(kind), "k%d", i);
		assert_int_equal(tfs_catalog_add_event(e->cat, kind, "detail", &id[i]), 0);
		if (i)
			assert_true(id[i] > id[i - 1]);
	}
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_events(e->cat, 0, add_event_row, &l), 0);
	assert_int_equal(l.n, 5);
	for (int i = 0; i < 5; i++) {
		assert_int_equal(l.ids[i], id[i]);
		snprintf(kind, sizeof(kind), "k%d", i);
		assert_string_equal(l.kinds[i], kind);
	}
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_events(e->cat, id[2], add_event_row, &l), 0);
	assert_int_equal(l.n, 2);
	assert_int_equal(l.ids[0], id[3]);
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_events(e->cat, id[4], add_event_row, &l), 0);
	assert_int_equal(l.n, 0);
}

static int check_detail(void *ctx, const struct tfs_event_row *row)
{
	int64_t *seen = ctx;

	assert_true(row->time_ns > 1600000000ll * 1000000000ll);
	assert_true(strlen(row->detail) <= 511);
	if (!strcmp(row->kind, "long"))
		assert_int_equal(strlen(row->detail), 510); /* cut before a 2-byte character */
	(*seen)++;
	return 0;
}

static void test_event_kind_and_detail_limits(void **state)
{
	struct env *e = *state;
	char detail[1200], kind[80];
	int64_t n = 0;

	/* 510 ASCII bytes then "é" (2 bytes) spanning the 511-byte limit. */
	memset(detail, 'd', 510);
	snprintf(detail + 510, sizeof(detail) - 510, "\xc3\xa9 and more");
	assert_int_equal(tfs_catalog_add_event(e->cat, "long", detail, NULL), 0);
	assert_int_equal(tfs_catalog_add_event(e->cat, "empty", NULL, NULL), 0);
	memset(kind, 'k', 64);
	kind[64] = '\0';
	assert_int_equal(tfs_catalog_add_event(e->cat, kind, "x", NULL), -EINVAL);
	assert_int_equal(tfs_catalog_add_event(e->cat, "", "x", NULL), -EINVAL);
	kind[63] = '\0';
	assert_int_equal(tfs_catalog_add_event(e->cat, kind, "x", NULL), 0);
	assert_int_equal(tfs_catalog_list_events(e->cat, 0, check_detail, &n), 0);
	assert_int_equal(n, 3);
}

static void test_long_event_logs_are_listed_in_batches_without_gaps(void **state)
{
	struct env *e = *state;
	static struct ev_list l;

	assert_int_equal(tfs_catalog_begin(e->cat), 0);
	for (int i = 0; i < 600; i++)
		assert_int_equal(tfs_catalog_add_event(e->cat, "resize", "grow", NULL), 0);
	assert_int_equal(tfs_catalog_commit(e->cat), 0);
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_events(e->cat, 0, add_event_row, &l), 0);
	assert_int_equal(l.n, 600);
	for (unsigned i = 1; i < l.n; i++)
		assert_int_equal(l.ids[i], l.ids[i - 1] + 1);
}

/* ---- transactions ---- */

static void test_rollback_undoes_everything_since_begin(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm2", 2), got;
	struct tfs_group_row g;
	int64_t gid;

	assert_int_equal(tfs_catalog_begin(e->cat), 0);
	assert_int_equal(tfs_catalog_begin(e->cat), -EINVAL); /* no nesting */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "g", 1, &gid), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), 0);
	tfs_catalog_rollback(e->cat);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_group(e->cat, "g", &g), -ENOENT);

	assert_int_equal(tfs_catalog_begin(e->cat), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), 0);
	/* A failing call inside a transaction undoes only itself. */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), -EEXIST);
	assert_int_equal(tfs_catalog_commit(e->cat), 0);
	reopen(e);
	assert_string_equal(list(e, true), "vm1 vm2");

	/* Commit and rollback without begin are harmless. */
	assert_int_equal(tfs_catalog_commit(e->cat), -EINVAL);
	tfs_catalog_rollback(e->cat);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm2", &got), 0);
}

struct waiter {
	struct env *e;
	int result;
	uint32_t dev_id;
};

static void *read_vm1(void *arg)
{
	struct waiter *w = arg;
	struct tfs_vol_row got;

	w->result = tfs_catalog_get_by_name(w->e->cat, "vm1", &got);
	w->dev_id = got.dev_id;
	return NULL;
}

static void test_other_threads_wait_for_an_open_transaction(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1);
	struct waiter w = { .e = e, .result = 1 };
	pthread_t t;

	assert_int_equal(tfs_catalog_begin(e->cat), 0);
	assert_int_equal(pthread_create(&t, NULL, read_vm1, &w), 0);
	usleep(50 * 1000);
	assert_int_equal(w.result, 1); /* still waiting */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_commit(e->cat), 0);
	pthread_join(t, NULL);
	/* It saw the whole transaction, never a part of it. */
	assert_int_equal(w.result, 0);
	assert_int_equal(w.dev_id, 1);
}

struct adder {
	struct env *e;
	unsigned base;
	int failures;
};

static void *add_many(void *arg)
{
	struct adder *a = arg;
	char name[32];

	for (unsigned i = 0; i < 100; i++) {
		struct tfs_vol_row r;

		snprintf(name, sizeof(name), "t%u-%u", a->base, i);
		r = vol(name, a->base * 1000 + i);
		if (tfs_catalog_add_volume(a->e->cat, &r))
			a->failures++;
		if (i % 10 == 0 && tfs_catalog_add_event(a->e->cat, "create", name, NULL))
			a->failures++;
	}
	return NULL;
}

static int count_row(void *ctx, const struct tfs_vol_row *row)
{
	(void)row;
	(*(unsigned *)ctx)++;
	return 0;
}

static void test_concurrent_callers_are_serialised(void **state)
{
	struct env *e = *state;
	struct adder a[4];
	pthread_t t[4];
	unsigned n = 0;

	for (unsigned i = 0; i < 4; i++) {
		a[i] = (struct adder){ .e = e, .base = i + 1 };
		assert_int_equal(pthread_create(&t[i], NULL, add_many, &a[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(a[i].failures, 0);
	}
	assert_int_equal(tfs_catalog_list_volumes(e->cat, false, count_row, &n), 0);
	assert_int_equal(n, 400);
}

/* ---- create, open, close ---- */

static void test_everything_persists_across_close_and_open(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("gone", 2), got;
	struct tfs_group_row g;
	static struct ev_list l;
	int64_t gid, eid;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &b), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 2), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 77, &gid), 0);
	add_member(e, "vm1", 3, gid, 0);
	assert_int_equal(tfs_catalog_add_event(e->cat, "snapshot", "nightly", &eid), 0);
	reopen(e);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), 0);
	assert_rows_equal(&got, &a);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 2, &got), 0);
	assert_true(got.unlinked);
	assert_int_equal(tfs_catalog_get_group(e->cat, "nightly", &g), 0);
	assert_int_equal(g.id, gid);
	assert_int_equal(g.created_ns, 77);
	assert_int_equal(tfs_catalog_get_member(e->cat, gid, "vm1", &got), 0);
	assert_int_equal(got.dev_id, 3);
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_events(e->cat, 0, add_event_row, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.ids[0], eid);
	/* Ids are never reused, even after a reopen. */
	assert_int_equal(tfs_catalog_add_event(e->cat, "x", "", &gid), 0);
	assert_true(gid > eid);
}

static void test_create_refuses_a_catalog_in_use_unless_forced(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), got;
	struct tfs_catalog *c2;

	/* An empty catalog may be created over. */
	tfs_catalog_close(e->cat);
	assert_int_equal(tfs_catalog_create(e->path, false, &e->cat), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	tfs_catalog_close(e->cat);
	e->cat = NULL;
	e->log[0] = '\0';
	assert_int_equal(tfs_catalog_create(e->path, false, &c2), -EEXIST);
	assert_non_null(strstr(e->log, "1 volume(s)"));
	assert_non_null(strstr(e->log, "--force"));
	assert_int_equal(tfs_catalog_create(e->path, true, &e->cat), 0);
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "vm1", &got), -ENOENT);
}

static void test_create_refuses_a_file_that_is_not_a_catalog(void **state)
{
	struct env *e = *state;
	struct tfs_catalog *c;
	char path[PATH_MAX + 16];
	FILE *f;

	snprintf(path, sizeof(path), "%s/precious.txt", e->dir);
	f = fopen(path, "w");
	assert_non_null(f);
	fputs("not a database, and not to be lost\n", f);
	fclose(f);
	e->log[0] = '\0';
	assert_int_equal(tfs_catalog_create(path, false, &c), -EEXIST);
	assert_non_null(strstr(e->log, "not a thinfs catalog"));
	assert_int_equal(tfs_catalog_open(path, false, &c), -EINVAL);
	assert_int_equal(tfs_catalog_create(path, true, &c), 0);
	tfs_catalog_close(c);
}

static void test_create_makes_the_parent_directory(void **state)
{
	struct env *e = *state;
	struct tfs_catalog *c;
	char path[PATH_MAX + 32];
	struct stat st;

	snprintf(path, sizeof(path), "%s/thinfs/pool.db", e->dir);
	assert_int_equal(tfs_catalog_create(path, false, &c), 0);
	tfs_catalog_close(c);
	assert_int_equal(stat(path, &st), 0);
}

static void test_open_refuses_missing_foreign_and_newer_catalogs(void **state)
{
	struct env *e = *state;
	struct tfs_catalog *c;
	char path[PATH_MAX + 16];
	sqlite3 *db;

	snprintf(path, sizeof(path), "%s/absent.db", e->dir);
	assert_int_equal(tfs_catalog_open(path, false, &c), -ENOENT);

	snprintf(path, sizeof(path), "%s/foreign.db", e->dir);
	assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "CREATE TABLE t (x)", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	assert_int_equal(tfs_catalog_open(path, false, &c), -EINVAL);
	assert_int_equal(tfs_catalog_create(path, false, &c), -EEXIST);

	tfs_catalog_close(e->cat);
	e->cat = NULL;
	assert_int_equal(sqlite3_open(e->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "UPDATE schema_version SET version = 99", NULL, NULL, NULL),
			 SQLITE_OK);
	sqlite3_close(db);
	e->log[0] = '\0';
	assert_int_equal(tfs_catalog_open(e->path, false, &e->cat), -EPROTO);
	assert_non_null(strstr(e->log, "newer"));
	e->cat = NULL;
}

static void test_read_only_catalog_reads_and_refuses_changes(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), b = vol("vm2", 2), got;
	struct tfs_catalog *ro;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_open(e->path, true, &ro), 0);
	assert_int_equal(tfs_catalog_get_by_name(ro, "vm1", &got), 0);
	assert_int_equal(tfs_catalog_add_volume(ro, &b), -EROFS);
	assert_int_equal(tfs_catalog_add_event(ro, "x", "y", NULL), -EROFS);
	tfs_catalog_close(ro);
}

/* ---- reconcile ---- */

/* The level letter of the first logged line that mentions what. */
static const char *level_of(struct env *e, const char *what)
{
	static char level[2];
	const char *hit = strstr(e->log, what), *line;

	if (!hit)
		return "none";
	for (line = hit; line > e->log && line[-1] != '\n'; line--)
		;
	level[0] = line[0];
	level[1] = '\0';
	return level;
}

struct orphans {
	uint32_t ids[16];
	unsigned n;
	int fail_with;
};

static int note_orphan(void *ctx, uint32_t dev_id)
{
	struct orphans *o = ctx;

	o->ids[o->n++] = dev_id;
	return o->fail_with;
}

static void test_reconcile_follows_the_metadata(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row r, got;
	struct orphans o = { .n = 0 };
	/* Deliberately out of order: reconcile must not rely on it. */
	const uint32_t devs[] = { 5, 1, 2, 3, 4 };
	int64_t gid;

	r = vol("vm1", 1);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	r = vol("deleted-but-open", 2);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 2), 0);
	r = vol("thin-4", 3); /* takes the name device 4 would get */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	r = vol("lost", 6); /* no device 6 in the metadata */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	r = vol("half-deleted", 8); /* unlinked, device already deleted */
	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	assert_int_equal(tfs_catalog_unlink(e->cat, 8), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 1, &gid), 0);
	add_member(e, "vm1", 7, gid, 0); /* its device is gone too */

	e->log[0] = '\0';
	assert_int_equal(tfs_catalog_reconcile(e->cat, devs, 5, NULL, note_orphan, &o), 0);
	assert_int_equal(o.n, 1);
	assert_int_equal(o.ids[0], 2);

	/* One warning per dropped row, naming it; a half-deleted row goes quietly. */
	assert_non_null(strstr(e->log, "W "));
	assert_non_null(strstr(e->log, "lost (device 6)"));
	assert_non_null(strstr(e->log, "vm1 (device 7)"));
	assert_string_equal(level_of(e, "half-deleted"), "I");
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 6, &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 7, &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 8, &got), -ENOENT);

	/* Devices without a row appear under thin-<id>, or with a suffix when taken. */
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 4, &got), 0);
	assert_string_equal(got.name, "thin-4-1");
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 5, &got), 0);
	assert_string_equal(got.name, "thin-5");
	assert_int_equal(got.kind, TFS_VOL_THIN);
	assert_int_equal(got.size, 0);
	assert_int_equal(got.mode, 0600);
	assert_int_equal(got.uid, 0);
	assert_int_equal(got.gid, 0);
	assert_int_equal(got.group_id, 0);
	assert_false(got.unlinked);
	assert_true(got.mtime_ns > 1600000000ll * 1000000000ll);
	assert_non_null(strstr(e->log, "thin-5"));

	/* The unlinked row stays for the caller to delete after its device. */
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 2, &got), 0);
	assert_true(got.unlinked);
	assert_string_equal(list(e, false), "thin-4 thin-4-1 thin-5 vm1");

	/* A second pass over the same metadata changes nothing. */
	e->log[0] = '\0';
	o.n = 0;
	assert_int_equal(tfs_catalog_reconcile(e->cat, devs, 5, NULL, NULL, NULL), 0);
	assert_string_equal(e->log, "");
	assert_string_equal(list(e, true), "deleted-but-open(u) thin-4 thin-4-1 thin-5 vm1");
}

static void test_reconcile_stops_at_an_orphan_callback_error(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row r;
	struct orphans o = { .n = 0, .fail_with = -EIO };
	const uint32_t devs[] = { 1, 2 };

	for (uint32_t i = 1; i <= 2; i++) {
		char name[8];

		snprintf(name, sizeof(name), "v%u", i);
		r = vol(name, i);
		assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
		assert_int_equal(tfs_catalog_unlink(e->cat, i), 0);
	}
	assert_int_equal(tfs_catalog_reconcile(e->cat, devs, 2, NULL, note_orphan, &o), -EIO);
	assert_int_equal(o.n, 1);
}

static void test_reconcile_of_an_empty_pool_empties_the_catalog(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row r = vol("vm1", 1);

	assert_int_equal(tfs_catalog_add_volume(e->cat, &r), 0);
	assert_int_equal(tfs_catalog_reconcile(e->cat, NULL, 0, NULL, NULL, NULL), 0);
	assert_string_equal(list(e, true), "");
}

static uint64_t size_of_device(void *ctx, uint32_t id)
{
	return (uint64_t)id << 20;
}

static void test_read_only_reconcile_changes_memory_only(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("vm1", 1), got;
	const uint32_t devs[] = { 1, 3 };
	struct tfs_catalog *ro;
	int64_t gid;

	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 1, &gid), 0);
	add_member(e, "vm1", 2, gid, 0); /* no device 2: the row goes, in memory */
	assert_int_equal(tfs_catalog_open(e->path, true, &ro), 0);
	assert_int_equal(tfs_catalog_reconcile(ro, devs, 2, size_of_device, NULL, NULL), 0);
	assert_int_equal(tfs_catalog_get_by_name(ro, "thin-3", &got), 0);
	assert_int_equal(got.size, 3ull << 20);
	assert_int_equal(tfs_catalog_get_by_id(ro, 2, &got), -ENOENT);
	assert_non_null(strstr(e->log, "on this read-only mount only"));
	/* Outside reconcile a read-only catalog still refuses changes. */
	a = vol("vm9", 9);
	assert_int_equal(tfs_catalog_add_volume(ro, &a), -EROFS);
	tfs_catalog_close(ro);
	/* The file never saw any of it. */
	assert_int_equal(tfs_catalog_get_by_name(e->cat, "thin-3", &got), -ENOENT);
	assert_int_equal(tfs_catalog_get_by_id(e->cat, 2, &got), 0);
}

static int note_group(void *ctx, const struct tfs_group_row *row)
{
	struct tfs_group_row *out = ctx;

	*out = *row;
	return 0;
}

static void test_unfinished_groups_are_hidden_until_whole(void **state)
{
	struct env *e = *state;
	struct tfs_group_row g = { 0 };
	struct names l = { 0 };
	const uint32_t devs[] = { 1 };
	int64_t gid;

	assert_int_equal(tfs_catalog_add_unfinished_group(e->cat, "nightly", 5, &gid), 0);
	add_member(e, "vm1", 2, gid, 0);
	/* Invisible, its name taken, its rows left alone by reconcile (device 2 is missing). */
	assert_int_equal(tfs_catalog_get_group(e->cat, "nightly", &g), -ENOENT);
	assert_int_equal(tfs_catalog_list_groups(e->cat, add_group_name, &l), 0);
	assert_string_equal(l.s, "");
	assert_int_equal(tfs_catalog_add_group(e->cat, "nightly", 6, NULL), -EEXIST);
	assert_int_equal(tfs_catalog_reconcile(e->cat, devs, 1, NULL, NULL, NULL), 0);
	assert_string_equal(list(e, false), "thin-1 vm1");
	reopen(e);
	assert_int_equal(tfs_catalog_list_unfinished_groups(e->cat, note_group, &g), 0);
	assert_int_equal(g.id, gid);
	assert_int_equal(g.intent, TFS_GROUP_CREATING);

	assert_int_equal(tfs_catalog_set_group_intent(e->cat, gid, TFS_GROUP_WHOLE), 0);
	assert_int_equal(tfs_catalog_get_group(e->cat, "nightly", &g), 0);
	assert_int_equal(g.intent, TFS_GROUP_WHOLE);
	assert_int_equal(tfs_catalog_set_group_intent(e->cat, gid, TFS_GROUP_REMOVING), 0);
	assert_int_equal(tfs_catalog_get_group(e->cat, "nightly", &g), -ENOENT);
	memset(&g, 0, sizeof(g));
	assert_int_equal(tfs_catalog_list_unfinished_groups(e->cat, note_group, &g), 0);
	assert_int_equal(g.intent, TFS_GROUP_REMOVING);
	/* Removing the group takes its rows and its intent. */
	assert_int_equal(tfs_catalog_remove_group(e->cat, gid), 0);
	memset(&g, 0, sizeof(g));
	assert_int_equal(tfs_catalog_list_unfinished_groups(e->cat, note_group, &g), 0);
	assert_int_equal(g.id, 0);
	assert_string_equal(list(e, true), "thin-1");
	assert_int_equal(tfs_catalog_set_group_intent(e->cat, gid, TFS_GROUP_REMOVING), -ENOENT);
}

static int note_temp(void *ctx, const char *name)
{
	struct names *l = ctx;
	size_t used = strlen(l->s);

	snprintf(l->s + used, sizeof(l->s) - used, "%s%s", used ? " " : "", name);
	return 0;
}

static void test_identities_belong_to_their_volume(void **state)
{
	struct env *e = *state;
	struct tfs_vol_row a = vol("a", 1);
	uint8_t id[16], got[16];

	memset(id, 0xa5, sizeof(id));
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_get_uuid(e->cat, 1, got), -ENOENT);
	assert_int_equal(tfs_catalog_set_uuid(e->cat, 2, id), -ENOENT); /* no such volume */
	assert_int_equal(tfs_catalog_set_uuid(e->cat, 1, id), 0);
	reopen(e);
	assert_int_equal(tfs_catalog_get_uuid(e->cat, 1, got), 0);
	assert_memory_equal(got, id, sizeof(id));
	id[0] = 1;
	assert_int_equal(tfs_catalog_set_uuid(e->cat, 1, id), 0); /* replaced */
	assert_int_equal(tfs_catalog_get_uuid(e->cat, 1, got), 0);
	assert_memory_equal(got, id, sizeof(id));
	/* The identity goes with its row: a reused device id starts without one. */
	assert_int_equal(tfs_catalog_remove_volume(e->cat, 1), 0);
	assert_int_equal(tfs_catalog_add_volume(e->cat, &a), 0);
	assert_int_equal(tfs_catalog_get_uuid(e->cat, 1, got), -ENOENT);
}

static void test_temporary_names_are_kept_until_removed(void **state)
{
	struct env *e = *state;
	struct names l = { 0 };

	assert_int_equal(tfs_catalog_add_temp_name(e->cat, ".receive.b"), 0);
	assert_int_equal(tfs_catalog_add_temp_name(e->cat, ".send.a"), 0);
	assert_int_equal(tfs_catalog_add_temp_name(e->cat, ".send.a"), -EEXIST);
	reopen(e);
	assert_int_equal(tfs_catalog_list_temp_names(e->cat, note_temp, &l), 0);
	assert_string_equal(l.s, ".receive.b .send.a");
	assert_int_equal(tfs_catalog_remove_temp_name(e->cat, ".receive.b"), 0);
	assert_int_equal(tfs_catalog_remove_temp_name(e->cat, ".receive.b"), 0);
	memset(&l, 0, sizeof(l));
	assert_int_equal(tfs_catalog_list_temp_names(e->cat, note_temp, &l), 0);
	assert_string_equal(l.s, ".send.a");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
		T(test_volume_rows_round_trip_every_field),
		T(test_mode_keeps_permission_bits_only),
		T(test_names_and_ids_are_unique),
		T(test_update_changes_attributes_of_the_row_with_that_id),
		T(test_rename_is_atomic_and_replaces_nothing),
		T(test_unlink_hides_the_name_and_frees_it),
		T(test_list_is_in_name_order_and_callbacks_may_reenter),
		T(test_listing_callbacks_may_call_the_catalog_and_stop_it),
		T(test_name_rules_with_reasons),
		T(test_bad_names_are_refused_by_every_call_that_names),
		T(test_sql_looking_names_are_stored_verbatim),
		T(test_group_members_are_unique_within_their_group_only),
		T(test_events_come_back_in_id_order_after_a_given_id),
		T(test_event_kind_and_detail_limits),
		T(test_long_event_logs_are_listed_in_batches_without_gaps),
		T(test_rollback_undoes_everything_since_begin),
		T(test_other_threads_wait_for_an_open_transaction),
		T(test_concurrent_callers_are_serialised),
		T(test_everything_persists_across_close_and_open),
		T(test_create_refuses_a_catalog_in_use_unless_forced),
		T(test_create_refuses_a_file_that_is_not_a_catalog),
		T(test_create_makes_the_parent_directory),
		T(test_open_refuses_missing_foreign_and_newer_catalogs),
		T(test_read_only_catalog_reads_and_refuses_changes),
		T(test_reconcile_follows_the_metadata),
		T(test_reconcile_stops_at_an_orphan_callback_error),
		T(test_reconcile_of_an_empty_pool_empties_the_catalog),
		T(test_read_only_reconcile_changes_memory_only),
		T(test_unfinished_groups_are_hidden_until_whole),
		T(test_identities_belong_to_their_volume),
		T(test_temporary_names_are_kept_until_removed),
#undef T
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
