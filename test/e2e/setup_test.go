package e2e_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// Addresses: pods on 198.18.0.0/24 (gateway .1 on the node's bridge), real
// servers on /32s of the node's lo outside that subnet, and the VIP in
// 198.19.0.0/16, which nothing routes.
const (
	podSubnet  = "198.18.0.0/24"
	podGateway = "198.18.0.1"
	vip        = "198.19.0.10:8502"
)

var servers = []string{"198.18.200.1:8502", "198.18.200.2:8502", "198.18.200.3:9000"}

// env is one test's node: ctlbd (when the plugin is chained), the node
// namespace with the servers, and the CNI network the runtime reads.
type env struct {
	daemon *ctlbdtest.Daemon
	node   *node.Node
	net    *node.Network
	// pluginLog is the ctlb plugin's log (JSON lines), when chained.
	pluginLog string
}

// newEnv builds a node whose conflist chains bridge, host-local, loopback
// and, when withCtlb, the ctlb plugin, with ctlbd running and the VIP set.
func newEnv(t *testing.T, withCtlb bool) *env {
	t.Helper()
	return newEnvWith(t, envOptions{ctlb: withCtlb})
}

// envOptions change what newEnvWith builds.
type envOptions struct {
	ctlb bool
	// tweak changes the network spec (a CNI version, other plugins)
	// before it is installed.
	tweak func(*node.NetworkSpec)
	// daemonArgs are more flags of ctlbd run.
	daemonArgs []string
}

// newEnvWith is newEnv with options.
func newEnvWith(t *testing.T, o envOptions) *env {
	t.Helper()
	withCtlb, tweak := o.ctlb, o.tweak
	testutil.RequireRoot(t)
	e := &env{}
	spec := node.NetworkSpec{Subnet: podSubnet, Gateway: podGateway}
	if withCtlb {
		requirePlugin(t)
		e.daemon = ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbdBin, Args: o.daemonArgs})
		e.daemon.SetService(vip, servers...)
		logFile := filepath.Join(t.TempDir(), "ctlb-plugin.log")
		e.pluginLog = logFile
		spec.Ctlb = &node.CtlbPlugin{Binary: plugin, BPFFS: e.daemon.BPFFS, Socket: e.daemon.Socket, StateDir: e.daemon.StateDir, LogFile: logFile}
		t.Cleanup(func() {
			if t.Failed() {
				b, _ := os.ReadFile(logFile)
				t.Logf("ctlb plugin log:\n%s", b)
			}
		})
	}
	e.node = node.New(t)
	testutil.AddLoopbackAddrs(t, e.node.NS, "198.18.200.1", "198.18.200.2", "198.18.200.3")
	testutil.StartServers(t, e.node.NS, servers...)
	if tweak != nil {
		tweak(&spec)
	}
	e.net = node.InstallNetwork(t, spec)
	return e
}

// requirePlugin needs the ctlb CNI plugin binary.
func requirePlugin(t *testing.T) {
	t.Helper()
	testutil.Require(t, plugin != "", "the ctlb CNI plugin (plugins/meta/ctlb) is not built yet")
}

// assertClean checks that ctlb holds nothing for any pod: no attachment,
// no pin under bpffs/links, no pending record.
func (e *env) assertClean(t *testing.T, when string) {
	t.Helper()
	if atts := e.daemon.Attachments(); len(atts) != 0 {
		t.Errorf("%s: ctlbd attachments = %+v, want none", when, atts)
	}
	if pins := e.daemon.LinkPins(); len(pins) != 0 {
		t.Errorf("%s: pins left under %s/links: %v", when, e.daemon.BPFFS, pins)
	}
	if st := e.daemon.Status(); st.Pending != 0 || st.Attachments != 0 {
		t.Errorf("%s: ctlbd status: %d attachments, %d pending, want none", when, st.Attachments, st.Pending)
	}
}

// assertRoundRobin checks that every connection landed on a server and
// that consecutive ones went to the servers in turn, each equally often.
func assertRoundRobin(t *testing.T, landed []string) {
	t.Helper()
	per := map[string]int{}
	for i, s := range landed {
		if !isServer(s) {
			t.Fatalf("connection %d landed on %q, not a server (all: %v)", i, s, landed)
		}
		per[s]++
		if i > 0 && s == landed[i-1] {
			t.Errorf("connections %d and %d both went to %s: not round-robin (all: %v)", i-1, i, s, landed)
		}
	}
	for _, s := range servers {
		if per[s] != len(landed)/len(servers) {
			t.Errorf("%s got %d of %d connections, want %d (all: %v)", s, per[s], len(landed), len(landed)/len(servers), landed)
		}
	}
}

func isServer(s string) bool {
	for _, x := range servers {
		if x == s {
			return true
		}
	}
	return false
}
