/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * config.c - pool.cfg parsing and validation (see config.h).
 *
 * libinih splits the file into sections and key = value pairs, but its
 * handler gets no line number (Debian builds it without
 * INI_HANDLER_LINENO), calls nothing for a section header, and reports only
 * the first syntax error.  So we feed it through our own line reader
 * (ini_parse_stream), which counts lines, classifies each one before inih
 * sees it (section header, key line, comment, continuation) and reports
 * syntax problems itself.  The handler then checks keys and values against
 * the section the reader last saw.  Every problem is logged with
 * file:line, parsing goes on so the user sees all of them at once, and the
 * result is copied out only when there were none.
 */
#include "config.h"

#include <blkid.h>
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "snap-store.h"

#define KIB 1024ull
#define MIB (1024ull * KIB)
#define GIB (1024ull * MIB)

#define BLOCK_SIZE_UNIT (64 * KIB)
#define BLOCK_SIZE_MAX GIB
/* The block manager keeps at least 16 blocks of 4 KiB. */
#define METADATA_CACHE_MIN (64 * KIB)
/* A commit interval longer than this is a typo (ms meant as seconds). */
#define COMMIT_INTERVAL_MAX_MS (3600ull * 1000)
/*
 * FUSE workers.  A write held for data space keeps its worker, and so does
 * a request held by a suspend: with only a handful of workers a few held
 * writes would leave none for the reads, unlinks and punched holes that go
 * on meanwhile.  Past the maximum the setting is surely a typo (each
 * worker may take several MiB, README "Memory").
 */
#define MAX_THREADS_MIN 8
#define MAX_THREADS_MAX 4096
#define MAX_THREADS_DEFAULT 512

/* Where the catalog of a pool on block devices goes by default. */
#define CATALOG_DIR "/var/lib/thinfs"

enum section_kind { SEC_NONE, SEC_POOL, SEC_FAULT, SEC_ORIGIN, SEC_SNAPSHOT, SEC_CACHE, SEC_BAD };

static const char *const section_word[] = {
	[SEC_ORIGIN] = "origin",
	[SEC_SNAPSHOT] = "snapshot",
	[SEC_CACHE] = "cache",
};

/* Keys of the sections kept for later targets: names are checked, values are not. */
#define NAMED_KEYS_MAX 9
static const char *const origin_keys[] = { "device", NULL };
static const char *const snapshot_keys[] = { "origin", "cow", "persistent", "chunk_size", NULL };
static const char *const cache_keys[] = { "origin", "cache", "metadata", "mode", "policy",
					   "block_size", "migration_threshold",
					   "metadata_version", "discard_passdown", NULL };

enum pool_key {
	K_METADATA,
	K_DATA,
	K_BLOCK_SIZE,
	K_CATALOG,
	K_LOW_WATER_MARK,
	K_ERROR_IF_NO_SPACE,
	K_NO_SPACE_TIMEOUT,
	K_DISCARD_PASSDOWN,
	K_SKIP_BLOCK_ZEROING,
	K_COMMIT_INTERVAL,
	K_ON_EVENT,
	K_METADATA_CACHE,
	K_HOST_CACHE,
	K_MAX_THREADS,
	K_SNAPSHOT_LOW_WATER,
	K_DETECT_ZEROES,
	K_WRITEBACK_CACHE,
	K_PREALLOCATE,
	K_NR
};

static const char *const pool_key_name[K_NR] = {
	[K_METADATA] = "metadata",
	[K_DATA] = "data",
	[K_BLOCK_SIZE] = "block_size",
	[K_CATALOG] = "catalog",
	[K_LOW_WATER_MARK] = "low_water_mark",
	[K_ERROR_IF_NO_SPACE] = "error_if_no_space",
	[K_NO_SPACE_TIMEOUT] = "no_space_timeout",
	[K_DISCARD_PASSDOWN] = "discard_passdown",
	[K_SKIP_BLOCK_ZEROING] = "skip_block_zeroing",
	[K_COMMIT_INTERVAL] = "commit_interval",
	[K_ON_EVENT] = "on_event",
	[K_METADATA_CACHE] = "metadata_cache",
	[K_HOST_CACHE] = "host_cache",
	[K_MAX_THREADS] = "max_threads",
	[K_SNAPSHOT_LOW_WATER] = "snapshot_low_water",
	[K_DETECT_ZEROES] = "detect_zeroes",
	[K_WRITEBACK_CACHE] = "writeback_cache",
	[K_PREALLOCATE] = "preallocate",
};

/* What the reader decided about the line inih is about to parse. */
enum line_kind { LINE_BLANK, LINE_SECTION, LINE_KEY, LINE_REPORTED };

/* More than inih's longest line (INI_MAX_LINE): a value that reached us fits. */
#define NAMED_VALUE_MAX 256

struct named_section {
	enum section_kind kind;
	char name[TFS_PATH_MAX];
	unsigned line;
	unsigned key_line[NAMED_KEYS_MAX];          /* by index in its key table; 0 = not given */
	char value[NAMED_KEYS_MAX][NAMED_VALUE_MAX]; /* unquoted */
};

struct parser {
	const char *file;              /* as the caller named it: messages use it */
	char base_dir[TFS_PATH_MAX];   /* relative paths start here */
	FILE *f;
	char *buf;                     /* getline() buffer: whole lines, any length */
	size_t buf_cap;
	int read_errno;

	unsigned lineno;
	enum line_kind line_kind;
	bool line_indented;
	bool handler_called;
	bool key_in_section;          /* inih's "prev_name": indented lines continue it */

	enum section_kind section;
	unsigned section_line;
	unsigned pool_line, fault_line;
	unsigned key_line[K_NR];      /* 0 = not given */
	unsigned fault_allow_line;
	struct named_section *named;
	size_t nr_named;

	unsigned nr_errors;
	int err;                      /* errno of the first problem */
	struct tfs_pool_config cfg;
};

static void problem(struct parser *p, unsigned line, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* Log one problem with file:line; the load fails with the first one's errno. */
static void problem(struct parser *p, unsigned line, int err, const char *fmt, ...)
{
	char msg[768];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (line)
		tfs_err("%s:%u: %s", p->file, line, msg);
	else
		tfs_err("%s: %s", p->file, msg);
	p->nr_errors++;
	if (!p->err)
		p->err = err;
}

/* ---- value syntax ---- */

static int unit_shift(char c)
{
	switch (tolower((unsigned char)c)) {
	case 'k': return 10;
	case 'm': return 20;
	case 'g': return 30;
	case 't': return 40;
	case 'p': return 50;
	case 'e': return 60;
	default: return -1;
	}
}

int tfs_parse_size(const char *s, uint64_t *bytes, bool *relative)
{
	uint64_t n = 0;
	const char *q = s;
	int shift = 0;

	if (relative)
		*relative = false;
	if (*q == '+') {
		if (!relative)
			return -EINVAL;
		*relative = true;
		q++;
	}
	if (!isdigit((unsigned char)*q))
		return -EINVAL;
	for (; isdigit((unsigned char)*q); q++) {
		unsigned d = (unsigned)(*q - '0');

		if (n > (UINT64_MAX - d) / 10)
			return -ERANGE;
		n = n * 10 + d;
	}
	/* "", "b", "k", "kb", "kib" (any case): binary units throughout. */
	if (*q && unit_shift(*q) >= 0) {
		shift = unit_shift(*q++);
		if (tolower((unsigned char)*q) == 'i' && tolower((unsigned char)q[1]) == 'b')
			q += 2;
		else if (tolower((unsigned char)*q) == 'b')
			q++;
	} else if (tolower((unsigned char)*q) == 'b') {
		q++;
	}
	if (*q)
		return -EINVAL;
	if (shift && n > (UINT64_MAX >> shift))
		return -ERANGE;
	*bytes = n << shift;
	return 0;
}

/* "60s", "2m", "1h", "500ms", or a plain number of seconds. */
static int parse_time_ms(const char *s, uint64_t *ms)
{
	uint64_t n = 0, mult;
	const char *q = s;

	if (!isdigit((unsigned char)*q))
		return -EINVAL;
	for (; isdigit((unsigned char)*q); q++) {
		unsigned d = (unsigned)(*q - '0');

		if (n > (UINT64_MAX - d) / 10)
			return -ERANGE;
		n = n * 10 + d;
	}
	if (!*q || !strcasecmp(q, "s"))
		mult = 1000;
	else if (!strcasecmp(q, "ms"))
		mult = 1;
	else if (!strcasecmp(q, "m"))
		mult = 60 * 1000;
	else if (!strcasecmp(q, "h"))
		mult = 3600 * 1000;
	else
		return -EINVAL;
	if (n > UINT64_MAX / mult)
		return -ERANGE;
	*ms = n * mult;
	return 0;
}

static int parse_bool(const char *s, bool *b)
{
	static const char *const yes[] = { "yes", "true", "on", "1" };
	static const char *const no[] = { "no", "false", "off", "0" };

	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
		if (!strcasecmp(s, yes[i])) {
			*b = true;
			return 0;
		}
		if (!strcasecmp(s, no[i])) {
			*b = false;
			return 0;
		}
	}
	return -EINVAL;
}

