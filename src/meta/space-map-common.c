/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Bitmap and index-entry encoding shared by the metadata and disk space maps
 * and the offline checker.  Word access goes through tfs_le64 so that the
 * functions work on any byte buffer, aligned or not; on the little-endian
 * hosts we build for the compiler turns it into a plain load.
 */
#include "space-map-common.h"

#include <stddef.h>

static inline uint64_t word_at(const void *words, uint32_t w)
{
	return tfs_le64((const uint8_t *)words + 8u * w);
}

void tfs_sm_root_unpack(const void *root32, struct tfs_sm_root *out)
{
	const uint8_t *p = root32;

	out->nr_blocks = tfs_le64(p + offsetof(struct tfs_disk_sm_root, nr_blocks));
	out->nr_allocated = tfs_le64(p + offsetof(struct tfs_disk_sm_root, nr_allocated));
	out->bitmap_root = tfs_le64(p + offsetof(struct tfs_disk_sm_root, bitmap_root));
	out->ref_count_root = tfs_le64(p + offsetof(struct tfs_disk_sm_root, ref_count_root));
}

void tfs_sm_root_pack(const struct tfs_sm_root *root, void *root32)
{
	uint8_t *p = root32;

	tfs_put_le64(p + offsetof(struct tfs_disk_sm_root, nr_blocks), root->nr_blocks);
	tfs_put_le64(p + offsetof(struct tfs_disk_sm_root, nr_allocated), root->nr_allocated);
	tfs_put_le64(p + offsetof(struct tfs_disk_sm_root, bitmap_root), root->bitmap_root);
	tfs_put_le64(p + offsetof(struct tfs_disk_sm_root, ref_count_root), root->ref_count_root);
}

void tfs_sm_index_entry_unpack(const void *p, struct tfs_sm_index_entry *out)
{
	const uint8_t *b = p;

	out->blocknr = tfs_le64(b + offsetof(struct tfs_disk_index_entry, blocknr));
	out->nr_free = tfs_le32(b + offsetof(struct tfs_disk_index_entry, nr_free));
	out->none_free_before = tfs_le32(b + offsetof(struct tfs_disk_index_entry, none_free_before));
}

void tfs_sm_index_entry_pack(const struct tfs_sm_index_entry *ie, void *p)
{
	uint8_t *b = p;

	tfs_put_le64(b + offsetof(struct tfs_disk_index_entry, blocknr), ie->blocknr);
	tfs_put_le32(b + offsetof(struct tfs_disk_index_entry, nr_free), ie->nr_free);
	tfs_put_le32(b + offsetof(struct tfs_disk_index_entry, none_free_before), ie->none_free_before);
}

unsigned tfs_sm_bitmap_get(const void *words, uint32_t i)
{
	uint64_t w = word_at(words, i / TFS_ENTRIES_PER_WORD);
	unsigned raw = (unsigned)(w >> (2u * (i % TFS_ENTRIES_PER_WORD))) & 3u;

	return tfs_sm_swap2(raw);
}

void tfs_sm_bitmap_set(void *words, uint32_t i, unsigned v)
{
	uint8_t *p = (uint8_t *)words + 8u * (i / TFS_ENTRIES_PER_WORD);
	unsigned shift = 2u * (i % TFS_ENTRIES_PER_WORD);
	uint64_t w = tfs_le64(p);

	w &= ~(3ull << shift);
	w |= (uint64_t)tfs_sm_swap2(v & 3u) << shift;
	tfs_put_le64(p, w);
}

/* Slot bits of entries [lo, hi) of one word, 0 <= lo < hi <= 32. */
static inline uint64_t slot_range(uint32_t lo, uint32_t hi)
{
	uint64_t m = TFS_SM_EVEN_BITS;

	if (hi < TFS_ENTRIES_PER_WORD)
		m &= (1ull << (2u * hi)) - 1;
	return m & ~((1ull << (2u * lo)) - 1);
}

