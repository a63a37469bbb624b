package health

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// listen opens a real TCP listener on a loopback address, accepting and
// closing connections, and returns its address and a stop function.
func listen(t *testing.T, addr string) (netip.AddrPort, func()) {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var once sync.Once
	stop := func() { once.Do(func() { l.Close() }) }
	t.Cleanup(stop)
	return netip.MustParseAddrPort(l.Addr().String()), stop
}

func TestTCP(t *testing.T) {
	addr, stop := listen(t, "127.0.0.1:0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := (TCP{}).Check(ctx, addr); err != nil {
		t.Fatalf("live listener: %v", err)
	}
	stop()
	err := (TCP{}).Check(ctx, addr)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("closed listener: %v, want connection refused", err)
	}
}

// TestStateRiseFall walks the state machine through every transition.
func TestStateRiseFall(t *testing.T) {
	p := Params{Interval: time.Second, Timeout: time.Second, Rise: 2, Fall: 3}
	fail := errors.New("refused")
	steps := []struct {
		err     error
		verdict Verdict
		changed bool
	}{
		{nil, Healthy, true}, // a new server needs one pass
		{fail, Healthy, false},
		{fail, Healthy, false},
		{nil, Healthy, false}, // a pass resets the failures
		{fail, Healthy, false},
		{fail, Healthy, false},
		{fail, Unhealthy, true}, // fall 3
		{nil, Unhealthy, false},
		{fail, Unhealthy, false}, // a failure resets the passes
		{nil, Unhealthy, false},
		{nil, Healthy, true}, // rise 2
	}
	var s State
	for i, st := range steps {
		changed := s.Observe(st.err, time.Now(), p)
		if s.Verdict != st.verdict || changed != st.changed {
			t.Fatalf("step %d (err %v): verdict %s changed %v, want %s %v", i, st.err, s.Verdict, changed, st.verdict, st.changed)
		}
	}
	var fresh State
	if !fresh.Observe(fail, time.Now(), p) || fresh.Verdict != Unhealthy {
		t.Fatalf("a new server that fails its first check: %s, want unhealthy at once", fresh.Verdict)
	}
	// Never healthy yet (still joining its cluster): in at the first pass.
	fresh.Observe(fail, time.Now(), p)
	if !fresh.Observe(nil, time.Now(), p) || fresh.Verdict != Healthy {
		t.Fatalf("a server never healthy before, after its first pass: %s, want healthy (rise is for servers that were healthy)", fresh.Verdict)
	}
}

func TestParams(t *testing.T) {
	p := Params{}.WithDefaults()
	if p != (Params{Interval: DefaultInterval, Timeout: DefaultTimeout, Rise: DefaultRise, Fall: DefaultFall}) {
		t.Fatalf("defaults: %+v", p)
	}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := []Params{
		{Interval: time.Second, Timeout: 2 * time.Second, Rise: 1, Fall: 1},
		{Interval: 0, Timeout: time.Second, Rise: 1, Fall: 1},
		{Interval: time.Second, Timeout: time.Second, Rise: 0, Fall: 1},
	}
	for _, b := range bad {
		if err := b.Validate(); err == nil {
			t.Errorf("%+v: want an error", b)
		}
	}
}

// reports collects a Monitor's reports.
type reports struct {
	mu  sync.Mutex
	all []Report
	c   chan Report
}

