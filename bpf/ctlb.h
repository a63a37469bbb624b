/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ctlb map layout v2: the structs and maps shared by every BPF object of
 * ctlb (bpf/ctlb.c: connect, sendmsg, recvmsg, getpeername, sock_ops,
 * sock_release; bpf/sockend.c: socket termination iterators). docs/MAPS.md
 * describes the same layout for readers of user space.
 *
 * Conventions:
 *  - Every address is 16 bytes. IPv4 is stored v4-mapped (::ffff:a.b.c.d),
 *    so an AF_INET6 socket connecting to ::ffff:VIP (Java, .NET) finds the
 *    IPv4 VIP with the very key an AF_INET socket uses.
 *  - Addresses and ports are in network byte order, as in sockaddr_in(6).
 *  - A "server slot" is a small integer ctlbd gives each (VIP, server) pair
 *    on this node. Counters, open counts and failing marks live in flat
 *    ARRAY maps indexed by slot: no hash lookup and no insert-on-miss on the
 *    connect path. Slot 0 is never given out; 0 means "no slot".
 *  - Every map name ends in _v2 (the layout version). A loader refuses pins
 *    of another version; ctlbd upgrades v1 pins in place (docs/UPGRADE.md).
 *  - Only ctlbd writes ctlb_services_v2, ctlb_svcstate_v2 (at VIP creation),
 *    ctlb_slots_v2 and ctlb_config_v2. Programs write counters, open counts,
 *    failing marks and socket state (the socket table, socket storage).
 */
#ifndef CTLB_H
#define CTLB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define CTLB_LAYOUT 2

/* Not taken from libc headers: they do not build for the bpf target. */
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef SOCK_DGRAM
#define SOCK_DGRAM 2
#endif
#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6
#endif
#ifndef IPPROTO_UDP
#define IPPROTO_UDP 17
#endif
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* Upper bound on servers per VIP; user space refuses larger sets. */
#define CTLB_MAX_SERVERS 1024
/* Entries of the outer service map and of the per-service array. */
#define CTLB_MAX_SERVICES 65536
/* Server slots per node (the flat per-slot arrays). User space may create
 * the arrays with fewer entries; programs rely only on lookups failing
 * beyond the end. */
#define CTLB_MAX_SLOTS 65536

/* ---------------------------------------------------------------------
 * Services
 * ------------------------------------------------------------------- */

/*
 * A VIP: protocol, address, port. proto is IPPROTO_TCP or IPPROTO_UDP (an
 * MPTCP socket looks up the TCP VIP). There is no family field on purpose:
 * the v4-mapped address is the family, and a dual-stack socket must find the
 * IPv4 VIP. pad is always 0.
 */
struct svc_key_v2 {
	__u8 addr[16];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* svc_hdr_v2.flags */
#define CTLB_SVC_F_REJECT_EMPTY 0x1 /* no usable server: ECONNREFUSED, not pass-through */
/* Read by ctlbd only (programs ignore it): keep the connections of a server
 * that leaves the set instead of ending them ("onServerRemoved": "keep"). */
#define CTLB_SVC_F_KEEP_ON_REMOVAL 0x8000

/* svc_hdr_v2.balance */
#define CTLB_BALANCE_ROUNDROBIN 0 /* shared counter in ctlb_svcstate_v2 */
#define CTLB_BALANCE_RANDOM 1	  /* bpf_get_prandom_u32 */
#define CTLB_BALANCE_LEAST_OPEN 2 /* power of two choices on ctlb_open_v2 */

/*
 * Slot 0 of a VIP's inner array: how many servers follow, the policy, and
 * the VIP's index into ctlb_svcstate_v2. Same size as backend_v2 (the inner
 * array has one value size); a program reads slot 0 as this struct.
 */
struct svc_hdr_v2 {
	__u32 count;   /* servers in slots 1..count */
	__u16 flags;   /* CTLB_SVC_F_* */
	__u8 balance;  /* CTLB_BALANCE_* */
	__u8 proto;    /* copy of the key's proto, for readers of the inner map */
	__u32 svc;     /* index into ctlb_svcstate_v2, 1..CTLB_MAX_SERVICES-1 */
	__u32 pad[3];
};

/* Slots 1..count of a VIP's inner array: one server each. */
struct backend_v2 {
	__u8 addr[16]; /* v4-mapped for IPv4 VIPs */
	__u16 port;
	__u16 pad;
	__u32 slot; /* server slot: index of the per-slot arrays */
};

_Static_assert(sizeof(struct svc_hdr_v2) == sizeof(struct backend_v2),
	       "header and server share the inner array's value size");

/*
 * VIP -> inner ARRAY of (1 + count) backend_v2, slot 0 read as svc_hdr_v2.
 * ctlbd replaces a VIP's set by creating, filling and freezing a new inner
 * array and swapping it in with one update (BPF_MAP_UPDATE_BATCH for many
 * VIPs): a connect() reads one inner array, old or new, never a mix.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, CTLB_MAX_SERVICES);
	__type(key, struct svc_key_v2);
	/* Sizes rather than types: clang emits a struct reached only through
	 * the outer map's pointers as a forward declaration, which no loader
	 * can size. BPF_F_INNER_MAP: each inner array has its own size. */
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_ARRAY);
		__uint(max_entries, 1);
		__uint(map_flags, BPF_F_INNER_MAP);
		__uint(key_size, sizeof(__u32));
		__uint(value_size, sizeof(struct backend_v2));
	});
} ctlb_services_v2 SEC(".maps");

