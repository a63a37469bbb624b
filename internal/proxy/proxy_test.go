package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	tu "github.com/ctlb/ctlb/internal/testutil"
)

// startServers starts the naming test servers on serverAddrs:port and makes
// them the proxy's targets.
func (e *env) startServers(t *testing.T, port int) []*tu.Server {
	t.Helper()
	var addrs []string
	var targets []netip.AddrPort
	for _, a := range serverAddrs {
		addrs = append(addrs, fmt.Sprintf("%s:%d", a, port))
		targets = append(targets, ap(a, port))
	}
	e.setTargets(targets...)
	return tu.StartServers(t, e.node, addrs...)
}

func TestRoundRobinAcrossPorts(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			e.startServers(t, 7000)
			const rounds = 4
			got := map[int]map[string]int{}
			for range rounds * len(serverAddrs) {
				for _, port := range []int{portA, portB} {
					name, err := nameVia(e.node, vipPort(port))
					if err != nil {
						t.Fatalf("via %s: %v", vipPort(port), err)
					}
					if got[port] == nil {
						got[port] = map[string]int{}
					}
					got[port][name]++
				}
			}
			for _, port := range []int{portA, portB} {
				for _, a := range serverAddrs {
					name := fmt.Sprintf("%s:7000", a)
					if got[port][name] != rounds {
						t.Errorf("port %d: %s got %d connections, want %d (all: %v)", port, name, got[port][name], rounds, got[port])
					}
					if n := testutil.ToFloat64(e.p.m.proxied.WithLabelValues(vipPort(port).String(), name)); n != rounds {
						t.Errorf("metric connections{%s,%s} = %v, want %d", vipPort(port), name, n, rounds)
					}
				}
				// The targets function is asked with the VIP:port dialed.
				n, ok := e.calls.Load(vipPort(port))
				if !ok || n.(*atomic.Int64).Load() != rounds*int64(len(serverAddrs)) {
					t.Errorf("targets asked for %s: %v times", vipPort(port), n)
				}
			}
			for _, name := range []string{"ctlb_proxy_accepted_total", "ctlb_proxy_connections_total", "ctlb_proxy_open_connections", "ctlb_proxy_bytes_total"} {
				if n, err := testutil.GatherAndCount(e.reg, name); err != nil || n == 0 {
					t.Errorf("registry has %d series of %s (err %v)", n, name, err)
				}
			}
		})
	}
}

