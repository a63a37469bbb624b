package config_test

import (
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/config"
)

// FuzzParse: no input may panic; every rejection names what is wrong, and
// every accepted config is valid by the same rules the daemon applies.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.1:8502"], "empty": "passthrough"}]}`))
	f.Add([]byte(`{"bpffs": "/sys/fs/bpf/ctlb", "reconcileInterval": "1s", "logLevel": "debug"}`))
	f.Add([]byte(`{"services": [{"vip": "198.19.0.1:99999"}]}`))
	f.Add([]byte(`{"unknown": 1}`))
	f.Add([]byte(`{"services": [{"vip": "198.19.0.1:8502", "servers": ["127.0.0.1:8502"], "onServerRemoved": "keep", "rebalance": true, "rebalanceRate": 3}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := config.Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted a config that Validate rejects: %v", err)
		}
		for _, s := range c.Services {
			if _, err := s.Datapath(); err != nil {
				t.Fatalf("accepted service %+v does not convert: %v", s, err)
			}
		}
	})
}

func TestParseErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		`{"services": [{"vip": "198.19.0.1:80", "wieght": 1}]}`:                   `"wieght"`,
		`{"reconcileInterval": "fast"}`:                                           `"fast"`,
		`{"reconcileInterval": "1ms"}`:                                            "reconcileInterval",
		`{"socket": "relative.sock"}`:                                             "socket",
		`{"services": [{"vip": "198.19.0.1:80", "servers": ["127.0.0.1:80:1"]}]}`: `"127.0.0.1:80:1"`,
		`{"services": [{"vip": "198.19.0.1:80", "empty": "sometimes"}]}`:          `"sometimes"`,
		`{"services": [{"vip": "198.19.0.1:80", "onServerRemoved": "drop"}]}`:     `"drop"`,
		`{"services": [{"vip": "198.19.0.1:80", "rebalanceRate": 50}]}`:           "rebalanceRate 50",
		`{"services": [{"vip": "198.19.0.1:80", "rebalanceRate": -1}]}`:           "rebalanceRate -1",
		`{} {}`: "trailing data",
	}
	for in, want := range cases {
		_, err := config.Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%s) = %v, want an error naming %s", in, err, want)
		}
	}
}

// The removal policy and rebalancing reach the datapath's service as given,
// with their defaults when left out.
func TestRemovalPolicyAndRebalance(t *testing.T) {
	c, err := config.Parse([]byte(`{"services": [
		{"vip": "198.19.0.1:80", "servers": ["127.0.0.1:80"], "onServerRemoved": "keep", "rebalance": true, "rebalanceRate": 4},
		{"vip": "198.19.0.2:80", "servers": ["127.0.0.1:80"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	keep, err := c.Services[0].Datapath()
	if err != nil || keep.OnServerRemoved != "keep" || !c.Services[0].Rebalance || c.Services[0].RebalanceRate != 4 {
		t.Errorf("first VIP: %+v, %v; config %+v", keep, err, c.Services[0])
	}
	def, err := c.Services[1].Datapath()
	if err != nil || def.OnServerRemoved != "terminate" || c.Services[1].Rebalance {
		t.Errorf("second VIP: %+v, %v; want terminate, no rebalance", def, err)
	}
}

// TestDecodeErrorsSayWhere: the decoder's errors (an unknown key, a bad
// duration, a wrong type, bad syntax) name the line, the column and the
// path of what is wrong.
func TestDecodeErrorsSayWhere(t *testing.T) {
	pre := "{\"services\": [\n  {\"vip\": \"198.19.0.1:80\", \"servers\": [\"127.0.0.1:80\"]},\n  {\"vip\": \"198.19.0.2:80\", "
	cases := map[string]string{
		`"dns": {"name": "a.test", "intervall": "5s"}}]}`:  `decode config: at line 3, column 54 (services[1].dns.intervall): json: unknown field "intervall"`,
		`"dns": {"name": "a.test", "interval": "5"}}]}`:    `decode config: at line 3, column 66 (services[1].dns.interval): duration "5": time: missing unit in duration "5"`,
		`"dns": {"name": "a.test", "interval": 5}}]}`:      `decode config: at line 3, column 66 (services[1].dns.interval): duration 5: want a string such as "1s" or "500ms"`,
		`"dns": {"name": "a.test", "port": "53"}}]}`:       `(services[1].dns.port)`,
		`"dns": {"name": "a.test",, "port": 53}}]}`:        `decode config: at line 3, column 53 (services[1].dns.name): invalid character ',' looking for beginning of object key string`,
		`"dns": {"name": "a.test"}, "health": {"rise": 2,`: "decode config: at line 3, column 76 (services[1].health.rise): unexpected EOF",
	}
	for in, want := range cases {
		_, err := config.Parse([]byte(pre + in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%s)\n = %v\nwant %s", pre+in, err, want)
		}
	}
	// Top level: the reconcile interval's own duration type.
	_, err := config.Parse([]byte("{\n \"reconcileInterval\": \"fast\"}"))
	if want := `decode config: at line 2, column 23 (reconcileInterval): duration "fast"`; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("bad reconcileInterval: %v, want %s...", err, want)
	}
}
