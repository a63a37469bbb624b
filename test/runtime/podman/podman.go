// Package podman runs rootful podman 4 (CNI backend) inside a test node,
// on configuration and storage of its own: pods made with `podman pod
// create --network NET --cgroup-parent P` and containers run in them from a
// root filesystem directory (`podman run --pod POD --rootfs DIR`), so no
// image registry is needed. Everything it makes is removed when the test
// ends, also on failure.
package podman

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/test/runtime/node"
)

// Podman is one podman "installation": its config, storage and state.
type Podman struct {
	t    testing.TB
	node *node.Node
	net  *node.Network
	// Dir holds the config files, storage, run state and events log.
	Dir string
	// CgroupParent is the parent of every pod's cgroup (P/<podID>).
	CgroupParent string
	// Runtime is the OCI runtime podman runs containers with.
	Runtime string
	env     []string

	mu    sync.Mutex
	netns map[string]bool // pod network namespaces podman made for us
}

// runcRoot is runc's default state directory, which podman's runc uses.
const runcRoot = "/run/runc"

// Pod is one podman pod.
type Pod struct {
	pm             *Podman
	Name, ID       string
	InfraID, Netns string
}

// New writes podman's configuration for the node and network. Cleanup:
// remove the pods through podman (CNI DEL runs), kill leftover conmon
// processes by PID, unmount and remove Dir, remove the pods' cgroups and
// network namespaces.
func New(t testing.TB, n *node.Node, net *node.Network) *Podman {
	t.Helper()
	return NewWithRuntime(t, n, net, "runc")
}

// NewWithRuntime is New with another OCI runtime ("crun": Debian's crun
// package); the runtime must be installed.
func NewWithRuntime(t testing.TB, n *node.Node, net *node.Network, runtime string) *Podman {
	t.Helper()
	node.RequireTools(t, node.PodmanTools)
	if runtime == "crun" {
		node.RequireTools(t, node.CrunTools)
	}
	dir, err := os.MkdirTemp("", "ctlb-podman-")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	p := &Podman{t: t, node: n, net: net, Dir: dir, CgroupParent: "/ctlb-e2e-podman-" + hex.EncodeToString(b), Runtime: runtime, netns: map[string]bool{}}
	t.Cleanup(p.cleanup)
	conf, storage, err := p.writeConfig()
	if err != nil {
		t.Fatal(err)
	}
	// TMPDIR: image builds (the infra image) stage in it, not in /var/tmp.
	p.env = append(os.Environ(), "CONTAINERS_CONF="+conf, "CONTAINERS_STORAGE_CONF="+storage, "TMPDIR="+filepath.Join(dir, "tmp"))
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeConfig writes containers.conf and storage.conf. From
// shared/RUNTIMES.md: cgroupfs (no systemd), file events, runc, the CNI
// backend, and ulimits within what this machine allows (the defaults
// need CAP_SYS_RESOURCE, which the bounding set lacks). File locks, so
// no lock segment is left in /dev/shm; a default subnet in the test range,
// though pods only use the test's network.
func (p *Podman) writeConfig() (conf, storage string, err error) {
	var nofile, nproc unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile); err != nil {
		return "", "", fmt.Errorf("podman config: %w", err)
	}
	if err := unix.Getrlimit(unix.RLIMIT_NPROC, &nproc); err != nil {
		return "", "", fmt.Errorf("podman config: %w", err)
	}
	procs := nproc.Max
	if b, err := os.ReadFile("/proc/sys/kernel/pid_max"); err == nil {
		if pm, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && pm < procs {
			procs = pm
		}
	}
	q := strconv.Quote
	conf = filepath.Join(p.Dir, "containers.conf")
	err = os.WriteFile(conf, []byte(`[containers]
default_ulimits = [`+q(fmt.Sprintf("nofile=%d:%d", nofile.Max, nofile.Max))+`, `+q(fmt.Sprintf("nproc=%d:%d", procs, procs))+`]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = `+q(filepath.Join(p.Dir, "events.log"))+`
runtime = `+q(p.Runtime)+`
tmp_dir = `+q(filepath.Join(p.Dir, "tmp"))+`
lock_type = "file"

[network]
network_backend = "cni"
cni_plugin_dirs = [`+q(p.net.BinDir)+`]
network_config_dir = `+q(p.net.ConfDir)+`
default_subnet = "198.18.255.0/24"
`), 0o644)
	if err != nil {
		return "", "", fmt.Errorf("podman config: %w", err)
	}
	storage = filepath.Join(p.Dir, "storage.conf")
	err = os.WriteFile(storage, []byte(`[storage]
driver = "overlay"
graphroot = `+q(filepath.Join(p.Dir, "root"))+`
runroot = `+q(filepath.Join(p.Dir, "run"))+`
`), 0o644)
	if err != nil {
		return "", "", fmt.Errorf("podman config: %w", err)
	}
	return conf, storage, nil
}

