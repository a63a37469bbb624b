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
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

var ctlbd string // path of the built binary

// pendingDeadline bounds the wait for a netns scan to complete a pending
// attachment (the watcher scans about every second).
const pendingDeadline = 10 * time.Second

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ctlb-caps-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err := testutil.BuildBinaries(dir, "./cmd/ctlbd")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	ctlbd = bins["ctlbd"]
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
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

// proc is a ctlbd daemon a test started, ended by PID at cleanup.
type proc struct {
	cmd    *exec.Cmd
	logs   *testutil.SyncBuffer
	exited chan struct{}
	sock   string
}

// startDaemon runs `ctlbd run` with a private bpffs, socket and state dir
// plus args, and waits until the control socket answers. cmd, when set,
// is adjusted before the start (environment).
func startDaemon(t *testing.T, adjust func(*exec.Cmd), args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	p := &proc{sock: filepath.Join(dir, "ctlbd.sock"), logs: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	all := append([]string{"run", "--bpffs", filepath.Join(testutil.MountBPFFS(t), "ctlb"), "--socket", p.sock,
		"--state-dir", filepath.Join(dir, "state")}, args...)
	p.cmd = exec.Command(ctlbd, all...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if adjust != nil {
		adjust(p.cmd)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(p.stop)
	c := p.client()
	deadline := time.Now().Add(10 * time.Second)
	for call(c, "GET", "/v1/status", "", nil) != nil {
		select {
		case <-p.exited:
			t.Fatalf("ctlbd exited at start:\n%s", p.logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("ctlbd socket not up after 10s:\n%s", p.logs.String())
		}
	}
	return p
}

func (p *proc) client() *http.Client { return unixClient(p.sock) }

// stop ends the daemon with SIGTERM (SIGKILL after 10 s) and reaps it.
func (p *proc) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitFor polls cond until it returns "" or the deadline passes; the test
// then fails with what cond last said.
func waitFor(t *testing.T, deadline time.Duration, what string, cond func() string) {
	t.Helper()
	end := time.Now().Add(deadline)
	for {
		last := cond()
		if last == "" {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s: not after %v; last seen: %s", what, deadline, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
