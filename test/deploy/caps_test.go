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
	"context"
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
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
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
	metrics := freePort(t)
	cfg := map[string]any{"metrics": metrics}
	if group {
		cfg["socketGroup"] = "4242"
	}
	// Root whose bounding set is the list: after exec its permitted and
	// effective sets are exactly the list, and nothing can raise them.
	d := ctlbdtest.New(t, ctlbdtest.Options{
		Bin: ctlbd, Config: cfg, Args: extraRunArgs, BPFFS: n.bpffs,
		Socket: filepath.Join(dir, "run", "ctlbd.sock"), StateDir: filepath.Join(dir, "state"),
		Wrap: func(argv []string) *exec.Cmd {
			argv = append(append(slices.Clone(wrap), setpriv(caps)...), argv...)
			return exec.Command(argv[0], argv[1:]...)
		},
	})
	startErr := d.TryStart()
	defer func() {
		d.Stop()
		t.Logf("caps %v: ctlbd log:\n%s", caps, d.Logs())
	}()

	res := map[string]error{}
	all := []string{"start", "service set", "attach", "pending by netns scan", "metrics"}
	if group {
		all = append(all, "socketGroup")
	}
	if startErr != nil {
		for _, s := range all {
			res[s] = fmt.Errorf("not reached: %s", lastLine(startErr.Error()))
		}
		return res
	}
	res["start"] = nil
	if group {
		fi, err := os.Stat(d.Socket)
		if err == nil && fi.Sys().(*syscall.Stat_t).Gid != 4242 {
			err = fmt.Errorf("socket group %d, want 4242", fi.Sys().(*syscall.Stat_t).Gid)
		}
		res["socketGroup"] = err
	}
	c := d.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, res["service set"] = c.SetService(ctx, api.ServiceRequest{VIP: "198.18.255.1:80", Servers: []string{"198.18.0.2:80"}})
	_, res["attach"] = c.Attach(ctx, api.AttachRequest{Cgroup: n.podA})

	id, err := podcgroup.StatNetns(n.netns)
	if err != nil {
		t.Fatal(err)
	}
	rec := pending.Record{ContainerID: "sandbox-" + strings.Join(caps, "-"), AttachmentID: "cnih-caps", BPFFS: n.bpffs,
		Netns: n.netns, NetnsID: id, Created: time.Now().UTC()}
	if err := pending.Write(d.StateDir, rec); err != nil {
		t.Fatal(err)
	}
	// The daemon's scan of /proc (every poll) finds the sandbox process and
	// attaches its pod cgroup; wait for that attachment.
	res["pending by netns scan"] = func() error {
		if _, err := c.NotifyPending(ctx, rec.ContainerID, rec.AttachmentID); err != nil {
			return err
		}
		var callErr error
		_, seen, ok := testutil.Poll(pendingDeadline, func() (bool, string) {
			atts, err := c.Attachments(ctx)
			if err != nil {
				callErr = err
				return true, ""
			}
			for _, a := range atts {
				if a.ID == rec.AttachmentID && a.CgroupPath == n.podB {
					return true, ""
				}
			}
			return false, fmt.Sprint(atts)
		})
		if callErr != nil {
			return callErr
		}
		if !ok {
			return fmt.Errorf("no attachment %s of %s after %v (the sandbox's netns not found in /proc); attachments: %s",
				rec.AttachmentID, n.podB, pendingDeadline, seen)
		}
		return nil
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
	_, _ = c.Detach(ctx, api.AttachRequest{Cgroup: n.podA})
	_, _ = c.Detach(ctx, api.AttachRequest{Cgroup: n.podB})
	return res
}

// setpriv is the command prefix that runs a program as root whose bounding
// set is exactly caps, with no inheritable ones and no_new_privs.
func setpriv(caps []string) []string {
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + c
	}
	return []string{"setpriv", "--bounding-set=" + bounding, "--inh-caps=-all", "--no-new-privs", "--"}
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
	// The script mounts a fresh sysfs and execs ctlbd (one PID throughout).
	script := `mount -t sysfs sysfs "$1" && shift && exec "$@"`
	d := ctlbdtest.New(t, ctlbdtest.Options{
		Bin: ctlbd, BPFFS: filepath.Join(sys, "fs", "bpf", "ctlb"),
		Wrap: func(argv []string) *exec.Cmd {
			return exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", sys}, argv...)...)
		},
	})
	d.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Client().SetService(ctx, api.ServiceRequest{VIP: "198.18.255.1:80", Servers: []string{"198.18.0.2:80"}}); err != nil {
		t.Fatal(err)
	}
	// The daemon's own mount table (unshare exec'd sh, which exec'd ctlbd:
	// same PID) shows the bpffs on fs/bpf, not on the pin directory.
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", d.PID()))
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
		t.Errorf("bpffs mounted at %v, want %v\n%s", bpfAt, want, d.Logs())
	}
	if !strings.Contains(d.Logs(), "mounted bpffs") {
		t.Errorf("no log of the mount:\n%s", d.Logs())
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
	script := `set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro /
if touch /ctlb-rofs-probe 2>/dev/null; then rm -f /ctlb-rofs-probe; echo "/ is writable" >&2; exit 3; fi
shift
exec "$@"`
	d := ctlbdtest.New(t, ctlbdtest.Options{
		Bin: ctlbd, BPFFS: n.bpffs, Socket: filepath.Join(dir, "ctlbd.sock"), StateDir: filepath.Join(dir, "state"),
		Wrap: func(argv []string) *exec.Cmd {
			args := append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", dir}, setpriv(Needed)...)
			return exec.Command("unshare", append(args, argv...)...)
		},
	})
	d.Start()
	c := d.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.SetService(ctx, api.ServiceRequest{VIP: "198.18.255.1:80", Servers: []string{"198.18.0.2:80"}}); err != nil {
		t.Error(err)
	}
	if _, err := c.Attach(ctx, api.AttachRequest{Cgroup: n.podA}); err != nil {
		t.Error(err)
	}
	_, _ = c.Detach(ctx, api.AttachRequest{Cgroup: n.podA})
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
