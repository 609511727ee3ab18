/* SPDX-License-Identifier: GPL-2.0-or-later */
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

size_t tfs_utf8_seq_len(const char *str, size_t n)
{
	const unsigned char *s = (const unsigned char *)str;
	unsigned char lo = 0x80, hi = 0xbf;
	size_t len;

	if (n == 0)
		return 0;
	if (s[0] < 0x80)
		return 1;
	/*
	 * The second byte's range is what rules out overlongs (E0, F0),
	 * surrogates (ED) and code points past U+10FFFF (F4); C0, C1 and
	 * F5..FF never start a sequence.  RFC 3629, section 4.
	 */
	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		len = 2;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		len = 3;
		if (s[0] == 0xe0)
			lo = 0xa0;
		else if (s[0] == 0xed)
			hi = 0x9f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		len = 4;
		if (s[0] == 0xf0)
			lo = 0x90;
		else if (s[0] == 0xf4)
			hi = 0x8f;
	} else {
		return 0;
	}
	if (n < len || s[1] < lo || s[1] > hi)
		return 0;
	for (size_t i = 2; i < len; i++)
		if (s[i] < 0x80 || s[i] > 0xbf)
			return 0;
	return len;
}

bool tfs_utf8_valid(const char *s, size_t n)
{
	size_t i = 0;

	while (i < n) {
		size_t l = tfs_utf8_seq_len(s + i, n - i);

		if (!l)
			return false;
		i += l;
	}
	return true;
}

size_t tfs_utf8_whole_prefix(const char *str, size_t n)
{
	const unsigned char *s = (const unsigned char *)str;

	/* A character is at most 4 bytes: look back at most 3 for its lead byte. */
	for (size_t back = 1; back <= 3 && back <= n; back++) {
		unsigned char c = s[n - back];

		if (c < 0x80)
			return n;
		if (c >= 0xc0) {
			size_t want = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;

			return want > back ? n - back : n;
		}
	}
	return n;
}

char *tfs_utf8_repair(const char *s, size_t n)
{
	/* Each bad byte grows to three. */
	char *out = malloc(n * 3 + 1);
	size_t o = 0;

	if (!out)
		return NULL;
	for (size_t i = 0; i < n;) {
		size_t l = tfs_utf8_seq_len(s + i, n - i);

		if (l) {
			memcpy(out + o, s + i, l);
			o += l;
			i += l;
		} else {
			memcpy(out + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
		}
	}
	out[o] = '\0';
	return out;
}
