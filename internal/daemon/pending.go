package daemon

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/pkg/api"
)

// pendingWatcher is the running watcher, or nil before Run starts it or
// after it stopped.
func (d *Daemon) pendingWatcher() *pending.Watcher {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pending
}

// startPending starts completing pending attachments: records the CNI
// plugin left in <stateDir>/pending because the pod cgroup did not exist at
// ADD. Records left while no daemon ran are completed now. The watcher stops
// with ctx.
func (d *Daemon) startPending(ctx context.Context) error {
	if d.cgroups.Mount == "" {
		d.log.Warn("no cgroup v2 hierarchy: pending attachments are not completed")
		return nil
	}
	d.mu.Lock()
	stateDir := d.cfg.StateDir
	d.mu.Unlock()
	// Made here rather than in the watcher's goroutine, so a bad state
	// directory fails the start instead of a background loop.
	if err := pending.EnsureDir(stateDir); err != nil {
		return err
	}
	w := pending.NewWatcher(stateDir, d.dp, podcgroup.NewResolver(d.cgroups), d.log.With("part", "pending"))
	w.Completed = func(waited time.Duration) { d.m.pendingSeconds.Observe(waited.Seconds()) }
	d.mu.Lock()
	d.pending = w
	d.mu.Unlock()
	go func() {
		defer func() {
			d.mu.Lock()
			d.pending = nil
			d.mu.Unlock()
		}()
		if err := w.Run(ctx); err != nil {
			d.log.Error("pending attachments: watcher stopped", "error", err)
		}
	}()
	return nil
}

// pendingCount is the number of pending attachments, for status.
func (d *Daemon) pendingCount() int {
	if w := d.pendingWatcher(); w != nil {
		return w.Count()
	}
	d.mu.Lock()
	stateDir := d.cfg.StateDir
	d.mu.Unlock()
	recs, _ := pending.List(stateDir)
	return len(recs)
}

// notifyPending is POST /v1/pending: the plugin wrote a record and asks for
// it to be looked at now. The answer says whether it is attached already.
func (d *Daemon) notifyPending(w http.ResponseWriter, r *http.Request) {
	var req api.PendingNotice
	if err := decode(w, r, &req); err != nil {
		reply(w, nil, err)
		return
	}
	if err := pending.ValidateContainerID(req.Key()); err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	pw := d.pendingWatcher()
	if pw == nil {
		reply(w, nil, httpError{http.StatusServiceUnavailable, errors.New("pending attachments are not being completed (no cgroup v2 hierarchy, or the watcher stopped)")})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	st, err := pw.Kick(ctx, req.Key())
	if err != nil {
		reply(w, nil, httpError{http.StatusServiceUnavailable, err})
		return
	}
	out := apiPending(st)
	out.StateDir = pw.StateDir()
	reply(w, out, nil)
}

// listPending is GET /v1/pending: the records still waiting.
func (d *Daemon) listPending(w http.ResponseWriter, r *http.Request) {
	if pw := d.pendingWatcher(); pw != nil {
		reply(w, apiPendingList(pw.List()), nil)
		return
	}
	d.mu.Lock()
	stateDir := d.cfg.StateDir
	d.mu.Unlock()
	recs, err := pending.List(stateDir)
	out := []pending.Status{}
	for _, rec := range recs {
		out = append(out, pending.Status{Record: rec, State: pending.StatePending})
	}
	reply(w, apiPendingList(out), err)
}
