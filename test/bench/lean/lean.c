/*
 * lean: the benchmark's lean client and server, in C with blocking sockets,
 * so that a connection costs what the kernel and the path under test make it
 * cost and nearly nothing else (the Go client and servers spend 220-290 us
 * of CPU per connection and flatten every ratio). The benchmark compiles it
 * with the machine's C compiler at run time (test/bench/lean.go).
 *
 *   lean server LISTEN...      echo server, a pool of blocking threads per
 *                              listener; runs until its stdin closes. LISTEN
 *                              is ADDR:PORT or [ADDR6]:PORT (TCP), or the same
 *                              after "udp:" (UDP: each datagram echoed back)
 *   lean client HOME_CGROUP    reads one request per line on stdin, answers
 *                              one JSON line on stdout:
 *     rate CONNS DURATION_NS MAXOPS TARGET...
 *         CONNS threads: connect, 64-byte request, 64-byte reply, close,
 *         over and over until the deadline; targets dialed in turn. A
 *         target is ADDR:PORT or [ADDR6]:PORT, the socket of its family
 *         ([::ffff:ADDR]:PORT: an AF_INET6 socket to an IPv4 address, as
 *         dual-stack runtimes dial).
 *     udp CONNS DURATION_NS MAXOPS CONNECTED TARGET...
 *         CONNS threads, one UDP socket each for their whole run: send a
 *         64-byte datagram (a sequence number first), wait for its echo
 *         (1 s at most: a lost datagram is an error, never a hang), over
 *         and over until the deadline. CONNECTED 1: thread i connects its
 *         socket to target i mod n once, then send/recv; 0: sendto the
 *         targets in turn and recvfrom, and a reply must come from the
 *         address the datagram was sent to.
 *     cost BLOCK PAIRS PEERNAME CGROUP_A TARGETS_A CGROUP_B TARGETS_B
 *         CPU per connect, measured so that the machine's noise cannot hide
 *         it: PAIRS times, a block of BLOCK connects from cgroup A and one
 *         from cgroup B (order alternating), this thread's CPU time
 *         (CLOCK_THREAD_CPUTIME_ID) read around each block. Each connect:
 *         socket, connect, getpeername if PEERNAME is 1 (as Go's net and
 *         most runtimes do), close with RST (SO_LINGER 0, no TIME_WAIT).
 *         The process moves itself between the cgroups by writing its PID
 *         to cgroup.procs: a socket's cgroup programs are those of the
 *         cgroup of the thread that created it, at creation. TARGETS are
 *         comma-separated ADDR:PORTs. Answer: ns per connect of every block.
 *
 * Every loop is bounded by a deadline or a count.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 64
#define MAX_TARGETS 16
#define MAX_CONNS 1024
#define SERVER_THREADS 48
#define MAX_LINE 8192
#define MAX_PAIRS 5000
#define MAX_BLOCK 100000
#define UDP_SERVER_THREADS 4

/* A socket address of either family. */
struct target {
	struct sockaddr_storage sa;
	socklen_t len;
};

/* parse_target reads ADDR:PORT or [ADDR6]:PORT. */
static int parse_target(const char *s, struct target *t)
{
	char host[64];
	const char *colon = strrchr(s, ':');
	if (!colon)
		return -1;
	const char *h = s;
	long hl = colon - s;
	if (hl >= 2 && s[0] == '[' && colon[-1] == ']')
		h++, hl -= 2;
	if (hl <= 0 || hl >= (long)sizeof(host))
		return -1;
	memcpy(host, h, hl);
	host[hl] = 0;
	int port = atoi(colon + 1);
	if (port < 1 || port > 65535)
		return -1;
	memset(t, 0, sizeof(*t));
	struct sockaddr_in *v4 = (struct sockaddr_in *)&t->sa;
	if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		v4->sin_port = htons((uint16_t)port);
		t->len = sizeof(*v4);
		return 0;
	}
	memset(t, 0, sizeof(*t));
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t->sa;
	if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		v6->sin6_port = htons((uint16_t)port);
		t->len = sizeof(*v6);
		return 0;
	}
	return -1;
}

