// Command ctlb is the chained CNI plugin ("type": "ctlb" in a conflist): it
// attaches ctlb's connect-time load balancer to each pod's cgroup. The logic
// is in internal/cni; this binary only wires it to the CNI protocol.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	bv "github.com/containernetworking/plugins/pkg/utils/buildversion"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/version"
)

func main() {
	// One version for ctlbd and the plugin: internal/version's, set at link time.
	bv.BuildVersion = version.Version
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cni.Add,
		Del:    cni.Del,
		Check:  cni.Check,
		Status: cni.Status,
		GC:     cni.GC,
	}, cni.Versions, bv.BuildString("ctlb"))
}
