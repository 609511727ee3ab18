/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The metadata space map, held entirely in memory.
 *
 * Per bitmap k (at most 255) three copies of its 510 words are kept:
 *   cur       - the counts of the running transaction, exactly the bytes the
 *               bitmap block will hold when it is next written;
 *   committed - the counts as of the last commit (is_new, rollback);
 *   barrier   - slot bits of every entry that was non-zero at any moment
 *               since the last commit (committed state included), so that a
 *               block freed in this transaction is never handed out again
 *               before the next commit, whether it was committed or born in
 *               this transaction;
 *   held      - the barrier as it was at the last commit, while that
 *               commit is not durable yet (holding): the state on disk
 *               before it may still use those blocks.
 * Counts >= 3 live in an open-addressing hash (block -> count, plus the
 * committed count and the value in the ref-count btree being built).
 *
 * Commit writes the map into the transaction in three steps, none of which
 * can be interleaved with outside updates (the caller holds the metadata
 * lock):
 *   (a) changed counts >= 3 are put into / removed from the ref-count
 *       btree.  The btree allocates and frees metadata blocks, but only
 *       with 0 <-> 1 transitions, which never change the set of counts >= 3,
 *       so one pass reaches a fixed point;
 *   (b) every bitmap changed in this transaction gets a new location (its
 *       committed one is freed) and so does the index block.  Allocating and
 *       freeing changes further bitmaps, so this loops until every changed
 *       bitmap has been moved once; at most 256 moves, each changing two
 *       entries;
 *   (c) the changed bitmaps and the index block are written into their new
 *       blocks through the block manager.  The counts are final by then.
 * Nothing written at commit overwrites a block the committed state uses.
 */
#include "space-map-metadata.h"

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
#define OVF_EMPTY UINT64_MAX

/*
 * One count >= 3.  A field is 0 when that state has the count below 3.
 *   count     - the running transaction;
 *   committed - the last commit;
 *   tree      - the value in the ref-count btree at rc_root;
 *   disk      - the value in the committed ref-count btree (differs from
 *               committed only for a stale entry found at open).
 */
struct ovf_entry {
	uint64_t b;
	uint32_t count;
	uint32_t committed;
	uint32_t tree;
	uint32_t disk;
	bool dirty;
};

struct ovf_map {
	struct ovf_entry *slots;
	size_t mask; /* capacity - 1, capacity a power of two */
	size_t used;
};

struct bitmap_state {
	uint64_t loc;           /* where it is (or will be) written */
	uint64_t committed_loc; /* 0: never written */
	uint32_t nr_free;       /* zero entries in cur, all 16320 of them */
	bool dirty;             /* cur differs from what committed_loc holds */
	bool moved;             /* loc was allocated in this transaction */
};

struct smm {
	struct tfs_sm sm;
	struct tfs_bm *bm;
	struct tfs_tm *tm;

	uint64_t nr_blocks;
	uint64_t reserved; /* blocks counted 1 by create() */
	uint32_t nr_bitmaps;
	uint32_t cap_bitmaps; /* arrays below hold this many bitmaps */
	uint64_t *cur;
	uint64_t *committed;
	uint64_t *barrier;
	uint64_t *held;
	bool holding; /* held applies: the last commit is not durable yet */
	struct bitmap_state *bms;
	uint64_t nr_allocated;

	uint64_t index_loc;
	bool index_moved;
	uint64_t rc_root; /* 0 until the first commit of a created map */
	bool changed;     /* anything to write at the next commit */

	struct ovf_map ovf;
	uint64_t *ovf_dirty; /* blocks whose ovf entry is dirty */
	size_t nr_ovf_dirty, cap_ovf_dirty;

	struct tfs_sm_root root;   /* as of the last commit */
	uint64_t alloc_hint;       /* next block the allocator looks at */
	/*
	 * A full scan found nothing.  Nothing becomes allocatable again before
	 * the next commit, rollback or extend (a dec sets the barrier bit), so
	 * -ENOSPC is answered at once until then.
	 */
	bool full;
};

static const struct tfs_sm_ops smm_ops;

static struct smm *to_smm(struct tfs_sm *sm)
{
	return (struct smm *)sm;
}

static const char *dev_name(struct smm *m)
{
	return tfs_bdev_name(tfs_bm_bdev(m->bm));
}

/* ---- overflow hash ---------------------------------------------------- */

static size_t ovf_hash(const struct ovf_map *o, uint64_t b)
{
	return (size_t)((b * 0x9E3779B97F4A7C15ull) >> 20) & o->mask;
}

