package e2e_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// networkReady is the NetworkReady condition of containerd's CRI Status
// RPC, the call kubelet polls to decide whether the node is Ready. containerd
// 2.x runs CNI STATUS (1.1.0 conflists) inside it, nowhere else.
func networkReady(t *testing.T, c *containerd.Containerd) *cri.RuntimeCondition {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Runtime.Status(ctx, &cri.StatusRequest{})
	if err != nil {
		t.Fatalf("CRI Status: %v", err)
	}
	for _, cond := range st.GetStatus().GetConditions() {
		if cond.Type == cri.NetworkReady {
			return cond
		}
	}
	t.Fatalf("CRI Status has no %s condition: %v", cri.NetworkReady, st.GetStatus().GetConditions())
	return nil
}

// TestContainerdNetworkStatus: a CNI 1.1.0 conflist (reference plugins
// built from the module proxy, which speak 1.1.0) with ctlb chained, under
// containerd 2.x. Through the real CRI Status RPC: NetworkReady is true
// with ctlb in the chain; with ctlbd stopped it stays true (attached pods
// keep working and new ones attach or go pending, so a daemon restart must
// not mark the node NotReady); with ctlb's pins removed it is false, and
// the reason is ctlb's message.
func TestContainerdNetworkStatus(t *testing.T) {
	rel := containerd.V2(t)
	plugins := node.ReferencePlugins(t)
	e := newEnvWith(t, envOptions{ctlb: true, tweak: func(s *node.NetworkSpec) { s.CNIVersion, s.PluginDir = "1.1.0", plugins }})
	c := e.startContainerd(t, rel)

	cond := networkReady(t, c)
	if !cond.Status {
		t.Fatalf("ctlb chained, ctlbd running: NetworkReady false: %s: %s", cond.Reason, cond.Message)
	}
	// The chain really runs: a pod gets ctlb.
	pod := c.RunPod(t, containerd.PodSpec{Name: "status"})
	checkAttached(t, e, pod)
	pod.Remove(t)
	e.assertClean(t, "after RemovePodSandbox")

	e.daemon.Stop()
	if cond := networkReady(t, c); !cond.Status {
		t.Errorf("ctlbd stopped: NetworkReady false (%s: %s), want true: a stopped daemon leaves the data path working", cond.Reason, cond.Message)
	}

	removed := removePins(t, e.daemon.BPFFS)
	cond = networkReady(t, c)
	if cond.Status {
		t.Fatalf("pins %v removed: NetworkReady true, want false", removed)
	}
	if !strings.Contains(cond.Message, "ctlb") || !strings.Contains(cond.Message, e.daemon.BPFFS) {
		t.Errorf("pins removed: NetworkReady false with %s: %q, want ctlb's message naming %s", cond.Reason, cond.Message, e.daemon.BPFFS)
	}
	t.Logf("pins removed: NetworkReady false, reason %s: %s", cond.Reason, cond.Message)
}

// removePins deletes ctlb's pinned maps and programs (the files at the top
// of its bpffs directory), as an operator's rm would.
func removePins(t *testing.T, bpffs string) []string {
	t.Helper()
	ents, err := os.ReadDir(bpffs)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, en := range ents {
		if en.IsDir() {
			continue
		}
		if err := os.Remove(filepath.Join(bpffs, en.Name())); err != nil {
			t.Fatal(err)
		}
		out = append(out, en.Name())
	}
	return out
}
