// Package kubelet runs a real kubelet in standalone mode (static pods from a
// manifest directory, no API server) against containerd 2.x inside a test
// node, following shared/runtimes/kubelet-node.sh: kubelet creates the pod
// cgroups and calls RunPodSandbox itself, so a test sees Kubernetes' own pod
// startup with no stand-in.
//
// kubelet writes host paths whatever --root-dir says (/var/lib/kubelet,
// /var/log/containers) and host-global sysctls (vm.overcommit_memory,
// kernel.panic, kernel.panic_on_oops): containerd and kubelet run in ONE
// private mount namespace with tmpfs over those directories and files of
// the test bind-mounted over those sysctls, so the host stays as it was.
// Their cgroups live under a cgroup root of the test's own, removed at the
// end in every hierarchy.
package kubelet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// Binary builds kubelet once (hack/build-kubelet.sh, cached outside the
// tree; about 6 minutes cold) and returns its path; the test is skipped
// (failed in CI) when it cannot be built.
func Binary(t testing.TB) string {
	t.Helper()
	kubeletOnce.Do(func() {
		var dir string
		dir, kubeletErr = node.RunHackScript("build-kubelet.sh", 20*time.Minute)
		kubeletBin = filepath.Join(dir, "kubelet")
	})
	testutil.Require(t, kubeletErr == nil, fmt.Sprintf("kubelet: %v", kubeletErr))
	return kubeletBin
}

var (
	kubeletOnce sync.Once
	kubeletBin  string
	kubeletErr  error
)

// sysctls kubelet sets at start; each is masked by a file of the test.
var sysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

// Options say what the node runs.
type Options struct {
	Node    *node.Node
	Network *node.Network
	Release containerd.Release
	// Kubelet is the kubelet binary (Binary).
	Kubelet string
	// SandboxImage is the pause image; Images are OCI tars to import, the
	// sandbox image's among them.
	SandboxImage string
	Images       []string
}

// Kubelet is a running kubelet and its containerd.
type Kubelet struct {
	t testing.TB
	// Dir holds everything: configs, logs, manifests, containerd's root.
	Dir string
	// Tag names the node (NodeName) and its cgroup root (/Tag).
	Tag, NodeName string
	// Manifests is the static pod directory; PodLogs kubelet's pod log dir.
	Manifests, PodLogs string
	Runtime            cri.RuntimeServiceClient

	opts      Options
	cmd       *exec.Cmd // unshare: the private mount namespace's first process
	exited    chan struct{}
	conn      *grpc.ClientConn
	sysBefore map[string]string
}

// Start writes the configs, starts containerd and kubelet in one private
// mount namespace in the node, and waits until CRI answers. Cleanup, in
// order: every manifest removed and kubelet given time to tear the pods
// down (CNI DEL), kubelet and containerd stopped by PID, shims killed, pods
// left over removed, cgroups removed in every hierarchy, directories
// removed, sysctls checked unchanged.
func Start(t testing.TB, o Options) *Kubelet {
	t.Helper()
	node.RequireTools(t, []node.Tool{{Path: "unshare", Package: "util-linux"}, {Path: "nsenter", Package: "util-linux"}, {Path: "runc", Package: "runc"}})
	dir, err := os.MkdirTemp("", "ctlb-kl-")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	tag := "ctlbkl" + hex.EncodeToString(b)
	k := &Kubelet{t: t, Dir: dir, Tag: tag, NodeName: tag + "-node", opts: o,
		Manifests: filepath.Join(dir, "manifests"), PodLogs: filepath.Join(dir, "podlogs"), sysBefore: map[string]string{}}
	t.Cleanup(k.cleanup)
	for _, s := range sysctls {
		v, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			t.Fatal(err)
		}
		k.sysBefore[s] = string(v)
	}
	for _, d := range []string{k.Manifests, k.PodLogs, filepath.Join(dir, "sysmask"), filepath.Join(dir, "root"), filepath.Join(dir, "volume-plugins")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range sysctls {
		if err := os.WriteFile(filepath.Join(dir, "sysmask", filepath.Base(s)), []byte(k.sysBefore[s]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.makeCgroupRoot(); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"containerd.toml": k.containerdConfig(),
		"kubelet.yaml":    k.kubeletConfig(),
		"resolv.conf":     "nameserver 127.0.0.1\n", // nothing answers: dnsPolicy Default pods never ask
		"node.sh":         k.script(),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	k.cmd = exec.Command("unshare", "-m", "--propagation", "private", "--", "/bin/sh", filepath.Join(dir, "node.sh"))
	k.cmd.Stdout, k.cmd.Stderr = os.Stderr, os.Stderr
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("start the node's mount namespace: %v", err)
	}
	k.exited = make(chan struct{})
	go func() { _ = k.cmd.Wait(); close(k.exited) }()

	k.conn, err = grpc.NewClient("unix://"+k.socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	k.Runtime = cri.NewRuntimeServiceClient(k.conn)
	if err := k.waitKubelet(60 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, k.logTail())
	}
	return k
}

func (k *Kubelet) socket() string { return filepath.Join(k.Dir, "containerd.sock") }

// makeCgroupRoot makes /Tag in every hierarchy, with the cpuset of its
// parent (a new cpuset cgroup starts empty, and kubelet refuses it).
func (k *Kubelet) makeCgroupRoot() error {
	if err := node.MakeCgroup("/" + k.Tag); err != nil {
		return err
	}
	hs, err := node.Hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				continue // not the cpuset hierarchy
			}
			if len(strings.TrimSpace(string(v))) == 0 {
				v, _ = os.ReadFile(filepath.Join(h, strings.Replace(f, "cpuset.", "cpuset.effective_", 1)))
			}
			_ = os.WriteFile(filepath.Join(h, k.Tag, f), v, 0o644)
		}
	}
	return nil
}

