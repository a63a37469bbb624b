package main

import (
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/topo"
	"github.com/ctlb/ctlb/test/bench/workload"
)

// The lean client and echo server (lean/lean.c): C, blocking sockets, so
// that a connection costs what the kernel and the path under test make it
// cost. They serve the connection-rate rows and the CPU-per-connect
// measurement; latency and bulk stay with the Go client, whose overhead per
// byte or per round trip on a kept connection is small.
//
//go:embed lean/lean.c
var leanSource []byte

// buildLean compiles lean.c with the machine's C compiler into a cache
// keyed by the source's hash, once per source version.
func buildLean() (string, error) {
	// clang is there wherever the BPF programs are built
	// (hack/install-deps.sh); any of these compiles lean.c.
	var cc string
	for _, c := range []string{"gcc", "cc", "clang"} {
		if p, err := exec.LookPath(c); err == nil {
			cc = p
			break
		}
	}
	if cc == "" {
		return "", errors.New("no C compiler (Debian package gcc or clang)")
	}
	sum := sha256.Sum256(leanSource)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "ctlb", "bench-lean", hex.EncodeToString(sum[:8]))
	bin := filepath.Join(dir, "lean")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("lean cache: %w", err)
	}
	src := filepath.Join(dir, "lean.c")
	if err := os.WriteFile(src, leanSource, 0o644); err != nil {
		return "", fmt.Errorf("lean source: %w", err)
	}
	tmp := bin + fmt.Sprintf(".tmp%d", os.Getpid())
	out, err := exec.Command(cc, "-O2", "-Wall", "-pthread", "-o", tmp, src).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("%s lean.c: %w: %s", cc, err, out)
	}
	return bin, os.Rename(tmp, bin)
}

// startLean builds the lean programs and starts an echo server in each
// server namespace (the echo ports; the Go servers keep the source ports)
// and a client in each client cgroup.
func (e *env) startLean() error {
	bin, err := buildLean()
	if err != nil {
		return err
	}
	e.leanBin = bin
	for i, ip := range serverIPs {
		args := []string{"server"}
		for _, port := range []int{echoPort, dnatEchoPort} {
			args = append(args, netip.AddrPortFrom(ip, uint16(port)).String())
		}
		args = append(args, everyClientListeners(i)...)
		if _, err := e.startLeanProc(fmt.Sprintf("lean-server%d", i+1), args, e.srv[i], e.cgSrv); err != nil {
			return err
		}
	}
	e.leanClients = map[string]*topo.Proc{}
	for _, cg := range []string{e.cgPlain, e.cgPod} {
		p, err := e.startLeanProc("lean-client-"+filepath.Base(cg), []string{"client", cg}, e.pod, cg)
		if err != nil {
			return err
		}
		e.leanClients[cg] = p
	}
	return nil
}

func (e *env) startLeanProc(name string, args []string, netns ns.NetNS, cgroup string) (*topo.Proc, error) {
	p, err := topo.Start(e.u, topo.ProcSpec{Name: name, Path: e.leanBin, Args: args, NetNS: netns, Cgroup: cgroup})
	if err != nil {
		return nil, err
	}
	line, err := p.Recv(15 * time.Second)
	if err != nil {
		return nil, err
	}
	var r ready
	if err := json.Unmarshal(line, &r); err != nil || !r.Ready {
		return nil, fmt.Errorf("%s did not start: %s", name, line)
	}
	return p, nil
}

// socketKind is the lean client's kind of socket in a rate measurement.
type socketKind int

const (
	// tcpSocket: connect, 64-byte request and reply, close, per operation.
	tcpSocket socketKind = iota
	// udpConnected: one UDP socket per client, connected once; a 64-byte
	// datagram and its echo per operation.
	udpConnected
	// udpUnconnected: the same with sendto and recvfrom on an unconnected
	// socket.
	udpUnconnected
)

// leanRate is a rate measurement made by the lean client.
func leanRate(client *topo.Proc, q workload.Request, sock socketKind) (workload.Result, error) {
	maxOps := q.MaxOps
	if maxOps <= 0 {
		maxOps = workload.MaxOps
	}
	line := fmt.Sprintf("rate %d %d %d %s", max(q.Conns, 1), q.Duration.Nanoseconds(), maxOps, strings.Join(q.Targets, " "))
	if sock != tcpSocket {
		connected := 0
		if sock == udpConnected {
			connected = 1
		}
		line = fmt.Sprintf("udp %d %d %d %d %s", max(q.Conns, 1), q.Duration.Nanoseconds(), maxOps, connected, strings.Join(q.Targets, " "))
	}
	if err := client.Send([]byte(line)); err != nil {
		return workload.Result{}, err
	}
	out, err := client.Recv(q.Duration + 15*time.Second)
	if err != nil {
		return workload.Result{}, err
	}
	var r workload.Result
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("lean client result %q: %w", out, err)
	}
	return r, nil
}
