package cnitest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
)

// A pod found by K8S_POD_UID in the cgroupfs layout is redirected in every
// container cgroup; a pod of a chain without ctlb, on the same bridge, is
// untouched; after DEL the pod is untouched too and nothing stays pinned.
func TestAddPodUIDCgroupfs(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("besteffort", true)
	res := e.mustAdd(e.chain(nil), p)

	// The prevResult is passed through: the pod has its bridge address.
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 || !strings.HasPrefix(r.IPs[0].Address.String(), "198.18.0.") {
		t.Fatalf("ADD result %+v: want the bridge's one pod address in %s", r, podSubnet)
	}
	e.wantAttached(p)
	wantRedirected(t, p, container(t, p, "app"))
	wantRedirected(t, p, container(t, p, "envoy"))
	if err := e.check(e.chain(nil), p); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}

	// Same bridge, same QoS class, a chain without ctlb.
	plain := e.cgroupfsPod("besteffort", true)
	e.mustAdd(e.plainChain(), plain)
	if _, ok := e.attachment(plain); ok {
		t.Fatal("pod without ctlb in its chain has an attachment")
	}
	wantUntouched(t, plain, container(t, plain, "app"))

	if err := e.del(e.chain(nil), p); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	e.wantNothingLeft()
}

// The systemd driver's naming, in the burstable and guaranteed classes.
func TestAddPodUIDSystemdSlice(t *testing.T) {
	e := newEnv(t)
	for _, qos := range []string{"burstable", ""} {
		uid := newUID()
		u := strings.ReplaceAll(uid, "-", "_")
		dir := filepath.Join(e.cgroups, "kubepods.slice")
		if qos == "" {
			dir = filepath.Join(dir, "kubepods-pod"+u+".slice")
		} else {
			dir = filepath.Join(dir, "kubepods-"+qos+".slice", "kubepods-"+qos+"-pod"+u+".slice")
		}
		mkdirAll(t, dir)
		p := e.newPod(uid, dir)
		e.mustAdd(e.chain(nil), p)
		e.wantAttached(p)
		wantRedirected(t, p, container(t, p, "cri-containerd-"+p.id[:12]+".scope"))
	}
}

// The runtime's cgroupPath capability wins over the pod UID.
func TestAddCgroupPath(t *testing.T) {
	e := newEnv(t)
	decoy := e.cgroupfsPod("besteffort", true) // what the UID would find
	dir := filepath.Join(e.cgroups, "sandboxes", "pod-a")
	mkdirAll(t, dir)
	p := e.newPod(decoy.uid, dir)
	// containerd passes the path relative to the v2 mount.
	rel := strings.TrimPrefix(dir, filepath.Dir(e.cgroups))
	p.rt.CapabilityArgs = map[string]any{"cgroupPath": rel}
	e.mustAdd(e.chain(nil), p)
	e.wantAttached(p)
	wantRedirected(t, p, container(t, p, "app"))
	// The decoy, with the same UID, is not attached.
	decoy.netns = p.netns
	wantUntouched(t, decoy, decoy.cgroup)
}

// ADD before the pod cgroup exists (containerd calls ADD before runc
// create): a pending record, completed by ctlbd when the cgroup appears.
func TestAddBeforeCgroupPodUID(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("burstable", false)
	e.mustAdd(e.chain(nil), p)
	if _, ok := e.attachment(p); ok {
		t.Fatal("attached before the cgroup exists")
	}
	wantRecord(t, e, p)
	if st, err := e.status(); err != nil || st.Pending != 1 {
		t.Fatalf("ctlbd status: pending %d (%v), want 1", st.Pending, err)
	}
	list := e.pendingList()
	if len(list) != 1 || list[0].ContainerID != p.id || list[0].PodUID != p.uid || list[0].State != pending.StatePending {
		t.Fatalf("GET /v1/pending: %+v, want the pod's record, pending", list)
	}
	// Right after ADD, CHECK grants the runtime time to make the cgroup
	// (pendingGrace, 10s by default); past it, pending is an error.
	if err := e.check(e.chain(nil), p); err != nil {
		t.Fatalf("CHECK right after ADD, pending: %v", err)
	}
	time.Sleep(5 * time.Millisecond)
	wantCode(t, "CHECK while pending past pendingGrace", e.check(e.chain(map[string]any{"pendingGrace": "1ms"}), p), cni.ErrStillPending, "still pending after")

	// runc creates the pod cgroup, then the container's.
	mkdirAll(t, p.cgroup)
	took := e.waitAttached(p, 5*time.Second)
	t.Logf("pending attachment completed %s after the pod cgroup appeared", took)
	ctr := container(t, p, "app")
	wantRedirected(t, p, ctr)
	e.wantAttached(p)
	if _, err := os.Stat(filepath.Join(pending.Dir(e.stateDir), cni.AttachmentID(netName, p.id)+".json")); !os.IsNotExist(err) {
		t.Fatalf("pending record still there after completion: %v", err)
	}
	if err := e.check(e.chain(nil), p); err != nil {
		t.Fatalf("CHECK after completion: %v", err)
	}
	if err := e.del(e.chain(nil), p); err != nil {
		t.Fatal(err)
	}
	e.wantNothingLeft()
}

