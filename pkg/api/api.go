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
	// Protocol is "tcp" (default) or "udp".
	Protocol string `json:"protocol,omitempty"`
	// Balance is "roundrobin" (default), "random" or "least-open".
	Balance string `json:"balance,omitempty"`
}

// QueryProtocol names the protocol of the VIP in DELETE PathServices/{vip}
// (?protocol=udp); absent means tcp.
const QueryProtocol = "protocol"

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
	Health string `json:"health,omitempty"`
	InSet  bool   `json:"inSet"`
	// Connects is Attempts, under its earlier name.
	Connects uint64 `json:"connects"`
	// Attempts are connects sent to the server; Established and Failed
	// split TCP attempts by outcome (handshake done; refused or timed out).
	Attempts    uint64 `json:"attempts"`
	Established uint64 `json:"established"`
	Failed      uint64 `json:"failed"`
	Terminated  uint64 `json:"terminated,omitempty"`
	Open        int64  `json:"open"`
	// Failing is set while the kernel skips the server after failed
	// connects (hold-down).
	Failing bool `json:"failing,omitempty"`
	// LastError is the last failed health check's error.
	LastError string `json:"lastError,omitempty"`
}

// SourceStatus is one server source of a tracked VIP.
type SourceStatus struct {
	Name      string `json:"name"`
	Servers   int    `json:"servers"`
	Errors    uint64 `json:"errors"`
	LastError string `json:"lastError,omitempty"`
}

// ServiceStatus is one VIP in ctlbd status.
type ServiceStatus struct {
	VIP      string         `json:"vip"`
	Protocol string         `json:"protocol"`
	Balance  string         `json:"balance"`
	Empty    string         `json:"empty"`
	Servers  []ServerStatus `json:"servers"`
	// Tracked VIPs get their set from sources and health checks.
	Tracked bool           `json:"tracked"`
	Panic   bool           `json:"panic,omitempty"`
	Changes uint64         `json:"changes,omitempty"`
	Sources []SourceStatus `json:"sources,omitempty"`
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
