// Package cgroupv2 finds the cgroup v2 hierarchy and keeps every cgroup path
// ctlb is given inside it. cgroup BPF hooks exist only on v2, which a host
// mounts either at /sys/fs/cgroup (pure v2) or beside the v1 controllers
// (hybrid, usually /sys/fs/cgroup/unified), so the mount is read from
// mountinfo rather than assumed.
package cgroupv2

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/cgroups/v3"
	"github.com/moby/sys/mountinfo"
)

// ErrNoV2 means the host has no cgroup v2 hierarchy mounted.
var ErrNoV2 = errors.New("no cgroup v2 hierarchy mounted (cgroup BPF hooks need cgroup v2)")

// Mountpoint returns where the cgroup v2 hierarchy is mounted. When it is
// mounted more than once, the shortest path wins (/sys/fs/cgroup before
// /sys/fs/cgroup/unified before a container's bind mount of it).
func Mountpoint() (string, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("cgroup2"))
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	best := ""
	for _, m := range mounts {
		if m.Root != "/" {
			continue // a bind mount of a subtree cannot hold arbitrary paths
		}
		if best == "" || len(m.Mountpoint) < len(best) {
			best = m.Mountpoint
		}
	}
	if best == "" {
		return "", ErrNoV2
	}
	return best, nil
}

// Hierarchy is one cgroup v2 mount.
type Hierarchy struct {
	Mount string
}

// Default returns the host's cgroup v2 hierarchy. Without one, the error
// names the host's cgroup mode as containerd/cgroups detects it.
func Default() (Hierarchy, error) {
	m, err := Mountpoint()
	if err != nil {
		if errors.Is(err, ErrNoV2) {
			return Hierarchy{}, fmt.Errorf("%w: the host's cgroup mode is %s", err, HostMode())
		}
		return Hierarchy{}, err
	}
	return Hierarchy{Mount: m}, nil
}

// HostMode names the host's cgroup mode (unified, hybrid, legacy,
// unavailable) as containerd/cgroups detects it at /sys/fs/cgroup.
func HostMode() string {
	switch cgroups.Mode() {
	case cgroups.Unified:
		return "unified (cgroup v2 only)"
	case cgroups.Hybrid:
		return "hybrid (cgroup v1 with v2 at /sys/fs/cgroup/unified)"
	case cgroups.Legacy:
		return "legacy (cgroup v1 only)"
	}
	return "unavailable (nothing mounted at /sys/fs/cgroup)"
}

// Resolve turns path (absolute on the host, or relative to the v2 mount as in
// /proc/PID/cgroup and CNI's cgroupPath) into a cleaned absolute directory
// inside the hierarchy. It rejects paths that leave the mount by `..` or by
// symlinks, and the root itself unless allowRoot is set: attaching at the root
// reaches every socket on the host. The directory need not exist yet.
func (h Hierarchy) Resolve(path string, allowRoot bool) (string, error) {
	if path == "" {
		return "", errors.New("empty cgroup path")
	}
	if strings.ContainsRune(path, 0) {
		return "", fmt.Errorf("cgroup path %q contains a NUL byte", path)
	}
	for _, part := range strings.Split(path, "/") {
		if part == ".." {
			return "", fmt.Errorf("cgroup path %q: %q is not allowed", path, "..")
		}
	}
	abs := path
	if !strings.HasPrefix(path, h.Mount+"/") && path != h.Mount {
		// An absolute path that exists outside the mount (a v1 hierarchy, a
		// temp dir) is a mistake, not a path relative to the mount.
		if filepath.IsAbs(path) && filepath.Clean(path) != "/" {
			if _, err := os.Lstat(path); err == nil {
				return "", fmt.Errorf("cgroup path %q is outside the cgroup v2 mount %s", path, h.Mount)
			}
		}
		abs = filepath.Join(h.Mount, path)
	}
	abs = filepath.Clean(abs)
	if abs != h.Mount && !strings.HasPrefix(abs, h.Mount+"/") {
		return "", fmt.Errorf("cgroup path %q is outside the cgroup v2 mount %s", path, h.Mount)
	}
	// Symlinks: whatever part of the path exists must resolve to itself.
	if real, err := evalExisting(abs); err != nil {
		return "", fmt.Errorf("cgroup path %q: %w", path, err)
	} else if real != abs {
		return "", fmt.Errorf("cgroup path %q resolves through a symlink to %s", path, real)
	}
	if abs == h.Mount && !allowRoot {
		return "", fmt.Errorf("cgroup path %q is the cgroup v2 root: refusing host-wide scope (ask for it explicitly: \"ctlbd attach --host\", or \"scope\": \"host\" in the CNI config)", path)
	}
	return abs, nil
}

// evalExisting resolves symlinks in the longest existing prefix of p and
// appends the rest unchanged.
func evalExisting(p string) (string, error) {
	rest := ""
	for cur := p; ; {
		real, err := filepath.EvalSymlinks(cur)
		if err == nil {
			return filepath.Join(real, rest), nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		parent := filepath.Dir(cur)
		if parent == cur {
			return p, nil
		}
		rest = filepath.Join(filepath.Base(cur), rest)
		cur = parent
	}
}

// Rel returns path relative to the mount, with a leading slash, as the
// kernel prints it in /proc/PID/cgroup.
func (h Hierarchy) Rel(abs string) string {
	r := strings.TrimPrefix(abs, h.Mount)
	if r == "" {
		return "/"
	}
	return r
}

// ID returns the cgroup ID of the directory: on cgroup v2 it is the inode
// number, the same number the kernel reports in bpf_link info.
func ID(dir string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", dir, err)
	}
	return st.Ino, nil
}

// IndexByID walks the hierarchy once and maps cgroup IDs to directories, for
// naming the cgroups that bpf_links report only by ID.
func (h Hierarchy) IndexByID() (map[uint64]string, error) {
	idx := make(map[uint64]string)
	err := filepath.WalkDir(h.Mount, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil // a cgroup removed while we walk
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			idx[st.Ino] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk cgroup tree %s: %w", h.Mount, err)
	}
	return idx, nil
}

// IsPlainName reports whether s is 1-128 characters of [A-Za-z0-9_-]
// starting with a letter or digit: safe as one element of a cgroup or bpffs
// path (no dots, which bpffs refuses, no slashes, nothing hidden). A loop
// rather than a regexp: the CNI plugin starts for every pod, and compiling
// a {0,127} repetition costs it a fraction of a millisecond each time.
func IsPlainName(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i, c := range []byte(s) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}
