package ctlbd_test

import (
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Least-open: 9 held connections pile on the one server a VIP had; two more
// join; 30 new held connections fill the newcomers first, so every server
// ends at 13 ±1. A set this small is scanned whole for the least loaded
// server (the power of two choices, used for large sets, gives ±1 in only
// 98% of runs of this very sequence).
func TestLeastOpenEvensOutPiledServer(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	netns := testutil.NewNetNS(t)
	srvs := []string{"127.0.0.71:8502", "127.0.0.72:8502", "127.0.0.73:8502"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.71", "127.0.0.72", "127.0.0.73")
	testutil.StartServers(t, netns, srvs...)
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)
	d.MustCLI("service", "set", vip, srvs[0], "--balance", "least-open")
	piled := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 9})
	if r := piled.Result(t); r.Failed != 0 || r.PerServer[srvs[0]] != 9 {
		t.Fatalf("piled connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	d.MustCLI(append([]string{"service", "set", vip, "--balance", "least-open"}, srvs...)...)
	fresh := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 30})
	r := fresh.Result(t)
	if r.Failed != 0 {
		t.Fatalf("30 new connections: %d failed %v", r.Failed, r.Errors)
	}
	open, _ := openPerServer(t, d, vip)
	t.Logf("least-open: 30 new connections landed %v; open now %v", r.PerServer, open)
	for _, s := range srvs {
		if open[s] < 12 || open[s] > 14 {
			t.Errorf("server %s holds %d of 39, want 13 ±1 (all: %v)", s, open[s], open)
		}
	}
	_, s := vipStatus(t, d, vip)
	if s.Balance != "least-open" {
		t.Errorf("status balance = %q, want least-open", s.Balance)
	}
	fresh.Stop(t)
	piled.Stop(t)
}