/* Size in the form people write them back: "64k" rather than "65536". */
static void format_size(uint64_t n, char *out, size_t len)
{
	static const char units[] = "kmgtpe";
	int i = -1;

	while (n && !(n & 1023) && i < 5) {
		n >>= 10;
		i++;
	}
	if (i < 0)
		snprintf(out, len, "%llu", (unsigned long long)n);
	else
		snprintf(out, len, "%llu%c", (unsigned long long)n, units[i]);
}

/* ---- bounded text ---- */

/*
 * Text appended into a fixed buffer.  used counts what was asked for, as
 * snprintf does, so used >= len says it was cut; a NULL buffer of length 0
 * only measures.
 */
struct text {
	char *buf;
	size_t len;
	size_t used;
};

static void text_init(struct text *t, char *buf, size_t len)
{
	t->buf = len ? buf : NULL;
	t->len = t->buf ? len : 0;
	t->used = 0;
	if (t->len)
		t->buf[0] = '\0';
}

static void text_add(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void text_add(struct text *t, const char *fmt, ...)
{
	size_t room = t->used < t->len ? t->len - t->used : 0;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(room ? t->buf + t->used : NULL, room, fmt, ap);
	va_end(ap);
	if (n > 0)
		t->used += (size_t)n;
}

/* A reader of a cut message must see that it was cut. */
static void text_finish(struct text *t)
{
	if (t->used >= t->len && t->len >= 4)
		memcpy(t->buf + t->len - 4, "...", 4);
}

/* ---- device names ---- */

static int join_path(const char *base_dir, const char *name, char *out, size_t out_len)
{
	int n;

	if (name[0] == '/' || !base_dir || !base_dir[0])
		n = snprintf(out, out_len, "%s", name);
	else
		n = snprintf(out, out_len, "%s/%s", base_dir, name);
	return n < 0 || (size_t)n >= out_len ? -ENAMETOOLONG : 0;
}

static bool is_tag(const char *name)
{
	static const char *const tags[] = { "UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=" };

	for (size_t i = 0; i < sizeof(tags) / sizeof(tags[0]); i++)
		if (!strncmp(name, tags[i], strlen(tags[i])))
			return true;
	return false;
}

int tfs_config_resolve_device(const char *name, const char *base_dir, char *out, size_t out_len)
{
	char joined[TFS_PATH_MAX];
	char *real = NULL;
	struct stat st;
	int r;

	if (!name[0])
		return -EINVAL;
	if (is_tag(name)) {
		if (!strchr(name, '=')[1])
			return -EINVAL;
		/* A private cache, freed by blkid: nothing outlives the call. */
		real = blkid_evaluate_tag(name, NULL, NULL);
		if (!real)
			return -ENOENT;
	} else {
		r = join_path(base_dir, name, joined, sizeof(joined));
		if (r)
			return r;
		real = realpath(joined, NULL);
		if (!real)
			return -errno;
	}
	if (stat(real, &st)) {
		r = -errno;
		goto out_free;
	}
	if (S_ISDIR(st.st_mode)) {
		r = -EISDIR;
		goto out_free;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		r = -ENOTBLK;
		goto out_free;
	}
	if (strlen(real) >= out_len) {
		r = -ENAMETOOLONG;
		goto out_free;
	}
	strcpy(out, real);
	r = 0;
out_free:
	free(real);
	return r;
}

/* ---- [pool] values ---- */

/* inih keeps quotes; a value wrapped in one pair of double quotes loses them. */
static const char *unquote(const char *value, char *buf, size_t len)
{
	size_t n = strlen(value);

	if (n >= 2 && value[0] == '"' && value[n - 1] == '"' && n - 2 < len) {
		memcpy(buf, value + 1, n - 2);
		buf[n - 2] = '\0';
		return buf;
	}
	return value;
}

static void set_device_at(struct parser *p, unsigned line, const char *key, const char *value,
			  char *out)
{
	int r = tfs_config_resolve_device(value, p->base_dir, out, TFS_PATH_MAX);

	if (!r)
		return;
	if (is_tag(value)) {
		if (r == -EINVAL)
			problem(p, line, -EINVAL, "%s: '%s' has an empty value", key, value);
		else
			problem(p, line, -ENOENT,
				"%s: %s: no such device (libblkid found none with this %.*s)", key,
				value, (int)(strchr(value, '=') - value), value);
		return;
	}
	switch (r) {
	case -EISDIR:
		problem(p, line, -EINVAL, "%s: %s is a directory", key, value);
		break;
	case -ENOTBLK:
		problem(p, line, -EINVAL, "%s: %s is neither a regular file nor a block device",
			key, value);
		break;
	case -ENOENT:
		problem(p, line, -ENOENT, "%s: %s: no such file or device%s%s%s", key, value,
			value[0] == '/' ? "" : " (relative to ", value[0] == '/' ? "" : p->base_dir,
			value[0] == '/' ? "" : ")");
		break;
	default:
		problem(p, line, r == -ENAMETOOLONG ? -EINVAL : r, "%s: %s: %s", key, value,
			strerror(-r));
		break;
	}
}

static void set_device(struct parser *p, const char *key, const char *value, char *out)
{
	set_device_at(p, p->lineno, key, value, out);
}

static void set_size(struct parser *p, const char *key, const char *value, uint64_t *out)
{
	int r = tfs_parse_size(value, out, NULL);

	if (r == -ERANGE)
		problem(p, p->lineno, -EINVAL, "%s: %s is too large", key, value);
	else if (r)
		problem(p, p->lineno, -EINVAL,
			"%s: '%s' is not a size (bytes, or a number with k, m, g, t: 64k, 1m, 20G)",
			key, value);
}

static void set_time(struct parser *p, const char *key, const char *value, uint64_t *ms)
{
	int r = parse_time_ms(value, ms);

	if (r == -ERANGE)
		problem(p, p->lineno, -EINVAL, "%s: %s is too large", key, value);
	else if (r)
		problem(p, p->lineno, -EINVAL,
			"%s: '%s' is not a time (seconds, or a number with ms, s, m, h: 500ms, 60s, 2m)",
			key, value);
}

static void set_bool(struct parser *p, const char *key, const char *value, bool *out)
{
	if (parse_bool(value, out))
		problem(p, p->lineno, -EINVAL,
			"%s: '%s' is not a boolean (yes/no, true/false, on/off, 1/0)", key, value);
}

static void set_block_size(struct parser *p, const char *value)
{
	char unit[32], max[32];
	uint64_t n;

	if (tfs_parse_size(value, &n, NULL)) {
		set_size(p, "block_size", value, &n);
		return;
	}
	format_size(BLOCK_SIZE_UNIT, unit, sizeof(unit));
	format_size(BLOCK_SIZE_MAX, max, sizeof(max));
	if (n < BLOCK_SIZE_UNIT)
		problem(p, p->lineno, -EINVAL, "block_size: %s is smaller than %s", value, unit);
	else if (n > BLOCK_SIZE_MAX)
		problem(p, p->lineno, -EINVAL, "block_size: %s is larger than %s", value, max);
	else if (n % BLOCK_SIZE_UNIT)
		problem(p, p->lineno, -EINVAL, "block_size: %s is not a multiple of %s", value, unit);
	else
		p->cfg.block_size = n;
}

static void set_low_water(struct parser *p, const char *value)
{
	size_t n = strlen(value);
	unsigned long long v;
	char *end;

	/* Digits only: strtoull alone would take "-1", " 5" or "0x10". */
	if (!n || !isdigit((unsigned char)value[0]))
		goto bad;
	errno = 0;
	v = strtoull(value, &end, 10);
	if (errno)
		goto bad;
	if (!strcmp(end, "%")) {
		if (v > 100) {
			problem(p, p->lineno, -EINVAL, "low_water_mark: %s is more than 100%%",
				value);
			return;
		}
		p->cfg.low_water_is_percent = true;
		p->cfg.low_water_percent = (unsigned)v;
		return;
	}
	if (*end)
		goto bad;
	p->cfg.low_water_is_percent = false;
	p->cfg.low_water_blocks = v;
	return;
bad:
	problem(p, p->lineno, -EINVAL,
		"low_water_mark: '%s' is neither a number of data blocks (4096) nor a percentage (10%%)",
		value);
}

static void set_on_event(struct parser *p, const char *value)
{
	char path[TFS_PATH_MAX];
	struct stat st;

	if (join_path(p->base_dir, value, path, sizeof(path))) {
		problem(p, p->lineno, -EINVAL, "on_event: path too long");
		return;
	}
	if (stat(path, &st)) {
		int e = errno;

		problem(p, p->lineno, e == ENOENT ? -ENOENT : -EINVAL, "on_event: %s: %s", path,
			strerror(e));
		return;
	}
	if (!S_ISREG(st.st_mode) || access(path, X_OK)) {
		problem(p, p->lineno, -EINVAL, "on_event: %s is not an executable file", path);
		return;
	}
	strcpy(p->cfg.on_event, path);
}

static void set_metadata_cache(struct parser *p, const char *value)
{
	char min[32];
	uint64_t n;

	if (tfs_parse_size(value, &n, NULL)) {
		set_size(p, "metadata_cache", value, &n);
		return;
	}
	if (n < METADATA_CACHE_MIN) {
		format_size(METADATA_CACHE_MIN, min, sizeof(min));
		problem(p, p->lineno, -EINVAL, "metadata_cache: %s is smaller than the minimum %s",
			value, min);
		return;
	}
	p->cfg.metadata_cache_bytes = n;
}

/* off (0), or 1 MiB to 1 GiB: smaller fills too often, larger reserves too much host space ahead. */
static void set_preallocate(struct parser *p, const char *value)
{
	uint64_t n;

	if (!strcmp(value, "off") || !strcmp(value, "0")) {
		p->cfg.preallocate_bytes = 0;
		return;
	}
	if (tfs_parse_size(value, &n, NULL)) {
		set_size(p, "preallocate", value, &n);
		return;
	}
	if (n < MIB || n > 1024 * MIB) {
		problem(p, p->lineno, -EINVAL, "preallocate: %s is not off or a size from 1m to 1g",
			value);
		return;
	}
	p->cfg.preallocate_bytes = n;
}

static void set_max_threads(struct parser *p, const char *value)
{
	unsigned long n = 0;

	/* Digits only: "64k", "-1" and "1e3" are not counts. */
	if (value[strspn(value, "0123456789")]) {
		problem(p, p->lineno, -EINVAL, "max_threads: '%s' is not a number of threads",
			value);
		return;
	}
	/* Stops past the maximum: any length of digits is compared without overflow. */
	for (const char *q = value; *q && n <= MAX_THREADS_MAX; q++)
		n = n * 10 + (unsigned)(*q - '0');
	if (n > MAX_THREADS_MAX) {
		problem(p, p->lineno, -EINVAL, "max_threads: %s is more than %d", value,
			MAX_THREADS_MAX);
		return;
	}
	if (n < MAX_THREADS_MIN) {
		problem(p, p->lineno, -EINVAL,
			"max_threads: %s is less than %d (each write held for data space keeps a "
			"thread: too few would leave none for other I/O)", value, MAX_THREADS_MIN);
		return;
	}
	p->cfg.max_threads = (unsigned)n;
}

/* "80" or "80%": a percentage of each COW device; 0 turns the mark off. */
static void set_snapshot_low_water(struct parser *p, const char *value)
{
	unsigned long v;
	char *end;

	if (!isdigit((unsigned char)value[0]))
		goto bad;
	errno = 0;
	v = strtoul(value, &end, 10);
	if (errno || (*end && strcmp(end, "%")))
		goto bad;
	if (v > 100) {
		problem(p, p->lineno, -EINVAL, "snapshot_low_water: %s is more than 100%%", value);
		return;
	}
	p->cfg.snapshot_low_water = (unsigned)v;
	return;
bad:
	problem(p, p->lineno, -EINVAL,
		"snapshot_low_water: '%s' is not a percentage of the COW device (80%%)", value);
}

static void pool_key(struct parser *p, const char *name, const char *raw)
{
	char unq[TFS_PATH_MAX];
	const char *value = unquote(raw, unq, sizeof(unq));
	struct tfs_pool_config *c = &p->cfg;
	enum pool_key k;
	uint64_t ms;

	for (k = 0; k < K_NR; k++)
		if (!strcmp(name, pool_key_name[k]))
			break;
	if (k == K_NR) {
		problem(p, p->lineno, -EINVAL,
			"unknown key '%s' in [pool] (known: metadata, data, block_size, catalog, "
			"low_water_mark, error_if_no_space, no_space_timeout, discard_passdown, "
			"skip_block_zeroing, commit_interval, on_event, metadata_cache, host_cache, "
			"max_threads, snapshot_low_water, detect_zeroes, writeback_cache, preallocate)",
			name);
		return;
	}
	if (p->key_line[k]) {
		problem(p, p->lineno, -EINVAL, "%s: given twice (first on line %u)", name,
			p->key_line[k]);
		return;
	}
	p->key_line[k] = p->lineno;
	if (!value[0]) {
		problem(p, p->lineno, -EINVAL, "%s: empty value", name);
		return;
	}

	switch (k) {
	case K_METADATA:
		set_device(p, name, value, c->metadata);
		break;
	case K_DATA:
		set_device(p, name, value, c->data);
		break;
	case K_BLOCK_SIZE:
		set_block_size(p, value);
		break;
	case K_CATALOG:
		if (join_path(p->base_dir, value, c->catalog, sizeof(c->catalog)))
			problem(p, p->lineno, -EINVAL, "catalog: path too long");
		break;
	case K_LOW_WATER_MARK:
		set_low_water(p, value);
		break;
	case K_ERROR_IF_NO_SPACE:
		set_bool(p, name, value, &c->error_if_no_space);
		break;
	case K_NO_SPACE_TIMEOUT:
		set_time(p, name, value, &c->no_space_timeout_ms);
		break;
	case K_DISCARD_PASSDOWN:
		set_bool(p, name, value, &c->discard_passdown);
		break;
	case K_SKIP_BLOCK_ZEROING:
		set_bool(p, name, value, &c->skip_block_zeroing);
		break;
	case K_COMMIT_INTERVAL:
		if (parse_time_ms(value, &ms))
			set_time(p, name, value, &ms); /* reports why */
		else if (!ms)
			problem(p, p->lineno, -EINVAL, "commit_interval: must be more than 0");
		else if (ms > COMMIT_INTERVAL_MAX_MS)
			problem(p, p->lineno, -EINVAL, "commit_interval: %s is more than an hour",
				value);
		else
			c->commit_interval_ms = ms;
		break;
	case K_ON_EVENT:
		set_on_event(p, value);
		break;
	case K_METADATA_CACHE:
		set_metadata_cache(p, value);
		break;
	case K_HOST_CACHE:
		set_bool(p, name, value, &c->host_cache);
		break;
	case K_MAX_THREADS:
		set_max_threads(p, value);
		break;
	case K_SNAPSHOT_LOW_WATER:
		set_snapshot_low_water(p, value);
		break;
	case K_DETECT_ZEROES:
		if (!strcmp(value, "unmap") || !strcmp(value, "off"))
			c->detect_zeroes = !strcmp(value, "unmap");
		else
			problem(p, p->lineno, -EINVAL, "detect_zeroes: '%s' is not off or unmap",
				value);
		break;
	case K_WRITEBACK_CACHE:
		set_bool(p, name, value, &c->writeback_cache);
		break;
	case K_PREALLOCATE:
		set_preallocate(p, value);
		break;
	case K_NR:
		break;
	}
}

static const char *const *named_keys(enum section_kind kind)
{
	return kind == SEC_ORIGIN ? origin_keys : kind == SEC_SNAPSHOT ? snapshot_keys : cache_keys;
}

static void unknown_named_key(struct parser *p, const struct named_section *ns, const char *name)
{
	const char *const *keys = named_keys(ns->kind);
	char known[128] = "";

	for (const char *const *k = keys; *k; k++) {
		strncat(known, *k, sizeof(known) - strlen(known) - 1);
		if (k[1])
			strncat(known, ", ", sizeof(known) - strlen(known) - 1);
	}
	problem(p, p->lineno, -EINVAL, "unknown key '%s' in [%s \"%s\"] (known: %s)", name,
		section_word[ns->kind], ns->name, known);
}

/* Kept as given: a reload compares these sections, the later targets will check them. */
static void named_key(struct parser *p, const char *name, const char *raw)
{
	struct named_section *ns = &p->named[p->nr_named - 1];
	const char *const *keys = named_keys(ns->kind);
	char unq[NAMED_VALUE_MAX];
	const char *value = unquote(raw, unq, sizeof(unq));
	size_t i;

	for (i = 0; keys[i]; i++)
		if (!strcmp(name, keys[i]))
			break;
	if (!keys[i]) {
		unknown_named_key(p, ns, name);
		return;
	}
	if (ns->key_line[i]) {
		problem(p, p->lineno, -EINVAL, "%s: given twice (first on line %u)", name,
			ns->key_line[i]);
		return;
	}
	ns->key_line[i] = p->lineno;
	if (strlen(value) >= sizeof(ns->value[i])) {
		problem(p, p->lineno, -EINVAL, "%s: value longer than %zu bytes", name,
			sizeof(ns->value[i]) - 1);
		return;
	}
	strcpy(ns->value[i], value);
}

static int on_pair(void *user, const char *section, const char *name, const char *value)
{
	struct parser *p = user;

	(void)section; /* the reader parsed the header itself; see classify() */
	p->handler_called = true;
	if (p->line_kind != LINE_KEY)
		return 1; /* reported by the reader already */

	switch (p->section) {
	case SEC_NONE:
		problem(p, p->lineno, -EINVAL, "key '%s' outside any section (put it under [pool])",
			name);
		break;
	case SEC_BAD:
		break; /* the header was reported; one error per mistake */
	case SEC_POOL:
		pool_key(p, name, value);
		break;
	case SEC_FAULT:
		if (strcmp(name, "allow")) {
			problem(p, p->lineno, -EINVAL, "unknown key '%s' in [fault] (known: allow)",
				name);
		} else if (p->fault_allow_line) {
			problem(p, p->lineno, -EINVAL, "allow: given twice (first on line %u)",
				p->fault_allow_line);
		} else {
			p->fault_allow_line = p->lineno;
			set_bool(p, "allow", value, &p->cfg.allow_faults);
		}
		break;
	case SEC_ORIGIN:
	case SEC_SNAPSHOT:
	case SEC_CACHE:
		named_key(p, name, value);
		break;
	}
	return 1;
}

/* ---- lines ---- */

/* inih's inline comment rule: ';' at the start or after whitespace. */
static const char *find_chars_or_comment(const char *s, const char *chars)
{
	bool was_space = false;

	for (; *s && !strchr(chars, *s) && !(was_space && *s == ';'); s++)
		was_space = isspace((unsigned char)*s);
	return s;
}

static bool rest_is_blank(const char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	return !*s || *s == ';' || *s == '#';
}

static bool check_section_name(struct parser *p, const char *word, const char *name)
{
	for (const unsigned char *c = (const unsigned char *)name; *c; c++) {
		if (*c < 0x20 || *c == 0x7f) {
			problem(p, p->lineno, -EINVAL, "[%s]: the name contains a control character",
				word);
			return false;
		}
		if (*c == '/' || *c == '"') {
			problem(p, p->lineno, -EINVAL, "[%s \"%s\"]: a name may not contain '%c'",
				word, name, *c);
			return false;
		}
	}
	if (!name[0] || !strcmp(name, ".") || !strcmp(name, "..") || strlen(name) > 255) {
		problem(p, p->lineno, -EINVAL,
			"[%s]: the name must be 1 to 255 bytes and not '.' or '..'", word);
		return false;
	}
	return true;
}

static void section_header(struct parser *p, const char *start)
{
	const char *end = find_chars_or_comment(start + 1, "]");
	char body[TFS_PATH_MAX], word[16], *q, *name;
	struct named_section *grown;
	size_t len;
	enum section_kind kind;

	p->section = SEC_BAD;
	p->section_line = p->lineno;
	p->key_in_section = false;
	if (*end != ']') {
		problem(p, p->lineno, -EINVAL, "section header without a closing ']'");
		return;
	}
	if (!rest_is_blank(end + 1)) {
		problem(p, p->lineno, -EINVAL, "unexpected text after ']'");
		return;
	}
	start++;
	while (isspace((unsigned char)*start))
		start++;
	len = (size_t)(end - start);
	while (len && isspace((unsigned char)start[len - 1]))
		len--;
	if (len >= sizeof(body)) {
		problem(p, p->lineno, -EINVAL, "section header too long");
		return;
	}
	memcpy(body, start, len);
	body[len] = '\0';

	if (!strcmp(body, "pool") || !strcmp(body, "fault")) {
		unsigned *seen = body[0] == 'p' ? &p->pool_line : &p->fault_line;

		if (*seen) {
			problem(p, p->lineno, -EINVAL, "[%s] given twice (first on line %u)", body,
				*seen);
			return;
		}
		*seen = p->lineno;
		p->section = body[0] == 'p' ? SEC_POOL : SEC_FAULT;
		return;
	}

	q = body + strcspn(body, " \t\"");
	len = (size_t)(q - body);
	for (kind = SEC_ORIGIN; kind <= SEC_CACHE; kind++)
		if (len == strlen(section_word[kind]) && !strncmp(body, section_word[kind], len))
			break;
	if (kind > SEC_CACHE) {
		problem(p, p->lineno, -EINVAL,
			"unknown section [%s] (expected [pool], [fault], [origin \"NAME\"], "
			"[snapshot \"NAME\"] or [cache \"NAME\"])",
			body);
		return;
	}
	snprintf(word, sizeof(word), "%s", section_word[kind]);
	while (isspace((unsigned char)*q))
		q++;
	len = strlen(q);
	if (len < 2 || q[0] != '"' || q[len - 1] != '"') {
		problem(p, p->lineno, -EINVAL, "[%s] needs a quoted name: [%s \"NAME\"]", word, word);
		return;
	}
	q[len - 1] = '\0';
	name = q + 1;
	if (!check_section_name(p, word, name))
		return;
	/* origin, snapshot and cache names all become files in the mount root. */
	for (size_t i = 0; i < p->nr_named; i++) {
		if (!strcmp(p->named[i].name, name)) {
			problem(p, p->lineno, -EINVAL,
				"[%s \"%s\"]: the name is taken by [%s \"%s\"] on line %u", word, name,
				section_word[p->named[i].kind], name, p->named[i].line);
			return;
		}
	}
	grown = realloc(p->named, (p->nr_named + 1) * sizeof(*grown));
	if (!grown) {
		problem(p, p->lineno, -ENOMEM, "out of memory");
		return;
	}
	p->named = grown;
	memset(&grown[p->nr_named], 0, sizeof(grown[p->nr_named]));
	grown[p->nr_named].kind = kind;
	strcpy(grown[p->nr_named].name, name);
	grown[p->nr_named].line = p->lineno;
	p->nr_named++;
	p->section = kind;
}

/*
 * Decide what inih will make of this line, mirroring its rules (comment
 * prefixes ';' '#', inline ';' after whitespace, '[' headers, '=' or ':'
 * separators, an indented line after a key continues that key's value).
 */
static void classify(struct parser *p, const char *line)
{
	const char *s = line;
	const char *sep;

	if (p->lineno == 1 && !strncmp(s, "\xEF\xBB\xBF", 3))
		s += 3;
	p->line_indented = isspace((unsigned char)*s) && *s != '\n' && *s != '\r';
	while (isspace((unsigned char)*s))
		s++;
	if (!*s || *s == ';' || *s == '#') {
		p->line_kind = LINE_BLANK;
		return;
	}
	if (p->line_indented && p->key_in_section) {
		/* inih would append this line to the previous value: never what was meant. */
		problem(p, p->lineno, -EINVAL,
			"indented line: continuation lines are not supported "
			"(remove the indentation, one key = value per line)");
		p->line_kind = LINE_REPORTED;
		return;
	}
	if (*s == '[') {
		p->line_kind = LINE_SECTION;
		section_header(p, s);
		return;
	}
	sep = find_chars_or_comment(s, "=:");
	if (*sep != '=' && *sep != ':') {
		problem(p, p->lineno, -EINVAL, "expected 'key = value', a [section] or a comment");
		p->line_kind = LINE_REPORTED;
		return;
	}
	p->key_in_section = true;
	p->line_kind = LINE_KEY;
}

/* inih's reader: one whole line per call, so its line count stays ours. */
static char *read_line(char *str, int num, void *stream)
{
	struct parser *p = stream;
	ssize_t n;

	if (p->line_kind == LINE_KEY && !p->handler_called)
		problem(p, p->lineno, -EINVAL, "could not parse this line");
	p->handler_called = false;

	errno = 0;
	n = getline(&p->buf, &p->buf_cap, p->f);
	if (n < 0) {
		p->read_errno = errno;
		p->line_kind = LINE_BLANK;
		return NULL;
	}
	p->lineno++;
	if (memchr(p->buf, '\0', (size_t)n)) {
		problem(p, p->lineno, -EINVAL, "line contains a NUL byte");
		goto blank;
	}
	/* inih's buffer is fixed (INI_MAX_LINE); a longer line would be split. */
	if (n > num - 1) {
		problem(p, p->lineno, -EINVAL, "line longer than %d bytes (use a shorter or relative path)",
			num - 2);
		goto blank;
	}
	memcpy(str, p->buf, (size_t)n + 1);
	classify(p, str);
	return str;
blank:
	p->line_kind = LINE_REPORTED;
	snprintf(str, (size_t)num, "\n");
	return str;
}

/* ---- the whole file ---- */

bool tfs_config_same_device(const char *a, const char *b)
{
	struct stat sa, sb;

	if (stat(a, &sa) || stat(b, &sb))
		return !strcmp(a, b);
	if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode))
		return sa.st_rdev == sb.st_rdev;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static void finish(struct parser *p)
{
	struct tfs_pool_config *c = &p->cfg;
	struct stat st;
	const char *base;
	int n;

	if (!p->pool_line) {
		problem(p, 0, -EINVAL, "no [pool] section (it needs at least metadata = and data =)");
		return;
	}
	if (!p->key_line[K_METADATA])
		problem(p, p->pool_line, -EINVAL, "[pool]: required key 'metadata' is missing");
	if (!p->key_line[K_DATA])
		problem(p, p->pool_line, -EINVAL, "[pool]: required key 'data' is missing");
	if (p->nr_errors)
		return;

	if (tfs_config_same_device(c->metadata, c->data)) {
		problem(p, p->key_line[K_DATA], -EINVAL,
			"data: %s is the metadata device too (line %u)", c->data,
			p->key_line[K_METADATA]);
		return;
	}

	if (!p->key_line[K_CATALOG]) {
		if (!stat(c->metadata, &st) && S_ISBLK(st.st_mode)) {
			base = strrchr(c->metadata, '/');
			base = base ? base + 1 : c->metadata;
			n = snprintf(c->catalog, sizeof(c->catalog), CATALOG_DIR "/%s.db", base);
		} else {
			n = snprintf(c->catalog, sizeof(c->catalog), "%s.catalog.db", c->metadata);
		}
		if (n < 0 || (size_t)n >= sizeof(c->catalog))
			problem(p, p->key_line[K_METADATA], -EINVAL,
				"metadata: path too long to name the catalog after it");
		return;
	}
	if (!stat(c->catalog, &st) && !S_ISREG(st.st_mode)) {
		problem(p, p->key_line[K_CATALOG], -EINVAL, "catalog: %s is not a regular file",
			c->catalog);
		return;
	}
	if (tfs_config_same_device(c->catalog, c->metadata) || tfs_config_same_device(c->catalog, c->data))
		problem(p, p->key_line[K_CATALOG], -EINVAL,
			"catalog: %s is the metadata or data device", c->catalog);
}

