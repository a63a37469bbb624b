package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/ctlb/ctlb/test/consul"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// flagshipStreams is how many long-lived WatchServers streams the pod holds.
const flagshipStreams = 12

// streamEvent is one line of the client in -streams mode.
type streamEvent struct {
	N      int    `json:"n"`
	End    int64  `json:"end"`
	Server string `json:"server"`
	Err    string `json:"err"`
	Event  string `json:"event"`
	Done   bool   `json:"done"`
}

func (e streamEvent) at() time.Time { return time.Unix(0, e.End) }

// streamLog reads the client's stream events from its CRI log.
type streamLog struct {
	t  *testing.T
	ct *containerd.Container
}

func (l *streamLog) read() []streamEvent {
	l.t.Helper()
	lines, err := l.ct.Stdout()
	if err != nil {
		l.t.Fatal(err)
	}
	var out []streamEvent
	for _, raw := range lines {
		var e streamEvent
		if err := json.Unmarshal([]byte(raw), &e); err != nil {
			l.t.Fatalf("client output %q: %v", raw, err)
		}
		if !e.Done {
			out = append(out, e)
		}
	}
	return out
}

// open is, per stream, the server of its last "open" event (if its last
// event is one), and the time of that event.
func openStreams(evs []streamEvent) (map[int]string, map[int]time.Time) {
	srv, at := map[int]string{}, map[int]time.Time{}
	for _, e := range evs {
		switch e.Event {
		case "open":
			srv[e.N], at[e.N] = e.Server, e.at()
		case "ended":
			delete(srv, e.N)
		}
	}
	return srv, at
}

func perServer(open map[int]string) map[string]int {
	out := map[string]int{}
	for _, s := range open {
		out[s]++
	}
	return out
}

