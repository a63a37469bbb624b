package node

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// CtlbPlugin is the ctlb entry of a conflist: the plugin binary and the
// keys it reads.
type CtlbPlugin struct {
	// Binary is the built plugin; it is linked into the node's bin dir as
	// "ctlb".
	Binary   string
	BPFFS    string
	Socket   string
	StateDir string
	// LogFile, when set, receives the plugin's logs (JSON lines).
	LogFile string
}

// NetworkSpec says what network a node's pods get.
type NetworkSpec struct {
	// Subnet of the pods, inside 198.18.0.0/15; Gateway is the bridge's
	// address in the node namespace.
	Subnet, Gateway string
	// Ctlb, when set, chains the ctlb plugin after bridge and loopback.
	Ctlb *CtlbPlugin
	// CNIVersion of the conflist: "1.0.0" by default (Debian's plugins stop
	// there); "1.1.0" (STATUS) needs PluginDir with plugins that speak it.
	CNIVersion string
	// PluginDir holds bridge, host-local and loopback; Debian's by default.
	PluginDir string
}

// Network is a CNI network installed for a node's runtime.
type Network struct {
	// Name is unique per test: libcni caches results under
	// /var/lib/cni/results/NAME-*, which cleanup removes.
	Name string
	// BinDir holds the plugins (bridge, host-local, loopback, ctlb), ConfDir
	// the conflist, DataDir host-local's leases.
	BinDir, ConfDir, DataDir string
	// Conflist is the installed conflist's path.
	Conflist string
	Spec     NetworkSpec
}

// libcniCache is where libcni (in containerd and podman) caches each
// attachment's result; neither runtime here lets a test move it.
const libcniCache = "/var/lib/cni/results"

// InstallNetwork writes a conflist chaining bridge (IPAM host-local),
// loopback and, when asked, ctlb into a conf dir the test owns, with the
// plugins in a bin dir the test owns, as a node's installer would.
func InstallNetwork(t testing.TB, spec NetworkSpec) *Network {
	t.Helper()
	dir := t.TempDir()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	n := &Network{
		Name:    "ctlb-e2e-" + hex.EncodeToString(b),
		BinDir:  filepath.Join(dir, "bin"),
		ConfDir: filepath.Join(dir, "net.d"),
		DataDir: filepath.Join(dir, "ipam"),
		Spec:    spec,
	}
	for _, d := range []string{n.BinDir, n.ConfDir, n.DataDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pluginDir := spec.PluginDir
	if pluginDir == "" {
		pluginDir = DebianCNIDir
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if err := os.Symlink(filepath.Join(pluginDir, p), filepath.Join(n.BinDir, p)); err != nil {
			t.Fatalf("cni bin dir: %v", err)
		}
	}
	if spec.Ctlb != nil {
		if err := os.Symlink(spec.Ctlb.Binary, filepath.Join(n.BinDir, "ctlb")); err != nil {
			t.Fatalf("cni bin dir: %v", err)
		}
	}
	raw, err := json.MarshalIndent(n.conflist(), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	n.Conflist = filepath.Join(n.ConfDir, "10-"+n.Name+".conflist")
	if err := os.WriteFile(n.Conflist, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCache(t, n.Name) })
	return n
}

func (n *Network) conflist() map[string]any {
	plugins := []map[string]any{
		{
			"type":        "bridge",
			"bridge":      "ctlbbr0",
			"isGateway":   true,
			"ipMasq":      false,
			"hairpinMode": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": n.Spec.Subnet, "gateway": n.Spec.Gateway}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": n.DataDir,
			},
		},
		// loopback passes the previous result through in a chain; the
		// runtimes bring lo up on their own too.
		{"type": "loopback"},
	}
	if c := n.Spec.Ctlb; c != nil {
		p := map[string]any{
			"type":     "ctlb",
			"bpffs":    c.BPFFS,
			"socket":   c.Socket,
			"stateDir": c.StateDir,
			// containerd >= 1.7 then passes runtimeConfig.cgroupPath, and
			// the pod annotations (container scope through NRI).
			"capabilities": map[string]bool{"cgroupPath": true, "io.kubernetes.cri.pod-annotations": true},
		}
		if c.LogFile != "" {
			p["logFile"] = c.LogFile
			p["logLevel"] = "debug"
		}
		plugins = append(plugins, p)
	}
	version := n.Spec.CNIVersion
	if version == "" {
		version = "1.0.0"
	}
	return map[string]any{"cniVersion": version, "name": n.Name, "plugins": plugins}
}

// removeCache deletes libcni's cached results of this network, which a
// runtime leaves behind when a pod's DEL never ran (a failed test).
func removeCache(t testing.TB, name string) {
	ents, err := os.ReadDir(libcniCache)
	if err != nil {
		return
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), name+"-") {
			if err := os.Remove(filepath.Join(libcniCache, e.Name())); err != nil {
				t.Errorf("remove libcni cache: %v", err)
			}
		}
	}
}

// String is the conflist, for failure messages.
func (n *Network) String() string {
	b, _ := json.Marshal(n.conflist())
	return fmt.Sprintf("%s: %s", n.Conflist, b)
}
