package node

import "os"

// runtimeHostPaths are paths on the host that containerd, runc, libcni and
// podman create whatever their configuration says, parents first: shim
// sockets (/run/containerd/s), libcni's result cache (/var/lib/cni/results),
// runc's default root (podman's runc), and podman's blob info cache. The
// entries made for the tests' own containers are removed with them; only
// the directories (and podman's cache) would stay behind.
var runtimeHostPaths = []string{
	"/run/containerd",
	"/run/containerd/s",
	"/var/lib/cni",
	"/var/lib/cni/results",
	"/run/runc",
	"/var/lib/containers",
	"/var/lib/containers/cache",
	"/var/lib/containers/cache/blob-info-cache-v1.boltdb",
	// Mount points of the kubelet test's tmpfs (inside its private mount
	// namespace): kubelet writes there whatever --root-dir says.
	"/var/lib/kubelet",
	"/var/log/containers",
}

// TrackHostPaths notes which of the runtimes' host paths exist now and
// returns a function that removes the ones made since, children first,
// where empty: the host is left as the tests found it. Call it in TestMain
// around m.Run, so that tests of the package never race with it.
func TrackHostPaths() (restore func()) {
	existed := map[string]bool{}
	for _, p := range runtimeHostPaths {
		if _, err := os.Lstat(p); err == nil {
			existed[p] = true
		}
	}
	return func() {
		for i := len(runtimeHostPaths) - 1; i >= 0; i-- {
			if p := runtimeHostPaths[i]; !existed[p] {
				_ = os.Remove(p) // a directory still in use is not empty: it stays
			}
		}
	}
}
