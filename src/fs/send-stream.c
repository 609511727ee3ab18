/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-stream.c - the send stream's bytes (send-stream.h).
 */
#include "send-stream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"

static int add_chunk(struct tfs_stream_chunks *c, uint64_t off, uint64_t len, uint64_t dev,
		     bool zero)
{
	if (c->nr == c->cap) {
		size_t cap = c->cap ? 2 * c->cap : 256;
		struct tfs_stream_chunk *v = realloc(c->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		c->v = v;
		c->cap = cap;
	}
	c->v[c->nr++] = (struct tfs_stream_chunk){ .off = off, .len = len, .dev = dev,
						   .zero = zero };
	return 0;
}

int tfs_stream_add_extent(struct tfs_stream_chunks *c, uint64_t off, uint64_t len, bool zero,
			  uint64_t size)
{
	if (off >= size)
		return 0;
	if (len > size - off)
		len = size - off;
	if (zero)
		return add_chunk(c, off, len, 0, true);
	return tfs_stream_add_data(c, off, len, 0);
}

int tfs_stream_add_data(struct tfs_stream_chunks *c, uint64_t off, uint64_t len, uint64_t dev)
{
	c->data += len;
	for (uint64_t at = off; at < off + len;) {
		uint64_t n = off + len - at < TFS_STREAM_CHUNK ? off + len - at : TFS_STREAM_CHUNK;
		int r = add_chunk(c, at, n, dev, false);

		if (r)
			return r;
		at += n;
		if (dev != UINT64_MAX)
			dev += n;
	}
	return 0;
}

void tfs_stream_chunks_free(struct tfs_stream_chunks *c)
{
	free(c->v);
	*c = (struct tfs_stream_chunks){ 0 };
}

void tfs_stream_header(uint8_t h[TFS_STREAM_HEADER_SIZE], uint32_t version, uint64_t size,
		       uint32_t block_size, const uint8_t *from, const uint8_t to[16],
		       uint64_t data)
{
	memset(h, 0, TFS_STREAM_HEADER_SIZE);
	memcpy(h + TFS_SH_MAGIC, TFS_STREAM_MAGIC, 8);
	tfs_stream_put32(h + TFS_SH_VERSION, version);
	tfs_stream_put32(h + TFS_SH_LENGTH, TFS_STREAM_HEADER_SIZE);
	tfs_stream_put64(h + TFS_SH_SIZE, size);
	tfs_stream_put32(h + TFS_SH_BLOCK, block_size);
	if (from) {
		tfs_stream_put32(h + TFS_SH_FLAGS, TFS_STREAM_INCREMENTAL);
		memcpy(h + TFS_SH_FROM, from, 16);
	}
	memcpy(h + TFS_SH_TO, to, 16);
	tfs_stream_put64(h + TFS_SH_DATA, data);
	tfs_stream_put32(h + TFS_SH_CRC, tfs_crc32c(0xFFFFFFFFu, h, TFS_SH_CRC));
}

void tfs_stream_out_init(struct tfs_stream_out *o, int (*write)(void *, const void *, size_t),
			 void *ctx)
{
	*o = (struct tfs_stream_out){ .write = write, .ctx = ctx, .crc = 0xFFFFFFFFu };
}

int tfs_stream_put(struct tfs_stream_out *o, const void *buf, size_t len)
{
	o->crc = tfs_crc32c(o->crc, buf, len);
	o->bytes += len;
	return o->write(o->ctx, buf, len);
}

static int put_record(struct tfs_stream_out *o, uint32_t type, uint64_t off, uint64_t len)
{
	uint8_t h[TFS_STREAM_RECORD_SIZE] = { 0 };

	tfs_stream_put32(h + TFS_SR_TYPE, type);
	tfs_stream_put64(h + TFS_SR_OFFSET, off);
	tfs_stream_put64(h + TFS_SR_LENGTH, len);
	return tfs_stream_put(o, h, sizeof(h));
}

static bool all_zero(const uint8_t *p, size_t n)
{
	static const uint8_t z[4096];

	for (; n >= sizeof(z); p += sizeof(z), n -= sizeof(z))
		if (memcmp(p, z, sizeof(z)))
			return false;
	return !n || !memcmp(p, z, n);
}

int tfs_stream_put_chunk(struct tfs_stream_out *o, const struct tfs_stream_chunk *c,
			 const uint8_t *buf)
{
	int r;

	o->records++;
	if (c->zero || all_zero(buf, (size_t)c->len))
		return put_record(o, TFS_REC_ZERO, c->off, c->len);
	r = put_record(o, TFS_REC_DATA, c->off, c->len);
	if (!r)
		r = tfs_stream_put(o, buf, (size_t)c->len);
	if (!r)
		o->sent += c->len;
	return r;
}

int tfs_stream_finish(struct tfs_stream_out *o)
{
	uint8_t tail[4];
	int r = put_record(o, TFS_REC_END, o->sent, o->records);

	if (r)
		return r;
	tfs_stream_put32(tail, o->crc);
	return tfs_stream_put(o, tail, sizeof(tail));
}

int tfs_stream_ranges_add(struct tfs_stream_ranges *r, uint64_t off, uint64_t len, uint64_t at)
{
	struct tfs_stream_range *last = r->nr ? &r->v[r->nr - 1] : NULL;

	if (!len)
		return 0;
	if (last && last->end == off) {
		last->end = off + len;
		return 0;
	}
	if (r->nr == r->cap) {
		size_t cap = r->cap ? 2 * r->cap : 256;
		struct tfs_stream_range *v = realloc(r->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		r->v = v;
		r->cap = cap;
	}
	r->v[r->nr++] = (struct tfs_stream_range){ off, off + len, at };
	return 0;
}

static int by_off(const void *a, const void *b)
{
	const struct tfs_stream_range *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

int tfs_stream_ranges_check(struct tfs_stream_ranges *r, uint64_t *at, uint64_t *vol_off)
{
	if (r->nr > 1) /* a stream of no records has no array to sort */
		qsort(r->v, r->nr, sizeof(*r->v), by_off);
	for (size_t i = 1; i < r->nr; i++) {
		if (r->v[i].off < r->v[i - 1].end) {
			/*
			 * An entry is records that came one after the other, so one
			 * of the two came wholly after the other: the overlap is there.
			 */
			*at = r->v[i].at > r->v[i - 1].at ? r->v[i].at : r->v[i - 1].at;
			*vol_off = r->v[i].off;
			return -EEXIST;
		}
	}
	return 0;
}

void tfs_stream_ranges_free(struct tfs_stream_ranges *r)
{
	free(r->v);
	*r = (struct tfs_stream_ranges){ 0 };
}
