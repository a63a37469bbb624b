package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// ScalePoint is the connect rate of connect4 and of the direct path, side by
// side, with a given number of attached pod cgroups and VIPs.
type ScalePoint struct {
	Attachments int `json:"attachments"`
	VIPs        int `json:"vips"`
	// Connections per second, one client and Clients at once.
	Connect4Rate1 Stat `json:"connect4ConnsPerSec1"`
	DirectRate1   Stat `json:"directConnsPerSec1"`
	Connect4RateN Stat `json:"connect4ConnsPerSecN"`
	DirectRateN   Stat `json:"directConnsPerSecN"`
	// connect4 over direct (median of per-round ratios), the figure
	// compared across points: it cancels the machine's drift between
	// points measured a minute apart.
	Ratio1 float64 `json:"ratio1"`
	RatioN float64 `json:"ratioN"`
	// BPFNsPerConn is the run time of ctlb's programs per connection
	// (kernel BPF statistics, many clients): the part of a connection's
	// cost that could depend on the number of VIPs or attachments, measured
	// without the machine's noise. DirectCPUNsPerConn is the CPU time of a
	// whole connection on the direct path, for scale.
	BPFNsPerConn       Stat `json:"bpfNsPerConnection"`
	DirectCPUNsPerConn Stat `json:"directCpuNsPerConnection"`
	// Retries and Foreign: as in PathResult.
	Retries int     `json:"retries"`
	Foreign float64 `json:"maxForeignCpuShare"`
}

// Memory is the kernel memory ctlb uses.
type Memory struct {
	// FixedMemlock is what ctlb's pinned maps take whatever the load
	// (the services map is preallocated), bytes.
	FixedMemlock uint64 `json:"fixedMemlockBytes"`
	// PerVIPMemlock: BPF map memory (fdinfo memlock of every map on the
	// machine, before and after) per VIP:port added, bytes.
	PerVIPMemlock float64 `json:"perVipMemlockBytes"`
	// PerVIPSlab: the kernel's slab growth per VIP:port, bytes.
	PerVIPSlab float64 `json:"perVipSlabBytes"`
	// PerAttachMemlock: BPF map memory per attachment; attachments own
	// no maps, only links, so this is expected to be zero.
	PerAttachMemlock float64 `json:"perAttachmentMemlockBytes"`
	// PerAttachSlab: slab growth per attachment (3 links, their bpffs
	// pins, the cgroup's effective program arrays), bytes. Approximate:
	// /proc/meminfo is machine-wide.
	PerAttachSlab float64 `json:"perAttachmentSlabBytes"`
	// Seconds to attach the scale cgroups and to add the scale VIPs.
	AttachSeconds float64 `json:"attachSeconds"`
	VIPSeconds    float64 `json:"vipSeconds"`
	Attached      int     `json:"attached"`
	VIPsAdded     int     `json:"vipsAdded"`
	VIPMode       string  `json:"vipMode"` // datapath.BatchMode: batch or parallel
}

// parallel runs fn(0..n-1) on workers goroutines and returns the first error.
func parallel(ctx context.Context, n, workers int, fn func(i int) error) error {
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}

// fillerVIP is the i-th VIP the scale test adds: 198.19.1.0 upwards, which
// no path uses.
func fillerVIP(i int) netip.AddrPort {
	base := netip.MustParseAddr("198.19.1.0").As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(i)
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}), vipEchoPort)
}

// setVIPs brings the number of filler VIPs from have to want. Each change of
// a map-in-map waits for an RCU grace period; concurrent changes share them
// (SetServices does so for additions).
func (e *env) setVIPs(ctx context.Context, have, want int) error {
	if want > have {
		svcs := make([]datapath.Service, 0, want-have)
		for i := have; i < want; i++ {
			s := datapath.Service{VIP: fillerVIP(i), Empty: datapath.EmptyReject}
			for _, ip := range serverIPs {
				s.Servers = append(s.Servers, netip.AddrPortFrom(ip, echoPort))
			}
			svcs = append(svcs, s)
		}
		return e.dp.SetServices(svcs)
	}
	return parallel(ctx, have-want, 128, func(i int) error {
		_, err := e.dp.DeleteService(fillerVIP(want + i))
		return err
	})
}

func scaleID(i int) string { return fmt.Sprintf("bench-scale-%04d", i) }

// makeScaleCgroups creates the pod cgroups the scale points attach (under
// the benchmark's cgroup, which goes with everything below it).
func (e *env) makeScaleCgroups(n int) error {
	for i := range n {
		if err := os.Mkdir(filepath.Join(e.cgRoot, "pods", scaleID(i)), 0o755); err != nil {
			return fmt.Errorf("scale cgroup: %w", err)
		}
	}
	return nil
}

