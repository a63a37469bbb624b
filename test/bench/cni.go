package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"syscall"
	"time"

	"github.com/ctlb/ctlb/internal/cni"
)

// CNIResult is the time of the ctlb CNI plugin's ADD and DEL, the plugin
// binary's exec included, as a runtime sees it.
type CNIResult struct {
	// Attached is how many other attachments existed meanwhile.
	Attached int     `json:"attached"`
	Pods     int     `json:"pods"`
	AddP50   float64 `json:"addP50ms"`
	AddP99   float64 `json:"addP99ms"`
	AddMax   float64 `json:"addMaxMs"`
	DelP50   float64 `json:"delP50ms"`
	DelP99   float64 `json:"delP99ms"`
	// AddCPU is the CPU time (user and system) of one ADD's plugin
	// process, milliseconds, the mean over the pods: unlike the wall
	// times it hardly moves with what else the machine runs.
	AddCPU float64 `json:"addCpuMs"`
	// Foreign is the share of the CPUs other processes used during the ADDs.
	Foreign float64 `json:"foreignCpuShare"`
	Skipped string  `json:"skipped,omitempty"`
}

// cniConf is the plugin's network config as a runtime hands it over, with
// the bridge plugin's result as prevResult and the pod cgroup passed through
// the cgroupPath capability (containerd >= 1.7.0, CRI-O >= 1.28).
func (e *env) cniConf(stateDir, cgroupRel string) []byte {
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "ctlb-bench",
		"type":       "ctlb",
		"bpffs":      filepath.Join(e.bpffs, "ctlb"),
		"stateDir":   stateDir,
		"socket":     filepath.Join(stateDir, "ctlbd.sock"),
		"runtimeConfig": map[string]any{
			"cgroupPath": cgroupRel,
		},
		"prevResult": map[string]any{
			"cniVersion": "1.0.0",
			"interfaces": []map[string]any{{"name": "eth0", "sandbox": e.pod.Path()}},
			"ips":        []map[string]any{{"address": podAddr.String() + "/24", "interface": 0}},
		},
	}
	b, _ := json.Marshal(conf)
	return b
}

// execPlugin runs the plugin once, as a runtime does, and times it.
func execPlugin(ctx context.Context, plugin, command, containerID, netns string, conf []byte) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, plugin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command,
		"CNI_CONTAINERID=" + containerID,
		"CNI_NETNS=" + netns,
		"CNI_IFNAME=eth0",
		"CNI_PATH=" + filepath.Dir(plugin),
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	cmd.Stdin = bytes.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	err := cmd.Run()
	d := time.Since(t0)
	if err != nil {
		return d, fmt.Errorf("CNI %s %s: %w: %s %s", command, containerID, err, stdout.Bytes(), stderr.Bytes())
	}
	return d, nil
}

// runCNI times ADD for cfg.CNIPods pods whose cgroups exist already (kubelet
// creates the pod cgroup before the sandbox), then DEL for each.
func (e *env) runCNI(ctx context.Context, cfg Config, label string, attached int) (CNIResult, error) {
	r := CNIResult{Attached: attached, Pods: cfg.CNIPods}
	if cfg.CNIPlugin == "" {
		r.Skipped = "no plugin binary given (-cni-plugin)"
		return r, nil
	}
	if _, err := os.Stat(cfg.CNIPlugin); err != nil {
		r.Skipped = fmt.Sprintf("plugin binary: %v", err)
		return r, nil
	}
	stateDir, err := os.MkdirTemp("", "ctlb-bench-cni-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(stateDir)
	mount := filepath.Dir(e.cgRoot)
	var adds, dels []time.Duration
	ids := make([]string, cfg.CNIPods)
	dirs := make([]string, cfg.CNIPods)
	defer func() {
		for _, d := range dirs {
			if d != "" {
				_ = os.Remove(d)
			}
		}
	}()
	for i := range cfg.CNIPods {
		ids[i] = fmt.Sprintf("bench-%s-%04d", label, i)
		dirs[i] = filepath.Join(e.cgRoot, "pods", ids[i])
		if err := os.Mkdir(dirs[i], 0o755); err != nil {
			dirs[i] = ""
			return r, fmt.Errorf("pod cgroup: %w", err)
		}
	}
	added := 0
	defer func() {
		// Detach what a failed run left attached.
		for _, id := range ids[:added] {
			_ = e.dp.Detach(cni.AttachmentID("ctlb-bench", id))
		}
	}()
	// The bench's own garbage collector stays out of the timings: collect
	// what setting up 1,000 attachments left, then none while the plugin
	// runs (the loops allocate a few MiB). On two CPUs, whatever else runs
	// during an ADD can delay it by a scheduler tick.
	runtime.GC()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	cpu0, err := childrenCPU()
	if err != nil {
		return r, err
	}
	c0, err := e.counters(nil)
	if err != nil {
		return r, err
	}
	for i, id := range ids {
		rel, _ := filepath.Rel(mount, dirs[i])
		d, err := execPlugin(ctx, cfg.CNIPlugin, "ADD", id, e.pod.Path(), e.cniConf(stateDir, "/"+rel))
		if err != nil {
			return r, err
		}
		added = i + 1
		adds = append(adds, d)
	}
	c1, err := e.counters(nil)
	if err != nil {
		return r, err
	}
	r.Foreign = c1.sub(c0).foreign(c1.wall.Sub(c0.wall))
	cpu1, err := childrenCPU()
	if err != nil {
		return r, err
	}
	if len(adds) > 0 {
		r.AddCPU = float64((cpu1 - cpu0).Microseconds()) / 1e3 / float64(len(adds))
	}
	for i, id := range ids {
		rel, _ := filepath.Rel(mount, dirs[i])
		d, err := execPlugin(ctx, cfg.CNIPlugin, "DEL", id, e.pod.Path(), e.cniConf(stateDir, "/"+rel))
		if err != nil {
			return r, err
		}
		dels = append(dels, d)
	}
	added = 0
	r.AddP50, r.AddP99, r.AddMax = pct(adds)
	r.DelP50, r.DelP99, _ = pct(dels)
	logf("CNI with %d attached: ADD p50 %.2f ms p99 %.2f ms over %d pods; other processes took %.0f%% of the CPUs", attached, r.AddP50, r.AddP99, len(adds), r.Foreign*100)
	return r, nil
}

// childrenCPU is the CPU time of this process's reaped children.
func childrenCPU() (time.Duration, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// pct gives p50, p99 and max in milliseconds.
func pct(ds []time.Duration) (p50, p99, maxMs float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
	return ms(s[len(s)/2]), ms(s[(len(s)*99)/100]), ms(s[len(s)-1])
}
