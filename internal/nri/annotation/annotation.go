// Package annotation reads the pod annotation that asks for container scope.
// It is apart from internal/nri so that the CNI plugin reads it without
// linking the NRI client.
package annotation

import "strings"

// Containers is the pod annotation that restricts ctlb to the named
// containers of the pod, comma-separated: "envoy-sidecar,consul-dataplane".
const Containers = "ctlb.io/containers"

// CRIPodAnnotations is the runtimeConfig key (a CNI capability) in which
// containerd and CRI-O pass a pod's annotations to CNI plugins.
const CRIPodAnnotations = "io.kubernetes.cri.pod-annotations"

// ContainerNames are the names annotations restrict ctlb to; ok is false
// when there is no such annotation (pod scope).
func ContainerNames(annotations map[string]string) (names []string, ok bool) {
	v, ok := annotations[Containers]
	if !ok {
		return nil, false
	}
	for _, n := range strings.Split(v, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	return names, true
}
