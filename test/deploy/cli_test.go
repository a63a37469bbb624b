package deploy

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// TestOperatorCLI: `ctlbd pending` with age and reason, -o wide/json/yaml,
// attachments naming the pod the CNI plugin attached, confirmations of
// delete and reload, and a one-line error when the daemon is not there.
func TestOperatorCLI(t *testing.T) {
	d := startDaemon(t, map[string]any{"services": []any{map[string]any{"vip": "198.18.255.1:80", "servers": []string{"198.18.0.2:80"}}}})

	// A pending attachment whose cgroup never comes.
	parent := testutil.NewCgroup(t, "")
	rel := strings.TrimPrefix(parent, testutil.V2Mount(t))
	rec := pending.Record{ContainerID: "0123456789abcdef0123", AttachmentID: "cni-test-0123456789abcdef0123", BPFFS: d.BPFFS,
		CgroupDir: rel + "/never", Created: time.Now().Add(-90 * time.Second).UTC()}
	if err := pending.Write(d.StateDir, rec); err != nil {
		t.Fatal(err)
	}
	var list []api.PendingAttachment
	testutil.Eventually(t, "the record listed", 10*time.Second, func() (bool, string) {
		list = nil
		out := d.MustCLI("pending", "-o", "json")
		_ = json.Unmarshal([]byte(out), &list)
		return len(list) == 1, out
	})
	table := d.MustCLI("pending")
	rows := strings.Split(strings.TrimSpace(table), "\n")
	if len(rows) != 2 || !strings.HasPrefix(rows[0], "CONTAINER") || !strings.Contains(rows[1], "0123456789abc") ||
		!strings.Contains(rows[1], "cgroup "+rel+"/never") || !strings.Contains(rows[1], "does not exist yet") || !strings.Contains(rows[1], "1m3") {
		t.Errorf("ctlbd pending:\n%s\nwant the short container ID, its age (1m3xs), the cgroup it waits for and why", table)
	}
	if wide := d.MustCLI("pending", "-o", "wide"); !strings.Contains(wide, "ATTACHMENT") || !strings.Contains(wide, rec.AttachmentID) {
		t.Errorf("ctlbd pending -o wide:\n%s\nwant the attachment ID column", wide)
	}
	var fromYAML []api.PendingAttachment
	if err := yaml.UnmarshalStrict([]byte(d.MustCLI("pending", "-o", "yaml")), &fromYAML); err != nil || len(fromYAML) != 1 || fromYAML[0].AttachmentID != rec.AttachmentID {
		t.Errorf("ctlbd pending -o yaml: %v, %+v", err, fromYAML)
	}

	// The CNI plugin attaches a pod: attachments names it.
	pod := testutil.NewCgroup(t, rel)
	netns := testutil.NewNetNS(t)
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "pods", "type": "ctlb",
		"bpffs": d.BPFFS, "socket": d.Socket, "stateDir": d.StateDir, "cgroupPath": strings.TrimPrefix(pod, testutil.V2Mount(t)),
		"prevResult": map[string]any{"cniVersion": "1.0.0", "interfaces": []any{map[string]any{"name": "eth0", "sandbox": netns.Path()}},
			"ips": []any{map[string]any{"address": "198.18.0.9/24", "interface": 0}}},
	})
	cmd := exec.Command(plugin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD", "CNI_CONTAINERID=cafe0123", "CNI_NETNS="+netns.Path(), "CNI_IFNAME=eth0",
		"CNI_PATH="+filepath.Dir(plugin), "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0")
	cmd.Stdin = bytes.NewReader(conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CNI ADD: %v: %s", err, out)
	}
	atts := d.MustCLI("attachments")
	if !strings.Contains(atts, "POD") || !strings.Contains(atts, "shop/web-0") {
		t.Errorf("ctlbd attachments:\n%s\nwant the pod shop/web-0", atts)
	}
	if wide := d.MustCLI("attachments", "-o", "wide"); !strings.Contains(wide, "CGROUP ID") {
		t.Errorf("ctlbd attachments -o wide:\n%s\nwant the CGROUP ID column", wide)
	}
	var al []api.Attachment
	if err := json.Unmarshal([]byte(d.MustCLI("attachments", "-o", "json")), &al); err != nil || len(al) != 1 || al[0].PodNamespace != "shop" || al[0].PodName != "web-0" {
		t.Errorf("attachments -o json: %v %+v", err, al)
	}
	cmd = exec.Command(plugin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=DEL", "CNI_CONTAINERID=cafe0123", "CNI_NETNS="+netns.Path(), "CNI_IFNAME=eth0",
		"CNI_PATH="+filepath.Dir(plugin), "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0")
	cmd.Stdin = bytes.NewReader(conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("CNI DEL: %v: %s", err, out)
	}

	// Confirmations.
	d.SetService("198.18.255.9:80", "198.18.0.3:80")
	if out := d.MustCLI("service", "delete", "198.18.255.9:80"); !strings.Contains(out, "deleted 198.18.255.9:80") {
		t.Errorf("service delete printed %q, want a confirmation", out)
	}
	if out := d.MustCLI("reload"); !strings.Contains(out, "config reloaded: 1 VIPs") {
		t.Errorf("reload printed %q, want a confirmation with the VIP count", out)
	}

	// The daemon is not there: one line that says what to do.
	_, errOut, code := d.CLI("--socket", filepath.Join(t.TempDir(), "none.sock"), "status")
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, "not reachable") || !strings.Contains(errOut, "is ctlbd running?") ||
		strings.Contains(errOut, "dial unix") {
		t.Errorf("unreachable daemon: exit %d, %q; want one line without the Go error chain", code, errOut)
	}
}

