package deploy

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// probeDeadline bounds the wait for a probe to change its answer.
const probeDeadline = 10 * time.Second

type probe struct {
	code   int
	Status string            `json:"status"`
	Checks map[string]string `json:"checks"`
}

func getProbe(addr, path string) (probe, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return probe{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	p := probe{code: resp.StatusCode}
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%s: %v: %s", path, err, b)
	}
	return p, nil
}

// TestHealthAndReadiness: /healthz is ok once the maps are open; /readyz
// waits for every source to answer once, and says which one it waits for.
func TestHealthAndReadiness(t *testing.T) {
	dir := t.TempDir()
	gate := filepath.Join(dir, "gate")
	// An exec source that answers only once the test opens the gate.
	script := fmt.Sprintf(`while [ ! -e %s ]; do sleep 0.05; done; echo 198.18.0.2:80`, gate)
	cfg := map[string]any{"services": []any{map[string]any{
		"vip": "198.18.255.1:80", "empty": "reject",
		"exec": map[string]any{"command": []string{"sh", "-c", script}, "interval": "1s", "timeout": "60s"},
	}}}
	addr := freePort(t)
	startDaemon(t, cfg, "--metrics", addr)

	h, err := getProbe(addr, "/healthz")
	if err != nil || h.code != http.StatusOK || h.Checks["maps"] != "ok" {
		t.Fatalf("/healthz = %+v, %v; want 200 with maps ok", h, err)
	}
	r, err := getProbe(addr, "/readyz")
	if err != nil || r.code != http.StatusServiceUnavailable || !strings.Contains(r.Checks["sources"], "198.18.255.1:80 exec") {
		t.Fatalf("/readyz before the source answered = %+v, %v; want 503 naming the exec source of 198.18.255.1:80", r, err)
	}
	for _, k := range []string{"config", "controlAPI", "pendingWatcher", "maps"} {
		if r.Checks[k] != "ok" {
			t.Errorf("/readyz check %s = %q, want ok", k, r.Checks[k])
		}
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "/readyz ok after the source answered", probeDeadline, func() (bool, string) {
		r, err := getProbe(addr, "/readyz")
		return err == nil && r.code == http.StatusOK && r.Status == "ok", fmt.Sprintf("%+v %v", r, err)
	})
}

// TestMetricsBindOnlyTheirAddress: the listener takes the address it is
// given, not every interface: 127.0.0.1's port is closed on 127.0.0.2.
func TestMetricsBindOnlyTheirAddress(t *testing.T) {
	addr := freePort(t)
	startDaemon(t, nil, "--metrics", addr)
	if h, err := getProbe(addr, "/healthz"); err != nil || h.code != http.StatusOK {
		t.Fatalf("/healthz on %s = %+v, %v", addr, h, err)
	}
	_, port, _ := net.SplitHostPort(addr)
	if c, err := net.DialTimeout("tcp", "127.0.0.2:"+port, 2*time.Second); err == nil {
		c.Close()
		t.Errorf("metrics bound to %s also answer on 127.0.0.2:%s", addr, port)
	}
}
