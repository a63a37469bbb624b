package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/crashpoint"
)

// EmptyPolicy says what a connect() to a VIP with no servers does.
type EmptyPolicy string

const (
	// EmptyReject fails the connect() at once with ECONNREFUSED.
	EmptyReject EmptyPolicy = "reject"
	// EmptyPassthrough lets the connect() go to the VIP unchanged, where the
	// fallback proxy may answer.
	EmptyPassthrough EmptyPolicy = "passthrough"
)

// ParseEmptyPolicy accepts "reject" and "passthrough"; "" means reject.
func ParseEmptyPolicy(s string) (EmptyPolicy, error) {
	switch EmptyPolicy(s) {
	case "", EmptyReject:
		return EmptyReject, nil
	case EmptyPassthrough:
		return EmptyPassthrough, nil
	}
	return "", fmt.Errorf("empty-set policy %q: want %q or %q", s, EmptyReject, EmptyPassthrough)
}

// flagRejectEmpty mirrors CTLB_SVC_F_REJECT_EMPTY in bpf/ctlb.c.
const flagRejectEmpty = 0x1

// Service is a VIP:port and the servers its connections go to.
type Service struct {
	VIP     netip.AddrPort   `json:"vip"`
	Servers []netip.AddrPort `json:"servers"`
	Empty   EmptyPolicy      `json:"empty"`
}

// backendSlot is struct backend_slot: slot 0 is the header (addr = count,
// flags = policy), slots 1..count the servers.
type backendSlot struct {
	Addr  uint32
	Port  uint16
	Flags uint16
}

func svcKey(vip netip.AddrPort) ctlbSvcKey {
	return ctlbSvcKey{Vip: ip4(vip.Addr()), Port: port(vip.Port())}
}

// ip4 and port give the network-byte-order values the kernel keeps in
// sockaddr_in, as the program compares them with ctx->user_ip4/user_port.
func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func addrPort(ip uint32, p uint16) netip.AddrPort {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], ip)
	var pb [2]byte
	binary.NativeEndian.PutUint16(pb[:], p)
	return netip.AddrPortFrom(netip.AddrFrom4(a), binary.BigEndian.Uint16(pb[:]))
}

// Validate checks a service the way the kernel side needs it: an IPv4 VIP
// that a client can dial, IPv4 servers, ports 1-65535, no duplicates, at
// most MaxServers.
func (s Service) Validate() error {
	if err := ValidateVIP(s.VIP); err != nil {
		return err
	}
	if len(s.Servers) > MaxServers {
		return fmt.Errorf("VIP %s: %d servers, at most %d are allowed", s.VIP, len(s.Servers), MaxServers)
	}
	seen := make(map[netip.AddrPort]bool, len(s.Servers))
	for _, srv := range s.Servers {
		if err := ValidateServer(srv); err != nil {
			return fmt.Errorf("VIP %s: %w", s.VIP, err)
		}
		if seen[srv] {
			return fmt.Errorf("VIP %s: server %s is listed twice", s.VIP, srv)
		}
		seen[srv] = true
	}
	if _, err := ParseEmptyPolicy(string(s.Empty)); err != nil {
		return fmt.Errorf("VIP %s: %w", s.VIP, err)
	}
	return nil
}

// ValidateVIP accepts a unicast IPv4 address with a non-zero port.
func ValidateVIP(vip netip.AddrPort) error {
	a := vip.Addr()
	switch {
	case !vip.IsValid():
		return errors.New("VIP: no address")
	case !a.Is4():
		return fmt.Errorf("VIP %s: only IPv4 VIPs are balanced (connect4)", vip)
	case a.IsUnspecified() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.IsMulticast():
		return fmt.Errorf("VIP %s: not a unicast address a client can dial", vip)
	case vip.Port() == 0:
		return fmt.Errorf("VIP %s: port 0 is not a port a client can dial", vip)
	}
	return nil
}

// ValidateServer accepts a unicast IPv4 address with a non-zero port.
func ValidateServer(srv netip.AddrPort) error {
	a := srv.Addr()
	switch {
	case !srv.IsValid():
		return errors.New("server: no address")
	case !a.Is4():
		return fmt.Errorf("server %s: not IPv4", srv)
	case a.IsUnspecified() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.IsMulticast():
		return fmt.Errorf("server %s: not a unicast address", srv)
	case srv.Port() == 0:
		return fmt.Errorf("server %s: port 0", srv)
	}
	return nil
}

// SetService replaces a VIP's server set in one step. The servers are written
// to a new inner array first, then the service entry is pointed at it with a
// single map update: a concurrent connect() sees the old array or the new
// one, never a mix, never a gap (invariant 3). The kernel frees the old array
// once no program can still be reading it.
// One inner map per set, swapped by one update: ARCHITECTURE.md I3.
func (d *Datapath) SetService(s Service) error {
	if err := s.Validate(); err != nil {
		return err
	}
	policy, _ := ParseEmptyPolicy(string(s.Empty))
	inner, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "ctlb_backends",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: uint32(len(s.Servers) + 1),
		Flags:      unix.BPF_F_INNER_MAP,
	})
	if err != nil {
		return fmt.Errorf("VIP %s: create backend array: %w", s.VIP, err)
	}
	defer inner.Close()
	hdr := backendSlot{Addr: uint32(len(s.Servers))}
	if policy == EmptyReject {
		hdr.Flags = flagRejectEmpty
	}
	if err := inner.Put(uint32(0), hdr); err != nil {
		return fmt.Errorf("VIP %s: write header: %w", s.VIP, err)
	}
	for i, srv := range s.Servers {
		slot := backendSlot{Addr: ip4(srv.Addr()), Port: port(srv.Port())}
		if err := inner.Put(uint32(i+1), slot); err != nil {
			return fmt.Errorf("VIP %s: write server %s: %w", s.VIP, srv, err)
		}
	}
	// No writes after this point: freeze makes that a kernel guarantee.
	if err := inner.Freeze(); err != nil {
		return fmt.Errorf("VIP %s: freeze backend array: %w", s.VIP, err)
	}
	crashpoint.Hit(crashpoint.SetPrepared)
	key := svcKey(s.VIP)
	if err := d.objs.CtlbServicesV1.Put(key, inner); err != nil {
		return fmt.Errorf("VIP %s: swap in server set: %w", s.VIP, err)
	}
	crashpoint.Hit(crashpoint.SetSwapped)
	return nil
}

