package discovery

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

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

// TestConsulEmptyAnswer: a service with no passing instance is an empty
// answer (errors.Is ErrEmpty) that names the Consul address and the
// service, and, when Consul says ACLs are in play, hints at the token's
// service:read. Real 1-server clusters: a plain one, and a secure one
// (HTTPS, ACLs default deny).
func TestConsulEmptyAnswer(t *testing.T) {
	first := func(t *testing.T, src Consul) error {
		t.Helper()
		c := run(t, src)
		_, err := c.waitErr(t, 0, 15*time.Second)
		t.Logf("%s service %q: %v", src.Address, src.Service, err)
		if !errors.Is(err, ErrEmpty) {
			t.Errorf("error %v is not an empty answer (ErrEmpty)", err)
		}
		want := fmt.Sprintf("consul %s service %q: no passing instance", src.Address, src.Service)
		if !strings.HasPrefix(err.Error(), want) {
			t.Errorf("error %q does not start with %q", err, want)
		}
		return err
	}
	t.Run("plain", func(t *testing.T) {
		c := consul.StartCluster(t, 1)
		err := first(t, Consul{Address: c.HTTPAddr(), Service: "web"})
		if strings.Contains(err.Error(), "ACL") {
			t.Errorf("error %q hints at ACLs on a cluster without them", err)
		}
	})
	t.Run("acl", func(t *testing.T) {
		c := consul.StartClusterWith(t, 1, consul.Options{Secure: true})
		tlsCfg := TLS{CAFile: c.CAFile, ServerName: consul.ServerName}
		// No token: the anonymous token may read nothing; Consul says
		// only that the default policy is deny.
		err := first(t, Consul{Address: c.HTTPAddr(), Service: "consul", TLS: tlsCfg})
		if want := `the ACL default policy is deny and no token is set, so ACLs may hide it: give consul.tokenFile a token with service:read on "consul"`; !strings.Contains(err.Error(), want) {
			t.Errorf("error %q: want the hint %q", err, want)
		}
		// A token that may read nodes but no service: Consul filters the
		// servers' own service out and says so.
		tok := nodesOnlyToken(t, c, tlsCfg)
		err = first(t, Consul{Address: c.HTTPAddr(), Service: "consul", Token: tok, TLS: tlsCfg})
		if want := `ACLs filtered the answer (X-Consul-Results-Filtered-By-ACLs): does the token have service:read on "consul"?`; !strings.Contains(err.Error(), want) {
			t.Errorf("error %q: want the hint %q", err, want)
		}
		// The management token, a service that does not exist: nothing was
		// filtered, but the default policy is deny.
		err = first(t, Consul{Address: c.HTTPAddr(), Service: "web", TokenFile: c.TokenFile, TLS: tlsCfg})
		if strings.Contains(err.Error(), "no token") {
			t.Errorf("error %q: a token is set", err)
		}

		if want := `the ACL default policy is deny, so ACLs may hide it: does the token have service:read on "web"?`; !strings.Contains(err.Error(), want) {
			t.Errorf("error %q: want the hint %q", err, want)
		}
		// Readiness tells these from errors: a token Consul does not know
		// is answered (403), so not Unreachable; a port nothing listens on
		// is.
		c403 := run(t, Consul{Address: c.HTTPAddr(), Service: "consul", Token: "00000000-0000-4000-8000-000000000001", TLS: tlsCfg})
		_, err = c403.waitErr(t, 0, 15*time.Second)
		t.Logf("unknown token: %v", err)
		if errors.Is(err, ErrEmpty) || Unreachable(err) {
			t.Errorf("unknown token: %v: want an answered error (not empty, not unreachable)", err)
		}
		l, lerr := net.Listen("tcp", "127.0.0.1:0")
		if lerr != nil {
			t.Fatal(lerr)
		}
		closed := "http://" + l.Addr().String()
		l.Close()
		cc := run(t, Consul{Address: closed, Service: "web"})
		_, err = cc.waitErr(t, 0, 15*time.Second)
		t.Logf("closed port: %v", err)
		if !Unreachable(err) {
			t.Errorf("closed port: %v: want Unreachable", err)
		}
	})
}

// nodesOnlyToken makes an ACL token with node:read on every node and no
// service rule, with the cluster's management token.
func nodesOnlyToken(t *testing.T, c *consul.Cluster, tlsCfg TLS) string {
	t.Helper()
	u, err := url.Parse(c.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	client, err := api.NewClient(&api.Config{
		Address: u.Host, Scheme: u.Scheme, Token: c.Token,
		TLSConfig: api.TLSConfig{CAFile: tlsCfg.CAFile, Address: tlsCfg.ServerName},
	})
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := client.ACL().PolicyCreate(&api.ACLPolicy{Name: "nodes-only", Rules: `node_prefix "" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatalf("create policy: %v", err)
	}
	tok, _, err := client.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: p.ID}}}, nil)
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	return tok.SecretID
}
