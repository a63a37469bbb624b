package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// netnsID identifies a network namespace: the device and inode of its nsfs file.
type netnsID struct{ dev, ino uint64 }

// NetNSSet is a set of open network namespace handles, one per namespace.
type NetNSSet struct {
	files []*os.File
	seen  map[netnsID]bool
}

// Files are the handles, in the order they were added.
func (s *NetNSSet) Files() []*os.File { return s.files }

// Len is the number of distinct namespaces.
func (s *NetNSSet) Len() int { return len(s.files) }

// Close closes every handle.
func (s *NetNSSet) Close() {
	for _, f := range s.files {
		f.Close()
	}
	s.files, s.seen = nil, nil
}

// AddPath opens the namespace at path (/proc/PID/ns/net, /run/netns/NAME)
// unless the set holds it already. A path that is gone is not an error:
// processes exit between listing and opening.
func (s *NetNSSet) AddPath(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return fmt.Errorf("stat network namespace %s: %w", path, err)
	}
	id := netnsID{uint64(st.Dev), st.Ino}
	if s.seen == nil {
		s.seen = map[netnsID]bool{}
	}
	if s.seen[id] {
		f.Close()
		return nil
	}
	s.seen[id] = true
	s.files = append(s.files, f)
	return nil
}

// AddCgroup adds the network namespace of every process in the cgroup at
// dir and below it: the namespaces where sockets of that cgroup live.
func (s *NetNSSet) AddCgroup(dir string) error {
	return filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return fmt.Errorf("walk cgroup %s: %w", p, err)
		}
		if !e.IsDir() {
			return nil
		}
		pids, err := readPIDs(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return err
		}
		for _, pid := range pids {
			if err := s.AddPath(fmt.Sprintf("/proc/%d/ns/net", pid)); err != nil {
				return err
			}
		}
		return nil
	})
}

func readPIDs(path string) ([]int, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if pid, err := strconv.Atoi(sc.Text()); err == nil {
			pids = append(pids, pid)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return pids, nil
}

// AttachedNetNS opens the network namespaces that may hold sockets ctlb
// directed: the caller's own and those of every process in an attached
// cgroup (and its descendants). The caller closes the set.
func (d *Datapath) AttachedNetNS() (*NetNSSet, error) {
	s := &NetNSSet{}
	if err := s.AddPath("/proc/self/ns/net"); err != nil {
		return nil, err
	}
	atts, err := d.Attachments()
	if err != nil {
		s.Close()
		return nil, err
	}
	for _, a := range atts {
		if !a.Alive || a.CgroupPath == "" {
			continue
		}
		if err := s.AddCgroup(a.CgroupPath); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}
