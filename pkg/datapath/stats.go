package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
)

// ServerStats are the kernel's counters for one server of one VIP.
type ServerStats struct {
	VIP    netip.AddrPort `json:"vip"`
	Server netip.AddrPort `json:"server"`
	// Connects is how many connect() calls were sent to the server.
	Connects uint64 `json:"connects"`
	// Open is how many of those sockets are open now.
	Open int64 `json:"open"`
}

type statsKey struct{ vip, server netip.AddrPort }

// Stats reads the per-server counters of every VIP, sorted by VIP and server.
func (d *Datapath) Stats() ([]ServerStats, error) {
	byKey := map[statsKey]*ServerStats{}
	get := func(k ctlbBackendKey) *ServerStats {
		sk := statsKey{addrPort(k.Vip, k.Vport), addrPort(k.Addr, k.Port)}
		s := byKey[sk]
		if s == nil {
			s = &ServerStats{VIP: sk.vip, Server: sk.server}
			byKey[sk] = s
		}
		return s
	}
	var (
		key      ctlbBackendKey
		perCPU   []uint64
		openConn int64
	)
	it := d.objs.CtlbConnectsV1.Iterate()
	for it.Next(&key, &perCPU) {
		s := get(key)
		for _, v := range perCPU {
			s.Connects += v
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read connect counters: %w", err)
	}
	it = d.objs.CtlbOpenV1.Iterate()
	for it.Next(&key, &openConn) {
		get(key).Open = openConn
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read open-connection counters: %w", err)
	}
	out := make([]ServerStats, 0, len(byKey))
	for _, s := range byKey {
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].VIP.Compare(out[j].VIP); c != 0 {
			return c < 0
		}
		return out[i].Server.Compare(out[j].Server) < 0
	})
	return out, nil
}

// deleteCounters drops the connect counters of a deleted VIP. Open counts
// stay while sockets are open, so that release never decrements a missing
// entry into a fresh one; they go when they reach zero.
func (d *Datapath) deleteCounters(vip netip.AddrPort) error {
	var (
		key  ctlbBackendKey
		keys []ctlbBackendKey
		vals []uint64
	)
	want := svcKey(vip)
	it := d.objs.CtlbConnectsV1.Iterate()
	for it.Next(&key, &vals) {
		if key.Vip == want.Vip && key.Vport == want.Port {
			keys = append(keys, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("VIP %s: list counters: %w", vip, err)
	}
	for _, k := range keys {
		if err := d.objs.CtlbConnectsV1.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("VIP %s: delete counter: %w", vip, err)
		}
	}
	return nil
}
