package proxy

import (
	"errors"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Preconnect (Config.Preconnect): each loop keeps a few backend connections
// established ahead of clients for every server it has sent a client to, so
// that an accepted client is paired with one at once instead of waiting for
// a dial's handshake (Envoy's preconnect_policy). The round robin is not
// changed: the server is picked as always, and a ready connection of that
// server is taken when there is one. A ready connection waits registered for
// hang-ups and errors only, not for readability: a server may greet first,
// and its banner must wait in the socket for the client. A hang-up, an
// error or the idle age discards it, silently: a client that finds none
// dials as before, failover included.

// poolKey is one server of one service.
type poolKey struct {
	svc    *service
	target netip.AddrPort
}

// pool is a loop's ready connections to one server of one service.
type pool struct {
	key    poolKey
	conns  []*spare // dialing or established
	queued bool     // in loop.refills
	// strikes counts spares lost in a row (a failed dial, or a server
	// that hung up on a ready connection within spareMinLife); retryAt is
	// when the pool is topped up again. Without them a refusing server, or
	// one that accepts and resets, would be redialed at every sweep by
	// every loop, with no client asking.
	strikes int
	retryAt time.Time
}

// spareMinLife is how long a ready connection must stay up before the
// server's hang-up is taken for an idle close rather than a failure.
const spareMinLife = time.Second

// strike holds the pool's refills back after a lost spare: one sweep after
// the first, doubling to the proxy's fail backoff.
func (pl *pool) strike(now time.Time, most time.Duration) {
	pl.strikes = min(pl.strikes+1, 16)
	pl.retryAt = now.Add(min(sweepEvery<<pl.strikes, most))
}

// spare is one ready (or dialing) backend connection.
type spare struct {
	pl        *pool
	fd        int
	connected bool
	since     time.Time // dial start, then connected
}

// The events a spare waits for: writable once (the handshake is done),
// then only a hang-up or an error.
const spareEvents = unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

func (sp *spare) event(l *loop, fd int, ev uint32) {
	if ev&unix.EPOLLOUT != 0 && ev&unix.EPOLLERR == 0 && !sp.connected {
		// Connected, even when the server's hang-up comes in the same
		// event (it accepted, then closed at once): a loss, not a refusal.
		sp.connected = true
		sp.since = l.now
	}
	if ev&(unix.EPOLLERR|unix.EPOLLHUP|unix.EPOLLRDHUP) != 0 {
		// Refused, reset or closed by the server: it is replaced at a
		// later sweep, not now, and later still when spares keep dying,
		// so that a dead server or one that resets every connection is
		// not dialed in a loop. A refused dial is a failed dial, for the
		// clients' plans and the metrics alike.
		pl := sp.pl
		switch {
		case !sp.connected:
			err := unix.ECONNREFUSED
			if soerr, gerr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); gerr == nil && soerr != 0 {
				err = unix.Errno(soerr)
			}
			l.spareDialFailed(pl, err)
		case l.now.Sub(sp.since) < spareMinLife:
			pl.strike(l.now, l.p.backoff.d)
		}
		l.dropSpare(sp)
		return
	}
}

// preconnected pairs the client with an established connection to the
// plan's first target when the loop holds one, dials as usual otherwise,
// and queues the pool for a refill once the loop has nothing else to do:
// a dial on loopback runs the whole handshake inside connect(2), and done
// at once it would delay the client it was meant to speed up.
func (l *loop) preconnected(pr *pair) {
	k := poolKey{pr.svc, pr.plan[0]}
	pl := l.pools[k]
	if pl == nil {
		pl = &pool{key: k}
		l.pools[k] = pl
	}
	if !l.takeSpare(pr, pl) {
		l.dial(pr)
	}
	if !pl.queued {
		pl.queued = true
		l.refills = append(l.refills, pl)
	}
}