// Concurrent clients each take the next position: with a correct counter the
// split is exact, whatever the interleaving (the seed raced here).
func TestRoundRobinUnderConcurrency(t *testing.T) {
	e := newEnv(t, ModeListeners, nil)
	e.startServers(t, 7000)
	const workers, each = 20, 15
	var (
		mu   sync.Mutex
		got  = map[string]int{}
		wg   sync.WaitGroup
		errs = make(chan error, workers)
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				name, err := nameVia(e.node, vipPort(portA))
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				got[name]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, a := range serverAddrs {
		if n := got[a+":7000"]; n != workers*each/len(serverAddrs) {
			t.Errorf("%s got %d connections, want %d (all: %v)", a, n, workers*each/len(serverAddrs), got)
		}
	}
}

func TestLongStreamsAndHalfClose(t *testing.T) {
	const size = 32 << 20 // each way
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			srv := startStreamServer(t, e.node, ap(serverAddrs[0], 7100))
			e.setTargets(srv.addr)
			var toTarget, fromTarget int64

			// Both ways at once; the client half-closes first and the
			// server's reply comes after that.
			c, err := dialIn(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			req := fmt.Sprintf("stream %d %d\n", size, 1)
			if _, err := io.WriteString(c, req); err != nil {
				t.Fatal(err)
			}
			sent := make(chan error, 1)
			go func() {
				_, err := io.CopyN(c, newStream(2), size)
				if err == nil {
					err = c.CloseWrite()
				}
				sent <- err
			}()
			r := bufio.NewReader(c)
			h := sha256.New()
			if _, err := io.CopyN(h, r, size); err != nil {
				t.Fatalf("read the server's stream: %v", err)
			}
			if got, want := hex.EncodeToString(h.Sum(nil)), streamSumOf(1, size); got != want {
				t.Fatalf("server's stream arrived as %s, want %s", got, want)
			}
			if err := <-sent; err != nil {
				t.Fatalf("send the client's stream: %v", err)
			}
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("read the server's sum after half-close: %v", err)
			}
			if want := fmt.Sprintf("SUM %s %d\n", streamSumOf(2, size), size); line != want {
				t.Fatalf("server received %q, want %q", line, want)
			}
			if _, err := r.ReadByte(); err != io.EOF {
				t.Fatalf("after the reply: %v, want end of stream", err)
			}
			toTarget += int64(len(req)) + size
			fromTarget += size + int64(len(line))

			// The server half-closes first; the client then sends its
			// whole stream over the half-open connection.
			c2, err := dialIn(e.node, vipPort(portB))
			if err != nil {
				t.Fatal(err)
			}
			defer c2.Close()
			req = fmt.Sprintf("early %d %d\n", size, 3)
			if _, err := io.WriteString(c2, req); err != nil {
				t.Fatal(err)
			}
			h.Reset()
			n, err := io.Copy(h, c2) // to the server's half-close
			if err != nil || n != size {
				t.Fatalf("read %d bytes (%v), want %d then end of stream", n, err, size)
			}
			if got, want := hex.EncodeToString(h.Sum(nil)), streamSumOf(3, size); got != want {
				t.Fatalf("server's stream arrived as %s, want %s", got, want)
			}
			if _, err := io.CopyN(c2, newStream(4), size); err != nil {
				t.Fatalf("send after the server's half-close: %v", err)
			}
			if err := c2.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			select {
			case res := <-srv.results:
				if want := (streamSum{streamSumOf(4, size), size}); res != want {
					t.Fatalf("server received %+v, want %+v", res, want)
				}
			case <-time.After(opTimeout):
				t.Fatal("server never saw the end of the client's stream")
			}
			toTarget += int64(len(req)) + size
			fromTarget += size

			// Byte counters settle once the connections are done.
			waitFor(t, "byte counters", func() (bool, string) {
				to, from := sumBytes(e, "to_target"), sumBytes(e, "from_target")
				return to == float64(toTarget) && from == float64(fromTarget), fmt.Sprintf("to_target %v (want %d), from_target %v (want %d)", to, toTarget, from, fromTarget)
			})
		})
	}
}

func sumBytes(e *env, dir string) float64 {
	var n float64
	for _, port := range []int{portA, portB} {
		n += testutil.ToFloat64(e.p.m.bytes.WithLabelValues(vipPort(port).String(), ap(serverAddrs[0], 7100).String(), dir))
	}
	return n
}

// waitFor polls cond for up to opTimeout.
// waitFor waits for cond, failing with what it last saw.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	tu.Eventually(t, what, opTimeout, cond)
}

func TestDeadTargetSkipped(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			servers := e.startServers(t, 7000)
			victim := servers[1].Addr

			// Hold a connection on the server about to die.
			var held *net.TCPConn
			for range len(servers) {
				c, err := dialIn(e.node, vipPort(portA))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				name, err := tu.ReadName(c)
				if err != nil {
					t.Fatal(err)
				}
				if name == victim {
					held = c
				}
			}
			if held == nil {
				t.Fatalf("no connection landed on %s", victim)
			}

			// Its server dies; health checks have not noticed yet, so
			// the targets still list it.
			servers[1].Close()
			expectClosed(t, held)

			got := map[string]int{}
			const clients = 30
			for range clients {
				name, err := nameVia(e.node, vipPort(portA))
				if err != nil {
					t.Fatalf("a client failed with one target dead: %v", err)
				}
				got[name]++
			}
			if got[victim] != 0 {
				t.Errorf("%d connections landed on dead %s", got[victim], victim)
			}
			for _, s := range []*tu.Server{servers[0], servers[2]} {
				if got[s.Addr] < clients/3 {
					t.Errorf("%s got %d of %d connections, want an even share (all: %v)", s.Addr, got[s.Addr], clients, got)
				}
			}
			// Dialed once, failed, then tried last: the next clients
			// never waited on it.
			if n := testutil.ToFloat64(e.p.m.dialFailures.WithLabelValues(vipPort(portA).String(), victim)); n != 1 {
				t.Errorf("dial failures for %s = %v, want 1", victim, n)
			}
		})
	}
}

