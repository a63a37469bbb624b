package cnitest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Fault tests: each runs under a bounded load (a connect loop from an
// attached pod that is not the one being hurt) and logs how many connections
// were tried, failed and misrouted, the figures of the closing note.

// loadPod attaches a pod through the full chain and starts a bounded connect
// loop to the VIP in its app container.
func (e *env) loadPod() (*pod, *testutil.Client) {
	e.t.Helper()
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(e.chain(nil), p)
	e.wantAttached(p)
	return p, testutil.StartClient(e.t, p.netns, container(e.t, p, "app"),
		testutil.ClientSpec{Mode: "storm", Target: vip, Workers: 1, Count: 500000, Duration: 90 * time.Second})
}

// finishLoad stops the connect loop, logs its counts and fails on any failed
// or misrouted connection.
func finishLoad(t *testing.T, what string, c *testutil.Client) {
	t.Helper()
	r := c.Finish(t)
	bad := 0
	for s, n := range r.PerServer {
		if !isServer(s) {
			bad += n
		}
	}
	t.Logf("load during %s: %d connects tried, %d failed, %d misrouted", what, r.Total, r.Failed, bad)
	if r.Total == 0 || r.Failed != 0 || bad != 0 {
		t.Errorf("load during %s: %d tried, %d failed (%v), %d misrouted (%v)", what, r.Total, r.Failed, r.Errors, bad, r.PerServer)
	}
}

// pluginCmd is the plugin as a runtime execs it, not started.
func pluginCmd(cmd, containerID, netns, cniArgs string, stdin []byte) *exec.Cmd {
	c := exec.Command(ctlbBin)
	c.Env = append(os.Environ(),
		"CNI_COMMAND="+cmd, "CNI_CONTAINERID="+containerID, "CNI_NETNS="+netns,
		"CNI_IFNAME=eth0", "CNI_PATH="+binDir, "CNI_ARGS="+cniArgs)
	c.Stdin = bytes.NewReader(stdin)
	return c
}

// perAttachment is how many programs one attachment puts on its cgroup.
var perAttachment = len(datapath.AttachTypes())

// waitProgs waits, bounded, until want programs are attached directly to
// the cgroup on ctlb's hooks.
func waitProgs(t *testing.T, dir string, want int) {
	t.Helper()
	testutil.WaitCgroupPrograms(t, dir, datapath.AttachTypes(), want)
}

// pinsOf lists what of a container is in the links directory (its
// attachment and any temporary directory) and in the pending directory
// (its record and any temporary file).
func (e *env) pinsOf(containerID string) []string {
	e.t.Helper()
	id := cni.AttachmentID(netName, containerID)
	var out []string
	for _, d := range []struct{ dir, name, tmp string }{
		{filepath.Join(e.bpffs, "links"), id, "-" + id + "-"},
		{filepath.Join(e.bpffs, "links", datapath.InflightDir), "", "-" + id + "-"},
		{pending.Dir(e.stateDir), id + ".json", "-" + id + "-"},
	} {
		ents, err := os.ReadDir(d.dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			e.t.Fatal(err)
		}
		for _, ent := range ents {
			if ent.Name() == d.name || strings.Contains(ent.Name(), d.tmp) {
				out = append(out, filepath.Join(filepath.Base(d.dir), ent.Name()))
			}
		}
	}
	return out
}

// A plugin SIGKILLed at a random point of ADD, on the attach path (pod
// cgroup there) and the pending path (cgroup made after ADD): the runtime's
// retried ADD succeeds and the pod is redirected; DEL succeeds and leaves
// nothing of the container, neither in bpffs, nor in the state directory,
// nor on the cgroup in the kernel.
func TestKillPluginDuringAdd(t *testing.T) {
	e := newEnv(t)
	stdin := e.pluginStdin("1.0.0", nil, true)
	args := func(p *pod) string { return "IgnoreUnknown=1;K8S_POD_UID=" + p.uid }

	// A normal ADD's run, exec to exit, sets the range of the kill points.
	var took []time.Duration
	for range 7 {
		p := e.cgroupfsPod("besteffort", true)
		start := time.Now()
		if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), args(p), stdin); err != nil {
			t.Fatalf("ADD: %v: %s", err, out)
		}
		took = append(took, time.Since(start))
		if out, err := execPlugin(t, "DEL", p.id, p.netns.Path(), args(p), stdin); err != nil {
			t.Fatalf("DEL: %v: %s", err, out)
		}
	}
	slices.Sort(took)
	span := 2 * took[len(took)/2]
	t.Logf("a normal ADD runs %s (median of %d); kills fall in [0, %s)", took[len(took)/2].Round(10*time.Microsecond), len(took), span.Round(10*time.Microsecond))

	_, load := e.loadPod()
	// Kills at a random time of the run, on the attach path and (every
	// third) the pending path; then kills inside the attach itself, timed
	// by the plugin's creation of its temporary link directory, a window
	// too narrow for random times to hit often.
	const random, inAttach = 60, 20
	states := map[string]int{}
	killed, midOp := 0, 0
	for i := range random + inAttach {
		pendingPath := i < random && i%3 == 2
		p := e.cgroupfsPod("besteffort", !pendingPath)
		c := pluginCmd("ADD", p.id, p.netns.Path(), args(p), stdin)
		var diedOfKill bool
		if i < random {
			diedOfKill = killAfter(t, c, time.Duration(rand.Int64N(int64(span))))
		} else {
			diedOfKill = e.killInAttach(t, c, cni.AttachmentID(netName, p.id))
		}
		if diedOfKill {
			killed++
		}
		left := e.pinsOf(p.id)
		state := "nothing"
		switch {
		case slices.Contains(left, "links/"+cni.AttachmentID(netName, p.id)):
			state = "attached"
		case slices.Contains(left, "pending/"+cni.AttachmentID(netName, p.id)+".json"):
			state = "pending record"
		}
		for _, l := range left {
			if strings.Contains(l, "/_") || strings.Contains(l, "/.") {
				state += " + temporary " + filepath.Dir(l)
				midOp++
				break
			}
		}
		states[state]++

		// The runtime retries the ADD.
		if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), args(p), stdin); err != nil {
			t.Fatalf("trial %d (after the kill: %s %v): retried ADD: %v: %s", i, state, left, err, out)
		}
		if pendingPath {
			mkdirAll(t, p.cgroup)
			e.waitAttached(p, 5*time.Second)
		}
		e.wantAttached(p)
		waitProgs(t, p.cgroup, perAttachment) // one per hook: nothing of the killed ADD stays attached beside them
		if i%5 == 0 || state != "nothing" {
			e.wantRedirectedFromNode(container(t, p, "app"))
		}
		if out, err := execPlugin(t, "DEL", p.id, p.netns.Path(), args(p), stdin); err != nil {
			t.Fatalf("trial %d: DEL: %v: %s", i, err, out)
		}
		if left := e.pinsOf(p.id); len(left) > 0 {
			t.Fatalf("trial %d (after the kill: %s): DEL left %v", i, state, left)
		}
		waitProgs(t, p.cgroup, 0)
	}
	t.Logf("%d ADDs SIGKILLed, %d at random times, %d inside the attach (%d died of the signal, the rest had finished; %d mid-operation, leaving a temporary directory or a half-written record); state each left: %v",
		random+inAttach, random, inAttach, killed, midOp, states)
	if midOp == 0 {
		t.Fatalf("no kill landed mid-operation (states %v): the test proved nothing about interrupted ADDs", states)
	}
	e.wantNothingLeftBut(1)
	if st, err := e.status(); err != nil || st.Pending != 0 || st.Attachments != 1 {
		t.Fatalf("ctlbd status %+v (%v): want only the load pod's attachment and no pending record", st, err)
	}
	finishLoad(t, fmt.Sprintf("%d killed ADDs", random+inAttach), load)
}

