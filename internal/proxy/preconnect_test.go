package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// seqServer greets every connection with "conn-N at UNIXNANO" (N counts its
// accepts), echoes one line, and closes a connection on which nothing
// arrives within idle: a server with an idle timeout of its own.
type seqServer struct {
	ln     net.Listener
	idle   time.Duration
	mu     sync.Mutex
	n      int
	open   int
	closed int // connections the server closed for idleness
	wg     sync.WaitGroup
}

func startSeqServer(t *testing.T, netns ns.NetNS, addr netip.AddrPort, idle time.Duration) *seqServer {
	t.Helper()
	s := &seqServer{idle: idle}
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		s.ln, err = net.Listen("tcp4", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.n++
			s.open++
			n := s.n
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_, _ = fmt.Fprintf(c, "conn-%d at %d\n", n, time.Now().UnixNano())
				_ = c.SetReadDeadline(time.Now().Add(s.idle))
				line, err := bufio.NewReader(c).ReadString('\n')
				s.mu.Lock()
				s.open--
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					s.closed++
				}
				s.mu.Unlock()
				if err == nil {
					_, _ = c.Write([]byte(line))
				}
			}()
		}
	}()
	t.Cleanup(func() { s.ln.Close(); s.wg.Wait() })
	return s
}

func (s *seqServer) counts() (accepted, open, idleClosed int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n, s.open, s.closed
}

// exchange connects through the proxy, reads the greeting and has a line
// echoed; it returns the greeting.
func exchange(netns ns.NetNS, addr netip.AddrPort) (string, error) {
	c, err := dialIn(netns, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	greet, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("greeting: %w", err)
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	if echo, err := r.ReadString('\n'); err != nil || echo != "ping\n" {
		return "", fmt.Errorf("echo %q: %v (greeting %q)", echo, err, greet)
	}
	return greet, nil
}

func preconnectEnv(t *testing.T, mode string, n int) *env {
	return newEnv(t, mode, func(c *Config) { c.Preconnect, c.Loops, c.PreconnectMaxIdle = n, 1, "10s" })
}

// A client is served by a backend connection established before it dialed,
// and the server's greeting, sent while the connection waited, reaches it.
func TestPreconnectServesFromReadyConnection(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := preconnectEnv(t, mode, 1)
			srv := startSeqServer(t, e.node, ap(serverAddrs[0], 7000), time.Minute)
			e.setTargets(ap(serverAddrs[0], 7000))
			if _, err := exchange(e.node, vipPort(portA)); err != nil {
				t.Fatal(err)
			}
			// The first client found none and had one dialed.
			waitFor(t, "a ready connection", func() (bool, string) {
				a, _, _ := srv.counts()
				return a == 2, fmt.Sprintf("server accepted %d", a)
			})
			time.Sleep(20 * time.Millisecond)
			before := time.Now()
			greet, err := exchange(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			var n int
			var at int64
			if _, err := fmt.Sscanf(greet, "conn-%d at %d\n", &n, &at); err != nil {
				t.Fatalf("greeting %q: %v", greet, err)
			}
			if n != 2 || !time.Unix(0, at).Before(before) {
				t.Fatalf("client served by %q, want conn-2 accepted before the client dialed at %d", greet, before.UnixNano())
			}
			if m := testutilCount(e, ap(serverAddrs[0], 7000)); m != 2 {
				t.Errorf("connections metric = %v, want 2 (ready connections are not clients)", m)
			}
		})
	}
}

func testutilCount(e *env, target netip.AddrPort) float64 {
	return testutil.ToFloat64(e.p.m.proxied.WithLabelValues(vipPort(portA).String(), target.String()))
}

// Round robin is unchanged: sequential clients split evenly.
func TestPreconnectKeepsRoundRobin(t *testing.T) {
	e := preconnectEnv(t, ModeListeners, 2)
	e.startServers(t, 7000)
	const each = 10
	got := map[string]int{}
	for range each * len(serverAddrs) {
		name, err := nameVia(e.node, vipPort(portA))
		if err != nil {
			t.Fatal(err)
		}
		got[name]++
	}
	for _, a := range serverAddrs {
		if n := got[a+":7000"]; n < each-1 || n > each+1 {
			t.Errorf("%s got %d connections, want %d±1 (all: %v)", a, n, each, got)
		}
	}
}

// A server that closes idle connections costs no client a failed connect:
// the closed ready connection is discarded, and the client is served.
func TestPreconnectDiscardsClosedReadyConnection(t *testing.T) {
	e := preconnectEnv(t, ModeListeners, 1)
	srv := startSeqServer(t, e.node, ap(serverAddrs[0], 7000), 300*time.Millisecond)
	e.setTargets(ap(serverAddrs[0], 7000))
	if _, err := exchange(e.node, vipPort(portA)); err != nil {
		t.Fatal(err)
	}
	for round := range 4 {
		waitFor(t, "the server to close an idle ready connection", func() (bool, string) {
			_, _, c := srv.counts()
			return c > round, fmt.Sprintf("server closed %d idle connections", c)
		})
		time.Sleep(20 * time.Millisecond)
		if _, err := exchange(e.node, vipPort(portA)); err != nil {
			t.Fatalf("round %d: a client after the server closed its ready connection: %v", round, err)
		}
	}
}

