package datapath_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// proc is a helper program (testdata/client.py, the JVM) run inside a test
// network namespace and an attached cgroup.
type proc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	stderr *testutil.SyncBuffer
	waited bool
}

type report struct {
	Landed []string `json:"landed"`
	Peers  []string `json:"peers"`
	Errors []string `json:"errors"`
}

func startIn(t *testing.T, netns ns.NetNS, cgroupDir, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	if cgroupDir != "" {
		f := testutil.OpenDir(t, cgroupDir)
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	}
	p := &proc{cmd: cmd, stderr: &testutil.SyncBuffer{}}
	cmd.Stderr = p.stderr
	var err error
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p.lines = bufio.NewScanner(stdout)
	p.lines.Buffer(make([]byte, 1<<20), 16<<20)
	t.Cleanup(func() {
		if !p.waited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return p
}

func (p *proc) line(t *testing.T) string {
	t.Helper()
	done := make(chan bool, 1)
	go func() { done <- p.lines.Scan() }()
	select {
	case ok := <-done:
		if !ok {
			t.Fatalf("%s exited without a report (stderr: %s)", p.cmd.Path, p.stderr.String())
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("%s: no report within 2 minutes (stderr: %s)", p.cmd.Path, p.stderr.String())
	}
	return p.lines.Text()
}

func (p *proc) report(t *testing.T) report {
	t.Helper()
	var r report
	l := p.line(t)
	if err := json.Unmarshal([]byte(l), &r); err != nil {
		t.Fatalf("report %q: %v (stderr: %s)", l, err, p.stderr.String())
	}
	return r
}

func (p *proc) stop(t *testing.T) {
	t.Helper()
	p.stdin.Close()
	p.waited = true
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("%s: %v (stderr: %s)", p.cmd.Path, err, p.stderr.String())
	}
}

func python(t *testing.T) string {
	t.Helper()
	py, err := exec.LookPath("python3")
	testutil.Require(t, err == nil, "python3 not found (make deps installs it)")
	return py
}

func runPy(t *testing.T, netns ns.NetNS, cg string, args ...string) report {
	t.Helper()
	p := startIn(t, netns, cg, python(t), append([]string{"testdata/client.py"}, args...)...)
	r := p.report(t)
	p.stop(t)
	return r
}

func attached(t *testing.T, id string) (*datapath.Datapath, ns.NetNS, string) {
	t.Helper()
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach(id, cg); err != nil {
		t.Fatal(err)
	}
	return dp, netns, cg
}

func count(ss []string) map[string]int {
	m := map[string]int{}
	for _, s := range ss {
		m[s]++
	}
	return m
}

// assertSplit checks n connections over the servers split n/k ±1.
func assertSplit(t *testing.T, what string, landed []string, servers []string) {
	t.Helper()
	got := count(landed)
	n, k := len(landed), len(servers)
	for _, s := range servers {
		if c := got[s]; c < n/k || c > n/k+1 {
			t.Errorf("%s: server %s got %d of %d, want %d±1 (all: %v)", what, s, c, n, n/k, got)
		}
	}
}

func statsBy(t *testing.T, dp *datapath.Datapath) map[string]datapath.ServerStats {
	t.Helper()
	stats, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]datapath.ServerStats{}
	for _, s := range stats {
		m[s.Key().String()+" "+s.Server.String()] = s
	}
	return m
}

func TestIPv6VIP(t *testing.T) {
	dp, netns, cg := attached(t, "v6")
	const v6vip = "[2001:2::100]:8502"
	srvs := []string{"[2001:2::11]:9001", "[2001:2::12]:9001", "[2001:2::13]:9001"}
	testutil.AddLoopbackAddrs(t, netns, "2001:2::100", "2001:2::11", "2001:2::12", "2001:2::13")
	testutil.StartServers(t, netns, append([]string{v6vip}, srvs...)...)
	v := netip.MustParseAddrPort(v6vip)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: v6vip, Count: 30})
	if r.Failed != 0 {
		t.Fatalf("%d connects failed: %v", r.Failed, r.Errors)
	}
	assertSplit(t, "IPv6 round-robin", r.Landed, srvs)
	for i, p := range r.Peers {
		if p != v6vip {
			t.Errorf("connection %d: getpeername = %q, want the VIP %s", i, p, v6vip)
		}
	}
	for i := 1; i < len(r.Landed); i++ {
		if r.Landed[i] == r.Landed[i-1] {
			t.Errorf("connections %d and %d both went to %s: not a rotation", i-1, i, r.Landed[i])
		}
	}
	st := statsBy(t, dp)
	for _, s := range srvs {
		if a := st[v6vip+" "+s]; a.Attempts != 10 || a.Established != 10 || a.Failed != 0 {
			t.Errorf("stats %s: %+v, want 10 attempts, 10 established", s, a)
		}
	}

	// The empty-set policy.
	if err := dp.SetService(datapath.Service{VIP: v, Empty: datapath.EmptyReject}); err != nil {
		t.Fatal(err)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: v6vip, Count: 2})
	if r.Failed != 2 || !strings.Contains(strings.Join(r.Errors, " "), "connection refused") {
		t.Errorf("empty, reject: %d of 2 failed with %v, want both refused", r.Failed, r.Errors)
	}
	if err := dp.SetService(datapath.Service{VIP: v, Empty: datapath.EmptyPassthrough}); err != nil {
		t.Fatal(err)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: v6vip, Count: 2})
	if got := count(r.Landed)[v6vip]; got != 2 {
		t.Errorf("empty, passthrough: landed %v (errors %v), want both on the VIP itself", r.Landed, r.Errors)
	}

	// Atomic swap under a connect storm.
	sets := [][]netip.AddrPort{aps(t, srvs[:1]...), aps(t, srvs[1:]...)}
	if err := dp.SetService(datapath.Service{VIP: v, Servers: sets[1]}); err != nil {
		t.Fatal(err) // a set before the storm: the passthrough above is over
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: v6vip, Workers: 2, Count: 20000, Duration: time.Minute})
	for i := 0; i < 200; i++ {
		if err := dp.SetService(datapath.Service{VIP: v, Servers: sets[i%2]}); err != nil {
			t.Fatalf("swap %d: %v", i, err)
		}
	}
	res := c.Finish(t)
	if res.Failed != 0 || res.Total < 50 {
		t.Errorf("storm across 200 swaps: %d of %d failed (%v); want 0 failed of at least 50", res.Failed, res.Total, res.Errors)
	}
	for s := range res.PerServer {
		if !strings.HasPrefix(s, "[2001:2::1") || s == v6vip {
			t.Errorf("a storm connection landed on %q, a member of no set", s)
		}
	}
}

