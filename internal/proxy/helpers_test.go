package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ctlb/ctlb/internal/testutil"
)

// The test topology: a "node" namespace holding the VIP and the servers.
const (
	testVIP = "198.18.100.1"
	portA   = 8500
	portB   = 8502
)

var serverAddrs = []string{"198.18.200.1", "198.18.200.2", "198.18.200.3"}

// opTimeout bounds every client operation, so a broken proxy fails a test
// instead of hanging it.
const opTimeout = 30 * time.Second

var modes = []string{ModeListeners, ModeSteering}

// env is one proxy under test in its own node namespace.
type env struct {
	node    ns.NetNS
	p       *Proxy
	reg     *prometheus.Registry
	targets atomic.Pointer[[]netip.AddrPort]
	calls   sync.Map // service VIP:port -> *atomic.Int64 calls of Targets
}

// newEnv starts a proxy in a fresh node namespace serving testVIP on portA
// and portB; edit changes the config first. Its targets are what setTargets
// last set, for every service.
func newEnv(t *testing.T, mode string, edit func(*Config)) *env {
	t.Helper()
	e := &env{node: testutil.NewNetNS(t), reg: prometheus.NewRegistry()}
	testutil.AddLoopbackAddrs(t, e.node, serverAddrs...)
	e.setTargets()
	cfg := Config{
		Mode:           mode,
		Services:       []Service{{VIP: testVIP, Ports: []int{portA, portB}}},
		ConnectTimeout: "2s",
		DrainTimeout:   "5s",
		LocalVIP:       LocalVIP{Enabled: true, Device: "lo"},
	}
	if edit != nil {
		edit(&cfg)
	}
	e.p = e.start(t, cfg)
	return e
}

func (e *env) start(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	p, err := New(cfg, e.lookup, Options{
		Logger:      slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
		Registerer:  e.reg,
		NetNS:       e.node.Path(),
		FailBackoff: time.Minute, // longer than any test: a failed target stays last
	})
	if err != nil {
		t.Fatalf("new proxy: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return p
}

func (e *env) lookup(svc netip.AddrPort) []netip.AddrPort {
	n, _ := e.calls.LoadOrStore(svc, new(atomic.Int64))
	n.(*atomic.Int64).Add(1)
	return *e.targets.Load()
}

func (e *env) setTargets(ts ...netip.AddrPort) { e.targets.Store(&ts) }

// testWriter sends proxy logs to the test log, shown on failure.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

func ap(addr string, port int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port))
}

func vipPort(port int) netip.AddrPort { return ap(testVIP, port) }

// dialIn connects to addr from inside netns, as a client there would.
func dialIn(netns ns.NetNS, addr netip.AddrPort) (*net.TCPConn, error) {
	var c net.Conn
	err := netns.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", addr.String(), 5*time.Second)
		return err
	})
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	if err := tc.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// nameVia connects to addr and returns the name of the server it reached
// (testutil.Server introduces itself).
func nameVia(netns ns.NetNS, addr netip.AddrPort) (string, error) {
	c, err := dialIn(netns, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return testutil.ReadName(c)
}

// expectClosed checks that the proxy closes c promptly (a reset or an end
// of stream), rather than leaving the client hanging. Safe to call from any
// goroutine.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(opTimeout)); err != nil {
		t.Error(err)
		return
	}
	n, err := c.Read(make([]byte, 64))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("client still open after %s: the proxy left it hanging", opTimeout)
	} else if err == nil {
		t.Errorf("client read %d bytes, want the connection closed", n)
	}
}

// streamServer speaks the test protocol for long and half-closed streams.
// After "<mode> <n> <seed>\n" from the client:
//   - "stream": it sends n bytes of the seed's stream while reading the
//     client's bytes to the end, and only then (after the client's
//     half-close) replies "SUM <sha256> <count>\n" and closes.
//   - "early": it sends n bytes and half-closes its side first, reads the
//     client's bytes to the end and reports their sum on results.
type streamServer struct {
	addr    netip.AddrPort
	l       net.Listener
	wg      sync.WaitGroup
	results chan streamSum
}

type streamSum struct {
	sum   string
	count int64
}

func startStreamServer(t *testing.T, netns ns.NetNS, addr netip.AddrPort) *streamServer {
	t.Helper()
	s := &streamServer{addr: addr, results: make(chan streamSum, 16)}
	err := netns.Do(func(ns.NetNS) error {
		var err error
		s.l, err = net.Listen("tcp4", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.l.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				if err := s.serve(c.(*net.TCPConn)); err != nil {
					t.Logf("stream server %s: %v", addr, err)
				}
			}()
		}
	}()
	t.Cleanup(func() { s.l.Close(); s.wg.Wait() })
	return s
}

func (s *streamServer) serve(c *net.TCPConn) error {
	if err := c.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		return err
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	var (
		mode string
		n    int64
		seed uint64
	)
	if _, err := fmt.Sscanf(line, "%s %d %d", &mode, &n, &seed); err != nil {
		return fmt.Errorf("request %q: %w", line, err)
	}
	sent := make(chan error, 1)
	go func() {
		_, err := io.CopyN(c, newStream(seed), n)
		if err == nil && mode == "early" {
			err = c.CloseWrite()
		}
		sent <- err
	}()
	h := sha256.New()
	count, rerr := io.Copy(h, r)
	if err := <-sent; err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("receive: %w", rerr)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if mode == "early" {
		s.results <- streamSum{sum, count}
		return nil
	}
	_, err = fmt.Fprintf(c, "SUM %s %d\n", sum, count)
	return err
}

// newStream is a deterministic pseudo-random byte stream.
func newStream(seed uint64) io.Reader {
	var k [32]byte
	for i := range 8 {
		k[i] = byte(seed >> (8 * i))
	}
	return rand.NewChaCha8(k)
}

// streamSumOf is the sha256 of the first n bytes of seed's stream.
func streamSumOf(seed uint64, n int64) string {
	h := sha256.New()
	if _, err := io.CopyN(h, newStream(seed), n); err != nil {
		panic(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
