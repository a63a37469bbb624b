package proxy

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/ctlb/ctlb/internal/vip"
)

// Listening modes.
const (
	// ModeListeners opens one listening socket per address and port.
	ModeListeners = "listeners"
	// ModeSteering opens one socket and steers every VIP:port to it with
	// an sk_lookup program in the network namespace.
	ModeSteering = "steering"
)

// Defaults for the fields left empty.
const (
	DefaultIdleTimeout    = 5 * time.Minute
	DefaultConnectTimeout = 2 * time.Second
	DefaultDrainTimeout   = 10 * time.Second
	// DefaultMaxConnections caps the client connections the proxy holds
	// at once (each takes two file descriptors).
	DefaultMaxConnections = 16384
	// DefaultPreconnectMaxIdle is how long a ready backend connection
	// (preconnect) waits for a client before it is closed and replaced:
	// short enough that a server's own idle timeout does not close it
	// under a client.
	DefaultPreconnectMaxIdle = 3 * time.Second
	// MaxPreconnect bounds preconnect.
	MaxPreconnect = 16
)

// Config is the proxy section of the ctlbd configuration, e.g.
//
//	{"mode": "steering",
//	 "services": [{"vip": "198.18.100.1", "ports": [8502, 8500]}],
//	 "idleTimeout": "5m", "connectTimeout": "2s", "drainTimeout": "10s",
//	 "maxConnections": 16384, "maxConnectionsPerService": 4096, "loops": 2,
//	 "localVIP": {"enabled": true, "device": "ctlb0"}}
//
// Empty fields take the defaults above.
type Config struct {
	// Mode is "listeners" (the default) or "steering".
	Mode     string    `json:"mode,omitempty"`
	Services []Service `json:"services"`
	// Durations in time.ParseDuration syntax ("5m", "2s").
	IdleTimeout    string `json:"idleTimeout,omitempty"`
	ConnectTimeout string `json:"connectTimeout,omitempty"`
	DrainTimeout   string `json:"drainTimeout,omitempty"`
	// MaxConnections caps the client connections held open at once, over
	// all services (default DefaultMaxConnections); MaxConnectionsPerService
	// caps each VIP:port (default: no cap of its own). A client past a cap
	// is reset at once and counted in ctlb_proxy_rejected_total.
	MaxConnections           int `json:"maxConnections,omitempty"`
	MaxConnectionsPerService int `json:"maxConnectionsPerService,omitempty"`
	// RejectLogInterval is how often, at most, one kind of rejected
	// connection is logged (default 10s); the rest are counted.
	RejectLogInterval string `json:"rejectLogInterval,omitempty"`
	// Loops is the number of event loops, each a thread's worth of work
	// with its own listening sockets (default 0: one per CPU the Go
	// runtime may use, at most MaxLoops). Fewer loops than CPUs suit a
	// node whose CPUs the proxy shares with busy workloads: on 2 CPUs,
	// one loop measured about 10% less CPU per connection than two.
	Loops int `json:"loops,omitempty"`
	// Preconnect keeps this many backend connections established ahead
	// of clients for every server of a service, in each event loop
	// (default 0: off; at most MaxPreconnect), so that an accepted client
	// is paired at once instead of waiting for a dial's handshake. The
	// server is still picked by round robin; a ready connection of that
	// server is taken when there is one, otherwise it is dialed as usual.
	// A ready connection is not a client connection: the caps and the
	// client metrics do not count it.
	Preconnect int `json:"preconnect,omitempty"`
	// PreconnectMaxIdle is how long a ready connection waits for a client
	// before it is closed and replaced (default DefaultPreconnectMaxIdle).
	PreconnectMaxIdle string   `json:"preconnectMaxIdle,omitempty"`
	LocalVIP          LocalVIP `json:"localVIP"`
}

// Service is one VIP the proxy serves. A client that dials VIP:port is sent
// to a server of that VIP:port's set, the same set the connect4 path uses.
type Service struct {
	VIP   string `json:"vip"`
	Ports []int  `json:"ports"`
	// Listen lists the addresses clients dial to reach this VIP through
	// the proxy; empty means the VIP itself, the usual case.
	Listen []string `json:"listen,omitempty"`
}

// LocalVIP asks the proxy to put every VIP (and listen address) on a device
// of the node as a /32, so that traffic to it is delivered locally.
type LocalVIP struct {
	Enabled bool `json:"enabled"`
	// Device is "lo", an existing device, or a bridge created when
	// missing; default "ctlb0".
	Device string `json:"device,omitempty"`
}

// settings is a validated Config in usable form.
type settings struct {
	mode           string
	dests          map[netip.AddrPort]netip.AddrPort // listen addr:port -> VIP:port
	localAddrs     []netip.Addr                      // addresses to make local
	idleTimeout    time.Duration
	connectTimeout time.Duration
	drainTimeout   time.Duration
	maxConns       int
	maxPerService  int
	rejectLogEvery time.Duration
	loops          int // 0: one per CPU
	preconnect     int // ready connections per server and loop; 0: off
	preconnectIdle time.Duration
	localVIP       bool
	device         string
}

// Validate checks the configuration; the error names the field and value
// at fault.
func (c Config) Validate() error {
	_, err := c.settings()
	return err
}