// wantRecord checks the pod's pending record: root-only, in a root-only dir.
func wantRecord(t *testing.T, e *env, p *pod) {
	t.Helper()
	dir := pending.Dir(e.stateDir)
	fi, err := os.Stat(filepath.Join(dir, cni.AttachmentID(netName, p.id)+".json"))
	if err != nil {
		t.Fatalf("pending record: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("pending record mode %v, want 0600", fi.Mode().Perm())
	}
	di, err := os.Stat(dir)
	if err != nil || di.Mode().Perm() != 0o700 {
		t.Fatalf("pending dir: %v %v, want mode 0700", di.Mode().Perm(), err)
	}
}

// podman passes no pod UID and no cgroupPath: the record is completed by
// finding the sandbox's process by its netns once the runtime starts it.
func TestAddBeforeCgroupNetnsOnly(t *testing.T) {
	e := newEnv(t)
	// podman's layout: P/<podID> (64 hex digits), containers in
	// P/<podID>/libpod-<ctrID>.
	podDir := filepath.Join(e.cgroups, "libpod_parent", randHex(32))
	mkdirAll(t, filepath.Dir(podDir))
	p := e.newPod("", podDir)
	e.mustAdd(e.chain(nil), p)
	if _, ok := e.attachment(p); ok {
		t.Fatal("attached before the sandbox exists")
	}
	wantRecord(t, e, p)

	// The runtime makes the pod cgroup and starts the infra process in a
	// container cgroup below it, inside the pod's netns.
	mkdirAll(t, podDir)
	infra := container(t, p, "libpod-"+randHex(32))
	startInfra(t, p.netns, infra)
	took := e.waitAttached(p, 5*time.Second)
	t.Logf("netns-only pending attachment completed %s after the infra process started", took)
	wantRedirected(t, p, container(t, p, "libpod-"+randHex(32)))
	if err := e.del(e.chain(nil), p); err != nil {
		t.Fatal(err)
	}
	e.wantNothingLeft()
}

// startInfra starts a sleeping process in netns and cgroup, as runc starts
// a pod's infra container, and kills it (by PID) when the test ends.
func startInfra(t *testing.T, netns ns.NetNS, cgroupDir string) {
	t.Helper()
	f, err := os.Open(cgroupDir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("sleep", "120")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := netns.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatalf("start infra process: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
}

// ctlb passes prevResult through unchanged, in every supported version.
func TestPrevResultPassedThrough(t *testing.T) {
	e := newEnv(t)
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		p := e.cgroupfsPod("besteffort", true)
		prev := prevResult("198.18.0.77")
		prev["cniVersion"] = v
		if v == "0.4.0" {
			prev["ips"] = []map[string]any{{"version": "4", "address": "198.18.0.77/24", "gateway": gateway, "interface": 0}}
		}
		c := e.ctlbConf(nil)
		delete(c, "capabilities")
		c["cniVersion"], c["name"], c["prevResult"] = v, "ctlbnet", prev
		out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), "K8S_POD_UID="+p.uid, []byte(mustJSON(t, c)))
		if err != nil {
			t.Fatalf("ADD %s: %v: %s", v, err, out)
		}
		res, err := version.NewResult(v, out)
		if err != nil {
			t.Fatalf("ADD %s: output %s: %v", v, out, err)
		}
		var head struct {
			CNIVersion string `json:"cniVersion"`
		}
		_ = json.Unmarshal(out, &head)
		r, err := current.NewResultFromResult(res)
		if err != nil || len(r.IPs) != 1 || r.IPs[0].Address.String() != "198.18.0.77/24" || head.CNIVersion != v {
			t.Fatalf("ADD %s: result %s, want the prevResult back in version %s (%v)", v, out, v, err)
		}
		e.wantAttached(p)
	}
}

