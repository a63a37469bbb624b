#!/usr/bin/env bash
# make demo-kubelet: Kubernetes' own pod startup, on real parts, with timings.
#
# A real kubelet (v1.37, built once from the Go module proxy and cached:
# about 6-8 minutes the first time) in standalone mode (static pods, no API
# server) drives containerd 2.x in a test node (a network namespace with no
# uplink) whose CNI chain is bridge, host-local, loopback and ctlb. A static
# pod's manifest is written; kubelet makes the pod cgroup and calls
# RunPodSandbox; the pod's container dials the VIP and lands on the real
# servers round-robin; the manifest is deleted and ctlb detaches. Shown: the
# manifest -> pod sandbox ready -> first redirected connect timings, for a
# BestEffort pod, a Burstable pod and ten pods at once.
#
# The story is the end-to-end test TestKubeletStaticPods
# (test/e2e/kubelet_test.go), run with its log shown: what you see is what
# CI checks. The test leaves the host as it found it (sysctls, /var/lib/kubelet,
# cgroups, processes by PID), also when it fails or when you press Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
	echo "demo-kubelet: run as root (network namespaces, BPF, cgroups, containerd, kubelet)" >&2
	exit 1
fi
bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }

work=$(mktemp -d /tmp/ctlb-demo-kubelet.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT

bold "== containerd 2.x and kubelet (built once from the Go module proxy, then cached)"
hack/build-containerd.sh
hack/build-kubelet.sh

bold "== building the test (ctlbd, the CNI plugin and the images are built when it starts)"
go test -c -o "$work/e2e.test" ./test/e2e

rc=0
(cd test/e2e && TMPDIR=$work exec "$work/e2e.test" -test.run '^TestKubeletStaticPods$' -test.v -test.count=1 -test.timeout 10m) 2>&1 |
	(trap '' INT; sed -u -E 's/^    [a-z_]+\.go:[0-9]+: ?//; s/^        //') || rc=$?
if [[ $rc -eq 0 ]]; then
	bold "== demo-kubelet: done; everything it made has been removed"
else
	bold "== demo-kubelet: FAILED (exit $rc); everything it made has been removed"
fi
exit "$rc"
