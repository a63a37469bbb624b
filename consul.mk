# make demo-consul: three real Consul servers, a containerd pod making gRPC
# calls to the magic VIP round-robin, a server killed and replaced, ctlbd
# status at each step (hack/demo-consul.sh runs TestConsulFlagship and shows
# its log). Included from the Makefile.
.PHONY: demo-consul
demo-consul: deps
	hack/demo-consul.sh
