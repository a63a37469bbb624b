// Package ctlbdtest is the one way tests run ctlbd: the real binary as a
// process (optionally in a network namespace, or through a wrapper such as
// nsenter), or the daemon in-process, on a private bpffs mount, socket and
// state directory, with a config given as a value. Every test package
// (test/ctlbd, test/cni, test/runtime, test/e2e) starts its daemons here.
package ctlbdtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/daemon"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// Options say how to run one daemon. The zero value runs it in-process on
// a private bpffs with the default config.
type Options struct {
	// Bin is the ctlbd binary. Empty runs the daemon in-process
	// (daemon.New + Run), which CLI calls still reach through the socket
	// if CLIBin is set.
	Bin string
	// CLIBin runs client commands; it defaults to Bin.
	CLIBin string
	// NetNS runs the process inside this network namespace (its proxy and
	// metrics listeners live there). Wrap is the alternative for runners
	// that must exec through a wrapper (nsenter): it turns ctlbd's argv
	// into the command to start; the PID must be ctlbd's own.
	NetNS ns.NetNS
	Wrap  func(argv []string) *exec.Cmd
	// Config is the daemon's config file content, as JSON fields; bpffs,
	// socket and stateDir are filled in unless set. Nil starts with no
	// config file at all (flags only).
	Config map[string]any
	// Args are extra `ctlbd run` flags.
	Args []string
	// BPFFS is the pin directory; empty mounts a private bpffs for it.
	// Socket and StateDir default to a private temporary directory.
	BPFFS, Socket, StateDir string
	// LogLevel of an in-process daemon: the zero value is info, like
	// `ctlbd run`; slog.LevelDebug adds its debug lines.
	LogLevel slog.Level
	// Env is added to the process's environment (e.g. a crash point,
	// internal/crashpoint); Daemon.Env can change it between starts.
	Env []string
}

// Daemon is one ctlbd run by a test. BPFFS, Socket and StateDir are its
// own; the CNI plugin of the same test gets the same three.
type Daemon struct {
	t    testing.TB
	opts Options

	BPFFS, Socket, StateDir string
	// ConfigPath is the config file, when Options.Config was given.
	ConfigPath string
	// Started is when the last Start began.
	Started time.Time
	// Env is added to the environment of the next process started.
	Env []string

	logs *testutil.SyncBuffer

	// Process mode.
	cmd  *exec.Cmd
	done chan struct{}
	// In-process mode.
	inproc *daemon.Daemon
	cancel context.CancelFunc
	ran    chan error
}

// New prepares a daemon; Start runs it. Everything it makes is removed
// when the test ends, the process killed by its PID.
func New(t testing.TB, opts Options) *Daemon {
	t.Helper()
	// A short directory: the socket path must fit in sun_path.
	dir, err := os.MkdirTemp("", "ctlbd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &Daemon{
		t:        t,
		opts:     opts,
		BPFFS:    opts.BPFFS,
		Socket:   filepath.Join(dir, "ctlbd.sock"),
		StateDir: filepath.Join(dir, "state"),
		logs:     &testutil.SyncBuffer{},
		Env:      opts.Env,
	}
	if d.BPFFS == "" {
		d.BPFFS = filepath.Join(testutil.MountBPFFS(t), "ctlb")
	}
	if opts.Socket != "" {
		d.Socket = opts.Socket
	}
	if opts.StateDir != "" {
		d.StateDir = opts.StateDir
	}
	if d.opts.CLIBin == "" {
		d.opts.CLIBin = opts.Bin
	}
	if opts.Config != nil {
		d.ConfigPath = filepath.Join(dir, "ctlbd.json")
		d.WriteConfig(opts.Config)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("ctlbd log (tail):\n%s", d.LogTail(8000))
		}
		d.Stop()
	})
	return d
}

// Start is New followed by Start.
func Start(t testing.TB, opts Options) *Daemon {
	t.Helper()
	d := New(t, opts)
	d.Start()
	return d
}

