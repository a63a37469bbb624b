#!/bin/sh
# Builds kubelet (k8s.io/kubernetes from the Go module proxy, static) into
# $CTLB_CACHE/kubelet/<version> or ~/.cache/ctlb/kubelet/<version>, once,
# and prints that directory. About 6 minutes cold on 2 cores.
# The module's go.mod replaces its staging modules with sibling directories
# that the module zip lacks: each replace is dropped and the staging module
# required from the proxy at the matching v0.X.Y instead.
set -eu
VERSION=${KUBELET_VERSION:-v1.37.2}
CACHE=${CTLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctlb}
DIR=$CACHE/kubelet/$VERSION
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
if [ -x "$DIR/kubelet" ] && "$DIR/kubelet" --version 2>/dev/null | grep -q "Kubernetes $VERSION\$"; then
	echo "$DIR"
	exit 0
fi
echo "kubelet: building $VERSION into $DIR (about 6 minutes cold)" >&2
export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false
cd "${TMPDIR:-/tmp}"
mod=$(go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$mod" ] || { echo "kubelet: go mod download k8s.io/kubernetes@$VERSION gave no directory" >&2; exit 1; }
src=$(mktemp -d "${TMPDIR:-/tmp}/ctlb-kubelet-src.XXXXXX")
trap 'chmod -R u+w "$src" 2>/dev/null; rm -rf "$src"' EXIT
cp -r "$mod/." "$src"
chmod -R u+w "$src"
cd "$src"
minor=${VERSION#v1.}
staging=v0.$minor
for m in $(go mod edit -json | sed -n 's/^[[:space:]]*"Path": "\(k8s\.io\/[^"]*\)"$/\1/p' | sort -u); do
	# Only the replaced staging modules (their Replace points at ./staging).
	if go mod edit -json | grep -q "\"Path\": \"./staging/src/$m\""; then
		go mod edit -dropreplace="$m" -require="$m@$staging"
	fi
done
rm -f go.work go.work.sum
gv=k8s.io/component-base/version
for try in 1 2; do
	if go build -mod=mod -o "$DIR/kubelet" \
		-ldflags "-s -w -X $gv.gitVersion=$VERSION -X $gv.gitMajor=1 -X $gv.gitMinor=${minor%%.*}" ./cmd/kubelet; then
		break
	fi
	[ $try = 2 ] && exit 1
	echo "kubelet: build failed; trying once more" >&2
done
"$DIR/kubelet" --version | grep -q "Kubernetes $VERSION\$" || { echo "kubelet: built binary does not report $VERSION" >&2; exit 1; }
echo "$DIR"
