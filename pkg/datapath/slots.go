package datapath

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/cilium/ebpf"
)

// Server slots (docs/MAPS.md): every (VIP, server) pair on the node has a
// small integer indexing the flat per-slot arrays. The allocation lives in
// ctlb_slots_v2, so any process can rebuild it from the pins; the writer
// (ctlbd) keeps it in memory as well.

// slot_info_v2.flags
const (
	slotUsed    = 0x1
	slotRetired = 0x2
)

// retireGrace is how long a retired slot with no open socket waits before
// it is given out again: longer than any program run that may still have
// read the slot from an old inner array.
const retireGrace = time.Second

type slotKey struct {
	svc    ServiceKey
	server netip.AddrPort
}

type slotAllocator struct {
	mu       sync.Mutex
	slots    map[slotKey]uint32
	bySvc    map[ServiceKey]map[netip.AddrPort]uint32
	retired  map[uint32]time.Time
	free     []uint32
	next     uint32 // lowest slot never given out
	maxSlots uint32

	svcs    map[ServiceKey]uint32
	svcFree []uint32
	svcNext uint32
	maxSvcs uint32

	strays int // slots load retired: given out, in no current set
}

// allocator builds the allocation from the pins on first use.
func (d *Datapath) allocator() (*slotAllocator, error) {
	d.allocOnce.Lock()
	defer d.allocOnce.Unlock()
	if d.alloc != nil {
		return d.alloc, nil
	}
	a := &slotAllocator{
		slots:    map[slotKey]uint32{},
		bySvc:    map[ServiceKey]map[netip.AddrPort]uint32{},
		retired:  map[uint32]time.Time{},
		next:     1,
		maxSlots: d.maps.slots.MaxEntries(),
		svcs:     map[ServiceKey]uint32{},
		svcNext:  1,
		maxSvcs:  d.maps.svcstate.MaxEntries(),
	}
	if err := a.load(d); err != nil {
		return nil, err
	}
	d.alloc = a
	return a, nil
}

func (a *slotAllocator) load(d *Datapath) error {
	infos, err := readSlotInfos(d.maps.slots)
	if err != nil {
		return err
	}
	used := map[uint32]bool{}
	now := time.Now()
	for i, info := range infos {
		slot := uint32(i)
		if info.Flags&slotUsed == 0 {
			continue
		}
		k := slotKey{keyOf(info.Vip), addrPort16(info.Addr, info.Port)}
		a.slots[k] = slot
		a.bySvcMap(k.svc)[k.server] = slot
		if info.Flags&slotRetired != 0 {
			a.retired[slot] = now
		}
		used[slot] = true
		a.next = max(a.next, slot+1)
	}
	for s := uint32(1); s < a.next; s++ {
		if !used[s] {
			a.free = append(a.free, s)
		}
	}
	keys, err := d.serviceKeys()
	if err != nil {
		return err
	}
	usedSvc := map[uint32]bool{}
	inSet := map[uint32]bool{}      // slots some VIP's current set names
	unread := map[ServiceKey]bool{} // VIPs whose set could not be read
	for _, k := range keys {
		var innerID uint32
		if err := d.maps.services.Lookup(svcKey(k), &innerID); err != nil {
			unread[k] = true
			continue
		}
		hdr, slots, err := readSet(innerID, d.writer)
		if err != nil {
			unread[k] = true
			continue
		}
		for _, slot := range slots {
			inSet[slot] = true
		}
		a.svcs[k] = hdr.Svc
		usedSvc[hdr.Svc] = true
		a.svcNext = max(a.svcNext, hdr.Svc+1)
	}
	for s := uint32(1); s < a.svcNext; s++ {
		if !usedSvc[s] {
			a.svcFree = append(a.svcFree, s)
		}
	}
	if d.writer {
		return a.retireStrays(d, infos, inSet, unread)
	}
	return nil
}

// retireStrays retires the slots that are given out but that no VIP's
// current set names: a writer killed during a set (after its slots were
// written, before the VIP's new set was swapped in, or before the servers
// that left it were retired) leaves them, and nothing else would ever give
// them back (docs/MAPS.md). They go the way of any retired slot: sweep
// frees each once no socket holds it. A slot in a current set is never
// touched, nor any slot of a VIP whose set could not be read. Only the
// writer does this, at start: no set of its own is half-way then, and no
// other process writes the sets (invariant 4).
func (a *slotAllocator) retireStrays(d *Datapath, infos []ctlbSlotInfoV2, inSet map[uint32]bool, unread map[ServiceKey]bool) error {
	now := time.Now()
	for i, info := range infos {
		slot := uint32(i)
		if info.Flags&slotUsed == 0 || info.Flags&slotRetired != 0 || inSet[slot] {
			continue
		}
		sk := slotKey{keyOf(info.Vip), addrPort16(info.Addr, info.Port)}
		if unread[sk.svc] {
			continue
		}
		if err := d.writeSlotInfo(slot, sk, info.Svc, slotUsed|slotRetired, false); err != nil {
			return err
		}
		a.retired[slot] = now
		a.strays++
	}
	return nil
}