/* ---- [origin/snapshot/cache] sections as text ---- */

/* The canonical order: by kind (origin, snapshot, cache), then by name. */
static int section_order(enum section_kind ka, const char *a, size_t alen, enum section_kind kb,
			 const char *b, size_t blen)
{
	int c;

	if (ka != kb)
		return ka < kb ? -1 : 1;
	c = memcmp(a, b, alen < blen ? alen : blen);
	if (c)
		return c;
	return alen < blen ? -1 : alen > blen;
}

static int cmp_named(const void *a, const void *b)
{
	const struct named_section *x = a, *y = b;

	return section_order(x->kind, x->name, strlen(x->name), y->kind, y->name, strlen(y->name));
}

/* `origin "db": device=/dev/sdb`, keys by name so that their order in the file does not count. */
static void add_target_line(struct text *t, const struct named_section *ns)
{
	const char *const *keys = named_keys(ns->kind);
	const char *prev = "";
	int next;

	text_add(t, "%s \"%s\":", section_word[ns->kind], ns->name);
	for (;;) {
		next = -1;
		for (int i = 0; keys[i]; i++)
			if (ns->key_line[i] && strcmp(keys[i], prev) > 0 &&
			    (next < 0 || strcmp(keys[i], keys[next]) < 0))
				next = i;
		if (next < 0)
			break;
		text_add(t, " %s=%s", keys[next], ns->value[next]);
		prev = keys[next];
	}
	text_add(t, "\n");
}

