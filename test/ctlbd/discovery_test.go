package ctlbd_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
)

// node is a test network namespace running ctlbd, its servers, a DNS server
// when asked, and attached pods: nothing it does can reach another host.
type node struct {
	t     testing.TB
	netns ns.NetNS
	d     *ctlbdtest.Daemon
	cfg   string
}

// newNode starts ctlbd inside a fresh namespace with the given config.
func newNode(t testing.TB, addrs []string, conf string) *node {
	t.Helper()
	n := &node{t: t, netns: testutil.NewNetNS(t), cfg: filepath.Join(t.TempDir(), "ctlbd.json")}
	testutil.AddLoopbackAddrs(t, n.netns, addrs...)
	n.writeConfig(conf)
	return n
}

func (n *node) writeConfig(conf string) {
	n.t.Helper()
	if err := os.WriteFile(n.cfg, []byte(conf), 0o600); err != nil {
		n.t.Fatal(err)
	}
}

func (n *node) start() {
	n.t.Helper()
	n.d = newDaemonIn(n.t, n.netns, "--config", n.cfg)
	n.d.Start()
}

// status returns the one VIP's status.
func (n *node) status(v string) api.ServiceStatus {
	n.t.Helper()
	var st api.Status
	n.d.JSON(&st, "status")
	for _, s := range st.Services {
		if s.VIP == v {
			return s
		}
	}
	n.t.Fatalf("status has no VIP %s: %+v", v, st)
	return api.ServiceStatus{}
}

// waitSet waits until the VIP's set in the map is want, and says how long.
func (n *node) waitSet(v string, want []string, within time.Duration) time.Duration {
	n.t.Helper()
	slices.Sort(want)
	start := time.Now()
	for {
		got := n.serviceServers(v)
		if slices.Equal(got, want) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			n.t.Fatalf("VIP %s set = %v, want %v within %v\n%s", v, got, want, within, n.d.Logs())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// serviceServers is the VIP's set as the maps hold it (service list).
func (n *node) serviceServers(v string) []string {
	var svcs []api.Service
	n.d.JSON(&svcs, "service", "list")
	for _, s := range svcs {
		if s.VIP.String() == v {
			out := []string{}
			for _, srv := range s.Servers {
				out = append(out, srv.String())
			}
			slices.Sort(out)
			return out
		}
	}
	return nil
}

func TestHealthChecksKeepTheSetRight(t *testing.T) {
	srvs := []string{"127.0.0.41:8502", "127.0.0.42:8502", "127.0.0.43:8502"}
	n := newNode(t, []string{"127.0.0.41", "127.0.0.42", "127.0.0.43"}, fmt.Sprintf(`{
		"metrics": "127.0.0.1:9464",
		"services": [{"vip": %q, "servers": %s, "health": {}}]}`, vip, jsonList(srvs)))
	started := testutil.StartServers(t, n.netns, srvs...)
	n.start()
	n.waitSet(vip, srvs, 5*time.Second)
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)

	// A bounded connect loop runs while one server dies.
	storm := testutil.StartClient(t, n.netns, cg, testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 2, Count: 20000, Duration: time.Minute})
	time.Sleep(200 * time.Millisecond)
	started[1].Close()
	took := n.waitSet(vip, []string{srvs[0], srvs[2]}, 2*time.Second)
	t.Logf("server death to removal from the map: %v", took)
	r := storm.Finish(t)
	t.Logf("connect loop across the death: %d tried, %d failed (refused by the dead server before detection), per server %v", r.Total, r.Failed, r.PerServer)
	// After detection, no new connection goes to it.
	r = testutil.RunClient(t, n.netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 20})
	if r.Failed != 0 || r.PerServer[srvs[1]] != 0 || r.PerServer[srvs[0]] != 10 || r.PerServer[srvs[2]] != 10 {
		t.Fatalf("after detection: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
	}
	st := n.status(vip)
	if !st.Tracked || st.Changes < 2 {
		t.Errorf("status: tracked %v, changes %d", st.Tracked, st.Changes)
	}
	for _, s := range st.Servers {
		wantHealth := map[bool]string{true: "healthy", false: "unhealthy"}[s.Server != srvs[1]]
		if s.Health != wantHealth || s.Source != "static" {
			t.Errorf("status %s: health %q source %q, want %q static", s.Server, s.Health, s.Source, wantHealth)
		}
	}
	page := scrape(t, n.netns, "127.0.0.1:9464")
	if v := metric(t, page, "ctlb_server_healthy", fmt.Sprintf(`server=%q,vip=%q`, srvs[1], vip)); v != 0 {
		t.Errorf("ctlb_server_healthy for the dead server = %v, want 0", v)
	}
	if v := metric(t, page, "ctlb_server_in_set", fmt.Sprintf(`server=%q,vip=%q`, srvs[0], vip)); v != 1 {
		t.Errorf("ctlb_server_in_set = %v, want 1", v)
	}
	if sample := fmt.Sprintf(`ctlb_source_up{source="static",vip=%q} 1`, vip); !strings.Contains(page, sample+"\n") {
		t.Errorf("want %s in:\n%s", sample, grepLines(page, "ctlb_source_"))
	}
	if v := metric(t, page, "ctlb_service_set_changes_total", fmt.Sprintf(`vip=%q`, vip)); v < 2 {
		t.Errorf("ctlb_service_set_changes_total = %v, want at least 2", v)
	}

	// The server comes back: rise (2 passing checks) returns it to the set.
	testutil.StartServers(t, n.netns, srvs[1])
	took = n.waitSet(vip, srvs, 5*time.Second)
	t.Logf("server restart to its return to the map (rise 2, interval 1s): %v", took)

	// The CLI may not fight the health checks over a tracked VIP.
	if _, errOut, code := n.d.CLI("service", "set", vip, srvs[0]); code == 0 || !strings.Contains(errOut, "kept by its config sources") {
		t.Errorf("service set on a tracked VIP: exit %d, %q", code, errOut)
	}
}

