package ctlbd_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// BenchmarkServerLoss measures what a client sees when servers leave, die
// or join (make bench-serverloss, run by make bench): the time from a set
// change to the end of the departed server's sockets, the failed connects
// a dead server costs, how long a server that listens again waits to get
// connects, and how long a rebalance onto a newcomer takes. Each figure is
// the median (and max) of rounds; tests assert none of them.
func BenchmarkServerLoss(b *testing.B) {
	const rounds = 10
	var (
		toEnd, toEndAfterCLI, backAfter []time.Duration
		failedPerDeath                  []int
		rebalance                       []time.Duration
	)
	for range b.N {
		d := newDaemon(b)
		d.Start()
		netns := testutil.NewNetNS(b)
		srvs := []string{"127.0.0.81:8502", "127.0.0.82:8502", "127.0.0.83:8502", "127.0.0.84:8502"}
		testutil.AddLoopbackAddrs(b, netns, "127.0.0.81", "127.0.0.82", "127.0.0.83", "127.0.0.84")
		running := testutil.StartServers(b, netns, srvs...)
		cg := testutil.NewCgroup(b, "")
		d.MustCLI("attach", "--cgroup", cg)
		resident := testutil.StartClient(b, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip})
		resident.Result(b)

		// Termination: 8 held connections over 2 servers, one leaves.
		for range rounds {
			d.MustCLI("service", "set", vip, srvs[0], srvs[1])
			c := testutil.StartClient(b, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 8})
			if r := c.Result(b); r.Failed != 0 {
				b.Fatalf("held connections: %v", r.Errors)
			}
			start := time.Now()
			d.MustCLI("service", "set", vip, srvs[1])
			cli := time.Now()
			for range 4 {
				ev := c.Event(b, 2*time.Second)
				if ev == nil {
					b.Fatalf("a connection on %s still open 2 s after it left the set", srvs[0])
				}
				at := time.Unix(0, ev.At)
				toEnd = append(toEnd, at.Sub(start))
				toEndAfterCLI = append(toEndAfterCLI, at.Sub(cli))
			}
			c.Stop(b)
		}

		// Fail fast: a static VIP of 3; one server dies; 30 sequential
		// connects; then it listens again.
		d.MustCLI("service", "set", vip, srvs[0], srvs[1], srvs[2])
		for i := range rounds {
			victim := running[1]
			victim.Close()
			r := testutil.RunClient(b, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 30})
			failedPerDeath = append(failedPerDeath, r.Failed)
			if r.PerServer[srvs[1]] != 0 {
				b.Fatalf("round %d: %d connects reached the dead server", i, r.PerServer[srvs[1]])
			}
			running[1] = testutil.StartServers(b, netns, srvs[1])[0]
			back := time.Now()
			for {
				r := testutil.RunClient(b, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
				if r.PerServer[srvs[1]] > 0 {
					backAfter = append(backAfter, time.Since(back))
					break
				}
				if time.Since(back) > 35*time.Second {
					b.Fatalf("round %d: %s got no connect 35 s after it listened again", i, srvs[1])
				}
				time.Sleep(20 * time.Millisecond)
			}
			// Let the hold-down's strikes be forgotten before the next death.
			time.Sleep(200 * time.Millisecond)
		}
		resident.Stop(b)
		for _, l := range strings.Split(d.Logs(), "\n") {
			if strings.Contains(l, "ended connections") {
				b.Log(l)
			}
		}

		// Rebalance: 12 held on 3, a 4th joins a VIP with rebalance on.
		rebalance = append(rebalance, measureRebalance(b, srvs))
	}
	ms := func(ds []time.Duration) (float64, float64) {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds()) / 1000, float64(ds[len(ds)-1].Microseconds()) / 1000
	}
	p50, mx := ms(toEnd)
	b.ReportMetric(p50, "ms-set-to-end-p50")
	b.ReportMetric(mx, "ms-set-to-end-max")
	p50, mx = ms(toEndAfterCLI)
	b.ReportMetric(p50, "ms-after-cli-to-end-p50")
	b.ReportMetric(mx, "ms-after-cli-to-end-max")
	total, worst := 0, 0
	for _, f := range failedPerDeath {
		total += f
		worst = max(worst, f)
	}
	b.ReportMetric(float64(total)/float64(len(failedPerDeath)), "failed-connects-per-death")
	b.ReportMetric(float64(worst), "failed-connects-per-death-max")
	p50, mx = ms(backAfter)
	b.ReportMetric(p50, "ms-back-in-rotation-p50")
	b.ReportMetric(mx, "ms-back-in-rotation-max")
	p50, _ = ms(rebalance)
	b.ReportMetric(p50, "ms-rebalance-p50")
	b.Logf("set change to socket end: %d sockets, p50 %v; failed connects per server death: %v; back in rotation after listening again: p50 %v; rebalance 12 on 3 -> 4: %v",
		len(toEnd), toEnd[len(toEnd)/2], failedPerDeath, backAfter[len(backAfter)/2], rebalance)
}

// measureRebalance holds 12 connections on 3 servers of a rebalancing VIP,
// adds srvs[3] and returns how long until it holds 3 ±1 and none holds more
// than 4.
func measureRebalance(b *testing.B, srvs []string) time.Duration {
	b.Helper()
	conf := func(n int) string {
		return fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s, "rebalance": true}]}`, vip, jsonList(srvs[:n]))
	}
	n := newNode(b, []string{"127.0.0.81", "127.0.0.82", "127.0.0.83", "127.0.0.84"}, conf(3))
	testutil.StartServers(b, n.netns, srvs...)
	n.start()
	cg := testutil.NewCgroup(b, "")
	n.d.MustCLI("attach", "--cgroup", cg)
	c := testutil.StartClient(b, n.netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 12, Reconnect: true})
	if r := c.Result(b); r.Failed != 0 {
		b.Fatalf("held connections: %v", r.Errors)
	}
	n.writeConfig(conf(4))
	start := time.Now()
	n.d.MustCLI("reload")
	for {
		open, busy := openPerServer(b, n.d, vip)
		ok, total := open[srvs[3]] >= 2 && open[srvs[3]] <= 4, int64(0)
		for _, o := range open {
			ok = ok && o <= 4
			total += o
		}
		if ok && !busy && total == 12 {
			took := time.Since(start)
			c.Stop(b)
			return took
		}
		if time.Since(start) > 30*time.Second {
			b.Fatalf("rebalance not done 30 s after the 4th server joined: %v\n%s", open, strings.Join(strings.Split(n.d.Logs(), "\n")[max(0, len(strings.Split(n.d.Logs(), "\n"))-20):], "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