func (c Config) settings() (*settings, error) {
	s := &settings{mode: c.Mode, device: c.LocalVIP.Device, localVIP: c.LocalVIP.Enabled}
	switch c.Mode {
	case "":
		s.mode = ModeListeners
	case ModeListeners, ModeSteering:
	default:
		return nil, fmt.Errorf("mode: %q is not %q or %q", c.Mode, ModeListeners, ModeSteering)
	}
	var err error
	if s.idleTimeout, err = duration("idleTimeout", c.IdleTimeout, DefaultIdleTimeout); err != nil {
		return nil, err
	}
	if s.connectTimeout, err = duration("connectTimeout", c.ConnectTimeout, DefaultConnectTimeout); err != nil {
		return nil, err
	}
	if s.drainTimeout, err = duration("drainTimeout", c.DrainTimeout, DefaultDrainTimeout); err != nil {
		return nil, err
	}
	if s.rejectLogEvery, err = duration("rejectLogInterval", c.RejectLogInterval, DefaultRejectLogInterval); err != nil {
		return nil, err
	}
	switch {
	case c.MaxConnections < 0:
		return nil, fmt.Errorf("maxConnections: %d must not be negative", c.MaxConnections)
	case c.MaxConnectionsPerService < 0:
		return nil, fmt.Errorf("maxConnectionsPerService: %d must not be negative", c.MaxConnectionsPerService)
	}
	s.maxConns, s.maxPerService = c.MaxConnections, c.MaxConnectionsPerService
	if c.Loops < 0 || c.Loops > MaxLoops {
		return nil, fmt.Errorf("loops: %d is not 0 (one per CPU) to %d", c.Loops, MaxLoops)
	}
	s.loops = c.Loops
	if c.Preconnect < 0 || c.Preconnect > MaxPreconnect {
		return nil, fmt.Errorf("preconnect: %d is not 0 (off) to %d", c.Preconnect, MaxPreconnect)
	}
	s.preconnect = c.Preconnect
	if s.preconnectIdle, err = duration("preconnectMaxIdle", c.PreconnectMaxIdle, DefaultPreconnectMaxIdle); err != nil {
		return nil, err
	}
	if s.maxConns == 0 {
		s.maxConns = DefaultMaxConnections
	}
	if s.device == "" {
		s.device = vip.DefaultDevice
	}
	if err := vip.ValidDeviceName(s.device); err != nil {
		return nil, fmt.Errorf("localVIP.device: %w", err)
	}
	if s.dests, s.localAddrs, err = destinations(c.Services); err != nil {
		return nil, err
	}
	return s, nil
}

// destinations maps every listen address:port to its service VIP:port.
func destinations(services []Service) (map[netip.AddrPort]netip.AddrPort, []netip.Addr, error) {
	dests := make(map[netip.AddrPort]netip.AddrPort)
	var local []netip.Addr
	addLocal := func(a netip.Addr) {
		for _, l := range local {
			if l == a {
				return
			}
		}
		local = append(local, a)
	}
	for i, svc := range services {
		field := fmt.Sprintf("services[%d]", i)
		v, err := ipv4(field+".vip", svc.VIP)
		if err != nil {
			return nil, nil, err
		}
		if len(svc.Ports) == 0 {
			return nil, nil, fmt.Errorf("%s.ports: empty (VIP %s needs at least one port)", field, v)
		}
		listen := []netip.Addr{v}
		if len(svc.Listen) > 0 {
			listen = listen[:0]
			for j, l := range svc.Listen {
				a, err := ipv4(fmt.Sprintf("%s.listen[%d]", field, j), l)
				if err != nil {
					return nil, nil, err
				}
				listen = append(listen, a)
			}
		}
		for j, p := range svc.Ports {
			if p < 1 || p > 65535 {
				return nil, nil, fmt.Errorf("%s.ports[%d]: %d is not a port (1-65535)", field, j, p)
			}
			for _, l := range listen {
				d := netip.AddrPortFrom(l, uint16(p))
				if _, dup := dests[d]; dup {
					return nil, nil, fmt.Errorf("%s.ports[%d]: %s is served twice", field, j, d)
				}
				dests[d] = netip.AddrPortFrom(v, uint16(p))
			}
		}
		for _, l := range listen {
			addLocal(l)
		}
	}
	return dests, local, nil
}

func ipv4(field, s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s: %q is not an IPv4 address", field, s)
	}
	switch {
	case !a.Is4():
		return netip.Addr{}, fmt.Errorf("%s: %q is not an IPv4 address (only IPv4 is proxied)", field, s)
	case a.IsUnspecified(), a.IsMulticast(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return netip.Addr{}, fmt.Errorf("%s: %q cannot be a VIP or listen address", field, s)
	}
	return a, nil
}

func duration(field, s string, def time.Duration) (time.Duration, error) {
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		// Not wrapped: the parser's message only repeats the value.
		return 0, fmt.Errorf("%s: %q is not a duration (e.g. \"5m\", \"2s\")", field, s)
	}
	if d <= 0 {
		return 0, fmt.Errorf("%s: %q must be positive", field, s)
	}
	return d, nil
}
