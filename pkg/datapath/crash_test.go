package datapath_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/ctlb/ctlb/internal/crashpoint"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// createChildEnv makes the test binary a child that runs datapath.Create on
// the directory it names and exits: a process the crash point may kill
// without killing the test.
const createChildEnv = "CTLB_TEST_CREATE_DIR"

func runCreateIfChild() {
	dir := os.Getenv(createChildEnv)
	if dir == "" {
		return
	}
	dp, err := datapath.Create(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dp.Close()
	os.Exit(0)
}

// createKilledAt runs Create in a child with the crash point armed and
// fails unless the child died of it.
func createKilledAt(t *testing.T, dir, point string) {
	t.Helper()
	c := exec.Command(os.Args[0], "-test.run=^$")
	c.Env = append(os.Environ(), createChildEnv+"="+dir, crashpoint.Env+"="+point)
	out, err := c.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() {
		t.Fatalf("Create with crash point %s: %v, want it killed there; output:\n%s", point, err, out)
	}
}

// TestCrashInsideUpgradeV1: the v1 -> v2 upgrade is killed after its first
// attachment moved to v2 and before the second did. A second Create (the
// restarted daemon) finishes the upgrade, and connect loops in both pods,
// running throughout, see no failure and never reach the raw VIP.
func TestCrashInsideUpgradeV1(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "198.18.100.1")
	testutil.StartServers(t, netns, vip, "127.0.0.11:9001", "127.0.0.12:9001")
	cgA, cgB := testutil.NewCgroup(t, ""), testutil.NewCgroup(t, "")
	pinV1(t, dir, cgA, "pod-a", vip, "127.0.0.11:9001", "127.0.0.12:9001")
	attachV1(t, dir, cgB, "pod-b")

	var storms []*testutil.Client
	for _, cg := range []string{cgA, cgB} {
		storms = append(storms, testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 1, Count: 100000, Duration: time.Minute}))
	}
	time.Sleep(200 * time.Millisecond)
	createKilledAt(t, dir, crashpoint.Upgrade)
	// Half-way: one attachment has the v2 hooks, the other does not yet.
	moved := 0
	for _, id := range []string{"pod-a", "pod-b"} {
		if _, err := os.Lstat(filepath.Join(dir, "links", id, "connect6")); err == nil {
			moved++
		}
	}
	if moved != 1 {
		t.Fatalf("after the crash %d of 2 attachments have v2 hooks, want exactly 1 (a crash half-way)", moved)
	}
	time.Sleep(200 * time.Millisecond)

	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatalf("Create after the crash inside the upgrade: %v", err)
	}
	defer dp.Close()
	time.Sleep(200 * time.Millisecond)
	for i, s := range storms {
		r := s.Finish(t)
		t.Logf("pod %d across the crash and the resumed upgrade: %d connects, %d failed, %v", i, r.Total, r.Failed, r.PerServer)
		if r.Failed != 0 || r.PerServer[vip] != 0 || r.Total < 10 {
			t.Errorf("pod %d: %d of %d failed (%v), %d to the raw VIP; want none", i, r.Failed, r.Total, r.Errors, r.PerServer[vip])
		}
	}
	for _, id := range []string{"pod-a", "pod-b"} {
		a, err := dp.Attachment(id)
		if err != nil || !a.Alive || len(a.Missing) != 0 {
			t.Errorf("attachment %s after the resumed upgrade: %+v, %v; want whole and alive", id, a, err)
		}
	}
	for _, n := range []string{"ctlb_services_v1", "ctlb_connect4_v1", "ctlb_sock_release_v1"} {
		if _, err := os.Lstat(filepath.Join(dir, n)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("v1 pin %s still there after the resumed upgrade (%v)", n, err)
		}
	}
}

// attachV1 attaches the pinned v1 programs to one more cgroup, as a v1
// plugin did for a second pod.
func attachV1(t *testing.T, dir, cg, id string) {
	t.Helper()
	ld := filepath.Join(dir, "links", id)
	if err := os.Mkdir(ld, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, h := range []struct {
		name   string
		attach ebpf.AttachType
	}{
		{"sock_release", ebpf.AttachCgroupInetSockRelease},
		{"getpeername4", ebpf.AttachCgroupInet4GetPeername},
		{"connect4", ebpf.AttachCGroupInet4Connect},
	} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "ctlb_"+h.name+"_v1"), nil)
		if err != nil {
			t.Fatal(err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: h.attach, Program: p})
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Pin(filepath.Join(ld, h.name)); err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
}

// installOld puts prog, an "older" program, in place of the hook's pinned
// program and in the link pinned at linkPin, as an earlier ctlbd would
// have left them.
func installOld(t *testing.T, dir, hook, linkPin string, prog *ebpf.Program) {
	t.Helper()
	l, err := link.LoadPinnedLink(linkPin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Update(prog); err != nil {
		t.Fatalf("update %s: %v", linkPin, err)
	}
	pin := filepath.Join(dir, "ctlb_"+hook+"_v2")
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	if err := prog.Pin(pin); err != nil {
		t.Fatal(err)
	}
}

func returnOne(t *testing.T, typ ebpf.ProgramType, at ebpf.AttachType) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: typ, AttachType: at, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// TestUpgradeRootReleaseFirst: an upgrade moves the root's sock_release to
// the new program before any pod's program. A new connect program may keep
// a socket's state where an older release does not look (the socket table
// of session 5); with the release upgraded first, no socket connected by a
// new program is ever released by an old one. Here the upgrade is killed
// right after its first pod link moved: the root link already runs the new
// release.
func TestUpgradeRootReleaseFirst(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-r", cg); err != nil {
		t.Fatal(err)
	}
	dp.Close()
	rootLink := filepath.Join(dir, "ctlb_release_link_v2")
	oldRelease := returnOne(t, ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease)
	installOld(t, dir, "sock_release", rootLink, oldRelease)
	installOld(t, dir, "connect4", filepath.Join(dir, "links", "pod-r", "connect4"),
		returnOne(t, ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect))

	createKilledAt(t, dir, crashpoint.Upgrade)
	l, err := link.LoadPinnedLink(rootLink, nil)
	if err != nil {
		t.Fatal(err)
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	oi, _ := oldRelease.Info()
	oldID, _ := oi.ID()
	if info.Program == oldID {
		t.Fatal("killed after the first pod link moved to the new program, the root link still runs the old sock_release")
	}
	p, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	pi, _ := p.Info()
	if pi.Name != "ctlb_sock_release" {
		t.Errorf("root link runs %q, want ctlb's sock_release", pi.Name)
	}
	// The restarted daemon finishes the upgrade.
	dp, err = datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
}
