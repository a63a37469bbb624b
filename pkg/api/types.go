package api

import (
	"net/netip"
	"time"
)

// ErrorResponse is the body of every non-2xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}

// ServiceRequest sets one VIP's static servers (ctlbd service set).
type ServiceRequest struct {
	VIP     string   `json:"vip"`
	Servers []string `json:"servers"`
	// Empty is "reject" (default) or "passthrough".
	Empty string `json:"empty,omitempty"`
	// Protocol is "tcp" (default) or "udp".
	Protocol string `json:"protocol,omitempty"`
	// OnServerRemoved is "terminate" (default) or "keep".
	OnServerRemoved string `json:"onServerRemoved,omitempty"`
	// Balance is "roundrobin" (default), "random" or "least-open".
	Balance string `json:"balance,omitempty"`
}

// QueryProtocol names the protocol of the VIP in DELETE PathServices/{vip}
// (?protocol=udp); absent means tcp.
const QueryProtocol = "protocol"

// Service is one VIP and the servers the maps send its connects to.
type Service struct {
	VIP     netip.AddrPort   `json:"vip"`
	Servers []netip.AddrPort `json:"servers"`
	// Empty is what a connect does while the set is empty: "reject" or
	// "passthrough".
	Empty string `json:"empty"`
	// Protocol is "tcp" or "udp": a VIP is protocol, address and port.
	Protocol string `json:"protocol"`
	// Balance is "roundrobin", "random" or "least-open".
	Balance string `json:"balance"`
	// OnServerRemoved is what happens to the open connections of a server
	// that leaves the set: "terminate" or "keep".
	OnServerRemoved string `json:"onServerRemoved,omitempty"`
}

// Key names the VIP as "VIP" for TCP and "VIP/udp" for UDP.
func (s Service) Key() string {
	if s.Protocol == "udp" {
		return s.VIP.String() + "/udp"
	}
	return s.VIP.String()
}

// AttachRequest attaches to or detaches from a cgroup (ctlbd attach/detach).
type AttachRequest struct {
	Cgroup string `json:"cgroup"`
	// Host asks for host scope: the one attachment at the cgroup v2 root
	// (Cgroup must then be empty).
	Host bool `json:"host,omitempty"`
}

// Attachment is one attachment of ctlb's programs to a cgroup.
type Attachment struct {
	ID string `json:"id"`
	// CgroupID is the kernel's ID of the cgroup; 0 once the cgroup is gone.
	CgroupID uint64 `json:"cgroupId"`
	// CgroupPath is the cgroup's directory, when it still exists.
	CgroupPath string `json:"cgroupPath,omitempty"`
	// Alive is false when the cgroup has died; GC removes such attachments.
	Alive bool `json:"alive"`
	// Missing names hooks whose pin is gone (someone removed it by hand).
	Missing []string `json:"missing,omitempty"`
	// PodNamespace and PodName name the Kubernetes pod the CNI plugin
	// attached it for, when it was one.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
}

// PendingNotice is the body of POST /v1/pending: the CNI plugin recorded a
// pending attachment for this container and asks ctlbd to look at it now.
type PendingNotice struct {
	ContainerID string `json:"containerID"`
	// AttachmentID is the record's key (one record per network and
	// container); a plugin older than that sends only ContainerID.
	AttachmentID string `json:"attachmentID,omitempty"`
}

// Key is the pending record the notice is about.
func (n PendingNotice) Key() string {
	if n.AttachmentID != "" {
		return n.AttachmentID
	}
	return n.ContainerID
}

// NetnsID identifies a network namespace (device and inode of its nsfs file).
type NetnsID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// PendingAttachment is an attachment recorded at CNI ADD whose cgroup did
// not exist yet, and what ctlbd has done with it.
type PendingAttachment struct {
	ContainerID  string    `json:"containerID"`
	AttachmentID string    `json:"attachmentID"`
	BPFFS        string    `json:"bpffs"`
	CgroupDir    string    `json:"cgroupDir,omitempty"`
	PodUID       string    `json:"podUID,omitempty"`
	Netns        string    `json:"netns,omitempty"`
	NetnsID      NetnsID   `json:"netnsID"`
	Created      time.Time `json:"created"`
	// PodNamespace and PodName name the Kubernetes pod, when the runtime
	// gave them to the CNI plugin (absent in records of older plugins).
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	// State is pending, attached or failed (absent, in the answer to
	// POST /v1/pending: ctlbd has no such record).
	State  string `json:"state"`
	Cgroup string `json:"cgroup,omitempty"`
	Error  string `json:"error,omitempty"`
	// StateDir is ctlbd's state directory, where it looked for the record:
	// set in the answer to POST /v1/pending only, so that a plugin whose
	// record ctlbd does not see can name both directories.
	StateDir string `json:"stateDir,omitempty"`
}

