package consul

import (
	"fmt"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// Options change where StartClusterWith builds the cluster.
type Options struct {
	// Node, when set, is an existing network namespace (a container
	// runtime's test node) to hold the servers' bridge instead of one the
	// cluster makes. Pods on that node then reach the servers: the node
	// gets the Gateway address on the bridge and forwards between its
	// links (ip_forward inside Node only), and each server routes the
	// test range 198.18.0.0/15 back through Gateway. Node still has no
	// uplink, so nothing leaves the machine. The caller owns Node and
	// removes it after the cluster (create it first).
	Node ns.NetNS
	// Secure runs the cluster as production does: HTTPS (8501) and gRPC
	// over TLS (8503) only, with certificates from a CA the test makes
	// (Cluster.CAFile, name ServerName), verified internal RPC, and ACLs
	// with default deny; the bootstrap token is in Cluster.TokenFile.
	Secure bool
}

// testRange is where pods and test hosts live (DESIGN.md).
var testRange = netip.MustParsePrefix("198.18.0.0/15")

// routeThroughNode makes Node a router between the servers' bridge and
// whatever else it holds (a pod bridge).
func (c *Cluster) routeThroughNode() {
	t := c.t
	c.Gateway = c.ipAt(254)
	err := c.Node.Do(func(ns.NetNS) error {
		br, err := netlink.LinkByName("br0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(br, &netlink.Addr{IPNet: prefixNet(c.Gateway, 24)}); err != nil {
			return fmt.Errorf("address %s on br0: %w", c.Gateway, err)
		}
		// /proc/sys/net is the namespace of the thread that opens it: this
		// sets Node's forwarding, never the host's.
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("ip_forward in the node namespace: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("node netns %s: %v", c.Node.Path(), err)
	}
}

// addReturnRoute, run inside a server's namespace, routes the test range
// through Gateway when the cluster lives in a given node.
func (c *Cluster) addReturnRoute(l netlink.Link) error {
	if !c.Gateway.IsValid() {
		return nil
	}
	err := netlink.RouteAdd(&netlink.Route{
		LinkIndex: l.Attrs().Index,
		Dst:       prefixNet(testRange.Addr(), testRange.Bits()),
		Gw:        c.Gateway.AsSlice(),
	})
	if err != nil {
		return fmt.Errorf("route %s via %s: %w", testRange, c.Gateway, err)
	}
	return nil
}
