/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "ctl-protocol.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t fnv1a64(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (; *s; s++) {
		h ^= (unsigned char)*s;
		h *= 0x100000001b3ull;
	}
	return h;
}

int tfs_ctl_socket_path(const char *mountpoint, char *out, size_t out_len)
{
	char canon[PATH_MAX];
	int n;

	if (!realpath(mountpoint, canon))
		return -errno;
	n = snprintf(out, out_len, "%s/%016llx.sock", TFS_CTL_DIR,
		     (unsigned long long)fnv1a64(canon));
	return n < 0 || (size_t)n >= out_len ? -ENAMETOOLONG : 0;
}
