package nri

import (
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/nri/annotation"
	"github.com/ctlb/ctlb/pkg/datapath"
)

func TestContainerNames(t *testing.T) {
	for _, tc := range []struct {
		ann  map[string]string
		want string
		ok   bool
	}{
		{nil, "", false},
		{map[string]string{"other": "x"}, "", false},
		{map[string]string{AnnotationContainers: "envoy-sidecar,consul-dataplane"}, "envoy-sidecar|consul-dataplane", true},
		{map[string]string{AnnotationContainers: " envoy , ,dp "}, "envoy|dp", true},
		// Present but empty: container scope with no container, so no
		// container of the pod gets ctlb.
		{map[string]string{AnnotationContainers: ""}, "", true},
	} {
		names, ok := annotation.ContainerNames(tc.ann)
		if got := strings.Join(names, "|"); got != tc.want || ok != tc.ok {
			t.Errorf("ContainerNames(%v) = %q, %v; want %q, %v", tc.ann, got, ok, tc.want, tc.ok)
		}
	}
}

func TestSystemdPath(t *testing.T) {
	got, err := systemdPath("kubepods-besteffort-pod1234.slice:cri-containerd:abc")
	want := "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-abc.scope"
	if err != nil || got != want {
		t.Errorf("systemdPath = %q, %v; want %q", got, err, want)
	}
	for _, bad := range []string{"kubepods", "a:b", "notaslice:p:n"} {
		if _, err := systemdPath(bad); err == nil {
			t.Errorf("systemdPath(%q) accepted", bad)
		}
	}
}

func TestAttachmentID(t *testing.T) {
	id := strings.Repeat("a", 64)
	if got := AttachmentID(id); got != "nri-"+id {
		t.Errorf("AttachmentID(%q) = %q", id, got)
	}
	for _, odd := range []string{"with.dot", strings.Repeat("b", 200)} {
		got := AttachmentID(odd)
		if err := datapath.ValidateAttachmentID(got); err != nil || !strings.HasPrefix(got, "nrih-") {
			t.Errorf("AttachmentID(%q) = %q (%v)", odd, got, err)
		}
	}
}
