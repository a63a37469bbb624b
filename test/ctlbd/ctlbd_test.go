package ctlbd_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

const vip = "198.19.0.1:8502"

var servers = []string{"127.0.0.31:8502", "127.0.0.32:8502", "127.0.0.33:9000"}

// pod is a test "pod": a network namespace holding the servers (on lo /32s)
// and a cgroup attached through the CLI.
func newPod(t *testing.T, d *ctlbdtest.Daemon) (ns.NetNS, string) {
	t.Helper()
	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.31", "127.0.0.32", "127.0.0.33")
	testutil.StartServers(t, netns, servers...)
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)
	return netns, cg
}

func TestCLIServicesAndStatus(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	out := d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	if !strings.Contains(out, "3 servers") {
		t.Errorf("service set output %q", out)
	}
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	if len(svcs) != 1 || svcs[0].VIP.String() != vip || fmt.Sprint(svcs[0].Servers) != "["+strings.Join(servers, " ")+"]" || svcs[0].Empty != string(datapath.EmptyReject) {
		t.Fatalf("service list = %+v", svcs)
	}
	if rows := lines(d.MustCLI("service", "list")); len(rows) != 2 || rows[1][0] != vip {
		t.Errorf("service list table = %v", rows)
	}

	netns := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.31", "127.0.0.32", "127.0.0.33")
	testutil.StartServers(t, netns, servers...)
	cg := testutil.NewCgroup(t, "")
	var att api.Attachment
	d.JSON(&att, "attach", "--cgroup", cg)
	if att.CgroupPath != cg || !att.Alive {
		t.Fatalf("attach = %+v", att)
	}
	var atts []api.Attachment
	d.JSON(&atts, "attachments")
	if len(atts) != 1 || atts[0].ID != att.ID {
		t.Fatalf("attachments = %+v", atts)
	}

	// 9 connections closed, then 6 held open.
	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 9})
	if r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 6})
	if r := c.Result(t); r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	var st api.Status
	d.JSON(&st, "status")
	if len(st.Services) != 1 || len(st.Services[0].Servers) != 3 || st.Attachments != 1 {
		t.Fatalf("status = %+v", st)
	}
	for _, s := range st.Services[0].Servers {
		if s.Connects != 5 || s.Open != 2 || !s.InSet {
			t.Errorf("status %s: connects %d open %d inSet %v, want 5, 2, true", s.Server, s.Connects, s.Open, s.InSet)
		}
		if s.Attempts != 5 || s.Established != 5 || s.Failed != 0 {
			t.Errorf("status %s: attempts %d established %d failed %d, want 5, 5, 0", s.Server, s.Attempts, s.Established, s.Failed)
		}
	}
	if st.Services[0].Protocol != "tcp" {
		t.Errorf("status protocol %q, want tcp", st.Services[0].Protocol)
	}
	if !strings.Contains(d.MustCLI("status"), "127.0.0.31:8502") {
		t.Error("status table does not name the servers")
	}
	// A VIP without servers sorts first: the rows after its short row keep
	// their columns under the header's, in both table forms.
	d.MustCLI("service", "set", "198.19.0.0:1")
	for _, args := range [][]string{{"status"}, {"status", "-o", "wide"}} {
		table := strings.Split(d.MustCLI(args...), "\n")
		col := strings.Index(table[0], "ENDED")
		rows := 0
		for _, row := range table[1:] {
			if !strings.Contains(row, "127.0.0.3") {
				continue
			}
			rows++
			if col < 0 || len(row) <= col || row[col-1] != ' ' || !strings.ContainsAny(row[col:col+1], "0123456789") {
				t.Errorf("%v: row %q out of line with header %q", args, row, table[0])
			}
		}
		if rows != 3 {
			t.Errorf("%v: %d server rows, want 3:\n%s", args, rows, strings.Join(table, "\n"))
		}
	}
	if !strings.Contains(d.MustCLI("status", "-o", "wide"), "FAIL MARKS") {
		t.Error("status -o wide has no more columns than the table")
	}
	if !strings.Contains(d.MustCLI("service", "list", "-o", "wide"), "ON SERVER REMOVED") {
		t.Error("service list -o wide has no more columns than the table")
	}
	d.MustCLI("service", "delete", "198.19.0.0:1")
	c.Stop(t)
	deadline := time.Now().Add(5 * time.Second)
	for {
		d.JSON(&st, "status")
		open := int64(0)
		for _, s := range st.Services[0].Servers {
			open += s.Open
		}
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("open connections still %d after the client closed them: %+v", open, st)
		}
		time.Sleep(20 * time.Millisecond)
	}

	d.MustCLI("detach", "--cgroup", cg)
	d.JSON(&atts, "attachments")
	if len(atts) != 0 {
		t.Fatalf("attachments after detach = %+v", atts)
	}
	d.MustCLI("service", "delete", vip)
	d.JSON(&svcs, "service", "list")
	if len(svcs) != 0 {
		t.Fatalf("service list after delete = %+v", svcs)
	}
	var v struct{ Client, Daemon *api.Version }
	d.JSON(&v, "version")
	if v.Client == nil || v.Daemon == nil || v.Daemon.Layout != datapath.Layout {
		t.Fatalf("version = %+v", v)
	}
	// Socket is the daemon's and root's only.
	if fi, err := os.Stat(d.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, %v; want 0600", fi.Mode(), err)
	}
}

