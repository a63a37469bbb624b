// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ctlb: connect-time load balancing for containers (map layout v2).
 *
 * connect4/connect6 rewrite a TCP, MPTCP or connected-UDP connect() to a VIP
 * into a connect() to one server of the VIP's set; sendmsg4/sendmsg6 do the
 * same per datagram for unconnected UDP, keeping the socket's server for its
 * life. getpeername4/6 and recvmsg4/6 make the socket see the VIP as its
 * peer. sock_ops counts established TCP connects and marks a server failing
 * when a SYN goes unanswered; connect skips failing servers. sock_release,
 * attached once at the cgroup v2 root, gives back open counts, and counts
 * (and marks) a connect that never got established as failed. The maps are
 * in ctlb.h; docs/MAPS.md describes them.
 *
 * Cost on the IPv4 TCP path: one hash lookup (the VIP), array lookups by
 * server slot (inlined by the verifier), one atomic add for round-robin, one
 * for the open count, and a compare-and-swap taking a socket table entry for
 * VIP sockets only (socket storage when the entry is taken).
 */
#include "ctlb.h"
#include <bpf/bpf_endian.h>

#define TCP_SYN_SENT 2
#define TCP_CLOSE 7

/* Flags ctx->user_ip6 etc. are read and written as u32 words. */
struct addr16 {
	__u32 w[4];
};

/* ----- addresses ---------------------------------------------------- */

