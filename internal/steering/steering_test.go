package steering

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
)

const testVIP = "198.18.100.1"

// dialIn connects to addr from inside netns.
func dialIn(netns ns.NetNS, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", addr.String(), 5*time.Second)
		return err
	})
	return c, err
}

func listenIn(t *testing.T, netns ns.NetNS, addr string) *net.TCPListener {
	t.Helper()
	var l net.Listener
	var lc net.ListenConfig
	lc.SetMultipathTCP(false) // a SOCKMAP takes plain TCP only
	err := netns.Do(func(ns.NetNS) error {
		var err error
		l, err = lc.Listen(t.Context(), "tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

func attach(t *testing.T, netns ns.NetNS) *Steering {
	t.Helper()
	s, err := Attach(netns.Path())
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

// acceptedDest accepts one connection and returns the local address it
// arrived on: the destination the client dialed.
func acceptedDest(t *testing.T, l *net.TCPListener) netip.AddrPort {
	t.Helper()
	if err := l.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.TCPAddr).AddrPort()
}

func TestSteersEveryDestinationToOneSocket(t *testing.T) {
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, testVIP)
	s := attach(t, netns)
	l := listenIn(t, netns, "127.0.0.1:0")
	if err := s.SetSocket(l); err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(testVIP)
	dests := []netip.AddrPort{netip.AddrPortFrom(vip, 8500), netip.AddrPortFrom(vip, 8502)}
	for _, d := range dests {
		if err := s.Add(d); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Add(dests[0]); err != nil {
		t.Fatalf("adding twice: %v", err)
	}
	got, err := s.Destinations()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(got, netip.AddrPort.Compare)
	if !slices.Equal(got, dests) {
		t.Fatalf("destinations = %v, want %v", got, dests)
	}

	for _, d := range dests {
		c, err := dialIn(netns, d)
		if err != nil {
			t.Fatalf("dial %s: %v", d, err)
		}
		if got := acceptedDest(t, l); got != d {
			t.Errorf("accepted on %s, want the dialed %s", got, d)
		}
		c.Close()
	}

	// A port of the VIP that is not steered, and the same port on another
	// local address, meet the normal lookup: nothing listens there.
	for _, d := range []netip.AddrPort{
		netip.AddrPortFrom(vip, 9999),
		netip.MustParseAddrPort("127.0.0.1:8500"),
	} {
		if c, err := dialIn(netns, d); !errors.Is(err, syscall.ECONNREFUSED) {
			if c != nil {
				c.Close()
			}
			t.Errorf("dial unsteered %s: err %v, want connection refused", d, err)
		}
	}

	if err := s.Remove(dests[1]); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(dests[1]); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	if _, err := dialIn(netns, dests[1]); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial removed %s: err %v, want connection refused", dests[1], err)
	}
	c, err := dialIn(netns, dests[0])
	if err != nil {
		t.Fatalf("dial %s after removing another: %v", dests[0], err)
	}
	c.Close()
	if got := acceptedDest(t, l); got != dests[0] {
		t.Errorf("accepted on %s, want %s", got, dests[0])
	}
}

// A closed socket leaves the SOCKMAP by itself: clients are refused at once
// rather than steered into nothing; and after Close no program steers.
func TestClosedSocketAndDetach(t *testing.T) {
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, testVIP)
	s := attach(t, netns)
	d := netip.AddrPortFrom(netip.MustParseAddr(testVIP), 8502)
	if err := s.Add(d); err != nil {
		t.Fatal(err)
	}
	l := listenIn(t, netns, "127.0.0.1:0")
	if err := s.SetSocket(l); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := dialIn(netns, d); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial with the socket closed: err %v, want connection refused", err)
	}

	l2 := listenIn(t, netns, "127.0.0.1:0")
	if err := s.SetSocket(l2); err != nil {
		t.Fatal(err)
	}
	c, err := dialIn(netns, d)
	if err != nil {
		t.Fatalf("dial with a new socket: %v", err)
	}
	c.Close()
	if got := acceptedDest(t, l2); got != d {
		t.Errorf("accepted on %s, want %s", got, d)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := dialIn(netns, d); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial after detach: err %v, want connection refused", err)
	}
}

func TestRejectsBadDestination(t *testing.T) {
	for _, d := range []netip.AddrPort{
		netip.MustParseAddrPort("[2001:db8::1]:80"),
		netip.MustParseAddrPort("198.18.100.1:0"),
		{},
	} {
		if _, err := destKey(d); err == nil {
			t.Errorf("destKey(%v) accepted", d)
		}
	}
	k, err := destKey(netip.MustParseAddrPort("198.18.100.1:8502"))
	if err != nil {
		t.Fatal(err)
	}
	// The kernel's local_ip4 keeps network byte order in memory.
	if k.Port != 8502 || k.Addr != 0x016412c6 {
		t.Errorf("destKey = %#x:%d, want 0x016412c6:8502", k.Addr, k.Port)
	}
}

// Go listens with MPTCP by default; a SOCKMAP refuses it, and SetSocket
// says why instead of "operation not supported".
func TestRefusesMPTCPSocket(t *testing.T) {
	netns := testutil.NewNetNS(t)
	s := attach(t, netns)
	var l net.Listener
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(true)
	err := netns.Do(func(ns.NetNS) error {
		var err error
		l, err = lc.Listen(t.Context(), "tcp4", "127.0.0.1:0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = s.SetSocket(l.(*net.TCPListener))
	if err == nil || !strings.Contains(err.Error(), "not plain TCP") {
		t.Fatalf("SetSocket(MPTCP listener) = %v, want a 'not plain TCP' error", err)
	}
}
