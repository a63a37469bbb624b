package deploy

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

const (
	nobody     = 65534
	readGroup  = 4242
	writeGroup = 4243
)

// runAs runs ctlbd as uid with groups (the first is the primary one) and
// no capabilities.
func runAs(uid uint32, groups []uint32, args ...string) (string, int) {
	return testutil.RunAs(uid, groups, ctlbd, args...)
}

func groupDaemon(t *testing.T, socket string, cfg map[string]any) *ctlbdtest.Daemon {
	t.Helper()
	return ctlbdtest.Start(t, ctlbdtest.Options{Bin: ctlbd, Socket: socket, Config: cfg})
}

// TestSocketGroupReadOnly: members of socketGroup read (status, lists) but
// change nothing; members of socketWriteGroup change things; the kernel's
// peer credentials decide, supplementary groups included.
func TestSocketGroupReadOnly(t *testing.T) {
	testutil.RequireRoot(t)
	sock := filepath.Join(testutil.SharedDir(t), "run", "ctlbd.sock")
	d := groupDaemon(t, sock, map[string]any{"socketGroup": "4242", "socketWriteGroup": "4243", "logLevel": "debug"})
	d.SetService("198.18.255.1:80", "198.18.0.2:80")
	before := d.MustCLI("service", "list", "-o", "json")

	reader := []uint32{readGroup}
	for _, args := range [][]string{{"status"}, {"service", "list"}, {"attachments"}} {
		if out, code := runAs(nobody, reader, append([]string{"--socket", sock}, args...)...); code != 0 {
			t.Errorf("socketGroup member: ctlbd %s: exit %d: %s", strings.Join(args, " "), code, out)
		}
	}
	for _, args := range [][]string{
		{"service", "set", "198.18.255.1:80", "198.18.0.3:80"},
		{"service", "delete", "198.18.255.1:80"},
		{"reload"},
	} {
		out, code := runAs(nobody, reader, append([]string{"--socket", sock}, args...)...)
		if code == 0 || !strings.Contains(out, "may only read") {
			t.Errorf("socketGroup member: ctlbd %s: exit %d, %q; want a read-only refusal", strings.Join(args, " "), code, out)
		}
	}
	if after := d.MustCLI("service", "list", "-o", "json"); after != before {
		t.Fatalf("a read-only member changed the services:\n%s\n%s", before, after)
	}
	// At debug, each request names its peer and the answer: a refusal too.
	refused := `msg="control API request" method=POST path=/v1/reload uid=65534 status=403`
	if !strings.Contains(d.Logs(), refused) {
		t.Errorf("ctlbd's debug log has no line %s:\n%s", refused, d.LogTail(3000))
	}
	// In both groups (the write group as a supplementary one): may change.
	writer := []uint32{readGroup, writeGroup}
	if out, code := runAs(nobody, writer, "--socket", sock, "service", "set", "198.18.255.1:80", "198.18.0.3:80"); code != 0 {
		t.Errorf("socketWriteGroup member: service set: exit %d: %s", code, out)
	}
	if after := d.MustCLI("service", "list", "-o", "json"); after == before {
		t.Errorf("the write group member's change did not land")
	}
	// Outside the groups: the socket's mode keeps it out.
	if out, code := runAs(nobody, []uint32{nobody}, "--socket", sock, "status"); code == 0 || !strings.Contains(out, "permission denied") {
		t.Errorf("non-member: exit %d, %q; want permission denied", code, out)
	}
	// The directory ctlbd created: the group may traverse it, no more.
	fi, err := os.Stat(filepath.Dir(sock))
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o710 || st.Gid != readGroup {
		t.Errorf("created socket directory: mode %v gid %d, want 0710 gid %d", fi.Mode().Perm(), st.Gid, readGroup)
	}
}

// TestSocketGroupLeavesForeignDirectory: a directory ctlbd did not create
// keeps its mode and owner.
func TestSocketGroupLeavesForeignDirectory(t *testing.T) {
	testutil.RequireRoot(t)
	dir := filepath.Join(testutil.SharedDir(t), "mine")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	d := groupDaemon(t, filepath.Join(dir, "ctlbd.sock"), map[string]any{"socketGroup": "4242"})
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o750 || st.Uid != 0 || st.Gid != 0 {
		t.Errorf("existing directory changed: mode %v uid %d gid %d, want 0750 root:root", fi.Mode().Perm(), st.Uid, st.Gid)
	}
	if !strings.Contains(d.Logs(), "socket directory not changed") {
		t.Errorf("no warning that the group cannot reach the socket:\n%s", d.LogTail(1000))
	}
}

// TestSocketInSharedDirectoryRefused: a sticky or world-writable directory
// (like /tmp) is refused with a clear error, and nothing is created there.
func TestSocketInSharedDirectoryRefused(t *testing.T) {
	testutil.RequireRoot(t)
	for name, mode := range map[string]os.FileMode{"sticky": 0o1777, "world-writable": 0o777} {
		dir := filepath.Join(testutil.SharedDir(t), name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		cmd := exec.CommandContext(ctx, ctlbd, "run", "--bpffs", filepath.Join(testutil.MountBPFFS(t), "ctlb"),
			"--socket", filepath.Join(dir, "ctlbd.sock"), "--state-dir", filepath.Join(t.TempDir(), "state"))
		out, err := cmd.CombinedOutput()
		cancel()
		if err == nil || !strings.Contains(string(out), "is shared") {
			t.Errorf("%s directory: %v, %q; want a refusal naming the shared directory", name, err, lastLine(string(out)))
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Errorf("%s directory: ctlbd left %d entries", name, len(ents))
		}
	}
}

// TestSocketOverFileRefused: a --socket that names an existing file (a
// config file, given to the wrong flag) is refused with exit 1 and an error
// naming the flag and the path; the file is left as it was.
func TestSocketOverFileRefused(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "ctlbd.json")
	if err := os.WriteFile(file, []byte("important\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, ctlbd, "run", "--bpffs", filepath.Join(testutil.MountBPFFS(t), "ctlb"),
		"--socket", file, "--state-dir", filepath.Join(dir, "state"), "--no-config-watch")
	out, err := cmd.CombinedOutput()
	want := "--socket: " + file + ": exists and is not a socket (a regular file); remove it or choose another path"
	if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(out), want) {
		t.Errorf("ctlbd run --socket FILE: %v, %q; want exit 1 saying %q", err, lastLine(string(out)), want)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "important\n" {
		t.Errorf("the file after ctlbd run: %q, %v; want it untouched", b, err)
	}
}