func TestDaemonKilledDataPathKeepsWorking(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	netns, cg := newPod(t, d)
	servicesID := pinnedMapID(t, d.BPFFS, "ctlb_services_v2")

	storm := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 20000, Duration: time.Minute})
	time.Sleep(200 * time.Millisecond)
	d.Kill()
	// No daemon: connections must keep landing on the servers.
	time.Sleep(time.Second)
	down := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	// The storm shares the round-robin counter, so only membership is exact.
	if down.Failed != 0 {
		t.Fatalf("while ctlbd was down: %d failed (%v)", down.Failed, down.Errors)
	}
	for s := range down.PerServer {
		if !contains(servers, s) {
			t.Fatalf("while ctlbd was down: landed on %q, not a server", s)
		}
	}
	d.Start()
	r := storm.Finish(t)
	t.Logf("storm across the SIGKILL and restart: %d connects, %d failed, per server %v", r.Total, r.Failed, r.PerServer)
	if r.Failed != 0 {
		t.Errorf("%d of %d connects failed across the daemon's death: %v", r.Failed, r.Total, r.Errors)
	}
	for s := range r.PerServer {
		if !contains(servers, s) {
			t.Errorf("connections landed on %q, not a server", s)
		}
	}

	// The restarted daemon adopted the pins instead of re-creating them.
	if id := pinnedMapID(t, d.BPFFS, "ctlb_services_v2"); id != servicesID {
		t.Errorf("services map ID %d after restart, was %d: re-created, not adopted", id, servicesID)
	}
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	if len(svcs) != 1 || len(svcs[0].Servers) != 3 {
		t.Fatalf("service list after restart = %+v", svcs)
	}
	var atts []api.Attachment
	d.JSON(&atts, "attachments")
	if len(atts) != 1 || atts[0].CgroupPath != cg {
		t.Fatalf("attachments after restart = %+v", atts)
	}

	// SIGTERM leaves the data path too.
	d.Stop()
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 0 {
		t.Fatalf("after SIGTERM: %v", r.Errors)
	}
}

