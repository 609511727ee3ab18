/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * daemon.c - `thinfs mkpool` and `thinfs mount`.  See daemon.h.
 */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <syslog.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "cache.h"
#include "ctl-server.h"
#include "fs.h"
#include "fuse-ops.h"
#include "log.h"
#include "origin.h"
#include "probe.h"
#include "wb-stash.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

/*
 * One daemon per pool: an exclusive flock on the metadata device or file.
 * The lock belongs to the open file description, so it survives the fork
 * into the background and dies with the daemon, even on kill -9.
 */
static int lock_metadata(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		fprintf(stderr, "thinfs: %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if (errno == EWOULDBLOCK)
			fprintf(stderr, "thinfs: %s is in use by another thinfs daemon "
				"(one daemon per pool; unmount it first)\n", path);
		else
			fprintf(stderr, "thinfs: cannot lock %s: %s\n", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* ---- mkpool ---- */

static void mkpool_usage(FILE *f)
{
	fputs("Usage: thinfs mkpool POOL.cfg [--force]\n"
	      "Formats the pool's metadata device and creates its catalog.  Refuses a device\n"
	      "holding a filesystem, partition table, other signature or a thin pool unless\n"
	      "--force.  Everything on the metadata device is lost.\n", f);
}

/* 0 if nothing is on path, 1 if something is (reported), -1 on error (reported). */
static int refuse_signature(const char *key, const char *path)
{
	char what[256];
	int r;

	r = tfs_probe_signature(path, what, sizeof(what));
	if (r < 0) {
		fprintf(stderr, "thinfs: mkpool: cannot probe %s (%s): %s\n", path, key,
			strerror(-r));
		return -1;
	}
	if (r > 0) {
		fprintf(stderr, "thinfs: mkpool: %s device %s holds %s; refusing to overwrite it "
			"(use --force to format anyway)\n", key, path, what);
		return 1;
	}
	return 0;
}

/*
 * The [cache] sections' metadata: with check, refuse (1, reported) any that
 * is in use; otherwise format them all.  0, 1, or -1 (reported).
 */
static int mkpool_caches(const struct tfs_pool_config *cfg, bool check)
{
	for (unsigned i = 0; i < cfg->nr_caches; i++) {
		const struct tfs_cache_cfg *c = &cfg->caches[i];
		int r = check ? tfs_cache_metadata_used(c->metadata) : tfs_cache_format(c);

		if (r < 0) {
			fprintf(stderr, "thinfs: mkpool: [cache \"%s\"] metadata %s: %s\n", c->name,
				c->metadata, strerror(-r));
			return -1;
		}
		if (r > 0) {
			fprintf(stderr, "thinfs: mkpool: [cache \"%s\"] metadata device %s is in use "
				"(its first 4 KiB are not zero); refusing to overwrite it (use --force "
				"to format anyway)\n", c->name, c->metadata);
			return 1;
		}
	}
	return 0;
}

int tfs_cmd_mkpool(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "force", no_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct tfs_pool_config cfg;
	struct tfs_catalog *cat;
	bool force = false;
	int c, r, lock_fd, status = 1;

	optind = 1;
	while ((c = getopt_long(argc, argv, "fh", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			force = true;
			break;
		case 'h':
			mkpool_usage(stdout);
			return 0;
		default:
			mkpool_usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 1) {
		mkpool_usage(stderr);
		return 2;
	}
	r = tfs_config_load(argv[optind], &cfg);
	if (r < 0)
		return 1; /* each problem logged by the parser, naming file:line or the device */
	lock_fd = lock_metadata(cfg.metadata);
	if (lock_fd < 0)
		return 1;

	if (!force) {
		r = tfs_probe_thin_metadata(cfg.metadata);
		if (r > 0) {
			fprintf(stderr, "thinfs: mkpool: metadata device %s already holds a thin pool; "
				"refusing to overwrite it (use --force to format anyway)\n",
				cfg.metadata);
			goto out_unlock;
		}
		if (r < 0) {
			fprintf(stderr, "thinfs: mkpool: cannot read %s: %s\n", cfg.metadata,
				strerror(-r));
			goto out_unlock;
		}
		if (refuse_signature("metadata", cfg.metadata) ||
		    refuse_signature("data", cfg.data) || mkpool_caches(&cfg, true))
			goto out_unlock;
	}

	r = tfs_pool_format(&cfg);
	if (r < 0) {
		fprintf(stderr, "thinfs: mkpool: formatting %s failed: %s\n", cfg.metadata,
			strerror(-r));
		goto out_unlock;
	}
	if (mkpool_caches(&cfg, false))
		goto out_unlock;
	r = tfs_catalog_create(cfg.catalog, force, &cat);
	if (r < 0) {
		fprintf(stderr, "thinfs: mkpool: cannot create the catalog %s: %s%s\n", cfg.catalog,
			strerror(-r), r == -EEXIST ? " (use --force to replace it)" : "");
		goto out_unlock;
	}
	tfs_catalog_add_event(cat, "mkpool", "pool formatted", NULL);
	tfs_catalog_close(cat);
	printf("formatted %s (metadata) and %s (data, %" PRIu64 " KiB blocks); catalog %s\n",
	       cfg.metadata, cfg.data, cfg.block_size >> 10, cfg.catalog);
	for (unsigned i = 0; i < cfg.nr_caches; i++)
		printf("formatted cache %s: metadata %s\n", cfg.caches[i].name,
		       cfg.caches[i].metadata);
	status = 0;
out_unlock:
	close(lock_fd);
	return status;
}

/* ---- mount ---- */

struct mount_args {
	const char *cfg_path;
	const char *mountpoint;
	bool foreground;
	bool allow_faults;
	bool read_only;
	char fuse_opts[1024];
};

static void mount_usage(FILE *f)
{
	fputs("Usage: thinfs mount POOL.cfg MOUNTPOINT [-f] [-o OPTIONS] [--allow-faults]\n"
	      "  -f, --foreground   stay in the foreground (systemd: Type=notify)\n"
	      "  -o OPTIONS         mount options: ro, allow_other, ... (comma separated)\n"
	      "  --allow-faults     permit a pool.cfg [fault] section (tests only)\n", f);
}

static int parse_mount_args(int argc, char **argv, struct mount_args *a)
{
	static const struct option longopts[] = {
		{ "foreground", no_argument, NULL, 'f' },
		{ "allow-faults", no_argument, NULL, 'F' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	size_t used = 0;
	int c;

	memset(a, 0, sizeof(*a));
	optind = 1;
	while ((c = getopt_long(argc, argv, "fo:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			a->foreground = true;
			break;
		case 'F':
			a->allow_faults = true;
			break;
		case 'o': {
			char *copy = strdup(optarg), *save = NULL;

			if (!copy)
				return 1;
			for (char *o = strtok_r(copy, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
				int n;

				if (!strcmp(o, "ro"))
					a->read_only = true;
				else if (!strcmp(o, "rw"))
					a->read_only = false;
				n = snprintf(a->fuse_opts + used, sizeof(a->fuse_opts) - used, ",%s", o);
				if (n < 0 || (size_t)n >= sizeof(a->fuse_opts) - used) {
					free(copy);
					fprintf(stderr, "thinfs: mount: options too long\n");
					return 2;
				}
				used += (size_t)n;
			}
			free(copy);
			break;
		}
		case 'h':
			mount_usage(stdout);
			exit(0);
		default:
			mount_usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 2) {
		mount_usage(stderr);
		return 2;
	}
	a->cfg_path = argv[optind];
	a->mountpoint = argv[optind + 1];
	return 0;
}

static void syslog_sink(void *ctx, enum tfs_log_level level, const char *msg)
{
	syslog(level == TFS_LOG_ERR ? LOG_ERR : level == TFS_LOG_WARN ? LOG_WARNING :
	       level == TFS_LOG_INFO ? LOG_INFO : LOG_DEBUG, "%s", msg);
}

/* Device ids collected from the catalog: unlinked rows left by a crash, members of a group. */
struct id_list {
	struct tfs_fs *fs;
	uint32_t *ids;
	unsigned nr, cap;
};

static int add_id(void *ctx, uint32_t dev_id)
{
	struct id_list *o = ctx;

	if (o->nr == o->cap) {
		unsigned cap = o->cap ? o->cap * 2 : 16;
		uint32_t *n = realloc(o->ids, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		o->ids = n;
		o->cap = cap;
	}
	o->ids[o->nr++] = dev_id;
	return 0;
}

/* A device without a row is shown up to its highest mapped block, so its data can be read. */
static uint64_t placeholder_size(void *ctx, uint32_t dev_id)
{
	struct tfs_fs *fs = ((struct id_list *)ctx)->fs;
	uint64_t blocks;

	if (tfs_pool_dev_end(fs->pool, dev_id, &blocks) < 0)
		return 0;
	return blocks < fs->max_size / fs->block_size ? blocks * fs->block_size : fs->max_size;
}

/* The metadata's device ids, ascending; *ids is malloc'ed. */
static int list_devices(struct tfs_fs *fs, uint32_t **ids, unsigned *nr)
{
	int total, r;

	*ids = NULL;
	*nr = 0;
	total = tfs_pool_list(fs->pool, NULL, 0);
	if (total < 0)
		return total;
	*ids = calloc((size_t)total + 1, sizeof(**ids));
	if (!*ids)
		return -ENOMEM;
	r = tfs_pool_list(fs->pool, *ids, (unsigned)total);
	if (r < 0) {
		free(*ids);
		*ids = NULL;
		return r;
	}
	*nr = (unsigned)(r < total ? r : total);
	return 0;
}

static int cmp_id(const void *a, const void *b);

/* The thin devices and then the origins and classic snapshots (ids above them), ascending. */
static int add_cow_ids(struct tfs_fs *fs, uint32_t **ids, unsigned *nr)
{
	uint32_t *cow, *grown;
	unsigned n;
	int r = tfs_fs_cow_ids(fs, &cow, &n);

	if (r < 0 || !n) {
		free(cow);
		return r;
	}
	qsort(cow, n, sizeof(*cow), cmp_id);
	grown = realloc(*ids, (*nr + n) * sizeof(*grown));
	if (!grown) {
		free(cow);
		return -ENOMEM;
	}
	memcpy(grown + *nr, cow, n * sizeof(*cow));
	free(cow);
	*ids = grown;
	*nr += n;
	return 0;
}

struct settle {
	struct tfs_fs *fs;
	const uint32_t *devs;
	unsigned nr_devs;
	int64_t group_id;
	struct id_list members; /* of group_id */
};

static int collect_member(void *ctx, const struct tfs_vol_row *row)
{
	struct settle *s = ctx;

	return row->group_id == s->group_id ? add_id(&s->members, row->dev_id) : 0;
}

static int cmp_id(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* devs is ascending (tfs_pool_list). */
static bool has_dev(const uint32_t *devs, unsigned nr, uint32_t id)
{
	return nr && bsearch(&id, devs, nr, sizeof(*devs), cmp_id);
}

/*
 * A group a crash caught half made or half removed (volumes.c says in
 * which order its steps go): one being made whose devices all exist is
 * complete and stays; otherwise whatever devices it has are deleted (one
 * metadata transaction), then its rows.
 */
static int settle_group(void *ctx, const struct tfs_group_row *g)
{
	struct settle *s = ctx;
	struct id_list *m = &s->members;
	unsigned have = 0;
	int r;

	s->group_id = g->id;
	m->nr = 0;
	r = tfs_catalog_list_volumes(s->fs->cat, true, collect_member, s);
	if (r < 0)
		return r;
	for (unsigned i = 0; i < m->nr; i++)
		have += has_dev(s->devs, s->nr_devs, m->ids[i]);
	if (g->intent == TFS_GROUP_CREATING && have == m->nr) {
		r = tfs_catalog_set_group_intent(s->fs->cat, g->id, TFS_GROUP_WHOLE);
		if (!r)
			tfs_fs_event(s->fs, "snapshot", "group %s: half made before this mount: "
				     "completed (%u volume(s))", g->name, m->nr);
		return r;
	}
	if (have)
		r = tfs_pool_delete_devices(s->fs->pool, m->ids, m->nr);
	if (!r)
		r = tfs_catalog_remove_group(s->fs->cat, g->id);
	if (!r)
		tfs_fs_event(s->fs, "delete", "snapshot group %s: %s before this mount: %s "
			     "(%u device(s) deleted)", g->name,
			     g->intent == TFS_GROUP_CREATING ? "half made" : "half removed",
			     g->intent == TFS_GROUP_CREATING ? "removed" : "removal finished", have);
	return r;
}

/*
 * The metadata is the truth: groups a crash left half done are finished
 * or undone, rows without devices go, devices without rows get thin-<id>
 * rows, and volumes unlinked while open when the last daemon died are
 * deleted now.  Read-only, only the rows change, and in memory only.
 */
static int reconcile(struct tfs_fs *fs)
{
	struct id_list o = { .fs = fs };
	uint32_t *ids = NULL;
	unsigned nr;
	int r;

	r = list_devices(fs, &ids, &nr);
	if (r >= 0 && !fs->read_only) {
		struct settle s = { .fs = fs, .devs = ids, .nr_devs = nr };

		r = tfs_catalog_list_unfinished_groups(fs->cat, settle_group, &s);
		free(s.members.ids);
		free(ids);
		ids = NULL;
		if (r >= 0)
			r = list_devices(fs, &ids, &nr);
	}
	/* Ascending: thin ids, then origins' and snapshots', then the caches' range. */
	if (r >= 0)
		r = add_cow_ids(fs, &ids, &nr);
	if (r >= 0)
		r = tfs_fs_cache_add_ids(fs, &ids, &nr);
	if (r >= 0)
		r = tfs_catalog_reconcile(fs->cat, ids, nr, placeholder_size,
					  fs->read_only ? NULL : add_id, &o);
	for (unsigned i = 0; r >= 0 && i < o.nr; i++) {
		int d = tfs_pool_delete(fs->pool, o.ids[i]);

		if (d < 0 && d != -ENODATA) {
			tfs_warn("cannot delete unlinked device %" PRIu32 ": %s", o.ids[i],
				 strerror(-d));
			continue;
		}
		tfs_catalog_remove_volume(fs->cat, o.ids[i]);
		tfs_fs_event(fs, "delete", "device %" PRIu32 " unlinked before a crash: deleted",
			     o.ids[i]);
	}
	free(o.ids);
	free(ids);
	return r < 0 ? r : 0;
}

static int last_event_cb(void *ctx, const struct tfs_event_row *row)
{
	*(int64_t *)ctx = row->id;
	return 0;
}

/* Tell whoever waits that the mount is usable (or that it failed). */
static void report_ready(int ready_fd, bool ok)
{
	char b = ok ? 'y' : 'n';
	ssize_t w;

	if (ready_fd >= 0) {
		do
			w = write(ready_fd, &b, 1);
		while (w < 0 && errno == EINTR);
		close(ready_fd);
	}
}

/* In the parent: wait for the daemon's readiness byte. */
static int wait_ready(pid_t child, int fd)
{
	char b = 0;
	ssize_t n;
	int status;

	do
		n = read(fd, &b, 1);
	while (n < 0 && errno == EINTR);
	close(fd);
	if (n == 1 && b == 'y')
		return 0;
	/* The child said why on the stderr we share; its status is ours. */
	if (waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status))
		return WEXITSTATUS(status);
	return 1;
}

static void detach_stdio(void)
{
	int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return;
	dup2(fd, STDIN_FILENO);
	dup2(fd, STDOUT_FILENO);
	dup2(fd, STDERR_FILENO);
	if (fd > STDERR_FILENO)
		close(fd);
}

static uint64_t max_size_for(uint64_t block_size)
{
	/* 2^40 virtual blocks, and never past what off_t can say. */
	if (block_size > ((uint64_t)INT64_MAX >> 40))
		return (uint64_t)INT64_MAX;
	return block_size << 40;
}

/* Everything after the metadata lock; runs in the daemon process. */
static int run_daemon(struct tfs_fs *fs, const struct mount_args *a, int ready_fd)
{
	struct fuse_args fargs = FUSE_ARGS_INIT(0, NULL);
	struct fuse_loop_config *loop_cfg = NULL;
	char opts[1200];
	int64_t last_event = 0;
	int r, status = 1;

	/*
	 * Before any thread exists: the flag is per task and inherited, and a
	 * loop device over one of our files must not make us wait on
	 * ourselves for memory.
	 */
	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0)
		tfs_warn("PR_SET_IO_FLUSHER: %s (a loop device over a volume may deadlock under "
			 "memory pressure)", strerror(errno));

	r = tfs_pool_open(&fs->cfg, fs->read_only, &fs->pool);
	if (r < 0) {
		tfs_err("cannot open the pool %s: %s%s", fs->cfg.path, strerror(-r),
			r == -EROFS && !fs->read_only ?
			" (the metadata needs checking: run thinfs check --repair, or mount -o ro)" :
			"");
		goto err;
	}
	fs->block_size = tfs_pool_block_size(fs->pool);
	fs->max_size = max_size_for(fs->block_size);
	if (fs->read_only && access(fs->cfg.catalog, F_OK) < 0 && errno == ENOENT) {
		/* Lost: the data can still be read, under thin-<id> names. */
		tfs_warn("the catalog %s is missing: every volume appears as thin-<id>, on this "
			 "read-only mount only", fs->cfg.catalog);
		r = tfs_catalog_open_empty(&fs->cat);
	} else {
		r = tfs_catalog_open(fs->cfg.catalog, fs->read_only, &fs->cat);
	}
	if (r < 0) {
		tfs_err("cannot open the catalog %s: %s%s", fs->cfg.catalog, strerror(-r),
			r == -ENOENT ? " (run thinfs mkpool first, or mount -o ro to read the "
			"volumes as thin-<id>)" : "");
		goto err_close_pool;
	}
	r = tfs_fs_cache_open(fs);
	if (r < 0)
		goto err_close_catalog; /* logged */
	r = tfs_fs_cow_open(fs);
	if (r < 0)
		goto err_close_catalog; /* logged, naming the section */
	r = reconcile(fs);
	if (r == 0)
		r = tfs_fs_settle_temp_names(fs);
	if (r < 0) {
		tfs_err("cannot reconcile the catalog with the metadata: %s", strerror(-r));
		goto err_close_catalog;
	}
	tfs_catalog_list_events(fs->cat, 0, last_event_cb, &last_event);
	fs->last_event_id = last_event;

	/*
	 * default_permissions: the kernel checks modes and owners, as on any
	 * filesystem.  subtype names us in /proc/mounts.
	 */
	snprintf(opts, sizeof(opts), "default_permissions,fsname=thinfs,subtype=thinfs%s",
		 a->fuse_opts);
	if (fuse_opt_add_arg(&fargs, "thinfs") || fuse_opt_add_arg(&fargs, "-o") ||
	    fuse_opt_add_arg(&fargs, opts)) {
		tfs_err("out of memory");
		goto err_free_args;
	}
	fs->se = fuse_session_new(&fargs, &tfs_fuse_ops, sizeof(tfs_fuse_ops), fs);
	if (!fs->se) {
		tfs_err("cannot start a FUSE session (bad -o option?)");
		goto err_free_args;
	}
	if (fuse_set_signal_handlers(fs->se) != 0) {
		tfs_err("cannot install signal handlers");
		goto err_destroy_session;
	}
	if (fuse_session_mount(fs->se, fs->mountpoint) != 0) {
		tfs_err("cannot mount on %s", fs->mountpoint);
		goto err_remove_handlers;
	}
	/* Before any I/O: the first buffered writers already get the room. */
	tfs_fs_tune_bdi(fs, fs->cfg.writeback_cache && !fs->read_only);
	tfs_fs_event(fs, "mount", "mounted on %s%s", fs->mountpoint,
		     fs->read_only ? " read-only" : "");
	/*
	 * Changes the pool recorded since it opened come next: none is lost
	 * meanwhile.  Before the control socket, whose commands order their
	 * events with the event thread's (tfs_fs_events_hold).
	 */
	r = tfs_fs_events_start(fs);
	if (r < 0)
		goto err_unmount;
	r = tfs_ctl_server_start(fs, &fs->ctl);
	if (r < 0)
		goto err_unmount;

	/* Ready: the mount answers and so does the control socket. */
	sd_notify(0, "READY=1");
	if (ready_fd >= 0) {
		tfs_log_set_sink(syslog_sink, NULL);
		report_ready(ready_fd, true);
		ready_fd = -1;
		detach_stdio();
	}

	loop_cfg = fuse_loop_cfg_create();
	if (!loop_cfg) {
		tfs_err("out of memory");
		goto err_stop_ctl;
	}
	fuse_loop_cfg_set_clone_fd(loop_cfg, 0);
	/* With max_threads at most 16, no worker ever ends: none is idle beyond it. */
	fuse_loop_cfg_set_idle_threads(loop_cfg, 16);
	/*
	 * Each worker keeps its request buffer (1 MiB) and more while serving
	 * (README "Memory"), so this bounds the daemon's memory.  Writes held while the pool is out of data space
	 * each keep a worker; the default leaves enough for reads, discards
	 * and deletes (which free the space) while hundreds of writes wait.
	 */
	fuse_loop_cfg_set_max_threads(loop_cfg, fs->cfg.max_threads);
	r = fuse_session_loop_mt(fs->se, loop_cfg);
	fuse_loop_cfg_destroy(loop_cfg);
	/* A suspended pool is resumed: the deletes and the commit of the shutdown must run. */
	tfs_pool_stop_holding(fs->pool);
	tfs_fs_cache_stop_holding(fs);
	if (fs->cow)
		tfs_cow_set_stop_holding(fs->cow);
	/* Writebacks taken off the kernel go in (or fail) now that nothing holds them. */
	tfs_wb_drain_all(fs);
	sd_notify(0, "STOPPING=1");
	if (r < 0)
		tfs_warn("FUSE session ended with %s", strerror(-r));
	status = 0;

err_stop_ctl:
	tfs_ctl_server_stop(fs->ctl);
	fs->ctl = NULL;
err_unmount:
	fuse_session_unmount(fs->se);
	tfs_fs_tune_bdi_end(fs);
err_remove_handlers:
	fuse_remove_signal_handlers(fs->se);
err_destroy_session:
	/* After the unmount no request can arrive: close what is still open. */
	tfs_fs_close_all(fs);
	if (tfs_fs_cache_close(fs) < 0)
		status = 1;
	/* Closing commits: everything acknowledged so far becomes durable. */
	r = tfs_pool_shutdown(fs->pool);
	if (r < 0) {
		tfs_err("final commit failed: %s", strerror(-r));
		status = 1;
	}
	/* What the pool recorded up to its last I/O reaches the log before the catalog closes. */
	tfs_fs_events_stop(fs);
	if (status == 0)
		tfs_fs_event(fs, "unmount", "unmounted from %s", fs->mountpoint);
	fuse_session_destroy(fs->se);
	fs->se = NULL;
err_free_args:
	fuse_opt_free_args(&fargs);
err_close_catalog:
	tfs_fs_close_all(fs);
	tfs_fs_cache_close(fs);
	tfs_fs_cow_close(fs);
	tfs_catalog_close(fs->cat);
	fs->cat = NULL;
err_close_pool:
	/* Commits unless tfs_pool_shutdown did already. */
	r = tfs_pool_close(fs->pool);
	fs->pool = NULL;
	if (r < 0) {
		tfs_err("final commit failed: %s", strerror(-r));
		status = 1;
	}
err:
	report_ready(ready_fd, false);
	return status;
}

int tfs_cmd_mount(int argc, char **argv)
{
	struct mount_args a;
	struct tfs_fs *fs;
	struct stat st;
	int r, lock_fd, pipefd[2], status = 1;
	pid_t pid;

	r = parse_mount_args(argc, argv, &a);
	if (r)
		return r;

	fs = malloc(sizeof(*fs));
	if (!fs) {
		fprintf(stderr, "thinfs: out of memory\n");
		return 1;
	}
	tfs_fs_init(fs);
	fs->read_only = a.read_only;
	fs->foreground = a.foreground;
	fs->owner_uid = getuid();
	fs->owner_gid = getgid();
	fs->mount_time_ns = tfs_now_ns();

	r = tfs_config_load(a.cfg_path, &fs->cfg);
	if (r < 0)
		goto out_free; /* each problem logged by the parser, naming file:line or the device */
	if (fs->cfg.allow_faults && !a.allow_faults) {
		fprintf(stderr, "thinfs: mount: %s enables fault injection ([fault] allow = yes): "
			"start the daemon with --allow-faults to accept it\n", a.cfg_path);
		goto out_free;
	}
	if (!realpath(a.mountpoint, fs->mountpoint) || stat(fs->mountpoint, &st) < 0) {
		fprintf(stderr, "thinfs: mount: %s: %s\n", a.mountpoint, strerror(errno));
		goto out_free;
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "thinfs: mount: %s is not a directory\n", a.mountpoint);
		goto out_free;
	}
	lock_fd = lock_metadata(fs->cfg.metadata);
	if (lock_fd < 0)
		goto out_free;

	if (a.foreground) {
		status = run_daemon(fs, &a, -1);
		goto out_unlock;
	}

	/*
	 * Daemonize before anything starts a thread (the engine's commit
	 * thread, sqlite, FUSE workers): fork() copies only the calling
	 * thread.  The parent returns once the child reports the mount usable,
	 * so `thinfs mount` still returns only when the mount is ready, and
	 * fails with the child's message (on our shared stderr) otherwise.
	 */
	if (pipe2(pipefd, O_CLOEXEC) < 0) {
		fprintf(stderr, "thinfs: mount: pipe: %s\n", strerror(errno));
		goto out_unlock;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "thinfs: mount: fork: %s\n", strerror(errno));
		close(pipefd[0]);
		close(pipefd[1]);
		goto out_unlock;
	}
	if (pid > 0) {
		close(pipefd[1]);
		close(lock_fd); /* the child holds the lock through its copy */
		status = wait_ready(pid, pipefd[0]);
		tfs_fs_destroy(fs);
		free(fs);
		return status;
	}
	close(pipefd[0]);
	setsid();
	if (chdir("/") < 0)
		tfs_warn("chdir /: %s", strerror(errno));
	status = run_daemon(fs, &a, pipefd[1]);

out_unlock:
	close(lock_fd);
out_free:
	tfs_fs_destroy(fs);
	free(fs);
	return status;
}
