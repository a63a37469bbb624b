// Package api is ctlbd's control API: JSON over HTTP on a unix socket, and a
// typed client for it. It is public API: the wire types here are ctlb's own
// (they do not alias the datapath's), so third-party tools may import this
// package and drive a node's ctlbd (docs/ARCHITECTURE.md, "Parts").
package api

// Where a node's ctlbd listens and keeps its state unless told otherwise.
// These are the only definitions (with datapath.DefaultDir for the pins):
// the daemon, its CLI, the CNI plugin and the installer all use them.
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