static int ovf_init(struct ovf_map *o, size_t cap)
{
	size_t i;

	o->slots = malloc(cap * sizeof(*o->slots));
	if (!o->slots)
		return -ENOMEM;
	for (i = 0; i < cap; i++)
		o->slots[i].b = OVF_EMPTY;
	o->mask = cap - 1;
	o->used = 0;
	return 0;
}

static struct ovf_entry *ovf_find(const struct ovf_map *o, uint64_t b)
{
	size_t i = ovf_hash(o, b);

	for (;; i = (i + 1) & o->mask) {
		if (o->slots[i].b == b)
			return &o->slots[i];
		if (o->slots[i].b == OVF_EMPTY)
			return NULL;
	}
}

static int ovf_grow(struct ovf_map *o)
{
	struct ovf_map n;
	size_t i;
	int r;

	r = ovf_init(&n, (o->mask + 1) * 2);
	if (r)
		return r;
	for (i = 0; i <= o->mask; i++) {
		size_t j;

		if (o->slots[i].b == OVF_EMPTY)
			continue;
		for (j = ovf_hash(&n, o->slots[i].b); n.slots[j].b != OVF_EMPTY; j = (j + 1) & n.mask)
			;
		n.slots[j] = o->slots[i];
		n.used++;
	}
	free(o->slots);
	*o = n;
	return 0;
}

/* The entry for b, added zeroed when absent.  -ENOMEM. */
static int ovf_get(struct ovf_map *o, uint64_t b, struct ovf_entry **out)
{
	struct ovf_entry *e = ovf_find(o, b);
	size_t i;
	int r;

	if (e) {
		*out = e;
		return 0;
	}
	/* Keep the load under 1/2 so probes stay short. */
	if ((o->used + 1) * 2 > o->mask + 1) {
		r = ovf_grow(o);
		if (r)
			return r;
	}
	for (i = ovf_hash(o, b); o->slots[i].b != OVF_EMPTY; i = (i + 1) & o->mask)
		;
	memset(&o->slots[i], 0, sizeof(o->slots[i]));
	o->slots[i].b = b;
	o->used++;
	*out = &o->slots[i];
	return 0;
}

/* Remove b (linear probing: shift back the entries that probed past it). */
static void ovf_remove(struct ovf_map *o, uint64_t b)
{
	struct ovf_entry *e = ovf_find(o, b);
	size_t hole, i;

	if (!e)
		return;
	hole = (size_t)(e - o->slots);
	o->slots[hole].b = OVF_EMPTY;
	o->used--;
	for (i = (hole + 1) & o->mask; o->slots[i].b != OVF_EMPTY; i = (i + 1) & o->mask) {
		size_t home = ovf_hash(o, o->slots[i].b);

		/* Move it into the hole unless its home lies cyclically in (hole, i]. */
		if (hole <= i ? (home <= hole || home > i) : (home <= hole && home > i)) {
			o->slots[hole] = o->slots[i];
			o->slots[i].b = OVF_EMPTY;
			hole = i;
		}
	}
}

static int ovf_reserve_dirty(struct smm *m)
{
	uint64_t *n;
	size_t cap;

	if (m->nr_ovf_dirty < m->cap_ovf_dirty)
		return 0;
	cap = m->cap_ovf_dirty ? m->cap_ovf_dirty * 2 : 64;
	n = realloc(m->ovf_dirty, cap * sizeof(*n));
	if (!n)
		return -ENOMEM;
	m->ovf_dirty = n;
	m->cap_ovf_dirty = cap;
	return 0;
}

static void ovf_mark_dirty(struct smm *m, struct ovf_entry *e)
{
	if (e->dirty)
		return;
	e->dirty = true;
	m->ovf_dirty[m->nr_ovf_dirty++] = e->b; /* room reserved by the caller */
}

/* ---- counts ------------------------------------------------------------ */

static uint64_t *cur_words(struct smm *m, uint32_t k)
{
	return m->cur + (size_t)k * WORDS;
}

static uint64_t *committed_words(struct smm *m, uint32_t k)
{
	return m->committed + (size_t)k * WORDS;
}

static uint64_t *barrier_words(struct smm *m, uint32_t k)
{
	return m->barrier + (size_t)k * WORDS;
}

static const uint64_t *held_words(struct smm *m, uint32_t k)
{
	return m->holding ? m->held + (size_t)k * WORDS : NULL;
}

