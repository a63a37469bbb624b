# Benchmarks (issue 7), included from the Makefile.
#   make bench       every path side by side in one run: a table on stdout,
#                    bench/results.json, bench/results.txt, bench/results.dat
#                    (root; about 8 minutes on 2 cores)
#   make bench-fleet the Consul load of 50 daemons (bench/fleet.txt; about 3 min)
#   make bench-serverloss  servers leaving, dying, joining (issue 13): set change
#                    to socket end, failed connects per server death, time back
#                    in rotation, rebalance time (bench/serverloss.txt; about 1 min)
#   make bench-plot  draw docs/bench.png from bench/results.dat with gnuplot
# BENCH_FLAGS passes options to the program, e.g. BENCH_FLAGS="-rounds 3".

BENCH_FLAGS ?=

.PHONY: bench bench-fleet bench-serverloss bench-plot

bench: deps
	$(GOBUILD) -o bin/ctlb-bench ./test/bench
	$(GOBUILD) -o bin/ctlb ./plugins/meta/ctlb
	bin/ctlb-bench -out bench/results.json -cni-plugin bin/ctlb $(BENCH_FLAGS)
	$(MAKE) bench-fleet
	$(MAKE) bench-serverloss

# The Consul load of a fleet (issue 16): 50 ctlbd daemons on one real
# 3-server cluster; requests/s the servers receive at rest and in churn.
bench-fleet: deps
	@mkdir -p bench
	$(GO) test -count=1 -run '^$$' -bench FleetConsul -benchtime 1x -timeout 15m -v ./test/bench > bench/fleet.txt 2>&1; \
	  rc=$$?; grep -E 'FLEET|^Benchmark|^(ok|FAIL)' bench/fleet.txt; exit $$rc

# What a client sees when servers leave, die or join (issue 13), measured
# against the real ctlbd: median and max of 10 rounds each.
bench-serverloss: deps
	@mkdir -p bench
	$(GO) test -count=1 -run '^$$' -bench ServerLoss -benchtime 1x -timeout 10m -v ./test/ctlbd | tee bench/serverloss.txt

bench-plot: deps
	@command -v gnuplot >/dev/null || { echo "bench-plot needs gnuplot (Debian package gnuplot-nox)"; exit 1; }
	@test -f bench/results.dat || { echo "no bench/results.dat: run make bench first"; exit 1; }
	gnuplot -e "datafile='bench/results.dat'; outfile='docs/bench.png'" hack/bench-plot.gnuplot