// readSet reads an inner array's header and, with withSlots, the slots of
// its servers.
func readSet(innerID uint32, withSlots bool) (svcHdr, []uint32, error) {
	var hdr svcHdr
	inner, err := ebpf.NewMapFromID(ebpf.MapID(innerID))
	if err != nil {
		return hdr, nil, err
	}
	defer inner.Close()
	if err := inner.Lookup(uint32(0), &hdr); err != nil || !withSlots {
		return hdr, nil, err
	}
	// Up to the count, however large: a lookup past the array's end fails,
	// and the caller then takes the set for unreadable.
	slots := make([]uint32, 0, min(hdr.Count, inner.MaxEntries()))
	for i := uint32(1); i <= hdr.Count; i++ {
		var b backendSlot
		if err := inner.Lookup(i, &b); err != nil {
			return hdr, nil, err
		}
		slots = append(slots, b.Slot)
	}
	return hdr, slots, nil
}

func (a *slotAllocator) bySvcMap(k ServiceKey) map[netip.AddrPort]uint32 {
	m := a.bySvc[k]
	if m == nil {
		m = map[netip.AddrPort]uint32{}
		a.bySvc[k] = m
	}
	return m
}

// service returns the VIP's svc index, creating it (with a random start for
// round-robin) when the VIP is new.
func (a *slotAllocator) service(d *Datapath, k ServiceKey) (uint32, error) {
	if s, ok := a.svcs[k]; ok {
		return s, nil
	}
	var s uint32
	if n := len(a.svcFree); n > 0 {
		s, a.svcFree = a.svcFree[n-1], a.svcFree[:n-1]
	} else {
		if a.svcNext >= a.maxSvcs {
			return 0, fmt.Errorf("VIP %s: all %d service entries are in use", k, a.maxSvcs-1)
		}
		s = a.svcNext
		a.svcNext++
	}
	// Each node starts its rotation at its own point, so the first
	// connections of many nodes do not all land on one server.
	var b [4]byte
	_, _ = rand.Read(b[:])
	if err := d.maps.svcstate.Put(s, ctlbSvcStateV2{Rr: binary.NativeEndian.Uint32(b[:])}); err != nil {
		return 0, fmt.Errorf("VIP %s: seed round-robin: %w", k, err)
	}
	a.svcs[k] = s
	return s, nil
}

// slot returns the server's slot for this VIP, giving out a clean one when
// the pair is new, and bringing a retired one back into use.
func (a *slotAllocator) slot(d *Datapath, k ServiceKey, svc uint32, srv netip.AddrPort) (uint32, error) {
	sk := slotKey{k, srv}
	if s, ok := a.slots[sk]; ok {
		if _, ret := a.retired[s]; ret {
			delete(a.retired, s)
			if err := d.writeSlotInfo(s, sk, svc, slotUsed, true); err != nil {
				return 0, err
			}
		}
		return s, nil
	}
	var s uint32
	if n := len(a.free); n > 0 {
		s, a.free = a.free[n-1], a.free[:n-1]
	} else {
		if a.next >= a.maxSlots {
			return 0, fmt.Errorf("VIP %s: server %s: all %d server slots of this node are in use", k, srv, a.maxSlots-1)
		}
		s = a.next
		a.next++
	}
	// No zeroing here: a slot never given out is zero, and sweep zeroes a
	// slot before it returns to the free list (and before its info says
	// unused, so a restart never takes a dirty slot for a free one).
	if err := d.writeSlotInfo(s, sk, svc, slotUsed, true); err != nil {
		return 0, err
	}
	a.slots[sk] = s
	a.bySvcMap(k)[srv] = s
	return s, nil
}

// retireOthers marks the VIP's slots whose server is not in keep retired.
func (a *slotAllocator) retireOthers(d *Datapath, k ServiceKey, keep []netip.AddrPort) error {
	in := make(map[netip.AddrPort]bool, len(keep))
	for _, s := range keep {
		in[s] = true
	}
	for srv, s := range a.bySvc[k] {
		if in[srv] {
			continue
		}
		if _, ok := a.retired[s]; ok {
			continue
		}
		a.retired[s] = time.Now()
		if err := d.writeSlotInfo(s, slotKey{k, srv}, a.svcs[k], slotUsed|slotRetired, false); err != nil {
			return err
		}
	}
	return nil
}

// deleteService retires every slot of a deleted VIP and zeroes its
// counters, so that the VIP created again starts clean.
func (a *slotAllocator) deleteService(d *Datapath, k ServiceKey) error {
	if err := a.retireOthers(d, k, nil); err != nil {
		return err
	}
	for _, s := range a.bySvc[k] {
		if err := d.zeroCounters(s); err != nil {
			return err
		}
	}
	if s, ok := a.svcs[k]; ok {
		delete(a.svcs, k)
		a.svcFree = append(a.svcFree, s)
	}
	return nil
}

