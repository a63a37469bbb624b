// caps_test.go finds, by running it, the capabilities ctlbd needs: the
// daemon runs as root with its bounding set cut to a list (setpriv), and
// does everything a node agent does: create and pin its maps and programs,
// set a VIP, attach a pod cgroup, complete a pending attachment by scanning
// /proc for the sandbox's network namespace, serve metrics from the maps,
// hand its socket to a group. With the list, every step works; without any
// one capability of it, some step fails. The list is what the DaemonSet and
// the systemd unit grant (charts/ctlb, conf/systemd/ctlbd.service).

package deploy

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// node is what the steps act on: a pin directory, a pod cgroup to attach,
// and a sandbox (a process in its own netns, in a container cgroup below
// another pod cgroup) that only a /proc scan finds.
type node struct {
	bpffs, podA, podB string
	netns             string
}

func newNode(t *testing.T) node {
	t.Helper()
	testutil.RequireRoot(t)
	parent := testutil.NewCgroup(t, "")
	rel := strings.TrimPrefix(parent, testutil.V2Mount(t))
	podA := testutil.NewCgroup(t, rel)
	podB := testutil.NewCgroup(t, rel)
	ctr := testutil.NewCgroup(t, strings.TrimPrefix(podB, testutil.V2Mount(t)))
	netns := testutil.NewNetNS(t)
	cg, err := os.Open(ctr)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	// The sandbox process: root with every capability, as a runtime's pause
	// process is, so reading its /proc/PID/ns/net takes CAP_SYS_PTRACE from
	// a daemon that has fewer.
	sandbox := exec.Command("nsenter", "--net="+netns.Path(), "sleep", "120")
	sandbox.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	if err := sandbox.Start(); err != nil {
		t.Fatalf("sandbox process: %v", err)
	}
	t.Cleanup(func() { _ = sandbox.Process.Kill(); _ = sandbox.Wait() })
	// Wait until nsenter has entered the netns (it execs sleep after).
	want, err := podcgroup.StatNetns(netns.Path())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := podcgroup.StatNetns(fmt.Sprintf("/proc/%d/ns/net", sandbox.Process.Pid))
		if err == nil && got == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox pid %d not in netns %s after 5s: %v %v", sandbox.Process.Pid, netns.Path(), got, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return node{bpffs: filepath.Join(testutil.MountBPFFS(t), "ctlb"), podA: podA, podB: podB, netns: netns.Path()}
}

// extraRunArgs are added to `ctlbd run` by steps (set by one test at a time).
var extraRunArgs []string

// steps runs ctlbd with the bounding set cut to caps and returns each
// step's error (nil: it worked). A step that cannot run because an earlier
// one failed counts as failed.
func steps(t *testing.T, n node, caps []string, group bool, wrap ...string) map[string]error {
	t.Helper()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	sock := filepath.Join(dir, "run", "ctlbd.sock")
	metrics := freePort(t)
	cfg := map[string]any{"bpffs": n.bpffs, "socket": sock, "stateDir": state, "metrics": metrics}
	if group {
		cfg["socketGroup"] = "4242"
	}
	b, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(dir, "ctlbd.json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + c
	}
	// Root whose bounding set is the list: after exec its permitted and
	// effective sets are exactly the list, and nothing can raise them.
	argv := append(slices.Clone(wrap), "setpriv", "--bounding-set="+bounding, "--inh-caps=-all", "--no-new-privs", "--",
		ctlbd, "run", "--config", cfgPath)
	argv = append(argv, extraRunArgs...)
	cmd := exec.Command(argv[0], argv[1:]...)
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		t.Logf("caps %v: ctlbd log:\n%s", caps, logs.String())
	}()

	res := map[string]error{}
	all := []string{"start", "service set", "attach", "pending by netns scan", "metrics"}
	if group {
		all = append(all, "socketGroup")
	}
	fail := func(from int, err error) map[string]error {
		for _, s := range all[from:] {
			res[s] = fmt.Errorf("not reached: %w", err)
		}
		return res
	}
	c := unixClient(sock)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := c.Get("http://ctlbd/v1/status")
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case <-exited:
			return fail(0, fmt.Errorf("ctlbd exited: %s", lastLine(logs.String())))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fail(0, fmt.Errorf("socket not up after 10s: %v", err))
		}
	}
	res["start"] = nil
	if group {
		fi, err := os.Stat(sock)
		if err == nil && fi.Sys().(*syscall.Stat_t).Gid != 4242 {
			err = fmt.Errorf("socket group %d, want 4242", fi.Sys().(*syscall.Stat_t).Gid)
		}
		res["socketGroup"] = err
	}
	res["service set"] = call(c, "PUT", "/v1/services", `{"vip":"198.18.255.1:80","servers":["198.18.0.2:80"]}`, nil)
	res["attach"] = call(c, "POST", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, n.podA), nil)

	id, err := podcgroup.StatNetns(n.netns)
	if err != nil {
		t.Fatal(err)
	}
	rec := pending.Record{ContainerID: "sandbox-" + strings.Join(caps, "-"), AttachmentID: "cnih-caps", BPFFS: n.bpffs,
		Netns: n.netns, NetnsID: id, Created: time.Now().UTC()}
	if err := pending.Write(state, rec); err != nil {
		t.Fatal(err)
	}
	// The daemon's scan of /proc (every poll) finds the sandbox process and
	// attaches its pod cgroup; wait for that attachment.
	res["pending by netns scan"] = func() error {
		if err := call(c, "POST", "/v1/pending", fmt.Sprintf(`{"containerID":%q}`, rec.ContainerID), nil); err != nil {
			return err
		}
		deadline := time.Now().Add(pendingDeadline)
		var last string
		for {
			var atts []datapath.Attachment
			if err := call(c, "GET", "/v1/attachments", "", &atts); err != nil {
				return err
			}
			for _, a := range atts {
				if a.ID == rec.AttachmentID && a.CgroupPath == n.podB {
					return nil
				}
			}
			last = fmt.Sprint(atts)
			if time.Now().After(deadline) {
				return fmt.Errorf("no attachment %s of %s after %v (the sandbox's netns not found in /proc); attachments: %s",
					rec.AttachmentID, n.podB, pendingDeadline, last)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()

	res["metrics"] = func() error {
		resp, err := http.Get("http://" + metrics + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /metrics: %s: %s", resp.Status, firstLine(string(body)))
		}
		if !strings.Contains(string(body), `ctlb_service_servers{protocol="tcp",vip="198.18.255.1:80"} 1`) {
			return fmt.Errorf("GET /metrics: no ctlb_service_servers for the VIP")
		}
		return nil
	}()
	// Leave the pod cgroups unattached for the next run.
	_ = call(c, "DELETE", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, n.podA), nil)
	_ = call(c, "DELETE", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, n.podB), nil)
	return res
}

