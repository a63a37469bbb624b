package ctlbd_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/crashpoint"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
)

// The daemon is SIGKILLed inside each step that changes pinned state (the
// crash points of internal/crashpoint), not between steps: after each
// restart the data path serves the old or the new state, never a broken
// one, and a connect loop running throughout sees no failure.

// crash restarts d with the crash point armed, waits until it serves, runs
// trigger (which makes the daemon reach the point), checks that the daemon died of it, and starts it
// again without.
func crash(t *testing.T, d *ctlbdtest.Daemon, point string, trigger func()) {
	t.Helper()
	d.Kill()
	d.Env = []string{crashpoint.Env + "=" + point}
	d.Start()
	trigger()
	exited, killed := d.WaitExit(10 * time.Second)
	if !exited || !killed {
		t.Fatalf("crash point %s: exited %v, by SIGKILL %v; log:\n%s", point, exited, killed, d.LogTail(3000))
	}
	if !strings.Contains(d.Logs(), "crashpoint "+point) {
		t.Fatalf("crash point %s: the daemon died, but not at the point; log:\n%s", point, d.LogTail(3000))
	}
	d.Env = nil
	d.Start()
}

func TestCrashInsideFirstCreate(t *testing.T) {
	for _, point := range []string{crashpoint.CreateMaps, crashpoint.CreatePrograms} {
		t.Run(point, func(t *testing.T) {
			d := newDaemon(t)
			d.Env = []string{crashpoint.Env + "=" + point}
			d.Launch()
			if exited, killed := d.WaitExit(10 * time.Second); !exited || !killed {
				t.Fatalf("exited %v, by SIGKILL %v; log:\n%s", exited, killed, d.LogTail(3000))
			}
			half := listPins(t, d.BPFFS)
			d.Env = nil
			d.Start()
			whole := listPins(t, d.BPFFS)
			t.Logf("killed with pins %v; the restarted daemon made them %v", half, whole)
			for _, want := range []string{"ctlb_services_v2", "ctlb_connect4_v2", "ctlb_connect6_v2", "ctlb_sock_release_v2", "ctlb_release_link_v2"} {
				if !slices.Contains(whole, want) {
					t.Fatalf("after the restart, pins %v lack %s", whole, want)
				}
			}
			d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
			netns, cg := newPod(t, d)
			r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
			if r.Failed != 0 || misrouted(r.PerServer) != 0 || len(r.PerServer) != 3 {
				t.Fatalf("after the restart: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
			}
		})
	}
}

func TestCrashInsideSetSwap(t *testing.T) {
	for _, point := range []string{crashpoint.SetPrepared, crashpoint.SetSwapped} {
		t.Run(point, func(t *testing.T) {
			d := newDaemon(t)
			d.Start()
			oldSet, newSet := servers[:2], servers[1:]
			d.MustCLI(append([]string{"service", "set", vip}, oldSet...)...)
			netns, cg := newPod(t, d)
			storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 50000, Duration: time.Minute})
			time.Sleep(100 * time.Millisecond)
			crash(t, d, point, func() {
				_, _, _ = d.CLI(append([]string{"service", "set", vip}, newSet...)...)
			})
			got := serviceSet(t, d)
			want := map[string][]string{crashpoint.SetPrepared: oldSet, crashpoint.SetSwapped: newSet}[point]
			if !slices.Equal(got, want) {
				t.Errorf("after a crash at %s the set is %v, want %v", point, got, want)
			}
			// The slot the crash left given out (the joining server's, or
			// the leaving one's) is retired at the restart, not leaked.
			if logs := d.Logs(); !strings.Contains(logs, `msg="retired server slots that a crash during a set left given out" slots=1`) {
				t.Errorf("after a crash at %s: no log of the one stray slot retired:\n%s", point, d.LogTail(2000))
			}
			time.Sleep(100 * time.Millisecond)
			d.MustCLI(append([]string{"service", "set", vip}, newSet...)...)
			time.Sleep(100 * time.Millisecond)
			r := storm.Finish(t)
			t.Logf("crash at %s: %d connects tried, %d failed, %d misrouted, per server %v", point, r.Total, r.Failed, misrouted(r.PerServer), r.PerServer)
			if r.Failed != 0 || misrouted(r.PerServer) != 0 {
				t.Errorf("failed %d, misrouted %d (%v) of %d", r.Failed, misrouted(r.PerServer), r.Errors, r.Total)
			}
		})
	}
}

