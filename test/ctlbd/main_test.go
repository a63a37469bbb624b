// Package ctlbd_test drives the real ctlbd binary, daemon and CLI, against
// the real kernel: private bpffs mounts, test cgroups and network namespaces.
package ctlbd_test

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

var ctlbd string // path of the built binary

func TestMain(m *testing.M) {
	testutil.RunClientIfChild()
	dir, err := os.MkdirTemp("", "ctlbd-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err := testutil.BuildBinaries(dir, "./cmd/ctlbd")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	ctlbd = bins["ctlbd"]
	// Unprivileged users in the security tests must be able to run it.
	_ = os.Chmod(dir, 0o755)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// newDaemon prepares the real ctlbd on a private bpffs and socket, with
// extra `run` flags; Start runs it (internal/testutil/ctlbdtest is the one
// runner every test package uses).
func newDaemon(t *testing.T, extra ...string) *ctlbdtest.Daemon {
	t.Helper()
	return ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Args: extra})
}

// newDaemonIn is newDaemon for a daemon living in netns (its proxy and
// metrics listeners are there).
func newDaemonIn(t *testing.T, netns ns.NetNS, extra ...string) *ctlbdtest.Daemon {
	t.Helper()
	return ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, NetNS: netns, Args: extra})
}

func run(args ...string) (string, string, int) {
	cmd := exec.Command(ctlbd, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
	}
	return out.String(), errOut.String(), code
}

// lines splits a table's output into rows of fields.
func lines(s string) [][]string {
	var out [][]string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 {
			out = append(out, f)
		}
	}
	return out
}