// WriteConfig replaces the config file (for reload tests); the daemon's
// own paths are filled in unless the fields are set.
func (d *Daemon) WriteConfig(cfg map[string]any) {
	d.t.Helper()
	c := map[string]any{"bpffs": d.BPFFS, "socket": d.Socket, "stateDir": d.StateDir}
	for k, v := range cfg {
		c[k] = v
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		d.t.Fatal(err)
	}
	if d.ConfigPath == "" {
		d.ConfigPath = filepath.Join(filepath.Dir(d.Socket), "ctlbd.json")
	}
	if err := os.WriteFile(d.ConfigPath, b, 0o600); err != nil {
		d.t.Fatal(err)
	}
}

// Argv is the `ctlbd run` command line.
func (d *Daemon) Argv() []string {
	argv := []string{d.opts.Bin, "run"}
	if d.ConfigPath != "" {
		argv = append(argv, "--config", d.ConfigPath)
	} else {
		argv = append(argv, "--bpffs", d.BPFFS, "--socket", d.Socket, "--state-dir", d.StateDir)
	}
	return append(argv, d.opts.Args...)
}

// Start runs the daemon and waits until its socket answers a status call.
func (d *Daemon) Start() {
	d.t.Helper()
	d.Launch()
	d.WaitReady()
}

// Launch starts the daemon without waiting for it.
func (d *Daemon) Launch() {
	d.t.Helper()
	d.Started = time.Now()
	if d.opts.Bin == "" {
		d.startInProcess()
	} else {
		d.startProcess()
	}
}

// WaitExit waits up to limit for the process to exit by itself and
// reports whether it did and whether a signal (SIGKILL: a crash point)
// ended it.
func (d *Daemon) WaitExit(limit time.Duration) (exited, killed bool) {
	if d.cmd == nil {
		return true, false
	}
	select {
	case <-d.done:
	case <-time.After(limit):
		return false, false
	}
	ws, _ := d.cmd.ProcessState.Sys().(syscall.WaitStatus)
	killed = ws.Signaled() && ws.Signal() == syscall.SIGKILL
	d.cmd = nil
	return true, killed
}

// WaitReady waits until the daemon answers a status call.
func (d *Daemon) WaitReady() {
	d.t.Helper()
	if err := d.ready(); err != nil {
		d.t.Fatal(err)
	}
}

// TryStart is Start for tests in which the daemon may fail to start (too
// few capabilities): it returns why instead of failing the test.
func (d *Daemon) TryStart() error {
	d.t.Helper()
	d.Launch()
	return d.ready()
}

// TryReady is WaitReady for a daemon Launched by the test, returning why
// it is not ready instead of failing the test.
func (d *Daemon) TryReady() error { return d.ready() }

