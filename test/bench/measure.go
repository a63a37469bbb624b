package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"time"

	"github.com/ctlb/ctlb/internal/topo"
	"github.com/ctlb/ctlb/test/bench/workload"
)

// path is one way for the pod's client to reach the servers.
type path struct {
	name string
	desc string
	vip  netip.Addr // invalid for direct
	// local: the VIP is an address of the node (a proxy listens on it).
	local bool
	// pod: the client runs in the attached pod cgroup, else in a plain one.
	pod bool
	// The every-client paths (every_client.go) set these. dial, when set,
	// is what the client dials instead of the VIP or the servers; sock is
	// the lean client's kind of socket; cgroup, when set, is the client's
	// cgroup (a lean client runs in it). They measure the rates only, with
	// the lean client.
	dial   []string
	sock   socketKind
	cgroup string
	// bulkOnly: measured on the Gbit/s rows alone.
	bulkOnly bool
}

var (
	pathDirect    = path{name: "direct", desc: "straight to the servers (the client picks them in turn)"}
	pathConnect4  = path{name: "connect4", desc: "VIP rewritten by ctlb's cgroup/connect4", vip: netip.MustParseAddr("198.19.0.1"), pod: true}
	pathDNAT      = path{name: "dnat", desc: "VIP DNATed by nftables in the node (kube-proxy style, conntrack)", vip: netip.MustParseAddr("198.19.0.2")}
	pathListeners = path{name: "proxy-listeners", desc: "ctlb fallback proxy, a socket per VIP:port (splice)", vip: netip.MustParseAddr("198.19.0.3"), local: true}
	pathSteering  = path{name: "proxy-steering", desc: "ctlb fallback proxy, one socket + sk_lookup (splice)", vip: netip.MustParseAddr("198.19.0.4"), local: true}
	pathPreconn   = path{name: "proxy-preconnect", desc: "ctlb fallback proxy, listeners with preconnect 1 (a ready backend connection per server)", vip: netip.MustParseAddr("198.19.0.7"), local: true}
	pathHAProxy   = path{name: "haproxy", desc: "HAProxy, mode tcp, roundrobin", vip: netip.MustParseAddr("198.19.0.5"), local: true}
	pathSeed      = path{name: "seed-proxy", desc: "seed-style proxy: goroutine per direction, 64 KiB read/write", vip: netip.MustParseAddr("198.19.0.6"), local: true}

	// pathSockmap is no ctlb path: it measures issue 18's SOCKMAP lever,
	// forwarding an established pair's bytes in the kernel, beside the
	// proxies (test/bench/sockmaprelay). Bulk only: the lever is about
	// bytes, and the relay hands a connection's first bytes over without
	// ordering them (a request/response test sees the odd reset).
	pathSockmap = path{name: "sockmap-relay", desc: "bench-only relay: an sk_skb verdict forwards each pair's bytes in the kernel (sockhash)", vip: netip.MustParseAddr("198.19.0.8"), local: true, bulkOnly: true}

	allPaths = []path{pathDirect, pathConnect4, pathDNAT, pathListeners, pathSteering, pathPreconn, pathHAProxy, pathSeed, pathSockmap}
)

func (p path) targets(bulk bool) []string {
	vport, port := vipEchoPort, echoPort
	if bulk {
		vport, port = vipSourcePort, sourcePort
	}
	if p.dial != nil {
		return p.dial
	}
	if !p.vip.IsValid() {
		return servers(port)
	}
	return []string{netip.AddrPortFrom(p.vip, uint16(vport)).String()}
}

// metric is one kind of figure measured for every path.
type metric struct {
	name  string
	kind  string
	conns func(Config) int
}

var metrics = []metric{
	{"rate1", workload.KindRate, func(Config) int { return 1 }},
	{"rateN", workload.KindRate, func(c Config) int { return c.Clients }},
	{"latency", workload.KindLatency, func(Config) int { return 1 }},
	{"bulk1", workload.KindBulk, func(Config) int { return 1 }},
	{"bulkN", workload.KindBulk, func(c Config) int { return c.Streams }},
}

