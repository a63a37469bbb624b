// Package topo builds what the benchmark runs in and takes it down again:
// named network namespaces joined by veth pairs, cgroups, a private bpffs,
// and child processes started by PID inside a namespace and a cgroup. It is
// the program's counterpart of internal/testutil, which is tied to testing.T:
// every piece registers its own removal on an Undo stack, which the caller
// unwinds on success, on error and on Ctrl-C alike.
package topo

import (
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
	for {
		u.mu.Lock()
		if len(u.fns) == 0 {
			u.mu.Unlock()
			return
		}
		s := u.fns[len(u.fns)-1]
		u.fns = u.fns[:len(u.fns)-1]
		u.mu.Unlock()
		if err := s.fn(); err != nil {
			slog.Warn("cleanup failed", "what", s.what, "err", err)
		}
	}
}
