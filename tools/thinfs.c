/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thinfs - offline tools for thin-pool metadata: check, dump, restore.
 * Each subcommand parses its own options; main only dispatches.
 */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "daemon.h"
#include "diff.h"
#include "dump.h"
#include "restore.h"

struct command {
	const char *name;
	int (*run)(int argc, char **argv);
	const char *summary;
};

static const struct command commands[] = {
	{ "check", tfs_cmd_check, "check metadata offline (METADATA or POOL.cfg)" },
	{ "dump", tfs_cmd_dump, "print metadata as thin_dump XML" },
	{ "restore", tfs_cmd_restore, "write metadata from thin_dump XML" },
	{ "diff", tfs_cmd_diff, "changed extents between two thin devices (offline)" },
	{ "mkpool", tfs_cmd_mkpool, "format a pool's metadata and create its catalog" },
	{ "mount", tfs_cmd_mount, "start the daemon: mount a pool's volumes as files" },
};

static void usage(FILE *f)
{
	fputs("Usage: thinfs COMMAND [options] ...\n\nCommands:\n", f);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].summary);
	fputs("\n'thinfs COMMAND --help' describes a command's options.\n", f);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version")) {
		printf("thinfs %s\n", THINFS_VERSION);
		return 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[1], commands[i].name))
			return commands[i].run(argc - 1, argv + 1);
	fprintf(stderr, "thinfs: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
