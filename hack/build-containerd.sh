#!/bin/sh
# Builds containerd, ctr and containerd-shim-runc-v2 (containerd 2.x, from
# the Go module proxy, static) into $CTLB_CACHE/containerd/<version> or
# ~/.cache/ctlb/containerd/<version>, once, and prints that directory.
# Debian 12 ships containerd 1.6 only; the e2e suite runs against both.
# Put the directory first on PATH when running containerd 2.x, or it picks
# up Debian's 1.6 shim (RUNTIMES.md).
set -eu
VERSION=${CONTAINERD_VERSION:-v2.4.2}
CACHE=${CTLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctlb}
DIR=$CACHE/containerd/$VERSION
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
ok=1
for b in containerd ctr containerd-shim-runc-v2; do
	[ -x "$DIR/$b" ] || ok=0
done
if [ $ok = 1 ] && "$DIR/containerd" --version 2>/dev/null | grep -q " $VERSION "; then
	echo "$DIR"
	exit 0
fi
echo "containerd: building $VERSION into $DIR (about 80 s cold)" >&2
cd "${TMPDIR:-/tmp}"
for try in 1 2; do
	if CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false GOBIN="$DIR" \
		go install -tags "no_btrfs no_devmapper no_zfs" \
		-ldflags "-X github.com/containerd/containerd/v2/version.Version=$VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd@$VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$VERSION"; then
		break
	fi
	[ $try = 2 ] && exit 1
	echo "containerd: build failed; trying once more" >&2
done
"$DIR/containerd" --version | grep -q " $VERSION " || { echo "containerd: built binary does not report $VERSION" >&2; exit 1; }
echo "$DIR"
