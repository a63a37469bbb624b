package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BuildBinaries builds the named main packages ("./cmd/ctlbd") of this
// module into dir, for tests that exercise the real binaries. Call it from
// TestMain; it returns the path of each binary by its base name.
func BuildBinaries(dir string, pkgs ...string) (map[string]string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, p := range pkgs {
		bin := filepath.Join(dir, filepath.Base(p))
		if filepath.Base(p) == "ctlb" || strings.HasSuffix(p, "plugins/meta/ctlb") {
			bin = filepath.Join(dir, "ctlb")
		}
		cmd := exec.Command("go", "build", "-o", bin, p)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build %s: %v\n%s", p, err, b)
		}
		out[filepath.Base(bin)] = bin
	}
	return out, nil
}

// ModuleRoot finds the directory holding go.mod, from the working directory up.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// MainWithBinaries is a TestMain that builds pkgs once into a temporary
// directory readable by every user (the security tests run them as
// unprivileged users), hands their paths to use, runs the tests and removes
// the binaries.
func MainWithBinaries(m *testing.M, use func(bins map[string]string), pkgs ...string) {
	RunClientIfChild()
	dir, err := os.MkdirTemp("", "ctlb-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err := BuildBinaries(dir, pkgs...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	use(bins)
	_ = os.Chmod(dir, 0o755)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