func TestPanicModeBothWays(t *testing.T) {
	srvs := []string{"127.0.0.51:8502", "127.0.0.52:8502"}
	const vip2 = "198.19.0.2:8502"
	n := newNode(t, []string{"127.0.0.51", "127.0.0.52"}, fmt.Sprintf(`{"services": [
		{"vip": %q, "servers": %s, "health": {"interval": "200ms", "timeout": "100ms"}, "panic": false, "empty": "reject"},
		{"vip": %q, "servers": %s, "health": {"interval": "200ms", "timeout": "100ms"}, "panic": true}]}`,
		vip, jsonList(srvs), vip2, jsonList(srvs)))
	started := testutil.StartServers(t, n.netns, srvs...)
	n.start()
	n.waitSet(vip, srvs, 5*time.Second)
	n.waitSet(vip2, srvs, 5*time.Second)
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)
	for _, s := range started {
		s.Close()
	}
	// Panic off: the set empties and connects fail at once, refused.
	n.waitSet(vip, []string{}, 3*time.Second)
	start := time.Now()
	r := testutil.RunClient(t, n.netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 3 || !strings.Contains(strings.Join(r.Errors, " "), "connection refused") || time.Since(start) > 2*time.Second {
		t.Errorf("panic off, every server dead: %d of 3 failed in %v with %v; want all refused at once", r.Failed, time.Since(start), r.Errors)
	}
	// Panic on: every candidate stays in the set.
	time.Sleep(time.Second)
	if got := n.serviceServers(vip2); !slices.Equal(got, srvs) {
		t.Errorf("panic on, every server dead: set %v, want all candidates %v", got, srvs)
	}
	if !n.status(vip2).Panic {
		t.Error("status does not say the VIP is in panic")
	}
}