// Ready connections close when their server leaves the set and when the
// proxy shuts down.
func TestPreconnectClosesReadyConnections(t *testing.T) {
	e := preconnectEnv(t, ModeListeners, 3)
	a := startSeqServer(t, e.node, ap(serverAddrs[0], 7000), time.Minute)
	b := startSeqServer(t, e.node, ap(serverAddrs[1], 7000), time.Minute)
	e.setTargets(ap(serverAddrs[0], 7000), ap(serverAddrs[1], 7000))
	for range 2 {
		if _, err := exchange(e.node, vipPort(portA)); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*seqServer{a, b} {
		waitFor(t, "3 ready connections each", func() (bool, string) {
			_, o, _ := s.counts()
			return o == 3, fmt.Sprintf("server holds %d open", o)
		})
	}
	e.setTargets(ap(serverAddrs[0], 7000))
	waitFor(t, "the leaving server's ready connections to close", func() (bool, string) {
		_, o, _ := b.counts()
		return o == 0, fmt.Sprintf("server holds %d open", o)
	})
	if _, o, _ := a.counts(); o != 3 {
		t.Errorf("the staying server holds %d open, want its 3 ready connections", o)
	}
	if err := e.p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every ready connection to close at shutdown", func() (bool, string) {
		_, o, _ := a.counts()
		return o == 0, fmt.Sprintf("server holds %d open", o)
	})
}

// activeOpens is the TCP connects the namespace has started (TcpActiveOpens
// of /proc/net/snmp): every dial the proxy made there, refused or not.
func activeOpens(t *testing.T, netns ns.NetNS) int {
	t.Helper()
	var n int
	err := netns.Do(func(ns.NetNS) error {
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || f[0] != "Tcp:" {
				continue
			}
			if names == nil {
				names = f
				continue
			}
			for i, name := range names {
				if name == "ActiveOpens" && i < len(f) {
					n, err = strconv.Atoi(f[i])
					return err
				}
			}
		}
		return errors.New("no Tcp: ActiveOpens in /proc/net/snmp")
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// startResetServer accepts every connection and resets it at once.
func startResetServer(t *testing.T, netns ns.NetNS, addr netip.AddrPort) *atomic.Int64 {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			_ = c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return &accepted
}

// A server that refuses every connection, or accepts and resets each, is
// not redialed in a loop for ready connections no client asked for: the
// pool holds back, longer after each loss, and a refused ready connection
// counts as a failed dial. Before, each loop redialed such a server at
// every sweep (20 times a second per ready connection wanted).
func TestPreconnectBacksOffFromFailingServer(t *testing.T) {
	const window = 2 * time.Second
	// Ready connections wanted per server; one loop. Without the back-off
	// the window would see about window/sweepEvery*preconnect = 80 dials.
	const preconnect, most = 2, 16
	t.Run("refused", func(t *testing.T) {
		e := preconnectEnv(t, ModeListeners, preconnect)
		live := ap(serverAddrs[0], 7000)
		dead := ap(serverAddrs[1], 7001) // nothing listens: refused
		startSeqServer(t, e.node, live, time.Minute)
		e.setTargets(dead, live)
		for range 4 {
			if _, err := exchange(e.node, vipPort(portA)); err != nil {
				t.Fatal(err)
			}
		}
		failures := func() float64 {
			return testutil.ToFloat64(e.p.m.dialFailures.WithLabelValues(vipPort(portA).String(), dead.String()))
		}
		time.Sleep(200 * time.Millisecond) // the clients' own dials are done
		f0, o0 := failures(), activeOpens(t, e.node)
		time.Sleep(window)
		f1, o1 := failures(), activeOpens(t, e.node)
		t.Logf("in %v with no client: %d connects started, %v failed dials counted", window, o1-o0, f1-f0)
		if o1-o0 > most {
			t.Errorf("in %v with no client the proxy started %d connects (to a refusing server), want at most %d", window, o1-o0, most)
		}
		if f1-f0 < 1 {
			t.Errorf("ready connections refused in %v: %v counted in ctlb_proxy_dial_failures_total, want them counted", window, f1-f0)
		}
	})
	t.Run("reset", func(t *testing.T) {
		e := preconnectEnv(t, ModeListeners, preconnect)
		target := ap(serverAddrs[2], 7002)
		accepted := startResetServer(t, e.node, target)
		e.setTargets(target)
		for range 2 {
			_, _ = exchange(e.node, vipPort(portA)) // reset: the client sees an error
		}
		time.Sleep(200 * time.Millisecond)
		a0 := accepted.Load()
		time.Sleep(window)
		a1 := accepted.Load()
		t.Logf("in %v with no client: the resetting server accepted %d connections", window, a1-a0)
		if a1-a0 > most {
			t.Errorf("in %v with no client the proxy made %d connections to a server that resets each, want at most %d", window, a1-a0, most)
		}
	})
}