/*
 * Per-VIP state that must survive set replacements, indexed by
 * svc_hdr_v2.svc. ctlbd writes rr once, at random, when it creates the VIP
 * (each node starts its rotation at its own point); connect() then advances
 * it with an atomic add. Index 0 is never given out.
 */
struct svc_state_v2 {
	__u32 rr;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTLB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_state_v2);
} ctlb_svcstate_v2 SEC(".maps");

/* ---------------------------------------------------------------------
 * Server slots
 * ------------------------------------------------------------------- */

/*
 * Connect outcomes per slot, per CPU (summed by user space):
 *  attempts:    connects rewritten to the server (TCP and UDP)
 *  established: TCP handshakes completed (sock_ops ACTIVE_ESTABLISHED)
 *  failed:      TCP connects that died in SYN_SENT (RST or timeout)
 *  terminated:  sockets ended by ctlb (bpf/sockend.c, bpf_sock_destroy)
 */
struct slot_counters_v2 {
	__u64 attempts;
	__u64 established;
	__u64 failed;
	__u64 terminated;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CTLB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct slot_counters_v2);
} ctlb_counters_v2 SEC(".maps");

/* Sockets open now per slot: +1 when a socket is sent to the server, -1 when
 * it is released (or re-sent elsewhere). One shared atomic counter, read by
 * least-open balancing, so not per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTLB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __s64);
} ctlb_open_v2 SEC(".maps");

/*
 * Failing mark per slot. connect() skips a slot while now < until_ns. A
 * failed connect (an RTO in SYN_SENT, seen by sock_ops; or a watched connect
 * never established, counted at release or reconnect: count_failed) sets
 * until_ns = now + min(hold_base << strikes, hold_max) and bumps strikes.
 * When the hold-down has passed, the first connect takes the slot as a probe
 * (it moves until_ns one hold_base ahead with a compare-and-swap, so only
 * one probe goes out); an established connect clears the mark (until_ns = 0,
 * strikes = 0), as does ctlbd when a health check passes.
 */
struct slot_fail_v2 {
	__u64 until_ns; /* bpf_ktime_get_ns() clock; 0 = not failing */
	__u32 strikes;	/* failures in a row */
	__u32 flags;	/* reserved, 0 */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTLB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct slot_fail_v2);
} ctlb_failing_v2 SEC(".maps");

/* slot_info_v2.flags */
#define CTLB_SLOT_F_USED 0x1	/* given to the (vip, server) below */
#define CTLB_SLOT_F_RETIRED 0x2 /* the server is in no set of its VIP now */

/*
 * Which slot is which, written by ctlbd only, so that a restarted ctlbd (and
 * bpftool users) can read the allocation back. A slot whose server left
 * every set stays USED|RETIRED while sockets still hold it (ctlb_open_v2 >
 * 0), then ctlbd zeroes its counters and gives it out again.
 *
 * term_budget is how the socket-termination iterators (bpf/sockend.c) are
 * told what to end: 0 = nothing, 0xffffffff = every socket sent to this slot
 * (server removed), N = up to N sockets (rebalance; decremented atomically).
 */
struct slot_info_v2 {
	struct svc_key_v2 vip; /* the VIP this slot belongs to */
	__u8 addr[16];	       /* the server */
	__u16 port;
	__u16 flags; /* CTLB_SLOT_F_* */
	__u32 svc;   /* the VIP's svc index at allocation */
	__u32 term_budget;
	__u32 pad;
};

#define CTLB_TERM_ALL 0xffffffffu

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTLB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct slot_info_v2);
} ctlb_slots_v2 SEC(".maps");

/* ---------------------------------------------------------------------
 * Node-wide settings
 * ------------------------------------------------------------------- */

/* One entry (key 0), written by ctlbd. Zero fields take the defaults. */
struct config_v2 {
	__u64 hold_base_ns; /* first hold-down of a failing slot; default 1 s */
	__u64 hold_max_ns;  /* longest hold-down; default 30 s */
};

