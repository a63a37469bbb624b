package cni

import "github.com/containernetworking/cni/pkg/version"

// Versions are the CNI spec versions the plugin serves: every one from 0.3.0
// on, as containernetworking/plugins' meta plugins (portmap, tuning) do.
// 0.3.x primaries (Calico, Flannel, Cilium in chaining mode) are what many
// nodes run. The library converts prevResult to and from each version; skel
// refuses CHECK below 0.4.0 and GC and STATUS below 1.1.0 by itself.
var Versions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// SupportsVersion reports whether a conflist of cniVersion v can chain ctlb.
// An empty version is 0.1.0 to libcni, which the plugin does not serve.
func SupportsVersion(v string) bool {
	if v == "" {
		v = "0.1.0"
	}
	for _, s := range Versions.SupportedVersions() {
		if s == v {
			return true
		}
	}
	return false
}
