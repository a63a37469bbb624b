// Command bench measures ctlb side by side with the other ways a pod reaches
// a service: straight to the servers, ctlb's connect4 rewrite, an nftables
// DNAT rule (kube-proxy), ctlb's fallback proxy in both listening modes,
// HAProxy, and a proxy in the style of the seed project. It builds its own
// topology of network namespaces and cgroups, runs every path in the same
// run in interleaved rounds, then prints a table and the targets as
// pass/fail and writes the figures as JSON (and a data file for gnuplot).
//
//	sudo bench -out bench/results.json
//
// Everything it creates is removed when it ends, fails, or is interrupted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ctlb/ctlb/internal/topo"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Config is what one run measures, and how long.
type Config struct {
	Rounds   int
	Duration time.Duration // of one measurement
	Clients  int           // concurrent clients of the "many" rate test
	Streams  int           // concurrent streams of the "several" bulk test
	// AttachLevels and VIPLevels are the scale points, ascending; the
	// first attachment level is 1 (the client's own pod cgroup).
	AttachLevels []int
	VIPLevels    []int
	ScaleRounds  int
	// MaxForeign is the share of the CPUs other processes may use during
	// a measurement before it is made again, at most Retries times.
	MaxForeign  float64
	Retries     int
	RetryBudget int
	// Warm keeps the CPUs from idling with SCHED_IDLE spinners, so that
	// wake-ups cost a context switch, not a hypervisor exit.
	Warm      bool
	CNIPlugin string // the plugin binary; empty skips the CNI timing
	CNIPods   int
	Out       string // results JSON; the gnuplot data goes beside it
	// GoClient measures connection rates with the Go client and servers
	// instead of the lean C ones (lean/lean.c).
	GoClient bool
	// CostBlock connects per block and CostPairs pairs of blocks in the
	// CPU-per-connect measurement (cost.go); 0 means the default.
	CostBlock, CostPairs int
	// V1Object is layout v1's BPF objects, measured beside this layout's
	// in the bpf phase; empty finds the repository's copy.
	V1Object string
	// Phases to run (memory, scale, cni, paths, clients, bpf, cost);
	// empty means all. Paths limits the path comparison to these; empty means all.
	Phases  []string
	Paths   []string
	Metrics []string // of the path comparison; empty means all
	// Self is the program started for the child roles; default this one.
	Self string
	// Quiet silences progress lines.
	Quiet bool
}

var quiet bool

func logf(format string, args ...any) {
	if !quiet {
		fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	}
}

