// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ctlb socket termination (layout v2): iter/tcp and iter/udp programs that end every
 * socket ctlb directed to a server that has left its VIP's set.
 *
 * ctlbd sets the departed servers' slots' term_budget (ctlb_slots_v2) to
 * CTLB_TERM_ALL (or, rebalancing, to N), creates an iterator inside each
 * network namespace that holds attached pods (an iterator walks the sockets
 * of the namespace it was created in) and reads it to the end; each socket
 * whose ctlb socket state (table entry or socket storage) names such a slot is destroyed with the
 * bpf_sock_destroy kfunc: the application sees ECONNABORTED at once and
 * reconnects through the VIP. Each ending counts in the slot's
 * "terminated" counter. Sockets without ctlb state (processes outside
 * attached cgroups, servers' own sockets) are never touched: matching is
 * exact, by slot, never by address.
 *
 * The maps are the pinned ones of bpf/ctlb.c, shared by the loader.
 * MPTCP sockets keep their state on the MPTCP socket, which no iterator
 * walks (its subflows carry none): they are not ended.
 */
#include "ctlb.h"

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

/* End sk if ctlb sent it to a departed server. sk is the full socket (the
 * storage helper wants one); skc the same socket as bpf_sock_destroy wants. */
static __always_inline void terminate(struct sock *sk, struct sock_common *skc)
{
	struct sock_state_v2 *st = state_lookup(sk, bpf_get_socket_cookie(sk));
	if (!st || !st->slot || (st->flags & CTLB_SK_F_UNCONNECTED))
		return;
	__u32 slot = st->slot;
	struct slot_info_v2 *si = bpf_map_lookup_elem(&ctlb_slots_v2, &slot);
	if (!si)
		return;
	__u32 budget = si->term_budget;
	if (!budget)
		return;
	/* A rebalance ends up to N sockets: take one from the budget first,
	 * so two iterators running at once never end more than N. */
	if (budget != CTLB_TERM_ALL &&
	    __sync_val_compare_and_swap(&si->term_budget, budget, budget - 1) != budget)
		return;
	if (bpf_sock_destroy(skc) != 0) {
		if (budget != CTLB_TERM_ALL)
			__sync_fetch_and_add(&si->term_budget, 1);
		return;
	}
	struct slot_counters_v2 *c = bpf_map_lookup_elem(&ctlb_counters_v2, &slot);
	if (c)
		__sync_fetch_and_add(&c->terminated, 1);
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
