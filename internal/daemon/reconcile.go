package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// ReconcileResult says what one reconciliation pass repaired.
type ReconcileResult struct {
	Repinned []string `json:"repinned,omitempty"`
	// Dead are attachments whose cgroup is gone, now removed.
	Dead []string `json:"dead,omitempty"`
	// Repaired are attachments that had lost pins, now whole again.
	Repaired []string `json:"repaired,omitempty"`
	Stale    int      `json:"stale,omitempty"`
}

// reconcileLoop runs Reconcile every interval until ctx ends.
func (d *Daemon) reconcileLoop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.Reconcile()
		}
	}
}

// Reconcile makes the pinned state whole again after faults no caller
// reported: pins removed by hand are put back from the daemon's own handles,
// attachments whose pod cgroup died without a CNI DEL are removed, ones that
// lost some of their link pins are re-attached, and temporary directories
// left by a plugin killed half-way are removed. Every repair is logged.
func (d *Daemon) Reconcile() ReconcileResult {
	var r ReconcileResult
	var err error
	start := time.Now()
	if r.Repinned, err = d.dp.Repin(); err != nil {
		d.log.Error("reconcile: re-pin", "error", err)
	}
	if len(r.Repinned) > 0 {
		d.log.Error("reconcile: pins had been removed from under the daemon; pinned them again", "pins", r.Repinned, "bpffs", d.dp.Dir())
	}
	atts, err := d.dp.Attachments()
	if err != nil {
		d.log.Error("reconcile: list attachments", "error", err)
		d.countRepairs(r)
		return r
	}
	d.mu.Lock()
	stateDir := d.cfg.StateDir
	d.mu.Unlock()
	for _, a := range atts {
		switch {
		case !a.Alive:
			attrs := deadAttachmentAttrs(stateDir, a)
			if err := d.dp.Detach(a.ID); err != nil && !errors.Is(err, datapath.ErrNoAttachment) {
				d.log.Error("reconcile: remove dead attachment", append(attrs, "error", err)...)
				continue
			}
			d.log.Info("reconcile: removed attachment of a dead cgroup", attrs...)
			r.Dead = append(r.Dead, a.ID)
		case len(a.Missing) > 0:
			if _, err := d.dp.Attach(a.ID, a.CgroupPath); err != nil {
				d.log.Error("reconcile: repair attachment", "id", a.ID, "missing", a.Missing, "error", err)
				continue
			}
			d.log.Error("reconcile: attachment had lost link pins; re-attached", "id", a.ID, "missing", a.Missing, "cgroup", a.CgroupPath)
			r.Repaired = append(r.Repaired, a.ID)
		}
	}
	if r.Stale, err = d.dp.RemoveStale(time.Minute); err != nil {
		d.log.Error("reconcile: remove stale link directories", "error", err)
	}
	// Every pass, even one that found everything whole: an operator
	// debugging sees that the reconciler runs and what it looked at.
	d.log.Debug("reconcile pass", "bpffs", d.dp.Dir(), "attachments", len(atts), "repinned", len(r.Repinned),
		"dead", len(r.Dead), "repaired", len(r.Repaired), "stale", r.Stale, "duration", time.Since(start).Round(time.Microsecond))
	d.countRepairs(r)
	return r
}

// deadAttachmentAttrs say what a dead attachment was for, as far as is
// left to tell: the cgroup's path is gone and its ID too once the kernel
// has freed it (0), so the pods (or containers) the CNI plugin recorded as
// its owners, and the cgroup ID the link still holds or, failing that, the
// one in the name of an attachment made by "ctlbd attach".
func deadAttachmentAttrs(stateDir string, a datapath.Attachment) []any {
	attrs := []any{"id", a.ID}
	if a.CgroupID != 0 {
		attrs = append(attrs, "cgroupId", a.CgroupID)
	} else if cg, ok := datapath.CgroupIDOf(a.ID); ok {
		attrs = append(attrs, "cgroupId", cg)
	}
	pods, containers := cni.OwnersOf(stateDir, a.ID)
	if len(pods) > 0 {
		attrs = append(attrs, "pods", pods)
	}
	if len(containers) > 0 {
		attrs = append(attrs, "containers", containers)
	}
	return attrs
}

// countRepairs adds a pass's repairs to ctlb_reconcile_repairs_total.
func (d *Daemon) countRepairs(r ReconcileResult) {
	if d.m == nil {
		return
	}
	d.m.repairs.WithLabelValues("repinned").Add(float64(len(r.Repinned)))
	d.m.repairs.WithLabelValues("dead").Add(float64(len(r.Dead)))
	d.m.repairs.WithLabelValues("repaired").Add(float64(len(r.Repaired)))
	d.m.repairs.WithLabelValues("stale").Add(float64(r.Stale))
}
