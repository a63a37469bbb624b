package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/crashpoint"
)

// UpgradeReport is what an in-place upgrade of layout v1 pins did.
type UpgradeReport struct {
	From        int      `json:"from"`
	Services    int      `json:"services"`
	Attachments int      `json:"attachments"`
	OpenSockets int64    `json:"openSockets"` // open counts carried over
	RemovedPins []string `json:"removedPins"`
}

// Layout v1 formats (docs/MAPS.md, "Layout v1").
type v1SvcKey struct {
	Vip  uint32
	Port uint16
	Pad  uint16
}

type v1Slot struct {
	Addr  uint32
	Port  uint16
	Flags uint16
}

// v1 pins: maps, then programs.
var v1MapPins = []string{"ctlb_services_v1", "ctlb_rr_v1", "ctlb_connects_v1", "ctlb_open_v1", "ctlb_socks_v1"}
var v1ProgPins = []string{"ctlb_connect4_v1", "ctlb_getpeername4_v1", "ctlb_sock_release_v1"}

// legacyLinkPin holds the root release link for sockets opened under v1.
var legacyLinkPin = fmt.Sprintf("ctlb_release_v1_link_v%d", Layout)

// slotAdjust is struct slot_adjust_v2, the context of ctlb_slot_adjust.
type slotAdjust struct {
	Slot     uint32
	Pad      uint32
	Open     int64
	Attempts uint64
}

func v1AddrPort(ip uint32, p uint16) netip.AddrPort {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], ip)
	return netip.AddrPortFrom(netip.AddrFrom4(a), hostPort(p))
}