// TestPendingNamesPod: a pending record the CNI plugin writes keeps the
// pod's namespace and name from CNI_ARGS, and `ctlbd pending` (table, wide,
// json) shows them; a record of an older plugin, without them, shows "-".
func TestPendingNamesPod(t *testing.T) {
	d := startDaemon(t, nil)
	parent := testutil.NewCgroup(t, "")
	rel := strings.TrimPrefix(parent, testutil.V2Mount(t))
	netns := testutil.NewNetNS(t)
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "pods", "type": "ctlb",
		"bpffs": d.BPFFS, "socket": d.Socket, "stateDir": d.StateDir, "cgroupPath": rel + "/not-yet",
		"prevResult": map[string]any{"cniVersion": "1.0.0", "interfaces": []any{map[string]any{"name": "eth0", "sandbox": netns.Path()}},
			"ips": []any{map[string]any{"address": "198.18.0.9/24", "interface": 0}}},
	})
	run := func(command string) {
		t.Helper()
		cmd := exec.Command(plugin)
		cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID=beef0123456789abcdef", "CNI_NETNS="+netns.Path(), "CNI_IFNAME=eth0",
			"CNI_PATH="+filepath.Dir(plugin), "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
		cmd.Stdin = bytes.NewReader(conf)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("CNI %s: %v: %s", command, err, out)
		}
	}
	run("ADD")
	t.Cleanup(func() { run("DEL") })
	// A record as a plugin older than the pod fields wrote it.
	old := pending.Record{ContainerID: "0ld0123456789abcdef", AttachmentID: "cni-old-0ld0123456789abcdef", BPFFS: d.BPFFS,
		CgroupDir: rel + "/never", Created: time.Now().UTC()}
	if err := pending.Write(d.StateDir, old); err != nil {
		t.Fatal(err)
	}

	var list []api.PendingAttachment
	out := d.MustCLI("pending", "-o", "json")
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 2 {
		t.Fatalf("ctlbd pending -o json: %v:\n%s\nwant 2 records", err, out)
	}
	for _, p := range list {
		want := [2]string{"shop", "web-1"}
		if p.ContainerID == old.ContainerID {
			want = [2]string{}
		}
		if got := [2]string{p.PodNamespace, p.PodName}; got != want {
			t.Errorf("pending -o json: container %s has pod %q, want %q", p.ContainerID, got, want)
		}
	}
	for _, args := range [][]string{{"pending"}, {"pending", "-o", "wide"}} {
		table := d.MustCLI(args...)
		rows := strings.Split(strings.TrimSpace(table), "\n")
		if len(rows) != 3 || !strings.Contains(rows[0], "\tPOD\t") && !strings.Contains(rows[0], " POD ") {
			t.Errorf("ctlbd %s:\n%s\nwant a POD column and 2 rows", strings.Join(args, " "), table)
			continue
		}
		for _, row := range rows[1:] {
			f := strings.Fields(row)
			want := "shop/web-1"
			if strings.HasPrefix(old.ContainerID, f[0]) {
				want = "-"
			}
			if len(f) < 2 || f[1] != want {
				t.Errorf("ctlbd %s: row %q, want POD %s after the container", strings.Join(args, " "), row, want)
			}
		}
	}

	// The cgroup comes: ctlbd's line for the completion names the pod too.
	if err := os.Mkdir(filepath.Join(parent, "not-yet"), 0o755); err != nil {
		t.Fatal(err) // removed with parent
	}
	testutil.Eventually(t, "the pending attachment completed, naming its pod", pendingDeadline, func() (bool, string) {
		for _, l := range strings.Split(d.Logs(), "\n") {
			if strings.Contains(l, `msg="pending attachment completed"`) && strings.Contains(l, "pod=shop/web-1") {
				return true, l
			}
		}
		return false, d.LogTail(2000)
	})
}
