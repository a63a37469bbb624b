// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ctlb: connect-time load balancing for containers.
 *
 * cgroup/connect4 rewrites a TCP connect() to VIP:port into a connect() to one
 * server of that VIP's set, chosen round-robin. cgroup/getpeername4 makes such
 * a socket report the VIP as its peer, and cgroup/sock_release keeps the
 * per-server open-connection counts right. The map layout is described in
 * docs/MAPS.md; every map and program name carries the layout version (_v1),
 * so a loader never mistakes a pinned object of another layout for its own.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Not taken from libc headers: they do not build for the bpf target. */
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define ECONNREFUSED 111

/* Upper bound on servers per VIP. The inner backend arrays hold a header slot
 * plus at most this many servers; user space refuses larger sets. */
#define CTLB_MAX_SERVERS 1024

/* Header flag: a connect() to a VIP whose set is empty fails with
 * ECONNREFUSED instead of going through to the VIP unchanged. */
#define CTLB_SVC_F_REJECT_EMPTY 0x1

/* A VIP:port. Address and port in network byte order, as in sockaddr_in. */
struct svc_key {
	__u32 vip;
	__u16 port;
	__u16 pad;
};

/*
 * One slot of a service's backend array. Slot 0 is the header: addr holds
 * the number of servers and flags the CTLB_SVC_F_* policy; slots 1..count are
 * the servers (addr and port in network byte order). Keeping the header in
 * the same inner map as the servers is what makes a set replacement atomic: a
 * connect() reads one inner map, old or new, never a mix.
 */
struct backend_slot {
	__u32 addr;
	__u16 port;
	__u16 flags;
};

/* A server as seen from one VIP: the key of the accounting maps. */
struct backend_key {
	__u32 vip;
	__u32 addr;
	__u16 vport;
	__u16 port;
};

/* What a socket remembers of its rewrite, for getpeername and release. */
struct sock_state {
	struct backend_key be;
};

/* VIP:port -> inner array of servers. User space swaps a whole inner array in
 * one update; the kernel frees the old one after an RCU grace period, so a
 * connect() that already looked it up keeps reading valid memory. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	/* Template of the inner arrays. BPF_F_INNER_MAP lets each inner
	 * array have its own size (count + 1). Sizes rather than types:
	 * clang emits a struct reached only through the outer map's pointers
	 * as a forward declaration, which no loader can size. */
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_ARRAY);
		__uint(max_entries, 1);
		__uint(map_flags, BPF_F_INNER_MAP);
		__uint(key_size, sizeof(__u32));
		__uint(value_size, sizeof(struct backend_slot));
	});
} ctlb_services_v1 SEC(".maps");

/* VIP:port -> round-robin counter. Kept apart from the backend arrays so a set
 * replacement does not restart the rotation at the first server. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, __u32);
} ctlb_rr_v1 SEC(".maps");

/* Connects per (VIP, server), per CPU so the hot path never shares a line. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, __u64);
} ctlb_connects_v1 SEC(".maps");

/* Sockets open now per (VIP, server): incremented at connect, decremented at
 * release, so it is one shared atomic counter rather than per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, __s64);
} ctlb_open_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} ctlb_socks_v1 SEC(".maps");

/* Find the value for key, inserting zero first if it is missing. Another CPU
 * may insert concurrently; BPF_NOEXIST makes that harmless. */
static __always_inline void *lookup_or_init(void *map, const void *key)
{
	void *val = bpf_map_lookup_elem(map, key);
	if (val)
		return val;
	__u64 zero = 0;
	bpf_map_update_elem(map, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

/* Take one away from a server's open count, once per socket: with nested
 * attachments (host scope and pod scope) a hook may run twice. */
static __always_inline void release_state(struct sock_state *st)
{
	if (!st->be.addr)
		return;
	__s64 *open = bpf_map_lookup_elem(&ctlb_open_v1, &st->be);
	if (open)
		__sync_fetch_and_add(open, -1);
	st->be.addr = 0;
}

SEC("cgroup/connect4")
int ctlb_connect4(struct bpf_sock_addr *ctx)
{
	/* Only TCP is balanced; UDP and raw sockets keep their destination. */
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;

	struct svc_key key = {
		.vip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	void *backends = bpf_map_lookup_elem(&ctlb_services_v1, &key);
	if (!backends)
		return 1;

	__u32 idx = 0;
	struct backend_slot *hdr = bpf_map_lookup_elem(backends, &idx);
	if (!hdr)
		return 1;
	__u32 count = hdr->addr;
	if (count == 0 || count > CTLB_MAX_SERVERS) {
		if (hdr->flags & CTLB_SVC_F_REJECT_EMPTY) {
			/* Fail at once rather than let the client wait on a VIP
			 * that nothing answers. */
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		return 1;
	}

	__u32 *rr = lookup_or_init(&ctlb_rr_v1, &key);
	if (!rr)
		return 1;
	idx = __sync_fetch_and_add(rr, 1) % count + 1;
	struct backend_slot *be = bpf_map_lookup_elem(backends, &idx);
	if (!be)
		return 1;

	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;

	struct backend_key bk = {
		.vip = key.vip,
		.vport = key.port,
		.addr = be->addr,
		.port = be->port,
	};
	__u64 *connects = lookup_or_init(&ctlb_connects_v1, &bk);
	if (connects)
		__sync_fetch_and_add(connects, 1);

	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&ctlb_socks_v1, sk, 0,
						   BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 1;
	/* A socket reconnected after AF_UNSPEC still holds its old server. */
	release_state(st);
	__s64 *open = lookup_or_init(&ctlb_open_v1, &bk);
	if (!open)
		return 1;
	__sync_fetch_and_add(open, 1);
	st->be = bk;
	return 1;
}

SEC("cgroup/getpeername4")
int ctlb_getpeername4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&ctlb_socks_v1, sk, 0, 0);
	if (!st || !st->be.addr)
		return 1;
	if (ctx->user_ip4 == st->be.addr && (__u16)ctx->user_port == st->be.port) {
		ctx->user_ip4 = st->be.vip;
		ctx->user_port = st->be.vport;
	}
	return 1;
}

SEC("cgroup/sock_release")
int ctlb_sock_release(struct bpf_sock *sk)
{
	struct sock_state *st = bpf_sk_storage_get(&ctlb_socks_v1, sk, 0, 0);
	if (st)
		release_state(st);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
