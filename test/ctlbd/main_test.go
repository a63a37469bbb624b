// Package ctlbd_test drives the real ctlbd binary, daemon and CLI, against
// the real kernel: private bpffs mounts, test cgroups and network namespaces.
package ctlbd_test

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

var ctlbd string // path of the built binary

func TestMain(m *testing.M) {
	testutil.MainWithBinaries(m, func(bins map[string]string) { ctlbd = bins["ctlbd"] }, "./cmd/ctlbd")
}

// newDaemon prepares the real ctlbd on a private bpffs and socket, with
// extra `run` flags; Start runs it (internal/testutil/ctlbdtest is the one
// runner every test package uses).
func newDaemon(t testing.TB, extra ...string) *ctlbdtest.Daemon {
	t.Helper()
	return ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Args: extra})
}

// newDaemonIn is newDaemon for a daemon living in netns (its proxy and
// metrics listeners are there).
func newDaemonIn(t testing.TB, netns ns.NetNS, extra ...string) *ctlbdtest.Daemon {
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