static int get_count(struct smm *m, uint64_t b, uint32_t *count)
{
	uint32_t k = (uint32_t)(b / ENTRIES);
	unsigned e;
	struct ovf_entry *o;

	if (b >= m->nr_blocks)
		return -EINVAL;
	e = tfs_sm_bitmap_get(cur_words(m, k), (uint32_t)(b % ENTRIES));
	if (e < 3) {
		*count = e;
		return 0;
	}
	o = ovf_find(&m->ovf, b);
	if (!o || o->count < 3) {
		/* open() checked the tree against the bitmaps, so this is our bug. */
		tfs_err("%s: metadata block %llu marked >= 3 without an overflow count",
			dev_name(m), (unsigned long long)b);
		return -EUCLEAN;
	}
	*count = o->count;
	return 0;
}

/* Change b's count from old to count.  Fails (-ENOMEM) before changing anything. */
static int set_count(struct smm *m, uint64_t b, uint32_t old, uint32_t count)
{
	uint32_t k = (uint32_t)(b / ENTRIES), i = (uint32_t)(b % ENTRIES);
	unsigned eo = tfs_sm_entry_of(old), en = tfs_sm_entry_of(count);
	struct bitmap_state *s = &m->bms[k];
	int r;

	if (old >= 3 || count >= 3) {
		struct ovf_entry *e;

		r = ovf_reserve_dirty(m);
		if (r)
			return r;
		r = ovf_get(&m->ovf, b, &e);
		if (r)
			return r;
		e->count = count >= 3 ? count : 0;
		ovf_mark_dirty(m, e);
	}
	if (eo != en) {
		tfs_sm_bitmap_set(cur_words(m, k), i, en);
		s->dirty = true;
	}
	if (old == 0 && count) {
		s->nr_free--;
		m->nr_allocated++;
		barrier_words(m, k)[i / TFS_ENTRIES_PER_WORD] |= 1ull << (2u * (i % TFS_ENTRIES_PER_WORD));
	} else if (old && count == 0) {
		s->nr_free++;
		m->nr_allocated--;
	}
	m->changed = true;
	return 0;
}

static int smm_get_count(struct tfs_sm *sm, uint64_t b, uint32_t *count)
{
	struct smm *m = to_smm(sm);
	int r = get_count(m, b, count);

	/* Metadata block numbers come from metadata: one past the end is corruption. */
	if (r == -EINVAL)
		tfs_err("%s: metadata block %llu is past the end of the metadata space map (%llu blocks)",
			dev_name(m), (unsigned long long)b, (unsigned long long)m->nr_blocks);
	return r;
}

static int smm_inc(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	struct smm *m = to_smm(sm);
	uint32_t old;
	int r;

	r = get_count(m, b, &old);
	if (r) {
		if (r == -EINVAL)
			tfs_err("%s: inc of metadata block %llu past the end (%llu blocks)",
				dev_name(m), (unsigned long long)b, (unsigned long long)m->nr_blocks);
		return r;
	}
	if (n > UINT32_MAX - old)
		return -EOVERFLOW;
	return n ? set_count(m, b, old, old + n) : 0;
}

static int smm_dec(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	struct smm *m = to_smm(sm);
	uint32_t old;
	int r;

	r = get_count(m, b, &old);
	if (r) {
		if (r == -EINVAL)
			tfs_err("%s: dec of metadata block %llu past the end (%llu blocks)",
				dev_name(m), (unsigned long long)b, (unsigned long long)m->nr_blocks);
		return r;
	}
	if (n > old) {
		tfs_err("%s: dec of metadata block %llu below zero (count %u, dec %u)", dev_name(m),
			(unsigned long long)b, old, n);
		return -EINVAL;
	}
	return n ? set_count(m, b, old, old - n) : 0;
}

/*
 * Scan for a block free in cur and clear in barrier, starting at the
 * rolling hint and wrapping once.  O(blocks scanned / 32).
 */
