package discovery

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-cleanhttp"
)

// Consul defaults.
const (
	DefaultConsulAddress = "http://127.0.0.1:8500"
	DefaultConsulService = "consul"
	DefaultConsulWait    = 60 * time.Second
	// DefaultConsulMinInterval is the least time between the starts of two
	// queries of one watch (plus up to half of it again as jitter). A
	// blocking query that comes back at once with an unchanged index (an
	// agent restarting, a proxy in the way) costs a few requests a second,
	// never a tight loop; a change is still seen the moment it happens.
	DefaultConsulMinInterval = 500 * time.Millisecond
	// consulChangedInterval is the least time between the starts of two
	// queries when the index moved: a catalog that changes all the time
	// costs at most a few queries a second too.
	consulChangedInterval = 100 * time.Millisecond
	// Error back-off: from the first to the last, doubling, with jitter.
	consulBackoffMin = time.Second
	consulBackoffMax = 30 * time.Second
	// maxConsulBody bounds an answer; maxConsulErrorBody an error answer.
	maxConsulBody      = 16 << 20
	maxConsulErrorBody = 4 << 10
)

// The standard variables of every Consul tool; each applies when the
// config leaves its field unset. (The api package also reads
// CONSUL_HTTP_TOKEN when neither a token nor a token file is set anywhere.)
const (
	EnvHTTPAddr      = "CONSUL_HTTP_ADDR"
	EnvHTTPTokenFile = "CONSUL_HTTP_TOKEN_FILE"
	EnvCACert        = "CONSUL_CACERT"
	EnvClientCert    = "CONSUL_CLIENT_CERT"
	EnvClientKey     = "CONSUL_CLIENT_KEY"
	EnvTLSServerName = "CONSUL_TLS_SERVER_NAME"
)

// TLS is how a client checks a server and proves itself: the CA that signs
// the server's certificate, the client's own certificate and key (for
// servers that verify clients), and the name expected in the server's
// certificate when it is not the address dialed.
type TLS struct {
	CAFile             string
	CertFile           string
	KeyFile            string
	ServerName         string
	InsecureSkipVerify bool
}

// Config builds a crypto/tls client config, reading the files now.
func (t TLS) Config() (*tls.Config, error) {
	c, err := api.SetupTLSConfig(&api.TLSConfig{
		Address: t.ServerName, CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile,
		InsecureSkipVerify: t.InsecureSkipVerify,
	})
	if err != nil {
		return nil, fmt.Errorf("tls (caFile %q, certFile %q, keyFile %q): %w", t.CAFile, t.CertFile, t.KeyFile, err)
	}
	return c, nil
}

// Consul follows the passing instances of one service in a Consul catalog
// with blocking queries through the official client
// (github.com/hashicorp/consul/api): Consul answers the moment the list
// changes, so a change arrives within a fraction of a second rather than
// on a poll.
//
// Queries are "stale" (AllowStale): any server may answer from its own
// copy of the catalog, so the list keeps flowing while the cluster elects
// a new leader (exactly when ctlb must not lose its servers).
//
// Sources with the same query (address, service, datacenter, credentials,
// TLS) share one watch in the process, however many VIPs use them: the load
// on Consul is one blocking query per distinct query per daemon.
type Consul struct {
	// Address is the HTTP API of a Consul agent or server, http:// or
	// https:// (CONSUL_HTTP_ADDR, else DefaultConsulAddress).
	Address string
	// Service is the service whose instances are the servers
	// (DefaultConsulService: the Consul servers themselves).
	Service string
	// Port is the port put on every address (DefaultPort: the servers'
	// gRPC/xDS port, not the port registered for the service).
	Port uint16
	// TokenFile holds the ACL token; it is read before every query, so a
	// rotated token is used at once (CONSUL_HTTP_TOKEN_FILE).
	TokenFile string
	// Token is an ACL token given inline. Discouraged: it sits in the
	// config file and in ctlbd's memory dumps; use TokenFile.
	Token string
	// Datacenter asks another datacenter's catalog when set.
	Datacenter string
	// TLS for https:// addresses (CONSUL_CACERT, CONSUL_CLIENT_CERT,
	// CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME fill unset fields).
	TLS TLS
	// Wait is the longest a blocking query is held (DefaultConsulWait).
	Wait time.Duration
	// MinInterval is the least time between two queries
	// (DefaultConsulMinInterval).
	MinInterval time.Duration
}

