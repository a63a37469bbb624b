package ctlbd_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/testutil"
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

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func TestRestartFiveTimesUnderLoad(t *testing.T) {
	d := newDaemon(t)
	d.start()
	d.mustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	pinsBefore := listPins(t, d.bpffs)

	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 50000, Duration: time.Minute})
	for i := 0; i < 5; i++ {
		time.Sleep(100 * time.Millisecond)
		d.kill()
		time.Sleep(100 * time.Millisecond)
		d.start()
	}
	r := storm.Finish(t)
	t.Logf("5 SIGKILL+restart cycles under load: %d connects tried, %d failed, %d misrouted", r.Total, r.Failed, misrouted(r.PerServer))
	if r.Failed != 0 || misrouted(r.PerServer) != 0 {
		t.Errorf("failed %d, misrouted %d (%v) of %d", r.Failed, misrouted(r.PerServer), r.Errors, r.Total)
	}
	if after := listPins(t, d.bpffs); strings.Join(after, " ") != strings.Join(pinsBefore, " ") {
		t.Errorf("pins changed across restarts:\nbefore %v\nafter  %v", pinsBefore, after)
	}
	var atts []api.Attachment
	d.jsonCLI(&atts, "attachments")
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
	d.start()
	d.mustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	want := listPins(t, d.bpffs)

	// Every map and program pin goes, and one link pin of the attachment.
	for _, p := range want {
		if !strings.HasPrefix(p, "links/") || strings.HasSuffix(p, "/connect4") {
			if err := os.Remove(filepath.Join(d.bpffs, p)); err != nil {
				t.Fatal(err)
			}
		}
	}
	took := waitFor(t, "pins restored", 5*time.Second, func() bool {
		return strings.Join(listPins(t, d.bpffs), " ") == strings.Join(want, " ")
	})
	t.Logf("pins restored %v after removal", took)
	if !strings.Contains(d.logs.String(), "pinned them again") || !strings.Contains(d.logs.String(), "re-attached") {
		t.Errorf("the daemon did not report the repair loudly:\n%s", d.logs.String())
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	if r.Failed != 0 || misrouted(r.PerServer) != 0 || len(r.PerServer) != 3 {
		t.Fatalf("after the repair: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
	}
	var svcs []api.Service
	d.jsonCLI(&svcs, "service", "list")
	if len(svcs) != 1 || len(svcs[0].Servers) != 3 {
		t.Fatalf("services after the repair = %+v", svcs)
	}
}

func TestDeadCgroupAttachmentCollected(t *testing.T) {
	d := newDaemon(t, "--config", fastReconcile(t))
	d.start()
	cg := testutil.NewCgroup(t, "")
	d.mustCLI("attach", "--cgroup", cg)
	// The pod is torn down without a DEL: its cgroup just goes.
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, "dead attachment removed", 10*time.Second, func() bool {
		var atts []api.Attachment
		d.jsonCLI(&atts, "attachments")
		return len(atts) == 0
	})
	t.Logf("attachment of a removed cgroup collected %v after rmdir", took)
	if pins := listPins(t, filepath.Join(d.bpffs, "links")); len(pins) != 0 {
		t.Fatalf("link pins left: %v", pins)
	}
	// A new cgroup of the same name attaches again.
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	d.mustCLI("attach", "--cgroup", cg)
}