func pinnedMapID(t *testing.T, dir, name string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func TestBadInputChangesNothing(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)
	v1 := testutil.V2Mount(t)
	outside := t.TempDir()

	snapshot := func() string {
		return d.MustCLI("service", "list", "-o", "json") + d.MustCLI("attachments", "-o", "json")
	}
	before := snapshot()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.300:80"}, `"127.0.0.300:80"`},
		{[]string{"service", "set", "198.19.0.1:8502", "not-an-address"}, `"not-an-address"`},
		{[]string{"service", "set", "198.19.0.1:65536", "127.0.0.1:80"}, `"198.19.0.1:65536"`},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:0"}, "127.0.0.1:0"},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:70000"}, `"127.0.0.1:70000"`},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:80", "127.0.0.1:80"}, "127.0.0.1:80 is listed twice"},
		{[]string{"service", "set", "[2001:2::1]:8502", "127.0.0.1:80"}, "VIP [2001:2::1]:8502 is IPv6, server 127.0.0.1:80 is IPv4"},
		{[]string{"service", "set", "198.19.0.1:8502", "[2001:2::11]:80"}, "server [2001:2::11]:80 is IPv6"},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:80", "--protocol", "sctp"}, `protocol "sctp"`},
		{[]string{"service", "set", "198.19.0.1:0", "127.0.0.1:80", "--protocol", "udp"}, "198.19.0.1:0"},
		{[]string{"service", "set", "[::ffff:198.19.0.1]:8502", "127.0.0.1:80"}, "v4-mapped"},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:80", "--balance", "fastest"}, `"fastest"`},
		{[]string{"service", "delete", vip, "--protocol", "sctp"}, `"sctp"`},
		{[]string{"service", "delete", vip, "--protocol", "udp"}, vip + "/udp is not configured"},
		{[]string{"service", "set", "[2001:2::1]:8502", "127.0.0.1:80"}, "a VIP and its servers are of one family"},
		{[]string{"service", "set", "[::ffff:198.19.0.1]:8502", "127.0.0.1:80"}, "::ffff:198.19.0.1"},
		{[]string{"service", "set", "0.0.0.0:8502", "127.0.0.1:80"}, "0.0.0.0:8502"},
		{[]string{"service", "set", "255.255.255.255:80", "127.0.0.1:80"}, "255.255.255.255:80"},
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:80", "--empty", "drop"}, `"drop"`},
		{[]string{"service", "delete", "198.19.0.9:1"}, "198.19.0.9:1 is not configured"},
		{[]string{"attach", "--cgroup", outside}, "outside the cgroup v2 mount"},
		{[]string{"attach", "--cgroup", "/sys/fs/cgroup/cpu"}, "outside the cgroup v2 mount"},
		{[]string{"attach", "--cgroup", "/"}, "cgroup v2 root"},
		{[]string{"attach", "--cgroup", v1}, "cgroup v2 root"},
		{[]string{"attach", "--cgroup", cg + "/../.."}, `".."`},
		{[]string{"attach", "--cgroup", cg + "/missing"}, "does not exist"},
		{[]string{"detach", "--cgroup", cg + "/missing"}, "no attachment"},
		{[]string{"status", "-o", "xml"}, `"xml"`},
		// A bad -o is refused before the change, not after it.
		{[]string{"service", "set", "198.19.0.1:8502", "127.0.0.1:80", "-o", "jsn"}, `"jsn"`},
		{[]string{"service", "delete", vip, "-o", "jsn"}, `"jsn"`},
		{[]string{"attach", "--cgroup", testutil.NewCgroup(t, ""), "-o", "jsn"}, `"jsn"`},
		{[]string{"service", "bogus"}, `unknown command "bogus"`},
		{[]string{"service", "set", "198.19.0.1:8502", "198.19.0.1:8502"}, "is the VIP itself"},
	}
	for _, c := range cases {
		_, errOut, code := d.CLI(c.args...)
		if code == 0 {
			t.Errorf("ctlbd %s: exit 0, want failure", strings.Join(c.args, " "))
			continue
		}
		if !strings.Contains(errOut, c.want) {
			t.Errorf("ctlbd %s: stderr %q, want it to name %s", strings.Join(c.args, " "), errOut, c.want)
		}
	}
	if after := snapshot(); after != before {
		t.Errorf("state changed by rejected input:\nbefore %s\nafter  %s", before, after)
	}

	// The daemon is unreachable: a clear error, non-zero exit.
	_, errOut, code := run("--socket", filepath.Join(t.TempDir(), "none.sock"), "service", "list")
	if code == 0 || !strings.Contains(errOut, "not reachable") {
		t.Errorf("unreachable daemon: exit %d, %q", code, errOut)
	}
	// --socket names a directory: said so, not taken for a left-over socket.
	if _, errOut, code := run("--socket", t.TempDir(), "service", "list"); code == 0 || !strings.Contains(errOut, "not a socket") {
		t.Errorf("--socket naming a directory: exit %d, %q", code, errOut)
	}
}

