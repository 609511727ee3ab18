/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * meta-bench - throughput of the metadata engine (src/meta/thin-metadata.h).
 *
 * Formats a pool on a sparse file (or in memory with --mem), then:
 *   - inserts N sequential mappings into device 1 and N random ones into
 *     device 2, committing every --commit-every inserts, allocating each data
 *     block with tfs_pmd_alloc_data_block as the engine will, and reports
 *     how full the leaves of both trees are (tfs_thin_tree_shape);
 *   - reopens the pool (empty block cache; for a file, its page cache is
 *     dropped too) and times lookups cold, then the same lookups warm;
 *   - times snapshot creation of devices holding 10k, 100k and N mappings
 *     (it must not grow with the mapping count), then deleting snapshots
 *     (shared tree) and the origins (whole tree released);
 *   - reports peak RSS (getrusage) with the cache size given (default:
 *     the block manager's default).
 * Results are printed as a markdown table; every lookup is checked.
 *
 * Not a test: it prints figures for bench/README.md.  Exits 1 on any error.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "block-manager.h"
#include "log.h"
#include "thin-metadata.h"

#define DEV_SEQ 1
#define DEV_RAND 2
#define DEV_10K 3
#define DEV_100K 4
#define SNAP_BASE 100
#define SNAP_REPEAT 5

struct config {
	uint64_t n;
	uint64_t commit_every;
	size_t cache_blocks; /* 0 = default */
	const char *path;
	bool mem;
	bool keep;
	uint64_t meta_bytes;
};

static struct config cfg = {
	.n = 1000000,
	.commit_every = 10000,
	.path = "meta-bench.img",
	.meta_bytes = 4ull << 30,
};

static struct tfs_bdev *dev;
static struct tfs_pmd *pmd;

static void die(const char *what, int r)
{
	fprintf(stderr, "meta-bench: %s: %s\n", what, strerror(r < 0 ? -r : r));
	exit(1);
}

#define CHECK(call)                      \
	do {                             \
		int r_ = (call);         \
		if (r_ < 0)              \
			die(#call, r_);  \
	} while (0)

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A bijection on [0, 2^32): the random insert order, reproducible. */
static uint64_t mix32(uint64_t i)
{
	uint32_t h = (uint32_t)i;

	h ^= h >> 16;
	h *= 0x7feb352du;
	h ^= h >> 15;
	h *= 0x846ca68bu;
	h ^= h >> 16;
	return h;
}

/* ---- results table ------------------------------------------------------ */

struct row {
	char what[128];
	char result[96];
};
static struct row rows[64];
static unsigned nrows;

static void __attribute__((format(printf, 2, 3))) row(const char *what, const char *fmt, ...)
{
	va_list ap;

	if (nrows == sizeof(rows) / sizeof(rows[0]))
		return;
	snprintf(rows[nrows].what, sizeof(rows[nrows].what), "%s", what);
	va_start(ap, fmt);
	vsnprintf(rows[nrows].result, sizeof(rows[nrows].result), fmt, ap);
	va_end(ap);
	fprintf(stderr, "  %-58s %s\n", rows[nrows].what, rows[nrows].result);
	nrows++;
}

/* 1234567 -> "1,234,567" */
static const char *grouped(uint64_t v, char *buf)
{
	char tmp[32];
	int len = snprintf(tmp, sizeof(tmp), "%" PRIu64, v), o = 0;

	for (int i = 0; i < len; i++) {
		if (i && (len - i) % 3 == 0)
			buf[o++] = ',';
		buf[o++] = tmp[i];
	}
	buf[o] = '\0';
	return buf;
}

static const char *count_label(uint64_t n, char *buf)
{
	if (n >= 1000000 && n % 1000000 == 0)
		snprintf(buf, 32, "%" PRIu64 "M", n / 1000000);
	else if (n >= 1000 && n % 1000 == 0)
		snprintf(buf, 32, "%" PRIu64 "k", n / 1000);
	else
		snprintf(buf, 32, "%" PRIu64, n);
	return buf;
}

static void rate_row(const char *what, uint64_t ops, double secs, const char *unit)
{
	char b[32];

	row(what, "%s %s/s (%.2f s)", grouped((uint64_t)(ops / secs), b), unit, secs);
}

static void commits_row(uint64_t n, double total, double commits)
{
	char b[32];

	row("  of which commits", "%.2f s (%" PRIu64 " commits); without them %s inserts/s", commits,
	    n / cfg.commit_every, grouped((uint64_t)(n / (total - commits)), b));
}

static const char *fmt_time(double secs, char *buf)
{
	if (secs < 1e-3)
		snprintf(buf, 32, "%.1f µs", secs * 1e6);
	else if (secs < 1.0)
		snprintf(buf, 32, "%.2f ms", secs * 1e3);
	else
		snprintf(buf, 32, "%.2f s", secs);
	return buf;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, unsigned n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* ---- pool ----------------------------------------------------------------- */

static struct tfs_pmd_options pool_options(void)
{
	return (struct tfs_pmd_options){
		.data_block_sectors = 128, /* 64 KiB */
		.nr_data_blocks = 2 * cfg.n + 200000,
		.cache_blocks = cfg.cache_blocks,
	};
}

static void open_device(void)
{
	if (cfg.mem) {
		CHECK(tfs_bdev_open_mem(cfg.meta_bytes, &dev));
		return;
	}
	int fd = open(cfg.path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(cfg.path, -errno);
	if (ftruncate(fd, (off_t)cfg.meta_bytes))
		die("ftruncate", -errno);
	close(fd);
	CHECK(tfs_bdev_open(cfg.path, false, &dev));
}

/* Close the pool and open it again: an empty block cache, and for a file
 * the kernel's page cache of it dropped as well, so "cold" means disk. */
static void reopen_cold(void)
{
	struct tfs_pmd_options opt = pool_options();

	CHECK(tfs_pmd_commit(pmd));
	tfs_pmd_close(pmd);
	pmd = NULL;
	if (!cfg.mem) {
		tfs_bdev_close(dev);
		int fd = open(cfg.path, O_RDONLY);
		if (fd < 0)
			die(cfg.path, -errno);
		fdatasync(fd);
		posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
		close(fd);
		CHECK(tfs_bdev_open(cfg.path, false, &dev));
	}
	CHECK(tfs_pmd_open(dev, &opt, &pmd));
}

/* ---- phases --------------------------------------------------------------- */

/* Key of the i-th insert into device id. */
static uint64_t key_of(tfs_dev_id id, uint64_t i)
{
	return id == DEV_RAND ? mix32(i) : i;
}

/*
 * Insert n mappings into a new device, committing every commit_every.
 * Returns the wall time; *sum gets the sum of the data blocks mapped (the
 * lookups check it) and *commit_secs the part spent committing.
 */
static double fill(tfs_dev_id id, uint64_t n, uint64_t *sum, double *commit_secs)
{
	struct tfs_td *td;
	double t0, tc = 0;

	CHECK(tfs_pmd_create_thin(pmd, id));
	CHECK(tfs_pmd_open_thin(pmd, id, &td));
	*sum = 0;
	t0 = now();
	for (uint64_t i = 0; i < n; i++) {
		uint64_t b;

		CHECK(tfs_pmd_alloc_data_block(pmd, &b));
		CHECK(tfs_thin_insert(td, key_of(id, i), b));
		*sum += b;
		if ((i + 1) % cfg.commit_every == 0) {
			double c = now();

			CHECK(tfs_pmd_commit(pmd));
			tc += now() - c;
		}
	}
	tfs_pmd_close_thin(td);
	double c = now();
	CHECK(tfs_pmd_commit(pmd));
	tc += now() - c;
	if (commit_secs)
		*commit_secs = tc;
	t0 = now() - t0;
	struct tfs_thin_details d;
	CHECK(tfs_pmd_device_details(pmd, id, &d));
	if (d.mapped_blocks != n) {
		fprintf(stderr, "meta-bench: device %u: mapped_blocks %" PRIu64 ", expected %" PRIu64 "\n",
			id, d.mapped_blocks, n);
		exit(1);
	}
	return t0;
}

/* How full device id's leaves are: a commit after random inserts rewrites most of them. */
static void shape_row(tfs_dev_id id, const char *what)
{
	struct tfs_thin_tree_shape sh;
	struct tfs_td *td;
	char b[32];

	CHECK(tfs_pmd_open_thin(pmd, id, &td));
	CHECK(tfs_thin_tree_shape(td, &sh));
	tfs_pmd_close_thin(td);
	row(what, "%.1f%% (%s leaves of %u, %" PRIu64 " internal nodes, depth %u)",
	    sh.leaves ? 100.0 * (double)sh.mappings / ((double)sh.leaves * sh.leaf_capacity) : 0.0,
	    grouped(sh.leaves, b), sh.leaf_capacity, sh.internal_nodes, sh.depth);
}

/* Look up every key of device id in insert order; checks all are mapped. */
static double lookup_all(tfs_dev_id id, uint64_t n, uint64_t expect_sum)
{
	struct tfs_td *td;
	struct tfs_thin_mapping m;
	uint64_t sum = 0;
	double t0;

	CHECK(tfs_pmd_open_thin(pmd, id, &td));
	t0 = now();
	for (uint64_t i = 0; i < n; i++) {
		CHECK(tfs_thin_lookup(td, key_of(id, i), &m));
		sum += m.data_block;
	}
	t0 = now() - t0;
	tfs_pmd_close_thin(td);
	if (sum != expect_sum) {
		fprintf(stderr, "meta-bench: device %u: lookups returned the wrong data blocks\n", id);
		exit(1);
	}
	return t0;
}

/* Read device id's mappings as runs of up to 1024 with tfs_thin_lookup_range. */
static double lookup_ranges(tfs_dev_id id, uint64_t n, uint64_t expect_sum)
{
	enum { RUN = 1024 };
	static struct tfs_thin_mapping m[RUN];
	struct tfs_td *td;
	uint64_t sum = 0, got = 0;
	double t0;

	CHECK(tfs_pmd_open_thin(pmd, id, &td));
	t0 = now();
	for (uint64_t v = 0; v < n; v += RUN) {
		int k = tfs_thin_lookup_range(td, v, v + RUN, RUN, m);

		if (k < 0)
			die("tfs_thin_lookup_range", k);
		for (int j = 0; j < k; j++)
			sum += m[j].data_block;
		got += (uint64_t)k;
	}
	t0 = now() - t0;
	tfs_pmd_close_thin(td);
	if (got != n || sum != expect_sum) {
		fprintf(stderr, "meta-bench: device %u: range lookups returned %" PRIu64
			" mappings, expected %" PRIu64 "\n", id, got, n);
		exit(1);
	}
	return t0;
}

struct origin {
	tfs_dev_id id;
	uint64_t n;
};

static void snapshots_and_deletes(const struct origin *o, unsigned no)
{
	double create[SNAP_REPEAT], with_commit[SNAP_REPEAT], del[SNAP_REPEAT];
	char what[128], b1[32], b2[32], lbl[32];
	tfs_dev_id next = SNAP_BASE;

	for (unsigned k = 0; k < no; k++) {
		for (unsigned r = 0; r < SNAP_REPEAT; r++) {
			double t0 = now(), t1, t2;

			CHECK(tfs_pmd_create_snap(pmd, next + r, o[k].id));
			t1 = now();
			CHECK(tfs_pmd_commit(pmd));
			t2 = now();
			create[r] = t1 - t0;
			with_commit[r] = t2 - t0;
		}
		struct tfs_thin_details d;
		CHECK(tfs_pmd_device_details(pmd, next, &d));
		if (d.mapped_blocks != o[k].n)
			die("snapshot's mapped_blocks", -EIO);
		snprintf(what, sizeof(what), "create snapshot of a device with %s mappings",
			 count_label(o[k].n, lbl));
		row(what, "%s (%s with commit)", fmt_time(median(create, SNAP_REPEAT), b1),
		    fmt_time(median(with_commit, SNAP_REPEAT), b2));
		next += SNAP_REPEAT;
	}

	/* Deleting a snapshot whose tree is still shared with its origin. */
	next = SNAP_BASE;
	for (unsigned k = 0; k < no; k++) {
		for (unsigned r = 0; r < SNAP_REPEAT; r++) {
			double t0 = now();

			CHECK(tfs_pmd_delete_thin(pmd, next + r));
			CHECK(tfs_pmd_commit(pmd));
			del[r] = now() - t0;
		}
		snprintf(what, sizeof(what), "delete a snapshot (tree shared, %s mappings) + commit",
			 count_label(o[k].n, lbl));
		row(what, "%s", fmt_time(median(del, SNAP_REPEAT), b1));
		next += SNAP_REPEAT;
	}

	/* Deleting the origins, now sole owners: every node and data block released. */
	for (unsigned k = 0; k < no; k++) {
		struct tfs_pmd_space before, after;
		double t0, t1, t2;

		tfs_pmd_space(pmd, &before);
		t0 = now();
		CHECK(tfs_pmd_delete_thin(pmd, o[k].id));
		t1 = now();
		CHECK(tfs_pmd_commit(pmd));
		t2 = now();
		tfs_pmd_space(pmd, &after);
		if (after.data_free != before.data_free + o[k].n) {
			fprintf(stderr, "meta-bench: deleting device %u freed %" PRIu64
				" data blocks, expected %" PRIu64 "\n", o[k].id,
				after.data_free - before.data_free, o[k].n);
			exit(1);
		}
		snprintf(what, sizeof(what), "delete a device with %s mappings (tree released)",
			 count_label(o[k].n, lbl));
		row(what, "%s (%s with commit)", fmt_time(t1 - t0, b1), fmt_time(t2 - t0, b2));
	}
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: meta-bench [--n N] [--commit-every N] [--cache-blocks N]\n"
		"                  [--file PATH | --mem] [--keep]\n"
		"  --n N             mappings per device (default 1000000)\n"
		"  --commit-every N  commit after this many inserts (default 10000)\n"
		"  --cache-blocks N  block manager cache, 4 KiB blocks (default %u)\n"
		"  --file PATH       sparse metadata file (default ./meta-bench.img, removed after)\n"
		"  --mem             metadata in memory instead (counts in peak RSS)\n"
		"  --keep            keep the metadata file\n",
		TFS_BM_DEFAULT_CACHE_BLOCKS);
}

static void parse(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "n", required_argument, NULL, 'n' },
		{ "commit-every", required_argument, NULL, 'c' },
		{ "cache-blocks", required_argument, NULL, 'C' },
		{ "file", required_argument, NULL, 'f' },
		{ "mem", no_argument, NULL, 'm' },
		{ "keep", no_argument, NULL, 'k' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "n:c:C:f:mkh", opts, NULL)) != -1) {
		switch (c) {
		case 'n':
			cfg.n = strtoull(optarg, NULL, 0);
			break;
		case 'c':
			cfg.commit_every = strtoull(optarg, NULL, 0);
			break;
		case 'C':
			cfg.cache_blocks = strtoull(optarg, NULL, 0);
			break;
		case 'f':
			cfg.path = optarg;
			break;
		case 'm':
			cfg.mem = true;
			break;
		case 'k':
			cfg.keep = true;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			exit(2);
		}
	}
	if (optind != argc || cfg.n < 100000 || cfg.n > (1ull << 32) || !cfg.commit_every) {
		fprintf(stderr, "meta-bench: --n must be 100000 .. 2^32, --commit-every > 0\n");
		usage(stderr);
		exit(2);
	}
	/* ~100 bytes of metadata per mapping is plenty; at least 1 GiB, at most the format's cap. */
	uint64_t need = cfg.n * 2 * 100;
	cfg.meta_bytes = need < (1ull << 30) ? (1ull << 30) : need;
	if (cfg.meta_bytes > 4161600ull * 4096)
		cfg.meta_bytes = 4161600ull * 4096;
}

