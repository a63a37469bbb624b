package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/version"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Handler is the control API.
func (d *Daemon) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathServices, d.listServices)
	mux.HandleFunc("PUT "+api.PathServices, d.handleSetService)
	mux.HandleFunc("DELETE "+api.PathServices+"/{vip}", d.handleDeleteService)
	mux.HandleFunc("GET "+api.PathAttachments, d.listAttachments)
	mux.HandleFunc("POST "+api.PathAttachments, d.attach)
	mux.HandleFunc("DELETE "+api.PathAttachments, d.detach)
	mux.HandleFunc("GET "+api.PathPending, d.listPending)
	mux.HandleFunc("POST "+api.PathPending, d.notifyPending)
	mux.HandleFunc("GET "+api.PathStatus, d.status)
	mux.HandleFunc("GET "+api.PathVersion, d.version)
	mux.HandleFunc("POST "+api.PathReload, d.reload)
	return mux
}

// httpError is an error with the status it answers with.
type httpError struct {
	code int
	err  error
}

func (e httpError) Error() string { return e.err.Error() }

func badRequest(err error) error { return httpError{http.StatusBadRequest, err} }

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		var he httpError
		if errors.As(err, &he) {
			code = he.code
		}
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(api.ErrorResponse{Error: err.Error()})
		return
	}
	if v == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

// decode reads a bounded, strictly-typed JSON body.
// A refused request changes nothing (ARCHITECTURE.md I7).
func decode(_ http.ResponseWriter, r *http.Request, v any) error {
	if err := api.Decode(r.Body, v); err != nil {
		if errors.Is(err, api.ErrTooLarge) {
			return httpError{http.StatusRequestEntityTooLarge, err}
		}
		return badRequest(err)
	}
	return nil
}

func (d *Daemon) listServices(w http.ResponseWriter, r *http.Request) {
	svcs, err := d.dp.Services()
	reply(w, apiServices(svcs), err)
}

func (d *Daemon) handleSetService(w http.ResponseWriter, r *http.Request) {
	var req api.ServiceRequest
	if err := decode(w, r, &req); err != nil {
		reply(w, nil, err)
		return
	}
	svc, err := config.Service{VIP: req.VIP, Servers: req.Servers, Empty: req.Empty, Protocol: req.Protocol, Balance: req.Balance, OnServerRemoved: req.OnServerRemoved}.Datapath()
	if err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	d.mu.Lock()
	if d.trackers[svc.Key()] != nil {
		err = trackedConflict(svc.Key())
	} else if err = d.setServices("api", svc); err == nil {
		d.forgetInLedger(svc.Key())
	}
	d.mu.Unlock()
	reply(w, apiService(svc), err)
}

func (d *Daemon) handleDeleteService(w http.ResponseWriter, r *http.Request) {
	vip, err := datapath.ParseVIP(r.PathValue("vip"))
	if err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	proto, err := datapath.ParseProtocol(r.URL.Query().Get(api.QueryProtocol))
	if err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	key := datapath.ServiceKey{Protocol: proto, VIP: vip}
	d.mu.Lock()
	var existed bool
	if d.trackers[key] != nil {
		err = trackedConflict(key)
	} else {
		existed, err = d.deleteService("api", key)
	}
	d.mu.Unlock()
	if err == nil && !existed {
		err = httpError{http.StatusNotFound, fmt.Errorf("VIP %s is not configured", key)}
	}
	reply(w, nil, err)
}

// trackedConflict refuses a CLI change of a VIP whose set its sources and
// health checks keep: the next change of theirs would undo it.
func trackedConflict(vip datapath.ServiceKey) error {
	return httpError{http.StatusConflict, fmt.Errorf("VIP %s is kept by its config sources and health checks: change the config and reload", vip)}
}

// configured are the keys of the VIPs the config file defines.
func (d *Daemon) configured() map[datapath.ServiceKey]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[datapath.ServiceKey]bool{}
	for _, s := range d.cfg.Services {
		if svc, err := s.Datapath(); err == nil {
			out[svc.Key()] = true
		}
	}
	return out
}

func (d *Daemon) listAttachments(w http.ResponseWriter, r *http.Request) {
	list, err := d.dp.Attachments()
	out := apiAttachments(list)
	d.mu.Lock()
	stateDir := d.cfg.StateDir
	d.mu.Unlock()
	for i := range out {
		// The pod the CNI plugin recorded as the attachment's owner.
		out[i].PodNamespace, out[i].PodName = cni.PodOf(stateDir, out[i].ID)
	}
	reply(w, out, err)
}

