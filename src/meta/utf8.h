/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * utf8.h - strict UTF-8 (RFC 3629) for names and for text that leaves the
 * daemon as JSON.
 *
 * Owns: deciding whether bytes are well-formed UTF-8: shortest form only (no
 * overlong encodings), no UTF-16 surrogates (U+D800..U+DFFF), nothing above
 * U+10FFFF.  Repairing text for output by replacing each byte that is not
 * part of a well-formed sequence with U+FFFD.
 * Never: normalises, case-folds or judges which characters are printable.
 */
#ifndef TFS_META_UTF8_H
#define TFS_META_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Length (1..4) of the well-formed sequence that starts at s, of at most n
 * bytes, or 0 when s[0] does not start one (n == 0 included).  O(1).
 */
size_t tfs_utf8_seq_len(const char *s, size_t n);

/* Whether all of s[0..n) is well-formed.  O(n). */
bool tfs_utf8_valid(const char *s, size_t n);

/*
 * Number of leading bytes of s[0..n) that are whole sequences: a cut that
 * fell inside a character (a full snprintf buffer) drops the partial one.
 * Ill-formed bytes before the end are left to the caller.  O(1).
 */
size_t tfs_utf8_whole_prefix(const char *s, size_t n);

/*
 * A NUL-terminated copy of s[0..n) with every byte that is not part of a
 * well-formed sequence replaced by U+FFFD (EF BF BD); NULL when out of
 * memory.  The caller frees it.  A repaired JSON text stays valid JSON,
 * since such bytes can only occur inside its strings.  O(n).
 */
char *tfs_utf8_repair(const char *s, size_t n);

#endif
