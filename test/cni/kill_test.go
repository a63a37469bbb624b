package cnitest

import (
	"encoding/json"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// A plugin SIGKILLed inside DEL, the moment it has renamed the attachment
// away and is unpinning its links: the runtime's retried DEL succeeds and
// leaves nothing, in bpffs or on the cgroup. The kills are counted: the
// test fails unless some of them left a half-done detach behind, so it
// proves the interrupted path and not only the finished one.
func TestKillPluginDuringDel(t *testing.T) {
	e := newEnv(t)
	stdin := e.pluginStdin("1.0.0", nil, true)
	args := func(p *pod) string { return "IgnoreUnknown=1;K8S_POD_UID=" + p.uid }
	links := filepath.Join(e.bpffs, "links", datapath.InflightDir)
	const trials = 20
	killed, midOp := 0, 0
	for i := range trials {
		p := e.cgroupfsPod("besteffort", true)
		if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), args(p), stdin); err != nil {
			t.Fatalf("trial %d: ADD: %v: %s", i, err, out)
		}
		waitProgs(t, p.cgroup, perAttachment)
		id := cni.AttachmentID(netName, p.id)
		c := pluginCmd("DEL", p.id, p.netns.Path(), args(p), stdin)
		if killOnEntry(t, c, links, "_del-"+id+"-", time.Duration(i%4)*20*time.Microsecond) {
			killed++
		}
		left := e.pinsOf(p.id)
		if slices.ContainsFunc(left, func(l string) bool { return strings.HasPrefix(l, datapath.InflightDir+"/_del-") }) {
			midOp++
		}
		// The runtime retries the DEL.
		if out, err := execPlugin(t, "DEL", p.id, p.netns.Path(), args(p), stdin); err != nil || len(out) != 0 {
			t.Fatalf("trial %d (left %v): retried DEL: %v, stdout %q", i, left, err, out)
		}
		if left := e.pinsOf(p.id); len(left) > 0 {
			t.Fatalf("trial %d: retried DEL left %v", i, left)
		}
		waitProgs(t, p.cgroup, 0)
	}
	t.Logf("%d DELs SIGKILLed inside the detach: %d died of the signal, %d left a half-done detach that the retried DEL cleaned up", trials, killed, midOp)
	if midOp == 0 {
		t.Fatalf("no kill landed mid-detach (%d died of the signal): the test proved nothing about interrupted DELs", killed)
	}
	e.wantNothingLeftBut(0)
}

// A plugin SIGKILLed inside GC, while it detaches the attachments missing
// from cni.dev/valid-attachments: the retried GC finishes the job, removes
// exactly the invalid ones and keeps every valid one attached.
func TestKillPluginDuringGC(t *testing.T) {
	e := newEnv(t)
	stdin := e.pluginStdin("1.0.0", nil, true)
	args := func(p *pod) string { return "IgnoreUnknown=1;K8S_POD_UID=" + p.uid }
	links := filepath.Join(e.bpffs, "links", datapath.InflightDir)
	const trials, perTrial = 6, 12
	killed, midOp := 0, 0
	var valid []*pod
	for i := range trials {
		var pods []*pod
		for range perTrial {
			p := e.cgroupfsPod("besteffort", true)
			if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), args(p), stdin); err != nil {
				t.Fatalf("trial %d: ADD: %v: %s", i, err, out)
			}
			pods = append(pods, p)
		}
		// A few of this trial's pods stay valid, with every earlier valid
		// one; the many invalid ones make a GC long enough to be hit.
		valid = append(valid, pods[:2]...)
		gcStdin := e.gcStdin(valid)
		c := pluginCmd("GC", "", "", "", gcStdin)
		if killOnEntry(t, c, links, "_del-", time.Duration(i%3)*50*time.Microsecond) {
			killed++
		}
		if e.hasTemporaryLinks() {
			midOp++
		}
		if out, err := execPlugin(t, "GC", "", "", "", gcStdin); err != nil || len(out) != 0 {
			t.Fatalf("trial %d: retried GC: %v, stdout %q", i, err, out)
		}
		for _, p := range pods[2:] {
			if left := e.pinsOf(p.id); len(left) > 0 {
				t.Fatalf("trial %d: GC left %v of an invalid attachment", i, left)
			}
			waitProgs(t, p.cgroup, 0)
		}
		for _, p := range valid {
			e.wantAttached(p)
			waitProgs(t, p.cgroup, perAttachment)
		}
	}
	t.Logf("%d GCs SIGKILLed inside a detach: %d died of the signal, %d left a half-done detach that the retried GC cleaned up", trials, killed, midOp)
	if midOp == 0 {
		t.Fatalf("no kill landed mid-detach (%d died of the signal): the test proved nothing about interrupted GCs", killed)
	}
	e.wantNothingLeftBut(len(valid))
}

// gcStdin is a 1.1.0 network config for ctlb alone with valid as its
// cni.dev/valid-attachments, as a runtime sends for GC.
func (e *env) gcStdin(valid []*pod) []byte {
	e.t.Helper()
	var list []types.GCAttachment
	for _, p := range valid {
		list = append(list, types.GCAttachment{ContainerID: p.id, IfName: "eth0"})
	}
	var c map[string]any
	if err := json.Unmarshal(e.pluginStdin("1.1.0", nil, false), &c); err != nil {
		e.t.Fatal(err)
	}
	c["cni.dev/valid-attachments"] = list
	b, err := json.Marshal(c)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// hasTemporaryLinks reports whether an interrupted attach or detach left a
// temporary directory in the links directory.
func (e *env) hasTemporaryLinks() bool {
	links, _ := e.leftovers()
	return slices.ContainsFunc(links, func(l string) bool { return strings.HasPrefix(l, "_") })
}

// An owner that recorded its pod's namespace and name (for `ctlbd
// attachments`) is still matched by identity alone: GC with the container
// in cni.dev/valid-attachments keeps it, and CHECK finds it whatever
// CNI_ARGS the call carries.
func TestOwnerWithPodNameMatchedByIdentity(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("besteffort", true)
	stdin := e.pluginStdin("1.1.0", nil, true)
	named := "IgnoreUnknown=1;K8S_POD_UID=" + p.uid + ";K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
	if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), named, stdin); err != nil {
		t.Fatalf("ADD: %v: %s", err, out)
	}
	if out, err := execPlugin(t, "GC", "", "", "", e.gcStdin([]*pod{p})); err != nil {
		t.Fatalf("GC: %v: %s", err, out)
	}
	e.wantAttached(p)
	for _, args := range []string{named, "IgnoreUnknown=1;K8S_POD_UID=" + p.uid} {
		if out, err := execPlugin(t, "CHECK", p.id, p.netns.Path(), args, stdin); err != nil {
			t.Fatalf("CHECK with CNI_ARGS %q after GC: %v: %s", args, err, out)
		}
	}
}
