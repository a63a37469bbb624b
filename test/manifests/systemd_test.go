package manifests

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/coreos/go-systemd/v22/unit"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/test/deploy"
)

// TestSystemdUnit: the unit waits for sd_notify readiness, grants exactly
// the capabilities test/deploy found (with CHOWN for socketGroup), and
// runs the example config, which ctlbd's own loader accepts.
func TestSystemdUnit(t *testing.T) {
	f, err := os.Open("../../conf/systemd/ctlbd.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	opts, err := unit.DeserializeOptions(f)
	if err != nil {
		t.Fatal(err)
	}
	get := func(section, name string) []string {
		var v []string
		for _, o := range opts {
			if o.Section == section && o.Name == name {
				v = append(v, o.Value)
			}
		}
		return v
	}
	if got := get("Service", "Type"); !slices.Equal(got, []string{"notify"}) {
		t.Errorf("Type=%v, want notify (ctlbd sends READY=1 when it serves)", got)
	}
	var want []string
	for _, c := range deploy.NeededWithGroup {
		want = append(want, "CAP_"+strings.ToUpper(c))
	}
	got := strings.Fields(strings.Join(get("Service", "CapabilityBoundingSet"), " "))
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("CapabilityBoundingSet=%v, want %v (test/deploy)", got, want)
	}
	exec := strings.Fields(strings.Join(get("Service", "ExecStart"), " "))
	if !slices.Contains(exec, "--config") || flagValue(exec, "--config") != "/etc/ctlb/ctlbd.json" {
		t.Errorf("ExecStart %v, want --config /etc/ctlb/ctlbd.json", exec)
	}
	if !slices.Contains(get("Unit", "Before"), "containerd.service") {
		t.Errorf("Before=%v, want containerd.service", get("Unit", "Before"))
	}
	cfg, err := config.Load("../../conf/ctlbd.json")
	if err != nil {
		t.Fatalf("conf/ctlbd.json: %v", err)
	}
	if len(cfg.Services) == 0 || !strings.HasPrefix(cfg.Metrics, "127.0.0.1:") {
		t.Errorf("conf/ctlbd.json: %d services, metrics %q: want VIPs and metrics on localhost", len(cfg.Services), cfg.Metrics)
	}
}