// cgroupDir resolves an API cgroup path to an existing directory inside the
// v2 hierarchy, never its root: host-wide scope is the CNI plugin's explicit
// "host" scope, not something a path can ask for by accident.
func (d *Daemon) cgroupDir(path string) (string, error) {
	if d.cgroups.Mount == "" {
		return "", httpError{http.StatusServiceUnavailable, errors.New("no cgroup v2 hierarchy on this host")}
	}
	dir, err := d.cgroups.Resolve(path, false)
	if err != nil {
		return "", badRequest(err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return "", badRequest(fmt.Errorf("cgroup %s does not exist", dir))
	}
	return dir, nil
}

// decodeAttach reads an attach or detach request: a cgroup, or host scope.
func decodeAttach(w http.ResponseWriter, r *http.Request) (api.AttachRequest, bool) {
	var req api.AttachRequest
	err := decode(w, r, &req)
	if err == nil && req.Host && req.Cgroup != "" {
		err = badRequest(fmt.Errorf("host scope is the cgroup v2 root: cgroup %q contradicts it", req.Cgroup))
	}
	if err != nil {
		reply(w, nil, err)
		return req, false
	}
	return req, true
}

func (d *Daemon) attach(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeAttach(w, r)
	if !ok {
		return
	}
	if req.Host {
		a, err := d.AttachHost()
		reply(w, apiAttachment(a), err)
		return
	}
	dir, err := d.cgroupDir(req.Cgroup)
	if err != nil {
		reply(w, nil, err)
		return
	}
	a, err := d.attachCgroup(datapath.CgroupAttachmentID(0), dir)
	reply(w, apiAttachment(a), err)
}

// attachCgroup attaches to dir; an id of "cgroup-0" means one derived from
// the cgroup's ID.
func (d *Daemon) attachCgroup(id, dir string) (datapath.Attachment, error) {
	if id == datapath.CgroupAttachmentID(0) {
		cgID, err := cgroupv2.ID(dir)
		if err != nil {
			return datapath.Attachment{}, err
		}
		id = datapath.CgroupAttachmentID(cgID)
	}
	a, err := d.dp.Attach(id, dir)
	if err == nil {
		d.log.Info("attached", "id", id, "cgroup", dir)
	}
	return a, err
}

func (d *Daemon) detach(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeAttach(w, r)
	if !ok {
		return
	}
	if req.Host {
		a, err := d.DetachHost()
		if err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, []api.Attachment{apiAttachment(a)}, nil)
		return
	}
	dir, err := d.cgroups.Resolve(req.Cgroup, false)
	if err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	list, err := d.dp.Attachments()
	if err != nil {
		reply(w, nil, err)
		return
	}
	var removed []datapath.Attachment
	for _, a := range list {
		if a.CgroupPath != dir {
			continue
		}
		if err := d.dp.Detach(a.ID); err != nil && !errors.Is(err, datapath.ErrNoAttachment) {
			reply(w, nil, err)
			return
		}
		d.log.Info("detached", "id", a.ID, "cgroup", dir)
		removed = append(removed, a)
	}
	if len(removed) == 0 {
		reply(w, nil, httpError{http.StatusNotFound, fmt.Errorf("no attachment on cgroup %s", dir)})
		return
	}
	reply(w, apiAttachments(removed), nil)
}

func (d *Daemon) status(w http.ResponseWriter, r *http.Request) {
	st, err := d.Status()
	reply(w, st, err)
}

