package cnitest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
)

// CHECK verifies for real and says what is wrong.
func TestCheck(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, p)
	if err := e.check(list, p); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	id := cni.AttachmentID(netName, p.id)
	links := filepath.Join(e.bpffs, "links", id)

	// One link pin removed by hand: that hook is detached.
	if err := os.Remove(filepath.Join(links, "connect4")); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "CHECK without the connect4 pin", e.check(list, p), cni.ErrAttachmentIncomplete, "connect4 missing")
	// Every pin removed.
	if err := os.RemoveAll(links); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "CHECK without any pin", e.check(list, p), cni.ErrNotAttached, "no attachment "+id)

	// ADD again makes it whole: ADD is idempotent.
	e.addCtlbOnly(p)
	if err := e.check(list, p); err != nil {
		t.Fatalf("CHECK after the second ADD: %v", err)
	}

	// The runtime now names another cgroup than the one attached.
	other := filepath.Join(e.cgroups, "elsewhere")
	mkdirAll(t, other)
	moved := *p.rt
	moved.CapabilityArgs = map[string]any{"cgroupPath": strings.TrimPrefix(other, filepath.Dir(e.cgroups))}
	pm := *p
	pm.rt = &moved
	wantCode(t, "CHECK against another cgroup", e.check(list, &pm), cni.ErrWrongCgroup, "not on the pod cgroup "+other)

	// ctlbd down.
	e.daemon.Stop()
	wantCode(t, "CHECK with ctlbd down", e.check(list, p), types.ErrTryAgainLater, "ctlbd is unreachable")
	e.startDaemon()
	if err := e.check(list, p); err != nil {
		t.Fatalf("CHECK with ctlbd back: %v", err)
	}

	// The pod cgroup dies under the attachment.
	testutil.RemoveCgroup(t, p.cgroup)
	wantCode(t, "CHECK on a dead cgroup", e.check(list, p), cni.ErrCgroupDead, "dead cgroup")
}

// DEL succeeds when there is nothing to delete, however it came to be.
func TestDel(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)

	// Twice.
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, p)
	for i := range 2 {
		if err := e.del(list, p); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	e.wantNothingLeft()

	// Without ADD, and with an empty CNI_NETNS (the sandbox is gone).
	q := e.cgroupfsPod("besteffort", true)
	if err := e.del(list, q); err != nil {
		t.Fatalf("DEL without ADD: %v", err)
	}
	q.rt.NetNS = ""
	if err := e.del(list, q); err != nil {
		t.Fatalf("DEL without ADD and without netns: %v", err)
	}

	// After the cgroup (and the netns) are gone.
	r := e.cgroupfsPod("burstable", true)
	e.mustAdd(list, r)
	testutil.RemoveCgroup(t, r.cgroup)
	r.rt.NetNS = ""
	if err := e.del(list, r); err != nil {
		t.Fatalf("DEL after the cgroup is gone: %v", err)
	}

	// A pending one, with ctlbd down: the record goes too.
	s := e.cgroupfsPod("besteffort", false)
	e.mustAdd(list, s)
	e.daemon.Stop()
	if err := e.del(list, s); err != nil {
		t.Fatalf("DEL of a pending attachment with ctlbd down: %v", err)
	}
	e.wantNothingLeft()
}