// TestDualStack: AF_INET6 sockets dialing ::ffff:VIP, from Python and from a
// JVM with default settings, are balanced like AF_INET ones and see the VIP.
func TestDualStack(t *testing.T) {
	dp, netns, cg := attached(t, "dual")
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "127.0.0.13", "198.18.100.1")
	testutil.StartServers(t, netns, append([]string{vip}, servers...)...)
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, servers...)}); err != nil {
		t.Fatal(err)
	}

	t.Run("python AF_INET6", func(t *testing.T) {
		r := runPy(t, netns, cg, "tcp6", "::ffff:198.18.100.1", "80", "30")
		if len(r.Errors) != 0 {
			t.Fatalf("errors: %v", r.Errors)
		}
		assertSplit(t, "dual-stack", r.Landed, servers)
		for i, p := range r.Peers {
			if p != "[::ffff:198.18.100.1]:80" {
				t.Errorf("connection %d: getpeername = %q, want [::ffff:198.18.100.1]:80", i, p)
			}
		}
	})
	t.Run("java", func(t *testing.T) {
		java, err := exec.LookPath("java")
		testutil.Require(t, err == nil, "java not found (make deps installs openjdk-17-jdk-headless)")
		const n = 30
		p := startIn(t, netns, cg, java, "testdata/Client.java", "198.18.100.1", "80", fmt.Sprint(n))
		var landed []string
		for i := 0; i < n; i++ {
			f := strings.Fields(p.line(t))
			if len(f) != 2 || f[0] == "ERROR" {
				t.Fatalf("java connection %d: %v", i, f)
			}
			landed = append(landed, f[0])
			if f[1] != "/198.18.100.1:80" {
				t.Errorf("java connection %d: remote address %s, want the VIP", i, f[1])
			}
		}
		p.stop(t)
		assertSplit(t, "java", landed, servers)
	})
	st := statsBy(t, dp)
	var open int64
	for _, s := range st {
		open += s.Open
	}
	if open != 0 {
		t.Errorf("open connections %d after every client closed, want 0 (%v)", open, st)
	}
}

// startUDPEcho answers each datagram with the server's own address.
func startUDPEcho(t *testing.T, netns ns.NetNS, addrs ...string) {
	for _, a := range addrs {
		testutil.StartUDPEcho(t, netns, a)
	}
}

