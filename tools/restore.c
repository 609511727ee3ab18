/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Placeholder so that the tool links; the real restore replaces this file. */
#include "restore.h"

#include <stdio.h>

int tfs_cmd_restore(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	fprintf(stderr, "restore: not implemented yet\n");
	return 1;
}
