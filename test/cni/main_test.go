// Package cnitest drives the ctlb CNI plugin the way a runtime does: libcni
// runs a conflist chain of the reference plugins (bridge with host-local
// IPAM, loopback) and the built ctlb binary against pod network namespaces
// and cgroups that each test creates inside its own "node" namespace, with
// ctlbd running in-process on a private bpffs.
package cnitest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
)

// refPlugins are the reference plugins the chains use, from Debian's
// containernetworking-plugins.
var refPlugins = []string{"bridge", "host-local", "loopback", "portmap", "bandwidth"}

const refPluginDir = "/usr/lib/cni"

var (
	// binDir holds ctlb and links to the reference plugins: the CNI_PATH.
	binDir string
	// ctlbBin is the built plugin.
	ctlbBin string
	// missing names a reference plugin that is not installed.
	missing string
)

func TestMain(m *testing.M) {
	testutil.RunClientIfChild()
	dir, err := os.MkdirTemp("", "ctlb-cni-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err := testutil.BuildBinaries(dir, "./plugins/meta/ctlb")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir, ctlbBin = dir, bins["ctlb"]
	for _, p := range refPlugins {
		src := filepath.Join(refPluginDir, p)
		if _, err := os.Stat(src); err != nil {
			missing = src
			continue
		}
		if err := os.Symlink(src, filepath.Join(dir, p)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requirePlugins needs root and the reference plugins.
func requirePlugins(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.Require(t, missing == "", fmt.Sprintf("reference CNI plugin %s missing (apt-get install containernetworking-plugins)", missing))
}