func TestBadConfigRefused(t *testing.T) {
	dir := t.TempDir()
	bpffs := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	cases := map[string]string{
		`{"services": [{"vip": "198.19.0.1:80", "servers": ["127.0.0.1:80"], "wieght": 3}]}`: `"wieght"`,
		`{"services": [{"vip": "198.19.0.1:80", "servers": ["127.0.0.1:99999"]}]}`:           `"127.0.0.1:99999"`,
		`{"services": [{"vip": "198.19.0.1:80"}, {"vip": "198.19.0.1:80"}]}`:                 "configured twice",
		`{"logLevel": "loud"}`: `"loud"`,
		`{"services": [`:       "decode config",
	}
	for cfg, want := range cases {
		path := filepath.Join(dir, "ctlbd.json")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		_, errOut, code := run("run", "--config", path, "--bpffs", bpffs, "--socket", filepath.Join(dir, "s.sock"))
		if code == 0 || !strings.Contains(errOut, want) || !strings.Contains(errOut, path) || strings.Count(errOut, "config ") > 1 {
			t.Errorf("config %s: exit %d, stderr %q; want failure naming the file and %s, saying config once", cfg, code, errOut, want)
		}
	}
	// A wrong value from a flag is named as the flag, not as the file's.
	for flag, val := range map[string]string{"--log-level": "verbose", "--metrics": "bogus", "--state-dir": "relative"} {
		_, errOut, code := run("run", flag, val, "--bpffs", bpffs, "--socket", filepath.Join(dir, "s.sock"))
		if code == 0 || !strings.Contains(errOut, flag+`: "`+val+`"`) {
			t.Errorf("run %s %s: exit %d, stderr %q; want failure naming the flag", flag, val, code, errOut)
		}
	}
	if _, err := os.Stat(bpffs); !os.IsNotExist(err) {
		t.Errorf("a refused config still created %s: %v", bpffs, err)
	}
}

func TestConfigAndReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ctlbd.json")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"services": [
		{"vip": "198.19.0.1:8502", "servers": ["127.0.0.31:8502", "127.0.0.32:8502"]},
		{"vip": "198.19.0.2:80", "servers": [], "empty": "passthrough"}]}`)
	d := newDaemon(t, "--config", path)
	d.Start()
	want := map[string][]string{"198.19.0.1:8502": {"127.0.0.31:8502", "127.0.0.32:8502"}, "198.19.0.2:80": {}}
	assertServices(t, d, want)

	// A CLI change of a VIP the file defines holds until the next reload,
	// which puts the file's version back: the CLI says so when it makes it.
	var st api.Status
	d.JSON(&st, "status")
	for _, s := range st.Services {
		if !s.Config {
			t.Errorf("status: %s not marked as defined in the config file", s.VIP)
		}
	}
	for _, args := range [][]string{{"service", "set", "198.19.0.1:8502", "127.0.0.33:8502"}, {"service", "delete", "198.19.0.2:80"}} {
		if _, errOut, code := d.CLI(args...); code != 0 || !strings.Contains(errOut, "defined in the config file") {
			t.Errorf("ctlbd %v on a config VIP: exit %d, %q; want it done, with a warning", args, code, errOut)
		}
	}
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.33:8502"}})
	d.MustCLI("reload")
	assertServices(t, d, want)
	if _, errOut, code := d.CLI("service", "set", "198.19.0.9:80", "127.0.0.33:8502"); code != 0 || errOut != "" {
		t.Errorf("a VIP of the CLI's own: exit %d, stderr %q; want no warning", code, errOut)
	}
	d.MustCLI("service", "delete", "198.19.0.9:80")

	// A reload that drops one VIP and changes the other.
	write(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.33:9000"]}]}`)
	d.MustCLI("reload")
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.33:9000"}})

	// A bad config is rejected with the reason; the old one stays.
	write(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.33:9000"], "colour": "blue"}]}`)
	_, errOut, code := d.CLI("reload")
	if code == 0 || !strings.Contains(errOut, `"colour"`) || !strings.Contains(errOut, "old config kept") {
		t.Errorf("bad reload: exit %d, %q", code, errOut)
	}
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.33:9000"}})

	// SIGHUP does the same as reload.
	write(`{"services": [{"vip": "198.19.0.3:443", "servers": ["127.0.0.31:8502"]}]}`)
	if err := syscall.Kill(d.PID(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var svcs []api.Service
		d.JSON(&svcs, "service", "list")
		if len(svcs) == 1 && svcs[0].VIP.String() == "198.19.0.3:443" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP did not apply the new config: %+v", svcs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func assertServices(t *testing.T, d *ctlbdtest.Daemon, want map[string][]string) {
	t.Helper()
	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	got := map[string][]string{}
	for _, s := range svcs {
		ss := []string{}
		for _, srv := range s.Servers {
			ss = append(ss, srv.String())
		}
		got[s.VIP.String()] = ss
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("services = %v, want %v", got, want)
	}
}

func TestTwoDaemons(t *testing.T) {
	a := newDaemon(t)
	a.Start()
	b := newDaemon(t)
	b.Start()
	a.MustCLI("service", "set", vip, "127.0.0.31:8502")
	var svcs []api.Service
	b.JSON(&svcs, "service", "list")
	if len(svcs) != 0 {
		t.Fatalf("daemon b sees daemon a's services: %+v", svcs)
	}
	// A second daemon on a's bpffs is refused: one writer per map set.
	_, errOut, code := run("run", "--bpffs", a.BPFFS, "--socket", filepath.Join(t.TempDir(), "c.sock"))
	if code == 0 || !strings.Contains(errOut, "another ctlbd owns") {
		t.Fatalf("second daemon on the same bpffs: exit %d, %q", code, errOut)
	}
}

// TestCLIProtocolsAndIPv6: a UDP VIP and a TCP VIP on one address and port
// are two VIPs; an IPv6 VIP is set and listed; status and list show the
// protocol; delete --protocol udp removes only the UDP one.
func TestCLIProtocolsAndIPv6(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	netns := testutil.NewNetNS(t)
	udpServers := []string{"127.0.0.31:8600", "127.0.0.32:8600"}
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.31", "127.0.0.32", "127.0.0.33", "2001:2::11", "2001:2::12")
	testutil.StartServers(t, netns, servers...)
	for _, s := range udpServers {
		testutil.StartUDPEcho(t, netns, s)
	}
	v6servers := []string{"[2001:2::11]:9001", "[2001:2::12]:9001"}
	testutil.StartServers(t, netns, v6servers...)
	cg := testutil.NewCgroup(t, "")
	d.MustCLI("attach", "--cgroup", cg)

	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	out := d.MustCLI(append([]string{"service", "set", vip, "--protocol", "udp"}, udpServers...)...)
	if !strings.Contains(out, vip+"/udp") {
		t.Errorf("service set --protocol udp: %q, want it to name %s/udp", out, vip)
	}
	const v6vip = "[2001:2::100]:8502"
	d.MustCLI(append([]string{"service", "set", v6vip, "--balance", "least-open"}, v6servers...)...)

	var svcs []api.Service
	d.JSON(&svcs, "service", "list")
	got := map[string]string{}
	for _, s := range svcs {
		got[s.Key()] = fmt.Sprint(s.Servers) + " " + string(s.Balance)
	}
	want := map[string]string{
		vip:          "[" + strings.Join(servers, " ") + "] roundrobin",
		vip + "/udp": "[" + strings.Join(udpServers, " ") + "] roundrobin",
		v6vip:        "[" + strings.Join(v6servers, " ") + "] least-open",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("service list = %v, want %v", got, want)
	}
	if table := d.MustCLI("service", "list"); !strings.Contains(table, "udp") || !strings.Contains(table, "PROTOCOL") {
		t.Errorf("service list table shows no protocol:\n%s", table)
	}

	r := testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "udp", Target: vip, Count: 4})
	if r.Failed != 0 || r.PerServer[udpServers[0]] != 2 || r.PerServer[udpServers[1]] != 2 {
		t.Errorf("UDP to the VIP: %v (%v), want 2 on each UDP server", r.PerServer, r.Errors)
	}
	r = testutil.RunClient(t, netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 0 || len(r.PerServer) != 3 {
		t.Errorf("TCP to the same address and port: %v (%v), want the 3 TCP servers", r.PerServer, r.Errors)
	}
	// Least-open over held connections: 2 on each server (closed ones
	// leave ties, which it breaks at random).
	held := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: v6vip, Count: 4})
	r = held.Result(t)
	held.Stop(t)
	if r.Failed != 0 || r.PerServer[v6servers[0]] != 2 || r.PerServer[v6servers[1]] != 2 || r.Peers[0] != v6vip {
		t.Errorf("IPv6 VIP, least-open: %v peers %v (%v), want 2 on each IPv6 server and the VIP as peer", r.PerServer, r.Peers, r.Errors)
	}

	var st api.Status
	d.JSON(&st, "status")
	protos := map[string]uint64{}
	for _, s := range st.Services {
		for _, srv := range s.Servers {
			protos[s.VIP+"/"+s.Protocol] += srv.Attempts
		}
	}
	if protos[vip+"/udp"] != 4 || protos[vip+"/tcp"] != 3 || protos[v6vip+"/tcp"] != 4 {
		t.Errorf("status attempts by VIP and protocol = %v, want udp 4, tcp 3, IPv6 4", protos)
	}
	if table := d.MustCLI("status"); !strings.Contains(table, "ESTABLISHED") || !strings.Contains(table, "udp") {
		t.Errorf("status table lacks protocol or outcome columns:\n%s", table)
	}

	d.MustCLI("service", "delete", vip, "--protocol", "udp")
	d.JSON(&svcs, "service", "list")
	if len(svcs) != 2 {
		t.Errorf("after deleting the UDP VIP: %+v, want the TCP and IPv6 VIPs", svcs)
	}
}