func TestUDPVIP(t *testing.T) {
	dp, netns, cg := attached(t, "udp")
	const udpVIP = "198.18.100.53:8600"
	srvs := []string{"127.0.0.11:8600", "127.0.0.12:8600", "127.0.0.13:8600"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "127.0.0.13", "198.18.100.53")
	startUDPEcho(t, netns, append([]string{udpVIP}, srvs...)...)
	v := netip.MustParseAddrPort(udpVIP)
	if err := dp.SetService(datapath.Service{VIP: v, Protocol: datapath.UDP, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}

	// Connected sockets: rewritten at connect, round-robin per socket.
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "udp", Target: udpVIP, Count: 30})
	if r.Failed != 0 {
		t.Fatalf("connected UDP: %d failed: %v", r.Failed, r.Errors)
	}
	assertSplit(t, "connected UDP", r.Landed, srvs)

	// Unconnected sockets: each keeps its server for its life; replies
	// come from the VIP.
	for _, fam := range []struct{ fam, host, peer string }{
		{"4", "198.18.100.53", udpVIP},
		{"6", "::ffff:198.18.100.53", "[::ffff:198.18.100.53]:8600"},
	} {
		r := runPy(t, netns, cg, "udp", fam.fam, fam.host, "8600", "6", "4")
		if len(r.Errors) != 0 || len(r.Landed) != 24 {
			t.Fatalf("unconnected UDP (AF_INET%s): %d answers, errors %v", fam.fam, len(r.Landed), r.Errors)
		}
		var firsts []string
		for i := 0; i < 6; i++ {
			first := r.Landed[i*4]
			firsts = append(firsts, first)
			for j := 1; j < 4; j++ {
				if got := r.Landed[i*4+j]; got != first {
					t.Errorf("AF_INET%s socket %d: datagram %d answered by %s, the first by %s: a socket keeps its server", fam.fam, i, j, got, first)
				}
			}
		}
		assertSplit(t, "unconnected UDP sockets (AF_INET"+fam.fam+")", firsts, srvs)
		for i, p := range r.Peers {
			if p != fam.peer {
				t.Errorf("AF_INET%s datagram %d: recvfrom address %s, want the VIP %s", fam.fam, i, p, fam.peer)
			}
		}
	}
	// An IPv6 UDP VIP: sendmsg6 and recvmsg6.
	const v6udp = "[2001:2::153]:8600"
	v6srvs := []string{"[2001:2::11]:8600", "[2001:2::12]:8600"}
	testutil.AddLoopbackAddrs(t, netns, "2001:2::153", "2001:2::11", "2001:2::12")
	startUDPEcho(t, netns, append([]string{v6udp}, v6srvs...)...)
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(v6udp), Protocol: datapath.UDP, Servers: aps(t, v6srvs...)}); err != nil {
		t.Fatal(err)
	}
	r6 := runPy(t, netns, cg, "udp", "6", "2001:2::153", "8600", "4", "3")
	if len(r6.Errors) != 0 || len(r6.Landed) != 12 {
		t.Fatalf("unconnected UDP to an IPv6 VIP: %d answers, errors %v", len(r6.Landed), r6.Errors)
	}
	var firsts6 []string
	for i := 0; i < 4; i++ {
		firsts6 = append(firsts6, r6.Landed[i*3])
		if r6.Landed[i*3+1] != r6.Landed[i*3] || r6.Landed[i*3+2] != r6.Landed[i*3] {
			t.Errorf("IPv6 UDP socket %d answered by %v: a socket keeps its server", i, r6.Landed[i*3:i*3+3])
		}
	}
	assertSplit(t, "unconnected UDP sockets to an IPv6 VIP", firsts6, v6srvs)
	for i, p := range r6.Peers {
		if p != v6udp {
			t.Errorf("IPv6 UDP datagram %d: recvfrom address %s, want the VIP %s", i, p, v6udp)
		}
	}

	// A TCP connect to the same address and port is not the UDP VIP.
	if _, ok, _ := dp.Service(v); ok {
		t.Error("the UDP VIP is listed as a TCP VIP too")
	}
	st := statsBy(t, dp)
	var attempts uint64
	for _, s := range srvs {
		a := st[udpVIP+"/udp "+s]
		attempts += a.Attempts
		if a.Open != 0 {
			t.Errorf("UDP %s: open %d after every socket closed", s, a.Open)
		}
	}
	if attempts != 30+12 {
		t.Errorf("UDP attempts = %d, want 42 (30 connected sockets, 12 unconnected ones)", attempts)
	}
}

// TestAccountingAfterDetach: sockets still open when their pod is detached
// give their count back when they close; a re-created VIP starts clean.
func TestAccountingAfterDetach(t *testing.T) {
	dp, netns, cg := attached(t, "acct")
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	v := netip.MustParseAddrPort(vip)
	two := aps(t, "127.0.0.11:9001", "127.0.0.12:9001")
	if err := dp.SetService(datapath.Service{VIP: v, Servers: two}); err != nil {
		t.Fatal(err)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 4})
	if r := c.Result(t); r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 2, "127.0.0.12:9001": 2})
	if err := dp.Detach("acct"); err != nil {
		t.Fatal(err)
	}
	c.Stop(t)
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})

	// Delete and re-create: counters start at zero.
	if _, err := dp.DeleteService(v); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetService(datapath.Service{VIP: v, Servers: two}); err != nil {
		t.Fatal(err)
	}
	for k, s := range statsBy(t, dp) {
		if !s.Retired && (s.Attempts != 0 || s.Established != 0 || s.Open != 0) {
			t.Errorf("re-created VIP: %s = %+v, want clean counters", k, s)
		}
	}
}

// TestSlotsReused: a server that left every set gives its slot back once
// no socket holds it.
func TestSlotsReused(t *testing.T) {
	dp := newDatapath(t)
	v := netip.MustParseAddrPort(vip)
	replace := func(round int) {
		for i := 0; i < 5; i++ {
			srv := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(round), byte(i)}), 80)
			if err := dp.SetService(datapath.Service{VIP: v, Servers: []netip.AddrPort{srv}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	replace(1)
	time.Sleep(1100 * time.Millisecond) // the grace before a retired slot is reused
	if st, err := dp.Stats(); err != nil || len(st) != 1 {
		t.Fatalf("after 5 replacements and the grace: %+v (%v), want only the current server's slot", st, err)
	}
	replace(2)
	st, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		if s.Slot > 6 {
			t.Errorf("second round used slot %d: freed slots 1-4 were not reused (%+v)", s.Slot, st)
		}
	}
}

