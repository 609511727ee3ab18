/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * thinfs-ctl - talk to the daemon of a mounted pool over its control
 * socket (src/fs/ctl-protocol.h): send the command line as one JSON
 * request, print the "output" of each response line, and exit 0; or print
 * "thinfs-ctl: <error>" on one stderr line and exit 1.  Usage errors exit 2.
 */
#include <errno.h>
#include <limits.h>
#include <json-c/json.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl-protocol.h"
#include "send-recv.h"

static void usage(FILE *f)
{
	fputs("Usage: thinfs-ctl MOUNTPOINT COMMAND [ARGS]\n\n"
	      "Commands:\n"
	      "  status [--json]              pool and volume usage, modes, snapshot groups\n"
	      "  list [--json]                the volumes\n"
	      "  snapshot SRC NEW             a writable thin snapshot of SRC named NEW\n"
	      "  snapshot ORIGIN NAME --cow DEVICE [--chunk-size S] [--transient]\n"
	      "                               a classic (dm-snapshot) snapshot of an origin\n"
	      "  delete NAME                  delete volume NAME (as rm MOUNTPOINT/NAME)\n"
	      "  set-transaction-id OLD NEW   set the metadata transaction id\n"
	      "  reserve-metadata-snap        hold a metadata snapshot (thinfs dump -m)\n"
	      "  release-metadata-snap        drop it\n"
	      "  events [--json] [--follow]   the event log\n"
	      "  wait-event N [--timeout S]   wait until event N exists\n"
	      "  resize data|metadata SIZE|+DELTA  grow the pool's data or metadata device\n"
	      "  resize cow NAME              take a classic snapshot's grown COW device into use\n"
	      "  merge NAME                   roll a classic snapshot's origin back to it\n"
	      "  suspend [NAME...] [--noflush] [--timeout S]\n"
	      "                               hold new I/O to the volumes (NAME or GROUP/NAME;\n"
	      "                               none: the whole pool); returns once quiescent\n"
	      "  resume [NAME...]             re-issue held I/O (no NAME: pool and volumes)\n"
	      "  reload POOL.CFG              stage a changed pool.cfg for the pool's resume\n"
	      "  diff FROM TO [--json] [--stats]\n"
	      "                               the extents of TO that differ from FROM (volumes,\n"
	      "                               GROUP/NAME, or - for nothing): OFFSET LENGTH data|zero\n"
	      "  send [--from FROM] [--through-mount] [--stream-version 1|2] TO > STREAM\n"
	      "                               TO (or its change since FROM) as a stream, written\n"
	      "                               by the daemon (or read through the mount); version 2\n"
	      "                               (records in device order) unless told 1, for an\n"
	      "                               older receiver\n"
	      "  receive NAME [--base BASE] < STREAM\n"
	      "                               a stream made into the new volume NAME\n"
	      "  fault metadata|data|NAME:cow|NAME:device read|write|flush\n"
	      "        error|enospc|stall|ok [after N] [once] | delay USEC\n"
	      "  fault power-cut [tear]\n"
	      "  fault crash-at POINT [power-cut [tear]]\n"
	      "                               fault injection (pool.cfg [fault] allow = yes\n"
	      "                               and thinfs mount --allow-faults only)\n", f);
}