// With ctlbd down, ADD still succeeds and leaves its record: the file is
// the source of truth, and ctlbd completes it when it starts.
func TestPendingWhileDaemonDown(t *testing.T) {
	e := newEnv(t)
	e.daemon.Stop()
	p := e.cgroupfsPod("besteffort", false)
	e.mustAdd(e.chain(nil), p)
	wantRecord(t, e, p)
	e.startDaemon()
	if st, err := e.status(); err != nil || st.Pending != 1 {
		t.Fatalf("restarted ctlbd: status %+v (%v), want the record pending", st, err)
	}
	mkdirAll(t, p.cgroup)
	e.waitAttached(p, 5*time.Second)
	wantRedirected(t, p, container(t, p, "app"))
}

// A plugin whose stateDir is not ctlbd's leaves its pending record where
// ctlbd never looks, and the pod would never be attached. ADD still
// succeeds (the record waits for a ctlbd that reads that directory), but
// the plugin warns at its default level, so that the runtime's log shows
// it, naming both directories. With ctlbd's stateDir, the same ADD says
// nothing.
func TestAddPendingStateDirMismatch(t *testing.T) {
	e := newEnv(t)
	other := filepath.Join(t.TempDir(), "otherstate")
	// add runs ctlb's ADD alone, as a runtime does: no logFile, no
	// logLevel (stderr at warn), and returns what it wrote on stderr.
	add := func(p *pod, stateDir string) string {
		t.Helper()
		c := e.ctlbConf(map[string]any{"stateDir": stateDir})
		for _, k := range []string{"logFile", "logLevel", "capabilities"} {
			delete(c, k)
		}
		c["cniVersion"], c["name"] = "1.0.0", netName
		del := []byte(mustJSON(t, c))
		c["prevResult"] = prevResult("198.18.0.9")
		stdin := []byte(mustJSON(t, c))
		run := func(cmd string, stdin []byte) (stdout, stderr []byte, err error) {
			x := exec.Command(ctlbBin)
			x.Env = append(os.Environ(), "CNI_COMMAND="+cmd, "CNI_CONTAINERID="+p.id, "CNI_NETNS="+p.netns.Path(),
				"CNI_IFNAME=eth0", "CNI_PATH="+binDir, "CNI_ARGS=K8S_POD_UID="+p.uid)
			x.Stdin = bytes.NewReader(stdin)
			var errBuf bytes.Buffer
			x.Stderr = &errBuf
			out, err := x.Output()
			return out, errBuf.Bytes(), err
		}
		t.Cleanup(func() {
			if out, stderr, err := run("DEL", del); err != nil {
				t.Errorf("ctlb DEL %s: %v: %s %s", p.id[:12], err, out, stderr)
			}
		})
		out, stderr, err := run("ADD", stdin)
		if err != nil {
			t.Fatalf("ctlb ADD %s with stateDir %s: %v: %s %s", p.id[:12], stateDir, err, out, stderr)
		}
		return string(stderr)
	}

	p := e.cgroupfsPod("burstable", false)
	stderr := add(p, other)
	if _, err := pending.Read(other, cni.AttachmentID(netName, p.id)); err != nil {
		t.Fatalf("no pending record in the plugin's stateDir %s: %v", other, err)
	}
	var warned map[string]any
	for _, line := range strings.Split(strings.TrimSpace(stderr), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && strings.HasPrefix(fmt.Sprint(m["msg"]), "ctlbd does not see the pending record") {
			warned = m
		}
	}
	if warned == nil || warned["level"] != "WARN" || warned["stateDir"] != other || warned["ctlbdStateDir"] != e.stateDir ||
		warned["attachment"] != cni.AttachmentID(netName, p.id) || !strings.Contains(fmt.Sprint(warned["msg"]), "--state-dir") {
		t.Errorf("ADD with stateDir %s, ctlbd's %s: stderr %q; want a WARN that ctlbd does not see the record, naming both directories",
			other, e.stateDir, stderr)
	}
	if list := e.pendingList(); len(list) != 0 {
		t.Errorf("ctlbd lists %+v: it should not see the record in %s", list, other)
	}

	q := e.cgroupfsPod("burstable", false)
	if stderr := add(q, e.stateDir); strings.TrimSpace(stderr) != "" {
		t.Errorf("ADD with ctlbd's stateDir wrote on stderr: %q, want nothing", stderr)
	}
	if list := e.pendingList(); len(list) != 1 || list[0].ContainerID != q.id || list[0].State != pending.StatePending {
		t.Errorf("ctlbd lists %+v, want the record of %s pending", list, q.id[:12])
	}
}

