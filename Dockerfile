# syntax=docker/dockerfile:1
#
# The ctlbd release image, multi-arch, built in CI with registry access (an
# offline `make image` builds the same layout FROM scratch from bin/: see
# hack/build-image.sh). ctlbd (daemon, CLI and `install-cni`) and the ctlb CNI
# plugin beside it in /usr/local/bin, where `ctlbd install-cni` looks for the
# plugin by default. Both are static (CGO_ENABLED=0). The generated BPF
# objects are committed, so the build needs no clang.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=$(git describe --tags --always) \
#     -t REGISTRY/ctlbd:TAG --push .

# Build on the builder's own platform and cross-compile: no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH
RUN set -e; \
    ldflags="-s -w -X github.com/ctlb/ctlb/internal/version.Version=${VERSION}"; \
    go build -trimpath -buildvcs=false -ldflags "$ldflags" -o /out/ctlbd ./cmd/ctlbd; \
    go build -trimpath -buildvcs=false -ldflags "$ldflags" -o /out/ctlb ./plugins/meta/ctlb

# distroless/static: CA certificates (for an https Consul API) and nothing
# else. ctlbd runs as root: it loads BPF programs and pins them.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/ctlbd /out/ctlb /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/ctlbd"]
CMD ["run", "--config", "/etc/ctlb/ctlbd.json"]
