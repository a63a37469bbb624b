package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
)

func numCPU() int       { return runtime.NumCPU() }
func goVersion() string { return runtime.Version() }

// TargetResult is one of the targets, checked.
type TargetResult struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	// Status is PASS, FAIL, or n/a when a figure is missing.
	Status string `json:"status"`
}

// path is the path of that name if its rates were measured.
func (r *Results) path(name string) *PathResult {
	return r.find(name, func(p *PathResult) bool { return p.RateN.Median > 0 })
}

// bulkPath is the path of that name if its Gbit/s rows were measured.
func (r *Results) bulkPath(name string) *PathResult {
	return r.find(name, func(p *PathResult) bool { return p.Bulk1.Median > 0 && p.BulkN.Median > 0 })
}

// find is the available path of that name if measured says it was.
func (r *Results) find(name string, measured func(*PathResult) bool) *PathResult {
	for _, p := range r.Paths {
		if p.Name == name && p.Unavailable == "" && measured(p) {
			return p
		}
	}
	return nil
}

// ratioTarget checks that a over b, round by round, is at least want.
func ratioTarget(name string, a, b Stat, want float64) TargetResult {
	t := TargetResult{Name: name, Want: fmt.Sprintf(">= %.2fx", want), Status: "n/a"}
	if ratio := pairedRatio(a, b); ratio > 0 {
		t.Got = fmt.Sprintf("%.3fx", ratio)
		t.Status = status(ratio >= want)
	}
	return t
}

