package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// The proxy's core is a few event loops, one per CPU the Go runtime may use,
// each a goroutine on a thread of its own with its own epoll instance and
// its own SO_REUSEPORT listening socket for every destination, so that the
// kernel spreads new connections over the loops and no lock is shared on
// the way of a connection. A loop accepts in batches, dials the target
// without blocking, and moves bytes as sockets become ready: read and write
// through a buffer of the loop's for the short exchanges most connections
// are, splice(2) through a pipe for the rest of a direction once a read
// fills the buffer, so that bulk bytes never enter user space. Compared with
// a goroutine per direction on Go's poller this removes the scheduler's
// hand-offs between goroutines and threads, the runtime's own bookkeeping
// calls on every socket (getsockname, epoll_ctl add and delete) and the
// timers per connection: the profile of the old core showed 72% of the
// proxy's CPU in system calls and 15% in the scheduler.

// loopBufSize is a loop's read buffer; a read that fills it moves the
// direction to splice.
const loopBufSize = 16 << 10

// spliceChunk is the most one splice moves; the pipe is sized to match.
const spliceChunk = 1 << 20

// acceptBatch bounds the connections one wake-up of a loop accepts from
// one socket, so that a flood on one destination cannot starve the others.
const acceptBatch = 64

// sweepEvery is how often a loop looks for connections past their connect
// or idle timeout.
const sweepEvery = 50 * time.Millisecond

// yieldEvery is how often a loop goes through the scheduler. The runtime
// takes a goroutine that it has seen run for 10 ms without being scheduled
// anew for a hog: it takes the goroutine's P whenever sysmon finds it in a
// system call, idle Ps or not, and the P the loop then wins back carries a
// stale mark of its own, so a loop that only ever returns from epoll_wait
// loses its P on nearly every tick of sysmon (probed: 1,600 hand-offs a
// second at 32 clients). A Gosched well within the 10 ms marks the loop
// fresh, for the price of one trip through the scheduler (and a wake-up
// of an idle thread, which the runtime asks for on each Gosched).
const yieldEvery = 5 * time.Millisecond

// errIdle ends a connection on which nothing moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// handler is what an epoll event's descriptor belongs to.
type handler interface {
	event(l *loop, fd int, ev uint32)
}

type loop struct {
	p      *Proxy
	epfd   int
	wakefd int // eventfd: commands are waiting
	buf    []byte
	now    time.Time // as of the last wake-up

	mu   sync.Mutex // guards cmds
	cmds []func()

	fds    map[int]handler
	pairs  map[*pair]struct{}
	paused []int             // listening sockets taken out of the epoll set by a failed accept
	pools  map[poolKey]*pool // preconnect's ready connections (preconnect.go)
	// refills are pools to top up once a poll finds no event waiting.
	refills []*pool
	// closing holds descriptors forgotten during a batch of events, closed
	// after it: a number closed mid-batch could be reused at once by a
	// socket the batch opens, and a later event of the batch, meant for
	// the old socket, would reach the new one.
	closing []int
	done    chan struct{}
}

// newLoop creates a loop's epoll instance; run starts it.
func newLoop(p *Proxy) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	wfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	l := &loop{p: p, epfd: epfd, wakefd: wfd, buf: make([]byte, loopBufSize),
		fds: map[int]handler{}, pairs: map[*pair]struct{}{}, pools: map[poolKey]*pool{}, done: make(chan struct{})}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wfd)}); err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("epoll add eventfd: %w", err)
	}
	return l, nil
}

func (l *loop) closeFDs() {
	unix.Close(l.epfd)
	unix.Close(l.wakefd)
}

