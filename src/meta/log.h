/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * log.h - the one place messages leave the library.
 *
 * Owns: severity levels and the sink the daemon or a tool installs.  Errors
 * are logged once, by the code that knows most about them (usually the layer
 * that found the corruption or the failed I/O), then passed up as -errno.
 *
 * Never: decides policy.  Logging is not error handling.
 */
#ifndef TFS_META_LOG_H
#define TFS_META_LOG_H

#include <stddef.h>

enum tfs_log_level { TFS_LOG_ERR = 3, TFS_LOG_WARN = 4, TFS_LOG_INFO = 6, TFS_LOG_DEBUG = 7 };

typedef void (*tfs_log_sink)(void *ctx, enum tfs_log_level level, const char *msg);

/* Install a sink (NULL restores stderr) and the most verbose level shown. */
void tfs_log_set_sink(tfs_log_sink sink, void *ctx);
void tfs_log_set_level(enum tfs_log_level max_level);

/*
 * Errors and warnings the calling thread logs from now on go to buf
 * instead of the sink (newline-separated, truncated to len): the caller
 * answers them to whoever asked and logs what it decides.  len 0 stops.
 */
void tfs_log_capture(char *buf, size_t len);

void tfs_log(enum tfs_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define tfs_err(...) tfs_log(TFS_LOG_ERR, __VA_ARGS__)
#define tfs_warn(...) tfs_log(TFS_LOG_WARN, __VA_ARGS__)
#define tfs_info(...) tfs_log(TFS_LOG_INFO, __VA_ARGS__)
#define tfs_debug(...) tfs_log(TFS_LOG_DEBUG, __VA_ARGS__)

#endif
