// Package ctlbd_test drives the real ctlbd binary, daemon and CLI, against
// the real kernel: private bpffs mounts, test cgroups and network namespaces.
package ctlbd_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
)

var ctlbd string // path of the built binary

func TestMain(m *testing.M) {
	testutil.RunClientIfChild()
	dir, err := os.MkdirTemp("", "ctlbd-test-bin-")
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
	// Unprivileged users in the security tests must be able to run it.
	_ = os.Chmod(dir, 0o755)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is a ctlbd process started by a test.
type daemon struct {
	t      *testing.T
	bpffs  string
	socket string
	args   []string
	cmd    *exec.Cmd
	done   chan struct{} // closed once the process is reaped
	logs   *testutil.SyncBuffer
	// netns, when set, is the network namespace the daemon runs in (for
	// the proxy and metrics listeners); nil means the test's own.
	netns ns.NetNS
}

// newDaemon prepares a daemon on a private bpffs and socket; start runs it.
func newDaemon(t *testing.T, extra ...string) *daemon {
	t.Helper()
	dir := t.TempDir()
	d := &daemon{
		t:      t,
		bpffs:  filepath.Join(testutil.MountBPFFS(t), "ctlb"),
		socket: filepath.Join(dir, "ctlbd.sock"),
	}
	d.args = append([]string{"run", "--bpffs", d.bpffs, "--socket", d.socket, "--state-dir", filepath.Join(dir, "state")}, extra...)
	t.Cleanup(d.kill)
	return d
}

// start runs the daemon and waits until its socket answers.
func (d *daemon) start() {
	d.t.Helper()
	d.logs = &testutil.SyncBuffer{}
	d.cmd = exec.Command(ctlbd, d.args...)
	d.cmd.Stdout = d.logs
	d.cmd.Stderr = d.logs
	start := d.cmd.Start
	if d.netns != nil {
		start = func() error { return d.netns.Do(func(ns.NetNS) error { return d.cmd.Start() }) }
	}
	if err := start(); err != nil {
		d.t.Fatal(err)
	}
	exited := make(chan error, 1)
	d.done = make(chan struct{})
	go func(done chan struct{}) {
		exited <- d.cmd.Wait()
		close(done)
	}(d.done)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", d.socket); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			d.cmd = nil
			d.t.Fatalf("ctlbd exited at start: %v\n%s", err, d.logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("ctlbd socket %s not up after 10s\n%s", d.socket, d.logs.String())
		}
	}
}

// kill ends the daemon with SIGKILL, by PID, as a crash would, and waits
// until it is reaped: only then has every thread let go of its files (and
// so of the pin directory's lock).
func (d *daemon) kill() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	d.wait()
}

// stop ends the daemon with SIGTERM and waits for it.
func (d *daemon) stop() {
	d.t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	d.wait()
}

func (d *daemon) wait() {
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.t.Errorf("ctlbd pid %d did not exit within 10s", d.cmd.Process.Pid)
	}
	d.cmd = nil
}

// cli runs a ctlbd client command against the daemon.
func (d *daemon) cli(args ...string) (stdout, stderr string, code int) {
	return run(append([]string{"--socket", d.socket}, args...)...)
}

// mustCLI runs a command that must succeed.
func (d *daemon) mustCLI(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.cli(args...)
	if code != 0 {
		d.t.Fatalf("ctlbd %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// jsonCLI runs a command with -o json and decodes its output into v.
func (d *daemon) jsonCLI(v any, args ...string) {
	d.t.Helper()
	out := d.mustCLI(append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("ctlbd %s -o json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func run(args ...string) (string, string, int) {
	cmd := exec.Command(ctlbd, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
	}
	return out.String(), errOut.String(), code
}

// lines splits a table's output into rows of fields.
func lines(s string) [][]string {
	var out [][]string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 {
			out = append(out, f)
		}
	}
	return out
}