// run is the loop's goroutine. It blocks in epoll_wait, a system call, so
// the thread it runs on stays with it while it waits (and, with the Ps the
// proxy adds, keeps its P: procs.go). Parking on Go's poller instead (the
// epoll descriptor is readable while it has events) measured 5-10 us more
// of the proxy's CPU per connection: each wake-up then goes through the
// runtime's netpoller and lands on whatever thread runs it. The goroutine
// is not locked to its thread, except to serve in another network
// namespace: a loop that never parks is preempted every 10 ms, and a
// preempted goroutine locked to a thread can run only on that thread, so
// the runtime hands the P away and back between two threads (futex
// wake-ups and sleeps) where an unlocked one is picked up again by the
// thread at hand. With a network namespace the thread enters it for good
// (it is discarded when the loop ends, never handed back to the runtime in
// the wrong namespace), so that the sockets it dials are the namespace's.
func (l *loop) run(netns ns.NetNS) {
	defer close(l.done)
	defer l.closeFDs()
	if netns != nil {
		runtime.LockOSThread()
		if err := netns.Set(); err != nil {
			l.p.log.Error("proxy loop cannot enter its network namespace", "error", err)
			return
		}
	}
	events := make([]unix.EpollEvent, 128)
	var lastSweep, lastYield time.Time
	for {
		// One call whether or not events are waiting: the loop's thread
		// keeps its P across it (procs.go), so blocking costs the
		// runtime next to nothing.
		// With nothing to sweep it waits for events alone: a loop that
		// wakes every 50 ms for nothing also keeps the runtime's sysmon
		// ticking (each wake-up after 10 ms in epoll_wait finds the P
		// taken), on an idle proxy too.
		timeout := int(sweepEvery / time.Millisecond)
		if len(l.pairs) == 0 && len(l.paused) == 0 && len(l.pools) == 0 {
			timeout = -1
		}
		if len(l.refills) > 0 {
			timeout = 0 // poll: refill only when idle
		}
		n, err := unix.EpollWait(l.epfd, events, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			l.p.log.Error("proxy loop: epoll_wait failed", "error", err)
			return
		}
		l.now = time.Now()
		if n == 0 && len(l.refills) > 0 {
			l.runRefills()
		}
		wake := false
		for i := range max(n, 0) {
			fd := int(events[i].Fd)
			if fd == l.wakefd {
				wake = true
				continue
			}
			if h := l.fds[fd]; h != nil {
				h.event(l, fd, events[i].Events)
			}
		}
		if l.now.Sub(lastYield) >= yieldEvery {
			lastYield = l.now
			runtime.Gosched()
		}
		if l.now.Sub(lastSweep) >= sweepEvery {
			lastSweep = l.now
			l.sweep()
		}
		l.flushCloses()
		if wake {
			stop := l.runCommands()
			l.flushCloses()
			if stop {
				return
			}
		}
	}
}

// do runs fn on the loop and waits for it. It returns false, with fn not
// run, if the loop has ended.
func (l *loop) do(fn func()) bool {
	select {
	case <-l.done:
		// Ended: its eventfd is closed, and the number may be another
		// descriptor's by now.
		return false
	default:
	}
	ran := make(chan struct{})
	l.mu.Lock()
	l.cmds = append(l.cmds, func() { fn(); l.flushCloses(); close(ran) })
	l.mu.Unlock()
	var one [8]byte
	one[0] = 1 // host order on little-endian, and any non-zero value wakes
	_, _ = unix.Write(l.wakefd, one[:])
	select {
	case <-ran:
		return true
	case <-l.done:
		return false
	}
}

// runCommands runs the queued commands; true when one asked the loop to
// stop.
func (l *loop) runCommands() bool {
	var b [8]byte
	_, _ = unix.Read(l.wakefd, b[:])
	l.mu.Lock()
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	stop := false
	for _, c := range cmds {
		c()
		if l.fds == nil {
			stop = true
		}
	}
	return stop
}

// stop ends the loop; every descriptor it holds must be closed already.
func (l *loop) stop() {
	l.do(func() { l.fds = nil })
	<-l.done
}

func (l *loop) add(fd int, h handler, events uint32) error {
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: events, Fd: int32(fd)}); err != nil {
		return err
	}
	l.fds[fd] = h
	return nil
}

// forget drops fd and closes it at the end of the batch (see closing),
// which also takes it out of the epoll set (no other descriptor refers to
// its socket).
func (l *loop) forget(fd int) {
	delete(l.fds, fd)
	l.closing = append(l.closing, fd)
}

func (l *loop) flushCloses() {
	for _, fd := range l.closing {
		unix.Close(fd)
	}
	l.closing = l.closing[:0]
}

// ---- listening sockets ----

// lsock is one of a loop's listening sockets.
type lsock struct {
	dst netip.AddrPort // invalid for the steering socket: read each one's
}