static int find_free_block(struct smm *m, uint64_t *out)
{
	uint64_t hint = m->alloc_hint < m->nr_blocks ? m->alloc_hint : 0;
	uint32_t k0 = (uint32_t)(hint / ENTRIES), off = (uint32_t)(hint % ENTRIES);
	uint32_t n;

	for (n = 0; n <= m->nr_bitmaps; n++) {
		uint32_t k = (k0 + n) % m->nr_bitmaps;
		uint32_t begin = n == 0 ? off : 0;
		uint32_t end = tfs_sm_bitmap_len(m->nr_blocks, k);
		uint32_t i;

		if (n == m->nr_bitmaps) {
			/* Back at the start: the part below the hint. */
			if (off == 0)
				break;
			end = off;
		}
		if (m->bms[k].nr_free == 0)
			continue;
		i = tfs_sm_bitmap_find_allocatable(cur_words(m, k), barrier_words(m, k),
						   held_words(m, k), begin, end);
		if (i < end) {
			*out = (uint64_t)k * ENTRIES + i;
			return 0;
		}
	}
	return -ENOSPC;
}

static int smm_new_block(struct tfs_sm *sm, uint64_t *b)
{
	struct smm *m = to_smm(sm);
	int r;

	if (m->nr_blocks == 0 || m->full)
		return -ENOSPC;
	r = find_free_block(m, b);
	if (r) {
		m->full = true;
		return r;
	}
	r = set_count(m, *b, 0, 1);
	if (r)
		return r;
	m->alloc_hint = *b + 1;
	return 0;
}

static uint64_t smm_nr_blocks(struct tfs_sm *sm)
{
	return to_smm(sm)->nr_blocks;
}

static uint64_t smm_nr_free(struct tfs_sm *sm)
{
	struct smm *m = to_smm(sm);

	return m->nr_blocks - m->nr_allocated;
}

static bool smm_is_new(struct tfs_sm *sm, uint64_t b)
{
	struct smm *m = to_smm(sm);
	uint32_t k = (uint32_t)(b / ENTRIES);

	if (b >= m->root.nr_blocks || k >= m->nr_bitmaps)
		return true;
	return tfs_sm_bitmap_get(committed_words(m, k), (uint32_t)(b % ENTRIES)) == 0;
}

/* Make room for nr bitmaps in every per-bitmap array (new parts zeroed). */
static int reserve_bitmaps(struct smm *m, uint32_t nr)
{
	size_t old = m->cap_bitmaps, words = (size_t)nr * WORDS;
	uint64_t **arrays[] = { &m->cur, &m->committed, &m->barrier, &m->held };
	struct bitmap_state *s;
	size_t a;

	if (nr <= m->cap_bitmaps)
		return 0;
	for (a = 0; a < sizeof(arrays) / sizeof(arrays[0]); a++) {
		uint64_t *p = realloc(*arrays[a], words * sizeof(uint64_t));

		if (!p)
			return -ENOMEM;
		memset(p + old * WORDS, 0, (words - old * WORDS) * sizeof(uint64_t));
		*arrays[a] = p;
	}
	s = realloc(m->bms, nr * sizeof(*s));
	if (!s)
		return -ENOMEM;
	memset(s + old, 0, (nr - old) * sizeof(*s));
	m->bms = s;
	m->cap_bitmaps = nr;
	return 0;
}

static int smm_extend(struct tfs_sm *sm, uint64_t extra)
{
	struct smm *m = to_smm(sm);
	uint64_t nr = m->nr_blocks + extra;
	uint32_t k, nr_bitmaps;
	int r;

	if (extra == 0)
		return 0;
	if (extra > TFS_MAX_METADATA_BLOCKS || nr > TFS_MAX_METADATA_BLOCKS)
		return -EINVAL;
	nr_bitmaps = (uint32_t)tfs_sm_nr_bitmaps(nr);
	r = reserve_bitmaps(m, nr_bitmaps);
	if (r)
		return r;
	for (k = m->nr_bitmaps; k < nr_bitmaps; k++) {
		/* Gets its first location at commit. */
		m->bms[k] = (struct bitmap_state){ .nr_free = ENTRIES, .dirty = true };
	}
	m->nr_bitmaps = nr_bitmaps;
	m->nr_blocks = nr;
	m->changed = true;
	m->full = false;
	return 0;
}

/* ---- commit ----------------------------------------------------------- */

static void rc_info(struct smm *m, struct tfs_btree_info *info)
{
	memset(info, 0, sizeof(*info));
	info->tm = m->tm;
	info->levels = 1;
	info->value_type.size = sizeof(uint32_t);
}

