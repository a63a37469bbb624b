// Package containerd runs a private containerd (Debian's 1.6 or 2.x built
// from the module proxy, with runc; see Release) inside a test
// node and drives it through CRI the way kubelet does: RunPodSandbox with a
// pod UID and cgroup parent, CreateContainer/StartContainer, container logs
// from the pod's log directory, StopPodSandbox/RemovePodSandbox. Every
// process, mount, directory and cgroup it makes is removed when the test
// ends, also on failure.
package containerd

import (
	"context"
	"crypto/sha256"
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

	"github.com/ctlb/ctlb/test/runtime/node"
)

// Namespace is the containerd namespace CRI uses.
const Namespace = "k8s.io"

// qosCgroups are kubelet's node-level cgroups (cgroupfs driver), children
// first.
var qosCgroups = []string{"/kubepods/besteffort", "/kubepods/burstable", "/kubepods"}

// Options say what the containerd serves.
type Options struct {
	Node    *node.Node
	Network *node.Network
	// SandboxImage is the pod sandbox image; it must be imported (Import)
	// before the first RunPodSandbox.
	SandboxImage string
	// Release is the containerd release; Debian's 1.6 when zero.
	Release Release
	// NRISocket is where containerd 2.x serves NRI plugins; a file in the
	// containerd's own directory when empty.
	NRISocket string
}

// Containerd is one running private containerd.
type Containerd struct {
	t testing.TB
	// Dir holds everything: Root, State, the socket, the config, the log.
	Dir, Root, State, Socket, Config, Log string
	// LogRoot is where pods' container logs go (kubelet's /var/log/pods).
	LogRoot string
	// NRISocket is where containerd 2.x serves NRI plugins.
	NRISocket string
	// Release is the containerd release that runs.
	Release Release
	Runtime cri.RuntimeServiceClient
	Images  cri.ImageServiceClient

	node   *node.Node
	cmd    *exec.Cmd
	exited chan struct{}
	conn   *grpc.ClientConn

	mu   sync.Mutex
	pods map[string]*Pod // not yet removed, by sandbox ID
	// cgroups are pod cgroup parents to remove at the end.
	cgroups map[string]bool
}