// TestUnspecForgetsVIP: a socket disconnected with AF_UNSPEC and connected
// to a plain address reports that address and gives back its count.
func TestUnspecForgetsVIP(t *testing.T) {
	dp, netns, cg := attached(t, "unspec")
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11")
	testutil.StartServers(t, netns, "127.0.0.11:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	p := startIn(t, netns, cg, python(t), "testdata/client.py", "unspec", "198.18.100.1", "80", "127.0.0.11", "9001")
	r := p.report(t)
	if len(r.Errors) != 0 {
		t.Fatalf("errors: %v", r.Errors)
	}
	if r.Peers[0] != vip || r.Peers[1] != "127.0.0.11:9001" {
		t.Errorf("peers %v, want the VIP, then after AF_UNSPEC and a plain connect the real address", r.Peers)
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0})
	p.stop(t)
}

// TestEarlierDenyNotCounted: a connect an earlier program denied is neither
// rewritten nor counted.
func TestEarlierDenyNotCounted(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	cg := testutil.NewCgroup(t, "")
	deny, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.CGroupSockAddr, AttachType: ebpf.AttachCGroupInet4Connect, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer deny.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: deny})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := dp.Attach("deny", cg); err != nil {
		t.Fatal(err)
	}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11")
	testutil.StartServers(t, netns, "127.0.0.11:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 3 || !strings.Contains(strings.Join(r.Errors, " "), "operation not permitted") {
		t.Errorf("denied connects: %d of 3 failed with %v, want all denied (EPERM)", r.Failed, r.Errors)
	}
	s := statsBy(t, dp)[vip+" 127.0.0.11:9001"]
	if s.Attempts != 0 || s.Open != 0 {
		t.Errorf("denied connects were counted: %+v", s)
	}
}

func TestMPTCP(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/mptcp/enabled")
	testutil.Require(t, err == nil && strings.TrimSpace(string(b)) == "1", "kernel without net.mptcp.enabled=1")
	dp, netns, cg := attached(t, "mptcp")
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	p := startIn(t, netns, cg, python(t), "testdata/client.py", "mptcp", "198.18.100.1", "80", "4")
	r := p.report(t)
	if len(r.Errors) != 0 {
		t.Fatalf("MPTCP connects: %v", r.Errors)
	}
	assertSplit(t, "MPTCP", r.Landed, []string{"127.0.0.11:9001", "127.0.0.12:9001"})
	for i, peer := range r.Peers {
		if peer != vip {
			t.Errorf("MPTCP connection %d: getpeername = %s, want the VIP", i, peer)
		}
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 2, "127.0.0.12:9001": 2})
	for k, s := range statsBy(t, dp) {
		if s.Attempts != 2 || s.Established != 2 || s.Failed != 0 {
			t.Errorf("MPTCP %s: %+v, want 2 attempts, 2 established (sock_ops on the subflow counts for the MPTCP socket)", k, s)
		}
	}
	p.stop(t)
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
}

// TestFailFast: a server that refuses is skipped at once (one failed
// connect), counted as failed, and back in rotation after its hold-down
// when a probe connect succeeds.
func TestFailFast(t *testing.T) {
	dp, netns, cg := attached(t, "failfast")
	if err := dp.HoldDown(300*time.Millisecond, time.Second); err != nil {
		t.Fatal(err)
	}
	srvs := []string{"127.0.0.11:9001", "127.0.0.12:9001", "127.0.0.13:9001"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "127.0.0.13")
	testutil.StartServers(t, netns, srvs[0], srvs[1]) // srvs[2] refuses
	v := netip.MustParseAddrPort(vip)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 30})
	if r.Failed > 1 {
		t.Errorf("%d of 30 sequential connects failed, want at most 1: %v", r.Failed, r.Errors)
	}
	s := statsBy(t, dp)[vip+" "+srvs[2]]
	if s.Failed != 1 || s.Established != 0 {
		t.Errorf("refusing server: %+v, want 1 failed, 0 established", s)
	}
	// The server comes back: after the hold-down a probe finds it.
	testutil.StartServers(t, netns, srvs[2])
	deadline := time.Now().Add(10 * time.Second)
	for {
		r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
		if count(r.Landed)[srvs[2]] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server listening again got no connect within 10 s; last: %v, stats %+v", r.Landed, statsBy(t, dp)[vip+" "+srvs[2]])
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st := statsBy(t, dp)[vip+" "+srvs[2]]; st.FailingFor != 0 {
		t.Errorf("after a successful probe the server is still marked failing: %+v", st)
	}

	// Every server failing: the empty policy applies.
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, "127.0.0.11:9999")}); err != nil {
		t.Fatal(err)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 3 {
		t.Errorf("only a refusing server: %d of 3 failed, want 3", r.Failed)
	}
	if s := statsBy(t, dp)[vip+" 127.0.0.11:9999"]; s.Attempts != 1 || s.Failed != 1 {
		t.Errorf("all failing: %+v, want 1 attempt (then refused by the empty policy)", s)
	}
}