// Name implements Source.
func (Consul) Name() string { return "consul" }

// Resolved fills the defaults and the standard environment variables into
// the fields the config left unset.
func (c Consul) Resolved() Consul {
	env := func(field *string, name string) {
		if *field == "" {
			*field = os.Getenv(name)
		}
	}
	env(&c.Address, EnvHTTPAddr)
	if c.Token == "" {
		env(&c.TokenFile, EnvHTTPTokenFile)
	}
	env(&c.TLS.CAFile, EnvCACert)
	env(&c.TLS.CertFile, EnvClientCert)
	env(&c.TLS.KeyFile, EnvClientKey)
	env(&c.TLS.ServerName, EnvTLSServerName)
	if c.Address == "" {
		c.Address = DefaultConsulAddress
	}
	if !strings.Contains(c.Address, "://") {
		c.Address = "http://" + c.Address // CONSUL_HTTP_ADDR is often host:port
	}
	if c.Service == "" {
		c.Service = DefaultConsulService
	}
	if c.Wait <= 0 {
		c.Wait = DefaultConsulWait
	}
	if c.MinInterval <= 0 {
		c.MinInterval = DefaultConsulMinInterval
	}
	c.Port = portOr(c.Port)
	return c
}

// query is what makes two sources one watch: everything but the port.
func (c Consul) query() Consul {
	c.Port = 0
	return c
}

