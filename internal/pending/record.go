// Package pending keeps pending attachments: a CNI ADD found no pod cgroup
// yet (the runtime creates it right after ADD), so it left a record that
// ctlbd completes the moment the cgroup appears.
//
// A record is one root-only JSON file, <stateDir>/pending/<key>.json, where
// the key is the record's attachment ID (one per network and container, so
// two networks of one container never share a record; records written
// before attachment IDs named the network are keyed by container ID),
// written atomically (temporary file renamed into place). The file is the
// source of truth: the plugin writes it whether or not ctlbd runs, and a
// daemon that starts later completes what it finds.
//
// Whoever acts on a record holds an exclusive flock on its file and checks
// that the file is still linked: so CNI DEL (remove the record, then detach)
// and the daemon (attach, then remove the record) never interleave into an
// attachment that outlives its pod.
package pending

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/podcgroup"
)

// Record is one pending attachment.
type Record struct {
	// ContainerID is the CNI container ID (the pod sandbox).
	ContainerID string `json:"containerID"`
	// AttachmentID is the datapath attachment to make for it.
	AttachmentID string `json:"attachmentID"`
	// BPFFS is the pin directory the plugin was configured with; a daemon
	// owning another directory leaves the record alone.
	BPFFS string `json:"bpffs"`
	// CgroupDir, when set, is exactly where the pod cgroup will be (the
	// runtime said so): nothing else is tried.
	CgroupDir string `json:"cgroupDir,omitempty"`
	// PodUID locates the pod cgroup in the kubepods trees.
	PodUID string `json:"podUID,omitempty"`
	// PodNamespace and PodName are the Kubernetes pod's, from CNI_ARGS,
	// for `ctlbd pending`: empty outside Kubernetes and in records of
	// plugins older than these fields.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	// Netns and NetnsID locate it through the sandbox's processes, and tell
	// whether the sandbox still exists.
	Netns   string            `json:"netns,omitempty"`
	NetnsID podcgroup.NetnsID `json:"netnsID"`
	Created time.Time         `json:"created"`

	// file is the key the record was read under.
	file string
}

// Key names the record's file: its attachment ID, or, in a record without
// one or read from a file named by container ID (written by a plugin older
// than per-network attachments), its container ID.
func (r Record) Key() string {
	if r.file != "" {
		return r.file
	}
	if r.AttachmentID != "" {
		return r.AttachmentID
	}
	return r.ContainerID
}

// who are the log attributes naming the record's container and, when the
// runtime gave it, its pod, followed by attrs.
func (r Record) who(attrs ...any) []any {
	out := []any{"containerID", r.ContainerID}
	if r.PodName != "" {
		out = append(out, "pod", r.PodNamespace+"/"+r.PodName)
	}
	return append(out, attrs...)
}

// hasNetns reports whether the record identifies the sandbox's netns.
func (r Record) hasNetns() bool { return r.NetnsID != (podcgroup.NetnsID{}) }

// same reports whether two reads are of the same record.
func (r Record) same(o Record) bool {
	return r.ContainerID == o.ContainerID && r.AttachmentID == o.AttachmentID && r.BPFFS == o.BPFFS &&
		r.Hints() == o.Hints() && r.NetnsID == o.NetnsID && r.Created.Equal(o.Created)
}

// Hints are the record's ways of finding the pod cgroup.
func (r Record) Hints() podcgroup.Hints {
	return podcgroup.Hints{CgroupPath: r.CgroupDir, PodUID: r.PodUID, Netns: r.Netns}
}

// Dir is where records live below a state directory.
func Dir(stateDir string) string { return filepath.Join(stateDir, "pending") }

func path(stateDir, containerID string) string {
	return filepath.Join(Dir(stateDir), containerID+".json")
}

// ValidateContainerID accepts record keys (attachment IDs, and container IDs,
// which CNI allows as [A-Za-z0-9][A-Za-z0-9_.-]*) that are one plain file
// name: the key is joined into a path.
func ValidateContainerID(id string) error {
	if id == "" || len(id) > 250 || strings.ContainsAny(id, "/\x00") || id[0] == '.' {
		return fmt.Errorf("container ID %q cannot name a pending record", id)
	}
	return nil
}

