package ctlbd_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
)

// nobody is the unprivileged user the tests act as.
const nobody = 65534

// runAs runs a command as uid/gid with no capabilities.
func runAs(uid, gid uint32, name string, args ...string) (string, int) {
	return testutil.RunAs(uid, []uint32{gid}, name, args...)
}

func TestPinsAndSocketAreRootOnly(t *testing.T) {
	d := newDaemon(t)
	d.Socket = filepath.Join(testutil.SharedDir(t), "ctlbd.sock")
	d.Start()
	d.MustCLI("service", "set", vip, servers[0])

	err := filepath.Walk(d.BPFFS, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v: group or others have access", p, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(d.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", fi.Mode(), err)
	}

	before := d.MustCLI("service", "list", "-o", "json")
	for _, args := range [][]string{
		{"--socket", d.Socket, "service", "list"},
		{"--socket", d.Socket, "service", "set", vip, servers[1]},
		{"--socket", d.Socket, "service", "delete", vip},
	} {
		out, code := runAs(nobody, nobody, ctlbd, args...)
		if code == 0 || !strings.Contains(out, "permission denied") {
			t.Errorf("as uid %d: ctlbd %s: exit %d, %q; want permission denied", nobody, strings.Join(args[2:], " "), code, out)
		}
	}
	if after := d.MustCLI("service", "list", "-o", "json"); after != before {
		t.Errorf("an unprivileged user changed the services:\n%s\n%s", before, after)
	}
	// Nor can it read or write the maps directly.
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		t.Fatalf("bpftool: %v (make deps installs it)", err)
	}
	for _, args := range [][]string{
		{"map", "dump", "pinned", filepath.Join(d.BPFFS, "ctlb_services_v2")},
		{"map", "delete", "pinned", filepath.Join(d.BPFFS, "ctlb_svcstate_v2"), "key", "0", "0", "0", "0"},
	} {
		out, code := runAs(nobody, nobody, bpftool, args...)
		if code == 0 {
			t.Errorf("as uid %d: bpftool %s succeeded: %s", nobody, strings.Join(args, " "), out)
		}
	}
	if after := d.MustCLI("service", "list", "-o", "json"); after != before {
		t.Errorf("services changed:\n%s\n%s", before, after)
	}
}

func TestSocketGroup(t *testing.T) {
	const group = 4242
	dir := t.TempDir()
	cfg := filepath.Join(dir, "ctlbd.json")
	if err := os.WriteFile(cfg, []byte(`{"socketGroup": "4242"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, "--config", cfg)
	d.Socket = filepath.Join(testutil.SharedDir(t), "run", "ctlbd.sock")
	d.Start()
	fi, err := os.Stat(d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o660 || st.Gid != group {
		t.Fatalf("socket mode %v group %d; want 0660 group %d", fi.Mode(), st.Gid, group)
	}
	if out, code := runAs(nobody, group, ctlbd, "--socket", d.Socket, "service", "list"); code != 0 {
		t.Fatalf("member of the socket group: exit %d: %s", code, out)
	}
	// Read-only unless socketWriteGroup (test/deploy checks the roles).
	if out, code := runAs(nobody, group, ctlbd, "--socket", d.Socket, "service", "set", vip, servers[0]); code == 0 || !strings.Contains(out, "may only read") {
		t.Fatalf("member of the socket group: service set: exit %d, %q; want a read-only refusal", code, out)
	}
	if out, code := runAs(nobody, nobody, ctlbd, "--socket", d.Socket, "service", "list"); code == 0 || !strings.Contains(out, "permission denied") {
		t.Fatalf("non-member: exit %d, %q; want permission denied", code, out)
	}
}

// TestHostileSizes: an oversized request on the control socket and a VIP
// with 10,000 servers are refused with a clear limit, changing nothing.
func TestHostileSizes(t *testing.T) {
	d := newDaemon(t)
	d.Start()
	before := d.MustCLI("service", "list", "-o", "json")

	huge := api.ServiceRequest{VIP: vip}
	for i := 0; len(huge.Servers)*20 < 2*api.MaxRequestBytes; i++ {
		huge.Servers = append(huge.Servers, fmt.Sprintf("127.%d.%d.%d:8502", i>>16&255, i>>8&255, i&255))
	}
	_, err := d.Client().SetService(context.Background(), huge)
	if !errors.Is(err, api.ErrTooLarge) || !strings.Contains(err.Error(), "request larger than") {
		t.Errorf("a %d-server request of over %d bytes: %v, want it refused as too large", len(huge.Servers), api.MaxRequestBytes, err)
	}

	args := []string{"service", "set", vip}
	for i := 0; i < 10000; i++ {
		args = append(args, fmt.Sprintf("127.1.%d.%d:8502", i>>8, i&255))
	}
	if _, errOut, code := d.CLI(args...); code == 0 || !strings.Contains(errOut, "10000 servers, at most 1024") {
		t.Errorf("10,000 servers: exit %d, %q; want the limit named", code, errOut)
	}
	if after := d.MustCLI("service", "list", "-o", "json"); after != before {
		t.Errorf("refused requests changed the services:\n%s\n%s", before, after)
	}
}
