package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// reloadDeadline bounds the wait for a config change to be applied.
const reloadDeadline = 10 * time.Second

// configMapDir lays out a directory as the kubelet lays out a ConfigMap
// volume: the key is a symlink to ..data/KEY, ..data a symlink to a
// timestamped directory holding the files.
type configMapDir struct {
	t   *testing.T
	dir string
	gen int
}

func newConfigMapDir(t *testing.T, content string) *configMapDir {
	c := &configMapDir{t: t, dir: t.TempDir()}
	c.update(content)
	if err := os.Symlink("..data/ctlbd.json", filepath.Join(c.dir, "ctlbd.json")); err != nil {
		t.Fatal(err)
	}
	return c
}

// update does what the kubelet's atomic writer does on a ConfigMap change:
// write a new timestamped directory, point ..data_tmp at it, rename it
// over ..data, remove the old directory.
func (c *configMapDir) update(content string) {
	c.t.Helper()
	c.gen++
	ts := fmt.Sprintf("..2026_12_01_00_00_%02d.%d", c.gen, c.gen)
	if err := os.Mkdir(filepath.Join(c.dir, ts), 0o755); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.dir, ts, "ctlbd.json"), []byte(content), 0o644); err != nil {
		c.t.Fatal(err)
	}
	old, _ := os.Readlink(filepath.Join(c.dir, "..data"))
	tmp := filepath.Join(c.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.dir, "..data")); err != nil {
		c.t.Fatal(err)
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(c.dir, old)); err != nil {
			c.t.Fatal(err)
		}
	}
}

func staticConfig(vip, server string) string {
	return fmt.Sprintf(`{"services": [{"vip": %q, "servers": [%q]}]}`, vip, server)
}

// TestConfigMapUpdateApplied: a ConfigMap update (the ..data symlink swap)
// and an in-place write are both applied without SIGHUP or `ctlbd reload`;
// a bad config is rejected and the running one stays.
func TestConfigMapUpdateApplied(t *testing.T) {
	cm := newConfigMapDir(t, staticConfig("198.18.255.1:80", "198.18.0.2:80"))
	path := filepath.Join(cm.dir, "ctlbd.json")
	d := startDaemon(t, nil, "--config", path)
	c := unixClient(d.Socket)
	servers := func(vip string) string {
		var svcs []datapath.Service
		if err := call(c, "GET", "/v1/services", "", &svcs); err != nil {
			return err.Error()
		}
		for _, s := range svcs {
			if s.VIP.String() == vip {
				return fmt.Sprint(s.Servers)
			}
		}
		return "absent"
	}
	if got := servers("198.18.255.1:80"); got != "[198.18.0.2:80]" {
		t.Fatalf("at start: 198.18.255.1:80 has %s", got)
	}

	start := time.Now()
	cm.update(staticConfig("198.18.255.1:80", "198.18.0.3:80"))
	testutil.Eventually(t, "the ConfigMap update applied", reloadDeadline, func() (bool, string) {
		got := servers("198.18.255.1:80")
		return got == "[198.18.0.3:80]", "198.18.255.1:80 has " + got
	})
	t.Logf("ConfigMap swap applied after %v", time.Since(start).Round(time.Millisecond))

	// A bad config: rejected, logged, the old one stays.
	cm.update(`{"services": [{"vip": "not-an-address", "servers": []}]}`)
	testutil.Eventually(t, "the bad config rejected in the log", reloadDeadline, func() (bool, string) {
		return strings.Contains(d.Logs(), "config file change not applied"), d.LogTail(400)
	})
	if got := servers("198.18.255.1:80"); got != "[198.18.0.3:80]" {
		t.Errorf("after a bad config: 198.18.255.1:80 has %s, want the old [198.18.0.3:80]", got)
	}

	// An edit in place (a host's /etc/ctlb/ctlbd.json, no symlinks): the
	// symlink is replaced by a plain file, then written again.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(staticConfig("198.18.255.2:80", "198.18.0.4:80")), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the edited file applied", reloadDeadline, func() (bool, string) {
		a, b := servers("198.18.255.2:80"), servers("198.18.255.1:80")
		return a == "[198.18.0.4:80]" && b == "absent", fmt.Sprintf("198.18.255.2:80 has %s, 198.18.255.1:80 has %s", a, b)
	})
}

// TestNoConfigWatch: --no-config-watch leaves a changed file alone.
func TestNoConfigWatch(t *testing.T) {
	cm := newConfigMapDir(t, staticConfig("198.18.255.1:80", "198.18.0.2:80"))
	d := startDaemon(t, nil, "--config", filepath.Join(cm.dir, "ctlbd.json"), "--no-config-watch")
	cm.update(staticConfig("198.18.255.1:80", "198.18.0.3:80"))
	time.Sleep(time.Second) // five settle periods: a watcher would have applied it
	var svcs []datapath.Service
	if err := call(unixClient(d.Socket), "GET", "/v1/services", "", &svcs); err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 1 || fmt.Sprint(svcs[0].Servers) != "[198.18.0.2:80]" {
		t.Errorf("with --no-config-watch the change was applied: %+v", svcs)
	}
}