// Run runs podman with args inside the node (its network plugins, and the
// conmon it starts, run in the namespace of the podman command) and returns
// its standard output.
func (p *Podman) Run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := p.node.CommandContext(ctx, "podman", args...)
	cmd.Env = p.env
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// CreatePod creates a pod on the test's network under CgroupParent and
// starts it: the infra container runs, and CNI ADD ran (before the infra
// process existed).
func (p *Podman) CreatePod(t testing.TB, name string) *Pod {
	t.Helper()
	out, err := p.Run(time.Minute, "pod", "create", "--name", name, "--network", p.net.Name, "--cgroup-parent", p.CgroupParent)
	if err != nil {
		t.Fatal(err)
	}
	pod := &Pod{pm: p, Name: name, ID: strings.TrimSpace(out)}
	out, err = p.Run(10*time.Second, "pod", "inspect", "--format", "{{.InfraContainerID}}", pod.ID)
	if err != nil {
		t.Fatal(err)
	}
	pod.InfraID = strings.TrimSpace(out)
	if _, err := p.Run(time.Minute, "pod", "start", pod.ID); err != nil {
		t.Fatal(err)
	}
	out, err = p.Run(10*time.Second, "inspect", "--format", "{{.NetworkSettings.SandboxKey}}", pod.InfraID)
	if err != nil {
		t.Fatal(err)
	}
	pod.Netns = strings.TrimSpace(out)
	p.mu.Lock()
	p.netns[pod.Netns] = true
	p.mu.Unlock()
	return pod
}

// RunContainer runs cmd from the root filesystem rootfs in the pod, in the
// foreground, and returns its standard output and exit code.
func (pod *Pod) RunContainer(t testing.TB, timeout time.Duration, rootfs string, cmd ...string) (string, int) {
	t.Helper()
	out, err := pod.pm.Run(timeout, append([]string{"run", "--rm", "--pod", pod.ID, "--rootfs", rootfs}, cmd...)...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out, 0
	case errors.As(err, &ee):
		t.Logf("%v", err)
		return out, ee.ExitCode()
	}
	t.Fatal(err)
	return "", -1
}

// RunStandalone runs cmd from rootfs as a container of no pod (`podman run
// --network NET --cgroup-parent P`), in the foreground, removed when it
// exits, and returns its standard output and exit code. Its cgroup is
// P/libpod-<ID>; CNI ADD runs before its process exists.
func (p *Podman) RunStandalone(t testing.TB, timeout time.Duration, rootfs string, cmd ...string) (string, int) {
	t.Helper()
	args := []string{"run", "--rm", "--network", p.net.Name, "--cgroup-parent", p.CgroupParent, "--rootfs", rootfs}
	out, err := p.Run(timeout, append(args, cmd...)...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out, 0
	case errors.As(err, &ee):
		t.Logf("%v", err)
		return out, ee.ExitCode()
	}
	t.Fatal(err)
	return "", -1
}

// Remove removes the pod and its containers (`podman pod rm -f`): CNI DEL
// runs and podman deletes the pod's network namespace.
func (pod *Pod) Remove(t testing.TB) {
	t.Helper()
	if _, err := pod.pm.Run(time.Minute, "pod", "rm", "--force", "--time", "0", pod.ID); err != nil {
		t.Fatal(err)
	}
}

// CgroupDir is the pod's cgroup in the cgroup v2 tree under mount: podman
// names it P/<podID>, with each container in P/<podID>/libpod-<ID>.
func (pod *Pod) CgroupDir(v2mount string) string {
	return filepath.Join(v2mount, pod.pm.CgroupParent, pod.ID)
}

func (p *Podman) cleanup() {
	t := p.t
	var ids []string
	if p.env != nil {
		if out, err := p.Run(10*time.Second, "ps", "--all", "--no-trunc", "--format", "{{.ID}}"); err == nil {
			ids = strings.Fields(out)
		}
		if _, err := p.Run(2*time.Minute, "pod", "rm", "--all", "--force", "--time", "0"); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(p.Dir, "events.log"))
			t.Logf("podman events:\n%s", b)
		}
	}
	p.killConmons()
	// podman's runc keeps its state in runc's default root, /run/runc:
	// delete what a failed removal left there for this test's containers.
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(runcRoot, id)); err == nil {
			if out, err := exec.Command("runc", "--root", runcRoot, "delete", "--force", id).CombinedOutput(); err != nil {
				t.Errorf("runc delete %s: %v: %s", id, err, out)
			}
		}
	}
	p.mu.Lock()
	for ns := range p.netns {
		// podman removes the namespace with the pod; only one it made for
		// this test's pods is touched.
		if _, err := os.Stat(ns); err == nil {
			_ = unix.Unmount(ns, unix.MNT_DETACH)
			if err := os.Remove(ns); err != nil {
				t.Errorf("remove pod netns %s: %v", ns, err)
			}
		}
	}
	p.mu.Unlock()
	node.UnmountUnder(t, p.Dir)
	if err := os.RemoveAll(p.Dir); err != nil {
		t.Errorf("remove podman dir: %v", err)
	}
	node.RemovePodCgroup(t, p.CgroupParent, "")
}

// killConmons kills conmon processes of this podman still running: their
// arguments name paths under Dir, unique to this test.
func (p *Podman) killConmons() {
	node.KillMatching(p.t, func(argv []string) bool {
		if filepath.Base(argv[0]) != "conmon" {
			return false
		}
		for _, a := range argv {
			if strings.HasPrefix(a, p.Dir+"/") {
				return true
			}
		}
		return false
	})
}
