package ctlbd_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
)

// endDeadline is the bound from a set change to the end of the
// departed server's connections.
const endDeadline = 2 * time.Second

// serverStatus finds one server's row in a VIP's status.
func serverStatus(s api.ServiceStatus, srv string) (api.ServerStatus, bool) {
	for _, row := range s.Servers {
		if row.Server == srv {
			return row, true
		}
	}
	return api.ServerStatus{}, false
}

// vipStatus is the one VIP's status from the daemon.
func vipStatus(t testing.TB, d *ctlbdtest.Daemon, v string) (api.Status, api.ServiceStatus) {
	t.Helper()
	var st api.Status
	d.JSON(&st, "status")
	for _, s := range st.Services {
		if s.VIP == v {
			return st, s
		}
	}
	t.Fatalf("status has no VIP %s: %+v", v, st)
	return st, api.ServiceStatus{}
}

// A pod holds 4 connections over 2 servers and one server leaves the set
// (ctlbd service set): its 2 connections end within 2 s, the client
// reconnects through the VIP to the server that stayed, the other 2 are
// untouched; with --on-server-removed keep none ends.
func TestServerRemovedEndsItsConnections(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	netns, cg := newPod(t, d)
	two := servers[:2]
	if st, _ := vipStatusOrEmpty(t, d); !strings.HasPrefix(st.Termination, "bpf_sock_destroy") {
		testutil.Require(t, false, "termination: "+st.Termination)
	}

	t.Run("terminate", func(t *testing.T) {
		d.MustCLI(append([]string{"service", "set", vip}, two...)...)
		c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4, Reconnect: true})
		if r := c.Result(t); r.Failed != 0 || r.PerServer[two[0]] != 2 || r.PerServer[two[1]] != 2 {
			t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
		}
		start := time.Now()
		d.MustCLI("service", "set", vip, two[1])
		cliDone := time.Since(start)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("daemon log:\n%s", d.Logs())
			}
		})
		for range 2 {
			ev := c.Event(t, endDeadline-time.Since(start))
			if ev == nil {
				t.Fatalf("a connection on %s still open %v after it left the set\n%s", two[0], endDeadline, d.Logs())
			}
			if ev.Server != two[0] || !strings.Contains(ev.Ended, "connection abort") || ev.Reconnected != two[1] {
				t.Fatalf("event %+v: want a connection on %s aborted and replaced by one on %s", ev, two[0], two[1])
			}
			t.Logf("connection %d on %s ended %v after `service set` began (the command took %v), reconnected to %s",
				ev.Index, ev.Server, time.Unix(0, ev.At).Sub(start), cliDone, ev.Reconnected)
		}
		if ev := c.Event(t, time.Second); ev != nil {
			t.Fatalf("a connection that stayed in the set ended too: %+v", ev)
		}
		_, s := vipStatus(t, d, vip)
		gone, ok := serverStatus(s, two[0])
		if !ok || gone.Terminated != 2 || gone.InSet || gone.Open != 0 {
			t.Errorf("status of the departed server = %+v (found %v), want 2 ended, 0 open", gone, ok)
		}
		if stay, _ := serverStatus(s, two[1]); stay.Open != 4 || stay.Terminated != 0 {
			t.Errorf("status of the server that stayed = %+v, want 4 open, none ended", stay)
		}
		c.Stop(t)
	})

	t.Run("keep", func(t *testing.T) {
		d.MustCLI(append([]string{"service", "set", vip, "--on-server-removed", "keep"}, two...)...)
		c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4})
		r := c.Result(t)
		if r.Failed != 0 || r.PerServer[two[0]] != 2 || r.PerServer[two[1]] != 2 {
			t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
		}
		d.MustCLI("service", "set", vip, two[1], "--on-server-removed", "keep")
		if ev := c.Event(t, endDeadline); ev != nil {
			t.Fatalf("keep: a connection ended: %+v\n%s", ev, d.Logs())
		}
		_, s := vipStatus(t, d, vip)
		if s.OnServerRemoved != "keep" {
			t.Errorf("status onServerRemoved = %q, want keep", s.OnServerRemoved)
		}
		if gone, _ := serverStatus(s, two[0]); gone.Open != 2 || gone.Terminated != 2 {
			// 2 ended in the first subtest, none now.
			t.Errorf("keep: status of the departed server = %+v, want 2 open (and the 2 ended before)", gone)
		}
		c.Stop(t)
	})

	// A bad policy is refused, naming the value, and changes nothing.
	_, errOut, code := d.CLI("service", "set", vip, two[0], "--on-server-removed", "drop")
	if code == 0 || !strings.Contains(errOut, `"drop"`) {
		t.Errorf("bad --on-server-removed: exit %d, %q; want an error naming the value", code, errOut)
	}
}

