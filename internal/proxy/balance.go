package proxy

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Targets returns the healthy servers of a service: the VIP:port a client
// dialed. It is the same set the connect4 path uses, fed by ctlbd. The proxy
// calls it once per client connection, from many goroutines at once, and
// never modifies the slice it returns.
type Targets func(service netip.AddrPort) []netip.AddrPort

// service is one VIP:port with its round-robin position, shared by every
// listen address that leads to it and kept across SetServices so the
// rotation does not restart.
type service struct {
	key  netip.AddrPort
	name string
	next atomic.Uint64
	m    atomic.Pointer[serviceMetrics] // set by the first connection
	// active counts the client connections held for this service, for
	// maxConnectionsPerService.
	active atomic.Int64
}

// backoff remembers targets whose last dial failed, so the next clients try
// them last rather than wait on them first. Health checks stay the
// authority: a cooling target is still tried when nothing else answers.
type backoff struct {
	d     time.Duration
	mu    sync.Mutex
	until map[netip.AddrPort]time.Time
	// any is whether until may hold entries: while no target failed, a
	// connection takes no lock here (the event loops would contend).
	any atomic.Bool
}

func newBackoff(d time.Duration) *backoff {
	return &backoff{d: d, until: make(map[netip.AddrPort]time.Time)}
}

func (b *backoff) failed(t netip.AddrPort) {
	now := time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	// Forget expired entries here, the only place the map grows, so
	// targets that left the set do not pile up.
	for k, u := range b.until {
		if now.After(u) {
			delete(b.until, k)
		}
	}
	b.until[t] = now.Add(b.d)
	b.any.Store(true)
}

func (b *backoff) succeeded(t netip.AddrPort) {
	if !b.any.Load() {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.until, t)
	if len(b.until) == 0 {
		b.any.Store(false)
	}
}

// split returns the targets not cooling down and those that are.
func (b *backoff) split(targets []netip.AddrPort, skip func(netip.AddrPort) bool) (fresh, cooling []netip.AddrPort) {
	if !b.any.Load() {
		fresh = make([]netip.AddrPort, 0, len(targets))
		for _, t := range targets {
			if !skip(t) {
				fresh = append(fresh, t)
			}
		}
		return fresh, nil
	}
	now := time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	fresh = make([]netip.AddrPort, 0, len(targets))
	for _, t := range targets {
		if skip(t) {
			continue
		}
		if u, ok := b.until[t]; ok && now.Before(u) {
			cooling = append(cooling, t)
			continue
		}
		fresh = append(fresh, t)
	}
	return fresh, cooling
}

// plan orders the targets for one client: round robin over the targets
// that have not failed recently, then the ones that have, each target once.
// The caller dials them in order until one answers, so the attempts are
// bounded by the size of the set. Rotating within the fresh targets (not
// over the whole set, skipping) keeps the load even while one is cooling.
func (s *service) plan(targets []netip.AddrPort, b *backoff, skip func(netip.AddrPort) bool) []netip.AddrPort {
	fresh, cooling := b.split(targets, skip)
	n := s.next.Add(1) - 1
	out := make([]netip.AddrPort, 0, len(fresh)+len(cooling))
	out = appendRotated(out, fresh, n)
	return appendRotated(out, cooling, n)
}

func appendRotated(out, ts []netip.AddrPort, n uint64) []netip.AddrPort {
	if len(ts) == 0 {
		return out
	}
	i := int(n % uint64(len(ts)))
	out = append(out, ts[i:]...)
	return append(out, ts[:i]...)
}
