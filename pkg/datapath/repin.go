package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/ctlb/ctlb/internal/crashpoint"
)

// Repin puts back pins of maps and programs that were removed while this
// handle was open (by hand, or by a careless cleanup). The objects are still
// alive through the handle's file descriptors, so pinning them again restores
// the shared state exactly: the CNI plugin and a restarted ctlbd find the
// same maps the attached programs use. It returns the names it re-pinned.
func (d *Datapath) Repin() ([]string, error) {
	type pinnable interface {
		Pin(string) error
		Unpin() error
	}
	objs := map[string]pinnable{}
	for name, m := range d.maps.byName() {
		if *m != nil {
			objs[name] = *m
		}
	}
	for hook, p := range d.progs {
		objs[progPin(hook)] = p
	}
	if err := os.MkdirAll(d.linksDir(), 0o700); err != nil {
		return nil, fmt.Errorf("repin: %w", err)
	}
	var fixed []string
	for name, obj := range objs {
		path := filepath.Join(d.dir, name)
		if _, err := os.Lstat(path); err == nil {
			continue
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fixed, fmt.Errorf("repin: %w", err)
		}
		// The handle still thinks it is pinned there: forget that first.
		_ = obj.Unpin()
		if err := obj.Pin(path); err != nil {
			return fixed, fmt.Errorf("repin %s: %w", path, err)
		}
		fixed = append(fixed, name)
		crashpoint.Hit(crashpoint.Repin)
	}
	// The root release link is a link, not a handle this process holds:
	// with its pin gone the kernel detached it, so it is attached again.
	if _, err := os.Lstat(filepath.Join(d.dir, rootLinkPin)); errors.Is(err, fs.ErrNotExist) {
		if err := d.ensureRootRelease(); err != nil {
			return fixed, fmt.Errorf("repin: %w", err)
		}
		fixed = append(fixed, rootLinkPin)
	}
	return fixed, nil
}
