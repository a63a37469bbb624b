// Package config reads ctlbd's JSON configuration. Decoding is strict: an
// unknown key is an error that names it, so a typo never silently turns a
// setting off.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/ctlb/ctlb/internal/proxy"
	"github.com/ctlb/ctlb/internal/servers"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Rebalancing rates, in connections ended per second per VIP.
const (
	DefaultRebalanceRate = 2
	MaxRebalanceRate     = 10
)

// MaxSize bounds a config file; a larger one is refused rather than read.
const MaxSize = 8 << 20

// Config is the daemon's configuration file.
type Config struct {
	// BPFFS is the bpffs directory holding ctlb's pins.
	BPFFS string `json:"bpffs,omitempty"`
	// Socket is the control API's unix socket.
	Socket string `json:"socket,omitempty"`
	// SocketGroup, when set, is the one group (name or GID) besides root
	// that may use the control socket (mode 0660 instead of 0600), read
	// only: status, service list, attachments, pending.
	SocketGroup string `json:"socketGroup,omitempty"`
	// SocketWriteGroup, when set, is a group (name or GID) whose members
	// may also change things (set and delete services, attach, reload);
	// socketGroup members only read (status, lists). Root always may.
	SocketWriteGroup string `json:"socketWriteGroup,omitempty"`
	// StateDir holds pending attachments and other small state files.
	StateDir string `json:"stateDir,omitempty"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"logLevel,omitempty"`
	// ReconcileInterval is how often ctlbd repairs pinned state (re-pins
	// what was removed, drops attachments of dead cgroups). Default 5s.
	ReconcileInterval Duration `json:"reconcileInterval,omitempty"`
	// Metrics is the address of the Prometheus endpoint (/metrics), e.g.
	// "127.0.0.1:9464"; empty turns it off.
	Metrics string `json:"metrics,omitempty"`
	// ControlAPI bounds the control socket's connections.
	ControlAPI ControlAPI `json:"controlAPI,omitzero"`
	// Services are the VIPs this daemon keeps in the maps.
	Services []Service `json:"services,omitempty"`
	// Proxy, when set, runs the fallback round-robin proxy for the listed
	// VIPs, with the same server sets as the connect4 path.
	Proxy *proxy.Config `json:"proxy,omitempty"`
	// NRI, when set, runs ctlbd's NRI plugin: container scope for pods
	// annotated ctlb.io/containers (see internal/nri).
	NRI *NRIConfig `json:"nri,omitempty"`
	// HostScope attaches ctlb once at the cgroup v2 root when ctlbd starts:
	// every process of the host, for hosts and VMs with no CNI at all.
	// Turning it off later does not detach; `ctlbd detach --host` does.
	HostScope bool `json:"hostScope,omitempty"`
}

// NRIConfig is the NRI plugin's settings.
type NRIConfig struct {
	// Socket is the runtime's NRI socket; /var/run/nri/nri.sock when empty.
	Socket string `json:"socket,omitempty"`
}

// Service is one VIP in the config.
type Service struct {
	VIP string `json:"vip"`
	// Servers is the static server list, "IP:PORT" each.
	Servers []string `json:"servers,omitempty"`
	// Empty is the empty-set policy: "reject" (default) or "passthrough".
	Empty string `json:"empty,omitempty"`
	// Protocol is "tcp" (default) or "udp": a VIP is protocol, address
	// and port.
	Protocol string `json:"protocol,omitempty"`
	// Balance is how connects choose a server: "roundrobin" (default),
	// "random" or "least-open".
	Balance string `json:"balance,omitempty"`
	// OnServerRemoved is what happens to the open connections of a server
	// that leaves the set (removed, or unhealthy): "terminate" (default)
	// ends them so clients reconnect to a server in the set; "keep" leaves
	// them to their applications.
	OnServerRemoved string `json:"onServerRemoved,omitempty"`
	// Rebalance, when true, ends a few connections per second on the most
	// loaded servers after a server joins, until the newcomer holds its
	// share (1/k of the VIP's open connections, ±1).
	Rebalance bool `json:"rebalance,omitempty"`
	// RebalanceRate is how many connections per second rebalancing may end
	// (default 2: gentle, clients reconnect one by one; at most 10).
	RebalanceRate float64 `json:"rebalanceRate,omitempty"`

	// Discovery and health (see internal/servers). With any of these, ctlbd
	// tracks the VIP: the union of the static list and every source gives
	// the candidates, and only the healthy ones are written to the map.
	// Without them, the static list is written as it is.
	DNS    *servers.DNSConfig    `json:"dns,omitempty"`
	Consul *servers.ConsulConfig `json:"consul,omitempty"`
	Exec   *servers.ExecConfig   `json:"exec,omitempty"`
	Health *servers.HealthConfig `json:"health,omitempty"`
	// Panic keeps every candidate in the set when none is healthy (as
	// Envoy's panic threshold does) instead of emptying it.
	Panic bool `json:"panic,omitempty"`
}

