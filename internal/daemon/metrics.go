package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/internal/version"
	"github.com/ctlb/ctlb/pkg/datapath"
)

var (
	descConnects = prometheus.NewDesc("ctlb_server_connects_total",
		"Connects (attempts) the kernel sent to a server of a VIP (connect and first-datagram rewrites).", []string{"vip", "protocol", "server"}, nil)
	descEstablished = prometheus.NewDesc("ctlb_server_established_total",
		"TCP connects to a server of a VIP whose handshake completed.", []string{"vip", "protocol", "server"}, nil)
	descFailed = prometheus.NewDesc("ctlb_server_failed_total",
		"TCP connects to a server of a VIP that the server refused or that timed out.", []string{"vip", "protocol", "server"}, nil)
	descTerminated = prometheus.NewDesc("ctlb_server_terminated_total",
		"Sockets to a server of a VIP that ctlb ended.", []string{"vip", "protocol", "server"}, nil)
	descFailing = prometheus.NewDesc("ctlb_server_failing",
		"1 while connects skip a server after failed connects (hold-down).", []string{"vip", "protocol", "server"}, nil)
	descOpen = prometheus.NewDesc("ctlb_server_open_connections",
		"Sockets open now that were sent to a server of a VIP.", []string{"vip", "protocol", "server"}, nil)
	descServers = prometheus.NewDesc("ctlb_service_servers",
		"Servers in a VIP's set in the maps.", []string{"vip", "protocol"}, nil)
	descAttachments = prometheus.NewDesc("ctlb_attachments",
		"Cgroup attachments by state: attached (every link pinned), incomplete (a link pin is missing; reconcile repairs it), "+
			"dead (the cgroup is gone; reconcile removes it), pending (the pod cgroup did not exist yet at CNI ADD).", []string{"state"}, nil)
	descHealthy = prometheus.NewDesc("ctlb_server_healthy",
		"Health of a candidate server of a tracked VIP: 1 healthy, 0 unhealthy, -1 not checked yet.", []string{"vip", "server"}, nil)
	descInSet = prometheus.NewDesc("ctlb_server_in_set",
		"1 when a candidate server of a tracked VIP is in the set written to the map.", []string{"vip", "server"}, nil)
	descSourceErrors = prometheus.NewDesc("ctlb_source_errors_total",
		"Failed answers of a server source (DNS, Consul, exec); the last good answer is kept.", []string{"vip", "source"}, nil)
	descSourceUp = prometheus.NewDesc("ctlb_source_up",
		"1 while a server source's last answer was good, 0 while it fails (from its first failure to its next good answer) or before it answered: unlike ctlb_source_errors_total it holds for the whole outage.", []string{"vip", "source"}, nil)
	descSourceLastSuccess = prometheus.NewDesc("ctlb_source_last_success_timestamp_seconds",
		"Unix time of a server source's last good answer; absent until it has answered.", []string{"vip", "source"}, nil)
	descSetChanges = prometheus.NewDesc("ctlb_service_set_changes_total",
		"Changes of a tracked VIP's healthy set written to the map.", []string{"vip"}, nil)
	descEnded = prometheus.NewDesc("ctlb_server_terminated_connections_total",
		"Connections ctlbd ended because their server left the VIP's set (or to rebalance onto a newcomer), counted by ctlbd since it started: unlike ctlb_server_terminated_total it stays after the departed server's slot is given back.", []string{"vip", "protocol", "server"}, nil)
	descTermination = prometheus.NewDesc("ctlb_termination_available",
		"1 when ctlbd can end connections to servers that leave a set (bpf_sock_destroy, or netlink SOCK_DESTROY as fallback), 0 when this kernel cannot.", nil, nil)
	descPanic = prometheus.NewDesc("ctlb_service_panic",
		"1 while a tracked VIP is in panic mode (no healthy server; every candidate kept).", []string{"vip"}, nil)
	descRejected = prometheus.NewDesc("ctlb_source_rejected_entries",
		"Entries of a source's last answer left out (not an address, wrong family, not unicast, listed twice, another host's loopback).", []string{"vip", "source"}, nil)
	descTrimmed = prometheus.NewDesc("ctlb_service_candidates_trimmed",
		"Candidates of a tracked VIP left out over the most servers a VIP may have.", []string{"vip"}, nil)
	descSocketTable = prometheus.NewDesc("ctlb_socket_table_entries",
		"Entries of the kernel's socket table by state: used (held by an open VIP socket) and free. A socket whose entry is taken keeps its state in socket storage instead.", []string{"state"}, nil)
	descConsulRequests = prometheus.NewDesc("ctlb_consul_requests_total",
		"HTTP requests this daemon sent to Consul's API (all its watches; one watch per distinct query).", nil, nil)
)

