package e2e_test

import (
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/podman"
)

// TestPodmanPodRedirected runs the same chain through podman's CNI
// backend. podman passes no pod UID and calls CNI before the infra
// container's process exists, so the plugin can only find the pod by its
// network namespace, once a process appears in it: ctlbd completes the
// pending attachment. A container run in the pod from a plain root
// filesystem is redirected round-robin; `podman pod rm` leaves nothing.
func TestPodmanPodRedirected(t *testing.T) {
	e := newEnv(t, true)
	pm := podman.New(t, e.node, e.net)
	started := time.Now()
	pod := pm.CreatePod(t, "client")

	out, code := pod.RunContainer(t, time.Minute, imgs.ClientRootfs, append([]string{images.ClientBinary}, images.ClientArgs(vip, 6, 20*time.Second)...)...)
	r, err := images.ParseClientOutput(strings.Split(strings.TrimSpace(out), "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 || len(r.Errors) != 0 || !r.Done {
		t.Fatalf("client: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	assertRoundRobin(t, r.Landed)
	t.Logf("podman: pod create+start to first redirected connection: %v (%d retries before it)", r.First.Sub(started).Round(time.Millisecond), r.Retries)

	atts := e.daemon.Attachments()
	want := pod.CgroupDir(testutil.V2Mount(t))
	if len(atts) != 1 || atts[0].ID != cni.AttachmentID(e.net.Name, pod.InfraID) || atts[0].CgroupPath != want || !atts[0].Alive {
		t.Errorf("attachments = %+v, want one, %s, alive on %s", atts, cni.AttachmentID(e.net.Name, pod.InfraID), want)
	}
	if st := e.daemon.Status(); st.Pending != 0 {
		t.Errorf("%d attachments still pending after the client ran", st.Pending)
	}

	pod.Remove(t)
	e.assertClean(t, "after podman pod rm")
}
