package daemon

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Fail fast, the user-space half. The kernel marks a server slot failing
// when a connect to it is refused or times out, and connect skips it during
// the hold-down (bpf/ctlb.c: sock_ops at a SYN retransmission, sock_release
// or the next connect for a refused socket). ctlbd then decides when it comes
// back, so that no client connect has to be the probe:
//   - a VIP with health checks: the first check that passes after the mark
//     was seen clears it at once;
//   - a VIP without: shortly before the hold-down ends, ctlbd dials the
//     server itself; a success clears the mark, a failure extends the
//     hold-down with back-off.
//
// Without ctlbd the kernel falls back to letting one client connect through
// as the probe when the hold-down has passed (invariant 1).
const (
	failTick = 100 * time.Millisecond
	// probeLead is how long before the hold-down's end ctlbd probes: a
	// probe (bounded by probeTimeout) and its verdict land before the
	// kernel would let a client through.
	probeLead    = 400 * time.Millisecond
	probeTimeout = 250 * time.Millisecond
)

// failWatch follows the kernel's failing marks.
type failWatch struct {
	d *Daemon

	mu sync.Mutex
	// seen is when ctlbd first saw each slot's current mark (wall clock,
	// to compare with health checks' times).
	seen    map[uint32]time.Time
	probing map[uint32]bool
	// stats for status: marks seen and cleared per (VIP, server).
	marked   map[datapath.Departed]uint64
	returned map[datapath.Departed]uint64
	failing  map[datapath.Departed]bool
}

func newFailWatch(d *Daemon) *failWatch {
	return &failWatch{d: d, seen: map[uint32]time.Time{}, probing: map[uint32]bool{},
		marked: map[datapath.Departed]uint64{}, returned: map[datapath.Departed]uint64{}, failing: map[datapath.Departed]bool{}}
}

// run polls the marks until ctx ends. Pins without failing marks (an older
// layout) stop it quietly.
func (f *failWatch) run(ctx context.Context) {
	t := time.NewTicker(failTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := f.step(ctx); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				f.d.log.Warn("fail fast: the pinned layout has no failing marks; servers that refuse connects are skipped only once health checks notice", "error", err)
				return
			}
			f.d.log.Error("fail fast: read failing marks", "error", err)
		}
	}
}

func (f *failWatch) step(ctx context.Context) error {
	marks, err := f.d.dp.FailMarks()
	if err != nil {
		return err
	}
	now := time.Now()
	mono := datapath.Monotonic()
	tracked := f.d.snapshots()
	live := map[uint32]bool{}
	failing := map[datapath.Departed]bool{}
	for _, m := range marks {
		live[m.Slot] = true
		key := datapath.Departed{VIP: m.VIP, Protocol: m.Protocol, Server: m.Server}
		failing[key] = m.Until > mono
		f.mu.Lock()
		first, ok := f.seen[m.Slot]
		if !ok {
			first = now
			f.seen[m.Slot] = now
			f.marked[key]++
		}
		busy := f.probing[m.Slot]
		f.mu.Unlock()
		if !ok {
			f.d.log.Info("server marked failing by the kernel: connects skip it", "vip", m.VIP, "server", m.Server,
				"strikes", m.Strikes, "holdDown", (m.Until - mono).Round(time.Millisecond))
		}
		if snap, isTracked := tracked[m.Key()]; isTracked {
			for _, s := range snap.Servers {
				if s.Addr == m.Server && s.Health == health.Healthy && s.LastError == "" && s.LastCheck.After(first) {
					f.clear(m, key, "health check passed")
				}
			}
			continue
		}
		if busy || m.Until-mono > probeLead {
			continue
		}
		f.mu.Lock()
		f.probing[m.Slot] = true
		f.mu.Unlock()
		go f.probe(ctx, m, key)
	}
	f.mu.Lock()
	for slot := range f.seen {
		if !live[slot] {
			delete(f.seen, slot)
		}
	}
	f.failing = failing
	f.mu.Unlock()
	return nil
}

// probe dials a failing server of a VIP without health checks.
func (f *failWatch) probe(ctx context.Context, m datapath.FailMark, key datapath.Departed) {
	defer func() {
		f.mu.Lock()
		delete(f.probing, m.Slot)
		f.mu.Unlock()
	}()
	err := f.dial(ctx, m.Server)
	if ctx.Err() != nil {
		return
	}
	if err == nil {
		f.clear(m, key, "probe connect by ctlbd succeeded")
		return
	}
	base, max, herr := f.d.dp.HoldTimes()
	if herr != nil {
		base, max = datapath.DefaultHoldBase, datapath.DefaultHoldMax
	}
	hold := base << min(m.Strikes, 30)
	if hold > max || hold < base {
		hold = max
	}
	until := datapath.Monotonic() + hold
	if m.Until > until {
		until = m.Until
	}
	if err := f.d.dp.HoldFailMark(m.Slot, until, m.Strikes+1); err != nil {
		f.d.log.Error("fail fast: extend hold-down", "vip", m.VIP, "server", m.Server, "error", err)
		return
	}
	f.d.log.Info("server still failing: probe connect by ctlbd failed, hold-down extended", "vip", m.VIP, "server", m.Server,
		"error", err, "holdDown", hold, "strikes", m.Strikes+1)
}

// clear returns a slot to rotation.
func (f *failWatch) clear(m datapath.FailMark, key datapath.Departed, why string) {
	if err := f.d.dp.ClearFailMark(m.Slot); err != nil {
		f.d.log.Error("fail fast: clear mark", "vip", m.VIP, "server", m.Server, "error", err)
		return
	}
	f.mu.Lock()
	delete(f.seen, m.Slot)
	f.returned[key]++
	f.mu.Unlock()
	f.d.log.Info("server back in rotation", "vip", m.VIP, "server", m.Server, "reason", why)
}

// state is, per server of a VIP, whether it is failing now and how often it
// was marked and returned.
func (f *failWatch) state(key datapath.ServiceKey, server netip.AddrPort) (failing bool, marked, returned uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := datapath.Departed{VIP: key.VIP, Protocol: key.Protocol, Server: server}
	return f.failing[k], f.marked[k], f.returned[k]
}

// dial probes a server the way the pods reach it: from ctlbd's own network
// namespace and from every namespace holding attached pods, at once. One
// success is enough.
func (f *failWatch) dial(ctx context.Context, server netip.AddrPort) error {
	nss, err := f.d.dp.AttachedNetNS()
	if err != nil {
		return err
	}
	defer nss.Close()
	if err := nss.AddPath("/proc/self/ns/net"); err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	errs := make(chan error, nss.Len())
	for _, ns := range nss.Files() {
		go func() {
			var c net.Conn
			err := datapath.InNetNS(ns, func() error {
				var dialer net.Dialer
				var err error
				c, err = dialer.DialContext(pctx, "tcp", server.String())
				return err
			})
			if c != nil {
				c.Close()
			}
			errs <- err
		}()
	}
	var last error
	for range nss.Len() {
		if err := <-errs; err == nil {
			cancel() // the others need not finish
			return nil
		} else {
			last = err
		}
	}
	return last
}
