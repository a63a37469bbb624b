package cgroupv2_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/testutil"
)

func TestMountpointIsCgroup2(t *testing.T) {
	m, err := cgroupv2.Mountpoint()
	testutil.Require(t, err == nil, "cgroup v2 mounted")
	if _, err := os.Stat(filepath.Join(m, "cgroup.controllers")); err != nil {
		t.Fatalf("%s has no cgroup.controllers: not a v2 hierarchy: %v", m, err)
	}
}

func TestResolve(t *testing.T) {
	h, err := cgroupv2.Default()
	testutil.Require(t, err == nil, "cgroup v2 mounted")
	cg := testutil.NewCgroup(t, "")
	rel := strings.TrimPrefix(cg, h.Mount)
	// A symlink inside the tree that points out of it.
	outside := t.TempDir()
	link := filepath.Join(cg, "escape")
	if err := os.Symlink(outside, link); err == nil {
		t.Cleanup(func() { os.Remove(link) })
	} else {
		link = "" // cgroupfs refuses symlinks: nothing to escape through
	}

	good := []struct{ in, want string }{
		{cg, cg},
		{rel, cg},
		{strings.TrimPrefix(rel, "/"), cg},
		{rel + "/not-yet/created", cg + "/not-yet/created"},
		{cg + "//", cg},
	}
	for _, c := range good {
		got, err := h.Resolve(c.in, false)
		if err != nil || got != c.want {
			t.Errorf("Resolve(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	bad := []struct{ in, want string }{
		{"", "empty"},
		{"/", "root"},
		{h.Mount, "root"},
		{rel + "/../..", `".."`},
		{"../etc", `".."`},
		{outside, "outside the cgroup v2 mount"},
		{"/proc/self", "outside the cgroup v2 mount"},
		{"a\x00b", "NUL"},
	}
	if link != "" {
		bad = append(bad, struct{ in, want string }{link, "symlink"})
	}
	for _, c := range bad {
		got, err := h.Resolve(c.in, false)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Resolve(%q) = %q, %v; want an error containing %q", c.in, got, err, c.want)
		}
	}
	if got, err := h.Resolve("/", true); err != nil || got != h.Mount {
		t.Errorf("Resolve(/, allowRoot) = %q, %v; want the mount", got, err)
	}
}

func TestIDAndIndex(t *testing.T) {
	h, err := cgroupv2.Default()
	testutil.Require(t, err == nil, "cgroup v2 mounted")
	cg := testutil.NewCgroup(t, "")
	id, err := cgroupv2.ID(cg)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := h.IndexByID()
	if err != nil {
		t.Fatal(err)
	}
	if idx[id] != cg {
		t.Fatalf("index[%d] = %q, want %q", id, idx[id], cg)
	}
}

// The development machines are hybrid; CI hosts may be unified. Either way
// the mode containerd/cgroups reports agrees with the v2 mount found in
// mountinfo.
func TestHostMode(t *testing.T) {
	m, err := cgroupv2.Mountpoint()
	mode := cgroupv2.HostMode()
	t.Logf("v2 mount %q (%v), mode %s", m, err, mode)
	switch {
	case m == "/sys/fs/cgroup" && !strings.HasPrefix(mode, "unified"):
		t.Fatalf("v2 at /sys/fs/cgroup but mode %s", mode)
	case m == "/sys/fs/cgroup/unified" && !strings.HasPrefix(mode, "hybrid"):
		t.Fatalf("v2 at /sys/fs/cgroup/unified but mode %s", mode)
	}
}
