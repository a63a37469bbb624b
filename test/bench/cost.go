package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// The CPU cost of one connect on each path, in nanoseconds, measured so that
// a shared machine's noise cannot hide it. One process (the lean client)
// alternates blocks of connects between a cgroup A, dialing through the
// path under test, and the plain cgroup B, dialing the servers themselves,
// and reads its own thread's CPU time around each block: both sides of a
// pair run on the same thread, a few milliseconds apart, so what other
// processes do shifts both alike and cancels in the difference. The figure
// is the median of the pairs' differences. Each connect is socket, connect,
// getpeername (as Go's net and most runtimes do after connecting), close
// with RST: no data, no TIME_WAIT.

// CostRow is one path's extra CPU per connect over a plain connect.
type CostRow struct {
	Name string `json:"name"`
	Desc string `json:"description"`
	// ExtraNs is the median over pairs of A's ns per connect less B's;
	// Q1Ns and Q3Ns are the quartiles of those differences.
	ExtraNs float64 `json:"extraNsPerConnect"`
	Q1Ns    float64 `json:"q1Ns"`
	Q3Ns    float64 `json:"q3Ns"`
	// ANs and BNs are the medians of the blocks' ns per connect.
	ANs     float64 `json:"aNsPerConnect"`
	BNs     float64 `json:"bNsPerConnect"`
	Errors  int64   `json:"errors"`
	Err     string  `json:"err,omitempty"`
	Skipped string  `json:"skipped,omitempty"`
	// Pairs of blocks this row measured (more for the rows the target
	// and the hooks' floor are read from).
	Pairs int `json:"pairs"`
}

// preciseFactor is how many times the pairs the precise rows measure, and
// maxCostPairs the most the lean client takes (MAX_PAIRS in lean.c).
const (
	preciseFactor = 3
	maxCostPairs  = 5000
)

// precisePairs is how many pairs a precise row measures when the others
// measure pairs.
func precisePairs(pairs int) int { return min(pairs*preciseFactor, maxCostPairs) }

// ConnectCost is every path's CPU per connect.
type ConnectCost struct {
	Block   int       `json:"connectsPerBlock"`
	Pairs   int       `json:"pairs"`
	Rows    []CostRow `json:"rows"`
	Seconds float64   `json:"seconds"`
}

// costProgram is one of ctlb's cgroup programs as pinned in the datapath
// directory.
type costProgram struct {
	hook   string
	attach ebpf.AttachType
}

// costPrograms are the programs an IPv4 TCP connect runs, in the order the
// subsets add them: the rewrite, the reverse translation, then the
// accounting of the socket's end, which is sock_ops in layout 2 and
// sock_release in layout 1. (Layout 2 attaches sock_release once, on the
// cgroup v2 root: every socket of the machine runs it, A's and B's alike,
// so its cost cancels in these differences and is not measured here.)
func (e *env) costPrograms() []costProgram {
	ps := []costProgram{
		{"connect4", ebpf.AttachCGroupInet4Connect},
		{"getpeername4", ebpf.AttachCgroupInet4GetPeername},
	}
	for _, p := range []costProgram{
		{"sock_ops", ebpf.AttachCGroupSockOps},
		{"sock_release", ebpf.AttachCgroupInetSockRelease},
	} {
		if pins, _ := filepath.Glob(e.progPin(p.hook)); len(pins) == 1 {
			return append(ps, p)
		}
	}
	return ps
}

func (e *env) progPin(hook string) string {
	return filepath.Join(e.bpffs, "ctlb", "ctlb_"+hook+"_v*")
}

// subsetCgroup makes a cgroup with the first n of costPrograms attached,
// straight from their pins (whatever the layout version), so that each
// program's share of the cost shows on its own.
func (e *env) subsetCgroup(n int) (string, error) {
	progs := e.costPrograms()
	if n > len(progs) {
		return "", fmt.Errorf("%d programs found for the subsets, want %d", len(progs), n)
	}
	var names []string
	for _, p := range progs[:n] {
		names = append(names, p.hook)
	}
	cg, err := e.cgroup("cost-" + strings.Join(names, "-"))
	if err != nil {
		return "", err
	}
	for _, p := range progs[:n] {
		pins, _ := filepath.Glob(e.progPin(p.hook))
		if len(pins) != 1 {
			return "", fmt.Errorf("program %s: %d pins in %s", p.hook, len(pins), filepath.Join(e.bpffs, "ctlb"))
		}
		prog, err := ebpf.LoadPinnedProgram(pins[0], nil)
		if err != nil {
			return "", fmt.Errorf("program %s: %w", pins[0], err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: p.attach, Program: prog})
		prog.Close()
		if err != nil {
			return "", fmt.Errorf("attach %s to %s: %w", p.hook, cg, err)
		}
		e.u.Push("cost link "+p.hook+" "+cg, l.Close)
	}
	return cg, nil
}

