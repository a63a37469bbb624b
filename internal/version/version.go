// Package version names the build, for `ctlbd version` and the CNI plugin's
// VERSION answer. Release builds set Version with -ldflags -X.
package version

import (
	"runtime"
	"runtime/debug"
)

// Version is set at link time: -X github.com/ctlb/ctlb/internal/version.Version=v1.2.3
var Version = "dev"

// Commit returns the VCS revision the binary was built from, when known.
func Commit() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	rev, dirty := "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev != "" && dirty {
		rev += "-dirty"
	}
	return rev
}

// String is the one-line version: "ctlb VERSION (COMMIT, GO)".
func String() string {
	s := "ctlb " + Version
	if c := Commit(); c != "" {
		s += " (" + c + ", " + runtime.Version() + ")"
	} else {
		s += " (" + runtime.Version() + ")"
	}
	return s
}