func TestDNSSourceAndSourceFailure(t *testing.T) {
	n := newNode(t, []string{"127.0.0.61", "127.0.0.62", "127.0.0.63"}, "{}")
	testutil.StartServers(t, n.netns, "127.0.0.61:8502", "127.0.0.62:8502", "127.0.0.63:8502")
	dns := testutil.StartDNSMasqIn(t, n.netns, map[string][]string{"consul.test": {"127.0.0.61", "127.0.0.62"}}, 1)
	n.writeConfig(fmt.Sprintf(`{"metrics": "127.0.0.1:9464", "services": [{"vip": %q,
		"dns": {"name": "consul.test", "resolver": %q, "port": 8502, "interval": "500ms"},
		"health": {"interval": "200ms", "timeout": "100ms"}}]}`, vip, dns.Addr))
	n.start()
	n.waitSet(vip, []string{"127.0.0.61:8502", "127.0.0.62:8502"}, 5*time.Second)

	// The answer changes: the set follows.
	dns.SetRecords(map[string][]string{"consul.test": {"127.0.0.62", "127.0.0.63"}})
	took := n.waitSet(vip, []string{"127.0.0.62:8502", "127.0.0.63:8502"}, 5*time.Second)
	t.Logf("DNS answer change to map change: %v", took)
	cg := testutil.NewCgroup(t, "")
	n.d.MustCLI("attach", "--cgroup", cg)
	r := testutil.RunClient(t, n.netns, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 4})
	if r.Failed != 0 || r.PerServer["127.0.0.62:8502"] != 2 || r.PerServer["127.0.0.63:8502"] != 2 {
		t.Fatalf("after the DNS change: landed %v (%v)", r.PerServer, r.Errors)
	}

	upSample := fmt.Sprintf(`ctlb_source_up{source="dns",vip=%q}`, vip)
	lastOK := fmt.Sprintf(`ctlb_source_last_success_timestamp_seconds{source="dns",vip=%q}`, vip)
	if page := scrape(t, n.netns, "127.0.0.1:9464"); !strings.Contains(page, upSample+" 1\n") || !strings.Contains(page, lastOK+" ") {
		t.Errorf("DNS source answering: want %s 1 and %s in:\n%s", upSample, lastOK, grepLines(page, "ctlb_source_"))
	}

	// The DNS server dies: the last good answer stays, the failure shows.
	dns.Stop()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := n.status(vip)
		if len(st.Sources) == 1 && st.Sources[0].Errors > 0 {
			if st.Sources[0].LastError == "" {
				t.Error("source error counted but not named")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("DNS failure not reported: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := n.serviceServers(vip); !slices.Equal(got, []string{"127.0.0.62:8502", "127.0.0.63:8502"}) {
		t.Fatalf("after the DNS server died: set %v, want the last good answer", got)
	}

	// Since when: the outage, the last good answer, the last change of the
	// set and its reason, each server's health.
	st := n.status(vip)
	src := st.Sources[0]
	if src.FailingSince.IsZero() || src.LastSuccess.IsZero() || src.LastSuccess.After(src.FailingSince) || src.FailingSince.After(src.LastFailure) {
		t.Errorf("failing DNS source: last success %v, failing since %v, last failure %v", src.LastSuccess, src.FailingSince, src.LastFailure)
	}
	if st.LastChange.IsZero() || !strings.Contains(st.LastReason, "127.0.0.63:8502") {
		t.Errorf("last change %v %q: want a time and the reason naming the server the DNS change added", st.LastChange, st.LastReason)
	}
	for _, s := range st.Servers {
		if s.HealthSince.IsZero() || s.LastCheck.IsZero() {
			t.Errorf("server %s: health since %v, last check %v", s.Server, s.HealthSince, s.LastCheck)
		}
	}
	out := n.d.MustCLI("status", "-o", "wide")
	for _, want := range []string{"HEALTH SINCE", "last change ", "failing since ", "last success ", " ago ("} {
		if !strings.Contains(out, want) {
			t.Errorf("status -o wide has no %q:\n%s", want, out)
		}
	}
	t.Logf("status -o wide with the DNS server dead:\n%s", out)
	// The gauge stays down for the whole outage (the error counter only
	// rises at each retry).
	if page := scrape(t, n.netns, "127.0.0.1:9464"); !strings.Contains(page, upSample+" 0\n") || !strings.Contains(page, lastOK+" ") {
		t.Errorf("DNS source failing: want %s 0 and %s still in:\n%s", upSample, lastOK, grepLines(page, "ctlb_source_"))
	}

	// A reload during the outage (a new interval: the VIP's tracker is
	// replaced) forgets nothing: ctlbd stays ready (the source answered
	// before), the outage keeps its start, the counts go on.
	if code, body := get(t, n.netns, "127.0.0.1:9464", "/readyz"); code != 200 {
		t.Fatalf("/readyz during the outage, before the reload: %d %s", code, body)
	}
	n.writeConfig(fmt.Sprintf(`{"metrics": "127.0.0.1:9464", "services": [{"vip": %q,
		"dns": {"name": "consul.test", "resolver": %q, "port": 8502, "interval": "600ms"},
		"health": {"interval": "200ms", "timeout": "100ms"}}]}`, vip, dns.Addr))
	n.d.MustCLI("reload")
	after := n.status(vip)
	if len(after.Sources) != 1 || !after.Sources[0].FailingSince.Equal(src.FailingSince) || after.Sources[0].Errors < src.Errors ||
		after.Changes < st.Changes {
		t.Errorf("after a reload during the outage: source %+v, %d set changes; want failing since %v, at least %d errors and %d changes",
			after.Sources, after.Changes, src.FailingSince, src.Errors, st.Changes)
	}
	if code, body := get(t, n.netns, "127.0.0.1:9464", "/readyz"); code != 200 {
		t.Errorf("/readyz after a reload during the outage: %d %s, want ready (the source answered before)", code, body)
	}
	if page := scrape(t, n.netns, "127.0.0.1:9464"); !strings.Contains(page, lastOK+" ") {
		t.Errorf("after a reload during the outage: %s gone:\n%s", lastOK, grepLines(page, "ctlb_source_"))
	}
}

// grepLines are the lines of page that start with prefix.
func grepLines(page, prefix string) string {
	var out []string
	for l := range strings.Lines(page) {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "")
}

func TestReloadRestartsOnlyChangedTrackers(t *testing.T) {
	srvs := []string{"127.0.0.71:8502", "127.0.0.72:8502"}
	const vip2 = "198.19.0.2:8502"
	n := newNode(t, []string{"127.0.0.71", "127.0.0.72"}, fmt.Sprintf(`{"metrics": "127.0.0.1:9464", "services": [
		{"vip": %q, "servers": %s, "health": {"interval": "200ms", "timeout": "100ms"}},
		{"vip": %q, "servers": %s, "health": {"interval": "200ms", "timeout": "100ms"}}]}`, vip, jsonList(srvs[:1]), vip2, jsonList(srvs[:1])))
	testutil.StartServers(t, n.netns, srvs...)
	n.start()
	n.waitSet(vip, srvs[:1], 5*time.Second)
	n.waitSet(vip2, srvs[:1], 5*time.Second)
	checks := func(v string) string {
		return grepLines(scrape(t, n.netns, "127.0.0.1:9464"), fmt.Sprintf(`ctlb_health_check_duration_seconds_count{kind="tcp",result="pass",vip=%q}`, v))
	}
	if checks(vip2) == "" {
		t.Fatalf("no health check series of %s", vip2)
	}
	// A bad config is refused whole.
	n.writeConfig(fmt.Sprintf(`{"services": [{"vip": %q, "servers": %s, "health": {"type": "icmp"}}]}`, vip, jsonList(srvs)))
	if _, errOut, code := n.d.CLI("reload"); code == 0 || !strings.Contains(errOut, "icmp") {
		t.Fatalf("bad reload: exit %d, %q", code, errOut)
	}
	// The reload drops vip2: its health check series go with it.
	n.writeConfig(fmt.Sprintf(`{"metrics": "127.0.0.1:9464", "services": [{"vip": %q, "servers": %s, "health": {"interval": "200ms", "timeout": "100ms"}}]}`, vip, jsonList(srvs)))
	n.d.MustCLI("reload")
	n.waitSet(vip, srvs, 5*time.Second)
	time.Sleep(300 * time.Millisecond) // a check of vip2 cancelled by the reload has ended
	if got := checks(vip2); got != "" {
		t.Errorf("health check series of %s, removed from the config, stay:\n%s", vip2, got)
	}
	if checks(vip) == "" {
		t.Errorf("no health check series of %s, still configured", vip)
	}
}

func jsonList(ss []string) string {
	b, _ := json.Marshal(ss)
	return string(b)
}

// TestKeptServersShownAsKept: after a restart whose DNS source cannot be
// reached, the servers the maps kept from before are shown as source
// "kept" (unchecked, in the set), not as static servers.
func TestKeptServersShownAsKept(t *testing.T) {
	n := newNode(t, []string{"127.0.0.86"}, "{}")
	testutil.StartServers(t, n.netns, "127.0.0.86:8502")
	dns := testutil.StartDNSMasqIn(t, n.netns, map[string][]string{"kept.test": {"127.0.0.86"}}, 1)
	conf := `{"metrics": "127.0.0.1:9464", "services": [{"vip": %q,
		"dns": {"name": "kept.test", "resolver": %q, "port": 8502, "interval": "500ms"},
		"health": {"interval": "200ms", "timeout": "100ms"}}]}`
	n.writeConfig(fmt.Sprintf(conf, vip, dns.Addr))
	n.start()
	n.waitSet(vip, []string{"127.0.0.86:8502"}, 5*time.Second)
	if st := n.status(vip); len(st.Servers) != 1 || st.Servers[0].Source != "dns" {
		t.Fatalf("before the restart: %+v", st.Servers)
	}

	// Restart with a resolver nothing listens on: the maps keep the server.
	n.d.Stop()
	n.writeConfig(fmt.Sprintf(conf, vip, "127.0.0.86:5399"))
	n.d.Start()
	st := n.status(vip)
	if len(st.Servers) != 1 || st.Servers[0].Source != api.SourceKept || st.Servers[0].Health != api.HealthUnchecked || !st.Servers[0].InSet {
		t.Errorf("after the restart: servers %+v, want 127.0.0.86:8502 source %q, unchecked, in the set", st.Servers, api.SourceKept)
	}
	out := n.d.MustCLI("status")
	t.Logf("status:\n%s", out)
	if !strings.Contains(out, "127.0.0.86:8502  kept") {
		t.Errorf("status text does not show the server as kept:\n%s", out)
	}
	// The metrics count it as status does: in the set, unchecked.
	page := scrape(t, n.netns, "127.0.0.1:9464")
	for _, want := range []string{
		fmt.Sprintf(`ctlb_server_in_set{server="127.0.0.86:8502",vip=%q} 1`, vip),
		fmt.Sprintf(`ctlb_server_healthy{server="127.0.0.86:8502",vip=%q} -1`, vip),
	} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("metrics have no %s:\n%s", want, grepLines(page, "ctlb_server_"))
		}
	}
}
