package daemon

import (
	"context"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Rebalancing bounds: a rebalance that has not converged by then stops (the
// clients may be reconnecting elsewhere, or closing), and the loop's tick.
const (
	rebalanceFor  = 2 * time.Minute
	rebalanceTick = 100 * time.Millisecond
)

// rebalancer moves existing connections onto servers that join a set, for
// the VIPs that opt in: connect-time balancing alone gives a newcomer only
// new connections, so a fleet of long-lived streams (gRPC to Consul) would
// never reach it. It ends, at a bounded rate, one connection at a time on
// the most loaded server. Meanwhile the VIP's entry in the map holds only
// the servers below their share (the mirror keeps the whole set), so the
// client's reconnect through the VIP lands on one of those, not back on a
// loaded server; the whole set is written back when the newcomers hold
// their share.
type rebalancer struct {
	d *Daemon

	mu sync.Mutex
	// opts are the VIPs that opt in, with their rates (connections/s).
	opts   map[datapath.ServiceKey]float64
	active map[datapath.ServiceKey]*rebalance
	kick   chan struct{}
	// last is what the last finished rebalance of each VIP did.
	last map[datapath.ServiceKey]RebalanceReport
}

// rebalance is one VIP's rebalancing in progress.
type rebalance struct {
	newcomers []netip.AddrPort
	rate      float64
	started   time.Time
	tokens    float64
	lastTick  time.Time
	ended     int
}

// RebalanceReport says what one rebalance did.
type RebalanceReport struct {
	Newcomers []netip.AddrPort `json:"newcomers"`
	Ended     int              `json:"ended"`
	Took      time.Duration    `json:"took"`
	Balanced  bool             `json:"balanced"`
}

func newRebalancer(d *Daemon) *rebalancer {
	return &rebalancer{d: d, opts: map[datapath.ServiceKey]float64{}, active: map[datapath.ServiceKey]*rebalance{},
		kick: make(chan struct{}, 1), last: map[datapath.ServiceKey]RebalanceReport{}}
}

// configure records which VIPs of cfg rebalance, and how fast. A VIP that
// stops opting in stops rebalancing.
func (r *rebalancer) configure(svcs []config.Service) {
	opts := map[datapath.ServiceKey]float64{}
	for _, s := range svcs {
		if !s.Rebalance {
			continue
		}
		svc, err := s.Datapath()
		if err != nil {
			continue // Validate ran already
		}
		rate := s.RebalanceRate
		if rate == 0 {
			rate = config.DefaultRebalanceRate
		}
		opts[svc.Key()] = rate
	}
	r.mu.Lock()
	r.opts = opts
	for key := range r.active {
		if _, ok := opts[key]; !ok {
			delete(r.active, key)
		}
	}
	r.mu.Unlock()
}

// arrivals starts rebalancing the VIPs of svcs that gain servers, when they
// opt in and had servers before (a first set has nothing to move). Callers
// hold d.mu and call it before the sets are mirrored.
func (r *rebalancer) arrivals(svcs []datapath.Service, before func(datapath.ServiceKey) []netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	started := false
	for _, s := range svcs {
		rate, ok := r.opts[s.Key()]
		if !ok {
			continue
		}
		old := before(s.Key())
		if len(old) == 0 {
			continue
		}
		var news []netip.AddrPort
		for _, srv := range s.Servers {
			if !slices.Contains(old, srv) {
				news = append(news, srv)
			}
		}
		if len(news) == 0 {
			continue
		}
		rb := r.active[s.Key()]
		if rb == nil {
			rb = &rebalance{rate: rate, started: time.Now(), lastTick: time.Now(), tokens: 1}
			r.active[s.Key()] = rb
		}
		rb.newcomers = append(rb.newcomers, news...)
		started = true
		r.d.log.Info("rebalancing onto new servers", "vip", s.Key(), "newcomers", news, "rate", rate)
	}
	if started {
		select {
		case r.kick <- struct{}{}:
		default:
		}
	}
}

// run drives the active rebalances until ctx ends.
func (r *rebalancer) run(ctx context.Context) {
	t := time.NewTicker(rebalanceTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		case <-t.C:
		}
		r.step()
	}
}

// step moves at most what each VIP's rate allows since the last step.
func (r *rebalancer) step() {
	r.mu.Lock()
	if len(r.active) == 0 {
		r.mu.Unlock()
		return
	}
	keys := make([]datapath.ServiceKey, 0, len(r.active))
	for k := range r.active {
		keys = append(keys, k)
	}
	r.mu.Unlock()
	stats, err := r.d.dp.Stats()
	if err != nil {
		r.d.log.Error("rebalance: read open counts", "error", err)
		return
	}
	for _, key := range keys {
		open := map[netip.AddrPort]int64{}
		for _, s := range stats {
			if s.Key() == key {
				open[s.Server] = s.Open
			}
		}
		r.stepVIP(key, r.d.table.setOf(key), open)
	}
}

// stepVIP ends connections of one VIP while the newcomers hold less than
// their share.
func (r *rebalancer) stepVIP(key datapath.ServiceKey, set []netip.AddrPort, open map[netip.AddrPort]int64) {
	r.mu.Lock()
	rb := r.active[key]
	if rb == nil {
		r.mu.Unlock()
		return
	}
	now := time.Now()
	rb.tokens = math.Min(rb.tokens+rb.rate*now.Sub(rb.lastTick).Seconds(), math.Max(1, rb.rate))
	rb.lastTick = now
	// Newcomers that left the set again are not waited for.
	rb.newcomers = slices.DeleteFunc(rb.newcomers, func(s netip.AddrPort) bool { return !slices.Contains(set, s) })
	r.mu.Unlock()

	var total int64
	for _, s := range set {
		total += open[s]
	}
	share := int64(0)
	if len(set) > 0 {
		share = total / int64(len(set))
	}
	// The most loaded server that is no newcomer, and the least loaded
	// newcomer.
	var from netip.AddrPort
	var fromOpen int64 = -1
	for _, s := range set {
		if !slices.Contains(rb.newcomers, s) && open[s] > fromOpen {
			from, fromOpen = s, open[s]
		}
	}
	low := int64(math.MaxInt64)
	for _, s := range rb.newcomers {
		low = min(low, open[s])
	}
	balanced := len(rb.newcomers) == 0 || low >= share || fromOpen-low <= 1
	if balanced || now.Sub(rb.started) > rebalanceFor || rb.ended > int(4*total)+len(set) {
		r.d.steer(key, nil)
		r.finish(key, rb, balanced)
		return
	}
	var under []netip.AddrPort
	for _, s := range set {
		if open[s] < share {
			under = append(under, s)
		}
	}
	r.d.steer(key, under)
	r.mu.Lock()
	if rb.tokens < 1 {
		r.mu.Unlock()
		return
	}
	rb.tokens--
	r.mu.Unlock()
	// One connection per tick: the client reconnects on its own time, so
	// the next step looks at the counts again rather than guess where it
	// landed.
	res := r.d.ends.pass([]datapath.Departed{{VIP: key.VIP, Protocol: key.Protocol, Server: from, Limit: 1}}, "rebalance onto a new server")
	if len(res) == 1 && res[0].Destroyed > 0 {
		r.mu.Lock()
		rb.ended++
		r.mu.Unlock()
	}
}

// finish ends a VIP's rebalance and keeps its report.
func (r *rebalancer) finish(key datapath.ServiceKey, rb *rebalance, balanced bool) {
	rep := RebalanceReport{Newcomers: rb.newcomers, Ended: rb.ended, Took: time.Since(rb.started), Balanced: balanced}
	r.mu.Lock()
	if r.active[key] == rb {
		delete(r.active, key)
	}
	r.last[key] = rep
	r.mu.Unlock()
	r.d.log.Info("rebalance done", "vip", key, "newcomers", rep.Newcomers, "ended", rep.Ended, "took", rep.Took, "balanced", balanced)
}

// rebalancing reports whether a VIP is being rebalanced now.
func (r *rebalancer) rebalancing(key datapath.ServiceKey) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.active[key] != nil
}

// steer writes a VIP's entry with only the given servers of its set, or,
// with none, its whole set again. The mirror (and so departures, the proxy
// and status) keeps the whole set: steering never ends a connection.
func (d *Daemon) steer(key datapath.ServiceKey, only []netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	full := d.table.setOf(key)
	want := full
	if len(only) > 0 {
		want = slices.DeleteFunc(slices.Clone(full), func(s netip.AddrPort) bool { return !slices.Contains(only, s) })
	}
	if len(want) == 0 {
		want = full
	}
	cur, ok, err := d.dp.ServiceOf(key)
	if err != nil || !ok || slices.Equal(cur.Servers, want) {
		return
	}
	cur.Servers = want
	if err := d.dp.SetService(cur); err != nil {
		d.log.Error("rebalance: steer new connects", "vip", key, "servers", want, "error", err)
	}
}
