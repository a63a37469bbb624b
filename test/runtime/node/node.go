// Package node is the "node" the end-to-end tests run container runtimes
// on: a network namespace the test creates, with no uplink, so that nothing
// a pod sends can leave the machine, and the CNI directories (plugins,
// conflist, IPAM state) its runtime reads, all owned by the test and removed
// when it ends.
//
// Runtimes run inside the node with `nsenter --net=PATH`, never `ip netns
// exec`: the latter remounts /sys in a private mount namespace, where runc
// finds no cgroup mount and the test's bpffs is not visible.
package node

import (
	"context"
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Node is one test node.
type Node struct {
	// NS is the node's network namespace; Path names it for nsenter.
	NS ns.NetNS
}

// New creates a node (its network namespace, lo up); it is removed when the
// test ends.
func New(t testing.TB) *Node {
	t.Helper()
	return &Node{NS: testutil.NewNetNS(t)}
}

// Path is the node namespace's bind mount.
func (n *Node) Path() string { return n.NS.Path() }

// Command prepares name args... to run inside the node's network namespace
// (and nothing else: mounts, cgroups and PIDs stay the host's).
func (n *Node) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
}

// CommandContext is Command bound to ctx.
func (n *Node) CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
}
