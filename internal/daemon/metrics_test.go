package daemon

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ctlb/ctlb/internal/proxy"
)

// metricNames are the names of every metric ctlbd can serve: its
// collector's, its own, the proxy's, the Go runtime's and the process's.
func metricNames(t *testing.T) []string {
	t.Helper()
	d := &Daemon{m: newDaemonMetrics()}
	ch := make(chan *prometheus.Desc, 1024)
	collector{d}.Describe(ch)
	for _, c := range d.m.collectors() {
		c.Describe(ch)
	}
	proxy.DescribeMetrics(ch)
	collectors.NewGoCollector().Describe(ch)
	collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}).Describe(ch)
	close(ch)
	re := regexp.MustCompile(`fqName: "([a-zA-Z_:][a-zA-Z0-9_:]*)"`)
	var names []string
	for desc := range ch {
		m := re.FindStringSubmatch(desc.String())
		if m == nil {
			t.Fatalf("no name in %s", desc)
		}
		names = append(names, m[1])
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// TestMetricsDocumented: docs/METRICS.md names every ctlb_ metric ctlbd
// registers, and no ctlb_ metric that does not exist; the Go runtime's and
// the process's standard metrics are documented by their prefixes.
func TestMetricsDocumented(t *testing.T) {
	b, err := os.ReadFile("../../docs/METRICS.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	names := metricNames(t)
	for _, n := range names {
		switch {
		case strings.HasPrefix(n, "ctlb_"):
			if !strings.Contains(doc, "`"+n+"`") {
				t.Errorf("docs/METRICS.md does not document %s", n)
			}
		case strings.HasPrefix(n, "go_"), strings.HasPrefix(n, "process_"):
			prefix := n[:strings.Index(n, "_")+1]
			if !strings.Contains(doc, "`"+prefix+"*`") {
				t.Errorf("docs/METRICS.md does not mention the %s* metrics (%s)", prefix, n)
			}
		default:
			t.Errorf("metric %s: want a ctlb_ prefix", n)
		}
	}
	for _, m := range regexp.MustCompile("`(ctlb_[a-z0-9_]+)`").FindAllStringSubmatch(doc, -1) {
		if !slices.Contains(names, m[1]) {
			t.Errorf("docs/METRICS.md documents %s, which ctlbd does not register", m[1])
		}
	}
}
