package proxy

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Both sockets of a proxied connection have Nagle's algorithm off, as
// HAProxy's and Envoy's do: the client's (inherited from the listener)
// and the server's (set before the dial). The proxy runs in this process,
// so its sockets are among this process's descriptors; each is told apart
// by its addresses.
func TestNagleOffOnBothSides(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			e.startServers(t, 7000)
			c, err := dialIn(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			server, err := testutil.ReadName(c) // the pair is connected
			if err != nil {
				t.Fatal(err)
			}
			clientSide := netip.MustParseAddrPort(c.LocalAddr().String())
			serverSide := netip.MustParseAddrPort(server)

			found := map[string]int{}
			for _, fd := range socketFDs(t) {
				lsa, lerr := unix.Getsockname(fd)
				psa, perr := unix.Getpeername(fd)
				local, lok := inet4AddrPort(lsa)
				peer, pok := inet4AddrPort(psa)
				if lerr != nil || perr != nil || !lok || !pok {
					continue
				}
				var side string
				switch {
				case local == vipPort(portA) && peer == clientSide:
					side = "client side"
				case peer == serverSide && local != clientSide:
					side = "server side"
				default:
					continue
				}
				v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
				if err != nil {
					t.Fatalf("%s socket %d: TCP_NODELAY: %v", side, fd, err)
				}
				found[side] = v
			}
			for _, side := range []string{"client side", "server side"} {
				v, ok := found[side]
				if !ok {
					t.Fatalf("the proxy's %s socket of %s -> %s is not among this process's (found %v)", side, clientSide, serverSide, found)
				}
				if v == 0 {
					t.Errorf("the proxy's %s socket has TCP_NODELAY off", side)
				}
			}
		})
	}
}

// socketFDs lists this process's socket descriptors.
func socketFDs(t *testing.T) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd)); err == nil && strings.HasPrefix(l, "socket:") {
			fds = append(fds, fd)
		}
	}
	return fds
}