static __always_inline void v4mapped(struct addr16 *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr_copy(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* ----- settings ----------------------------------------------------- */

static __always_inline void hold_times(__u64 *base, __u64 *max)
{
	__u32 zero = 0;
	struct config_v2 *c = bpf_map_lookup_elem(&ctlb_config_v2, &zero);
	*base = CTLB_HOLD_BASE_NS_DEFAULT;
	*max = CTLB_HOLD_MAX_NS_DEFAULT;
	if (c && c->hold_base_ns)
		*base = c->hold_base_ns;
	if (c && c->hold_max_ns)
		*max = c->hold_max_ns;
}

/* ----- failing marks ------------------------------------------------ */

/*
 * May a new connect go to this slot? A slot is usable when it carries no
 * mark; when its hold-down has passed, the first caller takes it as the probe
 * and pushes the mark one hold_base ahead so that the others keep skipping it
 * until the probe's outcome is known (sock_ops clears or renews the mark).
 * The clock is read only for marked slots.
 */
static __always_inline int slot_usable(__u32 slot)
{
	struct slot_fail_v2 *f = bpf_map_lookup_elem(&ctlb_failing_v2, &slot);
	if (!f)
		return 1;
	__u64 until = f->until_ns;
	if (!until)
		return 1;
	__u64 now = bpf_ktime_get_ns();
	if (now < until)
		return 0;
	__u64 base, max;
	hold_times(&base, &max);
	return __sync_val_compare_and_swap(&f->until_ns, until, now + base) == until;
}

static __always_inline void mark_failing(__u32 slot)
{
	struct slot_fail_v2 *f = bpf_map_lookup_elem(&ctlb_failing_v2, &slot);
	if (!f)
		return;
	__u64 base, max;
	hold_times(&base, &max);
	__u32 strikes = f->strikes;
	if (strikes > 20)
		strikes = 20;
	__u64 hold = base << strikes;
	if (hold > max || hold < base)
		hold = max;
	f->until_ns = bpf_ktime_get_ns() + hold;
	__sync_fetch_and_add(&f->strikes, 1);
}

static __always_inline void clear_failing(__u32 slot)
{
	struct slot_fail_v2 *f = bpf_map_lookup_elem(&ctlb_failing_v2, &slot);
	if (f && (f->until_ns || f->strikes)) {
		f->until_ns = 0;
		f->strikes = 0;
	}
}

/* ----- choosing a server -------------------------------------------- */

struct scan_ctx {
	void *backends;
	__u32 count;
	__u32 start;
	struct backend_v2 *found;
};

static long scan_one(__u64 i, void *data)
{
	struct scan_ctx *s = data;
	if (i >= s->count)
		return 1; /* every server looked at once */
	__u32 idx = (s->start + (__u32)i) % s->count + 1;
	struct backend_v2 *be = bpf_map_lookup_elem(s->backends, &idx);
	if (be && slot_usable(be->slot)) {
		s->found = be;
		return 1;
	}
	return 0;
}

static __always_inline __s64 open_of(__u32 slot)
{
	__s64 *o = bpf_map_lookup_elem(&ctlb_open_v2, &slot);
	return o ? *o : 0;
}

/* Up to this many servers, least-open looks at every one and takes the
 * least loaded (ties go to the first seen from a random start): exact, and
 * still a handful of array lookups. Larger sets use the power of two
 * choices, whose cost does not grow with the set. */
#define CTLB_LEAST_OPEN_EXACT 8

struct least_ctx {
	void *backends;
	__u32 count;
	__u32 start;
	struct backend_v2 *best;
	__s64 best_open;
};

static long least_one(__u64 i, void *data)
{
	struct least_ctx *s = data;
	if (i >= s->count)
		return 1;
	__u32 idx = (s->start + (__u32)i) % s->count + 1;
	struct backend_v2 *be = bpf_map_lookup_elem(s->backends, &idx);
	if (!be || !slot_usable(be->slot))
		return 0;
	__s64 o = open_of(be->slot);
	if (!s->best || o < s->best_open) {
		s->best = be;
		s->best_open = o;
	}
	return 0;
}

/*
 * Pick a usable server, or NULL when every server is failing. The first
 * candidate comes from the balance mode; only when it is failing does the
 * (bounded) scan for the next usable one run.
 */
static __always_inline struct backend_v2 *choose(void *backends, struct svc_hdr_v2 *hdr, __u32 count)
{
	__u32 first;
	if (hdr->balance == CTLB_BALANCE_RANDOM) {
		first = bpf_get_prandom_u32() % count;
	} else if (hdr->balance == CTLB_BALANCE_LEAST_OPEN && count > 1 && count <= CTLB_LEAST_OPEN_EXACT) {
		struct least_ctx s = {.backends = backends, .count = count, .start = bpf_get_prandom_u32() % count};
		bpf_loop(CTLB_LEAST_OPEN_EXACT, least_one, &s, 0);
		return s.best; /* 0: every server is failing */
	} else if (hdr->balance == CTLB_BALANCE_LEAST_OPEN && count > 1) {
		/* Power of two choices: the less loaded of two distinct
		 * random servers. */
		__u32 r = bpf_get_prandom_u32();
		__u32 a = r % count;
		__u32 b = (a + 1 + (r >> 16) % (count - 1)) % count;
		__u32 ia = a + 1, ib = b + 1;
		struct backend_v2 *ba = bpf_map_lookup_elem(backends, &ia);
		struct backend_v2 *bb = bpf_map_lookup_elem(backends, &ib);
		if (!ba || !bb)
			return 0;
		if (open_of(bb->slot) < open_of(ba->slot)) {
			struct backend_v2 *t = ba;
			ba = bb;
			bb = t;
			a = b;
		}
		if (slot_usable(ba->slot))
			return ba;
		if (slot_usable(bb->slot))
			return bb;
		first = a;
	} else {
		__u32 svc = hdr->svc;
		struct svc_state_v2 *ss = bpf_map_lookup_elem(&ctlb_svcstate_v2, &svc);
		if (!ss)
			return 0;
		first = __sync_fetch_and_add(&ss->rr, 1) % count;
	}
	__u32 idx = first + 1;
	struct backend_v2 *be = bpf_map_lookup_elem(backends, &idx);
	if (!be)
		return 0;
	if (slot_usable(be->slot))
		return be;
	struct scan_ctx s = {.backends = backends, .count = count, .start = first + 1};
	bpf_loop(CTLB_MAX_SERVERS, scan_one, &s, 0);
	return s.found; /* 0: every server is failing */
}

/* ----- features -------------------------------------------------------- */

/*
 * What connect does besides the rewrite. The programs ctlb ships do all of
 * it (CTLB_FEAT_ALL); the benchmark builds this file with
 * CTLB_BENCH_VARIANTS for connect4 programs that do less, to show what each
 * feature costs per connect (test/bench/cost.go). Constants: the compiler
 * drops what a program does not do.
 */
#define CTLB_FEAT_COUNT 0x1 /* attempts counter per slot */
#define CTLB_FEAT_STATE 0x2 /* socket state: getpeername, release, sock_ops, termination */
#define CTLB_FEAT_OPEN 0x4  /* open count per slot (least-open), given back at release */
#define CTLB_FEAT_TABLE 0x8 /* the state in the socket table first (else socket storage only) */
#define CTLB_FEAT_ALL (CTLB_FEAT_COUNT | CTLB_FEAT_STATE | CTLB_FEAT_OPEN | CTLB_FEAT_TABLE)

/* ----- socket state ------------------------------------------------- */

/*
 * The state of a socket (ctlb.h: the socket table, then socket storage), or
 * for an MPTCP subflow the MPTCP socket's storage: the application holds
 * that socket, and its getpeername and close act on it. cookie is sk's.
 */
static __always_inline struct sock_state_v2 *state_get(struct bpf_sock *sk, __u64 cookie, int *mptcp)
{
	/* The table first: a VIP socket's state is almost always there, and
	 * never an MPTCP one's (connect keeps those in storage). */
	*mptcp = 0;
	struct sock_entry_v2 *e = socktab_entry(cookie);
	if (e && e->cookie == cookie)
		return &e->st;
	struct mptcp_sock *msk = bpf_skc_to_mptcp_sock(sk);
	if (msk) {
		*mptcp = 1;
		return bpf_sk_storage_get(&ctlb_socks_v2, msk, 0, 0);
	}
	return bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, 0);
}

/*
 * The state of a socket being sent to a VIP, made if it has none: the state
 * it has, else a free entry of the socket table, else socket storage (the
 * entry belongs to another open socket, or MPTCP, or a benchmark variant
 * without the table). A new entry starts with no slot and no flags.
 */
static __always_inline struct sock_state_v2 *state_make(struct bpf_sock *sk, __u64 cookie, int *mptcp, int table)
{
	struct mptcp_sock *msk = bpf_skc_to_mptcp_sock(sk);
	if (msk) {
		*mptcp = 1;
		return bpf_sk_storage_get(&ctlb_socks_v2, msk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	}
	*mptcp = 0;
	if (!table)
		return bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	struct sock_entry_v2 *e = socktab_entry(cookie);
	if (e && e->cookie == cookie)
		return &e->st;
	struct sock_state_v2 *st = bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, 0);
	if (st)
		return st; /* state kept in storage since an earlier connect */
	if (e && !e->cookie && __sync_val_compare_and_swap(&e->cookie, 0, cookie) == 0) {
		e->st.flags = 0;
		e->st.slot = 0;
		return &e->st;
	}
	return bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

/*
 * A TCP connect that sock_ops watched start and never saw established has
 * failed: refused (RST), timed out, or given up by the application. It is
 * counted, and its slot marked failing, when the socket is released or
 * connected again: the first moment ctlb hears of it without a state
 * callback on every VIP connect (that callback would run at each handshake,
 * SYN_SENT -> ESTABLISHED, and cost one more sock_ops run per connect). A
 * client learns of the failure from connect() and closes the socket or
 * tries again, so the mark lands before its next connect. A state without a
 * slot has no flags (forget clears both), so it is never counted.
 */
static __always_inline void count_failed(struct sock_state_v2 *st)
{
	if ((st->flags & (CTLB_SK_F_WATCHED | CTLB_SK_F_ESTABLISHED | CTLB_SK_F_FAILED)) != CTLB_SK_F_WATCHED)
		return;
	__u32 slot = st->slot;
	st->flags |= CTLB_SK_F_FAILED;
	struct slot_counters_v2 *c = bpf_map_lookup_elem(&ctlb_counters_v2, &slot);
	if (c)
		c->failed++;
	if (!(st->flags & CTLB_SK_F_MARKED)) {
		st->flags |= CTLB_SK_F_MARKED;
		mark_failing(slot);
	}
}

/* Give back the socket's open count and forget its VIP. */
static __always_inline void forget(struct sock_state_v2 *st)
{
	if (st->flags & CTLB_SK_F_OPEN) {
		__u32 slot = st->slot;
		__s64 *open = bpf_map_lookup_elem(&ctlb_open_v2, &slot);
		if (open)
			__sync_fetch_and_add(open, -1);
	}
	st->flags = 0;
	st->slot = 0;
}

static __always_inline void record(struct sock_state_v2 *st, const struct svc_key_v2 *key, __u32 svc,
				   const struct backend_v2 *be, int mptcp, int unconnected, int feat)
{
	count_failed(st); /* connected again after a failed connect */
	forget(st);
	__u32 slot = be->slot;
	__s64 *open = (feat & CTLB_FEAT_OPEN) ? bpf_map_lookup_elem(&ctlb_open_v2, &slot) : 0;
	__u8 flags = 0;
	if (open) {
		__sync_fetch_and_add(open, 1);
		flags |= CTLB_SK_F_OPEN;
	}
	if (mptcp)
		flags |= CTLB_SK_F_MPTCP;
	if (unconnected)
		flags |= CTLB_SK_F_UNCONNECTED;
	addr_copy((__u32 *)st->vip, (const __u32 *)key->addr);
	addr_copy((__u32 *)st->server, (const __u32 *)be->addr);
	st->vport = key->port;
	st->sport = be->port;
	st->proto = key->proto;
	st->slot = slot;
	st->svc = svc;
	st->flags = flags;
}

static __always_inline void count_attempt(__u32 slot)
{
	struct slot_counters_v2 *c = bpf_map_lookup_elem(&ctlb_counters_v2, &slot);
	if (c)
		c->attempts++;
}

/* ----- connect and sendmsg ------------------------------------------ */

/* The VIP protocol of a socket, or 0 for sockets ctlb leaves alone. */
static __always_inline __u8 vip_proto(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type, proto = ctx->protocol;
	if (type == SOCK_STREAM && (proto == IPPROTO_TCP || proto == IPPROTO_MPTCP))
		return IPPROTO_TCP;
	if (type == SOCK_DGRAM && proto == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

enum { HOOK_CONNECT, HOOK_SENDMSG };

/*
 * One connect() or unconnected sendmsg() to dst:port (dst v4-mapped for
 * AF_INET and for dual-stack sockets dialing IPv4). Returns 1 with *out set
 * to rewrite, 0 to leave the call alone, -1 to refuse it with ECONNREFUSED.
 */
static __always_inline int translate(struct bpf_sock_addr *ctx, const struct addr16 *dst, __u16 port, int hook,
				     struct addr16 *out, __u16 *out_port, int feat)
{
	/* An earlier program on this hook denied the call: neither rewrite
	 * nor count. */
	if (bpf_get_retval() != 0)
		return 0;
	__u8 proto = vip_proto(ctx);
	if (!proto)
		return 0;

	struct svc_key_v2 key __attribute__((aligned(8))) = {};
	addr_copy((__u32 *)key.addr, dst->w);
	key.port = port;
	key.proto = proto;

	struct bpf_sock *sk = ctx->sk;
	int mptcp = 0;
	void *backends = bpf_map_lookup_elem(&ctlb_services_v2, &key);
	if (!backends) {
		/* A socket that was a VIP socket (then disconnected with
		 * AF_UNSPEC) connecting elsewhere forgets its VIP. Datagrams
		 * to other addresses leave the state alone. */
		if (hook == HOOK_CONNECT && sk) {
			struct sock_state_v2 *st = state_get(sk, bpf_get_socket_cookie(ctx), &mptcp);
			if (st && st->slot) {
				count_failed(st);
				forget(st);
			}
		}
		return 0;
	}

	if (hook == HOOK_SENDMSG && sk) {
		/* An unconnected socket keeps its server for its life. */
		struct sock_state_v2 *st = state_get(sk, bpf_get_socket_cookie(ctx), &mptcp);
		if (st && st->slot && st->vport == key.port && st->proto == proto &&
		    addr_eq((const __u32 *)st->vip, (const __u32 *)key.addr)) {
			addr_copy(out->w, (const __u32 *)st->server);
			*out_port = st->sport;
			return 1;
		}
	}

	__u32 zero = 0;
	struct svc_hdr_v2 *hdr = bpf_map_lookup_elem(backends, &zero);
	if (!hdr)
		return 0;
	__u32 count = hdr->count;
	struct backend_v2 *be = 0;
	if (count > 0 && count <= CTLB_MAX_SERVERS)
		be = choose(backends, hdr, count);
	if (!be) {
		/* No server, or every server failing: the empty policy. */
		return (hdr->flags & CTLB_SVC_F_REJECT_EMPTY) ? -1 : 0;
	}

	addr_copy(out->w, (const __u32 *)be->addr);
	*out_port = be->port;
	if (feat & CTLB_FEAT_COUNT)
		count_attempt(be->slot);
	if (!sk || !(feat & CTLB_FEAT_STATE))
		return 1;
	struct sock_state_v2 *st = state_make(sk, bpf_get_socket_cookie(ctx), &mptcp, feat & CTLB_FEAT_TABLE);
	if (st)
		record(st, &key, hdr->svc, be, mptcp, hook == HOOK_SENDMSG, feat);
	return 1;
}

static __always_inline int refuse(void)
{
	/* Fail at once rather than let the client wait on a VIP that nothing
	 * answers. */
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

static __always_inline int hook4(struct bpf_sock_addr *ctx, int hook, int feat)
{
	struct addr16 dst, out;
	__u16 port;
	v4mapped(&dst, ctx->user_ip4);
	int r = translate(ctx, &dst, (__u16)ctx->user_port, hook, &out, &port, feat);
	if (r < 0)
		return refuse();
	if (r > 0) {
		ctx->user_ip4 = out.w[3];
		ctx->user_port = port;
	}
	return 1;
}

static __always_inline int hook6(struct bpf_sock_addr *ctx, int hook, int feat)
{
	struct addr16 dst, out;
	__u16 port;
	dst.w[0] = ctx->user_ip6[0];
	dst.w[1] = ctx->user_ip6[1];
	dst.w[2] = ctx->user_ip6[2];
	dst.w[3] = ctx->user_ip6[3];
	int r = translate(ctx, &dst, (__u16)ctx->user_port, hook, &out, &port, feat);
	if (r < 0)
		return refuse();
	if (r > 0) {
		ctx->user_ip6[0] = out.w[0];
		ctx->user_ip6[1] = out.w[1];
		ctx->user_ip6[2] = out.w[2];
		ctx->user_ip6[3] = out.w[3];
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/connect4")
int ctlb_connect4(struct bpf_sock_addr *ctx) { return hook4(ctx, HOOK_CONNECT, CTLB_FEAT_ALL); }

SEC("cgroup/connect6")
int ctlb_connect6(struct bpf_sock_addr *ctx) { return hook6(ctx, HOOK_CONNECT, CTLB_FEAT_ALL); }

SEC("cgroup/sendmsg4")
int ctlb_sendmsg4(struct bpf_sock_addr *ctx) { return hook4(ctx, HOOK_SENDMSG, CTLB_FEAT_ALL); }

SEC("cgroup/sendmsg6")
int ctlb_sendmsg6(struct bpf_sock_addr *ctx) { return hook6(ctx, HOOK_SENDMSG, CTLB_FEAT_ALL); }

#ifdef CTLB_BENCH_VARIANTS
/* The benchmark's connect4 variants, one feature more each (cost.go);
 * the next step, the open count, is ctlb_connect4 itself. */
SEC("cgroup/connect4")
int ctlb_connect4_rewrite(struct bpf_sock_addr *ctx) { return hook4(ctx, HOOK_CONNECT, 0); }

SEC("cgroup/connect4")
int ctlb_connect4_count(struct bpf_sock_addr *ctx) { return hook4(ctx, HOOK_CONNECT, CTLB_FEAT_COUNT); }

SEC("cgroup/connect4")
int ctlb_connect4_storage(struct bpf_sock_addr *ctx)
{
	return hook4(ctx, HOOK_CONNECT, CTLB_FEAT_COUNT | CTLB_FEAT_STATE);
}

SEC("cgroup/connect4")
int ctlb_connect4_state(struct bpf_sock_addr *ctx)
{
	return hook4(ctx, HOOK_CONNECT, CTLB_FEAT_COUNT | CTLB_FEAT_STATE | CTLB_FEAT_TABLE);
}

/* Programs that do nothing, on the hooks an IPv4 TCP connect to a VIP
 * runs (the root's sock_release runs for every socket alike): what the
 * kernel's dispatch of those hooks costs, the floor under any program set. */
SEC("cgroup/connect4")
int ctlb_connect4_empty(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/getpeername4")
int ctlb_getpeername4_empty(struct bpf_sock_addr *ctx) { return 1; }

SEC("sockops")
int ctlb_sock_ops_empty(struct bpf_sock_ops *skops) { return 1; }
#endif

/* ----- getpeername and recvmsg: server -> VIP ------------------------ */

static __always_inline int peer4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state_v2 *st = state_lookup(sk, bpf_get_socket_cookie(ctx));
	if (!st || !st->slot)
		return 1;
	const __u32 *srv = (const __u32 *)st->server;
	if (ctx->user_ip4 == srv[3] && (__u16)ctx->user_port == st->sport && srv[2] == bpf_htonl(0xffff) &&
	    srv[0] == 0 && srv[1] == 0) {
		ctx->user_ip4 = ((const __u32 *)st->vip)[3];
		ctx->user_port = st->vport;
	}
	return 1;
}

static __always_inline int peer6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state_v2 *st = state_lookup(sk, bpf_get_socket_cookie(ctx));
	if (!st || !st->slot)
		return 1;
	const __u32 *srv = (const __u32 *)st->server;
	if (ctx->user_ip6[0] == srv[0] && ctx->user_ip6[1] == srv[1] && ctx->user_ip6[2] == srv[2] &&
	    ctx->user_ip6[3] == srv[3] && (__u16)ctx->user_port == st->sport) {
		const __u32 *vip = (const __u32 *)st->vip;
		ctx->user_ip6[0] = vip[0];
		ctx->user_ip6[1] = vip[1];
		ctx->user_ip6[2] = vip[2];
		ctx->user_ip6[3] = vip[3];
		ctx->user_port = st->vport;
	}
	return 1;
}

SEC("cgroup/getpeername4")
int ctlb_getpeername4(struct bpf_sock_addr *ctx) { return peer4(ctx); }

SEC("cgroup/getpeername6")
int ctlb_getpeername6(struct bpf_sock_addr *ctx) { return peer6(ctx); }

SEC("cgroup/recvmsg4")
int ctlb_recvmsg4(struct bpf_sock_addr *ctx) { return peer4(ctx); }

SEC("cgroup/recvmsg6")
int ctlb_recvmsg6(struct bpf_sock_addr *ctx) { return peer6(ctx); }

/* ----- release ------------------------------------------------------ */

/* A socket released in SYN_SENT or CLOSE may be a failed connect; in any
 * other state it was established, whatever its flags say (sock_ops was
 * detached before the handshake completed). */
static __always_inline void release_state(struct bpf_sock *sk, struct sock_state_v2 *st)
{
	__u32 state = sk->state;
	if (state == TCP_SYN_SENT || state == TCP_CLOSE)
		count_failed(st);
	forget(st);
}

/* Attached once at the cgroup v2 root: a socket gives back its open count
 * and its socket table entry when it closes, even if its pod was detached
 * meanwhile. (An MPTCP socket's state is on the MPTCP socket released here;
 * its subflows are kernel sockets, which never run this hook.) */
SEC("cgroup/sock_release")
int ctlb_sock_release(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_socket_cookie(sk);
	struct sock_entry_v2 *e = socktab_entry(cookie);
	if (e && e->cookie == cookie) {
		if (e->st.slot)
			release_state(sk, &e->st);
		/* An exchange, not a store: a fetching atomic is fully ordered
		 * (the plain stores of forget() cannot land after the next
		 * owner's compare-and-swap took the entry, on arm64 either). */
		__sync_lock_test_and_set(&e->cookie, 0);
		return 1;
	}
	struct sock_state_v2 *st = bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, 0);
	if (st && st->slot)
		release_state(sk, st);
	return 1;
}

/* ----- sock_ops: watched, established, marked on a SYN timeout ------- */

/*
 * Five callbacks run for every TCP connect with or without a program's
 * asking (TCP_CONNECT, TIMEOUT_INIT, RWND_INIT, NEEDS_ECN,
 * ACTIVE_ESTABLISHED); ctlb asks for one more, the retransmission timeout,
 * for VIP sockets until they are established, which costs nothing unless a
 * SYN goes unanswered. A refused connect is counted at release
 * (count_failed), not by a state callback.
 */
SEC("sockops")
int ctlb_sock_ops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	/* A STATE_CB comes only for a socket an earlier ctlb program asked it
	 * for, and needs nothing now. */
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_RTO_CB)
		return 1;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	int mptcp = 0;
	struct sock_state_v2 *st = state_get(sk, bpf_get_socket_cookie(skops), &mptcp);
	if (!st || !st->slot || st->proto != IPPROTO_TCP)
		return 1;
	__u32 slot = st->slot;
	struct slot_counters_v2 *c;

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		st->flags |= CTLB_SK_F_WATCHED;
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTO_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (st->flags & CTLB_SK_F_ESTABLISHED)
			break;
		st->flags |= CTLB_SK_F_ESTABLISHED;
		c = bpf_map_lookup_elem(&ctlb_counters_v2, &slot);
		if (c)
			c->established++;
		clear_failing(slot);
		/* The state flag too, for a socket an earlier program set it
		 * on. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~(BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG));
		break;
	case BPF_SOCK_OPS_RTO_CB:
		/* A SYN went unanswered: mark the server before the connect
		 * gives up (which takes minutes with default retries). */
		if (skops->state == TCP_SYN_SENT && !(st->flags & (CTLB_SK_F_MARKED | CTLB_SK_F_ESTABLISHED))) {
			st->flags |= CTLB_SK_F_MARKED;
			mark_failing(slot);
		}
		break;
	}
	return 1;
}

/* ----- upgrade from layout v1 ----------------------------------------- */

/*
 * Loaded only while upgrading v1 pins (docs/UPGRADE.md): sockets opened
 * under v1 carry v1 socket state. This release program, attached at the
 * cgroup v2 root, gives their open count back to the v2 slot the upgrade
 * mapped their v1 (VIP, server) to.
 */
struct backend_key_v1 {
	__u32 vip;
	__u32 addr;
	__u16 vport;
	__u16 port;
};

struct sock_state_v1 {
	struct backend_key_v1 be;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state_v1);
} ctlb_socks_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key_v1);
	__type(value, __u32);
} ctlb_v1slots_v2 SEC(".maps");