// Status gathers what `ctlbd status` shows.
func (d *Daemon) Status() (api.Status, error) {
	st := api.Status{Version: version.Version, BPFFS: d.dp.Dir(), Services: []api.ServiceStatus{}}
	svcs, err := d.dp.Services()
	if err != nil {
		return st, err
	}
	stats, err := d.dp.Stats()
	if err != nil {
		return st, err
	}
	byVIP := map[datapath.ServiceKey][]datapath.ServerStats{}
	for _, s := range stats {
		byVIP[s.Key()] = append(byVIP[s.Key()], s)
	}
	tracked := d.snapshots()
	configured := d.configured()
	for _, svc := range svcs {
		ss := api.ServiceStatus{VIP: svc.VIP.String(), Protocol: string(svc.Protocol), Balance: string(svc.Balance), Empty: string(svc.Empty), OnServerRemoved: string(svc.OnServerRemoved), Servers: []api.ServerStatus{}}
		ss.Config = configured[svc.Key()]
		ended := d.ends.terminated(svc.Key())
		ss.Rebalancing = d.reb.rebalancing(svc.Key())
		counted := map[netip.AddrPort]datapath.ServerStats{}
		for _, s := range byVIP[svc.Key()] {
			counted[s.Server] = s
		}
		listed := map[netip.AddrPort]bool{}
		if snap, ok := tracked[svc.Key()]; ok {
			// Every candidate, in the set or not, with its sources and health.
			ss.Tracked, ss.Panic, ss.Changes, ss.Trimmed = true, snap.Panic, snap.Changes, snap.Trimmed
			ss.LastChange, ss.LastReason = snap.LastChange, snap.LastReason
			for _, src := range snap.Sources {
				as := api.SourceStatus{Name: src.Name, Servers: src.Servers, Errors: src.Errors, LastError: src.LastError, Rejected: src.Rejected,
					LastSuccess: src.LastSuccess, LastFailure: src.LastFailure, FailingSince: src.FailingSince}
				for _, r := range src.RejectedFirst {
					as.RejectedFirst = append(as.RejectedFirst, api.RejectedEntry{Entry: r.Entry, Reason: r.Reason})
				}
				ss.Sources = append(ss.Sources, as)
			}
			inMap := map[netip.AddrPort]bool{}
			for _, srv := range svc.Servers {
				inMap[srv] = true
			}
			for _, c := range snap.Servers {
				ss.Servers = append(ss.Servers, withCounts(api.ServerStatus{Server: c.Addr.String(), Source: strings.Join(c.Sources, ","),
					Health: c.Health.String(), InSet: inMap[c.Addr], LastError: c.LastError,
					HealthSince: c.Since, LastCheck: c.LastCheck}, counted[c.Addr]))
				listed[c.Addr] = true
			}
		}
		// The rest of the maps' servers: a VIP without a tracker has static
		// servers, unchecked; a tracked VIP's servers that no source listed
		// were kept from before (a restart, a reload) and nothing has
		// confirmed them yet.
		source := "static"
		if ss.Tracked {
			source = api.SourceKept
		}
		for _, srv := range svc.Servers {
			if listed[srv] {
				continue
			}
			ss.Servers = append(ss.Servers, withCounts(api.ServerStatus{Server: srv.String(), Source: source, Health: api.HealthUnchecked, InSet: true}, counted[srv]))
			listed[srv] = true
		}
		// Servers that left the set but still have open connections, or
		// had them ended.
		for _, c := range byVIP[svc.Key()] {
			if !listed[c.Server] && (c.Open > 0 || ended[c.Server] > 0) {
				ss.Servers = append(ss.Servers, withCounts(api.ServerStatus{Server: c.Server.String(), InSet: false}, c))
				listed[c.Server] = true
			}
		}
		// Departed servers whose slot the kernel has given back: what
		// ctlbd ended is still worth showing.
		for srv := range ended {
			if !listed[srv] {
				ss.Servers = append(ss.Servers, api.ServerStatus{Server: srv.String(), InSet: false})
			}
		}
		for i := range ss.Servers {
			if srv, err := netip.ParseAddrPort(ss.Servers[i].Server); err == nil {
				ss.Servers[i].Terminated = ended[srv]
				_, ss.Servers[i].FailMarks, _ = d.fail.state(svc.Key(), srv)
			}
		}
		st.Services = append(st.Services, ss)
	}
	atts, err := d.dp.Attachments()
	if err != nil {
		return st, err
	}
	st.Attachments = len(atts)
	st.Pending = d.pendingCount()
	st.Termination = d.ends.how
	if d.proxy != nil {
		st.Proxy = d.proxy.Status()
	}
	// The status stands without the table's count: a failed read is
	// logged, not the status's error.
	if tab, ok, err := d.dp.SocketTable(); err != nil {
		d.log.Warn("status: socket table", "error", err)
	} else if ok {
		st.SocketTable = &api.SocketTable{Size: tab.Size, Used: tab.Used}
	}
	st.HostScope = d.hostAttached()
	d.nriStatus(&st)
	return st, nil
}

// withCounts fills in the kernel's counters of one server.
func withCounts(s api.ServerStatus, c datapath.ServerStats) api.ServerStatus {
	s.Connects, s.Attempts, s.Established, s.Failed, s.Terminated = c.Attempts, c.Attempts, c.Established, c.Failed, c.Terminated
	s.Open, s.Failing = c.Open, c.FailingFor > 0
	return s
}

func (d *Daemon) version(w http.ResponseWriter, r *http.Request) {
	reply(w, api.Version{Version: version.Version, Commit: version.Commit(), Layout: datapath.Layout, Go: runtime.Version()}, nil)
}

func (d *Daemon) reload(w http.ResponseWriter, r *http.Request) {
	if err := d.Reload(); err != nil {
		reply(w, nil, badRequest(err))
		return
	}
	reply(w, nil, nil)
}