func main() {
	if runChild() {
		return
	}
	var cfg Config
	var attach, vips, phases, paths, metricList string
	flag.IntVar(&cfg.Rounds, "rounds", 9, "interleaved rounds of every path and metric")
	flag.DurationVar(&cfg.Duration, "duration", 600*time.Millisecond, "length of one measurement")
	flag.IntVar(&cfg.Clients, "clients", 32, "concurrent clients in the many-clients connection test")
	flag.IntVar(&cfg.Streams, "streams", 4, "concurrent streams in the several-streams bulk test")
	flag.StringVar(&attach, "attachments", "1,100,1000", "attached pod cgroups at each scale point")
	flag.StringVar(&vips, "vips", "10,1000,10000", "VIP:ports in the maps at each scale point")
	flag.IntVar(&cfg.ScaleRounds, "scale-rounds", 5, "rounds at each scale point")
	flag.Float64Var(&cfg.MaxForeign, "max-foreign", 0.05, "share of the CPUs other processes may use during a measurement before it is repeated")
	flag.IntVar(&cfg.Retries, "retries", 3, "repeats of a measurement disturbed by other processes")
	flag.IntVar(&cfg.RetryBudget, "retry-budget", 80, "repeats in the whole run at most")
	flag.BoolVar(&cfg.Warm, "warm", true, "keep the CPUs from idling with SCHED_IDLE spinners (idle vCPUs wake slowly)")
	flag.StringVar(&cfg.CNIPlugin, "cni-plugin", "bin/ctlb", "ctlb CNI plugin binary to time; empty to skip")
	flag.IntVar(&cfg.CNIPods, "cni-pods", 1000, "pods to ADD for the CNI timing (the p99 of 200 is the second-slowest ADD, and moves by milliseconds from run to run)")
	flag.BoolVar(&cfg.GoClient, "go-client", false, "measure connection rates with the Go client and servers, not the lean C ones")
	flag.IntVar(&cfg.CostBlock, "cost-block", defaultCostBlock, "connects per block in the CPU-per-connect measurement")
	flag.IntVar(&cfg.CostPairs, "cost-pairs", defaultCostPairs, "pairs of blocks in the CPU-per-connect measurement")
	flag.StringVar(&phases, "phases", strings.Join(allPhases, ","), "phases to run, comma-separated: "+strings.Join(allPhases, ", "))
	flag.StringVar(&metricList, "metrics", "", "metrics of the path comparison, comma-separated (default all): "+metricNames())
	flag.StringVar(&paths, "paths", "", "paths to compare, comma-separated (default all): "+pathNames())
	flag.StringVar(&cfg.V1Object, "v1-object", "", "layout v1's BPF objects for the bpf phase's v1 comparison (default: "+v1ObjectPath+" in the working directory or a parent)")
	flag.StringVar(&cfg.Out, "out", "bench/results.json", "where to write the results")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	var err error
	if cfg.AttachLevels, err = levels(attach); err != nil {
		fatal(fmt.Errorf("-attachments: %w", err))
	}
	if cfg.VIPLevels, err = levels(vips); err != nil {
		fatal(fmt.Errorf("-vips: %w", err))
	}
	cfg.Phases, cfg.Paths, cfg.Metrics = splitList(phases), splitList(paths), splitList(metricList)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg)
	if err != nil {
		fatal(err)
	}
	printReport(os.Stdout, res)
	if err := writeResults(cfg.Out, res); err != nil {
		fatal(err)
	}
	logf("wrote %s, %s and %s", cfg.Out, txtPath(cfg.Out), datPath(cfg.Out))
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