uint32_t tfs_sm_bitmap_find_free(const void *words, const uint64_t *barrier, uint32_t begin,
				 uint32_t end)
{
	return tfs_sm_bitmap_find_allocatable(words, barrier, NULL, begin, end);
}

uint32_t tfs_sm_bitmap_find_allocatable(const void *words, const uint64_t *barrier,
					const uint64_t *held, uint32_t begin, uint32_t end)
{
	uint32_t w, last;

	if (end > TFS_ENTRIES_PER_BITMAP)
		end = TFS_ENTRIES_PER_BITMAP;
	if (begin >= end)
		return end;
	last = (end - 1) / TFS_ENTRIES_PER_WORD;
	for (w = begin / TFS_ENTRIES_PER_WORD; w <= last; w++) {
		uint32_t lo = w * TFS_ENTRIES_PER_WORD < begin ? begin % TFS_ENTRIES_PER_WORD : 0;
		uint32_t hi = w == last ? end - w * TFS_ENTRIES_PER_WORD : TFS_ENTRIES_PER_WORD;
		uint64_t used = tfs_sm_word_used(word_at(words, w));
		uint64_t free_slots;

		if (barrier)
			used |= barrier[w];
		if (held)
			used |= held[w];
		free_slots = ~used & slot_range(lo, hi);
		if (free_slots)
			return w * TFS_ENTRIES_PER_WORD + (uint32_t)__builtin_ctzll(free_slots) / 2u;
	}
	return end;
}

uint32_t tfs_sm_bitmap_used_end(const void *words, uint32_t end)
{
	uint32_t w;

	if (end > TFS_ENTRIES_PER_BITMAP)
		end = TFS_ENTRIES_PER_BITMAP;
	for (w = (end + TFS_ENTRIES_PER_WORD - 1) / TFS_ENTRIES_PER_WORD; w-- > 0;) {
		uint32_t hi = end - w * TFS_ENTRIES_PER_WORD;
		uint64_t used = tfs_sm_word_used(word_at(words, w)) &
				slot_range(0, hi < TFS_ENTRIES_PER_WORD ? hi : TFS_ENTRIES_PER_WORD);

		if (used)
			return w * TFS_ENTRIES_PER_WORD + (63u - (uint32_t)__builtin_clzll(used)) / 2u + 1;
	}
	return 0;
}

uint32_t tfs_sm_bitmap_count_free(const void *words, uint32_t begin, uint32_t end)
{
	uint32_t w, last, n = 0;

	if (end > TFS_ENTRIES_PER_BITMAP)
		end = TFS_ENTRIES_PER_BITMAP;
	if (begin >= end)
		return 0;
	last = (end - 1) / TFS_ENTRIES_PER_WORD;
	for (w = begin / TFS_ENTRIES_PER_WORD; w <= last; w++) {
		uint32_t lo = w * TFS_ENTRIES_PER_WORD < begin ? begin % TFS_ENTRIES_PER_WORD : 0;
		uint32_t hi = w == last ? end - w * TFS_ENTRIES_PER_WORD : TFS_ENTRIES_PER_WORD;
		uint64_t used = tfs_sm_word_used(word_at(words, w));

		n += (uint32_t)__builtin_popcountll(~used & slot_range(lo, hi));
	}
	return n;
}

void tfs_sm_bitmap_hints(const void *words, uint32_t len, uint32_t *nr_free,
			 uint32_t *none_free_before)
{
	*nr_free = tfs_sm_bitmap_count_free(words, 0, TFS_ENTRIES_PER_BITMAP);
	*none_free_before = tfs_sm_bitmap_find_free(words, NULL, 0, len);
}

void tfs_sm_bitmap_used_mask(const void *words, uint64_t *barrier)
{
	uint32_t w;

	for (w = 0; w < TFS_BITMAP_WORDS; w++)
		barrier[w] = tfs_sm_word_used(word_at(words, w));
}