func TestAllTargetsDownClosesClients(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			svc := vipPort(portA).String()

			// An empty set: closed at once.
			e.setTargets()
			expectRejected(t, e, vipPort(portA))
			if n := testutil.ToFloat64(e.p.m.rejected.WithLabelValues(svc, rejectNoTarget)); n != 1 {
				t.Errorf("rejected{no_target} = %v, want 1", n)
			}

			// Every target refuses: each client is closed after at most
			// one attempt per target, never a loop.
			var dead []netip.AddrPort
			for _, a := range serverAddrs {
				dead = append(dead, ap(a, 7999))
			}
			e.setTargets(dead...)
			const clients = 20
			var wg sync.WaitGroup
			for range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					expectRejected(t, e, vipPort(portA))
				}()
			}
			wg.Wait()
			if n := testutil.ToFloat64(e.p.m.rejected.WithLabelValues(svc, rejectDialFailed)); n != clients {
				t.Errorf("rejected{dial_failed} = %v, want %d", n, clients)
			}
			var failures float64
			for _, d := range dead {
				failures += testutil.ToFloat64(e.p.m.dialFailures.WithLabelValues(svc, d.String()))
			}
			if failures < float64(len(dead)) || failures > float64(clients*len(dead)) {
				t.Errorf("%v dial failures, want between %d and %d", failures, len(dead), clients*len(dead))
			}
		})
	}
}

// expectRejected dials addr and expects the proxy to close the connection
// promptly. On loopback its reset can beat the dialer's own check of the
// handshake, so a reset dial counts as closed too.
func expectRejected(t *testing.T, e *env, addr netip.AddrPort) {
	t.Helper()
	c, err := dialIn(e.node, addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return
	}
	if err != nil {
		t.Errorf("dial %s: %v", addr, err)
		return
	}
	defer c.Close()
	expectClosed(t, c)
}

// blackhole returns an address whose SYNs are dropped: a listener with a
// zero backlog and its one queue slot taken. A dial there waits until its
// timeout, as towards a server that vanished without a trace.
func blackhole(t *testing.T, e *env, addr netip.AddrPort) {
	t.Helper()
	var fd int
	err := e.node.Do(func(_ ns.NetNS) error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}); err != nil {
			return err
		}
		return unix.Listen(fd, 0)
	})
	if err != nil {
		t.Fatalf("blackhole listener: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	filler, err := dialIn(e.node, addr)
	if err != nil {
		t.Fatalf("fill the blackhole's queue: %v", err)
	}
	t.Cleanup(func() { filler.Close() })
	// Check the premise: a further dial now times out.
	var c net.Conn
	err = e.node.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", addr.String(), 200*time.Millisecond)
		return err
	})
	if err == nil {
		c.Close()
		t.Fatalf("blackhole %s answered", addr)
	}
	var nerr net.Error
	if !errors.As(err, &nerr) || !nerr.Timeout() {
		t.Fatalf("blackhole %s: %v, want a timeout", addr, err)
	}
}