// TestOutputFormats: every listing prints as table, json and yaml, the
// yaml with the API's field names.
func TestOutputFormats(t *testing.T) {
	// mount-bpffs prints -o json too (it needs no daemon).
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	var mounted struct{ Dir string }
	if out, errOut, code := run("mount-bpffs", "--bpffs", dir, "-o", "json"); code != 0 || json.Unmarshal([]byte(out), &mounted) != nil || mounted.Dir != dir {
		t.Errorf("mount-bpffs -o json: exit %d, %q, %q", code, out, errOut)
	}
	d := newDaemon(t)
	d.Start()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
	out := d.MustCLI("service", "list", "-o", "yaml")
	for _, want := range []string{"vip: " + vip, "empty: reject", "servers:", "- " + servers[0]} {
		if !strings.Contains(out, want) {
			t.Errorf("service list -o yaml = %q, want it to contain %q", out, want)
		}
	}
	for _, args := range [][]string{{"status"}, {"attachments"}, {"version"}} {
		if out := d.MustCLI(append(args, "-o", "yaml")...); strings.TrimSpace(out) == "" || strings.HasPrefix(strings.TrimSpace(out), "{") {
			t.Errorf("%v -o yaml = %q, want YAML", args, out)
		}
	}
}

// The config file is the truth for the VIPs it defines, across restarts
// and rejected reloads: a VIP taken out of the file while ctlbd was down is
// gone once ctlbd is back (the maps outlive the daemon; the state dir's
// ledger says which VIPs were the file's), a reload that fails (a health
// TLS file missing) writes nothing, and a VIP set through the CLI is never
// the file's to remove.
func TestConfigIsTruthAcrossRestartsAndRejectedReloads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctlbd.json")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"services": [
		{"vip": "198.19.0.1:8502", "servers": ["127.0.0.31:8502"]},
		{"vip": "198.19.0.2:80", "servers": ["127.0.0.32:8502"]}]}`)
	d := newDaemon(t, "--config", path, "--no-config-watch")
	d.Start()
	d.MustCLI("service", "set", "198.19.0.9:80", "127.0.0.33:8502") // the CLI's own
	d.Stop()

	// Taken out while ctlbd is down.
	write(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.31:8502"]}]}`)
	d.Start()
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.31:8502"}, "198.19.0.9:80": {"127.0.0.33:8502"}})

	// A reload that cannot be applied changes nothing: not the new VIP,
	// not the changed policy of another.
	write(`{"services": [
		{"vip": "198.19.0.1:8502", "servers": ["127.0.0.31:8502"], "empty": "passthrough"},
		{"vip": "198.19.0.3:80", "servers": ["127.0.0.32:8502"],
		 "health": {"type": "grpc", "tls": {"caFile": "/nonexistent/ca.pem"}}}]}`)
	_, errOut, code := d.CLI("reload")
	if code == 0 || !strings.Contains(errOut, "ca.pem") {
		t.Fatalf("reload with a missing TLS file: exit %d, %q; want it rejected, naming the file", code, errOut)
	}
	if !strings.Contains(errOut, "services[1]") {
		t.Errorf("rejected reload says %q; want it to name services[1]", errOut)
	}
	var list []api.Service
	d.JSON(&list, "service", "list")
	for _, s := range list {
		if s.VIP.String() == "198.19.0.3:80" {
			t.Errorf("rejected reload wrote its new VIP anyway: %+v", s)
		}
		if s.VIP.String() == "198.19.0.1:8502" && s.Empty != "reject" {
			t.Errorf("rejected reload changed another VIP's policy: %+v", s)
		}
	}
}

