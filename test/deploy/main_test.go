// Package deploy checks ctlbd as operators deploy and run it, driving the
// real binary against the real kernel: the capabilities it needs, bpffs on a
// host that has none, health and readiness endpoints, systemd readiness
// notification, config file watching, socket roles.
package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

var ctlbd, plugin string // paths of the built binaries

// pendingDeadline bounds the wait for a netns scan to complete a pending
// attachment (the watcher scans about every second).
const pendingDeadline = 10 * time.Second

func TestMain(m *testing.M) {
	testutil.MainWithBinaries(m, func(bins map[string]string) {
		ctlbd, plugin = bins["ctlbd"], bins["ctlb"]
	}, "./cmd/ctlbd", "./plugins/meta/ctlb")
}

// call makes one control API request; out, when set, gets the JSON answer.
func call(c *http.Client, method, path, body string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://ctlbd"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

func firstLine(s string) string { return strings.SplitN(s, "\n", 2)[0] }

// startDaemon runs the ctlbd binary through the shared runner (private
// bpffs, socket and state dir) with cfg as its config file (nil: none) and
// extra `run` flags.
func startDaemon(t *testing.T, cfg map[string]any, args ...string) *ctlbdtest.Daemon {
	t.Helper()
	return ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbd, Config: cfg, Args: args})
}