/*
 * The size is checked in file order, whatever the canonical order, so the
 * error names the section where the file went past the limit.
 */
static bool targets_fit(struct parser *p)
{
	size_t total = 1; /* the NUL */
	struct text measure;

	for (size_t i = 0; i < p->nr_named; i++) {
		text_init(&measure, NULL, 0);
		add_target_line(&measure, &p->named[i]);
		total += measure.used;
		if (total > sizeof(p->cfg.targets)) {
			problem(p, p->named[i].line, -EINVAL,
				"too many or too long [origin/snapshot/cache] sections: at most %zu bytes",
				sizeof(p->cfg.targets));
			return false;
		}
	}
	return true;
}

/* Index of key in the section's key table. */
static int named_index(enum section_kind kind, const char *key)
{
	const char *const *keys = named_keys(kind);

	for (int i = 0; keys[i]; i++)
		if (!strcmp(keys[i], key))
			return i;
	return -1;
}

static const char *named_value(const struct named_section *ns, const char *key, unsigned *line)
{
	int i = named_index(ns->kind, key);

	*line = ns->key_line[i];
	return ns->key_line[i] ? ns->value[i] : NULL;
}

/* A device path another key already names, as "[origin \"db\"] device" or "[pool] data". */
static bool device_clash(struct parser *p, const char *path, size_t upto, char *who, size_t len)
{
	if (tfs_config_same_device(path, p->cfg.metadata) || tfs_config_same_device(path, p->cfg.data)) {
		snprintf(who, len, "[pool] %s", tfs_config_same_device(path, p->cfg.data) ? "data" : "metadata");
		return true;
	}
	for (size_t i = 0; i < upto; i++) {
		const struct tfs_cow_target_cfg *t = &p->cfg.cow_targets[i];

		if (tfs_config_same_device(path, t->device)) {
			snprintf(who, len, "[%s \"%s\"] %s", t->is_snapshot ? "snapshot" : "origin",
				 t->name, t->is_snapshot ? "cow" : "device");
			return true;
		}
	}
	return false;
}