// TestMinimalCapabilities runs ctlbd with exactly the list and without each
// capability of it.
func TestMinimalCapabilities(t *testing.T) {
	n := newNode(t)
	// A first daemon with every capability pins a VIP: every run below is
	// a restart that adopts pinned maps, as after an upgrade.
	for step, err := range steps(t, n, []string{"all"}, false) {
		if err != nil {
			t.Fatalf("with every capability: %s: %v", step, err)
		}
	}
	// CAP_BPF and CAP_NET_ADMIN alone (kernel >= 5.8) do not suffice.
	var failed []string
	for step, err := range steps(t, n, []string{"bpf", "net_admin", "perfmon", "sys_ptrace"}, false) {
		if err != nil {
			failed = append(failed, step)
		}
	}
	if len(failed) == 0 {
		t.Errorf("bpf, net_admin, perfmon and sys_ptrace suffice: CAP_SYS_ADMIN is no longer needed; update Needed and the manifests")
	}
	t.Logf("with bpf, net_admin, perfmon, sys_ptrace: failed %v", failed)
	for _, tc := range []struct {
		name  string
		caps  []string
		group bool
		// drop are the capabilities to show needed (the others are shown
		// by the run before).
		drop []string
	}{
		{"kubernetes", Needed, false, Needed},
		{"socketGroup", NeededWithGroup, true, []string{"chown"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for step, err := range steps(t, n, tc.caps, tc.group) {
				if err != nil {
					t.Errorf("with %v: %s: %v", tc.caps, step, err)
				}
			}
			if t.Failed() {
				return
			}
			// Each capability of the list is needed: without it, a step fails.
			for _, drop := range tc.drop {
				less := slices.DeleteFunc(slices.Clone(tc.caps), func(c string) bool { return c == drop })
				var failed []string
				for step, err := range steps(t, n, less, tc.group) {
					if err != nil {
						failed = append(failed, fmt.Sprintf("%s (%v)", step, err))
					}
				}
				if len(failed) == 0 {
					t.Errorf("without %s every step works: it is not needed", drop)
				}
				slices.Sort(failed)
				t.Logf("without %s: failed %s", drop, strings.Join(failed, "; "))
			}
		})
	}
}

