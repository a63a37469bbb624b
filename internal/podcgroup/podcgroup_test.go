package podcgroup_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/internal/testutil"
)

func TestExpandSlice(t *testing.T) {
	for in, want := range map[string]string{
		"kubepods.slice":                         "/kubepods.slice",
		"kubepods-besteffort.slice":              "/kubepods.slice/kubepods-besteffort.slice",
		"kubepods-burstable-pod1234_ab_cd.slice": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_ab_cd.slice",
	} {
		got, err := podcgroup.ExpandSlice(in)
		if err != nil || got != want {
			t.Errorf("ExpandSlice(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"-.slice", ".slice", "a--b.slice", "-a.slice", "a-.slice", "a/b.slice", "kubepods"} {
		if got, err := podcgroup.ExpandSlice(bad); err == nil {
			t.Errorf("ExpandSlice(%q) = %q, want an error", bad, got)
		}
	}
}

func TestPodDirs(t *testing.T) {
	uid := "1b2c-3d"
	got := podcgroup.PodDirs("/x/kubepods", uid)
	want := []string{"/x/kubepods/pod1b2c-3d", "/x/kubepods/burstable/pod1b2c-3d", "/x/kubepods/besteffort/pod1b2c-3d"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("cgroupfs: %v, want %v", got, want)
	}
	got = podcgroup.PodDirs("/x/kubepods.slice", uid)
	want = []string{
		"/x/kubepods.slice/kubepods-pod1b2c_3d.slice",
		"/x/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c_3d.slice",
		"/x/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c_3d.slice",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("systemd: %v, want %v", got, want)
	}
	for _, bad := range []string{"", "../x", "a/b", "a b", strings.Repeat("a", 129)} {
		if podcgroup.ValidatePodUID(bad) == nil {
			t.Errorf("ValidatePodUID(%q) accepted it", bad)
		}
	}
}

func resolver(t *testing.T) *podcgroup.Resolver {
	t.Helper()
	h, err := cgroupv2.Default()
	testutil.Require(t, err == nil, "cgroup v2")
	return podcgroup.NewResolver(h)
}

// Pods are found in every QoS class and both drivers' layouts, below a
// kubepods tree that is not at the top of the hierarchy.
func TestFindPodUID(t *testing.T) {
	r := resolver(t)
	parent := testutil.NewCgroup(t, "")
	dirs := map[string]string{
		"0a1b-guaranteed": filepath.Join(parent, "kubepods", "pod0a1b-guaranteed"),
		"0a1b-besteffort": filepath.Join(parent, "kubepods", "besteffort", "pod0a1b-besteffort"),
		"0a1b-burstable":  filepath.Join(parent, "kubepods.slice", "kubepods-burstable.slice", "kubepods-burstable-pod0a1b_burstable.slice"),
		"0a1b-sguarant":   filepath.Join(parent, "kubepods.slice", "kubepods-pod0a1b_sguarant.slice"),
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for uid, want := range dirs {
		got, ok, err := r.FindPodUID(uid)
		if err != nil || !ok || got != want {
			t.Errorf("FindPodUID(%s) = %q, %v, %v; want %s", uid, got, ok, err, want)
		}
	}
	if got, ok, err := r.FindPodUID("0a1b-absent"); ok || err != nil {
		t.Errorf("FindPodUID(absent) = %q, %v, %v; want not found", got, ok, err)
	}
	if _, _, err := r.FindPodUID("../etc"); err == nil {
		t.Error("FindPodUID(../etc) accepted it")
	}
	roots := r.KubepodsRoots()
	for _, want := range []string{filepath.Join(parent, "kubepods"), filepath.Join(parent, "kubepods.slice")} {
		found := false
		for _, r := range roots {
			found = found || r == want
		}
		if !found {
			t.Errorf("KubepodsRoots() = %v, want %s among them", roots, want)
		}
	}
}

// The netns hint finds the pod cgroup as the parent of the cgroup of a
// process in that netns; a process in a top-level cgroup is not taken (its
// parent is the root).
func TestResolveByNetns(t *testing.T) {
	r := resolver(t)
	parent := testutil.NewCgroup(t, "")
	podDir := filepath.Join(parent, "pod")
	ctr := filepath.Join(podDir, "ctr")
	if err := os.MkdirAll(ctr, 0o755); err != nil {
		t.Fatal(err)
	}
	netns := testutil.NewNetNS(t)
	hints := podcgroup.Hints{Netns: netns.Path()}
	if f, ok, err := r.Resolve(hints); ok || err != nil || f.Dir != "" {
		t.Fatalf("Resolve with an empty netns = %+v, %v, %v; want not found", f, ok, err)
	}
	// A process of a top-level cgroup in the netns: its parent is the root,
	// which is refused, saying so (not an error: the sandbox's own process
	// may come later).
	startIn(t, netns, parent)
	if f, ok, err := r.Resolve(hints); ok || err != nil || f.Refused == nil || !strings.Contains(f.Refused.Error(), "cgroup v2 root") {
		t.Fatalf("Resolve with a top-level process = %+v, %v, %v; want a refusal naming the root", f, ok, err)
	}
	startIn(t, netns, ctr)
	f, ok, err := r.Resolve(hints)
	if err != nil || !ok || f.Dir != podDir || f.Source != podcgroup.FromNetns {
		t.Fatalf("Resolve = %+v, %v, %v; want %s from the netns", f, ok, err, podDir)
	}
}

func startIn(t *testing.T, netns ns.NetNS, cgroupDir string) {
	t.Helper()
	f := testutil.OpenDir(t, cgroupDir)
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := netns.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
}

// cgroupPath wins, existing or not, and may not escape or name the root.
func TestResolveCgroupPath(t *testing.T) {
	r := resolver(t)
	parent := testutil.NewCgroup(t, "")
	rel := strings.TrimPrefix(parent, r.Cgroups.Mount) + "/later"
	f, ok, err := r.Resolve(podcgroup.Hints{CgroupPath: rel, PodUID: "x", Netns: "/proc/self/ns/net"})
	if err != nil || ok || f.Dir != parent+"/later" || f.Source != podcgroup.FromCgroupPath {
		t.Fatalf("Resolve(cgroupPath to be made) = %+v, %v, %v; want %s/later, not there yet", f, ok, err, parent)
	}
	if err := os.Mkdir(parent+"/later", 0o755); err != nil {
		t.Fatal(err)
	}
	if f, ok, err = r.Resolve(podcgroup.Hints{CgroupPath: parent + "/later"}); err != nil || !ok {
		t.Fatalf("Resolve(absolute cgroupPath) = %+v, %v, %v", f, ok, err)
	}
	for _, bad := range []string{"/", "..", "/a/../../b", "-.slice", r.Cgroups.Mount} {
		if f, _, err := r.Resolve(podcgroup.Hints{CgroupPath: bad}); err == nil {
			t.Errorf("Resolve(cgroupPath %q) = %+v, want an error", bad, f)
		}
	}
}

// Netns resolution picks the pod on every runtime's layout: crun's
// "container" leaf below a systemd scope is skipped, libpod pods and
// Kubernetes pods resolve to the pod cgroup, a standalone podman container
// to its own cgroup, and a process directly below a shared cgroup is
// refused with the reason.
func TestResolveByNetnsLayouts(t *testing.T) {
	r := resolver(t)
	podID := strings.Repeat("ab12", 16)
	parent := testutil.NewCgroup(t, "")
	for _, c := range []struct {
		name, proc, want, refuse string
	}{
		{"libpod pod, systemd driver, crun", "machine.slice/machine-libpod_pod_p1.slice/libpod-c1.scope/container", "machine.slice/machine-libpod_pod_p1.slice", ""},
		{"libpod pod, systemd driver, runc", "machine.slice/machine-libpod_pod_p2.slice/libpod-c2.scope", "machine.slice/machine-libpod_pod_p2.slice", ""},
		{"libpod pod, cgroupfs driver", "libpod_parent/" + podID + "/libpod-c3", "libpod_parent/" + podID, ""},
		{"standalone podman, --cgroup-parent", "custom-parent/libpod-c10", "custom-parent/libpod-c10", ""},
		{"standalone podman, systemd, crun", "machine.slice/libpod-c4.scope/container", "machine.slice/libpod-c4.scope", ""},
		{"standalone podman, cgroupfs", "libpod_parent/libpod-c5", "libpod_parent/libpod-c5", ""},
		{"Kubernetes BestEffort, systemd", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-c6.scope", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice", ""},
		{"Kubernetes Guaranteed, cgroupfs", "kubepods/podu2/c7", "kubepods/podu2", ""},
		{"a service", "system.slice/foo.service", "", "shared cgroup"},
		{"directly in machine.slice", "machine.slice", "", "shared cgroup"},
		{"below a QoS class, not a pod", "kubepods/besteffort/c8", "", "directly below the shared cgroup"},
		{"conmon of a standalone container", "libpod_parent/libpod-conmon-c9", "", "directly below the shared cgroup"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(parent, c.proc)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			netns := testutil.NewNetNS(t)
			startIn(t, netns, dir)
			f, ok, err := r.Resolve(podcgroup.Hints{Netns: netns.Path()})
			if c.refuse != "" {
				if ok || err != nil || f.Refused == nil || !strings.Contains(f.Refused.Error(), c.refuse) {
					t.Fatalf("Resolve = %+v, %v, %v; want a refusal with %q", f, ok, err, c.refuse)
				}
				t.Logf("refused: %v", f.Refused)
				return
			}
			if want := filepath.Join(parent, c.want); err != nil || !ok || f.Dir != want {
				t.Fatalf("Resolve = %+v, %v, %v; want %s", f, ok, err, want)
			}
		})
	}
}

// The systemd driver's OCI form names a container of the pod slice: it
// resolves to the pod slice, and a slice that is not a pod's is refused.
func TestResolveSystemdOCIForm(t *testing.T) {
	r := resolver(t)
	for in, want := range map[string]string{
		"kubepods-besteffort-pod1_2.slice:cri-containerd:abc": "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice",
		"kubepods-burstable-pod3.slice:crio:def":              "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3.slice",
		"kubepods-pod4.slice:cri-containerd:ghi":              "/kubepods.slice/kubepods-pod4.slice",
		"kubepods-besteffort-pod5.slice":                      "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5.slice",
	} {
		f, _, err := r.Resolve(podcgroup.Hints{CgroupPath: in})
		if err != nil || f.Dir != r.Cgroups.Mount+want {
			t.Errorf("Resolve(%q) = %+v, %v; want %s", in, f, err, r.Cgroups.Mount+want)
		}
	}
	for _, bad := range []string{"system.slice:docker:abc", "kubepods-besteffort.slice:cri-containerd:abc", "kubepods.slice:x:y", "machine.slice:libpod:z"} {
		if f, _, err := r.Resolve(podcgroup.Hints{CgroupPath: bad}); err == nil || !strings.Contains(err.Error(), "not a pod's") {
			t.Errorf("Resolve(%q) = %+v, %v; want a refusal", bad, f, err)
		}
	}
}
