package discovery

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Consul defaults.
const (
	DefaultConsulAddress = "http://127.0.0.1:8500"
	DefaultConsulService = "consul"
	DefaultConsulWait    = 60 * time.Second
)

// Consul follows the passing instances of one service in a Consul catalog
// with blocking queries (/v1/health/service/NAME?passing&index=N): Consul
// answers the moment the list changes, so a change arrives within a
// fraction of a second rather than on a poll.
//
// Queries are "stale": any server may answer from its own copy of the
// catalog, so the list keeps flowing while the cluster elects a new leader
// (exactly when ctlb must not lose its servers).
type Consul struct {
	// Address is the HTTP API of a Consul agent or server
	// (DefaultConsulAddress).
	Address string
	// Service is the service whose instances are the servers
	// (DefaultConsulService: the Consul servers themselves).
	Service string
	// Port is the port put on every address (DefaultPort: the servers'
	// gRPC/xDS port, not the port registered for the service).
	Port uint16
	// Token is sent as X-Consul-Token when set.
	Token string
	// Datacenter asks another datacenter's catalog when set.
	Datacenter string
	// Wait is the longest a blocking query is held (DefaultConsulWait).
	Wait time.Duration
	// Client makes the requests; nil uses a client with timeouts fit for
	// Wait.
	Client *http.Client
}

// Name implements Source.
func (Consul) Name() string { return "consul" }

func (c Consul) withDefaults() Consul {
	if c.Address == "" {
		c.Address = DefaultConsulAddress
	}
	if c.Service == "" {
		c.Service = DefaultConsulService
	}
	if c.Wait <= 0 {
		c.Wait = DefaultConsulWait
	}
	c.Port = portOr(c.Port)
	if c.Client == nil {
		c.Client = &http.Client{
			// Consul adds up to Wait/16 of jitter to a blocking query.
			Timeout: c.Wait + c.Wait/16 + 10*time.Second,
		}
	}
	return c
}

// Run follows the service until ctx is done.
func (c Consul) Run(ctx context.Context, emit func(Result)) {
	c = c.withDefaults()
	bo := backoff{min: 250 * time.Millisecond, max: 5 * time.Second}
	var index uint64
	for {
		servers, next, err := c.Fetch(ctx, index)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			emit(Result{Err: err})
			index = 0 // start over with a fresh (non-blocking) read
			if !sleep(ctx, bo.next()) {
				return
			}
			continue
		}
		bo.reset()
		// Consul's rules for the index: one that goes backwards means the
		// catalog was restored or another server answered; start over.
		// Never block on 0.
		switch {
		case next < index:
			index = 0
		case next == 0:
			index = 1
		default:
			index = next
		}
		if len(servers) == 0 {
			emit(Result{Err: fmt.Errorf("consul service %q: %w", c.Service, ErrEmpty)})
		} else {
			emit(Result{Servers: servers})
		}
	}
}

// consulEntry is the part of a /v1/health/service answer that is used.
type consulEntry struct {
	Node struct {
		Node    string
		Address string
	}
	Service struct {
		ID      string
		Address string
	}
}

// Fetch reads the passing instances once. With index > 0 it blocks until
// the catalog's index passes index or Wait runs out. It returns the servers
// and the index to wait on next.
func (c Consul) Fetch(ctx context.Context, index uint64) ([]netip.AddrPort, uint64, error) {
	c = c.withDefaults()
	q := url.Values{}
	q.Set("passing", "")
	q.Set("stale", "")
	if c.Datacenter != "" {
		q.Set("dc", c.Datacenter)
	}
	if index > 0 {
		q.Set("index", strconv.FormatUint(index, 10))
		q.Set("wait", fmt.Sprintf("%dms", c.Wait.Milliseconds()))
	}
	u := strings.TrimRight(c.Address, "/") + "/v1/health/service/" + url.PathEscape(c.Service) + "?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, fmt.Errorf("consul %s: %w", c.Address, err)
	}
	if c.Token != "" {
		req.Header.Set("X-Consul-Token", c.Token)
	}
	resp, err := c.Client.Do(req)
	if err != nil {
		return nil, 0, fmt.Errorf("consul service %q: %w", c.Service, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, 0, fmt.Errorf("consul service %q: read answer: %w", c.Service, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("consul service %q: %s: %s", c.Service, resp.Status, strings.TrimSpace(string(body)))
	}
	next, err := strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("consul service %q: bad X-Consul-Index %q", c.Service, resp.Header.Get("X-Consul-Index"))
	}
	var entries []consulEntry
	if err := json.Unmarshal(body, &entries); err != nil {
		return nil, 0, fmt.Errorf("consul service %q: decode answer: %w", c.Service, err)
	}
	var out []netip.AddrPort
	for _, e := range entries {
		// The service's own address when it registered one, else its node's.
		s := e.Service.Address
		if s == "" {
			s = e.Node.Address
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, 0, fmt.Errorf("consul service %q: instance %q on node %q: address %q is not an IP address",
				c.Service, e.Service.ID, e.Node.Node, s)
		}
		if !a.Is4() {
			continue // ctlb balances IPv4 only; a dual-stack catalog is fine
		}
		out = append(out, netip.AddrPortFrom(a, c.Port))
	}
	return Normalize(out), next, nil
}
