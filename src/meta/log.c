/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>

/*
 * The sink is process-wide on purpose: it is set once by main() (daemon or
 * tool) before any pool is opened and never changed while threads run.
 */
static struct {
	tfs_log_sink sink;
	void *ctx;
	enum tfs_log_level max_level;
} log_cfg = { NULL, NULL, TFS_LOG_INFO };

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
	if (log_cfg.sink) {
		log_cfg.sink(log_cfg.ctx, level, msg);
		return;
	}
	fprintf(stderr, "thinfs: %s%s\n",
		level == TFS_LOG_ERR ? "error: " : level == TFS_LOG_WARN ? "warning: " : "", msg);
}