// DeleteService removes a VIP: connects to it are no longer rewritten. Its
// counters go too. Deleting a VIP that does not exist is not an error.
func (d *Datapath) DeleteService(vip netip.AddrPort) (bool, error) {
	key := svcKey(vip)
	err := d.objs.CtlbServicesV1.Delete(key)
	existed := err == nil
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, fmt.Errorf("delete VIP %s: %w", vip, err)
	}
	if err := d.objs.CtlbRrV1.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return existed, fmt.Errorf("delete VIP %s counter: %w", vip, err)
	}
	if err := d.deleteCounters(vip); err != nil {
		return existed, err
	}
	return existed, nil
}

// Service reads one VIP's set. ok is false when the VIP is not configured.
func (d *Datapath) Service(vip netip.AddrPort) (Service, bool, error) {
	for attempt := 0; ; attempt++ {
		var innerID uint32
		err := d.objs.CtlbServicesV1.Lookup(svcKey(vip), &innerID)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Service{}, false, nil
		}
		if err != nil {
			return Service{}, false, fmt.Errorf("look up VIP %s: %w", vip, err)
		}
		s, err := readService(vip, innerID)
		if errors.Is(err, unix.ENOENT) && attempt < 3 {
			continue // swapped out between the two lookups: read the new one
		}
		return s, err == nil, err
	}
}

// Services lists every VIP with its set, sorted by VIP.
func (d *Datapath) Services() ([]Service, error) {
	var (
		key     ctlbSvcKey
		innerID uint32
		out     []Service
	)
	it := d.objs.CtlbServicesV1.Iterate()
	var vips []netip.AddrPort
	for it.Next(&key, &innerID) {
		vips = append(vips, addrPort(key.Vip, key.Port))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	for _, vip := range vips {
		s, ok, err := d.Service(vip)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VIP.Compare(out[j].VIP) < 0 })
	return out, nil
}

func readService(vip netip.AddrPort, innerID uint32) (Service, error) {
	inner, err := ebpf.NewMapFromID(ebpf.MapID(innerID))
	if err != nil {
		return Service{}, fmt.Errorf("VIP %s: open backend array %d: %w", vip, innerID, err)
	}
	defer inner.Close()
	var hdr backendSlot
	if err := inner.Lookup(uint32(0), &hdr); err != nil {
		return Service{}, fmt.Errorf("VIP %s: read header: %w", vip, err)
	}
	s := Service{VIP: vip, Empty: EmptyPassthrough, Servers: []netip.AddrPort{}}
	if hdr.Flags&flagRejectEmpty != 0 {
		s.Empty = EmptyReject
	}
	for i := uint32(1); i <= hdr.Addr && i <= MaxServers; i++ {
		var slot backendSlot
		if err := inner.Lookup(i, &slot); err != nil {
			return Service{}, fmt.Errorf("VIP %s: read server %d: %w", vip, i, err)
		}
		s.Servers = append(s.Servers, addrPort(slot.Addr, slot.Port))
	}
	return s, nil
}

// ParseVIP parses and validates "IP:PORT" for a VIP.
func ParseVIP(s string) (netip.AddrPort, error) {
	ap, err := parseAddrPort("VIP", s)
	if err != nil {
		return ap, err
	}
	return ap, ValidateVIP(ap)
}

// ParseServer parses and validates "IP:PORT" for a server.
func ParseServer(s string) (netip.AddrPort, error) {
	ap, err := parseAddrPort("server", s)
	if err != nil {
		return ap, err
	}
	return ap, ValidateServer(ap)
}

func parseAddrPort(what, s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%s %q: want IPv4:PORT with a port from 1 to 65535 (%v)", what, s, err)
	}
	if ap.Addr().Is4In6() || ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%s %q: not a plain IPv4 address", what, s)
	}
	return ap, nil
}

// setParallelism bounds concurrent SetService calls in SetServices.
const setParallelism = 64

// SetServices sets many VIPs at once. Each replacement waits for one RCU
// grace period (about 10 ms); concurrent waits share grace periods, so the
// updates run in parallel and 10,000 VIPs take a second or two instead of
// minutes. Every service is validated before any is written; each VIP's
// swap stays atomic on its own. The VIPs must be distinct.
func (d *Datapath) SetServices(svcs []Service) error {
	seen := make(map[netip.AddrPort]bool, len(svcs))
	for _, s := range svcs {
		if err := s.Validate(); err != nil {
			return err
		}
		if seen[s.VIP] {
			return fmt.Errorf("VIP %s is listed twice", s.VIP)
		}
		seen[s.VIP] = true
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		work  = make(chan Service)
	)
	for i := 0; i < min(setParallelism, len(svcs)); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range work {
				if err := d.SetService(s); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for _, s := range svcs {
		work <- s
	}
	close(work)
	wg.Wait()
	return first
}
