package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
)

// FailMark is a server slot the kernel has marked failing: a connect to it
// was refused (RST to the SYN) or timed out, and connect skips it until the
// hold-down passes (bpf/ctlb.h, ctlb_failing_v2).
type FailMark struct {
	Slot     uint32         `json:"slot"`
	VIP      netip.AddrPort `json:"vip"`
	Protocol Protocol       `json:"protocol"`
	Server   netip.AddrPort `json:"server"`
	// Until is the end of the hold-down on the kernel's monotonic clock
	// (see Monotonic).
	Until time.Duration `json:"until"`
	// Strikes counts the failures in a row.
	Strikes uint32 `json:"strikes"`
}

// Key is the VIP of the marked server.
func (m FailMark) Key() ServiceKey { return ServiceKey{Protocol: m.Protocol, VIP: m.VIP} }

// Hold-down defaults, as in bpf/ctlb.h.
const (
	DefaultHoldBase = time.Second
	DefaultHoldMax  = 30 * time.Second
)

// Monotonic is the kernel's bpf_ktime_get_ns clock (CLOCK_MONOTONIC).
func Monotonic() time.Duration { return time.Duration(monotonicNow()) }

// FailMarks lists the slots whose failing mark is set (its hold-down may
// have passed already: the kernel then lets one probe through).
func (d *Datapath) FailMarks() ([]FailMark, error) {
	a, err := d.allocator()
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	slots := make(map[uint32]slotKey, len(a.slots))
	for sk, s := range a.slots {
		slots[s] = sk
	}
	a.mu.Unlock()
	var out []FailMark
	add := func(s uint32, f ctlbSlotFailV2) {
		if sk, ok := slots[s]; ok && f.UntilNs != 0 {
			out = append(out, FailMark{Slot: s, VIP: sk.svc.VIP, Protocol: sk.svc.Protocol, Server: sk.server,
				Until: time.Duration(f.UntilNs), Strikes: f.Strikes})
		}
	}
	if len(slots) > batchFailMarks {
		// Many servers: one batch read of the whole array beats a
		// lookup per slot (ctlbd reads the marks ten times a second).
		n := int(d.maps.failing.MaxEntries())
		keys := make([]uint32, n)
		vals := make([]ctlbSlotFailV2, n)
		var cursor ebpf.MapBatchCursor
		got, err := d.maps.failing.BatchLookup(&cursor, keys, vals, nil)
		if err == nil || errors.Is(err, ebpf.ErrKeyNotExist) {
			for i := 0; i < got; i++ {
				add(keys[i], vals[i])
			}
			return out, nil
		}
		// No batch support: fall through to single lookups.
	}
	for s := range slots {
		var f ctlbSlotFailV2
		if err := d.maps.failing.Lookup(s, &f); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			return nil, fmt.Errorf("read failing mark of slot %d: %w", s, err)
		}
		add(s, f)
	}
	return out, nil
}

// batchFailMarks is the slot count above which FailMarks reads the whole
// failing array in one batch.
const batchFailMarks = 256

// ClearFailMark returns a slot to rotation at once (a health check or a
// probe by ctlbd passed).
func (d *Datapath) ClearFailMark(slot uint32) error {
	if err := d.maps.failing.Put(slot, ctlbSlotFailV2{}); err != nil {
		return fmt.Errorf("clear failing mark of slot %d: %w", slot, err)
	}
	return nil
}

// HoldFailMark keeps a slot out of rotation until until (Monotonic clock)
// with the given strikes: ctlbd's own probe failed, so no client connect
// needs to be the probe.
func (d *Datapath) HoldFailMark(slot uint32, until time.Duration, strikes uint32) error {
	if err := d.maps.failing.Put(slot, ctlbSlotFailV2{UntilNs: uint64(until), Strikes: strikes}); err != nil {
		return fmt.Errorf("hold failing mark of slot %d: %w", slot, err)
	}
	return nil
}

// HoldTimes are the node's hold-down base and maximum (ctlb_config_v2).
func (d *Datapath) HoldTimes() (base, max time.Duration, err error) {
	var c ctlbConfigV2
	if err := d.maps.config.Lookup(uint32(0), &c); err != nil {
		return 0, 0, fmt.Errorf("read hold-down config: %w", err)
	}
	base, max = DefaultHoldBase, DefaultHoldMax
	if c.HoldBaseNs != 0 {
		base = time.Duration(c.HoldBaseNs)
	}
	if c.HoldMaxNs != 0 {
		max = time.Duration(c.HoldMaxNs)
	}
	return base, max, nil
}
