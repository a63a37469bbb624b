package containerd

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/node"
)

// Release is one containerd release the suite runs against: Debian's 1.6,
// or 2.x built from the Go module proxy.
type Release struct {
	// Name is the subtest name: "containerd-1.6" or V2Name; Version is
	// the exact release when known (v2.4.2).
	Name, Version string
	// BinDir holds containerd, ctr and containerd-shim-runc-v2; empty means
	// Debian's on PATH.
	BinDir string
	// V2 says the config is containerd 2.x's (version 3) and that the CNI
	// chain gets runtimeConfig.cgroupPath.
	V2 bool
}

// Debian is Debian 12's containerd 1.6 (apt-get install containerd).
var Debian = Release{Name: "containerd-1.6", Version: "1.6"}

// bin is the path of one of the runtime's binaries.
func (r Release) bin(name string) string {
	if r.BinDir == "" {
		return name
	}
	return filepath.Join(r.BinDir, name)
}

// env is containerd's environment: its own shim first on PATH, or
// containerd 2.x picks up Debian's 1.6 shim.
func (r Release) env() []string {
	env := os.Environ()
	if r.BinDir == "" {
		return env
	}
	return append(env, "PATH="+r.BinDir+":"+os.Getenv("PATH"))
}

var (
	v2Once sync.Once
	v2     Release
	v2Err  error
)

// V2 is containerd 2.x, built once by hack/build-containerd.sh into the
// cache outside the tree (about 80 s cold; make test runs the script before
// the tests). The test is skipped (failed in CI) when it cannot be built.
func V2(t testing.TB) Release {
	t.Helper()
	v2Once.Do(func() { v2, v2Err = buildV2() })
	testutil.Require(t, v2Err == nil, fmt.Sprintf("containerd 2.x: %v", v2Err))
	return v2
}

// V2Name is the subtest name of containerd 2.x, whatever its minor.
const V2Name = "containerd-2.x"

func buildV2() (Release, error) {
	dir, err := node.RunHackScript("build-containerd.sh", 10*time.Minute)
	if err != nil {
		return Release{}, err
	}
	// The cache directory is named by the version (v2.4.2).
	return Release{Name: V2Name, Version: filepath.Base(dir), BinDir: dir, V2: true}, nil
}

// ReleaseEnv names the release FromEnv picks: "1.6" (the default) or "2.x".
const ReleaseEnv = "CTLB_CONTAINERD"

// FromEnv is the release $CTLB_CONTAINERD names, for tests that run once,
// on one release (the Consul flagship): Debian's 1.6 by default, 2.x with
// CTLB_CONTAINERD=2.x.
func FromEnv(t testing.TB) Release {
	t.Helper()
	switch v := os.Getenv(ReleaseEnv); v {
	case "", "1.6", Debian.Name:
		return Debian
	case "2", "2.x", V2Name:
		return V2(t)
	default:
		t.Fatalf("%s=%q: want 1.6 or 2.x", ReleaseEnv, v)
		return Release{}
	}
}