func TestBalanceModes(t *testing.T) {
	dp, netns, cg := attached(t, "balance")
	srvs := []string{"127.0.0.11:9001", "127.0.0.12:9001", "127.0.0.13:9001"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "127.0.0.13")
	testutil.StartServers(t, netns, srvs...)
	v := netip.MustParseAddrPort(vip)

	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...), Balance: datapath.BalanceRandom}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 60})
	got := count(r.Landed)
	for _, s := range srvs {
		if got[s] == 0 {
			t.Errorf("random: server %s got none of 60 (%v)", s, got)
		}
	}

	// Least-open: 9 held on one server, then 30 more over three.
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs[0])}); err != nil {
		t.Fatal(err)
	}
	c1 := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 9})
	c1.Result(t)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, srvs...), Balance: datapath.BalanceLeastOpen}); err != nil {
		t.Fatal(err)
	}
	c2 := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 30})
	c2.Result(t)
	st := statsBy(t, dp)
	for _, s := range srvs {
		if o := st[vip+" "+s].Open; o < 12 || o > 14 {
			t.Errorf("least-open: %s holds %d, want 13±1 (39 over 3)", s, o)
		}
	}
	c1.Stop(t)
	c2.Stop(t)
}

// TestUpgradeV1ToV2: a v1 datapath (testdata/ctlb_v1.o) with an attached
// pod, a VIP and open sockets is upgraded in place while the pod connects.
func TestUpgradeV1ToV2(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "198.18.100.1")
	testutil.StartServers(t, netns, vip, "127.0.0.11:9001", "127.0.0.12:9001")
	cg := testutil.NewCgroup(t, "")
	pinV1(t, dir, cg, "pod-v1", vip, "127.0.0.11:9001", "127.0.0.12:9001")

	held := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 4})
	if r := held.Result(t); r.Failed != 0 || count(r.Landed)["127.0.0.11:9001"] != 2 {
		t.Fatalf("v1 datapath: held connections %v (%v), want 2 on each server", r.Landed, r.Errors)
	}
	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 100000, Duration: time.Minute})
	time.Sleep(300 * time.Millisecond)

	// A v2 plugin meeting only v1 pins says so.
	if _, err := datapath.Open(dir); !errors.Is(err, datapath.ErrLayout) {
		t.Errorf("Open of v1 pins: %v, want ErrLayout", err)
	}
	start := time.Now()
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if o, err := datapath.Open(dir); err != nil {
		t.Errorf("Open after the upgrade: %v", err)
	} else {
		o.Close()
	}
	defer dp.Close()
	took := time.Since(start)
	time.Sleep(300 * time.Millisecond)
	r := storm.Finish(t)
	rep := dp.Upgraded()
	t.Logf("upgrade took %v: %+v; storm across it: %d connects, %d failed, %v", took, rep, r.Total, r.Failed, r.PerServer)
	if r.Failed != 0 || r.Total < 20 {
		t.Errorf("connect loop across the upgrade: %d of %d failed (%v), want 0 of at least 20", r.Failed, r.Total, r.Errors)
	}
	if r.PerServer[vip] != 0 {
		t.Errorf("%d connects went to the raw VIP during the upgrade", r.PerServer[vip])
	}
	// 4 held sockets, and up to one per storm worker in flight.
	if rep == nil || rep.Services != 1 || rep.Attachments != 1 || rep.OpenSockets < 4 || rep.OpenSockets > 6 {
		t.Errorf("upgrade report %+v, want 1 VIP, 1 attachment, 4-6 open sockets carried", rep)
	}
	for _, n := range []string{"ctlb_services_v1", "ctlb_rr_v1", "ctlb_connects_v1", "ctlb_open_v1", "ctlb_socks_v1", "ctlb_connect4_v1", "ctlb_getpeername4_v1", "ctlb_sock_release_v1"} {
		if _, err := os.Lstat(filepath.Join(dir, n)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("old pin %s still there (%v)", n, err)
		}
	}
	svc, ok, err := dp.Service(netip.MustParseAddrPort(vip))
	if err != nil || !ok || len(svc.Servers) != 2 {
		t.Fatalf("VIP after upgrade: %+v %v %v", svc, ok, err)
	}
	a, err := dp.Attachment("pod-v1")
	if err != nil || len(a.Missing) != 0 || !a.Alive {
		t.Errorf("attachment after upgrade: %+v, %v; want whole and alive", a, err)
	}
	st := statsBy(t, dp)
	if o := st[vip+" 127.0.0.11:9001"].Open + st[vip+" 127.0.0.12:9001"].Open; o != 4 {
		t.Errorf("open after upgrade = %d, want the 4 held v1 sockets (%v)", o, st)
	}
	if a := st[vip+" 127.0.0.11:9001"].Attempts + st[vip+" 127.0.0.12:9001"].Attempts; a < uint64(r.Total) {
		t.Errorf("attempts after upgrade = %d, want at least the %d storm connects + 4", a, r.Total)
	}
	// The v2 programs serve the pod: v6, UDP hooks are attached too.
	r2 := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 4})
	if r2.Failed != 0 || r2.Peers[0] != vip {
		t.Errorf("after upgrade: %+v", r2)
	}
	held.Stop(t)
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
}

