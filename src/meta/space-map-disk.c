/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The data space map.  Bitmap blocks stay on disk (through the transaction
 * manager's cache); what is kept in memory is one small record per bitmap:
 * its location, exact nr_free, a lower bound of its first free entry, and,
 * once the bitmap has been changed in the running transaction, a "barrier"
 * mask.
 *
 * The barrier is what keeps the allocation rule cheap.  When a bitmap is
 * first shadowed in a transaction its content is still the committed one,
 * so the slot bits of its non-zero entries are copied into the barrier;
 * every later 0 -> n transition adds its slot bit.  A block is allocatable
 * iff its entry is 0 and its barrier bit is clear: free now, free at the
 * last commit, and not used at any moment since.  A bitmap not changed in
 * this transaction equals its committed self and needs no barrier.  So the
 * committed bitmap is never read back, and the barrier costs 4 KiB per
 * bitmap changed in a transaction.
 *
 * A bitmap with a barrier is also exactly a bitmap whose index entry must
 * be rewritten at commit (it moved, or its counts changed).
 *
 * At commit the barrier becomes the bitmap's "held" mask until the owner
 * says the commit is durable: the next transaction starts while the
 * commit's blocks are still being written, and until its superblock is on
 * disk the state before it still maps the blocks freed in it.
 */
#include "space-map-disk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "block-manager.h"
#include "btree.h"
#include "format.h"
#include "log.h"
#include "space-map-common.h"
#include "space-map.h"
#include "transaction-manager.h"

#define WORDS TFS_BITMAP_WORDS
#define ENTRIES TFS_ENTRIES_PER_BITMAP

/* Data block numbers are 40 bits in a mapping. */
#define MAX_DATA_BLOCKS (TFS_MAX_DATA_BLOCK + 1)

struct bitmap_state {
	uint64_t loc;
	uint32_t nr_free;          /* zero entries, all 16320 (exact) */
	uint32_t none_free_before; /* no free entry below this (lower bound, exact after commit) */
	uint64_t *barrier;         /* non-NULL iff changed in this transaction */
	uint64_t *held;            /* the barrier at a commit not yet durable, or NULL */
};

struct smd {
	struct tfs_sm sm;
	struct tfs_tm *tm;
	struct tfs_btree_info index_info; /* key: bitmap number, value: index entry */
	struct tfs_btree_info rc_info;    /* key: data block, value: u32 count >= 3 */

	uint64_t nr_blocks;
	uint64_t nr_allocated;
	uint64_t nr_bitmaps;
	uint64_t cap_bitmaps;
	struct bitmap_state *bms;

	uint64_t index_root;
	uint64_t rc_root;
	struct tfs_sm_root root; /* as of the last commit */
	uint64_t alloc_hint;
	/*
	 * A full scan found nothing.  Until the next commit, commit_durable or extend nothing
	 * can become allocatable (a dec sets the barrier bit), so -ENOSPC is
	 * answered without rescanning: a pool out of data space is asked
	 * again and again.
	 */
	bool full;
};

static struct smd *to_smd(struct tfs_sm *sm)
{
	return (struct smd *)sm;
}

static const char *dev_name(struct smd *d)
{
	return tfs_bdev_name(tfs_bm_bdev(tfs_tm_bm(d->tm)));
}

static uint8_t *block_words(struct tfs_block *blk)
{
	return (uint8_t *)tfs_block_data(blk) + TFS_SM_BITMAP_WORDS_OFFSET;
}

static uint64_t slot_bit(uint32_t i)
{
	return 1ull << (2u * (i % TFS_ENTRIES_PER_WORD));
}

/*
 * A writable lock on bitmap k.  The first call in a transaction shadows it
 * (the tm copies it to a new block and frees the committed one) and builds
 * the barrier from the still-committed content; later calls write in place.
 */
static int bitmap_write_lock(struct smd *d, uint64_t k, struct tfs_block **out)
{
	struct bitmap_state *s = &d->bms[k];
	uint64_t *barrier = NULL;
	bool inc_children;
	int r;

	if (!s->barrier) {
		barrier = malloc(WORDS * sizeof(uint64_t));
		if (!barrier)
			return -ENOMEM;
	}
	r = tfs_tm_shadow(d->tm, s->loc, &tfs_bitmap_validator, out, &inc_children);
	if (r) {
		free(barrier);
		return r;
	}
	/* Bitmaps have no children; a count above 1 would only mean a leak elsewhere. */
	s->loc = tfs_block_location(*out);
	if (barrier) {
		tfs_sm_bitmap_used_mask(block_words(*out), barrier);
		s->barrier = barrier;
	}
	return 0;
}

/* A lock to read bitmap k: writable if it was changed already (no second lookup later). */
static int bitmap_lock(struct smd *d, uint64_t k, struct tfs_block **out, bool *writable)
{
	*writable = d->bms[k].barrier != NULL;
	if (*writable)
		return bitmap_write_lock(d, k, out);
	return tfs_tm_read_lock(d->tm, d->bms[k].loc, &tfs_bitmap_validator, out);
}

/* Bookkeeping of entry i of bitmap k going from count old to count (bitmap already set). */
static void account(struct smd *d, uint64_t k, uint32_t i, uint32_t old, uint32_t count)
{
	struct bitmap_state *s = &d->bms[k];

	if (old == 0 && count) {
		s->nr_free--;
		d->nr_allocated++;
		s->barrier[i / TFS_ENTRIES_PER_WORD] |= slot_bit(i);
		/* Still a lower bound of the first free entry. */
		if (i == s->none_free_before)
			s->none_free_before++;
	} else if (old && count == 0) {
		s->nr_free++;
		d->nr_allocated--;
		if (i < s->none_free_before)
			s->none_free_before = i;
	}
}

static int rc_lookup(struct smd *d, uint64_t b, uint32_t *count)
{
	uint8_t v[4];
	int r;

	r = tfs_btree_lookup(&d->rc_info, d->rc_root, &b, v);
	if (r == -ENODATA || (!r && tfs_le32(v) < 3)) {
		tfs_err("%s: data block %llu counted >= 3 but the ref-count tree %llu %s",
			dev_name(d), (unsigned long long)b, (unsigned long long)d->rc_root,
			r ? "lacks it" : "holds less than 3");
		return -EUCLEAN;
	}
	if (r)
		return r;
	*count = tfs_le32(v);
	return 0;
}

static int rc_update(struct smd *d, uint64_t b, uint32_t old, uint32_t count)
{
	uint8_t v[4];

	if (count >= 3) {
		tfs_put_le32(v, count);
		return tfs_btree_insert(&d->rc_info, d->rc_root, &b, v, &d->rc_root, NULL);
	}
	if (old >= 3)
		return tfs_btree_remove(&d->rc_info, d->rc_root, &b, &d->rc_root);
	return 0;
}

static int smd_get_count(struct tfs_sm *sm, uint64_t b, uint32_t *count)
{
	struct smd *d = to_smd(sm);
	struct tfs_block *blk;
	unsigned e;
	int r;

	if (b >= d->nr_blocks)
		return -EINVAL;
	r = tfs_tm_read_lock(d->tm, d->bms[b / ENTRIES].loc, &tfs_bitmap_validator, &blk);
	if (r)
		return r;
	e = tfs_sm_bitmap_get(block_words(blk), (uint32_t)(b % ENTRIES));
	tfs_tm_unlock(d->tm, blk);
	if (e < 3) {
		*count = e;
		return 0;
	}
	return rc_lookup(d, b, count);
}

/* Add delta (positive or negative, already range-checked by the callers) to b's count. */
static int change_count(struct smd *d, uint64_t b, int64_t delta)
{
	uint64_t k = b / ENTRIES;
	uint32_t i = (uint32_t)(b % ENTRIES);
	uint32_t old, count;
	struct tfs_block *blk;
	bool writable;
	unsigned e, en;
	int r;

	if (b >= d->nr_blocks) {
		tfs_err("%s: %s of data block %llu past the end (%llu blocks)", dev_name(d),
			delta > 0 ? "inc" : "dec", (unsigned long long)b,
			(unsigned long long)d->nr_blocks);
		return -EINVAL;
	}
	r = bitmap_lock(d, k, &blk, &writable);
	if (r)
		return r;
	e = tfs_sm_bitmap_get(block_words(blk), i);
	old = e;
	if (e == 3) {
		r = rc_lookup(d, b, &old);
		if (r)
			goto out_unlock;
	}
	if ((delta < 0 && (uint64_t)-delta > old) ||
	    (delta > 0 && (uint64_t)delta > UINT32_MAX - old)) {
		if (delta < 0)
			tfs_err("%s: dec of data block %llu below zero (count %u)", dev_name(d),
				(unsigned long long)b, old);
		r = delta < 0 ? -EINVAL : -EOVERFLOW;
		goto out_unlock;
	}
	count = (uint32_t)((int64_t)old + delta);
	en = tfs_sm_entry_of(count);
	if (en != e) {
		if (!writable) {
			tfs_tm_unlock(d->tm, blk);
			r = bitmap_write_lock(d, k, &blk);
			if (r)
				return r;
		}
		tfs_sm_bitmap_set(block_words(blk), i, en);
		account(d, k, i, old, count);
	}
	tfs_tm_unlock(d->tm, blk);
	return rc_update(d, b, old, count);

out_unlock:
	tfs_tm_unlock(d->tm, blk);
	return r;
}

static int smd_inc(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	return n ? change_count(to_smd(sm), b, n) : 0;
}

static int smd_dec(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	return n ? change_count(to_smd(sm), b, -(int64_t)n) : 0;
}

/*
 * Look for an allocatable entry of bitmap k in [begin, end) and take it.
 * *found is false when there is none.
 */
static int alloc_in_bitmap(struct smd *d, uint64_t k, uint32_t begin, uint32_t end, bool *found,
			   uint64_t *b)
{
	struct bitmap_state *s = &d->bms[k];
	struct tfs_block *blk;
	bool writable;
	uint32_t i;
	int r;

	*found = false;
	if (begin < s->none_free_before)
		begin = s->none_free_before;
	if (begin >= end)
		return 0;
	r = bitmap_lock(d, k, &blk, &writable);
	if (r)
		return r;
	/* Unchanged bitmaps equal their committed version: no barrier needed. */
	i = tfs_sm_bitmap_find_allocatable(block_words(blk), s->barrier, s->held, begin, end);
	if (i >= end) {
		tfs_tm_unlock(d->tm, blk);
		return 0;
	}
	if (!writable) {
		tfs_tm_unlock(d->tm, blk);
		r = bitmap_write_lock(d, k, &blk);
		if (r)
			return r;
	}
	tfs_sm_bitmap_set(block_words(blk), i, 1);
	account(d, k, i, 0, 1);
	tfs_tm_unlock(d->tm, blk);
	*found = true;
	*b = k * ENTRIES + i;
	return 0;
}

/*
 * Scan from the rolling hint, skipping full bitmaps and the prefix below
 * none_free_before, and wrap once.  O(1) block locks when the hint is good.
 */
static int smd_new_block(struct tfs_sm *sm, uint64_t *b)
{
	struct smd *d = to_smd(sm);
	uint64_t hint, k0, n;
	uint32_t off;
	bool found;
	int r;

	if (d->nr_allocated >= d->nr_blocks || d->full)
		return -ENOSPC;
	hint = d->alloc_hint < d->nr_blocks ? d->alloc_hint : 0;
	k0 = hint / ENTRIES;
	off = (uint32_t)(hint % ENTRIES);
	for (n = 0; n <= d->nr_bitmaps; n++) {
		uint64_t k = (k0 + n) % d->nr_bitmaps;
		uint32_t begin = n == 0 ? off : 0;
		uint32_t end = tfs_sm_bitmap_len(d->nr_blocks, k);

		if (n == d->nr_bitmaps) {
			if (off == 0)
				break;
			end = off;
		}
		if (d->bms[k].nr_free == 0)
			continue;
		r = alloc_in_bitmap(d, k, begin, end, &found, b);
		if (r)
			return r;
		if (found) {
			d->alloc_hint = *b + 1;
			return 0;
		}
	}
	d->full = true;
	return -ENOSPC;
}

static uint64_t smd_nr_blocks(struct tfs_sm *sm)
{
	return to_smd(sm)->nr_blocks;
}

static uint64_t smd_nr_free(struct tfs_sm *sm)
{
	struct smd *d = to_smd(sm);

	return d->nr_blocks - d->nr_allocated;
}

static int reserve_bitmaps(struct smd *d, uint64_t nr)
{
	struct bitmap_state *s;
	uint64_t cap;

	if (nr <= d->cap_bitmaps)
		return 0;
	cap = d->cap_bitmaps ? d->cap_bitmaps : 4;
	while (cap < nr)
		cap *= 2;
	s = realloc(d->bms, cap * sizeof(*s));
	if (!s)
		return -ENOMEM;
	memset(s + d->cap_bitmaps, 0, (cap - d->cap_bitmaps) * sizeof(*s));
	d->bms = s;
	d->cap_bitmaps = cap;
	return 0;
}

/* New bitmaps are zero-filled blocks from the tm; they count as changed (new index entries). */
static int smd_extend(struct tfs_sm *sm, uint64_t extra)
{
	struct smd *d = to_smd(sm);
	uint64_t nr = d->nr_blocks + extra, nr_bitmaps, k;
	int r;

	if (extra == 0)
		return 0;
	if (extra > MAX_DATA_BLOCKS || nr > MAX_DATA_BLOCKS)
		return -EINVAL;
	nr_bitmaps = tfs_sm_nr_bitmaps(nr);
	r = reserve_bitmaps(d, nr_bitmaps);
	if (r)
		return r;
	for (k = d->nr_bitmaps; k < nr_bitmaps; k++) {
		struct bitmap_state *s = &d->bms[k];
		struct tfs_block *blk;

		s->barrier = calloc(WORDS, sizeof(uint64_t));
		if (!s->barrier) {
			r = -ENOMEM;
			goto err_undo;
		}
		r = tfs_tm_new_block(d->tm, &tfs_bitmap_validator, &blk);
		if (r) {
			free(s->barrier);
			s->barrier = NULL;
			goto err_undo;
		}
		s->loc = tfs_block_location(blk);
		s->nr_free = ENTRIES;
		s->none_free_before = 0;
		tfs_tm_unlock(d->tm, blk);
	}
	d->nr_bitmaps = nr_bitmaps;
	d->nr_blocks = nr;
	d->full = false;
	return 0;

err_undo:
	/* Give the bitmaps made so far back; the caller aborts the transaction anyway. */
	while (k-- > d->nr_bitmaps) {
		tfs_tm_dec(d->tm, d->bms[k].loc);
		free(d->bms[k].barrier);
		memset(&d->bms[k], 0, sizeof(d->bms[k]));
	}
	return r;
}

/*
 * Write the index entry of every bitmap changed in this transaction into
 * the index btree, with exact hints: the bitmap is read once more to move
 * none_free_before up to the first free entry.
 */
static int smd_commit(struct tfs_sm *sm)
{
	struct smd *d = to_smd(sm);
	uint64_t k;
	int r;

	for (k = 0; k < d->nr_bitmaps; k++) {
		struct bitmap_state *s = &d->bms[k];
		struct tfs_sm_index_entry ie;
		struct tfs_block *blk;
		uint8_t v[sizeof(struct tfs_disk_index_entry)];

		if (!s->barrier)
			continue;
		r = tfs_tm_read_lock(d->tm, s->loc, &tfs_bitmap_validator, &blk);
		if (r)
			goto err;
		s->none_free_before = tfs_sm_bitmap_find_free(block_words(blk), NULL, s->none_free_before,
							      tfs_sm_bitmap_len(d->nr_blocks, k));
		tfs_tm_unlock(d->tm, blk);
		ie.blocknr = s->loc;
		ie.nr_free = s->nr_free;
		ie.none_free_before = s->none_free_before;
		tfs_sm_index_entry_pack(&ie, v);
		r = tfs_btree_insert(&d->index_info, d->index_root, &k, v, &d->index_root, NULL);
		if (r)
			goto err;
	}
	for (k = 0; k < d->nr_bitmaps; k++) {
		struct bitmap_state *s = &d->bms[k];

		if (!s->barrier)
			continue;
		/* A commit not declared durable before this one: its blocks stay held too. */
		if (s->held) {
			for (size_t w = 0; w < WORDS; w++)
				s->barrier[w] |= s->held[w];
			free(s->held);
		}
		s->held = s->barrier;
		s->barrier = NULL;
	}
	d->root.nr_blocks = d->nr_blocks;
	d->root.nr_allocated = d->nr_allocated;
	d->root.bitmap_root = d->index_root;
	d->root.ref_count_root = d->rc_root;
	d->full = false;
	return 0;

err:
	tfs_err("%s: data space map commit failed: %s", dev_name(d), strerror(-r));
	return r;
}

static void smd_commit_durable(struct tfs_sm *sm)
{
	struct smd *d = to_smd(sm);

	for (uint64_t k = 0; k < d->nr_bitmaps; k++) {
		free(d->bms[k].held);
		d->bms[k].held = NULL;
	}
	d->full = false;
}

static void smd_copy_root(struct tfs_sm *sm, void *root32)
{
	tfs_sm_root_pack(&to_smd(sm)->root, root32);
}

static void smd_destroy(struct tfs_sm *sm)
{
	struct smd *d = to_smd(sm);
	uint64_t k;

	if (!d)
		return;
	for (k = 0; k < d->cap_bitmaps; k++) {
		free(d->bms[k].barrier);
		free(d->bms[k].held);
	}
	free(d->bms);
	free(d);
}

static struct smd *as_smd(struct tfs_sm *sm)
{
	return sm->ops->destroy == smd_destroy ? to_smd(sm) : NULL;
}

int tfs_smd_highest_used(struct tfs_sm *sm, uint64_t *highest)
{
	struct smd *d = as_smd(sm);
	uint64_t k;

	*highest = UINT64_MAX;
	if (!d)
		return -EINVAL;
	/* From the end down; a bitmap with every entry free is skipped unread. */
	for (k = d->nr_bitmaps; k-- > 0;) {
		struct tfs_block *blk;
		uint32_t end;
		int r;

		if (d->bms[k].nr_free == ENTRIES)
			continue;
		r = tfs_tm_read_lock(d->tm, d->bms[k].loc, &tfs_bitmap_validator, &blk);
		if (r)
			return r;
		end = tfs_sm_bitmap_used_end(block_words(blk), tfs_sm_bitmap_len(d->nr_blocks, k));
		tfs_tm_unlock(d->tm, blk);
		if (end) {
			*highest = k * ENTRIES + end - 1;
			return 0;
		}
	}
	return 0;
}

/* The free run being gathered by tfs_smd_walk_free; fn sees each run once, whole. */
struct free_run {
	uint64_t begin, len;
	int (*fn)(void *arg, uint64_t begin, uint64_t len);
	void *arg;
};

static int free_run_add(struct free_run *fr, uint64_t b, uint64_t len)
{
	int r = 0;

	if (fr->len && fr->begin + fr->len == b) {
		fr->len += len;
		return 0;
	}
	if (fr->len)
		r = fr->fn(fr->arg, fr->begin, fr->len);
	fr->begin = b;
	fr->len = len;
	return r;
}

int tfs_smd_walk_free(struct tfs_sm *sm, int (*fn)(void *arg, uint64_t begin, uint64_t len),
		      void *arg)
{
	struct smd *d = as_smd(sm);
	struct free_run fr = { .fn = fn, .arg = arg };
	int r = 0;

	if (!d)
		return -EINVAL;
	for (uint64_t k = 0; k < d->nr_bitmaps && !r; k++) {
		uint32_t len = tfs_sm_bitmap_len(d->nr_blocks, k);
		struct tfs_block *blk;
		const void *words;

		/* nr_free counts entries past the end too (they are zero), so this is exact. */
		if (d->bms[k].nr_free == ENTRIES) {
			r = free_run_add(&fr, k * ENTRIES, len);
			continue;
		}
		if (!d->bms[k].nr_free)
			continue;
		r = tfs_tm_read_lock(d->tm, d->bms[k].loc, &tfs_bitmap_validator, &blk);
		if (r)
			break;
		words = block_words(blk);
		for (uint32_t i = 0; i < len && !r; i++)
			if (!tfs_sm_bitmap_get(words, i))
				r = free_run_add(&fr, k * ENTRIES + i, 1);
		tfs_tm_unlock(d->tm, blk);
	}
	if (!r && fr.len)
		r = fn(arg, fr.begin, fr.len);
	return r;
}

/*
 * Why shrinking is a normal shadowed change, safe across a crash:
 *
 * - Nothing of the committed map is written.  The index tree loses its
 *   entries past the end through shadowed btree removals; the bitmaps past
 *   the end are only dec'd in the metadata space map, which never hands a
 *   block freed in this transaction out again before the commit; the last
 *   bitmap keeps its content (its entries past the end are zero already).
 *   Until the new superblock is on disk, the old one still reaches the old,
 *   larger map intact.
 *
 * - Blocks past the end may have been freed earlier in this transaction
 *   (count 0 now, still mapped by the last committed state).  Shrinking past
 *   them is fine: their data is never overwritten before the commit,
 *   because the allocator never hands out a block in use since the last
 *   commit (the barrier) and now cannot hand out anything past the end at
 *   all.  The caller gives the device space back (truncates a file) only
 *   after the commit, and from then on no committed state points past the
 *   end: every block there has count 0 in it.  A held metadata snapshot
 *   keeps the counts of the data blocks its leaves map above 0 (sharing is
 *   broken with inc-children), so those block the shrink like any other use.
 *
 * - Counts in the overflow tree belong to blocks with count >= 3, so none
 *   lies past the end and the tree is left as it is.
 */
int tfs_smd_shrink(struct tfs_sm *sm, uint64_t nr_blocks, uint64_t *highest_used)
{
	struct smd *d = as_smd(sm);
	uint64_t highest, nr_bitmaps, k, none = UINT64_MAX;
	int r;

	if (highest_used)
		*highest_used = UINT64_MAX;
	if (!d || nr_blocks > d->nr_blocks)
		return -EINVAL;
	if (nr_blocks == d->nr_blocks)
		return 0;
	r = tfs_smd_highest_used(sm, &highest);
	if (r)
		return r;
	if (highest_used)
		*highest_used = highest;
	if (highest != none && highest >= nr_blocks)
		return -EINVAL; /* the caller says which block: nothing changed */

	nr_bitmaps = tfs_sm_nr_bitmaps(nr_blocks);
	/*
	 * The index tree's entries past the new end (bitmaps added by an
	 * extend in this transaction are not in it yet: nothing to remove).
	 */
	r = tfs_btree_remove_range(&d->index_info, d->index_root, &nr_bitmaps, nr_bitmaps, none,
				   &d->index_root, NULL);
	if (r)
		goto err;
	for (k = nr_bitmaps; k < d->nr_bitmaps; k++) {
		struct bitmap_state *s = &d->bms[k];

		r = tfs_tm_dec(d->tm, s->loc);
		if (r)
			goto err;
		free(s->barrier);
		free(s->held);
		memset(s, 0, sizeof(*s));
	}
	d->nr_bitmaps = nr_bitmaps;
	d->nr_blocks = nr_blocks;
	if (d->alloc_hint >= nr_blocks)
		d->alloc_hint = 0;
	if (nr_bitmaps) {
		/*
		 * The last bitmap: nr_free counts its zero entries whether in
		 * range or not, so it stays exact; none_free_before must not
		 * pass the new in-range length.  A changed bitmap gets its entry
		 * rewritten at commit; an unchanged one now (the stored hints may
		 * come from another writer), without copying the bitmap.
		 */
		struct bitmap_state *s = &d->bms[nr_bitmaps - 1];
		uint32_t len = tfs_sm_bitmap_len(nr_blocks, nr_bitmaps - 1);

		if (s->none_free_before > len)
			s->none_free_before = len;
		if (!s->barrier) {
			struct tfs_sm_index_entry ie = { .blocknr = s->loc,
							 .nr_free = s->nr_free,
							 .none_free_before = s->none_free_before };
			uint8_t v[sizeof(struct tfs_disk_index_entry)];

			k = nr_bitmaps - 1;
			tfs_sm_index_entry_pack(&ie, v);
			r = tfs_btree_insert(&d->index_info, d->index_root, &k, v, &d->index_root,
					     NULL);
			if (r)
				goto err;
		}
	}
	return 0;

err:
	tfs_err("%s: shrinking the data space map to %llu blocks failed: %s", dev_name(d),
		(unsigned long long)nr_blocks, strerror(-r));
	return r;
}

static const struct tfs_sm_ops smd_ops = {
	.destroy = smd_destroy,
	.nr_blocks = smd_nr_blocks,
	.nr_free = smd_nr_free,
	.get_count = smd_get_count,
	.inc = smd_inc,
	.dec = smd_dec,
	.new_block = smd_new_block,
	.extend = smd_extend,
	.commit = smd_commit,
	.commit_durable = smd_commit_durable,
	.copy_root = smd_copy_root,
	.is_new = NULL,
	.rollback = NULL,
};

static int alloc_smd(struct tfs_tm *tm, struct smd **out)
{
	struct smd *d = calloc(1, sizeof(*d));

	if (!d)
		return -ENOMEM;
	d->sm.ops = &smd_ops;
	d->tm = tm;
	d->index_info.tm = tm;
	d->index_info.levels = 1;
	d->index_info.value_type.size = sizeof(struct tfs_disk_index_entry);
	d->rc_info.tm = tm;
	d->rc_info.levels = 1;
	d->rc_info.value_type.size = sizeof(uint32_t);
	*out = d;
	return 0;
}

int tfs_smd_create(struct tfs_tm *tm, uint64_t nr_blocks, struct tfs_sm **out)
{
	struct smd *d;
	int r;

	r = alloc_smd(tm, &d);
	if (r)
		return r;
	r = tfs_btree_empty(&d->index_info, &d->index_root);
	if (r)
		goto err_destroy;
	r = tfs_btree_empty(&d->rc_info, &d->rc_root);
	if (r)
		goto err_destroy;
	/* Until the first commit, the root describes the empty map (consistent, not durable). */
	d->root.bitmap_root = d->index_root;
	d->root.ref_count_root = d->rc_root;
	r = smd_extend(&d->sm, nr_blocks);
	if (r)
		goto err_destroy;
	*out = &d->sm;
	return 0;

err_destroy:
	smd_destroy(&d->sm);
	return r;
}

struct index_walk {
	struct smd *d;
	uint64_t next;
	uint64_t meta_blocks;
};

static int load_index_entry(void *ctx, const uint64_t *keys, const void *value)
{
	struct index_walk *w = ctx;
	struct smd *d = w->d;
	struct tfs_sm_index_entry ie;

	tfs_sm_index_entry_unpack(value, &ie);
	if (keys[0] != w->next || keys[0] >= d->nr_bitmaps || ie.blocknr == 0 ||
	    ie.blocknr >= w->meta_blocks) {
		tfs_err("%s: data space map index tree %llu: entry %llu (bitmap at %llu) where bitmap %llu of %llu was expected",
			dev_name(d), (unsigned long long)d->index_root, (unsigned long long)keys[0],
			(unsigned long long)ie.blocknr, (unsigned long long)w->next,
			(unsigned long long)d->nr_bitmaps);
		return -EUCLEAN;
	}
	d->bms[keys[0]].loc = ie.blocknr;
	w->next++;
	return 0;
}

/*
 * Every bitmap is read once here, so the hints and nr_allocated we keep are
 * exact whatever the writer stored (they are only hints on disk): one 4 KiB
 * read per 16320 data blocks.
 */
int tfs_smd_open(struct tfs_tm *tm, const void *root32, struct tfs_sm **out)
{
	struct tfs_sm_root root;
	struct index_walk w;
	struct smd *d;
	uint64_t k;
	int r;

	tfs_sm_root_unpack(root32, &root);
	r = alloc_smd(tm, &d);
	if (r)
		return r;
	w = (struct index_walk){ .d = d, .meta_blocks = tfs_sm_nr_blocks(tfs_tm_sm(tm)) };
	if (root.nr_blocks > MAX_DATA_BLOCKS || root.bitmap_root == 0 ||
	    root.bitmap_root >= w.meta_blocks || root.ref_count_root == 0 ||
	    root.ref_count_root >= w.meta_blocks) {
		tfs_err("%s: bad data space map root (nr_blocks %llu, index tree %llu, ref-count tree %llu)",
			dev_name(d), (unsigned long long)root.nr_blocks,
			(unsigned long long)root.bitmap_root, (unsigned long long)root.ref_count_root);
		r = -EUCLEAN;
		goto err_destroy;
	}
	d->nr_blocks = root.nr_blocks;
	d->nr_bitmaps = tfs_sm_nr_bitmaps(root.nr_blocks);
	d->index_root = root.bitmap_root;
	d->rc_root = root.ref_count_root;
	r = reserve_bitmaps(d, d->nr_bitmaps);
	if (r)
		goto err_destroy;
	r = tfs_btree_walk(&d->index_info, d->index_root, load_index_entry, &w);
	if (r)
		goto err_destroy;
	if (w.next != d->nr_bitmaps) {
		tfs_err("%s: data space map index tree %llu has %llu bitmaps, %llu blocks need %llu",
			dev_name(d), (unsigned long long)d->index_root, (unsigned long long)w.next,
			(unsigned long long)d->nr_blocks, (unsigned long long)d->nr_bitmaps);
		r = -EUCLEAN;
		goto err_destroy;
	}

	for (k = 0; k < d->nr_bitmaps; k++) {
		struct bitmap_state *s = &d->bms[k];
		uint32_t len = tfs_sm_bitmap_len(d->nr_blocks, k);
		struct tfs_block *blk;

		r = tfs_tm_read_lock(tm, s->loc, &tfs_bitmap_validator, &blk);
		if (r)
			goto err_destroy;
		tfs_sm_bitmap_hints(block_words(blk), len, &s->nr_free, &s->none_free_before);
		d->nr_allocated += len - tfs_sm_bitmap_count_free(block_words(blk), 0, len);
		tfs_tm_unlock(tm, blk);
	}
	d->root = root;
	d->root.nr_allocated = d->nr_allocated;
	*out = &d->sm;
	return 0;

err_destroy:
	smd_destroy(&d->sm);
	return r;
}
