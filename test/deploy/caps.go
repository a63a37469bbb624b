package deploy

import "slices"

// Needed is the minimal capability set of ctlbd in a Kubernetes pod (the
// bpffs mounted by the init container), as test/deploy finds it by running
// ctlbd with each capability dropped (caps_test.go); NeededWithGroup adds
// what socketGroup takes. The chart and the systemd unit grant these, and
// test/manifests checks the chart against this list.
//
// CAP_SYS_ADMIN: a daemon that adopts pinned maps opens each VIP's inner
// backend array by ID (BPF_MAP_GET_FD_BY_ID), which only CAP_SYS_ADMIN may
// do; and the kernel's bpf_capable() and bpf_net_capable() accept
// CAP_SYS_ADMIN for CAP_BPF and CAP_NET_ADMIN, so those two add nothing
// beside it (the test shows each is dispensable). CAP_SYS_PTRACE: reading
// /proc/PID/ns/net of a sandbox process that has more capabilities than
// ctlbd. CAP_CHOWN: giving the socket to socketGroup.
var (
	Needed          = []string{"sys_admin", "sys_ptrace"}
	NeededWithGroup = append(slices.Clone(Needed), "chown")
)