// The systemd driver's OCI form, as a runtime may pass it in cgroupPath
// (kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>), resolves to the
// pod slice: here it does not exist yet, so the pending record names
// exactly that slice. A form whose slice is not a pod's is refused with
// code 7, never left pending.
func TestAddSystemdOCIForm(t *testing.T) {
	e := newEnv(t)
	uid := newUID()
	u := strings.ReplaceAll(uid, "-", "_")
	p := e.newPod(uid, "")
	p.rt.CapabilityArgs = map[string]any{"cgroupPath": "kubepods-besteffort-pod" + u + ".slice:cri-containerd:" + p.id}
	e.mustAdd(e.chain(nil), p)
	rec, err := pending.Read(e.stateDir, cni.AttachmentID(netName, p.id))
	want := filepath.Join(testutil.V2Mount(t), "kubepods.slice", "kubepods-besteffort.slice", "kubepods-besteffort-pod"+u+".slice")
	if err != nil || rec.CgroupDir != want {
		t.Fatalf("pending record %+v (%v): want cgroupDir %s", rec, err, want)
	}
	if err := e.del(e.chain(nil), p); err != nil {
		t.Fatal(err)
	}
	e.wantNothingLeft()

	for _, bad := range []string{"kubepods-besteffort.slice:cri-containerd:" + p.id, "system.slice:docker:" + p.id} {
		q := e.newPod(uid, "")
		q.rt.CapabilityArgs = map[string]any{"cgroupPath": bad}
		_, err := e.add(e.chain(nil), q)
		wantCode(t, "ADD with cgroupPath "+bad, err, types.ErrInvalidNetworkConfig, "not a pod's")
		_ = e.del(e.chain(nil), q)
	}
	e.wantNothingLeft()
}

// Every QoS class in both drivers' layouts, found by K8S_POD_UID and, as
// containerd 1.7+ passes it, by the pod's CgroupParent in cgroupPath (the
// kubelet's expanded form for systemd): Guaranteed pods sit directly in the
// kubepods root, Burstable and BestEffort in their class's cgroup.
func TestAddQoSClasses(t *testing.T) {
	e := newEnv(t)
	for _, driver := range []string{"cgroupfs", "systemd"} {
		for _, qos := range []string{"guaranteed", "burstable", "besteffort"} {
			for _, via := range []string{"podUID", "cgroupPath"} {
				uid := newUID()
				u := strings.ReplaceAll(uid, "-", "_")
				var dir string
				switch {
				case driver == "cgroupfs" && qos == "guaranteed":
					dir = filepath.Join(e.cgroups, "kubepods", "pod"+uid)
				case driver == "cgroupfs":
					dir = filepath.Join(e.cgroups, "kubepods", qos, "pod"+uid)
				case qos == "guaranteed":
					dir = filepath.Join(e.cgroups, "kubepods.slice", "kubepods-pod"+u+".slice")
				default:
					dir = filepath.Join(e.cgroups, "kubepods.slice", "kubepods-"+qos+".slice", "kubepods-"+qos+"-pod"+u+".slice")
				}
				mkdirAll(t, dir)
				p := e.newPod(uid, dir)
				if via == "cgroupPath" {
					p.rt.CapabilityArgs = map[string]any{"cgroupPath": strings.TrimPrefix(dir, testutil.V2Mount(t))}
				}
				e.mustAdd(e.chain(nil), p)
				e.wantAttached(p)
				wantRedirected(t, p, container(t, p, "app"))
				if err := e.del(e.chain(nil), p); err != nil {
					t.Fatalf("%s %s via %s: DEL: %v", driver, qos, via, err)
				}
			}
		}
	}
	e.wantNothingLeft()
}