/* One line on stderr, as every failure is reported (send-recv.c's too). */
int tfs_ctlc_fail(const char *fmt, ...)
{
	va_list ap;

	fputs("thinfs-ctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

#define fail(...) tfs_ctlc_fail(__VA_ARGS__)

static int send_all(int fd, const char *s, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, s, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		s += n;
		len -= (size_t)n;
	}
	return 0;
}

/* One stderr line, whatever the daemon echoed back (a name may hold a newline). */
static void fail_clean(const char *text)
{
	char clean[1024];
	size_t i;

	for (i = 0; text[i] && i < sizeof(clean) - 1; i++)
		clean[i] = (unsigned char)text[i] < 0x20 || text[i] == 0x7f ? '?' : text[i];
	clean[i] = '\0';
	fail("%s", clean);
}

/*
 * The daemon's error, then its details if it sent any (a reload's
 * configuration problems), each as a "thinfs-ctl: " line of its own.
 */
static void print_error(struct json_object *resp)
{
	struct json_object *v;

	if (json_object_object_get_ex(resp, "error", &v) && json_object_is_type(v, json_type_string))
		fail_clean(json_object_get_string(v));
	else
		fail("the daemon refused the command");
	if (!json_object_object_get_ex(resp, "details", &v) ||
	    !json_object_is_type(v, json_type_array))
		return;
	for (size_t i = 0; i < json_object_array_length(v); i++) {
		struct json_object *d = json_object_array_get_idx(v, i);

		if (json_object_is_type(d, json_type_string))
			fail_clean(json_object_get_string(d));
	}
}

/*
 * A long command's progress line ("progress"): on a terminal only, where
 * the next one overwrites it; nothing when stderr is piped.
 */
static bool progress_shown;

static void show_progress(const char *text)
{
	if (!isatty(STDERR_FILENO))
		return;
	fprintf(stderr, "\r%s\033[K", text);
	fflush(stderr);
	progress_shown = true;
}

/* Print one response; returns 1 when it was the last, 0 to read on, -1 failed. */
static int handle_response(const char *line, bool json_wanted)
{
	struct json_object *resp, *ok, *v, *done;
	int last;

	resp = json_tokener_parse(line);
	if (!resp || !json_object_is_type(resp, json_type_object) ||
	    !json_object_object_get_ex(resp, "ok", &ok)) {
		json_object_put(resp);
		fail("bad response from the daemon");
		return -1;
	}
	if (progress_shown && !json_object_object_get_ex(resp, "progress", NULL)) {
		fputs("\r\033[K", stderr);
		progress_shown = false;
	}
	if (json_object_object_get_ex(resp, "progress", &v))
		show_progress(json_object_get_string(v));
	if (!json_object_get_boolean(ok)) {
		print_error(resp);
		json_object_put(resp);
		return -1;
	}
	if (json_object_object_get_ex(resp, "output", &v)) {
		const char *out = json_object_get_string(v);
		size_t n = strlen(out);

		fputs(out, stdout);
		if (n && out[n - 1] != '\n')
			fputc('\n', stdout);
	} else if (json_wanted && json_object_object_get_ex(resp, "json", &v)) {
		puts(json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
	}
	fflush(stdout);
	/* A remark beside the result (diff --stats), kept off stdout. */
	if (json_object_object_get_ex(resp, "note", &v))
		fprintf(stderr, "%s\n", json_object_get_string(v));
	last = !json_object_object_get_ex(resp, "done", &done) || json_object_get_boolean(done);
	json_object_put(resp);
	return last;
}

int tfs_ctlc_connect(const char *mountpoint)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char path[sizeof(sa.sun_path)];
	int fd, r;

	r = tfs_ctl_socket_path(mountpoint, path, sizeof(path));
	if (r < 0)
		return fail("%s: %s", mountpoint, strerror(-r)), -1;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail("socket: %s", strerror(errno)), -1;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;

		close(fd);
		if (e == ENOENT || e == ECONNREFUSED)
			fail("%s: no thinfs daemon serves this mountpoint (%s)", mountpoint,
			     e == ENOENT ? "no control socket" : "stale control socket");
		else
			fail("%s: cannot reach the daemon: %s", mountpoint, strerror(e));
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	struct json_object *req, *args;
	const char *s;
	bool json_wanted = false;
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int fd, r, status = 1;

	if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		usage(stdout);
		return 0;
	}
	if (argc < 3) {
		usage(stderr);
		return 2;
	}
	if (argc - 3 > TFS_CTL_MAX_ARGS)
		return fail("too many arguments: %d (the daemon takes at most %d)", argc - 3,
			    TFS_CTL_MAX_ARGS);
	if (!strcmp(argv[2], "send"))
		return tfs_ctlc_send(argv[1], argc - 2, argv + 2);
	if (!strcmp(argv[2], "receive"))
		return tfs_ctlc_receive(argv[1], argc - 2, argv + 2);
	fd = tfs_ctlc_connect(argv[1]);
	if (fd < 0)
		return 1;

	req = json_object_new_object();
	args = json_object_new_array();
	json_object_object_add(req, "cmd", json_object_new_string(argv[2]));
	for (int i = 3; i < argc; i++) {
		char abs[PATH_MAX], cwd[PATH_MAX];
		const char *a = argv[i];

		/*
		 * The daemon has another working directory: a pool.cfg is named
		 * absolutely, even one that is not there (so the daemon's answer
		 * names the file the user meant).
		 */
		if (!strcmp(argv[2], "snapshot") && !strcmp(argv[i - 1], "--cow")) {
			if (realpath(a, abs)) /* a tag (UUID=...) goes as it is */
				a = abs;
		} else if (!strcmp(argv[2], "reload") && i == 3) {
			if (realpath(a, abs))
				a = abs;
			else if (a[0] != '/' && getcwd(cwd, sizeof(cwd)) &&
				 (size_t)snprintf(abs, sizeof(abs), "%s/%s", cwd, a) < sizeof(abs))
				a = abs;
		}
		json_object_array_add(args, json_object_new_string(a));
		json_wanted |= !strcmp(argv[i], "--json");
	}
	json_object_object_add(req, "args", args);
	s = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN);
	if (strlen(s) + 1 > TFS_CTL_MAX_REQUEST) {
		r = fail("the command is too large: %zu bytes as a request, the daemon takes at "
			 "most %d", strlen(s) + 1, TFS_CTL_MAX_REQUEST);
		json_object_put(req);
		close(fd);
		return r;
	}
	r = send_all(fd, s, strlen(s));
	if (r == 0)
		r = send_all(fd, "\n", 1);
	json_object_put(req);
	/* The daemon may have answered before it closed: its reason beats EPIPE. */
	if (r < 0 && r != -EPIPE) {
		close(fd);
		return fail("sending the command: %s", strerror(-r));
	}

	/* Response lines until one says done (streaming commands send several). */
	for (;;) {
		char *nl;
		ssize_t n;

		while (!(nl = buf ? memchr(buf, '\n', len) : NULL)) {
			if (len + 4096 > cap) {
				char *nb = realloc(buf, cap ? cap * 2 : 65536);

				if (!nb) {
					fail("out of memory");
					goto out;
				}
				buf = nb;
				cap = cap ? cap * 2 : 65536;
			}
			n = recv(fd, buf + len, cap - len, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fail("%s", n == 0 ? "the daemon closed the connection without an answer"
						  : strerror(errno));
				goto out;
			}
			len += (size_t)n;
		}
		*nl = '\0';
		r = handle_response(buf, json_wanted);
		if (r < 0)
			goto out;
		len -= (size_t)(nl + 1 - buf);
		memmove(buf, nl + 1, len);
		if (r == 1)
			break;
	}
	status = 0;
out:
	free(buf);
	close(fd);
	return status;
}
