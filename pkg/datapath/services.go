package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/crashpoint"
)

// EmptyPolicy says what a connect() to a VIP with no usable server does.
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

// Protocol is the transport protocol of a VIP. A VIP is the triple
// protocol, address, port: TCP and UDP VIPs of one address and port are two
// VIPs. MPTCP sockets use the TCP VIP.
type Protocol string

const (
	TCP Protocol = "tcp"
	UDP Protocol = "udp"
)

// ParseProtocol accepts "tcp" and "udp"; "" means tcp.
func ParseProtocol(s string) (Protocol, error) {
	switch Protocol(strings.ToLower(s)) {
	case "", TCP:
		return TCP, nil
	case UDP:
		return UDP, nil
	}
	return "", fmt.Errorf("protocol %q: want %q or %q", s, TCP, UDP)
}

func (p Protocol) number() uint8 {
	if p == UDP {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

func protocolOf(n uint8) Protocol {
	if n == unix.IPPROTO_UDP {
		return UDP
	}
	return TCP
}

// Balance is how connect() chooses among a VIP's usable servers.
type Balance string

const (
	// BalanceRoundRobin rotates through the servers with one shared
	// counter per VIP (started at a random point on each node).
	BalanceRoundRobin Balance = "roundrobin"
	// BalanceRandom picks a server at random for every connect.
	BalanceRandom Balance = "random"
	// BalanceLeastOpen picks the less loaded of two random servers by the
	// kernel's open-connection counts (power of two choices).
	BalanceLeastOpen Balance = "least-open"
)

// ParseBalance accepts roundrobin, random and least-open; "" means
// roundrobin.
func ParseBalance(s string) (Balance, error) {
	switch Balance(s) {
	case "", BalanceRoundRobin:
		return BalanceRoundRobin, nil
	case BalanceRandom, BalanceLeastOpen:
		return Balance(s), nil
	}
	return "", fmt.Errorf("balance %q: want %q, %q or %q", s, BalanceRoundRobin, BalanceRandom, BalanceLeastOpen)
}

func (b Balance) number() uint8 {
	switch b {
	case BalanceRandom:
		return 1
	case BalanceLeastOpen:
		return 2
	}
	return 0
}

func balanceOf(n uint8) Balance {
	switch n {
	case 1:
		return BalanceRandom
	case 2:
		return BalanceLeastOpen
	}
	return BalanceRoundRobin
}

// flagRejectEmpty mirrors CTLB_SVC_F_REJECT_EMPTY in bpf/ctlb.h.
const flagRejectEmpty = 0x1

// ServiceKey names a VIP: protocol, address and port.
type ServiceKey struct {
	Protocol Protocol       `json:"protocol"`
	VIP      netip.AddrPort `json:"vip"`
}

// String is "VIP" for TCP and "VIP/udp" for UDP.
func (k ServiceKey) String() string {
	if k.Protocol == UDP {
		return k.VIP.String() + "/udp"
	}
	return k.VIP.String()
}

// Compare orders keys by VIP, then protocol.
func (k ServiceKey) Compare(o ServiceKey) int {
	if c := k.VIP.Compare(o.VIP); c != 0 {
		return c
	}
	return strings.Compare(string(k.Protocol), string(o.Protocol))
}

// Service is a VIP and the servers its connections go to.
type Service struct {
	VIP      netip.AddrPort   `json:"vip"`
	Protocol Protocol         `json:"protocol"`
	Servers  []netip.AddrPort `json:"servers"`
	Empty    EmptyPolicy      `json:"empty"`
	Balance  Balance          `json:"balance"`
	// OnServerRemoved is what happens to the connections of a server that
	// leaves the set; "" means terminate.
	OnServerRemoved RemovalPolicy `json:"onServerRemoved,omitempty"`
}

// Key is the service's VIP triple, with the default protocol filled in.
func (s Service) Key() ServiceKey {
	p, err := ParseProtocol(string(s.Protocol))
	if err != nil {
		p = s.Protocol
	}
	return ServiceKey{Protocol: p, VIP: s.VIP}
}

// Normalized fills in the defaults: tcp, reject, roundrobin, no nil slice.
func (s Service) Normalized() Service {
	s.Protocol = s.Key().Protocol
	if e, err := ParseEmptyPolicy(string(s.Empty)); err == nil {
		s.Empty = e
	}
	if b, err := ParseBalance(string(s.Balance)); err == nil {
		s.Balance = b
	}
	if r, err := ParseRemovalPolicy(string(s.OnServerRemoved)); err == nil {
		s.OnServerRemoved = r
	}
	if s.Servers == nil {
		s.Servers = []netip.AddrPort{}
	}
	return s
}

// svcHdr is struct svc_hdr_v2, slot 0 of a VIP's inner array.
type svcHdr struct {
	Count   uint32
	Flags   uint16
	Balance uint8
	Proto   uint8
	Svc     uint32
	Pad     [3]uint32
}

// backendSlot is struct backend_v2, slots 1..count.
type backendSlot struct {
	Addr [16]byte
	Port uint16
	Pad  uint16
	Slot uint32
}

const innerValueSize = 24

func svcKey(k ServiceKey) ctlbSvcKeyV2 {
	return ctlbSvcKeyV2{Addr: k.VIP.Addr().As16(), Port: port(k.VIP.Port()), Proto: k.Protocol.number()}
}

func keyOf(k ctlbSvcKeyV2) ServiceKey {
	return ServiceKey{Protocol: protocolOf(k.Proto), VIP: addrPort16(k.Addr, k.Port)}
}

// port gives the network-byte-order value the kernel keeps in sockaddr_in,
// as the programs compare it with ctx->user_port.
func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func hostPort(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

// addrPort16 reads a 16-byte address (v4-mapped for IPv4) and a port.
func addrPort16(a [16]byte, p uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(a).Unmap(), hostPort(p))
}

// Validate checks a service the way the kernel side needs it: a VIP that a
// client can dial, servers of the VIP's family, ports 1-65535, no
// duplicates, at most MaxServers, known protocol, policy and balance.
func (s Service) Validate() error {
	if _, err := ParseProtocol(string(s.Protocol)); err != nil {
		return fmt.Errorf("VIP %s: %w", s.VIP, err)
	}
	if err := ValidateVIP(s.VIP); err != nil {
		return err
	}
	k := s.Key()
	if len(s.Servers) > MaxServers {
		return fmt.Errorf("VIP %s: %d servers, at most %d are allowed", k, len(s.Servers), MaxServers)
	}
	seen := make(map[netip.AddrPort]bool, len(s.Servers))
	for _, srv := range s.Servers {
		if err := ValidateServer(srv); err != nil {
			return fmt.Errorf("VIP %s: %w", k, err)
		}
		if srv.Addr().Is4() != s.VIP.Addr().Is4() {
			return fmt.Errorf("VIP %s is %s, server %s is %s: a VIP and its servers are of one family", k, family(s.VIP), srv, family(srv))
		}
		if seen[srv] {
			return fmt.Errorf("VIP %s: server %s is listed twice", k, srv)
		}
		seen[srv] = true
	}
	if _, err := ParseEmptyPolicy(string(s.Empty)); err != nil {
		return fmt.Errorf("VIP %s: %w", k, err)
	}
	if _, err := ParseBalance(string(s.Balance)); err != nil {
		return fmt.Errorf("VIP %s: %w", k, err)
	}
	if _, err := ParseRemovalPolicy(string(s.OnServerRemoved)); err != nil {
		return fmt.Errorf("VIP %s: %w", k, err)
	}
	return nil
}

func family(ap netip.AddrPort) string {
	if ap.Addr().Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// checkAddr accepts a unicast IPv4 or IPv6 address without a zone; a
// v4-mapped IPv6 address is refused: give the IPv4 address instead.
func checkAddr(what string, ap netip.AddrPort) error {
	a := ap.Addr()
	switch {
	case !ap.IsValid():
		return fmt.Errorf("%s: no address", what)
	case a.Is4In6():
		return fmt.Errorf("%s %s: a v4-mapped address; give the IPv4 address %s (dual-stack clients dialing ::ffff:%s are balanced by it)", what, ap, a.Unmap(), a.Unmap())
	case a.Zone() != "":
		return fmt.Errorf("%s %s: an address with a zone cannot be balanced", what, ap)
	case a.IsUnspecified() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.IsMulticast():
		return fmt.Errorf("%s %s: not a unicast address a client can dial", what, ap)
	case ap.Port() == 0:
		return fmt.Errorf("%s %s: port 0 is not a port a client can dial", what, ap)
	}
	return nil
}

// ValidateVIP accepts a unicast IPv4 or IPv6 address with a non-zero port.
func ValidateVIP(vip netip.AddrPort) error { return checkAddr("VIP", vip) }

// ValidateServer accepts a unicast IPv4 or IPv6 address with a non-zero port.
func ValidateServer(srv netip.AddrPort) error { return checkAddr("server", srv) }

// newInner creates, fills and freezes the inner array of one service.
func (d *Datapath) newInner(s Service, svc uint32, slots []uint32) (*ebpf.Map, error) {
	k := s.Key()
	inner, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "ctlb_backends",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  innerValueSize,
		MaxEntries: uint32(len(s.Servers) + 1),
		Flags:      unix.BPF_F_INNER_MAP,
	})
	if err != nil {
		return nil, fmt.Errorf("VIP %s: create backend array: %w", k, err)
	}
	hdr := svcHdr{Count: uint32(len(s.Servers)), Balance: Balance(s.Balance).number(), Proto: k.Protocol.number(), Svc: svc}
	if s.Empty == EmptyReject || s.Empty == "" {
		hdr.Flags = flagRejectEmpty
	}
	if s.OnServerRemoved == RemovalKeep {
		hdr.Flags |= flagKeepOnRemoval
	}
	if err := inner.Put(uint32(0), hdr); err != nil {
		inner.Close()
		return nil, fmt.Errorf("VIP %s: write header: %w", k, err)
	}
	for i, srv := range s.Servers {
		slot := backendSlot{Addr: srv.Addr().As16(), Port: port(srv.Port()), Slot: slots[i]}
		if err := inner.Put(uint32(i+1), slot); err != nil {
			inner.Close()
			return nil, fmt.Errorf("VIP %s: write server %s: %w", k, srv, err)
		}
	}
	// No writes after this point: freeze makes that a kernel guarantee.
	if err := inner.Freeze(); err != nil {
		inner.Close()
		return nil, fmt.Errorf("VIP %s: freeze backend array: %w", k, err)
	}
	return inner, nil
}

// SetService replaces a VIP's server set in one step. The servers are written
// to a new inner array first, then the service entry is pointed at it with a
// single map update: a concurrent connect() sees the old array or the new
// one, never a mix, never a gap (invariant 3). The kernel frees the old array
// once no program can still be reading it.
func (d *Datapath) SetService(s Service) error { return d.SetServices([]Service{s}) }

// BatchMode says how SetServices writes many VIPs: "batch" (one
// BPF_MAP_UPDATE_BATCH per chunk of VIPs) or "parallel" (one update per VIP,
// concurrently) where the kernel has no batch update for HASH_OF_MAPS.
func (d *Datapath) BatchMode() string {
	d.batchMu.Lock()
	defer d.batchMu.Unlock()
	if d.noBatch {
		return "parallel"
	}
	return "batch"
}

// batchChunk bounds one BPF_MAP_UPDATE_BATCH call.
const batchChunk = 4096

// setParallelism bounds concurrent single updates on the fallback path.
const setParallelism = 64

// SetServices sets many VIPs at once. Every service is validated before any
// is written; each VIP's swap stays atomic on its own. The VIPs must be
// distinct. The outer map is written with BPF_MAP_UPDATE_BATCH where the
// kernel supports it (BatchMode), else with concurrent single updates.
func (d *Datapath) SetServices(svcs []Service) error {
	seen := make(map[ServiceKey]bool, len(svcs))
	for i, s := range svcs {
		if err := s.Validate(); err != nil {
			return err
		}
		svcs[i] = s.Normalized()
		k := svcs[i].Key()
		if seen[k] {
			return fmt.Errorf("VIP %s is listed twice", k)
		}
		seen[k] = true
	}
	if len(svcs) == 0 {
		return nil
	}
	a, err := d.allocator()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sweep(d)

	keys := make([]ctlbSvcKeyV2, 0, len(svcs))
	inners := make([]*ebpf.Map, 0, len(svcs))
	defer func() {
		for _, m := range inners {
			m.Close()
		}
	}()
	for _, s := range svcs {
		k := s.Key()
		svc, err := a.service(d, k)
		if err != nil {
			return err
		}
		slots := make([]uint32, len(s.Servers))
		for i, srv := range s.Servers {
			if slots[i], err = a.slot(d, k, svc, srv); err != nil {
				return err
			}
		}
		inner, err := d.newInner(s, svc, slots)
		if err != nil {
			return err
		}
		keys = append(keys, svcKey(k))
		inners = append(inners, inner)
	}
	crashpoint.Hit(crashpoint.SetPrepared)
	if err := d.putOuter(keys, inners); err != nil {
		return err
	}
	crashpoint.Hit(crashpoint.SetSwapped)
	for _, s := range svcs {
		if err := a.retireOthers(d, s.Key(), s.Servers); err != nil {
			return err
		}
	}
	return nil
}

// putOuter points each key at its inner array: one update per VIP, so a
// connect sees the old set or the new one (ARCHITECTURE.md I3).
func (d *Datapath) putOuter(keys []ctlbSvcKeyV2, inners []*ebpf.Map) error {
	d.batchMu.Lock()
	noBatch := d.noBatch
	d.batchMu.Unlock()
	if !noBatch && len(keys) > 1 {
		for start := 0; start < len(keys); start += batchChunk {
			end := min(start+batchChunk, len(keys))
			fds := make([]uint32, 0, end-start)
			for _, m := range inners[start:end] {
				fds = append(fds, uint32(m.FD()))
			}
			_, err := d.maps.services.BatchUpdate(keys[start:end], fds, nil)
			if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) && start == 0 {
				d.batchMu.Lock()
				d.noBatch = true
				d.batchMu.Unlock()
				break
			}
			if err != nil {
				return fmt.Errorf("swap in %d server sets: %w", end-start, err)
			}
			if end == len(keys) {
				return nil
			}
		}
	}
	if len(keys) == 1 {
		if err := d.maps.services.Put(keys[0], inners[0]); err != nil {
			return fmt.Errorf("VIP %s: swap in server set: %w", keyOf(keys[0]), err)
		}
		return nil
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		work  = make(chan int)
	)
	for i := 0; i < min(setParallelism, len(keys)); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				if err := d.maps.services.Put(keys[j], inners[j]); err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("VIP %s: swap in server set: %w", keyOf(keys[j]), err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for j := range keys {
		work <- j
	}
	close(work)
	wg.Wait()
	return first
}

// DeleteService removes a TCP VIP; DeleteServiceKey any VIP.
func (d *Datapath) DeleteService(vip netip.AddrPort) (bool, error) {
	return d.DeleteServiceKey(ServiceKey{Protocol: TCP, VIP: vip})
}

// DeleteServiceKey removes a VIP: connects to it are no longer rewritten.
// Its counters are zeroed at once, so a VIP created again starts clean; the
// open counts of sockets still open stay until they close. Deleting a VIP
// that does not exist is not an error.
func (d *Datapath) DeleteServiceKey(k ServiceKey) (bool, error) {
	a, err := d.allocator()
	if err != nil {
		return false, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	err = d.maps.services.Delete(svcKey(k))
	existed := err == nil
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, fmt.Errorf("delete VIP %s: %w", k, err)
	}
	if err := a.deleteService(d, k); err != nil {
		return existed, err
	}
	a.sweep(d)
	return existed, nil
}

// Service reads one TCP VIP's set; ServiceOf any VIP's. ok is false when the
// VIP is not configured.
func (d *Datapath) Service(vip netip.AddrPort) (Service, bool, error) {
	return d.ServiceOf(ServiceKey{Protocol: TCP, VIP: vip})
}

// ServiceOf reads one VIP's set.
func (d *Datapath) ServiceOf(k ServiceKey) (Service, bool, error) {
	for attempt := 0; ; attempt++ {
		var innerID uint32
		err := d.maps.services.Lookup(svcKey(k), &innerID)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Service{}, false, nil
		}
		if err != nil {
			return Service{}, false, fmt.Errorf("look up VIP %s: %w", k, err)
		}
		s, _, err := readService(k, innerID)
		if errors.Is(err, unix.ENOENT) && attempt < 3 {
			continue // swapped out between the two lookups: read the new one
		}
		return s, err == nil, err
	}
}

