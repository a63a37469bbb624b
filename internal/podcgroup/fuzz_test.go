package podcgroup

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/cgroupv2"
)

// FuzzCgroupDir: a cgroupPath from the runtime or the plugin config (the
// CNI input that names where to attach) never panics and never leaves the
// v2 mount: an accepted path is a clean directory strictly below the mount
// that reaches no symlink; every rejection names the cgroup path. The mount
// is a directory of the test's, with a symlink out of it and one inside it.
func FuzzCgroupDir(f *testing.F) {
	for _, s := range []string{
		"/kubepods/besteffort/pod1", "kubepods/burstable/pod2", "kubepods-besteffort-pod3.slice",
		"/", "", ".", "..", "/kubepods/../..", "-.slice", "a--b.slice", "escape/etc", "/escape", "inside/pod4",
		"/sys/fs/cgroup/x", "//kubepods//x/", "kubepods/\x00", "kubepods/./pod5",
	} {
		f.Add(s)
	}
	mount := f.TempDir()
	if err := os.MkdirAll(filepath.Join(mount, "kubepods", "besteffort"), 0o755); err != nil {
		f.Fatal(err)
	}
	if err := os.Symlink("/", filepath.Join(mount, "escape")); err != nil {
		f.Fatal(err)
	}
	if err := os.Symlink("kubepods", filepath.Join(mount, "inside")); err != nil {
		f.Fatal(err)
	}
	r := &Resolver{Cgroups: cgroupv2.Hierarchy{Mount: mount}, ProcRoot: "/proc"}
	f.Fuzz(func(t *testing.T, path string) {
		dir, err := r.CgroupDir(path)
		if err != nil {
			if dir != "" {
				t.Fatalf("%q: directory %q with error %v", path, dir, err)
			}
			if !strings.Contains(err.Error(), "cgroup path") {
				t.Fatalf("%q: rejection %q does not name the cgroup path", path, err)
			}
			return
		}
		if !strings.HasPrefix(dir, mount+"/") || filepath.Clean(dir) != dir {
			t.Fatalf("%q accepted as %q: not a clean directory below %s", path, dir, mount)
		}
		for _, part := range strings.Split(path, "/") {
			if part == ".." {
				t.Fatalf("%q accepted with a \"..\" element", path)
			}
		}
		for p := dir; p != mount; p = filepath.Dir(p) {
			fi, err := os.Lstat(p)
			if err == nil && fi.Mode()&os.ModeSymlink != 0 {
				t.Fatalf("%q accepted as %q, through the symlink %s", path, dir, p)
			}
		}
	})
}
