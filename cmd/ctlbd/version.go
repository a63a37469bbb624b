package main

import (
	"runtime"

	"github.com/ctlb/ctlb/internal/version"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

func localVersion() api.Version {
	return api.Version{Version: version.Version, Commit: version.Commit(), Layout: datapath.Layout, Go: runtime.Version()}
}
