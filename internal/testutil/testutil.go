// Package testutil gives tests what they need from the real kernel, each
// piece private to one test and removed when it ends, even on failure: a
// network namespace, a bpffs mount, a cgroup. Tests run as root; outside CI a
// test without root is skipped with the reason, inside CI (CI=true) it fails.
package testutil

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/topo"
)

// InCI reports whether the test runs in CI, where nothing may be skipped.
func InCI() bool { return os.Getenv("CI") == "true" }

// Require fails the test in CI and skips it elsewhere when ok is false.
func Require(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if InCI() {
		t.Fatalf("missing requirement in CI: %s", why)
	}
	t.Skipf("skipped: %s", why)
}

// RequireRoot needs uid 0: every ctlb test uses BPF, cgroups and netns.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root (BPF, cgroups, network namespaces)")
}

// NewNetNS creates a fresh network namespace with lo up and removes it when
// the test ends (topo.NewNetNS, which the benchmark uses too). Nothing in it
// routes anywhere: a test host's traffic stays on this machine.
func NewNetNS(t testing.TB) ns.NetNS {
	t.Helper()
	RequireRoot(t)
	var u topo.Undo
	n, err := topo.NewNetNS(&u, fmt.Sprintf("ctlb-t-%d-%08x", os.Getpid(), rand.Uint32()))
	t.Cleanup(func() {
		if err := u.UnwindErr(); err != nil {
			t.Errorf("netns: %v", err)
		}
	})
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	return n
}

// AddLoopbackAddrs puts /32 (IPv6: /128) addresses on lo inside netns (the
// kernel here has no dummy links). Addresses must be in 127.0.0.0/8,
// 198.18.0.0/15 or, for IPv6, 2001:2::/48.
func AddLoopbackAddrs(t testing.TB, netns ns.NetNS, addrs ...string) {
	t.Helper()
	err := netns.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, a := range addrs {
			bits := "/32"
			if strings.Contains(a, ":") {
				if !strings.HasPrefix(a, "2001:2:") {
					return fmt.Errorf("test address %s outside 2001:2::/48", a)
				}
				bits = "/128"
			} else if !strings.HasPrefix(a, "127.") && !strings.HasPrefix(a, "198.18.") && !strings.HasPrefix(a, "198.19.") {
				return fmt.Errorf("test address %s outside 127/8 and 198.18/15", a)
			}
			addr, err := netlink.ParseAddr(a + bits)
			if bits == "/128" && err == nil {
				addr.Flags |= unix.IFA_F_NODAD // usable at once, no duplicate detection wait
			}
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, syscall.EEXIST) {
				return fmt.Errorf("add %s to lo: %w", a, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("netns %s: %v", netns.Path(), err)
	}
}

// MountBPFFS mounts a private bpffs on a temporary directory and unmounts it
// when the test ends, so pins never outlive the test or meet another test's.
func MountBPFFS(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	var u topo.Undo
	dir, err := topo.MountBPFFS(&u, "ctlb-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := u.UnwindErr(); err != nil {
			t.Errorf("bpffs %s: %v", dir, err)
		}
	})
	return dir
}

// V2Mount returns the cgroup v2 mount, failing the test when there is none.
func V2Mount(t testing.TB) string {
	t.Helper()
	m, err := cgroupv2.Mountpoint()
	Require(t, err == nil, fmt.Sprintf("cgroup v2: %v", err))
	return m
}

// NewCgroup creates a fresh cgroup under the v2 mount (inside parent, a path
// relative to the mount, when given) and removes it, and anything created
// below it, when the test ends.
func NewCgroup(t testing.TB, parent string) string {
	t.Helper()
	RequireRoot(t)
	base := filepath.Join(V2Mount(t), parent)
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatalf("mkdir %s: %v", base, err)
	}
	dir, err := os.MkdirTemp(base, "ctlb-test-")
	if err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() { RemoveCgroup(t, dir) })
	return dir
}

// RemoveCgroup kills what still runs in the cgroup tree at dir and removes it
// deepest first, since rmdir refuses a cgroup with children or tasks.
func RemoveCgroup(t testing.TB, dir string) {
	t.Helper()
	if err := RemoveCgroupTree(dir); err != nil {
		t.Error(err)
	}
}

// RemoveCgroupTree is RemoveCgroup without a testing.TB (topo's, which
// the benchmark program uses too).
func RemoveCgroupTree(dir string) error { return topo.RemoveCgroup(dir) }

// OpenDir opens a directory for use as a cgroup fd (CLONE_INTO_CGROUP).
func OpenDir(t testing.TB, dir string) *os.File {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// LockThread pins the goroutine to its OS thread for the test, as namespace
// switching needs.
func LockThread(t testing.TB) {
	runtime.LockOSThread()
	t.Cleanup(runtime.UnlockOSThread)
}

// Veth joins two of the test's namespaces with a veth pair, both ends up,
// with addrA (e.g. "198.18.61.1/30") on nameA in a and addrB on nameB in b
// (topo.Veth and topo.AddAddr, which the benchmark uses too).
func Veth(t testing.TB, a ns.NetNS, nameA, addrA string, b ns.NetNS, nameB, addrB string) {
	t.Helper()
	if err := topo.Veth(a, nameA, b, nameB); err != nil {
		t.Fatal(err)
	}
	for _, end := range []struct {
		n          ns.NetNS
		link, addr string
	}{{a, nameA, addrA}, {b, nameB, addrB}} {
		p, err := netip.ParsePrefix(end.addr)
		if err != nil {
			t.Fatalf("veth %s: %v", end.link, err)
		}
		if err := topo.AddAddr(end.n, end.link, p); err != nil {
			t.Fatal(err)
		}
	}
}