// killAfter starts the plugin, SIGKILLs it after d and reports whether it
// died of the signal rather than having finished first.
func killAfter(t *testing.T, c *exec.Cmd, d time.Duration) bool {
	t.Helper()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(d)
	_ = c.Process.Kill() // by PID (pidfd); a no-op once the process is reaped
	return diedOfSignal(c.Wait())
}

func diedOfSignal(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signaled()
}

// killInAttach starts the plugin and SIGKILLs it the moment it creates the
// temporary directory of attachment id, plus up to 100µs, so that it dies
// with 0 to 3 of its links pinned there.
func (e *env) killInAttach(t *testing.T, c *exec.Cmd, id string) bool {
	t.Helper()
	return killOnEntry(t, c, filepath.Join(e.bpffs, "links", datapath.InflightDir), "_tmp-"+id+"-", 100*time.Microsecond)
}

// killOnEntry starts the plugin and SIGKILLs it the moment an entry whose
// name starts with prefix is created in (or renamed into) dir (inotify),
// plus a random spin of up to jitter, and reports whether it died of the
// signal rather than having finished first.
func killOnEntry(t *testing.T, c *exec.Cmd, dir, prefix string, jitter time.Duration) bool {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatalf("inotify: %v", err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		t.Fatalf("inotify watch: %v", err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			t.Logf("the plugin finished before it was killed: %v", err)
			return false
		default:
		}
		// Wait in poll(2), not in sleeps: the window to hit is tens of µs.
		if _, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 10); err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatalf("poll inotify: %v", err)
		}
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			t.Fatalf("inotify read: %v", err)
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if strings.HasPrefix(name, prefix) {
				if jitter > 0 {
					for spin := time.Now().Add(time.Duration(rand.Int64N(int64(jitter)))); time.Now().Before(spin); {
					}
				}
				_ = c.Process.Kill()
				return diedOfSignal(<-exited)
			}
		}
	}
	_ = c.Process.Kill()
	<-exited
	t.Fatalf("the plugin made no %s* entry in %s within 5s", prefix, dir)
	return false
}

