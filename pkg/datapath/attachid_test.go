package datapath_test

import (
	"testing"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// TestCgroupIDOf: the cgroup ID comes back out of the attachment IDs
// CgroupAttachmentID makes, and out of nothing else.
func TestCgroupIDOf(t *testing.T) {
	if id, ok := datapath.CgroupIDOf(datapath.CgroupAttachmentID(5036298)); !ok || id != 5036298 {
		t.Errorf("CgroupIDOf(CgroupAttachmentID(5036298)) = %d, %v", id, ok)
	}
	for _, s := range []string{"cni-15e3d13e-0123", "cgroup-", "cgroup-x1", "cgroup--1", "host", ""} {
		if id, ok := datapath.CgroupIDOf(s); ok {
			t.Errorf("CgroupIDOf(%q) = %d, true; want not a cgroup attachment ID", s, id)
		}
	}
}
