package ctlbd_test

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ctlb/ctlb/internal/testutil"
)

// fleet is three "node" namespaces, each with its own ctlbd, bpffs and 4
// attached pods, all dialing one VIP whose servers live in one server
// namespace joined to every node by a veth.
type fleet struct {
	nodes   []*node
	pods    [][]string // cgroups per node
	servers []*testutil.Server
}

func newFleet(t *testing.T, srvs []string, balance string) *fleet {
	t.Helper()
	hostNS := testutil.NewNetNS(t)
	var hostAddrs []string
	for _, s := range srvs {
		h, _, _ := net.SplitHostPort(s)
		hostAddrs = append(hostAddrs, h)
	}
	testutil.AddLoopbackAddrs(t, hostNS, hostAddrs...)
	f := &fleet{servers: testutil.StartServers(t, hostNS, srvs...)}
	conf := fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s, "balance": %q}]}`, vip, jsonList(srvs), balance)
	for i := range 3 {
		n := newNode(t, nil, conf)
		nodeIP, hostIP := fmt.Sprintf("198.18.61.%d", 4*i+1), fmt.Sprintf("198.18.61.%d", 4*i+2)
		joinFleetHost(t, n.netns, hostNS, fmt.Sprintf("fl%d", i), nodeIP, hostIP)
		n.start()
		var cgs []string
		for range 4 {
			cg := testutil.NewCgroup(t, "")
			n.d.MustCLI("attach", "--cgroup", cg)
			cgs = append(cgs, cg)
		}
		f.nodes = append(f.nodes, n)
		f.pods = append(f.pods, cgs)
	}
	return f
}

// joinFleetHost links a node to the server namespace with a veth /30 and
// routes the servers' 198.18.62.0/24 through it.
func joinFleetHost(t *testing.T, node, host ns.NetNS, name, nodeIP, hostIP string) {
	t.Helper()
	testutil.Veth(t, node, name, nodeIP+"/30", host, name+"p", hostIP+"/30")
	err := node.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		_, dst, _ := net.ParseCIDR("198.18.62.0/24")
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Gw: net.ParseIP(hostIP)})
	})
	if err != nil {
		t.Fatalf("node route via %s: %v", name, err)
	}
}

// openAtOnce starts every pod's client at the same moment, each holding
// count connections, and returns what each node's pods landed on.
func (f *fleet) openAtOnce(t *testing.T, count int) (perServer map[string]int, firsts []string) {
	t.Helper()
	var clients [][]*testutil.Client
	var wg sync.WaitGroup
	var mu sync.Mutex
	start := make(chan struct{})
	for i, n := range f.nodes {
		clients = append(clients, make([]*testutil.Client, len(f.pods[i])))
		for j, cg := range f.pods[i] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				c := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: count})
				mu.Lock()
				clients[i][j] = c
				mu.Unlock()
			}()
		}
	}
	close(start)
	wg.Wait()
	perServer = map[string]int{}
	for i := range clients {
		first := ""
		for _, c := range clients[i] {
			r := c.Result(t)
			if r.Failed != 0 {
				t.Fatalf("node %d: %d connects failed: %v", i, r.Failed, r.Errors)
			}
			for s, k := range r.PerServer {
				perServer[s] += k
			}
			if first == "" && len(r.Landed) > 0 {
				first = r.Landed[0]
			}
		}
		firsts = append(firsts, first)
	}
	t.Cleanup(func() {
		for _, cs := range clients {
			for _, c := range cs {
				c.Stop(t)
			}
		}
	})
	return perServer, firsts
}

// A fleet by simulation: 3 nodes x 4 pods x 3 long-lived connections opened
// at the same moment spread over the servers within ±2 of the mean, with the
// random start of each node's rotation. With least-open each node balances
// by its own open counts (a set this small is scanned whole), within the
// same ±2.
func TestFleetSpreadsEvenly(t *testing.T) {
	srvs := []string{"198.18.62.1:8502", "198.18.62.2:8502", "198.18.62.3:8502"}
	for _, balance := range []string{"roundrobin", "least-open"} {
		t.Run(balance, func(t *testing.T) {
			f := newFleet(t, srvs, balance)
			start := time.Now()
			per, firsts := f.openAtOnce(t, 3)
			total := 0
			for _, k := range per {
				total += k
			}
			mean := float64(total) / float64(len(srvs))
			t.Logf("%s: %d connections from 12 pods on 3 nodes in %v: %v; one pod per node had its first connection on %v",
				balance, total, time.Since(start), per, firsts)
			if total != 36 {
				t.Fatalf("%d connections landed, want 36: %v", total, per)
			}
			for _, s := range srvs {
				tol := 2.0
				if float64(per[s]) < mean-tol || float64(per[s]) > mean+tol {
					t.Errorf("server %s holds %d, want %.0f ±%.0f (all: %v)", s, per[s], mean, tol, per)
				}
			}
		})
	}
}