SEC("cgroup/sock_release")
int ctlb_release_v1(struct bpf_sock *sk)
{
	struct sock_state_v1 *st = bpf_sk_storage_get(&ctlb_socks_v1, sk, 0, 0);
	if (!st || !st->be.addr)
		return 1;
	__u32 *slot = bpf_map_lookup_elem(&ctlb_v1slots_v2, &st->be);
	if (slot) {
		__s64 *open = bpf_map_lookup_elem(&ctlb_open_v2, slot);
		if (open)
			__sync_fetch_and_add(open, -1);
	}
	st->be.addr = 0;
	return 1;
}

/*
 * Run by ctlbd (BPF_PROG_TEST_RUN) while upgrading: adds the counts carried
 * over from v1 with the same atomic operations the programs use, so that no
 * concurrent connect or release is lost.
 */
struct slot_adjust_v2 {
	__u32 slot;
	__u32 pad;
	__s64 open;
	__u64 attempts;
};

SEC("syscall")
int ctlb_slot_adjust(struct slot_adjust_v2 *a)
{
	__u32 slot = a->slot;
	__s64 *open = bpf_map_lookup_elem(&ctlb_open_v2, &slot);
	if (open && a->open)
		__sync_fetch_and_add(open, a->open);
	struct slot_counters_v2 *c = bpf_map_lookup_elem(&ctlb_counters_v2, &slot);
	if (c && a->attempts)
		__sync_fetch_and_add(&c->attempts, a->attempts);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
