package consul

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Ports every server listens on, on its own address.
const (
	HTTPPort = 8500
	GRPCPort = 8502
)

// Cluster is a set of real Consul servers. Topology:
//
//	host ns: link ctlbcX (HostAddr, .1)
//	   |  veth
//	node ns: bridge br0 -- veth -- server ns: eth0 (.11), eth0 (.12), ...
//
// all in one /24 of 198.19.0.0/16 (inside the test range 198.18.0.0/15).
// No namespace has a default route, so nothing leaves the machine; the
// host-side link exists so that code under test, running in the test
// process, reaches the servers as a daemon on the node would.
type Cluster struct {
	t        testing.TB
	bin      string
	dir      string
	Node     ns.NetNS
	Subnet   netip.Prefix
	HostAddr netip.Addr
	hostLink string
	// Gateway is Node's own address on the bridge when the cluster was
	// built inside a given node (Options.Node): the servers' route back
	// to the rest of the node. Invalid otherwise.
	Gateway netip.Addr

	mu      sync.Mutex
	servers []*Server
	nextIP  byte

	launch chan launchReq

	// Secure clusters (Options.Secure): HTTPS and gRPC only over TLS,
	// ACLs on with default deny.
	secure bool
	pki    *pki
	http   *http.Client
	// CAFile signs every server certificate (name ServerName).
	CAFile string
	// Token is the bootstrap (initial management) token; TokenFile holds
	// it, as a deployment would mount it.
	Token     string
	TokenFile string
}

// Server is one Consul server agent.
type Server struct {
	c       *Cluster
	Name    string
	Addr    netip.Addr
	NS      ns.NetNS
	DataDir string
	conf    string
	log     string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	started time.Time
}

// StartCluster builds (or finds) the binary, makes the topology, starts n
// servers with bootstrap_expect n and waits until the catalog lists all n
// as passing. Everything is torn down when the test ends.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	return StartClusterWith(t, n, Options{})
}

// StartClusterWith is StartCluster with options (see Options).
func StartClusterWith(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	bin, err := Build(ctx, t.Logf)
	if err != nil {
		t.Fatalf("consul binary: %v", err)
	}
	c := &Cluster{t: t, bin: bin, dir: t.TempDir(), nextIP: 11, launch: make(chan launchReq), http: httpClient}
	if opts.Secure {
		c.setupSecure()
	}
	c.startLauncher()
	c.makeNetwork(opts)
	var peers []netip.Addr
	for i := range n {
		peers = append(peers, c.ipAt(c.nextIP+byte(i)))
	}
	start := time.Now()
	for range n {
		s := c.newServer(n, peers)
		s.Start()
	}
	c.WaitPassing(60*time.Second, c.Servers()...)
	t.Logf("consul: %d servers up and passing in %s on %s", n, time.Since(start).Round(10*time.Millisecond), c.Subnet)
	return c
}

func (c *Cluster) ipAt(host byte) netip.Addr {
	b := c.Subnet.Addr().As4()
	b[3] = host
	return netip.AddrFrom4(b)
}

// pickSubnet takes a /24 of 198.19.0.0/16 that no address on the host uses
// (tests in other packages may run at the same time).
func pickSubnet(t testing.TB) netip.Prefix {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatalf("list host addresses: %v", err)
	}
	for range 100 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(100 + rand.IntN(150)), 0}), 24)
		used := false
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && p.Contains(ip) {
				used = true
			}
		}
		if !used {
			return p
		}
	}
	t.Fatal("no free /24 in 198.19.100-249.0")
	return netip.Prefix{}
}

