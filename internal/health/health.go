// Package health runs active health checks against one server at a time: a
// TCP connect (the default), a grpc.health.v1 Check, or a Consul server's
// own gRPC API, on an interval with a timeout, and turns the stream of results into a healthy/unhealthy state
// with rise and fall thresholds.
package health

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Defaults: a server whose port refuses is seen at the next check, so with
// Fall 1 it leaves the healthy set at most one Interval (plus a connect
// attempt) after it dies; well within 2 s.
const (
	DefaultInterval = 1 * time.Second
	DefaultTimeout  = 500 * time.Millisecond
	DefaultRise     = 2
	DefaultFall     = 1
)

// Checker probes one server once. A nil error means the server is fit to
// take connections. Check must return by the time ctx is done.
type Checker interface {
	Check(ctx context.Context, addr netip.AddrPort) error
	// Kind names the check for status output ("tcp", "grpc").
	Kind() string
}

// TCP checks that a TCP connection to the server completes.
type TCP struct {
	// Dialer makes the connection; nil uses a zero net.Dialer.
	Dialer *net.Dialer
}

// Kind implements Checker.
func (TCP) Kind() string { return "tcp" }

// Check implements Checker.
func (c TCP) Check(ctx context.Context, addr netip.AddrPort) error {
	d := c.Dialer
	if d == nil {
		d = &net.Dialer{}
	}
	conn, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return fmt.Errorf("tcp connect %s: %w", addr, err)
	}
	return conn.Close()
}

// GRPC calls grpc.health.v1.Health/Check over HTTP/2 (plaintext, or TLS
// when TLS is set) and needs the answer SERVING. Each check uses a fresh
// connection, so a check also proves that a new connection (and a TLS
// handshake) can be made, which is what clients of the VIP do.
type GRPC struct {
	// Service is the name sent in the request; "" asks about the server as
	// a whole.
	Service string
	// TLS, when set, makes the check speak TLS with this client config;
	// TLSFiles, when set, with the config of files it follows.
	TLS      *tls.Config
	TLSFiles *TLSFiles
}

// Kind implements Checker.
func (GRPC) Kind() string { return "grpc" }

// dialGRPC makes a client for one server address: plaintext, or TLS with
// tc. passthrough: the address is already resolved; no DNS lookup.
func dialGRPC(addr netip.AddrPort, tc *tls.Config) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if tc != nil {
		creds = TLSCredentials(tc)
	}
	return grpc.NewClient("passthrough:///"+addr.String(), grpc.WithTransportCredentials(creds))
}

// Check implements Checker.
func (c GRPC) Check(ctx context.Context, addr netip.AddrPort) error {
	tc, err := clientTLS(c.TLSFiles, c.TLS)
	if err != nil {
		return fmt.Errorf("grpc health %s: %w", addr, err)
	}
	conn, err := dialGRPC(addr, tc)
	if err != nil {
		return fmt.Errorf("grpc health %s: %w", addr, err)
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: c.Service})
	if err != nil {
		return fmt.Errorf("grpc health %s service %q: %w", addr, c.Service, err)
	}
	if st := resp.GetStatus(); st != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("grpc health %s service %q: status %s", addr, c.Service, st)
	}
	return nil
}

// Params are the timing of the checks of one server.
type Params struct {
	Interval time.Duration // between the starts of two checks
	Timeout  time.Duration // for one check
	Rise     int           // consecutive passes to turn healthy again
	Fall     int           // consecutive failures to turn unhealthy
}

// WithDefaults fills zero fields with the package defaults.
func (p Params) WithDefaults() Params {
	if p.Interval <= 0 {
		p.Interval = DefaultInterval
	}
	if p.Timeout <= 0 {
		p.Timeout = DefaultTimeout
	}
	if p.Rise <= 0 {
		p.Rise = DefaultRise
	}
	if p.Fall <= 0 {
		p.Fall = DefaultFall
	}
	return p
}

