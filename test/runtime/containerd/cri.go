package containerd

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ctlb/ctlb/test/runtime/node"
)

// PodSpec is what kubelet knows about a pod before it asks for the sandbox.
type PodSpec struct {
	Name string
	// Namespace defaults to "default", UID to a random UUID.
	Namespace, UID string
	// CgroupParent defaults to kubelet's cgroupfs name for a best-effort
	// pod, /kubepods/besteffort/pod<UID>.
	CgroupParent string
	// NoPodCgroup leaves the pod cgroup to runc: the sandbox starts before
	// its pod cgroup exists. By default the test creates it first, in every
	// hierarchy, as kubelet does.
	NoPodCgroup bool
	// Annotations of the pod (containerd passes them to CNI and NRI).
	Annotations map[string]string
}

// Pod is one pod sandbox.
type Pod struct {
	c                                       *Containerd
	ID                                      string // the sandbox's ID
	Name, Namespace, UID, CgroupParent, Log string
	// Requested is when RunPodSandbox was called.
	Requested time.Time
	config    *cri.PodSandboxConfig
}

// ContainerSpec is one container of a pod.
type ContainerSpec struct {
	Name, Image string
	// Command replaces the image's entrypoint when set; Args its command.
	Command, Args []string
	// Attempt counts restarts of the container, as kubelet's restart
	// count: a restart is a new container of the same name.
	Attempt uint32
}

// Container is one created and started container.
type Container struct {
	p        *Pod
	ID, Name string
	LogPath  string
}

