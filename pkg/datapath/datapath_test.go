package datapath_test

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

func TestMain(m *testing.M) {
	testutil.RunClientIfChild()
	runCreateIfChild()
	runSetIfChild()
	os.Exit(m.Run())
}

// The VIP lives on lo of the test namespace with a server of its own, so a
// connection that is not rewritten lands visibly on "the VIP itself".
const vip = "198.18.100.1:80"

var servers = []string{"127.0.0.11:9001", "127.0.0.12:9001", "127.0.0.13:9002"}

func newDatapath(t *testing.T) *datapath.Datapath {
	t.Helper()
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatalf("create datapath: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	return dp
}

func aps(t *testing.T, ss ...string) []netip.AddrPort {
	t.Helper()
	var out []netip.AddrPort
	for _, s := range ss {
		out = append(out, netip.MustParseAddrPort(s))
	}
	return out
}

func TestRoundRobinAndScope(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12", "127.0.0.13", "198.18.100.1")
	testutil.StartServers(t, netns, append([]string{vip, "198.18.100.1:81"}, servers...)...)
	testutil.StartUDPEcho(t, netns, vip)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-rr", cg); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, servers...)}); err != nil {
		t.Fatal(err)
	}

	const n = 31
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: n})
	if r.Failed != 0 {
		t.Fatalf("%d of %d connects failed: %v", r.Failed, n, r.Errors)
	}
	for _, s := range servers {
		if got := r.PerServer[s]; got < n/3 || got > n/3+1 {
			t.Errorf("server %s got %d of %d connections, want %d±1 (all: %v)", s, got, n, n/3, r.PerServer)
		}
	}
	for i, p := range r.Peers {
		if p != vip {
			t.Errorf("connection %d: getpeername = %q, want the VIP %s", i, p, vip)
		}
	}
	// Consecutive connects go to distinct servers: rotation, not chance.
	for i := 1; i < len(r.Landed); i++ {
		if r.Landed[i] == r.Landed[i-1] {
			t.Errorf("connections %d and %d both went to %s", i-1, i, r.Landed[i])
		}
	}

	// Outside the cgroup nothing is rewritten.
	r = testutil.RunClient(t, netns, "", testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.PerServer[vip] != 3 {
		t.Errorf("client outside the cgroup: landed %v, want all 3 on the VIP itself", r.PerServer)
	}
	// Inside: another port of the VIP's address, another address, and UDP to
	// the VIP:port are untouched.
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: "198.18.100.1:81", Count: 3})
	if r.PerServer["198.18.100.1:81"] != 3 {
		t.Errorf("other port: landed %v, want all on 198.18.100.1:81", r.PerServer)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: servers[0], Count: 3})
	if r.PerServer[servers[0]] != 3 {
		t.Errorf("direct server address: landed %v, want all on %s", r.PerServer, servers[0])
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "udp", Target: vip, Count: 3})
	if r.PerServer[vip] != 3 {
		t.Errorf("UDP to the VIP: answered by %v (errors %v), want all by the VIP itself", r.PerServer, r.Errors)
	}

	// The kernel's counters agree with what the client saw.
	stats, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]datapath.ServerStats{}
	for _, s := range stats {
		got[s.Server.String()] = s
	}
	for _, s := range servers {
		want := uint64(n / 3)
		if c := got[s].Connects; c < want || c > want+1 {
			t.Errorf("stats %s: connects = %d, want %d±1", s, c, want)
		}
		if o := got[s].Open; o != 0 {
			t.Errorf("stats %s: open = %d after every socket closed, want 0", s, o)
		}
	}
}

func TestOpenConnectionCounts(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-open", cg); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 6})
	if r := c.Result(t); r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 3, "127.0.0.12:9001": 3})
	c.Stop(t)
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
}