// Health of a server, one vocabulary in code, API, CLI and metrics.
const (
	HealthHealthy   = "healthy"
	HealthUnhealthy = "unhealthy"
	// HealthUnchecked: no check is configured (a static server) or none
	// has finished yet.
	HealthUnchecked = "unchecked"
)

// SourceKept is the source of a server of a tracked VIP that the maps
// hold but no source of the VIP has listed: kept from before a restart
// (or a reload that changed the VIP's sources) while the sources have not
// answered yet. It is unchecked, in the set, and stays until the VIP's
// first set replaces it.
const SourceKept = "kept"

// ServerStatus is one server of a VIP in ctlbd status.
type ServerStatus struct {
	Server string `json:"server"`
	// Source names where the server came from: static, dns, consul, exec
	// (several joined with commas), or SourceKept.
	Source string `json:"source,omitempty"`
	// Health is HealthHealthy, HealthUnhealthy or HealthUnchecked.
	Health string `json:"health,omitempty"`
	InSet  bool   `json:"inSet"`
	// Connects is Attempts, under its earlier name.
	Connects uint64 `json:"connects"`
	// Attempts are connects sent to the server; Established and Failed
	// split TCP attempts by outcome (handshake done; refused or timed out).
	Attempts    uint64 `json:"attempts"`
	Established uint64 `json:"established"`
	Failed      uint64 `json:"failed"`
	// Terminated counts connections ctlbd ended because the server left the
	// set (or, rebalancing, to move them to a newcomer).
	Terminated uint64 `json:"terminated,omitempty"`
	Open       int64  `json:"open"`
	// Failing is set while the kernel skips the server after failed
	// connects (hold-down); FailMarks counts the marks ctlbd saw.
	Failing   bool   `json:"failing,omitempty"`
	FailMarks uint64 `json:"failMarks,omitempty"`
	// LastError is the last failed health check's error.
	LastError string `json:"lastError,omitempty"`
	// HealthSince is when Health last changed (unset until a check
	// decided; RFC 3339 in JSON, as every time here), LastCheck when the
	// last check finished: a tracked VIP's candidates only.
	HealthSince time.Time `json:"healthSince,omitzero"`
	LastCheck   time.Time `json:"lastCheck,omitzero"`
}

// SourceStatus is one server source of a tracked VIP.
type SourceStatus struct {
	Name      string `json:"name"`
	Servers   int    `json:"servers"`
	Errors    uint64 `json:"errors"`
	LastError string `json:"lastError,omitempty"`
	// Rejected counts the entries of the source's last answer that were
	// left out (not an address, wrong family, not unicast, listed twice,
	// another host's loopback); RejectedFirst shows the first few.
	Rejected      int             `json:"rejected,omitempty"`
	RejectedFirst []RejectedEntry `json:"rejectedFirst,omitempty"`
	// LastSuccess is the last good answer, LastFailure the last failure;
	// FailingSince, set only while the source fails, the first failure
	// since the last good answer (how long the outage has lasted). Unset
	// when it has not happened.
	LastSuccess  time.Time `json:"lastSuccess,omitzero"`
	LastFailure  time.Time `json:"lastFailure,omitzero"`
	FailingSince time.Time `json:"failingSince,omitzero"`
}

// RejectedEntry is one entry of a source's answer left out, and why.
type RejectedEntry struct {
	Entry  string `json:"entry"`
	Reason string `json:"reason"`
}

