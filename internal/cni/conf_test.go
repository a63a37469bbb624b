package cni

import (
	"errors"
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
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "ipam": {}}`:            {types.ErrInvalidNetworkConfig, `"ipam"`},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "Bpffs": "/x"}`:         {types.ErrInvalidNetworkConfig, `"Bpffs"`},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "logLevel": "loud"}`:    {types.ErrInvalidNetworkConfig, "logLevel"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "socket": "/a/../b"}`:   {types.ErrInvalidNetworkConfig, "socket"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "stateDir": 3}`:         {types.ErrInvalidNetworkConfig, "stateDir"},
		`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", ` + prev + `, "logFile": "ctlb.log"}`: {types.ErrInvalidNetworkConfig, "logFile"},
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

func TestAttachmentID(t *testing.T) {
	hexID := strings.Repeat("ab", 32)
	if got := AttachmentID(hexID); got != "cni-"+hexID {
		t.Errorf("AttachmentID(hex) = %q", got)
	}
	for _, id := range []string{"pod.with.dots", strings.Repeat("a", 200), "a_b-c.d"} {
		got := AttachmentID(id)
		if err := datapath.ValidateAttachmentID(got); err != nil || !ownedAttachment(got) {
			t.Errorf("AttachmentID(%q) = %q: %v", id, got, err)
		}
		if again := AttachmentID(id); again != got {
			t.Errorf("AttachmentID(%q) is not stable: %q then %q", id, got, again)
		}
	}
	if AttachmentID("a.b") == AttachmentID("a.c") {
		t.Error("distinct container IDs share an attachment ID")
	}
	for _, other := range []string{HostAttachmentID, "cgroup-1234"} {
		if ownedAttachment(other) {
			t.Errorf("%s is taken for the plugin's own", other)
		}
	}
}

func TestParseArgs(t *testing.T) {
	m, err := parseArgs("IgnoreUnknown=1;K8S_POD_UID=abc-1;K8S_POD_NAME=p;")
	if err != nil || m["K8S_POD_UID"] != "abc-1" || m["K8S_POD_NAME"] != "p" {
		t.Errorf("parseArgs = %v, %v", m, err)
	}
	if _, err := parseArgs("K8S_POD_UID"); err == nil {
		t.Error("parseArgs accepted a key without a value")
	}
}
