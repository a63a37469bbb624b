package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/topo"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// The topology. A "node" namespace routes between a "pod" namespace, where
// the clients run, and three server namespaces, each on its own veth and
// subnet, so that every path, direct ones included, crosses the node once,
// as traffic to a server on another host would. The node has no uplink. The
// proxies and HAProxy run in the node with their VIPs on its lo; the DNAT
// rule lives in the node's nftables; the connect4 VIP is routed nowhere, so
// a connection to it only succeeds if connect4 rewrote it.
var (
	podAddr   = netip.MustParseAddr("198.18.1.2")
	podGW     = netip.MustParseAddr("198.18.1.1")
	serverIPs = []netip.Addr{
		netip.MustParseAddr("198.18.11.2"),
		netip.MustParseAddr("198.18.12.2"),
		netip.MustParseAddr("198.18.13.2"),
	}
)

// Server ports. The DNAT path has ports of its own so that conntrack can be
// switched off for every other path's packets in the node (see nftRules).
const (
	echoPort      = 8080
	sourcePort    = 8081
	dnatEchoPort  = 9080
	dnatSourcePrt = 9081
	vipEchoPort   = 80
	vipSourcePort = 81
)

// serverGW is the node's address on server i's link.
func serverGW(i int) netip.Addr {
	a := serverIPs[i].As4()
	a[3] = 1
	return netip.AddrFrom4(a)
}

func servers(port int) []string {
	var out []string
	for _, ip := range serverIPs {
		out = append(out, netip.AddrPortFrom(ip, uint16(port)).String())
	}
	return out
}

// env is everything the benchmark set up.
type env struct {
	u       *topo.Undo
	prefix  string // of every name the benchmark creates
	self    string // this program, re-executed for the child roles
	node    ns.NetNS
	pod     ns.NetNS
	srv     []ns.NetNS
	cgRoot  string // the benchmark's cgroup, all others below
	cgPlain string // client without ctlb
	cgPod   string // client in an attached pod cgroup
	cgSrv   string
	cgWarm  string // the CPU warmer's, when there is one
	bpffs   string
	dp      *datapath.Datapath
	progs   *progStats
	// variants: the connect4 variants of the cost phase, once loaded.
	variants costVariantProgs

	server  *topo.Proc
	clients map[string]*topo.Proc // by cgroup
	// proxyCgroups: the cgroup of each path's proxy process.
	proxyCgroups map[string]string
	unavailable  map[string]string // path -> why it cannot run
	// The lean client of each client cgroup (nil when the Go client
	// measures the rates), and why not when it was wanted.
	leanBin         string
	leanClients     map[string]*topo.Proc
	leanUnavailable string
	retries         int // measurements made again so far
}

func (e *env) cgroup(name string) (string, error) {
	dir := filepath.Join(e.cgRoot, name)
	return dir, topo.Cgroup(e.u, dir)
}

// setup builds the topology, loads ctlb and starts the servers and clients.
func setup(ctx context.Context, cfg Config, u *topo.Undo) (*env, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("own executable: %w", err)
	}
	if cfg.Self != "" {
		self = cfg.Self
	}
	e := &env{
		u:            u,
		prefix:       fmt.Sprintf("ctlb-bench-%d", os.Getpid()),
		self:         self,
		clients:      map[string]*topo.Proc{},
		proxyCgroups: map[string]string{},
		unavailable:  map[string]string{},
	}
	if err := e.network(); err != nil {
		return nil, err
	}
	if err := e.cgroups(); err != nil {
		return nil, err
	}
	if err := e.loadCtlb(); err != nil {
		return nil, err
	}
	lean := !cfg.GoClient
	if lean {
		if err := e.startLean(); err != nil {
			// Only a missing compiler is a reason to go on without.
			if e.leanBin != "" {
				return nil, err
			}
			e.leanUnavailable = err.Error()
			logf("lean client unavailable, the Go client measures the rates: %v", err)
			lean = false
		}
	}
	if err := e.startServers(lean); err != nil {
		return nil, err
	}
	if cfg.Warm {
		if e.cgWarm, err = e.cgroup("warmer"); err != nil {
			return nil, err
		}
		if _, err := e.startChild("warmer", roleWarmer, nil, nil, e.cgWarm); err != nil {
			return nil, err
		}
	}
	for _, cg := range []string{e.cgPlain, e.cgPod} {
		p, err := e.startChild("client-"+filepath.Base(cg), roleClient, nil, e.pod, cg)
		if err != nil {
			return nil, err
		}
		e.clients[cg] = p
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return e, nil
}

