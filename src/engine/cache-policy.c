/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The cache target's mapping and smq bookkeeping (cache-policy.h). */
#include "cache-policy.h"

#include <errno.h>
#include <stdlib.h>

#define NONE UINT32_MAX
#define UNMAPPED UINT64_MAX
/* Uncached hits that make a block a promotion candidate: used more than once. */
#define PROMOTE_HITS 2u
#define QUEUE_MAX 256u
#define HITS_MAX 0x7fffffffu

enum cb_state { CB_FREE, CB_RESERVED, CB_MAPPED };

struct hot {
	uint64_t oblock; /* UNMAPPED: empty slot */
	uint32_t hits;
	bool queued;
};

struct tfs_cache_policy_state {
	uint32_t nr_cblocks, nr_free, nr_dirty;
	uint64_t *oblock;   /* per cache block */
	uint32_t *hits;     /* per cache block */
	uint32_t *next;     /* hash chain, per cache block */
	uint8_t *state;     /* enum cb_state */
	uint8_t *dirty;
	uint32_t *buckets;  /* nr_buckets: a power of two */
	uint32_t nr_buckets;
	uint32_t free_cursor;
	uint64_t wb_cursor; /* origin order of writebacks */
	struct hot *hot;    /* nr_hot: a power of two */
	uint32_t nr_hot;
	uint64_t queue[QUEUE_MAX];
	uint32_t q_head, q_len;
	uint64_t accesses, age_every;
};

static uint32_t hash64(uint64_t x, uint32_t n)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	return (uint32_t)x & (n - 1);
}

static uint32_t pow2_at_least(uint64_t n)
{
	uint32_t p = 1024;

	while (p < n && p < (1u << 30))
		p <<= 1;
	return p;
}

int tfs_cache_policy_create(uint32_t nr_cblocks, struct tfs_cache_policy_state **out)
{
	struct tfs_cache_policy_state *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->nr_cblocks = p->nr_free = nr_cblocks;
	p->nr_buckets = pow2_at_least(nr_cblocks);
	p->nr_hot = pow2_at_least((uint64_t)nr_cblocks * 2);
	p->age_every = p->nr_hot > 4096 ? p->nr_hot : 4096;
	p->oblock = malloc(sizeof(*p->oblock) * (nr_cblocks + 1));
	p->hits = calloc(nr_cblocks + 1, sizeof(*p->hits));
	p->next = malloc(sizeof(*p->next) * (nr_cblocks + 1));
	p->state = calloc(nr_cblocks + 1, 1);
	p->dirty = calloc(nr_cblocks + 1, 1);
	p->buckets = malloc(sizeof(*p->buckets) * p->nr_buckets);
	p->hot = malloc(sizeof(*p->hot) * p->nr_hot);
	if (!p->oblock || !p->hits || !p->next || !p->state || !p->dirty || !p->buckets ||
	    !p->hot) {
		tfs_cache_policy_destroy(p);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < nr_cblocks; i++)
		p->oblock[i] = UNMAPPED;
	for (uint32_t i = 0; i < p->nr_buckets; i++)
		p->buckets[i] = NONE;
	for (uint32_t i = 0; i < p->nr_hot; i++)
		p->hot[i] = (struct hot){ .oblock = UNMAPPED };
	*out = p;
	return 0;
}

void tfs_cache_policy_destroy(struct tfs_cache_policy_state *p)
{
	if (!p)
		return;
	free(p->oblock);
	free(p->hits);
	free(p->next);
	free(p->state);
	free(p->dirty);
	free(p->buckets);
	free(p->hot);
	free(p);
}

uint32_t tfs_cache_policy_lookup(struct tfs_cache_policy_state *p, uint64_t ob)
{
	for (uint32_t cb = p->buckets[hash64(ob, p->nr_buckets)]; cb != NONE; cb = p->next[cb])
		if (p->oblock[cb] == ob)
			return cb;
	return NONE;
}

uint64_t tfs_cache_policy_oblock(struct tfs_cache_policy_state *p, uint32_t cb)
{
	return cb < p->nr_cblocks ? p->oblock[cb] : UNMAPPED;
}

bool tfs_cache_policy_dirty(struct tfs_cache_policy_state *p, uint32_t cb)
{
	return p->dirty[cb];
}

void tfs_cache_policy_set_dirty(struct tfs_cache_policy_state *p, uint32_t cb, bool dirty)
{
	if (p->state[cb] != CB_MAPPED || p->dirty[cb] == dirty)
		return;
	p->dirty[cb] = dirty;
	if (dirty)
		p->nr_dirty++;
	else
		p->nr_dirty--;
}

uint32_t tfs_cache_policy_hits(struct tfs_cache_policy_state *p, uint32_t cb)
{
	return p->hits[cb];
}

uint32_t tfs_cache_policy_nr_free(struct tfs_cache_policy_state *p)
{
	return p->nr_free;
}

uint32_t tfs_cache_policy_nr_dirty(struct tfs_cache_policy_state *p)
{
	return p->nr_dirty;
}