// setAttachments brings the number of attached scale cgroups from have to
// want; the cgroups exist already.
func (e *env) setAttachments(ctx context.Context, have, want int) error {
	if want > have {
		return parallel(ctx, want-have, 8, func(i int) error {
			id := scaleID(have + i)
			_, err := e.dp.Attach(id, filepath.Join(e.cgRoot, "pods", id))
			return err
		})
	}
	return parallel(ctx, have-want, 8, func(i int) error { return e.dp.Detach(scaleID(want + i)) })
}

// slabBytes is the kernel's slab memory, from /proc/meminfo.
func slabBytes() (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("read /proc/meminfo: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Slab:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo Slab: %w", err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("/proc/meminfo: no Slab line")
}

// ctlbMemlock adds up the memlock figure of ctlb's maps in this benchmark's
// bpffs: the pinned maps and the inner arrays of its VIPs, which the kernel
// alone holds and which are found by ID through the outer map. Other
// processes' maps (tests running beside a smoke run) are not counted.
func (e *env) ctlbMemlock() (uint64, error) {
	total, err := e.pinnedMemlock()
	if err != nil {
		return 0, err
	}
	outerPath := filepath.Join(e.bpffs, "ctlb", "ctlb_services_v2")
	outer, err := ebpf.LoadPinnedMap(outerPath, nil)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", outerPath, err)
	}
	defer outer.Close()
	var key []byte
	var id uint32
	it := outer.Iterate()
	for it.Next(&key, &id) {
		m, err := ebpf.NewMapFromID(ebpf.MapID(id))
		if err != nil {
			continue // replaced meanwhile
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			continue
		}
		if v, ok := info.Memlock(); ok {
			total += v
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("iterate %s: %w", outerPath, err)
	}
	return total, nil
}

// pinnedMemlock adds up the memlock of ctlb's pinned maps.
func (e *env) pinnedMemlock() (uint64, error) {
	dir := filepath.Join(e.bpffs, "ctlb")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", dir, err)
	}
	var total uint64
	for _, ent := range entries {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, ent.Name()), nil)
		if err != nil {
			continue // a program or the links directory
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			return 0, fmt.Errorf("map %s: %w", ent.Name(), err)
		}
		if v, ok := info.Memlock(); ok {
			total += v
		}
	}
	return total, nil
}

// measureMemory attaches the scale cgroups and adds the scale VIPs before
// any traffic has run (TIME_WAIT sockets and conntrack entries would move
// the slab figures far more than what is measured), reading the kernel's
// memory around each step. It leaves everything attached and added.
func (e *env) measureMemory(ctx context.Context, cfg Config, baseVIPs int) (Memory, error) {
	var mem Memory
	var err error
	if mem.FixedMemlock, err = e.pinnedMemlock(); err != nil {
		return mem, err
	}
	maxAttach := cfg.AttachLevels[len(cfg.AttachLevels)-1] - 1 // the client's is one
	maxVIPs := cfg.VIPLevels[len(cfg.VIPLevels)-1] - baseVIPs
	if err := e.makeScaleCgroups(maxAttach); err != nil {
		return mem, err
	}
	read := func() (uint64, int64, error) {
		ml, err := e.ctlbMemlock()
		if err != nil {
			return 0, 0, err
		}
		slab, err := slabBytes()
		return ml, slab, err
	}
	ml0, slab0, err := read()
	if err != nil {
		return mem, err
	}
	t0 := time.Now()
	if err := e.setAttachments(ctx, 0, maxAttach); err != nil {
		return mem, fmt.Errorf("attach scale cgroups: %w", err)
	}
	mem.AttachSeconds = time.Since(t0).Seconds()
	mem.Attached = maxAttach
	ml1, slab1, err := read()
	if err != nil {
		return mem, err
	}
	t0 = time.Now()
	if err := e.setVIPs(ctx, 0, maxVIPs); err != nil {
		return mem, fmt.Errorf("add scale VIPs: %w", err)
	}
	mem.VIPSeconds = time.Since(t0).Seconds()
	mem.VIPsAdded = maxVIPs
	mem.VIPMode = e.dp.BatchMode()
	ml2, slab2, err := read()
	if err != nil {
		return mem, err
	}
	if maxAttach > 0 {
		mem.PerAttachMemlock = (float64(ml1) - float64(ml0)) / float64(maxAttach)
		mem.PerAttachSlab = float64(slab1-slab0) / float64(maxAttach)
	}
	if maxVIPs > 0 {
		mem.PerVIPMemlock = (float64(ml2) - float64(ml1)) / float64(maxVIPs)
		mem.PerVIPSlab = float64(slab2-slab1) / float64(maxVIPs)
	}
	logf("memory: %d attachments in %.1fs, %d VIPs in %.1fs", maxAttach, mem.AttachSeconds, maxVIPs, mem.VIPSeconds)
	return mem, nil
}