// sample is one measurement of one path.
type sample struct {
	res workload.Result
	// cpu is the CPU time of the client's, the servers' and the proxy's
	// cgroups during the measurement; sys is every CPU's busy time.
	cpu, sys time.Duration
	// proxy is the CPU time of the proxy's cgroup alone (0 without one);
	// proxyUser the user-space part of it.
	proxy, proxyUser time.Duration
	// foreign is the share of the machine's CPU capacity that processes
	// other than the benchmark's used meanwhile.
	foreign float64
}

// cpuCounters are read before and after a measurement.
type cpuCounters struct {
	path topo.CPU // the cgroups of the measured path
	all  topo.CPU // every cgroup of the benchmark
	self topo.CPU // this process and the children it reaped (in none of them)
	sys  topo.CPU // the whole machine
	warm topo.CPU // the CPU warmer (see childWarmer), not part of any path
	wall time.Time
}

func (c cpuCounters) sub(d cpuCounters) cpuCounters {
	return cpuCounters{c.path.Sub(d.path), c.all.Sub(d.all), c.self.Sub(d.self), c.sys.Sub(d.sys), c.warm.Sub(d.warm), time.Time{}}
}

// foreign is the share of the CPUs that other processes used over wall: the
// machine's user time less ours. User time only, since the kernel's share of
// our traffic partly runs in threads of no cgroup (ksoftirqd), and what
// disturbs a run here is other sessions' builds and tests, which are user
// time above all.
func (d cpuCounters) foreign(wall time.Duration) float64 {
	f := d.sys.User - d.all.User - d.self.User
	return max(f.Seconds(), 0) / (float64(numCPU()) * wall.Seconds())
}

func (e *env) counters(cgroups []string) (cpuCounters, error) {
	c := cpuCounters{wall: time.Now()}
	for _, cg := range cgroups {
		d, err := topo.CgroupCPU(cg)
		if err != nil {
			return c, err
		}
		c.path.Total += d.Total
		c.path.User += d.User
	}
	var err error
	if c.all, err = topo.CgroupCPU(e.cgRoot); err != nil {
		return c, err
	}
	if e.cgWarm != "" {
		if c.warm, err = topo.CgroupCPU(e.cgWarm); err != nil {
			return c, err
		}
	}
	// Our children in no cgroup of ours (the CNI plugin) count once
	// reaped; those in our cgroups are reaped only at the end.
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			return c, fmt.Errorf("getrusage: %w", err)
		}
		c.self.User += time.Duration(ru.Utime.Nano())
		c.self.Total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c.sys, err = topo.SystemCPU()
	return c, err
}

// measure runs one measurement of a path from its client, reading the CPU
// counters around it. The machine may be shared: a measurement during which
// other processes used more than cfg.MaxForeign of the CPUs is made again,
// up to cfg.Retries times (and cfg.RetryBudget times in the whole run, so
// that a busy machine cannot stretch the run without end), and the quietest
// try is kept.
func (e *env) measure(ctx context.Context, p path, m metric, cfg Config) (sample, int, error) {
	var best sample
	for try := 0; ; try++ {
		s, err := e.measureOnce(ctx, p, m, cfg)
		if err != nil {
			return s, try, err
		}
		if try == 0 || s.foreign < best.foreign {
			best = s
		}
		if s.foreign <= cfg.MaxForeign || try >= cfg.Retries || e.retries >= cfg.RetryBudget {
			return best, try, nil
		}
		e.retries++
		logf("%s %s: other processes used %.0f%% of the CPUs, measuring again", p.name, m.name, s.foreign*100)
	}
}

