#!/usr/bin/env bash
# Installs, from Debian's packages, what building, testing and the demo need,
# skipping what is already there. Safe to run again; CI runs it on a clean
# machine of this kind.
set -euo pipefail

need=()
want() { # want COMMAND-OR-FILE PACKAGE
	if [[ "$1" == /* ]]; then [[ -e "$1" ]] || need+=("$2"); else command -v "$1" >/dev/null 2>&1 || need+=("$2"); fi
}
want clang clang
want llvm-strip llvm
want /usr/include/bpf/bpf_helpers.h libbpf-dev
want bpftool bpftool
want ip iproute2
want nsenter util-linux
want socat socat
want /usr/lib/cni/bridge containernetworking-plugins
want dnsmasq dnsmasq
want haproxy haproxy
want nft nftables
want gnuplot gnuplot-nox
want containerd containerd
want runc runc
want crun crun
want podman podman
want catatonit catatonit
want java openjdk-17-jdk-headless
want python3 python3
for extra in ${CTLB_EXTRA_PACKAGES:-}; do need+=("$extra"); done

if ((${#need[@]})); then
	echo "install-deps: installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
