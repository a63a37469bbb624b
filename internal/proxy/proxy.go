// Package proxy is ctlbd's fallback round-robin TCP proxy, for the clients
// the connect4 path cannot serve (no cgroup v2, a VM or sandboxed runtime,
// processes outside any attached cgroup). It accepts connections to VIP:port,
// sends each to the next healthy server of that VIP:port's set (the set the
// connect4 path uses) and moves bytes both ways from event loops, one per CPU
// (loop.go), splicing bulk transfers in the kernel.
//
// Two listening modes: a socket per address and port, or steering, where one
// socket serves every VIP:port through an sk_lookup program (internal/steering)
// and the destination the client dialed is read back from the accepted
// socket's local address.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/steering"
	"github.com/ctlb/ctlb/internal/vip"
)

// DefaultFailBackoff is how long a target whose dial failed is tried last.
const DefaultFailBackoff = 5 * time.Second

// Options are the proxy's settings that do not come from the config file.
type Options struct {
	// Logger gets one line per event that matters (a client closed for
	// want of a target, a failed dial); per-connection lines are Debug.
	// Default slog.Default().
	Logger *slog.Logger
	// Registerer, when set, gets the proxy's collectors
	// (ctlb_proxy_*); Shutdown unregisters them.
	Registerer prometheus.Registerer
	// NetNS is the path of the network namespace to serve in: listening
	// sockets, dials, the steering program and the local VIPs all live
	// there. Empty means the caller's.
	NetNS string
	// FailBackoff is how long a target that failed a dial is tried after
	// the others; default DefaultFailBackoff.
	FailBackoff time.Duration
}

// Proxy serves the VIPs of one configuration until Shutdown.
type Proxy struct {
	set     *settings
	targets Targets
	log     *slog.Logger
	reg     prometheus.Registerer
	m       *metrics
	backoff *backoff
	netns   ns.NetNS // nil: the caller's namespace

	// dests maps each listen address:port to its service. Read on every
	// accept without a lock; replaced whole by SetServices.
	dests atomic.Pointer[map[netip.AddrPort]*service]

	// closing is set once Shutdown starts: loops reset what they accept
	// from then on.
	closing atomic.Bool
	// held counts open pairs, for Shutdown's drain.
	held sync.WaitGroup
	// active counts the client connections held, for maxConnections.
	active atomic.Int64
	// rejects logs rejected connections, at most once per interval and kind.
	rejects *rateLog

	loops []*loop
	procs int // Ps added for the loops (procs.go)
	// bulkRcvBuf is the receive buffer of a bulk direction's source
	// (bulkbuf.go); 0 leaves it to the kernel's autotuning.
	bulkRcvBuf int

	mu        sync.Mutex // guards what follows and serialises changes
	closed    bool
	listeners map[netip.AddrPort][]loopFD // listeners mode: one socket per loop
	socket    []loopFD                    // steering mode: one reuseport group
	socketAt  netip.AddrPort
	steer     *steering.Steering
	device    *vip.Device
}

// loopFD is a listening socket and the loop that serves it.
type loopFD struct {
	l  *loop
	fd int
}

