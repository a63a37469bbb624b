package cni

import "github.com/containernetworking/cni/pkg/types"

// ctlb's own CNI error codes (the spec reserves 100 and up for plugins).
// The spec's codes are used where they fit: 2 (unsupported field), 4
// (CNI_ARGS), 5 (I/O), 6 (undecodable JSON), 7 (invalid config, including an
// escaping cgroupPath or a shared cgroup), 11 (try again later: ctlbd has not
// pinned its objects yet, or ctlbd is unreachable on CHECK), 50 (STATUS: not
// ready), 999 (other). plugins/meta/ctlb/README.md says which verb returns
// which, and when.
const (
	// ErrNotAttached (CHECK): no attachment is pinned for the container.
	ErrNotAttached uint = 100
	// ErrAttachmentIncomplete (CHECK): some of the attachment's link pins
	// were removed.
	ErrAttachmentIncomplete uint = 101
	// ErrWrongCgroup (ADD, CHECK): the container's attachment is on
	// another cgroup than the pod's.
	ErrWrongCgroup uint = 102
	// ErrCgroupDead (CHECK): the attached cgroup no longer exists.
	ErrCgroupDead uint = 103
	// ErrStillPending (CHECK): the pod cgroup has not appeared yet, or
	// ctlbd has not completed the pending attachment.
	ErrStillPending uint = 104
	// ErrNotPinned (CHECK): ctlb's pinned maps or programs are missing.
	ErrNotPinned uint = 105
	// ErrNoCgroupV2 (ADD, CHECK): the host has no cgroup v2 hierarchy.
	ErrNoCgroupV2 uint = 106
	// ErrLayout: the pinned objects have a layout this plugin does not
	// understand (ctlbd and plugin of different versions).
	ErrLayout uint = 107
)

func cniErr(code uint, msg string, err error) *types.Error {
	details := ""
	if err != nil {
		details = err.Error()
	}
	return types.NewError(code, msg, details)
}