/* [snapshot] chunk_size: TFS_SNAP_CHUNK_RULE; default 4k, as LVM's. */
static bool snapshot_chunk(struct parser *p, const struct named_section *ns,
			   struct tfs_cow_target_cfg *t)
{
	unsigned line;
	const char *v = named_value(ns, "chunk_size", &line);
	uint64_t bytes;

	t->chunk_sectors = 8;
	if (!v)
		return true;
	if (tfs_parse_size(v, &bytes, NULL) || bytes % 512 || bytes / 512 > UINT32_MAX ||
	    !tfs_snap_chunk_sectors_ok(bytes / 512)) {
		problem(p, line, -EINVAL, "[snapshot \"%s\"] chunk_size: %s is not %s", ns->name,
			v, TFS_SNAP_CHUNK_RULE);
		return false;
	}
	t->chunk_sectors = (uint32_t)(bytes / 512);
	return true;
}

/*
 * [origin] and [snapshot] sections (sorted: origins first), into
 * cfg.cow_targets.  Only what can be told without opening a device: the
 * engine checks what they hold when it opens them.
 */
static void check_cow_targets(struct parser *p)
{
	struct tfs_pool_config *c = &p->cfg;
	char who[TFS_PATH_MAX + 32], key[80];
	unsigned line;
	const char *v;

	for (size_t i = 0; i < p->nr_named; i++) {
		const struct named_section *ns = &p->named[i];
		struct tfs_cow_target_cfg *t;
		bool snap = ns->kind == SEC_SNAPSHOT;
		const char *dev_key = snap ? "cow" : "device";
		unsigned before = p->nr_errors;

		if (ns->kind != SEC_ORIGIN && !snap)
			continue;
		if (c->nr_cow_targets == TFS_COW_TARGETS_MAX) {
			problem(p, ns->line, -EINVAL, "[%s \"%s\"]: more than %d origins and "
				"snapshots", section_word[ns->kind], ns->name, TFS_COW_TARGETS_MAX);
			return;
		}
		t = &c->cow_targets[c->nr_cow_targets];
		memset(t, 0, sizeof(*t));
		t->is_snapshot = snap;
		snprintf(t->name, sizeof(t->name), "%.255s", ns->name);
		v = named_value(ns, dev_key, &line);
		if (!v) {
			problem(p, ns->line, -EINVAL, "[%s \"%s\"]: required key '%s' is missing",
				section_word[ns->kind], ns->name, dev_key);
		} else {
			snprintf(key, sizeof(key), "[%s \"%.40s\"] %s", section_word[ns->kind],
				 ns->name, dev_key);
			set_device_at(p, line, key, v, t->device);
			if (p->nr_errors == before &&
			    device_clash(p, t->device, c->nr_cow_targets, who, sizeof(who)))
				problem(p, line, -EINVAL, "%s: %s is already %s", key, v, who);
		}
		if (snap) {
			v = named_value(ns, "origin", &line);
			if (!v) {
				problem(p, ns->line, -EINVAL,
					"[snapshot \"%s\"]: required key 'origin' is missing", ns->name);
			} else {
				bool found = false;

				for (unsigned k = 0; k < c->nr_cow_targets; k++)
					if (!c->cow_targets[k].is_snapshot &&
					    !strcmp(c->cow_targets[k].name, v))
						found = true;
				if (!found)
					problem(p, line, -EINVAL, "[snapshot \"%s\"] origin: no "
						"[origin \"%s\"] section", ns->name, v);
				snprintf(t->origin, sizeof(t->origin), "%s", v);
			}
			snapshot_chunk(p, ns, t);
			t->persistent = true;
			v = named_value(ns, "persistent", &line);
			if (v && parse_bool(v, &t->persistent))
				problem(p, line, -EINVAL, "[snapshot \"%s\"] persistent: '%s' is not "
					"yes or no", ns->name, v);
		}
		c->nr_cow_targets++;
	}
}

