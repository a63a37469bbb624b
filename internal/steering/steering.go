// Package steering loads the fallback proxy's sk_lookup program into a
// network namespace: new TCP connections to steered destinations (VIP:port)
// go to one listening socket, whatever it is bound to, so the proxy serves
// any number of ports with a single socket and adds a port with one map
// update.
//
// Nothing here is pinned, on purpose: the program only ever hands
// connections to the proxy's own socket, which dies with the daemon. When the
// daemon exits the link closes, the program goes away, and connections to
// the VIPs meet the normal socket lookup again (refused at once, or served by
// the connect4 path before they get here). A pinned program outliving the
// daemon would steer to an empty SOCKMAP and gain nothing.
package steering

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// socketSlot is the SOCKMAP index of the proxy's socket (the only one).
const socketSlot uint32 = 0

// Steering is the sk_lookup program attached to one network namespace, with
// its maps. Safe for concurrent use.
type Steering struct {
	mu    sync.Mutex
	objs  steerObjects
	link  link.Link
	netns string
}

// Attach loads the program and attaches it to the network namespace at
// netnsPath ("" means the calling process's). It steers nothing until a
// socket is set and destinations are added.
func Attach(netnsPath string) (*Steering, error) {
	if netnsPath == "" {
		netnsPath = "/proc/self/ns/net"
	}
	s := &Steering{netns: netnsPath}
	if err := loadSteerObjects(&s.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load sk_lookup program: %+v", verr)
		}
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		s.objs.Close()
		return nil, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer f.Close()
	l, err := link.AttachNetNs(int(f.Fd()), s.objs.SteerLookup)
	if err != nil {
		s.objs.Close()
		return nil, fmt.Errorf("attach sk_lookup to netns %s: %w", netnsPath, err)
	}
	s.link = l
	return s, nil
}

// SetSocket makes the listening TCP socket c the target of every steered
// destination, replacing any previous one. It must be plain TCP: Go listens
// with MPTCP by default, which a SOCKMAP refuses, so create it with
// net.ListenConfig.SetMultipathTCP(false).
func (s *Steering) SetSocket(c syscall.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("steering socket: %w", err)
	}
	var uerr error
	err = raw.Control(func(fd uintptr) {
		proto, perr := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if perr == nil && proto != unix.IPPROTO_TCP {
			uerr = fmt.Errorf("socket protocol %d is not plain TCP (MPTCP? listen with SetMultipathTCP(false))", proto)
			return
		}
		uerr = s.objs.SteerSocketV1.Update(socketSlot, uint64(fd), ebpf.UpdateAny)
	})
	if err == nil {
		err = uerr
	}
	if err != nil {
		return fmt.Errorf("put listening socket in SOCKMAP (netns %s): %w", s.netns, err)
	}
	return nil
}

// Add steers new connections to dst (an IPv4 VIP:port) to the socket.
// Adding a destination that is already steered is not an error.
func (s *Steering) Add(dst netip.AddrPort) error {
	key, err := destKey(dst)
	if err != nil {
		return err
	}
	if err := s.objs.SteerDestsV1.Update(key, socketSlot, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("steer %s: %w", dst, err)
	}
	return nil
}

// Remove stops steering dst. Connections already accepted are not touched.
// Removing a destination that is not steered is not an error.
func (s *Steering) Remove(dst netip.AddrPort) error {
	key, err := destKey(dst)
	if err != nil {
		return err
	}
	if err := s.objs.SteerDestsV1.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("stop steering %s: %w", dst, err)
	}
	return nil
}

// Destinations lists the steered destinations.
func (s *Steering) Destinations() ([]netip.AddrPort, error) {
	var (
		key  steerDestKey
		slot uint32
		out  []netip.AddrPort
	)
	it := s.objs.SteerDestsV1.Iterate()
	for it.Next(&key, &slot) {
		var a [4]byte
		binary.NativeEndian.PutUint32(a[:], key.Addr)
		out = append(out, netip.AddrPortFrom(netip.AddrFrom4(a), key.Port))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list steered destinations: %w", err)
	}
	return out, nil
}

// Close detaches the program and frees its maps. Idempotent.
func (s *Steering) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var err error
	if s.link != nil {
		if cerr := s.link.Close(); cerr != nil {
			err = fmt.Errorf("detach sk_lookup from netns %s: %w", s.netns, cerr)
		}
		s.link = nil
		s.objs.Close()
	}
	return err
}

// destKey builds the map key; the address keeps network byte order in
// memory, as the kernel's local_ip4 does.
func destKey(dst netip.AddrPort) (steerDestKey, error) {
	a := dst.Addr().Unmap()
	if !a.Is4() || dst.Port() == 0 {
		return steerDestKey{}, fmt.Errorf("steer destination %q: want an IPv4 address and a non-zero port", dst)
	}
	b := a.As4()
	return steerDestKey{Addr: binary.NativeEndian.Uint32(b[:]), Port: dst.Port()}, nil
}
