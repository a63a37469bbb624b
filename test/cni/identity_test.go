package cnitest

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// runAs runs the ctlb binary for one (network, container, interface), as a
// runtime reaches it in a chain. extra edits the config.
func (e *env) runAs(cmd, network, ifName string, p *pod, extra map[string]any) error {
	e.t.Helper()
	var c map[string]any
	if err := json.Unmarshal(e.pluginStdin("1.1.0", extra, cmd == "ADD" || cmd == "CHECK"), &c); err != nil {
		e.t.Fatal(err)
	}
	c["name"] = network
	stdin, _ := json.Marshal(c)
	x := exec.Command(ctlbBin)
	x.Env = append(os.Environ(), "CNI_COMMAND="+cmd, "CNI_CONTAINERID="+p.id, "CNI_NETNS="+p.netns.Path(),
		"CNI_IFNAME="+ifName, "CNI_PATH="+binDir, "CNI_ARGS=IgnoreUnknown=1;K8S_POD_UID="+p.uid)
	x.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	x.Stderr = &stderr
	out, err := x.Output()
	if err != nil {
		var te types.Error
		if json.Unmarshal(out, &te) == nil && te.Code != 0 {
			return &te
		}
		e.t.Fatalf("ctlb %s %s/%s: %v: %s %s", cmd, network, ifName, err, out, stderr.String())
	}
	if cmd == "DEL" && len(out) != 0 {
		e.t.Fatalf("ctlb DEL printed %q", out)
	}
	return nil
}

func (e *env) attachedIn(network string, p *pod) bool {
	e.t.Helper()
	q := *p
	q.net = network
	_, ok := e.attachment(&q)
	return ok
}