// A SIGHUP that reaches ctlbd while it is still starting (a config
// management tool reloading right after a restart) does not end it: the
// reload waits until it serves. Sent here once ctlbd has mounted its
// bpffs, before it adopts the pins.
func TestSighupDuringStart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "bpf")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(dir, "ctlb") // not on a bpffs: ctlbd mounts one there
	t.Cleanup(func() {
		if err := syscall.Unmount(pins, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", pins, err)
		}
	})
	d := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, BPFFS: pins})
	d.Launch()
	testutil.Eventually(t, "ctlbd to mount its bpffs", 10*time.Second, func() (bool, string) {
		return strings.Contains(d.Logs(), "mounted bpffs") || !d.Running(), d.LogTail(400)
	})
	if err := syscall.Kill(d.PID(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := d.TryReady(); err != nil {
		t.Fatalf("after a SIGHUP during start: %v", err)
	}
	testutil.Eventually(t, "the reload asked for during start", 10*time.Second, func() (bool, string) {
		return strings.Contains(d.Logs(), "reload"), d.LogTail(400)
	})
}

// A reload applies the services; the daemon's own settings keep their
// running values until a restart, and the reload names those the file
// changed: none when only flags (the harness's --bpffs, --socket,
// --state-dir) differ from the file, every one the file changed otherwise.
func TestReloadNamesRestartOnlySettings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctlbd.json")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.31:8502"]}]}`)
	d := newDaemon(t, "--config", path, "--no-config-watch")
	d.Start()
	const warning = "keep their running values"
	write(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.32:8502"]}]}`)
	d.MustCLI("reload")
	if strings.Contains(d.Logs(), warning) {
		t.Errorf("a reload that changed only a service warned about restart-only settings:\n%s", d.LogTail(20))
	}
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.32:8502"}})
	write(`{"logLevel": "error", "reconcileInterval": "9s",
		"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.33:8502"]}]}`)
	d.MustCLI("reload")
	logs := d.Logs()
	if !strings.Contains(logs, warning) || !strings.Contains(logs, "logLevel") || !strings.Contains(logs, "reconcileInterval") {
		t.Errorf("a reload that changed logLevel and reconcileInterval did not name them:\n%s", d.LogTail(20))
	}
	assertServices(t, d, map[string][]string{"198.19.0.1:8502": {"127.0.0.33:8502"}})
}

