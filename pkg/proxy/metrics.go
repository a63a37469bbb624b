package proxy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Rejection reasons (label "reason" of ctlb_proxy_rejected_total).
const (
	rejectNoTarget    = "no_target"           // the service's server set is empty
	rejectDialFailed  = "dial_failed"         // every target refused or timed out
	rejectUnknownDest = "unknown_destination" // no service for the address dialed
	rejectShutdown    = "shutdown"            // cut while dialing at the drain deadline
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
	return []prometheus.Collector{m.accepted, m.proxied, m.open, m.bytes, m.dialFailures, m.rejected}
}
