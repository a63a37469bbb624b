package cni

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// removeInterrupted removes what a plugin killed half-way through ADD (or
// DEL) left of one attachment in bpffs: datapath.Attach builds an
// attachment in DIR/links/_tmp-ID-<12 hex> and renames it into place,
// Detach renames it to _del-ID-<12 hex> before unpinning. Such a directory
// is no attachment (listings skip it), yet its pinned links keep the
// programs on the pod cgroup, so a DEL that left it would leave the pod
// redirected until ctlbd's reconciler ages it out. It is safe to remove:
// the runtime never runs two operations of one container at once, and the
// callers first take the container's pending record away from ctlbd, the
// only other writer of this attachment.
//
// The names follow pkg/datapath's; a datapath method would be the better
// home for this.
func removeInterrupted(bpffs, id string) (int, error) {
	links := filepath.Join(bpffs, "links")
	entries, err := os.ReadDir(links)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("list %s: %w", links, err)
	}
	n := 0
	for _, e := range entries {
		if !interruptedOf(e.Name(), id) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(links, e.Name())); err != nil {
			return n, fmt.Errorf("remove interrupted %s: %w", e.Name(), err)
		}
		n++
	}
	return n, nil
}

// interruptedOf reports whether name is a temporary directory of attachment
// id: the exact ID then a 12-digit hex suffix, so that the attachment
// "cni-a" never claims those of "cni-a-1".
func interruptedOf(name, id string) bool {
	for _, prefix := range []string{"_tmp-", "_del-"} {
		rest, ok := strings.CutPrefix(name, prefix+id+"-")
		if ok && len(rest) == 12 && strings.Trim(rest, "0123456789abcdef") == "" {
			return true
		}
	}
	return false
}
