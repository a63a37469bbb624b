SHELL := /bin/bash

# ctlb: connect-time load balancing for containers.
#   make demo   install what is needed, build, show a pod's connections to a VIP
#               landing on real servers round-robin
#   make test   install what is needed and run every check and test (as root)

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X github.com/ctlb/ctlb/internal/version.Version=$(VERSION)
GOBUILD  := CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)'
TESTFLAGS ?= -count=1 -timeout 40m
# The container image: its name is set here, once (the chart's
# image.repository default matches; docs/DEPLOY.md "The image").
IMAGE    ?= ctlb/ctlbd
IMAGE_TAG ?= $(VERSION)
BPF_GEN  := $(wildcard pkg/*/*_bpfel.go pkg/*/*_bpfel.o internal/*/*_bpfel.go internal/*/*_bpfel.o test/bench/*_bpfel.go test/bench/*_bpfel.o test/bench/*/*_bpfel.go test/bench/*/*_bpfel.o)

.PHONY: all deps build generate check-generate lint test fuzz consul-bin demo release clean manifests image

# Fuzz targets as NAME:PACKAGE; each runs for FUZZTIME in make test.
FUZZTIME ?= 10s
FUZZ_TARGETS := FuzzParse:./internal/config FuzzDecodeServiceRequest:./pkg/api FuzzParseAddrPort:./pkg/datapath FuzzParseConf:./internal/cni FuzzCNIArgs:./internal/cni FuzzCgroupDir:./internal/podcgroup

all: build

deps:
	@hack/install-deps.sh

build:
	$(GOBUILD) -o bin/ctlbd ./cmd/ctlbd
	$(GOBUILD) -o bin/ctlb ./plugins/meta/ctlb

# Rebuild the BPF objects (needs clang); they are committed so go build does not.
# test/bench: the benchmark's own connect4 variants and sockmap relay (never shipped).
generate: deps
	$(GO) generate ./pkg/... ./internal/... ./test/bench ./test/bench/sockmaprelay

# CI: the committed BPF objects must be what the C sources compile to.
check-generate: generate
	@git diff --exit-code --stat -- $(BPF_GEN) || { echo "generated BPF objects are stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- 'pkg/*/*_bpfel.*' 'internal/*/*_bpfel.*' 'test/bench/*_bpfel.*' 'test/bench/*/*_bpfel.*' | grep '^??')" || { echo "generated BPF objects are not committed"; exit 1; }

# The ctlbd image from the static binaries, with podman, buildah or docker;
# no registry needed (FROM scratch). IMAGE and IMAGE_TAG name it.
image: build
	hack/build-image.sh $(IMAGE):$(IMAGE_TAG)

# The plain Kubernetes manifests are the Helm chart rendered (one source);
# test/manifests fails when conf/kubernetes/ctlb.yaml is stale.
manifests:
	$(GO) run ./hack/render-chart -chart charts/ctlb -o conf/kubernetes/ctlb.yaml

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "gofmt wants changes in: $$out"; exit 1; }
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit"; exit 1; }

# Every test runs as root against the real kernel. In CI (CI=true) a test that
# cannot run fails instead of skipping, and any SKIP line fails the run.
test: deps build check-generate lint fuzz consul-bin runtime-bins
	@mkdir -p .cache
	set -o pipefail; $(GO) test $(TESTFLAGS) -v ./... 2>&1 | tee .cache/test.log | grep -E '^(=== RUN|--- |ok |FAIL|PASS|panic)' ; \
	  rc=$$?; \
	  echo "$$(grep -c -- '--- PASS' .cache/test.log) passed, $$(grep -c -- '--- FAIL' .cache/test.log) failed, $$(grep -c -- '--- SKIP' .cache/test.log) skipped"; \
	  if [ $$rc -ne 0 ]; then hack/test-failures.sh .cache/test.log; fi; \
	  if [ "$${CI:-}" = true ] && grep -q -- '--- SKIP' .cache/test.log; then echo "tests were skipped in CI:"; grep -- '--- SKIP' .cache/test.log; exit 1; fi; \
	  exit $$rc

# The real Consul the tests run, built once from the Go module proxy and
# cached outside the tree (~/.cache/ctlb/consul, or $$CTLB_CACHE).
consul-bin:
	@echo "consul: $$(hack/build-consul.sh)"

fuzz:
	@for t in $(FUZZ_TARGETS); do \
	  GO=$(GO) hack/fuzz.sh "$${t%%:*}" "$${t#*:}" $(FUZZTIME) || exit 1; \
	done

demo: deps build
	hack/demo.sh

release:
	@mkdir -p dist
	for arch in amd64 arm64; do \
	  GOARCH=$$arch $(GOBUILD) -o dist/ctlbd-linux-$$arch ./cmd/ctlbd && \
	  GOARCH=$$arch $(GOBUILD) -o dist/ctlb-linux-$$arch ./plugins/meta/ctlb || exit 1; \
	done

clean:
	rm -rf bin dist .cache/test.log

include consul.mk
include bench.mk
include runtimes.mk