// Tracked reports whether the VIP's set comes from sources and health
// checks rather than straight from the static list.
func (s Service) Tracked() bool {
	return s.DNS != nil || s.Consul != nil || s.Exec != nil || s.Health != nil
}

// trackedBy names the first section that makes the VIP tracked.
func (s Service) trackedBy() string {
	switch {
	case s.DNS != nil:
		return "dns"
	case s.Consul != nil:
		return "consul"
	case s.Exec != nil:
		return "exec"
	default:
		return "health"
	}
}

// Sources is the tracker configuration of a tracked VIP.
func (s Service) Sources() servers.Config {
	c := servers.Config{Static: s.Servers, DNS: s.DNS, Consul: s.Consul, Exec: s.Exec, Panic: s.Panic}
	if s.Health != nil {
		c.Health = *s.Health
	}
	return c
}

// Parse decodes and validates a config.
func Parse(data []byte) (*Config, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("decode config: %w", decodeError(data, err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("decode config: trailing data after the JSON object")
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Load reads and parses the config file at path.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("config %s: larger than %d bytes", path, MaxSize)
	}
	c, err := Parse(data)
	if err != nil {
		// Parse's errors say "config" already ("config logLevel: ...").
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ControlAPI holds the control socket's timeouts, so a client that stalls
// (or never sends its request) cannot hold a connection and a goroutine
// forever. Empty fields take the defaults.
type ControlAPI struct {
	// ReadTimeout bounds reading one whole request (default 30s).
	ReadTimeout Duration `json:"readTimeout,omitempty"`
	// WriteTimeout bounds answering it (default 30s).
	WriteTimeout Duration `json:"writeTimeout,omitempty"`
	// IdleTimeout ends a kept-alive connection with no request (default 2m).
	IdleTimeout Duration `json:"idleTimeout,omitempty"`
}

// Default is the configuration with no file: defaults and no services.
func Default() *Config {
	c := &Config{}
	c.applyDefaults()
	return c
}

func (c *Config) applyDefaults() {
	if c.BPFFS == "" {
		c.BPFFS = datapath.DefaultDir
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = api.DefaultStateDir
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.ReconcileInterval == 0 {
		c.ReconcileInterval = Duration(5 * time.Second)
	}
	for _, d := range []struct {
		v   *Duration
		def time.Duration
	}{{&c.ControlAPI.ReadTimeout, 30 * time.Second}, {&c.ControlAPI.WriteTimeout, 30 * time.Second}, {&c.ControlAPI.IdleTimeout, 2 * time.Minute}} {
		if *d.v == 0 {
			*d.v = Duration(d.def)
		}
	}
}

// FieldError is a wrong value of one config field, so that a caller that
// took the value from elsewhere (ctlbd run's flags) can name its source.
type FieldError struct {
	Field string // as in the file: "logLevel", "nri.socket"
	Err   error
}

func (e *FieldError) Error() string { return "config " + e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Validate checks every field, naming the one that is wrong.
func (c *Config) Validate() error {
	for _, p := range []struct{ name, val string }{{"bpffs", c.BPFFS}, {"socket", c.Socket}, {"stateDir", c.StateDir}} {
		if !filepath.IsAbs(p.val) {
			return &FieldError{p.name, fmt.Errorf("%q is not an absolute path", p.val)}
		}
	}
	if c.ReconcileInterval < Duration(100*time.Millisecond) {
		return fmt.Errorf("config reconcileInterval: %s, want at least 100ms", time.Duration(c.ReconcileInterval))
	}
	for _, d := range []struct {
		name string
		v    Duration
	}{{"readTimeout", c.ControlAPI.ReadTimeout}, {"writeTimeout", c.ControlAPI.WriteTimeout}, {"idleTimeout", c.ControlAPI.IdleTimeout}} {
		if d.v < Duration(10*time.Millisecond) {
			return fmt.Errorf("config controlAPI.%s: %s, want at least 10ms", d.name, time.Duration(d.v))
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return &FieldError{"logLevel", fmt.Errorf("%q, want debug, info, warn or error", c.LogLevel)}
	}
	if c.Metrics != "" {
		host, port, err := net.SplitHostPort(c.Metrics)
		p, perr := strconv.ParseUint(port, 10, 16)
		if err != nil || perr != nil || p == 0 || (host != "" && net.ParseIP(host) == nil) {
			return &FieldError{"metrics", fmt.Errorf("%q: want IP:PORT, or :PORT for every address", c.Metrics)}
		}
	}
	if c.NRI != nil && c.NRI.Socket != "" && !filepath.IsAbs(c.NRI.Socket) {
		return &FieldError{"nri.socket", fmt.Errorf("%q is not an absolute path", c.NRI.Socket)}
	}
	if c.Proxy != nil {
		if err := c.Proxy.Validate(); err != nil {
			return fmt.Errorf("config proxy: %w", err)
		}
	}
	seen := map[datapath.ServiceKey]bool{}
	for i, s := range c.Services {
		svc, err := s.Datapath()
		if err != nil {
			return fmt.Errorf("config services[%d]: %w", i, err)
		}
		if s.Tracked() && !svc.VIP.Addr().Is4() {
			// The tracker (sources, health checks, the candidates' rules)
			// serves IPv4 VIPs only: an IPv6 VIP would be accepted and
			// never get a server.
			return fmt.Errorf("config services[%d]: VIP %s: %s: sources and health checks serve IPv4 VIPs only; give an IPv6 VIP static \"servers\" without \"health\"", i, svc.VIP, s.trackedBy())
		}
		if s.Tracked() {
			if err := s.Sources().Validate(); err != nil {
				return fmt.Errorf("config services[%d]: VIP %s: %w", i, svc.VIP, err)
			}
		} else if s.Panic {
			return fmt.Errorf("config services[%d]: VIP %s: panic needs health checks or a source (dns, consul, exec, health)", i, svc.VIP)
		}
		if seen[svc.Key()] {
			return fmt.Errorf("config services[%d]: VIP %s is configured twice", i, svc.Key())
		}
		seen[svc.Key()] = true
	}
	return nil
}

// Datapath converts the static part of a service for the maps.
func (s Service) Datapath() (datapath.Service, error) {
	vip, err := datapath.ParseVIP(s.VIP)
	if err != nil {
		return datapath.Service{}, err
	}
	policy, err := datapath.ParseEmptyPolicy(s.Empty)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("VIP %s: %w", vip, err)
	}
	proto, err := datapath.ParseProtocol(s.Protocol)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("VIP %s: %w", vip, err)
	}
	removal, err := datapath.ParseRemovalPolicy(s.OnServerRemoved)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("VIP %s: %w", vip, err)
	}
	if s.RebalanceRate < 0 || s.RebalanceRate > MaxRebalanceRate {
		return datapath.Service{}, fmt.Errorf("VIP %s: rebalanceRate %v: want 0 (default %v) to %v connections per second", vip, s.RebalanceRate, DefaultRebalanceRate, MaxRebalanceRate)
	}
	balance, err := datapath.ParseBalance(s.Balance)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("VIP %s: %w", vip, err)
	}
	out := datapath.Service{VIP: vip, Protocol: proto, Empty: policy, Balance: balance, OnServerRemoved: removal, Servers: []netip.AddrPort{}}
	for _, raw := range s.Servers {
		srv, err := datapath.ParseServer(raw)
		if err != nil {
			return datapath.Service{}, fmt.Errorf("VIP %s: %w", vip, err)
		}
		if srv == vip {
			// A connect would be "rewritten" to the address it dialed:
			// a typo, or a job for --empty passthrough.
			return datapath.Service{}, fmt.Errorf("VIP %s: server %s is the VIP itself (for connects to go through unchanged, give no servers and empty \"passthrough\")", vip, raw)
		}
		out.Servers = append(out.Servers, srv)
	}
	return out, out.Validate()
}
