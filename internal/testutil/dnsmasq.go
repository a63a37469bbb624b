package testutil

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// DNSMasq is a real DNS server (Debian's dnsmasq) answering A records from
// a hosts file the test rewrites, on a random 127.53.x.y address and port.
// It forwards nothing (no upstream) and serves the zone "test" from the
// hosts file alone: a name of that zone it does not know gets NXDOMAIN, one
// with only AAAA records NODATA for A; a name outside it gets REFUSED.
type DNSMasq struct {
	t     testing.TB
	netns ns.NetNS // nil: the test's own
	Addr  netip.AddrPort
	hosts string
	cmd   *exec.Cmd
	done  chan struct{}
}

// StartDNSMasq starts dnsmasq serving records (name -> IPv4 addresses) with
// the given TTL in seconds, and stops it when the test ends.
func StartDNSMasq(t testing.TB, records map[string][]string, ttl int) *DNSMasq {
	t.Helper()
	return startDNSMasq(t, nil, records, ttl)
}

// StartDNSMasqIn is StartDNSMasq inside a test network namespace.
func StartDNSMasqIn(t testing.TB, netns ns.NetNS, records map[string][]string, ttl int) *DNSMasq {
	t.Helper()
	return startDNSMasq(t, netns, records, ttl)
}

// in runs f in the server's network namespace.
func (d *DNSMasq) in(f func() error) error {
	if d.netns == nil {
		return f()
	}
	return d.netns.Do(func(ns.NetNS) error { return f() })
}

func startDNSMasq(t testing.TB, netns ns.NetNS, records map[string][]string, ttl int) *DNSMasq {
	t.Helper()
	bin, err := exec.LookPath("dnsmasq")
	Require(t, err == nil, "dnsmasq not installed (apt-get install dnsmasq)")
	dir := t.TempDir()
	d := &DNSMasq{t: t, netns: netns, hosts: filepath.Join(dir, "hosts")}
	d.writeHosts(records)
	ip := netip.AddrFrom4([4]byte{127, 53, byte(1 + rand.IntN(250)), byte(1 + rand.IntN(250))})
	_ = d.in(func() error { d.Addr = netip.AddrPortFrom(ip, freePort(t, ip)); return nil })
	d.cmd = exec.Command(bin,
		"--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
		"--addn-hosts="+d.hosts, "--local=/test/",
		"--listen-address="+ip.String(), "--bind-interfaces", fmt.Sprintf("--port=%d", d.Addr.Port()),
		fmt.Sprintf("--local-ttl=%d", ttl),
		"--user=root", "--group=root", // the hosts file is in a 0700 test directory
		"--pid-file="+filepath.Join(dir, "pid"), "--log-facility="+filepath.Join(dir, "log"))
	out, err := os.Create(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	d.cmd.Stdout, d.cmd.Stderr = out, out
	if err := d.in(d.cmd.Start); err != nil {
		t.Fatalf("start dnsmasq: %v", err)
	}
	d.done = make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			o, _ := os.ReadFile(filepath.Join(dir, "out"))
			t.Logf("dnsmasq output:\n%s%s", o, b)
		}
	})
	// Ready when it answers a name it knows, or any name when it has none.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := d.Lookup("ctlb-ready-probe.invalid")
		if err == nil || isDNSAnswer(err) {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("dnsmasq on %s not answering: %v", d.Addr, err)
		}
		select {
		case <-d.done:
			b, _ := os.ReadFile(filepath.Join(dir, "out"))
			t.Fatalf("dnsmasq exited: %s", b)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// isDNSAnswer tells an answer that says "no such name" from no answer.
func isDNSAnswer(err error) bool {
	var de *net.DNSError
	if errors.As(err, &de) {
		return de.IsNotFound || (!de.IsTimeout && !strings.Contains(de.Err, "refused"))
	}
	return false
}

// Lookup resolves name's A records through this server only.
func (d *DNSMasq) Lookup(name string) ([]string, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var c net.Conn
		err := d.in(func() error {
			var err error
			c, err = (&net.Dialer{}).DialContext(ctx, network, d.Addr.String())
			return err
		})
		return c, err
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ips, err := r.LookupHost(ctx, name)
	slices.Sort(ips)
	return ips, err
}

// SetRecords rewrites the hosts file and makes dnsmasq reload it (SIGHUP,
// which also clears its cache).
func (d *DNSMasq) SetRecords(records map[string][]string) {
	d.t.Helper()
	d.writeHosts(records)
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		d.t.Fatalf("SIGHUP dnsmasq (pid %d): %v", d.cmd.Process.Pid, err)
	}
}

// Stop kills dnsmasq (by its PID) and waits for it; later queries time out.
func (d *DNSMasq) Stop() {
	if d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.t.Errorf("dnsmasq (pid %d) did not exit", d.cmd.Process.Pid)
	}
}

func (d *DNSMasq) writeHosts(records map[string][]string) {
	d.t.Helper()
	var b strings.Builder
	for name, ips := range records {
		for _, ip := range ips {
			fmt.Fprintf(&b, "%s %s\n", ip, name)
		}
	}
	// Replace the file in one step, so a reload never reads half of it.
	tmp := d.hosts + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, d.hosts); err != nil {
		d.t.Fatal(err)
	}
}

// freePort finds a port free for both UDP and TCP on ip.
func freePort(t testing.TB, ip netip.Addr) uint16 {
	t.Helper()
	for range 50 {
		u, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
		if err != nil {
			t.Fatalf("udp port on %s: %v", ip, err)
		}
		port := uint16(u.LocalAddr().(*net.UDPAddr).Port)
		l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
		u.Close()
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatalf("no free port on %s", ip)
	return 0
}
