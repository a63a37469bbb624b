package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"

	"github.com/ctlb/ctlb/internal/topo"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Every client (issue 12): the sockets other than AF_INET TCP that dial a
// VIP, each beside the same socket dialing the servers itself. IPv6 TCP
// (connect6), an AF_INET6 socket dialing ::ffff:VIP as Java and .NET do by
// default (dual-stack: connect6 rewrites it to ::ffff:server), and UDP
// request/response on a socket kept for the client's whole run: connected
// (connect4 rewrites it once) and unconnected (sendmsg4 rewrites every
// datagram, recvmsg4 every reply's source). The lean client measures them
// all (lean/lean.c); the rounds interleave like the path comparison's.

// The lab's IPv6 addresses, from the benchmarking range 2001:2::/48 only:
// the pod's link 2001:2:0:1::/64, server i's 2001:2:0:1i::/64, the node ::1
// on each. The IPv6 VIP (in 2001:2::/64, no link's) is routed nowhere, like
// the IPv4 ones.
var (
	podAddr6   = netip.MustParseAddr("2001:2:0:1::2")
	podGW6     = netip.MustParseAddr("2001:2:0:1::1")
	serverIPs6 = []netip.Addr{
		netip.MustParseAddr("2001:2:0:11::2"),
		netip.MustParseAddr("2001:2:0:12::2"),
		netip.MustParseAddr("2001:2:0:13::2"),
	}
	vip6 = netip.MustParseAddr("2001:2::100")
)

// serverGW6 is the node's IPv6 address on server i's link.
func serverGW6(i int) netip.Addr {
	a := serverIPs6[i].As16()
	a[15] = 1
	return netip.AddrFrom16(a)
}

func addrPorts(ips []netip.Addr, port int) []string {
	var out []string
	for _, ip := range ips {
		out = append(out, netip.AddrPortFrom(ip, uint16(port)).String())
	}
	return out
}

// mapped is ip as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
func mapped(ip netip.Addr) netip.Addr { return netip.AddrFrom16(ip.As16()) }

func mappedAll(ips []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, ip := range ips {
		out = append(out, mapped(ip))
	}
	return out
}

// network6 are the steps that give the lab's links their IPv6 addresses
// and routes, after the links exist (network). Addresses skip duplicate
// address detection (topo.AddAddr), so they are usable at once.
func (e *env) network6() []func() error {
	steps := []func() error{
		func() error { return topo.AddAddr(e.node, "pod0", netip.PrefixFrom(podGW6, 64)) },
		func() error { return topo.AddAddr(e.pod, "eth0", netip.PrefixFrom(podAddr6, 64)) },
		func() error { return topo.DefaultRoute(e.pod, podGW6) },
	}
	for i, ip := range serverIPs6 {
		link, s := fmt.Sprintf("srv%d", i+1), e.srv[i]
		steps = append(steps,
			func() error { return topo.AddAddr(e.node, link, netip.PrefixFrom(serverGW6(i), 64)) },
			func() error { return topo.AddAddr(s, "eth0", netip.PrefixFrom(ip, 64)) },
			func() error { return topo.DefaultRoute(s, serverGW6(i)) },
		)
	}
	return append(steps, func() error { return topo.Sysctl(e.node, "net.ipv6.conf.all.forwarding", "1") })
}

// everyClientListeners are the lean echo server's extra listeners in
// server i's namespace: IPv6 TCP and IPv4 UDP on the echo port.
func everyClientListeners(i int) []string {
	return []string{
		netip.AddrPortFrom(serverIPs6[i], echoPort).String(),
		"udp:" + netip.AddrPortFrom(serverIPs[i], echoPort).String(),
	}
}

// everyClientServices are the VIPs of the every-client paths beside the
// connect4 VIP (which the dual-stack path dials as ::ffff:VIP): the IPv6
// VIP, and the connect4 VIP's address and port as a UDP VIP.
func everyClientServices() []datapath.Service {
	v6 := datapath.Service{VIP: netip.AddrPortFrom(vip6, vipEchoPort), Empty: datapath.EmptyReject}
	for _, ip := range serverIPs6 {
		v6.Servers = append(v6.Servers, netip.AddrPortFrom(ip, echoPort))
	}
	udp := datapath.Service{VIP: netip.AddrPortFrom(pathConnect4.vip, vipEchoPort), Protocol: datapath.UDP, Empty: datapath.EmptyReject}
	for _, ip := range serverIPs {
		udp.Servers = append(udp.Servers, netip.AddrPortFrom(ip, echoPort))
	}
	return []datapath.Service{v6, udp}
}

