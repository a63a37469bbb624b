// Package sockmaprelay is the benchmark's measure of kernel-side byte
// forwarding, issue 18's SOCKMAP lever: a round-robin relay like the seed
// proxy, except that each pair's two sockets go into a sockhash with an
// sk_skb verdict program attached, which sends every segment one socket
// receives out of the other (bpf_sk_redirect_hash to egress), so that the
// bytes of an established pair never enter user space.
//
// It is not ctlb's proxy and not a correct one: it exists to put the lever
// side by side with ctlb's splice relay and HAProxy in one run. Bytes a
// socket queued before the pair entered the maps (a client's first request,
// the server's first bytes) are moved once through user space, which may
// overtake bytes the verdict forwards meanwhile; ctlb's proxy would have to
// order that hand-over, pass half-closes on and count bytes before it could
// forward in the kernel.
package sockmaprelay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

const dialTimeout = 2 * time.Second

// Relay forwards connections to servers in turn, in the kernel.
//
// It keeps its sockets away from Go's poller: a socket the poller watches
// for input is woken on every segment the verdict takes (the socket's
// data-ready callback still runs), and so would the poller's thread be.
// Accepts and dials block instead, and one epoll instance of the relay's own
// watches each forwarded socket for its peer's end of stream (EPOLLRDHUP
// alone, which the segments' wake-ups, flagged EPOLLIN, do not match).
type Relay struct {
	objs forwardObjects
	att  link.Link // nil when attached without a link (kernels before 6.10)
	epfd int
	// wake is an eventfd in epfd under wakeID: Close writes it to stop
	// the watcher, which closes watched when it returns.
	wake    int
	watched chan struct{}
	// accepting counts Serve's accept loops, which Close wakes by shutting
	// their listeners down (closing a descriptor does not wake a blocked
	// accept).
	accepting sync.WaitGroup

	mu     sync.Mutex
	closed bool
	lns    []*os.File
	pairs  map[uint64][2]int // by pair ID, the ID its epoll events carry
	nextID uint64

	// Kernel counts pairs forwarded in the kernel, from when their
	// sockets are in the maps and watched; User those the maps refused,
	// which fall back to a copy through user space. Drained counts the
	// bytes that sockets of forwarded pairs had queued before they
	// entered the maps, moved through user space.
	Kernel, User, Drained atomic.Uint64
}

// wakeID is the epoll event ID of the relay's eventfd; pair IDs count up
// from 0 and never reach it.
const wakeID = ^uint64(0)

// Load loads the verdict program and attaches it to the sources map.
func Load() (r *Relay, err error) {
	r = &Relay{pairs: map[uint64][2]int{}, epfd: -1, wake: -1, watched: make(chan struct{})}
	if err := loadForwardObjects(&r.objs, nil); err != nil {
		return nil, fmt.Errorf("load sockmap relay: %w", err)
	}
	defer func() {
		if err != nil {
			unix.Close(r.wake)
			unix.Close(r.epfd)
			r.objs.Close()
		}
	}()
	if r.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	if r.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: -1, Pad: -1} // wakeID: every bit set
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, r.wake, &ev); err != nil {
		return nil, fmt.Errorf("epoll eventfd: %w", err)
	}
	if l, err := link.AttachRawLink(link.RawLinkOptions{Target: r.objs.Sources.FD(), Program: r.objs.Forward, Attach: ebpf.AttachSkSKBVerdict}); err == nil {
		r.att = l
	} else if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: r.objs.Sources.FD(), Program: r.objs.Forward, Attach: ebpf.AttachSkSKBVerdict}); err != nil {
		// sockmap links came with 6.10; the old way before them.
		return nil, fmt.Errorf("attach sk_skb verdict: %w", err)
	}
	go r.watch()
	return r, nil
}

// Close stops accepting, waits for the accept loops, the connections they
// were handing over and the watcher to return, ends every pair in the maps
// and detaches the program. Pairs that fell back to user space end with
// their peers.
func (r *Relay) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	for _, ln := range r.lns {
		_ = unix.Shutdown(int(ln.Fd()), unix.SHUT_RD)
	}
	r.mu.Unlock()
	r.accepting.Wait()
	var errs []error
	if _, err := unix.Write(r.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		errs = append(errs, fmt.Errorf("wake the watcher: %w", err))
	} else {
		<-r.watched
	}
	r.mu.Lock()
	for _, ln := range r.lns {
		ln.Close()
	}
	r.lns = nil
	ids := make([]uint64, 0, len(r.pairs))
	for id := range r.pairs {
		ids = append(ids, id)
	}
	r.mu.Unlock()
	for _, id := range ids {
		r.end(id)
	}
	unix.Close(r.wake)
	unix.Close(r.epfd)
	if r.att != nil {
		errs = append(errs, r.att.Close())
	} else {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{Target: r.objs.Sources.FD(), Program: r.objs.Forward, Attach: ebpf.AttachSkSKBVerdict}))
	}
	errs = append(errs, r.objs.Close())
	return errors.Join(errs...)
}