// ready waits until the daemon answers a status call, or says why not: it
// exited (with the end of its log) or did not answer within 10 s.
func (d *Daemon) ready() error {
	c := d.Client()
	_, seen, ok := testutil.Poll(10*time.Second, func() (bool, string) {
		if !d.Running() {
			return true, "exited"
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := c.Status(ctx)
		return err == nil, fmt.Sprint(err)
	})
	switch {
	case seen == "exited":
		return fmt.Errorf("ctlbd exited at start:\n%s", d.LogTail(4000))
	case !ok:
		return fmt.Errorf("ctlbd not answering on %s within 10s: %s", d.Socket, seen)
	}
	return nil
}

func (d *Daemon) startProcess() {
	argv := d.Argv()
	var cmd *exec.Cmd
	if d.opts.Wrap != nil {
		cmd = d.opts.Wrap(argv)
	} else {
		cmd = exec.Command(argv[0], argv[1:]...)
	}
	cmd.Stdout, cmd.Stderr = d.logs, d.logs
	if len(d.Env) > 0 {
		cmd.Env = append(os.Environ(), d.Env...)
	}
	// Its own process group, so a terminal's signals do not reach it; it
	// is ended by PID only.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := cmd.Start
	if d.opts.NetNS != nil {
		start = func() error { return d.opts.NetNS.Do(func(ns.NetNS) error { return cmd.Start() }) }
	}
	if err := start(); err != nil {
		d.t.Fatalf("start ctlbd: %v", err)
	}
	d.cmd = cmd
	done := make(chan struct{})
	d.done = done
	go func() { _ = cmd.Wait(); close(done) }()
}

func (d *Daemon) startInProcess() {
	var cfg *config.Config
	var err error
	if d.ConfigPath != "" {
		cfg, err = config.Load(d.ConfigPath)
	} else {
		cfg = config.Default()
		cfg.BPFFS, cfg.Socket, cfg.StateDir = d.BPFFS, d.Socket, d.StateDir
	}
	if err != nil {
		d.t.Fatalf("ctlbd config: %v", err)
	}
	log := slog.New(slog.NewTextHandler(d.logs, &slog.HandlerOptions{Level: d.opts.LogLevel}))
	dm, err := daemon.New(cfg, d.ConfigPath, log)
	if err != nil {
		d.t.Fatalf("ctlbd: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.inproc, d.cancel, d.ran = dm, cancel, make(chan error, 1)
	go func(ran chan error) { ran <- dm.Run(ctx) }(d.ran)
}

// Running reports whether the daemon has not exited.
func (d *Daemon) Running() bool {
	switch {
	case d.cmd != nil:
		select {
		case <-d.done:
			return false
		default:
			return true
		}
	case d.inproc != nil:
		select {
		case err := <-d.ran:
			d.ran <- err
			return false
		default:
			return true
		}
	}
	return false
}

// PID is the daemon's process ID (0 in-process or not running).
func (d *Daemon) PID() int {
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Kill ends the daemon with SIGKILL, as a crash would, and waits until it
// is reaped: only then has every thread let go of its files (and so of the
// pin directory's lock). In-process, it stops without the SIGTERM path.
func (d *Daemon) Kill() {
	d.end(syscall.SIGKILL)
}

// Stop ends the daemon with SIGTERM (SIGKILL after 10 s) and waits for it.
func (d *Daemon) Stop() {
	d.end(syscall.SIGTERM)
}

func (d *Daemon) end(sig syscall.Signal) {
	if d.cmd != nil {
		_ = d.cmd.Process.Signal(sig)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.done
		}
		d.cmd = nil
	}
	if d.inproc != nil {
		d.cancel()
		select {
		case <-d.ran:
		case <-time.After(10 * time.Second):
			d.t.Errorf("in-process ctlbd did not stop within 10s")
		}
		d.inproc.Close()
		d.inproc = nil
	}
}

// Daemon is the in-process daemon (nil for a process).
func (d *Daemon) Daemon() *daemon.Daemon { return d.inproc }

// Client is a typed API client for the daemon's socket.
func (d *Daemon) Client() *api.Client { return api.NewClient(d.Socket) }

// Status is the daemon's status through the API; it fails the test on error.
func (d *Daemon) Status() api.Status {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := d.Client().Status(ctx)
	if err != nil {
		d.t.Fatalf("ctlbd status: %v", err)
	}
	return st
}

// Logs is everything the daemon has logged.
func (d *Daemon) Logs() string { return d.logs.String() }

// LogTail is the last n bytes of the log.
func (d *Daemon) LogTail(n int) string {
	s := d.logs.String()
	if len(s) > n {
		s = s[len(s)-n:]
	}
	return s
}

// CLI runs a ctlbd client command against the daemon.
func (d *Daemon) CLI(args ...string) (stdout, stderr string, code int) {
	if d.opts.CLIBin == "" {
		d.t.Fatal("ctlbdtest: CLI needs Options.Bin or CLIBin")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.opts.CLIBin, append([]string{"--socket", d.Socket}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
		errOut.WriteString(err.Error())
	}
	return out.String(), errOut.String(), code
}

// MustCLI runs a command that must succeed and returns its output.
func (d *Daemon) MustCLI(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.CLI(args...)
	if code != 0 {
		d.t.Fatalf("ctlbd %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// JSON runs a command with -o json and decodes its output into v.
func (d *Daemon) JSON(v any, args ...string) {
	d.t.Helper()
	out := d.MustCLI(append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("ctlbd %s -o json: %v\n%s", strings.Join(args, " "), err, out)
	}
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

// SetService points vip at servers through the CLI (ctlbd service set), as
// an operator would.
func (d *Daemon) SetService(vip string, servers ...string) {
	d.t.Helper()
	d.MustCLI(append([]string{"service", "set", vip}, servers...)...)
}

// Attachments lists the pinned attachments through the API.
func (d *Daemon) Attachments() []api.Attachment {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := d.Client().Attachments(ctx)
	if err != nil {
		d.t.Fatalf("ctlbd attachments: %v", err)
	}
	return list
}
