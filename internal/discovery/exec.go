package discovery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Exec defaults and limits.
const (
	DefaultExecInterval = 10 * time.Second
	// MaxExecOutput bounds what a command may print; more is a failed run.
	MaxExecOutput = 1 << 20
	// maxExecStderr is how much of the standard error goes into the error.
	maxExecStderr = 4096
)

// Exec runs a command whose standard output lists the servers, separated by
// spaces or newlines, each "a.b.c.d" or "a.b.c.d:port" (the convention
// consul-dataplane uses for cloud auto-join), and runs it again every
// Interval. A command that fails, times out or prints more than
// MaxExecOutput keeps the last good list; an entry that is not an address
// is left out (and reported) while the others stand.
//
// The command runs without a shell, in a process group of its own, with
// ctlbd's environment plus CTLB_SERVER_PORT (the port given to entries
// without one). When it times out, or when it ends, the whole group is
// killed: a script's children (curl, aws, sleep) are never left behind.
type Exec struct {
	// Command is the program and its arguments (no shell).
	Command []string
	// Port is put on addresses printed without one (DefaultPort when 0).
	Port uint16
	// Interval is the time between two runs (DefaultExecInterval).
	Interval time.Duration
	// Timeout bounds one run (Interval when 0).
	Timeout time.Duration
}

// Name implements Source.
func (Exec) Name() string { return "exec" }

func (e Exec) withDefaults() Exec {
	if e.Interval <= 0 {
		e.Interval = DefaultExecInterval
	}
	if e.Timeout <= 0 {
		e.Timeout = e.Interval
	}
	e.Port = portOr(e.Port)
	return e
}

// Run runs the command until ctx is done.
func (e Exec) Run(ctx context.Context, emit func(Result)) {
	e = e.withDefaults()
	for {
		servers, rejected, err := e.Once(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			emit(Result{Err: err, Rejected: rejected})
		} else {
			emit(Result{Servers: servers, Rejected: rejected})
		}
		if !sleep(ctx, e.Interval) {
			return
		}
	}
}

// limitedBuffer keeps at most n bytes and notes that more came. It wraps
// the buffer rather than embedding it: an embedded bytes.Buffer would give
// it ReadFrom, which io.Copy (and so os/exec) prefers to Write, and the cap
// would never apply.
type limitedBuffer struct {
	buf  bytes.Buffer
	n    int
	over bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.n - b.buf.Len(); n > room {
		b.over = true
		p = p[:max(room, 0)]
	}
	b.buf.Write(p)
	// Report all of p taken: a short write would stop the copy and hide
	// the real outcome (the command's exit) behind io.ErrShortWrite.
	return n, nil
}

func (b *limitedBuffer) String() string { return b.buf.String() }

// Once runs the command one time and parses its output.
func (e Exec) Once(ctx context.Context) ([]netip.AddrPort, []Rejected, error) {
	e = e.withDefaults()
	if len(e.Command) == 0 || e.Command[0] == "" {
		return nil, nil, errors.New("exec: empty command")
	}
	ctx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.Command[0], e.Command[1:]...)
	cmd.Env = append(os.Environ(), "CTLB_SERVER_PORT="+strconv.Itoa(int(e.Port)))
	stdout := &limitedBuffer{n: MaxExecOutput}
	stderr := &limitedBuffer{n: maxExecStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// Its own process group, so that one signal reaches the command and
	// everything it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return killGroup(cmd) }
	// A child that keeps the pipes open after the kill must not hold us.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if cmd.Process != nil {
		// Whatever the command left running in its group goes with it.
		_ = killGroup(cmd)
	}
	name := e.Command[0]
	if ctx.Err() == context.DeadlineExceeded {
		return nil, nil, fmt.Errorf("exec %s: timed out after %s (process group killed)", name, e.Timeout)
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg != "" {
			return nil, nil, fmt.Errorf("exec %s: %w: %s", name, err, Truncate(msg, MaxErrorText))
		}
		return nil, nil, fmt.Errorf("exec %s: %w", name, err)
	}
	if stdout.over {
		return nil, nil, fmt.Errorf("exec %s: output larger than %d bytes", name, MaxExecOutput)
	}
	servers, rejected, err := ParseList(stdout.String(), e.Port)
	if err != nil {
		return nil, rejected, fmt.Errorf("exec %s: %w", name, err)
	}
	return servers, rejected, nil
}

// killGroup sends SIGKILL to the command's process group (its PID is the
// group's ID, from Setpgid). A group already gone is no error.
func killGroup(cmd *exec.Cmd) error {
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill process group %d: %w", cmd.Process.Pid, err)
	}
	return nil
}

// ParseList reads servers separated by white space (spaces, tabs,
// newlines), each an IP address with an optional port ("a.b.c.d",
// "a.b.c.d:port", "[v6]:port"). An entry that is not an address is
// rejected with the reason and the others stand; an answer without a single
// address is ErrEmpty. Whether an address suits the service map (family,
// unicast, ...) is the caller's rule, not the parser's.
func ParseList(s string, defPort uint16) ([]netip.AddrPort, []Rejected, error) {
	var out []netip.AddrPort
	var rejected []Rejected
	for _, f := range strings.Fields(s) {
		ap, err := parseEntry(f, defPort)
		if err != nil {
			rejected = append(rejected, Rejected{Entry: Truncate(f, 64), Reason: err.Error()})
			continue
		}
		out = append(out, ap)
	}
	if len(out) == 0 {
		if len(rejected) > 0 {
			return nil, rejected, fmt.Errorf("%w (%d entries rejected, the first: %s)", ErrEmpty, len(rejected), rejected[0].Reason)
		}
		return nil, nil, ErrEmpty
	}
	return out, rejected, nil
}

// parseEntry reads one address with an optional port, of either family.
func parseEntry(s string, defPort uint16) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return netip.AddrPort{}, errors.New("port 0")
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}, errors.New("not an address or address:port")
	}
	return netip.AddrPortFrom(a.Unmap(), defPort), nil
}
