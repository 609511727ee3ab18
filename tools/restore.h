/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * restore.h - `thinfs restore`: build thin-pool metadata from thin_dump XML
 * through the thin-metadata API (written by the lead; restore.c holds a
 * placeholder until then).
 */
#ifndef TFS_TOOLS_RESTORE_H
#define TFS_TOOLS_RESTORE_H

/* `thinfs restore -i XML -o METADATA`; exit 0 on success. */
int tfs_cmd_restore(int argc, char **argv);

#endif
