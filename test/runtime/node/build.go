package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// RunHackScript runs one of the module's hack/build-*.sh scripts, which
// print the cache directory of what they built, and returns that directory.
func RunHackScript(name string, limit time.Duration) (string, error) {
	root, err := testutil.ModuleRoot()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "hack", name))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("hack/%s: %w\n%s", name, err, stderr.String())
	}
	dir := strings.TrimSpace(string(out))
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return "", fmt.Errorf("hack/%s printed %q, not a directory", name, dir)
	}
	return dir, nil
}

var (
	refOnce sync.Once
	refDir  string
	refErr  error
)

// ReferencePlugins is a directory with bridge, host-local and loopback
// from github.com/containernetworking/plugins at a version that speaks CNI
// 1.1.0 (STATUS), built once by hack/build-cni-plugins.sh into the cache
// outside the tree. The test is skipped (failed in CI) when they cannot be
// built.
func ReferencePlugins(t testing.TB) string {
	t.Helper()
	refOnce.Do(func() { refDir, refErr = RunHackScript("build-cni-plugins.sh", 5*time.Minute) })
	testutil.Require(t, refErr == nil, fmt.Sprintf("reference CNI plugins: %v", refErr))
	return refDir
}
