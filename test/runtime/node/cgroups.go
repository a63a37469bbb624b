package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Hierarchies lists the mount points of every cgroup hierarchy: each v1
// controller's and the v2 tree. With the cgroupfs driver a runtime makes a
// pod's cgroup in all of them (the v2 one is the one ctlb attaches to).
func Hierarchies() ([]string, error) {
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.FSType != "cgroup" && m.FSType != "cgroup2", false
	})
	if err != nil {
		return nil, fmt.Errorf("cgroup hierarchies: %w", err)
	}
	var out []string
	for _, m := range mounts {
		out = append(out, m.Mountpoint)
	}
	if len(out) == 0 {
		return nil, errors.New("cgroup hierarchies: none mounted")
	}
	return out, nil
}

// CreateCgroup makes the cgroup rel (like "/kubepods/besteffort/podUID")
// in every hierarchy, as kubelet does before it asks for the pod's sandbox.
// The caller removes it with RemovePodCgroup.
func CreateCgroup(t testing.TB, rel string) {
	t.Helper()
	if err := MakeCgroup(rel); err != nil {
		t.Fatal(err)
	}
}

// MakeCgroup is CreateCgroup returning errors, for goroutines.
func MakeCgroup(rel string) error {
	hs, err := Hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := os.MkdirAll(filepath.Join(h, rel), 0o755); err != nil {
			return fmt.Errorf("create pod cgroup: %w", err)
		}
	}
	return nil
}

// RemovePodCgroup removes the cgroup rel, and everything below it, from
// every hierarchy, deepest first, killing what still runs there (by PID:
// only the test's pods live there). Then it removes rel's ancestors up to,
// not including, keep ("" for the hierarchy root) where they are empty:
// runc creates parents it never removes, and another test may still use
// them, so a busy ancestor stays.
func RemovePodCgroup(t testing.TB, rel, keep string) {
	t.Helper()
	hs, err := Hierarchies()
	if err != nil {
		t.Error(err)
		return
	}
	rel = "/" + strings.Trim(rel, "/")
	keep = "/" + strings.Trim(keep, "/")
	for _, h := range hs {
		dir := filepath.Join(h, rel)
		if _, err := os.Stat(dir); err == nil {
			testutil.RemoveCgroup(t, dir)
		}
		for p := filepath.Dir(rel); p != keep && p != "/" && strings.HasPrefix(p, keep); p = filepath.Dir(p) {
			if err := os.Remove(filepath.Join(h, p)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				break // busy: still holds another pod
			}
		}
	}
}

// PruneCgroups removes each cgroup rel from every hierarchy where it is
// empty, in the order given (children first); a busy one stays.
func PruneCgroups(rels ...string) {
	hs, err := Hierarchies()
	if err != nil {
		return
	}
	for _, rel := range rels {
		for _, h := range hs {
			_ = os.Remove(filepath.Join(h, rel))
		}
	}
}
