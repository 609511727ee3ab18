/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libFuzzer target: the control socket's request parser
 * (src/fs/ctl-protocol.c), fed any line a client could send.  It must
 * return (never crash, hang or leak); a request it accepts must have a
 * command, argc strings and a NULL after them, and must survive a round
 * trip through the encoding thinfs-ctl uses (a JSON object with "cmd" and
 * "args", printed plain) unchanged.
 */
#include <json-c/json.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ctl-protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* As thinfs-ctl builds a request: {"cmd": argv[0], "args": [argv[1], ...]}. */
static char *encode(const struct tfs_ctl_request *req)
{
	struct json_object *obj = json_object_new_object(), *args = json_object_new_array();
	char *line;

	if (!obj || !args)
		abort();
	json_object_object_add(obj, "cmd", json_object_new_string(req->argv[0]));
	for (int i = 1; i < req->argc; i++)
		json_object_array_add(args, json_object_new_string(req->argv[i]));
	json_object_object_add(obj, "args", args);
	line = strdup(json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN));
	json_object_put(obj);
	if (!line)
		abort();
	return line;
}

static void check_round_trip(const struct tfs_ctl_request *req)
{
	struct tfs_ctl_request again;
	char why[256];
	char *line = encode(req);

	if (tfs_ctl_parse_request(line, &again, why, sizeof(why)) < 0 || again.argc != req->argc)
		abort();
	for (int i = 0; i < req->argc; i++)
		if (strcmp(again.argv[i], req->argv[i]))
			abort();
	tfs_ctl_request_free(&again);
	free(line);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct tfs_ctl_request req;
	char why[256] = "";
	char *line = malloc(size + 1);

	if (!line)
		return 0;
	memcpy(line, data, size);
	line[size] = '\0';
	if (tfs_ctl_parse_request(line, &req, why, sizeof(why)) < 0) {
		if (!*why || strchr(why, '\n') || req.json || req.argv)
			abort();
	} else {
		if (req.argc < 1 || !req.argv || req.argv[req.argc] || *why)
			abort();
		for (int i = 0; i < req.argc; i++)
			if (!req.argv[i])
				abort();
		check_round_trip(&req);
		tfs_ctl_request_free(&req);
	}
	free(line);
	return 0;
}