// assertOpen waits briefly for the open counts: release runs as the client's
// sockets are freed, just after it exits.
func assertOpen(t *testing.T, dp *datapath.Datapath, want map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		stats, err := dp.Stats()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int64{}
		for _, s := range stats {
			got[s.Server.String()] = s.Open
		}
		ok := true
		for k, v := range want {
			if got[k] != v {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("open connections = %v, want %v", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAtomicReplacement(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	setA := []string{"127.0.0.21:9000", "127.0.0.22:9000"}
	setB := []string{"127.0.0.23:9000", "127.0.0.24:9000", "127.0.0.25:9001"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25")
	testutil.StartServers(t, netns, append(setA, setB...)...)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-storm", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)
	sets := [][]netip.AddrPort{aps(t, setA...), aps(t, setB...)}
	if err := dp.SetService(datapath.Service{VIP: v, Servers: sets[0]}); err != nil {
		t.Fatal(err)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 4, Count: 50000, Duration: time.Minute})
	start := time.Now()
	const swaps = 1000
	for i := 1; i <= swaps; i++ {
		if err := dp.SetService(datapath.Service{VIP: v, Servers: sets[i%2]}); err != nil {
			t.Fatalf("replacement %d: %v", i, err)
		}
	}
	elapsed := time.Since(start)
	r := c.Finish(t)
	t.Logf("%d replacements in %v; %d connects during them, %d failed; per server %v", swaps, elapsed, r.Total, r.Failed, r.PerServer)
	if r.Failed != 0 {
		t.Errorf("%d of %d connects failed during replacement: %v", r.Failed, r.Total, r.Errors)
	}
	members := map[string]bool{}
	for _, s := range append(setA, setB...) {
		members[s] = true
	}
	for s, n := range r.PerServer {
		if !members[s] {
			t.Errorf("%d connections landed on %q, a member of neither set", n, s)
		}
	}
	if r.Total < 100 {
		t.Errorf("only %d connects ran during the replacements: the storm did not overlap them", r.Total)
	}
}

func TestEmptySetPolicy(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "198.18.100.1")
	testutil.StartServers(t, netns, vip)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-empty", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)

	if err := dp.SetService(datapath.Service{VIP: v, Empty: datapath.EmptyReject}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 3 || !strings.Contains(strings.Join(r.Errors, " "), "connection refused") {
		t.Errorf("reject: failed %d of 3 with %v, want every connect refused", r.Failed, r.Errors)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reject: three connects took %v; they should fail at once", d)
	}

	if err := dp.SetService(datapath.Service{VIP: v, Empty: datapath.EmptyPassthrough}); err != nil {
		t.Fatal(err)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.PerServer[vip] != 3 {
		t.Errorf("passthrough: landed %v (errors %v), want all 3 on the VIP itself", r.PerServer, r.Errors)
	}
}

func TestAdoptPinnedState(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	svc := datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, servers...), Empty: datapath.EmptyPassthrough}
	if err := dp.SetService(svc); err != nil {
		t.Fatal(err)
	}
	dp.Close()

	for _, open := range []func(string) (*datapath.Datapath, error){datapath.Create, datapath.Open} {
		dp, err := open(dir)
		if err != nil {
			t.Fatalf("adopt: %v", err)
		}
		got, ok, err := dp.Service(svc.VIP)
		if err != nil || !ok {
			t.Fatalf("adopted service: ok=%v err=%v", ok, err)
		}
		if fmt.Sprint(got) != fmt.Sprint(svc.Normalized()) {
			t.Errorf("adopted service = %v, want %v", got, svc)
		}
		dp.Close()
	}
}

func TestRefuseOtherLayout(t *testing.T) {
	t.Run("newer version name", func(t *testing.T) {
		dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		pinDummy(t, filepath.Join(dir, "ctlb_services_v3"))
		_, err := datapath.Create(dir)
		if !errors.Is(err, datapath.ErrLayout) || !strings.Contains(err.Error(), "ctlb_services_v3") {
			t.Fatalf("Create over a v3 pin: err = %v, want ErrLayout naming the pin", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "ctlb_services_v2")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("refused Create still pinned something: %v", err)
		}
	})
	t.Run("same name other format", func(t *testing.T) {
		dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		pinDummy(t, filepath.Join(dir, "ctlb_open_v2"))
		_, err := datapath.Create(dir)
		if !errors.Is(err, datapath.ErrLayout) {
			t.Fatalf("Create over a foreign ctlb_open_v2: err = %v, want ErrLayout", err)
		}
	})
	t.Run("nothing pinned", func(t *testing.T) {
		dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
		_, err := datapath.Open(dir)
		if !errors.Is(err, datapath.ErrNotPinned) {
			t.Fatalf("Open of an empty dir: err = %v, want ErrNotPinned", err)
		}
	})
	t.Run("not a bpffs", func(t *testing.T) {
		_, err := datapath.Create(t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
			t.Fatalf("Create on tmpfs: err = %v, want a bpffs error", err)
		}
	})
}

func pinDummy(t *testing.T, path string) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
}

func TestAttachments(t *testing.T) {
	dp := newDatapath(t)
	cg := testutil.NewCgroup(t, "")
	a, err := dp.Attach("pod-a", cg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Attach("pod-a", cg); err != nil {
		t.Fatalf("second Attach of the same ID and cgroup: %v", err)
	}
	other := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-a", other); err == nil {
		t.Fatal("Attach of an existing ID to another cgroup succeeded")
	}
	list, err := dp.Attachments()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != "pod-a" || list[0].CgroupPath != cg || !list[0].Alive || list[0].CgroupID != a.CgroupID {
		t.Fatalf("attachments = %+v, want pod-a alive on %s", list, cg)
	}
	if err := dp.Detach("pod-a"); err != nil {
		t.Fatal(err)
	}
	if err := dp.Detach("pod-a"); !errors.Is(err, datapath.ErrNoAttachment) {
		t.Fatalf("second Detach: %v, want ErrNoAttachment", err)
	}
	if list, _ := dp.Attachments(); len(list) != 0 {
		t.Fatalf("attachments after detach = %+v", list)
	}
	for _, bad := range []string{"", "../x", ".hidden", "a/b", strings.Repeat("x", 129)} {
		if _, err := dp.Attach(bad, cg); err == nil {
			t.Errorf("Attach with ID %q succeeded", bad)
		}
	}

	// A cgroup that dies under its attachment is reported dead.
	dying := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-dying", dying); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(dying); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		a, err := dp.Attachment("pod-dying")
		if err != nil {
			t.Fatal(err)
		}
		if !a.Alive {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("attachment of a removed cgroup still alive: %+v", a)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := dp.Detach("pod-dying"); err != nil {
		t.Fatalf("detach of a dead cgroup's attachment: %v", err)
	}
}

func TestValidate(t *testing.T) {
	good := aps(t, "127.0.0.1:80")
	many := make([]netip.AddrPort, datapath.MaxServers+1)
	for i := range many {
		many[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 1, byte(i >> 8), byte(i)}), 80)
	}
	cases := []struct {
		name string
		svc  datapath.Service
		want string
	}{
		{"ipv6 VIP, ipv4 server", datapath.Service{VIP: netip.MustParseAddrPort("[2001:2::1]:80"), Servers: good}, "VIP [2001:2::1]:80 is IPv6, server 127.0.0.1:80 is IPv4"},
		{"ipv4 VIP, ipv6 server", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Servers: aps(t, "[2001:2::11]:80")}, "server [2001:2::11]:80 is IPv6"},
		{"v4-mapped VIP", datapath.Service{VIP: netip.MustParseAddrPort("[::ffff:198.18.0.1]:80"), Servers: good}, "v4-mapped"},
		{"sctp", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Protocol: "sctp", Servers: good}, `protocol "sctp"`},
		{"udp port 0", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:0"), Protocol: datapath.UDP, Servers: good}, "port 0"},
		{"bad balance", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Balance: "fastest", Servers: good}, `balance "fastest"`},
		{"unspecified VIP", datapath.Service{VIP: netip.MustParseAddrPort("0.0.0.0:80"), Servers: good}, "not a unicast"},
		{"broadcast VIP", datapath.Service{VIP: netip.MustParseAddrPort("255.255.255.255:80"), Servers: good}, "not a unicast"},
		{"port 0", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:0"), Servers: good}, "port 0"},
		{"duplicate", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Servers: aps(t, "127.0.0.1:80", "127.0.0.1:80")}, "listed twice"},
		{"too many", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Servers: many}, "at most 1024"},
		{"bad policy", datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:80"), Servers: good, Empty: "drop"}, `"drop"`},
	}
	for _, c := range cases {
		err := c.svc.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one containing %q", c.name, err, c.want)
		}
	}
}

