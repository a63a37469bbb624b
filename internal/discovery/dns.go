package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
)

// DNS defaults.
const (
	DefaultDNSInterval    = 5 * time.Second
	DefaultDNSMinInterval = 1 * time.Second
	DefaultDNSTimeout     = 2 * time.Second
)

// DNS resolves a name's A records, for example a Kubernetes headless service
// (consul-server.consul.svc), again after the answer's TTL runs out and at
// least every Interval.
type DNS struct {
	// Host is the name to resolve.
	Host string
	// Resolver is the DNS server as "ip:port" (port 53 when left out). When
	// empty, /etc/resolv.conf gives the servers and the search list, as the
	// system resolver would use them.
	Resolver string
	// Port is the server port put on every address (DefaultPort when 0).
	Port uint16
	// Interval is the longest time between two lookups (DefaultDNSInterval).
	Interval time.Duration
	// MinInterval keeps a TTL of 0 from becoming a busy loop
	// (DefaultDNSMinInterval); it is also the first retry delay after an
	// error.
	MinInterval time.Duration
	// Timeout bounds one query to one server (DefaultDNSTimeout).
	Timeout time.Duration
	// ResolvConf is the file read when Resolver is empty ("/etc/resolv.conf").
	ResolvConf string
}

// Name implements Source.
func (DNS) Name() string { return "dns" }

func (d DNS) withDefaults() DNS {
	if d.Interval <= 0 {
		d.Interval = DefaultDNSInterval
	}
	if d.MinInterval <= 0 {
		d.MinInterval = min(DefaultDNSMinInterval, d.Interval)
	}
	if d.Timeout <= 0 {
		d.Timeout = DefaultDNSTimeout
	}
	if d.ResolvConf == "" {
		d.ResolvConf = "/etc/resolv.conf"
	}
	d.Port = portOr(d.Port)
	return d
}

// Run resolves until ctx is done.
func (d DNS) Run(ctx context.Context, emit func(Result)) {
	d = d.withDefaults()
	bo := backoff{min: d.MinInterval, max: d.Interval}
	for {
		servers, ttl, err := d.Lookup(ctx)
		if ctx.Err() != nil {
			return
		}
		var wait time.Duration
		if err != nil {
			emit(Result{Err: err})
			wait = bo.next()
		} else {
			bo.reset()
			emit(Result{Servers: servers})
			wait = min(max(ttl, d.MinInterval), d.Interval)
		}
		if !sleep(ctx, wait) {
			return
		}
	}
}

// Lookup resolves the name once and returns the servers and the smallest
// TTL among the records used.
func (d DNS) Lookup(ctx context.Context) ([]netip.AddrPort, time.Duration, error) {
	d = d.withDefaults()
	servers, names, err := d.plan()
	if err != nil {
		return nil, 0, err
	}
	var errs []error
	for _, name := range names {
		for _, srv := range servers {
			addrs, ttl, err := d.query(ctx, srv, name)
			if err == nil {
				out := make([]netip.AddrPort, len(addrs))
				for i, a := range addrs {
					out[i] = netip.AddrPortFrom(a, d.Port)
				}
				return Normalize(out), ttl, nil
			}
			errs = append(errs, err)
			if errors.Is(err, errNoName) {
				break // this server answered: the name does not exist; try the next name
			}
			if ctx.Err() != nil {
				return nil, 0, ctx.Err()
			}
		}
	}
	return nil, 0, fmt.Errorf("dns %s: %w", d.Host, errors.Join(errs...))
}

// errNoName is NXDOMAIN. It is an empty answer (errors.Is ErrEmpty): the
// server answered, well formed, that the name has no records (a headless
// service not deployed yet), as NODATA does.
var errNoName error = noNameError{}

type noNameError struct{}

func (noNameError) Error() string        { return "no such name" }
func (noNameError) Is(target error) bool { return target == ErrEmpty }

// plan gives the DNS servers to ask and the names to try, in order.
func (d DNS) plan() (servers, names []string, err error) {
	if d.Host == "" {
		return nil, nil, errors.New("dns: empty name")
	}
	if d.Resolver != "" {
		srv := d.Resolver
		if _, _, err := net.SplitHostPort(srv); err != nil {
			srv = net.JoinHostPort(srv, "53")
		}
		return []string{srv}, []string{dns.Fqdn(d.Host)}, nil
	}
	cc, err := dns.ClientConfigFromFile(d.ResolvConf)
	if err != nil {
		return nil, nil, fmt.Errorf("dns %s: read %s: %w", d.Host, d.ResolvConf, err)
	}
	if len(cc.Servers) == 0 {
		return nil, nil, fmt.Errorf("dns %s: no nameserver in %s", d.Host, d.ResolvConf)
	}
	for _, s := range cc.Servers {
		servers = append(servers, net.JoinHostPort(s, cc.Port))
	}
	return servers, cc.NameList(d.Host), nil
}

// query asks one server for the A records of one name, over UDP and again
// over TCP when the answer was truncated.
func (d DNS) query(ctx context.Context, server, name string) ([]netip.Addr, time.Duration, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	m.RecursionDesired = true
	c := &dns.Client{Net: "udp", Timeout: d.Timeout}
	in, _, err := c.ExchangeContext(ctx, m, server)
	if err == nil && in.Truncated {
		c.Net = "tcp"
		in, _, err = c.ExchangeContext(ctx, m, server)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("query %s at %s: %w", name, server, err)
	}
	switch in.Rcode {
	case dns.RcodeSuccess:
	case dns.RcodeNameError:
		return nil, 0, fmt.Errorf("query %s at %s: %w", name, server, errNoName)
	default:
		return nil, 0, fmt.Errorf("query %s at %s: rcode %s", name, server, dns.RcodeToString[in.Rcode])
	}
	var addrs []netip.Addr
	ttl := time.Duration(-1)
	for _, rr := range in.Answer {
		a, ok := rr.(*dns.A)
		if !ok {
			continue // CNAMEs on the way; the recursive server follows them
		}
		ip, ok := netip.AddrFromSlice(a.A.To4())
		if !ok {
			continue
		}
		addrs = append(addrs, ip)
		if t := time.Duration(a.Hdr.Ttl) * time.Second; ttl < 0 || t < ttl {
			ttl = t
		}
	}
	if len(addrs) == 0 {
		return nil, 0, fmt.Errorf("query %s at %s: no A records: %w", name, server, ErrEmpty)
	}
	return addrs, ttl, nil
}
