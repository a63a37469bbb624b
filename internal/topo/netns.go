package topo

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetNSDir is where named network namespaces are bind-mounted, as by
// `ip netns add`, so that `ip netns` and nsenter see the benchmark's too.
const NetNSDir = "/run/netns"

// NewNetNS creates a named network namespace with lo up. Nothing in it routes
// anywhere until the caller adds links: its traffic stays on this machine.
func NewNetNS(u *Undo, name string) (ns.NetNS, error) {
	if err := os.MkdirAll(NetNSDir, 0o755); err != nil {
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	path := filepath.Join(NetNSDir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("netns %s: create mount point: %w", name, err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		if err != nil {
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		err = unix.Mount(self, path, "none", unix.MS_BIND, "")
		// Back to where the thread came from before anything else can
		// see it in the new namespace (a scan of /proc for the netns's
		// processes must find none). A thread that cannot go back stays
		// locked, and the runtime discards it when this goroutine ends.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		if err != nil {
			errc <- fmt.Errorf("bind mount %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	n, err := ns.GetNS(path)
	if err != nil {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		os.Remove(path)
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	u.Push("netns "+name, func() error {
		n.Close()
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w", path, err)
		}
		return os.Remove(path)
	})
	if err := LinkUp(n, "lo"); err != nil {
		return nil, err
	}
	return n, nil
}

// RemoveStaleNetNS removes named namespaces whose name starts with prefix,
// left by a benchmark that was killed (SIGKILL leaves no time to clean up).
func RemoveStaleNetNS(prefix string) {
	entries, _ := os.ReadDir(NetNSDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			p := filepath.Join(NetNSDir, e.Name())
			_ = unix.Unmount(p, unix.MNT_DETACH)
			_ = os.Remove(p)
		}
	}
}

// handle opens a netlink handle bound to a namespace, so no thread has to
// switch namespaces to configure it.
func handle(n ns.NetNS) (*netlink.Handle, error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(n.Fd())))
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", n.Path(), err)
	}
	return h, nil
}

// LinkUp sets a link of the namespace up.
func LinkUp(n ns.NetNS, name string) error {
	h, err := handle(n)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("%s in %s: %w", name, n.Path(), err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("%s in %s: up: %w", name, n.Path(), err)
	}
	return nil
}

// Veth joins two namespaces with a veth pair, nameA in a and nameB in b,
// both up. Deleting a namespace deletes its end and so the pair.
func Veth(a ns.NetNS, nameA string, b ns.NetNS, nameB string) error {
	h, err := handle(a)
	if err != nil {
		return err
	}
	defer h.Close()
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nameA},
		PeerName:      nameB,
		PeerNamespace: netlink.NsFd(int(b.Fd())),
	}
	if err := h.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s/%s: %w", nameA, nameB, err)
	}
	if err := LinkUp(a, nameA); err != nil {
		return err
	}
	return LinkUp(b, nameB)
}

// The ranges a test may use: the benchmarking ranges (RFC 2544, RFC 5180)
// and loopback.
var allowed = []netip.Prefix{
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("2001:2::/48"),
	netip.MustParsePrefix("::1/128"),
}

// checkAddr keeps the benchmark inside the ranges a test may use.
func checkAddr(a netip.Addr) error {
	for _, p := range allowed {
		if p.Contains(a) {
			return nil
		}
	}
	return fmt.Errorf("address %s is outside 198.18.0.0/15, 127.0.0.0/8, 2001:2::/48 and ::1", a)
}

// AddAddr puts prefix (e.g. 198.18.1.1/24, or a VIP as /32) on a link. An
// IPv6 address skips duplicate address detection (IFA_F_NODAD): it is
// usable at once, not a second later, and the namespaces here hold no
// other host that could have it.
func AddAddr(n ns.NetNS, link string, prefix netip.Prefix) error {
	if err := checkAddr(prefix.Addr()); err != nil {
		return err
	}
	h, err := handle(n)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("%s in %s: %w", link, n.Path(), err)
	}
	addr, err := netlink.ParseAddr(prefix.String())
	if err != nil {
		return err
	}
	if prefix.Addr().Is6() {
		addr.Flags |= unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(l, addr); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add %s to %s in %s: %w", prefix, link, n.Path(), err)
	}
	return nil
}

// DefaultRoute routes everything the namespace does not know via gw.
func DefaultRoute(n ns.NetNS, gw netip.Addr) error {
	if err := checkAddr(gw); err != nil {
		return err
	}
	h, err := handle(n)
	if err != nil {
		return err
	}
	defer h.Close()
	r := &netlink.Route{Gw: gw.AsSlice()}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("default route via %s in %s: %w", gw, n.Path(), err)
	}
	return nil
}

// Sysctl writes a /proc/sys/net value inside the namespace (those files
// belong to the network namespace of the thread that opens them).
func Sysctl(n ns.NetNS, key, value string) error {
	p := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	err := n.Do(func(ns.NetNS) error { return os.WriteFile(p, []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, n.Path(), err)
	}
	return nil
}
