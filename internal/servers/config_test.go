package servers

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
)

const example = `{
  "static": ["198.18.0.10:8502", "198.18.0.11"],
  "dns": {"name": "consul-server.consul.svc", "resolver": "127.0.0.53:53", "interval": "5s", "port": 8502},
  "consul": {"address": "http://127.0.0.1:8500", "service": "consul", "port": 8502},
  "exec": {"command": ["/usr/local/bin/servers", "-x"], "interval": "30s"},
  "health": {"type": "grpc", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": 1, "grpcService": "xds"},
  "panic": true
}`

func TestConfigJSON(t *testing.T) {
	var c Config
	if err := json.Unmarshal([]byte(example), &c); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if time.Duration(c.DNS.Interval) != 5*time.Second || time.Duration(c.Health.Timeout) != 500*time.Millisecond || !c.Panic {
		t.Fatalf("decoded %+v", c)
	}
	srcs, err := c.Sources()
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, s := range srcs {
		kinds = append(kinds, s.Name())
	}
	if strings.Join(kinds, ",") != "static,dns,consul,exec" {
		t.Fatalf("sources %v", kinds)
	}
	if st := srcs[0].(discovery.Static); st.Servers[1].String() != "198.18.0.11:8502" {
		t.Fatalf("static without port: %v", st.Servers)
	}
	if ck, err := c.Checker(); err != nil {
		t.Fatal(err)
	} else if g, ok := ck.(health.GRPC); !ok || g.Service != "xds" {
		t.Fatalf("checker %#v", ck)
	}
	// Round trip: durations are written back as strings.
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"interval":"5s"`) {
		t.Fatalf("marshalled %s", b)
	}
	var back Config
	if err := json.Unmarshal(b, &back); err != nil || back.Validate() != nil {
		t.Fatalf("round trip: %v %v", err, back.Validate())
	}
}

func TestConfigDefaults(t *testing.T) {
	c := Config{Static: []string{"198.18.0.10"}}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	p := c.HealthParams()
	// A dead server (refusing at once) is seen at the next check: Fall
	// checks at most Interval apart, well within 2 s.
	if p.Interval != time.Second || p.Timeout != 500*time.Millisecond || p.Rise != 2 || p.Fall != 1 {
		t.Fatalf("defaults %+v", p)
	}
	if ck, err := c.Checker(); err != nil {
		t.Fatal(err)
	} else if _, ok := ck.(health.TCP); !ok {
		t.Fatalf("default checker %#v", ck)
	}
}

// TestConfigValidate: every bad field is named with its value.
func TestConfigValidate(t *testing.T) {
	cases := map[string]string{
		`{}`:                                 "no server source",
		`{"static": ["198.18.0.1", "nope"]}`: `servers[1] "nope"`,
		`{"static": ["::1"]}`:                `servers[0] "::1"`,
		`{"dns": {"name": ""}}`:              `dns.name ""`,
		`{"dns": {"name": "x", "resolver": "1.2.3"}}`:                                            `dns.resolver "1.2.3"`,
		`{"consul": {"address": "127.0.0.1:8500"}}`:                                              `consul.address "127.0.0.1:8500"`,
		`{"consul": {"service": "a/b"}}`:                                                         `consul.service "a/b"`,
		`{"exec": {"command": []}}`:                                                              `exec.command "[]"`,
		`{"static": ["198.18.0.1"], "health": {"type": "http"}}`:                                 `health.type "http"`,
		`{"static": ["198.18.0.1"], "health": {"interval": "1s", "timeout": "2s"}}`:              `health.timeout "2s": must not exceed health.interval "1s"`,
		`{"static": ["198.18.0.1"], "health": {"interval": "200ms"}}`:                            `health.timeout "500ms" (the default): must not exceed health.interval "200ms"`,
		`{"static": ["198.18.0.1"], "health": {"timeout": "2s"}}`:                                `health.timeout "2s": must not exceed health.interval "1s" (the default)`,
		`{"dns": {"name": "x", "interval": "10ms"}}`:                                             `dns.interval "10ms": want at least 500ms`,
		`{"exec": {"command": ["x"], "interval": "100ms"}}`:                                      `exec.interval "100ms": want at least 1s`,
		`{"static": ["198.18.0.1"], "health": {"interval": "10ms", "timeout": "5ms"}}`:           `health.interval "10ms": want at least 100ms`,
		`{"static": ["198.18.0.1"], "health": {"interval": "100ms", "timeout": "5ms"}}`:          `health.timeout "5ms": want at least 10ms`,
		`{"dns": {"name": "x", "interval": "-1s"}}`:                                              `dns.interval "-1s": must not be negative`,
		`{"static": ["198.18.0.1"], "health": {"rise": -1}}`:                                     `health.rise "-1"`,
		`{"static": ["198.18.0.1"], "health": {"grpcService": "x"}}`:                             `health.grpcService "x"`,
		`{"static": ["198.18.0.1"], "health": {"interval": "-1s"}}`:                              `health.interval "-1s"`,
		`{"exec": {"command": ["x"], "timeout": "-5s"}}`:                                         `exec.timeout "-5s"`,
		`{"consul": {"token": "t", "tokenFile": "/run/t"}}`:                                      `set token or tokenFile, not both`,
		`{"consul": {"tokenFile": "token"}}`:                                                     `consul.tokenFile "token": must be an absolute path`,
		`{"consul": {"tls": {"certFile": "/c.pem"}}}`:                                            `certFile and keyFile go together`,
		`{"consul": {"tls": {"caFile": "ca.pem"}}}`:                                              `consul.tls.caFile "ca.pem"`,
		`{"static": ["198.18.0.1"], "health": {"tls": {"caFile": "/ca.pem"}}}`:                   `health.tls`,
		`{"static": ["198.18.0.1"], "health": {"type": "consul", "tls": {"keyFile": "/k.pem"}}}`: `certFile and keyFile go together`,
	}
	for in, want := range cases {
		var c Config
		if err := json.Unmarshal([]byte(in), &c); err != nil {
			t.Errorf("%s: %v", in, err)
			continue
		}
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to contain %q", in, err, want)
		}
		if _, oerr := c.Options(nil, nil); oerr == nil {
			t.Errorf("%s: Options accepted a bad config", in)
		}
	}
	// Durations must be strings with units.
	var c Config
	err := json.Unmarshal([]byte(`{"health": {"interval": 1}}`), &c)
	if err == nil || !strings.Contains(err.Error(), `want a string such as "1s"`) {
		t.Errorf("numeric duration: %v", err)
	}
	err = json.Unmarshal([]byte(`{"health": {"interval": "fast"}}`), &c)
	if err == nil || !strings.Contains(err.Error(), `"fast"`) {
		t.Errorf("bad duration: %v", err)
	}
}

// TestConfigFloorsAccepted: a timing at its floor is valid, as are the
// fastest timings the tests use.
func TestConfigFloorsAccepted(t *testing.T) {
	for _, in := range []string{
		`{"dns": {"name": "x", "interval": "500ms"}, "health": {"interval": "100ms", "timeout": "10ms"}}`,
		`{"exec": {"command": ["x"], "interval": "1s"}, "health": {"interval": "200ms", "timeout": "100ms"}}`,
	} {
		var c Config
		if err := json.Unmarshal([]byte(in), &c); err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if err := c.Validate(); err != nil {
			t.Errorf("%s: %v", in, err)
		}
	}
}