// New validates cfg and starts serving it: it makes the VIPs local when
// asked, opens the listening socket(s) and, in steering mode, attaches the
// sk_lookup program. targets gives each service's healthy servers.
func New(cfg Config, targets Targets, opts Options) (*Proxy, error) {
	set, err := cfg.settings()
	if err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	if targets == nil {
		return nil, errors.New("proxy: no targets function")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.FailBackoff <= 0 {
		opts.FailBackoff = DefaultFailBackoff
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		set:       set,
		targets:   targets,
		log:       opts.Logger.With("component", "proxy", "mode", set.mode),
		reg:       opts.Registerer,
		m:         m,
		backoff:   newBackoff(opts.FailBackoff),
		listeners: make(map[netip.AddrPort][]loopFD),

		bulkRcvBuf: bulkRcvBufFor("/proc/sys/net/core/rmem_max"),
	}
	p.rejects = newRateLog(p.log, set.rejectLogEvery)
	empty := map[netip.AddrPort]*service{}
	p.dests.Store(&empty)
	if err := p.start(opts.NetNS); err != nil {
		p.teardown()
		return nil, err
	}
	return p, nil
}

func (p *Proxy) start(netnsPath string) error {
	if netnsPath != "" {
		n, err := ns.GetNS(netnsPath)
		if err != nil {
			return fmt.Errorf("proxy netns %s: %w", netnsPath, err)
		}
		p.netns = n
	}
	if p.set.localVIP {
		d, err := vip.Open(p.set.device, netnsPath)
		if err != nil {
			return fmt.Errorf("proxy local VIPs: %w", err)
		}
		p.device = d
	}
	n := p.set.loops
	if n == 0 {
		n = max(1, min(baseProcs(), MaxLoops))
	}
	reserveProcs(n)
	p.procs = n
	for range n {
		l, err := newLoop(p)
		if err != nil {
			return fmt.Errorf("proxy: %w", err)
		}
		p.loops = append(p.loops, l)
		go l.run(p.netns)
	}
	if p.set.mode == ModeSteering {
		s, err := steering.Attach(netnsPath)
		if err != nil {
			return fmt.Errorf("proxy steering: %w", err)
		}
		p.steer = s
		// Any address does: the program hands connections to the
		// socket whatever it is bound to. Loopback keeps it off the
		// network for everything else. One socket per loop, in one
		// reuseport group: the program picks the group's first, the
		// kernel spreads over the group.
		fds, at, err := p.listenGroup(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 0))
		if err != nil {
			return err
		}
		p.socket, p.socketAt = fds, at
		if err := s.SetSocket(rawFD(fds[0].fd)); err != nil {
			return fmt.Errorf("proxy steering: %w", err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.apply(p.set.dests, p.set.localAddrs)
}

// SetServices replaces the served VIPs and ports. In steering mode this is
// map updates only, no new socket; in listeners mode sockets open and close.
// Connections already open are not touched. On error nothing changes.
func (p *Proxy) SetServices(services []Service) error {
	dests, local, err := destinations(services)
	if err != nil {
		return fmt.Errorf("proxy services: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errors.New("proxy services: proxy is shut down")
	}
	return p.apply(dests, local)
}

// apply makes dests the served set. Called with p.mu held.
func (p *Proxy) apply(dests map[netip.AddrPort]netip.AddrPort, local []netip.Addr) error {
	old := *p.dests.Load()
	bySvc := make(map[netip.AddrPort]*service)
	for _, s := range old {
		bySvc[s.key] = s
	}
	next := make(map[netip.AddrPort]*service, len(dests))
	for d, key := range dests {
		s, ok := bySvc[key]
		if !ok {
			s = &service{key: key, name: key.String()}
			bySvc[key] = s
		}
		next[d] = s
	}
	var added, removed []netip.AddrPort
	for d := range next {
		if _, ok := old[d]; !ok {
			added = append(added, d)
		}
	}
	for d := range old {
		if _, ok := next[d]; !ok {
			removed = append(removed, d)
		}
	}

	if p.device != nil {
		if err := p.device.Sync(local); err != nil {
			return fmt.Errorf("proxy local VIPs on %s: %w", p.device.Name(), err)
		}
	}
	// Publish first so a connection steered to a new destination finds
	// its service the moment the kernel sends it.
	p.dests.Store(&next)
	if err := p.open(added); err != nil {
		p.dests.Store(&old)
		return err
	}
	for _, d := range removed {
		if err := p.closeDest(d); err != nil {
			p.log.Warn("stop serving", "dest", d, "error", err)
		}
	}
	if len(added)+len(removed) > 0 {
		p.log.Info("services changed", "added", len(added), "removed", len(removed), "serving", len(next))
	}
	return nil
}

// MaxLoops bounds the event loops, configured or one per CPU.
const MaxLoops = 64

// open starts serving dests; on error it undoes what it did.
func (p *Proxy) open(dests []netip.AddrPort) error {
	for i, d := range dests {
		var err error
		if p.steer != nil {
			err = p.steer.Add(d)
		} else {
			var fds []loopFD
			if fds, _, err = p.listenGroup(d); err == nil {
				p.listeners[d] = fds
			}
		}
		if err != nil {
			for _, u := range dests[:i] {
				_ = p.closeDest(u)
			}
			return fmt.Errorf("proxy serve %s: %w", d, err)
		}
	}
	return nil
}

func (p *Proxy) closeDest(d netip.AddrPort) error {
	if p.steer != nil {
		return p.steer.Remove(d)
	}
	fds, ok := p.listeners[d]
	if !ok {
		return nil
	}
	delete(p.listeners, d)
	closeGroup(fds)
	return nil
}

// closeGroup closes listening sockets on their loops.
func closeGroup(fds []loopFD) {
	for _, f := range fds {
		if !f.l.do(func() { f.l.forget(f.fd) }) {
			unix.Close(f.fd) // the loop has ended
		}
	}
}

// listenGroup opens one listening socket per loop on addr, in one
// SO_REUSEPORT group, and hands each to its loop. Port 0 picks a port for
// the group. IP_FREEBIND lets it bind a VIP that is not (yet) local:
// whoever makes it local later need not come before the proxy. Plain TCP:
// a SOCKMAP refuses MPTCP sockets.
func (p *Proxy) listenGroup(addr netip.AddrPort) ([]loopFD, netip.AddrPort, error) {
	var fds []loopFD
	fail := func(err error) ([]loopFD, netip.AddrPort, error) {
		closeGroup(fds)
		return nil, netip.AddrPort{}, fmt.Errorf("listen on %s: %w", addr, err)
	}
	if addr.Port() != 0 {
		if err := p.inNetNS(func() error { return probeFree(addr) }); err != nil {
			return fail(err)
		}
	}
	for _, l := range p.loops {
		var fd int
		err := p.inNetNS(func() error {
			var err error
			fd, err = listenFD(addr)
			return err
		})
		if err != nil {
			return fail(err)
		}
		if !addr.IsValid() || addr.Port() == 0 {
			sa, err := unix.Getsockname(fd)
			if err != nil {
				unix.Close(fd)
				return fail(err)
			}
			addr = netip.AddrPortFrom(addr.Addr(), uint16(sa.(*unix.SockaddrInet4).Port))
		}
		var aerr error
		dst := addr
		if p.set.mode == ModeSteering {
			dst = netip.AddrPort{} // read from each accepted socket
		}
		if !l.do(func() { aerr = l.add(fd, &lsock{dst: dst}, unix.EPOLLIN) }) {
			aerr = errors.New("proxy loop stopped")
		}
		if aerr != nil {
			unix.Close(fd)
			return fail(aerr)
		}
		fds = append(fds, loopFD{l, fd})
	}
	return fds, addr, nil
}

// probeFree binds addr once without SO_REUSEPORT: a group of reuseport
// sockets would join any other process's reuseport listener on the same
// address without a word (nginx, Envoy, HAProxy, another ctlbd), and the
// kernel would share the clients between the two.
func probeFree(addr netip.AddrPort) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// SO_REUSEADDR as the group has: connections left in TIME_WAIT by an
	// earlier listener (a restarted ctlbd) do not count, a listener does.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1); err != nil {
		return err
	}
	err = unix.Bind(fd, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()})
	if errors.Is(err, unix.EADDRINUSE) {
		return fmt.Errorf("%w (another socket is bound there, perhaps another process's SO_REUSEPORT listener, which the proxy's would share clients with)", err)
	}
	return err
}

func listenFD(addr netip.AddrPort) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	for _, o := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, o, 1); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1); err != nil {
		unix.Close(fd)
		return -1, err
	}
	// Accepted sockets inherit TCP_NODELAY from the listener, so clients
	// get it without a system call each.
	if err := noDelay(fd); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Listen(fd, 4096); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// noDelay turns Nagle's algorithm off, on both sides of the relay, as
