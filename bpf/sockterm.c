// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ctlb socket termination: iter/tcp and iter/udp programs that end every
 * socket ctlb directed to a server that has left its VIP's set.
 *
 * ctlbd fills ctlb_term_v1 with the departed (VIP, server) pairs, creates an
 * iterator inside each network namespace that holds attached pods (an
 * iterator walks the sockets of the namespace it was created in) and reads
 * it to the end; each socket whose ctlb socket storage names a departed pair
 * is destroyed with the bpf_sock_destroy kfunc: the application sees
 * ECONNABORTED at once and reconnects through the VIP. Sockets without ctlb
 * storage (processes outside attached cgroups, servers' own sockets) are
 * never touched: matching is exact, never by address alone.
 *
 * The socket storage map is the pinned one of bpf/ctlb.c, shared by the
 * loader (MapReplacements); its value layout must match struct sock_state.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define TCP_ESTABLISHED 1

/* Kernel types, with only the members read here: CO-RE relocates the
 * offsets against the running kernel's BTF, so no vmlinux.h is needed. */
struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct tcp_sock;
struct udp_sock;
struct bpf_iter_meta;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* Layout v1 of what connect4 records per socket (bpf/ctlb.c). */
struct backend_key {
	__u32 vip;
	__u32 addr;
	__u16 vport;
	__u16 port;
};

struct sock_state {
	struct backend_key be;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} ctlb_socks_v1 SEC(".maps");

/* What one termination pass is to do, and has done, for one pair. */
struct term_count {
	__u64 limit;     /* end at most this many sockets; 0: every one */
	__u64 destroyed; /* sockets ended */
	__u64 failed;    /* bpf_sock_destroy refused (e.g. -EOPNOTSUPP) */
};

/* The (VIP, server) pairs of one pass -> what to do and what was done to
 * their sockets: the departed servers, or, when ctlbd rebalances, a few
 * sockets of the most loaded ones. Private to ctlbd, which fills it before
 * a pass and reads it after. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct backend_key);
	__type(value, struct term_count);
} ctlb_term_v1 SEC(".maps");

/* End sk if ctlb sent it to a departed server. sk is the full socket (the
 * storage helper wants one); skc the same socket as bpf_sock_destroy wants. */
static __always_inline void terminate(struct sock *sk, struct sock_common *skc)
{
	struct sock_state *st = bpf_sk_storage_get(&ctlb_socks_v1, sk, 0, 0);
	if (!st || !st->be.addr)
		return;
	struct backend_key key = st->be;
	struct term_count *tc = bpf_map_lookup_elem(&ctlb_term_v1, &key);
	if (!tc)
		return;
	/* One reader runs the program at a time: no race on the count. */
	if (tc->limit && tc->destroyed >= tc->limit)
		return;
	if (bpf_sock_destroy(skc) == 0)
		__sync_fetch_and_add(&tc->destroyed, 1);
	else
		__sync_fetch_and_add(&tc->failed, 1);
}

SEC("iter/tcp")
int ctlb_term_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	if (skc->skc_family != AF_INET && skc->skc_family != AF_INET6)
		return 0;
	/* NULL for request and TIME_WAIT sockets: nothing to end there. */
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	terminate((struct sock *)tp, skc);
	return 0;
}

SEC("iter/udp")
int ctlb_term_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *up = ctx->udp_sk;
	if (!up)
		return 0;
	struct sock *sk = (struct sock *)up;
	/* Only connected sockets have a server; an ended one is disconnected,
	 * so a second pass does not count it again. */
	if (sk->__sk_common.skc_state != TCP_ESTABLISHED)
		return 0;
	terminate(sk, (struct sock_common *)sk);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
