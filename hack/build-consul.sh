#!/bin/sh
# Builds the Consul binary the tests run (github.com/hashicorp/consul from the
# Go module proxy) into $CTLB_CACHE/consul or ~/.cache/ctlb/consul, once, and
# prints its path. Tests do the same when the binary is missing.
set -eu
cd "$(dirname "$0")/.."
exec go run ./test/consul/cmd/build-consul
