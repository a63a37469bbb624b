package cnitest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/ctlb/ctlb/internal/testutil"
)

// The conflists `ctlbd install-cni` writes for the primaries most nodes run
// (Calico, Flannel, Cilium chaining: CNI 0.3.1, and 0.3.0) really work:
// each golden output, its primary swapped for the test's bridge (the
// primaries' binaries are not here) and the ctlb entry pointed at the
// test's ctlbd, runs ADD, a redirected connect and DEL through libcni with
// the rest of the chain (portmap, bandwidth) and the install marker as
// written.
func TestInstalledGoldenChains(t *testing.T) {
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join(root, "internal", "cniinstall", "testdata")
	for _, c := range []struct{ name, file, version string }{
		{"calico", "10-calico.conflist", ""},
		{"flannel", "10-flannel.conflist", ""},
		{"cilium-chaining", "05-cilium.conflist", ""},
		{"flannel-0.3.0", "10-flannel.conflist", "0.3.0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := c.name
			if c.version != "" {
				dir = "flannel"
			}
			raw, err := os.ReadFile(filepath.Join(golden, dir, "out", c.file))
			if err != nil {
				t.Fatal(err)
			}
			e := newEnv(t)
			var doc map[string]any
			if err := json.Unmarshal(raw, &doc); err != nil {
				t.Fatal(err)
			}
			if c.version != "" {
				doc["cniVersion"] = c.version
			}
			plugins := doc["plugins"].([]any)
			marked := false
			for i, pl := range plugins {
				m := pl.(map[string]any)
				switch m["type"] {
				case "calico", "flannel", "cilium-cni":
					plugins[i] = e.bridgeConf()
				case "ctlb":
					_, marked = m["installedBy"]
					m["bpffs"], m["socket"], m["stateDir"], m["logFile"] = e.bpffs, e.socket, e.stateDir, e.logFile
				}
			}
			if !marked {
				t.Fatalf("golden %s/%s has no marked ctlb entry", dir, c.file)
			}
			list, err := libcni.ConfListFromBytes([]byte(mustJSON(t, doc)))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: cniVersion %s, chain %s", c.name, list.CNIVersion, mustJSON(t, doc["plugins"]))
			p := e.cgroupfsPod("besteffort", true)
			p.net = list.Name
			if _, err := e.add(list, p); err != nil {
				t.Fatalf("ADD through the installed %s conflist: %v", c.name, err)
			}
			t.Cleanup(func() { _ = e.del(list, p) })
			e.wantAttached(p)
			wantRedirected(t, p, container(t, p, "app"))
			if err := e.del(list, p); err != nil {
				t.Fatalf("DEL through the installed %s conflist: %v", c.name, err)
			}
			e.wantNothingLeft()
		})
	}
}
