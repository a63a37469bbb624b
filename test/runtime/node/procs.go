package node

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Alive reports whether pid runs. It reads the state in /proc/PID/stat:
// exited shims and conmon processes linger as zombies when their new parent
// does not reap them, and kill(pid, 0) still succeeds on a zombie.
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	state := b[i+2]
	return state != 'Z' && state != 'X'
}

// WaitGone waits, at most limit, until pid no longer runs, and says whether
// it is gone.
func WaitGone(pid int, limit time.Duration) bool {
	for deadline := time.Now().Add(limit); ; time.Sleep(10 * time.Millisecond) {
		if !Alive(pid) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// KillMatching SIGKILLs, by PID, every live process whose argument vector
// matches, and waits until each is gone. Tests use it for the helpers a
// runtime daemonises (containerd shims, conmon), matched on paths unique to
// the test, never on a program name alone.
func KillMatching(t testing.TB, match func(argv []string) bool) {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Errorf("list processes: %v", err)
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue
		}
		if !match(strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")) || !Alive(pid) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		if !WaitGone(pid, 5*time.Second) {
			t.Errorf("process %d still runs after SIGKILL", pid)
		}
	}
}