// pinV1 pins the v1 objects the way a v1 ctlbd did, attaches them to cg and
// sets one VIP.
func pinV1(t *testing.T, dir, cg, id, vipS string, servers ...string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		t.Fatal(err)
	}
	spec, err := ebpf.LoadCollectionSpec("testdata/ctlb_v1.o")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if err != nil {
		t.Fatalf("load v1 objects: %v", err)
	}
	defer coll.Close()
	hooks := []struct {
		name, prog string
		attach     ebpf.AttachType
	}{
		{"sock_release", "ctlb_sock_release", ebpf.AttachCgroupInetSockRelease},
		{"getpeername4", "ctlb_getpeername4", ebpf.AttachCgroupInet4GetPeername},
		{"connect4", "ctlb_connect4", ebpf.AttachCGroupInet4Connect},
	}
	ld := filepath.Join(dir, "links", id)
	if err := os.Mkdir(ld, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, h := range hooks {
		p := coll.Programs[h.prog]
		if err := p.Pin(filepath.Join(dir, h.prog+"_v1")); err != nil {
			t.Fatal(err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: h.attach, Program: p})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Pin(filepath.Join(ld, h.name)); err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
	inner, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: uint32(len(servers) + 1), Flags: 1 << 12})
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	type slot struct {
		Addr  [4]byte
		Port  [2]byte
		Flags uint16
	}
	be16 := func(p uint16) [2]byte { return [2]byte{byte(p >> 8), byte(p)} }
	if err := inner.Put(uint32(0), slot{Addr: [4]byte{byte(len(servers))}, Flags: 1}); err != nil {
		t.Fatal(err)
	}
	for i, s := range servers {
		ap := netip.MustParseAddrPort(s)
		if err := inner.Put(uint32(i+1), slot{Addr: ap.Addr().As4(), Port: be16(ap.Port())}); err != nil {
			t.Fatal(err)
		}
	}
	v := netip.MustParseAddrPort(vipS)
	key := struct {
		Vip  [4]byte
		Port [2]byte
		Pad  uint16
	}{v.Addr().As4(), be16(v.Port()), 0}
	if err := coll.Maps["ctlb_services_v1"].Put(key, inner); err != nil {
		t.Fatal(err)
	}
}

// TestBulkSetServices sets 10,000 VIPs at once and reports the rate.
func TestBulkSetServices(t *testing.T) {
	dp := newDatapath(t)
	const n = 10000
	svcs := make([]datapath.Service, n)
	for i := range svcs {
		svcs[i] = datapath.Service{
			VIP:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), 80),
			Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001"),
		}
	}
	start := time.Now()
	if err := dp.SetServices(svcs); err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	t.Logf("set %d VIPs in %v (%.0f VIPs/s), outer map writes: %s", n, d, n/d.Seconds(), dp.BatchMode())
	got, err := dp.Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("%d VIPs listed, want %d", len(got), n)
	}
	start = time.Now()
	st, err := dp.Stats()
	if err != nil || len(st) != 2*n {
		t.Fatalf("stats of %d VIPs: %d entries, %v", n, len(st), err)
	}
	t.Logf("read the counters of %d servers in %v", len(st), time.Since(start))
	// Again, every VIP replaced (the inner arrays swapped).
	start = time.Now()
	for i := range svcs {
		svcs[i].Servers = aps(t, "127.0.0.13:9001")
	}
	if err := dp.SetServices(svcs); err != nil {
		t.Fatal(err)
	}
	d = time.Since(start)
	t.Logf("replaced %d VIPs' sets in %v (%.0f VIPs/s)", n, d, n/d.Seconds())
	if s, ok, _ := dp.Service(svcs[n-1].VIP); !ok || len(s.Servers) != 1 || s.Servers[0].String() != "127.0.0.13:9001" {
		t.Errorf("last VIP after the bulk replacement: %+v", s)
	}

	// The fallback for kernels without batch updates, for comparison.
	datapath.ForceParallel(dp)
	for i := range svcs {
		svcs[i].Servers = aps(t, "127.0.0.12:9001")
	}
	start = time.Now()
	if err := dp.SetServices(svcs); err != nil {
		t.Fatal(err)
	}
	d = time.Since(start)
	t.Logf("replaced %d VIPs' sets in %v (%.0f VIPs/s) with %s single updates", n, d, n/d.Seconds(), dp.BatchMode())
	if s, ok, _ := dp.Service(svcs[0].VIP); !ok || len(s.Servers) != 1 || s.Servers[0].String() != "127.0.0.12:9001" {
		t.Errorf("first VIP after the parallel replacement: %+v", s)
	}
}