// Listening sockets are level-triggered: a batch that leaves connections
// queued is reported again at the next wake-up.
func (s *lsock) event(l *loop, fd int, _ uint32) {
	for range acceptBatch {
		c, err := accept4(fd)
		if err != nil {
			switch {
			case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR), errors.Is(err, unix.ECONNABORTED):
			default:
				// Out of descriptors and the like: the connection stays
				// queued; stop listening on this socket until the next
				// sweep rather than spin.
				l.p.log.Warn("accept failed", "error", err, "retryIn", sweepEvery)
				if unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, fd, &unix.EpollEvent{Fd: int32(fd)}) == nil {
					l.paused = append(l.paused, fd)
				}
			}
			return
		}
		l.accepted(c, s.dst)
	}
}

// accept4 without the peer's address, which no one reads: x/sys/unix's
// Accept4 decodes it, and for AF_INET that costs a getsockopt(SO_PROTOCOL)
// per connection.
func accept4(fd int) (int, error) {
	c, _, e := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(fd), 0, 0, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(c), nil
}

// ---- connections ----

// dir is one direction of a pair.
type dir struct {
	src, dst int
	pending  []byte // read, not yet written
	pipe     [2]int // splice's pipe, once the direction moved to splice
	inPipe   int
	eof      bool // src's sender closed
	done     bool // and that was passed on (or the pair is ending)
	bytes    prometheus.Counter
}

// pair is a client connection and, once dialed, its server connection.
type pair struct {
	client, server int // server is -1 while none is dialing
	svc            *service
	sm             *serviceMetrics
	tm             *targetMetrics
	plan           []netip.AddrPort
	next           int // of plan
	target         netip.AddrPort
	connected      bool
	early          uint32    // the client's events while dialing
	clientOut      bool      // the client's socket is registered for writability
	deadline       time.Time // of the dial
	dialStart      time.Time // for the dial duration histogram
	last           time.Time // bytes last moved
	up, down       dir
}

func (l *loop) accepted(fd int, dst netip.AddrPort) {
	p := l.p
	if p.closing.Load() {
		resetFD(fd)
		return
	}
	if !dst.IsValid() {
		sa, err := unix.Getsockname(fd)
		var ok bool
		if dst, ok = inet4AddrPort(sa); err != nil || !ok {
			p.log.Warn("closing client: cannot read the address it dialed", "error", err)
			resetFD(fd)
			return
		}
	}
	svc := (*p.dests.Load())[dst]
	if svc == nil {
		p.m.rejected.WithLabelValues(dst.String(), rejectUnknownDest).Inc()
		p.rejects.warn(rejectUnknownDest+" "+dst.String(), "closing client: no service for the address it dialed",
			"client", peerName(fd), "dest", dst)
		resetFD(fd)
		return
	}
	if reason := p.admit(svc); reason != "" {
		p.m.rejected.WithLabelValues(svc.name, reason).Inc()
		p.rejects.warn(reason+" "+svc.name, "closing client: connection limit reached", "service", svc.name,
			"client", peerName(fd), "reason", reason, "maxConnections", p.set.maxConns, "maxConnectionsPerService", p.set.maxPerService)
		resetFD(fd)
		return
	}
	sm := svc.metrics(p.m)
	sm.accepted.Inc()
	plan, reason := p.plan(svc)
	if len(plan) == 0 {
		p.release(svc)
		p.m.rejected.WithLabelValues(svc.name, reason).Inc()
		p.rejects.warn(reason+" "+svc.name, "closing client: the service has no server to send it to", "service", svc.name,
			"client", peerName(fd), "reason", reason)
		resetFD(fd)
		return
	}
	pr := &pair{client: fd, server: -1, svc: svc, sm: sm, plan: plan, last: l.now, dialStart: time.Now(),
		up: dir{pipe: [2]int{-1, -1}}, down: dir{pipe: [2]int{-1, -1}}}
	if err := l.add(fd, pr, unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLET); err != nil {
		p.release(svc)
		p.log.Warn("closing client: epoll", "error", err)
		resetFD(fd)
		return
	}
	sm.open.Inc()
	p.held.Add(1)
	l.pairs[pr] = struct{}{}
	if p.set.preconnect > 0 {
		l.preconnected(pr)
		return
	}
	l.dial(pr)
}

