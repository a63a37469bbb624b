package cnitest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// The primaries most nodes run (Calico, Flannel, Cilium chaining) write
// 0.3.x conflists. Through a real chain of that version (Debian's bridge,
// host-local and loopback, then ctlb), via libcni: ADD gives the pod its
// address and redirects its connects, CHECK works from 0.4.0 on (libcni
// refuses it below), DEL detaches and host-local releases the address.
func TestChainVersions(t *testing.T) {
	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"} {
		t.Run(v, func(t *testing.T) {
			e := newEnv(t)
			list := e.netList(v, e.bridgeConf(), e.ctlbConf(nil))
			lo, err := libcni.NetworkPluginConfFromBytes([]byte(`{"cniVersion": "` + v + `", "name": "cni-loopback", "type": "loopback"}`))
			if err != nil {
				t.Fatal(err)
			}
			p := e.cgroupfsPod("besteffort", true)
			res, err := e.add(list, p)
			if err != nil {
				t.Fatalf("ADD through a %s chain: %v", v, err)
			}
			t.Cleanup(func() { _ = e.del(list, p) })
			if err := e.inNode(func() error { _, err := e.cni.AddNetwork(context.Background(), lo, p.rt); return err }); err != nil {
				t.Fatalf("ADD loopback %s: %v", v, err)
			}
			t.Cleanup(func() { _ = e.inNode(func() error { return e.cni.DelNetwork(context.Background(), lo, p.rt) }) })
			if res.Version() != v {
				t.Errorf("ADD result is version %s, want the conflist's %s", res.Version(), v)
			}
			r, err := current.NewResultFromResult(res)
			if err != nil {
				t.Fatal(err)
			}
			if len(r.IPs) != 1 || !strings.HasPrefix(r.IPs[0].Address.String(), "198.18.0.") {
				t.Fatalf("ADD result %+v: want the bridge's pod address", r)
			}
			e.wantAttached(p)
			wantRedirected(t, p, container(t, p, "app"))

			err = e.check(list, p)
			switch v {
			case "0.3.0", "0.3.1":
				if err == nil || !strings.Contains(err.Error(), "does not support the CHECK command") {
					t.Fatalf("CHECK on %s: %v, want libcni's refusal", v, err)
				}
			default:
				if err != nil {
					t.Fatalf("CHECK on %s: %v", v, err)
				}
			}
			if err := e.del(list, p); err != nil {
				t.Fatalf("DEL through a %s chain: %v", v, err)
			}
			e.wantNothingLeft()
			leases, _ := filepath.Glob(filepath.Join(e.dataDir, "ctlbnet", "198.*"))
			if len(leases) != 0 {
				t.Fatalf("host-local still holds %v after DEL", leases)
			}
			if _, err := os.Stat(e.dataDir); err != nil {
				t.Fatalf("host-local never wrote its leases in %s: %v", e.dataDir, err)
			}
		})
	}
}
