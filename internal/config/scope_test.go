package config_test

import (
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/config"
)

// The scope keys: hostScope and nri parse, and a bad NRI socket is named.
func TestScopeKeys(t *testing.T) {
	c, err := config.Parse([]byte(`{"hostScope": true, "nri": {"socket": "/run/containerd/nri.sock"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.HostScope || c.NRI == nil || c.NRI.Socket != "/run/containerd/nri.sock" {
		t.Errorf("parsed %+v (nri %+v), want hostScope and the NRI socket", c, c.NRI)
	}
	if c, err := config.Parse([]byte(`{"nri": {}}`)); err != nil || c.NRI == nil || c.NRI.Socket != "" {
		t.Errorf(`{"nri": {}}: %+v, %v; want NRI on with the default socket`, c, err)
	}
	for in, want := range map[string]string{
		`{"nri": {"socket": "nri.sock"}}`: `nri.socket: "nri.sock"`,
		`{"nri": {"sock": "/x"}}`:         `"sock"`,
		`{"hostScope": "yes"}`:            "hostScope",
	} {
		if _, err := config.Parse([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%s) = %v, want an error naming %s", in, err, want)
		}
	}
}
