/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Shadowing and commit.  "New in this transaction" is asked of the metadata
 * space map (count 0 in the committed state), so the transaction manager
 * keeps no set of its own and nothing to clear at commit.
 */
#include "transaction-manager.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "block-manager.h"
#include "format.h"
#include "log.h"
#include "space-map.h"

struct tfs_tm {
	struct tfs_bm *bm;
	struct tfs_sm *sm;
};

int tfs_tm_create(struct tfs_bm *bm, struct tfs_sm *sm, struct tfs_tm **out)
{
	struct tfs_tm *tm;

	if (!sm->ops->is_new || !sm->ops->rollback || !sm->ops->commit_durable)
		return -EINVAL;
	tm = calloc(1, sizeof(*tm));
	if (!tm)
		return -ENOMEM;
	tm->bm = bm;
	tm->sm = sm;
	*out = tm;
	return 0;
}

void tfs_tm_destroy(struct tfs_tm *tm)
{
	free(tm);
}

struct tfs_bm *tfs_tm_bm(struct tfs_tm *tm)
{
	return tm->bm;
}

struct tfs_sm *tfs_tm_sm(struct tfs_tm *tm)
{
	return tm->sm;
}

int tfs_tm_new_block(struct tfs_tm *tm, const struct tfs_block_validator *v, struct tfs_block **out)
{
	uint64_t b;
	int r;

	r = tfs_sm_new_block(tm->sm, &b);
	if (r)
		return r;
	r = tfs_bm_write_lock_zero(tm->bm, b, v, out);
	if (r)
		tfs_sm_dec(tm->sm, b);
	return r;
}

static int copy_block(struct tfs_tm *tm, uint64_t orig, const struct tfs_block_validator *v,
		      struct tfs_block **out)
{
	struct tfs_block *src, *dst;
	uint64_t b;
	int r;

	r = tfs_sm_new_block(tm->sm, &b);
	if (r)
		return r;
	r = tfs_bm_read_lock(tm->bm, orig, v, &src);
	if (r)
		goto err_dec;
	r = tfs_bm_write_lock_zero(tm->bm, b, v, &dst);
	if (r) {
		tfs_bm_unlock(src);
		goto err_dec;
	}
	memcpy(tfs_block_data(dst), tfs_block_data(src), TFS_BLOCK_SIZE);
	tfs_bm_unlock(src);
	*out = dst;
	return 0;

err_dec:
	tfs_sm_dec(tm->sm, b);
	return r;
}

int tfs_tm_shadow(struct tfs_tm *tm, uint64_t orig, const struct tfs_block_validator *v,
		  struct tfs_block **out, bool *inc_children)
{
	uint32_t count;
	int r;

	r = tfs_sm_get_count(tm->sm, orig, &count);
	if (r)
		return r;
	if (count == 0) {
		tfs_err("%s: metadata block %llu is referenced but counted free",
			tfs_bdev_name(tfs_bm_bdev(tm->bm)), (unsigned long long)orig);
		return -EUCLEAN;
	}
	*inc_children = count > 1;
	if (count == 1 && tm->sm->ops->is_new(tm->sm, orig))
		return tfs_bm_write_lock(tm->bm, orig, v, out);

	r = copy_block(tm, orig, v, out);
	if (r)
		return r;
	/* The original loses the parent that now points at the copy. */
	r = tfs_sm_dec(tm->sm, orig);
	if (r) {
		tfs_bm_unlock(*out);
		return r;
	}
	/*
	 * Freed, and committed (a new one would have been written in place):
	 * every commit moves what it changes to new blocks, so without this the
	 * cache fills with stale copies of freed blocks up to its budget, however
	 * small the live metadata is.  An abort reads it again from the disk.
	 */
	if (count == 1)
		tfs_bm_drop_clean(tm->bm, orig);
	return 0;
}

int tfs_tm_read_lock(struct tfs_tm *tm, uint64_t b, const struct tfs_block_validator *v,
		     struct tfs_block **out)
{
	return tfs_bm_read_lock(tm->bm, b, v, out);
}

int tfs_tm_prefetch(struct tfs_tm *tm, const uint64_t *blocks, size_t n)
{
	return tfs_bm_prefetch(tm->bm, blocks, n);
}

void tfs_tm_unlock(struct tfs_tm *tm, struct tfs_block *b)
{
	(void)tm;
	tfs_bm_unlock(b);
}

