package e2e_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/consul"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// TestConsulFlagshipTLS is the flagship story as production runs Consul:
// the three servers speak only HTTPS (8501) and gRPC over TLS (8503), with
// certificates from a CA made in the test and ACLs on (default deny, the
// bootstrap token in a file). ctlbd follows the catalog over HTTPS with the
// token file and checks every server with the consul type (WatchServers
// over TLS, with the token); the pod's client makes TLS WatchServers calls,
// with a token, to the VIP through a server kill and a replacement.
func TestConsulFlagshipTLS(t *testing.T) {
	testutil.RequireRoot(t)
	requirePlugin(t)
	ctx := interruptible(t)

	step(t, "1. a node with three Consul servers: HTTPS and gRPC over TLS only, ACLs with default deny")
	nd := node.New(t)
	cl := consul.StartClusterWith(t, 3, consul.Options{Node: nd.NS, Secure: true})
	source := cl.Servers()[0]
	for _, s := range cl.Servers() {
		t.Logf("consul %s: %s (HTTPS %s, gRPC TLS %s)", s.Name, s.Addr, s.HTTPAddr(), s.GRPCAddr())
	}

	step(t, fmt.Sprintf("2. ctlbd in the node, VIP %s following %s over HTTPS with a token file, consul checks over TLS", vip, source.HTTPAddr()))
	tlsCfg := map[string]any{"caFile": cl.CAFile, "serverName": consul.ServerName}
	d := startTrackingDaemonFor(t, nd, map[string]any{
		"vip": vip,
		"consul": map[string]any{
			"address": source.HTTPAddr(), "service": "consul", "port": consul.GRPCTLSPort,
			"tokenFile": cl.TokenFile, "tls": tlsCfg,
		},
		"health": map[string]any{"type": "consul", "interval": "1s", "timeout": "1s", "tls": tlsCfg},
		"empty":  "reject",
	})
	all := grpcAddrs(cl.Servers()...)
	d.waitSet(ctx, all, 30*time.Second)
	t.Logf("ctlbd put all three servers in the VIP's set %v after it was started", time.Since(d.Started).Round(time.Millisecond))
	d.logStatus("ctlbd status")

	step(t, "3. containerd in the node with the ctlb CNI plugin; a pod whose client makes TLS gRPC calls with a token")
	spec := node.NetworkSpec{Subnet: podSubnet, Gateway: podGateway}
	pluginLog := filepath.Join(t.TempDir(), "ctlb-plugin.log")
	spec.Ctlb = &node.CtlbPlugin{Binary: plugin, BPFFS: d.BPFFS, Socket: d.Socket, StateDir: d.StateDir, LogFile: pluginLog}
	network := node.InstallNetwork(t, spec)
	c := containerd.Start(t, containerd.Options{Node: nd, Network: network, SandboxImage: images.PauseRef})
	c.Import(t, imgs.PauseTar)
	c.Import(t, grpcClientImage(t))
	caPEM, err := os.ReadFile(cl.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pod := c.RunPod(t, containerd.PodSpec{Name: "consul-tls-client"})
	ct := pod.RunContainer(t, containerd.ContainerSpec{Name: "grpc", Image: grpcClientRef, Args: []string{
		"-target", vip, "-rpc", "watchservers", "-interval", "100ms", "-timeout", "10s", "-count", "3000", "-deadline", "3m",
		"-tls-ca-pem", string(caPEM), "-tls-server-name", consul.ServerName, "-token", cl.Token,
	}})
	calls := &callLog{t: t, ct: ct, cl: cl}

	step(t, "4. TLS calls land on the three servers round-robin")
	got := calls.wait(ctx, "the first calls", 30*time.Second, func(cs []grpcCall) bool { return len(cs) >= callsWithThree })
	first := got[:callsWithThree]
	calls.show(fmt.Sprintf("the first %d TLS WatchServers calls to %s", callsWithThree, vip), first)
	calls.checkRotation("three servers", first, all)
	t.Logf("RunPodSandbox to the first successful TLS gRPC call through the VIP: %v", first[0].end().Sub(pod.Requested).Round(time.Millisecond))

	step(t, "5. a Consul server dies (SIGKILL)")
	victim := pickVictim(t, cl, source)
	survivors := slices.DeleteFunc(slices.Clone(all), func(a string) bool { return a == victim.GRPCAddr().String() })
	stopped := time.Now()
	victim.Stop()
	removed := d.waitSet(ctx, survivors, 15*time.Second)
	t.Logf("FIGURE TLS: server kill to its removal from the VIP's set: %v", removed.Sub(stopped).Round(time.Millisecond))
	got = calls.wait(ctx, "calls after the removal", 30*time.Second, func(cs []grpcCall) bool { return len(startedAfter(cs, removed)) >= callsPerPhase })
	window := overlapping(got, stopped, removed)
	failed := 0
	for _, call := range window {
		if call.Err != "" {
			failed++
		}
	}
	t.Logf("%d calls in flight between the kill and the removal, %d failed", len(window), failed)
	after := startedAfter(got, removed)[:callsPerPhase]
	calls.show("calls after the removal", after)
	calls.checkRotation("after the removal", after, survivors)

	step(t, "6. a replacement server starts on a new address")
	added := time.Now()
	repl := cl.AddServer()
	withRepl := append(slices.Clone(survivors), repl.GRPCAddr().String())
	inSet := d.waitSet(ctx, withRepl, 60*time.Second)
	t.Logf("FIGURE TLS: replacement start to its entry in the VIP's set (consul check passed): %v", inSet.Sub(added).Round(time.Millisecond))
	got = calls.wait(ctx, "a call answered by the new server", 30*time.Second, func(cs []grpcCall) bool {
		return slices.ContainsFunc(cs, func(c grpcCall) bool { return c.Err == "" && c.Server == repl.GRPCAddr().String() })
	})
	firstNew := got[slices.IndexFunc(got, func(c grpcCall) bool { return c.Err == "" && c.Server == repl.GRPCAddr().String() })]
	t.Logf("FIGURE TLS: replacement start to the pod's first TLS call on it: started %v, answered %v after the start (the call took %v)",
		firstNew.started().Sub(added).Round(time.Millisecond), firstNew.end().Sub(added).Round(time.Millisecond),
		firstNew.end().Sub(firstNew.started()).Round(time.Millisecond))
	got = calls.wait(ctx, "calls after the replacement", 30*time.Second, func(cs []grpcCall) bool { return len(startedAfter(cs, inSet)) >= callsPerPhase })
	after = startedAfter(got, inSet)[:callsPerPhase]
	calls.show("calls after the replacement entered the set", after)
	calls.checkRotation("with the replacement", after, withRepl)
	d.logStatus("ctlbd status")

	final := calls.stop(ctx, c)
	inWindow := overlapping(final, stopped, removed)
	for _, call := range final {
		if call.Err != "" && !slices.ContainsFunc(inWindow, func(w grpcCall) bool { return w.N == call.N }) {
			t.Errorf("call %d at %s failed outside the window between the kill and the removal: %s", call.N, call.started().Format("15:04:05.000"), call.Err)
		}
	}
	pod.Remove(t)
}
