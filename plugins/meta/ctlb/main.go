// Command ctlb is the chained CNI plugin ("type": "ctlb" in a conflist): it
// attaches ctlb's connect-time load balancer to each pod's cgroup. The logic
// is in internal/cni; this binary only wires it to the CNI protocol.
package main

import (
	"runtime"
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"
	bv "github.com/containernetworking/plugins/pkg/utils/buildversion"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/version"
)

// memoryLimit is the heap at which the garbage collector runs after all:
// a call that allocates far more than any does still ends.
const memoryLimit = 64 << 20

func main() {
	// A runtime execs the plugin for every pod, on the pod's start-up
	// path, and a call does one thing at a time for a few milliseconds:
	// one P, so that the runtime does not wake and park threads to run
	// nothing in parallel (half the context switches of an ADD, measured
	// with perf stat: 47 to 25), and no garbage collection of the few MiB a
	// call allocates unless the heap reaches memoryLimit.
	runtime.GOMAXPROCS(1)
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(memoryLimit)
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