// makeNetwork builds the node namespace, its bridge and the host link.
func (c *Cluster) makeNetwork(opts Options) {
	t := c.t
	c.Node = opts.Node
	if c.Node == nil {
		c.Node = testutil.NewNetNS(t)
	}
	c.Subnet = pickSubnet(t)
	c.HostAddr = c.ipAt(1)
	c.hostLink = fmt.Sprintf("ctlbc%d", c.Subnet.Addr().As4()[2])
	err := c.Node.Do(func(ns.NetNS) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		return netlink.LinkSetUp(br)
	})
	if err != nil {
		t.Fatalf("node netns: %v", err)
	}
	// The host end stays in the host namespace, its peer joins the bridge.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: c.hostLink},
		PeerName:      "up0",
		PeerNamespace: netlink.NsFd(int(c.Node.Fd())),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add host link %s: %v", c.hostLink, err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(c.hostLink); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	host, err := netlink.LinkByName(c.hostLink)
	if err != nil {
		t.Fatalf("host link: %v", err)
	}
	if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: prefixNet(c.HostAddr, 24)}); err != nil {
		t.Fatalf("address %s on %s: %v", c.HostAddr, c.hostLink, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		t.Fatalf("host link up: %v", err)
	}
	if err := c.Node.Do(func(ns.NetNS) error { return bridgePort("up0") }); err != nil {
		t.Fatalf("node netns: %v", err)
	}
	if opts.Node != nil {
		c.routeThroughNode()
	}
}

func prefixNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// bridgePort puts a link of the current namespace on br0 and up.
func bridgePort(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	br, err := netlink.LinkByName("br0")
	if err != nil {
		return err
	}
	if err := netlink.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("%s on br0: %w", name, err)
	}
	return netlink.LinkSetUp(l)
}

// newServer makes a namespace for one more server, joined to the bridge,
// with the next free address. expect is bootstrap_expect, join the
// addresses it retries joining.
func (c *Cluster) newServer(expect int, join []netip.Addr) *Server {
	t := c.t
	c.mu.Lock()
	ip := c.ipAt(c.nextIP)
	c.nextIP++
	name := fmt.Sprintf("s%d", len(c.servers)+1)
	c.mu.Unlock()

	s := &Server{c: c, Name: name, Addr: ip, NS: testutil.NewNetNS(t)}
	s.DataDir = filepath.Join(c.dir, name)
	s.log = filepath.Join(c.dir, name+".log")
	s.conf = filepath.Join(c.dir, name+".json")
	if err := os.MkdirAll(s.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "v" + name},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(s.NS.Fd())),
	}
	err := c.Node.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth for %s: %w", name, err)
		}
		return bridgePort("v" + name)
	})
	if err != nil {
		t.Fatalf("node netns: %v", err)
	}
	err = s.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: prefixNet(ip, 24)}); err != nil {
			return fmt.Errorf("address %s: %w", ip, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		return c.addReturnRoute(l)
	})
	if err != nil {
		t.Fatalf("server %s netns: %v", name, err)
	}

	var retry []string
	for _, a := range join {
		if a != ip {
			retry = append(retry, a.String())
		}
	}
	conf := map[string]any{
		"server":               true,
		"bootstrap_expect":     expect,
		"node_name":            name,
		"datacenter":           "dc1",
		"data_dir":             s.DataDir,
		"bind_addr":            ip.String(),
		"client_addr":          ip.String(),
		"retry_join":           retry,
		"retry_interval":       "1s",
		"log_level":            "warn",
		"disable_update_check": true,
		"leave_on_terminate":   false,
		"ui_config":            map[string]any{"enabled": false},
		"ports":                map[string]any{"grpc": GRPCPort, "grpc_tls": -1, "dns": -1},
		// RUNTIMES.md: fast Raft and autopilot, so a cluster forms in
		// about 2 s and a replacement is promoted quickly.
		"performance": map[string]any{"raft_multiplier": 1},
		"autopilot":   map[string]any{"server_stabilization_time": "2s", "cleanup_dead_servers": true},
		// Fast gossip: a dead follower leaves the catalog in about 1 s
		// instead of 5-7 s.
		"gossip_lan": map[string]any{
			"gossip_interval": "100ms", "probe_interval": "200ms", "probe_timeout": "100ms",
			"suspicion_mult": 1, "retransmit_mult": 2,
		},
	}
	if c.secure {
		if err := c.secureConf(s, conf); err != nil {
			t.Fatalf("secure config for %s: %v", name, err)
		}
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.conf, b, 0o600); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.servers = append(c.servers, s)
	c.mu.Unlock()
	// Registered after the namespace, so it runs before the namespace goes.
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			if b, err := os.ReadFile(s.log); err == nil {
				t.Logf("consul %s log (last 3000 bytes):\n%s", s.Name, tailBytes(b, 3000))
			}
		}
	})
	return s
}

func tailBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// AddServer starts one more server on a new address; it joins the cluster
// through the others. It does not wait.
func (c *Cluster) AddServer() *Server {
	var join []netip.Addr
	for _, s := range c.Servers() {
		join = append(join, s.Addr)
	}
	s := c.newServer(len(join), join)
	s.Start()
	return s
}

// Servers lists every server made, running or not.
func (c *Cluster) Servers() []*Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.servers)
}

// HTTPAddr is a running server's HTTP API ("http://ip:8500").
func (c *Cluster) HTTPAddr() string {
	for _, s := range c.Servers() {
		if s.Running() {
			return s.HTTPAddr()
		}
	}
	c.t.Fatal("no consul server is running")
	return ""
}

// HTTPAddr is this server's HTTP API (https://ip:8501 in a secure
// cluster).
func (s *Server) HTTPAddr() string {
	if s.c.secure {
		return fmt.Sprintf("https://%s:%d", s.Addr, HTTPSPort)
	}
	return fmt.Sprintf("http://%s:%d", s.Addr, HTTPPort)
}

// GRPCAddr is this server's gRPC/xDS address (the TLS port 8503 in a
// secure cluster).
func (s *Server) GRPCAddr() netip.AddrPort {
	if s.c.secure {
		return netip.AddrPortFrom(s.Addr, GRPCTLSPort)
	}
	return netip.AddrPortFrom(s.Addr, GRPCPort)
}

// launchReq asks the launcher thread to start a command.
type launchReq struct {
	cmd  *exec.Cmd
	errc chan error
}

// startLauncher runs a goroutine locked to its own OS thread that starts
// every server process, with Pdeathsig: should the test binary die (a test
// timeout), the kernel kills the servers. Pdeathsig fires when the thread
// that forked exits, so that thread must live as long as the cluster.
func (c *Cluster) startLauncher() {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(exited)
		for {
			select {
			case r := <-c.launch:
				r.errc <- r.cmd.Start()
			case <-done:
				return
			}
		}
	}()
	// Registered first, so it runs after the servers' cleanups stop them.
	c.t.Cleanup(func() { close(done); <-exited })
}

// Start runs the agent (again, with its data, after Stop).
func (s *Server) Start() {
	t := s.c.t
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		t.Fatalf("consul %s already running", s.Name)
	}
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	// nsenter (not `ip netns exec`) keeps the mounts; it execs the agent,
	// so the PID is the agent's.
	cmd := exec.Command("nsenter", "--net="+s.NS.Path(), "--", s.c.bin, "agent", "-config-file", s.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	errc := make(chan error, 1)
	s.c.launch <- launchReq{cmd: cmd, errc: errc}
	if err := <-errc; err != nil {
		logf.Close()
		t.Fatalf("start consul %s: %v", s.Name, err)
	}
	logf.Close()
	s.cmd = cmd
	s.started = time.Now()
	s.exited = make(chan struct{})
	exited := s.exited
	go func() { _ = cmd.Wait(); close(exited) }()
}

// Stop kills the agent (SIGKILL, by its PID: a server that dies, not one
// that leaves) and waits for it to be gone.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.c.t.Errorf("consul %s (pid %d) did not exit after SIGKILL", s.Name, s.cmd.Process.Pid)
	}
	s.cmd = nil
}

// Running reports whether the agent process is alive.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

var httpClient = &http.Client{Timeout: 3 * time.Second}

// Get reads a JSON answer of the HTTP API of the first running server
// that gives one.
func (c *Cluster) Get(path string, v any) error {
	var errs []error
	for _, s := range c.Servers() {
		if !s.Running() {
			continue
		}
		err := s.Get(path, v)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return errors.New("no consul server is running")
	}
	return errors.Join(errs...)
}

