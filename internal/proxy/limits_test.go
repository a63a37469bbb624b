package proxy

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	ctlbtestutil "github.com/ctlb/ctlb/internal/testutil"
)

// limitDeadline bounds the wait for the proxy to count a held connection.
const limitDeadline = 10 * time.Second

// TestConnectionCaps: past maxConnectionsPerService a VIP:port's next
// client is reset, other services still get through until maxConnections,
// and a freed slot is usable again. Each refusal is counted by reason.
func TestConnectionCaps(t *testing.T) {
	e := newEnv(t, ModeListeners, func(c *Config) {
		c.MaxConnections = 3
		c.MaxConnectionsPerService = 2
	})
	srv := startStreamServer(t, e.node, ap(serverAddrs[0], 7200))
	e.setTargets(srv.addr)
	a, b := vipPort(portA), vipPort(portB)

	// hold opens a connection the proxy keeps (the stream server waits for
	// the client's end), and waits until the proxy counts it open.
	var held []*net.TCPConn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	hold := func(addr netip.AddrPort, open float64) *net.TCPConn {
		t.Helper()
		c, err := dialIn(e.node, addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		if _, err := fmt.Fprintf(c, "stream 0 0\n"); err != nil {
			t.Fatal(err)
		}
		ctlbtestutil.Eventually(t, fmt.Sprintf("%s: %v open", addr, open), limitDeadline, func() (bool, string) {
			got := testutil.ToFloat64(e.p.m.open.WithLabelValues(addr.String()))
			return got == open, fmt.Sprint(got)
		})
		return c
	}
	first := hold(a, 1)
	hold(a, 2)
	expectRejected(t, e, a)
	if n := testutil.ToFloat64(e.p.m.rejected.WithLabelValues(a.String(), rejectSvcLimit)); n != 1 {
		t.Errorf("rejected{%s} = %v, want 1", rejectSvcLimit, n)
	}
	hold(b, 1) // three in all: the global cap
	expectRejected(t, e, b)
	if n := testutil.ToFloat64(e.p.m.rejected.WithLabelValues(b.String(), rejectLimit)); n != 1 {
		t.Errorf("rejected{%s} = %v, want 1", rejectLimit, n)
	}
	// A slot freed is a slot again.
	first.Close()
	ctlbtestutil.Eventually(t, "the closed connection released", limitDeadline, func() (bool, string) {
		got := testutil.ToFloat64(e.p.m.open.WithLabelValues(a.String()))
		return got == 1, fmt.Sprint(got)
	})
	hold(a, 2)
	// The dial time of every proxied connection was observed.
	if n := testutil.CollectAndCount(e.p.m.dialSeconds); n != 2 {
		t.Errorf("dial duration series: %d, want one per service (2)", n)
	}
}

// TestRejectLogRateLimited: a flood of one kind of rejection logs one line
// per interval, and the next line says how many were left out.
func TestRejectLogRateLimited(t *testing.T) {
	var buf ctlbtestutil.SyncBuffer
	r := newRateLog(slog.New(slog.NewTextHandler(&buf, nil)), 300*time.Millisecond)
	for range 100 {
		r.warn("no_target 198.18.100.1:8500", "closing client: no target answered", "service", "198.18.100.1:8500")
	}
	r.warn("no_target 198.18.100.1:8502", "closing client: no target answered", "service", "198.18.100.1:8502")
	if lines := strings.Count(buf.String(), "\n"); lines != 2 {
		t.Fatalf("%d lines for 100 rejections of one kind and 1 of another, want 2:\n%s", lines, buf.String())
	}
	time.Sleep(300 * time.Millisecond) // one interval: the next line goes out
	r.warn("no_target 198.18.100.1:8500", "closing client: no target answered", "service", "198.18.100.1:8500")
	if out := buf.String(); !strings.Contains(out, "suppressed=99") {
		t.Errorf("the line after the interval does not count the 99 left out:\n%s", out)
	}
}

func TestConnectionCapsValidated(t *testing.T) {
	for _, c := range []Config{
		{Services: []Service{{VIP: testVIP, Ports: []int{portA}}}, MaxConnections: -1},
		{Services: []Service{{VIP: testVIP, Ports: []int{portA}}}, MaxConnectionsPerService: -5},
		{Services: []Service{{VIP: testVIP, Ports: []int{portA}}}, RejectLogInterval: "often"},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}
