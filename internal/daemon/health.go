package daemon

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/ctlb/ctlb/internal/servers"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// readiness is what /readyz reports, set as Run gets going.
type readiness struct {
	// configApplied: the config's VIPs are in the maps (set once; a reload
	// that is rejected keeps the config that was applied).
	configApplied atomic.Bool
	// serving: the control API listens (the CNI plugin can reach ctlbd).
	serving atomic.Bool
	// configWatch: the config file is watched (when there is one and
	// watching is on).
	configWatch atomic.Bool
}

// Probe is the answer of /healthz and /readyz: each check's verdict, "ok"
// or what is wrong.
type Probe struct {
	Status string            `json:"status"` // ok or fail
	Checks map[string]string `json:"checks"`
}

// healthChecks: the process answers and its maps are open and readable.
// A failing liveness check means a restart may help (the maps were
// removed, the handles broke).
func (d *Daemon) healthChecks() map[string]string {
	c := map[string]string{}
	if _, err := d.dp.Services(); err != nil {
		c["maps"] = fmt.Sprintf("read the service map: %v", err)
	} else {
		c["maps"] = "ok"
	}
	return c
}

// readyChecks: the config is applied, every source of every tracked VIP
// answered well formed at least once (an empty answer included: ctlbd
// knows what it was told to find),
// the pending-attachment watcher runs and the control API serves.
func (d *Daemon) readyChecks() map[string]string {
	c := d.healthChecks()
	c["config"] = okIf(d.ready.configApplied.Load(), "not applied yet")
	c["controlAPI"] = okIf(d.ready.serving.Load(), "not serving yet")
	if d.cgroups.Mount == "" {
		c["pendingWatcher"] = "no cgroup v2 hierarchy: pending attachments cannot be completed"
	} else {
		c["pendingWatcher"] = okIf(d.pendingWatcher() != nil, "not running")
	}
	if d.cfgPath != "" && !d.NoConfigWatch {
		c["configWatch"] = okIf(d.ready.configWatch.Load(), "the config file is not being watched")
	}
	c["sources"] = sourcesReady(d.snapshots())
	return c
}

// sourcesReady is the "sources" check: "ok" when every source of every
// tracked VIP answered well formed (an empty answer included), else the
// sources never reached ("no answer yet from: ...") and those that
// answered only with errors ("failing: VIP SOURCE: ERROR"). Why errors
// hold readiness back: servers.SourceStatus.NotReady.
func sourcesReady(snaps map[datapath.ServiceKey]servers.Snapshot) string {
	var waiting, failing []string
	for vip, snap := range snaps {
		for _, src := range snap.Sources {
			switch why := src.NotReady(); {
			case why == "":
			case src.Reached:
				failing = append(failing, vip.String()+" "+src.Name+": "+strings.TrimPrefix(why, "failing: "))
			default:
				waiting = append(waiting, vip.String()+" "+src.Name)
			}
		}
	}
	slices.Sort(waiting)
	slices.Sort(failing)
	var parts []string
	if len(waiting) > 0 {
		parts = append(parts, "no answer yet from: "+strings.Join(waiting, ", "))
	}
	if len(failing) > 0 {
		parts = append(parts, "failing: "+strings.Join(failing, "; "))
	}
	if len(parts) == 0 {
		return "ok"
	}
	return strings.Join(parts, "; ")
}

func okIf(ok bool, why string) string {
	if ok {
		return "ok"
	}
	return why
}

// serveProbe answers 200 when every check is ok, else 503, with the checks
// as JSON either way.
func serveProbe(checks func() map[string]string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p := Probe{Status: "ok", Checks: checks()}
		for _, v := range p.Checks {
			if v != "ok" {
				p.Status = "fail"
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		if p.Status != "ok" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(w).Encode(p)
	}
}