var (
	pathDirect6 = path{name: "direct6", desc: "IPv6 TCP straight to the servers' IPv6 addresses, in turn",
		dial: addrPorts(serverIPs6, echoPort)}
	pathConnect6 = path{name: "connect6", desc: "IPv6 TCP to the IPv6 VIP, rewritten by ctlb's cgroup/connect6", pod: true,
		dial: addrPorts([]netip.Addr{vip6}, vipEchoPort)}
	pathDirectMapped = path{name: "direct-v4mapped", desc: "AF_INET6 TCP socket to ::ffff:server, in turn",
		dial: addrPorts(mappedAll(serverIPs), echoPort)}
	pathDualStack = path{name: "dual-stack", desc: "AF_INET6 TCP socket to ::ffff:VIP (the IPv4 VIP), rewritten by cgroup/connect6", pod: true,
		dial: addrPorts([]netip.Addr{mapped(pathConnect4.vip)}, vipEchoPort)}
	pathUDPDirect = path{name: "udp-direct", desc: "UDP, a connected socket per client to a server (client i to server i mod 3)",
		sock: udpConnected, dial: servers(echoPort)}
	pathUDPConnect4 = path{name: "udp-connect4", desc: "UDP VIP, a connected socket per client, rewritten once by cgroup/connect4", pod: true,
		sock: udpConnected, dial: addrPorts([]netip.Addr{pathConnect4.vip}, vipEchoPort)}
	pathUDPSendto = path{name: "udp-direct-sendto", desc: "UDP, an unconnected socket per client, sendto the servers in turn",
		sock: udpUnconnected, dial: servers(echoPort)}
	pathUDPSendmsg4 = path{name: "udp-sendmsg4", desc: "UDP VIP, an unconnected socket per client: cgroup/sendmsg4 rewrites each datagram, recvmsg4 each reply", pod: true,
		sock: udpUnconnected, dial: addrPorts([]netip.Addr{pathConnect4.vip}, vipEchoPort)}

	// clientPaths, each VIP path right after the direct one it is
	// compared with (clientPairs).
	clientPaths = []path{pathDirect6, pathConnect6, pathDirectMapped, pathDualStack, pathUDPDirect, pathUDPConnect4, pathUDPSendto, pathUDPSendmsg4}
	clientPairs = []struct{ vip, direct path }{
		{pathConnect6, pathDirect6},
		{pathDualStack, pathDirectMapped},
		{pathUDPConnect4, pathUDPDirect},
		{pathUDPSendmsg4, pathUDPSendto},
	}
)

// directOf is the direct path a VIP path of clientPaths compares with.
func directOf(name string) string {
	for _, p := range clientPairs {
		if p.vip.name == name {
			return p.direct.name
		}
	}
	return ""
}

// runEveryClient measures the rate metrics of every every-client path,
// round after round, in an order that rotates from round to round, as
// runPaths does.
func (e *env) runEveryClient(ctx context.Context, cfg Config) ([]*PathResult, error) {
	var paths []path
	var results []*PathResult
	for _, p := range clientPaths {
		if !cfg.compares(p.name) {
			continue
		}
		if e.leanClients == nil {
			why := "needs the lean client"
			if e.leanUnavailable != "" {
				why += ": " + e.leanUnavailable
			}
			results = append(results, &PathResult{Name: p.name, Description: p.desc, Unavailable: why})
			continue
		}
		paths = append(paths, p)
		results = append(results, &PathResult{Name: p.name, Description: p.desc})
	}
	if len(paths) == 0 {
		return results, nil
	}
	logf("every client: %d rounds of %d paths x 2 metrics x %s", cfg.Rounds, len(paths), cfg.Duration)
	// results also holds the paths that cannot run: measure the others
	// into results of their own, in paths' order.
	measured := make([]*PathResult, 0, len(paths))
	for _, r := range results {
		if r.Unavailable == "" {
			measured = append(measured, r)
		}
	}
	if err := e.runRounds(ctx, cfg, "every client: ", paths, metrics[:2] /* rate1, rateN */, measured); err != nil {
		return nil, err
	}
	return results, nil
}

