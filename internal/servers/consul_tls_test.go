package servers

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/test/consul"
)

// TestConsulSecureReadiness runs the real 3-server cluster as production
// does (HTTPS, gRPC over TLS, ACLs with default deny, the bootstrap token
// in a file): the tracker follows the catalog over HTTPS with the token
// file and checks the servers with the consul type over TLS. A brand-new
// server enters the set only once a real WatchServers call to it lists a
// ready server, not when its port opens; a killed one leaves.
func TestConsulSecureReadiness(t *testing.T) {
	c := consul.StartClusterWith(t, 3, consul.Options{Secure: true})
	agent, err := c.Follower()
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg := &TLSConfig{CAFile: c.CAFile, ServerName: consul.ServerName}
	cfg := Config{
		Consul: &ConsulConfig{Address: agent.HTTPAddr(), Port: consul.GRPCTLSPort, TokenFile: c.TokenFile, TLS: tlsCfg},
		Health: HealthConfig{Type: "consul", TLS: tlsCfg, Interval: Duration(200 * time.Millisecond), Timeout: Duration(200 * time.Millisecond)},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	o, err := cfg.Options(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, rec := startTracker(t, "consul-tls", o)
	start := time.Now()
	defer func() {
		if t.Failed() {
			t.Logf("tracker status: %+v", tr.Snapshot())
		}
	}()
	_, next := rec.wait(t, 0, grpcAddrs(c.Servers()), 20*time.Second)
	t.Logf("learned all 3 servers over HTTPS, consul-checked over TLS, %s after start", time.Since(start).Round(time.Millisecond))

	// Without the token the same check fails: ACLs are really on.
	ck := health.Consul{}
	if k, err := cfg.Checker(); err == nil {
		ck = k.(health.Consul)
	}
	ck.TokenFile, ck.Token = "", ""
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	err = ck.Check(ctx, agent.GRPCAddr())
	cancel()
	t.Logf("consul check without a token: %v", err)
	if err == nil {
		t.Error("a consul check without a token passed: ACLs are not enforced")
	}

	// A new server: note when its TLS gRPC port opens, when the catalog
	// lists it and when it enters the set.
	added := time.Now()
	s4 := c.AddServer()
	// A probe beside the tracker: when the TCP port first accepts, and
	// whether a consul check failed while it already did (the window in
	// which a TCP check would have let the server in too early).
	k, err := cfg.Checker()
	if err != nil {
		t.Fatal(err)
	}
	type probeResult struct {
		portOpen   time.Duration
		failedOpen int   // consul checks failed with the port open
		lastErr    error // of those
		ready      time.Duration
	}
	probed := make(chan probeResult, 1)
	go func() {
		var r probeResult
		r.portOpen, r.ready = -1, -1
		for time.Since(added) < 30*time.Second {
			conn, err := net.DialTimeout("tcp", s4.GRPCAddr().String(), 100*time.Millisecond)
			if err == nil {
				conn.Close()
				if r.portOpen < 0 {
					r.portOpen = time.Since(added)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
				err := k.Check(ctx, s4.GRPCAddr())
				cancel()
				if err == nil {
					r.ready = time.Since(added)
					break
				}
				r.failedOpen++
				r.lastErr = err
			}
			time.Sleep(20 * time.Millisecond)
		}
		probed <- r
	}()
	want := grpcAddrs(c.Servers())
	ch, next := rec.wait(t, next, want, 30*time.Second)
	entered := ch.at.Sub(added)
	// The moment it is in, it serves: a WatchServers call on it succeeds.
	ctx, cancel = context.WithTimeout(context.Background(), 2*time.Second)
	err = k.Check(ctx, s4.GRPCAddr())
	cancel()
	if err != nil {
		t.Fatalf("the new server entered the set (%s) but a WatchServers call fails: %v", ch.reason, err)
	}
	pr := <-probed
	t.Logf("FIGURE new server: TLS gRPC port open after %s; consul check first passed (probe) after %s, failing %d times with the port open (last: %v); in the set after %s (%s)",
		pr.portOpen.Round(time.Millisecond), pr.ready.Round(time.Millisecond), pr.failedOpen, pr.lastErr, entered.Round(time.Millisecond), ch.reason)
	if pr.portOpen < 0 || entered < pr.portOpen {
		t.Fatalf("the server entered the set (%s) before its port opened (%s)", entered, pr.portOpen)
	}
	if pr.failedOpen == 0 {
		t.Errorf("the consul check never failed while the new server's port was open: it tells nothing a TCP check does not")
	}
	for _, s := range tr.Snapshot().Servers {
		if s.Addr == s4.GRPCAddr() {
			t.Logf("new server status: %+v", s)
		}
	}

	// A killed server leaves.
	victim, err := c.Follower()
	if err != nil {
		t.Fatal(err)
	}
	if victim == agent {
		for _, s := range c.Servers() {
			if s != agent && s != victim && s.Running() {
				victim = s
				break
			}
		}
	}
	killed := time.Now()
	victim.Stop()
	rest := slices.DeleteFunc(slices.Clone(want), func(a netip.AddrPort) bool { return a == victim.GRPCAddr() })
	ch, _ = rec.wait(t, next, rest, 10*time.Second)
	t.Logf("killed %s: out of the set after %s (%s)", victim.Name, ch.at.Sub(killed).Round(time.Millisecond), ch.reason)
}
