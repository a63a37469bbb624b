package datapath

import "fmt"

// RemovalPolicy says what happens to the open connections of a server that
// leaves a VIP's set.
type RemovalPolicy string

const (
	// RemovalTerminate ends them at once (the default): clients see an
	// abort and reconnect through the VIP to a server still in the set.
	RemovalTerminate RemovalPolicy = "terminate"
	// RemovalKeep leaves them open until their applications close them.
	RemovalKeep RemovalPolicy = "keep"
)

// ParseRemovalPolicy accepts "terminate" and "keep"; "" means terminate.
func ParseRemovalPolicy(s string) (RemovalPolicy, error) {
	switch RemovalPolicy(s) {
	case "", RemovalTerminate:
		return RemovalTerminate, nil
	case RemovalKeep:
		return RemovalKeep, nil
	}
	return "", fmt.Errorf("on-server-removed policy %q: want %q or %q", s, RemovalTerminate, RemovalKeep)
}

// flagKeepOnRemoval (CTLB_SVC_F_KEEP_ON_REMOVAL) is a header flag the kernel ignores: it keeps the VIP's
// removal policy with its set in the pinned maps, so a restarted ctlbd
// applies the policy the VIP was given without being told again.
const flagKeepOnRemoval = 0x8000