static void keep_targets(struct parser *p)
{
	struct text t;

	if (!targets_fit(p))
		return;
	if (p->nr_named)
		qsort(p->named, p->nr_named, sizeof(*p->named), cmp_named);
	if (!p->nr_errors)
		check_cow_targets(p);
	text_init(&t, p->cfg.targets, sizeof(p->cfg.targets));
	for (size_t i = 0; i < p->nr_named; i++)
		add_target_line(&t, &p->named[i]);
}

/*
 * A cache's devices are its own: not the pool's, an origin's or snapshot's,
 * or another cache's.  -EINVAL with why.
 */
static int cache_devices_free(struct parser *p, const struct tfs_cache_cfg *c, char *why,
			      size_t len)
{
	const char *const keys[] = { "origin", "cache", "metadata" };
	const char *const mine[] = { c->origin, c->cache, c->metadata };
	char who[320];

	for (int k = 0; k < 3; k++) {
		bool clash = device_clash(p, mine[k], p->cfg.nr_cow_targets, who, sizeof(who));

		for (unsigned i = 0; !clash && i < p->cfg.nr_caches; i++) {
			const struct tfs_cache_cfg *o = &p->cfg.caches[i];
			const char *const theirs[] = { o->origin, o->cache, o->metadata };

			for (int j = 0; !clash && j < 3; j++) {
				clash = tfs_config_same_device(mine[k], theirs[j]);
				if (clash)
					snprintf(who, sizeof(who), "[cache \"%s\"] %s", o->name, keys[j]);
			}
		}
		if (clash) {
			snprintf(why, len, "%s: %s is already %s", keys[k], mine[k], who);
			return -EINVAL;
		}
	}
	return 0;
}