// sweep gives back retired slots that no socket holds any more.
func (a *slotAllocator) sweep(d *Datapath) {
	for s, since := range a.retired {
		if time.Since(since) < retireGrace {
			continue
		}
		var open int64
		if err := d.maps.open.Lookup(s, &open); err != nil || open > 0 {
			continue
		}
		var info ctlbSlotInfoV2
		if err := d.maps.slots.Lookup(s, &info); err != nil {
			continue
		}
		sk := slotKey{keyOf(info.Vip), addrPort16(info.Addr, info.Port)}
		if err := d.zeroSlot(s); err != nil {
			continue
		}
		if err := d.maps.slots.Put(s, ctlbSlotInfoV2{}); err != nil {
			continue
		}
		delete(a.retired, s)
		delete(a.slots, sk)
		if m := a.bySvc[sk.svc]; m != nil {
			delete(m, sk.server)
			if len(m) == 0 {
				delete(a.bySvc, sk.svc)
			}
		}
		a.free = append(a.free, s)
	}
}

// writeSlotInfo records which (VIP, server) a slot is. resetBudget clears
// the termination budget (a server back in the set is not to be ended);
// otherwise the budget written by the termination logic is kept.
func (d *Datapath) writeSlotInfo(s uint32, sk slotKey, svc uint32, flags uint16, resetBudget bool) error {
	var info ctlbSlotInfoV2
	if !resetBudget {
		_ = d.maps.slots.Lookup(s, &info)
	}
	info.Vip = svcKey(sk.svc)
	info.Addr = sk.server.Addr().As16()
	info.Port = port(sk.server.Port())
	info.Flags = flags
	info.Svc = svc
	if resetBudget {
		info.TermBudget = 0
	}
	if err := d.maps.slots.Put(s, info); err != nil {
		return fmt.Errorf("VIP %s: server %s: write slot %d: %w", sk.svc, sk.server, s, err)
	}
	return nil
}

func (d *Datapath) zeroCounters(s uint32) error {
	zero := make([]ctlbSlotCountersV2, ebpfPossibleCPUs())
	if err := d.maps.counters.Put(s, zero); err != nil {
		return fmt.Errorf("zero counters of slot %d: %w", s, err)
	}
	return nil
}

// zeroSlot makes a slot clean for a new owner.
func (d *Datapath) zeroSlot(s uint32) error {
	if err := d.zeroCounters(s); err != nil {
		return err
	}
	if err := d.maps.failing.Put(s, ctlbSlotFailV2{}); err != nil {
		return fmt.Errorf("clear failing mark of slot %d: %w", s, err)
	}
	if err := d.maps.open.Put(s, int64(0)); err != nil {
		return fmt.Errorf("zero open count of slot %d: %w", s, err)
	}
	return nil
}

// SlotOf returns the server slot of a server of a VIP (for the termination
// and fail-fast logic), and whether it has one.
func (d *Datapath) SlotOf(k ServiceKey, server netip.AddrPort) (uint32, bool, error) {
	a, err := d.allocator()
	if err != nil {
		return 0, false, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.slots[slotKey{k, server}]
	return s, ok, nil
}

// ClearFailing removes a server's failing mark (a health check passed): new
// connects go to it again at once.
func (d *Datapath) ClearFailing(k ServiceKey, server netip.AddrPort) error {
	s, ok, err := d.SlotOf(k, server)
	if err != nil || !ok {
		return err
	}
	if err := d.maps.failing.Put(s, ctlbSlotFailV2{}); err != nil {
		return fmt.Errorf("VIP %s: server %s: clear failing mark: %w", k, server, err)
	}
	return nil
}

// HoldDown sets how long connect skips a server after a failed connect:
// base for the first failure, doubling per failure in a row up to max. Zero
// keeps the defaults (1 s, 30 s).
func (d *Datapath) HoldDown(base, max time.Duration) error {
	if base < 0 || max < 0 || (max > 0 && base > max) {
		return fmt.Errorf("hold-down base %v, max %v: want 0 <= base <= max", base, max)
	}
	if err := d.maps.config.Put(uint32(0), ctlbConfigV2{HoldBaseNs: uint64(base), HoldMaxNs: uint64(max)}); err != nil {
		return fmt.Errorf("write hold-down: %w", err)
	}
	return nil
}

func ebpfPossibleCPUs() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// readSlotInfos reads the whole slot-info array: batch lookups where the
// kernel has them (a few syscalls for 65,536 slots), else one by one.
func readSlotInfos(m *ebpf.Map) ([]ctlbSlotInfoV2, error) {
	n := m.MaxEntries()
	out := make([]ctlbSlotInfoV2, n)
	keys := make([]uint32, min(statsChunk, n))
	var cursor ebpf.MapBatchCursor
	for lo := uint32(0); lo < n; {
		c := min(statsChunk, n-lo)
		got, err := m.BatchLookup(&cursor, keys[:c], out[lo:lo+c], nil)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) || got != int(c) {
			break // fall back below
		}
		lo += c
		if lo == n {
			return out, nil
		}
	}
	var (
		slot uint32
		info ctlbSlotInfoV2
	)
	it := m.Iterate()
	for it.Next(&slot, &info) {
		out[slot] = info
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read server slots: %w", err)
	}
	return out, nil
}
