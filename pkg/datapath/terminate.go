package datapath

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// ErrTerminationUnavailable means this kernel cannot end sockets from BPF
// (no bpf_sock_destroy kfunc, or no iter/tcp): sockets to departed servers
// stay open until their applications close them.
var ErrTerminationUnavailable = errors.New("socket termination is unavailable on this kernel")

// Departed is a server that left a VIP's set: the sockets ctlb directed to it
// through that VIP are to be ended.
type Departed struct {
	VIP netip.AddrPort `json:"vip"`
	// Protocol of the VIP; "" means TCP.
	Protocol Protocol       `json:"protocol,omitempty"`
	Server   netip.AddrPort `json:"server"`
	// Limit, when not 0, ends at most that many of them (rebalancing).
	Limit uint64 `json:"limit,omitempty"`
}

// Key is the VIP the server departed from.
func (d Departed) Key() ServiceKey {
	p := d.Protocol
	if p == "" {
		p = TCP
	}
	return ServiceKey{Protocol: p, VIP: d.VIP}
}

// Terminated is what one pass did for one departed server.
type Terminated struct {
	Departed
	// Destroyed is how many sockets were ended.
	Destroyed uint64 `json:"destroyed"`
	// Failed is how many the kernel refused to end (the BPF path does not
	// count them: always 0 there).
	Failed uint64 `json:"failed"`
}

// termAll mirrors CTLB_TERM_ALL.
const termAll = 0xffffffff

// Terminator ends the sockets that connect directed to departed servers.
// It matches sockets through ctlb's socket storage by server slot
// (bpf/sockend.c), so a socket to the same address that ctlb did not
// direct (another process, another VIP) is never touched.
//
// The iterator programs walk the sockets of the network namespace the
// iterator is created in, so a pass enters each namespace that may hold
// ctlb-directed sockets, on a locked OS thread, and creates one there.
type Terminator struct {
	d    *Datapath
	mu   sync.Mutex // one pass at a time: budgets are per pass
	objs sockendPrograms
	tcp  *link.Iter
	udp  *link.Iter
}

// NewTerminator loads the termination programs against this datapath's
// maps. It fails with ErrTerminationUnavailable (wrapping the kernel's
// reason) when the kernel lacks what they need.
func (d *Datapath) NewTerminator() (*Terminator, error) {
	spec, err := loadSockend()
	if err != nil {
		return nil, fmt.Errorf("load embedded termination spec: %w", err)
	}
	repl := map[string]*ebpf.Map{}
	for _, name := range []string{"ctlb_socks_v2", "ctlb_socktab_v2", "ctlb_slots_v2", "ctlb_counters_v2"} {
		m, ok := d.Map(name)
		if !ok {
			return nil, fmt.Errorf("termination: map %s is not open", name)
		}
		// The pinned arrays may be smaller than the header's bound.
		if ms := spec.Maps[name]; ms != nil && ms.Type != ebpf.SkStorage {
			ms.MaxEntries = m.MaxEntries()
		}
		repl[name] = m
	}
	// Only the programs (and so only the maps they use) are loaded.
	t := &Terminator{d: d}
	if err := spec.LoadAndAssign(&t.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return nil, fmt.Errorf("%w: load iterator programs: %w", ErrTerminationUnavailable, err)
	}
	if t.tcp, err = link.AttachIter(link.IterOptions{Program: t.objs.CtlbTermTcp}); err != nil {
		t.Close()
		return nil, fmt.Errorf("%w: attach iter/tcp: %w", ErrTerminationUnavailable, err)
	}
	if t.udp, err = link.AttachIter(link.IterOptions{Program: t.objs.CtlbTermUdp}); err != nil {
		t.Close()
		return nil, fmt.Errorf("%w: attach iter/udp: %w", ErrTerminationUnavailable, err)
	}
	return t, nil
}

// Close releases the programs and their links.
func (t *Terminator) Close() error {
	if t.tcp != nil {
		t.tcp.Close()
	}
	if t.udp != nil {
		t.udp.Close()
	}
	return t.objs.Close()
}