// NewUID returns a random UUID (version 4), as the API server gives pods.
func NewUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// RunPod runs a pod sandbox through CRI, as kubelet does: pod cgroup first
// (unless spec.NoPodCgroup), then RunPodSandbox with the pod's UID and
// cgroup parent. CNI ADD runs inside RunPodSandbox. The pod and its cgroup
// are removed when the test ends if the test did not remove them.
func (c *Containerd) RunPod(t testing.TB, spec PodSpec) *Pod {
	t.Helper()
	p, err := c.StartPod(spec)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// StartPod is RunPod for use from several goroutines: it returns errors
// instead of failing the test.
func (c *Containerd) StartPod(spec PodSpec) (*Pod, error) {
	p := &Pod{c: c, Name: spec.Name, Namespace: spec.Namespace, UID: spec.UID, CgroupParent: spec.CgroupParent}
	if p.Namespace == "" {
		p.Namespace = "default"
	}
	if p.UID == "" {
		p.UID = NewUID()
	}
	if p.CgroupParent == "" {
		p.CgroupParent = "/kubepods/besteffort/pod" + p.UID
	}
	p.Log = filepath.Join(c.LogRoot, p.Namespace+"_"+p.Name+"_"+p.UID)
	c.mu.Lock()
	c.cgroups[p.CgroupParent] = true
	c.mu.Unlock()
	if !spec.NoPodCgroup {
		if err := node.MakeCgroup(p.CgroupParent); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(p.Log, 0o755); err != nil {
		return nil, err
	}
	p.config = &cri.PodSandboxConfig{
		Metadata:     &cri.PodSandboxMetadata{Name: p.Name, Namespace: p.Namespace, Uid: p.UID},
		Hostname:     p.Name,
		LogDirectory: p.Log,
		Labels:       map[string]string{"app": "ctlb-e2e"},
		Annotations:  spec.Annotations,
		Linux: &cri.LinuxPodSandboxConfig{
			CgroupParent: p.CgroupParent,
			SecurityContext: &cri.LinuxSandboxSecurityContext{
				NamespaceOptions: &cri.NamespaceOption{Network: cri.NamespaceMode_POD, Pid: cri.NamespaceMode_CONTAINER, Ipc: cri.NamespaceMode_POD},
			},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p.Requested = time.Now()
	resp, err := c.Runtime.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: p.config})
	if err != nil {
		return nil, fmt.Errorf("RunPodSandbox %s: %w", p.Name, err)
	}
	p.ID = resp.PodSandboxId
	c.mu.Lock()
	c.pods[p.ID] = p
	c.mu.Unlock()
	return p, nil
}

// IP is the pod's address, from the sandbox status (the CNI result).
func (p *Pod) IP(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := p.c.Runtime.PodSandboxStatus(ctx, &cri.PodSandboxStatusRequest{PodSandboxId: p.ID})
	if err != nil {
		t.Fatalf("PodSandboxStatus %s: %v", p.Name, err)
	}
	return st.GetStatus().GetNetwork().GetIp()
}

// RunContainer creates and starts a container in the pod.
func (p *Pod) RunContainer(t testing.TB, spec ContainerSpec) *Container {
	t.Helper()
	ct, err := p.StartContainer(spec)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// StartContainer is RunContainer returning errors, for goroutines.
func (p *Pod) StartContainer(spec ContainerSpec) (*Container, error) {
	ct := &Container{p: p, Name: spec.Name}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := p.c.Runtime.CreateContainer(ctx, &cri.CreateContainerRequest{
		PodSandboxId: p.ID,
		Config: &cri.ContainerConfig{
			Metadata: &cri.ContainerMetadata{Name: spec.Name, Attempt: spec.Attempt},
			Image:    &cri.ImageSpec{Image: spec.Image},
			Command:  spec.Command,
			Args:     spec.Args,
			LogPath:  fmt.Sprintf("%s.%d.log", spec.Name, spec.Attempt),
			Linux:    &cri.LinuxContainerConfig{},
		},
		SandboxConfig: p.config,
	})
	if err != nil {
		return nil, fmt.Errorf("CreateContainer %s in %s: %w", spec.Name, p.Name, err)
	}
	ct.ID = resp.ContainerId
	ct.LogPath = filepath.Join(p.Log, fmt.Sprintf("%s.%d.log", spec.Name, spec.Attempt))
	if _, err := p.c.Runtime.StartContainer(ctx, &cri.StartContainerRequest{ContainerId: ct.ID}); err != nil {
		return nil, fmt.Errorf("StartContainer %s in %s: %w", spec.Name, p.Name, err)
	}
	return ct, nil
}

// Wait waits, at most limit, for the container to exit and returns its
// exit code.
func (ct *Container) Wait(limit time.Duration) (int32, error) {
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := ct.p.c.Runtime.ContainerStatus(ctx, &cri.ContainerStatusRequest{ContainerId: ct.ID})
		cancel()
		if err != nil {
			return 0, fmt.Errorf("ContainerStatus %s: %w", ct.Name, err)
		}
		if st.GetStatus().GetState() == cri.ContainerState_CONTAINER_EXITED {
			return st.GetStatus().GetExitCode(), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("container %s in pod %s still %s after %s", ct.Name, ct.p.Name, st.GetStatus().GetState(), limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stdout is the container's standard output, line by line, read from the
// CRI log file ("TIMESTAMP STREAM P|F TEXT" lines, P marking a partial
// line continued by the next).
func (ct *Container) Stdout() ([]string, error) {
	out, err := ReadCRILog(ct.LogPath)
	if err != nil {
		return nil, fmt.Errorf("container %s log: %w", ct.Name, err)
	}
	return out, nil
}

// ReadCRILog reads the standard output lines of a CRI container log file
// (kubelet's and containerd's format).
func ReadCRILog(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	var partial strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.SplitN(sc.Text(), " ", 4)
		if len(fields) < 4 || fields[1] != "stdout" {
			continue
		}
		partial.WriteString(fields[3])
		if fields[2] == "F" {
			out = append(out, partial.String())
			partial.Reset()
		}
	}
	return out, sc.Err()
}

// Stop stops the pod (StopPodSandbox): its containers stop and CNI DEL
// runs; the sandbox stays listed until Remove.
func (p *Pod) Stop(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.c.Runtime.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.ID}); err != nil {
		t.Fatalf("StopPodSandbox %s: %v", p.Name, err)
	}
}

// Remove stops and removes the pod, as kubelet does when a pod is deleted:
// StopPodSandbox (containers stop, CNI DEL runs) then RemovePodSandbox.
// The pod cgroup, which runc leaves behind, is removed at cleanup.
func (p *Pod) Remove(t testing.TB) {
	t.Helper()
	if err := p.remove(); err != nil {
		t.Fatal(err)
	}
}

// RemoveErr is Remove returning errors, for goroutines.
func (p *Pod) RemoveErr() error { return p.remove() }

func (p *Pod) remove() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.c.Runtime.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.ID}); err != nil {
		return fmt.Errorf("StopPodSandbox %s: %w", p.Name, err)
	}
	if _, err := p.c.Runtime.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.ID}); err != nil {
		return fmt.Errorf("RemovePodSandbox %s: %w", p.Name, err)
	}
	p.c.mu.Lock()
	delete(p.c.pods, p.ID)
	p.c.mu.Unlock()
	return nil
}

// CgroupDir is the container's own cgroup in the cgroup v2 tree under
// mount (runc's cgroupfs naming: the pod's cgroup parent, then the ID).
func (ct *Container) CgroupDir(v2mount string) string {
	return filepath.Join(v2mount, ct.p.CgroupParent, ct.ID)
}

// CgroupDir is the pod cgroup in the cgroup v2 tree under mount.
func (p *Pod) CgroupDir(v2mount string) string { return filepath.Join(v2mount, p.CgroupParent) }