#define CTLB_HOLD_BASE_NS_DEFAULT 1000000000ull
#define CTLB_HOLD_MAX_NS_DEFAULT 30000000000ull

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config_v2);
} ctlb_config_v2 SEC(".maps");

/* ---------------------------------------------------------------------
 * Sockets
 * ------------------------------------------------------------------- */

/* sock_state_v2.flags */
#define CTLB_SK_F_OPEN 0x01	   /* holds one count in ctlb_open_v2[slot] */
#define CTLB_SK_F_UNCONNECTED 0x02 /* UDP, translated per sendmsg (not connect) */
#define CTLB_SK_F_ESTABLISHED 0x04 /* sock_ops saw the handshake complete */
#define CTLB_SK_F_FAILED 0x08	   /* counted as failed; slot marked */
#define CTLB_SK_F_MPTCP 0x10	   /* state of an MPTCP socket (kept on the MPTCP socket) */
#define CTLB_SK_F_MARKED 0x20	   /* this socket already marked its slot failing */
#define CTLB_SK_F_WATCHED 0x40	   /* sock_ops saw the TCP connect start */

/*
 * What one socket was translated from and to. Created only for sockets sent
 * to a VIP (never for other sockets), on the socket the application holds
 * (for MPTCP: the MPTCP socket, found from its first subflow). Read by
 * getpeername4/6 and recvmsg4/6 (server -> VIP), sock_release (give back the
 * open count; a watched connect never established is a failed one), sock_ops
 * (watched, established, marked on a SYN timeout), and the termination
 * iterators, which match a socket exactly by slot. slot == 0 means the
 * socket is no VIP socket any more (disconnected and reconnected elsewhere).
 * A TCP socket found by iter/tcp that has no state may be an MPTCP subflow:
 * its state is on bpf_skc_to_mptcp_sock(subflow).
 */
struct sock_state_v2 {
	__u8 vip[16];	 /* the VIP as dialed (v4-mapped for IPv4) */
	__u8 server[16]; /* the server it was sent to */
	__u16 vport;
	__u16 sport; /* server port */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP (MPTCP: TCP + CTLB_SK_F_MPTCP) */
	__u8 flags;  /* CTLB_SK_F_* */
	__u16 pad;
	__u32 slot; /* server slot, 0 = none */
	__u32 svc;  /* the VIP's svc index */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state_v2);
} ctlb_socks_v2 SEC(".maps");

/*
 * The socket table: where a VIP socket's state lives first. Socket storage
 * costs two allocations at connect and two frees (with locks) when the
 * socket dies, ~550 ns of a ~17 us connect; an entry of this preallocated
 * array costs a compare-and-swap to take and an exchange to give back.
 *
 * A socket's entry is index (cookie & (CTLB_SOCKTAB_ENTRIES - 1)) and is
 * its own while entry.cookie holds its socket cookie (never 0; cookies are
 * handed out in increasing order, so sockets opened close together fall on
 * different entries). connect takes a free entry (cookie 0 -> its cookie);
 * when the entry belongs to another socket still open, or the socket is an
 * MPTCP one (whose cookie is not its subflow's), the state goes to socket
 * storage as before: a lookup tries the entry, then the storage. The root's
 * sock_release gives the entry back (cookie -> 0). A socket never has both.
 *
 * Added inside layout 2: pins made by an earlier ctlbd of this layout lack
 * it, and their programs keep every state in socket storage; a ctlbd that
 * creates it also upgrades the programs (root sock_release first, so that
 * every entry taken is given back).
 */
#define CTLB_SOCKTAB_ENTRIES 65536 /* a power of two: the index is a mask */

struct sock_entry_v2 {
	__u64 cookie; /* the owner's socket cookie; 0 = free */
	struct sock_state_v2 st;
	__u64 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTLB_SOCKTAB_ENTRIES);
	__type(key, __u32);
	__type(value, struct sock_entry_v2);
} ctlb_socktab_v2 SEC(".maps");

static __always_inline struct sock_entry_v2 *socktab_entry(__u64 cookie)
{
	__u32 i = (__u32)cookie & (CTLB_SOCKTAB_ENTRIES - 1);
	return bpf_map_lookup_elem(&ctlb_socktab_v2, &i);
}

/* The state of socket sk, whose cookie is given: its table entry, else its
 * socket storage, else NULL. sk is whatever the storage helper takes in the
 * calling program type. */
static __always_inline struct sock_state_v2 *state_lookup(void *sk, __u64 cookie)
{
	struct sock_entry_v2 *e = socktab_entry(cookie);
	if (e && e->cookie == cookie)
		return &e->st;
	return bpf_sk_storage_get(&ctlb_socks_v2, sk, 0, 0);
}

#endif /* CTLB_H */