// TestBPFCostPerConnect logs the kernel's run time per program and per
// connect for layout v1 (testdata) and v2, side by side, for IPv4 TCP, and
// for v2 also IPv6 TCP, dual-stack TCP (Python AF_INET6 to ::ffff:VIP) and
// connected UDP. It asserts behaviour only (the connects land); the figures
// are for the benchmark notes. With run-time stats on, each program run
// also pays the kernel's two clock reads, so the absolute figures are high;
// compare the rows.
func TestBPFCostPerConnect(t *testing.T) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	testutil.Require(t, err == nil, fmt.Sprintf("BPF run-time stats: %v", err))
	defer stats.Close()
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "198.18.100.1", "2001:2::11", "2001:2::12")
	testutil.StartServers(t, netns, vip, "127.0.0.11:9001", "127.0.0.12:9001", "[2001:2::11]:9001", "[2001:2::12]:9001")
	testutil.StartUDPEcho(t, netns, "127.0.0.11:9001")
	testutil.StartUDPEcho(t, netns, "127.0.0.12:9001")
	const n = 2000

	measure := func(name string, progs map[string]*ebpf.Program, run func() int) {
		before := map[string]*ebpf.ProgramStats{}
		for h, p := range progs {
			st, err := p.Stats()
			if err != nil {
				t.Fatal(err)
			}
			before[h] = st
		}
		if got := run(); got != n {
			t.Fatalf("%s: %d of %d connects reached a server", name, got, n)
		}
		var total float64
		var parts []string
		for _, h := range []string{"connect4", "connect6", "sendmsg4", "recvmsg4", "getpeername4", "getpeername6", "sock_ops", "sock_release"} {
			p := progs[h]
			if p == nil {
				continue
			}
			after, err := p.Stats()
			if err != nil {
				t.Fatal(err)
			}
			rb, ra := before[h].Runtime, after.Runtime
			cb, ca := before[h].RunCount, after.RunCount
			if ca == cb {
				continue
			}
			avg := float64(ra-rb) / float64(ca-cb)
			if h == "sock_release" {
				total += avg // one per client socket; the root program also sees the servers'
			} else {
				total += float64(ra-rb) / n
			}
			parts = append(parts, fmt.Sprintf("%s %.0f ns x %d", h, avg, ca-cb))
		}
		t.Logf("%s: %.0f ns of BPF per connect (%s)", name, total, strings.Join(parts, ", "))
	}
	dial := func(cg, target string) func() int {
		return func() int {
			r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: target, Count: n})
			return n - r.Failed - count(r.Landed)[target]
		}
	}

	// v1
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	cg1 := testutil.NewCgroup(t, "")
	pinV1(t, dir, cg1, "cost-v1", vip, "127.0.0.11:9001", "127.0.0.12:9001")
	v1 := map[string]*ebpf.Program{}
	for _, h := range []string{"connect4", "getpeername4", "sock_release"} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "ctlb_"+h+"_v1"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		v1[h] = p
	}
	measure("layout v1, IPv4 TCP", v1, dial(cg1, vip))

	// v2
	dp := newDatapath(t)
	cg2 := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("cost-v2", cg2); err != nil {
		t.Fatal(err)
	}
	const v6vip = "[2001:2::100]:8502"
	for _, s := range []datapath.Service{
		{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")},
		{VIP: netip.MustParseAddrPort(vip), Protocol: datapath.UDP, Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")},
		{VIP: netip.MustParseAddrPort(v6vip), Servers: aps(t, "[2001:2::11]:9001", "[2001:2::12]:9001")},
	} {
		if err := dp.SetService(s); err != nil {
			t.Fatal(err)
		}
	}
	v2 := map[string]*ebpf.Program{}
	for _, h := range []string{"connect4", "connect6", "sendmsg4", "recvmsg4", "getpeername4", "getpeername6", "sock_ops", "sock_release"} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dp.Dir(), "ctlb_"+h+"_v2"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		v2[h] = p
	}
	measure("layout v2, IPv4 TCP", v2, dial(cg2, vip))
	measure("layout v2, IPv6 TCP", v2, dial(cg2, v6vip))
	measure("layout v2, dual-stack TCP", v2, func() int {
		r := runPy(t, netns, cg2, "tcp6", "::ffff:198.18.100.1", "80", fmt.Sprint(n))
		return len(r.Landed) - count(r.Landed)[vip]
	})
	measure("layout v2, connected UDP", v2, func() int {
		r := testutil.RunClient(t, netns, cg2, testutil.ClientSpec{Mode: "udp", Target: vip, Count: n})
		return n - r.Failed
	})
}

// TestRefusedThenConnectedAgain: a socket refused by one server and
// connected again (the same socket, to the next server) counts the refusal
// and marks that server at the second connect, not only when it is closed.
func TestRefusedThenConnectedAgain(t *testing.T) {
	dp, netns, cg := attached(t, "reconnect")
	if err := dp.HoldDown(time.Minute, time.Minute); err != nil {
		t.Fatal(err)
	}
	srvs := []string{"127.0.0.11:9001", "127.0.0.12:9001"} // the second refuses
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, srvs[0])
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	p := startIn(t, netns, cg, python(t), "testdata/client.py", "retry", "198.18.100.1", "80", "3")
	r := p.report(t)
	if len(r.Errors) != 1 || len(r.Landed) != 1 || r.Landed[0] != srvs[0] {
		t.Fatalf("refused, then connected again: landed %v, errors %v; want one refusal, then %s", r.Landed, r.Errors, srvs[0])
	}
	// The socket is still open: the refusal was counted at the reconnect.
	if s := statsBy(t, dp)[vip+" "+srvs[1]]; s.Attempts != 1 || s.Failed != 1 || s.FailingFor == 0 {
		t.Errorf("refusing server with the socket still open: %+v, want 1 attempt, 1 failed, marked failing", s)
	}
	p.stop(t)
	if s := statsBy(t, dp)[vip+" "+srvs[1]]; s.Failed != 1 {
		t.Errorf("refusing server after the socket closed: %+v, want the refusal counted once", s)
	}
	if s := statsBy(t, dp)[vip+" "+srvs[0]]; s.Failed != 0 || s.Established < 1 {
		t.Errorf("answering server: %+v, want established, none failed", s)
	}
}

