package e2e_test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// TestContainerdInstallCNIWatch: a running containerd whose network has no
// ctlb yet; `ctlbd install-cni --watch` chains ctlb into its conflist, as
// the DaemonSet's watcher does on a live node. containerd reloads its CNI
// config on fsnotify events, and 2.x ignores CREATE and CHMOD: a file moved
// in from another directory (only IN_MOVED_TO, reported as CREATE) goes
// unseen. The installer renames a temporary file of the conf dir itself
// over the conflist, so containerd also gets the temporary name's
// IN_MOVED_FROM (a RENAME) and reloads. Proof: the next pod gets ctlb, with
// no restart of containerd. A pod started before the install is left alone.
func TestContainerdInstallCNIWatch(t *testing.T) {
	requirePlugin(t)
	forEachRelease(t, func(t *testing.T, rel containerd.Release) {
		e := newEnv(t, false)
		e.daemon = ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbdBin})
		e.daemon.SetService(vip, servers...)
		c := e.startContainerd(t, rel)

		before := c.RunPod(t, containerd.PodSpec{Name: "before"})
		if atts := e.daemon.Attachments(); len(atts) != 0 {
			t.Fatalf("ctlb not chained yet, but attachments %+v", atts)
		}

		var logs bytes.Buffer
		w := exec.Command(ctlbdBin, "install-cni", "--watch", "--bin-dir", e.net.BinDir, "--conf-dir", e.net.ConfDir,
			"--plugin", plugin, "--bpffs", e.daemon.BPFFS, "--socket", e.daemon.Socket, "--state-dir", e.daemon.StateDir)
		w.Stdout, w.Stderr = &logs, &logs
		w.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = w.Wait(); close(done) }()
		t.Cleanup(func() {
			_ = w.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = w.Process.Kill()
				<-done
			}
			if t.Failed() {
				t.Logf("install-cni --watch output:\n%s", logs.String())
			}
		})
		written := waitConflistHasCtlb(t, e.net)
		t.Logf("install-cni --watch chained ctlb into %s", e.net.Conflist)

		pod := c.RunPod(t, containerd.PodSpec{Name: "after"})
		checkAttached(t, e, pod)
		r, code := runClient(t, pod, "client", vip, 3, 20*time.Second)
		if code != 0 || len(r.Errors) != 0 || !r.Done {
			t.Fatalf("client in the pod started after the install: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
		}
		assertRoundRobin(t, r.Landed)
		t.Logf("%s: conflist written to first redirected connection of a new pod: %v", rel.Version, r.First.Sub(written).Round(time.Millisecond))
		if n := len(e.daemon.Attachments()); n != 1 {
			t.Errorf("%d attachments, want 1 (the pod from before the install stays without ctlb)", n)
		}
		pod.Remove(t)
		before.Remove(t)
		e.assertClean(t, "after removing both pods")
	})
}

// waitConflistHasCtlb waits until the network's conflist chains ctlb and
// returns when it saw that.
func waitConflistHasCtlb(t *testing.T, n *node.Network) time.Time {
	t.Helper()
	testutil.Eventually(t, "install-cni --watch chaining ctlb into "+n.Conflist, 20*time.Second, func() (bool, string) {
		b, err := os.ReadFile(n.Conflist)
		ok := err == nil && (strings.Contains(string(b), `"type":"ctlb"`) || strings.Contains(string(b), `"type": "ctlb"`))
		return ok, fmt.Sprintf("it holds %s (%v)", b, err)
	})
	return time.Now()
}
