/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "record-sink.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static struct record_sink *rec_of(struct tfs_status_sink *s)
{
	return (struct record_sink *)s;
}

static void add(struct tfs_status_sink *s, const char *key, const char *value)
{
	struct record_sink *r = rec_of(s);
	size_t n = strlen(r->line);

	snprintf(r->line + n, sizeof(r->line) - n, "%s%s=%s ", r->prefix, key, value);
}

static void rec_u64(struct tfs_status_sink *s, const char *key, uint64_t v)
{
	char text[24];

	snprintf(text, sizeof(text), "%" PRIu64, v);
	add(s, key, text);
}

static void rec_flag(struct tfs_status_sink *s, const char *key, bool v)
{
	add(s, key, v ? "true" : "false");
}

static void rec_text(struct tfs_status_sink *s, const char *key, const char *v)
{
	add(s, key, v ? v : "null");
}

static void rec_texts(struct tfs_status_sink *s, const char *key, const char *const *v, size_t n)
{
	char list[256] = "";

	for (size_t i = 0; i < n; i++) {
		size_t used = strlen(list);

		snprintf(list + used, sizeof(list) - used, "%s%s", i ? "," : "", v[i]);
	}
	add(s, key, list);
}

static void rec_begin(struct tfs_status_sink *s, const char *key)
{
	struct record_sink *r = rec_of(s);
	size_t n = strlen(r->prefix);

	snprintf(r->prefix + n, sizeof(r->prefix) - n, "%s.", key);
}

static void rec_end(struct tfs_status_sink *s)
{
	struct record_sink *r = rec_of(s);
	char *dot = strrchr(r->prefix, '.');

	if (!dot)
		return;
	*dot = '\0';
	dot = strrchr(r->prefix, '.');
	if (dot)
		dot[1] = '\0';
	else
		r->prefix[0] = '\0';
}

static const struct tfs_status_sink_ops record_ops = {
	.u64 = rec_u64,
	.flag = rec_flag,
	.text = rec_text,
	.texts = rec_texts,
	.begin = rec_begin,
	.end = rec_end,
};

void record_sink_init(struct record_sink *r)
{
	memset(r, 0, sizeof(*r));
	r->sink.ops = &record_ops;
}

const char *record_sink_line(const struct record_sink *r)
{
	return r->line;
}
