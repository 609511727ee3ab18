/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/*
 * The sink is process-wide on purpose: it is set once by main() (daemon or
 * tool) before any pool is opened and never changed while threads run.
 */
static struct {
	tfs_log_sink sink;
	void *ctx;
	enum tfs_log_level max_level;
} log_cfg = { NULL, NULL, TFS_LOG_INFO };

/*
 * Per thread: a control command that parses a file for a client hands the
 * client the same errors the log gets, without a second reporting path.
 */
static _Thread_local struct {
	char *buf;
	size_t len;
} capture;

void tfs_log_capture(char *buf, size_t len)
{
	capture.buf = len ? buf : NULL;
	capture.len = len;
	if (capture.buf)
		capture.buf[0] = '\0';
}

/* True when msg went to the capture buffer instead of the sink. */
static int capture_append(enum tfs_log_level level, const char *msg)
{
	size_t used;

	if (!capture.buf || level > TFS_LOG_WARN)
		return 0;
	used = strlen(capture.buf);
	if (used + 1 < capture.len)
		snprintf(capture.buf + used, capture.len - used, "%s%s", used ? "\n" : "", msg);
	return 1;
}

void tfs_log_set_sink(tfs_log_sink sink, void *ctx)
{
	log_cfg.sink = sink;
	log_cfg.ctx = ctx;
}

void tfs_log_set_level(enum tfs_log_level max_level)
{
	log_cfg.max_level = max_level;
}

void tfs_log(enum tfs_log_level level, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (level > log_cfg.max_level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (capture_append(level, msg))
		return;
	if (log_cfg.sink) {
		log_cfg.sink(log_cfg.ctx, level, msg);
		return;
	}
	fprintf(stderr, "thinfs: %s%s\n",
		level == TFS_LOG_ERR ? "error: " : level == TFS_LOG_WARN ? "warning: " : "", msg);
}