int tfs_tm_inc(struct tfs_tm *tm, uint64_t b)
{
	return tfs_sm_inc(tm->sm, b);
}

int tfs_tm_dec(struct tfs_tm *tm, uint64_t b)
{
	uint32_t count = 0;
	bool was_new = tm->sm->ops->is_new(tm->sm, b);
	int r = tfs_sm_dec(tm->sm, b);

	if (r)
		return r;
	if (tfs_sm_get_count(tm->sm, b, &count) || count != 0)
		return 0;
	/* A block born and freed in this transaction need never reach the disk. */
	if (was_new)
		tfs_bm_forget(tm->bm, b);
	else
		tfs_bm_drop_clean(tm->bm, b); /* as in tfs_tm_shadow */
	return 0;
}

int tfs_tm_ref(struct tfs_tm *tm, uint64_t b, uint32_t *count)
{
	return tfs_sm_get_count(tm->sm, b, count);
}

/*
 * The commit order, and the only place it is written down:
 *   1. the metadata space map writes its bitmaps, ref-count tree and index
 *      block into the transaction (new locations, never the committed ones);
 *   2. the caller puts the resulting space-map root into the superblock;
 *   3. every dirty metadata block except the superblock is written;
 *   4. flush, so all of them are stable before anything points at them;
 *   5. the superblock is written (one sector holds all its live fields);
 *   6. flush, so the new transaction is durable when we return.
 * A crash before 5 leaves the old superblock and the old blocks it reaches.
 * Steps 1-2 are tfs_tm_commit_begin, 3-6 tfs_tm_commit_write (3-4 and 5-6
 * apart: tfs_tm_commit_write_blocks and _super).
 */
struct tfs_tm_commit {
	struct tfs_block *sb;
	struct tfs_bm_batch *blocks, *super;
};

int tfs_tm_commit_begin(struct tfs_tm *tm, struct tfs_block *sb,
			void (*fill_sm_root)(void *ctx, void *sb_data), void *ctx,
			struct tfs_tm_commit **out)
{
	struct tfs_tm_commit *c = calloc(1, sizeof(*c));
	int r = -ENOMEM;

	if (!c)
		goto err_unlock;
	r = tfs_sm_commit(tm->sm);
	if (r)
		goto err_free;
	fill_sm_root(ctx, tfs_block_data(sb));
	r = tfs_bm_batch_dirty(tm->bm, &c->blocks);
	if (r)
		goto err_free;
	r = tfs_bm_batch_one(tm->bm, sb, &c->super);
	if (r)
		goto err_end_blocks;
	c->sb = sb;
	*out = c;
	return 0;

err_end_blocks:
	tfs_bm_batch_end(tm->bm, c->blocks, false);
err_free:
	free(c);
err_unlock:
	tfs_bm_unlock(sb);
	return r;
}

int tfs_tm_commit_write_blocks(struct tfs_tm_commit *c)
{
	return tfs_bm_batch_write(c->blocks);
}

int tfs_tm_commit_write_super(struct tfs_tm_commit *c)
{
	return tfs_bm_batch_write(c->super);
}

int tfs_tm_commit_write(struct tfs_tm_commit *c)
{
	int r = tfs_tm_commit_write_blocks(c);

	return r ? r : tfs_tm_commit_write_super(c);
}

int tfs_tm_commit_end(struct tfs_tm *tm, struct tfs_tm_commit *c, int r)
{
	tfs_bm_batch_end(tm->bm, c->blocks, !r);
	tfs_bm_batch_end(tm->bm, c->super, !r);
	tfs_bm_unlock(c->sb);
	free(c);
	/* The superblock is on disk: what the state before it used is free to reuse. */
	if (!r)
		tfs_sm_commit_durable(tm->sm);
	return r;
}

int tfs_tm_commit(struct tfs_tm *tm, struct tfs_block *sb,
		  void (*fill_sm_root)(void *ctx, void *sb_data), void *ctx)
{
	struct tfs_tm_commit *c;
	int r = tfs_tm_commit_begin(tm, sb, fill_sm_root, ctx, &c);

	return r ? r : tfs_tm_commit_end(tm, c, tfs_tm_commit_write(c));
}

void tfs_tm_abort(struct tfs_tm *tm)
{
	tm->sm->ops->rollback(tm->sm);
	tfs_bm_invalidate(tm->bm);
}
