// Package e2e_test proves ctlb where its users run it: pods started by a
// real containerd (through CRI, as kubelet starts them) and by podman, with
// the ctlb CNI plugin chained after bridge, host-local and loopback, and
// the real ctlbd. No ctlb command is run by hand: whatever redirects a
// pod's connections was done by the plugin when the runtime created the pod.
//
// Topology, per test: a node network namespace with no uplink holds the
// runtime (started with nsenter), the pod bridge (198.18.0.0/24) and the
// real servers on /32s of its lo, outside the pod subnet. The VIP is in
// 198.19.0.0/16, which has no route anywhere: a connection to it only
// succeeds when ctlb rewrote it.
package e2e_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/runtime/images"
	"github.com/ctlb/ctlb/test/runtime/node"
)

var (
	imgs     *images.Set
	ctlbdBin string // the daemon binary
	plugin   string // the CNI plugin binary, "" until it exists
)

func TestMain(m *testing.M) {
	testutil.RunClientIfChild() // the host-scope test's client processes
	if os.Geteuid() != 0 && !testutil.InCI() {
		// Every test here skips without root; building would be wasted.
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "ctlb-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := 1
	defer func() { os.RemoveAll(dir); os.Exit(code) }()
	if imgs, err = images.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	pkgs := []string{"./cmd/ctlbd"}
	if root, err := testutil.ModuleRoot(); err == nil {
		if _, err := os.Stat(filepath.Join(root, "plugins/meta/ctlb/main.go")); err == nil {
			pkgs = append(pkgs, "./plugins/meta/ctlb")
		}
	}
	bins, err := testutil.BuildBinaries(dir, pkgs...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	ctlbdBin, plugin = bins["ctlbd"], bins["ctlb"]
	restore := node.TrackHostPaths()
	code = m.Run()
	restore()
}
