package testutil

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// A test client is the test binary itself, re-executed with clientEnv set,
// so that it can be started inside a cgroup (CLONE_INTO_CGROUP) and a
// network namespace: the cgroup hooks see a socket's cgroup, which is its
// creating process's, so the client must be a process of its own.
const clientEnv = "CTLB_TEST_CLIENT"

// ClientSpec says what a client process does.
type ClientSpec struct {
	// Mode: "dial" (Count connections, one after another, each closed after
	// the server named itself), "hold" (Count connections kept open until
	// Stop), "storm" (Workers loops of connections until Stop or Duration),
	// "udp" (Count datagrams, each answered by the server's address).
	Mode   string `json:"mode"`
	Target string `json:"target"`
	// Targets, in dial mode, are dialed once each instead of Target.
	Targets  []string      `json:"targets,omitempty"`
	Count    int           `json:"count"`
	Workers  int           `json:"workers"`
	Duration time.Duration `json:"duration"`
}

// ClientResult is what a client saw.
type ClientResult struct {
	// Landed names the server of each connection, in order (dial, hold, udp).
	Landed []string `json:"landed"`
	// Peers is getpeername() of each connection.
	Peers []string `json:"peers"`
	// PerServer counts connections per server (storm).
	PerServer map[string]int `json:"perServer"`
	Total     int            `json:"total"`
	Failed    int            `json:"failed"`
	Errors    []string       `json:"errors"`
}

// Client is a running client process.
type Client struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	waited bool
}

// RunClientIfChild runs the client and exits when this process is one;
// call it first in TestMain.
func RunClientIfChild() {
	raw := os.Getenv(clientEnv)
	if raw == "" {
		return
	}
	var spec ClientSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "client spec:", err)
		os.Exit(2)
	}
	runClient(spec)
	os.Exit(0)
}

// StartClient starts a client in netns and, unless cgroupDir is empty, in
// that cgroup. It is killed, by PID, when the test ends.
func StartClient(t testing.TB, netns ns.NetNS, cgroupDir string, spec ClientSpec) *Client {
	t.Helper()
	raw, _ := json.Marshal(spec)
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), clientEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	if cgroupDir != "" {
		f := OpenDir(t, cgroupDir)
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// The child inherits the network namespace of the thread that forks it.
	err = netns.Do(func(ns.NetNS) error { return cmd.Start() })
	if err != nil {
		t.Fatalf("start client: %v", err)
	}
	c := &Client{cmd: cmd, stdin: stdin, lines: bufio.NewScanner(stdout)}
	c.lines.Buffer(make([]byte, 1<<20), 64<<20)
	t.Cleanup(func() {
		if !c.waited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return c
}

// Result reads the client's next report: after its connections are made for
// dial, hold and udp, at the end for storm.
func (c *Client) Result(t testing.TB) ClientResult {
	t.Helper()
	if !c.lines.Scan() {
		t.Fatalf("client exited without a report: %v", c.lines.Err())
	}
	var r ClientResult
	if err := json.Unmarshal(c.lines.Bytes(), &r); err != nil {
		t.Fatalf("client report %q: %v", c.lines.Text(), err)
	}
	return r
}

// Stop tells the client to finish (close held connections, end a storm) and
// waits for it to exit.
func (c *Client) Stop(t testing.TB) {
	t.Helper()
	c.stdin.Close()
	c.waited = true
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("client: %v", err)
	}
}

// Finish stops a storm client and returns its final report.
func (c *Client) Finish(t testing.TB) ClientResult {
	t.Helper()
	c.stdin.Close()
	r := c.Result(t)
	c.Stop(t)
	return r
}

// RunClient runs a dial or udp client to completion and returns its report.
func RunClient(t testing.TB, netns ns.NetNS, cgroupDir string, spec ClientSpec) ClientResult {
	t.Helper()
	c := StartClient(t, netns, cgroupDir, spec)
	r := c.Result(t)
	c.Stop(t)
	return r
}

func runClient(spec ClientSpec) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { // stdin closing is the parent's "stop"
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	r := ClientResult{PerServer: map[string]int{}, Landed: []string{}, Peers: []string{}, Errors: []string{}}
	fail := func(err error) {
		r.Failed++
		if len(r.Errors) < 20 {
			r.Errors = append(r.Errors, err.Error())
		}
	}
	report := func() {
		b, _ := json.Marshal(r)
		fmt.Println(string(b))
	}
	switch spec.Mode {
	case "dial", "hold":
		targets := spec.Targets
		for i := 0; len(spec.Targets) == 0 && i < spec.Count; i++ {
			targets = append(targets, spec.Target)
		}
		var held []net.Conn
		for _, target := range targets {
			r.Total++
			c, err := net.DialTimeout(tcpNet(target), target, 3*time.Second)
			if err != nil {
				fail(err)
				r.Landed = append(r.Landed, "")
				r.Peers = append(r.Peers, "")
				continue
			}
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			name, err := ReadName(c)
			if err != nil {
				fail(err)
			}
			r.Landed = append(r.Landed, name)
			r.Peers = append(r.Peers, peerName(c))
			r.PerServer[name]++
			if spec.Mode == "hold" {
				held = append(held, c)
			} else {
				c.Close()
			}
		}
		report()
		<-ctx.Done()
		for _, c := range held {
			c.Close()
		}
	case "udp":
		for i := 0; i < spec.Count; i++ {
			r.Total++
			name, err := udpOnce(spec.Target)
			if err != nil {
				fail(err)
			}
			r.Landed = append(r.Landed, name)
			r.PerServer[name]++
		}
		report()
		<-ctx.Done()
	case "storm":
		d := spec.Duration
		if d <= 0 || d > 2*time.Minute {
			d = 2 * time.Minute
		}
		ctx, cancelT := context.WithTimeout(ctx, d)
		defer cancelT()
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := 0; w < max(spec.Workers, 1); w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := 0; ctx.Err() == nil && (spec.Count == 0 || n < spec.Count); n++ {
					name, err := dialOnce(spec.Target)
					mu.Lock()
					r.Total++
					if err != nil {
						fail(err)
					} else {
						r.PerServer[name]++
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		report()
		<-ctx.Done()
	default:
		fmt.Fprintf(os.Stderr, "unknown client mode %q\n", spec.Mode)
		os.Exit(2)
	}
}

func dialOnce(target string) (string, error) {
	c, err := net.DialTimeout(tcpNet(target), target, 3*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	return ReadName(c)
}

func udpOnce(target string) (string, error) {
	c, err := net.DialTimeout(udpNet(target), target, time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("?")); err != nil {
		return "", err
	}
	buf := make([]byte, 128)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// peerName asks the kernel, not Go's cache, for the socket's peer.
func peerName(c net.Conn) string {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return ""
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return ""
	}
	var out string
	_ = raw.Control(func(fd uintptr) {
		sa, err := syscall.Getpeername(int(fd))
		if err != nil {
			out = "error: " + err.Error()
			return
		}
		if in4, ok := sa.(*syscall.SockaddrInet4); ok {
			out = fmt.Sprintf("%d.%d.%d.%d:%d", in4.Addr[0], in4.Addr[1], in4.Addr[2], in4.Addr[3], in4.Port)
		}
		if in6, ok := sa.(*syscall.SockaddrInet6); ok {
			out = netip.AddrPortFrom(netip.AddrFrom16(in6.Addr), uint16(in6.Port)).String()
		}
	})
	return out
}
