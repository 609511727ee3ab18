/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * restore.h - `thinfs restore`: thin_dump XML -> thin-pool metadata.
 *
 * Owns: parsing the XML (expat) and replaying it through the thin-metadata
 * API, so a restored pool is built by the same code the daemon runs.
 * Never: writes anything before the whole document has parsed cleanly.
 */
#ifndef TFS_TOOLS_RESTORE_H
#define TFS_TOOLS_RESTORE_H

int tfs_cmd_restore(int argc, char **argv);

#endif