/* same_addr: a and b are the same address and port. */
static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
	return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr));
}

/* parse_addr reads an IPv4 ADDR:PORT. */
static int parse_addr(const char *s, struct sockaddr_in *sa)
{
	struct target t;
	if (parse_target(s, &t) || t.sa.ss_family != AF_INET)
		return -1;
	memcpy(sa, &t.sa, sizeof(*sa));
	return 0;
}

static int64_t now_ns(clockid_t c)
{
	struct timespec ts;
	clock_gettime(c, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void set_timeout(int fd, int opt, int secs)
{
	struct timeval tv = {.tv_sec = secs};
	setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv));
}

/* ---- server ---- */

static void *serve(void *arg)
{
	int ln = (int)(intptr_t)arg;
	char buf[16384];
	for (;;) {
		int c = accept4(ln, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
				continue;
			return NULL;
		}
		/* A connection lives at most 2 minutes of silence. */
		set_timeout(c, SO_RCVTIMEO, 120);
		set_timeout(c, SO_SNDTIMEO, 120);
		for (;;) {
			ssize_t n = read(c, buf, sizeof(buf));
			if (n <= 0)
				break;
			ssize_t off = 0;
			while (off < n) {
				ssize_t w = write(c, buf + off, n - off);
				if (w <= 0)
					goto done;
				off += w;
			}
		}
	done:
		close(c);
	}
}

/* serve_udp echoes each datagram to its sender. */
static void *serve_udp(void *arg)
{
	int s = (int)(intptr_t)arg;
	char buf[2048];
	for (;;) {
		struct sockaddr_storage from;
		socklen_t fl = sizeof(from);
		ssize_t n = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		sendto(s, buf, n, 0, (struct sockaddr *)&from, fl);
	}
}

