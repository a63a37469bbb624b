package e2e_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/images"
)

// containerScope is the annotation of the NRI tests' pods: ctlb on the
// sidecars only.
var containerScope = map[string]string{"ctlb.io/containers": "envoy-sidecar,consul-dataplane"}

// startNRIEnv builds a node whose ctlbd runs its NRI plugin on the socket
// of the containerd 2.x it then starts, and waits until the plugin is
// registered.
func startNRIEnv(t *testing.T) (*env, *containerd.Containerd) {
	t.Helper()
	rel := containerd.V2(t)
	// A short path of its own: ctlbd must know it before containerd runs.
	dir, err := os.MkdirTemp("", "ctlb-nri-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nri.sock")
	e := newEnvWith(t, envOptions{ctlb: true, daemonArgs: []string{"--nri-socket", sock}})
	c := containerd.Start(t, containerd.Options{Node: e.node, Network: e.net, SandboxImage: images.PauseRef, Release: rel, NRISocket: sock})
	c.Import(t, imgs.PauseTar)
	c.Import(t, imgs.ClientTar)
	waitNRIRegistered(t, e, 1)
	return e, c
}

// waitNRIRegistered waits until ctlbd logged its n-th NRI registration and
// reports itself connected.
func waitNRIRegistered(t *testing.T, e *env, n int) {
	t.Helper()
	testutil.Eventually(t, fmt.Sprintf("ctlbd's NRI plugin registered %d times", n), 20*time.Second, func() (bool, string) {
		st := e.daemon.Status()
		got := strings.Count(e.daemon.Logs(), "NRI: registered")
		return got >= n && st.NRI == api.NRIConnected, fmt.Sprintf("registered %d times, status nri %q (socket %q)", got, st.NRI, st.NRISocket)
	})
}

var sinceCreate = regexp.MustCompile(`msg="NRI: attached container".* container=(\S+) .*cgroup=(\S+) sinceCreate=(\S+)`)

// nriAttaches are ctlbd's "NRI: attached container" log lines: container
// name, cgroup and the time from CreateContainer to the attachment.
func nriAttaches(e *env) [][]string {
	var out [][]string
	for _, line := range strings.Split(e.daemon.Logs(), "\n") {
		if m := sinceCreate.FindStringSubmatch(line); m != nil {
			out = append(out, m[1:])
		}
	}
	return out
}

// checkNRIAttached finds ctlbd's log line of ct's attachment, on ct's own
// cgroup, and returns the CreateContainer-to-attached time it logged.
func checkNRIAttached(t *testing.T, e *env, ct *containerd.Container) time.Duration {
	t.Helper()
	want := ct.CgroupDir(testutil.V2Mount(t))
	for _, a := range nriAttaches(e) {
		if a[0] == ct.Name && a[1] == want {
			d, err := time.ParseDuration(a[2])
			if err != nil {
				t.Fatalf("sinceCreate %q: %v", a[2], err)
			}
			return d
		}
	}
	t.Errorf("ctlbd logged no NRI attachment of container %s on %s: %v", ct.Name, want, nriAttaches(e))
	return 0
}

