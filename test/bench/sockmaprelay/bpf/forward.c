// SPDX-License-Identifier: GPL-2.0
/* The benchmark's sockmap relay (test/bench/sockmaprelay): an sk_skb verdict
 * program that sends every segment a relayed socket receives out of its
 * peer, so that the bytes of a relayed pair never reach user space. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* peers holds each socket of a pair under the other's cookie: the verdict
 * of a segment received on socket A looks up cookie(A) and finds B. Sockets
 * enter peers before sources, so that the verdict never runs for a socket
 * whose peer is missing (a miss would drop the segment). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} peers SEC(".maps");

/* sources holds the sockets whose received bytes the verdict forwards; it
 * is the map the program is attached to. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} sources SEC(".maps");

SEC("sk_skb/verdict")
int forward(struct __sk_buff *skb)
{
	__u64 key = bpf_get_socket_cookie(skb);

	return bpf_sk_redirect_hash(skb, &peers, &key, 0);
}

char _license[] SEC("license") = "GPL";
