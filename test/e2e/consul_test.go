package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/test/consul"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// The gRPC client image: test/runtime/cmd/grpcclient.
const (
	grpcClientRef    = "ctlb.test/e2e/grpcclient:1"
	grpcClientBinary = "/grpcclient"
)

// Phases count calls in multiples of the server count, so that a
// round-robin share is exact.
const (
	callsWithThree = 9
	callsPerPhase  = 6
)

// TestConsulFlagship is the flagship story on real parts: three real Consul
// servers (built from the Go module proxy) on a bridge inside a containerd
// node; ctlbd in that node following them through Consul's catalog
// (blocking queries) and health-checking them; a pod started through CRI
// whose client container makes real gRPC calls (Consul's own
// ServerDiscoveryService.WatchServers, one fresh connection each) to the
// magic VIP. The calls land on the servers round-robin. One server dies:
// it leaves the set and new calls never reach it. A replacement starts on a
// new address: it joins the set and receives calls. The pod, its container
// and its attachment never change; nobody runs a ctlb command.
//
// make demo-consul runs this test and shows its log.
func TestConsulFlagship(t *testing.T) {
	testutil.RequireRoot(t)
	requirePlugin(t)
	ctx := interruptible(t)

	step(t, "1. a node (network namespace, no uplink) with three Consul servers on a bridge inside it")
	nd := node.New(t)
	cl := consul.StartClusterWith(t, 3, consul.Options{Node: nd.NS})
	source := cl.Servers()[0]
	for _, s := range cl.Servers() {
		t.Logf("consul %s: %s (HTTP %s, gRPC %s)", s.Name, s.Addr, s.HTTPAddr(), s.GRPCAddr())
	}

	step(t, fmt.Sprintf("2. ctlbd in the node, VIP %s tracking the Consul catalog of %s (service \"consul\", port %d)", vip, source.HTTPAddr(), consul.GRPCPort))
	d := startTrackingDaemon(t, nd, source.HTTPAddr())
	all := grpcAddrs(cl.Servers()...)
	d.waitSet(ctx, all, 30*time.Second)
	t.Logf("ctlbd put all three servers in the VIP's set %v after it was started", time.Since(d.Started).Round(time.Millisecond))
	d.logStatus("ctlbd status")

	step(t, "3. containerd in the node, the ctlb CNI plugin in its chain; a pod through CRI with a gRPC client container")
	spec := node.NetworkSpec{Subnet: podSubnet, Gateway: podGateway}
	pluginLog := filepath.Join(t.TempDir(), "ctlb-plugin.log")
	spec.Ctlb = &node.CtlbPlugin{Binary: plugin, BPFFS: d.BPFFS, Socket: d.Socket, StateDir: d.StateDir, LogFile: pluginLog}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(pluginLog)
			t.Logf("ctlb plugin log:\n%s", b)
		}
	})
	network := node.InstallNetwork(t, spec)
	// CTLB_CONTAINERD=2.x runs it on containerd 2.x.
	c := containerd.Start(t, containerd.Options{Node: nd, Network: network, SandboxImage: images.PauseRef, Release: containerd.FromEnv(t)})
	c.Import(t, imgs.PauseTar)
	c.Import(t, grpcClientImage(t))
	pod := c.RunPod(t, containerd.PodSpec{Name: "consul-client"})
	ct := pod.RunContainer(t, containerd.ContainerSpec{Name: "grpc", Image: grpcClientRef, Args: []string{
		"-target", vip, "-rpc", "watchservers", "-interval", "100ms", "-timeout", "10s", "-count", "3000", "-deadline", "3m",
	}})
	t.Logf("pod %s (IP %s), container %s: WatchServers to %s every 100 ms, a fresh connection each", pod.Name, pod.IP(t), ct.Name, vip)
	calls := &callLog{t: t, ct: ct, cl: cl}

	step(t, "4. the client's calls land on the three servers round-robin")
	got := calls.wait(ctx, "the first calls", 30*time.Second, func(cs []grpcCall) bool { return len(cs) >= callsWithThree })
	first := got[:callsWithThree]
	calls.show(fmt.Sprintf("the first %d WatchServers calls to %s", callsWithThree, vip), first)
	if first[0].Err != "" {
		t.Errorf("the first call failed (%s): the pod was not redirected from its start", first[0].Err)
	}
	calls.checkRotation("three servers", first, all)
	t.Logf("RunPodSandbox to the first successful gRPC call through the VIP: %v", first[0].end().Sub(pod.Requested).Round(time.Millisecond))
	d.logStatus("ctlbd status")

	step(t, "5. a Consul server dies (SIGKILL)")
	victim := pickVictim(t, cl, source)
	survivors := slices.DeleteFunc(slices.Clone(all), func(a string) bool { return a == victim.GRPCAddr().String() })
	before, _ := d.connects(victim.GRPCAddr().String())
	stopped := time.Now()
	victim.Stop()
	t.Logf("killed consul %s (%s), a follower; ctlbd had sent it %d connects", victim.Name, victim.Addr, before)
	removed := d.waitSet(ctx, survivors, 15*time.Second)
	t.Logf("server stop to its removal from the VIP's set: %v", removed.Sub(stopped).Round(time.Millisecond))
	atRemoval, _ := d.connects(victim.GRPCAddr().String())
	got = calls.wait(ctx, "calls after the removal", 30*time.Second, func(cs []grpcCall) bool { return len(startedAfter(cs, removed)) >= callsPerPhase })
	// The window: calls in flight at some moment between the kill and the
	// removal. Those that went to the dead server failed (reset or
	// refused); that is the cost of detection, and the only one allowed.
	window := overlapping(got, stopped, removed)
	failed := 0
	for _, call := range window {
		if call.Err != "" {
			failed++
		}
	}
	t.Logf("%d calls were in flight between the kill and the removal; %d of them failed (they went to the dead server)", len(window), failed)
	calls.show("calls in flight between the kill and the removal", window)
	after := startedAfter(got, removed)[:callsPerPhase]
	calls.show("calls after the removal", after)
	calls.checkRotation("after the removal", after, survivors)
	if n, ok := d.connects(victim.GRPCAddr().String()); ok && n != atRemoval {
		t.Errorf("ctlbd counted %d connects to the dead server %s after its removal (%d then, %d now)", n-atRemoval, victim.Name, atRemoval, n)
	} else if ok {
		t.Logf("ctlbd's connects to %s stayed at %d after its removal", victim.Name, n)
	} else {
		t.Logf("%s is no longer a candidate either: the catalog dropped it", victim.Name)
	}
	d.logStatus("ctlbd status")

	step(t, "6. a replacement server starts on a new address")
	added := time.Now()
	repl := cl.AddServer()
	t.Logf("started consul %s (%s)", repl.Name, repl.Addr)
	withRepl := append(slices.Clone(survivors), repl.GRPCAddr().String())
	inSet := d.waitSet(ctx, withRepl, 60*time.Second)
	t.Logf("new server start to its entry in the VIP's set: %v", inSet.Sub(added).Round(time.Millisecond))
	got = calls.wait(ctx, "a call answered by the new server", 30*time.Second, func(cs []grpcCall) bool {
		return slices.ContainsFunc(cs, func(c grpcCall) bool { return c.Err == "" && c.Server == repl.GRPCAddr().String() })
	})
	firstNew := got[slices.IndexFunc(got, func(c grpcCall) bool { return c.Err == "" && c.Server == repl.GRPCAddr().String() })]
	t.Logf("new server start to the pod's first call landing on it: %v (answered %v after the start)",
		firstNew.started().Sub(added).Round(time.Millisecond), firstNew.end().Sub(added).Round(time.Millisecond))
	if took := firstNew.end().Sub(firstNew.started()); took > 500*time.Millisecond {
		t.Logf("that call took %v: a new Consul server holds WatchServers until it has joined Raft and knows the ready servers", took.Round(time.Millisecond))
	}
	got = calls.wait(ctx, "calls after the replacement", 30*time.Second, func(cs []grpcCall) bool { return len(startedAfter(cs, inSet)) >= callsPerPhase })
	after = startedAfter(got, inSet)[:callsPerPhase]
	calls.show("calls after the replacement entered the set", after)
	calls.checkRotation("with the replacement", after, withRepl)
	for _, call := range startedAfter(got, removed) {
		if call.Server == victim.GRPCAddr().String() {
			t.Errorf("call %d (started %s after the removal) reached the dead server %s", call.N, call.started().Sub(removed), victim.Name)
		}
	}
	d.logStatus("ctlbd status")

	step(t, "7. the pod never changed: one container process made every call, one attachment served it")
	if atts := d.Attachments(); len(atts) != 1 || atts[0].ID != cni.AttachmentID(network.Name, pod.ID) || atts[0].CgroupPath != pod.CgroupDir(testutil.V2Mount(t)) || !atts[0].Alive {
		t.Errorf("attachments = %+v, want one, %s, alive on the pod cgroup", atts, cni.AttachmentID(network.Name, pod.ID))
	}
	final := calls.stop(ctx, c)
	for i, call := range final {
		if call.N != i {
			t.Errorf("call %d is numbered %d: the client restarted", i, call.N)
			break
		}
	}
	ok, bad := 0, 0
	for _, call := range final {
		if call.Err == "" {
			ok++
		} else {
			bad++
		}
	}
	t.Logf("the client made %d calls in %v: %d answered, %d failed (%d of them in flight between the kill and the removal)",
		len(final), final[len(final)-1].end().Sub(final[0].started()).Round(time.Millisecond), ok, bad, failed)
	inWindow := overlapping(final, stopped, removed)
	for _, call := range final {
		if call.Err != "" && !slices.ContainsFunc(inWindow, func(w grpcCall) bool { return w.N == call.N }) {
			t.Errorf("call %d at %s failed outside the window between the kill and the removal: %s", call.N, call.started().Format("15:04:05.000"), call.Err)
		}
	}
	pod.Remove(t)
	if atts := d.Attachments(); len(atts) != 0 {
		t.Errorf("after RemovePodSandbox: attachments %+v, want none", atts)
	}
	if pins := d.LinkPins(); len(pins) != 0 {
		t.Errorf("after RemovePodSandbox: pins left under %s/links: %v", d.BPFFS, pins)
	}
}