func TestConnectTimeoutTriesNextTarget(t *testing.T) {
	e := newEnv(t, ModeListeners, func(c *Config) { c.ConnectTimeout = "300ms" })
	hole := ap(serverAddrs[2], 7300)
	blackhole(t, e, hole)
	good := tu.StartServers(t, e.node, serverAddrs[0]+":7000")[0]
	e.setTargets(hole, ap(serverAddrs[0], 7000))
	// The first client's plan starts at the blackhole.
	name, err := nameVia(e.node, vipPort(portA))
	if err != nil {
		t.Fatalf("client not served after the connect timeout: %v", err)
	}
	if name != good.Addr {
		t.Fatalf("reached %s, want %s", name, good.Addr)
	}
	if n := testutil.ToFloat64(e.p.m.dialFailures.WithLabelValues(vipPort(portA).String(), hole.String())); n != 1 {
		t.Errorf("dial failures for the blackhole = %v, want 1", n)
	}
}

func TestIdleTimeout(t *testing.T) {
	e := newEnv(t, ModeListeners, func(c *Config) { c.IdleTimeout = "1s" })
	srv := startStreamServer(t, e.node, ap(serverAddrs[0], 7100))
	e.setTargets(srv.addr)

	// Silent both ways: the proxy closes it.
	quiet, err := dialIn(e.node, vipPort(portA))
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	if _, err := io.WriteString(quiet, "stream 0 0\n"); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, quiet)

	// A trickle one way for three idle timeouts keeps it open, though the
	// other way stays silent throughout.
	busy, err := dialIn(e.node, vipPort(portA))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if _, err := io.WriteString(busy, "stream 0 0\n"); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for i := range 30 {
		b := []byte{byte(i)}
		h.Write(b)
		if _, err := busy.Write(b); err != nil {
			t.Fatalf("trickle byte %d: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := busy.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(busy).ReadString('\n')
	if err != nil {
		t.Fatalf("busy connection was cut: %v", err)
	}
	if want := fmt.Sprintf("SUM %s 30\n", hex.EncodeToString(h.Sum(nil))); line != want {
		t.Fatalf("server received %q, want %q", line, want)
	}
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestThousandConcurrentConnectionsNoLeak(t *testing.T) {
	const clients = 1000
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			e.startServers(t, 7000)
			if _, err := nameVia(e.node, vipPort(portA)); err != nil {
				t.Fatal(err) // warm up: pools and timers exist before the baseline
			}
			runtime.GC()
			baseG, baseFD := runtime.NumGoroutine(), fdCount(t)

			var (
				up      sync.WaitGroup // every client connected
				release = make(chan struct{})
				done    sync.WaitGroup
				failed  atomic.Int64
			)
			up.Add(clients)
			for i := range clients {
				done.Add(1)
				go func() {
					defer done.Done()
					port := []int{portA, portB}[i%2]
					c, err := dialIn(e.node, vipPort(port))
					if err == nil {
						_, err = tu.ReadName(c)
					}
					up.Done()
					if err != nil {
						failed.Add(1)
						t.Errorf("client %d: %v", i, err)
						if c != nil {
							c.Close()
						}
						return
					}
					<-release
					c.Close()
				}()
			}
			up.Wait()
			open := testutil.ToFloat64(e.p.m.open.WithLabelValues(vipPort(portA).String())) +
				testutil.ToFloat64(e.p.m.open.WithLabelValues(vipPort(portB).String()))
			if want := float64(clients - failed.Load()); open != want {
				t.Errorf("proxy holds %v connections, want %v", open, want)
			}
			close(release)
			done.Wait()
			if failed.Load() > 0 {
				t.Fatalf("%d of %d clients failed", failed.Load(), clients)
			}

			deadline := time.Now().Add(opTimeout)
			for {
				runtime.GC()
				g, fds := runtime.NumGoroutine(), fdCount(t)
				open := testutil.ToFloat64(e.p.m.open.WithLabelValues(vipPort(portA).String())) +
					testutil.ToFloat64(e.p.m.open.WithLabelValues(vipPort(portB).String()))
				if g <= baseG && fds <= baseFD && open == 0 {
					t.Logf("after %d connections: %d goroutines (baseline %d), %d fds (baseline %d)", clients, g, baseG, fds, baseFD)
					break
				}
				if time.Now().After(deadline) {
					buf := make([]byte, 1<<20)
					buf = buf[:runtime.Stack(buf, true)]
					t.Fatalf("leak: %d goroutines (baseline %d), %d fds (baseline %d), %v open\n%s", g, baseG, fds, baseFD, open, buf)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// Shutdown lets an open connection finish, refuses new ones meanwhile, and
// cuts what is left at the drain deadline.
func TestShutdownDrains(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, func(c *Config) { c.DrainTimeout = "1m" })
			srv := startStreamServer(t, e.node, ap(serverAddrs[0], 7100))
			e.setTargets(srv.addr)
			c, err := dialIn(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			if _, err := io.WriteString(c, "stream 1000 5\n"); err != nil {
				t.Fatal(err)
			}
			if _, err := io.CopyN(io.Discard, r, 1000); err != nil {
				t.Fatal(err)
			}

			stopped := make(chan error, 1)
			go func() { stopped <- e.p.Shutdown(context.Background()) }()
			waitFor(t, "new connections refused", func() (bool, string) {
				c, err := dialIn(e.node, vipPort(portB))
				if err == nil {
					c.Close()
				}
				return errors.Is(err, syscall.ECONNREFUSED), fmt.Sprintf("dial: %v", err)
			})
			select {
			case <-stopped:
				t.Fatal("Shutdown returned with a connection still open and the drain deadline a minute away")
			default:
			}

			// The open connection still works both ways and ends
			// normally; then Shutdown returns.
			if _, err := io.CopyN(c, newStream(6), 1<<20); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			line, err := r.ReadString('\n')
			if want := fmt.Sprintf("SUM %s %d\n", streamSumOf(6, 1<<20), 1<<20); err != nil || line != want {
				t.Fatalf("during drain: %q (%v), want %q", line, err, want)
			}
			select {
			case err := <-stopped:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(opTimeout):
				t.Fatal("Shutdown did not return once the last connection closed")
			}
		})
	}
}

func TestShutdownCutsAtDrainDeadline(t *testing.T) {
	e := newEnv(t, ModeSteering, func(c *Config) { c.DrainTimeout = "300ms" })
	e.startServers(t, 7000)
	c, err := dialIn(e.node, vipPort(portA))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := tu.ReadName(c); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := e.p.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c)
	if err := e.p.SetServices(nil); err == nil {
		t.Error("SetServices after Shutdown succeeded")
	}
}

func TestServicesChangeAtRuntime(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			e.startServers(t, 7000)
			const portC = 8600
			if _, err := dialIn(e.node, vipPort(portC)); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("port %d before it is added: %v, want refused", portC, err)
			}
			if err := e.p.SetServices([]Service{{VIP: testVIP, Ports: []int{portA, portC}}}); err != nil {
				t.Fatal(err)
			}
			for _, port := range []int{portA, portC} {
				if _, err := nameVia(e.node, vipPort(port)); err != nil {
					t.Errorf("port %d after the change: %v", port, err)
				}
			}
			if _, err := dialIn(e.node, vipPort(portB)); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("removed port %d: %v, want refused", portB, err)
			}
			// Bad input changes nothing.
			if err := e.p.SetServices([]Service{{VIP: testVIP, Ports: []int{70000}}}); err == nil {
				t.Error("SetServices accepted port 70000")
			}
			if _, err := nameVia(e.node, vipPort(portC)); err != nil {
				t.Errorf("port %d after a refused change: %v", portC, err)
			}
		})
	}
}