// vipStatusOrEmpty is the daemon's status, services or not.
func vipStatusOrEmpty(t testing.TB, d *ctlbdtest.Daemon) (api.Status, bool) {
	t.Helper()
	var st api.Status
	d.JSON(&st, "status")
	return st, len(st.Services) > 0
}

// A server's host vanishes under load (its network namespace removed: no
// RST ever comes back). The health checks take it out of the set; every held
// connection that was on it ends within 2 s of the removal and reconnects
// to a live server.
func TestServerHostRemovedEndsItsConnections(t *testing.T) {
	hosts := []string{"198.18.52.2", "198.18.52.6", "198.18.52.10"}
	var srvs []string
	for _, h := range hosts {
		srvs = append(srvs, h+":8502")
	}
	n := newNode(t, nil, fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s,
		"health": {"interval": "200ms", "timeout": "100ms"}}]}`, vip, jsonList(srvs)))
	var hostNS []ns.NetNS
	var hostSrv []*testutil.Server
	for i, h := range hosts {
		hn := newHost(t, n.netns, fmt.Sprintf("198.18.52.%d", 4*i+1), h, fmt.Sprintf("vt%d", i))
		hostNS = append(hostNS, hn)
		hostSrv = append(hostSrv, testutil.StartServers(t, hn, srvs[i])...)
	}
	n.start()
	n.waitSet(vip, slices.Clone(srvs), 5*time.Second)
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)

	held := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 9, Reconnect: true})
	if r := held.Result(t); r.Failed != 0 || r.PerServer[srvs[0]] != 3 {
		t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	storm := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 20000, Duration: 30 * time.Second})
	time.Sleep(200 * time.Millisecond)
	// The host vanishes: its link first, so that nothing it does after
	// (its sockets closing) can reach the node; then its namespace, which
	// the kernel frees once its sockets are gone.
	start := time.Now()
	if err := n.netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("vt0")
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}); err != nil {
		t.Fatalf("remove the host's link: %v", err)
	}
	hostSrv[0].Close()
	removeNetNS(t, hostNS[0])
	for range 3 {
		ev := held.Event(t, endDeadline-time.Since(start))
		if ev == nil {
			t.Fatalf("a held connection on %s still open %v after its host was removed\n%s", srvs[0], endDeadline, n.d.Logs())
		}
		if ev.Server != srvs[0] || ev.Reconnected == "" || ev.Reconnected == srvs[0] {
			t.Fatalf("event %+v: want a connection on %s ended and replaced on a live server", ev, srvs[0])
		}
		t.Logf("connection %d on %s ended %v after its host was removed (%s), reconnected to %s",
			ev.Index, ev.Server, time.Unix(0, ev.At).Sub(start), ev.Ended, ev.Reconnected)
	}
	if ev := held.Event(t, 500*time.Millisecond); ev != nil {
		t.Fatalf("a connection on a live server ended: %+v", ev)
	}
	r := storm.Finish(t)
	t.Logf("connect loop during the removal: %d tried, %d failed, %d on the removed server", r.Total, r.Failed, r.PerServer[srvs[0]])
	_, s := vipStatus(t, n.d, vip)
	if gone, _ := serverStatus(s, srvs[0]); gone.Terminated < 3 {
		t.Errorf("status of the removed server = %+v, want at least 3 ended", gone)
	}
	held.Stop(t)
}
