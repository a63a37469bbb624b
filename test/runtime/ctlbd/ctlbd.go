// Package ctlbd runs the real ctlbd binary for end-to-end tests, on a
// private bpffs, socket and state directory, and reads its state back
// through its own CLI (-o json), as an operator would.
package ctlbd

import (
	"bytes"
	"context"
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

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// Daemon is one running ctlbd.
type Daemon struct {
	t   testing.TB
	bin string
	// BPFFS is ctlb's directory on the test's private bpffs mount; Socket
	// and StateDir are the daemon's own. The CNI plugin gets the same three.
	BPFFS, Socket, StateDir string

	cmd    *exec.Cmd
	exited chan struct{}
	logs   *testutil.SyncBuffer
}

// Start mounts a private bpffs and runs `ctlbd run` on it until the test
// ends (SIGTERM, then SIGKILL, by PID). args are more flags of ctlbd run.
func Start(t testing.TB, bin string, args ...string) *Daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctlb-d-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &Daemon{
		t:        t,
		bin:      bin,
		BPFFS:    filepath.Join(testutil.MountBPFFS(t), "ctlb"),
		Socket:   filepath.Join(dir, "ctlbd.sock"),
		StateDir: filepath.Join(dir, "state"),
		logs:     &testutil.SyncBuffer{},
	}
	d.cmd = exec.Command(bin, append([]string{"run", "--bpffs", d.BPFFS, "--socket", d.Socket, "--state-dir", d.StateDir}, args...)...)
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start ctlbd: %v", err)
	}
	d.exited = make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(d.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", d.Socket); err == nil {
			c.Close()
			return d
		}
		select {
		case <-d.exited:
			t.Fatalf("ctlbd exited at start:\n%s", d.logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("ctlbd socket %s not up after 10s:\n%s", d.Socket, d.logs.String())
		}
	}
}

// Stop ends the daemon (SIGTERM, then SIGKILL after 10 s, by PID) and
// waits until it is gone; the pins stay, as when an operator stops it.
// Calling it again, or the test's cleanup after it, does nothing more.
func (d *Daemon) Stop() {
	select {
	case <-d.exited:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	_ = node.WaitGone(d.cmd.Process.Pid, 5*time.Second)
}

func (d *Daemon) stop() {
	if d.t.Failed() {
		d.t.Logf("ctlbd log:\n%s", d.logs.String())
	}
	d.Stop()
}

// Logs is the daemon's output so far.
func (d *Daemon) Logs() string { return d.logs.String() }

// CLI runs a ctlbd client command against the daemon and returns its
// standard output.
func (d *Daemon) CLI(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.bin, append([]string{"--socket", d.Socket}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctlbd %s: %w: %s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// MustCLI is CLI failing the test on error.
func (d *Daemon) MustCLI(args ...string) string {
	d.t.Helper()
	out, err := d.CLI(args...)
	if err != nil {
		d.t.Fatal(err)
	}
	return out
}

// JSON runs a command with -o json and decodes its output into v.
func (d *Daemon) JSON(v any, args ...string) error {
	out, err := d.CLI(append(args, "-o", "json")...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("ctlbd %s -o json: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// SetService points vip at servers (ctlbd service set).
func (d *Daemon) SetService(vip string, servers ...string) {
	d.t.Helper()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
}

// Attachments lists the pinned attachments (ctlbd attachments -o json).
func (d *Daemon) Attachments() []api.Attachment {
	d.t.Helper()
	var atts []api.Attachment
	if err := d.JSON(&atts, "attachments"); err != nil {
		d.t.Fatal(err)
	}
	return atts
}

// Status is ctlbd status -o json.
func (d *Daemon) Status() api.Status {
	d.t.Helper()
	var st api.Status
	if err := d.JSON(&st, "status"); err != nil {
		d.t.Fatal(err)
	}
	return st
}

// LinkPins lists the attachment pin directories under BPFFS/links, minus
// ctlb's own temporary ones ("_" prefix).
func (d *Daemon) LinkPins() []string {
	ents, err := os.ReadDir(filepath.Join(d.BPFFS, "links"))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "_") {
			out = append(out, e.Name())
		}
	}
	return out
}