static int run_server(int argc, char **argv)
{
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 128 << 10);
	for (int i = 0; i < argc; i++) {
		const char *spec = argv[i];
		int udp = !strncmp(spec, "udp:", 4);
		if (udp)
			spec += 4;
		struct target t;
		if (parse_target(spec, &t)) {
			printf("{\"ready\":false,\"error\":\"bad address %s\"}\n", argv[i]);
			return 1;
		}
		int ln = socket(t.sa.ss_family, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0);
		int one = 1;
		setsockopt(ln, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (t.sa.ss_family == AF_INET6)
			setsockopt(ln, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		if (ln < 0 || bind(ln, (struct sockaddr *)&t.sa, t.len) || (!udp && listen(ln, 4096))) {
			printf("{\"ready\":false,\"error\":\"listen %s: %s\"}\n", argv[i], strerror(errno));
			return 1;
		}
		for (int k = 0; k < (udp ? UDP_SERVER_THREADS : SERVER_THREADS); k++) {
			pthread_t th;
			if (pthread_create(&th, &attr, udp ? serve_udp : serve, (void *)(intptr_t)ln)) {
				printf("{\"ready\":false,\"error\":\"thread: %s\"}\n", strerror(errno));
				return 1;
			}
		}
	}
	printf("{\"ready\":true}\n");
	fflush(stdout);
	char b[256];
	while (read(0, b, sizeof(b)) > 0) {
	}
	return 0;
}

/* ---- client: rate ---- */

struct rate {
	struct target targets[MAX_TARGETS];
	int ntargets;
	int64_t deadline, maxops;
	atomic_llong next, ops, errors;
	pthread_mutex_t mu;
	char first[256];
};

static void rate_error(struct rate *r, const char *what, int err)
{
	if (atomic_fetch_add(&r->errors, 1) == 0) {
		pthread_mutex_lock(&r->mu);
		snprintf(r->first, sizeof(r->first), "%s: %s", what, strerror(err));
		pthread_mutex_unlock(&r->mu);
	}
}

static void *rate_worker(void *arg)
{
	struct rate *r = arg;
	char req[MSG] = {0}, resp[MSG];
	while (now_ns(CLOCK_MONOTONIC) < r->deadline) {
		long long n = atomic_fetch_add(&r->next, 1) + 1;
		if (n > r->maxops)
			break;
		struct target *t = &r->targets[n % r->ntargets];
		int s = socket(t->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0) {
			rate_error(r, "socket", errno);
			continue;
		}
		set_timeout(s, SO_SNDTIMEO, 2); /* bounds connect too */
		set_timeout(s, SO_RCVTIMEO, 2);
		if (connect(s, (struct sockaddr *)&t->sa, t->len)) {
			rate_error(r, "connect", errno);
			close(s);
			continue;
		}
		if (write(s, req, MSG) != MSG) {
			rate_error(r, "write", errno);
			close(s);
			continue;
		}
		int got = 0;
		while (got < MSG) {
			ssize_t k = read(s, resp + got, MSG - got);
			if (k <= 0)
				break;
			got += k;
		}
		close(s);
		if (got < MSG) {
			rate_error(r, "read", got < 0 ? errno : ECONNRESET);
			continue;
		}
		atomic_fetch_add(&r->ops, 1);
	}
	return NULL;
}

static int parse_targets(char *list, struct sockaddr_in *out, int max)
{
	int n = 0;
	for (char *tok = strtok(list, ","); tok && n < max; tok = strtok(NULL, ","))
		if (parse_addr(tok, &out[n++]))
			return -1;
	return n;
}

/* rate_targets reads the TARGET... arguments of a rate-like command into r;
 * on a bad one it prints the error line and returns -1. */
static int rate_targets(struct rate *r, const char *cmd, char **f, int nf)
{
	for (int i = 0; i < nf && r->ntargets < MAX_TARGETS; i++)
		if (parse_target(f[i], &r->targets[r->ntargets++])) {
			printf("{\"errors\":1,\"err\":\"%s: bad target %s\"}\n", cmd, f[i]);
			return -1;
		}
	return 0;
}

/* run_rate runs conns threads of worker, thread i on args[i], until r's
 * deadline (dur from now) or maxops, and prints the result line. */
static void run_rate(struct rate *r, int conns, int64_t dur, void *(*worker)(void *), void **args)
{
	static pthread_t th[MAX_CONNS];
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 128 << 10);
	int64_t start = now_ns(CLOCK_MONOTONIC);
	r->deadline = start + dur;
	int started = 0;
	for (; started < conns; started++)
		if (pthread_create(&th[started], &attr, worker, args[started]))
			break;
	for (int i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	int64_t elapsed = now_ns(CLOCK_MONOTONIC) - start;
	printf("{\"ops\":%lld,\"errors\":%lld,\"elapsed\":%lld", (long long)r->ops, (long long)r->errors, (long long)elapsed);
	if (r->errors)
		printf(",\"err\":\"%s\"", r->first);
	printf("}\n");
}

static void do_rate(char **f, int nf)
{
	if (nf < 5) {
		printf("{\"errors\":1,\"err\":\"rate: want CONNS DURATION_NS MAXOPS TARGET...\"}\n");
		return;
	}
	static struct rate r;
	memset(&r, 0, sizeof(r));
	pthread_mutex_init(&r.mu, NULL);
	int conns = atoi(f[1]);
	int64_t dur = atoll(f[2]);
	r.maxops = atoll(f[3]);
	if (conns < 1 || conns > MAX_CONNS || dur <= 0 || dur > 30000000000LL || r.maxops < 1) {
		printf("{\"errors\":1,\"err\":\"rate: bad conns, duration or maxops\"}\n");
		return;
	}
	if (rate_targets(&r, "rate", f + 4, nf - 4))
		return;
	static void *args[MAX_CONNS];
	for (int i = 0; i < conns; i++)
		args[i] = &r;
	run_rate(&r, conns, dur, rate_worker, args);
}

/* ---- client: udp ---- */

struct udp_worker_arg {
	struct rate *r;
	int id, connected;
};

static void *udp_worker(void *arg)
{
	struct udp_worker_arg *w = arg;
	struct rate *r = w->r;
	struct target *home = &r->targets[w->id % r->ntargets];
	int s = socket(home->sa.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		rate_error(r, "socket", errno);
		return NULL;
	}
	struct timeval tv = {.tv_sec = 1};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (w->connected && connect(s, (struct sockaddr *)&home->sa, home->len)) {
		rate_error(r, "connect", errno);
		close(s);
		return NULL;
	}
	char req[MSG] = {0}, resp[MSG];
	for (uint64_t seq = 1; now_ns(CLOCK_MONOTONIC) < r->deadline; seq++) {
		long long n = atomic_fetch_add(&r->next, 1) + 1;
		if (n > r->maxops)
			break;
		struct target *t = &r->targets[n % r->ntargets];
		memcpy(req, &seq, sizeof(seq));
		ssize_t k = w->connected ? send(s, req, MSG, 0) : sendto(s, req, MSG, 0, (struct sockaddr *)&t->sa, t->len);
		if (k != MSG) {
			rate_error(r, "send", errno);
			continue;
		}
		/* The echo of this datagram; a late echo of an earlier one (whose
		 * wait timed out) is skipped, a few at most. */
		int ok = 0, err = 0;
		for (int tries = 0; tries < 4 && !ok; tries++) {
			struct sockaddr_storage from;
			socklen_t fl = sizeof(from);
			k = w->connected ? recv(s, resp, MSG, 0) : recvfrom(s, resp, MSG, 0, (struct sockaddr *)&from, &fl);
			if (k != MSG) {
				err = k < 0 ? errno : EMSGSIZE;
				break;
			}
			if (memcmp(resp, &seq, sizeof(seq)))
				continue;
			if (!w->connected && !same_addr(&from, &t->sa)) {
				err = EADDRNOTAVAIL; /* the reply is not from where the datagram went */
				break;
			}
			ok = 1;
		}
		if (!ok) {
			rate_error(r, err == EADDRNOTAVAIL ? "recvfrom: reply from another address" : "recv", err ? err : EPROTO);
			continue;
		}
		atomic_fetch_add(&r->ops, 1);
	}
	close(s);
	return NULL;
}

static void do_udp(char **f, int nf)
{
	if (nf < 6) {
		printf("{\"errors\":1,\"err\":\"udp: want CONNS DURATION_NS MAXOPS CONNECTED TARGET...\"}\n");
		return;
	}
	static struct rate r;
	memset(&r, 0, sizeof(r));
	pthread_mutex_init(&r.mu, NULL);
	int conns = atoi(f[1]), connected = atoi(f[4]);
	int64_t dur = atoll(f[2]);
	r.maxops = atoll(f[3]);
	if (conns < 1 || conns > MAX_CONNS || dur <= 0 || dur > 30000000000LL || r.maxops < 1 || (connected != 0 && connected != 1)) {
		printf("{\"errors\":1,\"err\":\"udp: bad conns, duration, maxops or connected\"}\n");
		return;
	}
	if (rate_targets(&r, "udp", f + 5, nf - 5))
		return;
	static struct udp_worker_arg wargs[MAX_CONNS];
	static void *args[MAX_CONNS];
	for (int i = 0; i < conns; i++) {
		wargs[i] = (struct udp_worker_arg){.r = &r, .id = i, .connected = connected};
		args[i] = &wargs[i];
	}
	run_rate(&r, conns, dur, udp_worker, args);
}

/* ---- client: cost ---- */

static int enter_cgroup(const char *dir)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
	FILE *f = fopen(path, "w");
	if (!f)
		return -1;
	int bad = fprintf(f, "%d\n", getpid()) < 0;
	return (fclose(f) || bad) ? -1 : 0;
}

