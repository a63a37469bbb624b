package cnitest

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/cni"
)

// The time of one ADD, exec of the plugin included, as a runtime pays it:
// for pods found by K8S_POD_UID, on an empty node and on one with 1,000 pods
// attached. A figure for the record, never asserted.
func TestAddTiming(t *testing.T) {
	e := newEnv(t)
	netns := e.newPod("", "").netns.Path() // one sandbox netns serves as CNI_NETNS
	stdin := e.pluginStdin("1.0.0", nil, true)
	measure := func(n int) []time.Duration {
		var took []time.Duration
		var p *pod
		for range n {
			p = e.cgroupfsPod("besteffort", true)
			start := time.Now()
			out, err := execPlugin(t, "ADD", p.id, netns, "K8S_POD_UID="+p.uid, stdin)
			took = append(took, time.Since(start))
			if err != nil {
				t.Fatalf("ADD: %v: %s", err, out)
			}
		}
		e.wantAttached(p)
		return took
	}
	report := func(what string, took []time.Duration) {
		slices.Sort(took)
		t.Logf("ADD of one pod (exec included), %s: p50 %s, p99 %s, max %s over %d pods", what,
			took[len(took)/2].Round(10*time.Microsecond), took[len(took)*99/100].Round(10*time.Microsecond),
			took[len(took)-1].Round(10*time.Microsecond), len(took))
	}
	report("empty node", measure(200))

	// Up to 1,000 pods attached: the rest directly through the datapath,
	// which is what an ADD leaves behind, to save time.
	for i := range 800 {
		dir := filepath.Join(e.cgroups, "kubepods", "burstable", "podbulk"+randHex(8))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := e.dp.Attach(cni.AttachmentID(netName, randHex(32)), dir); err != nil {
			t.Fatalf("bulk attach %d: %v", i, err)
		}
	}
	report("1,000 pods already attached", measure(200))
	links, _ := e.leftovers()
	if len(links) != 1200 {
		t.Fatalf("%d attachments, want 1200", len(links))
	}
}
