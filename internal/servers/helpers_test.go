package servers

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
)

// change is one OnChange call.
type change struct {
	set    []netip.AddrPort
	reason string
	at     time.Time
}

// recorder keeps every OnChange call of a tracker.
type recorder struct {
	mu      sync.Mutex
	changes []change
	notify  chan struct{}
}

func (r *recorder) onChange(set []netip.AddrPort, reason string) {
	r.mu.Lock()
	r.changes = append(r.changes, change{set: set, reason: reason, at: time.Now()})
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.changes)
}

func (r *recorder) all() []change {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.changes)
}

// wait waits for a change at index >= from to exactly want, and returns it
// and the index after it.
func (r *recorder) wait(t *testing.T, from int, want []netip.AddrPort, timeout time.Duration) (change, int) {
	t.Helper()
	want = discovery.Normalize(want)
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		for i := from; i < len(r.changes); i++ {
			if slices.Equal(r.changes[i].set, want) {
				c := r.changes[i]
				r.mu.Unlock()
				return c, i + 1
			}
		}
		r.mu.Unlock()
		select {
		case <-r.notify:
		case <-deadline:
			t.Fatalf("set never became [%s] within %s; changes: %s", discovery.Format(want), timeout, r.String())
		}
	}
}

func (r *recorder) String() string {
	var b strings.Builder
	for _, c := range r.all() {
		fmt.Fprintf(&b, "\n  %s [%s] %s", c.at.Format("15:04:05.000"), discovery.Format(c.set), c.reason)
	}
	return b.String()
}

// checkOncePerChange fails when two calls in a row carry the same set.
func (r *recorder) checkOncePerChange(t *testing.T) {
	t.Helper()
	cs := r.all()
	for i := 1; i < len(cs); i++ {
		if slices.Equal(cs[i].set, cs[i-1].set) {
			t.Errorf("OnChange called twice in a row with [%s]: %s", discovery.Format(cs[i].set), r.String())
		}
	}
}

// tlogWriter sends slog lines to the test log.
type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// startTracker runs a tracker until the test ends.
func startTracker(t *testing.T, name string, o Options) (*Tracker, *recorder) {
	t.Helper()
	rec := &recorder{notify: make(chan struct{}, 1)}
	o.OnChange = rec.onChange
	if o.Logger == nil {
		o.Logger = testLogger(t)
	}
	tr := New(name, o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); tr.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("tracker %s did not stop within 10 s", name)
		}
	})
	return tr, rec
}

// server is a real TCP server on a loopback address that can die and come
// back on the same address.
type server struct {
	t    *testing.T
	addr netip.AddrPort
	mu   sync.Mutex
	l    net.Listener
}

func newServer(t *testing.T, addr netip.AddrPort) *server {
	s := &server{t: t, addr: addr}
	s.start()
	t.Cleanup(s.stop)
	return s
}

// freeAddr gives a free port on a loopback address.
func freeAddr(t *testing.T, ip string) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return netip.MustParseAddrPort(l.Addr().String())
}

func (s *server) start() {
	s.t.Helper()
	l, err := net.Listen("tcp", s.addr.String())
	if err != nil {
		s.t.Fatalf("listen %s: %v", s.addr, err)
	}
	s.mu.Lock()
	s.l = l
	s.mu.Unlock()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// stop closes the listener: from now on connections are refused, as to a
// server process that died.
func (s *server) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.l != nil {
		s.l.Close()
		s.l = nil
	}
}

// servers makes n real TCP servers on 127.0.x.1..n, one shared free port.
func servers(t *testing.T, x byte, n int) ([]*server, []netip.AddrPort) {
	t.Helper()
	port := freeAddr(t, fmt.Sprintf("127.0.%d.1", x)).Port()
	var ss []*server
	var addrs []netip.AddrPort
	for i := range n {
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, x, byte(i + 1)}), port)
		ss = append(ss, newServer(t, a))
		addrs = append(addrs, a)
	}
	return ss, addrs
}

func without(all []netip.AddrPort, drop ...netip.AddrPort) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range all {
		if !slices.Contains(drop, a) {
			out = append(out, a)
		}
	}
	return out
}

func summary(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("n=%d median %s worst %s", len(s), s[len(s)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}
