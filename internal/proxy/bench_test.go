package proxy

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	tu "github.com/ctlb/ctlb/internal/testutil"
)

// benchTarget sets up the proxy (or nothing, for "direct") in front of one
// test server and returns the address a client dials.
func benchTarget(b *testing.B, mode string) (*env, netip.AddrPort) {
	e := &env{node: tu.NewNetNS(b)}
	tu.AddLoopbackAddrs(b, e.node, serverAddrs[0], testVIP)
	tu.StartServers(b, e.node, serverAddrs[0]+":7000")
	e.setTargets(ap(serverAddrs[0], 7000))
	if mode == "direct" {
		return e, ap(serverAddrs[0], 7000)
	}
	p, err := New(Config{Mode: mode, Services: []Service{{VIP: testVIP, Ports: []int{portA}}}}, e.lookup, Options{
		NetNS:  e.node.Path(),
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return e, vipPort(portA)
}

// Bytes per second through one connection, client to server.
func BenchmarkThroughput(b *testing.B) {
	buf := make([]byte, 1<<20)
	for _, mode := range []string{"direct", ModeListeners, ModeSteering} {
		b.Run(mode, func(b *testing.B) {
			e, addr := benchTarget(b, mode)
			c, err := dialIn(e.node, addr)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			if _, err := tu.ReadName(c); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			if err := c.CloseWrite(); err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, c); err != nil { // the server's close
				b.Fatal(err)
			}
		})
	}
}

// New connections per second: connect, read the server's name, close.
func BenchmarkConnect(b *testing.B) {
	for _, mode := range []string{"direct", ModeListeners, ModeSteering} {
		b.Run(mode, func(b *testing.B) {
			e, addr := benchTarget(b, mode)
			for b.Loop() {
				if _, err := nameVia(e.node, addr); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
