package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/proxy"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// followUp is when a departure gets its second pass: a connect that read the
// old set just before the swap may create its socket after the first pass.
const followUp = 500 * time.Millisecond

// endings ends the connections of servers that leave a VIP's set (invariant
// 8): every set change that drops a server queues it; a worker runs one pass
// over every network namespace holding attached pods, and a second pass
// shortly after. It counts what it ended per server.
type endings struct {
	log  *slog.Logger
	dp   *datapath.Datapath
	term *datapath.Terminator // nil: unavailable
	// nl is the fallback where the kernel lacks bpf_sock_destroy.
	nl *datapath.NetlinkTerminator
	// how is the means in use, or why there is none.
	how string
	// inSomeSet tells whether a server is in any VIP's set (the netlink
	// fallback cannot tell VIPs apart, so it keeps such servers' sockets).
	inSomeSet func(server string) bool
	// stillGone tells whether a departed server is still out of its set: a
	// server back before its pass keeps its connections.
	stillGone func(datapath.Departed) bool
	// proxied ends the fallback proxy's connections of a departure, at
	// most limit of them when not 0, and says how many, when the proxy
	// runs (setProxy): its clients are no sockets of attached pods.
	proxied func(d datapath.Departed, limit uint64) uint64

	mu     sync.Mutex
	queue  map[datapath.Departed]*queued
	counts map[datapath.ServiceKey]map[netip.AddrPort]uint64
	last   endingsPass
	kick   chan struct{}
}

// queued is a departure waiting for its pass.
type queued struct {
	due      time.Time
	followUp bool // the first pass is done
}

// endingsPass is what the last pass did, for status and logs.
type endingsPass struct {
	At         time.Time
	Took       time.Duration
	Namespaces int
	Ended      uint64
}

func newEndings(dp *datapath.Datapath, log *slog.Logger, stillGone func(datapath.Departed) bool, inSomeSet func(string) bool) *endings {
	e := &endings{log: log, dp: dp, stillGone: stillGone, inSomeSet: inSomeSet, queue: map[datapath.Departed]*queued{},
		counts: map[datapath.ServiceKey]map[netip.AddrPort]uint64{}, kick: make(chan struct{}, 1)}
	term, err := dp.NewTerminator()
	switch {
	case err == nil:
		e.term, e.how = term, "bpf_sock_destroy"
	case errors.Is(err, datapath.ErrTerminationUnavailable) && netlinkDestroyWorks():
		e.nl, e.how = dp.NewNetlinkTerminator(), "netlink SOCK_DESTROY (matched by peer address; bpf_sock_destroy: "+err.Error()+")"
		log.Warn("no bpf_sock_destroy: connections to servers that leave a set are ended through netlink SOCK_DESTROY, matched by peer address (IPv4 TCP only)", "error", err)
	case errors.Is(err, datapath.ErrTerminationUnavailable):
		e.how = "unavailable: " + err.Error()
		log.Warn("connections to servers that leave a set cannot be ended on this kernel; they stay open until their applications close them", "error", err)
	default:
		e.how = "unavailable: " + err.Error()
		log.Error("load the socket termination programs", "error", err)
	}
	return e
}

// available reports whether passes can end sockets.
func (e *endings) available() bool { return e.kernel() || e.proxyEnds() != nil }

// kernel tells whether sockets of attached pods can be ended.
func (e *endings) kernel() bool { return e.term != nil || e.nl != nil }

func (e *endings) proxyEnds() func(datapath.Departed, uint64) uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.proxied
}

// setProxy has passes end the fallback proxy's connections too.
func (e *endings) setProxy(fn func(datapath.Departed, uint64) uint64) {
	e.mu.Lock()
	e.proxied = fn
	e.mu.Unlock()
}

// close releases the programs.
func (e *endings) close() {
	if e.term != nil {
		e.term.Close()
	}
}

// add queues departures for a pass now and a follow-up pass.
func (e *endings) add(deps ...datapath.Departed) {
	if len(deps) == 0 || !e.available() {
		return
	}
	now := time.Now()
	e.mu.Lock()
	for _, d := range deps {
		e.queue[d] = &queued{due: now}
	}
	e.mu.Unlock()
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// run does the passes until ctx ends.
func (e *endings) run(ctx context.Context) {
	// Even with no way to end sockets of pods: the proxy's part may come
	// later (setProxy, once the proxy runs), and add queues from then on.
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := e.passDue()
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		}
		select {
		case <-ctx.Done():
			return
		case <-e.kick:
		case <-timer.C:
		}
	}
}

// passDue runs a pass over the departures that are due and returns when the
// next one is (zero: none queued).
func (e *endings) passDue() time.Time {
	now := time.Now()
	var due []datapath.Departed
	var next time.Time
	e.mu.Lock()
	for d, q := range e.queue {
		if !q.due.After(now) {
			due = append(due, d)
		} else if next.IsZero() || q.due.Before(next) {
			next = q.due
		}
	}
	e.mu.Unlock()
	if len(due) == 0 {
		return next
	}
	var run []datapath.Departed
	for _, d := range due {
		if e.stillGone(d) {
			run = append(run, d)
		}
	}
	e.pass(run, "server left the set")
	e.mu.Lock()
	for _, d := range due {
		q := e.queue[d]
		if q == nil || !q.due.After(now) && (q.followUp || !slices.Contains(run, d)) {
			delete(e.queue, d)
			continue
		}
		if !q.due.After(now) { // first pass done: one more shortly
			e.queue[d] = &queued{due: time.Now().Add(followUp), followUp: true}
		}
	}
	e.mu.Unlock()
	return time.Now() // look again at once: the queue has changed
}