// Start writes the config, starts containerd in the node and waits until
// CRI answers. Cleanup, in order: remove pods left over (CNI DEL runs),
// stop containerd, kill its shims, unmount and remove its directories,
// remove the pods' cgroups.
func Start(t testing.TB, opts Options) *Containerd {
	t.Helper()
	node.RequireTools(t, node.ContainerdTools)
	// A short directory of its own: the socket path must fit in sun_path.
	dir, err := os.MkdirTemp("", "ctlb-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &Containerd{
		t:       t,
		Dir:     dir,
		Root:    filepath.Join(dir, "root"),
		State:   filepath.Join(dir, "state"),
		Socket:  filepath.Join(dir, "containerd.sock"),
		Config:  filepath.Join(dir, "config.toml"),
		Log:     filepath.Join(dir, "containerd.log"),
		LogRoot: filepath.Join(dir, "pods"),
		pods:    map[string]*Pod{},
		cgroups: map[string]bool{},
		Release: opts.Release,
	}
	if c.Release.Name == "" {
		c.Release = Debian
	}
	c.NRISocket = opts.NRISocket
	if c.NRISocket == "" {
		c.NRISocket = filepath.Join(dir, "nri.sock")
	}
	t.Cleanup(c.cleanup)
	// kubelet makes the QoS-level cgroups when the node starts, long before
	// any pod: only a pod's own cgroup can be missing when its sandbox
	// starts.
	for _, cg := range qosCgroups {
		if err := node.MakeCgroup(cg); err != nil {
			t.Fatal(err)
		}
	}
	config := c.configTOML(opts)
	if c.Release.V2 {
		config = c.configTOMLv3(opts)
	}
	if err := os.WriteFile(c.Config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	c.node = opts.Node
	if err := c.start(); err != nil {
		t.Fatal(err)
	}
	var err2 error
	c.conn, err2 = grpc.NewClient("unix://"+c.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err2 != nil {
		t.Fatalf("cri client: %v", err2)
	}
	c.Runtime = cri.NewRuntimeServiceClient(c.conn)
	c.Images = cri.NewImageServiceClient(c.conn)
	if err := c.waitReady(20 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, c.logTail())
	}
	return c
}

// start runs containerd in the node, its log appended to Log.
func (c *Containerd) start() error {
	logf, err := os.OpenFile(c.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	c.cmd = c.node.Command(c.Release.bin("containerd"), "--config", c.Config, "--log-level", "info")
	c.cmd.Env = c.Release.env()
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	// Its own process group: a signal meant for the test never reaches it.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	exited := make(chan struct{})
	c.exited = exited
	cmd := c.cmd
	go func() { _ = cmd.Wait(); close(exited) }()
	return nil
}

// Restart stops containerd (SIGTERM, by PID) and starts it again on the
// same root and state, as an upgrade or a crash-restart of the node's
// runtime would: pods and their shims keep running meanwhile.
func (c *Containerd) Restart(t testing.TB) {
	t.Helper()
	c.stop()
	if err := c.start(); err != nil {
		t.Fatal(err)
	}
	if err := c.waitReady(20 * time.Second); err != nil {
		t.Fatalf("after restart: %v\n%s", err, c.logTail())
	}
}

// configTOML is containerd's config (version 2). Settings this machine
// needs, from shared/RUNTIMES.md: restrict_oom_score_adj (no
// CAP_SYS_RESOURCE), cgroupfs (no systemd), a local sandbox image, CNI
// dirs the test owns. Everything else that would land in a host-wide
// default path (runc's state, /opt, the pods' netns) is moved under Dir.
func (c *Containerd) configTOML(o Options) string {
	q := strconv.Quote
	return `version = 2
root = ` + q(c.Root) + `
state = ` + q(c.State) + `
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = ` + q(c.Socket) + `

[ttrpc]
  address = ` + q(c.Socket+".ttrpc") + `

[plugins."io.containerd.internal.v1.opt"]
  path = ` + q(filepath.Join(c.Root, "opt")) + `

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = ` + q(o.SandboxImage) + `
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ` + q(o.Network.BinDir) + `
    conf_dir = ` + q(o.Network.ConfDir) + `
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = ` + q(filepath.Join(c.State, "runc")) + `
`
}

// configTOMLv3 is this containerd's 2.x config, with NRI on a socket of
// its own (NRISocket).
func (c *Containerd) configTOMLv3(o Options) string {
	return ConfigV3(V3Paths{
		Root: c.Root, State: c.State, Socket: c.Socket, SandboxImage: o.SandboxImage,
		CNIBinDir: o.Network.BinDir, CNIConfDir: o.Network.ConfDir,
		NRISocket: c.NRISocket, NRIDir: filepath.Join(c.Dir, "nri"),
	})
}

// V3Paths are what a containerd 2.x config of a test names: its own
// directories and socket, the sandbox image, the CNI dirs, and NRI (off
// when NRISocket is empty).
type V3Paths struct {
	Root, State, Socket, SandboxImage string
	CNIBinDir, CNIConfDir             string
	NRISocket, NRIDir                 string
}

// ConfigV3 is containerd 2.x's config (version 3; 2.4 migrates it to its
// native 4), after shared/runtimes/containerd2-config.toml: the same
// workarounds as 1.6 under the plugins' new names. The containerd suite
// and the kubelet test both run with it.
func ConfigV3(p V3Paths) string {
	q := strconv.Quote
	nri := `[plugins."io.containerd.nri.v1.nri"]
  disable = true
`
	if p.NRISocket != "" {
		nri = `[plugins."io.containerd.nri.v1.nri"]
  disable = false
  socket_path = ` + q(p.NRISocket) + `
  plugin_path = ` + q(filepath.Join(p.NRIDir, "plugins")) + `
  plugin_config_path = ` + q(filepath.Join(p.NRIDir, "conf.d")) + `
`
	}
	return `version = 3
root = ` + q(p.Root) + `
state = ` + q(p.State) + `

[grpc]
  address = ` + q(p.Socket) + `

[ttrpc]
  address = ` + q(p.Socket+".ttrpc") + `

[plugins."io.containerd.internal.v1.opt"]
  path = ` + q(filepath.Join(p.Root, "opt")) + `

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = ` + q(p.SandboxImage) + `

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = ` + q(filepath.Join(p.State, "runc")) + `
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [` + q(p.CNIBinDir) + `]
    conf_dir = ` + q(p.CNIConfDir) + `
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

` + nri
}

// waitReady waits until CRI reports the runtime and the network ready
// (the CNI config was loaded).
func (c *Containerd) waitReady(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-c.exited:
			return fmt.Errorf("containerd exited at start")
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := c.Runtime.Status(ctx, &cri.StatusRequest{})
		cancel()
		if err == nil {
			// containerd 2.x adds conditions of its own (deprecation
			// warnings); readiness is kubelet's two.
			ready := 0
			for _, cond := range st.GetStatus().GetConditions() {
				if cond.Type != cri.RuntimeReady && cond.Type != cri.NetworkReady {
					continue
				}
				if cond.Status {
					ready++
				} else {
					err = fmt.Errorf("condition %s: %s: %s", cond.Type, cond.Reason, cond.Message)
				}
			}
			if err == nil && ready == 2 {
				return nil
			}
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("containerd CRI not ready after %s: %v", limit, last)
}

// Import loads an OCI image-layout tar into CRI's namespace with ctr.
func (c *Containerd) Import(t testing.TB, tarPath string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, c.Release.bin("ctr"), "--address", c.Socket, "--namespace", Namespace, "images", "import", tarPath).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", tarPath, err, out)
	}
}

// logTail is the end of containerd's log, for failure messages.
func (c *Containerd) logTail() string {
	b, _ := os.ReadFile(c.Log)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return "containerd log (end):\n" + string(b)
}

func (c *Containerd) cleanup() {
	t := c.t
	if t.Failed() {
		t.Log(c.logTail())
	}
	c.mu.Lock()
	var left []*Pod
	for _, p := range c.pods {
		left = append(left, p)
	}
	c.mu.Unlock()
	for _, p := range left {
		// Through CRI first, so CNI DEL runs and the plugin detaches.
		if err := p.remove(); err != nil {
			t.Errorf("remove pod %s at cleanup: %v", p.Name, err)
		}
	}
	if c.conn != nil {
		c.conn.Close()
	}
	c.stop()
	c.killShims()
	node.UnmountUnder(t, c.Dir)
	if err := os.RemoveAll(c.Dir); err != nil {
		t.Errorf("remove containerd dir: %v", err)
	}
	c.mu.Lock()
	var cgs []string
	for cg := range c.cgroups {
		cgs = append(cgs, cg)
	}
	c.mu.Unlock()
	for _, cg := range cgs {
		node.RemovePodCgroup(t, cg, "")
	}
	node.PruneCgroups(qosCgroups...)
}

// stop ends containerd by its PID: SIGTERM, then SIGKILL after 10 s.
func (c *Containerd) stop() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// killShims kills the runc shims this containerd started. Shims outlive
// containerd on purpose (so containers survive a restart); they carry the
// containerd socket in their arguments, which is unique to this instance.
func (c *Containerd) killShims() {
	node.KillMatching(c.t, func(argv []string) bool {
		if !strings.HasPrefix(filepath.Base(argv[0]), "containerd-shim") {
			return false
		}
		for _, a := range argv {
			if a == c.Socket {
				return true
			}
		}
		return false
	})
	// Their sockets live in containerd's default state dir whatever the
	// config says (/run/containerd/s/sha256(socket/namespace/id)).
	for _, id := range c.sandboxIDs() {
		sum := sha256.Sum256([]byte(filepath.Join(c.Socket, Namespace, id)))
		_ = os.Remove(filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:])))
	}
}

// sandboxIDs lists the task bundles containerd made, named by ID.
func (c *Containerd) sandboxIDs() []string {
	ents, _ := os.ReadDir(filepath.Join(c.State, "io.containerd.runtime.v2.task", Namespace))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}
