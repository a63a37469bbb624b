package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
)

var (
	descConnects = prometheus.NewDesc("ctlb_server_connects_total",
		"Connects the kernel sent to a server of a VIP (connect4 rewrites).", []string{"vip", "server"}, nil)
	descOpen = prometheus.NewDesc("ctlb_server_open_connections",
		"Sockets open now that were sent to a server of a VIP.", []string{"vip", "server"}, nil)
	descServers = prometheus.NewDesc("ctlb_service_servers",
		"Servers in a VIP's set in the maps.", []string{"vip"}, nil)
	descAttachments = prometheus.NewDesc("ctlb_attachments",
		"Cgroup attachments pinned.", nil, nil)
	descDeadAttachments = prometheus.NewDesc("ctlb_attachments_dead",
		"Attachments whose cgroup has died, waiting for GC.", nil, nil)
	descPending = prometheus.NewDesc("ctlb_pending_attachments",
		"Pending attachments: pods whose cgroup did not exist yet at CNI ADD.", nil, nil)
	descHealthy = prometheus.NewDesc("ctlb_server_healthy",
		"Health of a candidate server of a tracked VIP: 1 healthy, 0 unhealthy, -1 not checked yet.", []string{"vip", "server"}, nil)
	descInSet = prometheus.NewDesc("ctlb_server_in_set",
		"1 when a candidate server of a tracked VIP is in the set written to the map.", []string{"vip", "server"}, nil)
	descSourceErrors = prometheus.NewDesc("ctlb_source_errors_total",
		"Failed answers of a server source (DNS, Consul, exec); the last good answer is kept.", []string{"vip", "source"}, nil)
	descSetChanges = prometheus.NewDesc("ctlb_service_set_changes_total",
		"Changes of a tracked VIP's healthy set written to the map.", []string{"vip"}, nil)
	descPanic = prometheus.NewDesc("ctlb_service_panic",
		"1 while a tracked VIP is in panic mode (no healthy server; every candidate kept).", []string{"vip"}, nil)
	descRejected = prometheus.NewDesc("ctlb_source_rejected_entries",
		"Entries of a source's last answer left out (not an address, wrong family, not unicast, listed twice, another host's loopback).", []string{"vip", "source"}, nil)
	descTrimmed = prometheus.NewDesc("ctlb_service_candidates_trimmed",
		"Candidates of a tracked VIP left out over the most servers a VIP may have.", []string{"vip"}, nil)
	descConsulRequests = prometheus.NewDesc("ctlb_consul_requests_total",
		"HTTP requests this daemon sent to Consul's API (all its watches; one watch per distinct query).", nil, nil)
)

// collector reads the kernel's counters at scrape time, so the numbers are
// the maps' own and cost nothing between scrapes.
type collector struct{ d *Daemon }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnects, descOpen, descServers, descAttachments, descDeadAttachments, descPending,
		descHealthy, descInSet, descSourceErrors, descSetChanges, descPanic, descRejected, descTrimmed, descConsulRequests} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	if stats, err := d.dp.Stats(); err == nil {
		for _, s := range stats {
			ch <- prometheus.MustNewConstMetric(descConnects, prometheus.CounterValue, float64(s.Connects), s.VIP.String(), s.Server.String())
			ch <- prometheus.MustNewConstMetric(descOpen, prometheus.GaugeValue, float64(s.Open), s.VIP.String(), s.Server.String())
		}
	} else {
		ch <- prometheus.NewInvalidMetric(descConnects, err)
	}
	if svcs, err := d.dp.Services(); err == nil {
		for _, s := range svcs {
			ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, float64(len(s.Servers)), s.VIP.String())
		}
	}
	if atts, err := d.dp.Attachments(); err == nil {
		dead := 0
		for _, a := range atts {
			if !a.Alive {
				dead++
			}
		}
		ch <- prometheus.MustNewConstMetric(descAttachments, prometheus.GaugeValue, float64(len(atts)))
		ch <- prometheus.MustNewConstMetric(descDeadAttachments, prometheus.GaugeValue, float64(dead))
	}
	ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(d.pendingCount()))
	ch <- prometheus.MustNewConstMetric(descConsulRequests, prometheus.CounterValue, float64(discovery.ConsulRequests()))
	for vip, snap := range d.snapshots() {
		v := vip.String()
		for _, srv := range snap.Servers {
			h := -1.0
			switch srv.Health {
			case health.Healthy:
				h = 1
			case health.Unhealthy:
				h = 0
			}
			ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, h, v, srv.Addr.String())
			ch <- prometheus.MustNewConstMetric(descInSet, prometheus.GaugeValue, boolFloat(srv.Published), v, srv.Addr.String())
		}
		for _, src := range snap.Sources {
			ch <- prometheus.MustNewConstMetric(descSourceErrors, prometheus.CounterValue, float64(src.Errors), v, src.Name)
			ch <- prometheus.MustNewConstMetric(descRejected, prometheus.GaugeValue, float64(src.Rejected), v, src.Name)
		}
		ch <- prometheus.MustNewConstMetric(descTrimmed, prometheus.GaugeValue, float64(snap.Trimmed), v)
		ch <- prometheus.MustNewConstMetric(descSetChanges, prometheus.CounterValue, float64(snap.Changes), v)
		ch <- prometheus.MustNewConstMetric(descPanic, prometheus.GaugeValue, boolFloat(snap.Panic), v)
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// newRegistry holds every ctlbd metric: the kernel's counters, the proxy's,
// and the process's own.
func (d *Daemon) newRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collector{d}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// serveMetrics serves /metrics, /healthz and /readyz on addr until ctx ends.
func (d *Daemon) serveMetrics(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.registry, promhttp.HandlerOpts{}))
	// Liveness and readiness probes (Kubernetes' httpGet) on the same
	// listener: the metrics address is the one the kubelet can reach.
	mux.Handle("GET /healthz", serveProbe(d.healthChecks))
	mux.Handle("GET /readyz", serveProbe(d.readyChecks))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server stopped", "error", err)
		}
	}()
	d.log.Info("metrics", "address", ln.Addr().String())
	return nil
}
