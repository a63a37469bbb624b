package daemon

import (
	"context"
	"encoding/json"
	"net/netip"
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
	vip     netip.AddrPort
	cfg     config.Service
	tracker *servers.Tracker
	cancel  context.CancelFunc
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
	ts := &trackedService{vip: svc.VIP, cfg: cfg}
	policy := svc.Empty
	opts, err := cfg.Sources().Options(func(healthy []netip.AddrPort, reason string) {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.trackers[ts.vip] != ts {
			return // superseded or stopped
		}
		// The tracker logged the change and its reason already.
		if err := d.writeSets(datapath.Service{VIP: ts.vip, Servers: healthy, Empty: policy}); err != nil {
			d.log.Error("write healthy set", "vip", ts.vip, "reason", reason, "error", err)
		}
	}, d.log)
	if err != nil {
		return err
	}
	if opts.Checker == nil {
		opts.Checker = health.TCP{}
	}
	opts.Checker = timedChecker{opts.Checker, d.m.checkSeconds.MustCurryWith(prometheus.Labels{"vip": svc.VIP.String()})}
	ts.tracker = servers.New(svc.VIP.String(), opts)
	tctx, cancel := context.WithCancel(ctx)
	ts.cancel = cancel
	if old := d.trackers[svc.VIP]; old != nil {
		old.cancel()
	}
	d.trackers[svc.VIP] = ts
	go ts.tracker.Run(tctx)
	return nil
}

// timedChecker times each health check for ctlb_health_check_duration_seconds.
type timedChecker struct {
	health.Checker
	seconds prometheus.ObserverVec // curried with the VIP
}

func (c timedChecker) Check(ctx context.Context, addr netip.AddrPort) error {
	start := time.Now()
	err := c.Checker.Check(ctx, addr)
	result := "pass"
	if err != nil {
		result = "fail"
	}
	c.seconds.WithLabelValues(c.Kind(), result).Observe(time.Since(start).Seconds())
	return err
}

// stopTracker stops a VIP's tracker, if it has one. Callers hold d.mu.
func (d *Daemon) stopTracker(vip netip.AddrPort) {
	if ts := d.trackers[vip]; ts != nil {
		ts.cancel()
		delete(d.trackers, vip)
	}
}

// snapshots returns every tracker's state, by VIP.
func (d *Daemon) snapshots() map[netip.AddrPort]servers.Snapshot {
	d.mu.Lock()
	ts := make([]*trackedService, 0, len(d.trackers))
	for _, t := range d.trackers {
		ts = append(ts, t)
	}
	d.mu.Unlock()
	out := make(map[netip.AddrPort]servers.Snapshot, len(ts))
	for _, t := range ts {
		out[t.vip] = t.tracker.Snapshot()
	}
	return out
}
