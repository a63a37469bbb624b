package discovery

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// TestDNSFollowsTTL: with a long Interval, a TTL of 1 s drives the lookups:
// the list follows the records the real server hands out.
func TestDNSFollowsTTL(t *testing.T) {
	d := testutil.StartDNSMasq(t, map[string][]string{
		"consul-server.test": {"198.18.5.1", "198.18.5.2"},
	}, 1)
	c := run(t, DNS{Host: "consul-server.test", Resolver: d.Addr.String(), Interval: time.Minute})
	next := c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.5.1:8502", "198.18.5.2:8502"))

	d.SetRecords(map[string][]string{"consul-server.test": {"198.18.5.2", "198.18.5.3", "198.18.5.4"}})
	start := time.Now()
	next = c.waitServers(t, next, 10*time.Second, aps(t, "198.18.5.2:8502", "198.18.5.3:8502", "198.18.5.4:8502"))
	t.Logf("record change seen after %s (TTL 1 s)", time.Since(start).Round(time.Millisecond))

	// The name goes away: an error, never an empty list.
	d.SetRecords(map[string][]string{"other.test": {"198.18.5.9"}})
	_, err := c.waitErr(t, next, 10*time.Second)
	t.Logf("name gone: %v", err)
}

// TestDNSInterval: with a long TTL, Interval drives the lookups; a server
// that stops answering gives errors, and the port set on the source is used.
func TestDNSInterval(t *testing.T) {
	d := testutil.StartDNSMasq(t, map[string][]string{"svc.test": {"198.18.6.1"}}, 3600)
	c := run(t, DNS{Host: "svc.test.", Resolver: d.Addr.String(), Port: 9000, Interval: 300 * time.Millisecond})
	next := c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.6.1:9000"))
	d.SetRecords(map[string][]string{"svc.test": {"198.18.6.2"}})
	next = c.waitServers(t, next, 5*time.Second, aps(t, "198.18.6.2:9000"))

	d.Stop()
	_, err := c.waitErr(t, next, 10*time.Second)
	t.Logf("server gone: %v", err)
}

// TestDNSLookupErrors covers the answers that must be errors.
func TestDNSLookupErrors(t *testing.T) {
	d := testutil.StartDNSMasq(t, map[string][]string{"svc.test": {"198.18.6.1"}}, 60)
	ctx := context.Background()
	if _, _, err := (DNS{Host: "missing.test", Resolver: d.Addr.String()}).Lookup(ctx); err == nil {
		t.Fatal("unknown name: want an error")
	}
	if _, _, err := (DNS{Host: "", Resolver: d.Addr.String()}).Lookup(ctx); err == nil {
		t.Fatal("empty name: want an error")
	}
	got, ttl, err := (DNS{Host: "svc.test", Resolver: d.Addr.String()}).Lookup(ctx)
	if err != nil || !slices.Equal(got, aps(t, "198.18.6.1:8502")) || ttl != time.Minute {
		t.Fatalf("Lookup = %v ttl %s err %v; want 198.18.6.1:8502 ttl 1m", got, ttl, err)
	}
	// A resolver that answers nothing: the query times out within Timeout.
	d.Stop()
	start := time.Now()
	_, _, err = (DNS{Host: "svc.test", Resolver: d.Addr.String(), Timeout: 300 * time.Millisecond}).Lookup(ctx)
	if err == nil {
		t.Fatal("stopped server: want an error")
	}
	if errors.Is(err, ErrEmpty) {
		t.Fatalf("stopped server: %v, want a transport error", err)
	}
	t.Logf("stopped server: %v after %s", err, time.Since(start).Round(time.Millisecond))
}
