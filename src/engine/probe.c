/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * probe.c - signatures on a device before mkpool overwrites it (probe.h).
 */
#include "probe.h"

#include <blkid.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "format.h"

static const char *lookup(blkid_probe pr, const char *name)
{
	const char *v = NULL;

	if (blkid_probe_lookup_value(pr, name, &v, NULL))
		return NULL;
	return v && v[0] ? v : NULL;
}

/* libblkid's USAGE values, in words for an error message. */
static const char *usage_words(const char *usage)
{
	if (!usage || !strcmp(usage, "filesystem"))
		return "filesystem";
	if (!strcmp(usage, "raid"))
		return "RAID or volume manager member";
	if (!strcmp(usage, "crypto"))
		return "encrypted volume";
	return "signature";
}

static void append(char *buf, size_t len, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void append(char *buf, size_t len, const char *fmt, ...)
{
	size_t used = strnlen(buf, len);
	va_list ap;

	if (used + 1 >= len)
		return;
	va_start(ap, fmt);
	vsnprintf(buf + used, len - used, fmt, ap);
	va_end(ap);
}

static void describe(blkid_probe pr, char *what, size_t what_len)
{
	const char *pttype = lookup(pr, "PTTYPE");
	const char *type = lookup(pr, "TYPE");
	const char *uuid = lookup(pr, "UUID");
	const char *label = lookup(pr, "LABEL");

	if (pttype)
		append(what, what_len, "%s partition table", pttype);
	if (type) {
		append(what, what_len, "%s%s %s", pttype ? " and " : "", type,
		       usage_words(lookup(pr, "USAGE")));
		if (uuid && label)
			append(what, what_len, " (UUID=%s, LABEL=%s)", uuid, label);
		else if (uuid || label)
			append(what, what_len, " (%s=%s)", uuid ? "UUID" : "LABEL", uuid ? uuid : label);
	}
	if (!pttype && !type)
		append(what, what_len, "an unnamed signature");
}

int tfs_probe_signature(const char *path, char *what, size_t what_len)
{
	blkid_probe pr;
	int r;

	if (what_len)
		what[0] = '\0';
	errno = 0;
	pr = blkid_new_probe_from_filename(path);
	if (!pr)
		return errno ? -errno : -EIO;
	if (blkid_probe_enable_superblocks(pr, 1) ||
	    blkid_probe_set_superblocks_flags(pr, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE |
							  BLKID_SUBLKS_UUID | BLKID_SUBLKS_LABEL) ||
	    blkid_probe_enable_partitions(pr, 1) ||
	    blkid_probe_set_partitions_flags(pr, BLKID_PARTS_MAGIC)) {
		r = -ENOMEM;
		goto out_free;
	}
	errno = 0;
	r = blkid_do_safeprobe(pr);
	switch (r) {
	case 0:
		describe(pr, what, what_len);
		r = 1;
		break;
	case 1:
		r = 0;
		break;
	case -2:
		/* Safe probing refuses to pick one: there is certainly something there. */
		if (what_len)
			snprintf(what, what_len, "several signatures");
		r = 1;
		break;
	default:
		r = errno ? -errno : -EIO;
		break;
	}
out_free:
	blkid_free_probe(pr);
	return r;
}

int tfs_probe_thin_metadata(const char *path)
{
	struct tfs_disk_thin_sb sb;
	ssize_t n;
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = pread(fd, &sb, sizeof(sb), 0);
	if (n < 0)
		r = -errno;
	else if ((size_t)n < sizeof(sb))
		r = 0;
	else
		r = tfs_le64(&sb.magic) == TFS_THIN_MAGIC;
	close(fd);
	return r;
}