// Run follows the service until ctx is done.
func (c Consul) Run(ctx context.Context, emit func(Result)) {
	c = c.Resolved()
	w := consulWatches.join(c.query())
	defer consulWatches.leave(w)
	seen := uint64(0)
	for {
		ans, version, changed := w.latest()
		if version != seen {
			seen = version
			emit(ans.result(c.Port))
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// instance is one passing instance in the catalog.
type instance struct {
	node, id string
	addr     netip.Addr
}

// consulAnswer is one answer of a watch, before a VIP's port is applied.
type consulAnswer struct {
	instances []instance
	rejected  []Rejected
	err       error
	// empty is the error of an answer without a usable instance, naming
	// the query and what the ACLs may have to do with it.
	empty error
}

func (a consulAnswer) result(port uint16) Result {
	if a.err != nil {
		return Result{Err: a.err}
	}
	out := make([]netip.AddrPort, 0, len(a.instances))
	for _, in := range a.instances {
		out = append(out, netip.AddrPortFrom(in.addr, port))
	}
	r := Result{Servers: out, Rejected: a.rejected}
	if len(out) == 0 {
		r.Err = a.empty
		if r.Err == nil {
			r.Err = ErrEmpty
		}
	}
	return r
}

// consulWatches are the running watches of this process.
var consulWatches = &consulHub{watches: map[Consul]*consulWatch{}}

type consulHub struct {
	mu      sync.Mutex
	watches map[Consul]*consulWatch
}

// consulWatch runs one blocking-query loop and hands its latest answer to
// every source that shares it.
type consulWatch struct {
	q      Consul
	users  int
	cancel context.CancelFunc

	mu      sync.Mutex
	ans     consulAnswer
	version uint64        // 0: no answer yet
	changed chan struct{} // closed at the next answer
}

func (h *consulHub) join(q Consul) *consulWatch {
	h.mu.Lock()
	defer h.mu.Unlock()
	w := h.watches[q]
	if w == nil {
		ctx, cancel := context.WithCancel(context.Background())
		w = &consulWatch{q: q, cancel: cancel, changed: make(chan struct{})}
		h.watches[q] = w
		go w.run(ctx)
	}
	w.users++
	return w
}

func (h *consulHub) leave(w *consulWatch) {
	h.mu.Lock()
	defer h.mu.Unlock()
	w.users--
	if w.users == 0 {
		w.cancel()
		delete(h.watches, w.q)
	}
}

func (w *consulWatch) latest() (consulAnswer, uint64, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ans, w.version, w.changed
}

func (w *consulWatch) publish(a consulAnswer) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ans = a
	w.version++
	close(w.changed)
	w.changed = make(chan struct{})
}

// jitter adds up to half of d.
func jitter(d time.Duration) time.Duration {
	return d + rand.N(d/2+1)
}

// run is the query loop: a blocking query on the last index, at most one
// query per MinInterval (with jitter) whatever the server does, back-off
// with jitter on errors, and a fresh client after an error (so rotated
// certificates are read again).
func (w *consulWatch) run(ctx context.Context) {
	q := w.q
	bo := backoff{min: consulBackoffMin, max: consulBackoffMax}
	var client *consulClient
	var index uint64
	for {
		start := time.Now()
		var ans consulAnswer
		var next uint64
		var err error
		if client == nil {
			client, err = newConsulClient(q)
		}
		if err == nil {
			ans, next, err = client.fetch(ctx, index)
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			w.publish(consulAnswer{err: err})
			client, index = nil, 0 // start over: new client, non-blocking read
			if !sleep(ctx, jitter(bo.next())) {
				return
			}
			continue
		}
		bo.reset()
		// A new index is news, fetched again soon; the same index again
		// (a blocking query that did not block) waits the full interval.
		floor := q.MinInterval
		if next != index {
			floor = min(q.MinInterval, consulChangedInterval)
		}
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
		w.publish(ans)
		if !sleep(ctx, time.Until(start.Add(jitter(floor)))) {
			return
		}
	}
}

// consulClient is one api.Client with what a query needs around it.
type consulClient struct {
	q        Consul
	api      *api.Client
	host     string
	loopback bool   // the agent is on this host
	nodeName string // the agent's node name, once asked ("" until then)
}

func newConsulClient(q Consul) (*consulClient, error) {
	u, err := url.Parse(q.Address)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("consul address %q: want http://host:port or https://host:port", q.Address)
	}
	tr := cleanhttp.DefaultPooledTransport()
	if u.Scheme == "https" {
		tc, err := q.TLS.Config()
		if err != nil {
			return nil, fmt.Errorf("consul %s: %w", q.Address, err)
		}
		tr.TLSClientConfig = tc
	}
	httpClient := &http.Client{
		Transport: &boundedTransport{next: tr},
		// Consul adds up to Wait/16 of jitter to a blocking query.
		Timeout: q.Wait + q.Wait/16 + 10*time.Second,
		// The token must never go to another host: follow a redirect only
		// on the same scheme, host and port (Consul itself never
		// redirects these reads).
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if req.URL.Scheme != u.Scheme || req.URL.Host != u.Host {
				return fmt.Errorf("redirect to %s://%s refused: the token goes to %s only", req.URL.Scheme, req.URL.Host, u.Host)
			}
			if len(via) >= 3 {
				return errors.New("too many redirects")
			}
			return nil
		},
	}
	cfg := &api.Config{
		Address:    q.Address,
		Datacenter: q.Datacenter,
		HttpClient: httpClient,
		Token:      q.Token,
		TokenFile:  q.TokenFile,
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("consul %s: %w", q.Address, err)
	}
	cc := &consulClient{q: q, api: c, host: u.Hostname()}
	if a, err := netip.ParseAddr(cc.host); err == nil {
		cc.loopback = a.IsLoopback()
	} else {
		cc.loopback = cc.host == "localhost"
	}
	return cc, nil
}