// wantRedirectedFromNode checks that connections to the VIP from a process
// in cgroupDir land on the servers. The client runs in the node's netns: the
// pods that only ctlb's ADD saw have no interface, and the hook follows the
// cgroup, not the netns.
func (e *env) wantRedirectedFromNode(cgroupDir string) {
	e.t.Helper()
	r := testutil.RunClient(e.t, e.node, cgroupDir, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	for _, s := range r.Landed {
		if !isServer(s) || r.Failed != 0 {
			e.t.Fatalf("from %s: landed %v, failed %d (%v): want every connection on a server", cgroupDir, r.Landed, r.Failed, r.Errors)
		}
	}
}

// wantNothingLeftBut fails unless exactly n attachments (those the test
// keeps) and nothing else are in the links directory, and no pending record
// or temporary file is in the state directory.
func (e *env) wantNothingLeftBut(n int) {
	e.t.Helper()
	links, records := e.leftovers()
	if len(links) != n || len(records) != 0 {
		e.t.Fatalf("left over: links %v (want %d attachments), pending %v", links, n, records)
	}
	for _, l := range links {
		if strings.HasPrefix(l, "_") {
			e.t.Fatalf("temporary link directory %s left over", l)
		}
	}
}

// setServers writes the VIP's server set through ctlbd's API. Connections
// to servers that leave are kept: this churn tests the CNI path, and the
// load's in-flight connects must not be ended (test/ctlbd proves the ending).
func (e *env) setServers(ctx context.Context, set []string) error {
	_, err := api.NewClient(e.socket).SetService(ctx, api.ServiceRequest{VIP: vip, Servers: set, OnServerRemoved: "keep"})
	return err
}

// 200 pods ADDed and DELeted 24 at a time, as kubelet does, a third on the
// pending path, while the VIP's server set is rewritten through ctlbd's API
// every 10 ms (or, when a write takes longer, as soon as it returns): every
// call succeeds and the end state is exact.
func TestManyPodsWhileServersChange(t *testing.T) {
	e := newEnv(t)
	stdin := e.pluginStdin("1.0.0", nil, true)
	netns := e.newPod("", "").netns.Path() // one sandbox netns serves as every CNI_NETNS
	_, load := e.loadPod()

	sets := [][]string{servers, servers[:1], servers[1:], {servers[2], servers[0]}, servers[1:2], servers[:2]}
	stop := make(chan struct{})
	var last atomic.Value
	var writes, writeErrs atomic.Int64
	var writeTime atomic.Int64
	churned := make(chan struct{})
	go func() {
		defer close(churned)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < 3000; i++ { // bounded: 30 s at most
			set := sets[i%len(sets)]
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			start := time.Now()
			err := e.setServers(ctx, set)
			cancel()
			writeTime.Add(int64(time.Since(start)))
			writes.Add(1)
			if err != nil {
				writeErrs.Add(1)
				t.Errorf("service set %v: %v", set, err)
			} else {
				last.Store(set)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	stopChurn := sync.OnceFunc(func() { close(stop); <-churned })
	t.Cleanup(stopChurn)

	const n, parallel = 200, 24
	var adds, dels, failed atomic.Int64
	errs := make(chan error, 3*n)
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			kind := i % 3 // 0: cgroup first; 1: cgroup after ADD; 2: DEL before the cgroup ever appears
			p := &pod{id: randHex(32), uid: newUID()}
			p.cgroup = filepath.Join(e.cgroups, "kubepods", "besteffort", "pod"+p.uid)
			if kind == 0 {
				if err := os.Mkdir(p.cgroup, 0o755); err != nil {
					errs <- err
					return
				}
			}
			run := func(cmd string, cnt *atomic.Int64) bool {
				cnt.Add(1)
				c := pluginCmd(cmd, p.id, netns, "IgnoreUnknown=1;K8S_POD_UID="+p.uid, stdin)
				var stderr bytes.Buffer
				c.Stderr = &stderr
				if out, err := c.Output(); err != nil {
					failed.Add(1)
					errs <- fmt.Errorf("pod %d (kind %d): %s: %v: %s %s", i, kind, cmd, err, out, stderr.Bytes())
					return false
				}
				return true
			}
			if !run("ADD", &adds) {
				return
			}
			if kind == 1 {
				if err := os.Mkdir(p.cgroup, 0o755); err != nil {
					errs <- err
					return
				}
			}
			if kind != 2 {
				if _, seen, ok := testutil.Poll(10*time.Second, func() (bool, string) {
					a, err := e.dp.Attachment(cni.AttachmentID(netName, p.id))
					return err == nil && a.Alive && len(a.Missing) == 0, fmt.Sprintf("attachment %+v, %v", a, err)
				}); !ok {
					errs <- fmt.Errorf("pod %d (kind %d): not attached within 10s; last seen: %s", i, kind, seen)
				}
			}
			run("DEL", &dels)
			if kind == 2 {
				// The pod's cgroup appears only now: nothing may attach.
				if err := os.Mkdir(p.cgroup, 0o755); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	stopChurn()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d pods ADD+DEL, %d at a time, in %s: %d ADDs, %d DELs, %d failed; %d server-set writes (%d failed, %s each on average) meanwhile",
		n, parallel, took.Round(time.Millisecond), adds.Load(), dels.Load(), failed.Load(), writes.Load(), writeErrs.Load(),
		(time.Duration(writeTime.Load()) / time.Duration(max(writes.Load(), 1))).Round(time.Millisecond))
	if writes.Load() < 10 {
		t.Errorf("only %d server-set writes happened during the run", writes.Load())
	}

	// Exact end state: only the load pod attached, nothing pending, and the
	// VIP's set is the last one written, in ctlbd and in the pinned map.
	time.Sleep(100 * time.Millisecond) // a late cgroup event would act now
	e.wantNothingLeftBut(1)
	if st, err := e.status(); err != nil || st.Pending != 0 || st.Attachments != 1 {
		t.Fatalf("ctlbd status %+v (%v): want only the load pod's attachment and no pending record", st, err)
	}
	want, _ := last.Load().([]string)
	listed, err := api.NewClient(e.socket).Services(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(listed) != 1 || fmt.Sprint(addrs(listed[0].Servers)) != fmt.Sprint(want) {
		t.Fatalf("services after the churn %+v, want %s -> %v", listed, vip, want)
	}
	pinned, ok, err := e.dp.Service(listed[0].VIP)
	if err != nil || !ok || fmt.Sprint(addrs(pinned.Servers)) != fmt.Sprint(want) {
		t.Fatalf("pinned set %+v (%v, %v), want %v", pinned, ok, err, want)
	}
	finishLoad(t, "200 pods and server-set churn", load)
}

func addrs[T fmt.Stringer](in []T) []string {
	var out []string
	for _, a := range in {
		out = append(out, a.String())
	}
	return out
}

// restartDaemon replaces the env's ctlbd with one that reconciles every
// interval, on the same bpffs, socket and state directory.
func (e *env) restartDaemon(every time.Duration) *ctlbdtest.Daemon {
	e.t.Helper()
	e.daemon.Stop()
	e.startDaemonEvery(every)
	return e.daemon
}

// objectPins are the map and program pins ctlbd keeps in its bpffs.
func (e *env) objectPins() []string {
	e.t.Helper()
	ents, err := os.ReadDir(e.bpffs)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, ent := range ents {
		if !ent.IsDir() {
			out = append(out, ent.Name())
		}
	}
	return out
}

// Pins removed by hand under a running ctlbd: CHECK says which pin is
// missing (while the pod's connections keep being balanced: the data path
// holds its objects, not their names); ctlbd's reconciler puts them back and
// CHECK passes again; with a short reconcile interval that happens unasked.
func TestPinsRemovedUnderDaemon(t *testing.T) {
	e := newEnv(t) // its ctlbd reconciles hourly: nothing repairs behind the test's back
	list := e.chain(nil)
	p := e.cgroupfsPod("besteffort", true)
	e.mustAdd(list, p)
	_, load := e.loadPod()
	pins := e.objectPins()
	if len(pins) < 8 {
		t.Fatalf("pinned objects %v: want ctlb's maps and programs", pins)
	}

	// One map pin.
	services := filepath.Join(e.bpffs, "ctlb_services_v2")
	if err := os.Remove(services); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "CHECK without the services map pin", e.check(list, p), cni.ErrNotPinned, "pins are missing from its bpffs "+e.bpffs)
	err := e.check(list, p)
	var ce *types.Error
	if !errors.As(err, &ce) || !strings.Contains(ce.Details, services) {
		t.Fatalf("CHECK error %v: want its details to name the missing pin %s", err, services)
	}
	// A network pointed at another bpffs than ctlbd's is told apart.
	elsewhere := e.chain(map[string]any{"bpffs": filepath.Join(filepath.Dir(e.bpffs), "elsewhere")})
	wantCode(t, "CHECK with another bpffs than ctlbd's", e.check(elsewhere, p), cni.ErrNotPinned, "ctlbd on "+e.socket+" pins in "+e.bpffs)
	// A new pod cannot be attached meanwhile: ADD says try again later.
	q := e.cgroupfsPod("besteffort", true)
	_, err = e.add(list, q)
	wantCode(t, "ADD without the services map pin", err, types.ErrTryAgainLater, "not pinned")
	t.Cleanup(func() { _ = e.del(list, q) })
	if err := e.del(list, q); err != nil { // as kubelet does after a failed ADD
		t.Fatalf("DEL after the failed ADD: %v", err)
	}

	// One pass of ctlbd's reconciler, the one its loop runs.
	r := e.daemon.Daemon().Reconcile()
	if !slices.Contains(r.Repinned, "ctlb_services_v2") {
		t.Fatalf("reconcile: %+v, want ctlb_services_v2 re-pinned", r)
	}
	if err := e.check(list, p); err != nil {
		t.Fatalf("CHECK after the re-pin: %v", err)
	}
	if _, err := e.add(list, q); err != nil {
		t.Fatalf("ADD after the re-pin: %v", err)
	}

	// Now every map and program pin, and the pod's connect4 link pin, with
	// ctlbd repairing every 200 ms by itself.
	logs := e.restartDaemon(200 * time.Millisecond)
	for _, name := range pins {
		if err := os.Remove(filepath.Join(e.bpffs, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(filepath.Join(e.bpffs, "links", cni.AttachmentID(netName, p.id), "connect4")); err != nil {
		t.Fatal(err)
	}
	removed := time.Now()
	failures := map[uint]int{}
	var lastErr error
	testutil.Eventually(t, "CHECK passing again after the pins went", 10*time.Second, func() (bool, string) {
		err := e.check(list, p)
		if err != nil {
			code, _ := cniCode(t, err)
			failures[code]++
			lastErr = err
		}
		return err == nil, fmt.Sprintf("last CHECK: %v; failures by code %v", lastErr, failures)
	})
	t.Logf("all %d object pins and a link pin removed: CHECK passes again %s later (CHECKs failed meanwhile, by code: %v; last: %v)",
		len(pins), time.Since(removed).Round(time.Millisecond), failures, lastErr)
	if got := e.objectPins(); fmt.Sprint(got) != fmt.Sprint(pins) {
		t.Fatalf("pins after the repair %v, want %v", got, pins)
	}
	if logs := logs.Logs(); !strings.Contains(logs, "pinned them again") || !strings.Contains(logs, "re-attached") {
		t.Fatalf("ctlbd did not report the repair loudly:\n%s", logs)
	}
	e.wantAttached(p)
	waitProgs(t, p.cgroup, perAttachment) // one per hook: the repair left no duplicate
	wantRedirected(t, p, container(t, p, "app"))
	finishLoad(t, "pin removal and repair", load)
}

// gcList is ctlb alone in a 1.1.0 list (Debian's bridge does not speak GC),
// with a libcni cache of its own so that every removal is the plugin's GC.
func (e *env) gc(valid []*pod) error {
	list := e.netList("1.1.0", e.ctlbConf(nil))
	c := libcni.NewCNIConfigWithCacheDir([]string{binDir}, e.t.TempDir(), nil)
	if valid == nil {
		return c.GCNetworkList(context.Background(), list, nil)
	}
	args := &libcni.GCArgs{}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.id, IfName: "eth0"})
	}
	return c.GCNetworkList(context.Background(), list, args)
}

// namedPod is a pod named web-0 whose runtime passes its cgroup by the
// cgroupPath capability, as containerd does: a pod of the same name made
// later gets the same cgroup path and a new sandbox ID.
func (e *env) namedPod(dir string) *pod {
	mkdirAll(e.t, dir)
	p := e.newPod("", dir)
	for i, a := range p.rt.Args {
		if a[0] == "K8S_POD_NAME" {
			p.rt.Args[i][1] = "web-0"
		}
	}
	p.rt.CapabilityArgs = map[string]any{"cgroupPath": strings.TrimPrefix(dir, testutil.V2Mount(e.t))}
	return p
}

// TestReconcileNamesDeadAttachment: the reconciler's line for a dead
// attachment says what it was for, the kernel having forgotten the cgroup's
// path (and, once it has freed the cgroup, its ID): the pod the CNI plugin
// attached (namespace/name from CNI_ARGS), the cgroup ID of one made by
// `ctlbd attach` (its name has it); never the useless cgroupId=0.
func TestReconcileNamesDeadAttachment(t *testing.T) {
	e := newEnv(t) // its ctlbd reconciles hourly: the test runs the pass
	dir := filepath.Join(e.cgroups, "sandboxes", "web-0")
	p := e.namedPod(dir)
	e.mustAdd(e.chain(nil), p)
	e.wantAttached(p)
	byHand := testutil.NewCgroup(t, strings.TrimPrefix(e.cgroups, testutil.V2Mount(t)))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	att, err := e.daemon.Client().Attach(ctx, api.AttachRequest{Cgroup: byHand})
	if err != nil {
		t.Fatalf("ctlbd attach %s: %v", byHand, err)
	}
	testutil.RemoveCgroup(t, dir)
	testutil.RemoveCgroup(t, byHand)

	r := e.daemon.Daemon().Reconcile()
	podAtt := cni.AttachmentID(p.net, p.id)
	if !slices.Contains(r.Dead, podAtt) || !slices.Contains(r.Dead, att.ID) {
		t.Fatalf("reconcile removed %v, want %s and %s", r.Dead, podAtt, att.ID)
	}
	lines := map[string]string{}
	for _, l := range strings.Split(e.daemon.Logs(), "\n") {
		if strings.Contains(l, "removed attachment of a dead cgroup") {
			for _, id := range []string{podAtt, att.ID} {
				if strings.Contains(l, "id="+id+" ") || strings.HasSuffix(l, "id="+id) {
					lines[id] = l
				}
			}
		}
	}
	if l := lines[podAtt]; !strings.Contains(l, "pods=[default/web-0]") || strings.Contains(l, "cgroupId=0") {
		t.Errorf("reconcile's line for the pod's attachment: %q, want pods=[default/web-0] and no cgroupId=0", l)
	}
	if l, want := lines[att.ID], fmt.Sprintf("cgroupId=%d", att.CgroupID); !strings.Contains(l, want) {
		t.Errorf("reconcile's line for ctlbd attach's attachment: %q, want %s", l, want)
	}
	t.Logf("logged: %s | %s", lines[podAtt], lines[att.ID])
}

// A pod torn down without DEL (its cgroup removed while attached): CHECK
// says the cgroup is dead; GC (with a valid-attachments list that still
// names the pod, and without a list) and ctlbd's reconciler remove the dead
// link; a new pod of the same name, in the same cgroup path, attaches.
func TestPodCgroupRemovedWhileAttached(t *testing.T) {
	e := newEnv(t)
	list := e.chain(nil)
	lp, load := e.loadPod()
	dir := filepath.Join(e.cgroups, "sandboxes", "web-0")

	// GC with a list that still names the dead pod.
	a := e.namedPod(dir)
	e.mustAdd(list, a)
	wantRedirected(t, a, container(t, a, "app"))
	testutil.RemoveCgroup(t, dir)
	wantCode(t, "CHECK after the pod cgroup went", e.check(list, a), cni.ErrCgroupDead, "dead cgroup")
	if err := e.gc([]*pod{lp, a}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if _, ok := e.attachment(a); ok {
		t.Fatal("GC with a list naming the pod kept its dead attachment")
	}
	e.wantNothingLeftBut(1)

	// The same name again, then GC without a list.
	b := e.namedPod(dir)
	e.mustAdd(list, b)
	e.wantAttached(b)
	wantRedirected(t, b, container(t, b, "app"))
	if err := e.check(list, b); err != nil {
		t.Fatalf("CHECK of the new pod of the same name: %v", err)
	}
	testutil.RemoveCgroup(t, dir)
	if err := e.gc(nil); err != nil {
		t.Fatalf("GC without a list: %v", err)
	}
	if _, ok := e.attachment(b); ok {
		t.Fatal("GC without a list kept a dead attachment")
	}
	e.wantNothingLeftBut(1)

	// A runtime reusing the sandbox ID (and the cgroup path) while the dead
	// attachment is still there: ADD replaces it.
	c := e.namedPod(dir)
	e.mustAdd(list, c)
	testutil.RemoveCgroup(t, dir)
	mkdirAll(t, dir)
	stdin := e.pluginStdin("1.0.0", map[string]any{"runtimeConfig": c.rt.CapabilityArgs}, true)
	if out, err := execPlugin(t, "ADD", c.id, c.netns.Path(), "", stdin); err != nil {
		t.Fatalf("ADD reusing the sandbox ID: %v: %s", err, out)
	}
	e.wantAttached(c)
	wantRedirected(t, c, container(t, c, "app"))
	waitProgs(t, dir, perAttachment)

	// ctlbd's reconciler, running every 200 ms, removes a dead one unasked.
	e.restartDaemon(200 * time.Millisecond)
	testutil.RemoveCgroup(t, dir)
	gone := time.Now()
	testutil.Eventually(t, "ctlbd's reconciler removing the dead attachment", 5*time.Second, func() (bool, string) {
		a, ok := e.attachment(c)
		return !ok, fmt.Sprintf("attachment %+v", a)
	})
	t.Logf("ctlbd's reconciler (every 200ms) removed the dead attachment %s after the cgroup went", time.Since(gone).Round(time.Millisecond))
	// The attachment leaves listings at the rename that starts its detach;
	// its link pins go a moment later.
	testutil.Poll(2*time.Second, func() (bool, string) {
		links, _ := e.leftovers()
		return len(links) == 1 && !strings.HasPrefix(links[0], "_"), fmt.Sprint(links)
	})
	e.wantNothingLeftBut(1)

	// And a pod of the same name still attaches.
	d := e.namedPod(dir)
	e.mustAdd(list, d)
	e.wantAttached(d)
	wantRedirected(t, d, container(t, d, "app"))
	finishLoad(t, "pod cgroups removed without DEL", load)
}
