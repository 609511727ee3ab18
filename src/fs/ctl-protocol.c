/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "ctl-protocol.h"

#include <errno.h>
#include <json-c/json.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int tfs_ctl_parse_request(const char *line, struct tfs_ctl_request *req, char *why,
			  size_t why_len)
{
	struct json_object *jcmd, *jargs = NULL;
	size_t nargs = 0;
	const char *msg = "bad request: expected {\"cmd\": \"...\", \"args\": [...]}";
	int r = -EINVAL;

	*req = (struct tfs_ctl_request){ 0 };
	req->json = json_tokener_parse(line);
	if (!req->json || !json_object_is_type(req->json, json_type_object) ||
	    !json_object_object_get_ex(req->json, "cmd", &jcmd) ||
	    !json_object_is_type(jcmd, json_type_string))
		goto out_fail;
	msg = "bad request: args must be an array of strings";
	if (json_object_object_get_ex(req->json, "args", &jargs)) {
		if (!json_object_is_type(jargs, json_type_array))
			goto out_fail;
		nargs = json_object_array_length(jargs);
		if (nargs > TFS_CTL_MAX_ARGS) {
			snprintf(why, why_len, "too many arguments: %zu (at most %d)", nargs,
				 TFS_CTL_MAX_ARGS);
			msg = NULL;
			goto out_fail;
		}
	}
	req->argv = calloc(nargs + 2, sizeof(*req->argv));
	if (!req->argv) {
		msg = "out of memory";
		r = -ENOMEM;
		goto out_fail;
	}
	req->argv[0] = json_object_get_string(jcmd);
	for (size_t i = 0; i < nargs; i++) {
		struct json_object *a = json_object_array_get_idx(jargs, i);

		if (!json_object_is_type(a, json_type_string))
			goto out_fail;
		req->argv[i + 1] = json_object_get_string(a);
	}
	req->argc = (int)nargs + 1;
	return 0;

out_fail:
	if (msg)
		snprintf(why, why_len, "%s", msg);
	tfs_ctl_request_free(req);
	return r;
}

void tfs_ctl_request_free(struct tfs_ctl_request *req)
{
	free(req->argv);
	json_object_put(req->json);
	*req = (struct tfs_ctl_request){ 0 };
}

int tfs_ctl_id_parse(const char *s, uint8_t id[16])
{
	if (!s || strlen(s) != 32)
		return -EINVAL;
	for (int i = 0; i < 32; i++) {
		char c = s[i];
		int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
			c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;

		if (v < 0)
			return -EINVAL;
		id[i / 2] = (uint8_t)(i % 2 ? (id[i / 2] << 4) | v : v);
	}
	return 0;
}

void tfs_ctl_id_format(const uint8_t id[16], char out[TFS_CTL_ID_HEX])
{
	for (int i = 0; i < 16; i++)
		snprintf(out + 2 * i, 3, "%02x", id[i]);
}
