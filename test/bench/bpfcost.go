package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ProgCost is what one of ctlb's programs cost per run, from the kernel's
// own BPF statistics: a figure the machine's load does not blur, unlike the
// connection rates it is a part of.
type ProgCost struct {
	Program string  `json:"program"`
	Runs    uint64  `json:"runs"`
	AvgNs   float64 `json:"avgNs"`
}

// BPFCost is connect4's own cost during one many-clients rate measurement.
type BPFCost struct {
	Programs []ProgCost `json:"programs"`
	// Connections made meanwhile, and the programs' total time per
	// connection, nanoseconds.
	Connections int64   `json:"connections"`
	NsPerConn   float64 `json:"nsPerConnection"`
	// Share of the path's CPU time per connection (client, servers).
	ShareOfCPU float64 `json:"shareOfCpu"`
}

// progStats reads the kernel's run-time statistics of ctlb's programs.
type progStats struct {
	progs map[string]*ebpf.Program // by pin name
}

// openProgStats opens ctlb's pinned programs.
func openProgStats(dir string) (*progStats, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	ps := &progStats{progs: map[string]*ebpf.Program{}}
	for _, ent := range entries {
		if !strings.HasPrefix(ent.Name(), "ctlb_") {
			continue
		}
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, ent.Name()), nil)
		if err != nil {
			continue // a map
		}
		ps.progs[ent.Name()] = p
	}
	return ps, nil
}

func (ps *progStats) Close() error {
	for _, p := range ps.progs {
		p.Close()
	}
	return nil
}

func (ps *progStats) read() (map[string]ebpf.ProgramStats, error) {
	out := map[string]ebpf.ProgramStats{}
	for name, p := range ps.progs {
		st, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", name, err)
		}
		out[name] = *st
	}
	return out, nil
}

// progRuns sums each program's runs and run time over measurements.
type progRuns map[string]struct {
	runs uint64
	ns   time.Duration
}

// add adds what each program ran between two reads.
func (pr progRuns) add(before, after map[string]ebpf.ProgramStats) {
	for name, a := range after {
		r := pr[name]
		r.runs += a.RunCount - before[name].RunCount
		r.ns += a.Runtime - before[name].Runtime
		pr[name] = r
	}
}

// costs is every program's runs and average run time, by name.
func (pr progRuns) costs() []ProgCost {
	out := make([]ProgCost, 0, len(pr))
	for name, r := range pr {
		pc := ProgCost{Program: name, Runs: r.runs}
		if r.runs > 0 {
			pc.AvgNs = float64(r.ns) / float64(r.runs)
		}
		out = append(out, pc)
	}
	slices.SortFunc(out, func(a, b ProgCost) int { return strings.Compare(a.Program, b.Program) })
	return out
}

// enableBPFStats turns on the kernel's BPF run-time statistics for as long
// as the returned descriptor is open: the kernel counts its holders and
// turns them off after the last. Timing every run costs a little, so they
// are on only where the programs' cost is measured, never during the path
// comparison.
func enableBPFStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF statistics: %w", err)
	}
	return c, nil
}

// measureBPFCost reads what each of ctlb's programs took during one
// many-clients connect4 rate measurement.
func (e *env) measureBPFCost(ctx context.Context, cfg Config) (BPFCost, error) {
	var c BPFCost
	stats, err := enableBPFStats()
	if err != nil {
		return c, err
	}
	defer stats.Close()
	before, err := e.progs.read()
	if err != nil {
		return c, err
	}
	s, _, err := e.measure(ctx, pathConnect4, metrics[1], cfg)
	if err != nil {
		return c, err
	}
	after, err := e.progs.read()
	if err != nil {
		return c, err
	}
	runs := progRuns{}
	runs.add(before, after)
	c.Programs = runs.costs()
	c.Connections = s.res.Ops
	// Per connect4 run (every try of the measurement ran the programs),
	// not per connection of the kept try.
	if ns, ok := nsPerConnect(before, after); ok && s.res.Ops > 0 {
		c.NsPerConn = ns
		if s.cpu > 0 {
			c.ShareOfCPU = c.NsPerConn / (float64(s.cpu.Nanoseconds()) / float64(s.res.Ops))
		}
	}
	logf("BPF cost: %.0f ns per connection, %.2f%% of the path's CPU", c.NsPerConn, c.ShareOfCPU*100)
	return c, nil
}
