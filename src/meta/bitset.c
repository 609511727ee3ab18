/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Persistent bitsets: an array of u64 words (docs/cache-format.md). */
#include "bitset.h"

#include "format.h"

#define WORD_BITS 64u

int tfs_bitset_info_init(struct tfs_bitset_info *info, struct tfs_tm *tm)
{
	return tfs_array_info_init(&info->array, tm, 8);
}

int tfs_bitset_empty(const struct tfs_bitset_info *info, uint64_t *root)
{
	return tfs_array_empty(&info->array, root);
}

int tfs_bitset_del(const struct tfs_bitset_info *info, uint64_t root)
{
	return tfs_array_del(&info->array, root);
}

static uint64_t words_for(uint64_t bits)
{
	return (bits + WORD_BITS - 1) / WORD_BITS;
}

/* Mask of the bits [lo, hi) of one word, 0 <= lo <= hi <= 64. */
static uint64_t bit_range(unsigned lo, unsigned hi)
{
	uint64_t upto_hi = hi == WORD_BITS ? ~0ull : (1ull << hi) - 1;

	return upto_hi & ~((1ull << lo) - 1);
}

/* Word w: the bits in mask become on, the others stay. */
static int update_word(const struct tfs_bitset_info *info, uint64_t *root, uint64_t w,
		       uint64_t mask, bool on)
{
	uint8_t v[8];
	uint64_t word;
	int r;

	r = tfs_array_get(&info->array, *root, w, v);
	if (r)
		return r;
	word = tfs_le64(v);
	tfs_put_le64(v, on ? word | mask : word & ~mask);
	return tfs_array_set(&info->array, *root, w, v, root);
}

int tfs_bitset_resize(const struct tfs_bitset_info *info, uint64_t root, uint64_t old_bits,
		      uint64_t new_bits, bool fill, uint64_t *new_root)
{
	uint64_t old_words = words_for(old_bits), new_words = words_for(new_bits);
	unsigned old_tail = (unsigned)(old_bits % WORD_BITS);
	unsigned new_tail = (unsigned)(new_bits % WORD_BITS);
	uint8_t fill_word[8];
	int r;

	*new_root = root;
	if (new_bits == old_bits)
		return 0;
	/* Padding of the old last word may hold anything: the new bits in it become fill. */
	if (new_bits > old_bits && old_tail) {
		unsigned hi = new_words == old_words && new_tail ? new_tail : WORD_BITS;
		r = update_word(info, new_root, old_words - 1, bit_range(old_tail, hi), fill);
		if (r)
			return r;
	}
	tfs_put_le64(fill_word, fill ? ~0ull : 0);
	r = tfs_array_resize(&info->array, *new_root, old_words, new_words, fill_word, new_root);
	/* Padding is written as 0. */
	if (!r && new_tail)
		r = update_word(info, new_root, new_words - 1, bit_range(new_tail, WORD_BITS), false);
	return r;
}

int tfs_bitset_test(const struct tfs_bitset_info *info, uint64_t root, uint64_t bit, bool *on)
{
	uint8_t v[8];
	int r = tfs_array_get(&info->array, root, bit / WORD_BITS, v);

	if (!r)
		*on = tfs_le64(v) >> (bit % WORD_BITS) & 1;
	return r;
}

int tfs_bitset_set(const struct tfs_bitset_info *info, uint64_t root, uint64_t bit, bool on,
		   uint64_t *new_root)
{
	*new_root = root;
	return update_word(info, new_root, bit / WORD_BITS, 1ull << (bit % WORD_BITS), on);
}

struct walk_ctx {
	uint64_t nr_bits;
	tfs_bitset_walk_fn fn;
	void *ctx;
};

static int walk_word(void *ctx, uint64_t index, const void *value)
{
	struct walk_ctx *w = ctx;
	uint64_t word = tfs_le64(value), first = index * WORD_BITS;
	int r = 0;

	for (unsigned i = 0; i < WORD_BITS && first + i < w->nr_bits && !r; i++)
		r = w->fn(w->ctx, first + i, word >> i & 1);
	return r;
}

int tfs_bitset_walk(const struct tfs_bitset_info *info, uint64_t root, uint64_t nr_bits,
		    tfs_bitset_walk_fn fn, void *ctx)
{
	struct walk_ctx w = { nr_bits, fn, ctx };

	return tfs_array_walk(&info->array, root, 0, words_for(nr_bits), walk_word, &w);
}
