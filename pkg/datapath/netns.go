package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cgroupv2"
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
// directed: those of every process in an attached cgroup (and its
// descendants). The caller closes the set.
func (d *Datapath) AttachedNetNS() (*NetNSSet, error) {
	s := &NetNSSet{}
	dirs, err := d.attachedCgroupDirs()
	if err != nil {
		s.Close()
		return nil, err
	}
	for _, dir := range dirs {
		if err := s.AddCgroup(dir); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// cgroupPathCache maps attached cgroups' IDs to their directories, so that
// a termination pass (which must start within milliseconds of a set
// change) does not walk the whole cgroup tree: a cached path is used when
// its inode is still the cgroup's ID, and a miss walks the tree once.
type cgroupPathCache struct {
	mu    sync.Mutex
	paths map[uint64]string
}

// attachedCgroupDirs lists the directories of the live attached cgroups.
func (d *Datapath) attachedCgroupDirs() ([]string, error) {
	entries, err := os.ReadDir(d.linksDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	var ids []uint64
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "_") {
			continue
		}
		if id := d.attachmentCgroupID(e.Name()); id != 0 {
			ids = append(ids, id)
		}
	}
	c := &d.cgPaths
	c.mu.Lock()
	defer c.mu.Unlock()
	fresh := func(id uint64) bool {
		p, ok := c.paths[id]
		if !ok {
			return false
		}
		got, err := cgroupv2.ID(p)
		return err == nil && got == id
	}
	for _, id := range ids {
		if !fresh(id) {
			h, err := cgroupv2.Default()
			if err != nil {
				return nil, err
			}
			idx, err := h.IndexByID()
			if err != nil {
				return nil, fmt.Errorf("list attached cgroups: %w", err)
			}
			c.paths = map[uint64]string{}
			for _, id := range ids {
				if p, ok := idx[id]; ok {
					c.paths[id] = p
				}
			}
			break
		}
	}
	var out []string
	for _, id := range ids {
		if p, ok := c.paths[id]; ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// attachmentCgroupID reads the cgroup ID from the first of an attachment's
// link pins that is there; 0 when none is (or the cgroup is gone).
func (d *Datapath) attachmentCgroupID(id string) uint64 {
	dir := filepath.Join(d.linksDir(), id)
	for _, h := range hooks {
		l, err := link.LoadPinnedLink(filepath.Join(dir, h.name), nil)
		if err != nil {
			continue
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			continue
		}
		if cg := info.Cgroup(); cg != nil && cg.CgroupId != 0 {
			return cg.CgroupId
		}
	}
	return 0
}
