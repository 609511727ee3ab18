/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * space-map-common.h - the bytes both space maps share: bitmap entries,
 * index entries, space-map roots and the summary hints.
 *
 * Owns: pure functions on byte buffers, so the offline checker can use them
 * on blocks it read itself.  "words" below always means the 4080-byte entry
 * area of a bitmap block (510 little-endian u64 words, starting
 * TFS_SM_BITMAP_WORDS_OFFSET bytes into the block); entry i lives in word
 * i/32 at bits 2*(i%32) and 2*(i%32)+1.
 *
 * The format's bit-order quirk is handled here and nowhere else: the lower
 * bit 2j carries the value 2 and the higher bit 2j+1 carries the value 1, so
 * a word read as a number holds (w >> 2j) & 3 = 0, 2, 1, 3 for entry
 * values 0, 1, 2, 3.  Entry value 3 means "count >= 3, see the ref-count
 * btree".
 *
 * Summary hints, the rule thinfs writes (the kernel's and the Rust tools'
 * values; thin_check 0.9.0 checks none of them, and readers must treat them
 * as hints):
 *   nr_free          = zero entries among all 16320 of the bitmap, including
 *                      those past nr_blocks in the last bitmap (always 0);
 *   none_free_before = index of the first zero entry below the bitmap's
 *                      in-range length, or that length when there is none.
 *
 * Never: allocates, locks blocks or logs.  Costs are O(range / 32) word
 * operations.
 */
#ifndef TFS_META_SPACE_MAP_COMMON_H
#define TFS_META_SPACE_MAP_COMMON_H

#include <stdint.h>

#include "format.h"

/* Where the 510 words start in a bitmap block (after csum, not_used, blocknr). */
#define TFS_SM_BITMAP_WORDS_OFFSET 16u
/* Bits 0, 2, 4, ...: one "slot" bit per 2-bit entry. */
#define TFS_SM_EVEN_BITS 0x5555555555555555ull

struct tfs_sm_root {
	uint64_t nr_blocks;
	uint64_t nr_allocated;
	uint64_t bitmap_root;
	uint64_t ref_count_root;
};

struct tfs_sm_index_entry {
	uint64_t blocknr;
	uint32_t nr_free;
	uint32_t none_free_before;
};

/* 32-byte space-map root as stored in the superblock. */
void tfs_sm_root_unpack(const void *root32, struct tfs_sm_root *out);
void tfs_sm_root_pack(const struct tfs_sm_root *root, void *root32);

/* 16-byte index entry (metadata index block slot or data index btree value). */
void tfs_sm_index_entry_unpack(const void *p, struct tfs_sm_index_entry *out);
void tfs_sm_index_entry_pack(const struct tfs_sm_index_entry *ie, void *p);

/* Entry value (0, 1, 2, or 3 = overflow) of a reference count. */
static inline unsigned tfs_sm_entry_of(uint32_t count)
{
	return count > 3 ? 3u : (unsigned)count;
}

/*
 * A raw 2-bit field (w >> 2j) & 3 <-> entry value.  The map swaps the two
 * bits, so it is its own inverse.
 */
static inline unsigned tfs_sm_swap2(unsigned v)
{
	return ((v & 1u) << 1) | ((v >> 1) & 1u);
}

/* Bit 2j of the result is set iff entry j of raw word w is non-zero. */
static inline uint64_t tfs_sm_word_used(uint64_t w)
{
	return (w | w >> 1) & TFS_SM_EVEN_BITS;
}

/* Bit 2j of the result is set iff entry j of raw word w is 3 (overflow). */
static inline uint64_t tfs_sm_word_overflow(uint64_t w)
{
	return w & w >> 1 & TFS_SM_EVEN_BITS;
}

/* Number of bitmaps covering nr_blocks. */
static inline uint64_t tfs_sm_nr_bitmaps(uint64_t nr_blocks)
{
	return (nr_blocks + TFS_ENTRIES_PER_BITMAP - 1) / TFS_ENTRIES_PER_BITMAP;
}

/* Entries of bitmap k that lie below nr_blocks (0 past the end). */
static inline uint32_t tfs_sm_bitmap_len(uint64_t nr_blocks, uint64_t k)
{
	uint64_t begin = k * TFS_ENTRIES_PER_BITMAP;

	if (begin >= nr_blocks)
		return 0;
	return nr_blocks - begin >= TFS_ENTRIES_PER_BITMAP ? TFS_ENTRIES_PER_BITMAP
							  : (uint32_t)(nr_blocks - begin);
}

/* Entry i (< 16320) of a bitmap: 0, 1, 2 or 3 (count >= 3). */
unsigned tfs_sm_bitmap_get(const void *words, uint32_t i);
/* Set entry i to v (0..3). */
void tfs_sm_bitmap_set(void *words, uint32_t i, unsigned v);

/*
 * First entry in [begin, end) that is zero in words and, when barrier is
 * not NULL, whose slot bit (2j, in the same word layout, host order) is
 * clear in barrier: the allocator's "free now and not in use since the last
 * commit".  Returns end when there is none.
 */
uint32_t tfs_sm_bitmap_find_free(const void *words, const uint64_t *barrier, uint32_t begin,
				 uint32_t end);
/*
 * The same with a second mask: held, when not NULL, marks entries freed in
 * a commit whose superblock is not on disk yet (space-map.h).
 */
uint32_t tfs_sm_bitmap_find_allocatable(const void *words, const uint64_t *barrier,
					const uint64_t *held, uint32_t begin, uint32_t end);

/*
 * One past the last non-zero entry in [0, end): entries [result, end) are
 * all zero.  0 when every entry below end is zero.
 */
uint32_t tfs_sm_bitmap_used_end(const void *words, uint32_t end);

/* Zero entries in [begin, end). */
uint32_t tfs_sm_bitmap_count_free(const void *words, uint32_t begin, uint32_t end);

/*
 * Exact hints for a bitmap whose first len entries are in range (the rule in
 * the header comment).
 */
void tfs_sm_bitmap_hints(const void *words, uint32_t len, uint32_t *nr_free,
			 uint32_t *none_free_before);

/* Fill barrier (510 host words) with the slot bits of the non-zero entries of words. */
void tfs_sm_bitmap_used_mask(const void *words, uint64_t *barrier);

#endif
