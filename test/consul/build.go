// Package consul gives tests a real Consul: a binary built from the Go
// module proxy (Debian has no package and nothing else can be downloaded
// here), cached between runs, and a cluster of real servers, each in its
// own network namespace on a bridge inside a "node" namespace with no
// uplink to anything but the test's own host-side link.
package consul

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Version is the Consul release the tests run (RUNTIMES.md: it builds with
// the Go toolchain here).
const Version = "v1.20.1"

const module = "github.com/hashicorp/consul"

// CacheDir is where the built binary is kept: $CTLB_CACHE/consul when set,
// else the user cache directory (~/.cache/ctlb/consul), outside the work
// tree so that a fresh clone (as CI makes) still finds it.
func CacheDir() (string, error) {
	if d := os.Getenv("CTLB_CACHE"); d != "" {
		return filepath.Join(d, "consul"), nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("consul cache dir: %w (set CTLB_CACHE)", err)
	}
	return filepath.Join(d, "ctlb", "consul"), nil
}

// BinaryPath is where the binary for Version lives once built.
func BinaryPath() (string, error) {
	d, err := CacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, Version, "consul"), nil
}

// Build returns the cached binary, building it first when it is missing.
// Concurrent callers (test packages run in parallel) wait on a file lock,
// so it is built once. logf gets progress lines.
func Build(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	bin, err := BinaryPath()
	if err != nil {
		return "", err
	}
	dir := filepath.Dir(bin)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("consul cache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("consul cache lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		logf("consul: another process is building %s; waiting", bin)
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
			return "", fmt.Errorf("consul cache lock: %w", err)
		}
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	if err := checkBinary(ctx, bin); err == nil {
		return bin, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		logf("consul: cached binary unusable (%v); rebuilding", err)
	}
	start := time.Now()
	logf("consul: building %s %s into %s (about 160 s the first time, 40 s with a warm Go build cache)", module, Version, bin)
	// Two tries: a download from the module proxy can fail once.
	for try := 1; ; try++ {
		err := build(ctx, dir, bin, logf)
		if err == nil {
			break
		}
		if try == 2 || ctx.Err() != nil {
			return "", fmt.Errorf("build consul %s: %w", Version, err)
		}
		logf("consul: build failed (%v); trying once more", err)
	}
	if err := checkBinary(ctx, bin); err != nil {
		return "", fmt.Errorf("built consul does not run: %w", err)
	}
	logf("consul: built in %s", time.Since(start).Round(time.Second))
	return bin, nil
}

// checkBinary runs `consul version` and wants Version in it.
func checkBinary(ctx context.Context, bin string) error {
	if _, err := os.Stat(bin); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "version").CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s version: %w: %s", bin, err, out)
	}
	if !strings.Contains(string(out), "Consul "+Version) {
		return fmt.Errorf("%s version: got %q, want Consul %s", bin, strings.TrimSpace(string(out)), Version)
	}
	return nil
}

// goTool is the go command that runs the tests: `go test` puts its own
// GOROOT/bin first in PATH.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go" // the error surfaces when it runs
}

// goEnv is the environment of the go commands: a static binary, the
// toolchain that runs the tests (no toolchain download), no workspace, and
// modules resolved from the proxy since the replace block is gone.
func goEnv() []string {
	env := os.Environ()
	return append(env, "CGO_ENABLED=0", "GOTOOLCHAIN=local", "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false")
}

// build follows RUNTIMES.md: download the module, copy it somewhere
// writable, drop the replace block that points at sibling directories (the
// replaced modules resolve from the proxy at the versions the module
// requires), go build.
func build(ctx context.Context, dir, bin string, logf func(string, ...any)) error {
	logf("consul: go mod download %s@%s", module, Version)
	dl := exec.CommandContext(ctx, goTool(), "mod", "download", "-json", module+"@"+Version)
	dl.Env = goEnv()
	dl.Dir = os.TempDir() // outside any module
	out, err := dl.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("go mod download: %w: %s%s", err, ee.Stderr, out)
		}
		return fmt.Errorf("go mod download: %w", err)
	}
	var info struct{ Dir, Error string }
	if err := json.Unmarshal(out, &info); err != nil || info.Dir == "" {
		return fmt.Errorf("go mod download: no module directory in %q (%v %s)", out, err, info.Error)
	}

	src := filepath.Join(dir, "src")
	if err := os.RemoveAll(src); err != nil {
		return err
	}
	defer os.RemoveAll(src) // a few hundred MB; only the binary is kept
	logf("consul: copying %s to %s", info.Dir, src)
	if err := copyTree(info.Dir, src); err != nil {
		return fmt.Errorf("copy module: %w", err)
	}
	if err := dropReplace(filepath.Join(src, "go.mod")); err != nil {
		return err
	}

	tmp := bin + ".tmp"
	logf("consul: go build (progress every 25 packages)")
	cmd := exec.CommandContext(ctx, goTool(), "build", "-v", "-trimpath", "-o", tmp, ".")
	cmd.Env = goEnv()
	cmd.Dir = src
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	var pkgs atomic.Int64
	tail := make([]string, 0, 40)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "go: downloading") {
				logf("consul: %s", line)
				continue
			}
			if n := pkgs.Add(1); n%25 == 0 {
				logf("consul: go build: %d packages compiled (last %s)", n, line)
			}
			if len(tail) == cap(tail) {
				tail = tail[1:]
			}
			tail = append(tail, line)
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	tick := time.NewTicker(20 * time.Second)
	defer tick.Stop()
	waitErr := make(chan error, 1)
	go func() { <-done; waitErr <- cmd.Wait() }()
	start := time.Now()
	for {
		select {
		case err := <-waitErr:
			if err != nil {
				os.Remove(tmp)
				return fmt.Errorf("go build: %w:\n%s", err, strings.Join(tail, "\n"))
			}
			if err := os.Rename(tmp, bin); err != nil {
				return fmt.Errorf("install consul binary: %w", err)
			}
			return nil
		case <-tick.C:
			logf("consul: go build still running (%s, %d packages so far)", time.Since(start).Round(time.Second), pkgs.Load())
		}
	}
}

var replaceBlock = regexp.MustCompile(`(?ms)^replace\s*\(.*?^\)[ \t]*$|^replace[ \t]+[^\n]*=>[ \t]*\./[^\n]*$`)

// dropReplace removes the replace directives that point into the source
// tree of the main repository (absent from a module zip).
func dropReplace(gomod string) error {
	b, err := os.ReadFile(gomod)
	if err != nil {
		return err
	}
	out := replaceBlock.ReplaceAll(b, nil)
	if err := os.WriteFile(gomod, out, 0o644); err != nil {
		return fmt.Errorf("rewrite %s: %w", gomod, err)
	}
	return nil
}

// copyTree copies a read-only module directory into a writable tree.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(from, p)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(dst, 0o755)
		case d.Type().IsRegular():
			return copyFile(p, dst)
		default:
			return nil // module zips hold no links
		}
	})
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
