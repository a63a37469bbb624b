package servers

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
)

// Config is how one VIP finds and checks its servers; the daemon's config
// embeds it per VIP. Every source given adds to the candidates (their
// union); at least one is needed. Zero values mean the defaults.
//
//	{"static": ["198.18.0.10:8502"],
//	 "dns": {"name": "consul-server.consul.svc", "resolver": "127.0.0.53:53", "interval": "5s", "port": 8502},
//	 "consul": {"address": "http://127.0.0.1:8500", "service": "consul", "port": 8502},
//	 "exec": {"command": ["/usr/local/bin/servers"], "interval": "10s"},
//	 "health": {"type": "tcp", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": 1},
//	 "panic": true}
type Config struct {
	// Static lists servers as "a.b.c.d:port" (or "a.b.c.d" for port 8502):
	// a VIP's "servers" in the daemon's config, which names them so in
	// errors.
	Static []string      `json:"static,omitempty"`
	DNS    *DNSConfig    `json:"dns,omitempty"`
	Consul *ConsulConfig `json:"consul,omitempty"`
	Exec   *ExecConfig   `json:"exec,omitempty"`
	Health HealthConfig  `json:"health"`
	// Panic publishes every candidate when none is healthy (as Envoy's
	// panic threshold does), instead of an empty set.
	Panic bool `json:"panic,omitempty"`
}

// DNSConfig resolves a name's A records (discovery.DNS).
type DNSConfig struct {
	Name string `json:"name"`
	// Resolver is "ip:port" or "ip" (port 53); empty: /etc/resolv.conf.
	Resolver string   `json:"resolver,omitempty"`
	Port     uint16   `json:"port,omitempty"`
	Interval Duration `json:"interval,omitempty"`
}

// ConsulConfig follows a service in a Consul catalog (discovery.Consul).
// Fields left unset take the standard variables CONSUL_HTTP_ADDR,
// CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, CONSUL_CLIENT_CERT,
// CONSUL_CLIENT_KEY and CONSUL_TLS_SERVER_NAME from ctlbd's environment.
type ConsulConfig struct {
	// Address is http://host:port or https://host:port.
	Address string `json:"address,omitempty"`
	Service string `json:"service,omitempty"`
	Port    uint16 `json:"port,omitempty"`
	// TokenFile holds the ACL token; it is read again before each query,
	// so a rotated token takes effect at once.
	TokenFile string `json:"tokenFile,omitempty"`
	// Token is an inline ACL token. Discouraged: it sits in the config
	// file; use TokenFile.
	Token      string     `json:"token,omitempty"`
	Datacenter string     `json:"datacenter,omitempty"`
	TLS        *TLSConfig `json:"tls,omitempty"`
}

// TLSConfig is the TLS of a client: the Consul source over https, and the
// grpc and consul health checks.
type TLSConfig struct {
	// CAFile is the PEM bundle that signs the server's certificate (empty:
	// the system roots).
	CAFile string `json:"caFile,omitempty"`
	// CertFile and KeyFile are the client's certificate and key, for
	// servers that verify clients.
	CertFile string `json:"certFile,omitempty"`
	KeyFile  string `json:"keyFile,omitempty"`
	// ServerName is the name expected in the server's certificate (e.g.
	// "server.dc1.consul"), needed when servers are dialed by address.
	ServerName string `json:"serverName,omitempty"`
	// InsecureSkipVerify accepts any certificate: for tests only.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
}

func (t *TLSConfig) discovery() discovery.TLS {
	if t == nil {
		return discovery.TLS{}
	}
	return discovery.TLS{CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile, ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify}
}

func (t *TLSConfig) validate(field string, bad func(field string, value any, why string)) {
	if t == nil {
		return
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		bad(field+".certFile", t.CertFile, "certFile and keyFile go together")
	}
	for name, p := range map[string]string{"caFile": t.CAFile, "certFile": t.CertFile, "keyFile": t.KeyFile} {
		if p != "" && !filepath.IsAbs(p) {
			bad(field+"."+name, p, "must be an absolute path")
		}
	}
}

// ExecConfig runs a command that prints the servers (discovery.Exec).
type ExecConfig struct {
	Command  []string `json:"command"`
	Interval Duration `json:"interval,omitempty"`
	Timeout  Duration `json:"timeout,omitempty"`
	Port     uint16   `json:"port,omitempty"`
}