/* Step (a): bring the ref-count btree in line with the counts >= 3. */
static int write_overflow(struct smm *m)
{
	struct tfs_btree_info info;
	bool again = true;
	size_t j;
	int r;

	rc_info(m, &info);
	if (!m->rc_root) {
		r = tfs_btree_empty(&info, &m->rc_root);
		if (r)
			return r;
	}
	/* One pass normally suffices; loop anyway in case a btree op moved a count past 2. */
	while (again) {
		again = false;
		for (j = 0; j < m->nr_ovf_dirty; j++) {
			uint64_t key = m->ovf_dirty[j];
			struct ovf_entry *e = ovf_find(&m->ovf, key);
			uint32_t want;
			uint8_t v[4];

			if (!e || e->count == e->tree)
				continue;
			want = e->count;
			if (want) {
				tfs_put_le32(v, want);
				r = tfs_btree_insert(&info, m->rc_root, &key, v, &m->rc_root, NULL);
			} else {
				r = tfs_btree_remove(&info, m->rc_root, &key, &m->rc_root);
			}
			if (r)
				return r;
			/* The btree op may have grown the hash; look the entry up again. */
			e = ovf_find(&m->ovf, key);
			e->tree = want;
			again = true;
		}
	}
	return 0;
}

/* Step (b): new locations for every changed bitmap and the index block. */
static int move_blocks(struct smm *m)
{
	bool progress = true;
	uint32_t k;
	int r;

	while (progress) {
		progress = false;
		if (!m->index_moved) {
			uint64_t old = m->index_loc;

			r = smm_new_block(&m->sm, &m->index_loc);
			if (r)
				return r;
			m->index_moved = true;
			if (old) {
				r = smm_dec(&m->sm, old, 1);
				if (r)
					return r;
			}
			progress = true;
		}
		for (k = 0; k < m->nr_bitmaps; k++) {
			struct bitmap_state *s = &m->bms[k];
			uint64_t old = s->loc;

			if (!s->dirty || s->moved)
				continue;
			r = smm_new_block(&m->sm, &s->loc);
			if (r)
				return r;
			s->moved = true;
			if (old) {
				r = smm_dec(&m->sm, old, 1);
				if (r)
					return r;
			}
			progress = true;
		}
	}
	return 0;
}

/* Step (c): the bytes.  Bitmap blocks hold cur verbatim (little-endian host). */
static int write_blocks(struct smm *m)
{
	struct tfs_block *blk;
	uint8_t *data;
	uint32_t k;
	int r;

	for (k = 0; k < m->nr_bitmaps; k++) {
		if (!m->bms[k].dirty)
			continue;
		r = tfs_bm_write_lock_zero(m->bm, m->bms[k].loc, &tfs_bitmap_validator, &blk);
		if (r)
			return r;
		memcpy((uint8_t *)tfs_block_data(blk) + TFS_SM_BITMAP_WORDS_OFFSET, cur_words(m, k),
		       WORDS * sizeof(uint64_t));
		tfs_bm_unlock(blk);
	}

	r = tfs_bm_write_lock_zero(m->bm, m->index_loc, &tfs_index_validator, &blk);
	if (r)
		return r;
	data = tfs_block_data(blk);
	for (k = 0; k < m->nr_bitmaps; k++) {
		struct tfs_sm_index_entry ie = { .blocknr = m->bms[k].loc };

		tfs_sm_bitmap_hints(cur_words(m, k), tfs_sm_bitmap_len(m->nr_blocks, k), &ie.nr_free,
				    &ie.none_free_before);
		tfs_sm_index_entry_pack(&ie, data + offsetof(struct tfs_disk_metadata_index, index) +
						     k * sizeof(struct tfs_disk_index_entry));
	}
	tfs_bm_unlock(blk);
	return 0;
}

/* After a commit or rollback: forget hash entries below 3 in every state. */
static void ovf_settle(struct smm *m)
{
	size_t j;

	for (j = 0; j < m->nr_ovf_dirty; j++) {
		struct ovf_entry *e = ovf_find(&m->ovf, m->ovf_dirty[j]);

		if (!e)
			continue;
		e->dirty = false;
		if (!e->count && !e->committed && !e->tree && !e->disk)
			ovf_remove(&m->ovf, m->ovf_dirty[j]);
	}
	m->nr_ovf_dirty = 0;
}