func TestSetServicesBulk(t *testing.T) {
	dp := newDatapath(t)
	var svcs []datapath.Service
	for i := 0; i < 2000; i++ {
		svcs = append(svcs, datapath.Service{
			VIP:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), 80),
			Servers: []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(i >> 8), byte(i)}), 8080)},
		})
	}
	start := time.Now()
	if err := dp.SetServices(svcs); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d VIPs set in %v", len(svcs), time.Since(start))
	got, err := dp.Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(svcs) {
		t.Fatalf("%d services in the map, want %d", len(got), len(svcs))
	}
	for i, s := range got {
		if fmt.Sprint(s.Servers) != fmt.Sprint(svcs[i].Servers) {
			t.Fatalf("service %s = %v, want %v", s.VIP, s.Servers, svcs[i].Servers)
		}
	}
	// One bad service refuses the whole batch before anything is written.
	bad := []datapath.Service{
		{VIP: netip.MustParseAddrPort("198.18.200.1:80"), Servers: aps(t, "127.0.0.1:80")},
		{VIP: netip.MustParseAddrPort("198.18.200.2:0"), Servers: aps(t, "127.0.0.1:80")},
	}
	if err := dp.SetServices(bad); err == nil {
		t.Fatal("a batch with an invalid VIP was accepted")
	}
	if _, ok, _ := dp.Service(bad[0].VIP); ok {
		t.Fatal("the valid half of a refused batch was written")
	}
}

