/* SPDX-License-Identifier: GPL-2.0-or-later */
/* placeholder while the module is written */
typedef int tfs_placeholder_ctl_server;
