/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Per-thread scratch buffers.
 *
 * Why not malloc: a request of the data path needs buffers of up to 1 MiB
 * (a read's reply, a block being built, an O_DIRECT staging copy).  Once
 * such a buffer has been freed, glibc raises its mmap threshold and serves
 * the next ones from the calling thread's arena, where freed 1 MiB chunks
 * stay resident; with dozens of FUSE workers, each in its own arena, that
 * was most of the daemon's memory (bench/README.md, "max_threads").  Here
 * each thread maps its buffers itself and reuses them, so a worker holds
 * at most TFS_SCRATCH_SLOTS buffers of the largest size it has served.
 *
 * Why thread-local: the buffers are per thread by nature (a worker's
 * request is served on that worker), so keeping them in the thread needs no
 * lock and is not state shared between threads.  The only process-wide
 * objects are the key and its once-flag, set once and never changed: the
 * key exists so that its destructor unmaps a thread's buffers when the
 * thread ends (libfuse ends idle workers, and new ones start in bursts).
 *
 * Nesting: a thread holds at most two buffers at once on the data path
 * (the reply or a block being built, then the device's staging copy below
 * it), hence two slots.  A deeper get still works, with a buffer of its own.
 */
#include "scratch.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/mman.h>

struct slot {
	void *buf;
	size_t cap;
	bool busy;
};

struct scratch {
	struct slot slot[TFS_SCRATCH_SLOTS];
	bool registered;
};

static _Thread_local struct scratch mine;
static pthread_key_t exit_key;
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;
static bool exit_key_ok;

static void release(void *arg)
{
	struct scratch *s = arg;

	for (unsigned i = 0; i < TFS_SCRATCH_SLOTS; i++) {
		if (s->slot[i].buf && !s->slot[i].busy)
			munmap(s->slot[i].buf, s->slot[i].cap);
		s->slot[i] = (struct slot){ 0 };
	}
	s->registered = false;
}

static void make_key(void)
{
	exit_key_ok = pthread_key_create(&exit_key, release) == 0;
}

static void *map(size_t len)
{
	void *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return b == MAP_FAILED ? NULL : b;
}

static size_t round_up(size_t size)
{
	return (size + TFS_SCRATCH_ALIGN - 1) & ~(TFS_SCRATCH_ALIGN - 1);
}

/*
 * The free slot to use for size: one that holds it already, else the
 * largest free one (to be regrown), else NULL.
 */
static struct slot *pick(struct scratch *s, size_t size)
{
	struct slot *best = NULL;

	for (unsigned i = 0; i < TFS_SCRATCH_SLOTS; i++) {
		struct slot *t = &s->slot[i];

		if (t->busy)
			continue;
		if (t->cap >= size)
			return t;
		if (!best || t->cap > best->cap)
			best = t;
	}
	return best;
}

void *tfs_scratch_get(size_t size)
{
	struct scratch *s = &mine;
	size_t len = round_up(size ? size : 1);
	struct slot *t;

	if (len > TFS_SCRATCH_MAX)
		return map(len);
	if (!s->registered) {
		/* Without the key the buffers would outlive the thread: do not keep them. */
		pthread_once(&exit_once, make_key);
		if (!exit_key_ok || pthread_setspecific(exit_key, s))
			return map(len);
		s->registered = true;
	}
	t = pick(s, len);
	if (!t)
		return map(len);
	if (t->cap < len) {
		void *b = map(len);

		if (!b)
			return NULL;
		if (t->buf)
			munmap(t->buf, t->cap);
		t->buf = b;
		t->cap = len;
	}
	t->busy = true;
	return t->buf;
}

void tfs_scratch_put(void *buf, size_t size)
{
	struct scratch *s = &mine;

	if (!buf)
		return;
	for (unsigned i = 0; i < TFS_SCRATCH_SLOTS; i++) {
		if (s->slot[i].buf == buf) {
			s->slot[i].busy = false;
			return;
		}
	}
	munmap(buf, round_up(size ? size : 1));
}

size_t tfs_scratch_kept(void)
{
	size_t n = 0;

	for (unsigned i = 0; i < TFS_SCRATCH_SLOTS; i++)
		n += mine.slot[i].cap;
	return n;
}
