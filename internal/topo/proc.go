package topo

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ProcSpec says what to start and where.
type ProcSpec struct {
	Name string // for messages
	Path string
	Args []string
	Env  []string // added to this process's environment
	// NetNS is the namespace the process starts in (a child inherits the
	// namespace of the thread that forks it); nil means this process's.
	NetNS ns.NetNS
	// Cgroup is the v2 cgroup directory the process is born in
	// (CLONE_INTO_CGROUP), so that every socket it ever creates belongs to
	// that cgroup and its CPU time is counted there from the start.
	Cgroup string
	// Stderr receives the process's standard error; nil means ours.
	Stderr io.Writer
}

// Proc is a child process started by the benchmark, talked to over its
// standard input and output.
type Proc struct {
	Name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	done  chan struct{}
	err   error
}

// Start starts a child process and registers its stop. The child gets its
// own process group (a Ctrl-C on the terminal reaches only the benchmark,
// which then stops its children in order) and is killed if the benchmark
// dies first.
func Start(u *Undo, spec ProcSpec) (*Proc, error) {
	cmd := exec.Command(spec.Path, spec.Args...)
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.Stderr = spec.Stderr
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	attr := &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if spec.Cgroup != "" {
		f, err := os.Open(spec.Cgroup)
		if err != nil {
			return nil, fmt.Errorf("start %s: cgroup: %w", spec.Name, err)
		}
		defer f.Close()
		attr.UseCgroupFD = true
		attr.CgroupFD = int(f.Fd())
	}
	cmd.SysProcAttr = attr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	start := func(ns.NetNS) error { return cmd.Start() }
	if spec.NetNS != nil {
		err = spec.NetNS.Do(start)
	} else {
		err = start(nil)
	}
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	p := &Proc{Name: spec.Name, cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout), done: make(chan struct{})}
	p.out.Buffer(make([]byte, 64<<10), 16<<20)
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	u.Push(fmt.Sprintf("process %s (pid %d)", spec.Name, cmd.Process.Pid), func() error { return p.Stop(3 * time.Second) })
	return p, nil
}

// PID is the child's process ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Send writes one line to the child's standard input.
func (p *Proc) Send(line []byte) error {
	if _, err := p.stdin.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("%s: write request: %w", p.Name, err)
	}
	return nil
}

// Recv reads one line of the child's standard output, waiting at most
// timeout.
func (p *Proc) Recv(timeout time.Duration) ([]byte, error) {
	type line struct {
		b   []byte
		err error
	}
	c := make(chan line, 1)
	go func() {
		if p.out.Scan() {
			c <- line{append([]byte(nil), p.out.Bytes()...), nil}
			return
		}
		err := p.out.Err()
		if err == nil {
			err = io.EOF
		}
		c <- line{nil, err}
	}()
	select {
	case l := <-c:
		if l.err != nil {
			return nil, fmt.Errorf("%s: read reply: %w", p.Name, l.err)
		}
		return l.b, nil
	case <-time.After(timeout):
		// The reader goroutine stays blocked until the child is stopped,
		// which closes its output; the benchmark gives up on it anyway.
		return nil, fmt.Errorf("%s: no reply within %s", p.Name, timeout)
	}
}

// Stop asks the child to finish by closing its standard input, then sends
// SIGTERM and at last SIGKILL, each to its PID, waiting up to grace between
// steps. Stopping a stopped child is a no-op.
func (p *Proc) Stop(grace time.Duration) error {
	p.stdin.Close()
	for _, sig := range []syscall.Signal{0, syscall.SIGTERM, syscall.SIGKILL} {
		if sig != 0 {
			_ = p.cmd.Process.Signal(sig)
		}
		select {
		case <-p.done:
			var ee *exec.ExitError
			if p.err != nil && !errors.As(p.err, &ee) {
				return fmt.Errorf("%s: %w", p.Name, p.err)
			}
			return nil
		case <-time.After(grace):
		}
	}
	return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.Name, p.PID())
}

// Exited reports whether the child has exited, and how.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}