// HealthConfig sets the active checks.
type HealthConfig struct {
	// Type is "tcp" (default), "grpc" (grpc.health.v1) or "consul" (a
	// Consul server's gRPC port that answers as a member of a cluster
	// with a leader).
	Type     string   `json:"type,omitempty"`
	Interval Duration `json:"interval,omitempty"`
	Timeout  Duration `json:"timeout,omitempty"`
	Rise     int      `json:"rise,omitempty"`
	Fall     int      `json:"fall,omitempty"`
	// GRPCService is the service name in the gRPC health request ("" is the
	// whole server).
	GRPCService string `json:"grpcService,omitempty"`
	// TLS makes the grpc and consul checks use TLS (Consul's TLS gRPC
	// port, 8503); without it they speak plaintext.
	TLS *TLSConfig `json:"tls,omitempty"`
}

// Duration is a time.Duration written as a string in JSON ("1s", "500ms").
type Duration time.Duration

// UnmarshalJSON reads "1s"; a bare number is refused, since its unit would
// be a guess.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration %s: want a string such as \"1s\" or \"500ms\"", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %w", s, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes "1s".
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d Duration) String() string { return time.Duration(d).String() }

// Floors of the timings: below them a VIP costs its resolver, its servers
// and ctlbd far more than it can gain (10ms would be a hundred DNS queries
// and checks a second per candidate, for a set that cannot follow faster
// than a connect takes anyway). The fastest timings the tests use to run
// quickly (dns 500ms, health 200ms/100ms) stay valid.
const (
	MinDNSInterval    = 500 * time.Millisecond
	MinExecInterval   = time.Second
	MinHealthInterval = 100 * time.Millisecond
	MinHealthTimeout  = 10 * time.Millisecond
)

// Validate checks every field and names the first bad one with its value.
func (c Config) Validate() error {
	var errs []error
	bad := func(field string, value any, why string) {
		errs = append(errs, fmt.Errorf("%s %q: %s", field, fmt.Sprint(value), why))
	}
	// floor refuses a duration set below its floor (0 is the default).
	floor := func(field string, d Duration, least time.Duration) {
		switch {
		case d < 0:
			bad(field, d, "must not be negative")
		case d > 0 && time.Duration(d) < least:
			bad(field, d, fmt.Sprintf("want at least %s (or leave it out for the default)", least))
		}
	}
	if len(c.Static) == 0 && c.DNS == nil && c.Consul == nil && c.Exec == nil {
		errs = append(errs, errors.New("no server source: set at least one of static, dns, consul, exec"))
	}
	for i, s := range c.Static {
		if _, err := discovery.ParseServer(s, discovery.DefaultPort); err != nil {
			bad(fmt.Sprintf("servers[%d]", i), s, "want an IPv4 address with an optional :port (sources and health checks serve IPv4 VIPs only)")
		}
	}
	if d := c.DNS; d != nil {
		if strings.TrimSpace(d.Name) == "" {
			bad("dns.name", d.Name, "must not be empty")
		}
		if d.Resolver != "" {
			if _, err := netip.ParseAddrPort(d.Resolver); err != nil {
				if _, err := netip.ParseAddr(d.Resolver); err != nil {
					bad("dns.resolver", d.Resolver, "want ip:port or ip")
				}
			}
		}
		floor("dns.interval", d.Interval, MinDNSInterval)
	}
	if cc := c.Consul; cc != nil {
		if cc.Address != "" {
			u, err := url.Parse(cc.Address)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				bad("consul.address", cc.Address, "want http://host:port or https://host:port")
			}
		}
		if strings.ContainsAny(cc.Service, "/?# ") {
			bad("consul.service", cc.Service, "not a service name")
		}
		if cc.TokenFile != "" && cc.Token != "" {
			bad("consul.token", "(hidden)", "set token or tokenFile, not both")
		}
		if cc.TokenFile != "" && !filepath.IsAbs(cc.TokenFile) {
			bad("consul.tokenFile", cc.TokenFile, "must be an absolute path")
		}
		cc.TLS.validate("consul.tls", bad)
	}
	if e := c.Exec; e != nil {
		if len(e.Command) == 0 || e.Command[0] == "" {
			bad("exec.command", e.Command, "must name a program")
		}
		floor("exec.interval", e.Interval, MinExecInterval)
		if e.Timeout < 0 {
			bad("exec.timeout", e.Timeout, "must not be negative")
		}
	}
	h := c.Health
	switch h.Type {
	case "", "tcp", "grpc", "consul":
	default:
		bad("health.type", h.Type, `want "tcp", "grpc" or "consul"`)
	}
	if h.TLS != nil && h.Type != "grpc" && h.Type != "consul" {
		bad("health.tls", "{...}", `only used with health.type "grpc" or "consul"`)
	}
	h.TLS.validate("health.tls", bad)
	if h.GRPCService != "" && h.Type != "grpc" {
		bad("health.grpcService", h.GRPCService, `only used with health.type "grpc"`)
	}
	floor("health.interval", h.Interval, MinHealthInterval)
	floor("health.timeout", h.Timeout, MinHealthTimeout)
	if h.Rise < 0 {
		bad("health.rise", h.Rise, "must not be negative")
	}
	if h.Fall < 0 {
		bad("health.fall", h.Fall, "must not be negative")
	}
	if p := c.HealthParams(); p.Timeout > p.Interval {
		// Name a value the user did not write as the default, or the
		// message sends them looking for a timeout they never set.
		def := func(set Duration) string {
			if set == 0 {
				return " (the default)"
			}
			return ""
		}
		errs = append(errs, fmt.Errorf("health.timeout %q%s: must not exceed health.interval %q%s",
			p.Timeout, def(h.Timeout), p.Interval, def(h.Interval)))
	}
	return errors.Join(errs...)
}