// dial starts a non-blocking connect to the next target of the plan that
// takes one; with none left the client is closed.
func (l *loop) dial(pr *pair) {
	p := l.p
	for pr.next < len(pr.plan) {
		t := pr.plan[pr.next]
		pr.next++
		fd, err := l.connect(t, pr, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET)
		if err != nil {
			l.dialFailed(pr.svc, t, err)
			continue
		}
		pr.server, pr.target, pr.deadline = fd, t, l.now.Add(p.set.connectTimeout)
		return
	}
	p.m.rejected.WithLabelValues(pr.svc.name, rejectDialFailed).Inc()
	p.rejects.warn(rejectDialFailed+" "+pr.svc.name, "closing client: no target answered", "service", pr.svc.name,
		"client", peerName(pr.client), "reason", rejectDialFailed)
	l.end(pr, true)
}

// connect starts a non-blocking connect to t and registers the socket for
// events with h; on failure the socket is closed at the end of the batch.
func (l *loop) connect(t netip.AddrPort, h handler, events uint32) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := noDelay(fd); err != nil {
		l.forget(fd)
		return -1, err
	}
	err = unix.Connect(fd, &unix.SockaddrInet4{Port: int(t.Port()), Addr: t.Addr().As4()})
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		l.forget(fd)
		return -1, fmt.Errorf("connect: %w", err)
	}
	if err := l.add(fd, h, events); err != nil {
		l.forget(fd)
		return -1, fmt.Errorf("epoll: %w", err)
	}
	return fd, nil
}

// dialFailed counts a failed dial of svc's target t, a client's or a
// ready connection's (attrs say which): the target is tried last for a
// while, ctlb_proxy_dial_failures_total counts it, the log says it at most
// once per interval.
func (l *loop) dialFailed(svc *service, t netip.AddrPort, err error, attrs ...any) {
	p := l.p
	p.backoff.failed(t)
	p.m.dialFailures.WithLabelValues(svc.name, t.String()).Inc()
	p.rejects.warn("dial "+svc.name+" "+t.String(), "dial failed", append([]any{"service", svc.name, "target", t, "error", err}, attrs...)...)
}

// Directions to pump.
const (
	pumpUp   = 1 // client to server
	pumpDown = 2 // server to client
	pumpBoth = pumpUp | pumpDown
	// pumpDrain reads sources until EAGAIN even after a short read: the
	// event reported the peer's end of stream (or an error), which no
	// later event will report again. Otherwise a short read means the
	// socket is empty for now, and data arriving later raises a new edge,
	// so the read that would only say EAGAIN is skipped.
	pumpDrain = 4
)

func (pr *pair) event(l *loop, fd int, ev uint32) {
	if !pr.connected {
		if fd != pr.server || ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			// The client's data waits for the server; what its
			// events said is acted on once connected.
			if fd == pr.client {
				pr.early |= ev
			}
			return
		}
		// Writable without an error is connected (no event of a closed
		// descriptor can reach a new one, see closing); the error is
		// asked for only when there is one.
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if err == nil {
				err = unix.ECONNREFUSED
				if soerr != 0 {
					err = unix.Errno(soerr)
				}
			}
			l.forget(fd)
			pr.server = -1
			l.dialFailed(pr.svc, pr.target, err)
			l.dial(pr)
			return
		}
		l.connected(pr)
		// Both ways now: the client's data has waited for this. An end
		// of stream (or error) reported meanwhile, by either socket, is
		// not reported again: then read to EAGAIN; otherwise a short
		// read has emptied the socket, as for any event.
		which := pumpBoth
		if (pr.early|ev)&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			which |= pumpDrain
		}
		l.pump(pr, which)
		return
	}
	// Only the directions this event can move: readable feeds the
	// direction the socket is the source of, writable drains the one it
	// is the destination of.
	var which int
	if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		which = pumpDrain
	}
	switch {
	case ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0:
		which |= pumpBoth
	case fd == pr.client:
		if ev&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0 {
			which |= pumpUp
		}
		if ev&unix.EPOLLOUT != 0 {
			which |= pumpDown
		}
	default:
		if ev&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0 {
			which |= pumpDown
		}
		if ev&unix.EPOLLOUT != 0 {
			which |= pumpUp
		}
	}
	l.pump(pr, which)
}

