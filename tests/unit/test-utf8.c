/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Strict UTF-8: the well-formed sequences, repair for output, cuts at character boundaries. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "utf8.h"

static bool valid(const char *s)
{
	return tfs_utf8_valid(s, strlen(s));
}

static void test_every_code_point_is_valid_and_every_surrogate_is_not(void **state)
{
	(void)state;
	for (uint32_t cp = 1; cp <= 0x10ffff; cp++) {
		char b[5] = { 0 };

		/* Encode cp by hand, surrogates included, to see them refused. */
		if (cp < 0x80) {
			b[0] = (char)cp;
		} else if (cp < 0x800) {
			b[0] = (char)(0xc0 | cp >> 6);
			b[1] = (char)(0x80 | (cp & 0x3f));
		} else if (cp < 0x10000) {
			b[0] = (char)(0xe0 | cp >> 12);
			b[1] = (char)(0x80 | (cp >> 6 & 0x3f));
			b[2] = (char)(0x80 | (cp & 0x3f));
		} else {
			b[0] = (char)(0xf0 | cp >> 18);
			b[1] = (char)(0x80 | (cp >> 12 & 0x3f));
			b[2] = (char)(0x80 | (cp >> 6 & 0x3f));
			b[3] = (char)(0x80 | (cp & 0x3f));
		}
		if (valid(b) != !(cp >= 0xd800 && cp <= 0xdfff))
			fail_msg("U+%04X judged wrongly", cp);
	}
}

static void test_ill_formed_sequences_are_refused(void **state)
{
	static const char *const bad[] = {
		"\x80", "\xbf", "\xc0\x80", "\xc1\xbf", "\xc2", "\xc2\x41", "\xe0\x9f\xbf",
		"\xe1\x80", "\xed\xa0\x80", "\xf0\x8f\xbf\xbf", "\xf4\x90\x80\x80", "\xf5\x80\x80\x80",
		"\xf8\x88\x80\x80\x80", "\xfc\x84\x80\x80\x80\x80", "\xfe", "\xff", "ok\xff", "\xe2\x82",
	};

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (valid(bad[i]))
			fail_msg("sequence %zu accepted", i);
	assert_true(tfs_utf8_valid("", 0));
	assert_int_equal(tfs_utf8_seq_len("\xe2\x82\xac", 2), 0); /* the length bounds it */
	assert_int_equal(tfs_utf8_seq_len("\xe2\x82\xac", 3), 3);
}

static void test_repair_replaces_each_bad_byte_and_keeps_the_rest(void **state)
{
	char *r;

	(void)state;
	r = tfs_utf8_repair("a\xff\xc3\xa9z\xed\xa0\x80", 9);
	assert_non_null(r);
	assert_string_equal(r, "a\xef\xbf\xbd\xc3\xa9z\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
	assert_true(valid(r));
	free(r);
	r = tfs_utf8_repair("plain", 5);
	assert_string_equal(r, "plain");
	free(r);
}

static void test_whole_prefix_drops_only_a_cut_character(void **state)
{
	const char *euro = "ab\xe2\x82\xac";

	(void)state;
	assert_int_equal(tfs_utf8_whole_prefix(euro, 5), 5);
	assert_int_equal(tfs_utf8_whole_prefix(euro, 4), 2);
	assert_int_equal(tfs_utf8_whole_prefix(euro, 3), 2);
	assert_int_equal(tfs_utf8_whole_prefix(euro, 2), 2);
	assert_int_equal(tfs_utf8_whole_prefix("\xf0\x9f\x98", 3), 0);
	assert_int_equal(tfs_utf8_whole_prefix("\xf0\x9f\x98\x80", 4), 4);
	assert_int_equal(tfs_utf8_whole_prefix("\xc3\xa9", 2), 2);
	assert_int_equal(tfs_utf8_whole_prefix("", 0), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_every_code_point_is_valid_and_every_surrogate_is_not),
		cmocka_unit_test(test_ill_formed_sequences_are_refused),
		cmocka_unit_test(test_repair_replaces_each_bad_byte_and_keeps_the_rest),
		cmocka_unit_test(test_whole_prefix_drops_only_a_cut_character),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
