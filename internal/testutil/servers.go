package testutil

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Server is a TCP test server that names itself: every accepted connection
// reads "ADDR\n" (its listening address) and stays open until the client
// closes it, so tests see which server a connection landed on and can hold
// connections open.
type Server struct {
	Addr string
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]bool
	// Accepted counts connections accepted so far.
	accepted int
}

// StartServers listens on each addr ("IP:PORT") inside netns and stops the
// servers when the test ends.
func StartServers(t testing.TB, netns ns.NetNS, addrs ...string) []*Server {
	t.Helper()
	var out []*Server
	for _, a := range addrs {
		var ln net.Listener
		err := netns.Do(func(ns.NetNS) error {
			var err error
			ln, err = net.Listen(tcpNet(a), a)
			return err
		})
		if err != nil {
			t.Fatalf("listen %s: %v", a, err)
		}
		s := &Server{Addr: a, ln: ln, open: map[net.Conn]bool{}}
		s.wg.Add(1)
		go s.serve()
		t.Cleanup(s.Close)
		out = append(out, s)
	}
	return out
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.open[c] = true
		s.accepted++
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
				c.Close()
			}()
			if _, err := io.WriteString(c, s.Addr+"\n"); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c)
		}()
	}
}

// Accepted is the number of connections the server accepted.
func (s *Server) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Close stops listening and closes open connections, as a dying server would.
func (s *Server) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// ReadName reads the server's self-introduction from a fresh connection.
func ReadName(c net.Conn) (string, error) {
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	if len(line) < 2 {
		return "", errors.New("short server name")
	}
	return line[:len(line)-1], nil
}

// StartUDPEcho answers each datagram on addr with the server's own address.
func StartUDPEcho(t testing.TB, netns ns.NetNS, addr string) {
	t.Helper()
	var pc net.PacketConn
	err := netns.Do(func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket(udpNet(addr), addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen udp %s: %v", addr, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(addr), from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
}

// tcpNet and udpNet pick the family of an "IP:PORT" or "[IPv6]:PORT".
func tcpNet(addr string) string {
	if strings.HasPrefix(addr, "[") {
		return "tcp6"
	}
	return "tcp4"
}

func udpNet(addr string) string {
	if strings.HasPrefix(addr, "[") {
		return "udp6"
	}
	return "udp4"
}
