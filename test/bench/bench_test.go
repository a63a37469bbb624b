package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/topo"
)

// The child roles are this test binary again.
func TestMain(m *testing.M) {
	if runChild() {
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func requireTools(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
	for _, tool := range []string{"haproxy", "nft"} {
		_, err := exec.LookPath(tool)
		testutil.Require(t, err == nil, tool+" is not installed (hack/install-deps.sh installs it)")
	}
}

// tinyConfig runs every part of the benchmark at a size that proves it works
// and says nothing about speed.
func tinyConfig(t *testing.T, plugin string) Config {
	return Config{
		Rounds:       1,
		Duration:     200 * time.Millisecond,
		Clients:      4,
		Streams:      2,
		AttachLevels: []int{1, 4},
		VIPLevels:    []int{10, 40},
		ScaleRounds:  1,
		MaxForeign:   1, // never repeat: speed is not the point here
		Warm:         true,
		CNIPlugin:    plugin,
		CNIPods:      3,
		CostBlock:    20,
		CostPairs:    5,
		Out:          filepath.Join(t.TempDir(), "results.json"),
		Quiet:        true,
	}
}

// leftovers lists what a run of this process may have left behind.
func leftovers(t *testing.T) []string {
	t.Helper()
	prefix := fmt.Sprintf("ctlb-bench-%d", os.Getpid())
	var out []string
	entries, _ := os.ReadDir(topo.NetNSDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, filepath.Join(topo.NetNSDir, e.Name()))
		}
	}
	if m, err := cgroupv2.Mountpoint(); err == nil {
		if _, err := os.Stat(filepath.Join(m, prefix)); err == nil {
			out = append(out, filepath.Join(m, prefix))
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && bytes.Contains(b, []byte(prefix+"-bpffs-")) {
		out = append(out, "a bpffs mount "+prefix+"-bpffs-*")
	}
	return out
}

// TestBenchSmoke runs the whole benchmark tiny: every path must move bytes
// without an error, connect4 must have sent connections to every server,
// the CNI plugin must have attached and detached, and nothing may be left
// behind. It asserts no speed.
func TestBenchSmoke(t *testing.T) {
	requireTools(t)
	bins, err := testutil.BuildBinaries(t.TempDir(), "./plugins/meta/ctlb")
	if err != nil {
		t.Fatal(err)
	}
	cfg := tinyConfig(t, bins["ctlb"])
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := run(ctx, cfg)
	if err != nil {
		t.Fatalf("bench: %v", err)
	}
	if l := leftovers(t); len(l) > 0 {
		t.Errorf("left behind: %v", l)
	}
	if len(res.Paths) != len(allPaths) {
		t.Fatalf("%d paths measured, want %d", len(res.Paths), len(allPaths))
	}
	for _, p := range res.Paths {
		if p.Unavailable != "" {
			t.Errorf("%s: unavailable: %s", p.Name, p.Unavailable)
			continue
		}
		if p.Errors > 0 {
			t.Errorf("%s: %d errors, first: %s", p.Name, p.Errors, p.FirstError)
		}
		figures := map[string]float64{"Gbit/s 1": p.Bulk1.Median, "Gbit/s N": p.BulkN.Median}
		if !bulkOnly(p.Name) {
			figures["conns/s 1"], figures["conns/s N"], figures["p50"] = p.Rate1.Median, p.RateN.Median, p.P50.Median
		} else if len(p.Rate1.Rounds)+len(p.RateN.Rounds)+len(p.P50.Rounds) > 0 {
			t.Errorf("%s: bulk-only path measured on other rows", p.Name)
		}
		for what, v := range figures {
			if v <= 0 {
				t.Errorf("%s: %s is %v: nothing moved", p.Name, what, v)
			}
		}
	}
	// The connect4 VIP is routed nowhere: its connections can only have
	// succeeded by being rewritten, and ctlb counted each per server.
	for _, s := range servers(echoPort) {
		if res.Connect4Servers[s] == 0 {
			t.Errorf("connect4 sent no connection to server %s: %v", s, res.Connect4Servers)
		}
	}
	if len(res.VIPScale) != 2 || len(res.AttachScale) != 2 {
		t.Errorf("scale points: %d VIP, %d attachment, want 2 each", len(res.VIPScale), len(res.AttachScale))
	}
	for _, pt := range append(res.VIPScale, res.AttachScale...) {
		if pt.BPFNsPerConn.Median <= 0 || pt.DirectCPUNsPerConn.Median <= 0 {
			t.Errorf("scale point %d attachments %d VIPs: no BPF time or CPU time measured: %+v", pt.Attachments, pt.VIPs, pt)
		}
	}
	if res.Memory.PerVIPMemlock <= 0 {
		t.Errorf("per-VIP memlock %v: the VIPs' maps were not found", res.Memory.PerVIPMemlock)
	}
	if res.BPFCost.NsPerConn <= 0 || len(res.BPFCost.Programs) == 0 {
		t.Errorf("no BPF run time measured: %+v", res.BPFCost)
	}
	for _, p := range res.BPFCost.Programs {
		if strings.Contains(p.Program, "connect4") && p.Runs == 0 {
			t.Errorf("connect4 never ran during the cost measurement: %+v", res.BPFCost)
		}
	}
	// Layout v1 (pkg/datapath/testdata) measured beside this layout.
	if b := res.BPFLayouts; b == nil || !b.V1Measured || b.NsPerConn.Median <= 0 || b.V1NsPerConn.Median <= 0 || b.Errors > 0 {
		t.Errorf("BPF time per connection, v1 beside this layout: %+v", b)
	}
	// Every client: each IPv6, dual-stack and UDP path moved requests
	// without an error. Their VIPs are routed nowhere, so a request can
	// only have succeeded by being rewritten (and an unconnected UDP
	// reply counts only if it came from the VIP).
	if len(res.EveryClient) != len(clientPaths) {
		t.Errorf("%d every-client paths measured, want %d", len(res.EveryClient), len(clientPaths))
	}
	for _, p := range res.EveryClient {
		switch {
		case p.Unavailable != "":
			t.Errorf("%s: unavailable: %s", p.Name, p.Unavailable)
		case p.Errors > 0:
			t.Errorf("%s: %d errors, first: %s", p.Name, p.Errors, p.FirstError)
		case p.Rate1.Median <= 0 || p.RateN.Median <= 0:
			t.Errorf("%s: rates %v and %v: nothing moved", p.Name, p.Rate1.Median, p.RateN.Median)
		}
	}
	// The lean client made the rate rows and the CPU-per-connect rows;
	// every row connected without an error.
	if !res.Lean {
		t.Errorf("the lean client did not run: %s", res.LeanUnavailable)
	}
	rows := map[string]CostRow{}
	for _, c := range res.ConnectCost.Rows {
		rows[c.Name] = c
		if c.Skipped != "" || c.Errors > 0 || c.ANs <= 0 || c.BNs <= 0 {
			t.Errorf("connect cost row %s: %+v", c.Name, c)
		}
	}
	for _, want := range []string{"none", "connect4", "+getpeername4", "ctlb", "ctlb non-VIP", "dnat"} {
		if _, ok := rows[want]; !ok {
			t.Errorf("connect cost: no row %q in %+v", want, res.ConnectCost.Rows)
		}
	}
	// The per-feature rows of the connect4 variants.
	for _, f := range costFeatures {
		if _, ok := rows[f.row]; !ok {
			t.Errorf("connect cost: no feature row %q in %+v", f.row, res.ConnectCost.Rows)
		}
	}
	if rows["+sock_release"].Name == "" && rows["+sock_ops"].Name == "" {
		t.Errorf("connect cost: no row for the accounting program (sock_release or sock_ops) in %+v", res.ConnectCost.Rows)
	}
	if len(res.CNI) != 2 {
		t.Fatalf("%d CNI results, want 2", len(res.CNI))
	}
	for _, c := range res.CNI {
		if c.Skipped != "" || c.AddP50 <= 0 || c.DelP50 <= 0 {
			t.Errorf("CNI with %d attached: %+v", c.Attached, c)
		}
	}
	if len(res.Targets) == 0 {
		t.Error("no targets evaluated")
	}
	var out bytes.Buffer
	printReport(&out, res)
	for _, want := range []string{"connect4", "haproxy", "targets:", "connect6", "dual-stack", "udp-sendmsg4", "within 10% of layout v1", "vs layout v1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	if err := writeResults(cfg.Out, res); err != nil {
		t.Fatal(err)
	}
	dat, err := os.ReadFile(datPath(cfg.Out))
	if err != nil {
		t.Fatal(err)
	}
	// The paths, then the every-client rows as a second data set.
	paths, clients, _ := strings.Cut(string(dat), "\n\n\n")
	if n := strings.Count(paths+"\n", "\n"); n != len(allPaths)+1 {
		t.Errorf("gnuplot data has %d lines of paths, want a header and %d paths:\n%s", n, len(allPaths), dat)
	}
	if n := strings.Count(clients, "\n"); n != len(clientPaths)+1 {
		t.Errorf("gnuplot data has %d every-client lines, want a header and %d paths:\n%s", n, len(clientPaths), dat)
	}
}

// TestBenchInterruptCleansUp cancels a run half-way, as Ctrl-C does, and
// checks that the run stops and removes everything it made.
func TestBenchInterruptCleansUp(t *testing.T) {
	requireTools(t)
	cfg := tinyConfig(t, "")
	cfg.Rounds = 50
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Past setup and into the measurements.
		time.Sleep(4 * time.Second)
		cancel()
	}()
	start := time.Now()
	_, err := run(ctx, cfg)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("run: %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("run took %s to stop", d)
	}
	if l := leftovers(t); len(l) > 0 {
		t.Errorf("left behind: %v", l)
	}
}

// bulkOnly says whether the path of that name is measured on the Gbit/s rows
// alone.
func bulkOnly(name string) bool {
	for _, p := range allPaths {
		if p.name == name {
			return p.bulkOnly
		}
	}
	return false
}