func monitor(t *testing.T, addr netip.AddrPort, c Checker, p Params) *reports {
	t.Helper()
	r := &reports{c: make(chan Report, 100)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Monitor(ctx, addr, c, p, func(rep Report) {
			r.mu.Lock()
			r.all = append(r.all, rep)
			r.mu.Unlock()
			select {
			case r.c <- rep:
			default:
			}
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// waitVerdict waits for a report that changes the verdict to v.
func (r *reports) waitVerdict(t *testing.T, v Verdict, timeout time.Duration) Report {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case rep := <-r.c:
			if rep.Changed && rep.State.Verdict == v {
				return rep
			}
		case <-deadline:
			t.Fatalf("no change to %s within %s", v, timeout)
		}
	}
}

// TestMonitorTCP: a real server dies and comes back on the same address;
// fall takes it out at the first refused connect, rise brings it back.
func TestMonitorTCP(t *testing.T) {
	addr, stop := listen(t, "127.0.0.1:0")
	p := Params{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 3, Fall: 1}
	r := monitor(t, addr, TCP{}, p)
	r.waitVerdict(t, Healthy, 5*time.Second)

	stop()
	rep := r.waitVerdict(t, Unhealthy, 5*time.Second)
	if !errors.Is(rep.State.LastErr, syscall.ECONNREFUSED) {
		t.Fatalf("unhealthy because %v, want connection refused", rep.State.LastErr)
	}
	_, _ = listen(t, addr.String())
	rep = r.waitVerdict(t, Healthy, 5*time.Second)
	if rep.State.Passes != 3 {
		t.Fatalf("healthy after %d passes, want rise 3", rep.State.Passes)
	}
}

// TestMonitorTimeout: a server that accepts nothing within the timeout
// (an address with no route answers with an error, a full backlog with
// silence) fails its checks. The listener's backlog is filled first.
func TestMonitorTimeout(t *testing.T) {
	// A listener that never accepts: with backlog filled, SYNs are dropped.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
	// Fill the accept queue (backlog 0 holds one connection) with a bounded
	// number of connections.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 4 {
		c, err := net.DialTimeout("tcp", addr.String(), 200*time.Millisecond)
		if err != nil {
			break
		}
		held = append(held, c)
	}
	p := Params{Interval: 300 * time.Millisecond, Timeout: 150 * time.Millisecond, Rise: 1, Fall: 1}
	r := monitor(t, addr, TCP{}, p)
	rep := r.waitVerdict(t, Unhealthy, 5*time.Second)
	if !strings.Contains(rep.State.LastErr.Error(), "no answer within the check timeout 150ms") {
		t.Fatalf("unhealthy because %v, want the check timeout", rep.State.LastErr)
	}
}

// grpcServer runs a real gRPC server with the standard health service.
func grpcServer(t *testing.T) (netip.AddrPort, *grpchealth.Server, *grpc.Server) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	hs := grpchealth.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return netip.MustParseAddrPort(l.Addr().String()), hs, s
}

func TestGRPC(t *testing.T) {
	addr, hs, srv := grpcServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("xds", healthpb.HealthCheckResponse_SERVING)
	if err := (GRPC{}).Check(ctx, addr); err != nil {
		t.Fatalf("serving server: %v", err)
	}
	if err := (GRPC{Service: "xds"}).Check(ctx, addr); err != nil {
		t.Fatalf("serving service: %v", err)
	}
	if err := (GRPC{Service: "unknown"}).Check(ctx, addr); err == nil {
		t.Fatal("unknown service: want an error")
	}
	hs.SetServingStatus("xds", healthpb.HealthCheckResponse_NOT_SERVING)
	if err := (GRPC{Service: "xds"}).Check(ctx, addr); err == nil || !strings.Contains(err.Error(), "NOT_SERVING") {
		t.Fatalf("not serving: %v, want NOT_SERVING", err)
	}
	// A plain TCP server that is no gRPC server fails the gRPC check.
	tcpOnly, _ := listen(t, "127.0.0.1:0")
	if err := (GRPC{}).Check(ctx, tcpOnly); err == nil {
		t.Fatal("plain TCP server: want an error from the gRPC check")
	}

	// Through a Monitor: the service stops serving, then the server dies.
	hs.SetServingStatus("xds", healthpb.HealthCheckResponse_SERVING)
	p := Params{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 2, Fall: 2}
	r := monitor(t, addr, GRPC{Service: "xds"}, p)
	r.waitVerdict(t, Healthy, 5*time.Second)
	hs.SetServingStatus("xds", healthpb.HealthCheckResponse_NOT_SERVING)
	r.waitVerdict(t, Unhealthy, 5*time.Second)
	hs.SetServingStatus("xds", healthpb.HealthCheckResponse_SERVING)
	r.waitVerdict(t, Healthy, 5*time.Second)
	srv.Stop()
	rep := r.waitVerdict(t, Unhealthy, 5*time.Second)
	t.Logf("server stopped: %v", rep.State.LastErr)
}
