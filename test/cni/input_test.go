package cnitest

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Bad input gets the spec's error JSON with a meaningful code, and changes
// nothing: no attachment, no pending record.
func TestBadStdin(t *testing.T) {
	e := newEnv(t)
	p := e.cgroupfsPod("besteffort", true)
	conf := func(edit func(map[string]any)) []byte {
		var c map[string]any
		if err := json.Unmarshal(e.pluginStdin("1.0.0", nil, true), &c); err != nil {
			t.Fatal(err)
		}
		edit(c)
		return []byte(mustJSON(t, c))
	}
	uidArgs := "IgnoreUnknown=1;K8S_POD_UID=" + p.uid
	cases := []struct {
		name  string
		cmd   string
		args  string
		stdin []byte
		code  uint
		want  string
	}{
		{"malformed JSON", "ADD", uidArgs, []byte(`{"cniVersion": "1.0.0", "name": "ctlbnet", "type": "ctlb",`), types.ErrDecodingFailure, "unmarshal"},
		{"malformed JSON on DEL", "DEL", uidArgs, []byte(`{"cniVersion": "1.0.0", "name": "ctlbnet", "type": "ctlb"} trailing`), types.ErrDecodingFailure, ""},
		{"no prevResult", "ADD", uidArgs, e.pluginStdin("1.0.0", nil, false), types.ErrInvalidNetworkConfig, "chained plugin"},
		{"no prevResult on CHECK", "CHECK", uidArgs, e.pluginStdin("1.0.0", nil, false), types.ErrInvalidNetworkConfig, "chained plugin"},
		{"unknown key", "ADD", uidArgs, conf(func(c map[string]any) { c["bpfs"] = "/sys/fs/bpf/ctlb" }), types.ErrUnsupportedField, `unsupported field "bpfs": "/sys/fs/bpf/ctlb"`},
		{"unknown key on CHECK", "CHECK", uidArgs, conf(func(c map[string]any) { c["mtu"] = 1400 }), types.ErrUnsupportedField, `"mtu": 1400`},
		{"CNI_ARGS unknown key without IgnoreUnknown", "ADD", "K8S_POD_UID=" + p.uid + ";FOO=bar", e.pluginStdin("1.0.0", nil, true), types.ErrInvalidEnvironmentVariables, "FOO=bar"},
		{"cgroupPath with ..", "ADD", uidArgs, conf(func(c map[string]any) { c["cgroupPath"] = "/kubepods/../../etc" }), types.ErrInvalidNetworkConfig, `".." is not allowed`},
		{"runtime cgroupPath with ..", "ADD", uidArgs, conf(func(c map[string]any) {
			c["runtimeConfig"] = map[string]any{"cgroupPath": "/kubepods/besteffort/../../.."}
		}), types.ErrInvalidNetworkConfig, `".." is not allowed`},
		{"cgroupPath at the v2 root", "ADD", uidArgs, conf(func(c map[string]any) { c["cgroupPath"] = "/" }), types.ErrInvalidNetworkConfig, "cgroup v2 root"},
		{"cgroupPath naming the root slice", "ADD", uidArgs, conf(func(c map[string]any) { c["cgroupPath"] = "-.slice" }), types.ErrInvalidNetworkConfig, "slice"},
		{"runtime cgroupPath of the wrong type", "ADD", uidArgs, conf(func(c map[string]any) {
			c["runtimeConfig"] = map[string]any{"cgroupPath": 7}
		}), types.ErrInvalidNetworkConfig, "runtimeConfig.cgroupPath"},
		{"bad scope", "ADD", uidArgs, conf(func(c map[string]any) { c["scope"] = "cluster" }), types.ErrInvalidNetworkConfig, `scope: "cluster"`},
		{"host scope with a cgroupPath", "ADD", uidArgs, conf(func(c map[string]any) { c["scope"] = "host"; c["cgroupPath"] = "/x" }), types.ErrInvalidNetworkConfig, "contradicts"},
		{"relative bpffs", "ADD", uidArgs, conf(func(c map[string]any) { c["bpffs"] = "sys/fs/bpf" }), types.ErrInvalidNetworkConfig, "bpffs"},
		{"K8S_POD_UID escaping", "ADD", "K8S_POD_UID=../../..", e.pluginStdin("1.0.0", nil, true), types.ErrInvalidEnvironmentVariables, "K8S_POD_UID"},
		{"CNI_ARGS malformed", "ADD", "K8S_POD_UID", e.pluginStdin("1.0.0", nil, true), types.ErrInvalidEnvironmentVariables, "CNI_ARGS"},
	}
	for _, c := range cases {
		out, err := execPlugin(t, c.cmd, p.id, p.netns.Path(), c.args, c.stdin)
		te := specError(t, out, err)
		if te.Code != c.code || !strings.Contains(te.Msg+"; "+te.Details, c.want) {
			t.Errorf("%s: error %d %q (%s), want code %d mentioning %q", c.name, te.Code, te.Msg, te.Details, c.code, c.want)
			continue
		}
		t.Logf("%s: %d %s; %s", c.name, te.Code, te.Msg, te.Details)
		e.wantNothingLeft()
	}

	// Through libcni, as a runtime sees it: the chain fails with ctlb's code.
	bad := e.chain(map[string]any{"cgroupPath": "../escape"})
	q := e.cgroupfsPod("besteffort", true)
	_, err := e.add(bad, q)
	wantCode(t, "libcni ADD with an escaping cgroupPath", err, types.ErrInvalidNetworkConfig, `".." is not allowed`)
	t.Cleanup(func() { _ = e.del(e.plainChain(), q) })
	e.wantNothingLeft()
}