// upgradeV1 takes over layout v1 pins in place (docs/UPGRADE.md):
//
//  1. the v1 VIPs become v2 VIPs (TCP, round-robin position kept);
//  2. a release program for sockets opened under v1 is attached at the
//     cgroup root, giving their open count to the v2 slot of their server;
//  3. each attachment gets the v2 hooks; its connect4 link switches to the
//     v2 program in place (BPF_LINK_UPDATE: no connect runs without a
//     hook); its v1 getpeername4 link stays for the v1 sockets; its v1
//     release link is switched in place to the v2 release of v1 sockets
//     (a removed link detaches later, and would lose a decrement);
//  4. the v1 counts, frozen now, are added to the v2 slots atomically;
//  5. the v1 pins are removed.
//
// Every step can run again after a crash half-way.
func (d *Datapath) upgradeV1() (*UpgradeReport, error) {
	rep := &UpgradeReport{From: 1}
	old := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range old {
			m.Close()
		}
	}()
	for _, n := range v1MapPins {
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.dir, n), nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("open v1 map %s: %w", n, err)
		}
		old[n] = m
	}

	// 1. VIPs.
	if svcs := old["ctlb_services_v1"]; svcs != nil {
		list, rrs, err := readV1Services(svcs, old["ctlb_rr_v1"])
		if err != nil {
			return rep, err
		}
		if err := d.SetServices(list); err != nil {
			return rep, fmt.Errorf("carry over v1 VIPs: %w", err)
		}
		rep.Services = len(list)
		a, err := d.allocator()
		if err != nil {
			return rep, err
		}
		for k, rr := range rrs {
			if svc, ok := a.svcs[k]; ok {
				if err := d.maps.svcstate.Put(svc, ctlbSvcStateV2{Rr: rr}); err != nil {
					return rep, fmt.Errorf("VIP %s: carry over round-robin position: %w", k, err)
				}
			}
		}
	}

	// Slots for every v1 (VIP, server) that has counts, in a set or not.
	slotOf := map[ctlbBackendKeyV1]uint32{}
	keysOf := func(m *ebpf.Map, val any) error {
		if m == nil {
			return nil
		}
		var k ctlbBackendKeyV1
		it := m.Iterate()
		for it.Next(&k, val) {
			slotOf[k] = 0
		}
		return it.Err()
	}
	var perCPU []uint64
	var open int64
	if err := keysOf(old["ctlb_connects_v1"], &perCPU); err != nil {
		return rep, fmt.Errorf("read v1 connect counters: %w", err)
	}
	if err := keysOf(old["ctlb_open_v1"], &open); err != nil {
		return rep, fmt.Errorf("read v1 open counts: %w", err)
	}
	if err := d.slotsForV1(slotOf); err != nil {
		return rep, err
	}

	// 2. Release for v1 sockets, at the root.
	var adjust *ebpf.Program
	coll, err := d.legacyObjects(old["ctlb_socks_v1"])
	if err != nil {
		return rep, err
	}
	defer coll.Close()
	adjust = coll.Programs["ctlb_slot_adjust"]
	v1slots := coll.Maps["ctlb_v1slots_v2"]
	for k, s := range slotOf {
		if err := v1slots.Put(k, s); err != nil {
			return rep, fmt.Errorf("map v1 server to slot %d: %w", s, err)
		}
	}
	if coll.Programs["ctlb_release_v1"] != nil {
		if err := d.attachLegacyRelease(coll.Programs["ctlb_release_v1"]); err != nil {
			return rep, err
		}
	}

	// 3. Attachments.
	n, err := d.upgradeAttachments(coll.Programs["ctlb_release_v1"])
	rep.Attachments = n
	if err != nil {
		return rep, err
	}

	// 4. Counts. The v1 maps are frozen now: no v1 connect4 or release
	// starts any more; one that started before the switch ends well within
	// this pause. Unpin first, so a restart never adds them twice.
	time.Sleep(50 * time.Millisecond)
	for _, name := range []string{"ctlb_connects_v1", "ctlb_open_v1"} {
		if old[name] != nil {
			if err := os.Remove(filepath.Join(d.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return rep, fmt.Errorf("unpin %s: %w", name, err)
			}
			rep.RemovedPins = append(rep.RemovedPins, name)
		}
	}
	adds := map[uint32]*slotAdjust{}
	add := func(k ctlbBackendKeyV1) *slotAdjust {
		s := slotOf[k]
		if adds[s] == nil {
			adds[s] = &slotAdjust{Slot: s}
		}
		return adds[s]
	}
	if m := old["ctlb_connects_v1"]; m != nil {
		var k ctlbBackendKeyV1
		it := m.Iterate()
		for it.Next(&k, &perCPU) {
			for _, v := range perCPU {
				add(k).Attempts += v
			}
		}
	}
	if m := old["ctlb_open_v1"]; m != nil {
		var k ctlbBackendKeyV1
		it := m.Iterate()
		for it.Next(&k, &open) {
			if open > 0 {
				add(k).Open += open
				rep.OpenSockets += open
			}
		}
	}
	for _, a := range adds {
		if a.Slot == 0 {
			continue
		}
		if _, err := adjust.Run(&ebpf.RunOptions{Context: *a}); err != nil {
			return rep, fmt.Errorf("carry over counts of slot %d: %w", a.Slot, err)
		}
	}

	// 5. The remaining v1 pins. The objects live on while links use them.
	for _, name := range append(append([]string{}, v1MapPins...), v1ProgPins...) {
		if name == "ctlb_connects_v1" || name == "ctlb_open_v1" {
			continue
		}
		err := os.Remove(filepath.Join(d.dir, name))
		if err == nil {
			rep.RemovedPins = append(rep.RemovedPins, name)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return rep, fmt.Errorf("unpin %s: %w", name, err)
		}
	}
	return rep, nil
}