func TestCrashInsidePendingCompletion(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 50000, Duration: time.Minute})

	// A pod whose cgroup is not there yet: the record the CNI plugin writes.
	parent := testutil.NewCgroup(t, "")
	podDir := filepath.Join(parent, "pod-late")
	const containerID = "crashpending0001"
	rec := pending.Record{ContainerID: containerID, AttachmentID: "cni-" + containerID, BPFFS: d.BPFFS, CgroupDir: podDir, Created: time.Now()}
	crash(t, d, crashpoint.PendingAttached, func() {
		if err := pending.Write(d.StateDir, rec); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(podDir, 0o755); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { _ = os.Remove(podDir) })
	testutil.Eventually(t, "pending attachment completed after the restart", 10*time.Second, func() (bool, string) {
		st := d.Status()
		recs, _ := pending.List(d.StateDir)
		return st.Pending == 0 && len(recs) == 0, fmt.Sprintf("status: %d pending, %d attachments; records %v", st.Pending, st.Attachments, recs)
	})
	var atts []api.Attachment
	d.JSON(&atts, "attachments")
	n := 0
	for _, a := range atts {
		if a.ID == rec.AttachmentID && a.Alive && len(a.Missing) == 0 {
			n++
		}
	}
	if n != 1 || len(atts) != 2 {
		t.Fatalf("attachments %+v: want the first pod's and exactly one, whole, for the pending pod", atts)
	}
	r := testutil.RunClient(t, netns, podDir, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	if r.Failed != 0 || misrouted(r.PerServer) != 0 {
		t.Fatalf("the pending pod: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
	}
	res := storm.Finish(t)
	t.Logf("crash at %s: %d connects tried, %d failed, %d misrouted", crashpoint.PendingAttached, res.Total, res.Failed, misrouted(res.PerServer))
	if res.Failed != 0 || misrouted(res.PerServer) != 0 {
		t.Errorf("failed %d, misrouted %d (%v) of %d", res.Failed, misrouted(res.PerServer), res.Errors, res.Total)
	}
}

func TestCrashInsideRepin(t *testing.T) {
	d := newDaemon(t, "--config", fastReconcile(t))
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	want := listPins(t, d.BPFFS)
	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 50000, Duration: time.Minute})
	crash(t, d, crashpoint.Repin, func() {
		// Pins removed by hand while the daemon runs: its reconciler
		// re-pins them one by one and dies after the first.
		time.Sleep(300 * time.Millisecond)
		for _, p := range want {
			if !strings.HasPrefix(p, "links/") {
				if err := os.Remove(filepath.Join(d.BPFFS, p)); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
	testutil.Eventually(t, "pins restored after the restart", 5*time.Second, func() (bool, string) {
		got := listPins(t, d.BPFFS)
		return slices.Equal(got, want), fmt.Sprintf("pins %v, want %v", got, want)
	})
	if got := serviceSet(t, d); len(got) != len(servers) {
		t.Errorf("set after the restart %v, want %v", got, servers)
	}
	r := storm.Finish(t)
	t.Logf("crash at %s: %d connects tried, %d failed, %d misrouted", crashpoint.Repin, r.Total, r.Failed, misrouted(r.PerServer))
	if r.Failed != 0 || misrouted(r.PerServer) != 0 {
		t.Errorf("failed %d, misrouted %d (%v) of %d", r.Failed, misrouted(r.PerServer), r.Errors, r.Total)
	}
}

// serviceSet is the VIP's servers as the maps hold them.
func serviceSet(t *testing.T, d *ctlbdtest.Daemon) []string {
	t.Helper()
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	var out []string
	for _, s := range svcs {
		if s.VIP.String() == vip {
			for _, a := range s.Servers {
				out = append(out, a.String())
			}
		}
	}
	return out
}
