package cni

import (
	"encoding/json"
	"errors"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/podcgroup"
)

// confSeeds are configs a runtime sends (ADD with prevResult, DEL, GC) and
// near misses of each.
var confSeeds = []string{
	`{"cniVersion": "1.0.0", "name": "ctlbnet", "type": "ctlb", ` + prev + `}`,
	`{"cniVersion": "1.0.0", "name": "ctlbnet", "type": "ctlb", "bpffs": "/sys/fs/bpf/ctlb", "socket": "/run/ctlb/ctlbd.sock",
		"stateDir": "/run/ctlb", "logFile": "/var/log/ctlb.log", "logLevel": "debug", "capabilities": {"cgroupPath": true},
		"runtimeConfig": {"cgroupPath": "/kubepods/besteffort/pod1", "portMappings": []}, "args": {"cni": {"x": 1}}, ` + prev + `}`,
	`{"cniVersion": "0.4.0", "name": "n", "type": "ctlb", "prevResult": {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "198.18.0.5/24"}]}}`,
	`{"cniVersion": "1.1.0", "name": "n", "type": "ctlb", "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]}`,
	`{"cniVersion": "1.1.0", "name": "n", "type": "ctlb", "scope": "host", ` + prev + `}`,
	`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", "scope": "host", "cgroupPath": "/x", ` + prev + `}`,
	`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", "runtimeConfig": {"cgroupPath": 7}, ` + prev + `}`,
	`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", "prevResult": {"cniVersion": "9.9.9"}}`,
	`{"cniVersion": "1.0.0", "name": "n", "type": "ctlb", "socket": "/a/../b", "Bpffs": "x"}`,
	`{"cniVersion": "1.0.0", "prevResult": null, "runtimeConfig": null}`,
	`{}`, `[]`, `null`, `"x"`, ``,
}

// FuzzParseConf: the stdin parser never panics, with or without a required
// prevResult. Every rejection is the spec's error with the code for what
// went wrong (6: not decodable, 7: invalid) and a message naming ctlb;
// every accepted config holds what ADD, DEL and CHECK rely on.
func FuzzParseConf(f *testing.F) {
	for _, s := range confSeeds {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, stdin []byte, needPrev bool) {
		c, err := ParseConf(stdin, needPrev)
		if err != nil {
			var ce *types.Error
			if !errors.As(err, &ce) {
				t.Fatalf("rejection %v (%T) is not a CNI error", err, err)
			}
			if ce.Code != types.ErrDecodingFailure && ce.Code != types.ErrInvalidNetworkConfig && ce.Code != types.ErrUnsupportedField {
				t.Fatalf("rejection with code %d, want %d, %d or %d: %v", ce.Code, types.ErrUnsupportedField, types.ErrDecodingFailure, types.ErrInvalidNetworkConfig, ce)
			}
			if !strings.HasPrefix(ce.Msg, "ctlb") || ce.Details == "" {
				t.Fatalf("rejection %q (details %q): want a message naming ctlb and details", ce.Msg, ce.Details)
			}
			if _, err := json.Marshal(ce); err != nil {
				t.Fatalf("rejection does not encode as the spec's error JSON: %v", err)
			}
			if c != nil {
				t.Fatal("a config came back with an error")
			}
			return
		}
		if c == nil {
			t.Fatal("no config and no error")
		}
		if needPrev && c.PrevResult == nil {
			t.Fatal("accepted without the prevResult a chained ADD needs")
		}
		if c.RawPrevResult != nil && c.PrevResult == nil {
			t.Fatal("a prevResult was given but not parsed")
		}
		for name, p := range map[string]string{"bpffs": c.BPFFS, "socket": c.Socket, "stateDir": c.StateDir} {
			if !filepath.IsAbs(p) || filepath.Clean(p) != p {
				t.Fatalf("accepted %s %q: not a clean absolute path", name, p)
			}
		}
		if c.LogFile != "" && (!filepath.IsAbs(c.LogFile) || filepath.Clean(c.LogFile) != c.LogFile) {
			t.Fatalf("accepted logFile %q", c.LogFile)
		}
		switch c.Scope {
		case ScopePod:
		case ScopeHost:
			if c.cgroupPath() != c.RuntimeConfig.CgroupPath || c.CgroupPath != "" {
				t.Fatalf("host scope accepted with cgroupPath %q", c.CgroupPath)
			}
		default:
			t.Fatalf("accepted scope %q", c.Scope)
		}
		switch c.LogLevel {
		case "", "debug", "info", "warn", "error":
		default:
			t.Fatalf("accepted logLevel %q", c.LogLevel)
		}
		var lv slog.Level
		if err := lv.UnmarshalText([]byte(c.LogLevel)); c.LogLevel != "" && err != nil {
			t.Fatalf("accepted logLevel %q does not parse: %v", c.LogLevel, err)
		}
		// The same bytes parse the same: no state leaks between calls.
		again, err := ParseConf(stdin, needPrev)
		if err != nil || !reflect.DeepEqual(again, c) {
			t.Fatalf("second parse differs: %+v (%v), first %+v", again, err, c)
		}
	})
}