// HAProxy and Envoy do. The proxy writes what it reads when it reads it; with
// Nagle a second small write (a gRPC frame after another) would wait for
// the peer's ACK of the first, up to its delayed-ACK timer.
func noDelay(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("TCP_NODELAY: %w", err)
	}
	return nil
}

// rawFD gives a descriptor to APIs that take a syscall.Conn.
type rawFD int

func (f rawFD) SyscallConn() (syscall.RawConn, error) { return f, nil }
func (f rawFD) Control(fn func(fd uintptr)) error     { fn(uintptr(f)); return nil }
func (f rawFD) Read(func(fd uintptr) bool) error      { return errors.ErrUnsupported }
func (f rawFD) Write(func(fd uintptr) bool) error     { return errors.ErrUnsupported }

func (p *Proxy) inNetNS(fn func() error) error {
	if p.netns == nil {
		return fn()
	}
	return p.netns.Do(func(ns.NetNS) error { return fn() })
}

// Listening returns the local addresses of the proxy's listening sockets:
// one per destination in listeners mode, the single steering address in
// steering mode (each is a reuseport group of one socket per loop).
func (p *Proxy) Listening() []netip.AddrPort {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []netip.AddrPort
	if len(p.socket) > 0 {
		out = append(out, p.socketAt)
	}
	for d := range p.listeners {
		out = append(out, d)
	}
	return out
}