// Write stores r atomically as a 0600 file in a 0700 directory, replacing a
// record of the same key.
func Write(stateDir string, r Record) error {
	if err := ValidateContainerID(r.Key()); err != nil {
		return err
	}
	dir := Dir(stateDir)
	if err := EnsureDir(stateDir); err != nil {
		return fmt.Errorf("pending record %s: %w", r.Key(), err)
	}
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("pending record %s: %w", r.Key(), err)
	}
	// A retried ADD clears what a killed one left.
	if _, err := RemoveTemps(stateDir, r.Key()); err != nil {
		return err
	}
	// A dot name is never taken for a record by the watcher.
	tmp, err := os.CreateTemp(dir, tempPrefix(r.Key()))
	if err != nil {
		return fmt.Errorf("pending record %s: %w", r.Key(), err)
	}
	fail := func(err error) error {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("pending record %s: %w", r.Key(), err)
	}
	// CreateTemp makes 0600 files already; say so for the reader.
	if err := tmp.Chmod(0o600); err != nil {
		return fail(err)
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp.Name(), path(stateDir, r.Key())); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("pending record %s: %w", r.Key(), err)
	}
	return nil
}

// EnsureDir creates the state and pending directories, root-only, where
// they are missing. Modes are set explicitly: the umask of a process (which
// another goroutine may change for a moment) must not decide them.
func EnsureDir(stateDir string) error {
	for _, d := range []string{stateDir, Dir(stateDir)} {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(d), 0o755); err != nil {
			return fmt.Errorf("create %s: %w", filepath.Dir(d), err)
		}
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create %s: %w", d, err)
		}
		if err := os.Chmod(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	return nil
}

// Read loads the record of a key; a missing record is fs.ErrNotExist.
func Read(stateDir, containerID string) (Record, error) {
	if err := ValidateContainerID(containerID); err != nil {
		return Record{}, err
	}
	return readFile(path(stateDir, containerID))
}

func readFile(p string) (Record, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return Record{}, fmt.Errorf("pending record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, fmt.Errorf("pending record %s: %w", p, err)
	}
	want := strings.TrimSuffix(filepath.Base(p), ".json")
	if r.Key() != want && r.ContainerID != want {
		return Record{}, fmt.Errorf("pending record %s: names attachment %q", p, r.Key())
	}
	r.file = want
	return r, nil
}

// List reads every record, sorted by key. Unreadable files are
// skipped: one damaged record must not hide the others.
func List(stateDir string) ([]Record, error) {
	entries, err := os.ReadDir(Dir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list pending records: %w", err)
	}
	var out []Record
	for _, e := range entries {
		id, ok := recordName(e.Name())
		if !ok {
			continue
		}
		r, err := Read(stateDir, id)
		if err != nil {
			continue
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out, nil
}

// recordName returns the key a file name holds the record of.
func recordName(name string) (string, bool) {
	id, ok := strings.CutSuffix(name, ".json")
	if !ok || ValidateContainerID(id) != nil {
		return "", false
	}
	return id, true
}

// Remove deletes the record of a key under its lock; removed is false when
// there was none. After Remove returns, no daemon will act on the record.
func Remove(stateDir, containerID string) (removed bool, err error) {
	if err := ValidateContainerID(containerID); err != nil {
		return false, err
	}
	err = WithLock(stateDir, containerID, func(Record) error {
		removed = true
		return Unlink(stateDir, containerID)
	})
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return removed, err
}

// Unlink removes the record file; call it inside WithLock.
func Unlink(stateDir, containerID string) error {
	if err := os.Remove(path(stateDir, containerID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove pending record %s: %w", containerID, err)
	}
	return nil
}

// WithLock runs fn with the record locked, only while the record still
// exists: fs.ErrNotExist when it does not (or was removed or replaced while
// the caller waited for the lock). The lock is held for fn alone, so keep fn
// short.
func WithLock(stateDir, containerID string, fn func(Record) error) error {
	p := path(stateDir, containerID)
	for range 3 { // a replaced record is retried on its new file
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("pending record %s: %w", containerID, err)
		}
		err = func() error {
			defer f.Close() // closing drops the flock
			if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
				return fmt.Errorf("lock pending record %s: %w", containerID, err)
			}
			var held, now unix.Stat_t
			if err := unix.Fstat(int(f.Fd()), &held); err != nil {
				return fmt.Errorf("pending record %s: %w", containerID, err)
			}
			if err := unix.Stat(p, &now); err != nil || now.Ino != held.Ino {
				return errReplaced // removed or replaced while we waited
			}
			r, err := readFile(p)
			if err != nil {
				return err
			}
			return fn(r)
		}()
		if !errors.Is(err, errReplaced) {
			return err
		}
	}
	return fmt.Errorf("pending record %s: %w", containerID, fs.ErrNotExist)
}

var errReplaced = errors.New("record replaced")
