package ctlbd_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// scrape fetches /metrics from addr inside netns.
func scrape(t *testing.T, netns ns.NetNS, addr string) string {
	t.Helper()
	_, body := get(t, netns, addr, "/metrics")
	return body
}

// get fetches path from addr inside netns: the status code and the body.
func get(t *testing.T, netns ns.NetNS, addr, path string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
			var c net.Conn
			err := netns.Do(func(ns.NetNS) error {
				var err error
				c, err = (&net.Dialer{}).DialContext(ctx, network, a)
				return err
			})
			return c, err
		},
	}}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("get %s%s: %v", addr, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// metric reads one sample's value from a Prometheus text page.
func metric(t *testing.T, page, name string, labels string) float64 {
	t.Helper()
	sample := name
	if labels != "" {
		sample += "{" + labels + "}"
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`)
	m := re.FindStringSubmatch(page)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestFallbackProxyAndMetrics runs ctlbd in a node namespace with the VIP
// served both ways: a pod with no attachment reaches the servers through
// the proxy on the VIP made local, an attached pod is short-circuited by
// connect4 without touching the proxy, and the metrics say so.
func TestFallbackProxyAndMetrics(t *testing.T) {
	for _, mode := range []string{"listeners", "steering"} {
		t.Run(mode, func(t *testing.T) {
			node := testutil.NewNetNS(t)
			testutil.AddLoopbackAddrs(t, node, "127.0.0.31", "127.0.0.32", "127.0.0.33")
			testutil.StartServers(t, node, servers...)
			cfg := filepath.Join(t.TempDir(), "ctlbd.json")
			conf := fmt.Sprintf(`{
				"metrics": "127.0.0.1:9464",
				"services": [{"vip": %q, "servers": ["127.0.0.31:8502", "127.0.0.32:8502", "127.0.0.33:9000"]}],
				"proxy": {"mode": %q, "services": [{"vip": "198.19.0.1", "ports": [8502]}],
				          "localVIP": {"enabled": true, "device": "lo"}}}`, vip, mode)
			if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
				t.Fatal(err)
			}
			d := newDaemonIn(t, node, "--config", cfg)
			d.Start()

			// No attachment: the proxy answers on the local VIP.
			r := testutil.RunClient(t, node, "", testutil.ClientSpec{Mode: "dial", Target: vip, Count: 9})
			if r.Failed != 0 || len(r.PerServer) != 3 || misrouted(r.PerServer) != 0 {
				t.Fatalf("through the proxy: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
			}
			for i, p := range r.Peers {
				if p != vip {
					t.Fatalf("connection %d through the proxy: peer %s, want the VIP", i, p)
				}
			}
			// Attached: connect4 sends connections straight to the servers.
			cg := testutil.NewCgroup(t, "")
			d.MustCLI("attach", "--cgroup", cg)
			r = testutil.RunClient(t, node, cg, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
			if r.Failed != 0 || len(r.PerServer) != 3 {
				t.Fatalf("through connect4: landed %v, failed %d (%v)", r.PerServer, r.Failed, r.Errors)
			}

			page := scrape(t, node, "127.0.0.1:9464")
			for _, s := range servers {
				labels := fmt.Sprintf(`protocol="tcp",server=%q,vip=%q`, s, vip)
				if got := metric(t, page, "ctlb_server_connects_total", labels); got != 2 {
					t.Errorf("ctlb_server_connects_total{%s} = %v, want 2 (the attached pod's connects only)", labels, got)
				}
				if got := metric(t, page, "ctlb_server_open_connections", labels); got != 0 {
					t.Errorf("ctlb_server_open_connections{%s} = %v, want 0", labels, got)
				}
				plabels := fmt.Sprintf(`service=%q,target=%q`, vip, s)
				if got := metric(t, page, "ctlb_proxy_connections_total", plabels); got != 3 {
					t.Errorf("ctlb_proxy_connections_total{%s} = %v, want 3 (the unattached pod's)", plabels, got)
				}
			}
			if got := metric(t, page, "ctlb_attachments", `state="attached"`); got != 1 {
				t.Errorf("ctlb_attachments{state=attached} = %v, want 1", got)
			}
			var st api.Status
			d.JSON(&st, "status")
			if st.Attachments != 1 {
				t.Errorf("status attachments = %d", st.Attachments)
			}
			if got := metric(t, page, "ctlb_socket_table_entries", `state="used"`); got != 0 {
				t.Errorf("ctlb_socket_table_entries{state=used} = %v with no VIP socket open, want 0", got)
			}
			if st.SocketTable == nil || st.SocketTable.Used != 0 || st.SocketTable.Size == 0 {
				t.Errorf("status socketTable = %+v, want a size and none used", st.SocketTable)
			}

			// Sockets held open through connect4 hold socket table
			// entries, which status and the metrics count.
			hold := testutil.StartClient(t, node, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 3})
			if r := hold.Result(t); r.Failed != 0 {
				t.Fatalf("held connects failed: %v", r.Errors)
			}
			page = scrape(t, node, "127.0.0.1:9464")
			used := metric(t, page, "ctlb_socket_table_entries", `state="used"`)
			free := metric(t, page, "ctlb_socket_table_entries", `state="free"`)
			if used != 3 || int(used+free) != st.SocketTable.Size {
				t.Errorf("with 3 VIP sockets held: ctlb_socket_table_entries used %v, free %v, want 3 and the rest of %d", used, free, st.SocketTable.Size)
			}
			d.JSON(&st, "status")
			if st.SocketTable == nil || st.SocketTable.Used != 3 {
				t.Errorf("with 3 VIP sockets held: status socketTable = %+v, want 3 used", st.SocketTable)
			}
			hold.Stop(t)
		})
	}
}

// proxyConfig writes a config serving vip both ways (the maps and the
// fallback proxy in listeners mode, the VIP local on lo), with extra
// services and proxy services appended.
func proxyConfig(t *testing.T, path string, set []string, extraSvc, extraProxy, proxyOpts string) {
	t.Helper()
	srv, _ := json.Marshal(set)
	conf := fmt.Sprintf(`{
		"metrics": "127.0.0.1:9464",
		"services": [{"vip": %q, "servers": %s}%s],
		"proxy": {"mode": "listeners", "services": [{"vip": "198.19.0.1", "ports": [8502]}%s],
		          "localVIP": {"enabled": true, "device": "lo"}%s}}`, vip, srv, extraSvc, extraProxy, proxyOpts)
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Clients the connect4 path cannot serve hold connections through the
// fallback proxy, and a server leaves the set: its proxied connections end
// within 2 s (invariant 8, as for attached pods), the clients reconnect to
// the server that stayed, status counts them as ended and the proxy's
// resets metric says why; with onServerRemoved "keep" none ends.
func TestProxiedConnectionsEndWhenServerLeaves(t *testing.T) {
	node := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, node, "127.0.0.31", "127.0.0.32", "127.0.0.33")
	testutil.StartServers(t, node, servers...)
	two := servers[:2]
	cfg := filepath.Join(t.TempDir(), "ctlbd.json")
	proxyConfig(t, cfg, two, "", "", "")
	d := newDaemonIn(t, node, "--config", cfg, "--no-config-watch")
	d.Start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.Logs())
		}
	})

	// No cgroup: every connection goes through the proxy.
	c := testutil.StartClient(t, node, "", testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4, Reconnect: true})
	if r := c.Result(t); r.Failed != 0 || r.PerServer[two[0]] != 2 || r.PerServer[two[1]] != 2 {
		t.Fatalf("held connections through the proxy: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	start := time.Now()
	d.MustCLI("service", "set", vip, two[1])
	for range 2 {
		ev := c.Event(t, endDeadline-time.Since(start))
		if ev == nil {
			t.Fatalf("a proxied connection on %s still open %v after it left the set", two[0], endDeadline)
		}
		if ev.Server != two[0] || ev.Ended == "" || ev.Reconnected != two[1] {
			t.Fatalf("event %+v: want a connection on %s ended and replaced by one on %s", ev, two[0], two[1])
		}
		t.Logf("proxied connection %d on %s ended %v after `service set` began (%s), reconnected to %s",
			ev.Index, ev.Server, time.Unix(0, ev.At).Sub(start), ev.Ended, ev.Reconnected)
	}
	if ev := c.Event(t, time.Second); ev != nil {
		t.Fatalf("a proxied connection that stayed in the set ended too: %+v", ev)
	}
	_, s := vipStatus(t, d, vip)
	if gone, ok := serverStatus(s, two[0]); !ok || gone.Terminated != 2 {
		t.Errorf("status of the departed server = %+v (found %v), want 2 ended", gone, ok)
	}
	// What the proxy did, in status: 6 connections (4, then 2 again), 2
	// of them reset because their server left.
	var st api.Status
	d.JSON(&st, "status")
	if st.Proxy == nil || st.Proxy.Mode != "listeners" || len(st.Proxy.Services) != 1 {
		t.Fatalf("status proxy = %+v, want the listeners proxy serving one service", st.Proxy)
	}
	ps := st.Proxy.Services[0]
	conns := map[string]uint64{}
	for _, tg := range ps.Targets {
		conns[tg.Target.String()] = tg.Connections
	}
	if ps.Service.String() != vip || ps.Open != 4 || ps.Accepted != 6 || ps.Resets["server_left"] != 2 ||
		conns[two[0]] != 2 || conns[two[1]] != 4 {
		t.Errorf("status proxy service = %+v (connections by target %v); want %s, 4 open, 6 accepted, 2 reset server_left, 2 to %s and 4 to %s",
			ps, conns, vip, two[0], two[1])
	}
	out := d.MustCLI("status")
	if !strings.Contains(out, "fallback proxy (listeners): serving 198.19.0.1:8502") || !strings.Contains(out, "2 server_left") {
		t.Errorf("ctlbd status does not show the proxy's service and its resets:\n%s", out)
	}
	page := scrape(t, node, "127.0.0.1:9464")
	if got := metric(t, page, "ctlb_proxy_resets_total", fmt.Sprintf(`reason="server_left",service=%q`, vip)); got != 2 {
		t.Errorf(`ctlb_proxy_resets_total{reason="server_left"} = %v, want 2`, got)
	}
	c.Stop(t)

	// keep: the same change ends nothing.
	d.MustCLI("service", "set", vip, two[0], two[1], "--on-server-removed", "keep")
	k := testutil.StartClient(t, node, "", testutil.ClientSpec{Mode: "watch", Target: vip, Count: 4})
	if r := k.Result(t); r.Failed != 0 || r.PerServer[two[0]] != 2 || r.PerServer[two[1]] != 2 {
		t.Fatalf("keep: held connections through the proxy: %v, %d failed %v", r.PerServer, r.Failed, r.Errors)
	}
	d.MustCLI("service", "set", vip, two[1], "--on-server-removed", "keep")
	if ev := k.Event(t, endDeadline); ev != nil {
		t.Fatalf("keep: a proxied connection ended: %+v", ev)
	}
	k.Stop(t)
}

// A reload whose proxy section cannot be served (its address is taken) is
// rejected whole: the new VIP does not reach the maps either, where
// connect4 clients would already be sent to it. A restart-only proxy
// setting changed in the file is named on every reload while it differs
// from what runs.
func TestProxyReloadRejectedKeepsMaps(t *testing.T) {
	node := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, node, "127.0.0.31", "127.0.0.32", "127.0.0.33", "198.19.0.2")
	testutil.StartServers(t, node, servers...)
	cfg := filepath.Join(t.TempDir(), "ctlbd.json")
	proxyConfig(t, cfg, servers, "", "", "")
	d := newDaemonIn(t, node, "--config", cfg, "--no-config-watch")
	d.Start()

	// Someone else listens on 198.19.0.2:8502, without SO_REUSEPORT.
	var ln net.Listener
	if err := node.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", "198.19.0.2:8502")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	const taken = "198.19.0.2:8502"
	proxyConfig(t, cfg, servers, fmt.Sprintf(`, {"vip": %q, "servers": [%q]}`, taken, servers[0]),
		`, {"vip": "198.19.0.2", "ports": [8502]}`, "")
	_, errOut, code := d.CLI("reload")
	if code == 0 || !strings.Contains(errOut, "address already in use") {
		t.Fatalf("reload with a taken proxy address: exit %d, %q; want it rejected", code, errOut)
	}
	var list []api.Service
	d.JSON(&list, "service", "list")
	for _, s := range list {
		if s.VIP.String() == taken {
			t.Errorf("rejected reload: %s is in the maps anyway: %+v", taken, s)
		}
	}
	if !strings.Contains(errOut, "old config kept") {
		t.Errorf("rejected reload says %q; want it to say the old config is kept", errOut)
	}

	// A timeout changed in the file: named at each reload.
	proxyConfig(t, cfg, servers, "", "", `, "idleTimeout": "7m"`)
	for i := range 2 {
		before := strings.Count(d.Logs(), "proxy.idleTimeout")
		d.MustCLI("reload")
		if after := strings.Count(d.Logs(), "proxy.idleTimeout"); after <= before {
			t.Fatalf("reload %d with idleTimeout changed: no warning naming proxy.idleTimeout\n%s", i+1, d.LogTail(20))
		}
	}
}

// The proxy's log lines say what it serves: the VIP:ports (in steering mode
// its one socket shows a random port), a warning for a proxied VIP:port that
// no TCP service backs (every client of it is reset), and, at a stop, the
// drain of open connections before the last line.
func TestProxyLogsWhatItServes(t *testing.T) {
	node := testutil.NewNetNS(t)
	testutil.AddLoopbackAddrs(t, node, "127.0.0.31", "127.0.0.32", "127.0.0.33")
	testutil.StartServers(t, node, servers...)
	cfg := filepath.Join(t.TempDir(), "ctlbd.json")
	conf := fmt.Sprintf(`{
		"services": [{"vip": %q, "servers": [%q]}],
		"proxy": {"mode": "steering", "drainTimeout": "1s",
		          "services": [{"vip": "198.19.0.1", "ports": [8502, 8599]}],
		          "localVIP": {"enabled": true, "device": "lo"}}}`, vip, servers[0])
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemonIn(t, node, "--config", cfg)
	d.Start()
	// The ready line comes after the proxy's: once it is in, they are.
	testutil.Eventually(t, "ctlbd's ready line", 5*time.Second, func() (bool, string) {
		return strings.Contains(d.Logs(), "ctlbd ready"), d.LogTail(400)
	})
	logs := d.Logs()
	if !regexp.MustCompile(`fallback proxy serving.*destinations="?\[198\.19\.0\.1:8502 198\.19\.0\.1:8599\]`).MatchString(logs) {
		t.Errorf("the proxy's start line does not name the VIP:ports it serves:\n%s", d.LogTail(30))
	}
	if !regexp.MustCompile(`no TCP service defines.*vip=198\.19\.0\.1:8599`).MatchString(logs) {
		t.Errorf("no warning for 198.19.0.1:8599, which no service backs:\n%s", d.LogTail(30))
	}
	if regexp.MustCompile(`no TCP service defines.*vip=198\.19\.0\.1:8502`).MatchString(logs) {
		t.Errorf("a warning for 198.19.0.1:8502, which a service backs:\n%s", d.LogTail(30))
	}

	hold := testutil.StartClient(t, node, "", testutil.ClientSpec{Mode: "hold", Target: vip, Count: 1})
	if r := hold.Result(t); r.Failed != 0 {
		t.Fatalf("held connection through the proxy failed: %v", r.Errors)
	}
	d.Stop()
	logs = d.Logs()
	drain, stopped := strings.Index(logs, "draining proxied connections"), strings.Index(logs, "ctlbd stopped")
	if drain < 0 || stopped < 0 || drain > stopped {
		t.Errorf("at a stop with a proxied connection open: want the drain logged before \"ctlbd stopped\" (at %d, %d):\n%s", drain, stopped, d.LogTail(30))
	}
	hold.Stop(t)
}
