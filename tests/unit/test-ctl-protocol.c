/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The control socket's request parser: a request gives argv (command
 * first, NULL after the last argument); anything else is refused with one
 * line for the client and leaves nothing to free.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ctl-protocol.h"

static void test_request_gives_command_then_arguments(void **state)
{
	struct tfs_ctl_request req;
	char why[128] = "";

	(void)state;
	assert_int_equal(tfs_ctl_parse_request("{\"cmd\": \"status\", \"args\": [\"--json\"]}\n",
					       &req, why, sizeof(why)), 0);
	assert_string_equal(why, "");
	assert_int_equal(req.argc, 2);
	assert_string_equal(req.argv[0], "status");
	assert_string_equal(req.argv[1], "--json");
	assert_null(req.argv[2]);
	tfs_ctl_request_free(&req);
}

static void test_request_without_args_is_the_command_alone(void **state)
{
	struct tfs_ctl_request req;
	char why[128];

	(void)state;
	assert_int_equal(tfs_ctl_parse_request("{\"cmd\":\"list\"}", &req, why, sizeof(why)), 0);
	assert_int_equal(req.argc, 1);
	assert_string_equal(req.argv[0], "list");
	assert_null(req.argv[1]);
	tfs_ctl_request_free(&req);
}

static void test_malformed_requests_are_refused_with_one_line(void **state)
{
	static const struct {
		const char *line;
		const char *why;
	} cases[] = {
		{ "", "bad request: expected" },
		{ "not json", "bad request: expected" },
		{ "[\"status\"]", "bad request: expected" },
		{ "{\"args\": []}", "bad request: expected" },
		{ "{\"cmd\": 7}", "bad request: expected" },
		{ "{\"cmd\": \"status\", \"args\": \"--json\"}", "bad request: args must be" },
		{ "{\"cmd\": \"resize\", \"args\": [\"data\", 1]}", "bad request: args must be" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct tfs_ctl_request req;
		char why[128] = "";

		assert_int_equal(tfs_ctl_parse_request(cases[i].line, &req, why, sizeof(why)),
				 -EINVAL);
		assert_non_null(strstr(why, cases[i].why));
		assert_null(strchr(why, '\n'));
		assert_null(req.json);
		assert_null(req.argv);
		tfs_ctl_request_free(&req); /* an empty request is fine */
	}
}

static void test_too_many_arguments_are_refused_naming_the_limit(void **state)
{
	struct tfs_ctl_request req;
	char why[128] = "";
	size_t len = 32 + 5 * (TFS_CTL_MAX_ARGS + 1);
	char *line = malloc(len);
	size_t n;

	(void)state;
	assert_non_null(line);
	n = (size_t)snprintf(line, len, "{\"cmd\": \"resume\", \"args\": [");
	for (int i = 0; i <= TFS_CTL_MAX_ARGS; i++)
		n += (size_t)snprintf(line + n, len - n, "%s\"a\"", i ? "," : "");
	snprintf(line + n, len - n, "]}");
	assert_int_equal(tfs_ctl_parse_request(line, &req, why, sizeof(why)), -EINVAL);
	assert_non_null(strstr(why, "too many arguments: 4097 (at most 4096)"));
	assert_null(req.argv);
	free(line);
}

static void test_identities_round_trip_as_32_hex_digits(void **state)
{
	uint8_t id[16], back[16];
	char hex[TFS_CTL_ID_HEX];

	(void)state;
	for (int i = 0; i < 16; i++)
		id[i] = (uint8_t)(i * 17 + 3);
	tfs_ctl_id_format(id, hex);
	assert_string_equal(hex, "031425364758697a8b9cadbecfe0f102");
	assert_int_equal(tfs_ctl_id_parse(hex, back), 0);
	assert_memory_equal(id, back, sizeof(id));
	assert_int_equal(tfs_ctl_id_parse("031425364758697A8B9CADBECFE0F102", back), 0);
	assert_memory_equal(id, back, sizeof(id));
	assert_int_equal(tfs_ctl_id_parse("0314", back), -EINVAL);
	assert_int_equal(tfs_ctl_id_parse("031425364758697a8b9cadbecfe0f1023", back), -EINVAL);
	assert_int_equal(tfs_ctl_id_parse("zz142536475869798a9bacbdcedfe001", back), -EINVAL);
	assert_int_equal(tfs_ctl_id_parse(" 3142536475869798a9bacbdcedfe001", back), -EINVAL);
	assert_int_equal(tfs_ctl_id_parse("-3142536475869798a9bacbdcedfe001", back), -EINVAL);
	assert_int_equal(tfs_ctl_id_parse(NULL, back), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_request_gives_command_then_arguments),
		cmocka_unit_test(test_request_without_args_is_the_command_alone),
		cmocka_unit_test(test_malformed_requests_are_refused_with_one_line),
		cmocka_unit_test(test_too_many_arguments_are_refused_naming_the_limit),
		cmocka_unit_test(test_identities_round_trip_as_32_hex_digits),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