/* [cache] sections: values checked by cache-config.c, reported here with their lines. */
static void parse_caches(struct parser *p)
{
	char why[512];

	for (size_t i = 0; i < p->nr_named; i++) {
		const struct named_section *ns = &p->named[i];
		struct tfs_cache_cfg *c = &p->cfg.caches[p->cfg.nr_caches];
		int r = 0;

		if (ns->kind != SEC_CACHE)
			continue;
		if (p->cfg.nr_caches == TFS_CACHES_MAX) {
			problem(p, ns->line, -EINVAL, "[cache \"%s\"]: at most %d caches", ns->name,
				TFS_CACHES_MAX);
			return;
		}
		tfs_cache_cfg_defaults(c, ns->name);
		/* Every bad key is reported, in file order. */
		for (unsigned line = ns->line + 1, left = 1; left; line++) {
			left = 0;
			for (int k = 0; cache_keys[k]; k++) {
				int kr;

				left += ns->key_line[k] > line;
				if (ns->key_line[k] != line)
					continue;
				kr = tfs_cache_cfg_set(c, cache_keys[k], ns->value[k], p->base_dir, why,
						       sizeof(why));
				if (kr < 0) {
					problem(p, line, kr, "[cache \"%s\"] %s", ns->name, why);
					r = r ? r : kr;
				}
			}
		}
		if (r == 0 && (r = tfs_cache_cfg_check(c, why, sizeof(why))) < 0)
			problem(p, ns->line, r, "[cache \"%s\"] %s", ns->name, why);
		if (r == 0 && (r = cache_devices_free(p, c, why, sizeof(why))) < 0)
			problem(p, ns->line, r, "[cache \"%s\"] %s", ns->name, why);
		if (r == 0)
			p->cfg.nr_caches++;
	}
}

static void set_defaults(struct tfs_pool_config *c)
{
	memset(c, 0, sizeof(*c));
	c->block_size = 64 * KIB;
	c->low_water_is_percent = true;
	c->low_water_percent = 10;
	c->error_if_no_space = false;
	c->no_space_timeout_ms = 60 * 1000;
	c->discard_passdown = true;
	c->skip_block_zeroing = false;
	c->preallocate_bytes = 32 * MIB;
	c->commit_interval_ms = 1000;
	c->metadata_cache_bytes = 64 * MIB;
	c->host_cache = false;
	c->writeback_cache = true;
	c->max_threads = MAX_THREADS_DEFAULT;
	c->allow_faults = false;
	c->snapshot_low_water = 80;
}

int tfs_config_load(const char *path, struct tfs_pool_config *out)
{
	struct parser *p;
	char *real, *slash;
	int r, ini;

	p = calloc(1, sizeof(*p));
	if (!p) {
		tfs_err("%s: out of memory", path);
		return -ENOMEM;
	}
	p->file = path;
	set_defaults(&p->cfg);

	real = realpath(path, NULL);
	if (!real) {
		r = -errno;
		tfs_err("%s: %s", path, strerror(errno));
		goto out_free;
	}
	if (strlen(real) >= sizeof(p->cfg.path)) {
		r = -ENAMETOOLONG;
		tfs_err("%s: path too long", path);
		goto out_free_real;
	}
	strcpy(p->cfg.path, real);
	strcpy(p->base_dir, real);
	slash = strrchr(p->base_dir, '/');
	if (slash == p->base_dir)
		slash[1] = '\0'; /* the .cfg is in / */
	else if (slash)
		*slash = '\0';

	p->f = fopen(real, "re");
	if (!p->f) {
		r = -errno;
		tfs_err("%s: %s", path, strerror(errno));
		goto out_free_real;
	}
	ini = ini_parse_stream(read_line, p, on_pair, p);
	if (p->read_errno) {
		problem(p, p->lineno + 1, -p->read_errno, "read error: %s",
			strerror(p->read_errno));
	} else if (ini == -2) {
		problem(p, p->lineno, -ENOMEM, "out of memory");
	} else if (ini && !p->nr_errors) {
		/* Our reader mirrors inih; this only catches a rule it missed. */
		problem(p, (unsigned)ini, -EINVAL, "syntax error");
	}
	if (!p->read_errno) {
		finish(p);
		keep_targets(p);
		/* After the origins and snapshots: a cache's devices must be none of theirs. */
		parse_caches(p);
	}

	if (p->nr_errors) {
		r = p->err ? p->err : -EINVAL;
		goto out_close;
	}
	*out = p->cfg;
	r = 0;
out_close:
	fclose(p->f);
out_free_real:
	free(real);
out_free:
	free(p->buf);
	free(p->named);
	free(p);
	return r;
}

/* ---- reload ---- */

static const char *yes_no(bool b)
{
	return b ? "yes" : "no";
}

/* As people write them: "60s", "500ms" (whole seconds as seconds). */
static void format_ms(uint64_t ms, char *out, size_t len)
{
	if (ms % 1000)
		snprintf(out, len, "%llums", (unsigned long long)ms);
	else
		snprintf(out, len, "%llus", (unsigned long long)(ms / 1000));
}

static void format_low_water(const struct tfs_pool_config *c, char *out, size_t len)
{
	if (c->low_water_is_percent)
		snprintf(out, len, "%u%%", c->low_water_percent);
	else
		snprintf(out, len, "%llu blocks", (unsigned long long)c->low_water_blocks);
}

static bool low_water_differs(const struct tfs_pool_config *a, const struct tfs_pool_config *b)
{
	if (a->low_water_is_percent != b->low_water_is_percent)
		return true;
	return a->low_water_is_percent ? a->low_water_percent != b->low_water_percent
				       : a->low_water_blocks != b->low_water_blocks;
}

static int refuse(struct text *why, const char *key, const char *from, const char *to)
{
	text_add(why, "%s: %s -> %s cannot change while mounted", key, from, to);
	return -EINVAL;
}

/* What the pool is: its devices and their layout, which a live pool cannot take back. */
static int identity_change(const struct tfs_pool_config *run, const struct tfs_pool_config *next,
			   struct text *why)
{
	char a[32], b[32];