func (e *env) measureOnce(ctx context.Context, p path, m metric, cfg Config) (sample, error) {
	if err := ctx.Err(); err != nil {
		return sample{}, err
	}
	cg := e.cgPlain
	if p.pod {
		cg = e.cgPod
	}
	if p.cgroup != "" {
		cg = p.cgroup
	}
	client := e.clients[cg]
	cgs := []string{cg, e.cgSrv}
	if pc := e.proxyCgroups[p.name]; pc != "" {
		cgs = append(cgs, pc)
	}
	q := workload.Request{Kind: m.kind, Targets: p.targets(m.kind == workload.KindBulk), Conns: m.conns(cfg), Duration: cfg.Duration}
	raw, _ := json.Marshal(q)
	lean := e.leanClients[cg]
	if m.kind != workload.KindRate {
		lean = nil
	}
	pc := e.proxyCgroups[p.name]
	proxyCPU := func() (topo.CPU, error) {
		if pc == "" {
			return topo.CPU{}, nil
		}
		return topo.CgroupCPU(pc)
	}
	p0, err := proxyCPU()
	if err != nil {
		return sample{}, err
	}
	c0, err := e.counters(cgs)
	if err != nil {
		return sample{}, err
	}
	var s sample
	if lean == nil && (p.sock != tcpSocket || client == nil) {
		return sample{}, fmt.Errorf("%s %s: needs the lean client", p.name, m.name)
	}
	if lean != nil {
		if s.res, err = leanRate(lean, q, p.sock); err != nil {
			return sample{}, err
		}
	} else {
		if err := client.Send(raw); err != nil {
			return sample{}, err
		}
		line, err := client.Recv(cfg.Duration + 15*time.Second)
		if err != nil {
			return sample{}, err
		}
		if err := json.Unmarshal(line, &s.res); err != nil {
			return sample{}, fmt.Errorf("client result %q: %w", line, err)
		}
	}
	c1, err := e.counters(cgs)
	if err != nil {
		return sample{}, err
	}
	p1, err := proxyCPU()
	if err != nil {
		return sample{}, err
	}
	s.proxy, s.proxyUser = p1.Total-p0.Total, p1.User-p0.User
	d := c1.sub(c0)
	s.cpu, s.sys = d.path.Total, d.sys.Total-d.warm.Total
	s.foreign = d.foreign(c1.wall.Sub(c0.wall))
	return s, nil
}

// Stat is one figure over the rounds: its median and every round's value.
type Stat struct {
	Median float64   `json:"median"`
	Rounds []float64 `json:"rounds"`
}

func (s *Stat) add(v float64) {
	s.Rounds = append(s.Rounds, v)
	sorted := slices.Clone(s.Rounds)
	slices.Sort(sorted)
	n := len(sorted)
	if n%2 == 1 {
		s.Median = sorted[n/2]
	} else {
		s.Median = (sorted[n/2-1] + sorted[n/2]) / 2
	}
}

// pairedRatio is the median over rounds of a's value over b's in the same
// round. Paths are measured back to back within a round, so a ratio per
// round cancels the slow drift of a shared machine that a ratio of medians
// taken over the whole run would keep. 0 when there is nothing to compare.
func pairedRatio(a, b Stat) float64 {
	var r Stat
	for i := range min(len(a.Rounds), len(b.Rounds)) {
		if b.Rounds[i] > 0 {
			r.add(a.Rounds[i] / b.Rounds[i])
		}
	}
	return r.Median
}

// pairedDiff is the median over rounds of a's value less b's.
func pairedDiff(a, b Stat) (float64, bool) {
	var r Stat
	for i := range min(len(a.Rounds), len(b.Rounds)) {
		r.add(a.Rounds[i] - b.Rounds[i])
	}
	return r.Median, len(r.Rounds) > 0
}

// PathResult is every figure of one path.
type PathResult struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	// Connections per second with one client and with Clients at once.
	Rate1 Stat `json:"connsPerSec1"`
	RateN Stat `json:"connsPerSecN"`
	// Round trip of a 64-byte request on a kept connection, microseconds.
	P50 Stat `json:"latencyP50us"`
	P99 Stat `json:"latencyP99us"`
	// Bulk throughput, Gbit/s, one stream and Streams at once.
	Bulk1 Stat `json:"gbps1"`
	BulkN Stat `json:"gbpsN"`
	// CPU time per connection, microseconds, in the one-client rate test:
	// of the client's, servers' and proxy's cgroups, and of the whole
	// machine (which adds softirq work, where NAT and conntrack run).
	CPUPerConn    Stat `json:"cpuUsPerConn"`
	SysCPUPerConn Stat `json:"sysCpuUsPerConn"`
	// The same in the many-clients rate test.
	CPUPerConnN    Stat `json:"cpuUsPerConnN"`
	SysCPUPerConnN Stat `json:"sysCpuUsPerConnN"`
	// The proxy's own cgroup's CPU time per connection, microseconds, in
	// the one-client and many-clients rate tests (proxy paths only): the
	// figure on which proxies compare least blurred by the rest.
	ProxyCPUPerConn  Stat `json:"proxyCpuUsPerConn"`
	ProxyCPUPerConnN Stat `json:"proxyCpuUsPerConnN"`
	// Of which in user space: the rest is the kernel's work on the
	// proxy's system calls and the traffic they handle.
	ProxyUserPerConn  Stat `json:"proxyUserUsPerConn"`
	ProxyUserPerConnN Stat `json:"proxyUserUsPerConnN"`
	// Retries counts measurements made again because other processes
	// used the CPUs; Foreign is the largest share they took in a kept one.
	Retries     int     `json:"retries"`
	Foreign     float64 `json:"maxForeignCpuShare"`
	Errors      int64   `json:"errors"`
	FirstError  string  `json:"firstError,omitempty"`
	Unavailable string  `json:"unavailable,omitempty"`
}