// GC keeps exactly the valid attachments (matched by container ID), drops
// the others and their pending records, drops attachments whose cgroup
// died, and leaves attachments it did not make alone.
func TestGC(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)
	var pods []*pod
	for range 4 {
		p := e.cgroupfsPod("besteffort", true)
		e.mustAdd(list, p)
		pods = append(pods, p)
	}
	waiting := e.cgroupfsPod("besteffort", false) // pending, not valid
	e.mustAdd(list, waiting)
	kept := e.cgroupfsPod("besteffort", false) // pending, valid
	e.mustAdd(list, kept)
	// An attachment made with the CLI (ctlbd attach), not by CNI.
	cli := filepath.Join(e.cgroups, "cli")
	mkdirAll(t, cli)
	if _, err := e.dp.Attach("cgroup-test", cli); err != nil {
		t.Fatal(err)
	}
	// A valid pod whose cgroup died without DEL.
	testutil.RemoveCgroup(t, pods[3].cgroup)

	valid := []types.GCAttachment{{ContainerID: pods[0].id, IfName: "eth0"}, {ContainerID: pods[2].id, IfName: "eth0"},
		{ContainerID: pods[3].id, IfName: "eth0"}, {ContainerID: kept.id, IfName: "eth0"}}
	// GC needs CNI 1.1.0, which Debian's bridge does not speak: ctlb alone
	// in a 1.1.0 list, with a cache of its own so that libcni itself issues
	// no DEL and everything below is the plugin's GC.
	gcList := e.netList("1.1.0", e.ctlbConf(nil))
	gcCNI := libcni.NewCNIConfigWithCacheDir([]string{binDir}, t.TempDir(), nil)
	if err := gcCNI.GCNetworkList(context.Background(), gcList, &libcni.GCArgs{ValidAttachments: valid}); err != nil {
		t.Fatalf("GC: %v", err)
	}

	links, records := e.leftovers()
	want := []string{cni.AttachmentID(netName, pods[0].id), cni.AttachmentID(netName, pods[2].id), "cgroup-test"}
	if fmt.Sprint(sorted(links)) != fmt.Sprint(sorted(want)) {
		t.Fatalf("after GC: attachments %v, want exactly %v", links, want)
	}
	if len(records) != 1 || records[0] != cni.AttachmentID(netName, kept.id)+".json" {
		t.Fatalf("after GC: pending records %v, want only the one of %s", records, kept.id)
	}

	// Without a list GC only removes dead ones.
	testutil.RemoveCgroup(t, pods[2].cgroup)
	if err := gcCNI.GCNetworkList(context.Background(), gcList, nil); err != nil {
		t.Fatalf("GC without a list: %v", err)
	}
	links, records = e.leftovers()
	want = []string{cni.AttachmentID(netName, pods[0].id), "cgroup-test"}
	if fmt.Sprint(sorted(links)) != fmt.Sprint(sorted(want)) || len(records) != 1 {
		t.Fatalf("after GC without a list: attachments %v records %v, want %v and 1 record", links, records, want)
	}
}

func sorted(ss []string) []string {
	out := slices.Clone(ss)
	slices.Sort(out)
	return out
}

// STATUS fails only when ADD would: pins missing or of another layout.
// ctlbd down or restarting is no failure (ADD works from the pins), which
// matters because containerd 2.x turns a STATUS failure into
// NetworkReady=false for the whole node. And indeed ADD works then.
func TestStatus(t *testing.T) {
	e := newEnv(t)
	list := e.netList("1.1.0", e.ctlbConf(nil))
	status := func() error { return e.cni.GetStatusNetworkList(context.Background(), list) }
	if err := status(); err != nil {
		t.Fatalf("STATUS: %v", err)
	}
	e.daemon.Stop()
	if err := status(); err != nil {
		t.Fatalf("STATUS with ctlbd down: %v, want ready", err)
	}
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(e.chain(nil), p)
	e.wantAttached(p)
	wantRedirected(t, p, container(t, p, "app"))
	e.startDaemon()
	if err := status(); err != nil {
		t.Fatalf("STATUS with ctlbd back: %v", err)
	}
	noPins := e.netList("1.1.0", e.ctlbConf(map[string]any{"bpffs": filepath.Join(filepath.Dir(e.bpffs), "elsewhere")}))
	wantCode(t, "STATUS without pins", e.cni.GetStatusNetworkList(context.Background(), noPins), types.ErrPluginNotAvailable, "not ready: pinned objects")
	// Pins of a layout this plugin does not speak: ADD would refuse them.
	other := filepath.Join(filepath.Dir(e.bpffs), "otherlayout")
	mkdirAll(t, other)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(other, "ctlb_services_v99")); err != nil {
		t.Fatal(err)
	}
	layout := e.netList("1.1.0", e.ctlbConf(map[string]any{"bpffs": other}))
	wantCode(t, "STATUS with pins of another layout", e.cni.GetStatusNetworkList(context.Background(), layout), types.ErrPluginNotAvailable, "another layout")
	// A config ADD would refuse fails STATUS as well.
	typo := e.netList("1.1.0", e.ctlbConf(map[string]any{"sokcet": e.socket}))
	wantCode(t, "STATUS with an unknown key", e.cni.GetStatusNetworkList(context.Background(), typo), types.ErrUnsupportedField, `"sokcet"`)
}