// A target that is one of the proxy's own destinations would loop.
func TestTargetThatIsTheProxyIsSkipped(t *testing.T) {
	e := newEnv(t, ModeSteering, nil)
	s := tu.StartServers(t, e.node, serverAddrs[0]+":7000")[0]
	e.setTargets(vipPort(portB), ap(serverAddrs[0], 7000))
	for range 4 {
		name, err := nameVia(e.node, vipPort(portA))
		if err != nil {
			t.Fatal(err)
		}
		if name != s.Addr {
			t.Fatalf("reached %s, want %s", name, s.Addr)
		}
	}
	if n := testutil.ToFloat64(e.p.m.accepted.WithLabelValues(vipPort(portB).String())); n != 0 {
		t.Errorf("the proxy dialed itself %v times", n)
	}
}

// Another process's SO_REUSEPORT listener on an address the proxy is asked
// to serve makes the change fail, naming the address: the proxy's own
// reuseport group would have joined it, and the kernel would have sent
// part of the clients to the other process. The served set says what is
// served, in both modes.
func TestListenAddressSharedWithReusePortRefused(t *testing.T) {
	e := newEnv(t, ModeListeners, nil)
	const portC = 8601
	var ln net.Listener
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	if err := e.node.Do(func(ns.NetNS) error {
		var err error
		ln, err = lc.Listen(context.Background(), "tcp4", vipPort(portC).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	err := e.p.SetServices([]Service{{VIP: testVIP, Ports: []int{portA, portB, portC}}})
	if err == nil || !strings.Contains(err.Error(), vipPort(portC).String()) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("serving %s where another process's SO_REUSEPORT listener is: %v; want EADDRINUSE naming it", vipPort(portC), err)
	}
	want := []netip.AddrPort{vipPort(portA), vipPort(portB)}
	if got := e.p.Destinations(); !slices.Equal(got, want) {
		t.Errorf("after the refused change: serving %v, want %v", got, want)
	}
	if got := e.p.Services(); !slices.Equal(got, want) {
		t.Errorf("after the refused change: services %v, want %v", got, want)
	}
}

// End with a limit (a rebalance moving connections off a server that stays
// in the set) leaves the clients still dialing that server alone; without
// a limit (the server left the set) they go on to their next target at
// once instead of waiting out the connect timeout.
func TestEndLeavesDialsToAServerThatStays(t *testing.T) {
	for _, c := range []struct {
		name  string
		limit uint64
		moved bool
	}{{"rebalance", 1, false}, {"server left", 0, true}} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, ModeListeners, func(c *Config) { c.ConnectTimeout = "3s" })
			hole := ap(serverAddrs[2], 7310)
			blackhole(t, e, hole)
			good := tu.StartServers(t, e.node, serverAddrs[0]+":7010")[0]
			e.setTargets(hole, ap(serverAddrs[0], 7010)) // the first client's plan starts at the blackhole
			served := make(chan error, 1)
			go func() {
				name, err := nameVia(e.node, vipPort(portA))
				if err == nil && name != good.Addr {
					err = fmt.Errorf("reached %s, want %s", name, good.Addr)
				}
				served <- err
			}()
			waitFor(t, "the client's dial to the blackhole", func() (bool, string) {
				n := 0
				for _, l := range e.p.loops {
					l.do(func() {
						for pr := range l.pairs {
							if !pr.connected && pr.target == hole {
								n++
							}
						}
					})
				}
				return n == 1, fmt.Sprintf("%d pairs dialing %s", n, hole)
			})
			if n := e.p.End(vipPort(portA), hole, c.limit); n != 0 {
				t.Errorf("End reset %d connected pairs, want none (the one pair is dialing)", n)
			}
			select {
			case err := <-served:
				if !c.moved {
					t.Fatalf("a dial to a server that stays was moved by End(limit %d): the client was served at once (%v)", c.limit, err)
				}
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(time.Second):
				if c.moved {
					t.Fatalf("End(limit 0) left the dial to the departed server waiting: not served within 1s")
				}
				if err := <-served; err != nil { // after the connect timeout
					t.Fatal(err)
				}
			}
		})
	}
}
