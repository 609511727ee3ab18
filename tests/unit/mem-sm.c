/* SPDX-License-Identifier: GPL-2.0-or-later */
/* In-memory metadata space map for unit tests (see mem-sm.h). */
#include "mem-sm.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct mem_sm {
	struct tfs_sm base;
	uint64_t nr_blocks;
	uint32_t *count;
	uint32_t *committed;
	uint64_t cursor; /* where the next allocation search starts */
	uint64_t errors;
	uint64_t allocs_left; /* fault injection: successes before -ENOSPC */
};

static struct mem_sm *to_mem(struct tfs_sm *sm)
{
	return (struct mem_sm *)sm;
}

static void mem_destroy(struct tfs_sm *sm)
{
	struct mem_sm *m = to_mem(sm);

	free(m->count);
	free(m->committed);
	free(m);
}

static uint64_t mem_nr_blocks(struct tfs_sm *sm)
{
	return to_mem(sm)->nr_blocks;
}

static uint64_t mem_nr_free(struct tfs_sm *sm)
{
	struct mem_sm *m = to_mem(sm);
	uint64_t n = 0;

	for (uint64_t b = 0; b < m->nr_blocks; b++)
		n += m->count[b] == 0;
	return n;
}

static int mem_get_count(struct tfs_sm *sm, uint64_t b, uint32_t *count)
{
	struct mem_sm *m = to_mem(sm);

	if (b >= m->nr_blocks) {
		m->errors++;
		return -EINVAL;
	}
	*count = m->count[b];
	return 0;
}

static int mem_inc(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	struct mem_sm *m = to_mem(sm);

	if (b >= m->nr_blocks) {
		m->errors++;
		return -EINVAL;
	}
	m->count[b] += n;
	return 0;
}

static int mem_dec(struct tfs_sm *sm, uint64_t b, uint32_t n)
{
	struct mem_sm *m = to_mem(sm);

	if (b >= m->nr_blocks || m->count[b] < n) {
		m->errors++;
		return -EINVAL;
	}
	m->count[b] -= n;
	return 0;
}

static int mem_new_block(struct tfs_sm *sm, uint64_t *out)
{
	struct mem_sm *m = to_mem(sm);

	if (m->allocs_left == 0)
		return -ENOSPC;
	for (uint64_t i = 0; i < m->nr_blocks; i++) {
		uint64_t b = (m->cursor + i) % m->nr_blocks;

		/* Free now and at the last commit: the committed state stays intact. */
		if (!m->count[b] && !m->committed[b]) {
			m->count[b] = 1;
			m->cursor = b + 1;
			if (m->allocs_left != UINT64_MAX)
				m->allocs_left--;
			*out = b;
			return 0;
		}
	}
	return -ENOSPC;
}

static int mem_extend(struct tfs_sm *sm, uint64_t extra)
{
	struct mem_sm *m = to_mem(sm);
	uint64_t nr = m->nr_blocks + extra;
	uint32_t *c = realloc(m->count, nr * sizeof(*c));
	uint32_t *k;

	if (!c)
		return -ENOMEM;
	m->count = c;
	k = realloc(m->committed, nr * sizeof(*k));
	if (!k)
		return -ENOMEM;
	m->committed = k;
	memset(c + m->nr_blocks, 0, extra * sizeof(*c));
	memset(k + m->nr_blocks, 0, extra * sizeof(*k));
	m->nr_blocks = nr;
	return 0;
}

static int mem_commit(struct tfs_sm *sm)
{
	(void)sm;
	return 0;
}

static void mem_commit_durable(struct tfs_sm *sm)
{
	(void)sm;
}

static void mem_copy_root(struct tfs_sm *sm, void *root32)
{
	(void)sm;
	memset(root32, 0, 32);
}

static bool mem_is_new(struct tfs_sm *sm, uint64_t b)
{
	struct mem_sm *m = to_mem(sm);

	return b < m->nr_blocks && m->committed[b] == 0;
}

static void mem_rollback(struct tfs_sm *sm)
{
	struct mem_sm *m = to_mem(sm);

	memcpy(m->count, m->committed, m->nr_blocks * sizeof(*m->count));
}

static const struct tfs_sm_ops mem_sm_ops = {
	.destroy = mem_destroy,
	.nr_blocks = mem_nr_blocks,
	.nr_free = mem_nr_free,
	.get_count = mem_get_count,
	.inc = mem_inc,
	.dec = mem_dec,
	.new_block = mem_new_block,
	.extend = mem_extend,
	.commit = mem_commit,
	.commit_durable = mem_commit_durable,
	.copy_root = mem_copy_root,
	.is_new = mem_is_new,
	.rollback = mem_rollback,
};

int mem_sm_create(uint64_t nr_blocks, uint64_t reserved, struct tfs_sm **out)
{
	struct mem_sm *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->base.ops = &mem_sm_ops;
	m->nr_blocks = nr_blocks;
	m->allocs_left = UINT64_MAX;
	m->count = calloc(nr_blocks, sizeof(*m->count));
	m->committed = calloc(nr_blocks, sizeof(*m->committed));
	if (!m->count || !m->committed) {
		mem_destroy(&m->base);
		return -ENOMEM;
	}
	for (uint64_t b = 0; b < reserved && b < nr_blocks; b++)
		m->count[b] = m->committed[b] = 1;
	*out = &m->base;
	return 0;
}

void mem_sm_checkpoint(struct tfs_sm *sm)
{
	struct mem_sm *m = to_mem(sm);

	memcpy(m->committed, m->count, m->nr_blocks * sizeof(*m->count));
}

uint32_t mem_sm_count(struct tfs_sm *sm, uint64_t b)
{
	struct mem_sm *m = to_mem(sm);

	return b < m->nr_blocks ? m->count[b] : 0;
}

uint64_t mem_sm_nr_allocated(struct tfs_sm *sm)
{
	return to_mem(sm)->nr_blocks - mem_nr_free(sm);
}

void mem_sm_fail_after(struct tfs_sm *sm, uint64_t n)
{
	to_mem(sm)->allocs_left = n;
}

uint64_t mem_sm_errors(struct tfs_sm *sm)
{
	return to_mem(sm)->errors;
}
