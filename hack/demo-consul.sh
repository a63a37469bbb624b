#!/usr/bin/env bash
# make demo-consul: ctlb's flagship story, on real parts, shown step by step.
#
# Three real Consul servers (built from the Go module proxy) on a bridge in a
# test node (a network namespace with no uplink); ctlbd in that node following
# them through Consul's catalog; a pod started by a private containerd through
# CRI, whose client container makes real gRPC calls (Consul's
# ServerDiscoveryService.WatchServers, a fresh connection each) to the magic
# VIP. The calls land on the servers round-robin; one server is killed and
# leaves the set; a replacement on a new address joins it and gets calls; the
# pod never changes. Then the same with 12 long-lived WatchServers streams, as
# Envoy holds them: a server's host vanishes (no RST ever comes back), ctlbd
# ends the streams that were on it and they are back on live servers within
# 2 s; a replacement joins and rebalancing gives it its share. `ctlbd status`
# is shown at each step.
#
# The story is the end-to-end tests TestConsulFlagship and
# TestConsulFlagshipStreams (test/e2e/consul_test.go, consul_streams_test.go),
# run with their log shown: what you see is what CI checks. The test removes
# everything it made (namespaces, mounts, cgroups, processes by PID, the
# runtime's host directories), also when it fails or when you press Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
	echo "demo-consul: run as root (network namespaces, BPF, cgroups, containerd)" >&2
	exit 1
fi
bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }

# Every temporary file and directory of the run goes under $work (TMPDIR), so
# nothing is left in /tmp even if the test binary is killed outright.
work=$(mktemp -d /tmp/ctlb-demo-consul.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT

bold "== Consul binary (built once from the Go module proxy, then cached)"
hack/build-consul.sh

bold "== building the test (ctlbd, the CNI plugin and the images are built when it starts)"
go test -c -o "$work/e2e.test" ./test/e2e

# The test binary handles Ctrl-C itself (it fails the test, so every cleanup
# runs); the filter ignores it, so the test's output keeps flowing to the end.
# The filter drops the test framework's "file.go:NN:" prefixes.
rc=0
(cd test/e2e && TMPDIR=$work exec "$work/e2e.test" -test.run '^TestConsulFlagship(Streams)?$' -test.v -test.count=1 -test.timeout 10m) 2>&1 |
	(trap '' INT; sed -u -E 's/^    [a-z_]+\.go:[0-9]+: ?//; s/^        //') || rc=$?
if [[ $rc -eq 0 ]]; then
	bold "== demo-consul: done; everything it made has been removed"
else
	bold "== demo-consul: FAILED (exit $rc); everything it made has been removed"
fi
exit "$rc"
