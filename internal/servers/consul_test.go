package servers

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/test/consul"
)

func grpcAddrs(ss []*consul.Server) []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range ss {
		out = append(out, s.GRPCAddr())
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return out
}

// TestConsulServers follows a real 3-server Consul cluster with the
// default config ({"consul": {"address": ...}}: service "consul", port
// 8502, TCP checks every 1 s, rise 2, fall 1): the tracker learns all
// three; a killed server (follower or leader) leaves the set within 2 s,
// over 20 trials; a new server on a new address arrives within 2 s of the
// catalog listing it.
func TestConsulServers(t *testing.T) {
	c := consul.StartCluster(t, 3)
	leader, err := c.Leader()
	if err != nil {
		t.Fatal(err)
	}
	// The source asks a follower, so that the leader can be killed too.
	var agent *consul.Server
	for _, s := range c.Servers() {
		if s != leader {
			agent = s
			break
		}
	}
	cfg := Config{Consul: &ConsulConfig{Address: agent.HTTPAddr()}}
	o, err := cfg.Options(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, rec := startTracker(t, "consul-servers", o)
	all := grpcAddrs(c.Servers())
	start := time.Now()
	_, next := rec.wait(t, 0, all, 15*time.Second)
	t.Logf("learned all 3 servers %s after the tracker started", time.Since(start).Round(time.Millisecond))

	// Death -> removal, 20 trials. The victim is never the source's agent;
	// trial 0 kills the leader, the others a follower.
	var deaths, backs []time.Duration
	for i := range 20 {
		var victim *consul.Server
		if i == 0 {
			victim = leader
		} else {
			l, err := c.Leader()
			if err != nil {
				t.Fatalf("trial %d: %v", i, err)
			}
			for _, s := range c.Servers() {
				if s != agent && s != l {
					victim = s
					break
				}
			}
		}
		killed := time.Now()
		victim.Stop()
		ch, n := rec.wait(t, next, without(all, victim.GRPCAddr()), 10*time.Second)
		next = n
		d := ch.at.Sub(killed)
		deaths = append(deaths, d)
		// The bound: gone from the set within 2 s.
		if d > 2*time.Second {
			t.Errorf("trial %d: %s removed %s after its death, want within 2 s: %s", i, victim.Name, d, ch.reason)
		} else if d > 1200*time.Millisecond {
			t.Logf("trial %d: slow removal %s: %s", i, d, ch.reason)
		}
		victim.Start()
		restarted := time.Now()
		ch, next = rec.wait(t, next, all, 60*time.Second)
		backs = append(backs, ch.at.Sub(restarted))
	}
	t.Logf("FIGURE death -> removal from the set (default settings, SIGKILL of a Consul server, 1 leader + 19 followers): %s", summary(deaths))
	t.Logf("restart -> back in the set (agent start, catalog, rise 2): %s", summary(backs))

	// A new server on a new address: watch the catalog beside the tracker,
	// through the same agent, to know when Consul lists it.
	from := next
	s4 := c.AddServer()
	started := time.Now()
	inCatalog := make(chan time.Time, 1)
	stop := make(chan struct{})
	watcherDone := make(chan struct{})
	var lastErr error
	var once sync.Once
	stopWatcher := func() { once.Do(func() { close(stop); <-watcherDone }) }
	defer stopWatcher()
	go func() {
		defer close(watcherDone)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			got, err := agent.Passing()
			lastErr = err
			if err == nil && slices.Contains(got, s4.Addr) {
				inCatalog <- time.Now()
				return
			}
		}
	}()
	all4 := grpcAddrs(c.Servers())
	ch, _ := rec.wait(t, from, all4, 60*time.Second)
	var listed time.Time
	select {
	case listed = <-inCatalog:
	case <-time.After(10 * time.Second):
		stopWatcher()
		t.Fatalf("the new server is in the set but the catalog watcher never saw it (last error %v)", lastErr)
	}
	// The watcher polls every 20 ms, so the tracker (on a blocking query)
	// may see the server first: d can be below zero.
	d := ch.at.Sub(listed)
	t.Logf("FIGURE new server %s: in the set %s after its agent started; the catalog watcher saw it at %s (set - catalog = %s): %s",
		s4.Addr, ch.at.Sub(started).Round(time.Millisecond), listed.Sub(started).Round(time.Millisecond), d.Round(time.Millisecond), ch.reason)
	if d > 2*time.Second {
		t.Errorf("new server in the set %s after the catalog listed it, want within 2 s", d)
	}
	rec.checkOncePerChange(t)
	snap := tr.Snapshot()
	t.Logf("snapshot: %d changes, sources %+v", snap.Changes, snap.Sources)
	for _, s := range snap.Servers {
		if !slices.Equal(s.Sources, []string{"consul"}) {
			t.Errorf("server %s sources %v", s.Addr, s.Sources)
		}
	}
}

// TestConsulCatalogChange measures a Consul catalog change (register or
// deregister through the API) to the set change, for real servers on
// addresses of the host registered as service "web".
func TestConsulCatalogChange(t *testing.T) {
	c := consul.StartCluster(t, 3)
	// The servers listen on addresses of the host link, reachable as a
	// remote node's would be (a loopback address in the catalog is that
	// node's own loopback, which the source leaves out).
	hostAddr := func(i int) netip.Addr { return c.AddHostAddr(byte(200 + i)) }
	baseAddr := hostAddr(10)
	port := freeAddr(t, baseAddr.String()).Port()
	var addrs []netip.AddrPort
	for i := range 10 {
		a := netip.AddrPortFrom(hostAddr(i), port)
		newServer(t, a)
		addrs = append(addrs, a)
	}
	if err := c.Register("web-base", baseAddr, "web", int(port)); err != nil {
		t.Fatal(err)
	}
	base := newServer(t, netip.AddrPortFrom(baseAddr, port))
	// The source asks a follower, which learns of a commit from the leader
	// (as a daemon's local agent would), not the leader itself.
	agent, err := c.Follower()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Consul: &ConsulConfig{Address: agent.HTTPAddr(), Service: "web", Port: port}}
	o, err := cfg.Options(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, rec := startTracker(t, "web", o)
	_, next := rec.wait(t, 0, []netip.AddrPort{base.addr}, 15*time.Second)
	var adds, dels []time.Duration
	for i, a := range addrs {
		node := fmt.Sprintf("web-%d", i)
		if err := c.Register(node, a.Addr(), "web", 80); err != nil {
			t.Fatal(err)
		}
		registered := time.Now()
		ch, n := rec.wait(t, next, []netip.AddrPort{a, base.addr}, 10*time.Second)
		adds = append(adds, ch.at.Sub(registered))
		if err := c.Deregister(node); err != nil {
			t.Fatal(err)
		}
		deregistered := time.Now()
		ch, next = rec.wait(t, n, []netip.AddrPort{base.addr}, 10*time.Second)
		dels = append(dels, ch.at.Sub(deregistered))
	}
	t.Logf("FIGURE Consul catalog register -> set change (blocking query + first TCP check): %s", summary(adds))
	t.Logf("FIGURE Consul catalog deregister -> set change (blocking query): %s", summary(dels))
	rec.checkOncePerChange(t)
}