// step marks a stage of the story in the log.
func step(t *testing.T, what string) {
	t.Helper()
	t.Logf("\n\n=== %s", what)
}

// interruptible turns SIGINT/SIGTERM during the test into a test failure
// at its next wait, so that an interrupted make demo-consul still runs
// every cleanup (each is bounded in time). Signals stay caught until the
// cleanups are done.
func interruptible(t *testing.T) context.Context {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	t.Cleanup(stop)
	return ctx
}

// grpcClientImage builds the gRPC client and packs it as an image.
func grpcClientImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bins, err := testutil.BuildBinaries(dir, "./test/runtime/cmd/grpcclient")
	if err != nil {
		t.Fatal(err)
	}
	tar := filepath.Join(dir, "grpcclient.oci.tar")
	if err := images.WriteOCIArchive(tar, grpcClientRef, bins["grpcclient"], grpcClientBinary, nil); err != nil {
		t.Fatal(err)
	}
	return tar
}

// pickVictim chooses the server to kill: a follower (a leader's death
// would add an election to the story) that is not the one ctlbd reads
// the catalog from.
func pickVictim(t *testing.T, cl *consul.Cluster, source *consul.Server) *consul.Server {
	t.Helper()
	leader, err := cl.Leader()
	if err != nil {
		t.Fatalf("consul leader: %v", err)
	}
	for _, s := range cl.Servers() {
		if s != leader && s != source && s.Running() {
			return s
		}
	}
	t.Fatalf("no running follower besides %s (leader %s)", source.Name, leader.Name)
	return nil
}