// token is the token for the next query: the token file's current content
// when there is one.
func (c *consulClient) token() (string, error) {
	if c.q.TokenFile == "" {
		return c.q.Token, nil
	}
	b, err := os.ReadFile(c.q.TokenFile)
	if err != nil {
		return "", fmt.Errorf("consul token file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// fetch reads the passing instances once. With index > 0 it blocks until
// the catalog's index passes index or Wait runs out. It returns the answer
// and the index to wait on next.
func (c *consulClient) fetch(ctx context.Context, index uint64) (consulAnswer, uint64, error) {
	tok, err := c.token()
	if err != nil {
		return consulAnswer{}, 0, err
	}
	opts := (&api.QueryOptions{
		AllowStale: true,
		WaitIndex:  index,
		WaitTime:   c.q.Wait,
		Token:      tok,
	}).WithContext(ctx)
	entries, meta, err := c.api.Health().Service(c.q.Service, "", true, opts)
	if err != nil {
		return consulAnswer{}, 0, fmt.Errorf("consul %s service %q: %w", c.q.Address, c.q.Service, truncated{err, MaxErrorText})
	}
	var ans consulAnswer
	for _, e := range entries {
		if e == nil || e.Node == nil || e.Service == nil {
			continue
		}
		// The service's own address when it registered one, else its node's.
		s := e.Service.Address
		if s == "" {
			s = e.Node.Address
		}
		entry := fmt.Sprintf("%s on node %s (%s)", e.Service.ID, e.Node.Node, s)
		a, err := netip.ParseAddr(s)
		if err != nil {
			ans.rejected = append(ans.rejected, Rejected{Entry: Truncate(entry, 128), Reason: "address is not an IP address"})
			continue
		}
		a = a.Unmap()
		if a.IsLoopback() && !c.isLocalNode(e.Node.Node) {
			// 127.0.0.1 in the catalog is that node's own loopback: from
			// here (and from a pod) it is somewhere else entirely.
			ans.rejected = append(ans.rejected, Rejected{Entry: Truncate(entry, 128), Reason: "loopback address of another host"})
			continue
		}
		ans.instances = append(ans.instances, instance{node: e.Node.Node, id: e.Service.ID, addr: a})
	}
	if len(ans.instances) == 0 {
		ans.empty = c.emptyError(meta, len(ans.rejected), tok != "" || os.Getenv("CONSUL_HTTP_TOKEN") != "")
	}
	return ans, meta.LastIndex, nil
}

// emptyError says that the service has no passing instance, where, and
// when the answer says ACLs are in play, that they may be why: Consul
// answers 200 [] both to a token that may not read the service (its
// instances filtered out) and to a query without a token on a cluster
// whose default policy is deny.
func (c *consulClient) emptyError(meta *api.QueryMeta, rejected int, token bool) error {
	msg := fmt.Sprintf("consul %s service %q: no passing instance", c.q.Address, c.q.Service)
	if rejected > 0 {
		msg = fmt.Sprintf("consul %s service %q: no usable passing instance (%d left out)", c.q.Address, c.q.Service, rejected)
	}
	switch {
	case meta != nil && meta.ResultsFilteredByACLs:
		msg += fmt.Sprintf("; ACLs filtered the answer (X-Consul-Results-Filtered-By-ACLs): does the token have service:read on %q?", c.q.Service)
	case meta != nil && strings.EqualFold(meta.DefaultACLPolicy, "deny") && !token:
		msg += fmt.Sprintf("; the ACL default policy is deny and no token is set, so ACLs may hide it: give consul.tokenFile a token with service:read on %q", c.q.Service)
	case meta != nil && strings.EqualFold(meta.DefaultACLPolicy, "deny"):
		msg += fmt.Sprintf("; the ACL default policy is deny, so ACLs may hide it: does the token have service:read on %q?", c.q.Service)
	}
	return emptyError(msg)
}

// isLocalNode tells whether node is the agent ctlbd talks to, on this
// host: only then is a loopback address in the catalog reachable here.
func (c *consulClient) isLocalNode(node string) bool {
	if !c.loopback {
		return false
	}
	if c.nodeName == "" {
		// Agent.NodeName has no context; the client's timeout bounds it.
		n, err := c.api.Agent().NodeName()
		if err != nil {
			return false
		}
		c.nodeName = n
	}
	return c.nodeName == node
}

// consulRequests counts every HTTP request to Consul in this process.
var consulRequests atomic.Uint64

// ConsulRequests is how many HTTP requests this process has sent to Consul
// (every watch), for the ctlb_consul_requests_total metric.
func ConsulRequests() uint64 { return consulRequests.Load() }

// boundedTransport limits what an answer may make ctlbd read (an error
// body is short; a real answer is bounded too).
type boundedTransport struct {
	next http.RoundTripper
}

func (t *boundedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	consulRequests.Add(1)
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	limit := int64(maxConsulBody)
	if resp.StatusCode != http.StatusOK {
		limit = maxConsulErrorBody
	}
	resp.Body = limitedBody{Reader: io.LimitReader(resp.Body, limit), Closer: resp.Body}
	return resp, nil
}

type limitedBody struct {
	io.Reader
	io.Closer
}