	if (strcmp(run->metadata, next->metadata))
		return refuse(why, "metadata", run->metadata, next->metadata);
	if (strcmp(run->data, next->data))
		return refuse(why, "data", run->data, next->data);
	if (run->block_size != next->block_size) {
		format_size(run->block_size, a, sizeof(a));
		format_size(next->block_size, b, sizeof(b));
		return refuse(why, "block_size", a, b);
	}
	if (strcmp(run->catalog, next->catalog))
		return refuse(why, "catalog", run->catalog, next->catalog);
	if (run->metadata_cache_bytes != next->metadata_cache_bytes) {
		format_size(run->metadata_cache_bytes, a, sizeof(a));
		format_size(next->metadata_cache_bytes, b, sizeof(b));
		return refuse(why, "metadata_cache", a, b);
	}
	/* The devices are open with or without O_DIRECT: that is fixed until they are reopened. */
	if (run->host_cache != next->host_cache)
		return refuse(why, "host_cache", yes_no(run->host_cache), yes_no(next->host_cache));
	/* The map of preallocated chunks is made at open, for one chunk size. */
	if (run->preallocate_bytes != next->preallocate_bytes) {
		format_size(run->preallocate_bytes, a, sizeof(a));
		format_size(next->preallocate_bytes, b, sizeof(b));
		if (!run->preallocate_bytes)
			strcpy(a, "off");
		if (!next->preallocate_bytes)
			strcpy(b, "off");
		return refuse(why, "preallocate", a, b);
	}
	/* libfuse takes its bound on workers once, when the session loop starts. */
	if (run->max_threads != next->max_threads) {
		snprintf(a, sizeof(a), "%u", run->max_threads);
		snprintf(b, sizeof(b), "%u", next->max_threads);
		return refuse(why, "max_threads", a, b);
	}
	/* The kernel is told at FUSE init, once per mount. */
	if (run->writeback_cache != next->writeback_cache)
		return refuse(why, "writeback_cache", yes_no(run->writeback_cache),
			      yes_no(next->writeback_cache));
	/* Faults are allowed at open only: a reload must not arm them on a live pool. */
	if (run->allow_faults != next->allow_faults)
		return refuse(why, "[fault] allow", yes_no(run->allow_faults),
			      yes_no(next->allow_faults));
	return 0;
}

static void change(struct text *t, const char *key, const char *from, const char *to)
{
	text_add(t, "%s%s: %s -> %s", t->used ? "; " : "", key, from, to);
}

/* The out-of-space policy first: it is what a reload is usually for. */
static void setting_changes(const struct tfs_pool_config *run, const struct tfs_pool_config *next,
			    struct text *t)
{
	char a[48], b[48];

	if (run->error_if_no_space != next->error_if_no_space)
		change(t, "error_if_no_space", yes_no(run->error_if_no_space),
		       yes_no(next->error_if_no_space));
	if (run->no_space_timeout_ms != next->no_space_timeout_ms) {
		format_ms(run->no_space_timeout_ms, a, sizeof(a));
		format_ms(next->no_space_timeout_ms, b, sizeof(b));
		change(t, "no_space_timeout", a, b);
	}
	if (low_water_differs(run, next)) {
		format_low_water(run, a, sizeof(a));
		format_low_water(next, b, sizeof(b));
		change(t, "low_water_mark", a, b);
	}
	if (run->discard_passdown != next->discard_passdown)
		change(t, "discard_passdown", yes_no(run->discard_passdown),
		       yes_no(next->discard_passdown));
	if (run->skip_block_zeroing != next->skip_block_zeroing)
		change(t, "skip_block_zeroing", yes_no(run->skip_block_zeroing),
		       yes_no(next->skip_block_zeroing));
	if (run->detect_zeroes != next->detect_zeroes)
		change(t, "detect_zeroes", run->detect_zeroes ? "unmap" : "off",
		       next->detect_zeroes ? "unmap" : "off");
	if (run->commit_interval_ms != next->commit_interval_ms) {
		format_ms(run->commit_interval_ms, a, sizeof(a));
		format_ms(next->commit_interval_ms, b, sizeof(b));
		change(t, "commit_interval", a, b);
	}
	if (run->snapshot_low_water != next->snapshot_low_water) {
		snprintf(a, sizeof(a), "%u%%", run->snapshot_low_water);
		snprintf(b, sizeof(b), "%u%%", next->snapshot_low_water);
		change(t, "snapshot_low_water", a, b);
	}
	if (strcmp(run->on_event, next->on_event))
		change(t, "on_event", run->on_event[0] ? run->on_event : "none",
		       next->on_event[0] ? next->on_event : "none");
}

/* One line of a `targets` text, split into its header and its keys. */
struct target_line {
	enum section_kind kind;     /* SEC_BAD when the line is not canonical */
	const char *header;         /* `origin "db"` */
	size_t header_len;
	const char *name;
	size_t name_len;
	const char *body;           /* `device=/dev/sdb`, maybe empty */
	size_t body_len;
};

/* Split the line at s, which ends before end; returns where the next one starts. */
static const char *split_target_line(const char *s, const char *end, struct target_line *l)
{
	const char *eol = memchr(s, '\n', (size_t)(end - s));
	const char *q, *close;
	size_t word;

	if (!eol)
		eol = end;
	memset(l, 0, sizeof(*l));
	l->kind = SEC_BAD;
	l->header = l->name = s;
	l->header_len = l->name_len = (size_t)(eol - s);
	l->body = eol;
	q = memchr(s, ' ', (size_t)(eol - s));
	close = q && q + 1 < eol && q[1] == '"' ? memchr(q + 2, '"', (size_t)(eol - q - 2)) : NULL;
	if (close && close + 1 < eol && close[1] == ':') {
		word = (size_t)(q - s);
		for (enum section_kind k = SEC_ORIGIN; k <= SEC_CACHE; k++)
			if (word == strlen(section_word[k]) && !strncmp(s, section_word[k], word))
				l->kind = k;
		l->header_len = (size_t)(close + 1 - s);
		l->name = q + 2;
		l->name_len = (size_t)(close - l->name);
		l->body = close + 2 + (close + 2 < eol && close[2] == ' ');
	}
	l->body_len = (size_t)(eol - l->body);
	return eol < end ? eol + 1 : end;
}

static int cmp_target_lines(const struct target_line *a, const struct target_line *b)
{
	return section_order(a->kind, a->name, a->name_len, b->kind, b->name, b->name_len);
}

static void add_body(struct text *t, const struct target_line *l)
{
	if (l->body_len)
		text_add(t, "%.*s", (int)l->body_len, l->body);
	else
		text_add(t, "(no keys)");
}

static void section_change(struct text *t, const struct target_line *run,
			   const struct target_line *next)
{
	const struct target_line *l = run ? run : next;

	text_add(t, "%s[%.*s] ", t->used ? "; " : "", (int)l->header_len, l->header);
	if (!run)
		text_add(t, "added");
	else if (!next)
		text_add(t, "removed");
	else {
		text_add(t, "changed: ");
		add_body(t, run);
		text_add(t, " -> ");
		add_body(t, next);
	}
}

/* Both texts are sorted the same way: one merge walk finds what was added, removed or changed. */
static void section_changes(const struct tfs_pool_config *run, const struct tfs_pool_config *next,
			    struct text *t)
{
	const char *r = run->targets, *r_end = r + strnlen(r, sizeof(run->targets));
	const char *n = next->targets, *n_end = n + strnlen(n, sizeof(next->targets));
	struct target_line rl, nl;
	const char *r_next, *n_next;
	int c;

	while (r < r_end || n < n_end) {
		r_next = r < r_end ? split_target_line(r, r_end, &rl) : r;
		n_next = n < n_end ? split_target_line(n, n_end, &nl) : n;
		c = r >= r_end ? 1 : n >= n_end ? -1 : cmp_target_lines(&rl, &nl);
		if (c < 0) {
			section_change(t, &rl, NULL);
			r = r_next;
		} else if (c > 0) {
			section_change(t, NULL, &nl);
			n = n_next;
		} else {
			if (rl.body_len != nl.body_len || memcmp(rl.body, nl.body, rl.body_len))
				section_change(t, &rl, &nl);
			r = r_next;
			n = n_next;
		}
	}
}

int tfs_config_reload_diff(const struct tfs_pool_config *run, const struct tfs_pool_config *next,
			   char *why, size_t why_len, char *changes, size_t changes_len)
{
	struct text w, ch;
	int r;

	text_init(&w, why, why_len);
	text_init(&ch, changes, changes_len);
	r = identity_change(run, next, &w);
	if (r)
		goto out;
	setting_changes(run, next, &ch);
	section_changes(run, next, &ch);
out:
	text_finish(&w);
	text_finish(&ch);
	return r;
}