// collector reads the kernel's counters at scrape time, so the numbers are
// the maps' own and cost nothing between scrapes.
type collector struct{ d *Daemon }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnects, descEstablished, descFailed, descTerminated, descFailing, descOpen, descServers, descAttachments,
		descHealthy, descInSet, descSourceErrors, descSourceUp, descSourceLastSuccess, descSetChanges, descPanic, descEnded, descTermination, descRejected, descTrimmed, descConsulRequests, descSocketTable} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	if stats, err := d.dp.Stats(); err == nil {
		for _, s := range stats {
			l := []string{s.VIP.String(), string(s.Protocol), s.Server.String()}
			failing := 0.0
			if s.FailingFor > 0 {
				failing = 1
			}
			ch <- prometheus.MustNewConstMetric(descConnects, prometheus.CounterValue, float64(s.Attempts), l...)
			ch <- prometheus.MustNewConstMetric(descEstablished, prometheus.CounterValue, float64(s.Established), l...)
			ch <- prometheus.MustNewConstMetric(descFailed, prometheus.CounterValue, float64(s.Failed), l...)
			ch <- prometheus.MustNewConstMetric(descTerminated, prometheus.CounterValue, float64(s.Terminated), l...)
			ch <- prometheus.MustNewConstMetric(descFailing, prometheus.GaugeValue, failing, l...)
			ch <- prometheus.MustNewConstMetric(descOpen, prometheus.GaugeValue, float64(s.Open), l...)
		}
	} else {
		ch <- prometheus.NewInvalidMetric(descConnects, err)
	}
	if svcs, err := d.dp.Services(); err == nil {
		for _, s := range svcs {
			ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, float64(len(s.Servers)), s.VIP.String(), string(s.Protocol))
		}
	}
	if atts, err := d.dp.Attachments(); err == nil {
		states := map[string]int{"attached": 0, "incomplete": 0, "dead": 0}
		for _, a := range atts {
			switch {
			case !a.Alive:
				states["dead"]++
			case len(a.Missing) > 0:
				states["incomplete"]++
			default:
				states["attached"]++
			}
		}
		for state, n := range states {
			ch <- prometheus.MustNewConstMetric(descAttachments, prometheus.GaugeValue, float64(n), state)
		}
	} else {
		ch <- prometheus.NewInvalidMetric(descAttachments, err)
	}
	ch <- prometheus.MustNewConstMetric(descAttachments, prometheus.GaugeValue, float64(d.pendingCount()), "pending")
	ch <- prometheus.MustNewConstMetric(descTermination, prometheus.GaugeValue, boolFloat(d.ends.available()))
	for key, m := range d.ends.all() {
		for srv, n := range m {
			ch <- prometheus.MustNewConstMetric(descEnded, prometheus.CounterValue, float64(n), key.VIP.String(), string(key.Protocol), srv.String())
		}
	}
	ch <- prometheus.MustNewConstMetric(descConsulRequests, prometheus.CounterValue, float64(discovery.ConsulRequests()))
	if tab, ok, err := d.dp.SocketTable(); err != nil {
		ch <- prometheus.NewInvalidMetric(descSocketTable, err)
	} else if ok {
		ch <- prometheus.MustNewConstMetric(descSocketTable, prometheus.GaugeValue, float64(tab.Used), "used")
		ch <- prometheus.MustNewConstMetric(descSocketTable, prometheus.GaugeValue, float64(tab.Size-tab.Used), "free")
	}
	for vip, snap := range d.snapshots() {
		v := vip.String()
		listed := map[netip.AddrPort]bool{}
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
			listed[srv.Addr] = true
		}
		// Servers the maps kept from before (a restart, a reload) that no
		// source has listed yet: in the set, unchecked, as status shows
		// them (source kept), so that a sum over ctlb_server_in_set counts
		// the servers clients are sent to.
		for _, srv := range d.table.setOf(vip) {
			if !listed[srv] {
				ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, -1, v, srv.String())
				ch <- prometheus.MustNewConstMetric(descInSet, prometheus.GaugeValue, 1, v, srv.String())
			}
		}
		for _, src := range snap.Sources {
			ch <- prometheus.MustNewConstMetric(descSourceErrors, prometheus.CounterValue, float64(src.Errors), v, src.Name)
			ch <- prometheus.MustNewConstMetric(descRejected, prometheus.GaugeValue, float64(src.Rejected), v, src.Name)
			up := !src.LastSuccess.IsZero() && src.FailingSince.IsZero()
			ch <- prometheus.MustNewConstMetric(descSourceUp, prometheus.GaugeValue, boolFloat(up), v, src.Name)
			if !src.LastSuccess.IsZero() {
				ch <- prometheus.MustNewConstMetric(descSourceLastSuccess, prometheus.GaugeValue, float64(src.LastSuccess.UnixNano())/1e9, v, src.Name)
			}
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

// daemonMetrics are the metrics ctlbd measures itself (the collector reads
// the rest from the maps at scrape time).
type daemonMetrics struct {
	buildInfo      prometheus.Gauge
	pendingSeconds prometheus.Histogram
	checkSeconds   *prometheus.HistogramVec
	repairs        *prometheus.CounterVec
}

func newDaemonMetrics() *daemonMetrics {
	return &daemonMetrics{
		buildInfo: prometheus.NewGauge(prometheus.GaugeOpts{
			Name:        "ctlb_build_info",
			Help:        "Always 1; the labels say which ctlbd runs: version, commit, Go version, map layout.",
			ConstLabels: prometheus.Labels{"version": version.Version, "commit": version.Commit(), "goversion": runtime.Version(), "layout": strconv.Itoa(datapath.Layout)},
		}),
		pendingSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "ctlb_pending_attach_duration_seconds",
			Help: "How long a pending attachment waited, from the CNI ADD that recorded it to its attachment.",
			// 10 ms to about 5.5 min: a cgroup that appears at once to one
			// that waits for a slow image pull.
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 16),
		}),
		checkSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ctlb_health_check_duration_seconds",
			Help: "Duration of one active health check of a candidate server, by VIP, check kind (tcp, grpc, consul) and result (pass, fail).",
			// 100 us to about 6.5 s: a loopback check to a check timeout.
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 17),
		}, []string{"vip", "kind", "result"}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_reconcile_repairs_total",
			Help: "Repairs made by the reconcile loop, by kind: repinned (a pin removed by hand), dead (attachment of a dead cgroup removed), repaired (lost link pins re-attached), stale (a half-made link directory removed).",
		}, []string{"kind"}),
	}
}

