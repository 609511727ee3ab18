/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * send-stream.h - the send stream's bytes (docs/send-receive.md, "The
 * stream, version 1" and "version 2"), shared by the two writers of a stream, the daemon
 * (send-data.c) and thinfs-ctl's path through the mount
 * (tools/send-recv.c), and by receive's reader: one encoder, so that both
 * writers give the same bytes for the same snapshots.
 *
 * Owns: the layout (field offsets as in the document), how a diff's
 * extents become records (data cut into pieces of at most
 * TFS_STREAM_CHUNK from each extent's start, a piece of zeros sent as
 * ZERO), the running checksum and the END record and trailer, and the
 * reader's check that version 2's records, which come in any order, do
 * not overlap.
 *
 * Never: reads volume data or talks to the daemon; the writer's callback
 * moves the bytes.  Logs nothing; errors are -errno.
 */
#ifndef TFS_FS_SEND_STREAM_H
#define TFS_FS_SEND_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TFS_STREAM_MAGIC "THINSEND"
/* What send writes unless asked for the older one; a reader takes both. */
#define TFS_STREAM_VERSION 2u
#define TFS_STREAM_VERSION_OLDEST 1u
/* "1" or "2" (a --stream-version argument): that version; anything else 0. */
static inline unsigned tfs_stream_version_parse(const char *s)
{
	return (s[0] == '1' || s[0] == '2') && !s[1] ? (unsigned)(s[0] - '0') : 0;
}
#define TFS_STREAM_HEADER_SIZE 96u
#define TFS_STREAM_RECORD_SIZE 24u
/* A DATA record carries at most this many bytes, so a reader's buffer is bounded. */
#define TFS_STREAM_CHUNK (1u << 20)

enum tfs_stream_record { TFS_REC_DATA = 1, TFS_REC_ZERO = 2, TFS_REC_END = 3 };

/* Header flags. */
#define TFS_STREAM_INCREMENTAL 1u

/* Header field offsets. */
enum {
	TFS_SH_MAGIC = 0, TFS_SH_VERSION = 8, TFS_SH_LENGTH = 12, TFS_SH_SIZE = 16,
	TFS_SH_BLOCK = 24, TFS_SH_FLAGS = 28, TFS_SH_FROM = 32, TFS_SH_TO = 48,
	TFS_SH_DATA = 64, TFS_SH_CRC = 92,
};
/* Record header offsets. */
enum { TFS_SR_TYPE = 0, TFS_SR_OFFSET = 8, TFS_SR_LENGTH = 16 };

static inline void tfs_stream_put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline void tfs_stream_put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t tfs_stream_get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t tfs_stream_get64(const uint8_t *p)
{
	return (uint64_t)tfs_stream_get32(p) | (uint64_t)tfs_stream_get32(p + 4) << 32;
}

/*
 * One record to be: a piece of data (at most TFS_STREAM_CHUNK) or a zero
 * range; dev is where the daemon found the data on its data device (its
 * order in a version 2 stream), 0 where nobody looked.
 */
struct tfs_stream_chunk {
	uint64_t off, len;
	uint64_t dev;
	bool zero;
};

struct tfs_stream_chunks {
	struct tfs_stream_chunk *v;
	size_t nr, cap;
	uint64_t data; /* bytes of data extents: the header's "changed data" */
};

/*
 * One extent of the diff (bytes, ascending), cut to the volume's size:
 * a zero range as one chunk, data in pieces of at most TFS_STREAM_CHUNK
 * from the extent's start.  Amortised O(1) per chunk; -ENOMEM.
 */
int tfs_stream_add_extent(struct tfs_stream_chunks *c, uint64_t off, uint64_t len, bool zero,
			  uint64_t size);
/*
 * Data at [off, off + len) (in the volume's size) lying from dev on the
 * data device, as pieces of at most TFS_STREAM_CHUNK from off (dev
 * UINT64_MAX: nowhere, and it stays so).  -ENOMEM.
 */
int tfs_stream_add_data(struct tfs_stream_chunks *c, uint64_t off, uint64_t len, uint64_t dev);
void tfs_stream_chunks_free(struct tfs_stream_chunks *c);

/* The header of a stream of version 1 or 2; from NULL for a full stream. */
void tfs_stream_header(uint8_t h[TFS_STREAM_HEADER_SIZE], uint32_t version, uint64_t size,
		       uint32_t block_size, const uint8_t *from, const uint8_t to[16],
		       uint64_t data);

/*
 * A stream being written: write(ctx, buf, len) moves every byte (0 or
 * -errno, which the put calls return as it is).
 */
struct tfs_stream_out {
	int (*write)(void *ctx, const void *buf, size_t len);
	void *ctx;
	uint32_t crc;     /* of every byte so far */
	uint64_t bytes;   /* written so far */
	uint64_t sent;    /* bytes carried by DATA records */
	uint64_t records; /* DATA and ZERO records */
};

void tfs_stream_out_init(struct tfs_stream_out *o, int (*write)(void *, const void *, size_t),
			 void *ctx);
int tfs_stream_put(struct tfs_stream_out *o, const void *buf, size_t len);
/*
 * The chunk's record: ZERO for a zero range or a piece that is all zeros
 * (buf may be NULL for a zero range), DATA with buf's len bytes otherwise.
 */
int tfs_stream_put_chunk(struct tfs_stream_out *o, const struct tfs_stream_chunk *c,
			 const uint8_t *buf);
/* END and the trailer: the stream is whole. */
int tfs_stream_finish(struct tfs_stream_out *o);

/*
 * The ranges a reader has applied, to find two records that overlap
 * (version 2 allows any order, never an overlap).  add: a record at byte
 * at of the stream; one that starts where the last ended extends it, so a
 * stream in volume order costs one entry in all, one in device order an
 * entry (24 bytes) per record that does not follow on.  -ENOMEM.  check:
 * sorts them; 0, or -EEXIST, *vol_off a volume byte written twice and *at
 * the stream byte of the record from which on (it or one following on
 * from it) the stream overlaps what came before.
 */
struct tfs_stream_range {
	uint64_t off, end, at;
};
struct tfs_stream_ranges {
	struct tfs_stream_range *v;
	size_t nr, cap;
};
int tfs_stream_ranges_add(struct tfs_stream_ranges *r, uint64_t off, uint64_t len, uint64_t at);
int tfs_stream_ranges_check(struct tfs_stream_ranges *r, uint64_t *at, uint64_t *vol_off);
void tfs_stream_ranges_free(struct tfs_stream_ranges *r);

#endif