// An attachment belongs to (network, container, interface). Two networks
// on one bpffs each have their own and never touch the other's, by DEL or
// by GC; a second interface of a container in one network shares that
// network's attachment, and only the last DEL detaches.
func TestAttachmentIdentity(t *testing.T) {
	e := newEnv(t)
	const netA, netB = "ctlbnet", "othernet"
	p := e.cgroupfsPod("besteffort", true)
	t.Cleanup(func() {
		for _, n := range []string{netA, netB} {
			for _, ifn := range []string{"eth0", "eth1"} {
				_ = e.runAs("DEL", n, ifn, p, nil)
			}
		}
	})
	for _, step := range []struct{ net, ifName string }{{netA, "eth0"}, {netB, "eth0"}, {netA, "eth1"}} {
		if err := e.runAs("ADD", step.net, step.ifName, p, nil); err != nil {
			t.Fatalf("ADD %s/%s: %v", step.net, step.ifName, err)
		}
	}
	links, _ := e.leftovers()
	want := []string{cni.AttachmentID(netA, p.id), cni.AttachmentID(netB, p.id)}
	if !slices.Equal(sorted(links), sorted(want)) {
		t.Fatalf("attachments %v, want one per network: %v", links, want)
	}
	for _, step := range []struct{ net, ifName string }{{netA, "eth0"}, {netB, "eth0"}, {netA, "eth1"}} {
		if err := e.runAs("CHECK", step.net, step.ifName, p, nil); err != nil {
			t.Fatalf("CHECK %s/%s: %v", step.net, step.ifName, err)
		}
	}
	// An interface that was never added fails CHECK.
	wantCode(t, "CHECK of an interface never added", e.runAs("CHECK", netB, "eth1", p, nil), cni.ErrNotAttached, "holds no attachment")

	// The first of two interfaces leaves: the attachment stays.
	if err := e.runAs("DEL", netA, "eth0", p, nil); err != nil {
		t.Fatal(err)
	}
	if !e.attachedIn(netA, p) {
		t.Fatal("DEL of eth0 detached the attachment eth1 still holds")
	}
	e.wantRedirectedFromNode(container(t, p, "app"))
	// The last one: detached; the other network's stays.
	if err := e.runAs("DEL", netA, "eth1", p, nil); err != nil {
		t.Fatal(err)
	}
	if e.attachedIn(netA, p) || !e.attachedIn(netB, p) {
		t.Fatalf("after the last DEL in %s: attached in %s %v, in %s %v; want only %s", netA, netA, e.attachedIn(netA, p), netB, e.attachedIn(netB, p), netB)
	}
	e.wantRedirectedFromNode(container(t, p, "app"))

	// GC of one network touches none of the other's attachments or records.
	q := e.cgroupfsPod("besteffort", false) // pending in netB
	if err := e.runAs("ADD", netB, "eth0", q, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.runAs("ADD", netA, "eth0", q, nil); err != nil {
		t.Fatal(err)
	}
	gc := func(network string, valid []*pod) {
		t.Helper()
		list := []types.GCAttachment{}
		for _, v := range valid {
			list = append(list, types.GCAttachment{ContainerID: v.id, IfName: "eth0"})
		}
		if err := e.runAs("GC", network, "", p, map[string]any{"cni.dev/valid-attachments": list}); err != nil {
			t.Fatalf("GC %s: %v", network, err)
		}
	}
	gc(netA, nil)
	if !e.attachedIn(netB, p) {
		t.Fatalf("GC of %s detached %s's attachment", netA, netB)
	}
	if _, err := pending.Read(e.stateDir, cni.AttachmentID(netB, q.id)); err != nil {
		t.Fatalf("GC of %s removed %s's pending record: %v", netA, netB, err)
	}
	if _, err := pending.Read(e.stateDir, cni.AttachmentID(netA, q.id)); err == nil {
		t.Fatalf("GC of %s kept its own pending record of a container not in the list", netA)
	}
	// netB's GC keeps p, drops q.
	gc(netB, []*pod{p})
	if !e.attachedIn(netB, p) {
		t.Fatal("GC detached a valid attachment")
	}
	if _, err := pending.Read(e.stateDir, cni.AttachmentID(netB, q.id)); err == nil {
		t.Fatal("GC kept a pending record not in the list")
	}
	if err := e.runAs("DEL", netB, "eth0", p, nil); err != nil {
		t.Fatal(err)
	}
	mkdirAll(t, q.cgroup) // a cgroup appearing now attaches nothing
	e.wantNothingLeft()
	if owners, _ := os.ReadDir(filepath.Join(e.stateDir, "attachments")); len(owners) != 0 {
		t.Fatalf("owner records left: %v", owners)
	}
}

// A static cgroupPath in the config attaches once for the whole network:
// every pod shares that attachment (one set of programs on the cgroup, not
// one per pod: the kernel allows 64 per hook), and the last DEL detaches.
func TestStaticCgroupPathShared(t *testing.T) {
	e := newEnv(t)
	shared := filepath.Join(e.cgroups, "shared")
	mkdirAll(t, shared)
	rel := strings.TrimPrefix(shared, testutil.V2Mount(t))
	extra := map[string]any{"cgroupPath": rel}
	var pods []*pod
	for range 3 {
		p := e.cgroupfsPod("besteffort", false)
		if err := e.runAs("ADD", netName, "eth0", p, extra); err != nil {
			t.Fatalf("ADD: %v", err)
		}
		pods = append(pods, p)
	}
	links, _ := e.leftovers()
	if len(links) != 1 {
		t.Fatalf("attachments %v, want one shared by the network's pods", links)
	}
	waitProgs(t, shared, perAttachment)
	for _, p := range pods {
		if err := e.runAs("CHECK", netName, "eth0", p, extra); err != nil {
			t.Fatalf("CHECK: %v", err)
		}
	}
	e.wantRedirectedFromNode(shared)
	for i, p := range pods {
		if err := e.runAs("DEL", netName, "eth0", p, extra); err != nil {
			t.Fatal(err)
		}
		if links, _ := e.leftovers(); (len(links) == 1) != (i < len(pods)-1) {
			t.Fatalf("after DEL %d of %d: attachments %v", i+1, len(pods), links)
		}
	}
	waitProgs(t, shared, 0)
	e.wantNothingLeft()
}

// A static cgroupPath that does not exist yet leaves one pending record for
// the network's shared attachment. GC with a valid-attachments list naming
// its pods must keep that record (the attachment's owners are valid), and
// remove it once no pod of the list holds it.
func TestStaticCgroupPathPendingSurvivesGC(t *testing.T) {
	e := newEnv(t)
	shared := filepath.Join(e.cgroups, "shared-later")
	rel := strings.TrimPrefix(shared, testutil.V2Mount(t))
	extra := map[string]any{"cgroupPath": rel}
	var pods []*pod
	for range 2 {
		p := e.cgroupfsPod("besteffort", false)
		if err := e.runAs("ADD", netName, "eth0", p, extra); err != nil {
			t.Fatalf("ADD: %v", err)
		}
		pods = append(pods, p)
	}
	if _, records := e.leftovers(); len(records) != 1 {
		t.Fatalf("pending records %v, want one for the shared attachment", records)
	}
	gc := func(valid []*pod) {
		t.Helper()
		list := []types.GCAttachment{}
		for _, v := range valid {
			list = append(list, types.GCAttachment{ContainerID: v.id, IfName: "eth0"})
		}
		if err := e.runAs("GC", netName, "", pods[0], map[string]any{"cni.dev/valid-attachments": list}); err != nil {
			t.Fatalf("GC: %v", err)
		}
	}
	gc(pods)
	if _, records := e.leftovers(); len(records) != 1 {
		t.Fatalf("GC with both pods valid: pending records %v, want the shared one kept", records)
	}
	gc(pods[1:])
	if _, records := e.leftovers(); len(records) != 1 {
		t.Fatalf("GC with one pod valid: pending records %v, want the shared one kept", records)
	}
	gc(nil)
	e.wantNothingLeft()
}

// The temporaries of a shared attachment (static cgroupPath) may belong to
// another pod's ADD in flight: an ADD must not take them for what an
// interrupted ADD of its own left.
func TestStaticCgroupPathAddLeavesOthersTemporaries(t *testing.T) {
	e := newEnv(t)
	shared := filepath.Join(e.cgroups, "shared-busy")
	mkdirAll(t, shared)
	rel := strings.TrimPrefix(shared, testutil.V2Mount(t))
	extra := map[string]any{"cgroupPath": rel}
	first := e.cgroupfsPod("besteffort", false)
	if err := e.runAs("ADD", netName, "eth0", first, extra); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	links, _ := e.leftovers()
	if len(links) != 1 {
		t.Fatalf("attachments %v, want one", links)
	}
	// What a concurrent ADD of this attachment has made so far.
	busy := filepath.Join(e.bpffs, "links", datapath.InflightDir, "_tmp-"+links[0]+"-0123456789ab")
	mkdirAll(t, busy)
	second := e.cgroupfsPod("besteffort", false)
	if err := e.runAs("ADD", netName, "eth0", second, extra); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if _, err := os.Stat(busy); err != nil {
		t.Fatalf("an ADD removed another ADD's temporary directory of the shared attachment: %v", err)
	}
	if err := os.Remove(busy); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*pod{first, second} {
		if err := e.runAs("DEL", netName, "eth0", p, extra); err != nil {
			t.Fatal(err)
		}
	}
	waitProgs(t, shared, 0)
	e.wantNothingLeft()
}

// A container's first interface leaves a pending record (no cgroup yet);
// its second interface finds the cgroup, takes the record, and fails to
// attach. The record is the first interface's, whose ADD succeeded: it is
// given back, and ctlbd completes the attachment once attaching works.
func TestFailedAttachGivesPendingRecordBack(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("besteffort", false)
	t.Cleanup(func() {
		for _, ifn := range []string{"eth0", "eth1"} {
			_ = e.runAs("DEL", netName, ifn, p, nil)
		}
	})
	if err := e.runAs("ADD", netName, "eth0", p, nil); err != nil {
		t.Fatalf("ADD eth0: %v", err)
	}
	if _, records := e.leftovers(); len(records) != 1 {
		t.Fatalf("pending records %v, want eth0's", records)
	}
	// Every attach fails while the in-flight directory is no directory:
	// a map pinned in its place (bpffs holds no plain files).
	inflight := filepath.Join(e.bpffs, "links", datapath.InflightDir)
	if err := os.Remove(inflight); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(inflight); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(inflight) }) // before the DELs above
	mkdirAll(t, p.cgroup)
	if err := e.runAs("ADD", netName, "eth1", p, nil); err == nil {
		t.Fatal("ADD eth1 succeeded although no attach can")
	}
	// (leftovers would list the in-flight directory, which is none now.)
	if records, err := os.ReadDir(pending.Dir(e.stateDir)); err != nil || len(records) != 1 {
		t.Fatalf("after eth1's failed ADD: pending records %v (%v), want eth0's given back", records, err)
	}
	if err := os.Remove(inflight); err != nil {
		t.Fatal(err)
	}
	took := e.waitAttached(p, 10*time.Second)
	t.Logf("ctlbd completed the given-back record %s after attaching works again", took.Round(time.Millisecond))
	if err := e.runAs("CHECK", netName, "eth0", p, nil); err != nil {
		t.Fatalf("CHECK eth0: %v", err)
	}
}