// TestOnlyVIPsAreRewritten dials 1,000 random local destinations from an
// attached cgroup, many of them near misses of a configured VIP (its address
// with other ports, its port on other addresses), and checks that each lands
// exactly where it was sent: catch-all listeners report the local address
// each connection arrived at.
func TestOnlyVIPsAreRewritten(t *testing.T) {
	dp := newDatapath(t)
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "198.18.100.1", "127.0.0.11")
	ports := []int{80, 81, 443, 8080, 8502, 9000, 9001, 12345}
	for _, p := range ports {
		startLocalAddrServer(t, netns, fmt.Sprintf("0.0.0.0:%d", p))
	}
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("test-scope", cg); err != nil {
		t.Fatal(err)
	}
	// Configured: the VIP on port 80, and a decoy VIP on an address nobody dials.
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort("198.19.9.9:8502"), Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var targets []string
	for len(targets) < 1000 {
		p := ports[rng.IntN(len(ports))]
		var ip string
		switch rng.IntN(3) {
		case 0: // the VIP's own address, any port but the VIP's
			if p == 80 {
				continue
			}
			ip = "198.18.100.1"
		default: // anywhere in 127/8, including the VIP's port
			ip = fmt.Sprintf("127.%d.%d.%d", rng.IntN(256), rng.IntN(256), 1+rng.IntN(254))
		}
		targets = append(targets, fmt.Sprintf("%s:%d", ip, p))
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Targets: targets})
	if r.Failed != 0 {
		t.Fatalf("%d of %d connects failed: %v", r.Failed, len(targets), r.Errors)
	}
	touched := 0
	for i, got := range r.Landed {
		if got != targets[i] {
			touched++
			if touched < 10 {
				t.Errorf("dialed %s, landed on %s", targets[i], got)
			}
		}
	}
	t.Logf("%d random non-VIP destinations dialed from an attached cgroup, %d rewritten", len(targets), touched)
	// And the VIP itself still is rewritten.
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 1})
	if len(r.Landed) != 1 || r.Landed[0] != "127.0.0.11:9001" {
		t.Fatalf("the VIP landed on %v, want 127.0.0.11:9001", r.Landed)
	}
}