// End resets the client connections of service (the VIP:port dialed)
// that were sent to server, at most limit of them when limit is not 0: the
// server left the service's set (onServerRemoved "terminate"), or a
// rebalance moves one onto a newcomer. A client still dialing that server
// goes on to the next target of its plan instead. It returns how many it
// reset; ctlbd counts them with the connect4 path's.
func (p *Proxy) End(service, server netip.AddrPort, limit uint64) uint64 {
	var n uint64
	for _, l := range p.loops {
		if limit > 0 && n >= limit {
			break
		}
		l.do(func() {
			var most uint64
			if limit > 0 {
				most = limit - n
			}
			n += l.endTo(service, server, most)
		})
	}
	return n
}

// Destinations are the VIP:ports the proxy serves now, sorted: in steering
// mode Listening shows one socket for all of them.
func (p *Proxy) Destinations() []netip.AddrPort {
	out := slices.Collect(maps.Keys(*p.dests.Load()))
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// Services are the services (VIP:port, whose server set clients are sent
// to) the proxy serves now, sorted.
func (p *Proxy) Services() []netip.AddrPort {
	seen := map[netip.AddrPort]bool{}
	var out []netip.AddrPort
	for _, s := range *p.dests.Load() {
		if !seen[s.key] {
			seen[s.key] = true
			out = append(out, s.key)
		}
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// admit counts a new client against the caps; the reason it is refused,
// or "" (then release must follow).
func (p *Proxy) admit(svc *service) string {
	if p.active.Add(1) > int64(p.set.maxConns) {
		p.active.Add(-1)
		return rejectLimit
	}
	if n := svc.active.Add(1); p.set.maxPerService > 0 && n > int64(p.set.maxPerService) {
		svc.active.Add(-1)
		p.active.Add(-1)
		return rejectSvcLimit
	}
	return ""
}

func (p *Proxy) release(svc *service) {
	svc.active.Add(-1)
	p.active.Add(-1)
}

// plan is the order to dial a service's targets in for one client, or the
// reason there is none.
func (p *Proxy) plan(svc *service) ([]netip.AddrPort, string) {
	targets := p.targets(svc.key)
	if len(targets) == 0 {
		return nil, rejectNoTarget
	}
	dests := *p.dests.Load()
	// A target that is one of our own destinations would dial back
	// into the proxy, round and round.
	loops := func(t netip.AddrPort) bool { _, ok := dests[t]; return ok }
	plan := svc.plan(targets, p.backoff, loops)
	if len(plan) == 0 {
		return nil, rejectNoTarget
	}
	return plan, ""
}

// Shutdown stops accepting, lets open connections finish until the drain
// timeout or ctx ends, then cuts the rest. The steering program is detached;
// local VIPs stay (see vip.Device.Close). It is safe to call more than once.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	p.closing.Store(true)
	p.stopAccepting()
	for _, l := range p.loops {
		l.do(l.closePools)
	}

	if n := p.active.Load(); n > 0 {
		p.log.Info("draining proxied connections; those still open then are reset", "connections", n, "drainTimeout", p.set.drainTimeout)
	}
	done := make(chan struct{})
	go func() { p.held.Wait(); close(done) }()
	drain := time.NewTimer(p.set.drainTimeout)
	defer drain.Stop()
	select {
	case <-done:
	case <-drain.C:
	case <-ctx.Done():
	}
	cut := 0
	for _, l := range p.loops {
		l.do(func() { cut += l.cutAll() })
	}
	<-done
	if cut > 0 {
		p.log.Info("cut connections still open at the drain deadline", "connections", cut)
	}
	p.teardown()
	return nil
}

// stopAccepting closes every listening socket and detaches the program.
func (p *Proxy) stopAccepting() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for d, fds := range p.listeners {
		closeGroup(fds)
		delete(p.listeners, d)
	}
	if p.steer != nil {
		if err := p.steer.Close(); err != nil {
			p.log.Warn("detach steering", "error", err)
		}
		p.steer = nil
	}
	closeGroup(p.socket)
	p.socket = nil
}

// teardown releases what New acquired, for Shutdown and a failed New.
func (p *Proxy) teardown() {
	p.stopAccepting()
	for _, l := range p.loops {
		l.do(func() { l.cutAll(); l.closePools() })
		l.stop()
	}
	if p.device != nil {
		p.device.Close()
	}
	if p.netns != nil {
		p.netns.Close()
	}
	releaseProcs(p.procs)
	p.procs = 0
	p.m.unregister(p.reg)
}
