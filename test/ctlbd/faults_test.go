package ctlbd_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// fastReconcile writes a config that makes the daemon repair every 200ms.
func fastReconcile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctlbd.json")
	if err := os.WriteFile(path, []byte(`{"reconcileInterval": "200ms"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRestartFiveTimesUnderLoad(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	pinsBefore := listPins(t, d.BPFFS)

	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 50000, Duration: time.Minute})
	for i := 0; i < 5; i++ {
		time.Sleep(100 * time.Millisecond)
		d.Kill()
		time.Sleep(100 * time.Millisecond)
		d.Start()
	}
	r := storm.Finish(t)
	t.Logf("5 SIGKILL+restart cycles under load: %d connects tried, %d failed, %d misrouted", r.Total, r.Failed, misrouted(r.PerServer))
	if r.Failed != 0 || misrouted(r.PerServer) != 0 {
		t.Errorf("failed %d, misrouted %d (%v) of %d", r.Failed, misrouted(r.PerServer), r.Errors, r.Total)
	}
	if after := listPins(t, d.BPFFS); strings.Join(after, " ") != strings.Join(pinsBefore, " ") {
		t.Errorf("pins changed across restarts:\nbefore %v\nafter  %v", pinsBefore, after)
	}
	var atts []api.Attachment
	d.JSON(&atts, "attachments")
	if len(atts) != 1 {
		t.Errorf("attachments after restarts = %+v, want exactly one", atts)
	}
}

func misrouted(perServer map[string]int) int {
	n := 0
	for s, c := range perServer {
		if !contains(servers, s) {
			n += c
		}
	}
	return n
}

// listPins lists every pin under dir, relative to it.
func listPins(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestPinsRemovedByHandAreRestored(t *testing.T) {
	d := newDaemon(t, "--config", fastReconcile(t))
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	want := listPins(t, d.BPFFS)

	// Every map and program pin goes, and one link pin of the attachment.
	for _, p := range want {
		if !strings.HasPrefix(p, "links/") || strings.HasSuffix(p, "/connect4") {
			if err := os.Remove(filepath.Join(d.BPFFS, p)); err != nil {
				t.Fatal(err)
			}
		}
	}
	took := testutil.Eventually(t, "pins restored", 5*time.Second, func() (bool, string) {
		got := strings.Join(listPins(t, d.BPFFS), " ")
		return got == strings.Join(want, " "), "pins " + got
	})
	t.Logf("pins restored %v after removal", took)
	if !strings.Contains(d.Logs(), "pinned them again") || !strings.Contains(d.Logs(), "re-attached") {
		t.Errorf("the daemon did not report the repair loudly:\n%s", d.Logs())
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	if r.Failed != 0 || misrouted(r.PerServer) != 0 || len(r.PerServer) != 3 {
		t.Fatalf("after the repair: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
	}
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	if len(svcs) != 1 || len(svcs[0].Servers) != 3 {
		t.Fatalf("services after the repair = %+v", svcs)
	}
}

func TestDeadCgroupAttachmentCollected(t *testing.T) {
	d := newDaemon(t, "--config", fastReconcile(t))
	d.Start()
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)
	// The pod is torn down without a DEL: its cgroup just goes.
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	took := testutil.Eventually(t, "dead attachment removed", 10*time.Second, func() (bool, string) {
		var atts []api.Attachment
		d.JSON(&atts, "attachments")
		return len(atts) == 0, fmt.Sprintf("attachments %+v", atts)
	})
	t.Logf("attachment of a removed cgroup collected %v after rmdir", took)
	if pins := listPins(t, filepath.Join(d.BPFFS, "links")); len(pins) != 0 {
		t.Fatalf("link pins left: %v", pins)
	}
	// A new cgroup of the same name attaches again.
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	d.MustCLI("attach", "--cgroup", cg)
}

// TestServerHostRemoved kills a server process and then removes its host's
// network namespace outright (the veth to it goes too), under a connect
// loop: after detection no connection goes there; when the last server goes
// the same way, with panic off, connects fail at once, refused, never hang.
func TestServerHostRemoved(t *testing.T) {
	hosts := []string{"198.18.50.2", "198.18.50.6"}
	srvs := []string{"198.18.50.2:8502", "198.18.50.6:8502"}
	n := newNode(t, nil, fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s, "empty": "reject",
		"health": {"interval": "200ms", "timeout": "100ms"}, "panic": false}]}`, vip, jsonList(srvs)))
	var hostNS []ns.NetNS
	var servers []*testutil.Server
	for i, h := range hosts {
		hn := newHost(t, n.netns, fmt.Sprintf("198.18.50.%d", 4*i+1), h, fmt.Sprintf("vh%d", i))
		hostNS = append(hostNS, hn)
		servers = append(servers, testutil.StartServers(t, hn, srvs[i])...)
	}
	n.start()
	n.waitSet(vip, srvs, 5*time.Second)
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)

	storm := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 20000, Duration: time.Minute})
	time.Sleep(200 * time.Millisecond)
	servers[0].Close()
	removeNetNS(t, hostNS[0])
	took := n.waitSet(vip, srvs[1:], 3*time.Second)
	r := storm.Finish(t)
	t.Logf("server killed and its namespace removed: removed from the map after %v; connect loop: %d tried, %d failed before detection, %d misrouted",
		took, r.Total, r.Failed, r.Total-r.Failed-r.PerServer[srvs[0]]-r.PerServer[srvs[1]])
	after := testutil.RunClient(t, n.netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 10})
	if after.Failed != 0 || after.PerServer[srvs[1]] != 10 {
		t.Fatalf("after detection: landed %v, %d failed (%v)", after.PerServer, after.Failed, after.Errors)
	}

	// The last server goes the same way: the set empties, connects are refused at once.
	servers[1].Close()
	removeNetNS(t, hostNS[1])
	n.waitSet(vip, []string{}, 3*time.Second)
	start := time.Now()
	after = testutil.RunClient(t, n.netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 5})
	elapsed := time.Since(start)
	t.Logf("empty set, panic off: %d of 5 connects failed in %v: %v", after.Failed, elapsed, after.Errors)
	if after.Failed != 5 || !strings.Contains(strings.Join(after.Errors, " "), "connection refused") || elapsed > 2*time.Second {
		t.Fatalf("empty set: %d of 5 failed in %v with %v; want every connect refused at once", after.Failed, elapsed, after.Errors)
	}
}

// newHost makes a server host: a network namespace joined to the node by a
// veth /30 (nodeIP on the node's end, hostIP on the host's).
func newHost(t *testing.T, node ns.NetNS, nodeIP, hostIP, name string) ns.NetNS {
	t.Helper()
	host := testutil.NewNetNS(t)
	testutil.Veth(t, node, name, nodeIP+"/30", host, name+"p", hostIP+"/30")
	return host
}

// removeNetNS closes and unmounts a test namespace now, as if its host were
// torn down; the kernel destroys it, and its veth, once nothing holds it.
func removeNetNS(t *testing.T, n ns.NetNS) {
	t.Helper()
	path := n.Path()
	n.Close()
	if err := testutils.UnmountNS(n); err != nil {
		t.Fatalf("remove netns %s: %v", path, err)
	}
}