func (l *loop) connected(pr *pair) {
	p := l.p
	p.backoff.succeeded(pr.target)
	pr.sm.dial.Observe(time.Since(pr.dialStart).Seconds())
	pr.tm = pr.sm.target(p.m, pr.svc.name, pr.target)
	pr.tm.proxied.Inc()
	pr.connected = true
	pr.last = l.now
	pr.up = dir{src: pr.client, dst: pr.server, pipe: [2]int{-1, -1}, bytes: pr.tm.toTarget}
	pr.down = dir{src: pr.server, dst: pr.client, pipe: [2]int{-1, -1}, bytes: pr.tm.fromTarget}
}

// pump moves what it can both ways and ends the pair when both ways are
// done or one failed.
func (l *loop) pump(pr *pair, which int) {
	for i, d := range [2][2]*dir{{&pr.up, &pr.down}, {&pr.down, &pr.up}} {
		if d[0].done || which&(1<<i) == 0 {
			continue
		}
		moved, blocked, err := l.move(d[0], d[1], which&pumpDrain != 0)
		if moved {
			pr.last = l.now
		}
		if err == nil && blocked && d[0].dst == pr.client && !pr.clientOut {
			// The client's socket is registered for writability only
			// once a write to it has had to wait: most never do.
			pr.clientOut = true
			err = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, pr.client,
				&unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(pr.client)})
		}
		if err != nil {
			l.p.log.Debug("connection aborted", "service", pr.svc.name, "target", pr.target, "error", err)
			l.p.m.resets.WithLabelValues(pr.svc.name, resetError).Inc()
			l.end(pr, true)
			return
		}
	}
	if pr.up.done && pr.down.done {
		l.end(pr, false)
	}
}

// move runs one direction until its source has nothing more for now or its
// destination takes nothing more for now. At the source's end of stream it
// passes the half-close on, unless the other way is done too: then the
// close that follows sends the FIN.
func (l *loop) move(d, other *dir, drain bool) (moved, blocked bool, err error) {
	for {
		// Flush what is held first.
		for len(d.pending) > 0 {
			n, err := unix.Write(d.dst, d.pending)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) {
					return moved, true, nil
				}
				if errors.Is(err, unix.EINTR) {
					continue
				}
				return moved, false, fmt.Errorf("write: %w", err)
			}
			d.bytes.Add(float64(n))
			d.pending = d.pending[n:]
			moved = true
		}
		for d.inPipe > 0 {
			n, err := unix.Splice(d.pipe[0], nil, d.dst, nil, d.inPipe, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) {
					return moved, true, nil
				}
				if errors.Is(err, unix.EINTR) {
					continue
				}
				return moved, false, fmt.Errorf("splice out: %w", err)
			}
			d.bytes.Add(float64(n))
			d.inPipe -= int(n)
			moved = true
		}
		if d.eof {
			d.done = true
			if other.done {
				return moved, false, nil
			}
			return moved, false, d.passEOF()
		}
		if d.pipe[0] >= 0 {
			n, err := unix.Splice(d.src, nil, d.pipe[1], nil, spliceChunk, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case errors.Is(err, unix.EAGAIN):
				return moved, false, nil
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				return moved, false, fmt.Errorf("splice in: %w", err)
			case n == 0:
				d.eof = true
			default:
				d.inPipe = int(n)
			}
			continue
		}
		n, err := unix.Read(d.src, l.buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return moved, false, nil
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return moved, false, fmt.Errorf("read: %w", err)
		case n == 0:
			d.eof = true
			continue
		}
		moved = true
		w, err := unix.Write(d.dst, l.buf[:n])
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			if errors.Is(err, unix.EINTR) {
				w = 0
			} else {
				return moved, false, fmt.Errorf("write: %w", err)
			}
		}
		w = max(w, 0)
		if w > 0 {
			d.bytes.Add(float64(w))
		}
		if w < n {
			d.pending = append([]byte(nil), l.buf[w:n]...)
		}
		if n == len(l.buf) {
			// A full buffer: bulk. Splice the rest of this direction.
			if err := d.openPipe(); err != nil {
				return moved, false, err
			}
			l.p.fixBulkBuffer(d.src)
		} else if !drain && len(d.pending) == 0 {
			return moved, false, nil // a short read emptied the socket
		}
	}
}