func status(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// flatness is the largest departure, over the scale points, of connect4's
// rate relative to direct from its value at the first point.
func flatness(pts []ScalePoint, ratio func(ScalePoint) float64) (float64, bool) {
	if len(pts) < 2 || ratio(pts[0]) <= 0 {
		return 0, false
	}
	worst := 0.0
	for _, p := range pts[1:] {
		if ratio(p) <= 0 {
			return 0, false
		}
		worst = math.Max(worst, math.Abs(ratio(p)/ratio(pts[0])-1))
	}
	return worst, true
}

func targets(r *Results) []TargetResult {
	var out []TargetResult
	c4, direct, dnat, ha := r.path(pathConnect4.name), r.path(pathDirect.name), r.path(pathDNAT.name), r.path(pathHAProxy.name)
	get := func(p *PathResult, f func(*PathResult) Stat) Stat {
		if p == nil {
			return Stat{}
		}
		return f(p)
	}
	rate1 := func(p *PathResult) Stat { return p.Rate1 }
	rateN := func(p *PathResult) Stat { return p.RateN }
	bulk1 := func(p *PathResult) Stat { return p.Bulk1 }
	bulkN := func(p *PathResult) Stat { return p.BulkN }
	n := fmt.Sprint(r.Config.Clients)
	s := fmt.Sprint(r.Config.Streams)
	out = append(out,
		ratioTarget("connect4 conn/s vs direct, 1 client", get(c4, rate1), get(direct, rate1), 0.97),
		ratioTarget("connect4 conn/s vs direct, "+n+" clients", get(c4, rateN), get(direct, rateN), 0.97),
		ratioTarget("connect4 Gbit/s vs direct, 1 stream", get(c4, bulk1), get(direct, bulk1), 0.99),
		ratioTarget("connect4 Gbit/s vs direct, "+s+" streams", get(c4, bulkN), get(direct, bulkN), 0.99),
	)
	lat := TargetResult{Name: "connect4 p99 latency vs direct", Want: "<= +5 us", Status: "n/a"}
	if c4 != nil && direct != nil {
		if d, ok := pairedDiff(c4.P99, direct.P99); ok {
			lat.Got = fmt.Sprintf("%+.1f us", d)
			lat.Status = status(d <= 5)
		}
	}
	out = append(out, lat,
		ratioTarget("connect4 conn/s vs DNAT, 1 client", get(c4, rate1), get(dnat, rate1), 1.2),
		ratioTarget("connect4 conn/s vs DNAT, "+n+" clients", get(c4, rateN), get(dnat, rateN), 1.2),
	)
	for _, sc := range []struct {
		what string
		pts  []ScalePoint
		lvl  func(ScalePoint) int
	}{
		{"attachments", r.AttachScale, func(p ScalePoint) int { return p.Attachments }},
		{"VIPs", r.VIPScale, func(p ScalePoint) int { return p.VIPs }},
	} {
		if len(sc.pts) == 0 {
			continue // the scale phase did not run
		}
		for _, k := range []struct {
			name  string
			ratio func(ScalePoint) float64
		}{{"1 client", func(p ScalePoint) float64 { return p.Ratio1 }}, {n + " clients", func(p ScalePoint) float64 { return p.RatioN }}} {
			t := TargetResult{Status: "n/a", Want: "within 3%"}
			if len(sc.pts) > 0 {
				t.Name = fmt.Sprintf("connect4 conn/s flat, %d to %d %s, %s", sc.lvl(sc.pts[0]), sc.lvl(sc.pts[len(sc.pts)-1]), sc.what, k.name)
			}
			if w, ok := flatness(sc.pts, k.ratio); ok {
				t.Got = fmt.Sprintf("%.1f%%", w*100)
				t.Status = status(w <= 0.03)
			}
			out = append(out, t)
		}
		// The same question asked of the only part of a connection
		// that could depend on the scale, measured without the noise.
		t := TargetResult{Status: "n/a", Want: "within 3%"}
		if len(sc.pts) > 1 && sc.pts[0].DirectCPUNsPerConn.Median > 0 {
			base := sc.pts[0]
			t.Name = fmt.Sprintf("connect4 BPF time per connection, %d to %d %s, change as share of a connection's CPU",
				sc.lvl(base), sc.lvl(sc.pts[len(sc.pts)-1]), sc.what)
			worst := 0.0
			for _, p := range sc.pts[1:] {
				worst = math.Max(worst, math.Abs(p.BPFNsPerConn.Median-base.BPFNsPerConn.Median))
			}
			share := worst / base.DirectCPUNsPerConn.Median
			t.Got = fmt.Sprintf("%.2f%% (%.0f ns of %.0f ns)", share*100, worst, base.DirectCPUNsPerConn.Median)
			t.Status = status(share <= 0.03)
		}
		out = append(out, t)
	}
	for _, name := range []string{pathListeners.name, pathSteering.name, pathPreconn.name} {
		p := r.path(name)
		out = append(out,
			ratioTarget(name+" conn/s vs HAProxy, 1 client", get(p, rate1), get(ha, rate1), 1.2),
			ratioTarget(name+" conn/s vs HAProxy, "+n+" clients", get(p, rateN), get(ha, rateN), 1.2),
			ratioTarget(name+" Gbit/s vs HAProxy, 1 stream", get(p, bulk1), get(ha, bulk1), 1.5),
			ratioTarget(name+" Gbit/s vs HAProxy, "+s+" streams", get(p, bulkN), get(ha, bulkN), 1.5),
		)
	}
	for _, c := range r.ConnectCost.Rows {
		if c.Name == "ctlb" && c.Skipped == "" {
			out = append(out, TargetResult{
				Name: "ctlb's extra CPU per connect, every program attached (lean client)", Want: "<= 300 ns",
				Got: fmt.Sprintf("%+.0f ns", c.ExtraNs), Status: status(c.ExtraNs <= 300),
			})
		}
	}
	if r.BPFLayouts != nil {
		out = append(out, bpfLayoutTargets(r)...)
	}
	out = append(out, everyClientTargets(r)...)
	for _, c := range r.CNI {
		t := TargetResult{Name: fmt.Sprintf("CNI ADD p99, %d pods, %d attached", c.Pods, c.Attached), Want: "<= 10 ms", Status: "n/a"}
		if c.Skipped == "" && c.Pods > 0 {
			t.Got = fmt.Sprintf("%.2f ms", c.AddP99)
			t.Status = status(c.AddP99 <= 10)
		}
		out = append(out, t)
	}
	return out
}

func printReport(w io.Writer, r *Results) {
	fmt.Fprintf(w, "\nmachine: %d CPUs, %s, kernel %s, %s\n", r.Machine.CPUs, r.Machine.CPUModel, r.Machine.Kernel, r.Machine.GoVersion)
	fmt.Fprintf(w, "run: %d rounds x %.1fs per measurement, %d clients, %d streams; medians over rounds (ratios: medians of per-round ratios)\n",
		r.Config.Rounds, r.Config.DurationSec, r.Config.Clients, r.Config.Streams)
	fmt.Fprintf(w, "other %%: the most CPU other processes took during a kept measurement (%d measurements were repeated for it)\n", r.Retries)
	switch {
	case r.Lean:
		fmt.Fprintf(w, "conn/s and CPU/conn: lean C client and echo servers (blocking sockets); latency and Gbit/s: Go client\n\n")
	case r.LeanUnavailable != "":
		fmt.Fprintf(w, "conn/s and CPU/conn: Go client (lean client unavailable: %s)\n\n", r.LeanUnavailable)
	default:
		fmt.Fprintf(w, "conn/s and CPU/conn: Go client and servers (-go-client)\n\n")
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "path\tconn/s 1\tconn/s %d\tp50 us\tp99 us\tGbit/s 1\tGbit/s %d\tCPU us/conn\tsys us/conn\terrors\tother %%\t\n", r.Config.Clients, r.Config.Streams)
	for _, p := range r.Paths {
		if p.Unavailable != "" {
			fmt.Fprintf(tw, "%s\tunavailable: %s\t\t\t\t\t\t\t\t\t\n", p.Name, p.Unavailable)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%.0f\t\n", p.Name,
			cell(p.Rate1, "%.0f"), cell(p.RateN, "%.0f"), cell(p.P50, "%.1f"), cell(p.P99, "%.1f"), cell(p.Bulk1, "%.2f"), cell(p.BulkN, "%.2f"),
			cell(p.CPUPerConn, "%.1f"), cell(p.SysCPUPerConn, "%.1f"), p.Errors, p.Foreign*100)
	}
	tw.Flush()
	var proxies []string
	for _, p := range r.Paths {
		if p.ProxyCPUPerConn.Median > 0 {
			proxies = append(proxies, fmt.Sprintf("%s %.1f / %.1f (user %.1f / %.1f)", p.Name, p.ProxyCPUPerConn.Median, p.ProxyCPUPerConnN.Median,
				p.ProxyUserPerConn.Median, p.ProxyUserPerConnN.Median))
		}
	}
	if len(proxies) > 0 {
		fmt.Fprintf(w, "proxy's own CPU us/conn (1 / %d clients): %s\n", r.Config.Clients, strings.Join(proxies, ", "))
	}
	if sm, lp := r.bulkPath(pathSockmap.name), r.bulkPath(pathListeners.name); sm != nil && lp != nil {
		fmt.Fprintf(w, "sockmap lever (bench-only relay, bytes forwarded in the kernel) Gbit/s vs proxy-listeners (splice): %.3fx with 1 stream, %.3fx with %d",
			pairedRatio(sm.Bulk1, lp.Bulk1), pairedRatio(sm.BulkN, lp.BulkN), r.Config.Streams)
		if ha := r.bulkPath(pathHAProxy.name); ha != nil {
			fmt.Fprintf(w, "; vs HAProxy %.3fx and %.3fx", pairedRatio(sm.Bulk1, ha.Bulk1), pairedRatio(sm.BulkN, ha.BulkN))
		}
		fmt.Fprintln(w)
	}
	for _, p := range r.Paths {
		if p.FirstError != "" {
			fmt.Fprintf(w, "  %s: first error: %s\n", p.Name, p.FirstError)
		}
	}
	printEveryClient(w, r)
	if len(r.AttachScale)+len(r.VIPScale) > 0 {
		printScale(w, r)
	}
	m := r.Memory
	if m.FixedMemlock > 0 {
		fmt.Fprintf(w, "\nkernel memory: ctlb's pinned maps %.1f MiB fixed (memlock); per VIP:port %.0f B memlock, %.0f B slab; per attachment %.0f B memlock, ~%.0f B slab\n",
			float64(m.FixedMemlock)/(1<<20), m.PerVIPMemlock, m.PerVIPSlab, m.PerAttachMemlock, m.PerAttachSlab)
	}
	if b := r.BPFCost; b.Connections > 0 {
		fmt.Fprintf(w, "connect4's BPF programs (kernel run-time stats, %d connections at %d clients): %.0f ns per connection, %.2f%% of the path's CPU per connection;",
			b.Connections, r.Config.Clients, b.NsPerConn, b.ShareOfCPU*100)
		for _, p := range b.Programs {
			fmt.Fprintf(w, " %s %.0f ns x %d", progName(p.Program), p.AvgNs, p.Runs)
		}
		fmt.Fprintln(w)
	}
	printBPFLayouts(w, r)
	if m.Attached+m.VIPsAdded > 0 {
		fmt.Fprintf(w, "setup: %d attachments in %.2fs, %d VIPs in %.2fs", m.Attached, m.AttachSeconds, m.VIPsAdded, m.VIPSeconds)
		if m.VIPsAdded > 0 && m.VIPSeconds > 0 {
			// One SetServices call: BPF_MAP_UPDATE_BATCH where the kernel has it.
			fmt.Fprintf(w, " (%.0f VIPs set per second, %s)", float64(m.VIPsAdded)/m.VIPSeconds, m.VIPMode)
		}
		fmt.Fprintln(w)
	}
	for _, c := range r.CNI {
		if c.Skipped != "" {
			fmt.Fprintf(w, "CNI: skipped: %s\n", c.Skipped)
			continue
		}
		fmt.Fprintf(w, "CNI (plugin exec included), %d pods, %d attached: ADD p50 %.2f ms, p99 %.2f ms, max %.2f ms, CPU %.2f ms; DEL p50 %.2f ms, p99 %.2f ms\n",
			c.Pods, c.Attached, c.AddP50, c.AddP99, c.AddMax, c.AddCPU, c.DelP50, c.DelP99)
	}
	printConnectCost(w, r.ConnectCost)
	printTargets(w, r.Targets)
}

// cell is a figure of the paths table, "-" when it was not measured.
func cell(s Stat, format string) string {
	if len(s.Rounds) == 0 {
		return "-"
	}
	return fmt.Sprintf(format, s.Median)
}

// progName is a program's pin name without the prefix and layout version.
func progName(pin string) string {
	n := strings.TrimPrefix(pin, "ctlb_")
	if i := strings.LastIndex(n, "_v"); i > 0 {
		n = n[:i]
	}
	return n
}

func printScale(w io.Writer, r *Results) {
	fmt.Fprintf(w, "\nscale (connect4 vs direct, side by side at each point; BPF statistics on for the whole scale phase)\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "attached\tVIPs\tconnect4 1\tdirect 1\tratio\tconnect4 %d\tdirect %d\tratio\tBPF ns/conn\t\n", r.Config.Clients, r.Config.Clients)
	seen := map[[2]int]bool{}
	for _, pt := range append(append([]ScalePoint{}, r.AttachScale...), r.VIPScale...) {
		k := [2]int{pt.Attachments, pt.VIPs}
		if seen[k] {
			continue
		}
		seen[k] = true
		fmt.Fprintf(tw, "%d\t%d\t%.0f\t%.0f\t%.3f\t%.0f\t%.0f\t%.3f\t%.0f\t\n", pt.Attachments, pt.VIPs,
			pt.Connect4Rate1.Median, pt.DirectRate1.Median, pt.Ratio1, pt.Connect4RateN.Median, pt.DirectRateN.Median, pt.RatioN, pt.BPFNsPerConn.Median)
	}
	tw.Flush()
}

func printConnectCost(w io.Writer, cc ConnectCost) {
	if len(cc.Rows) > 0 {
		fmt.Fprintf(w, "\nCPU per connect (lean client's own thread CPU time; socket, connect, getpeername, RST close; median of the paired differences of %d-connect blocks, %d pairs a row and %d for the rows the target and the hooks' floor are read from; path vs plain connect to the servers)\n", cc.Block, cc.Pairs, precisePairs(cc.Pairs))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "row\textra ns/connect\tIQR ns\tpath ns\tplain ns\tpairs\terrors\t  \n")
		byName := map[string]CostRow{}
		for _, c := range cc.Rows {
			if c.Skipped != "" {
				fmt.Fprintf(tw, "%s\tskipped: %s\t\t\t\t\t\t  \n", c.Name, c.Skipped)
				continue
			}
			byName[c.Name] = c
			fmt.Fprintf(tw, "%s\t%+.0f\t%.0f..%.0f\t%.0f\t%.0f\t%d\t%d\t  %s\n", c.Name, c.ExtraNs, c.Q1Ns, c.Q3Ns, c.ANs, c.BNs, c.Pairs, c.Errors, c.Desc)
		}
		tw.Flush()
		if floor, ok := byName["hooks alone"]; ok {
			for _, name := range []string{"ctlb", "ctlb non-VIP"} {
				if c, ok := byName[name]; ok {
					fmt.Fprintf(w, "%s over the hooks' floor (what its programs do, less the dispatch any program on those hooks costs): %+.0f ns\n", name, c.ExtraNs-floor.ExtraNs)
				}
			}
		}
	}
}

func printTargets(w io.Writer, targets []TargetResult) {
	fmt.Fprintf(w, "\ntargets\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	pass, fail, reported := 0, 0, 0
	for _, t := range targets {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Status, t.Name, t.Want, t.Got)
		switch t.Status {
		case "PASS":
			pass++
		case "FAIL":
			fail++
		case statusReport:
			reported++
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "targets: %d met, %d missed, %d not measured", pass, fail, len(targets)-pass-fail-reported)
	if reported > 0 {
		fmt.Fprintf(w, "; %d figures reported without a target", reported)
	}
	fmt.Fprintln(w)
}

// writeResults writes the JSON and, beside it, the report as text and the
// data file the gnuplot script (hack/bench-plot.gnuplot) reads.
func writeResults(out string, r *Results) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	var txt bytes.Buffer
	printReport(&txt, r)
	if err := os.WriteFile(txtPath(out), txt.Bytes(), 0o644); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	var d strings.Builder
	fmt.Fprintf(&d, "# path conns/s_1 conns/s_%d p50_us p99_us gbps_1 gbps_%d cpu_us_per_conn sys_cpu_us_per_conn\n", r.Config.Clients, r.Config.Streams)
	for _, p := range r.Paths {
		if p.Unavailable != "" {
			continue
		}
		fmt.Fprintf(&d, "%q %.0f %.0f %.2f %.2f %.3f %.3f %.2f %.2f\n", p.Name, p.Rate1.Median, p.RateN.Median,
			p.P50.Median, p.P99.Median, p.Bulk1.Median, p.BulkN.Median, p.CPUPerConn.Median, p.SysCPUPerConn.Median)
	}
	writeEveryClientDat(&d, r)
	if err := os.WriteFile(datPath(out), []byte(d.String()), 0o644); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	return nil
}
