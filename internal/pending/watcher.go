package pending

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ctlb/ctlb/internal/crashpoint"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Datapath is what the watcher needs of the pinned objects.
type Datapath interface {
	Dir() string
	Attach(id, cgroupDir string) (datapath.Attachment, error)
}

// States of a record as the watcher reports them.
const (
	StatePending  = "pending"  // waiting for the pod cgroup
	StateAttached = "attached" // completed: the record is gone
	StateExpired  = "expired"  // the sandbox went away first: the record is gone
	StateIgnored  = "ignored"  // for another bpffs directory than this daemon's
	StateAbsent   = "absent"   // no such record
)

// Status is one record and what became of it.
type Status struct {
	Record
	State  string `json:"state"`
	Cgroup string `json:"cgroup,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Defaults of the watcher's timing.
const (
	// DefaultTTL is how long a record whose sandbox netns is gone is kept.
	DefaultTTL = 10 * time.Minute
	// DefaultPoll re-reads every record from disk and re-checks its cgroup,
	// a safety net under inotify (overflows, trees that appear later).
	DefaultPoll = time.Second
	// DefaultScan is how often the processes are scanned for the netns of
	// records that have nothing but a netns (podman). The scan is bounded
	// (podcgroup.ScanLimit) and runs only while such records exist.
	DefaultScan = 100 * time.Millisecond
)

// Watcher completes pending attachments: inotify on the pending directory
// and on the cgroup directories that could receive an expected pod cgroup,
// plus a bounded netns scan of the processes for records without a cgroup
// path or pod UID. Records are attached the moment their cgroup appears and
// then removed.
type Watcher struct {
	stateDir string
	dp       Datapath
	resolver *podcgroup.Resolver
	log      *slog.Logger

	TTL  time.Duration
	Poll time.Duration
	Scan time.Duration
	// Completed, when set, learns how long each completed record waited
	// (from the plugin's ADD to the attachment), for a latency metric.
	Completed func(waited time.Duration)

	kicks chan kick

	mu      sync.Mutex
	records map[string]*entry // by container ID; the loop writes, handlers read
}

type entry struct {
	rec     Record
	lastErr string
	// warnedOld: the record outlived the TTL with its sandbox alive, said once.
	warnedOld bool
}

type kick struct {
	id    string
	reply chan Status
}

// NewWatcher watches stateDir's records for the pinned objects of dp.
func NewWatcher(stateDir string, dp Datapath, resolver *podcgroup.Resolver, log *slog.Logger) *Watcher {
	return &Watcher{
		stateDir: stateDir, dp: dp, resolver: resolver, log: log,
		TTL: DefaultTTL, Poll: DefaultPoll, Scan: DefaultScan,
		kicks:   make(chan kick),
		records: map[string]*entry{},
	}
}

// StateDir is the state directory whose records the watcher completes.
func (w *Watcher) StateDir() string { return w.stateDir }

// Count is the number of records waiting.
func (w *Watcher) Count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.records)
}

// List returns the records waiting, sorted by container ID.
func (w *Watcher) List() []Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Status, 0, len(w.records))
	for _, e := range w.records {
		out = append(out, Status{Record: e.rec, State: w.stateOf(e), Error: e.lastErr})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out
}

func (w *Watcher) stateOf(e *entry) string {
	if e.rec.BPFFS != "" && e.rec.BPFFS != w.dp.Dir() {
		return StateIgnored
	}
	return StatePending
}

// ErrNotRunning means the watcher's loop is not (or no longer) running.
var ErrNotRunning = errors.New("pending-attachment watcher is not running")

// Kick makes the watcher read the record of key now and try to
// complete it, and reports the outcome. The plugin's POST /v1/pending lands
// here; inotify would notice the file too, this only makes it synchronous.
func (w *Watcher) Kick(ctx context.Context, key string) (Status, error) {
	containerID := key
	if err := ValidateContainerID(containerID); err != nil {
		return Status{}, err
	}
	k := kick{id: containerID, reply: make(chan Status, 1)}
	select {
	case w.kicks <- k:
	case <-ctx.Done():
		return Status{}, fmt.Errorf("pending record %s: %w", containerID, ctx.Err())
	}
	select {
	case st := <-k.reply:
		return st, nil
	case <-ctx.Done():
		return Status{}, fmt.Errorf("pending record %s: %w", containerID, ctx.Err())
	}
}

// Run watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) error {
	dir := Dir(w.stateDir)
	if err := EnsureDir(w.stateDir); err != nil {
		return fmt.Errorf("pending records: %w", err)
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("pending records: inotify: %w", err)
	}
	defer fw.Close()
	if err := fw.Add(dir); err != nil {
		return fmt.Errorf("pending records: watch %s: %w", dir, err)
	}
	l := &loop{w: w, fw: fw, dir: dir}
	l.reloadAll()
	l.pass(true, true)
	l.lastPoll = time.Now()

	ticker := time.NewTicker(w.Scan)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fw.Events:
			if !ok {
				return errors.New("pending records: inotify closed")
			}
			l.event(ev)
		case err, ok := <-fw.Errors:
			if !ok {
				return errors.New("pending records: inotify closed")
			}
			// An overflow loses events: look at everything again.
			w.log.Warn("pending records: inotify", "error", err)
			l.reloadAll()
			l.pass(true, true)
		case k := <-w.kicks:
			k.reply <- l.kick(k.id)
		case now := <-ticker.C:
			if w.Count() == 0 {
				l.lastPoll = now
				continue
			}
			if now.Sub(l.lastPoll) >= w.Poll {
				l.lastPoll = now
				l.reloadAll()
				l.pass(true, true)
			} else if l.netnsOnly > 0 {
				l.pass(false, true)
			}
		}
	}
}

// loop is the state the Run goroutine alone touches.
type loop struct {
	w        *Watcher
	fw       *fsnotify.Watcher
	dir      string
	lastPoll time.Time
	// roots caches the kubepods roots between polls.
	roots []string
	// netnsOnly counts records that only a process scan can resolve.
	netnsOnly int
}

func (l *loop) event(ev fsnotify.Event) {
	if filepath.Dir(ev.Name) == l.dir {
		id, ok := recordName(filepath.Base(ev.Name))
		if !ok {
			return
		}
		l.reload(id)
		l.pass(false, false)
		return
	}
	// A cgroup directory appeared where a pod cgroup is expected.
	if ev.Has(fsnotify.Create) {
		l.pass(false, false)
	}
}

func (l *loop) kick(id string) Status {
	e := l.reload(id)
	if e == nil {
		// The plugin's notice names a record this daemon does not have:
		// completed or taken by a DEL already, or (the plugin warns then)
		// written to another state directory.
		l.w.log.Debug("pending kick: no such record", "attachment", id, "dir", l.dir)
		return Status{Record: Record{AttachmentID: id}, State: StateAbsent}
	}
	rec := e.rec
	done := l.pass(false, false)
	if st, ok := done[id]; ok {
		return st
	}
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	if cur := l.w.records[id]; cur != nil {
		return Status{Record: cur.rec, State: l.w.stateOf(cur), Error: cur.lastErr}
	}
	l.w.log.Debug("pending kick: the record went while it was looked at (taken by a DEL, or expired)", "attachment", id, "dir", l.dir)
	return Status{Record: rec, State: StateAbsent}
}

// reload reads one record from disk into the set (or drops it when gone).
func (l *loop) reload(id string) *entry {
	r, err := Read(l.w.stateDir, id)
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			l.w.log.Warn("pending record unreadable", "containerID", id, "error", err)
		}
		delete(l.w.records, id)
		return nil
	}
	if cur := l.w.records[id]; cur != nil && cur.rec.same(r) {
		return cur
	}
	e := &entry{rec: r}
	l.w.records[id] = e
	if r.PodUID != "" {
		// A kubepods tree may have appeared since the last poll.
		l.roots = l.w.resolver.KubepodsRoots()
	}
	if r.BPFFS != "" && r.BPFFS != l.w.dp.Dir() {
		l.w.log.Warn("pending record is for another bpffs directory: left alone", "containerID", id, "bpffs", r.BPFFS, "ours", l.w.dp.Dir())
	}
	return e
}

// reloadAll makes the set match the directory.
func (l *loop) reloadAll() {
	recs, err := List(l.w.stateDir)
	if err != nil {
		l.w.log.Warn("pending records", "error", err)
		return
	}
	l.w.mu.Lock()
	next := map[string]*entry{}
	for _, r := range recs {
		if cur := l.w.records[r.Key()]; cur != nil && cur.rec.same(r) {
			next[r.Key()] = cur
		} else {
			next[r.Key()] = &entry{rec: r}
		}
	}
	l.w.records = next
	l.w.mu.Unlock()
	if len(recs) > 0 {
		l.roots = l.w.resolver.KubepodsRoots()
	}
}

// pass tries every record and returns the ones it finished. Finding a
// cgroup costs a few stats per record. With scan it also walks the processes
// (once, bounded, for all records) to find sandboxes by netns; with full it
// also expires records.
func (l *loop) pass(full, scan bool) map[string]Status {
	l.w.mu.Lock()
	entries := make([]*entry, 0, len(l.w.records))
	for _, e := range l.w.records {
		entries = append(entries, e)
	}
	l.w.mu.Unlock()

	wantNetns := map[podcgroup.NetnsID]bool{}
	l.netnsOnly = 0
	for _, e := range entries {
		if e.rec.hasNetns() && e.rec.CgroupDir == "" {
			wantNetns[e.rec.NetnsID] = true
			if e.rec.PodUID == "" {
				l.netnsOnly++
			}
		}
	}
	var byNetns map[podcgroup.NetnsID]string
	var refused map[podcgroup.NetnsID]error
	if len(wantNetns) > 0 && scan {
		var err error
		if byNetns, refused, err = l.w.resolver.FindByNetns(wantNetns); err != nil {
			l.w.log.Warn("pending records: process scan", "error", err)
		}
	}
	// A sandbox whose processes sit in a shared cgroup is not attached
	// there: say why in the record's status, once per change.
	for _, e := range entries {
		if err := refused[e.rec.NetnsID]; err != nil && e.rec.hasNetns() {
			l.w.mu.Lock()
			if e.lastErr != err.Error() {
				e.lastErr = err.Error()
				l.w.log.Warn("pending attachment: refusing the sandbox's cgroup", "attachment", e.rec.Key(), "error", err)
			}
			l.w.mu.Unlock()
		}
	}

	done := map[string]Status{}
	for _, e := range entries {
		if st, finished := l.try(e, byNetns, full); finished {
			done[e.rec.Key()] = st
		}
	}
	if len(done) > 0 {
		l.w.mu.Lock()
		for id := range done {
			if cur := l.w.records[id]; cur != nil {
				delete(l.w.records, id)
			}
		}
		l.w.mu.Unlock()
	}
	l.refreshWatches()
	return done
}

// try completes one record if its cgroup is there; finished reports that
// the record is gone (attached, expired, or removed by CNI DEL meanwhile).
func (l *loop) try(e *entry, byNetns map[podcgroup.NetnsID]string, full bool) (Status, bool) {
	w := l.w
	r := e.rec
	dir := ""
	if r.BPFFS == "" || r.BPFFS == w.dp.Dir() {
		dir = l.locate(r, byNetns)
	}
	if dir == "" {
		if full {
			return l.expire(e)
		}
		return Status{}, false
	}
	var att datapath.Attachment
	err := WithLock(w.stateDir, r.Key(), func(cur Record) error {
		if !cur.same(r) {
			return errChanged
		}
		a, err := w.dp.Attach(cur.AttachmentID, dir)
		if err != nil {
			return err
		}
		att = a
		crashpoint.Hit(crashpoint.PendingAttached)
		return Unlink(w.stateDir, r.Key())
	})
	switch {
	case err == nil:
		waited := time.Since(r.Created)
		w.log.Info("pending attachment completed", r.who("attachment", att.ID,
			"cgroup", dir, "after", waited.Round(time.Millisecond))...)
		if w.Completed != nil {
			w.Completed(waited)
		}
		return Status{Record: r, State: StateAttached, Cgroup: dir}, true
	case errors.Is(err, fs.ErrNotExist):
		// CNI DEL took it first.
		return Status{Record: r, State: StateAbsent}, true
	case errors.Is(err, errChanged):
		return Status{}, false // the file event of the new record follows
	}
	msg := err.Error()
	w.mu.Lock()
	changed := e.lastErr != msg
	e.lastErr = msg
	w.mu.Unlock()
	if changed {
		w.log.Warn("pending attachment: attach failed, will retry", r.who("cgroup", dir, "error", err)...)
	}
	return Status{}, false
}

var errChanged = errors.New("record changed")

// expire removes a record whose sandbox is gone once it is older than the
// TTL, and says once when a record outlives the TTL with its sandbox alive
// (a cgroup that cannot be found: worth a look).
func (l *loop) expire(e *entry) (Status, bool) {
	w := l.w
	r := e.rec
	if !l.expired(r) {
		if time.Since(r.Created) >= w.TTL && !e.warnedOld {
			e.warnedOld = true
			w.log.Warn("pending attachment still waiting: its sandbox exists but no pod cgroup was found",
				r.who("age", time.Since(r.Created).Round(time.Second),
					"cgroupDir", r.CgroupDir, "podUID", r.PodUID, "netns", r.Netns)...)
		}
		return Status{}, false
	}
	err := WithLock(w.stateDir, r.Key(), func(cur Record) error {
		if !cur.same(r) {
			return errChanged // a new ADD replaced it
		}
		return Unlink(w.stateDir, r.Key())
	})
	switch {
	case errors.Is(err, errChanged):
		return Status{}, false
	case errors.Is(err, fs.ErrNotExist):
		return Status{Record: r, State: StateAbsent}, true
	case err != nil:
		w.log.Warn("pending record: expire", "containerID", r.ContainerID, "error", err)
		return Status{}, false
	}
	w.log.Warn("pending attachment expired: the sandbox went away before its cgroup appeared",
		r.who("age", time.Since(r.Created).Round(time.Second))...)
	return Status{Record: r, State: StateExpired}, true
}

// locate returns the record's pod cgroup directory if it exists now.
func (l *loop) locate(r Record, byNetns map[podcgroup.NetnsID]string) string {
	if r.CgroupDir != "" {
		dir, err := l.w.resolver.CgroupDir(r.CgroupDir)
		if err != nil || !isDir(dir) {
			return ""
		}
		return dir
	}
	if r.PodUID != "" {
		if podcgroup.ValidatePodUID(r.PodUID) == nil {
			if dir, ok := podcgroup.FindPodIn(l.roots, r.PodUID); ok {
				return dir
			}
		}
	}
	if r.hasNetns() {
		return byNetns[r.NetnsID]
	}
	return ""
}

// expired: the sandbox's netns is gone and the record is older than the TTL.
func (l *loop) expired(r Record) bool {
	if time.Since(r.Created) < l.w.TTL {
		return false
	}
	if r.Netns == "" || !r.hasNetns() {
		return true
	}
	id, err := podcgroup.StatNetns(r.Netns)
	return err != nil || id != r.NetnsID
}

// refreshWatches watches the pending directory and every cgroup directory
// where a waiting record's cgroup can appear, and nothing else.
func (l *loop) refreshWatches() {
	want := map[string]bool{l.dir: true}
	mount := l.w.resolver.Cgroups.Mount
	l.w.mu.Lock()
	for _, e := range l.w.records {
		r := e.rec
		switch {
		case r.CgroupDir != "":
			if dir, err := l.w.resolver.CgroupDir(r.CgroupDir); err == nil {
				want[nearestExisting(dir, mount)] = true
			}
		case r.PodUID != "":
			if len(l.roots) == 0 {
				want[mount] = true // a kubepods tree may appear; polls look too
			}
			for _, root := range l.roots {
				for _, d := range podcgroup.QoSDirs(root) {
					// A QoS directory not made yet is watched through
					// its parent, so its creation wakes us, not a poll.
					want[nearestExisting(d, mount)] = true
				}
			}
		}
	}
	l.w.mu.Unlock()
	have := map[string]bool{}
	for _, p := range l.fw.WatchList() {
		have[p] = true
	}
	for p := range have {
		if !want[p] {
			_ = l.fw.Remove(p)
		}
	}
	for p := range want {
		if !have[p] {
			if err := l.fw.Add(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				l.w.log.Debug("pending records: watch", "dir", p, "error", err)
			}
		}
	}
}

// nearestExisting is dir or its closest existing ancestor, not above mount.
func nearestExisting(dir, mount string) string {
	for p := dir; strings.HasPrefix(p, mount); p = filepath.Dir(p) {
		if isDir(p) {
			return p
		}
		if p == mount {
			break
		}
	}
	return mount
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
