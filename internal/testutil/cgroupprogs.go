package testutil

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// CgroupPrograms counts the programs attached directly to the cgroup
// directory on the given hooks: the kernel's word on what attachments left
// there.
func CgroupPrograms(t testing.TB, dir string, hooks []ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatalf("open cgroup: %v", err)
	}
	defer f.Close()
	n := 0
	for _, at := range hooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s programs of %s: %v", at, dir, err)
		}
		n += len(res.Programs)
	}
	return n
}

// WaitCgroupPrograms waits, bounded, until want programs are attached
// directly to the cgroup on the hooks: unpinning a link releases it from a
// kernel work queue, so the programs leave the cgroup a moment after the
// unlink returns.
func WaitCgroupPrograms(t testing.TB, dir string, hooks []ebpf.AttachType, want int) {
	t.Helper()
	Eventually(t, fmt.Sprintf("%d programs attached to %s", want, dir), 10*time.Second, func() (bool, string) {
		n := CgroupPrograms(t, dir, hooks)
		return n == want, fmt.Sprintf("%d programs", n)
	})
}