// wait polls the events until ok holds, at most limit; then fails with
// what it last saw.
func (l *streamLog) wait(ctx context.Context, what string, limit time.Duration, ok func([]streamEvent) bool) []streamEvent {
	l.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		evs := l.read()
		if ok(evs) {
			return evs
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			open, _ := openStreams(evs)
			l.t.Fatalf("%s: not within %v; open streams per server %v; last events %+v", what, limit, perServer(open), evs[max(0, len(evs)-15):])
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestConsulFlagshipStreams is the flagship with long-lived streams, as
// Envoy and consul-dataplane hold them: the pod keeps 12 WatchServers
// streams through the VIP. A Consul server's host vanishes (its link goes,
// the process is killed, its network namespace removed: no RST ever comes
// back): every stream that was on it is ended by ctlbd the moment the
// health checks take the server out, and re-established on a live server
// within 2 s. A replacement joins; with rebalance on, it receives its
// share of the streams.
func TestConsulFlagshipStreams(t *testing.T) {
	requirePlugin(t)
	ctx := interruptible(t)

	step(t, "1. a node with three Consul servers; ctlbd tracking their catalog, health-checked every 250 ms, rebalance on")
	nd := node.New(t)
	cl := consul.StartClusterWith(t, 3, consul.Options{Node: nd.NS})
	source := cl.Servers()[0]
	d := startTrackingDaemonFor(t, nd, map[string]any{
		"vip":           vip,
		"consul":        map[string]any{"address": source.HTTPAddr(), "service": "consul", "port": consul.GRPCPort},
		"health":        map[string]any{"interval": "250ms", "timeout": "200ms", "fall": 1},
		"empty":         "reject",
		"rebalance":     true,
		"rebalanceRate": 4,
	})
	all := grpcAddrs(cl.Servers()...)
	d.waitSet(ctx, all, 30*time.Second)

	step(t, fmt.Sprintf("2. a pod through CRI holding %d WatchServers streams to %s", flagshipStreams, vip))
	spec := node.NetworkSpec{Subnet: podSubnet, Gateway: podGateway}
	pluginLog := filepath.Join(t.TempDir(), "ctlb-plugin.log")
	spec.Ctlb = &node.CtlbPlugin{Binary: plugin, BPFFS: d.BPFFS, Socket: d.Socket, StateDir: d.StateDir, LogFile: pluginLog}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(pluginLog)
			t.Logf("ctlb plugin log:\n%s", b)
			t.Logf("ctlbd log:\n%s", d.LogTail(6000))
		}
	})
	network := node.InstallNetwork(t, spec)
	c := containerd.Start(t, containerd.Options{Node: nd, Network: network, SandboxImage: images.PauseRef, Release: containerd.FromEnv(t)})
	c.Import(t, imgs.PauseTar)
	c.Import(t, grpcClientImage(t))
	pod := c.RunPod(t, containerd.PodSpec{Name: "consul-streams"})
	ct := pod.RunContainer(t, containerd.ContainerSpec{Name: "grpc", Image: grpcClientRef, Args: []string{
		"-target", vip, "-rpc", "watchservers", "-streams", fmt.Sprint(flagshipStreams), "-timeout", "10s", "-deadline", "4m",
	}})
	log := &streamLog{t: t, ct: ct}
	evs := log.wait(ctx, "every stream open", 60*time.Second, func(evs []streamEvent) bool {
		open, _ := openStreams(evs)
		return len(open) == flagshipStreams
	})
	open, _ := openStreams(evs)
	t.Logf("%d streams open: per server %v", len(open), perServer(open))
	d.logStatus("ctlbd status")

	step(t, "3. a Consul server's host vanishes: link gone, process killed, network namespace removed")
	victim := pickVictim(t, cl, source)
	vaddr := victim.GRPCAddr().String()
	var onVictim []int
	for n, s := range open {
		if s == vaddr {
			onVictim = append(onVictim, n)
		}
	}
	slices.Sort(onVictim)
	vanished := time.Now()
	if err := nd.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("v" + victim.Name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}); err != nil {
		t.Fatalf("remove %s's link: %v", victim.Name, err)
	}
	victim.Stop()
	victim.NS.Close()
	_ = testutils.UnmountNS(victim.NS)
	t.Logf("consul %s (%s) vanished; %d streams were on it: %v", victim.Name, victim.Addr, len(onVictim), onVictim)
	survivors := slices.DeleteFunc(slices.Clone(all), func(a string) bool { return a == vaddr })
	evs = log.wait(ctx, "the victim's streams re-established on live servers", 15*time.Second, func(evs []streamEvent) bool {
		open, at := openStreams(evs)
		for _, n := range onVictim {
			if s, ok := open[n]; !ok || s == vaddr || !at[n].After(vanished) {
				return false
			}
		}
		return true
	})
	open, at := openStreams(evs)
	var worst time.Duration
	for _, n := range onVictim {
		took := at[n].Sub(vanished)
		worst = max(worst, took)
		t.Logf("stream %d: on %s again %v after the host vanished", n, open[n], took.Round(time.Millisecond))
		if !slices.Contains(survivors, open[n]) {
			t.Errorf("stream %d re-opened on %s, not a live server %v", n, open[n], survivors)
		}
		if took > 2*time.Second {
			t.Errorf("stream %d took %v to be re-established, want at most 2 s", n, took.Round(time.Millisecond))
		}
	}
	for n, s := range open {
		if !slices.Contains(onVictim, n) && at[n].After(vanished) {
			t.Errorf("stream %d on %s, not on the vanished server, was re-opened too", n, s)
		}
	}
	t.Logf("every stream on the vanished server was back on a live server within %v; per server now %v", worst.Round(time.Millisecond), perServer(open))
	d.logStatus("ctlbd status")

	step(t, "4. a replacement server joins: rebalancing moves it its share of the streams")
	repl := cl.AddServer()
	withRepl := append(slices.Clone(survivors), repl.GRPCAddr().String())
	inSet := d.waitSet(ctx, withRepl, 60*time.Second)
	share := flagshipStreams / len(withRepl)
	evs = log.wait(ctx, fmt.Sprintf("the replacement holding %d ±1 streams", share), 30*time.Second, func(evs []streamEvent) bool {
		open, _ := openStreams(evs)
		per := perServer(open)
		if len(open) != flagshipStreams || per[repl.GRPCAddr().String()] < share-1 {
			return false
		}
		for _, k := range per {
			if k > share+1 {
				return false
			}
		}
		return true
	})
	open, _ = openStreams(evs)
	t.Logf("the replacement holds its share %v after it entered the set: per server %v", time.Since(inSet).Round(time.Millisecond), perServer(open))
	d.logStatus("ctlbd status")
	pod.Remove(t)
}
