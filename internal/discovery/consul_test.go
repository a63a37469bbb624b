package discovery

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/ctlb/ctlb/test/consul"
)

// TestConsul runs against a real 3-server cluster: the source lists the
// servers on the configured port, follows catalog changes through blocking
// queries, and reports an error (without emitting a list) when its agent
// dies.
func TestConsul(t *testing.T) {
	c := consul.StartCluster(t, 3)
	servers := c.Servers()
	agent, err := c.Follower()
	if err != nil {
		t.Fatal(err)
	}
	var want []netip.AddrPort
	for _, s := range servers {
		want = append(want, s.GRPCAddr())
	}
	want = Normalize(want)
	col := run(t, Consul{Address: agent.HTTPAddr()})
	col.waitServers(t, 0, 10*time.Second, want)

	// Catalog changes at a known moment: register and deregister external
	// nodes of service "web", port 7000 taken from the source's config.
	web := run(t, Consul{Address: agent.HTTPAddr(), Service: "web", Port: 7000})
	if err := c.Register("web-0", netip.MustParseAddr("198.18.201.100"), "web", 80); err != nil {
		t.Fatal(err)
	}
	next := web.waitServers(t, 0, 10*time.Second, aps(t, "198.18.201.100:7000"))
	var add, del []time.Duration
	for i := range 10 {
		node := fmt.Sprintf("web-%d", i+1)
		addr := netip.AddrFrom4([4]byte{198, 18, 201, byte(i + 1)})
		if err := c.Register(node, addr, "web", 80); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, next = web.waitFor(t, next, 10*time.Second, "the new node", func(r Result) bool {
			return r.Err == nil && slices.Contains(r.Servers, netip.AddrPortFrom(addr, 7000))
		})
		add = append(add, time.Since(start))
		if err := c.Deregister(node); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		_, next = web.waitFor(t, next, 10*time.Second, "the node gone", func(r Result) bool {
			return r.Err == nil && !slices.Contains(r.Servers, netip.AddrPortFrom(addr, 7000))
		})
		del = append(del, time.Since(start))
	}
	t.Logf("catalog register -> source list: %s", summary(add))
	t.Logf("catalog deregister -> source list: %s", summary(del))

	// The agent dies: errors, and no list (the caller keeps its last one).
	col.mu.Lock()
	from := len(col.results)
	col.mu.Unlock()
	agent.Stop()
	next, err = col.waitErr(t, from, 10*time.Second)
	t.Logf("agent gone: %v", err)
	col.mu.Lock()
	for _, r := range col.results[from:] {
		if r.Err == nil && !slices.Equal(r.Servers, want) {
			t.Errorf("after the agent died the source emitted %v", r.Servers)
		}
	}
	col.mu.Unlock()
	// Back again: the source recovers by itself (with backoff).
	agent.Start()
	col.waitFor(t, next, 30*time.Second, "a list again", func(r Result) bool { return r.Err == nil && len(r.Servers) > 0 })
}

// summary gives median and worst of some durations.
func summary(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("n=%d median %s worst %s", len(s), s[len(s)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}