// Serve relays ln's connections to servers ("IP:PORT"), in turn.
func (r *Relay) Serve(ln *net.TCPListener, servers []string) error {
	targets := make([]netip.AddrPort, len(servers))
	for i, s := range servers {
		t, err := netip.ParseAddrPort(s)
		if err != nil {
			return fmt.Errorf("server: %w", err)
		}
		targets[i] = t
	}
	f, err := ln.File() // a blocking duplicate, away from Go's poller
	if err != nil {
		return err
	}
	ln.Close()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		f.Close()
		return errors.New("relay closed")
	}
	r.lns = append(r.lns, f)
	r.accepting.Add(1)
	r.mu.Unlock()
	lfd := int(f.Fd())
	go func() {
		defer r.accepting.Done()
		for next := 0; ; next++ {
			c, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			if err != nil {
				return
			}
			r.accepting.Add(1)
			go func() { defer r.accepting.Done(); r.handle(c, targets[next%len(targets)]) }()
		}
	}()
	return nil
}

func (r *Relay) handle(client int, server netip.AddrPort) {
	up, err := dial(server)
	if err != nil {
		unix.Close(client)
		return
	}
	if err := r.pair(client, up); err != nil {
		r.User.Add(1)
		var once sync.Once
		closeBoth := func() { once.Do(func() { unix.Close(client); unix.Close(up) }) }
		go func() { move(client, up, 0); closeBoth() }()
		go func() { move(up, client, 0); closeBoth() }()
		return
	}
	// Bytes queued before the pair entered sources wait for the next
	// segment's verdict, which may never come (a request waiting for its
	// reply): move them now.
	r.Drained.Add(move(client, up, unix.MSG_DONTWAIT) + move(up, client, unix.MSG_DONTWAIT))
	// Registered under the lock, so that Close sees every pair whole or
	// none of it.
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		unix.Close(client)
		unix.Close(up)
		return
	}
	id := r.nextID
	r.nextID++
	for _, fd := range []int{client, up} {
		ev := unix.EpollEvent{Events: unix.EPOLLRDHUP, Fd: int32(id), Pad: int32(id >> 32)}
		if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			unix.Close(client)
			unix.Close(up)
			return
		}
	}
	r.pairs[id] = [2]int{client, up}
	r.Kernel.Add(1)
}

// watch ends a pair when either side's peer ends its stream or fails, until
// Close wakes it.
func (r *Relay) watch() {
	defer close(r.watched)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(r.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if id == wakeID {
				return
			}
			r.end(id)
		}
	}
}

func (r *Relay) end(id uint64) {
	r.mu.Lock()
	p, ok := r.pairs[id]
	delete(r.pairs, id)
	r.mu.Unlock()
	if ok {
		unix.Close(p[0])
		unix.Close(p[1])
	}
}

// pair puts both sockets into peers, each under the other's cookie, then
// into sources, where the verdict starts forwarding what they receive.
func (r *Relay) pair(a, b int) error {
	ca, err := unix.GetsockoptUint64(a, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return err
	}
	cb, err := unix.GetsockoptUint64(b, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return err
	}
	for _, u := range []struct {
		m       *ebpf.Map
		key, fd uint64
	}{{r.objs.Peers, ca, uint64(b)}, {r.objs.Peers, cb, uint64(a)}, {r.objs.Sources, ca, uint64(a)}, {r.objs.Sources, cb, uint64(b)}} {
		if err := u.m.Update(u.key, u.fd, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("sockhash update: %w", err)
		}
	}
	return nil
}

// dial connects a blocking socket to t.
func dial(t netip.AddrPort) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.NsecToTimeval(dialTimeout.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(t.Port()), Addr: t.Addr().As4()}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	var zero unix.Timeval
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &zero)
	return fd, nil
}

// move copies src to dst until src has nothing more (its end of stream, an
// error, or with MSG_DONTWAIT nothing queued now) or dst fails, and says how
// many bytes it moved.
func move(src, dst, flags int) uint64 {
	buf := make([]byte, 64<<10)
	var moved uint64
	for {
		n, _, err := unix.Recvfrom(src, buf, flags)
		if n <= 0 || err != nil {
			return moved
		}
		if _, err := unix.Write(dst, buf[:n]); err != nil {
			return moved
		}
		moved += uint64(n)
	}
}
