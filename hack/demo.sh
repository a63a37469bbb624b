#!/usr/bin/env bash
# make demo: a pod's connections to a VIP landing on real servers round-robin.
#
# A "pod" is a network namespace plus a cgroup. Three tiny servers listen in
# the pod's namespace on 198.18.1.11-13:8502; nothing listens on the VIP
# 198.19.255.1:8502, and no route leads there. ctlbd runs on a private bpffs,
# attaches to the pod's cgroup, and every connect() the pod makes to the VIP
# lands on a server. Everything is removed at the end, even on failure.
set -euo pipefail

BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/bin}
VIP=198.19.255.1:8502
SERVERS=(198.18.1.11:8502 198.18.1.12:8502 198.18.1.13:8502)

work=$(mktemp -d /tmp/ctlb-demo.XXXXXX)
ns=ctlb-demo-$$
v2=$(awk '$3=="cgroup2" {print $2; exit}' /proc/self/mounts)
cg="$v2/ctlb-demo-$$"
pids=()

cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	if [[ -d "$cg" ]]; then
		for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
		rmdir "$cg" 2>/dev/null
	fi
	ip netns del "$ns" 2>/dev/null
	umount "$work/bpffs" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
export CTLB_SOCKET="$work/ctlbd.sock"

say "pod: network namespace $ns, cgroup $cg"
ip netns add "$ns"
ip -n "$ns" link set lo up
for s in "${SERVERS[@]}"; do ip -n "$ns" addr add "${s%:*}/32" dev lo; done
mkdir "$cg"

say "servers: ${SERVERS[*]} (each answers with its own address)"
for s in "${SERVERS[@]}"; do
	nsenter --net="/run/netns/$ns" socat "TCP-LISTEN:${s#*:},bind=${s%:*},fork,reuseaddr" "SYSTEM:echo served by ${s%:*} port ${s#*:}" &
	pids+=($!)
done

say "ctlbd on a private bpffs"
mkdir "$work/bpffs"
mount -t bpf bpf "$work/bpffs"
"$BIN/ctlbd" run --bpffs "$work/bpffs/ctlb" --log-level warn &
pids+=($!)
for _ in $(seq 50); do [[ -S "$CTLB_SOCKET" ]] && break; sleep 0.1; done

say "ctlbd service set $VIP ${SERVERS[*]}"
"$BIN/ctlbd" service set "$VIP" "${SERVERS[@]}"
say "ctlbd attach --cgroup $cg"
"$BIN/ctlbd" attach --cgroup "$cg"
"$BIN/ctlbd" attachments

say "before: a process outside the pod's cgroup dials the VIP"
nsenter --net="/run/netns/$ns" bash -c "exec 3<>/dev/tcp/${VIP%:*}/${VIP#*:}" 2>&1 | sed 's/^/  /' || true

say "the pod dials $VIP six times"
# The client joins the pod's cgroup first, then the pod's network namespace.
bash -c "echo \$\$ > '$cg/cgroup.procs'; exec nsenter --net=/run/netns/$ns bash -c '
for i in 1 2 3 4 5 6; do
	exec 3<>/dev/tcp/${VIP%:*}/${VIP#*:}
	read -r line <&3
	echo \"  connect \$i to $VIP: \$line\"
	exec 3<&-
done'"

say "ctlbd status"
"$BIN/ctlbd" status
echo
echo "demo done: every connect to the VIP landed on a real server, in turn."
