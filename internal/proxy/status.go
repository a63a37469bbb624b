package proxy

import (
	"net/netip"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ctlb/ctlb/pkg/api"
)

// Status is what the proxy serves and has done, for ctlbd status. The
// counts are read from the proxy's own collectors, so that status and
// /metrics never disagree and no connection pays for a second count.
func (p *Proxy) Status() *api.ProxyStatus {
	st := &api.ProxyStatus{Mode: p.set.mode, Listening: p.Listening(), Destinations: p.Destinations(), Services: []api.ProxyService{}}
	slices.SortFunc(st.Listening, func(a, b netip.AddrPort) int { return a.Compare(b) })
	for _, key := range p.Services() {
		st.Services = append(st.Services, api.ProxyService{Service: key, Targets: []api.ProxyTarget{}})
	}
	byName := map[string]*api.ProxyService{}
	for i := range st.Services {
		byName[st.Services[i].Service.String()] = &st.Services[i]
	}
	// target is the service's entry for a target label, made on first use.
	target := func(s *api.ProxyService, name string) *api.ProxyTarget {
		t, err := netip.ParseAddrPort(name)
		if err != nil {
			return nil
		}
		if i := slices.IndexFunc(s.Targets, func(x api.ProxyTarget) bool { return x.Target == t }); i >= 0 {
			return &s.Targets[i]
		}
		s.Targets = append(s.Targets, api.ProxyTarget{Target: t})
		return &s.Targets[len(s.Targets)-1]
	}
	// byReason adds a reason's count to a map made on first use.
	byReason := func(m *map[string]uint64, smp sample) {
		if smp.value > 0 {
			if *m == nil {
				*m = map[string]uint64{}
			}
			(*m)[smp.labels["reason"]] = uint64(smp.value)
		}
	}
	for _, c := range []struct {
		vec prometheus.Collector
		add func(*api.ProxyService, sample)
	}{
		{p.m.accepted, func(s *api.ProxyService, smp sample) { s.Accepted = uint64(smp.value) }},
		{p.m.open, func(s *api.ProxyService, smp sample) { s.Open = int64(smp.value) }},
		{p.m.proxied, func(s *api.ProxyService, smp sample) {
			if t := target(s, smp.labels["target"]); t != nil {
				t.Connections = uint64(smp.value)
			}
		}},
		{p.m.dialFailures, func(s *api.ProxyService, smp sample) {
			if t := target(s, smp.labels["target"]); t != nil {
				t.DialFailures = uint64(smp.value)
			}
		}},
		{p.m.rejected, func(s *api.ProxyService, smp sample) { byReason(&s.Rejected, smp) }},
		{p.m.resets, func(s *api.ProxyService, smp sample) { byReason(&s.Resets, smp) }},
	} {
		for _, smp := range samples(c.vec) {
			if s := byName[smp.labels["service"]]; s != nil {
				c.add(s, smp)
			}
		}
	}
	for i := range st.Services {
		slices.SortFunc(st.Services[i].Targets, func(a, b api.ProxyTarget) int { return a.Target.Compare(b.Target) })
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
