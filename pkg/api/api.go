// Package api is ctlbd's control API: JSON over HTTP on a unix socket. The
// types here are the wire format shared by the daemon and its CLI.
package api

import (
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Where a node's ctlbd listens and keeps its state unless told otherwise;
// the CNI plugin's defaults are the same.
const (
	DefaultSocket   = "/run/ctlb/ctlbd.sock"
	DefaultStateDir = "/run/ctlb"
)

// MaxRequestBytes bounds a request body; a larger request is refused whole.
const MaxRequestBytes = 1 << 20

// Paths of the API.
const (
	PathServices    = "/v1/services"
	PathAttachments = "/v1/attachments"
	PathPending     = "/v1/pending"
	PathStatus      = "/v1/status"
	PathVersion     = "/v1/version"
	PathReload      = "/v1/reload"
)

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

// ServiceRequest sets one VIP's static servers (ctlbd service set).
type ServiceRequest struct {
	VIP     string   `json:"vip"`
	Servers []string `json:"servers"`
	// Empty is "reject" (default) or "passthrough".
	Empty string `json:"empty,omitempty"`
}

// AttachRequest attaches to or detaches from a cgroup (ctlbd attach/detach).
type AttachRequest struct {
	Cgroup string `json:"cgroup"`
}

// Attachment is one attachment as listed by ctlbd attachments.
type Attachment = datapath.Attachment

// Service is one VIP as listed by ctlbd service list.
type Service = datapath.Service

// ServerStatus is one server of a VIP in ctlbd status.
type ServerStatus struct {
	Server string `json:"server"`
	// Source names where the server came from: static, dns, consul, exec.
	Source string `json:"source,omitempty"`
	// Health is healthy, unhealthy or unchecked.
	Health   string `json:"health,omitempty"`
	InSet    bool   `json:"inSet"`
	Connects uint64 `json:"connects"`
	Open     int64  `json:"open"`
	// LastError is the last failed health check's error.
	LastError string `json:"lastError,omitempty"`
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
}

// RejectedEntry is one entry of a source's answer left out, and why.
type RejectedEntry struct {
	Entry  string `json:"entry"`
	Reason string `json:"reason"`
}

// ServiceStatus is one VIP in ctlbd status.
type ServiceStatus struct {
	VIP     string         `json:"vip"`
	Empty   string         `json:"empty"`
	Servers []ServerStatus `json:"servers"`
	// Tracked VIPs get their set from sources and health checks.
	Tracked bool           `json:"tracked"`
	Panic   bool           `json:"panic,omitempty"`
	Changes uint64         `json:"changes,omitempty"`
	Sources []SourceStatus `json:"sources,omitempty"`
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
}

// Version is ctlbd version.
type Version struct {
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"`
	Layout  int    `json:"layout"`
	Go      string `json:"go"`
}
