# Container runtimes and tools the e2e tests run that Debian does not ship,
# built once from the Go module proxy and cached outside the tree
# (~/.cache/ctlb/<tool>/<version>, or $$CTLB_CACHE): containerd 2.x (the e2e
# suite runs against it and Debian's 1.6), the reference CNI plugins at a
# version that speaks CNI 1.1.0 (STATUS) and kubelet (the static-pod test).
# make test builds them before the tests (cold: containerd 50-80 s, plugins
# 10 s, kubelet 6-8 min; cached: instant); the tests build what is missing
# themselves. Included from the Makefile.
.PHONY: runtime-bins containerd-bin cni-plugins-bin kubelet-bin
runtime-bins: containerd-bin cni-plugins-bin kubelet-bin

containerd-bin:
	@echo "containerd 2.x: $$(hack/build-containerd.sh)"

cni-plugins-bin:
	@echo "CNI reference plugins: $$(hack/build-cni-plugins.sh)"

kubelet-bin:
	@echo "kubelet: $$(hack/build-kubelet.sh)"

# make demo-kubelet: a real kubelet starting static pods on containerd 2.x
# with ctlb chained, with timings (manifest -> sandbox ready -> first
# redirected connect); hack/demo-kubelet.sh runs TestKubeletStaticPods.
.PHONY: demo-kubelet
demo-kubelet: deps
	hack/demo-kubelet.sh