func (e *env) network() error {
	var err error
	if e.node, err = topo.NewNetNS(e.u, e.prefix+"-node"); err != nil {
		return err
	}
	if e.pod, err = topo.NewNetNS(e.u, e.prefix+"-pod"); err != nil {
		return err
	}
	steps := []func() error{
		func() error { return topo.Veth(e.node, "pod0", e.pod, "eth0") },
		func() error { return topo.AddAddr(e.node, "pod0", netip.PrefixFrom(podGW, 24)) },
		func() error { return topo.AddAddr(e.pod, "eth0", netip.PrefixFrom(podAddr, 24)) },
		func() error { return topo.DefaultRoute(e.pod, podGW) },
	}
	for i, ip := range serverIPs {
		s, err := topo.NewNetNS(e.u, fmt.Sprintf("%s-srv%d", e.prefix, i+1))
		if err != nil {
			return err
		}
		e.srv = append(e.srv, s)
		link := fmt.Sprintf("srv%d", i+1)
		steps = append(steps,
			func() error { return topo.Veth(e.node, link, s, "eth0") },
			func() error { return topo.AddAddr(e.node, link, netip.PrefixFrom(serverGW(i), 24)) },
			func() error { return topo.AddAddr(s, "eth0", netip.PrefixFrom(ip, 24)) },
			func() error { return topo.DefaultRoute(s, serverGW(i)) },
		)
	}
	// VIPs the node serves itself (proxies, HAProxy).
	for _, p := range allPaths {
		if p.local {
			steps = append(steps, func() error { return topo.AddAddr(e.node, "lo", netip.PrefixFrom(p.vip, 32)) })
		}
	}
	// Clients and proxies open and close connections by the ten thousand:
	// let them reuse ports in TIME_WAIT (RFC 6191 with timestamps) and use
	// the whole port range, as busy hosts are tuned.
	for _, n := range []ns.NetNS{e.node, e.pod} {
		steps = append(steps,
			func() error { return topo.Sysctl(n, "net.ipv4.tcp_tw_reuse", "1") },
			func() error { return topo.Sysctl(n, "net.ipv4.ip_local_port_range", "1024 65535") },
		)
	}
	steps = append(steps, func() error { return topo.Sysctl(e.node, "net.ipv4.ip_forward", "1") })
	steps = append(steps, e.network6()...)
	for _, s := range steps {
		if err := s(); err != nil {
			return fmt.Errorf("topology: %w", err)
		}
	}
	return nil
}

func (e *env) cgroups() error {
	mount, err := cgroupv2.Mountpoint()
	if err != nil {
		return err
	}
	e.cgRoot = filepath.Join(mount, e.prefix)
	if err := topo.Cgroup(e.u, e.cgRoot); err != nil {
		return err
	}
	if e.cgPlain, err = e.cgroup("client-plain"); err != nil {
		return err
	}
	if e.cgPod, err = e.cgroup("client-pod"); err != nil {
		return err
	}
	if e.cgSrv, err = e.cgroup("servers"); err != nil {
		return err
	}
	_, err = e.cgroup("pods")
	return err
}

// loadCtlb pins ctlb's objects on a private bpffs, configures the connect4
// VIP and attaches the pod cgroup.
func (e *env) loadCtlb() error {
	var err error
	if e.bpffs, err = topo.MountBPFFS(e.u, e.prefix+"-bpffs-"); err != nil {
		return err
	}
	if e.dp, err = datapath.Create(filepath.Join(e.bpffs, "ctlb")); err != nil {
		return fmt.Errorf("load ctlb: %w", err)
	}
	e.u.Push("ctlb datapath", func() error {
		// The bpffs unmount drops the pins; this drops our handles.
		return e.dp.Close()
	})
	for _, svc := range []struct{ vip, srv int }{{vipEchoPort, echoPort}, {vipSourcePort, sourcePort}} {
		s := datapath.Service{VIP: netip.AddrPortFrom(pathConnect4.vip, uint16(svc.vip)), Empty: datapath.EmptyReject}
		for _, ip := range serverIPs {
			s.Servers = append(s.Servers, netip.AddrPortFrom(ip, uint16(svc.srv)))
		}
		if err := e.dp.SetService(s); err != nil {
			return fmt.Errorf("configure connect4 VIP: %w", err)
		}
	}
	if err := e.dp.SetServices(everyClientServices()); err != nil {
		return fmt.Errorf("configure the IPv6 and UDP VIPs: %w", err)
	}
	if _, err := e.dp.Attach("bench-pod", e.cgPod); err != nil {
		return fmt.Errorf("attach the pod cgroup: %w", err)
	}
	if e.progs, err = openProgStats(filepath.Join(e.bpffs, "ctlb")); err != nil {
		return err
	}
	e.u.Push("ctlb program handles", e.progs.Close)
	return nil
}