// Validate rejects timings that cannot work.
func (p Params) Validate() error {
	switch {
	case p.Interval <= 0:
		return fmt.Errorf("health interval %s: must be > 0", p.Interval)
	case p.Timeout <= 0:
		return fmt.Errorf("health timeout %s: must be > 0", p.Timeout)
	case p.Timeout > p.Interval:
		return fmt.Errorf("health timeout %s: must not exceed the interval %s", p.Timeout, p.Interval)
	case p.Rise < 1:
		return fmt.Errorf("health rise %d: must be >= 1", p.Rise)
	case p.Fall < 1:
		return fmt.Errorf("health fall %d: must be >= 1", p.Fall)
	}
	return nil
}

// Verdict is the health of one server: healthy, unhealthy or unchecked, the
// one vocabulary of code, API (api.HealthHealthy...), CLI and metrics.
type Verdict int

// A server starts Unchecked (no check finished yet). As in Envoy, its first
// passing check makes it Healthy at once: Rise applies to a server coming
// back from Unhealthy after it was Healthy, so a new server takes traffic
// after one passing check, not Rise, even when its first checks failed
// (a Consul server still joining its cluster).
const (
	Unchecked Verdict = iota
	Healthy
	Unhealthy
)

func (v Verdict) String() string {
	switch v {
	case Healthy:
		return "healthy"
	case Unhealthy:
		return "unhealthy"
	default:
		return "unchecked"
	}
}

// MarshalText makes a Verdict read as its name in JSON.
func (v Verdict) MarshalText() ([]byte, error) { return []byte(v.String()), nil }

// State applies rise and fall to a stream of check results.
type State struct {
	Verdict   Verdict
	Passes    int       // consecutive passes
	Failures  int       // consecutive failures
	LastErr   error     // error of the last failed check, nil after a pass
	LastCheck time.Time // when the last check finished
	Since     time.Time // when Verdict last changed
	// WasHealthy is set once the server has been Healthy.
	WasHealthy bool
}

// Observe records one check result and reports whether the verdict changed.
func (s *State) Observe(err error, now time.Time, p Params) bool {
	s.LastCheck = now
	prev := s.Verdict
	if err == nil {
		s.Passes++
		s.Failures = 0
		s.LastErr = nil
		// Rise guards against a server that flaps: one never seen
		// healthy (a new server that failed while it was still joining
		// its cluster) has nothing to flap from and goes in at its first
		// pass.
		if s.Verdict == Unchecked || (s.Verdict == Unhealthy && (s.Passes >= p.Rise || !s.WasHealthy)) {
			s.Verdict = Healthy
		}
	} else {
		s.Failures++
		s.Passes = 0
		s.LastErr = err
		// A server never seen healthy is unhealthy at its first failure:
		// there is nothing to protect from flapping yet.
		if s.Verdict == Unchecked || (s.Verdict == Healthy && s.Failures >= p.Fall) {
			s.Verdict = Unhealthy
		}
	}
	if s.Verdict == Healthy {
		s.WasHealthy = true
	}
	if s.Verdict != prev {
		s.Since = now
		return true
	}
	return false
}

// Report is what a Monitor sends after each check.
type Report struct {
	Addr    netip.AddrPort
	State   State // after this check
	Changed bool  // the verdict changed with this check
}

// Monitor checks one server until ctx is done: the first check at once, then
// one every Interval, and calls report after each (from its own goroutine,
// never concurrently with itself).
func Monitor(ctx context.Context, addr netip.AddrPort, c Checker, p Params, report func(Report)) {
	p = p.WithDefaults()
	var st State
	tick := time.NewTicker(p.Interval)
	defer tick.Stop()
	for {
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, p.Timeout)
		err := c.Check(cctx, addr)
		// The dialer's own deadline can fire a moment before the context
		// reports it, so judge by the clock.
		timedOut := cctx.Err() != nil || time.Since(start) >= p.Timeout
		cancel()
		if ctx.Err() != nil {
			return // a check cut short by shutdown says nothing about the server
		}
		if err != nil && timedOut {
			err = fmt.Errorf("no answer within the check timeout %s: %w", p.Timeout, err)
		}
		changed := st.Observe(err, time.Now(), p)
		report(Report{Addr: addr, State: st, Changed: changed})
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