// Services lists every VIP with its set, sorted by VIP and protocol.
func (d *Datapath) Services() ([]Service, error) {
	keys, err := d.serviceKeys()
	if err != nil {
		return nil, err
	}
	var out []Service
	for _, k := range keys {
		s, ok, err := d.ServiceOf(k)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key().Compare(out[j].Key()) < 0 })
	return out, nil
}

func (d *Datapath) serviceKeys() ([]ServiceKey, error) {
	var (
		key     ctlbSvcKeyV2
		innerID uint32
		keys    []ServiceKey
	)
	it := d.maps.services.Iterate()
	for it.Next(&key, &innerID) {
		keys = append(keys, keyOf(key))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	return keys, nil
}

// readService reads an inner array: the service and its servers' slots.
func readService(k ServiceKey, innerID uint32) (Service, []uint32, error) {
	inner, err := ebpf.NewMapFromID(ebpf.MapID(innerID))
	if err != nil {
		return Service{}, nil, fmt.Errorf("VIP %s: open backend array %d: %w", k, innerID, err)
	}
	defer inner.Close()
	var hdr svcHdr
	if err := inner.Lookup(uint32(0), &hdr); err != nil {
		return Service{}, nil, fmt.Errorf("VIP %s: read header: %w", k, err)
	}
	s := Service{VIP: k.VIP, Protocol: k.Protocol, Empty: EmptyPassthrough, Balance: balanceOf(hdr.Balance), Servers: []netip.AddrPort{}}
	if hdr.Flags&flagRejectEmpty != 0 {
		s.Empty = EmptyReject
	}
	s.OnServerRemoved = RemovalTerminate
	if hdr.Flags&flagKeepOnRemoval != 0 {
		s.OnServerRemoved = RemovalKeep
	}
	var slots []uint32
	for i := uint32(1); i <= hdr.Count && i <= MaxServers; i++ {
		var slot backendSlot
		if err := inner.Lookup(i, &slot); err != nil {
			return Service{}, nil, fmt.Errorf("VIP %s: read server %d: %w", k, i, err)
		}
		s.Servers = append(s.Servers, addrPort16(slot.Addr, slot.Port))
		slots = append(slots, slot.Slot)
	}
	return s, slots, nil
}

// ParseVIP parses and validates "IP:PORT" or "[IPv6]:PORT" for a VIP.
func ParseVIP(s string) (netip.AddrPort, error) {
	ap, err := parseAddrPort("VIP", s)
	if err != nil {
		return ap, err
	}
	return ap, ValidateVIP(ap)
}

// ParseServer parses and validates "IP:PORT" or "[IPv6]:PORT" for a server.
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
		return netip.AddrPort{}, fmt.Errorf("%s %q: want IPv4:PORT or [IPv6]:PORT with a port from 1 to 65535 (%v)", what, s, err)
	}
	if ap.Addr().Is4In6() {
		return netip.AddrPort{}, fmt.Errorf("%s %q: a v4-mapped address; give the IPv4 address %s", what, s, ap.Addr().Unmap())
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%s %q: an address with a zone cannot be balanced", what, s)
	}
	return ap, nil
}