// containerdConfig is the suite's containerd 2.x config with the test's
// paths, NRI off.
func (k *Kubelet) containerdConfig() string {
	d := k.Dir
	return containerd.ConfigV3(containerd.V3Paths{
		Root: filepath.Join(d, "ctrd-root"), State: filepath.Join(d, "ctrd-state"), Socket: k.socket(),
		SandboxImage: k.opts.SandboxImage, CNIBinDir: k.opts.Network.BinDir, CNIConfDir: k.opts.Network.ConfDir,
	})
}

// kubeletConfig is shared/runtimes/kubelet-standalone.yaml with the
// test's paths. kubelet's ports are on the node namespace's loopback.
func (k *Kubelet) kubeletConfig() string {
	d := k.Dir
	return `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: ` + k.Manifests + `
fileCheckFrequency: 2s
syncFrequency: 5s
containerRuntimeEndpoint: unix://` + k.socket() + `
cgroupDriver: cgroupfs
cgroupRoot: /` + k.Tag + `
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
localStorageCapacityIsolation: false
oomScoreAdj: 0
protectKernelDefaults: false
resolvConf: ` + filepath.Join(d, "resolv.conf") + `
podLogsDir: ` + k.PodLogs + `
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: false
volumePluginDir: ` + filepath.Join(d, "volume-plugins") + `
`
}

// script is shared/runtimes/kubelet-node.sh: it runs as the first process
// of the private mount namespace and waits for containerd and kubelet.
func (k *Kubelet) script() string {
	q := strconv.Quote
	d := k.Dir
	bin := k.opts.Release.BinDir
	var b strings.Builder
	b.WriteString("set -e\n")
	for _, s := range sysctls {
		fmt.Fprintf(&b, "mount --bind %s %s\n", q(filepath.Join(d, "sysmask", filepath.Base(s))), q(filepath.Join("/proc/sys", s)))
	}
	// The mount points are made on the host if missing (empty
	// directories, removed after the tests by node.TrackHostPaths).
	b.WriteString("mkdir -p /var/lib/kubelet /var/log/containers\n")
	fmt.Fprintf(&b, "mount -t tmpfs -o size=16m %s-kubelet /var/lib/kubelet\n", k.Tag)
	fmt.Fprintf(&b, "mount -t tmpfs -o size=16m %s-logs /var/log/containers\n", k.Tag)
	fmt.Fprintf(&b, "PATH=%s:$PATH nsenter --net=%s -- %s -c %s --log-level info > %s 2>&1 &\n",
		q(bin), q(k.opts.Node.Path()), q(filepath.Join(bin, "containerd")), q(filepath.Join(d, "containerd.toml")), q(filepath.Join(d, "containerd.log")))
	fmt.Fprintf(&b, "echo $! > %s\n", q(filepath.Join(d, "containerd.pid")))
	fmt.Fprintf(&b, "i=0; until %s -a %s version >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.1; done\n",
		q(filepath.Join(bin, "ctr")), q(k.socket()))
	for _, im := range k.opts.Images {
		fmt.Fprintf(&b, "%s -a %s -n k8s.io images import %s >/dev/null\n", q(filepath.Join(bin, "ctr")), q(k.socket()), q(im))
	}
	fmt.Fprintf(&b, "date +%%s.%%N > %s\n", q(filepath.Join(d, "kubelet.t0")))
	fmt.Fprintf(&b, "nsenter --net=%s -- %s --config=%s --root-dir=%s --cert-dir=%s --hostname-override=%s --v=2 > %s 2>&1 &\n",
		q(k.opts.Node.Path()), q(k.opts.Kubelet), q(filepath.Join(d, "kubelet.yaml")), q(filepath.Join(d, "root")),
		q(filepath.Join(d, "root", "pki")), k.NodeName, q(filepath.Join(d, "kubelet.log")))
	fmt.Fprintf(&b, "echo $! > %s\n", q(filepath.Join(d, "kubelet.pid")))
	b.WriteString("wait\n")
	return b.String()
}

