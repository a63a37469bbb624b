package daemon

import (
	"context"
	"encoding/json"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ctlb/ctlb/internal/health"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/servers"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// trackedService is a VIP whose set ctlbd keeps from sources and health
// checks: a running servers.Tracker and what it was built from.
type trackedService struct {
	key     datapath.ServiceKey
	cfg     config.Service
	tracker *servers.Tracker
	// published is set once the tracker's first set is written.
	published bool
	cancel    context.CancelFunc
	timer     *checkTimer
}

// sameConfig tells whether a running tracker was built from cfg already.
func (ts *trackedService) sameConfig(cfg config.Service) bool {
	a, _ := json.Marshal(ts.cfg)
	b, _ := json.Marshal(cfg)
	return string(a) == string(b)
}

// startTracker runs a tracker for a VIP; each change of its healthy set is
// swapped into the map atomically. A tracker that is replaced (reload) or
// stopped has its late changes ignored. Callers hold d.mu.
func (d *Daemon) startTracker(ctx context.Context, cfg config.Service, svc datapath.Service) error {
	ts := &trackedService{key: svc.Key(), cfg: cfg}
	policy, removal, balance := svc.Empty, svc.OnServerRemoved, svc.Balance
	opts, err := cfg.Sources().Options(func(healthy []netip.AddrPort, reason string) {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.trackers[ts.key] != ts {
			return // superseded or stopped
		}
		// The tracker logged the change and its reason already.
		// A tracker's first set (after a start, restart or reload) comes
		// from a view still filling up (a slow source may not have
		// answered): it ends no connection; later changes do.
		first := !ts.published
		ts.published = true
		if err := d.writeSetsEnding(!first, datapath.Service{VIP: ts.key.VIP, Protocol: ts.key.Protocol, Servers: healthy, Empty: policy, Balance: balance, OnServerRemoved: removal}); err != nil {
			d.log.Error("write healthy set", "vip", ts.key, "reason", reason, "error", err)
		}
	}, d.log)
	if err != nil {
		return err
	}
	if opts.Checker == nil {
		opts.Checker = health.TCP{}
	}
	ts.timer = &checkTimer{vec: d.m.checkSeconds, vip: ts.key.String()}
	opts.Checker = timedChecker{opts.Checker, ts.timer}
	ts.tracker = servers.New(ts.key.String(), opts)
	tctx, cancel := context.WithCancel(ctx)
	ts.cancel = cancel
	if old := d.trackers[ts.key]; old != nil {
		ts.tracker.Inherit(old.tracker) // a reload: the sources' history goes on
		old.cancel()
	}
	d.trackers[ts.key] = ts
	go ts.tracker.Run(tctx)
	return nil
}

// timedChecker times each health check for ctlb_health_check_duration_seconds.
type timedChecker struct {
	health.Checker
	timer *checkTimer
}

func (c timedChecker) Check(ctx context.Context, addr netip.AddrPort) error {
	start := time.Now()
	err := c.Checker.Check(ctx, addr)
	result := "pass"
	if err != nil {
		result = "fail"
	}
	c.timer.observe(c.Kind(), result, time.Since(start))
	return err
}

// checkTimer is one VIP's share of ctlb_health_check_duration_seconds.
// drop deletes its series when the VIP stops being tracked, and stops
// later observations: a check cancelled by the stop would otherwise come
// back and make the series again.
type checkTimer struct {
	vec *prometheus.HistogramVec
	vip string

	mu      sync.Mutex
	dropped bool
}

func (t *checkTimer) observe(kind, result string, d time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.dropped {
		t.vec.WithLabelValues(t.vip, kind, result).Observe(d.Seconds())
	}
}

func (t *checkTimer) drop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.dropped = true
	t.vec.DeletePartialMatch(prometheus.Labels{"vip": t.vip})
}

// stopTracker stops a VIP's tracker, if it has one, and drops its health
// check series (a tracker that replaces it for the same VIP, on a reload,
// keeps them: startTracker does not come here). Callers hold d.mu.
func (d *Daemon) stopTracker(key datapath.ServiceKey) {
	if ts := d.trackers[key]; ts != nil {
		ts.cancel()
		delete(d.trackers, key)
		if ts.timer != nil {
			ts.timer.drop()
		}
	}
}

// snapshots returns every tracker's state, by VIP.
func (d *Daemon) snapshots() map[datapath.ServiceKey]servers.Snapshot {
	d.mu.Lock()
	ts := make([]*trackedService, 0, len(d.trackers))
	for _, t := range d.trackers {
		ts = append(ts, t)
	}
	d.mu.Unlock()
	out := make(map[datapath.ServiceKey]servers.Snapshot, len(ts))
	for _, t := range ts {
		out[t.key] = t.tracker.Snapshot()
	}
	return out
}
