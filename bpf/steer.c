// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ctlb steering: the fallback proxy's sk_lookup program.
 *
 * Attached to a network namespace, it runs when the kernel looks up the
 * socket for a new TCP connection to a local address. A connection to a
 * steered destination (VIP:port in steer_dests_v1) goes to the one listening
 * socket held in steer_socket_v1, whatever address and port that socket is
 * bound to; the proxy reads the original destination back from the accepted
 * socket's local address. Adding a port is one map update, no new socket.
 *
 * The key is VIP and port, not the port alone: a node may run a real server
 * on the same port (a Consul agent on 8500), and only connections to a
 * configured VIP:port may be taken from it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Not taken from libc headers: they do not build for the bpf target. */
#define AF_INET 2
#define IPPROTO_TCP 6

/* A steered destination. addr in network byte order (as local_ip4), port
 * in host byte order (as local_port). */
struct dest_key {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dest_key);
	/* Index of the socket in steer_socket_v1; always 0 today. */
	__type(value, __u32);
} steer_dests_v1 SEC(".maps");

/* The proxy's listening socket. A closed socket leaves the map by itself,
 * so a dead proxy never receives connections: they fall through to the
 * normal lookup and are refused. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} steer_socket_v1 SEC(".maps");

SEC("sk_lookup")
int steer_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	struct dest_key key = {
		.addr = ctx->local_ip4,
		.port = (__u16)ctx->local_port,
	};
	__u32 *slot = bpf_map_lookup_elem(&steer_dests_v1, &key);
	if (!slot)
		return SK_PASS;

	/* The lookup takes a reference on the socket: release it on every
	 * path, or the verifier refuses the program. */
	struct bpf_sock *sk = bpf_map_lookup_elem(&steer_socket_v1, slot);
	if (!sk)
		return SK_PASS;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