// A daemon refused at start for its socket or its state directory touches
// nothing first: before, it had created every pin in its bpffs, attached
// another sock_release at the cgroup v2 root and written the config's VIPs
// by the time the socket was looked at.
func TestRefusedStartTouchesNothing(t *testing.T) {
	a := newDaemon(t)
	a.Start()
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"socket taken", []string{"--socket", a.Socket}, "another daemon is listening"},
		{"state dir unusable", []string{"--socket", filepath.Join(t.TempDir(), "b.sock"), "--state-dir", filepath.Join(file, "state")}, "--state-dir"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pins := filepath.Join(testutil.MountBPFFS(t), "ctlb")
			_, errOut, code := run(append([]string{"run", "--bpffs", pins}, c.args...)...)
			if code == 0 || !strings.Contains(errOut, c.want) {
				t.Fatalf("exit %d, %q; want it refused with %q", code, errOut, c.want)
			}
			if ents, err := os.ReadDir(pins); err == nil && len(ents) > 0 {
				var names []string
				for _, e := range ents {
					names = append(names, e.Name())
				}
				t.Errorf("the refused daemon left pins in its bpffs: %v", names)
			}
		})
	}
}

// The config ledger is the config file's, and one bpffs's: a `ctlbd run`
// without a config file removes none of the VIPs a config put in the maps
// (it has no file to be the truth), and two daemons side by side (their
// own bpffs and socket) sharing a state directory keep their own ledgers:
// a VIP one of them set through the CLI is never the other's config's to
// remove.
func TestConfigLedgerIsTheFilesAndTheBPFFSs(t *testing.T) {
	svc := func(vip, server string) map[string]any {
		return map[string]any{"services": []any{map[string]any{"vip": vip, "servers": []string{server}}}}
	}
	t.Run("no config file", func(t *testing.T) {
		d1 := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Config: svc("198.19.0.1:8502", "127.0.0.31:8502")})
		d1.Start()
		d1.Stop()
		d2 := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, BPFFS: d1.BPFFS, StateDir: d1.StateDir})
		d2.Start()
		assertServices(t, d2, map[string][]string{"198.19.0.1:8502": {"127.0.0.31:8502"}})
	})
	t.Run("shared state dir", func(t *testing.T) {
		a := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Config: svc("198.19.0.1:8502", "127.0.0.31:8502")})
		b := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, StateDir: a.StateDir, Config: svc("198.19.0.2:8502", "127.0.0.32:8502")})
		a.Start()
		b.Start()
		b.MustCLI("service", "set", "198.19.0.1:8502", "127.0.0.33:8502") // b's own, from its CLI
		a.Stop()
		a.Start()
		b.Stop()
		b.Start()
		assertServices(t, b, map[string][]string{"198.19.0.1:8502": {"127.0.0.33:8502"}, "198.19.0.2:8502": {"127.0.0.32:8502"}})
	})
}

// A rejected reload changes nothing at all: the tracker of a VIP the
// rejected file would have made static keeps running (the CLI still may
// not change that VIP), as the rest of the old config does.
func TestRejectedReloadKeepsTrackers(t *testing.T) {
	d := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Args: []string{"--no-config-watch"}, Config: map[string]any{
		"services": []any{map[string]any{"vip": "198.19.0.1:8502", "servers": []string{"127.0.0.31:8502"},
			"health": map[string]any{"type": "tcp"}}}}})
	d.Start()
	d.WriteConfig(map[string]any{"services": []any{
		map[string]any{"vip": "198.19.0.1:8502", "servers": []string{"127.0.0.31:8502"}},
		map[string]any{"vip": "198.19.0.3:80", "servers": []string{"127.0.0.32:8502"},
			"health": map[string]any{"type": "grpc", "tls": map[string]any{"caFile": "/nonexistent/ca.pem"}}}}})
	if _, errOut, code := d.CLI("reload"); code == 0 {
		t.Fatalf("reload with a missing TLS file accepted: %q", errOut)
	}
	if _, errOut, code := d.CLI("service", "set", "198.19.0.1:8502", "127.0.0.32:8502"); code == 0 {
		t.Errorf("after a rejected reload, the old config's tracked VIP can be changed by the CLI (its tracker was stopped): %q", errOut)
	}
}