// startLocalAddrServer accepts on addr and tells each client the local
// address its connection arrived at.
func startLocalAddrServer(t *testing.T, netns ns.NetNS, addr string) {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, c.LocalAddr().String()+"\n")
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
}

// TestProgramUpgradeKeepsAttachments plays an upgrade: the pinned connect4
// is an "old" program (here one that rewrites nothing) and a new loader
// finds it. It must switch the existing attachment's link to the embedded
// program in place: the same link, the attachment never detached, and
// connections rewritten again.
func TestProgramUpgradeKeepsAttachments(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "198.18.100.1")
	testutil.StartServers(t, netns, "127.0.0.11:9001", vip)
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-up", cg); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	dp.Close()

	// Install the "old" program: in the link and in the program pin.
	old, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	linkPin := filepath.Join(dir, "links", "pod-up", "connect4")
	l, err := link.LoadPinnedLink(linkPin, nil)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := l.Info()
	linkID := info.ID
	if err := l.Update(old); err != nil {
		t.Fatal(err)
	}
	l.Close()
	progPin := filepath.Join(dir, "ctlb_connect4_v2")
	if err := os.Remove(progPin); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(progPin); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 2})
	if r.PerServer[vip] != 2 {
		t.Fatalf("with the old program: landed %v, want the VIP itself (no rewrite)", r.PerServer)
	}

	dp, err = datapath.Create(dir)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	defer dp.Close()
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 2})
	if r.PerServer["127.0.0.11:9001"] != 2 {
		t.Fatalf("after the upgrade: landed %v, want the server", r.PerServer)
	}
	l, err = link.LoadPinnedLink(linkPin, nil)
	if err != nil {
		t.Fatalf("link pin after upgrade: %v", err)
	}
	info, _ = l.Info()
	l.Close()
	if info.ID != linkID {
		t.Errorf("link ID %d after upgrade, was %d: re-created, not updated", info.ID, linkID)
	}
	pinned, err := ebpf.LoadPinnedProgram(progPin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	pi, _ := pinned.Info()
	oi, _ := old.Info()
	if pi.Tag == oi.Tag {
		t.Error("the program pin still holds the old program")
	}
	// A later open adopts (same tag): no second upgrade, links untouched.
	dp2, err := datapath.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	dp2.Close()
	if entries, _ := os.ReadDir(dir); len(entries) != 9+10+2 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("pin directory holds %v, want 9 maps, 10 programs, the root link and links/", names)
	}
}

// TestMapPinsRecoveredFromPrograms: map pins removed while no daemon held
// the maps are taken back from the programs that use them, so a restarted
// daemon writes to the maps the attached programs read, not to new ones.
func TestMapPinsRecoveredFromPrograms(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	cg := testutil.NewCgroup(t, "")
	if _, err := dp.Attach("pod-r", cg); err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddrPort(vip)
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, "127.0.0.11:9001")}); err != nil {
		t.Fatal(err)
	}
	dp.Close()
	for _, name := range []string{"ctlb_services_v2", "ctlb_counters_v2", "ctlb_svcstate_v2", "ctlb_slots_v2"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	// Program pins gone too: the links alone lead to the maps.
	if err := os.Remove(filepath.Join(dir, "ctlb_connect4_v2")); err != nil {
		t.Fatal(err)
	}

	dp, err = datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if got, ok, err := dp.Service(v); err != nil || !ok || len(got.Servers) != 1 {
		t.Fatalf("service after recovery = %+v, %v, %v; want the old set", got, ok, err)
	}
	// A change through the new handle reaches the attached pod.
	if err := dp.SetService(datapath.Service{VIP: v, Servers: aps(t, "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 2})
	if r.PerServer["127.0.0.12:9001"] != 2 {
		t.Fatalf("after recovery and a change: landed %v, want the new server (split maps?)", r.PerServer)
	}
}