// pass ends the sockets of deps in every namespace holding attached pods
// and counts them. It returns how many it ended per departure.
func (e *endings) pass(deps []datapath.Departed, why string) []datapath.Terminated {
	if len(deps) == 0 || !e.available() {
		return nil
	}
	start := time.Now()
	var res []datapath.Terminated
	var listed time.Duration
	namespaces := 0
	if e.kernel() {
		nss, err := e.dp.AttachedNetNS()
		if err != nil {
			e.log.Error("end connections: list network namespaces", "error", err)
		} else {
			listed = time.Since(start)
			namespaces = nss.Len()
			if e.term != nil {
				res, err = e.term.Terminate(nss.Files(), deps)
			} else {
				res, err = e.nl.Terminate(nss.Files(), deps, e.inSomeSet)
			}
			nss.Close()
			if err != nil {
				e.log.Warn("end connections", "error", err)
			}
		}
	}
	byProxy := map[datapath.Departed]uint64{}
	if end := e.proxyEnds(); end != nil {
		for _, d := range deps {
			i := slices.IndexFunc(res, func(r datapath.Terminated) bool { return r.Departed == d })
			// A limit (rebalancing) is for both kinds of client together.
			limit := d.Limit
			if limit > 0 && i >= 0 {
				if limit -= min(limit, res[i].Destroyed); limit == 0 {
					continue
				}
			}
			n := end(d, limit)
			if n == 0 {
				continue
			}
			byProxy[d] = n
			if i < 0 {
				res = append(res, datapath.Terminated{Departed: d})
				i = len(res) - 1
			}
			res[i].Destroyed += n
		}
	}
	took := time.Since(start)
	var ended uint64
	e.mu.Lock()
	for _, r := range res {
		if r.Destroyed == 0 {
			continue
		}
		ended += r.Destroyed
		m := e.counts[r.Key()]
		if m == nil {
			m = map[netip.AddrPort]uint64{}
			e.counts[r.Key()] = m
		}
		m[r.Server] += r.Destroyed
	}
	e.last = endingsPass{At: start, Took: took, Namespaces: namespaces, Ended: ended}
	e.mu.Unlock()
	for _, r := range res {
		if r.Destroyed > 0 || r.Failed > 0 {
			e.log.Info("ended connections", "vip", r.VIP, "server", r.Server, "ended", r.Destroyed, "refused", r.Failed,
				"proxied", byProxy[r.Departed], "reason", why, "namespaces", namespaces, "took", took, "listing", listed)
		}
	}
	return res
}

// terminated is how many connections were ended per server of a VIP.
func (e *endings) terminated(key datapath.ServiceKey) map[netip.AddrPort]uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return cloneCounts(e.counts[key])
}

// all is every count, by VIP and server.
func (e *endings) all() map[datapath.ServiceKey]map[netip.AddrPort]uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[datapath.ServiceKey]map[netip.AddrPort]uint64, len(e.counts))
	for v, m := range e.counts {
		out[v] = cloneCounts(m)
	}
	return out
}

func cloneCounts(m map[netip.AddrPort]uint64) map[netip.AddrPort]uint64 {
	out := make(map[netip.AddrPort]uint64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// departures lists the servers that leave their sets when svcs are written,
// for the VIPs whose policy ends their connections. Callers hold d.mu.
func (d *Daemon) departures(svcs []datapath.Service) []datapath.Departed {
	var out []datapath.Departed
	for _, s := range svcs {
		if s.OnServerRemoved == datapath.RemovalKeep {
			continue
		}
		for _, old := range d.table.setOf(s.Key()) {
			if !slices.Contains(s.Servers, old) {
				out = append(out, datapath.Departed{VIP: s.VIP, Protocol: s.Key().Protocol, Server: old})
			}
		}
	}
	return out
}

// serverGone tells whether a departed server is still out of its VIP's set.
func (d *Daemon) serverGone(dep datapath.Departed) bool {
	return !slices.Contains(d.table.setOf(dep.Key()), dep.Server)
}

// netlinkDestroyWorks probes for SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY):
// destroying a socket that does not exist answers ENOENT where the request
// is supported, EOPNOTSUPP where it is not.
func netlinkDestroyWorks() bool {
	err := netlink.SocketDestroy(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1})
	return err == nil || errors.Is(err, unix.ENOENT)
}

// inSomeSet tells whether a server is in any VIP's set.
func (t *serviceTable) inSomeSet(server string) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, set := range t.byKey {
		for _, s := range set {
			if s.String() == server {
				return true
			}
		}
	}
	return false
}

// endProxied ends the fallback proxy's connections of a TCP departure (the
// proxy serves TCP only): invariant 8 holds for clients the connect4 path
// cannot serve too.
func endProxied(p *proxy.Proxy, d datapath.Departed, limit uint64) uint64 {
	if d.Key().Protocol != datapath.TCP {
		return 0
	}
	return p.End(d.VIP, d.Server, limit)
}
