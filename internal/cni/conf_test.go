package cni

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/pkg/datapath"
)

const prev = `"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.5/24"}]}`

func TestParseConfDefaults(t *testing.T) {
	c, err := ParseConf([]byte(`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", `+prev+`,
		"capabilities": {"cgroupPath": true}, "runtimeConfig": {"cgroupPath": "/kubepods/pod1", "portMappings": []},
		"args": {"cni": {"x": 1}}}`), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.BPFFS != "/sys/fs/bpf/ctlb" || c.Socket != "/run/ctlb/ctlbd.sock" || c.StateDir != "/run/ctlb" || c.Scope != ScopePod {
		t.Errorf("defaults: %+v", c)
	}
	if c.cgroupPath() != "/kubepods/pod1" || c.PrevResult == nil {
		t.Errorf("runtimeConfig cgroupPath %q, prevResult %v", c.cgroupPath(), c.PrevResult)
	}
	c.CgroupPath = "/override"
	if c.cgroupPath() != "/override" {
		t.Errorf("the config's cgroupPath does not override the runtime's: %q", c.cgroupPath())
	}
}

func TestParseConfRejects(t *testing.T) {
	for in, want := range map[string]struct {
		code uint
		text string
	}{
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb"}`:                                      {types.ErrInvalidNetworkConfig, "prevResult"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "Bpffs": "/x"}`:         {types.ErrUnsupportedField, `unsupported field "Bpffs": "/x"`},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "mtu": 1400}`:           {types.ErrUnsupportedField, `"mtu": 1400`},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "logLevel": "loud"}`:    {types.ErrInvalidNetworkConfig, "logLevel"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "socket": "/a/../b"}`:   {types.ErrInvalidNetworkConfig, "socket"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "stateDir": 3}`:         {types.ErrInvalidNetworkConfig, "stateDir"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "logFile": "ctlb.log"}`: {types.ErrInvalidNetworkConfig, "logFile"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "pendingGrace": "1x"}`:  {types.ErrInvalidNetworkConfig, "pendingGrace"},
		`[1, 2]`: {types.ErrDecodingFailure, "decode"},
	} {
		_, err := ParseConf([]byte(in), true)
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != want.code || !strings.Contains(ce.Error(), want.text) {
			t.Errorf("ParseConf(%s) = %v, want code %d mentioning %s", in, err, want.code, want.text)
		}
	}
	// DEL, STATUS and GC need no prevResult.
	if _, err := ParseConf([]byte(`{"cniVersion": "1.1.0", "name": "n", "type": "ctlb", "cni.dev/valid-attachments": []}`), false); err != nil {
		t.Errorf("GC config: %v", err)
	}
}

// The spec's well-known keys, what runtimes inject and any cni.dev/ key
// are not ctlb's business: accepted whatever their shape.
func TestParseConfTolerates(t *testing.T) {
	in := `{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `,
		"ipam": "not even an object", "dns": {"nameservers": ["198.18.0.53"]}, "ipMasq": true,
		"capabilities": {"cgroupPath": true, "portMappings": true}, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"a": "b"}},
		"args": {"cni": {"labels": []}}, "cni.dev/attachments": [], "cni.dev/some-future-key": 7,
		"deviceID": "0000:03:00.1", "pciBusID": "0000:03:00.1"}`
	if _, err := ParseConf([]byte(in), true); err != nil {
		t.Fatalf("ParseConf: %v", err)
	}
}

// DEL and GC get a lenient parse: nothing beyond decodable JSON fails it;
// the bad keys are named and reset.
func TestParseConfLenient(t *testing.T) {
	in := `{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", "prevResult": "garbage", "Bpffs": 1,
		"bpffs": "relative", "logLevel": "loud", "stateDir": "/run/x", "runtimeConfig": {"cgroupPath": 7}, "pendingGrace": -1}`
	c, problems, err := ParseConfLenient([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(problems)
	for _, want := range []string{`"Bpffs"`, `"bpffs"`, `"logLevel"`, `"runtimeConfig"`, `"pendingGrace"`} {
		if !strings.Contains(got, want) {
			t.Errorf("problems %s: want one naming %s", got, want)
		}
	}
	if c.usable("bpffs") || !c.usable("stateDir") || c.StateDir != "/run/x" || c.LogLevel != "" {
		t.Errorf("lenient conf %+v: want bpffs unusable, stateDir kept, logLevel reset", c)
	}
}

func TestAttachmentID(t *testing.T) {
	hexID := strings.Repeat("ab", 32)
	if got := AttachmentID("net", hexID); got != "cni-"+netTag("net")+"-"+hexID || !ownedBy("net", got) || ownedBy("other", got) {
		t.Errorf("AttachmentID(hex) = %q", got)
	}
	for _, id := range []string{"pod.with.dots", strings.Repeat("a", 200), "a_b-c.d"} {
		got := AttachmentID("net", id)
		if err := datapath.ValidateAttachmentID(got); err != nil || !ownedBy("net", got) || ownedBy("other", got) {
			t.Errorf("AttachmentID(%q) = %q: %v", id, got, err)
		}
		if again := AttachmentID("net", id); again != got {
			t.Errorf("AttachmentID(%q) is not stable: %q then %q", id, got, again)
		}
	}
	if AttachmentID("net", "a.b") == AttachmentID("net", "a.c") || AttachmentID("n1", "a") == AttachmentID("n2", "a") {
		t.Error("distinct attachments share an attachment ID")
	}
	for _, other := range []string{HostAttachmentID, "cgroup-1234", "cni-" + hexID} {
		if ownedBy("net", other) {
			t.Errorf("%s is taken for the network's own", other)
		}
	}
}

func TestParseArgs(t *testing.T) {
	a, err := parseArgs("IgnoreUnknown=1;K8S_POD_UID=abc-1;K8S_POD_NAME=p;FOO=bar")
	if err != nil || a.K8S_POD_UID != "abc-1" || a.K8S_POD_NAME != "p" {
		t.Errorf("parseArgs = %+v, %v", a, err)
	}
	// Without IgnoreUnknown, an unknown key is an error (the library's rule);
	// the keys Kubernetes runtimes pass are known.
	if _, err := parseArgs("K8S_POD_UID=u;FOO=bar"); err == nil || !strings.Contains(err.Error(), "FOO") {
		t.Errorf("parseArgs accepted an unknown key without IgnoreUnknown: %v", err)
	}
	if _, err := parseArgs("K8S_POD_NAMESPACE=d;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u"); err != nil {
		t.Errorf("parseArgs of kubelet's keys: %v", err)
	}
	if _, err := parseArgs("K8S_POD_UID"); err == nil {
		t.Error("parseArgs accepted a key without a value")
	}
}