// HealthParams gives the check timings with defaults filled in.
func (c Config) HealthParams() health.Params {
	return health.Params{
		Interval: time.Duration(c.Health.Interval),
		Timeout:  time.Duration(c.Health.Timeout),
		Rise:     c.Health.Rise,
		Fall:     c.Health.Fall,
	}.WithDefaults()
}

// Checker gives the configured check. The TLS files are read now, and
// again whenever one changes; the
// consul check's token is the Consul source's (tokenFile, token, or
// CONSUL_HTTP_TOKEN_FILE), read at every check.
func (c Config) Checker() (health.Checker, error) {
	var tf *health.TLSFiles
	if t := c.Health.TLS; t != nil {
		dt := t.discovery()
		tf = &health.TLSFiles{
			Files: []string{t.CAFile, t.CertFile, t.KeyFile},
			Build: func() (*tls.Config, error) {
				tc, err := dt.Config()
				if err != nil {
					return nil, fmt.Errorf("health.tls: %w", err)
				}
				return tc, nil
			},
		}
		// Read now too: a bad file is a config error, not a failed check.
		if _, err := tf.Config(); err != nil {
			return nil, err
		}
	}
	switch c.Health.Type {
	case "grpc":
		return health.GRPC{Service: c.Health.GRPCService, TLSFiles: tf}, nil
	case "consul":
		ck := health.Consul{TLSFiles: tf}
		if cc := c.Consul; cc != nil {
			ck.Token, ck.TokenFile = cc.Token, cc.TokenFile
		}
		if ck.Token == "" && ck.TokenFile == "" {
			ck.TokenFile = os.Getenv(discovery.EnvHTTPTokenFile)
		}
		return ck, nil
	}
	return health.TCP{}, nil
}

// Sources builds the configured sources. Call Validate first.
func (c Config) Sources() ([]discovery.Source, error) {
	var out []discovery.Source
	if len(c.Static) > 0 {
		var st discovery.Static
		for i, s := range c.Static {
			ap, err := discovery.ParseServer(s, discovery.DefaultPort)
			if err != nil {
				return nil, fmt.Errorf("servers[%d]: %w", i, err)
			}
			st.Servers = append(st.Servers, ap)
		}
		out = append(out, st)
	}
	if d := c.DNS; d != nil {
		out = append(out, discovery.DNS{
			Host: d.Name, Resolver: d.Resolver, Port: d.Port, Interval: time.Duration(d.Interval),
		})
	}
	if cc := c.Consul; cc != nil {
		out = append(out, discovery.Consul{
			Address: cc.Address, Service: cc.Service, Port: cc.Port, Token: cc.Token, TokenFile: cc.TokenFile,
			Datacenter: cc.Datacenter, TLS: cc.TLS.discovery(),
		})
	}
	if e := c.Exec; e != nil {
		out = append(out, discovery.Exec{
			Command: e.Command, Port: e.Port, Interval: time.Duration(e.Interval), Timeout: time.Duration(e.Timeout),
		})
	}
	return out, nil
}
