package ctlbd_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// scrape fetches /metrics from addr inside netns.
func scrape(t *testing.T, netns ns.NetNS, addr string) string {
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
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
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
