package pending_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

func TestWriteReadListRemove(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	// Records are keyed by attachment ID: one per network and container.
	r := pending.Record{ContainerID: "abc.1", AttachmentID: "cnih-x", BPFFS: "/b", PodUID: "u", Netns: "/n",
		NetnsID: podcgroup.NetnsID{Dev: 4, Ino: 5}, Created: time.Now().UTC()}
	if err := pending.Write(state, r); err != nil {
		t.Fatal(err)
	}
	for p, mode := range map[string]os.FileMode{state: 0o700, pending.Dir(state): 0o700, filepath.Join(pending.Dir(state), "cnih-x.json"): 0o600} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != mode {
			t.Fatalf("%s: mode %v (%v), want %v", p, fi.Mode().Perm(), err, mode)
		}
	}
	got, err := pending.Read(state, "cnih-x")
	if err != nil || got.PodUID != "u" || got.NetnsID != r.NetnsID || !got.Created.Equal(r.Created) {
		t.Fatalf("Read = %+v, %v; want %+v", got, err, r)
	}
	// Temporary and foreign files are not records; a damaged one is skipped.
	for name, body := range map[string]string{".tmp-x-1": "{}", "notes.txt": "x", "bad.json": "{", "other.json": `{"containerID":"else"}`} {
		if err := os.WriteFile(filepath.Join(pending.Dir(state), name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The same container on another network has a record of its own.
	r2 := r
	r2.AttachmentID = "cnih-w"
	if err := pending.Write(state, r2); err != nil {
		t.Fatal(err)
	}
	list, err := pending.List(state)
	if err != nil || len(list) != 2 || list[0].AttachmentID != "cnih-w" || list[1].AttachmentID != "cnih-x" {
		t.Fatalf("List = %+v, %v; want cnih-w and cnih-x", list, err)
	}
	for i, want := range []bool{true, false} {
		removed, err := pending.Remove(state, "cnih-x")
		if err != nil || removed != want {
			t.Fatalf("Remove #%d = %v, %v; want %v", i+1, removed, err, want)
		}
	}
	for _, bad := range []string{"", "../x", ".hidden", "a/b"} {
		if err := pending.Write(state, pending.Record{ContainerID: bad}); err == nil {
			t.Errorf("Write(%q) accepted it", bad)
		}
	}
}

// Remove waits for whoever holds the record, and after it returns nobody
// acts on the record any more.
func TestLockOrdersRemove(t *testing.T) {
	state := t.TempDir()
	if err := pending.Write(state, pending.Record{ContainerID: "c1"}); err != nil {
		t.Fatal(err)
	}
	inside := make(chan struct{})
	release := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = pending.WithLock(state, "c1", func(pending.Record) error {
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	removed := make(chan error, 1)
	go func() {
		_, err := pending.Remove(state, "c1")
		removed <- err
	}()
	select {
	case err := <-removed:
		t.Fatalf("Remove returned (%v) while the record was held", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	wg.Wait()
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	err := pending.WithLock(state, "c1", func(pending.Record) error { return errors.New("ran") })
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("WithLock after Remove: %v, want not exist", err)
	}
}

type watchEnv struct {
	state  string
	dp     *datapath.Datapath
	w      *pending.Watcher
	parent string
	cancel context.CancelFunc
	done   chan error
}

func startWatcher(t *testing.T, state string, ttl time.Duration) *watchEnv {
	t.Helper()
	testutil.RequireRoot(t)
	h, err := cgroupv2.Default()
	testutil.Require(t, err == nil, "cgroup v2")
	dp, err := datapath.Create(filepath.Join(testutil.MountBPFFS(t), "ctlb"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	e := &watchEnv{state: state, dp: dp, parent: testutil.NewCgroup(t, "")}
	e.w = pending.NewWatcher(state, dp, podcgroup.NewResolver(h), slog.New(slog.NewTextHandler(io.Discard, nil)))
	e.w.TTL = ttl
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel, e.done = cancel, make(chan error, 1)
	go func() { e.done <- e.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-e.done; err != nil {
			t.Errorf("watcher: %v", err)
		}
	})
	return e
}

func (e *watchEnv) kick(t *testing.T, id string) pending.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := e.w.Kick(ctx, id)
	if err != nil {
		t.Fatalf("kick %s: %v", id, err)
	}
	return st
}

func (e *watchEnv) waitAttached(t *testing.T, id, dir string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, err := e.dp.Attachment(id)
		if err == nil && a.Alive && a.CgroupPath == dir {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("attachment %s: %+v, %v; want alive on %s within 5s (pending %+v)", id, a, err, dir, e.w.List())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A record naming its cgroup is attached as soon as the cgroup appears,
// whether its parents exist yet or not, and is then removed.
func TestWatcherCgroupDir(t *testing.T) {
	e := startWatcher(t, t.TempDir(), time.Hour)
	dir := filepath.Join(e.parent, "pods", "p1")
	r := pending.Record{ContainerID: "c1", AttachmentID: "cni-c1", BPFFS: e.dp.Dir(), CgroupDir: dir, Created: time.Now()}
	if err := pending.Write(e.state, r); err != nil {
		t.Fatal(err)
	}
	if st := e.kick(t, "cni-c1"); st.State != pending.StatePending {
		t.Fatalf("kick before the cgroup: %+v, want pending", st)
	}
	if n := e.w.Count(); n != 1 {
		t.Fatalf("Count = %d, want 1", n)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.waitAttached(t, "cni-c1", dir)
	if _, err := pending.Read(e.state, "cni-c1"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("record after completion: %v, want gone", err)
	}
	if st := e.kick(t, "cni-c1"); st.State != pending.StateAbsent {
		t.Fatalf("kick after completion: %+v, want absent", st)
	}
}

// Pod-UID records are found in the kubepods trees; a record removed by DEL
// before its cgroup appears attaches nothing; a record for another bpffs is
// left alone.
func TestWatcherPodUID(t *testing.T) {
	e := startWatcher(t, t.TempDir(), time.Hour)
	qos := filepath.Join(e.parent, "kubepods", "besteffort")
	if err := os.MkdirAll(qos, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"c1", "c2"} {
		r := pending.Record{ContainerID: id, AttachmentID: "cni-" + id, BPFFS: e.dp.Dir(), PodUID: "uid-" + id, Created: time.Now()}
		if err := pending.Write(e.state, r); err != nil {
			t.Fatal(err)
		}
		e.kick(t, "cni-"+id)
	}
	foreign := pending.Record{ContainerID: "c3", AttachmentID: "cni-c3", BPFFS: "/elsewhere", PodUID: "uid-c3", Created: time.Now()}
	if err := pending.Write(e.state, foreign); err != nil {
		t.Fatal(err)
	}
	if st := e.kick(t, "cni-c3"); st.State != pending.StateIgnored {
		t.Fatalf("record for another bpffs: %+v, want ignored", st)
	}
	// DEL of c2 before its cgroup exists.
	if removed, err := pending.Remove(e.state, "cni-c2"); err != nil || !removed {
		t.Fatalf("Remove c2: %v %v", removed, err)
	}
	for _, id := range []string{"c1", "c2", "c3"} {
		if err := os.Mkdir(filepath.Join(qos, "poduid-"+id), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.waitAttached(t, "cni-c1", filepath.Join(qos, "poduid-c1"))
	// One pass looks at every record: once c1 is done and gone from the
	// view, c2 and c3 had their chance to be (wrongly) attached too.
	deadline := time.Now().Add(5 * time.Second)
	for {
		list := e.w.List()
		if len(list) == 1 && list[0].ContainerID == "c3" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("List = %+v, want only the foreign record", list)
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	for _, id := range []string{"cni-c2", "cni-c3"} {
		if _, err := e.dp.Attachment(id); !errors.Is(err, datapath.ErrNoAttachment) {
			t.Errorf("attachment %s: %v, want none", id, err)
		}
	}
}

// Records left while no daemon ran are completed when it starts; records
// whose sandbox is gone expire after the TTL.
func TestWatcherStartAndExpiry(t *testing.T) {
	state := t.TempDir()
	parent := testutil.NewCgroup(t, "")
	ready := filepath.Join(parent, "ready")
	if err := os.Mkdir(ready, 0o755); err != nil {
		t.Fatal(err)
	}
	netns := testutil.NewNetNS(t)
	id, err := podcgroup.StatNetns(netns.Path())
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	recs := []pending.Record{
		{ContainerID: "done", AttachmentID: "cni-done", CgroupDir: ready, Created: old},
		{ContainerID: "gone", AttachmentID: "cni-gone", Netns: "/nonexistent/netns", NetnsID: podcgroup.NetnsID{Dev: 1, Ino: 2}, Created: old},
		{ContainerID: "alive", AttachmentID: "cni-alive", Netns: netns.Path(), NetnsID: id, Created: old},
		// Another daemon's record expires as well: nobody else would drop it.
		{ContainerID: "foreign", AttachmentID: "cni-foreign", BPFFS: "/elsewhere", Netns: "/nonexistent/netns", NetnsID: podcgroup.NetnsID{Dev: 1, Ino: 3}, Created: old},
	}
	for _, r := range recs {
		if err := pending.Write(state, r); err != nil {
			t.Fatal(err)
		}
	}
	e := startWatcher(t, state, time.Minute)
	e.waitAttached(t, "cni-done", ready)
	// On disk and in the watcher's view (which follows the disk).
	deadline := time.Now().Add(5 * time.Second)
	for {
		list, _ := pending.List(state)
		view := e.w.List()
		if len(list) == 1 && list[0].ContainerID == "alive" && len(view) == 1 && view[0].Netns == netns.Path() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("records %+v, watcher's view %+v: want only the one whose netns lives", list, view)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := e.dp.Attachment("cni-gone"); !errors.Is(err, datapath.ErrNoAttachment) {
		t.Fatalf("expired record attached: %v", err)
	}
}