// conf/10-ctlb.conflist works as shipped, with only its paths pointed at
// the test's own daemon, bpffs and IPAM directory.
func TestExampleConflist(t *testing.T) {
	e := newEnv(t)
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(root, "conf", "10-ctlb.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("example conflist: %v", err)
	}
	plugins, _ := doc["plugins"].([]any)
	var kinds []string
	for _, pl := range plugins {
		m := pl.(map[string]any)
		kinds = append(kinds, m["type"].(string))
		switch m["type"] {
		case "bridge":
			ipam := m["ipam"].(map[string]any)
			if ipam["type"] != "host-local" {
				t.Fatalf("example bridge IPAM %v, want host-local", ipam["type"])
			}
			ipam["dataDir"] = e.dataDir
		case "ctlb":
			// The shipped values are the defaults.
			if m["bpffs"] != datapath.DefaultDir || m["socket"] != api.DefaultSocket || m["stateDir"] != api.DefaultStateDir {
				t.Fatalf("example ctlb entry %v: want the default paths", m)
			}
			m["bpffs"], m["socket"], m["stateDir"], m["logFile"] = e.bpffs, e.socket, e.stateDir, e.logFile
		}
	}
	if strings.Join(kinds, ",") != "bridge,loopback,ctlb" {
		t.Fatalf("example chains %v, want bridge, loopback, ctlb", kinds)
	}
	wantTestAddrs(t, raw)
	list, err := libcni.ConfListFromBytes([]byte(mustJSON(t, doc)))
	if err != nil {
		t.Fatal(err)
	}
	p := e.cgroupfsPod("besteffort", true)
	p.net = list.Name
	res, err := e.add(list, p)
	if err != nil {
		t.Fatalf("ADD with the example conflist: %v", err)
	}
	t.Cleanup(func() { _ = e.del(list, p) })
	t.Logf("example conflist result: %s", mustJSON(t, res))
	e.wantAttached(p)
	wantRedirected(t, p, container(t, p, "app"))
	if err := e.check(list, p); err != nil {
		t.Fatalf("CHECK with the example conflist: %v", err)
	}
	if err := e.del(list, p); err != nil {
		t.Fatalf("DEL with the example conflist: %v", err)
	}
	e.wantNothingLeft()
}

// wantTestAddrs fails on any IPv4 address outside 198.18.0.0/15 in raw.
func wantTestAddrs(t *testing.T, raw []byte) {
	t.Helper()
	ok := netip.MustParsePrefix("198.18.0.0/15")
	for _, f := range strings.FieldsFunc(string(raw), func(r rune) bool { return !(r == '.' || r == '/' || r >= '0' && r <= '9') }) {
		s, _, _ := strings.Cut(f, "/")
		if a, err := netip.ParseAddr(s); err == nil && a.Is4() && !ok.Contains(a) && !a.IsUnspecified() {
			t.Fatalf("example conflist uses %s, outside 198.18.0.0/15", a)
		}
	}
}

// Scope "host" attaches once at the cgroup v2 root, only when asked; DEL
// of a pod leaves it. The VIP here is unique to this test: while attached
// at the root, the programs see every socket of the host.
func TestHostScope(t *testing.T) {
	const hostVIP = "198.19.254.201:18502"
	e := newEnvWith(t, []config.Service{{VIP: hostVIP, Servers: servers}})
	p := e.cgroupfsPod("besteffort", true)
	t.Cleanup(func() { _ = e.dp.Detach(cni.HostAttachmentID) })
	stdin := e.pluginStdin("1.0.0", map[string]any{"scope": "host"}, true)
	if out, err := execPlugin(t, "ADD", p.id, p.netns.Path(), "", stdin); err != nil {
		t.Fatalf("ADD scope host: %v: %s", err, out)
	}
	a, err := e.dp.Attachment(cni.HostAttachmentID)
	if err != nil || a.CgroupPath != testutil.V2Mount(t) {
		t.Fatalf("host attachment %+v (%v), want one on the v2 root", a, err)
	}
	// Any cgroup is covered: one that is no pod's.
	other := filepath.Join(e.cgroups, "not-a-pod")
	mkdirAll(t, other)
	r := testutil.RunClient(t, e.node, other, testutil.ClientSpec{Mode: "dial", Target: hostVIP, Count: 3})
	if r.Failed != 0 || len(r.Landed) != 3 || !isServer(r.Landed[0]) {
		t.Fatalf("client under host scope: %+v, want every connection on a server", r)
	}
	if out, err := execPlugin(t, "DEL", p.id, "", "", stdin); err != nil {
		t.Fatalf("DEL scope host: %v: %s", err, out)
	}
	if _, err := e.dp.Attachment(cni.HostAttachmentID); err != nil {
		t.Fatalf("DEL of one pod removed the host-wide attachment: %v", err)
	}
	if err := e.dp.Detach(cni.HostAttachmentID); err != nil {
		t.Fatal(err)
	}
}