// startServers starts the Go servers: source servers always, echo servers
// unless the lean ones serve the echo ports.
func (e *env) startServers(lean bool) error {
	var a serverArgs
	for i, ip := range serverIPs {
		for _, l := range []struct {
			port int
			echo bool
		}{{echoPort, true}, {sourcePort, false}, {dnatEchoPort, true}, {dnatSourcePrt, false}} {
			if lean && l.echo {
				continue
			}
			a.Listeners = append(a.Listeners, serverListener{
				NetNS: e.srv[i].Path(),
				Addr:  netip.AddrPortFrom(ip, uint16(l.port)).String(),
				Echo:  l.echo,
			})
		}
	}
	var err error
	e.server, err = e.startChild("servers", roleServer, a, e.srv[0], e.cgSrv)
	return err
}

// startChild starts this program as a child role and waits for its ready
// line.
func (e *env) startChild(name, role string, args any, netns ns.NetNS, cgroup string) (*topo.Proc, error) {
	raw, err := json.Marshal(args)
	if err != nil {
		return nil, err
	}
	p, err := topo.Start(e.u, topo.ProcSpec{
		Name:   name,
		Path:   e.self,
		Env:    []string{roleEnv + "=" + role, argEnv + "=" + string(raw)},
		NetNS:  netns,
		Cgroup: cgroup,
	})
	if err != nil {
		return nil, err
	}
	line, err := p.Recv(15 * time.Second)
	if err != nil {
		return nil, err
	}
	var r ready
	if err := json.Unmarshal(line, &r); err != nil || !r.Ready {
		return nil, fmt.Errorf("%s did not start: %s", name, line)
	}
	return p, nil
}

// nftRules is the DNAT path: what kube-proxy programs for a ClusterIP, in
// its nftables form (a service chain picking an endpoint chain that DNATs),
// round-robin like every other path here. Conntrack is what DNAT needs and
// what the connect4 path does without: packets of the other paths are
// marked notrack, so that each path pays only for its own mechanism.
func nftRules(table string) string {
	dnat := pathDNAT.vip.String()
	var b strings.Builder
	fmt.Fprintf(&b, "table ip %s {\n", table)
	fmt.Fprintf(&b, "  chain raw_prerouting {\n    type filter hook prerouting priority raw; policy accept;\n")
	fmt.Fprintf(&b, "    ip daddr %s return\n    tcp sport { %d, %d } return\n    notrack\n  }\n", dnat, dnatEchoPort, dnatSourcePrt)
	fmt.Fprintf(&b, "  chain raw_output {\n    type filter hook output priority raw; policy accept;\n    notrack\n  }\n")
	for _, svc := range []struct{ vip, srv int }{{vipEchoPort, dnatEchoPort}, {vipSourcePort, dnatSourcePrt}} {
		var eps []string
		for i, ip := range serverIPs {
			fmt.Fprintf(&b, "  chain ep_%d_%d {\n    meta l4proto tcp dnat to %s:%d\n  }\n", svc.vip, i, ip, svc.srv)
			eps = append(eps, fmt.Sprintf("%d : jump ep_%d_%d", i, svc.vip, i))
		}
		fmt.Fprintf(&b, "  chain svc_%d {\n    numgen inc mod %d vmap { %s }\n  }\n", svc.vip, len(serverIPs), strings.Join(eps, ", "))
	}
	fmt.Fprintf(&b, "  chain nat_prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n")
	for _, port := range []int{vipEchoPort, vipSourcePort} {
		fmt.Fprintf(&b, "    ip daddr %s tcp dport %d jump svc_%d\n", dnat, port, port)
	}
	fmt.Fprintf(&b, "  }\n}\n")
	return b.String()
}

