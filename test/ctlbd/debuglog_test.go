package ctlbd_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// debugLines are what `--log-level debug` must show an operator: each
// control API request (method, path, peer uid, status, duration), a
// pending kick that finds no record, and each reconcile pass, also one
// that repaired nothing.
var debugLines = []string{`msg="control API request"`, `msg="pending kick: no such record"`, `msg="reconcile pass"`}

// TestDebugLog: ctlbd run --log-level debug logs API requests, kicks
// without a record and reconcile passes; at the default level none of
// them appears.
func TestDebugLog(t *testing.T) {
	d := newDaemon(t, "--config", fastReconcile(t), "--log-level", "debug")
	d.Start()
	d.MustCLI("status")
	missing := filepath.Join(testutil.V2Mount(t), "ctlb-no-such-cgroup")
	if _, _, code := d.CLI("attach", "--cgroup", missing); code == 0 {
		t.Fatalf("ctlbd attach --cgroup %s succeeded", missing)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st, err := d.Client().NotifyPending(ctx, "debugf00d", "cni-test-debugf00d"); err != nil || st.State != "absent" {
		t.Fatalf("POST /v1/pending of a record never written: %+v, %v; want state absent", st, err)
	}

	find := func(parts ...string) (string, bool) {
		for _, l := range strings.Split(d.Logs(), "\n") {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(l, p)
			}
			if ok {
				return l, true
			}
		}
		return "", false
	}
	want := [][]string{
		{debugLines[0], "method=GET", "path=/v1/status", "uid=0", "status=200", "duration="},
		{debugLines[0], "method=POST", "path=/v1/attachments", "uid=0", "status=400", "duration="},
		{debugLines[0], "method=POST", "path=/v1/pending", "status=200"},
		{debugLines[1], "attachment=cni-test-debugf00d", "dir=" + filepath.Join(d.StateDir, "pending")},
		// Nothing to repair on a fresh bpffs: the pass is logged all the same.
		{debugLines[2], "attachments=0", "dead=0", "repaired=0", "repinned=0", "stale=0", "duration="},
	}
	for _, parts := range want {
		testutil.Eventually(t, "the debug line "+strings.Join(parts, " "), 5*time.Second, func() (bool, string) {
			_, ok := find(parts...)
			return ok, d.LogTail(3000)
		})
	}
	// The reconciler runs every 200ms: every pass has its line.
	testutil.Eventually(t, "a reconcile pass line for each pass", 5*time.Second, func() (bool, string) {
		return strings.Count(d.Logs(), debugLines[2]) >= 3, d.LogTail(3000)
	})
	if l, _ := find(debugLines[0], "path=/v1/status"); l != "" {
		t.Logf("%s", l)
	}

	// The default level: none of them.
	q := newDaemon(t, "--config", fastReconcile(t))
	q.Start()
	q.MustCLI("status")
	if _, err := q.Client().NotifyPending(ctx, "debugf00d", "cni-test-debugf00d"); err != nil {
		t.Fatal(err)
	}
	// The start's reconcile pass ran before the socket answered.
	for _, l := range debugLines {
		if strings.Contains(q.Logs(), l) {
			t.Errorf("at the default log level ctlbd logged %s:\n%s", l, q.LogTail(3000))
		}
	}
}
