// Package proxy is ctlbd's fallback round-robin TCP proxy, for the clients
// the connect4 path cannot serve (no cgroup v2, a VM or sandboxed runtime,
// processes outside any attached cgroup). It accepts connections to VIP:port,
// sends each to the next healthy server of that VIP:port's set (the set the
// connect4 path uses) and copies bytes both ways in the kernel with splice.
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
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

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

	ctx    context.Context // cancelled when open connections are cut
	cancel context.CancelFunc

	mu        sync.Mutex // guards what follows and serialises changes
	closed    bool
	listeners map[netip.AddrPort]*net.TCPListener // listeners mode
	socket    *net.TCPListener                    // steering mode
	steer     *steering.Steering
	device    *vip.Device
	conns     map[*clientConn]struct{}

	acceptWG sync.WaitGroup
	connWG   sync.WaitGroup

	// work hands accepted connections to idle workers (see dispatch).
	work chan *net.TCPConn

	// active counts the client connections held, for maxConnections.
	active atomic.Int64
	// rejects logs rejected connections, at most once per interval and kind.
	rejects *rateLog
}

// workerIdle is how long a worker that finished a connection waits for
// another before it exits: long enough to carry a busy proxy from one
// connection to the next, short enough that a burst leaves no crowd behind.
const workerIdle = time.Second

// clientConn is one accepted connection, tracked so Shutdown can cut it.
type clientConn struct {
	mu     sync.Mutex
	client *net.TCPConn
	pipe   *pipe
}

func (c *clientConn) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pipe != nil {
		c.pipe.abort()
		return
	}
	reset(c.client)
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
		listeners: make(map[netip.AddrPort]*net.TCPListener),
		conns:     make(map[*clientConn]struct{}),
		work:      make(chan *net.TCPConn),
	}
	p.rejects = newRateLog(p.log, set.rejectLogEvery)
	p.ctx, p.cancel = context.WithCancel(context.Background())
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
	if p.set.mode == ModeSteering {
		s, err := steering.Attach(netnsPath)
		if err != nil {
			return fmt.Errorf("proxy steering: %w", err)
		}
		p.steer = s
		// Any address does: the program hands connections to the
		// socket whatever it is bound to. Loopback keeps it off the
		// network for everything else.
		l, err := p.listen(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 0))
		if err != nil {
			return err
		}
		p.socket = l
		if err := s.SetSocket(l); err != nil {
			return fmt.Errorf("proxy steering: %w", err)
		}
		p.acceptWG.Add(1)
		go p.serve(l)
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

// open starts serving dests; on error it undoes what it did.
func (p *Proxy) open(dests []netip.AddrPort) error {
	for i, d := range dests {
		var err error
		if p.steer != nil {
			err = p.steer.Add(d)
		} else {
			var l *net.TCPListener
			if l, err = p.listen(d); err == nil {
				p.listeners[d] = l
				p.acceptWG.Add(1)
				go p.serve(l)
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
	l, ok := p.listeners[d]
	if !ok {
		return nil
	}
	delete(p.listeners, d)
	return l.Close()
}

// listen opens a listening socket in the proxy's namespace. IP_FREEBIND
// lets it bind a VIP that is not (yet) local: whoever makes it local later
// need not come before the proxy.
func (p *Proxy) listen(addr netip.AddrPort) (*net.TCPListener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_FREEBIND, 1)
		})
		if err == nil {
			err = serr
		}
		return err
	}}
	// Plain TCP: a SOCKMAP refuses MPTCP sockets, and the splice path is
	// TCP's.
	lc.SetMultipathTCP(false)
	// No TCP keep-alive on accepted sockets (nor on dialed ones): the
	// idle timeout already ends a connection whose peers went quiet,
	// long before the probes would, and Go's keep-alive setup costs four
	// setsockopt calls per socket, a measurable share of a short
	// connection.
	lc.KeepAlive = -1
	var l net.Listener
	err := p.inNetNS(func() error {
		var err error
		l, err = lc.Listen(context.Background(), "tcp4", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return l.(*net.TCPListener), nil
}

func (p *Proxy) inNetNS(fn func() error) error {
	if p.netns == nil {
		return fn()
	}
	return p.netns.Do(func(ns.NetNS) error { return fn() })
}

// Listening returns the local addresses of the proxy's listening sockets:
// one per destination in listeners mode, the single steering socket in
// steering mode.
func (p *Proxy) Listening() []netip.AddrPort {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []netip.AddrPort
	if p.socket != nil {
		out = append(out, p.socket.Addr().(*net.TCPAddr).AddrPort())
	}
	for _, l := range p.listeners {
		out = append(out, l.Addr().(*net.TCPAddr).AddrPort())
	}
	return out
}

// serve accepts on l until it is closed.
func (p *Proxy) serve(l *net.TCPListener) {
	defer p.acceptWG.Done()
	var delay time.Duration
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait a little
			// rather than spin, and keep serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed", "listener", l.Addr().String(), "error", err, "retryIn", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !p.track(c) {
			reset(c)
			continue
		}
		p.dispatch(c)
	}
}

// dispatch gives c to an idle worker, or to a new one when none is idle.
// Reusing goroutines spares each connection a goroutine's start and exit
// and, above all, the growth of its stack to the depth a dial needs (the
// runtime copies the stack at each doubling), a visible share of a short
// connection's CPU in profiles.
func (p *Proxy) dispatch(c *net.TCPConn) {
	select {
	case p.work <- c:
	default:
		go p.worker(c)
	}
}

