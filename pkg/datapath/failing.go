package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// FailMark is a server slot the kernel has marked failing: a connect to it
// was refused (RST to the SYN) or timed out, and connect skips it until the
// hold-down passes (bpf/ctlb.h, ctlb_failing_v2).
type FailMark struct {
	Slot   uint32         `json:"slot"`
	VIP    netip.AddrPort `json:"vip"`
	Server netip.AddrPort `json:"server"`
	// Until is the end of the hold-down on the kernel's monotonic clock
	// (see Monotonic).
	Until time.Duration `json:"until"`
	// Strikes counts the failures in a row.
	Strikes uint32 `json:"strikes"`
}

// Mirrors of bpf/ctlb.h's slot_fail_v2, svc_key_v2 and slot_info_v2.
type slotFail struct {
	UntilNs uint64
	Strikes uint32
	Flags   uint32
}

type svcKeyV2 struct {
	Addr  [16]byte
	Port  uint16
	Proto uint8
	Pad   uint8
}

type slotInfo struct {
	VIP        svcKeyV2
	Addr       [16]byte
	Port       uint16
	Flags      uint16
	Svc        uint32
	TermBudget uint32
	Pad        uint32
}

type holdConfig struct {
	HoldBaseNs uint64
	HoldMaxNs  uint64
}

// Hold-down defaults, as in bpf/ctlb.h.
const (
	DefaultHoldBase = time.Second
	DefaultHoldMax  = 30 * time.Second
)

// Monotonic is the kernel's bpf_ktime_get_ns clock (CLOCK_MONOTONIC).
func Monotonic() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// v2maps are the layout-v2 maps the fail-fast and termination code reads,
// opened by pin name on first use.
type v2maps struct {
	once                    sync.Once
	err                     error
	failing, slots, hold    *ebpf.Map
	socks, counters, opened *ebpf.Map
}

func (d *Datapath) v2() (*v2maps, error) {
	m := &d.v2m
	m.once.Do(func() {
		open := func(name string) *ebpf.Map {
			if m.err != nil {
				return nil
			}
			mp, err := ebpf.LoadPinnedMap(filepath.Join(d.dir, name), nil)
			if err != nil {
				m.err = fmt.Errorf("open pinned map %s: %w", name, err)
			}
			return mp
		}
		m.failing = open("ctlb_failing_v2")
		m.slots = open("ctlb_slots_v2")
		m.hold = open("ctlb_config_v2")
		m.socks = open("ctlb_socks_v2")
		m.counters = open("ctlb_counters_v2")
		m.opened = open("ctlb_open_v2")
	})
	return m, m.err
}

func (m *v2maps) close() {
	for _, mp := range []*ebpf.Map{m.failing, m.slots, m.hold, m.socks, m.counters, m.opened} {
		if mp != nil {
			mp.Close()
		}
	}
}

// slotAddr turns a 16-byte address and a network-order port into an AddrPort.
func slotAddr(a [16]byte, p uint16) netip.AddrPort {
	var pb [2]byte
	binary.NativeEndian.PutUint16(pb[:], p)
	return netip.AddrPortFrom(netip.AddrFrom16(a).Unmap(), binary.BigEndian.Uint16(pb[:]))
}

// FailMarks lists the slots whose failing mark is set (its hold-down may
// have passed already: the kernel then lets one probe through).
func (d *Datapath) FailMarks() ([]FailMark, error) {
	m, err := d.v2()
	if err != nil {
		return nil, err
	}
	n := int(m.failing.MaxEntries())
	keys := make([]uint32, n)
	vals := make([]slotFail, n)
	var cursor ebpf.MapBatchCursor
	got, err := m.failing.BatchLookup(&cursor, keys, vals, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read failing marks: %w", err)
	}
	var out []FailMark
	for i := 0; i < got; i++ {
		if vals[i].UntilNs == 0 || keys[i] == 0 {
			continue
		}
		var si slotInfo
		if err := m.slots.Lookup(keys[i], &si); err != nil {
			return nil, fmt.Errorf("read slot %d: %w", keys[i], err)
		}
		out = append(out, FailMark{Slot: keys[i], VIP: slotAddr(si.VIP.Addr, si.VIP.Port), Server: slotAddr(si.Addr, si.Port),
			Until: time.Duration(vals[i].UntilNs), Strikes: vals[i].Strikes})
	}
	return out, nil
}

// ClearFailMark returns a slot to rotation at once (a health check or a
// probe by ctlbd passed).
func (d *Datapath) ClearFailMark(slot uint32) error {
	m, err := d.v2()
	if err != nil {
		return err
	}
	if err := m.failing.Put(slot, slotFail{}); err != nil {
		return fmt.Errorf("clear failing mark of slot %d: %w", slot, err)
	}
	return nil
}

// HoldFailMark keeps a slot out of rotation until until (Monotonic clock)
// with the given strikes: ctlbd's own probe failed, so no client connect
// needs to be the probe.
func (d *Datapath) HoldFailMark(slot uint32, until time.Duration, strikes uint32) error {
	m, err := d.v2()
	if err != nil {
		return err
	}
	if err := m.failing.Put(slot, slotFail{UntilNs: uint64(until), Strikes: strikes}); err != nil {
		return fmt.Errorf("hold failing mark of slot %d: %w", slot, err)
	}
	return nil
}

// HoldTimes are the node's hold-down base and maximum (ctlb_config_v2).
func (d *Datapath) HoldTimes() (base, max time.Duration, err error) {
	m, err := d.v2()
	if err != nil {
		return 0, 0, err
	}
	var c holdConfig
	if err := m.hold.Lookup(uint32(0), &c); err != nil {
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
