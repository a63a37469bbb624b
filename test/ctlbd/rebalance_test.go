package ctlbd_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

// openPerServer is the VIP's open connections per server, from status.
func openPerServer(t testing.TB, d *ctlbdtest.Daemon, v string) (map[string]int64, bool) {
	t.Helper()
	_, s := vipStatus(t, d, v)
	out := map[string]int64{}
	for _, row := range s.Servers {
		if row.InSet {
			out[row.Server] = row.Open
		}
	}
	return out, s.Rebalancing
}

// 12 held connections on 3 servers; a 4th joins a VIP with rebalance on:
// within 10 s it holds 3 ±1 and no server holds more than 4.
func TestRebalanceOntoNewServer(t *testing.T) {
	srvs := []string{"127.0.0.51:8502", "127.0.0.52:8502", "127.0.0.53:8502", "127.0.0.54:8502"}
	conf := func(n int) string {
		return fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s, "rebalance": true, "rebalanceRate": 4}]}`, vip, jsonList(srvs[:n]))
	}
	n := newNode(t, []string{"127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54"}, conf(3))
	testutil.StartServers(t, n.netns, srvs...)
	n.start()
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)
	c := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 12, Reconnect: true})
	if r := c.Result(t); r.Failed != 0 {
		t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	n.writeConfig(conf(4))
	start := time.Now()
	n.d.MustCLI("reload")
	var open map[string]int64
	var busy bool
	for {
		open, busy = openPerServer(t, n.d, vip)
		ok := open[srvs[3]] >= 2 && open[srvs[3]] <= 4
		for _, o := range open {
			ok = ok && o <= 4
		}
		var total int64
		for _, o := range open {
			total += o
		}
		if ok && !busy && total == 12 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("10 s after the 4th server joined: open %v (rebalancing %v); want %s at 3±1, none above 4\n%s", open, busy, srvs[3], n.d.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, s := vipStatus(t, n.d, vip)
	var ended uint64
	for _, row := range s.Servers {
		ended += row.Terminated
	}
	t.Logf("rebalanced in %v: open %v, %d connections ended", time.Since(start), open, ended)
	c.Stop(t)
}
