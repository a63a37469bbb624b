package proxy

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Rejection reasons (label "reason" of ctlb_proxy_rejected_total).
const (
	rejectNoTarget    = "no_target"                // the service's server set is empty
	rejectDialFailed  = "dial_failed"              // every target refused or timed out
	rejectUnknownDest = "unknown_destination"      // no service for the address dialed
	rejectShutdown    = "shutdown"                 // cut while dialing at the drain deadline
	rejectLimit       = "connection_limit"         // maxConnections reached
	rejectSvcLimit    = "service_connection_limit" // maxConnectionsPerService reached
)

// Reset reasons (label "reason" of ctlb_proxy_resets_total): why the proxy
// reset a client connection it had connected to a target.
const (
	resetError      = "error"       // a socket failed, or a peer reset its side
	resetIdle       = "idle"        // nothing moved for the idle timeout
	resetServerLeft = "server_left" // the target left the service's set (or a rebalance moved it)
	resetShutdown   = "shutdown"    // still open at the drain deadline
)

// metrics are the proxy's Prometheus collectors. The "service" label is the
// VIP:port the client dialed, "target" the server it was sent to.
type metrics struct {
	accepted     *prometheus.CounterVec
	proxied      *prometheus.CounterVec
	open         *prometheus.GaugeVec
	bytes        *prometheus.CounterVec
	dialFailures *prometheus.CounterVec
	rejected     *prometheus.CounterVec
	resets       *prometheus.CounterVec
	dialSeconds  *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_accepted_total",
			Help: "Client connections accepted by the fallback proxy.",
		}, []string{"service"}),
		proxied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_connections_total",
			Help: "Client connections the fallback proxy connected to a target.",
		}, []string{"service", "target"}),
		open: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ctlb_proxy_open_connections",
			Help: "Client connections the fallback proxy holds open now.",
		}, []string{"service"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_bytes_total",
			Help: "Bytes copied by the fallback proxy; direction is to_target or from_target.",
		}, []string{"service", "target", "direction"}),
		dialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_dial_failures_total",
			Help: "Failed connection attempts from the fallback proxy to a target.",
		}, []string{"service", "target"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_rejected_total",
			Help: "Client connections the fallback proxy closed without a target, by reason.",
		}, []string{"service", "reason"}),
		resets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ctlb_proxy_resets_total",
			Help: "Client connections the fallback proxy reset after connecting them to a target, by reason: error (a socket failed or a peer reset), idle, server_left, shutdown.",
		}, []string{"service", "reason"}),
		dialSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ctlb_proxy_dial_duration_seconds",
			Help: "Time the fallback proxy took to connect a client to a target (every attempt until one answered).",
			// 100 us to about 6.5 s: loopback dials to a connect timeout.
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 17),
		}, []string{"service"}),
	}
	if reg == nil {
		return m, nil
	}
	var done []prometheus.Collector
	for _, c := range m.collectors() {
		if err := reg.Register(c); err != nil {
			// Unregister only our own: another registration of the same
			// names belongs to someone else.
			for _, d := range done {
				reg.Unregister(d)
			}
			return nil, fmt.Errorf("register proxy metrics: %w", err)
		}
		done = append(done, c)
	}
	return m, nil
}

// unregister removes the collectors so a later proxy can register again.
func (m *metrics) unregister(reg prometheus.Registerer) {
	if reg == nil {
		return
	}
	for _, c := range m.collectors() {
		reg.Unregister(c)
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.accepted, m.proxied, m.open, m.bytes, m.dialFailures, m.rejected, m.resets, m.dialSeconds}
}

// serviceMetrics are one service's children of the collectors, looked up by
// label values once rather than on every connection (each lookup hashes the
// labels, and a target's name is formatted anew).
type serviceMetrics struct {
	accepted prometheus.Counter
	open     prometheus.Gauge
	dial     prometheus.Observer
	targets  sync.Map // netip.AddrPort -> *targetMetrics
}

// targetMetrics are the children for one service and target. Like the
// collectors' own series they live as long as the proxy.
type targetMetrics struct {
	proxied              prometheus.Counter
	toTarget, fromTarget prometheus.Counter
}

// metrics returns the service's children, creating them on first use so a
// service no client reached shows no series, as before.
func (s *service) metrics(m *metrics) *serviceMetrics {
	if sm := s.m.Load(); sm != nil {
		return sm
	}
	sm := &serviceMetrics{
		accepted: m.accepted.WithLabelValues(s.name),
		open:     m.open.WithLabelValues(s.name),
		dial:     m.dialSeconds.WithLabelValues(s.name),
	}
	if s.m.CompareAndSwap(nil, sm) {
		return sm
	}
	return s.m.Load()
}

func (sm *serviceMetrics) target(m *metrics, service string, t netip.AddrPort) *targetMetrics {
	if tm, ok := sm.targets.Load(t); ok {
		return tm.(*targetMetrics)
	}
	name := t.String()
	tm, _ := sm.targets.LoadOrStore(t, &targetMetrics{
		proxied:    m.proxied.WithLabelValues(service, name),
		toTarget:   m.bytes.WithLabelValues(service, name, "to_target"),
		fromTarget: m.bytes.WithLabelValues(service, name, "from_target"),
	})
	return tm.(*targetMetrics)
}

// DescribeMetrics sends the descriptions of every metric the proxy
// registers, without registering any (for docs/METRICS.md's check).
func DescribeMetrics(ch chan<- *prometheus.Desc) {
	m, _ := newMetrics(nil)
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
}
