// Package bpffs makes sure a pin directory lies on a BPF filesystem. The
// usual pin directory, /sys/fs/bpf/ctlb, sits under a directory of sysfs
// that accepts no mkdir: when /sys/fs/bpf is not bpffs yet, the bpffs goes
// on /sys/fs/bpf itself (as systemd mounts it), and the pin directory is
// made inside it.
package bpffs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Is reports whether path lies on a bpffs.
func Is(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// Ensure makes dir exist on a bpffs. It returns the directory it mounted a
// new bpffs on, or "" when dir was on one already (or could be created
// inside one).
//
//   - dir is on bpffs: nothing to do.
//   - dir exists, not on bpffs: mount on dir if it is empty; a non-empty
//     one is refused (the mount would hide its files).
//   - dir is missing and its nearest existing ancestor is on bpffs: mkdir.
//   - that ancestor is on sysfs (/sys/fs/bpf not mounted): mount on the
//     ancestor, then mkdir the rest inside the new bpffs.
//   - elsewhere (a plain directory tree): mkdir dir, mount on dir.
//
// A new mount has mode 0700: the pins are root's alone.
func Ensure(dir string) (mounted string, err error) {
	dir = filepath.Clean(dir)
	if !filepath.IsAbs(dir) {
		return "", fmt.Errorf("bpffs %q: want an absolute path", dir)
	}
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return "", fmt.Errorf("bpffs %s: not a directory", dir)
		}
		if Is(dir) {
			return "", nil
		}
		return dir, mount(dir)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("bpffs %s: %w", dir, err)
	}
	anc := nearestExisting(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(anc, &st); err != nil {
		return "", fmt.Errorf("bpffs %s: statfs %s: %w", dir, anc, err)
	}
	switch st.Type {
	case unix.BPF_FS_MAGIC:
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", fmt.Errorf("bpffs: create %s: %w", dir, err)
		}
		return "", nil
	case unix.SYSFS_MAGIC:
		// sysfs takes no new directories: /sys/fs/bpf is the mount point
		// the kernel provides for a bpffs.
		if err := mount(anc); err != nil {
			return "", err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return anc, fmt.Errorf("bpffs: create %s in the bpffs mounted on %s: %w", dir, anc, err)
		}
		return anc, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("bpffs: create %s: %w", dir, err)
	}
	return dir, mount(dir)
}

// mount puts a new bpffs on dir, which must be empty: a mount over files
// hides them until it goes (a --bpffs that names the wrong directory).
func mount(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", dir, err)
	}
	names, err := f.Readdirnames(1)
	f.Close()
	if len(names) > 0 {
		return fmt.Errorf("%s is not empty and not a bpffs: mounting there would hide its files", dir)
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("mount bpffs on %s: read it: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", dir, err)
	}
	return nil
}

// nearestExisting is the deepest ancestor of dir that exists.
func nearestExisting(dir string) string {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		if _, err := os.Stat(p); err == nil || p == "/" {
			return p
		}
	}
}
