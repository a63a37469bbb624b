package kubelet

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	cri "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// QoS classes of a static pod: what its one container's resources make it.
const (
	BestEffort = "BestEffort" // no requests, no limits
	Burstable  = "Burstable"  // requests below limits
)

// StaticPod is a pod kubelet runs from a manifest file, one container
// ("client") that runs once (restartPolicy Never): give it arguments that
// keep it running (vipclient -linger), or the pod ends with it.
type StaticPod struct {
	Name  string
	Image string
	Args  []string
	QoS   string // BestEffort when empty
}

// Pod is a static pod whose manifest was written.
type Pod struct {
	k *Kubelet
	// Name is the manifest's; FullName kubelet's (Name-NodeName).
	Name, FullName, Manifest string
	QoS                      string
	// Written is when the manifest appeared in the static pod directory.
	Written time.Time
}

// container is the static pods' one container.
const container = "client"

// AddPod writes a static pod's manifest into the manifest directory: a
// hidden temporary file renamed into place, so kubelet (which ignores
// hidden files) reads it whole.
func (k *Kubelet) AddPod(t testing.TB, sp StaticPod) *Pod {
	t.Helper()
	if sp.QoS == "" {
		sp.QoS = BestEffort
	}
	c := map[string]any{"name": container, "image": sp.Image, "imagePullPolicy": "Never", "args": sp.Args}
	if sp.QoS == Burstable {
		c["resources"] = map[string]any{
			"requests": map[string]string{"cpu": "10m", "memory": "16Mi"},
			"limits":   map[string]string{"memory": "64Mi"},
		}
	}
	manifest := map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": sp.Name, "namespace": "default", "labels": map[string]string{"app": "ctlb-e2e"}},
		"spec": map[string]any{
			"restartPolicy": "Never", "dnsPolicy": "Default", "terminationGracePeriodSeconds": 1,
			"containers": []any{c},
		},
	}
	raw, err := json.MarshalIndent(manifest, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := &Pod{k: k, Name: sp.Name, FullName: sp.Name + "-" + k.NodeName, Manifest: filepath.Join(k.Manifests, sp.Name+".json"), QoS: sp.QoS}
	tmp := filepath.Join(k.Manifests, "."+sp.Name+".tmp")
	if err := os.WriteFile(tmp, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	p.Written = time.Now()
	if err := os.Rename(tmp, p.Manifest); err != nil {
		t.Fatal(err)
	}
	return p
}

// Delete removes the pod's manifest: kubelet stops and removes the pod.
func (p *Pod) Delete(t testing.TB) {
	t.Helper()
	if err := os.Remove(p.Manifest); err != nil {
		t.Fatal(err)
	}
}

// Sandbox waits, at most limit, for the pod's sandbox to be ready.
func (p *Pod) Sandbox(limit time.Duration) (*cri.PodSandbox, error) {
	deadline := time.Now().Add(limit)
	for {
		for _, s := range p.k.readyPods() {
			if s.GetMetadata().GetName() == p.FullName {
				return s, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("static pod %s: no ready sandbox %s after %s", p.Name, p.FullName, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Gone reports whether containerd lists no ready sandbox of the pod.
func (p *Pod) Gone() bool {
	for _, s := range p.k.readyPods() {
		if s.GetMetadata().GetName() == p.FullName {
			return false
		}
	}
	return true
}

// LogPath is the log file kubelet keeps of the pod's container's first
// run (podLogsDir/NAMESPACE_NAME_UID/CONTAINER/0.log).
func (p *Pod) LogPath(sb *cri.PodSandbox) string {
	md := sb.GetMetadata()
	return filepath.Join(p.k.PodLogs, md.GetNamespace()+"_"+md.GetName()+"_"+md.GetUid(), container, "0.log")
}

// CgroupParent is the pod cgroup kubelet makes (cgroupfs driver) below the
// node's cgroup root, relative to a hierarchy's root.
func (p *Pod) CgroupParent(sb *cri.PodSandbox) string {
	qos := "besteffort"
	if p.QoS == Burstable {
		qos = "burstable"
	}
	return filepath.Join("/"+p.k.Tag, "kubepods", qos, "pod"+sb.GetMetadata().GetUid())
}
