package datapath

import (
	"fmt"
	"net/netip"
	"sort"
	"time"
)

// ServerStats are the kernel's counters for one server of one VIP.
type ServerStats struct {
	VIP      netip.AddrPort `json:"vip"`
	Protocol Protocol       `json:"protocol"`
	Server   netip.AddrPort `json:"server"`
	// Slot is the server slot indexing the kernel's per-server arrays.
	Slot uint32 `json:"slot"`
	// Attempts is how many connect() calls (and first datagrams of
	// unconnected UDP sockets) were sent to the server.
	Attempts uint64 `json:"attempts"`
	// Connects is Attempts, under its layout v1 name.
	Connects uint64 `json:"connects"`
	// Established and Failed split TCP attempts by outcome: the handshake
	// completed, or the connect died in SYN_SENT (refused or timed out).
	// Attempts still in progress, and UDP, are neither.
	Established uint64 `json:"established"`
	Failed      uint64 `json:"failed"`
	// Terminated is how many sockets ctlb ended (server left the set).
	Terminated uint64 `json:"terminated"`
	// Open is how many of those sockets are open now.
	Open int64 `json:"open"`
	// FailingFor is how much longer connect skips the server (hold-down
	// after failed connects); 0 when it is not marked failing.
	FailingFor time.Duration `json:"failingFor,omitempty"`
	// Retired is true for a server in no set of the VIP any more, kept
	// while sockets to it are open.
	Retired bool `json:"retired,omitempty"`
}

// Key is the VIP the counters belong to.
func (s ServerStats) Key() ServiceKey { return ServiceKey{Protocol: s.Protocol, VIP: s.VIP} }

// Stats reads the per-server counters of every VIP, sorted by VIP, protocol
// and server. Retired slots that no socket holds any more are given back on
// the way (when this process is the writer).
func (d *Datapath) Stats() ([]ServerStats, error) {
	a, err := d.allocator()
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.sweep(d)
	type entry struct {
		sk      slotKey
		slot    uint32
		retired bool
	}
	entries := make([]entry, 0, len(a.slots))
	for sk, s := range a.slots {
		_, ret := a.retired[s]
		entries = append(entries, entry{sk, s, ret})
	}
	a.mu.Unlock()

	now := monotonicNow()
	out := make([]ServerStats, 0, len(entries))
	for _, e := range entries {
		st := ServerStats{VIP: e.sk.svc.VIP, Protocol: e.sk.svc.Protocol, Server: e.sk.server, Slot: e.slot, Retired: e.retired}
		var perCPU []ctlbSlotCountersV2
		if err := d.maps.counters.Lookup(e.slot, &perCPU); err != nil {
			return nil, fmt.Errorf("read counters of slot %d: %w", e.slot, err)
		}
		for _, c := range perCPU {
			st.Attempts += c.Attempts
			st.Established += c.Established
			st.Failed += c.Failed
			st.Terminated += c.Terminated
		}
		st.Connects = st.Attempts
		if err := d.maps.open.Lookup(e.slot, &st.Open); err != nil {
			return nil, fmt.Errorf("read open count of slot %d: %w", e.slot, err)
		}
		var f ctlbSlotFailV2
		if err := d.maps.failing.Lookup(e.slot, &f); err == nil && f.UntilNs > now {
			st.FailingFor = time.Duration(f.UntilNs - now)
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Key().Compare(out[j].Key()); c != 0 {
			return c < 0
		}
		return out[i].Server.Compare(out[j].Server) < 0
	})
	return out, nil
}