// readV1Services reads every v1 VIP and its round-robin counter.
func readV1Services(svcs, rr *ebpf.Map) ([]Service, map[ServiceKey]uint32, error) {
	var (
		key     v1SvcKey
		innerID uint32
		keys    []v1SvcKey
		ids     []uint32
	)
	it := svcs.Iterate()
	for it.Next(&key, &innerID) {
		keys = append(keys, key)
		ids = append(ids, innerID)
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("list v1 VIPs: %w", err)
	}
	var out []Service
	rrs := map[ServiceKey]uint32{}
	for i, k := range keys {
		vip := v1AddrPort(k.Vip, k.Port)
		inner, err := ebpf.NewMapFromID(ebpf.MapID(ids[i]))
		if err != nil {
			return nil, nil, fmt.Errorf("v1 VIP %s: open backend array: %w", vip, err)
		}
		var hdr v1Slot
		if err := inner.Lookup(uint32(0), &hdr); err != nil {
			inner.Close()
			return nil, nil, fmt.Errorf("v1 VIP %s: read header: %w", vip, err)
		}
		s := Service{VIP: vip, Protocol: TCP, Empty: EmptyPassthrough, Balance: BalanceRoundRobin, Servers: []netip.AddrPort{}}
		if hdr.Flags&flagRejectEmpty != 0 {
			s.Empty = EmptyReject
		}
		for j := uint32(1); j <= hdr.Addr && j <= MaxServers; j++ {
			var slot v1Slot
			if err := inner.Lookup(j, &slot); err != nil {
				inner.Close()
				return nil, nil, fmt.Errorf("v1 VIP %s: read server %d: %w", vip, j, err)
			}
			s.Servers = append(s.Servers, v1AddrPort(slot.Addr, slot.Port))
		}
		inner.Close()
		out = append(out, s)
		if rr != nil {
			var n uint32
			if err := rr.Lookup(k, &n); err == nil {
				rrs[s.Key()] = n
			}
		}
	}
	return out, rrs, nil
}

// slotsForV1 fills in the v2 slot of every v1 (VIP, server): the slot of
// the server in the VIP's set, or a retired slot for a server that left it
// while sockets to it stayed open.
func (d *Datapath) slotsForV1(slotOf map[ctlbBackendKeyV1]uint32) error {
	a, err := d.allocator()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for k := range slotOf {
		sk := ServiceKey{Protocol: TCP, VIP: v1AddrPort(k.Vip, k.Vport)}
		srv := v1AddrPort(k.Addr, k.Port)
		if s, ok := a.slots[slotKey{sk, srv}]; ok {
			slotOf[k] = s
			continue
		}
		svc, err := a.service(d, sk)
		if err != nil {
			return err
		}
		s, err := a.slot(d, sk, svc, srv)
		if err != nil {
			return err
		}
		slotOf[k] = s
		var keep []netip.AddrPort
		for other, os := range a.bySvc[sk] {
			if _, ret := a.retired[os]; !ret && other != srv {
				keep = append(keep, other)
			}
		}
		if err := a.retireOthers(d, sk, keep); err != nil {
			return err
		}
	}
	return nil
}

// legacyObjects loads the upgrade-only programs against the v2 maps and the
// v1 socket storage. When a legacy release link is pinned already (an
// upgrade that ran before), its v1slots map is reused.
func (d *Datapath) legacyObjects(socksV1 *ebpf.Map) (*ebpf.Collection, error) {
	spec, err := loadCtlb()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF spec: %w", err)
	}
	keep := map[string]bool{"ctlb_release_v1": socksV1 != nil, "ctlb_slot_adjust": true}
	for name := range spec.Programs {
		if !keep[name] {
			delete(spec.Programs, name)
		}
	}
	repl := map[string]*ebpf.Map{"ctlb_open_v2": d.maps.open, "ctlb_counters_v2": d.maps.counters}
	if socksV1 != nil {
		repl["ctlb_socks_v1"] = socksV1
	} else {
		delete(spec.Maps, "ctlb_socks_v1")
	}
	if m := d.pinnedLegacyV1Slots(); m != nil {
		defer m.Close()
		repl["ctlb_v1slots_v2"] = m
	}
	for name, m := range spec.Maps {
		if _, ok := repl[name]; !ok && name != "ctlb_v1slots_v2" && name != "ctlb_socks_v1" {
			delete(spec.Maps, name)
		}
		m.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return nil, fmt.Errorf("load upgrade programs: %w", err)
	}
	return coll, nil
}

// pinnedLegacyV1Slots finds the v1slots map of an already pinned legacy
// release link.
func (d *Datapath) pinnedLegacyV1Slots() *ebpf.Map {
	l, err := link.LoadPinnedLink(filepath.Join(d.dir, legacyLinkPin), nil)
	if err != nil {
		return nil
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return nil
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return nil
	}
	defer prog.Close()
	pi, err := prog.Info()
	if err != nil {
		return nil
	}
	ids, _ := pi.MapIDs()
	for _, id := range ids {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		if mi, err := m.Info(); err == nil && mi.Name == kernelName("ctlb_v1slots_v2") {
			return m
		}
		m.Close()
	}
	return nil
}

