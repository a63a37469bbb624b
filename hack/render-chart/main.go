// Command render-chart writes conf/kubernetes/ctlb.yaml from charts/ctlb:
// the plain manifests are the chart rendered for release "ctlb" in
// namespace ctlb-system with the Consul example values and the namespace
// included. `make manifests` runs it; test/manifests fails when the file
// is not what the chart renders.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/ctlb/ctlb/internal/chart"
)

func main() {
	root := flag.String("chart", "charts/ctlb", "chart directory")
	out := flag.String("o", "conf/kubernetes/ctlb.yaml", "output file")
	flag.Parse()
	b, err := chart.Manifests(*root)
	if err == nil {
		err = os.WriteFile(*out, b, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "render-chart:", err)
		os.Exit(1)
	}
}
