package proxy

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestConfigFromJSON(t *testing.T) {
	const doc = `{"mode": "steering",
		"services": [{"vip": "198.18.100.1", "ports": [8502, 8500]},
		             {"vip": "198.18.100.2", "ports": [443], "listen": ["198.18.100.3"]}],
		"idleTimeout": "5m", "connectTimeout": "2s", "drainTimeout": "10s", "loops": 3,
		"localVIP": {"enabled": true, "device": "ctlb0"}}`
	var c Config
	if err := json.Unmarshal([]byte(doc), &c); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := c.settings()
	if err != nil {
		t.Fatal(err)
	}
	if s.mode != ModeSteering || s.idleTimeout != 5*time.Minute || s.connectTimeout != 2*time.Second ||
		s.drainTimeout != 10*time.Second || !s.localVIP || s.device != "ctlb0" || s.loops != 3 {
		t.Errorf("settings = %+v", s)
	}
	want := map[string]string{
		"198.18.100.1:8502": "198.18.100.1:8502",
		"198.18.100.1:8500": "198.18.100.1:8500",
		"198.18.100.3:443":  "198.18.100.2:443", // listen address -> service
	}
	if len(s.dests) != len(want) {
		t.Errorf("dests = %v", s.dests)
	}
	for d, svc := range want {
		if got := s.dests[netip.MustParseAddrPort(d)]; got != netip.MustParseAddrPort(svc) {
			t.Errorf("dest %s -> %v, want %s", d, got, svc)
		}
	}

	// Everything left out takes the defaults.
	var empty Config
	s, err = empty.settings()
	if err != nil {
		t.Fatal(err)
	}
	if s.mode != ModeListeners || s.idleTimeout != DefaultIdleTimeout || s.connectTimeout != DefaultConnectTimeout ||
		s.drainTimeout != DefaultDrainTimeout || s.localVIP || s.device != "ctlb0" || s.loops != 0 {
		t.Errorf("defaults = %+v", s)
	}
}

func TestConfigErrorsNameFieldAndValue(t *testing.T) {
	svc := []Service{{VIP: "198.18.100.1", Ports: []int{8500}}}
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{Config{Mode: "bpf", Services: svc}, `mode: "bpf"`},
		{Config{Services: []Service{{VIP: "198.18.100.300", Ports: []int{1}}}}, `services[0].vip: "198.18.100.300" is not an IPv4 address`},
		{Config{Services: []Service{{VIP: "2001:db8::1", Ports: []int{1}}}}, `services[0].vip: "2001:db8::1" is not an IPv4 address`},
		{Config{Services: []Service{{VIP: "0.0.0.0", Ports: []int{1}}}}, `services[0].vip: "0.0.0.0" cannot be`},
		{Config{Services: []Service{{VIP: "198.18.100.1"}}}, `services[0].ports: empty`},
		{Config{Services: []Service{svc[0], {VIP: "198.18.100.2", Ports: []int{80, 0}}}}, `services[1].ports[1]: 0 is not a port`},
		{Config{Services: []Service{{VIP: "198.18.100.1", Ports: []int{65536}}}}, `services[0].ports[0]: 65536 is not a port`},
		{Config{Services: []Service{svc[0], svc[0]}}, `services[1].ports[0]: 198.18.100.1:8500 is served twice`},
		{Config{Services: []Service{{VIP: "198.18.100.1", Ports: []int{1}, Listen: []string{"x"}}}}, `services[0].listen[0]: "x"`},
		{Config{Services: svc, IdleTimeout: "5 minutes"}, `idleTimeout: "5 minutes" is not a duration`},
		{Config{Services: svc, ConnectTimeout: "-1s"}, `connectTimeout: "-1s" must be positive`},
		{Config{Services: svc, DrainTimeout: "0s"}, `drainTimeout: "0s" must be positive`},
		{Config{Services: svc, Loops: -1}, `loops: -1 is not 0 (one per CPU) to 64`},
		{Config{Services: svc, Loops: 65}, `loops: 65 is not 0 (one per CPU) to 64`},
		{Config{Services: svc, Preconnect: -1}, `preconnect: -1 is not 0 (off) to 16`},
		{Config{Services: svc, Preconnect: 17}, `preconnect: 17 is not 0 (off) to 16`},
		{Config{Services: svc, Preconnect: 1, PreconnectMaxIdle: "soon"}, `preconnectMaxIdle: "soon" is not a duration`},
		{Config{Services: svc, Preconnect: 1, PreconnectMaxIdle: "0s"}, `preconnectMaxIdle: "0s" must be positive`},
		{Config{Services: svc, LocalVIP: LocalVIP{Enabled: true, Device: "a/b"}}, `localVIP.device: device name "a/b"`},
		{Config{Services: svc, LocalVIP: LocalVIP{Enabled: true, Device: "much-too-long0"}}, `localVIP.device: device name "much-too-long0" longer than 10 bytes`},
	} {
		err := tc.c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want an error with %q", tc.c, err, tc.want)
		}
	}
}

// New refuses a bad config before touching anything.
func TestNewRefusesBadConfig(t *testing.T) {
	_, err := New(Config{Mode: "nope"}, func(netip.AddrPort) []netip.AddrPort { return nil }, Options{})
	if err == nil || !strings.Contains(err.Error(), `mode: "nope"`) {
		t.Fatalf("New with a bad mode: %v", err)
	}
	if _, err := New(Config{}, nil, Options{}); err == nil {
		t.Fatal("New without a targets function succeeded")
	}
}