func (d *Datapath) attachLegacyRelease(prog *ebpf.Program) error {
	p := filepath.Join(d.dir, legacyLinkPin)
	if _, err := os.Lstat(p); err == nil {
		return nil
	}
	root, err := cgroupv2.Mountpoint()
	if err != nil {
		return fmt.Errorf("v1 release: %w", err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: rootHook.attach, Program: prog})
	if err != nil {
		return fmt.Errorf("attach v1 release to the cgroup root %s: %w", root, err)
	}
	defer l.Close()
	if err := l.Pin(p); err != nil {
		return fmt.Errorf("pin v1 release link: %w", err)
	}
	return nil
}

// upgradeAttachments gives every v1 attachment the v2 hooks.
func (d *Datapath) upgradeAttachments(legacy *ebpf.Program) (int, error) {
	entries, err := os.ReadDir(d.linksDir())
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, fmt.Errorf("list attachments: %w", err)
	}
	var index map[uint64]string
	n := 0
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "_") {
			continue
		}
		dir := filepath.Join(d.linksDir(), e.Name())
		c4, err := link.LoadPinnedLink(filepath.Join(dir, "connect4"), nil)
		if err != nil {
			continue // not whole; GC or a later Attach mends it
		}
		info, err := c4.Info()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId == 0 {
			c4.Close()
			continue // its cgroup is gone
		}
		if index == nil {
			h, err := cgroupv2.Default()
			if err != nil {
				c4.Close()
				return n, fmt.Errorf("upgrade attachments: %w", err)
			}
			if index, err = h.IndexByID(); err != nil {
				c4.Close()
				return n, fmt.Errorf("upgrade attachments: %w", err)
			}
		}
		cg := index[info.Cgroup().CgroupId]
		if cg == "" {
			c4.Close()
			continue
		}
		err = d.upgradeAttachment(dir, cg, c4, legacy)
		c4.Close()
		if err != nil {
			return n, fmt.Errorf("upgrade attachment %s: %w", e.Name(), err)
		}
		n++
		crashpoint.Hit(crashpoint.Upgrade)
	}
	return n, nil
}

func (d *Datapath) upgradeAttachment(dir, cgroup string, c4 link.Link, legacy *ebpf.Program) error {
	// The v1 getpeername4 keeps answering for sockets opened under v1.
	gp := filepath.Join(dir, "getpeername4")
	if l, err := link.LoadPinnedLink(gp, nil); err == nil {
		info, err := l.Info()
		l.Close()
		if err == nil && !d.isOurs("getpeername4", info.Program) {
			if err := os.Rename(gp, filepath.Join(dir, "v1_getpeername4")); err != nil {
				return err
			}
		}
	}
	for _, h := range hooks {
		if h.name == "connect4" {
			continue
		}
		p := filepath.Join(dir, h.name)
		if _, err := os.Lstat(p); err == nil {
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: d.progs[h.name]})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", h.name, cgroup, err)
		}
		err = l.Pin(p)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin %s link: %w", h.name, err)
		}
	}
	if err := c4.Update(d.progs["connect4"]); err != nil {
		return fmt.Errorf("switch connect4 to v%d: %w", Layout, err)
	}
	// The v1 release link now runs the v1-socket release of layout v2: it
	// gives a v1 socket's count to its v2 slot. Replaced in place, not
	// removed: a removed link detaches some time later (the kernel defers
	// it), and a v1 release running after the counts were carried over
	// would lose a decrement.
	rl := filepath.Join(dir, "sock_release")
	l, err := link.LoadPinnedLink(rl, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load v1 release link: %w", err)
	}
	defer l.Close()
	if legacy == nil {
		return os.Remove(rl)
	}
	if err := l.Update(legacy); err != nil {
		return fmt.Errorf("switch v1 release link: %w", err)
	}
	return nil
}

// isOurs reports whether a program ID is this datapath's program of hook.
func (d *Datapath) isOurs(hook string, id ebpf.ProgramID) bool {
	p := d.progs[hook]
	if p == nil {
		return false
	}
	info, err := p.Info()
	if err != nil {
		return false
	}
	own, ok := info.ID()
	return ok && own == id
}
