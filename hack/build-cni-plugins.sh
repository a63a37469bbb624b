#!/bin/sh
# Builds the reference CNI plugins bridge, host-local and loopback
# (github.com/containernetworking/plugins, from the Go module proxy, static)
# into $CTLB_CACHE/cni-plugins/<version> or ~/.cache/ctlb/cni-plugins/<version>,
# once, and prints that directory. Debian's plugins stop at CNI 1.0.0; these
# speak 1.1.0 (STATUS), which containerd 2.x calls through CRI Status.
set -eu
VERSION=${CNI_PLUGINS_VERSION:-v1.9.1}
CACHE=${CTLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctlb}
DIR=$CACHE/cni-plugins/$VERSION
PLUGINS="main/bridge ipam/host-local main/loopback"
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
ok=1
for p in $PLUGINS; do
	[ -x "$DIR/$(basename "$p")" ] || ok=0
done
if [ $ok = 1 ] && CNI_COMMAND=VERSION "$DIR/bridge" </dev/null 2>/dev/null | grep -q '"1.1.0"'; then
	echo "$DIR"
	exit 0
fi
echo "cni-plugins: building $VERSION into $DIR" >&2
cd "${TMPDIR:-/tmp}"
pkgs=""
for p in $PLUGINS; do
	pkgs="$pkgs github.com/containernetworking/plugins/plugins/$p@$VERSION"
done
for try in 1 2; do
	# shellcheck disable=SC2086 # one argument per package
	if CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false GOBIN="$DIR" go install $pkgs; then
		break
	fi
	[ $try = 2 ] && exit 1
	echo "cni-plugins: build failed; trying once more" >&2
done
CNI_COMMAND=VERSION "$DIR/bridge" </dev/null | grep -q '"1.1.0"' || { echo "cni-plugins: built bridge does not speak CNI 1.1.0" >&2; exit 1; }
echo "$DIR"
