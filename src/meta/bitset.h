/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * bitset.h - persistent bitsets (the dm-bitset format) on top of array.h.
 *
 * Owns: a bitset of nr_bits bits kept as an array of u64 words, bit b in
 * word b / 64 at bit b % 64 (LSB first).  Like the array, its length is
 * the owner's to keep (cache_blocks for the dirty bitset,
 * discard_nr_blocks for the discard bitset).  Bits of the last word past
 * the length are written as 0 and ignored when read.
 *
 * Never: caches words between calls (every set is one array set; a word
 * already shadowed in this transaction is written in place).
 *
 * Costs and errors as for array.h: test O(depth); set O(depth) plus a block
 * copy the first time its block changes in a transaction; resize
 * O(changed blocks); walk one read per 32,576 bits.  -ENODATA bit past
 * the end.
 */
#ifndef TFS_META_BITSET_H
#define TFS_META_BITSET_H

#include <stdbool.h>
#include <stdint.h>

#include "array.h"

struct tfs_bitset_info {
	struct tfs_array_info array; /* of u64 words */
};

int tfs_bitset_info_init(struct tfs_bitset_info *info, struct tfs_tm *tm);
/* A new bitset of length 0. */
int tfs_bitset_empty(const struct tfs_bitset_info *info, uint64_t *root);
int tfs_bitset_del(const struct tfs_bitset_info *info, uint64_t root);
/* Change the length from old_bits to new_bits; new bits are fill. */
int tfs_bitset_resize(const struct tfs_bitset_info *info, uint64_t root, uint64_t old_bits,
		      uint64_t new_bits, bool fill, uint64_t *new_root);
int tfs_bitset_test(const struct tfs_bitset_info *info, uint64_t root, uint64_t bit, bool *on);
/* Set (on) or clear one bit; a bit that already has that value changes nothing. */
int tfs_bitset_set(const struct tfs_bitset_info *info, uint64_t root, uint64_t bit, bool on,
		   uint64_t *new_root);
/*
 * Visit bits [0, nr_bits) in order: fn gets each bit and its value; a
 * non-zero return stops the walk with that value.
 */
typedef int (*tfs_bitset_walk_fn)(void *ctx, uint64_t bit, bool on);
int tfs_bitset_walk(const struct tfs_bitset_info *info, uint64_t root, uint64_t nr_bits,
		    tfs_bitset_walk_fn fn, void *ctx);

#endif
