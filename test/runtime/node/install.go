package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// A Tool is a command or file a test needs and the Debian package that
// installs it. hack/install-deps.sh installs all of them for CI; a test
// installs what is still missing itself, as kubelet's node setup would.
type Tool struct {
	Path    string // a command name (looked up in PATH) or an absolute path
	Package string
}

// CNI plugins land in /usr/lib/cni with Debian's containernetworking-plugins.
const DebianCNIDir = "/usr/lib/cni"

// Tools for each runtime.
var (
	ContainerdTools = []Tool{
		{"nsenter", "util-linux"},
		{"containerd", "containerd"},
		{"ctr", "containerd"},
		{"runc", "runc"},
		{DebianCNIDir + "/bridge", "containernetworking-plugins"},
		{DebianCNIDir + "/host-local", "containernetworking-plugins"},
		{DebianCNIDir + "/loopback", "containernetworking-plugins"},
	}
	PodmanTools = []Tool{
		{"nsenter", "util-linux"},
		{"podman", "podman"},
		{"conmon", "conmon"},
		{"runc", "runc"},
		{"catatonit", "catatonit"},
		{DebianCNIDir + "/bridge", "containernetworking-plugins"},
		{DebianCNIDir + "/host-local", "containernetworking-plugins"},
		{DebianCNIDir + "/loopback", "containernetworking-plugins"},
	}
	// CrunTools: podman with crun instead of runc.
	CrunTools = []Tool{{"crun", "crun"}}
)

// installMu serialises apt-get between parallel tests.
var installMu sync.Mutex

// RequireTools installs the packages of missing tools with apt-get, then
// skips the test (fails it in CI) if any tool is still missing.
func RequireTools(t testing.TB, tools []Tool) {
	t.Helper()
	testutil.RequireRoot(t)
	installMu.Lock()
	defer installMu.Unlock()
	missing := missingPackages(tools)
	if len(missing) == 0 {
		return
	}
	t.Logf("installing missing packages: %s", strings.Join(missing, " "))
	if out, err := aptInstall(missing); err != nil {
		t.Logf("apt-get: %v\n%s", err, out)
	}
	still := missingPackages(tools)
	testutil.Require(t, len(still) == 0, fmt.Sprintf("Debian packages %v are not installed and apt-get could not install them", still))
}

func missingPackages(tools []Tool) []string {
	seen := map[string]bool{}
	var out []string
	for _, tl := range tools {
		if present(tl.Path) || seen[tl.Package] {
			continue
		}
		seen[tl.Package] = true
		out = append(out, tl.Package)
	}
	return out
}

func present(p string) bool {
	if strings.HasPrefix(p, "/") {
		_, err := os.Stat(p)
		return err == nil
	}
	_, err := exec.LookPath(p)
	return err == nil
}

// aptInstall installs pkgs, refreshing the package lists first; bounded so a
// stuck mirror fails the test instead of hanging it.
func aptInstall(pkgs []string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	update := exec.CommandContext(ctx, "apt-get", "update", "-qq")
	update.Env = env
	if out, err := update.CombinedOutput(); err != nil {
		return out, fmt.Errorf("apt-get update: %w", err)
	}
	install := exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)...)
	install.Env = env
	out, err := install.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("apt-get install %s: %w", strings.Join(pkgs, " "), err)
	}
	return out, nil
}
