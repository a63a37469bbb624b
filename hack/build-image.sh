#!/usr/bin/env bash
# Build the ctlbd container image from the static binaries `make build`
# made (bin/ctlbd, bin/ctlb), with the first builder found: podman, buildah
# or docker (or $BUILDER). The image holds the two binaries in
# /usr/local/bin and the host's CA bundle, on an empty base (FROM scratch),
# so the build needs no registry: it works offline. For multi-arch release
# images built in CI with registry access, see the Dockerfile.
#
#   hack/build-image.sh IMAGE:TAG
#
# Extra builder flags (e.g. podman --root DIR) come from $BUILDER_FLAGS.
set -euo pipefail

ref=${1:?usage: build-image.sh IMAGE:TAG}
root=$(cd "$(dirname "$0")/.." && pwd)
for b in bin/ctlbd bin/ctlb; do
  [ -x "$root/$b" ] || { echo "build-image: $b missing: run make build" >&2; exit 1; }
done

builder=${BUILDER:-}
if [ -z "$builder" ]; then
  for b in podman buildah docker; do
    command -v "$b" >/dev/null || continue
    # A docker CLI without a reachable daemon cannot build.
    if [ "$b" = docker ] && ! timeout 5 docker info >/dev/null 2>&1; then continue; fi
    builder=$b; break
  done
fi
[ -n "$builder" ] || { echo "build-image: no image builder (podman, buildah or docker with a daemon) found" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$root/bin/ctlbd" "$root/bin/ctlb" "$ctx/"
ca=/etc/ssl/certs/ca-certificates.crt
if [ -r "$ca" ]; then cp "$ca" "$ctx/ca-certificates.crt"; else : > "$ctx/ca-certificates.crt"; fi
cat > "$ctx/Containerfile" <<'CF'
FROM scratch
# CA certificates, for an https Consul API.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY ctlbd ctlb /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/ctlbd"]
CMD ["run", "--config", "/etc/ctlb/ctlbd.json"]
CF
version=$("$root/bin/ctlbd" version -o json 2>/dev/null | sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' || true)
labels=(--label "org.opencontainers.image.title=ctlbd" --label "org.opencontainers.image.licenses=Apache-2.0"
        --label "org.opencontainers.image.version=${version:-dev}")
case $builder in
  buildah) buildah ${BUILDER_FLAGS:-} bud "${labels[@]}" -t "$ref" -f "$ctx/Containerfile" "$ctx" ;;
  *)       $builder ${BUILDER_FLAGS:-} build "${labels[@]}" -t "$ref" -f "$ctx/Containerfile" "$ctx" ;;
esac
echo "built $ref with $builder"
