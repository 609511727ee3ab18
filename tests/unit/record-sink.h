/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * record-sink.h - a status sink (target.h) for unit tests that records
 * what a device reports as one line of text, "key=value key.sub=value",
 * so a test compares it with a string.
 *
 * Never: allocates; a line longer than the buffer is cut off.
 */
#ifndef TFS_TEST_RECORD_SINK_H
#define TFS_TEST_RECORD_SINK_H

#include <stddef.h>

#include "target.h"

struct record_sink {
	struct tfs_status_sink sink;
	char line[1024];
	char prefix[256];
};

void record_sink_init(struct record_sink *r);
/* The fields reported so far, each followed by one space. */
const char *record_sink_line(const struct record_sink *r);

#endif