static int smm_commit(struct tfs_sm *sm)
{
	struct smm *m = to_smm(sm);
	size_t j;
	uint32_t k;
	int r;

	if (!m->tm)
		return -EINVAL;
	if (!m->changed)
		return 0;

	r = write_overflow(m);
	if (r)
		goto err;
	r = move_blocks(m);
	if (r)
		goto err;
	r = write_blocks(m);
	if (r)
		goto err;

	m->root.nr_blocks = m->nr_blocks;
	m->root.nr_allocated = m->nr_allocated;
	m->root.bitmap_root = m->index_loc;
	m->root.ref_count_root = m->rc_root;

	/*
	 * Held back until this commit is durable: every block used since the
	 * last commit.  Had that one not been declared durable yet, its held
	 * blocks stay held too (only an abort follows a failed commit, and it
	 * reloads the map).
	 */
	if (m->holding) {
		for (size_t w = 0; w < (size_t)m->nr_bitmaps * WORDS; w++)
			m->held[w] |= m->barrier[w];
	} else {
		memcpy(m->held, m->barrier, (size_t)m->nr_bitmaps * WORDS * sizeof(uint64_t));
	}
	m->holding = true;
	for (k = 0; k < m->nr_bitmaps; k++) {
		struct bitmap_state *s = &m->bms[k];

		if (!s->dirty)
			continue;
		memcpy(committed_words(m, k), cur_words(m, k), WORDS * sizeof(uint64_t));
		tfs_sm_bitmap_used_mask(cur_words(m, k), barrier_words(m, k));
		s->committed_loc = s->loc;
		s->dirty = false;
		s->moved = false;
	}
	for (j = 0; j < m->nr_ovf_dirty; j++) {
		struct ovf_entry *e = ovf_find(&m->ovf, m->ovf_dirty[j]);

		if (e)
			e->committed = e->disk = e->count;
	}
	ovf_settle(m);
	m->index_moved = false;
	m->changed = false;
	m->full = false;
	return 0;

err:
	tfs_err("%s: metadata space map commit failed: %s", dev_name(m), strerror(-r));
	return r;
}

static void smm_commit_durable(struct tfs_sm *sm)
{
	struct smm *m = to_smm(sm);

	m->holding = false;
	m->full = false;
}

static void smm_rollback(struct tfs_sm *sm)
{
	struct smm *m = to_smm(sm);
	uint32_t k, nr_bitmaps = (uint32_t)tfs_sm_nr_bitmaps(m->root.nr_blocks);
	size_t j;

	for (k = 0; k < m->nr_bitmaps; k++) {
		struct bitmap_state *s = &m->bms[k];

		if (!s->dirty && !s->moved && k < nr_bitmaps)
			continue;
		memcpy(cur_words(m, k), committed_words(m, k), WORDS * sizeof(uint64_t));
		tfs_sm_bitmap_used_mask(committed_words(m, k), barrier_words(m, k));
		s->loc = s->committed_loc;
		s->nr_free = tfs_sm_bitmap_count_free(cur_words(m, k), 0, ENTRIES);
		s->dirty = false;
		s->moved = false;
	}
	for (j = 0; j < m->nr_ovf_dirty; j++) {
		struct ovf_entry *e = ovf_find(&m->ovf, m->ovf_dirty[j]);

		if (e) {
			e->count = e->committed;
			e->tree = e->disk;
		}
	}
	ovf_settle(m);
	if (m->root.bitmap_root) {
		m->nr_blocks = m->root.nr_blocks;
		m->nr_bitmaps = nr_bitmaps;
		m->nr_allocated = m->root.nr_allocated;
	} else {
		uint64_t b;

		/*
		 * Created and never committed: back to what create() made, the
		 * reserved blocks counted (0 -> 1 cannot fail) and every
		 * bitmap still to be written.
		 */
		m->nr_allocated = 0;
		for (b = 0; b < m->reserved; b++)
			set_count(m, b, 0, 1);
		for (k = 0; k < m->nr_bitmaps; k++)
			m->bms[k].dirty = true;
	}
	m->index_loc = m->root.bitmap_root;
	m->rc_root = m->root.ref_count_root;
	m->index_moved = false;
	m->changed = !m->root.bitmap_root;
	m->full = false;
}

static void smm_copy_root(struct tfs_sm *sm, void *root32)
{
	memset(root32, 0, sizeof(struct tfs_disk_sm_root));
	tfs_sm_root_pack(&to_smm(sm)->root, root32);
}

static void smm_destroy(struct tfs_sm *sm)
{
	struct smm *m = to_smm(sm);

	if (!m)
		return;
	free(m->cur);
	free(m->committed);
	free(m->barrier);
	free(m->held);
	free(m->bms);
	free(m->ovf.slots);
	free(m->ovf_dirty);
	free(m);
}