// setBudget writes a slot's termination budget, keeping the rest of its
// slot info; under the allocator's lock, which every slot-info write takes.
func (d *Datapath) setBudget(slot uint32, budget uint32) error {
	a, err := d.allocator()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var info ctlbSlotInfoV2
	if err := d.maps.slots.Lookup(slot, &info); err != nil {
		return fmt.Errorf("read slot %d: %w", slot, err)
	}
	if info.Flags&slotUsed == 0 {
		return nil // given back meanwhile: nothing holds it
	}
	info.TermBudget = budget
	if err := d.maps.slots.Put(slot, info); err != nil {
		return fmt.Errorf("write termination budget of slot %d: %w", slot, err)
	}
	return nil
}

// terminatedCount sums a slot's per-CPU terminated counter.
func (d *Datapath) terminatedCount(slot uint32) (uint64, error) {
	var perCPU []ctlbSlotCountersV2
	if err := d.maps.counters.Lookup(slot, &perCPU); err != nil {
		return 0, fmt.Errorf("read counters of slot %d: %w", slot, err)
	}
	var n uint64
	for _, c := range perCPU {
		n += c.Terminated
	}
	return n, nil
}

// Terminate ends, in each of the given network namespaces, every TCP socket
// and connected UDP socket that ctlb directed to one of the departed servers,
// and says how many it ended per server. A namespace that cannot be entered
// (gone since it was listed) is skipped; the first such error is returned
// beside the results of the others.
func (t *Terminator) Terminate(netns []*os.File, departed []Departed) ([]Terminated, error) {
	if len(departed) == 0 {
		return nil, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	type target struct {
		slot   uint32
		before uint64
	}
	targets := make([]target, len(departed))
	var set []uint32
	defer func() {
		for _, s := range set {
			_ = t.d.setBudget(s, 0)
		}
	}()
	for i, dp := range departed {
		slot, ok, err := t.d.SlotOf(dp.Key(), dp.Server)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue // no slot: ctlb never sent a socket there
		}
		before, err := t.d.terminatedCount(slot)
		if err != nil {
			return nil, err
		}
		budget := uint32(termAll)
		if dp.Limit != 0 && dp.Limit < termAll {
			budget = uint32(dp.Limit)
		}
		if err := t.d.setBudget(slot, budget); err != nil {
			return nil, err
		}
		set = append(set, slot)
		targets[i] = target{slot, before}
	}
	var first error
	if len(set) > 0 {
		for _, ns := range netns {
			if err := t.runIn(ns); err != nil && first == nil {
				first = err
			}
		}
	}
	out := make([]Terminated, 0, len(departed))
	for i, dp := range departed {
		r := Terminated{Departed: dp}
		if tg := targets[i]; tg.slot != 0 {
			after, err := t.d.terminatedCount(tg.slot)
			if err != nil {
				return out, err
			}
			r.Destroyed = after - tg.before
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].VIP.Compare(out[j].VIP); c != 0 {
			return c < 0
		}
		return out[i].Server.Compare(out[j].Server) < 0
	})
	return out, first
}

// runIn creates the iterators inside ns and reads them to the end: reading
// is what runs the programs over every socket. Only the creation needs the
// namespace (the iterator keeps it); it happens on a thread of its own that
// is thrown away if it cannot be put back into its own namespace.
func (t *Terminator) runIn(ns *os.File) error {
	var readers []io.ReadCloser
	err := inNetNS(ns, func() error {
		for _, it := range []*link.Iter{t.tcp, t.udp} {
			r, err := it.Open()
			if err != nil {
				return fmt.Errorf("open iterator: %w", err)
			}
			readers = append(readers, r)
		}
		return nil
	})
	if err != nil {
		err = fmt.Errorf("terminate in %s: %w", ns.Name(), err)
	}
	for _, r := range readers {
		if _, rerr := io.Copy(io.Discard, r); rerr != nil && err == nil {
			err = fmt.Errorf("terminate: run iterator in %s: %w", ns.Name(), rerr)
		}
		r.Close()
	}
	return err
}