// ServiceStatus is one VIP in ctlbd status.
type ServiceStatus struct {
	VIP      string         `json:"vip"`
	Protocol string         `json:"protocol"`
	Balance  string         `json:"balance"`
	Empty    string         `json:"empty"`
	Servers  []ServerStatus `json:"servers"`
	// OnServerRemoved is "terminate" or "keep".
	OnServerRemoved string `json:"onServerRemoved,omitempty"`
	// Rebalancing is true while ctlbd moves connections onto a server
	// that joined the set (config "rebalance").
	Rebalancing bool `json:"rebalancing,omitempty"`
	// Config is set for a VIP that ctlbd's config file defines: the next
	// reload (or edit of the file) puts it back as the file says, whatever
	// the CLI changed meanwhile.
	Config bool `json:"config,omitempty"`
	// Tracked VIPs get their set from sources and health checks.
	Tracked bool   `json:"tracked"`
	Panic   bool   `json:"panic,omitempty"`
	Changes uint64 `json:"changes,omitempty"`
	// LastChange is when the set last changed (its Changes-th change),
	// LastReason why: a source's answer, a health verdict, panic.
	LastChange time.Time      `json:"lastChange,omitzero"`
	LastReason string         `json:"lastReason,omitempty"`
	Sources    []SourceStatus `json:"sources,omitempty"`
	// Trimmed counts the candidates left out over the most servers a VIP
	// may have (the highest addresses go).
	Trimmed int `json:"trimmed,omitempty"`
}

// Status is ctlbd status.
type Status struct {
	Version     string          `json:"version"`
	BPFFS       string          `json:"bpffs"`
	Services    []ServiceStatus `json:"services"`
	Attachments int             `json:"attachments"`
	Pending     int             `json:"pending"`
	// NRI is the NRI plugin's state, NRIConnected or NRIDisconnected;
	// empty when ctlbd runs none. The CNI plugin leaves pods annotated
	// ctlb.io/containers to it only while it is connected.
	NRI string `json:"nri,omitempty"`
	// NRISocket is the runtime socket the NRI plugin uses.
	NRISocket string `json:"nriSocket,omitempty"`
	// HostScope says ctlb is attached at the cgroup v2 root (every process).
	HostScope bool `json:"hostScope,omitempty"`
	// Termination is how ctlbd ends connections to servers that leave a
	// set ("bpf_sock_destroy"), or "unavailable: " and why.
	Termination string `json:"termination,omitempty"`
	// SocketTable is how many entries of the socket table (docs/MAPS.md)
	// VIP sockets hold; absent for pins made before the table.
	SocketTable *SocketTable `json:"socketTable,omitempty"`
	// Proxy is the fallback proxy's state; absent when it does not run.
	// Its clients are no attached pod's: the services' ATTEMPTS and
	// ESTABLISHED (the kernel's counts) leave them out.
	Proxy *ProxyStatus `json:"proxy,omitempty"`
}

// ProxyStatus is what the fallback proxy serves and has done, counted
// since ctlbd started (the same counts as the ctlb_proxy_* metrics).
type ProxyStatus struct {
	// Mode is "listeners" or "steering".
	Mode string `json:"mode"`
	// Listening are its listening sockets: one per destination in
	// listeners mode, the one steering socket (a random port on
	// 127.0.0.1) in steering mode.
	Listening []netip.AddrPort `json:"listening"`
	// Destinations are the addresses and ports clients dial.
	Destinations []netip.AddrPort `json:"destinations"`
	Services     []ProxyService   `json:"services"`
}

// ProxyService is one VIP:port the proxy serves.
type ProxyService struct {
	Service netip.AddrPort `json:"service"`
	// Open is the client connections held now; Accepted every one
	// accepted.
	Open     int64  `json:"open"`
	Accepted uint64 `json:"accepted"`
	// Rejected counts clients closed without a target, Resets clients
	// reset after they were connected, by reason (docs/METRICS.md:
	// ctlb_proxy_rejected_total, ctlb_proxy_resets_total).
	Rejected map[string]uint64 `json:"rejected,omitempty"`
	Resets   map[string]uint64 `json:"resets,omitempty"`
	Targets  []ProxyTarget     `json:"targets"`
}

// ProxyTarget is one server a proxied service sent clients to, or failed
// to reach.
type ProxyTarget struct {
	Target       netip.AddrPort `json:"target"`
	Connections  uint64         `json:"connections"`
	DialFailures uint64         `json:"dialFailures"`
}

// SocketTable is the use of the kernel's socket table: Size entries, Used
// held by open VIP sockets.
type SocketTable struct {
	Size int `json:"size"`
	Used int `json:"used"`
}

// States of ctlbd's NRI plugin in Status.NRI.
const (
	NRIConnected    = "connected"
	NRIDisconnected = "disconnected"
)

// Version is ctlbd version.
type Version struct {
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"`
	Layout  int    `json:"layout"`
	Go      string `json:"go"`
}
