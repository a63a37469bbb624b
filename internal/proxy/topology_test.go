package proxy

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	tu "github.com/ctlb/ctlb/internal/testutil"
)

// listeningSockets reads the TCP socket table of netns and returns its
// listening sockets: local address -> inode (which names the socket).
func listeningSockets(t *testing.T, netns ns.NetNS) map[netip.AddrPort]string {
	t.Helper()
	out := map[netip.AddrPort]string{}
	err := netns.Do(func(ns.NetNS) error {
		// thread-self: /proc/self/net shows the main thread's namespace.
		f, err := os.Open("/proc/thread-self/net/tcp")
		if err != nil {
			return err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || fs[3] != "0A" { // 0A: LISTEN
				continue
			}
			ip, port, ok := strings.Cut(fs[1], ":")
			if !ok {
				return fmt.Errorf("bad line %q", sc.Text())
			}
			raw, err := hex.DecodeString(ip)
			if err != nil || len(raw) != 4 {
				return fmt.Errorf("bad address in %q", sc.Text())
			}
			// The kernel prints the address as a host-order number.
			var a [4]byte
			binary.LittleEndian.PutUint32(a[:], binary.BigEndian.Uint32(raw))
			p, err := strconv.ParseUint(port, 16, 16)
			if err != nil {
				return err
			}
			out[netip.AddrPortFrom(netip.AddrFrom4(a), uint16(p))] = fs[9]
		}
		return sc.Err()
	})
	if err != nil {
		t.Fatalf("socket table: %v", err)
	}
	return out
}

// proxySockets drops the test servers' sockets from the table.
func proxySockets(all map[netip.AddrPort]string) map[netip.AddrPort]string {
	out := map[netip.AddrPort]string{}
	for a, inode := range all {
		if !slices.Contains(serverAddrs, a.Addr().String()) {
			out[a] = inode
		}
	}
	return out
}

func sortedKeys(m map[netip.AddrPort]string) []netip.AddrPort {
	return slices.SortedFunc(maps.Keys(m), netip.AddrPort.Compare)
}

// In steering mode one socket serves every port, and a port added at run
// time uses the same socket; in listeners mode each port has its own.
func TestSocketTable(t *testing.T) {
	const portC = 8600
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			e.startServers(t, 7000)
			before := proxySockets(listeningSockets(t, e.node))
			listening := e.p.Listening()
			slices.SortFunc(listening, netip.AddrPort.Compare)
			if got := sortedKeys(before); !slices.Equal(got, listening) {
				t.Fatalf("socket table has proxy sockets %v, the proxy says %v", got, listening)
			}
			var want []netip.AddrPort
			if mode == ModeListeners {
				want = []netip.AddrPort{vipPort(portA), vipPort(portB)}
			} else {
				if len(before) != 1 {
					t.Fatalf("steering: %d listening sockets %v, want one", len(before), sortedKeys(before))
				}
				want = sortedKeys(before)
				if want[0].Addr() == netip.MustParseAddr(testVIP) {
					t.Fatalf("steering socket bound to the VIP: %v", want[0])
				}
			}
			if got := sortedKeys(before); !slices.Equal(got, want) {
				t.Fatalf("proxy sockets %v, want %v", got, want)
			}
			for _, port := range []int{portA, portB} {
				if _, err := nameVia(e.node, vipPort(port)); err != nil {
					t.Fatalf("port %d: %v", port, err)
				}
			}

			if err := e.p.SetServices([]Service{{VIP: testVIP, Ports: []int{portA, portB, portC}}}); err != nil {
				t.Fatal(err)
			}
			if _, err := nameVia(e.node, vipPort(portC)); err != nil {
				t.Fatalf("added port %d: %v", portC, err)
			}
			after := proxySockets(listeningSockets(t, e.node))
			if mode == ModeSteering {
				if !maps.Equal(after, before) {
					t.Fatalf("adding a port changed the sockets: %v, before %v", after, before)
				}
			} else if len(after) != 3 || after[vipPort(portC)] == "" {
				t.Fatalf("listeners after adding a port: %v", sortedKeys(after))
			}
		})
	}
}

// A pod namespace with no cgroup attachment, linked to the node by a veth,
// reaches the servers through the VIP, which the proxy put on a bridge of
// the node; the pod only has a default route to the node.
func TestPodReachesServersThroughLocalVIP(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, func(c *Config) { c.LocalVIP = LocalVIP{Enabled: true, Device: "ctlb0"} })
			e.startServers(t, 7000)
			pod := tu.NewNetNS(t)
			linkPod(t, e.node, pod)

			err := e.node.Do(func(ns.NetNS) error {
				br, err := netlink.LinkByName("ctlb0")
				if err != nil {
					return err
				}
				if br.Type() != "bridge" {
					return fmt.Errorf("ctlb0 is a %s", br.Type())
				}
				addrs, err := netlink.AddrList(br, netlink.FAMILY_V4)
				if err != nil {
					return err
				}
				if len(addrs) != 1 || addrs[0].IPNet.String() != testVIP+"/32" {
					return fmt.Errorf("ctlb0 holds %v, want %s/32", addrs, testVIP)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("node: %v", err)
			}

			for _, port := range []int{portA, portB} {
				got := map[string]int{}
				for range 2 * len(serverAddrs) {
					c, err := dialIn(pod, vipPort(port))
					if err != nil {
						t.Fatalf("pod to %s: %v", vipPort(port), err)
					}
					name, err := tu.ReadName(c)
					c.Close()
					if err != nil {
						t.Fatalf("pod via %s: %v", vipPort(port), err)
					}
					got[name]++
				}
				for _, a := range serverAddrs {
					if got[a+":7000"] != 2 {
						t.Errorf("pod via port %d: %v, want 2 connections on each server", port, got)
					}
				}
			}
		})
	}
}

// linkPod joins pod to node with a veth pair: node 198.18.1.1/24, pod
// 198.18.1.2/24 with its default route through the node.
func linkPod(t *testing.T, node, pod ns.NetNS) {
	t.Helper()
	err := node.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth-pod"}, PeerName: "eth0"}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		peer, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(peer, int(pod.Fd())); err != nil {
			return fmt.Errorf("move peer to pod: %w", err)
		}
		l, err := netlink.LinkByName("veth-pod")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, mustAddr("198.18.1.1/24")); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatalf("node side: %v", err)
	}
	err = pod.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, mustAddr("198.18.1.2/24")); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP("198.18.1.1")})
	})
	if err != nil {
		t.Fatalf("pod side: %v", err)
	}
	// The kernel turns the carrier on (and stops dropping packets) a
	// moment later, in its link watch; wait for it rather than for a
	// SYN retransmission.
	for _, side := range []struct {
		netns ns.NetNS
		name  string
	}{{node, "veth-pod"}, {pod, "eth0"}} {
		waitFor(t, side.name+" up", func() (bool, string) {
			var up bool
			var state string
			_ = side.netns.Do(func(ns.NetNS) error {
				l, err := netlink.LinkByName(side.name)
				up = err == nil && l.Attrs().OperState == netlink.OperUp
				if err == nil {
					state = l.Attrs().OperState.String()
				} else {
					state = err.Error()
				}
				return nil
			})
			return up, "state " + state
		})
	}
}

func mustAddr(s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		panic(err)
	}
	return a
}