func (r *PathResult) record(m metric, s sample, retries int) {
	r.Retries += retries
	r.Foreign = max(r.Foreign, s.foreign)
	if s.res.Errors > 0 {
		r.Errors += s.res.Errors
		if r.FirstError == "" {
			r.FirstError = s.res.Err
		}
	}
	perConn := func(d time.Duration) float64 {
		if s.res.Ops == 0 {
			return 0
		}
		return float64(d.Microseconds()) / float64(s.res.Ops)
	}
	switch m.name {
	case "rate1":
		r.Rate1.add(s.res.PerSecond())
		r.CPUPerConn.add(perConn(s.cpu))
		r.SysCPUPerConn.add(perConn(s.sys))
		if s.proxy > 0 {
			r.ProxyCPUPerConn.add(perConn(s.proxy))
			r.ProxyUserPerConn.add(perConn(s.proxyUser))
		}
	case "rateN":
		r.RateN.add(s.res.PerSecond())
		r.CPUPerConnN.add(perConn(s.cpu))
		r.SysCPUPerConnN.add(perConn(s.sys))
		if s.proxy > 0 {
			r.ProxyCPUPerConnN.add(perConn(s.proxy))
			r.ProxyUserPerConnN.add(perConn(s.proxyUser))
		}
	case "latency":
		r.P50.add(float64(s.res.P50.Nanoseconds()) / 1e3)
		r.P99.add(float64(s.res.P99.Nanoseconds()) / 1e3)
	case "bulk1":
		r.Bulk1.add(s.res.Gbps())
	case "bulkN":
		r.BulkN.add(s.res.Gbps())
	}
}

// runPaths measures every metric of every path, round after round. Within a
// round each metric is measured for all paths back to back, in an order
// that rotates from round to round, so that drift (thermal, other load, a
// growing TIME_WAIT table) spreads over all paths instead of favouring one.
func (e *env) runPaths(ctx context.Context, cfg Config, paths []path) ([]*PathResult, error) {
	results := make([]*PathResult, len(paths))
	for i, p := range paths {
		results[i] = &PathResult{Name: p.name, Description: p.desc}
	}
	if err := e.runRounds(ctx, cfg, "", paths, metrics, results); err != nil {
		return nil, err
	}
	return results, nil
}

// runRounds measures the metrics ms of paths into results (results[i] is
// paths[i]'s), round after round, each metric for all paths back to back in
// an order that rotates from round to round. label prefixes the progress
// lines.
func (e *env) runRounds(ctx context.Context, cfg Config, label string, paths []path, ms []metric, results []*PathResult) error {
	for round := range cfg.Rounds {
		logf("%sround %d/%d", label, round+1, cfg.Rounds)
		for _, m := range ms {
			if !cfg.measures(m.name) {
				continue
			}
			for k := range paths {
				i := (k + round) % len(paths)
				if paths[i].bulkOnly && m.kind != workload.KindBulk {
					continue
				}
				s, retries, err := e.measure(ctx, paths[i], m, cfg)
				if err != nil {
					return fmt.Errorf("%s %s: %w", paths[i].name, m.name, err)
				}
				results[i].record(m, s, retries)
			}
		}
	}
	return nil
}
