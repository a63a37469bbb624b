package topo

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroup creates the cgroup dir (its parent must exist) and registers the
// removal of it and everything below it.
func Cgroup(u *Undo, dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	u.Push("cgroup "+dir, func() error { return RemoveCgroup(dir) })
	return nil
}

// RemoveCgroup kills what still runs in the cgroup tree at dir and removes
// it deepest first, since rmdir refuses a cgroup with children or tasks; it
// returns what it could not remove. internal/testutil's RemoveCgroup is this
// with a testing.TB.
func RemoveCgroup(dir string) error {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		deadline := time.Now().Add(5 * time.Second)
		for {
			killProcs(d)
			err := os.Remove(d)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// killProcs SIGKILLs the processes listed in one cgroup, by PID: they are
// the test's own children placed there.
func killProcs(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// CPU is CPU time: all of it, and the part spent in user mode.
type CPU struct {
	Total, User time.Duration
}

// Sub is c minus d.
func (c CPU) Sub(d CPU) CPU { return CPU{c.Total - d.Total, c.User - d.User} }

// CgroupCPU is the CPU time the processes of a cgroup (and its descendants)
// have used, from its cpu.stat, which cgroup v2 keeps for every cgroup
// whether or not the cpu controller is enabled.
func CgroupCPU(dir string) (CPU, error) {
	f, err := os.Open(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return CPU{}, fmt.Errorf("cgroup cpu: %w", err)
	}
	defer f.Close()
	var c CPU
	found := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok || (k != "usage_usec" && k != "user_usec") {
			continue
		}
		us, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return CPU{}, fmt.Errorf("%s/cpu.stat: %w", dir, err)
		}
		d := time.Duration(us) * time.Microsecond
		if k == "usage_usec" {
			c.Total = d
		} else {
			c.User = d
		}
		found++
	}
	if found != 2 {
		return CPU{}, fmt.Errorf("%s/cpu.stat: no usage_usec or user_usec", dir)
	}
	return c, nil
}

// SystemCPU is the time all CPUs spent not idle, from /proc/stat: it
// includes work the kernel charges to no cgroup (ksoftirqd, kworkers).
func SystemCPU() (CPU, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPU{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return CPU{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	// user nice system idle iowait irq softirq steal ...; in USER_HZ,
	// which is 100 on every Linux ABI Go supports.
	var ticks [7]uint64
	for i := range ticks {
		if ticks[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return CPU{}, fmt.Errorf("/proc/stat: %w", err)
		}
	}
	tick := 10 * time.Millisecond
	user := ticks[0] + ticks[1]
	busy := user + ticks[2] + ticks[5] + ticks[6]
	return CPU{Total: time.Duration(busy) * tick, User: time.Duration(user) * tick}, nil
}

// MountBPFFS mounts a private bpffs on a new temporary directory whose name
// starts with prefix.
func MountBPFFS(u *Undo, prefix string) (string, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return "", fmt.Errorf("bpffs: %w", err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		return "", fmt.Errorf("mount bpffs on %s: %w", dir, err)
	}
	u.Push("bpffs "+dir, func() error {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
		return os.Remove(dir)
	})
	return dir, nil
}