// TestContainerdNRIContainerScope: ctlbd's NRI plugin with containerd 2.x.
// A pod annotated ctlb.io/containers: envoy-sidecar,consul-dataplane gets
// no pod-level attachment (the CNI plugin logs it NRI-scoped); the named
// container's connects to the VIP land on the servers round-robin, while
// another container of the same pod cannot reach the VIP at all. A
// restarted sidecar (a new container of the same name) is attached again.
// containerd restarts: the plugin reconnects, and a container started after
// that is attached too. Removing the pod leaves nothing.
func TestContainerdNRIContainerScope(t *testing.T) {
	e, c := startNRIEnv(t)
	pod := c.RunPod(t, containerd.PodSpec{Name: "mesh", Annotations: containerScope})
	if lines := pluginLines(t, e, pod.ID, "NRI-scoped: ctlbd's NRI plugin attaches the named containers; no pod-level attachment"); len(lines) != 1 {
		b, _ := os.ReadFile(e.pluginLog)
		t.Fatalf("the plugin did not leave pod %s to NRI; its log:\n%s", pod.Name, b)
	}
	if atts := e.daemon.Attachments(); len(atts) != 0 {
		t.Fatalf("an NRI-scoped pod has attachments before any container: %+v", atts)
	}

	r, code, sidecar := runClientAttempt(t, pod, "envoy-sidecar", 0, vip, 6, 20*time.Second)
	if code != 0 || len(r.Errors) != 0 || !r.Done {
		t.Fatalf("envoy-sidecar: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	assertRoundRobin(t, r.Landed)
	if r.Retries != 0 {
		t.Errorf("envoy-sidecar's first connect needed %d retries: it was not attached before it ran", r.Retries)
	}
	took := checkNRIAttached(t, e, sidecar)
	t.Logf("NRI CreateContainer to attached: %v", took)

	r, code = runClient(t, pod, "app", vip, 1, 2*time.Second)
	if code == 0 || len(r.PerServer) != 0 || len(r.Errors) == 0 {
		t.Fatalf("app (not named): exit %d, landed %v: its connect to the VIP must not be redirected", code, r.Landed)
	}
	t.Logf("app, not named in %s, is not redirected: %s", "ctlb.io/containers", r.Errors[0])

	// A restart: kubelet creates the container again with the next attempt.
	r, code, again := runClientAttempt(t, pod, "envoy-sidecar", 1, vip, 3, 20*time.Second)
	if code != 0 || len(r.Errors) != 0 || len(r.Landed) != 3 {
		t.Fatalf("restarted envoy-sidecar: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	if again.ID == sidecar.ID {
		t.Fatalf("the restart reused container ID %s", again.ID)
	}
	checkNRIAttached(t, e, again)

	// containerd restarts under the running pod; the plugin reconnects.
	c.Restart(t)
	waitNRIRegistered(t, e, 2)
	r, code, dp := runClientAttempt(t, pod, "consul-dataplane", 0, vip, 3, 20*time.Second)
	if code != 0 || len(r.Errors) != 0 || len(r.Landed) != 3 || r.Retries != 0 {
		t.Fatalf("consul-dataplane after the containerd restart: exit %d, landed %v, retries %d, errors %v", code, r.Landed, r.Retries, r.Errors)
	}
	for _, s := range r.Landed {
		if !isServer(s) {
			t.Errorf("consul-dataplane: a connection landed on %q", s)
		}
	}
	checkNRIAttached(t, e, dp)

	pod.Remove(t)
	waitNoAttachments(t, e)
	e.assertClean(t, "after removing the NRI-scoped pod")
}

// waitNoAttachments waits until ctlbd lists no attachment: NRI's
// RemoveContainer events arrive while RemovePodSandbox runs.
func waitNoAttachments(t *testing.T, e *env) {
	t.Helper()
	testutil.Eventually(t, "no attachment left", 10*time.Second, func() (bool, string) {
		atts := e.daemon.Attachments()
		return len(atts) == 0, fmt.Sprintf("attachments %+v", atts)
	})
}

// TestContainerdNRIFallback: the same annotated pod with a ctlbd that runs
// no NRI plugin. The CNI plugin cannot leave the pod to NRI: it attaches at
// pod scope, as for any pod, and its log says so; every container of the
// pod is redirected.
func TestContainerdNRIFallback(t *testing.T) {
	rel := containerd.V2(t)
	e := newEnv(t, true)
	c := e.startContainerd(t, rel)
	pod := c.RunPod(t, containerd.PodSpec{Name: "mesh-fallback", Annotations: containerScope})
	checkAttached(t, e, pod)
	if lines := pluginLines(t, e, pod.ID, "pod asks for container scope, but ctlbd's NRI plugin is not connected: falling back to pod scope (every container of the pod)"); len(lines) != 1 {
		b, _ := os.ReadFile(e.pluginLog)
		t.Errorf("the plugin did not log the fallback for pod %s; its log:\n%s", pod.Name, b)
	}
	r, code := runClient(t, pod, "app", vip, 3, 20*time.Second)
	if code != 0 || len(r.Errors) != 0 || !r.Done {
		t.Fatalf("app at pod scope: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	assertRoundRobin(t, r.Landed)
	pod.Remove(t)
	e.assertClean(t, "after RemovePodSandbox")
}

// TestContainerdNRIDaemonRestart: a named container starts while ctlbd is
// down, so nothing attaches it and its connects to the VIP fail. ctlbd
// comes back: its NRI plugin registers, the runtime's Synchronize lists the
// running containers, and the plugin attaches the named one; the
// container's next connects land on the servers.
func TestContainerdNRIDaemonRestart(t *testing.T) {
	e, c := startNRIEnv(t)
	pod := c.RunPod(t, containerd.PodSpec{Name: "mesh-restart", Annotations: containerScope})
	e.daemon.Stop()
	ct := pod.RunContainer(t, containerd.ContainerSpec{Name: "envoy-sidecar", Image: images.ClientRef, Args: images.ClientArgs(vip, 3, 30*time.Second)})
	started := time.Now()
	time.Sleep(300 * time.Millisecond) // a few failed attempts first
	e.daemon.Start()
	waitNRIRegistered(t, e, 2)
	code, err := ct.Wait(60 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := ct.Stdout()
	if err != nil {
		t.Fatal(err)
	}
	r, err := images.ParseClientOutput(lines)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 || len(r.Errors) != 0 || len(r.Landed) != 3 {
		t.Fatalf("envoy-sidecar after ctlbd came back: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	for _, s := range r.Landed {
		if !isServer(s) {
			t.Errorf("a connection landed on %q", s)
		}
	}
	if r.Retries == 0 {
		t.Errorf("the first connect succeeded at once although ctlbd was down when the container started")
	}
	if !strings.Contains(e.daemon.Logs(), "at=synchronize") {
		t.Errorf("ctlbd did not log an attachment at synchronize:\n%s", e.daemon.LogTail(4000))
	}
	t.Logf("container started with ctlbd down: redirected %v after its start, after %d failed attempts", r.First.Sub(started).Round(time.Millisecond), r.Retries)
	pod.Remove(t)
	waitNoAttachments(t, e)
	e.assertClean(t, "after removing the pod")
}