// runRefills tops up the pools queued by clients, when the loop is idle.
// A pool dropped meanwhile is no longer in l.pools and is skipped.
func (l *loop) runRefills() {
	for _, pl := range l.refills {
		pl.queued = false
		if l.pools[pl.key] == pl {
			l.fillPool(pl, l.p.set.preconnect)
		}
	}
	l.refills = l.refills[:0]
}

func (l *loop) takeSpare(pr *pair, pl *pool) bool {
	var got *spare
	for i, sp := range pl.conns {
		if sp.connected {
			got = sp
			pl.conns = slices.Delete(pl.conns, i, i+1)
			break
		}
	}
	if got == nil {
		return false
	}
	// The spare's descriptor becomes the pair's: the same registration,
	// now for everything. MOD re-reports what is pending, a banner or a
	// hang-up that raced with this, as a fresh edge.
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, got.fd,
		&unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(got.fd)}); err != nil {
		l.forget(got.fd)
		return false
	}
	l.fds[got.fd] = pr
	pl.strikes = 0
	pr.server, pr.target, pr.next = got.fd, pr.plan[0], 1
	l.connected(pr)
	return true
}

// fillPool starts at most max dials toward the pool's size, unless spares
// were lost lately (pool.strike).
func (l *loop) fillPool(pl *pool, most int) {
	if l.now.Before(pl.retryAt) {
		return
	}
	for len(pl.conns) < l.p.set.preconnect && most > 0 && !l.p.closing.Load() {
		most--
		sp := &spare{pl: pl, since: l.now}
		fd, err := l.connect(pl.key.target, sp, spareEvents)
		if err != nil {
			l.spareDialFailed(pl, err) // nothing a client sees
			return
		}
		sp.fd = fd
		pl.conns = append(pl.conns, sp)
	}
}

// spareDialFailed counts a spare's failed dial as a client's would be,
// and holds the pool's refills back.
func (l *loop) spareDialFailed(pl *pool, err error) {
	l.dialFailed(pl.key.svc, pl.key.target, err, "preconnect", true)
	pl.strike(l.now, l.p.backoff.d)
}

func (l *loop) dropSpare(sp *spare) {
	pl := sp.pl
	if i := slices.Index(pl.conns, sp); i >= 0 {
		pl.conns = slices.Delete(pl.conns, i, i+1)
		l.forget(sp.fd)
	}
}

// sweepPools discards ready connections past their idle age (or dials past
// the connect timeout) and every one of a server that left its service's
// set or a service no longer served, then tops the pools up.
func (l *loop) sweepPools() {
	if len(l.pools) == 0 {
		return
	}
	served := map[*service]bool{}
	for _, s := range *l.p.dests.Load() {
		served[s] = true
	}
	sets := map[*service][]netip.AddrPort{}
	for k, pl := range l.pools {
		for _, sp := range slices.Clone(pl.conns) {
			switch {
			case sp.connected && l.now.Sub(sp.since) >= l.p.set.preconnectIdle:
				pl.strikes = 0 // it lived its whole idle age: the server is fine
				l.dropSpare(sp)
			case !sp.connected && l.now.Sub(sp.since) >= l.p.set.connectTimeout:
				l.spareDialFailed(pl, errors.New("connect timeout"))
				l.dropSpare(sp)
			}
		}
		set, ok := sets[k.svc]
		if !ok && served[k.svc] {
			set = l.p.targets(k.svc.key)
			sets[k.svc] = set
		}
		if !served[k.svc] || !slices.Contains(set, k.target) || l.p.closing.Load() {
			l.closePool(pl)
			delete(l.pools, k)
			continue
		}
		l.fillPool(pl, l.p.set.preconnect)
	}
}

func (l *loop) closePool(pl *pool) {
	for _, sp := range slices.Clone(pl.conns) {
		l.dropSpare(sp)
	}
}

// closePools closes every ready connection, for Shutdown.
func (l *loop) closePools() {
	for k, pl := range l.pools {
		l.closePool(pl)
		delete(l.pools, k)
	}
}
