package discovery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"
)

// Exec defaults.
const (
	DefaultExecInterval = 10 * time.Second
	maxExecOutput       = 1 << 20
)

// Exec runs a command whose standard output lists the servers, separated by
// spaces or newlines, each "a.b.c.d" or "a.b.c.d:port" (the convention
// consul-dataplane uses for cloud auto-join), and runs it again every
// Interval. A command that fails, times out or prints anything else keeps
// the last good list.
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
		servers, err := e.Once(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			emit(Result{Err: err})
		} else {
			emit(Result{Servers: servers})
		}
		if !sleep(ctx, e.Interval) {
			return
		}
	}
}

// limitedBuffer keeps at most n bytes and notes that more came.
type limitedBuffer struct {
	bytes.Buffer
	n    int
	over bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.n - b.Len(); len(p) > room {
		b.over = true
		p = p[:max(room, 0)]
	}
	b.Buffer.Write(p)
	return len(p), nil
}

// Once runs the command one time and parses its output.
func (e Exec) Once(ctx context.Context) ([]netip.AddrPort, error) {
	e = e.withDefaults()
	if len(e.Command) == 0 || e.Command[0] == "" {
		return nil, errors.New("exec: empty command")
	}
	ctx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.Command[0], e.Command[1:]...)
	stdout := &limitedBuffer{n: maxExecOutput}
	stderr := &limitedBuffer{n: 4096}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// A child that keeps the pipes open after the kill must not hold us.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if ctx.Err() == context.DeadlineExceeded {
		return nil, fmt.Errorf("exec %s: timed out after %s", e.Command[0], e.Timeout)
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg != "" {
			return nil, fmt.Errorf("exec %s: %w: %s", e.Command[0], err, msg)
		}
		return nil, fmt.Errorf("exec %s: %w", e.Command[0], err)
	}
	if stdout.over {
		return nil, fmt.Errorf("exec %s: output larger than %d bytes", e.Command[0], maxExecOutput)
	}
	servers, err := ParseList(stdout.String(), e.Port)
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", e.Command[0], err)
	}
	return servers, nil
}

// ParseList reads servers separated by white space (spaces, tabs,
// newlines), each an IPv4 address with an optional ":port". One bad entry
// fails the whole list: half an answer is no answer.
func ParseList(s string, defPort uint16) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, f := range strings.Fields(s) {
		ap, err := ParseServer(f, defPort)
		if err != nil {
			return nil, err
		}
		out = append(out, ap)
	}
	if len(out) == 0 {
		return nil, ErrEmpty
	}
	return Normalize(out), nil
}