// Kubelet runs many ADD and DEL at once for different pods: all succeed and
// leave nothing behind, on the attach path and the pending path alike.
func TestParallelAddDel(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)
	const n = 50
	pods := make([]*pod, n)
	for i := range pods {
		pods[i] = e.cgroupfsPod("besteffort", i%2 == 0) // odd ones pending
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	start := time.Now()
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.add(list, p); err != nil {
				errs <- fmt.Errorf("ADD pod %d: %w", i, err)
				return
			}
			// In between, the pod is attached or pending.
			_, attErr := e.dp.Attachment(cni.AttachmentID(netName, p.id))
			_, recErr := pending.Read(e.stateDir, cni.AttachmentID(netName, p.id))
			if (attErr == nil) == (recErr == nil) {
				errs <- fmt.Errorf("pod %d after ADD: attachment %v, pending record %v: want exactly one", i, attErr, recErr)
			}
			if err := e.del(list, p); err != nil {
				errs <- fmt.Errorf("DEL pod %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d parallel ADD+DEL pairs through bridge+host-local+ctlb took %s", n, time.Since(start).Round(time.Millisecond))
	e.wantNothingLeft()
	// The pending ones' cgroups appearing now attaches nothing.
	for _, p := range []*pod{pods[1], pods[3]} {
		mkdirAll(t, p.cgroup)
	}
	time.Sleep(200 * time.Millisecond)
	e.wantNothingLeft()
	if st, err := e.status(); err != nil || st.Pending != 0 || st.Attachments != 0 {
		t.Fatalf("ctlbd status %+v (%v): want no attachment and no pending record", st, err)
	}
}

// DEL is best effort: whatever is wrong with the config beyond "type", or
// with its surroundings (ctlbd down, pins gone), it exits 0, prints
// nothing, and removes what it can.
func TestDelBestEffort(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)
	del := func(what string, p *pod, edit func(map[string]any)) {
		t.Helper()
		var c map[string]any
		if err := json.Unmarshal(e.pluginStdin("1.0.0", nil, true), &c); err != nil {
			t.Fatal(err)
		}
		edit(c)
		out, err := execPlugin(t, "DEL", p.id, p.netns.Path(), "K8S_POD_UID="+p.uid, []byte(mustJSON(t, c)))
		if err != nil || len(out) != 0 {
			t.Fatalf("DEL %s: exit %v, stdout %q; want exit 0 and nothing on stdout", what, err, out)
		}
	}

	// Everything wrong at once, ctlbd down: the attachment still goes.
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, p)
	e.daemon.Stop()
	del("with an unopenable logFile, an undecodable prevResult, unknown keys, bad values and ctlbd down", p, func(c map[string]any) {
		c["logFile"] = filepath.Join(t.TempDir(), "no-such-dir", "ctlb.log")
		c["prevResult"] = "not a result"
		c["futureKey"] = map[string]any{"x": 1}
		c["logLevel"] = "loud"
		c["scope"] = "cluster"
		c["pendingGrace"] = "soon"
	})
	if _, ok := e.attachment(p); ok {
		t.Fatal("attachment left after DEL")
	}
	e.wantNothingLeft()
	e.startDaemon()

	// No prevResult, a bpffs that is not a path, a socket of the wrong type.
	q := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, q)
	del("without prevResult and with a relative bpffs", q, func(c map[string]any) {
		delete(c, "prevResult")
		c["bpffs"] = "sys/fs/bpf"
		c["socket"] = 7
	})
	// That DEL could not know where the pins are: a proper one removes them.
	del("proper", q, func(map[string]any) {})
	e.wantNothingLeft()

	// Pins gone under an attached pod, and the whole bpffs directory gone.
	r := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, r)
	if err := os.RemoveAll(filepath.Join(e.bpffs, "links", cni.AttachmentID(netName, r.id))); err != nil {
		t.Fatal(err)
	}
	del("with its link pins gone", r, func(map[string]any) {})
	s := e.cgroupfsPod("besteffort", false)
	e.mustAdd(list, s)
	del("with the bpffs directory gone", s, func(c map[string]any) { c["bpffs"] = filepath.Join(t.TempDir(), "gone") })
	del("twice", s, func(map[string]any) {})
	e.wantNothingLeft()
}

// Pods attached by a plugin older than per-network attachments
// ("cni-<containerID>", a pending record keyed by container ID) are torn
// down by the new plugin's DEL too.
func TestDelAfterUpgrade(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("besteffort", true)
	if _, err := e.dp.Attach("cni-"+p.id, p.cgroup); err != nil {
		t.Fatal(err)
	}
	waiting := e.cgroupfsPod("besteffort", false)
	// The older plugin named its records by container ID.
	legacy := mustJSON(t, pending.Record{ContainerID: waiting.id, AttachmentID: "cni-" + waiting.id, BPFFS: e.bpffs, CgroupDir: waiting.cgroup, Created: time.Now()})
	if err := pending.EnsureDir(e.stateDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pending.Dir(e.stateDir), waiting.id+".json"), []byte(legacy), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := pending.Read(e.stateDir, waiting.id); err != nil {
		t.Fatalf("a record of the older plugin does not read: %v", err)
	}
	for _, q := range []*pod{p, waiting} {
		if err := e.del(e.chain(nil), q); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	}
	waitProgs(t, p.cgroup, 0)
	e.wantNothingLeft()
}
