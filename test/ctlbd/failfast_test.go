package ctlbd_test

import (
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// A static VIP (no health checks) over 3 servers; one server's process dies
// (its port refuses). 30 sequential connects from the pod: at most 1 fails
// (the one that taught the kernel), none reaches the dead server. The
// server listens again: ctlbd's probe returns it to rotation within the
// hold-down, and it gets connects again.
func TestDeadServerCostsOneConnect(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	netns := testutil.NewNetNS(t)
	srvs := []string{"127.0.0.61:8502", "127.0.0.62:8502", "127.0.0.63:8502"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.61", "127.0.0.62", "127.0.0.63")
	running := testutil.StartServers(t, netns, srvs...)
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)
	d.MustCLI(append([]string{"service", "set", vip}, srvs...)...)
	// A pod always has a process (its pause container): ctlbd finds the
	// pod's network namespace through it, and probes from there.
	resident := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip})
	resident.Result(t)
	if r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6}); r.Failed != 0 || r.PerServer[srvs[1]] != 2 {
		t.Fatalf("before: landed %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}

	running[1].Close()
	died := time.Now()
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 30})
	t.Logf("server %s died: 30 sequential connects: %d failed %v, landed %v (in %v)", srvs[1], r.Failed, r.Errors, r.PerServer, time.Since(died))
	if r.Failed > 1 || r.PerServer[srvs[1]] != 0 || r.PerServer[srvs[0]]+r.PerServer[srvs[2]] < 29 {
		t.Fatalf("30 connects after %s died: %d failed (%v), landed %v; want at most 1 failed and none on it\n%s",
			srvs[1], r.Failed, r.Errors, r.PerServer, d.Logs())
	}
	_, s := vipStatus(t, d, vip)
	if row, _ := serverStatus(s, srvs[1]); !row.Failing {
		t.Errorf("status of the dead server = %+v, want failing", row)
	}

	// Back: it listens again, and within the hold-down (1 s by default,
	// plus ctlbd's probe tick) gets connects again.
	testutil.StartServers(t, netns, srvs[1])
	back := time.Now()
	const holdDown = time.Second
	for {
		r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
		if r.Failed != 0 {
			t.Fatalf("connects while the server comes back: %d failed %v", r.Failed, r.Errors)
		}
		if r.PerServer[srvs[1]] > 0 {
			t.Logf("server %s listened again: gets connects %v later", srvs[1], time.Since(back))
			break
		}
		if time.Since(back) > holdDown+500*time.Millisecond {
			_, s := vipStatus(t, d, vip)
			t.Fatalf("%s listens again but got no connect within %v: last %v, status %+v\n%s", srvs[1], holdDown+500*time.Millisecond, r.PerServer, s, d.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