// loadNFT loads the DNAT rules into the node. The table goes with the
// namespace.
func (e *env) loadNFT() error {
	nft, err := exec.LookPath("nft")
	if err != nil {
		return errors.New("nft not installed (Debian package nftables)")
	}
	cmd := exec.Command(nft, "-f", "-")
	cmd.Stdin = strings.NewReader(nftRules("ctlb_bench"))
	var out []byte
	err = e.node.Do(func(ns.NetNS) error {
		var err error
		out, err = cmd.CombinedOutput()
		return err
	})
	if err != nil {
		return fmt.Errorf("nft -f: %w: %s", err, out)
	}
	return nil
}

// haproxyConfig forwards the HAProxy VIP's ports round-robin in TCP mode,
// with no health checks (none of the other paths checks either).
func haproxyConfig() string {
	var b strings.Builder
	b.WriteString("global\n  maxconn 5000\n\ndefaults\n  mode tcp\n  balance roundrobin\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\n")
	for _, svc := range []struct{ vip, srv int }{{vipEchoPort, echoPort}, {vipSourcePort, sourcePort}} {
		fmt.Fprintf(&b, "listen vip_%d\n  bind %s:%d\n", svc.vip, pathHAProxy.vip, svc.vip)
		for i, s := range servers(svc.srv) {
			fmt.Fprintf(&b, "  server s%d %s\n", i+1, s)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// startProxies starts HAProxy, the seed-style proxy, the sockmap relay and
// ctlb's fallback proxy in its modes, each in the node and in a cgroup of its own.
func (e *env) startProxies() error {
	fwd := func(p path) []forward {
		return []forward{
			{Listen: netip.AddrPortFrom(p.vip, vipEchoPort).String(), Servers: servers(echoPort)},
			{Listen: netip.AddrPortFrom(p.vip, vipSourcePort).String(), Servers: servers(sourcePort)},
		}
	}
	for _, p := range []path{pathSeed, pathSockmap, pathListeners, pathSteering, pathPreconn} {
		cg, err := e.cgroup("proxy-" + p.name)
		if err != nil {
			return err
		}
		var args any
		role := roleCtlbProxy
		switch p.name {
		case pathSeed.name:
			role, args = roleSeedProxy, seedProxyArgs{Forwards: fwd(p)}
		case pathSockmap.name:
			role, args = roleSockmap, seedProxyArgs{Forwards: fwd(p)}
		case pathListeners.name:
			args = ctlbProxyArgs{Mode: "listeners", Forwards: fwd(p)}
		case pathPreconn.name:
			args = ctlbProxyArgs{Mode: "listeners", Forwards: fwd(p), Preconnect: 1}
		default:
			args = ctlbProxyArgs{Mode: "steering", Forwards: fwd(p)}
		}
		if _, err := e.startChild(p.name, role, args, e.node, cg); err != nil {
			return err
		}
		e.proxyCgroups[p.name] = cg
	}
	return e.startHAProxy()
}

func (e *env) startHAProxy() error {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		e.unavailable[pathHAProxy.name] = "haproxy not installed (Debian package haproxy)"
		return nil
	}
	dir, err := os.MkdirTemp("", "ctlb-bench-haproxy-")
	if err != nil {
		return err
	}
	e.u.Push("haproxy config "+dir, func() error { return os.RemoveAll(dir) })
	cfgFile := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgFile, []byte(haproxyConfig()), 0o644); err != nil {
		return err
	}
	cg, err := e.cgroup("proxy-" + pathHAProxy.name)
	if err != nil {
		return err
	}
	// -db: stay in the foreground, so the PID we hold is HAProxy's.
	_, err = topo.Start(e.u, topo.ProcSpec{Name: "haproxy", Path: bin, Args: []string{"-db", "-f", cfgFile}, NetNS: e.node, Cgroup: cg})
	if err != nil {
		return err
	}
	e.proxyCgroups[pathHAProxy.name] = cg
	// Ready when it accepts.
	target := netip.AddrPortFrom(pathHAProxy.vip, vipEchoPort).String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := e.node.Do(func(ns.NetNS) error {
			c, err := net.DialTimeout("tcp4", target, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("haproxy did not listen on %s: %w", target, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