func levels(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q: want positive integers, comma-separated", s)
		}
		if len(out) > 0 && n <= out[len(out)-1] {
			return nil, fmt.Errorf("%q: want ascending levels", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// The phases of a run, in the order they run.
const (
	phaseMemory = "memory"
	phaseScale  = "scale"
	phaseCNI    = "cni"
	phasePaths  = "paths"
	phaseBPF    = "bpf"
	phaseCost   = "cost"
)

// phaseClients: IPv6, dual-stack and UDP clients, each beside its direct
// path (every_client.go).
const phaseClients = "clients"

var allPhases = []string{phaseMemory, phaseScale, phaseCNI, phasePaths, phaseClients, phaseBPF, phaseCost}

const (
	defaultCostBlock = 200
	defaultCostPairs = 1000
)

func pathNames() string {
	var n []string
	for _, p := range append(slices.Clone(allPaths), clientPaths...) {
		n = append(n, p.name)
	}
	return strings.Join(n, ", ")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// runs reports whether the run includes a phase.
func (c Config) runs(phase string) bool {
	return len(c.Phases) == 0 || slices.Contains(c.Phases, phase)
}

// measures reports whether the path comparison includes a metric.
func (c Config) measures(name string) bool {
	return len(c.Metrics) == 0 || slices.Contains(c.Metrics, name)
}

func metricNames() string {
	var n []string
	for _, m := range metrics {
		n = append(n, m.name)
	}
	return strings.Join(n, ", ")
}

// compares reports whether the path comparison includes a path.
func (c Config) compares(name string) bool {
	return len(c.Paths) == 0 || slices.Contains(c.Paths, name)
}

func (c Config) validate() error {
	for _, p := range c.Phases {
		if !slices.Contains(allPhases, p) {
			return fmt.Errorf("phase %q: want some of %s", p, strings.Join(allPhases, ", "))
		}
	}
	for _, n := range c.Metrics {
		if !slices.ContainsFunc(metrics, func(m metric) bool { return m.name == n }) {
			return fmt.Errorf("metric %q: want some of %s", n, metricNames())
		}
	}
	for _, n := range c.Paths {
		if !slices.ContainsFunc(append(slices.Clone(allPaths), clientPaths...), func(p path) bool { return p.name == n }) {
			return fmt.Errorf("path %q: want some of %s", n, pathNames())
		}
	}
	switch {
	case c.CostBlock < 0 || c.CostBlock > 100000 || c.CostPairs < 0 || c.CostPairs > maxCostPairs:
		return fmt.Errorf("cost block %d, cost pairs %d: want 1-100000 and 1-%d", c.CostBlock, c.CostPairs, maxCostPairs)
	case c.Rounds < 1 || c.Rounds > 50:
		return fmt.Errorf("rounds %d: want 1-50", c.Rounds)
	case c.Duration <= 0 || c.Duration > 10*time.Second:
		return fmt.Errorf("duration %s: want (0, 10s]", c.Duration)
	case c.Clients < 1 || c.Clients > 512, c.Streams < 1 || c.Streams > 64:
		return fmt.Errorf("clients %d, streams %d: want 1-512 and 1-64", c.Clients, c.Streams)
	case len(c.AttachLevels) == 0 || c.AttachLevels[0] != 1 || c.AttachLevels[len(c.AttachLevels)-1] > 5000:
		return fmt.Errorf("attachment levels %v: want ascending from 1, at most 5000", c.AttachLevels)
	case len(c.VIPLevels) == 0 || c.VIPLevels[0] < baseVIPs || c.VIPLevels[len(c.VIPLevels)-1] > 60000:
		return fmt.Errorf("VIP levels %v: want ascending from at least %d, at most 60000", c.VIPLevels, baseVIPs)
	case c.MaxForeign < 0 || c.MaxForeign > 1 || c.Retries < 0 || c.Retries > 10 || c.RetryBudget < 0:
		return fmt.Errorf("max-foreign %v, retries %d, retry budget %d: want 0-1, 0-10, >= 0", c.MaxForeign, c.Retries, c.RetryBudget)
	case c.ScaleRounds < 1 || c.CNIPods < 0 || c.CNIPods > 2000:
		return fmt.Errorf("scale rounds %d, CNI pods %d: want >= 1 and 0-2000", c.ScaleRounds, c.CNIPods)
	}
	return nil
}

// baseVIPs is how many VIP:ports the benchmark's own VIPs take: the
// connect4 VIP's two ports, the IPv6 VIP and the UDP VIP
// (everyClientServices).
const baseVIPs = 4

// Results is everything one run measured.
type Results struct {
	Machine     Machine        `json:"machine"`
	Config      ConfigJSON     `json:"config"`
	Paths       []*PathResult  `json:"paths"`
	VIPScale    []ScalePoint   `json:"vipScale"`
	AttachScale []ScalePoint   `json:"attachmentScale"`
	Memory      Memory         `json:"memory"`
	BPFCost     BPFCost        `json:"bpfCost"`
	CNI         []CNIResult    `json:"cni"`
	Targets     []TargetResult `json:"targets"`
	// Connect4Servers counts, from ctlb's own counters, the connections
	// connect4 sent to each server of the echo VIP during the run.
	Connect4Servers map[string]uint64 `json:"connect4ConnectsPerServer"`
	// ConnectCost is the CPU per connect of each path (cost.go).
	ConnectCost ConnectCost `json:"connectCost"`
	// Lean says whether the lean client and servers made the rate rows;
	// LeanUnavailable why not, when they were wanted.
	Lean            bool   `json:"leanClient"`
	LeanUnavailable string `json:"leanUnavailable,omitempty"`
	// Phases are the phases that ran.
	Phases  []string  `json:"phases"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	// Retries is how many measurements were made again because other
	// processes used the CPUs.
	Retries int `json:"retries"`

	// BPFLayouts is connect4's BPF time per connection under layout v1
	// and this layout, side by side (bpfv1.go).
	BPFLayouts *BPFLayouts `json:"bpfLayouts,omitempty"`
	// EveryClient are the IPv6, dual-stack and UDP paths (every_client.go).
	EveryClient []*PathResult `json:"everyClient,omitempty"`
}

// ConfigJSON is Config as recorded with the results.
type ConfigJSON struct {
	Rounds      int     `json:"rounds"`
	DurationSec float64 `json:"durationSeconds"`
	Clients     int     `json:"clients"`
	Streams     int     `json:"streams"`
	ScaleRounds int     `json:"scaleRounds"`
	Warm        bool    `json:"warmCpus"`
}

// Machine says where the figures come from.
type Machine struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpuModel"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"goVersion"`
	HAProxy   string `json:"haproxy,omitempty"`
}

func machine() Machine {
	m := Machine{CPUs: numCPU(), Kernel: "unknown", CPUModel: "unknown", GoVersion: goVersion()}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		m.Kernel = cstr(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if out, err := exec.Command("haproxy", "-v").Output(); err == nil {
		m.HAProxy, _, _ = strings.Cut(string(out), "\n")
	}
	return m
}

func cstr(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

// run sets everything up, measures, and takes everything down again. A
// run cut short by ctx fails with an error that wraps ctx's.
func run(ctx context.Context, cfg Config) (*Results, error) {
	res, err := runOnce(ctx, cfg)
	if err != nil && ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
		err = fmt.Errorf("%w: %w", ctx.Err(), err)
	}
	return res, err
}

func runOnce(ctx context.Context, cfg Config) (*Results, error) {
	quiet = cfg.Quiet
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (BPF, cgroups, network namespaces)")
	}
	if cfg.CostBlock == 0 {
		cfg.CostBlock = defaultCostBlock
	}
	if cfg.CostPairs == 0 {
		cfg.CostPairs = defaultCostPairs
	}
	res := &Results{
		Machine: machine(),
		Config:  ConfigJSON{cfg.Rounds, cfg.Duration.Seconds(), cfg.Clients, cfg.Streams, cfg.ScaleRounds, cfg.Warm},
		Started: time.Now().UTC(),
	}
	for _, p := range allPhases {
		if cfg.runs(p) {
			res.Phases = append(res.Phases, p)
		}
	}
	u := &topo.Undo{}
	defer u.Unwind()
	// Children must not outlive a run cut short: the cleanup above kills
	// them by PID, and they die with us if we are killed outright.
	logf("setting up the topology")
	e, err := setup(ctx, cfg, u)
	if err != nil {
		return nil, err
	}
	res.Lean = e.leanClients != nil
	res.LeanUnavailable = e.leanUnavailable
	if err := e.loadNFT(); err != nil {
		e.unavailable[pathDNAT.name] = err.Error()
	}
	if err := e.startProxies(); err != nil {
		return nil, err
	}
	var paths []path
	for _, p := range allPaths {
		if why := e.unavailable[p.name]; why != "" {
			logf("path %s unavailable: %s", p.name, why)
			continue
		}
		if cfg.compares(p.name) {
			paths = append(paths, p)
		}
	}

	maxAttach := cfg.AttachLevels[len(cfg.AttachLevels)-1]
	cniMax := func() error {
		if !cfg.runs(phaseCNI) {
			return nil
		}
		r, err := e.runCNI(ctx, cfg, "full", maxAttach)
		res.CNI = append(res.CNI, r)
		return err
	}
	if cfg.runs(phaseMemory) || cfg.runs(phaseScale) {
		// Memory first, before any traffic: TIME_WAIT sockets and
		// conntrack entries would swamp the slab figures. It leaves every
		// attachment and VIP in place for the scale phase, which takes
		// them down again.
		logf("memory: attaching %d pod cgroups, adding %d VIPs", maxAttach-1, cfg.VIPLevels[len(cfg.VIPLevels)-1]-baseVIPs)
		if res.Memory, err = e.measureMemory(ctx, cfg, baseVIPs); err != nil {
			return nil, err
		}
		if res.VIPScale, res.AttachScale, err = e.runScale(ctx, cfg, baseVIPs, cniMax, cfg.runs(phaseScale)); err != nil {
			return nil, err
		}
	} else if cfg.runs(phaseCNI) {
		if err := e.makeScaleCgroups(maxAttach - 1); err != nil {
			return nil, err
		}
		if err := e.setAttachments(ctx, 0, maxAttach-1); err != nil {
			return nil, fmt.Errorf("attach scale cgroups: %w", err)
		}
		if err := cniMax(); err != nil {
			return nil, err
		}
		if err := e.setAttachments(ctx, maxAttach-1, 0); err != nil {
			return nil, fmt.Errorf("detach scale cgroups: %w", err)
		}
	}
	if cfg.runs(phaseCNI) {
		r, err := e.runCNI(ctx, cfg, "base", 1)
		res.CNI = append([]CNIResult{r}, res.CNI...)
		if err != nil {
			return nil, err
		}
	}

	if cfg.runs(phasePaths) {
		logf("paths: %d rounds of %d paths x %d metrics x %s", cfg.Rounds, len(paths), len(metrics), cfg.Duration)
		if res.Paths, err = e.runPaths(ctx, cfg, paths); err != nil {
			return nil, err
		}
	}
	if cfg.runs(phaseClients) {
		if res.EveryClient, err = e.runEveryClient(ctx, cfg); err != nil {
			return nil, err
		}
	}
	if cfg.runs(phaseBPF) {
		if res.BPFCost, err = e.measureBPFCost(ctx, cfg); err != nil {
			return nil, err
		}
		bl, err := e.measureBPFLayouts(ctx, cfg)
		if err != nil {
			return nil, err
		}
		res.BPFLayouts = &bl
	}
	for _, p := range allPaths {
		if why := e.unavailable[p.name]; why != "" && cfg.compares(p.name) && cfg.runs(phasePaths) {
			res.Paths = append(res.Paths, &PathResult{Name: p.name, Description: p.desc, Unavailable: why})
		}
	}
	stats, err := e.dp.Stats()
	if err != nil {
		return nil, err
	}
	res.Connect4Servers = map[string]uint64{}
	for _, st := range stats {
		if st.VIP == netip.AddrPortFrom(pathConnect4.vip, vipEchoPort) && st.Protocol != datapath.UDP {
			res.Connect4Servers[st.Server.String()] += st.Connects
		}
	}
	// Last: it attaches programs to cgroups of its own and would add
	// its connects to the counters above.
	if cfg.runs(phaseCost) && e.leanClients != nil {
		logf("connect cost: %d pairs of %d-connect blocks per row", cfg.CostPairs, cfg.CostBlock)
		if res.ConnectCost, err = e.measureConnectCost(ctx, cfg); err != nil {
			return nil, err
		}
	}
	res.Targets = targets(res)
	res.Seconds = time.Since(res.Started).Seconds()
	res.Retries = e.retries
	return res, nil
}

func datPath(out string) string { return beside(out, ".dat") }
func txtPath(out string) string { return beside(out, ".txt") }

// beside names a file next to out with another extension.
func beside(out, ext string) string {
	return filepath.Join(filepath.Dir(out), strings.TrimSuffix(filepath.Base(out), filepath.Ext(out))+ext)
}