func grpcAddrs(servers ...*consul.Server) []string {
	var out []string
	for _, s := range servers {
		out = append(out, s.GRPCAddr().String())
	}
	slices.Sort(out)
	return out
}

// grpcCall is one line of the client's output (cmd/grpcclient's Line).
type grpcCall struct {
	N      int      `json:"n"`
	Start  int64    `json:"start"`
	End    int64    `json:"end"`
	Server string   `json:"server"`
	Peer   string   `json:"peer"`
	Answer []string `json:"answer"`
	Err    string   `json:"err"`
	Done   bool     `json:"done"`
}

func (c grpcCall) started() time.Time { return time.Unix(0, c.Start) }
func (c grpcCall) end() time.Time     { return time.Unix(0, c.End) }

func startedAfter(cs []grpcCall, at time.Time) []grpcCall {
	var out []grpcCall
	for _, c := range cs {
		if c.started().After(at) {
			out = append(out, c)
		}
	}
	return out
}

// overlapping is the calls that ran at some moment in [from, to].
func overlapping(cs []grpcCall, from, to time.Time) []grpcCall {
	var out []grpcCall
	for _, c := range cs {
		if !c.started().After(to) && !c.end().Before(from) {
			out = append(out, c)
		}
	}
	return out
}

// callLog reads the client container's calls from its CRI log as it runs.
type callLog struct {
	t  *testing.T
	ct *containerd.Container
	cl *consul.Cluster
}

