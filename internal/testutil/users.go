package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// RunAs runs name as uid with groups (the first is the primary group) and
// no capabilities, and returns its combined output and exit code (-1 when
// it could not start). The security tests use it with real unprivileged
// users.
func RunAs(uid uint32, groups []uint32, name string, args ...string) (string, int) {
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: groups[0], Groups: groups[1:]}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), ee.ExitCode()
	}
	if err != nil {
		return err.Error(), -1
	}
	return out.String(), 0
}

// SharedDir makes a temporary directory any user may traverse (0755), for a
// socket that only its own mode should protect; it goes when the test ends.
func SharedDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctlb-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
