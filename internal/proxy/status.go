package proxy

import (
	"net/netip"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Status is what the proxy serves and has done, for ctlbd status.
type Status struct {
	Mode         string
	Listening    []netip.AddrPort
	Destinations []netip.AddrPort
	Services     []ServiceStatus
}

// ServiceStatus is one served service's counts.
type ServiceStatus struct {
	Service          netip.AddrPort
	Open             int64
	Accepted         uint64
	Rejected, Resets map[string]uint64 // by reason
	Targets          []TargetStatus
	targetIndex      map[netip.AddrPort]int
}

// TargetStatus is one target's counts for a service.
type TargetStatus struct {
	Target       netip.AddrPort
	Connections  uint64
	DialFailures uint64
}

// Status reads the counts from the proxy's own collectors, so that status
// and /metrics never disagree and no connection pays for a second count.
func (p *Proxy) Status() Status {
	st := Status{Mode: p.set.mode, Listening: p.Listening(), Destinations: p.Destinations()}
	slices.SortFunc(st.Listening, func(a, b netip.AddrPort) int { return a.Compare(b) })
	byName := map[string]*ServiceStatus{}
	for _, key := range p.Services() {
		st.Services = append(st.Services, ServiceStatus{Service: key, targetIndex: map[netip.AddrPort]int{}})
	}
	for i := range st.Services {
		byName[st.Services[i].Service.String()] = &st.Services[i]
	}
	target := func(s *ServiceStatus, name string) *TargetStatus {
		t, err := netip.ParseAddrPort(name)
		if err != nil {
			return nil
		}
		i, ok := s.targetIndex[t]
		if !ok {
			i = len(s.Targets)
			s.targetIndex[t] = i
			s.Targets = append(s.Targets, TargetStatus{Target: t})
		}
		return &s.Targets[i]
	}
	for _, smp := range samples(p.m.accepted) {
		if s := byName[smp.labels["service"]]; s != nil {
			s.Accepted = uint64(smp.value)
		}
	}
	for _, smp := range samples(p.m.open) {
		if s := byName[smp.labels["service"]]; s != nil {
			s.Open = int64(smp.value)
		}
	}
	for _, smp := range samples(p.m.proxied) {
		if s := byName[smp.labels["service"]]; s != nil {
			if t := target(s, smp.labels["target"]); t != nil {
				t.Connections = uint64(smp.value)
			}
		}
	}
	for _, smp := range samples(p.m.dialFailures) {
		if s := byName[smp.labels["service"]]; s != nil {
			if t := target(s, smp.labels["target"]); t != nil {
				t.DialFailures = uint64(smp.value)
			}
		}
	}
	for _, smp := range samples(p.m.rejected) {
		if s := byName[smp.labels["service"]]; s != nil && smp.value > 0 {
			if s.Rejected == nil {
				s.Rejected = map[string]uint64{}
			}
			s.Rejected[smp.labels["reason"]] = uint64(smp.value)
		}
	}
	for _, smp := range samples(p.m.resets) {
		if s := byName[smp.labels["service"]]; s != nil && smp.value > 0 {
			if s.Resets == nil {
				s.Resets = map[string]uint64{}
			}
			s.Resets[smp.labels["reason"]] = uint64(smp.value)
		}
	}
	for i := range st.Services {
		slices.SortFunc(st.Services[i].Targets, func(a, b TargetStatus) int { return a.Target.Compare(b.Target) })
	}
	return st
}

type sample struct {
	labels map[string]string
	value  float64
}

// samples collects a counter or gauge vector's children.
func samples(c prometheus.Collector) []sample {
	ch := make(chan prometheus.Metric, 64)
	go func() { c.Collect(ch); close(ch) }()
	var out []sample
	for m := range ch {
		var d dto.Metric
		if m.Write(&d) != nil {
			continue
		}
		smp := sample{labels: map[string]string{}}
		for _, lp := range d.GetLabel() {
			smp.labels[lp.GetName()] = lp.GetValue()
		}
		switch {
		case d.Counter != nil:
			smp.value = d.GetCounter().GetValue()
		case d.Gauge != nil:
			smp.value = d.GetGauge().GetValue()
		}
		out = append(out, smp)
	}
	return out
}
