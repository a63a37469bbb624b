package bpffs

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/testutil"
)

// childEnv marks the test binary re-run inside a private mount namespace:
// every mount the test makes dies with that namespace, the host's mounts
// are never touched.
const childEnv = "CTLB_BPFFS_TEST_CHILD"

// inPrivateMountNS runs the calling test again in a new mount namespace
// (unshare(1); a multi-threaded Go process cannot unshare its own) and
// reports its failures. It returns true in the child, which then runs the
// body.
func inPrivateMountNS(t *testing.T) bool {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		return true
	}
	testutil.RequireRoot(t)
	unshare, err := exec.LookPath("unshare")
	testutil.Require(t, err == nil, "unshare(1) (util-linux) is needed for a private mount namespace")
	cmd := exec.Command(unshare, "--mount", "--propagation", "private", "--", os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("in a private mount namespace: %v\n%s", err, out)
	}
	t.Logf("child:\n%s", out)
	return false
}

// unmountAtEnd undoes a mount before the temp dir is removed.
func unmountAtEnd(t *testing.T, dir string) {
	if dir != "" {
		t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	}
}

func fsType(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Type
}

// A host where /sys/fs/bpf is plain sysfs: a fresh sysfs mount stands in
// for /sys, so its fs/bpf is the kernel's empty mount point, where mkdir
// fails.
func TestEnsureOnSysfs(t *testing.T) {
	if !inPrivateMountNS(t) {
		return
	}
	sys := filepath.Join(t.TempDir(), "sys")
	if err := os.Mkdir(sys, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("sysfs", sys, "sysfs", 0, ""); err != nil {
		t.Fatalf("mount sysfs: %v", err)
	}
	unmountAtEnd(t, sys)
	bpfDir := filepath.Join(sys, "fs", "bpf")
	if fsType(t, bpfDir) != unix.SYSFS_MAGIC {
		t.Fatalf("%s is not plain sysfs", bpfDir)
	}
	if err := os.Mkdir(filepath.Join(bpfDir, "ctlb"), 0o700); err == nil {
		t.Fatalf("mkdir in sysfs worked: the stand-in does not show the bug")
	}
	dir := filepath.Join(bpfDir, "ctlb")
	mounted, err := Ensure(dir)
	unmountAtEnd(t, mounted)
	if err != nil {
		t.Fatal(err)
	}
	if mounted != bpfDir {
		t.Errorf("mounted on %q, want the nearest non-bpffs ancestor %s", mounted, bpfDir)
	}
	if !Is(dir) || !Is(bpfDir) {
		t.Errorf("%s on bpffs: %v, %s: %v", dir, Is(dir), bpfDir, Is(bpfDir))
	}
	fi, err := os.Stat(bpfDir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("%s mode %v (%v), want 0700", bpfDir, fi.Mode(), err)
	}
	// A second call (a restarted daemon) finds it all in place.
	if mounted, err := Ensure(dir); err != nil || mounted != "" {
		t.Errorf("second Ensure: mounted %q, %v; want nothing to do", mounted, err)
	}
}

func TestEnsureElsewhere(t *testing.T) {
	if !inPrivateMountNS(t) {
		return
	}
	root := t.TempDir()
	// A missing directory in a plain tree: made, then mounted on itself
	// (never on the ancestor, which would hide what else it holds).
	dir := filepath.Join(root, "a", "b")
	mounted, err := Ensure(dir)
	unmountAtEnd(t, mounted)
	if err != nil || mounted != dir {
		t.Fatalf("Ensure(%s): mounted %q, %v; want %s", dir, mounted, err, dir)
	}
	if fsType(t, root) == unix.BPF_FS_MAGIC || !Is(dir) {
		t.Errorf("bpffs on the wrong directory")
	}
	// Inside that bpffs: only mkdir.
	sub := filepath.Join(dir, "x", "y")
	if mounted, err := Ensure(sub); err != nil || mounted != "" || !Is(sub) {
		t.Errorf("Ensure(%s): mounted %q, %v", sub, mounted, err)
	}
	// An existing plain directory gets the mount.
	plain := filepath.Join(root, "plain")
	if err := os.Mkdir(plain, 0o755); err != nil {
		t.Fatal(err)
	}
	mounted, err = Ensure(plain)
	unmountAtEnd(t, mounted)
	if err != nil || mounted != plain || !Is(plain) {
		t.Errorf("Ensure(%s): mounted %q, %v", plain, mounted, err)
	}
}

func TestEnsureRejects(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"relative/ctlb", file} {
		if _, err := Ensure(dir); err == nil {
			t.Errorf("Ensure(%q) accepted", dir)
		} else {
			t.Logf("Ensure(%q): %v", dir, err)
		}
	}
}

// TestEnsureRefusesNonEmpty: a directory that holds files and is not a
// bpffs is refused, naming it, and nothing is mounted: the mount would hide
// the files (a --bpffs that names the wrong directory). The same for a
// non-empty sysfs directory that would get the mount as the nearest
// ancestor of a missing pin directory.
func TestEnsureRefusesNonEmpty(t *testing.T) {
	if !inPrivateMountNS(t) {
		return
	}
	root := t.TempDir()
	dir := filepath.Join(root, "data")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), []byte("data\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sys := filepath.Join(root, "sys")
	if err := os.Mkdir(sys, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("sysfs", sys, "sysfs", 0, ""); err != nil {
		t.Fatalf("mount sysfs: %v", err)
	}
	unmountAtEnd(t, sys)
	kernel := filepath.Join(sys, "kernel") // on sysfs, not empty
	for _, c := range []struct{ arg, refused string }{{dir, dir}, {filepath.Join(kernel, "ctlb"), kernel}} {
		mounted, err := Ensure(c.arg)
		unmountAtEnd(t, mounted)
		want := c.refused + " is not empty and not a bpffs: mounting there would hide its files"
		if err == nil || err.Error() != want {
			t.Errorf("Ensure(%s): mounted %q, %v; want the error %q", c.arg, mounted, err, want)
		}
		if Is(c.refused) {
			t.Errorf("%s got a bpffs", c.refused)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "file")); err != nil || string(b) != "data\n" {
		t.Errorf("the directory's file: %q, %v; want it in sight", b, err)
	}
	// Emptied, the same directory gets its bpffs.
	if err := os.Remove(filepath.Join(dir, "file")); err != nil {
		t.Fatal(err)
	}
	mounted, err := Ensure(dir)
	unmountAtEnd(t, mounted)
	if err != nil || mounted != dir || !Is(dir) {
		t.Errorf("Ensure(%s) once empty: mounted %q, %v", dir, mounted, err)
	}
}
