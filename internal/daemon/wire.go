package daemon

import (
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// The API owns its wire types (pkg/api); these turn the daemon's and the
// datapath's values into them, so either side can change its insides
// without changing what clients read.

func apiService(s datapath.Service) api.Service {
	s = s.Normalized()
	return api.Service{VIP: s.VIP, Servers: s.Servers, Empty: string(s.Empty), Protocol: string(s.Protocol), Balance: string(s.Balance), OnServerRemoved: string(s.OnServerRemoved)}
}

func apiServices(list []datapath.Service) []api.Service {
	out := make([]api.Service, 0, len(list))
	for _, s := range list {
		out = append(out, apiService(s))
	}
	return out
}

func apiAttachment(a datapath.Attachment) api.Attachment {
	return api.Attachment{ID: a.ID, CgroupID: a.CgroupID, CgroupPath: a.CgroupPath, Alive: a.Alive, Missing: a.Missing}
}

func apiAttachments(list []datapath.Attachment) []api.Attachment {
	out := make([]api.Attachment, 0, len(list))
	for _, a := range list {
		out = append(out, apiAttachment(a))
	}
	return out
}

func apiPending(st pending.Status) api.PendingAttachment {
	r := st.Record
	return api.PendingAttachment{
		ContainerID: r.ContainerID, AttachmentID: r.AttachmentID, BPFFS: r.BPFFS,
		CgroupDir: r.CgroupDir, PodUID: r.PodUID, PodNamespace: r.PodNamespace, PodName: r.PodName, Netns: r.Netns,
		NetnsID: api.NetnsID{Dev: r.NetnsID.Dev, Ino: r.NetnsID.Ino},
		Created: r.Created, State: st.State, Cgroup: st.Cgroup, Error: st.Error,
	}
}

func apiPendingList(list []pending.Status) []api.PendingAttachment {
	out := make([]api.PendingAttachment, 0, len(list))
	for _, st := range list {
		out = append(out, apiPending(st))
	}
	return out
}
