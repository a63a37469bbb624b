package deploy

import (
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

	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
)

// metricsDeadline bounds the wait for a metric to reach a value.
const metricsDeadline = 10 * time.Second

func scrape(t *testing.T, addr string) string {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s\n%s", resp.Status, b)
	}
	return string(b)
}

// sample reads one series' value (-1 when absent); labels is the exact
// label text, e.g. `state="attached"`.
func sample(page, name, labels string) float64 {
	s := name
	if labels != "" {
		s += "{" + labels + "}"
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(s) + ` (\S+)$`).FindStringSubmatch(page)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// TestOperatorMetrics: ctlb_build_info, the attachments gauge by state, the
// pending-attach latency and health-check duration histograms, and the
// reconcile repairs counter, each moved by the event it measures.
func TestOperatorMetrics(t *testing.T) {
	// A server to health-check.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := freePort(t)
	d := startDaemon(t, map[string]any{
		"reconcileInterval": "200ms",
		"services": []any{map[string]any{"vip": "198.18.255.1:80", "servers": []string{ln.Addr().String()},
			"health": map[string]any{"interval": "200ms", "timeout": "200ms"}}},
	}, "--metrics", addr)
	c := unixClient(d.Socket)

	page := scrape(t, addr)
	if !regexp.MustCompile(`(?m)^ctlb_build_info\{.*layout="\d+".*\} 1$`).MatchString(page) {
		t.Errorf("no ctlb_build_info 1 with a layout label")
	}
	for _, state := range []string{"attached", "incomplete", "dead", "pending"} {
		if v := sample(page, "ctlb_attachments", `state="`+state+`"`); v != 0 {
			t.Errorf("at start ctlb_attachments{state=%q} = %v, want 0", state, v)
		}
	}
	testutil.Eventually(t, "a health check timed", metricsDeadline, func() (bool, string) {
		v := sample(scrape(t, addr), "ctlb_health_check_duration_seconds_count", `kind="tcp",result="pass",vip="198.18.255.1:80"`)
		return v >= 1, fmt.Sprint(v)
	})

	// Attach one cgroup; a pending one completes when its cgroup appears.
	parent := testutil.NewCgroup(t, "")
	podA := testutil.NewCgroup(t, strings.TrimPrefix(parent, testutil.V2Mount(t)))
	if err := call(c, "POST", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, podA), nil); err != nil {
		t.Fatal(err)
	}
	podB := filepath.Join(parent, "later")
	rec := pending.Record{ContainerID: "metrics-test", AttachmentID: "cnih-metrics", BPFFS: d.BPFFS,
		CgroupDir: strings.TrimPrefix(podB, testutil.V2Mount(t)), Created: time.Now().UTC()}
	if err := pending.Write(d.StateDir, rec); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the record counted pending", metricsDeadline, func() (bool, string) {
		v := sample(scrape(t, addr), "ctlb_attachments", `state="pending"`)
		return v == 1, fmt.Sprint(v)
	})
	if err := os.Mkdir(podB, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the pending attachment completed and timed", metricsDeadline, func() (bool, string) {
		p := scrape(t, addr)
		n, att, pend := sample(p, "ctlb_pending_attach_duration_seconds_count", ""), sample(p, "ctlb_attachments", `state="attached"`), sample(p, "ctlb_attachments", `state="pending"`)
		return n == 1 && att == 2 && pend == 0, fmt.Sprintf("latency count %v, attached %v, pending %v", n, att, pend)
	})

	// A pin removed by hand: reconcile puts it back and counts it.
	before := sample(scrape(t, addr), "ctlb_reconcile_repairs_total", `kind="repinned"`)
	// Any pinned map or program (the layout names them; links/ is a directory).
	ents, err := os.ReadDir(d.BPFFS)
	if err != nil {
		t.Fatal(err)
	}
	victim := ""
	for _, e := range ents {
		if !e.IsDir() && strings.HasPrefix(e.Name(), "ctlb_") {
			victim = e.Name()
			break
		}
	}
	if victim == "" {
		t.Fatalf("no ctlb_ pin in %s", d.BPFFS)
	}
	if err := os.Remove(filepath.Join(d.BPFFS, victim)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the repin counted", metricsDeadline, func() (bool, string) {
		v := sample(scrape(t, addr), "ctlb_reconcile_repairs_total", `kind="repinned"`)
		return v == before+1, fmt.Sprint(v)
	})
	_ = call(c, "DELETE", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, podA), nil)
	_ = call(c, "DELETE", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, podB), nil)
}