// FuzzParseConfLenient: DEL's and GC's parse never panics and fails only on
// stdin that is not a JSON object; every path it keeps usable is clean and
// absolute, and every reset key is named.
func FuzzParseConfLenient(f *testing.F) {
	for _, s := range confSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, problems, err := ParseConfLenient(stdin)
		var obj map[string]json.RawMessage
		if json.Unmarshal(stdin, &obj) != nil {
			if err == nil {
				t.Fatal("accepted stdin that is not a JSON object")
			}
			return
		}
		if err != nil || c == nil {
			t.Fatalf("lenient parse of a JSON object failed: %v", err)
		}
		for name, p := range map[string]string{"bpffs": c.BPFFS, "socket": c.Socket, "stateDir": c.StateDir} {
			if c.usable(name) && (!filepath.IsAbs(p) || filepath.Clean(p) != p) {
				t.Fatalf("kept %s %q: not a clean absolute path", name, p)
			}
		}
		if len(problems) < len(c.unusable) {
			t.Fatalf("%d keys reset, %d problems named", len(c.unusable), len(problems))
		}
	})
}

// FuzzCNIArgs: CNI_ARGS parsing never panics. A rejection is error code 4
// naming CNI_ARGS (or K8S_POD_UID) and the offending value; an accepted
// string yields exactly its KEY=VALUE pairs, and the pod UID that reaches
// the cgroup search is a plain name, never a path.
func FuzzCNIArgs(f *testing.F) {
	for _, s := range []string{
		"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=6f1d0b5e-6f9a-4c3e-9d6b-0a1b2c3d4e5f",
		"K8S_POD_UID=../../..", "K8S_POD_UID", "K8S_POD_UID=", "=x", ";;", "a=b=c;K8S_POD_UID=x_y-z",
		"K8S_POD_UID=a/b", "K8S_POD_UID=" + strings.Repeat("a", 129), "K8S_POD_UID=a;K8S_POD_UID=b", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := parseArgs(s)
		c := &call{args: &skel.CmdArgs{Args: s, Netns: "/var/run/netns/x"}, conf: &Conf{CgroupPath: "/kubepods/x"}}
		h, herr := c.hints()
		if err != nil {
			if a != (PodArgs{}) {
				t.Fatal("args came back with an error")
			}
			if !strings.Contains(err.Error(), "CNI_ARGS") {
				t.Fatalf("rejection %q does not name CNI_ARGS", err)
			}
			wantArgsErr(t, herr, "CNI_ARGS")
			return
		}
		uid := string(a.K8S_POD_UID)
		if uid != "" && !strings.Contains(";"+s+";", ";K8S_POD_UID="+uid+";") {
			t.Fatalf("pod UID %q is not in %q", uid, s)
		}
		if uid != "" && podcgroup.ValidatePodUID(uid) != nil {
			wantArgsErr(t, herr, "K8S_POD_UID")
			return
		}
		if herr != nil {
			t.Fatalf("hints rejected valid CNI_ARGS %q: %v", s, herr)
		}
		if h.PodUID != uid || h.Netns != "/var/run/netns/x" || h.CgroupPath != "/kubepods/x" {
			t.Fatalf("hints %+v from %q", h, s)
		}
		if strings.ContainsAny(uid, "/.\x00") {
			t.Fatalf("pod UID %q could act as a path", uid)
		}
	})
}

func wantArgsErr(t *testing.T, err error, name string) {
	t.Helper()
	var ce *types.Error
	if !errors.As(err, &ce) || ce.Code != types.ErrInvalidEnvironmentVariables {
		t.Fatalf("hints error %v: want CNI error %d", err, types.ErrInvalidEnvironmentVariables)
	}
	if !strings.Contains(ce.Msg, name) || ce.Details == "" {
		t.Fatalf("hints error %q (details %q): want it to name %s, with details", ce.Msg, ce.Details, name)
	}
}