static const struct tfs_sm_ops smm_ops = {
	.destroy = smm_destroy,
	.nr_blocks = smm_nr_blocks,
	.nr_free = smm_nr_free,
	.get_count = smm_get_count,
	.inc = smm_inc,
	.dec = smm_dec,
	.new_block = smm_new_block,
	.extend = smm_extend,
	.commit = smm_commit,
	.commit_durable = smm_commit_durable,
	.copy_root = smm_copy_root,
	.is_new = smm_is_new,
	.rollback = smm_rollback,
};

/* ---- construction ------------------------------------------------------ */

static int alloc_smm(struct tfs_bm *bm, struct smm **out)
{
	struct smm *m = calloc(1, sizeof(*m));
	int r;

	if (!m)
		return -ENOMEM;
	m->sm.ops = &smm_ops;
	m->bm = bm;
	r = ovf_init(&m->ovf, 64);
	if (r) {
		free(m);
		return r;
	}
	*out = m;
	return 0;
}

int tfs_smm_create(struct tfs_bm *bm, uint64_t nr_blocks, uint64_t reserved, struct tfs_sm **out)
{
	struct smm *m;
	uint64_t b;
	int r;

	if (nr_blocks == 0 || nr_blocks > TFS_MAX_METADATA_BLOCKS || reserved > nr_blocks)
		return -EINVAL;
	r = alloc_smm(bm, &m);
	if (r)
		return r;
	r = smm_extend(&m->sm, nr_blocks);
	if (r)
		goto err_destroy;
	for (b = 0; b < reserved; b++) {
		r = set_count(m, b, 0, 1);
		if (r)
			goto err_destroy;
	}
	m->reserved = reserved;
	m->alloc_hint = reserved;
	*out = &m->sm;
	return 0;

err_destroy:
	smm_destroy(&m->sm);
	return r;
}

void tfs_smm_bind(struct tfs_sm *sm, struct tfs_tm *tm)
{
	to_smm(sm)->tm = tm;
}

struct load_ctx {
	struct smm *m;
	int stale;
};

static int load_overflow_entry(void *ctx, const uint64_t *keys, const void *value)
{
	struct load_ctx *lc = ctx;
	struct smm *m = lc->m;
	uint64_t b = keys[0];
	uint32_t count = tfs_le32(value);
	struct ovf_entry *e;
	int r;

	if (b >= m->nr_blocks || count < 3) {
		tfs_err("%s: metadata ref-count tree holds block %llu with count %u (nr_blocks %llu)",
			dev_name(m), (unsigned long long)b, count, (unsigned long long)m->nr_blocks);
		return -EUCLEAN;
	}
	r = ovf_reserve_dirty(m);
	if (!r)
		r = ovf_get(&m->ovf, b, &e);
	if (r)
		return r;
	e->tree = e->disk = count;
	if (tfs_sm_bitmap_get(cur_words(m, (uint32_t)(b / ENTRIES)), (uint32_t)(b % ENTRIES)) == 3) {
		e->count = e->committed = count;
	} else {
		/* The bitmap has the truth; drop the stale entry at the next commit. */
		ovf_mark_dirty(m, e);
		m->changed = true;
		lc->stale++;
	}
	return 0;
}

/*
 * The ref-count btree is read with a transaction manager of our own: the
 * pool's is created only after this map exists.  Reading needs nothing
 * from the space map, so a short-lived tm is enough.
 */
static int load_overflow(struct smm *m)
{
	struct load_ctx lc = { .m = m };
	struct tfs_btree_info info;
	struct tfs_tm *tm;
	uint32_t k;
	int r;

	r = tfs_tm_create(m->bm, &m->sm, &tm);
	if (r)
		return r;
	m->tm = tm;
	rc_info(m, &info);
	r = tfs_btree_walk(&info, m->rc_root, load_overflow_entry, &lc);
	m->tm = NULL;
	tfs_tm_destroy(tm);
	if (r)
		return r;
	if (lc.stale)
		tfs_warn("%s: metadata ref-count tree has %d stale entries; dropped at next commit",
			 dev_name(m), lc.stale);

	for (k = 0; k < m->nr_bitmaps; k++) {
		uint32_t w;

		for (w = 0; w < WORDS; w++) {
			uint64_t ovf = tfs_sm_word_overflow(cur_words(m, k)[w]);

			while (ovf) {
				uint64_t b = (uint64_t)k * ENTRIES + w * TFS_ENTRIES_PER_WORD +
					     (uint64_t)__builtin_ctzll(ovf) / 2;
				struct ovf_entry *e = ovf_find(&m->ovf, b);

				if (!e || e->count < 3) {
					tfs_err("%s: metadata block %llu counted >= 3 but missing from the ref-count tree %llu",
						dev_name(m), (unsigned long long)b,
						(unsigned long long)m->rc_root);
					return -EUCLEAN;
				}
				ovf &= ovf - 1;
			}
		}
	}
	return 0;
}