func (d *dir) openPipe() error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("pipe: %w", err)
	}
	// Larger than the default 64 KiB: fewer calls per megabyte. Refused
	// above the system's limit, which is no error.
	_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, spliceChunk)
	d.pipe = p
	return nil
}

// passEOF passes the source's half-close on to the destination.
func (d *dir) passEOF() error {
	if err := unix.Shutdown(d.dst, unix.SHUT_WR); err != nil && !errors.Is(err, unix.ENOTCONN) {
		return fmt.Errorf("pass half-close on: %w", err)
	}
	return nil
}

func (d *dir) closePipe() {
	if d.pipe[0] >= 0 {
		unix.Close(d.pipe[0])
		unix.Close(d.pipe[1])
		d.pipe = [2]int{-1, -1}
	}
}

// end closes the pair: with a reset both ways when aborted, so that each
// peer learns at once that the other side is gone.
func (l *loop) end(pr *pair, abort bool) {
	if _, ok := l.pairs[pr]; !ok {
		return
	}
	delete(l.pairs, pr)
	for _, fd := range []int{pr.client, pr.server} {
		if fd < 0 {
			continue
		}
		if abort {
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		}
		l.forget(fd)
	}
	pr.up.closePipe()
	pr.down.closePipe()
	pr.sm.open.Dec()
	l.p.release(pr.svc)
	l.p.held.Done()
}

// sweep ends dials past the connect timeout (the next target is tried) and
// pairs idle past the idle timeout.
func (l *loop) sweep() {
	for _, fd := range l.paused {
		if _, ok := l.fds[fd].(*lsock); ok {
			_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)})
		}
	}
	l.paused = l.paused[:0]
	l.sweepPools()
	for pr := range l.pairs {
		switch {
		case !pr.connected && pr.server >= 0 && l.now.After(pr.deadline):
			l.forget(pr.server)
			pr.server = -1
			l.dialFailed(pr.svc, pr.target, errors.New("connect timeout"))
			l.dial(pr)
		case pr.connected && l.now.Sub(pr.last) >= l.p.set.idleTimeout:
			l.p.log.Debug("connection idle", "service", pr.svc.name, "target", pr.target, "error", errIdle)
			l.p.m.resets.WithLabelValues(pr.svc.name, resetIdle).Inc()
			l.end(pr, true)
		}
	}
}

// endTo resets the pairs of service connected to server (at most most, when
// not 0) and sends the ones dialing it on to their next target.
func (l *loop) endTo(service, server netip.AddrPort, most uint64) uint64 {
	var n uint64
	for pr := range l.pairs {
		if pr.svc.key != service || pr.target != server || pr.server < 0 {
			continue
		}
		if !pr.connected {
			// Only a server that left takes its dials back; a rebalance
			// (a limit) moves established connections, not dials.
			if most == 0 {
				l.forget(pr.server)
				pr.server = -1
				l.dial(pr)
			}
			continue
		}
		l.p.m.resets.WithLabelValues(pr.svc.name, resetServerLeft).Inc()
		l.end(pr, true)
		n++
		if most > 0 && n >= most {
			break
		}
	}
	return n
}

// cutAll resets every pair, for Shutdown at the drain deadline.
func (l *loop) cutAll() int {
	n := 0
	for pr := range l.pairs {
		if !pr.connected {
			l.p.m.rejected.WithLabelValues(pr.svc.name, rejectShutdown).Inc()
		} else {
			l.p.m.resets.WithLabelValues(pr.svc.name, resetShutdown).Inc()
		}
		l.end(pr, true)
		n++
	}
	return n
}

// resetFD closes a socket with an RST (SO_LINGER 0).
func resetFD(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}

// peerName is the client's address for a log line.
func peerName(fd int) string {
	sa, err := unix.Getpeername(fd)
	if a, ok := inet4AddrPort(sa); err == nil && ok {
		return a.String()
	}
	return "?"
}

// inet4AddrPort is an AF_INET socket address as a netip.AddrPort.
func inet4AddrPort(sa unix.Sockaddr) (netip.AddrPort, bool) {
	a, ok := sa.(*unix.SockaddrInet4)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), true
}
