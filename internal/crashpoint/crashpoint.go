// Package crashpoint lets a test crash ctlbd inside a step, not only
// between steps: with CTLB_CRASHPOINT=NAME (or NAME@N for the N-th time)
// in its environment, the process SIGKILLs itself when it reaches the named
// point. The points sit where a crash would leave the most half-done state
// (pins partly made, a set built but not swapped in, a pending attachment
// made but its record not yet removed, a program upgrade half-way, a
// re-pin half-way). Without the variable, Hit is one comparison.
//
// This is how test/ctlbd proves crash-only behaviour: after every such
// crash, a restarted daemon serves the old or the new state, never a
// broken one (ARCHITECTURE.md I1, I3).
package crashpoint

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

// Env is the environment variable naming the point.
const Env = "CTLB_CRASHPOINT"

// The points ctlb's code has.
const (
	CreateMaps      = "create-maps"      // maps pinned, programs not yet
	CreatePrograms  = "create-programs"  // first program pinned, the rest not yet
	SetPrepared     = "set-prepared"     // a new set's inner array made and frozen, not swapped in
	SetSwapped      = "set-swapped"      // swapped in, nothing after it done yet
	PendingAttached = "pending-attached" // pending attachment made, its record not removed
	Upgrade         = "upgrade"          // first link of an attachment moved to the new program
	Repin           = "repin"            // first missing pin made again, the rest not yet
)

var (
	once  sync.Once
	name  string
	nth   int64
	count atomic.Int64
)

func parse() {
	v := os.Getenv(Env)
	name, nth = v, 1
	if n, at, ok := strings.Cut(v, "@"); ok {
		name = n
		if i, err := strconv.ParseInt(at, 10, 64); err == nil && i > 0 {
			nth = i
		}
	}
}

// Hit kills the process with SIGKILL if point is the one named in the
// environment and this is the N-th time it is reached.
func Hit(point string) {
	once.Do(parse)
	if name == "" || point != name || count.Add(1) < nth {
		return
	}
	fmt.Fprintf(os.Stderr, "crashpoint %s: SIGKILL\n", point)
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is on its way
}