func (r *Results) clientPath(name string) *PathResult {
	for _, p := range r.EveryClient {
		if p.Name == name && p.Unavailable == "" {
			return p
		}
	}
	return nil
}

// everyClientTargets are the every-client ratios. The issue sets no
// figure for them: they are reported, not passed or failed.
func everyClientTargets(r *Results) []TargetResult {
	var out []TargetResult
	for _, pr := range clientPairs {
		a, b := r.clientPath(pr.vip.name), r.clientPath(pr.direct.name)
		if a == nil && b == nil {
			continue
		}
		unit := "conn/s"
		if pr.vip.sock != tcpSocket {
			unit = "requests/s"
		}
		for _, k := range []struct {
			what string
			stat func(*PathResult) Stat
		}{
			{"1 client", func(p *PathResult) Stat { return p.Rate1 }},
			{fmt.Sprint(r.Config.Clients) + " clients", func(p *PathResult) Stat { return p.RateN }},
		} {
			t := TargetResult{Name: fmt.Sprintf("%s %s vs %s, %s", pr.vip.name, unit, pr.direct.name, k.what), Want: "report", Status: "n/a"}
			if a != nil && b != nil {
				if ratio := pairedRatio(k.stat(a), k.stat(b)); ratio > 0 {
					t.Got, t.Status = fmt.Sprintf("%.3fx", ratio), statusReport
				}
			}
			out = append(out, t)
		}
	}
	return out
}

// statusReport marks a figure that has no target: it is reported only.
const statusReport = "report"

func printEveryClient(w io.Writer, r *Results) {
	if len(r.EveryClient) == 0 {
		return
	}
	fmt.Fprintf(w, "\nevery client (lean client; TCP: conn/s as above; UDP: 64-byte request/response per second on a socket kept per client; ratio: median of per-round ratios to the direct path beside it)\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "path\trate 1\trate %d\tvs\tratio 1\tratio %d\tCPU us/op\terrors\tother %%\t\n", r.Config.Clients, r.Config.Clients)
	for _, p := range r.EveryClient {
		if p.Unavailable != "" {
			fmt.Fprintf(tw, "%s\tunavailable: %s\t\t\t\t\t\t\t\t\n", p.Name, p.Unavailable)
			continue
		}
		vs, r1, rn := "", "", ""
		if d := r.clientPath(directOf(p.Name)); d != nil {
			vs = d.Name
			r1 = fmt.Sprintf("%.3f", pairedRatio(p.Rate1, d.Rate1))
			rn = fmt.Sprintf("%.3f", pairedRatio(p.RateN, d.RateN))
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%s\t%s\t%s\t%.1f\t%d\t%.0f\t\n", p.Name, p.Rate1.Median, p.RateN.Median, vs, r1, rn, p.CPUPerConn.Median, p.Errors, p.Foreign*100)
	}
	tw.Flush()
	for _, p := range r.EveryClient {
		if p.FirstError != "" {
			fmt.Fprintf(w, "  %s: first error: %s\n", p.Name, p.FirstError)
		}
	}
}

// writeEveryClientDat appends the every-client rows to the gnuplot data
// as a second data set (gnuplot's index 1; the plot draws index 0).
func writeEveryClientDat(d *strings.Builder, r *Results) {
	if len(r.EveryClient) == 0 {
		return
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "\n\n# every client: path rate_1 rate_%d direct ratio_1 ratio_%d cpu_us_per_op\n", r.Config.Clients, r.Config.Clients)
	for _, p := range r.EveryClient {
		if p.Unavailable != "" {
			continue
		}
		direct, r1, rn := "-", 0.0, 0.0
		if dp := r.clientPath(directOf(p.Name)); dp != nil {
			direct, r1, rn = dp.Name, pairedRatio(p.Rate1, dp.Rate1), pairedRatio(p.RateN, dp.RateN)
		}
		fmt.Fprintf(&b, "%q %.0f %.0f %q %.3f %.3f %.2f\n", p.Name, p.Rate1.Median, p.RateN.Median, direct, r1, rn, p.CPUPerConn.Median)
	}
	d.Write(b.Bytes())
}
