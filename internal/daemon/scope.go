package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/nri"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Scopes besides the CNI plugin's pod scope: containers named by a pod
// annotation (the NRI plugin) and the whole host (one attachment at the
// cgroup v2 root, the same one a CNI conf with "scope": "host" makes).

// startNRI runs the NRI plugin until ctx ends when the config asks for it.
func (d *Daemon) startNRI(ctx context.Context) {
	if d.cfg.NRI == nil {
		return
	}
	if d.cgroups.Mount == "" {
		d.log.Error("NRI plugin not started: no cgroup v2 hierarchy")
		return
	}
	d.nri = nri.New(nri.Options{Socket: d.cfg.NRI.Socket, Datapath: d.dp, Cgroups: d.cgroups, Log: d.log.With("part", "nri")})
	go func() { _ = d.nri.Run(ctx) }()
}

// nriStatus fills the NRI fields of ctlbd status.
func (d *Daemon) nriStatus(st *api.Status) {
	if d.nri == nil {
		return
	}
	st.NRI, st.NRISocket = api.NRIDisconnected, d.nri.Socket()
	if d.nri.Connected() {
		st.NRI = api.NRIConnected
	}
}

// hostAttached reports whether the host-wide attachment exists.
func (d *Daemon) hostAttached() bool {
	a, err := d.dp.Attachment(cni.HostAttachmentID)
	return err == nil && a.Alive
}

// AttachHost attaches at the cgroup v2 root: every socket of the host.
// Attaching again is a no-op.
func (d *Daemon) AttachHost() (datapath.Attachment, error) {
	if d.cgroups.Mount == "" {
		return datapath.Attachment{}, httpError{http.StatusServiceUnavailable, errors.New("no cgroup v2 hierarchy on this host")}
	}
	root, err := d.cgroups.Resolve(d.cgroups.Mount, true)
	if err != nil {
		return datapath.Attachment{}, err
	}
	if a, err := d.dp.Attachment(cni.HostAttachmentID); err == nil && a.Alive && len(a.Missing) == 0 {
		return a, nil
	}
	a, err := d.dp.Attach(cni.HostAttachmentID, root)
	if err != nil {
		return a, fmt.Errorf("attach at the cgroup v2 root %s: %w", root, err)
	}
	d.log.Info("attached host-wide", "id", a.ID, "cgroup", root)
	return a, nil
}

// DetachHost removes the host-wide attachment.
func (d *Daemon) DetachHost() (datapath.Attachment, error) {
	a, err := d.dp.Attachment(cni.HostAttachmentID)
	if errors.Is(err, datapath.ErrNoAttachment) {
		return a, httpError{http.StatusNotFound, errors.New("ctlb is not attached host-wide")}
	}
	if err != nil {
		return a, err
	}
	if err := d.dp.Detach(cni.HostAttachmentID); err != nil && !errors.Is(err, datapath.ErrNoAttachment) {
		return a, err
	}
	d.log.Info("detached host-wide", "id", a.ID, "cgroup", a.CgroupPath)
	return a, nil
}