// worker handles c, then the connections dispatch hands it, until none
// came for workerIdle or the proxy is shut down.
func (p *Proxy) worker(c *net.TCPConn) {
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		p.handle(c)
		idle.Reset(workerIdle)
		select {
		case c = <-p.work:
		case <-idle.C:
			return
		case <-p.ctx.Done():
			return
		}
	}
}

// track registers c for Shutdown; false once the proxy is shutting down.
func (p *Proxy) track(c *net.TCPConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.connWG.Add(1)
	return true
}

func (p *Proxy) handle(c *net.TCPConn) {
	defer p.connWG.Done()
	cc := &clientConn{client: c}
	p.mu.Lock()
	p.conns[cc] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.conns, cc)
		p.mu.Unlock()
	}()

	dst := c.LocalAddr().(*net.TCPAddr).AddrPort()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	svc := (*p.dests.Load())[dst]
	if svc == nil {
		p.m.rejected.WithLabelValues(dst.String(), rejectUnknownDest).Inc()
		p.rejects.warn(rejectUnknownDest+" "+dst.String(), "closing client: no service for the address it dialed",
			"client", c.RemoteAddr().String(), "dest", dst)
		reset(c)
		return
	}
	if reason := p.admit(svc); reason != "" {
		p.m.rejected.WithLabelValues(svc.name, reason).Inc()
		p.rejects.warn(reason+" "+svc.name, "closing client: connection limit reached", "service", svc.name,
			"client", c.RemoteAddr().String(), "reason", reason, "maxConnections", p.set.maxConns, "maxConnectionsPerService", p.set.maxPerService)
		reset(c)
		return
	}
	defer p.release(svc)
	sm := svc.metrics(p.m)
	sm.accepted.Inc()
	sm.open.Inc()
	defer sm.open.Dec()

	dialStart := time.Now()
	server, target, reason := p.dial(svc)
	if server == nil {
		p.m.rejected.WithLabelValues(svc.name, reason).Inc()
		p.rejects.warn(reason+" "+svc.name, "closing client: no target answered", "service", svc.name,
			"client", c.RemoteAddr().String(), "reason", reason)
		reset(c)
		return
	}
	sm.dial.Observe(time.Since(dialStart).Seconds())
	tm := sm.target(p.m, svc.name, target)
	tm.proxied.Inc()

	pp := newPipe(c, server, p.set.idleTimeout)
	cc.mu.Lock()
	cc.pipe = pp
	cc.mu.Unlock()
	if p.ctx.Err() != nil {
		// Shutdown cut the connections while this one was dialing.
		pp.abort()
		return
	}
	// The Debug line's attributes cost allocations on every connection:
	// build them only when someone reads them.
	debug := p.log.Enabled(p.ctx, slog.LevelDebug)
	var start time.Time
	if debug {
		start = time.Now()
	}
	err := pp.run(tm.toTarget, tm.fromTarget)
	if debug {
		p.log.Debug("connection closed", "service", svc.name, "client", c.RemoteAddr().String(), "target", target,
			"duration", time.Since(start), "error", err)
	}
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

// dial connects to the first target of the service's plan that answers.
// It never tries a target twice, so it ends after at most one attempt per
// target; with none it returns the reason for the metrics.
func (p *Proxy) dial(svc *service) (*net.TCPConn, netip.AddrPort, string) {
	targets := p.targets(svc.key)
	if len(targets) == 0 {
		return nil, netip.AddrPort{}, rejectNoTarget
	}
	dests := *p.dests.Load()
	// A target that is one of our own destinations would dial back
	// into the proxy, round and round.
	loops := func(t netip.AddrPort) bool { _, ok := dests[t]; return ok }
	plan := svc.plan(targets, p.backoff, loops)
	if len(plan) == 0 {
		return nil, netip.AddrPort{}, rejectNoTarget
	}
	d := net.Dialer{Timeout: p.set.connectTimeout, KeepAlive: -1} // see listen
	for _, t := range plan {
		var c net.Conn
		err := p.inNetNS(func() error {
			var err error
			c, err = d.DialContext(p.ctx, "tcp4", t.String())
			return err
		})
		if err == nil {
			p.backoff.succeeded(t)
			return c.(*net.TCPConn), t, ""
		}
		if p.ctx.Err() != nil {
			return nil, netip.AddrPort{}, rejectShutdown
		}
		p.backoff.failed(t)
		p.m.dialFailures.WithLabelValues(svc.name, t.String()).Inc()
		p.rejects.warn("dial "+svc.name+" "+t.String(), "dial failed", "service", svc.name, "target", t, "error", err)
	}
	return nil, netip.AddrPort{}, rejectDialFailed
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
	p.stopAccepting()
	p.acceptWG.Wait()

	done := make(chan struct{})
	go func() { p.connWG.Wait(); close(done) }()
	drain := time.NewTimer(p.set.drainTimeout)
	defer drain.Stop()
	select {
	case <-done:
	case <-drain.C:
	case <-ctx.Done():
	}
	p.cancel()
	p.mu.Lock()
	cut := len(p.conns)
	for c := range p.conns {
		c.cut()
	}
	p.mu.Unlock()
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
	for d, l := range p.listeners {
		l.Close()
		delete(p.listeners, d)
	}
	if p.socket != nil {
		p.socket.Close()
	}
	if p.steer != nil {
		if err := p.steer.Close(); err != nil {
			p.log.Warn("detach steering", "error", err)
		}
		p.steer = nil
	}
}

// teardown releases what New acquired, for Shutdown and a failed New.
func (p *Proxy) teardown() {
	p.stopAccepting()
	p.acceptWG.Wait()
	p.cancel()
	if p.device != nil {
		p.device.Close()
	}
	if p.netns != nil {
		p.netns.Close()
	}
	p.m.unregister(p.reg)
}