int main(int argc, char **argv)
{
	struct tfs_pmd_options opt;
	struct tfs_pmd_space sp;
	struct rusage ru;
	uint64_t sum_seq, sum_rand, sum_10k, sum_100k;
	double t, tc;
	char what[128], lbl[32], b[32];

	parse(argc, argv);
	tfs_log_set_level(TFS_LOG_WARN);
	opt = pool_options();
	open_device();
	CHECK(tfs_pmd_format(dev, &opt, &pmd));
	count_label(cfg.n, lbl);

	fprintf(stderr, "meta-bench: %s mappings per device, commit every %" PRIu64 ", %s\n", lbl,
		cfg.commit_every, cfg.mem ? "metadata in memory" : cfg.path);

	t = fill(DEV_SEQ, cfg.n, &sum_seq, &tc);
	snprintf(what, sizeof(what), "insert %s sequential mappings", lbl);
	rate_row(what, cfg.n, t, "inserts");
	commits_row(cfg.n, t, tc);

	t = fill(DEV_RAND, cfg.n, &sum_rand, &tc);
	snprintf(what, sizeof(what), "insert %s random mappings", lbl);
	rate_row(what, cfg.n, t, "inserts");
	commits_row(cfg.n, t, tc);

	shape_row(DEV_SEQ, "leaf fill, sequential device");
	shape_row(DEV_RAND, "leaf fill, random device");

	fill(DEV_10K, 10000, &sum_10k, NULL);
	fill(DEV_100K, 100000, &sum_100k, NULL);

	tfs_pmd_space(pmd, &sp);
	row("metadata used after inserts", "%.1f MiB (%s blocks)",
	    (double)(sp.meta_total - sp.meta_free) * 4096 / (1 << 20),
	    grouped(sp.meta_total - sp.meta_free, b));

	reopen_cold();
	rate_row("lookup, sequential device, in order, cold", cfg.n,
		 lookup_all(DEV_SEQ, cfg.n, sum_seq), "lookups");
	rate_row("lookup, sequential device, in order, warm", cfg.n,
		 lookup_all(DEV_SEQ, cfg.n, sum_seq), "lookups");
	rate_row("lookup_range, sequential device, runs of 1024, warm", cfg.n,
		 lookup_ranges(DEV_SEQ, cfg.n, sum_seq), "mappings");

	reopen_cold();
	rate_row("lookup, random device, random order, cold", cfg.n,
		 lookup_all(DEV_RAND, cfg.n, sum_rand), "lookups");
	rate_row("lookup, random device, random order, warm", cfg.n,
		 lookup_all(DEV_RAND, cfg.n, sum_rand), "lookups");

	const struct origin origins[] = {
		{ DEV_10K, 10000 },
		{ DEV_100K, 100000 },
		{ DEV_SEQ, cfg.n },
	};
	snapshots_and_deletes(origins, 3);

	getrusage(RUSAGE_SELF, &ru);
	snprintf(what, sizeof(what), "peak RSS (cache %zu blocks = %zu MiB%s)",
		 cfg.cache_blocks ? cfg.cache_blocks : (size_t)TFS_BM_DEFAULT_CACHE_BLOCKS,
		 (cfg.cache_blocks ? cfg.cache_blocks : (size_t)TFS_BM_DEFAULT_CACHE_BLOCKS) * 4096 >> 20,
		 cfg.cache_blocks ? "" : ", the default");
	row(what, "%.1f MiB", (double)ru.ru_maxrss / 1024);

	tfs_pmd_close(pmd);
	tfs_bdev_close(dev);
	if (!cfg.mem && !cfg.keep)
		unlink(cfg.path);

	printf("| measurement | result |\n|---|---|\n");
	for (unsigned i = 0; i < nrows; i++)
		printf("| %s | %s |\n", rows[i].what, rows[i].result);
	return 0;
}