// measureConnectCost measures every row with the lean client of the plain
// cgroup, which moves itself into each A cgroup and back.
func (e *env) measureConnectCost(ctx context.Context, cfg Config) (ConnectCost, error) {
	cc := ConnectCost{Block: cfg.CostBlock, Pairs: cfg.CostPairs}
	client := e.leanClients[e.cgPlain]
	if client == nil {
		return cc, fmt.Errorf("connect cost needs the lean client")
	}
	t0 := time.Now()
	direct := strings.Join(servers(echoPort), ",")
	vip := fmt.Sprintf("%s:%d", pathConnect4.vip, vipEchoPort)
	dnat := fmt.Sprintf("%s:%d", pathDNAT.vip, vipEchoPort)
	type row struct {
		name, desc string
		cg         func() (string, error)
		target     string
		// precise rows, those the target and the floor are read from,
		// get preciseFactor times the pairs: a row's median moves by
		// ~30 ns from run to run with 1,000 pairs, as much as a hook's
		// dispatch, and the standard error falls with the square root.
		precise bool
	}
	plain := func() (string, error) { return e.cgPlain, nil }
	subset := func(n int) func() (string, error) { return func() (string, error) { return e.subsetCgroup(n) } }
	progs := e.costPrograms()
	rows := []row{
		{"none", "plain cgroup, servers (the method's own bias: should be 0)", plain, direct, true},
	}
	for _, f := range costFeatures {
		target := vip
		if f.direct {
			target = direct
		}
		rows = append(rows, row{f.row, f.desc, func() (string, error) { return e.variantCgroup(f) }, target, f.floor})
	}
	rows = append(rows, []row{
		{"connect4", "connect4 program alone, VIP (all of the above and the open count: an atomic add, and a sub in the root's sock_release)", subset(1), vip, false},
		{"+getpeername4", "connect4 and getpeername4, VIP", subset(2), vip, false},
	}...)
	if len(progs) == 3 {
		rows = append(rows, row{"+" + progs[2].hook, "connect4, getpeername4 and " + progs[2].hook + ", VIP", subset(3), vip, false})
	}
	rows = append(rows, []row{
		{"ctlb", "ctlb as attached (datapath.Attach), VIP", func() (string, error) { return e.cgPod, nil }, vip, true},
		{"ctlb non-VIP", "ctlb as attached, dialing the servers (no VIP: lookup misses)", func() (string, error) { return e.cgPod, nil }, direct, true},
	}...)
	if e.unavailable[pathDNAT.name] == "" {
		rows = append(rows, row{"dnat", "plain cgroup, VIP DNATed by nftables (conntrack)", plain, dnat, false})
	}
	for _, r := range rows {
		if err := ctx.Err(); err != nil {
			return cc, err
		}
		cr := CostRow{Name: r.name, Desc: r.desc}
		cg, err := r.cg()
		if err != nil {
			cr.Skipped = err.Error()
			cc.Rows = append(cc.Rows, cr)
			logf("connect cost %s: skipped: %v", r.name, err)
			continue
		}
		pairs := cfg.CostPairs
		if r.precise {
			pairs = precisePairs(pairs)
		}
		cr.Pairs = pairs
		line := fmt.Sprintf("cost %d %d 1 %s %s %s %s", cfg.CostBlock, pairs, cg, r.target, e.cgPlain, direct)
		if err := client.Send([]byte(line)); err != nil {
			return cc, err
		}
		// A connect here takes tens of microseconds: allow 200 us each,
		// and the cgroup moves.
		out, err := client.Recv(time.Duration(cfg.CostBlock*pairs*2)*200*time.Microsecond + 60*time.Second)
		if err != nil {
			return cc, err
		}
		var res struct {
			A, B   []float64
			Errors int64
			Err    string
		}
		if err := json.Unmarshal(out, &res); err != nil {
			return cc, fmt.Errorf("lean client cost result %q: %w", out, err)
		}
		cr.Errors, cr.Err = res.Errors, res.Err
		if len(res.A) != len(res.B) || len(res.A) == 0 {
			return cc, fmt.Errorf("connect cost %s: %d and %d blocks: %s", r.name, len(res.A), len(res.B), res.Err)
		}
		d := make([]float64, len(res.A))
		for i := range d {
			d[i] = res.A[i] - res.B[i]
		}
		cr.ExtraNs, cr.Q1Ns, cr.Q3Ns = quartiles(d)
		cr.ANs, _, _ = quartiles(res.A)
		cr.BNs, _, _ = quartiles(res.B)
		logf("connect cost %s: %+.0f ns per connect (IQR %.0f..%.0f), %.0f vs %.0f ns", r.name, cr.ExtraNs, cr.Q1Ns, cr.Q3Ns, cr.ANs, cr.BNs)
		cc.Rows = append(cc.Rows, cr)
	}
	cc.Seconds = time.Since(t0).Seconds()
	return cc, nil
}

// quartiles gives the median, first and third quartile.
func quartiles(v []float64) (med, q1, q3 float64) {
	s := slices.Clone(v)
	slices.Sort(s)
	at := func(f float64) float64 { return s[int(f*float64(len(s)-1)+0.5)] }
	return at(0.5), at(0.25), at(0.75)
}
