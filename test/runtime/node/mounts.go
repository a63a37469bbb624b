package node

import (
	"errors"
	"io/fs"
	"sort"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// UnmountUnder unmounts, deepest first, whatever is still mounted under dir
// (a runtime's container root filesystems, /dev/shm of sandboxes, network
// namespaces, its storage's private bind mount), so that dir can be removed.
func UnmountUnder(t testing.TB, dir string) {
	t.Helper()
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Errorf("mounts under %s: %v", dir, err)
		return
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("unmount %s: %v", m.Mountpoint, err)
		}
	}
}