uint32_t tfs_cache_policy_take_free(struct tfs_cache_policy_state *p)
{
	if (!p->nr_free)
		return NONE;
	for (uint32_t n = 0; n < p->nr_cblocks; n++) {
		uint32_t cb = (p->free_cursor + n) % p->nr_cblocks;

		if (p->state[cb] == CB_FREE) {
			p->state[cb] = CB_RESERVED;
			p->nr_free--;
			p->free_cursor = cb + 1;
			return cb;
		}
	}
	return NONE;
}

void tfs_cache_policy_put_free(struct tfs_cache_policy_state *p, uint32_t cb)
{
	if (p->state[cb] != CB_RESERVED)
		return;
	p->state[cb] = CB_FREE;
	p->nr_free++;
}

void tfs_cache_policy_insert(struct tfs_cache_policy_state *p, uint32_t cb, uint64_t ob,
			     bool dirty, uint32_t hits)
{
	uint32_t b = hash64(ob, p->nr_buckets);

	if (p->state[cb] == CB_MAPPED)
		tfs_cache_policy_remove(p, cb);
	if (p->state[cb] == CB_FREE)
		p->nr_free--;
	p->state[cb] = CB_MAPPED;
	p->oblock[cb] = ob;
	p->hits[cb] = hits > HITS_MAX ? HITS_MAX : hits;
	p->dirty[cb] = false;
	tfs_cache_policy_set_dirty(p, cb, dirty);
	p->next[cb] = p->buckets[b];
	p->buckets[b] = cb;
}

void tfs_cache_policy_remove(struct tfs_cache_policy_state *p, uint32_t cb)
{
	uint32_t *link;

	if (p->state[cb] != CB_MAPPED)
		return;
	for (link = &p->buckets[hash64(p->oblock[cb], p->nr_buckets)]; *link != cb;
	     link = &p->next[*link])
		;
	*link = p->next[cb];
	tfs_cache_policy_set_dirty(p, cb, false);
	p->state[cb] = CB_FREE;
	p->oblock[cb] = UNMAPPED;
	p->hits[cb] = 0;
	p->nr_free++;
}

/* Halve every count: recent use weighs more than old use. */
static void age(struct tfs_cache_policy_state *p)
{
	for (uint32_t i = 0; i < p->nr_cblocks; i++)
		p->hits[i] >>= 1;
	for (uint32_t i = 0; i < p->nr_hot; i++)
		p->hot[i].hits >>= 1;
}

bool tfs_cache_policy_access(struct tfs_cache_policy_state *p, uint64_t ob, uint32_t cb,
			     bool may_promote)
{
	struct hot *h;

	if (++p->accesses % p->age_every == 0)
		age(p);
	if (cb != NONE) {
		if (p->hits[cb] < HITS_MAX)
			p->hits[cb]++;
		return false;
	}
	h = &p->hot[hash64(ob, p->nr_hot)];
	if (h->oblock != ob) {
		/* A busier block keeps its slot a while: it loses a hit per challenger. */
		if (h->oblock != UNMAPPED && h->hits > 1 && !h->queued) {
			h->hits--;
			return false;
		}
		if (h->queued)
			return false;
		*h = (struct hot){ .oblock = ob };
	}
	if (h->hits < HITS_MAX)
		h->hits++;
	if (!may_promote || h->queued || h->hits < PROMOTE_HITS || p->q_len == QUEUE_MAX)
		return false;
	h->queued = true;
	p->queue[(p->q_head + p->q_len++) % QUEUE_MAX] = ob;
	return true;
}

bool tfs_cache_policy_pop_candidate(struct tfs_cache_policy_state *p, uint64_t *ob)
{
	struct hot *h;

	if (!p->q_len)
		return false;
	*ob = p->queue[p->q_head];
	p->q_head = (p->q_head + 1) % QUEUE_MAX;
	p->q_len--;
	h = &p->hot[hash64(*ob, p->nr_hot)];
	if (h->oblock == *ob)
		h->queued = false;
	return true;
}

uint32_t tfs_cache_policy_candidate_hits(struct tfs_cache_policy_state *p, uint64_t ob)
{
	struct hot *h = &p->hot[hash64(ob, p->nr_hot)];

	return h->oblock == ob ? h->hits : 0;
}

uint32_t tfs_cache_policy_coldest_clean(struct tfs_cache_policy_state *p, uint32_t hotter_than)
{
	uint32_t best = NONE;

	for (uint32_t cb = 0; cb < p->nr_cblocks; cb++)
		if (p->state[cb] == CB_MAPPED && !p->dirty[cb] &&
		    (best == NONE || p->hits[cb] < p->hits[best]))
			best = cb;
	return best != NONE && p->hits[best] < hotter_than ? best : NONE;
}

uint32_t tfs_cache_policy_next_dirty(struct tfs_cache_policy_state *p)
{
	uint32_t best = NONE, lowest = NONE;

	if (!p->nr_dirty)
		return NONE;
	for (uint32_t cb = 0; cb < p->nr_cblocks; cb++) {
		if (p->state[cb] != CB_MAPPED || !p->dirty[cb])
			continue;
		if (lowest == NONE || p->oblock[cb] < p->oblock[lowest])
			lowest = cb;
		if (p->oblock[cb] >= p->wb_cursor &&
		    (best == NONE || p->oblock[cb] < p->oblock[best]))
			best = cb;
	}
	if (best == NONE)
		best = lowest;
	if (best != NONE)
		p->wb_cursor = p->oblock[best] + 1;
	return best;
}