// waitKubelet waits until kubelet runs and containerd's CRI is ready.
func (k *Kubelet) waitKubelet(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-k.exited:
			return fmt.Errorf("the node's mount namespace exited at start")
		default:
		}
		if pid := k.pid("kubelet"); pid > 0 && node.Alive(pid) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := k.Runtime.Status(ctx, &cri.StatusRequest{})
			cancel()
			if err == nil {
				ready := 0
				for _, c := range st.GetStatus().GetConditions() {
					if (c.Type == cri.RuntimeReady || c.Type == cri.NetworkReady) && c.Status {
						ready++
					}
				}
				if ready == 2 {
					return nil
				}
				err = fmt.Errorf("conditions %v", st.GetStatus().GetConditions())
			}
			last = err
		} else {
			last = fmt.Errorf("kubelet not started yet")
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("kubelet node not ready after %s: %v", limit, last)
}

// pid reads NAME.pid, 0 when absent.
func (k *Kubelet) pid(name string) int {
	b, err := os.ReadFile(filepath.Join(k.Dir, name+".pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// logTail is the end of kubelet's and containerd's logs.
func (k *Kubelet) logTail() string {
	var b strings.Builder
	for _, name := range []string{"kubelet.log", "containerd.log"} {
		raw, _ := os.ReadFile(filepath.Join(k.Dir, name))
		if len(raw) > 6000 {
			raw = raw[len(raw)-6000:]
		}
		fmt.Fprintf(&b, "%s (end):\n%s\n", name, raw)
	}
	return b.String()
}

// stopPID ends pid: SIGTERM, then SIGKILL after limit.
func stopPID(pid int, limit time.Duration) {
	if pid <= 0 || !node.Alive(pid) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if !node.WaitGone(pid, limit) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		node.WaitGone(pid, 5*time.Second)
	}
}

func (k *Kubelet) cleanup() {
	t := k.t
	if t.Failed() {
		t.Log(k.logTail())
	}
	// Pods first, by kubelet itself: the manifests go, kubelet stops the
	// pods (CNI DEL) and removes their cgroups.
	ents, _ := os.ReadDir(k.Manifests)
	for _, e := range ents {
		_ = os.Remove(filepath.Join(k.Manifests, e.Name()))
	}
	if len(ents) > 0 && k.Runtime != nil {
		k.waitNoPods(30 * time.Second)
	}
	stopPID(k.pid("kubelet"), 10*time.Second)
	// Whatever is left, through CRI, so that DEL still runs.
	if k.Runtime != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if list, err := k.Runtime.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{}); err == nil {
			for _, p := range list.GetItems() {
				_, _ = k.Runtime.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.Id})
				_, _ = k.Runtime.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.Id})
			}
		}
		cancel()
	}
	if k.conn != nil {
		k.conn.Close()
	}
	stopPID(k.pid("containerd"), 10*time.Second)
	sock := k.socket()
	node.KillMatching(t, func(argv []string) bool {
		if !strings.HasPrefix(filepath.Base(argv[0]), "containerd-shim") {
			return false
		}
		for _, a := range argv {
			if a == sock {
				return true
			}
		}
		return false
	})
	if k.cmd != nil && k.cmd.Process != nil {
		select {
		case <-k.exited:
		case <-time.After(10 * time.Second):
			_ = k.cmd.Process.Kill()
			<-k.exited
		}
	}
	// The mount namespace is gone with its last process; shims' sockets
	// live in containerd's default state dir.
	node.UnmountUnder(t, k.Dir)
	hs, err := node.Hierarchies()
	if err != nil {
		t.Error(err)
	}
	for _, h := range hs {
		if err := testutil.RemoveCgroupTree(filepath.Join(h, k.Tag)); err != nil {
			t.Errorf("remove kubelet's cgroups: %v", err)
		}
	}
	if err := os.RemoveAll(k.Dir); err != nil {
		t.Errorf("remove kubelet dir: %v", err)
	}
	for _, s := range sysctls {
		v, _ := os.ReadFile(filepath.Join("/proc/sys", s))
		if string(v) != k.sysBefore[s] {
			t.Errorf("sysctl %s changed: %q, was %q", s, strings.TrimSpace(string(v)), strings.TrimSpace(k.sysBefore[s]))
		}
	}
}

// waitNoPods waits until containerd lists no ready sandbox.
func (k *Kubelet) waitNoPods(limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if len(k.readyPods()) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (k *Kubelet) readyPods() []*cri.PodSandbox {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := k.Runtime.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{Filter: &cri.PodSandboxFilter{
		State: &cri.PodSandboxStateValue{State: cri.PodSandboxState_SANDBOX_READY}}})
	if err != nil {
		return nil
	}
	return list.GetItems()
}