// scalePoint measures connect4 against direct at the current scale.
func (e *env) scalePoint(ctx context.Context, cfg Config, attachments, vips int) (ScalePoint, error) {
	pt := ScalePoint{Attachments: attachments, VIPs: vips}
	for range cfg.ScaleRounds {
		for _, m := range metrics[:2] {
			for _, p := range []path{pathConnect4, pathDirect} {
				before, err := e.progs.read()
				if err != nil {
					return pt, err
				}
				s, retries, err := e.measure(ctx, p, m, cfg)
				if err != nil {
					return pt, fmt.Errorf("scale %d attachments %d VIPs %s %s: %w", attachments, vips, p.name, m.name, err)
				}
				if s.res.Errors > 0 {
					return pt, fmt.Errorf("scale %d attachments %d VIPs %s %s: %d errors, first: %s", attachments, vips, p.name, m.name, s.res.Errors, s.res.Err)
				}
				pt.Retries += retries
				pt.Foreign = max(pt.Foreign, s.foreign)
				after, err := e.progs.read()
				if err != nil {
					return pt, err
				}
				v := s.res.PerSecond()
				if m.name == "rateN" && s.res.Ops > 0 {
					perConn := float64(s.cpu.Nanoseconds()) / float64(s.res.Ops)
					if p.name == pathConnect4.name {
						// Per connect4 run, not per kept try's
						// connection: a repeated try ran the programs too.
						if ns, ok := nsPerConnect(before, after); ok {
							pt.BPFNsPerConn.add(ns)
						}
					} else {
						pt.DirectCPUNsPerConn.add(perConn)
					}
				}
				switch {
				case p.name == pathConnect4.name && m.name == "rate1":
					pt.Connect4Rate1.add(v)
				case p.name == pathConnect4.name:
					pt.Connect4RateN.add(v)
				case m.name == "rate1":
					pt.DirectRate1.add(v)
				default:
					pt.DirectRateN.add(v)
				}
			}
		}
	}
	pt.Ratio1 = pairedRatio(pt.Connect4Rate1, pt.DirectRate1)
	pt.RatioN = pairedRatio(pt.Connect4RateN, pt.DirectRateN)
	logf("scale: %d attachments, %d VIPs: connect4/direct %.3f (1 client), %.3f (%d clients); BPF %.0f ns per connection",
		attachments, vips, pt.Ratio1, pt.RatioN, cfg.Clients, pt.BPFNsPerConn.Median)
	return pt, nil
}

// runScale walks down from the largest scale (every attachment, every VIP)
// to the smallest: VIPs first, with every attachment in place, then
// attachments with the fewest VIPs. It ends at the smallest scale, where the
// path comparison runs. BPF statistics are on throughout, at every point
// alike, so that the programs' own cost is measured at each.
//
// With measure false it only takes the scale down again, step by step as
// when measuring (the memory phase ran alone).
func (e *env) runScale(ctx context.Context, cfg Config, baseVIPs int, onMaxAttach func() error, measure bool) (vipPts, attachPts []ScalePoint, err error) {
	stats, err := enableBPFStats()
	if err != nil {
		return nil, nil, err
	}
	defer stats.Close()
	maxAttach := cfg.AttachLevels[len(cfg.AttachLevels)-1]
	have := cfg.VIPLevels[len(cfg.VIPLevels)-1] - baseVIPs
	for i := len(cfg.VIPLevels) - 1; i >= 0; i-- {
		want := cfg.VIPLevels[i] - baseVIPs
		if err := e.setVIPs(ctx, have, want); err != nil {
			return nil, nil, fmt.Errorf("remove scale VIPs: %w", err)
		}
		have = want
		if !measure {
			continue
		}
		pt, err := e.scalePoint(ctx, cfg, maxAttach, cfg.VIPLevels[i])
		if err != nil {
			return nil, nil, err
		}
		vipPts = append([]ScalePoint{pt}, vipPts...)
	}
	if onMaxAttach != nil {
		if err := onMaxAttach(); err != nil {
			return nil, nil, err
		}
	}
	if measure {
		attachPts = []ScalePoint{vipPts[0]}
	}
	haveAtt := maxAttach - 1
	for i := len(cfg.AttachLevels) - 2; i >= 0; i-- {
		want := cfg.AttachLevels[i] - 1
		if err := e.setAttachments(ctx, haveAtt, want); err != nil {
			return nil, nil, fmt.Errorf("detach scale cgroups: %w", err)
		}
		haveAtt = want
		if !measure {
			continue
		}
		pt, err := e.scalePoint(ctx, cfg, cfg.AttachLevels[i], cfg.VIPLevels[0])
		if err != nil {
			return nil, nil, err
		}
		attachPts = append([]ScalePoint{pt}, attachPts...)
	}
	return vipPts, attachPts, nil
}