int tfs_smm_open(struct tfs_bm *bm, const void *root32, struct tfs_sm **out)
{
	struct tfs_sm_root root;
	struct tfs_block *blk = NULL;
	struct smm *m;
	uint64_t allocated = 0;
	uint32_t k;
	int r;

	tfs_sm_root_unpack(root32, &root);
	r = alloc_smm(bm, &m);
	if (r)
		return r;
	if (root.nr_blocks == 0 || root.nr_blocks > TFS_MAX_METADATA_BLOCKS ||
	    root.bitmap_root == 0 || root.bitmap_root >= root.nr_blocks ||
	    root.ref_count_root == 0 || root.ref_count_root >= root.nr_blocks) {
		tfs_err("%s: bad metadata space map root (nr_blocks %llu, index %llu, ref-count tree %llu)",
			tfs_bdev_name(tfs_bm_bdev(bm)), (unsigned long long)root.nr_blocks,
			(unsigned long long)root.bitmap_root, (unsigned long long)root.ref_count_root);
		r = -EUCLEAN;
		goto err_destroy;
	}
	r = smm_extend(&m->sm, root.nr_blocks);
	if (r)
		goto err_destroy;

	r = tfs_bm_read_lock(bm, root.bitmap_root, &tfs_index_validator, &blk);
	if (r)
		goto err_destroy;
	for (k = 0; k < m->nr_bitmaps; k++) {
		const uint8_t *slot = (const uint8_t *)tfs_block_data(blk) +
				      offsetof(struct tfs_disk_metadata_index, index) +
				      k * sizeof(struct tfs_disk_index_entry);
		struct tfs_sm_index_entry ie;
		struct tfs_block *bb;
		uint32_t len = tfs_sm_bitmap_len(root.nr_blocks, k);
		uint64_t *words = cur_words(m, k);
		uint32_t w;

		tfs_sm_index_entry_unpack(slot, &ie);
		if (ie.blocknr == 0 || ie.blocknr >= root.nr_blocks) {
			tfs_err("%s: metadata space map index block %llu: bitmap %u at bad block %llu",
				dev_name(m), (unsigned long long)root.bitmap_root, k,
				(unsigned long long)ie.blocknr);
			r = -EUCLEAN;
			goto err_unlock;
		}
		r = tfs_bm_read_lock(bm, ie.blocknr, &tfs_bitmap_validator, &bb);
		if (r)
			goto err_unlock;
		memcpy(words, (const uint8_t *)tfs_block_data(bb) + TFS_SM_BITMAP_WORDS_OFFSET,
		       WORDS * sizeof(uint64_t));
		tfs_bm_unlock(bb);

		/* Entries past nr_blocks must be 0; ignore whatever a writer left there. */
		for (w = len / TFS_ENTRIES_PER_WORD; len < ENTRIES && w < WORDS; w++) {
			uint32_t first = w * TFS_ENTRIES_PER_WORD;

			if (first >= len)
				words[w] = 0;
			else
				words[w] &= (1ull << (2u * (len - first))) - 1;
		}
		memcpy(committed_words(m, k), words, WORDS * sizeof(uint64_t));
		tfs_sm_bitmap_used_mask(words, barrier_words(m, k));
		m->bms[k] = (struct bitmap_state){
			.loc = ie.blocknr,
			.committed_loc = ie.blocknr,
			.nr_free = tfs_sm_bitmap_count_free(words, 0, ENTRIES),
		};
		allocated += len - tfs_sm_bitmap_count_free(words, 0, len);
	}
	tfs_bm_unlock(blk);
	blk = NULL;

	m->nr_allocated = allocated;
	m->index_loc = root.bitmap_root;
	m->rc_root = root.ref_count_root;
	m->root = root;
	/* Summary fields are hints (0.9.0 tools write slightly off values); ours are exact. */
	m->root.nr_allocated = allocated;
	m->changed = false;
	r = load_overflow(m);
	if (r)
		goto err_destroy;
	*out = &m->sm;
	return 0;

err_unlock:
	tfs_bm_unlock(blk);
err_destroy:
	smm_destroy(&m->sm);
	return r;
}