// read returns the calls so far, and whether the client said it is done.
func (l *callLog) read() ([]grpcCall, bool) {
	l.t.Helper()
	lines, err := l.ct.Stdout()
	if err != nil {
		l.t.Fatal(err)
	}
	var out []grpcCall
	done := false
	for _, raw := range lines {
		var c grpcCall
		if err := json.Unmarshal([]byte(raw), &c); err != nil {
			l.t.Fatalf("client output %q: %v", raw, err)
		}
		if c.Done {
			done = true
			continue
		}
		out = append(out, c)
	}
	return out, done
}

// wait polls the calls until ok holds for them, at most limit.
func (l *callLog) wait(ctx context.Context, what string, limit time.Duration, ok func([]grpcCall) bool) []grpcCall {
	l.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		cs, done := l.read()
		if ok(cs) {
			return cs
		}
		if done {
			l.t.Fatalf("waiting for %s: the client ended after %d calls", what, len(cs))
		}
		if time.Now().After(deadline) {
			l.show("the last calls", cs[max(0, len(cs)-10):])
			l.t.Fatalf("waiting for %s: not there after %v (%d calls so far, last ones above)", what, limit, len(cs))
		}
		select {
		case <-ctx.Done():
			l.t.Fatal("interrupted: removing everything the test made")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop ends the client through CRI (StopContainer: SIGTERM) and returns
// all of its calls; it must have said it is done.
func (l *callLog) stop(ctx context.Context, c *containerd.Containerd) []grpcCall {
	l.t.Helper()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := c.Runtime.StopContainer(cctx, &cri.StopContainerRequest{ContainerId: l.ct.ID, Timeout: 10}); err != nil {
		l.t.Fatalf("StopContainer %s: %v", l.ct.Name, err)
	}
	code, err := l.ct.Wait(20 * time.Second)
	if err != nil {
		l.t.Fatal(err)
	}
	cs, done := l.read()
	if code != 0 || !done {
		l.t.Errorf("client exit code %d, done line %v: it did not end cleanly on SIGTERM", code, done)
	}
	if len(cs) == 0 {
		l.t.Fatal("the client made no call")
	}
	return cs
}

// name names a server address after its Consul server ("s2").
func (l *callLog) name(addr string) string {
	host, _, _ := strings.Cut(addr, ":")
	for _, s := range l.cl.Servers() {
		if s.Addr.String() == host {
			return s.Name
		}
	}
	return addr
}

// show logs calls the way a person reads them.
func (l *callLog) show(title string, cs []grpcCall) {
	l.t.Helper()
	if len(cs) == 0 {
		return
	}
	var b strings.Builder
	for _, c := range cs {
		at := c.started().Format("15:04:05.000")
		if c.Err != "" {
			fmt.Fprintf(&b, "\n  call %3d at %s  FAILED: %s", c.N, at, c.Err)
			continue
		}
		var ready []string
		for _, a := range c.Answer {
			_, addr, _ := strings.Cut(a, "@")
			ready = append(ready, l.name(addr))
		}
		fmt.Fprintf(&b, "\n  call %3d at %s  answered by %-3s in %6s  (kernel: %s, getpeername: %s)  ready servers it knows: %s",
			c.N, at, l.name(c.Server), c.end().Sub(c.started()).Round(time.Millisecond), c.Server, c.Peer, strings.Join(ready, " "))
	}
	l.t.Logf("%s:%s", title, b.String())
}

// checkRotation wants every call answered, by the servers in want in turn
// (no server twice in a row), each as often as the others.
func (l *callLog) checkRotation(phase string, cs []grpcCall, want []string) {
	l.t.Helper()
	per := map[string]int{}
	for i, c := range cs {
		if c.Err != "" {
			l.t.Errorf("%s: call %d failed: %s", phase, c.N, c.Err)
			continue
		}
		if !slices.Contains(want, c.Server) {
			l.t.Errorf("%s: call %d was answered by %s, not one of %v", phase, c.N, c.Server, want)
		}
		if len(c.Answer) == 0 {
			l.t.Errorf("%s: call %d: WatchServers answered with no server", phase, c.N)
		}
		per[c.Server]++
		if i > 0 && c.Server == cs[i-1].Server {
			l.t.Errorf("%s: calls %d and %d both went to %s: not round-robin", phase, cs[i-1].N, c.N, c.Server)
		}
	}
	for _, s := range want {
		if per[s] != len(cs)/len(want) {
			l.t.Errorf("%s: %s (%s) answered %d of %d calls, want %d", phase, l.name(s), s, per[s], len(cs), len(cs)/len(want))
		}
	}
}

// trackingDaemon is the real ctlbd run inside a node's network namespace
// (through nsenter) by the one test runner, with the Consul-flagship views
// of its state.
type trackingDaemon struct {
	*ctlbdtest.Daemon
	t *testing.T
	// logSeen is how much of the log logStatus has shown.
	logSeen int
}

// startTrackingDaemon runs ctlbd in nd with the VIP tracking the "consul"
// service of the catalog at consulAddr (blocking queries), port 8502,
// health-checked every second.
func startTrackingDaemon(t *testing.T, nd *node.Node, consulAddr string) *trackingDaemon {
	t.Helper()
	return startTrackingDaemonFor(t, nd, map[string]any{
		"vip":    vip,
		"consul": map[string]any{"address": consulAddr, "service": "consul", "port": consul.GRPCPort},
		"health": map[string]any{"interval": "1s", "timeout": "500ms"},
		"empty":  "reject",
	})
}

// startTrackingDaemonFor runs ctlbd in nd with one service, as given.
func startTrackingDaemonFor(t *testing.T, nd *node.Node, service map[string]any) *trackingDaemon {
	t.Helper()
	cfg := map[string]any{
		"logLevel": "info",
		"services": []map[string]any{service},
	}
	d := ctlbdtest.New(t, ctlbdtest.Options{
		Bin:    ctlbdBin,
		Config: cfg,
		// nsenter execs ctlbd: the PID is the daemon's.
		Wrap: func(argv []string) *exec.Cmd { return nd.Command(argv[0], argv[1:]...) },
	})
	b, _ := os.ReadFile(d.ConfigPath)
	t.Logf("ctlbd config:\n%s", b)
	d.Start()
	return &trackingDaemon{Daemon: d, t: t}
}

// logStatus logs `ctlbd status` as an operator sees it, after the set
// changes the daemon logged since the last call, with their reasons.
func (d *trackingDaemon) logStatus(title string) {
	d.t.Helper()
	if b := d.Logs(); len(b) > d.logSeen {
		var changes []string
		for _, line := range strings.Split(b[d.logSeen:], "\n") {
			if strings.Contains(line, "server set changed") {
				changes = append(changes, "  "+line)
			}
		}
		d.logSeen = len(b)
		if len(changes) > 0 {
			d.t.Logf("ctlbd log, set changes:\n%s", strings.Join(changes, "\n"))
		}
	}
	d.t.Logf("%s:\n%s", title, d.MustCLI("status"))
}

// set is the VIP's server set as the map holds it (ctlbd service list).
func (d *trackingDaemon) set() []string {
	d.t.Helper()
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	out := []string{}
	for _, s := range svcs {
		if s.VIP == netip.MustParseAddrPort(vip) {
			for _, a := range s.Servers {
				out = append(out, a.String())
			}
		}
	}
	slices.Sort(out)
	return out
}

// waitSet waits until the VIP's set is want and returns when it saw it: a
// connect() made after that time sees the set (or a later one).
func (d *trackingDaemon) waitSet(ctx context.Context, want []string, limit time.Duration) time.Time {
	d.t.Helper()
	want = slices.Sorted(slices.Values(want))
	start := time.Now()
	for {
		got := d.set()
		if slices.Equal(got, want) {
			return time.Now()
		}
		if time.Since(start) > limit {
			d.logStatus("ctlbd status")
			d.t.Fatalf("VIP %s set = %v, want %v within %v", vip, got, want, limit)
		}
		select {
		case <-ctx.Done():
			d.t.Fatal("interrupted: removing everything the test made")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// connects is ctlbd's count of connects sent to server, and whether the
// server is still listed.
func (d *trackingDaemon) connects(server string) (uint64, bool) {
	d.t.Helper()
	var st api.Status
	d.JSON(&st, "status")
	for _, svc := range st.Services {
		if svc.VIP != vip {
			continue
		}
		for _, s := range svc.Servers {
			if s.Server == server {
				return s.Connects, true
			}
		}
	}
	return 0, false
}