// Get reads a JSON answer of this server's HTTP API.
func (s *Server) Get(path string, v any) error {
	req, err := http.NewRequest(http.MethodGet, s.HTTPAddr()+path, nil)
	if err != nil {
		return err
	}
	if s.c.Token != "" {
		req.Header.Set("X-Consul-Token", s.c.Token)
	}
	resp, err := s.c.http.Do(req)
	if err != nil {
		return err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s%s: %s: %v %s", s.HTTPAddr(), path, resp.Status, err, b)
	}
	return json.Unmarshal(b, v)
}

const passingPath = "/v1/health/service/consul?passing&stale"

// Passing lists the addresses of the passing instances of the "consul"
// service (one per server), as the first running server sees them.
func (c *Cluster) Passing() ([]netip.Addr, error) {
	var entries []consulEntry
	if err := c.Get(passingPath, &entries); err != nil {
		return nil, err
	}
	return nodeAddrs(entries)
}

// Passing lists the passing servers as this server sees them (a stale
// read: a server that just restarted may lag behind).
func (s *Server) Passing() ([]netip.Addr, error) {
	var entries []consulEntry
	if err := s.Get(passingPath, &entries); err != nil {
		return nil, err
	}
	return nodeAddrs(entries)
}

type consulEntry struct{ Node struct{ Address string } }

func nodeAddrs(entries []consulEntry) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, e := range entries {
		a, err := netip.ParseAddr(e.Node.Address)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// WaitPassing waits until the passing "consul" instances are exactly want.
func (c *Cluster) WaitPassing(timeout time.Duration, want ...*Server) {
	c.t.Helper()
	var addrs []netip.Addr
	for _, s := range want {
		addrs = append(addrs, s.Addr)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	deadline := time.Now().Add(timeout)
	var got []netip.Addr
	var err error
	for time.Now().Before(deadline) {
		got, err = c.Passing()
		if err == nil && slices.Equal(got, addrs) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("consul: passing servers %v (err %v), want %v after %s", got, err, addrs, timeout)
}

// Leader is the server that leads Raft now, waiting up to 15 s for an
// election in progress.
func (c *Cluster) Leader() (*Server, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		s, err := c.leader()
		if err == nil || time.Now().After(deadline) {
			return s, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) leader() (*Server, error) {
	var leader string
	if err := c.Get("/v1/status/leader", &leader); err != nil {
		return nil, err
	}
	if leader == "" {
		return nil, errors.New("no leader")
	}
	host, _, err := net.SplitHostPort(leader)
	if err != nil {
		return nil, fmt.Errorf("leader %q: %w", leader, err)
	}
	for _, s := range c.Servers() {
		if s.Addr.String() == host {
			return s, nil
		}
	}
	return nil, fmt.Errorf("leader %q is none of the servers", leader)
}

// Follower is a running server that is not the leader now.
func (c *Cluster) Follower() (*Server, error) {
	l, err := c.Leader()
	if err != nil {
		return nil, err
	}
	for _, s := range c.Servers() {
		if s != l && s.Running() {
			return s, nil
		}
	}
	return nil, errors.New("no running follower")
}

// Register puts an external node with one service instance into the
// catalog (PUT /v1/catalog/register): a catalog change at a known moment.
func (c *Cluster) Register(node string, addr netip.Addr, service string, port int) error {
	body := map[string]any{
		"Node": node, "Address": addr.String(),
		"Service": map[string]any{"ID": service + "-" + node, "Service": service, "Port": port},
	}
	return c.put("/v1/catalog/register", body)
}

// Deregister removes an external node registered with Register.
func (c *Cluster) Deregister(node string) error {
	return c.put("/v1/catalog/deregister", map[string]any{"Node": node})
}

func (c *Cluster) put(path string, body any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range c.Servers() {
		if !s.Running() {
			continue
		}
		req, err := http.NewRequest(http.MethodPut, s.HTTPAddr()+path, bytes.NewReader(b))
		if err != nil {
			return err
		}
		if c.Token != "" {
			req.Header.Set("X-Consul-Token", c.Token)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		rb, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			errs = append(errs, fmt.Errorf("PUT %s%s: %s: %s", s.HTTPAddr(), path, resp.Status, rb))
			continue
		}
		return nil
	}
	return errors.Join(errs...)
}
