package e2e_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// Host scope reaches every process of the machine, other tests' too: its
// VIP is one no other test uses, so nobody else's connects are rewritten.
const hostVIP = "198.19.77.7:7777"

var hostServers = []string{"198.18.201.1:7001", "198.18.201.2:7001"}

// TestHostScope: with no CNI at all, `ctlbd attach --host` attaches once at
// the cgroup v2 root, and a process in an arbitrary cgroup (made by the
// test, under no pod) is redirected; `ctlbd detach --host` takes it away
// and leaves no attachment and no pin. Then the config's "hostScope": true
// does the same when ctlbd starts.
func TestHostScope(t *testing.T) {
	testutil.RequireRoot(t)
	nd := node.New(t)
	testutil.AddLoopbackAddrs(t, nd.NS, "198.18.201.1", "198.18.201.2")
	testutil.StartServers(t, nd.NS, hostServers...)
	v2 := testutil.V2Mount(t)
	cg := testutil.NewCgroup(t, "") // a cgroup no runtime knows about
	dial := func(count int) testutil.ClientResult {
		return testutil.RunClient(t, nd.NS, cg, testutil.ClientSpec{Mode: "dial", Target: hostVIP, Count: count})
	}

	d := ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbdBin})
	d.SetService(hostVIP, hostServers...)
	if r := dial(1); r.Failed != 1 {
		t.Fatalf("before attach --host: %+v, want the VIP unreachable", r)
	}

	var a api.Attachment
	d.JSON(&a, "attach", "--host")
	if a.CgroupPath != v2 || !a.Alive {
		t.Fatalf("attach --host: %+v, want alive on the cgroup v2 root %s", a, v2)
	}
	if !d.Status().HostScope {
		t.Errorf("status does not report host scope after attach --host")
	}
	// Idempotent: a second attach changes nothing.
	d.MustCLI("attach", "--host")
	if n := len(d.Attachments()); n != 1 {
		t.Errorf("%d attachments after attach --host twice, want 1", n)
	}
	r := dial(4)
	if r.Failed != 0 || r.PerServer[hostServers[0]] != 2 || r.PerServer[hostServers[1]] != 2 {
		t.Fatalf("a process in %s with host scope: %+v, want 2 connects on each server", cg, r)
	}
	t.Logf("host scope: a process in %s landed %v", cg, r.Landed)

	d.MustCLI("detach", "--host")
	assertNothingAttached(t, d, "after detach --host")
	// Unpinned links leave the cgroup from a kernel work queue, a moment
	// after the detach returns.
	testutil.Eventually(t, "the VIP unreachable again after detach --host", 10*time.Second, func() (bool, string) {
		r := dial(1)
		return r.Failed == 1, fmt.Sprintf("%+v", r)
	})
	if _, _, code := d.CLI("detach", "--host"); code == 0 {
		t.Errorf("detach --host with nothing attached succeeded, want an error saying so")
	}
	if _, _, code := d.CLI("attach", "--host", "--cgroup", "/x"); code == 0 {
		t.Errorf("attach --host --cgroup /x succeeded, want a usage error")
	}
	d.Stop()

	// The config key: attached when ctlbd starts.
	cfg := filepath.Join(t.TempDir(), "ctlbd.json")
	if err := os.WriteFile(cfg, []byte(`{"hostScope": true}`), 0o644); err != nil {
		t.Fatal(err)
	}
	d = ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbdBin, Args: []string{"--config", cfg}})
	d.SetService(hostVIP, hostServers...)
	if !d.Status().HostScope {
		t.Fatalf("config hostScope: status reports no host scope")
	}
	if r := dial(2); r.Failed != 0 || len(r.PerServer) != 2 {
		t.Fatalf("config hostScope: %+v, want both servers", r)
	}
	d.MustCLI("detach", "--host")
	assertNothingAttached(t, d, "after detach --host (config hostScope)")
}

// assertNothingAttached checks that ctlbd lists no attachment and no link
// pin is left.
func assertNothingAttached(t *testing.T, d *ctlbdtest.Daemon, when string) {
	t.Helper()
	if atts := d.Attachments(); len(atts) != 0 {
		t.Errorf("%s: attachments %+v, want none", when, atts)
	}
	if pins := d.LinkPins(); len(pins) != 0 {
		t.Errorf("%s: link pins left: %v", when, pins)
	}
	if d.Status().HostScope {
		t.Errorf("%s: status still reports host scope", when)
	}
}
