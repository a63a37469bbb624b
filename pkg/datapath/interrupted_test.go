package datapath_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// What a caller killed half-way through Attach or Detach leaves is a
// temporary directory of links that still hold the programs on the cgroup.
// Such directories live in links/_inflight, where ADD and DEL look for them
// without listing every attachment; earlier versions left them at the top
// of links/, where GC (Interrupted, RemoveInterruptedAll) still finds them.
func TestInterruptedTemporaries(t *testing.T) {
	dp := newDatapath(t)
	links := filepath.Join(dp.Dir(), "links")
	inflight := filepath.Join(links, datapath.InflightDir)
	if fi, err := os.Stat(inflight); err != nil || !fi.IsDir() {
		t.Fatalf("Create made no %s: %v", inflight, err)
	}

	// interrupt attaches id and moves its pins to where a killed call
	// leaves them, as a kill between pinning and the rename would.
	interrupt := func(id, to string) string {
		t.Helper()
		cg := testutil.NewCgroup(t, "")
		if _, err := dp.Attach(id, cg); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(links, id), to); err != nil {
			t.Fatal(err)
		}
		if n := attachedProgs(t, cg); n != len(datapath.AttachTypes()) {
			t.Fatalf("%d programs on %s after the interrupted attach, want %d", n, cg, len(datapath.AttachTypes()))
		}
		return cg
	}
	cgA := interrupt("pod-a", filepath.Join(inflight, "_tmp-pod-a-0123456789ab"))
	cgB := interrupt("pod-b", filepath.Join(links, "_del-pod-b-0123456789ab")) // an earlier version's
	// Another ID that shares a prefix is never claimed.
	interrupt("pod-a-1", filepath.Join(inflight, "_tmp-pod-a-1-0123456789ab"))

	if list, err := dp.Attachments(); err != nil || len(list) != 0 {
		t.Fatalf("attachments = %+v, %v: temporaries are no attachments", list, err)
	}
	ids, err := datapath.Interrupted(dp.Dir())
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"pod-a", "pod-a-1", "pod-b"}) {
		t.Fatalf("Interrupted = %v, want pod-a, pod-a-1, pod-b", ids)
	}

	if n, err := datapath.RemoveInterrupted(dp.Dir(), "pod-a"); err != nil || n != 1 {
		t.Fatalf("RemoveInterrupted(pod-a) = %d, %v; want 1", n, err)
	}
	waitAttached(t, cgA, 0)
	if _, err := os.Stat(filepath.Join(inflight, "_tmp-pod-a-1-0123456789ab")); err != nil {
		t.Fatalf("RemoveInterrupted(pod-a) took pod-a-1's: %v", err)
	}
	// ADD and DEL do not look at the top of links/...
	if n, err := datapath.RemoveInterrupted(dp.Dir(), "pod-b"); err != nil || n != 0 {
		t.Fatalf("RemoveInterrupted(pod-b) = %d, %v; want 0 (it lists only %s)", n, err, datapath.InflightDir)
	}
	// ... GC does.
	if n, err := datapath.RemoveInterruptedAll(dp.Dir(), "pod-b"); err != nil || n != 1 {
		t.Fatalf("RemoveInterruptedAll(pod-b) = %d, %v; want 1", n, err)
	}
	waitAttached(t, cgB, 0)

	// ctlbd's start moves an earlier version's into _inflight, where the
	// retried ADD or DEL of their ID finds them.
	cgD := interrupt("pod-d", filepath.Join(links, "_tmp-pod-d-0123456789ab"))
	again, err := datapath.Create(dp.Dir())
	if err != nil {
		t.Fatal(err)
	}
	again.Close()
	if _, err := os.Stat(filepath.Join(inflight, "_tmp-pod-d-0123456789ab")); err != nil {
		t.Fatalf("Create left an earlier version's temporary where it was: %v", err)
	}
	if n, err := datapath.RemoveInterrupted(dp.Dir(), "pod-d"); err != nil || n != 1 {
		t.Fatalf("RemoveInterrupted(pod-d) after Create = %d, %v; want 1", n, err)
	}
	waitAttached(t, cgD, 0)

	// Detach passes through _inflight too, and leaves nothing there.
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-c", cg); err != nil {
		t.Fatal(err)
	}
	if err := dp.Detach("pod-c"); err != nil {
		t.Fatal(err)
	}
	waitAttached(t, cg, 0)
	ents, err := os.ReadDir(inflight)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if !slices.Equal(left, []string{"_tmp-pod-a-1-0123456789ab"}) {
		t.Fatalf("%s holds %v, want only pod-a-1's", datapath.InflightDir, left)
	}
}

func attachedProgs(t *testing.T, dir string) int {
	t.Helper()
	return testutil.CgroupPrograms(t, dir, datapath.AttachTypes())
}

func waitAttached(t *testing.T, dir string, want int) {
	t.Helper()
	testutil.WaitCgroupPrograms(t, dir, datapath.AttachTypes(), want)
}

// ADD opens the programs and no map: one exec per pod on its start-up
// path. It still refuses, as Open does, when a map pin is missing, and
// what it opens attaches.
func TestOpenForAttachOpensNoMap(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	if _, err := datapath.OpenForAttach(dir); !errors.Is(err, datapath.ErrNotPinned) {
		t.Fatalf("OpenForAttach of an empty dir: err = %v, want ErrNotPinned", err)
	}
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
	config := filepath.Join(dir, "ctlb_config_v2")
	if err := os.Rename(config, config+"_away"); err != nil {
		t.Fatal(err)
	}
	for name, open := range map[string]func(string) (*datapath.Datapath, error){"Open": datapath.Open, "OpenForAttach": datapath.OpenForAttach} {
		if _, err := open(dir); !errors.Is(err, datapath.ErrNotPinned) || !strings.Contains(err.Error(), config) {
			t.Fatalf("%s without the config map's pin: err = %v, want ErrNotPinned naming it", name, err)
		}
	}
	if err := os.Rename(config+"_away", config); err != nil {
		t.Fatal(err)
	}
	at, err := datapath.OpenForAttach(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()
	cg := testutil.NewCgroup(t, "")
	if _, err := at.Attach("pod-a", cg); err != nil {
		t.Fatal(err)
	}
	if n := attachedProgs(t, cg); n != len(datapath.AttachTypes()) {
		t.Fatalf("%d programs attached, want %d", n, len(datapath.AttachTypes()))
	}
	if err := at.Detach("pod-a"); err != nil {
		t.Fatal(err)
	}
	waitAttached(t, cg, 0)
}