func (m *daemonMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.buildInfo, m.pendingSeconds, m.checkSeconds, m.repairs}
}

// newRegistry holds every ctlbd metric: the kernel's counters, the proxy's,
// ctlbd's own, and the process's.
func (d *Daemon) newRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collector{d}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r.MustRegister(d.m.collectors()...)
	d.m.buildInfo.Set(1)
	for _, k := range []string{"repinned", "dead", "repaired", "stale"} {
		d.m.repairs.WithLabelValues(k) // every kind shows, at 0
	}
	return r
}

// serveMetrics serves /metrics, /healthz and /readyz on addr until ctx ends.
func (d *Daemon) serveMetrics(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.registry, promhttp.HandlerOpts{
		// One failed map read must not blank the whole page (build info,
		// sources, the Go runtime): the rest is served, the error logged.
		ErrorHandling: promhttp.ContinueOnError, ErrorLog: slogPromLogger{d.log}}))
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
	if host, _, _ := net.SplitHostPort(addr); host == "" || net.ParseIP(host).IsUnspecified() {
		d.log.Warn("metrics, /healthz and /readyz listen on every interface; give the node's address or 127.0.0.1", "metrics", addr)
	}
	return nil
}

// slogPromLogger hands promhttp's errors to the daemon's log.
type slogPromLogger struct{ log *slog.Logger }

func (l slogPromLogger) Println(v ...any) {
	l.log.Warn("metrics: part of a scrape failed", "error", fmt.Sprint(v...))
}
