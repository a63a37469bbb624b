package vip

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ctlb/ctlb/internal/testutil"
)

func open(t *testing.T, name string, netns ns.NetNS) *Device {
	t.Helper()
	d, err := Open(name, netns.Path())
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func list(t *testing.T, d *Device) []netip.Addr {
	t.Helper()
	got, err := d.List()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(got, netip.Addr.Compare)
	return got
}

// linkIn returns the link and its IPv4 addresses as the kernel reports them.
func linkIn(t *testing.T, netns ns.NetNS, name string) (netlink.Link, []netlink.Addr) {
	t.Helper()
	var (
		l     netlink.Link
		addrs []netlink.Addr
	)
	err := netns.Do(func(ns.NetNS) error {
		var err error
		if l, err = netlink.LinkByName(name); err != nil {
			return err
		}
		addrs, err = netlink.AddrList(l, netlink.FAMILY_V4)
		return err
	})
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	return l, addrs
}

func TestBridgeCreatedAndSynced(t *testing.T) {
	netns := testutil.NewNetNS(t)
	d := open(t, DefaultDevice, netns)
	l, _ := linkIn(t, netns, DefaultDevice)
	if l.Type() != "bridge" {
		t.Fatalf("%s is a %s, want a bridge", DefaultDevice, l.Type())
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("%s is not up", DefaultDevice)
	}

	a := netip.MustParseAddr("198.18.100.1")
	b := netip.MustParseAddr("198.18.100.2")
	c := netip.MustParseAddr("198.18.100.3")
	for range 2 { // twice: Add is idempotent
		if err := d.Add(a); err != nil {
			t.Fatal(err)
		}
	}
	if got := list(t, d); !slices.Equal(got, []netip.Addr{a}) {
		t.Fatalf("after Add: %v, want [%s]", got, a)
	}

	// An address someone else put on the same device is not ours to remove.
	err := netns.Do(func(ns.NetNS) error {
		return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("198.18.101.1"), Mask: net.CIDRMask(32, 32)}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Sync([]netip.Addr{b, c}); err != nil {
		t.Fatal(err)
	}
	if got := list(t, d); !slices.Equal(got, []netip.Addr{b, c}) {
		t.Fatalf("after Sync: %v, want [%s %s]", got, b, c)
	}
	_, addrs := linkIn(t, netns, DefaultDevice)
	var all []string
	for _, x := range addrs {
		all = append(all, x.IPNet.String())
	}
	slices.Sort(all)
	want := []string{"198.18.100.2/32", "198.18.100.3/32", "198.18.101.1/32"}
	if !slices.Equal(all, want) {
		t.Fatalf("addresses on %s = %v, want %v", DefaultDevice, all, want)
	}

	for range 2 { // twice: Remove is idempotent
		if err := d.Remove(b); err != nil {
			t.Fatal(err)
		}
	}
	if got := list(t, d); !slices.Equal(got, []netip.Addr{c}) {
		t.Fatalf("after Remove: %v, want [%s]", got, c)
	}

	// Opening again finds the bridge and what it holds.
	d2 := open(t, DefaultDevice, netns)
	if got := list(t, d2); !slices.Equal(got, []netip.Addr{c}) {
		t.Fatalf("reopened: %v, want [%s]", got, c)
	}
}

// On lo the VIP is local at once: a socket can bind it and be reached.
func TestLoopbackVIPIsLocal(t *testing.T) {
	netns := testutil.NewNetNS(t)
	d := open(t, "lo", netns)
	v := netip.MustParseAddr("198.18.100.7")
	if err := d.Add(v); err != nil {
		t.Fatal(err)
	}
	err := netns.Do(func(ns.NetNS) error {
		l, err := net.Listen("tcp4", netip.AddrPortFrom(v, 0).String())
		if err != nil {
			return err
		}
		defer l.Close()
		c, err := net.Dial("tcp4", l.Addr().String())
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("VIP %s on lo not usable: %v", v, err)
	}
	// 127.0.0.1/8 is lo's own, not a labelled VIP.
	if got := list(t, d); !slices.Equal(got, []netip.Addr{v}) {
		t.Fatalf("VIPs on lo = %v, want [%s]", got, v)
	}
}

func TestRejectsBadInput(t *testing.T) {
	for _, name := range []string{"", "much-too-long0", "a/b", "a b", "x:y", ".."} {
		if err := ValidDeviceName(name); err == nil {
			t.Errorf("ValidDeviceName(%q) accepted", name)
		}
	}
	if err := ValidDeviceName("ctlb0"); err != nil {
		t.Errorf("ValidDeviceName(ctlb0): %v", err)
	}
	netns := testutil.NewNetNS(t)
	d := open(t, "lo", netns)
	if err := d.Add(netip.MustParseAddr("2001:db8::1")); err == nil {
		t.Error("Add accepted an IPv6 VIP")
	}
}
