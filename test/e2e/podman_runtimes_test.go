package e2e_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/podman"
)

// A podman pod is attached at the pod cgroup (P/<podID>), never at the
// shared parent P, with runc and with crun (Debian's crun package): the
// netns scan finds the infra process in P/<podID>/libpod-<ID> and takes the
// pod. A client in the pod is redirected; `pod rm` leaves nothing.
func TestPodmanPodRuntimes(t *testing.T) {
	runtimes := []string{"runc"}
	if ok, why := crunCanRun(t); ok {
		runtimes = append(runtimes, "crun")
	} else {
		// Not a skip dressed as a pass: no crun subtest exists here, and
		// the log says why (the netns layouts crun makes are covered by
		// internal/podcgroup's TestResolveByNetnsLayouts).
		t.Logf("no crun subtest on this host: %s", why)
	}
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, true)
			pm := podman.NewWithRuntime(t, e.node, e.net, rt)
			pod := pm.CreatePod(t, "client-"+rt)
			out, code := pod.RunContainer(t, time.Minute, imgs.ClientRootfs, append([]string{images.ClientBinary}, images.ClientArgs(vip, 6, 20*time.Second)...)...)
			r, err := images.ParseClientOutput(strings.Split(strings.TrimSpace(out), "\n"))
			if err != nil {
				t.Fatal(err)
			}
			if code != 0 || len(r.Errors) != 0 || !r.Done {
				t.Fatalf("%s client: exit %d, landed %v, errors %v", rt, code, r.Landed, r.Errors)
			}
			assertRoundRobin(t, r.Landed)
			want := pod.CgroupDir(testutil.V2Mount(t))
			atts := e.daemon.Attachments()
			if len(atts) != 1 || atts[0].ID != cni.AttachmentID(e.net.Name, pod.InfraID) || atts[0].CgroupPath != want || !atts[0].Alive {
				t.Fatalf("%s: attachments = %+v, want one, alive on the pod cgroup %s", rt, atts, want)
			}
			pod.Remove(t)
			e.assertClean(t, "after podman pod rm ("+rt+")")
		})
	}
}

// A standalone `podman run` (no pod) has no pod cgroup: its parent is
// podman's shared cgroup parent, which must never get the programs. It is
// attached to the container's own cgroup (P/libpod-<ID>) and redirected;
// when it exits, DEL leaves nothing.
func TestPodmanStandaloneContainer(t *testing.T) {
	e := newEnv(t, true)
	pm := podman.New(t, e.node, e.net)
	out, code := pm.RunStandalone(t, time.Minute, imgs.ClientRootfs, append([]string{images.ClientBinary}, images.ClientArgs(vip, 6, 20*time.Second)...)...)
	r, err := images.ParseClientOutput(strings.Split(strings.TrimSpace(out), "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 || len(r.Errors) != 0 || !r.Done {
		t.Fatalf("standalone client: exit %d, landed %v, errors %v", code, r.Landed, r.Errors)
	}
	assertRoundRobin(t, r.Landed)
	t.Logf("standalone podman container redirected; %d retries before the first connection", r.Retries)
	// Where ctlbd attached it: the container's own cgroup below the
	// --cgroup-parent, never the parent itself.
	logs := e.daemon.Logs()
	parent := filepath.Join(testutil.V2Mount(t), pm.CgroupParent)
	if !strings.Contains(logs, "pending attachment completed") || !strings.Contains(logs, "cgroup="+parent+"/libpod-") {
		t.Fatalf("ctlbd did not attach the container's own cgroup below %s:\n%s", parent, logs)
	}
	e.assertClean(t, "after the standalone container exited")
}

// crunCanRun: crun (1.8.1, Debian 12) refuses hybrid hosts whose v2
// hierarchy has controllers, as these machines' (hugetlb) does: measured
// "crun: cgroups in hybrid mode not supported, drop all controllers from
// cgroupv2" at `podman pod start`. Unified hosts, or hybrid ones with an
// empty v2, run it.
func crunCanRun(t *testing.T) (bool, string) {
	t.Helper()
	mount := testutil.V2Mount(t)
	ctrls, _ := os.ReadFile(filepath.Join(mount, "cgroup.controllers"))
	hybrid := mount != "/sys/fs/cgroup"
	if hybrid && strings.TrimSpace(string(ctrls)) != "" {
		return false, "crun refuses hybrid cgroups whose v2 hierarchy has controllers (" + mount + " has: " + strings.TrimSpace(string(ctrls)) + ")"
	}
	return true, ""
}