// TestRunOnPlainSysfs: `ctlbd run --bpffs <sys>/fs/bpf/ctlb` where <sys> is
// a sysfs with no bpffs on fs/bpf (the host), in a private mount
// namespace so the host's /sys/fs/bpf is untouched. ctlbd mounts the bpffs
// on fs/bpf itself and makes its pin directory inside.
func TestRunOnPlainSysfs(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	sys := filepath.Join(dir, "sys")
	if err := os.Mkdir(sys, 0o755); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(sys, "fs", "bpf", "ctlb")
	sock := filepath.Join(dir, "ctlbd.sock")
	script := `mount -t sysfs sysfs "$1" && exec "$2" run --bpffs "$3" --socket "$4" --state-dir "$5"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
		sys, ctlbd, pins, sock, filepath.Join(dir, "state"))
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	c := unixClient(sock)
	deadline := time.Now().Add(10 * time.Second)
	for call(c, "GET", "/v1/status", "", nil) != nil {
		select {
		case <-exited:
			t.Fatalf("ctlbd exited:\n%s", logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket not up after 10s:\n%s", logs.String())
		}
	}
	if err := call(c, "PUT", "/v1/services", `{"vip":"198.18.255.1:80","servers":["198.18.0.2:80"]}`, nil); err != nil {
		t.Fatal(err)
	}
	// The daemon's own mount table (unshare exec'd sh, which exec'd ctlbd:
	// same PID) shows the bpffs on fs/bpf, not on the pin directory.
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var bpfAt []string
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if i := slices.Index(f, "-"); i > 0 && i+1 < len(f) && f[i+1] == "bpf" && strings.HasPrefix(f[4], sys) {
			bpfAt = append(bpfAt, f[4])
		}
	}
	if want := []string{filepath.Join(sys, "fs", "bpf")}; !slices.Equal(bpfAt, want) {
		t.Errorf("bpffs mounted at %v, want %v\n%s", bpfAt, want, logs.String())
	}
	if !strings.Contains(logs.String(), "mounted bpffs") {
		t.Errorf("no log of the mount:\n%s", logs.String())
	}
	// Nothing of it is visible on the host.
	if hostMI, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(hostMI), sys) {
		t.Errorf("the test's sysfs or bpffs leaked into the host's mount namespace")
	}
}

// TestReadOnlyRootFilesystem: ctlbd runs, with the Kubernetes capability
// set and no_new_privs, on a read-only root filesystem (the DaemonSet's
// readOnlyRootFilesystem), writing only to its mounts: the bpffs, the
// state and socket directory, the cgroup tree. A private mount namespace
// makes / read-only for ctlbd alone.
func TestReadOnlyRootFilesystem(t *testing.T) {
	n := newNode(t)
	dir := t.TempDir() // becomes ctlbd's /run/ctlb: a mount of its own, rw
	sock := filepath.Join(dir, "ctlbd.sock")
	bounding := "-all"
	for _, c := range Needed {
		bounding += ",+" + c
	}
	script := `set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro /
if touch /ctlb-rofs-probe 2>/dev/null; then rm -f /ctlb-rofs-probe; echo "/ is writable" >&2; exit 3; fi
shift
exec "$@"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", dir,
		"setpriv", "--bounding-set="+bounding, "--inh-caps=-all", "--no-new-privs", "--",
		ctlbd, "run", "--bpffs", n.bpffs, "--socket", sock, "--state-dir", filepath.Join(dir, "state"))
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	c := unixClient(sock)
	deadline := time.Now().Add(10 * time.Second)
	for call(c, "GET", "/v1/status", "", nil) != nil {
		select {
		case <-exited:
			t.Fatalf("ctlbd on a read-only root exited:\n%s", logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket not up after 10s:\n%s", logs.String())
		}
	}
	if err := call(c, "PUT", "/v1/services", `{"vip":"198.18.255.1:80","servers":["198.18.0.2:80"]}`, nil); err != nil {
		t.Error(err)
	}
	if err := call(c, "POST", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, n.podA), nil); err != nil {
		t.Error(err)
	}
	_ = call(c, "DELETE", "/v1/attachments", fmt.Sprintf(`{"cgroup":%q}`, n.podA), nil)
}

// TestPrivateCgroupNamespace: an unprivileged container on a cgroup v2 host
// gets a cgroup namespace of its own, where every other process's
// /proc/PID/cgroup reads "/../..". ctlbd joins the host's (it has the host
// PID namespace) and still finds a sandbox's pod cgroup through its
// processes; kept out of it, it cannot.
func TestPrivateCgroupNamespace(t *testing.T) {
	n := newNode(t)
	own := testutil.NewCgroup(t, "") // the "container" cgroup: the private namespace's root
	// Move into own, then a new cgroup namespace rooted there, then ctlbd
	// with the Kubernetes capabilities (unshare execs, so one PID).
	wrap := []string{"sh", "-c", `echo $$ > "$0/cgroup.procs" && exec unshare --cgroup -- "$@"`, own}
	// The "host" namespace is the test's own (this machine's PID 1 is not
	// readable, a container runtime's init here).
	extraRunArgs = []string{"--host-cgroupns", fmt.Sprintf("/proc/%d/ns/cgroup", os.Getpid())}
	t.Cleanup(func() { extraRunArgs = nil })
	for step, err := range steps(t, n, Needed, false, wrap...) {
		if err != nil {
			t.Errorf("in a private cgroup namespace: %s: %v", step, err)
		}
	}
	// Kept in the private namespace (as if the join were not there), the
	// scan cannot map the sandbox to its cgroup.
	extraRunArgs = []string{"--host-cgroupns", ""}
	res := steps(t, n, Needed, false, wrap...)
	if res["start"] == nil && res["pending by netns scan"] == nil {
		t.Errorf("without joining the host's cgroup namespace ctlbd started and its netns scan worked: the test does not show the case")
	}
	t.Logf("staying in the private namespace: start: %v; pending by netns scan: %v", res["start"], res["pending by netns scan"])
}