// TestSynTimeoutMarksServer: a server whose SYNs go unanswered (its listen
// queue is full) is marked failing at the first SYN retransmission, while
// the connect is still waiting, and the connect that gave up is counted as
// failed once, when its socket is released.
func TestSynTimeoutMarksServer(t *testing.T) {
	dp, netns, cg := attached(t, "syntimeout")
	// A hold-down that outlasts the test: the mark seen at the end is the
	// one the retransmission set.
	if err := dp.HoldDown(time.Minute, time.Minute); err != nil {
		t.Fatal(err)
	}
	const silent = "127.0.0.13:9001"
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.13")
	// A listener with a backlog of 0 queues one connection (made here,
	// outside the pod's cgroup, and never accepted) and drops every SYN
	// after it.
	var lfd int
	var filler net.Conn
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		if lfd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(lfd, &unix.SockaddrInet4{Port: 9001, Addr: [4]byte{127, 0, 0, 13}}); err != nil {
			return err
		}
		if err := unix.Listen(lfd, 0); err != nil {
			return err
		}
		filler, err = net.DialTimeout("tcp", silent, time.Second)
		return err
	}); err != nil {
		t.Fatalf("silent server: %v", err)
	}
	defer unix.Close(lfd)
	defer filler.Close()
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, silent)}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 1})
	// The first retransmission is 1 s after the SYN; the client gives up
	// after 3 s.
	took := testutil.Eventually(t, "the silent server marked failing", 2500*time.Millisecond, func() (bool, string) {
		s := statsBy(t, dp)[vip+" "+silent]
		return s.FailingFor > 0, fmt.Sprintf("%+v", s)
	})
	t.Logf("marked failing %v after the connect began", took)
	if s := statsBy(t, dp)[vip+" "+silent]; s.Failed != 0 {
		t.Errorf("while the connect waits: %+v, want 0 failed yet", s)
	}
	if r := c.Result(t); r.Failed != 1 {
		t.Fatalf("connect to the silent server: %d failed %v, landed %v; want it to time out", r.Failed, r.Errors, r.Landed)
	}
	if s := statsBy(t, dp)[vip+" "+silent]; s.Attempts != 1 || s.Failed != 1 || s.Established != 0 || s.FailingFor == 0 {
		t.Errorf("after the connect gave up (%v): %+v, want 1 attempt, 1 failed, still failing", time.Since(start), s)
	}
	if marks, err := dp.FailMarks(); err != nil || len(marks) != 1 || marks[0].Strikes != 1 {
		t.Errorf("fail marks %+v, %v; want the one mark of the retransmission (1 strike)", marks, err)
	}
}

// TestSockOpsRunsPerConnect: a VIP connect runs sock_ops only for the five
// callbacks the kernel makes for every TCP connect. ctlb asks for no state
// callback (it would run once more per connect, at SYN_SENT -> ESTABLISHED):
// a refused connect is counted at release (TestFailFast), and the timeout
// callback it asks for runs only when a SYN goes unanswered.
func TestSockOpsRunsPerConnect(t *testing.T) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	testutil.Require(t, err == nil, fmt.Sprintf("BPF run-time stats: %v", err))
	defer stats.Close()
	dp, netns, cg := attached(t, "sockops-runs")
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	p, err := ebpf.LoadPinnedProgram(filepath.Join(dp.Dir(), "ctlb_sock_ops_v2"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	before, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	const n = 200
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: n})
	if r.Failed != 0 || count(r.Landed)["127.0.0.11:9001"] != n/2 {
		t.Fatalf("%d connects: %d failed %v, landed %v", n, r.Failed, r.Errors, count(r.Landed))
	}
	after, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if runs := after.RunCount - before.RunCount; runs != 5*n {
		t.Errorf("sock_ops ran %d times for %d connects, want %d (5 each: no state callback)", runs, n, 5*n)
	}
	for k, s := range statsBy(t, dp) {
		if s.Attempts != n/2 || s.Established != n/2 || s.Failed != 0 {
			t.Errorf("%s: %+v, want %d attempts, all established, none failed", k, s, n/2)
		}
	}
}

// TestFailFastIPv6: the failing mark works the same for an IPv6 VIP, and
// for dual-stack sockets dialing an IPv4 VIP as ::ffff:VIP.
func TestFailFastIPv6(t *testing.T) {
	dp, netns, cg := attached(t, "failfast6")
	const v6vip = "[2001:2::100]:8502"
	srvs := []string{"[2001:2::11]:9001", "[2001:2::12]:9001"} // the second refuses
	testutil.AddLoopbackAddrs(t, netns, "2001:2::11", "2001:2::12", "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, srvs[0], "127.0.0.11:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(v6vip), Servers: aps(t, srvs...)}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: v6vip, Count: 20})
	if r.Failed > 1 {
		t.Errorf("IPv6: %d of 20 sequential connects failed, want at most 1: %v", r.Failed, r.Errors)
	}
	if s := statsBy(t, dp)[v6vip+" "+srvs[1]]; s.Failed != 1 || s.FailingFor == 0 {
		t.Errorf("IPv6 refusing server: %+v, want 1 failed and marked failing", s)
	}

	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	py := runPy(t, netns, cg, "tcp6", "::ffff:198.18.100.1", "80", "20")
	if len(py.Errors) > 1 {
		t.Errorf("dual-stack: %d of 20 sequential connects failed, want at most 1: %v", len(py.Errors), py.Errors)
	}
	if s := statsBy(t, dp)[vip+" 127.0.0.12:9001"]; s.Failed != 1 {
		t.Errorf("dual-stack refusing server: %+v, want 1 failed", s)
	}
}
