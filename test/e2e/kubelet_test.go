package e2e_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	cri "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/containerd"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/kubelet"
)

// staticRun is one static pod's run as the test saw it.
type staticRun struct {
	pod *kubelet.Pod
	sb  *cri.PodSandbox
	run images.ClientRun
	// ready is when the test saw the pod's sandbox ready.
	ready time.Time
}

// runStatic writes a static pod whose client dials the VIP count times and
// then lingers (so the pod stays Running), and waits for its output.
func runStatic(k *kubelet.Kubelet, t testing.TB, name, qos string, count int) (staticRun, error) {
	p := k.AddPod(t, kubelet.StaticPod{Name: name, QoS: qos, Image: images.ClientRef,
		Args: images.LingeringClientArgs(vip, count, 30*time.Second, 5*time.Minute)})
	sb, err := p.Sandbox(60 * time.Second)
	if err != nil {
		return staticRun{pod: p}, err
	}
	ready := time.Now()
	deadline := time.Now().Add(60 * time.Second)
	var r images.ClientRun
	for {
		lines, err := containerd.ReadCRILog(p.LogPath(sb))
		if err == nil {
			if r, err = images.ParseClientOutput(lines); err == nil && r.Done {
				return staticRun{pod: p, sb: sb, run: r, ready: ready}, nil
			}
		}
		if time.Now().After(deadline) {
			return staticRun{pod: p, sb: sb}, fmt.Errorf("static pod %s: client not done after 60s (log %s: %v, landed %v)", name, p.LogPath(sb), err, r.Landed)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkStaticAttached finds the pod's attachment: the plugin names it after
// the sandbox and it sits on the pod cgroup kubelet made for the pod's QoS
// class, which the plugin found by runtimeConfig.cgroupPath.
func checkStaticAttached(t *testing.T, e *env, s staticRun) {
	t.Helper()
	want := testutil.V2Mount(t) + s.pod.CgroupParent(s.sb)
	for _, a := range e.daemon.Attachments() {
		if a.ID == cni.AttachmentID(e.net.Name, s.sb.Id) {
			if a.CgroupPath != want || !a.Alive {
				t.Errorf("static pod %s: attachment %+v, want alive on %s", s.pod.Name, a, want)
			}
			lines := pluginLines(t, e, s.sb.Id, "attached")
			if len(lines) != 1 || lines[0]["via"] != "cgroupPath" {
				t.Errorf("static pod %s: the plugin's attach log %v, want one resolved via cgroupPath", s.pod.Name, lines)
			}
			return
		}
	}
	t.Errorf("static pod %s: no attachment %s in %+v", s.pod.Name, cni.AttachmentID(e.net.Name, s.sb.Id), e.daemon.Attachments())
}

// waitDetached waits until the pods' sandboxes are gone and ctlbd lists no
// attachment of theirs.
func waitDetached(t *testing.T, e *env, runs ...staticRun) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		left := 0
		ids := map[string]bool{}
		for _, s := range runs {
			if !s.pod.Gone() {
				left++
			}
			if s.sb != nil {
				ids[cni.AttachmentID(e.net.Name, s.sb.Id)] = true
			}
		}
		var atts []string
		for _, a := range e.daemon.Attachments() {
			if ids[a.ID] {
				atts = append(atts, a.ID)
			}
		}
		if left == 0 && len(atts) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("60s after the manifests were deleted: %d pods still ready, attachments %v", left, atts)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestKubeletStaticPods: a real kubelet (v1.37, standalone: static pods, no
// API server) drives containerd 2.x in a node with no uplink, with bridge,
// host-local, loopback and ctlb chained. kubelet creates each pod cgroup
// and calls RunPodSandbox itself. A BestEffort and a Burstable pod whose
// container dials the VIP land on the real servers round-robin from their
// first connect; deleting a manifest detaches (CNI DEL) and leaves nothing;
// ten static pods at once all do the same. The host is left as it was
// (sysctls, /var/lib/kubelet, cgroups: see package kubelet).
func TestKubeletStaticPods(t *testing.T) {
	requirePlugin(t)
	rel := containerd.V2(t)
	bin := kubelet.Binary(t)
	e := newEnv(t, true)
	k := kubelet.Start(t, kubelet.Options{Node: e.node, Network: e.net, Release: rel, Kubelet: bin,
		SandboxImage: images.PauseRef, Images: []string{imgs.PauseTar, imgs.ClientTar}})

	for _, qos := range []string{kubelet.BestEffort, kubelet.Burstable} {
		t.Run(qos, func(t *testing.T) {
			s, err := runStatic(k, t, "client-"+map[string]string{kubelet.BestEffort: "be", kubelet.Burstable: "bu"}[qos], qos, 6)
			if err != nil {
				t.Fatal(err)
			}
			if len(s.run.Errors) != 0 {
				t.Fatalf("client: landed %v, errors %v", s.run.Landed, s.run.Errors)
			}
			assertRoundRobin(t, s.run.Landed)
			if s.run.Retries != 0 {
				t.Errorf("the first connect needed %d retries: %v", s.run.Retries, s.run.Failures)
			}
			checkStaticAttached(t, e, s)
			t.Logf("%s: manifest written -> sandbox ready %v -> first redirected connect %v (pod cgroup %s, landed %v)", qos,
				s.ready.Sub(s.pod.Written).Round(time.Millisecond), s.run.First.Sub(s.pod.Written).Round(time.Millisecond), s.pod.CgroupParent(s.sb), s.run.Landed)
			deleted := time.Now()
			s.pod.Delete(t)
			waitDetached(t, e, s)
			t.Logf("%s: manifest deleted to detached: %v", qos, time.Since(deleted).Round(time.Millisecond))
			e.assertClean(t, "after the manifest was deleted")
		})
	}

	t.Run("TenAtOnce", func(t *testing.T) {
		const pods = 10
		runs := make([]staticRun, pods)
		errs := make([]error, pods)
		var wg sync.WaitGroup
		for i := range pods {
			wg.Add(1)
			go func() {
				defer wg.Done()
				qos := kubelet.BestEffort
				if i%2 == 1 {
					qos = kubelet.Burstable
				}
				runs[i], errs[i] = runStatic(k, t, fmt.Sprintf("many-%d", i), qos, 3)
			}()
		}
		wg.Wait()
		var delays []time.Duration
		for i, s := range runs {
			if errs[i] != nil {
				t.Errorf("pod %d: %v", i, errs[i])
				continue
			}
			if len(s.run.Errors) != 0 || len(s.run.Landed) != 3 || s.run.Retries != 0 {
				t.Errorf("pod %d: landed %v, retries %d, errors %v", i, s.run.Landed, s.run.Retries, s.run.Errors)
			}
			for _, srv := range s.run.Landed {
				if !isServer(srv) {
					t.Errorf("pod %d: a connection landed on %q", i, srv)
				}
			}
			checkStaticAttached(t, e, s)
			delays = append(delays, s.run.First.Sub(s.pod.Written).Round(time.Millisecond))
		}
		if len(delays) > 0 {
			slices.Sort(delays)
			t.Logf("%d static pods at once: manifest to first redirected connect: min %v, median %v, max %v", pods, delays[0], delays[len(delays)/2], delays[len(delays)-1])
		}
		for _, s := range runs {
			s.pod.Delete(t)
		}
		waitDetached(t, e, runs...)
		e.assertClean(t, "after deleting ten manifests")
	})
}
