package datapath_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// newTerminator loads the termination programs, or fails (CI) / skips with
// the kernel's reason.
func newTerminator(t *testing.T, dp *datapath.Datapath) *datapath.Terminator {
	t.Helper()
	term, err := dp.NewTerminator()
	if errors.Is(err, datapath.ErrTerminationUnavailable) {
		testutil.Require(t, false, err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { term.Close() })
	return term
}

// A pod holds 4 connections over 2 servers; one server departs: exactly its
// 2 connections end (ECONNABORTED), the others and a connection to the same
// server from outside the attached cgroup stay.
func TestTerminateDeparted(t *testing.T) {
	dp := newDatapath(t)
	term := newTerminator(t, dp)
	netns := testutil.NewNetNS(t)
	srvs := servers[:2]
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, srvs...)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-term", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	pod := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4})
	if r := pod.Result(t); r.Failed != 0 || r.PerServer[srvs[0]] != 2 || r.PerServer[srvs[1]] != 2 {
		t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	outside := testutil.StartClient(t, netns, "", testutil.ClientSpec{Mode: "watch", Target: srvs[0], Count: 1})
	if r := outside.Result(t); r.Failed != 0 {
		t.Fatalf("outside client: %v", r.Errors)
	}

	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs[1])}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	nss, err := dp.AttachedNetNS()
	if err != nil {
		t.Fatal(err)
	}
	defer nss.Close()
	res, err := term.Terminate(nss.Files(), []datapath.Departed{{VIP: v, Server: netip.MustParseAddrPort(srvs[0])}})
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || res[0].Destroyed != 2 {
		t.Fatalf("terminate = %+v, want 2 sockets destroyed", res)
	}
	for range 2 {
		ev := pod.Result(t).Event
		if ev == nil || ev.Server != srvs[0] || !strings.Contains(ev.Ended, "connection abort") {
			t.Fatalf("event %+v: want a connection on %s ended with ECONNABORTED", ev, srvs[0])
		}
		t.Logf("connection %d on %s ended %v after the set change: %s", ev.Index, ev.Server, time.Unix(0, ev.At).Sub(start), ev.Ended)
	}
	t.Logf("terminate pass over %d namespaces: %v", nss.Len(), took)
	// Nothing else ends: a second pass finds nothing, and the remaining
	// connections see no event (stopping the clients ends them with EOF
	// only after this point).
	res, err = term.Terminate(nss.Files(), []datapath.Departed{{VIP: v, Server: netip.MustParseAddrPort(srvs[0])}})
	if err != nil || len(res) != 1 || res[0].Destroyed != 0 {
		t.Fatalf("second pass = %+v, %v; want nothing left to end", res, err)
	}
	st, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		want := int64(2)
		if s.Server.String() == srvs[0] {
			want = 0
		}
		if s.Open != want {
			t.Errorf("open count of %s = %d, want %d", s.Server, s.Open, want)
		}
	}
	pod.Stop(t)
	outside.Stop(t)
}

// The netlink fallback (kernels without bpf_sock_destroy) ends the same 2
// sockets: held by the attached cgroup and peered with the departed server;
// a socket to that server from outside the cgroup stays, and so do the
// sockets of a server still in some set.
func TestNetlinkTerminateFallback(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	srvs := servers[:2]
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, srvs...)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-nl", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	pod := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4})
	if r := pod.Result(t); r.Failed != 0 || r.PerServer[srvs[0]] != 2 {
		t.Fatalf("held connections: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	outside := testutil.StartClient(t, netns, "", testutil.ClientSpec{Mode: "watch", Target: srvs[0], Count: 1})
	if r := outside.Result(t); r.Failed != 0 {
		t.Fatalf("outside client: %v", r.Errors)
	}
	nss, err := dp.AttachedNetNS()
	if err != nil {
		t.Fatal(err)
	}
	defer nss.Close()
	nl := dp.NewNetlinkTerminator()
	gone := []datapath.Departed{{VIP: v, Server: netip.MustParseAddrPort(srvs[0])}}
	// Still in some set: kept.
	res, err := nl.Terminate(nss.Files(), gone, func(string) bool { return true })
	if err != nil || res[0].Destroyed != 0 {
		t.Fatalf("server still in a set: %+v, %v; want nothing ended", res, err)
	}
	start := time.Now()
	res, err = nl.Terminate(nss.Files(), gone, func(string) bool { return false })
	if err != nil || len(res) != 1 || res[0].Destroyed != 2 {
		t.Fatalf("netlink terminate = %+v, %v; want 2 ended", res, err)
	}
	for range 2 {
		ev := pod.Event(t, 2*time.Second)
		if ev == nil || ev.Server != srvs[0] {
			t.Fatalf("event %+v: want a connection on %s ended", ev, srvs[0])
		}
		t.Logf("netlink: connection %d on %s ended %v after the pass began: %s", ev.Index, ev.Server, time.Unix(0, ev.At).Sub(start), ev.Ended)
	}
	if ev := outside.Event(t, 300*time.Millisecond); ev != nil {
		t.Fatalf("the connection from outside the cgroup ended: %+v", ev)
	}
	if ev := pod.Event(t, 300*time.Millisecond); ev != nil {
		t.Fatalf("a connection on the other server ended: %+v", ev)
	}
	pod.Stop(t)
	outside.Stop(t)
}

// Connected UDP sockets are ended too: 4 over 2 servers of a UDP VIP, one
// server departs, its 2 sockets end, the others stay.
func TestTerminateConnectedUDP(t *testing.T) {
	dp := newDatapath(t)
	term := newTerminator(t, dp)
	netns := testutil.NewNetNS(t)
	srvs := servers[:2]
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	for _, s := range srvs {
		testutil.StartUDPEcho(t, netns, s)
	}
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-term-udp", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)
	if err := dp.SetService(datapath.Service{VIP: v, Protocol: datapath.UDP, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	pod := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "udpwatch", Target: vip, Count: 4})
	if r := pod.Result(t); r.Failed != 0 || r.PerServer[srvs[0]] != 2 || r.PerServer[srvs[1]] != 2 {
		t.Fatalf("connected UDP sockets: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	if err := dp.SetService(datapath.Service{VIP: v, Protocol: datapath.UDP, Servers: aps(t, srvs[1])}); err != nil {
		t.Fatal(err)
	}
	nss, err := dp.AttachedNetNS()
	if err != nil {
		t.Fatal(err)
	}
	defer nss.Close()
	res, err := term.Terminate(nss.Files(), []datapath.Departed{{VIP: v, Protocol: datapath.UDP, Server: netip.MustParseAddrPort(srvs[0])}})
	if err != nil || len(res) != 1 || res[0].Destroyed != 2 {
		t.Fatalf("terminate = %+v, %v; want 2 UDP sockets ended", res, err)
	}
	for range 2 {
		ev := pod.Event(t, 2*time.Second)
		if ev == nil || ev.Server != srvs[0] || !strings.Contains(ev.Ended, "connection abort") {
			t.Fatalf("event %+v: want a UDP socket on %s ended with ECONNABORTED", ev, srvs[0])
		}
	}
	if ev := pod.Event(t, 300*time.Millisecond); ev != nil {
		t.Fatalf("a UDP socket on the other server ended: %+v", ev)
	}
	pod.Stop(t)
}
