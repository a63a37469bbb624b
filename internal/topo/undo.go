// Package topo builds what the benchmark runs in and takes it down again:
// named network namespaces joined by veth pairs, cgroups, a private bpffs,
// and child processes started by PID inside a namespace and a cgroup. It is
// the core internal/testutil wraps for tests (testutil registers the Undo
// with t.Cleanup), and the benchmark program uses directly: every piece registers its own removal on an Undo stack, which the caller
// unwinds on success, on error and on Ctrl-C alike.
package topo

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// Undo is a stack of removals, run last-in first-out.
type Undo struct {
	mu  sync.Mutex
	fns []undoStep
}

type undoStep struct {
	what string
	fn   func() error
}

// Push registers fn, which removes the thing named by what.
func (u *Undo) Push(what string, fn func() error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.fns = append(u.fns, undoStep{what, fn})
}

// Unwind runs every registered removal, newest first, logging failures and
// going on: one stuck piece must not leave the rest behind.
func (u *Undo) Unwind() {
	for _, err := range u.unwind() {
		slog.Warn("cleanup failed", "error", err)
	}
}

// UnwindErr is Unwind returning the failures instead of logging them (a
// test reports them as errors).
func (u *Undo) UnwindErr() error { return errors.Join(u.unwind()...) }

func (u *Undo) unwind() []error {
	var errs []error
	for {
		u.mu.Lock()
		if len(u.fns) == 0 {
			u.mu.Unlock()
			return errs
		}
		s := u.fns[len(u.fns)-1]
		u.fns = u.fns[:len(u.fns)-1]
		u.mu.Unlock()
		if err := s.fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.what, err))
		}
	}
}
