package discovery

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// script writes an executable shell script and returns its path.
func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "servers.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestExecFollowsOutput: the command's output (spaces, newlines, optional
// ports) becomes the list and is re-read every Interval; a failing run
// reports an error and a fixed one recovers.
func TestExecFollowsOutput(t *testing.T) {
	data := filepath.Join(t.TempDir(), "list")
	write := func(s string) {
		if err := os.WriteFile(data, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("198.18.7.1 198.18.7.2:9000\n")
	// The command fails (with a message) while the file holds "fail".
	cmd := script(t, `if grep -q fail "$1"; then echo "no auto-join provider" >&2; exit 3; fi; cat "$1"`)
	c := run(t, Exec{Command: []string{cmd, data}, Interval: 200 * time.Millisecond})
	next := c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.7.1:8502", "198.18.7.2:9000"))

	write("198.18.7.3\n198.18.7.1\n")
	next = c.waitServers(t, next, 5*time.Second, aps(t, "198.18.7.1:8502", "198.18.7.3:8502"))

	write("fail")
	next, err := c.waitErr(t, next, 5*time.Second)
	if !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "no auto-join provider") {
		t.Fatalf("error %q: want the exit status and stderr", err)
	}
	write("198.18.7.4")
	c.waitServers(t, next, 5*time.Second, aps(t, "198.18.7.4:8502"))
}

func TestExecErrors(t *testing.T) {
	ctx := context.Background()
	cases := map[string]Exec{
		"bad output": {Command: []string{script(t, "echo not-an-address")}},
		"too much":   {Command: []string{script(t, "head -c 2000000 /dev/zero | tr '\\0' 'x'")}},
		"empty":      {Command: []string{script(t, "true")}},
		"timeout":    {Command: []string{script(t, "sleep 5")}, Timeout: 200 * time.Millisecond},
		"missing":    {Command: []string{filepath.Join(t.TempDir(), "nonexistent")}},
		"no command": {},
	}
	for name, e := range cases {
		start := time.Now()
		got, _, err := e.Once(ctx)
		if err == nil {
			t.Errorf("%s: got %v, want an error", name, got)
			continue
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s: took %s, the timeout did not cut it", name, d)
		}
		t.Logf("%s: %v", name, err)
	}
}

// TestExecKillsProcessGroup: a command that times out, and one that ends
// but leaves a background child, take their whole process group with them:
// no grandchild survives the run.
func TestExecKillsProcessGroup(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		body    string
		timeout time.Duration
		wantErr bool
	}{
		// The grandchild holds no pipe: only the group kill reaches it.
		"timeout": {body: `sleep 60 >/dev/null 2>&1 & echo $! > "$1"; sleep 60`, timeout: 2 * time.Second, wantErr: true},
		"ends":    {body: `sleep 60 >/dev/null 2>&1 & echo $! > "$1"; echo 198.18.7.1`, timeout: 5 * time.Second},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			pidFile := filepath.Join(t.TempDir(), "pid")
			e := Exec{Command: []string{script(t, tc.body), pidFile}, Timeout: tc.timeout}
			start := time.Now()
			_, _, err := e.Once(context.Background())
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			t.Logf("run took %s: %v", time.Since(start).Round(time.Millisecond), err)
			b, err := os.ReadFile(pidFile)
			if err != nil {
				t.Fatal(err)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatal(err)
			}
			// The grandchild was reparented; once killed, its parent reaps
			// it. Alive means running or sleeping in /proc.
			deadline := time.Now().Add(5 * time.Second)
			for {
				st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				if err != nil || procState(string(st)) == "Z" {
					return // gone (or dead, awaiting its reaper)
				}
				if time.Now().After(deadline) {
					syscall.Kill(pid, syscall.SIGKILL)
					t.Fatalf("grandchild %d still alive 5s after the run: %s", pid, st)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// procState is the state field of /proc/PID/stat (after the "(comm)").
func procState(stat string) string {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 || i+3 > len(stat) {
		return ""
	}
	return stat[i+2 : i+3]
}