/* block runs n connects from the current cgroup and gives the CPU time of
 * this thread per connect, in ns. */
static double block(struct sockaddr_in *t, int nt, int n, int peer, long long *errors, int *lasterr)
{
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	int64_t t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	for (int i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0) {
			(*errors)++, *lasterr = errno;
			continue;
		}
		if (connect(s, (struct sockaddr *)&t[i % nt], sizeof(t[0]))) {
			(*errors)++, *lasterr = errno;
		} else if (peer) {
			struct sockaddr_in pa;
			socklen_t len = sizeof(pa);
			getpeername(s, (struct sockaddr *)&pa, &len);
		}
		setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(s);
	}
	return (double)(now_ns(CLOCK_THREAD_CPUTIME_ID) - t0) / n;
}

static void do_cost(char **f, int nf, const char *home)
{
	if (nf != 8) {
		printf("{\"errors\":1,\"err\":\"cost: want BLOCK PAIRS PEERNAME CGROUP_A TARGETS_A CGROUP_B TARGETS_B\"}\n");
		return;
	}
	int n = atoi(f[1]), pairs = atoi(f[2]), peer = atoi(f[3]);
	struct sockaddr_in ta[MAX_TARGETS], tb[MAX_TARGETS];
	int na = parse_targets(f[5], ta, MAX_TARGETS), nb = parse_targets(f[7], tb, MAX_TARGETS);
	if (n < 1 || n > MAX_BLOCK || pairs < 1 || pairs > MAX_PAIRS || na < 1 || nb < 1) {
		printf("{\"errors\":1,\"err\":\"cost: bad block, pairs or targets\"}\n");
		return;
	}
	static double a[MAX_PAIRS], b[MAX_PAIRS];
	long long errors = 0;
	int lasterr = 0;
	const char *cg[2] = {f[4], f[6]};
	for (int p = 0; p < pairs; p++) {
		/* ABBA: the order alternates, so that neither side always runs
		 * right after a cgroup move. */
		for (int k = 0; k < 2; k++) {
			int side = (p & 1) ^ k;
			if (enter_cgroup(cg[side])) {
				printf("{\"errors\":1,\"err\":\"enter cgroup %s: %s\"}\n", cg[side], strerror(errno));
				enter_cgroup(home);
				return;
			}
			double v = side ? block(tb, nb, n, peer, &errors, &lasterr) : block(ta, na, n, peer, &errors, &lasterr);
			(side ? b : a)[p] = v;
		}
	}
	enter_cgroup(home);
	printf("{\"errors\":%lld", errors);
	if (errors)
		printf(",\"err\":\"connect: %s\"", strerror(lasterr));
	const char *names[2] = {"a", "b"};
	double *vals[2] = {a, b};
	for (int k = 0; k < 2; k++) {
		printf(",\"%s\":[", names[k]);
		for (int p = 0; p < pairs; p++)
			printf("%s%.1f", p ? "," : "", vals[k][p]);
		printf("]");
	}
	printf("}\n");
}

static int run_client(const char *home)
{
	printf("{\"ready\":true}\n");
	fflush(stdout);
	static char line[MAX_LINE];
	while (fgets(line, sizeof(line), stdin)) {
		char *f[MAX_TARGETS + 8];
		int nf = 0;
		for (char *tok = strtok(line, " \n"); tok && nf < (int)(sizeof(f) / sizeof(f[0])); tok = strtok(NULL, " \n"))
			f[nf++] = tok;
		if (nf == 0)
			continue;
		if (!strcmp(f[0], "rate"))
			do_rate(f, nf);
		else if (!strcmp(f[0], "udp"))
			do_udp(f, nf);
		else if (!strcmp(f[0], "cost"))
			do_cost(f, nf, home);
		else
			printf("{\"errors\":1,\"err\":\"unknown request %s\"}\n", f[0]);
		fflush(stdout);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "server"))
		return run_server(argc - 2, argv + 2);
	if (argc == 3 && !strcmp(argv[1], "client"))
		return run_client(argv[2]);
	fprintf(stderr, "usage: lean server [udp:]ADDR:PORT... | lean client HOME_CGROUP\n");
	return 2;
}
