package daemon

import (
	"net/netip"
	"sync"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// serviceTable mirrors, in memory, the server sets ctlbd last wrote to the
// maps, so that the fallback proxy picks targets from exactly the set the
// connect4 path uses without a map lookup per connection.
type serviceTable struct {
	mu   sync.RWMutex
	sets map[netip.AddrPort][]netip.AddrPort
	// byKey holds every VIP's set, TCP and UDP: what departures and
	// arrivals are computed against.
	byKey map[datapath.ServiceKey][]netip.AddrPort
}

func (t *serviceTable) put(svcs ...datapath.Service) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sets == nil {
		t.sets = map[netip.AddrPort][]netip.AddrPort{}
	}
	if t.byKey == nil {
		t.byKey = map[datapath.ServiceKey][]netip.AddrPort{}
	}
	for _, s := range svcs {
		t.byKey[s.Key()] = append([]netip.AddrPort(nil), s.Servers...)
		if s.Key().Protocol == datapath.TCP { // the proxy serves TCP
			t.sets[s.VIP] = append([]netip.AddrPort(nil), s.Servers...)
		}
	}
}

func (t *serviceTable) remove(key datapath.ServiceKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.byKey, key)
	if key.Protocol == datapath.TCP {
		delete(t.sets, key.VIP)
	}
}

// has tells whether the maps hold the VIP, its set empty or not.
func (t *serviceTable) has(key datapath.ServiceKey) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	_, ok := t.byKey[key]
	return ok
}

// count is how many VIPs the maps hold, of either protocol.
func (t *serviceTable) count() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.byKey)
}

// setOf is the set last written for a VIP of either protocol.
func (t *serviceTable) setOf(key datapath.ServiceKey) []netip.AddrPort {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byKey[key]
}

// targets is the proxy's view: the servers of the VIP:port a client dialed.
func (t *serviceTable) targets(vip netip.AddrPort) []netip.AddrPort {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.sets[vip]
}

// writeSets writes sets to the maps (each swap atomic) and mirrors them.
// Callers hold d.mu.
func (d *Daemon) writeSets(svcs ...datapath.Service) error {
	return d.writeSetsEnding(true, svcs...)
}

// writeSetsEnding is writeSets; end says whether the connections of servers
// that leave the sets are ended (per their VIP's policy).
func (d *Daemon) writeSetsEnding(end bool, svcs ...datapath.Service) error {
	var departed []datapath.Departed
	if end {
		departed = d.departures(svcs)
	}
	if err := d.dp.SetServices(svcs); err != nil {
		return err
	}
	d.reb.arrivals(svcs, d.table.setOf)
	d.table.put(svcs...)
	// Only now: the clients' reconnects must find the new set.
	d.ends.add(departed...)
	return nil
}

// setServices is writeSets with one log line per VIP. Callers hold d.mu.
func (d *Daemon) setServices(reason string, svcs ...datapath.Service) error {
	if err := d.writeSets(svcs...); err != nil {
		return err
	}
	for _, s := range svcs {
		d.log.Info("service set", "vip", s.VIP, "protocol", s.Key().Protocol, "servers", s.Servers, "empty", s.Empty, "balance", s.Balance, "onServerRemoved", s.OnServerRemoved, "reason", reason)
	}
	return nil
}

// deleteService removes a VIP from the maps and the mirror. Callers hold d.mu.
func (d *Daemon) deleteService(reason string, key datapath.ServiceKey) (bool, error) {
	existed, err := d.dp.DeleteServiceKey(key)
	if err != nil {
		return existed, err
	}
	d.table.remove(key)
	if existed {
		d.log.Info("service deleted", "vip", key.VIP, "protocol", key.Protocol, "reason", reason)
	}
	return existed, nil
}

// loadTable fills the mirror from the maps: a restarted daemon adopts them.
func (d *Daemon) loadTable() error {
	svcs, err := d.dp.Services()
	if err != nil {
		return err
	}
	d.table.put(svcs...)
	return nil
}

// attachmentCount is how many attachments are pinned, for the start line
// (-1 when they cannot be listed).
func (d *Daemon) attachmentCount() int {
	atts, err := d.dp.Attachments()
	if err != nil {
		return -1
	}
	return len(atts)
}

// warnUnserved names each VIP:port the proxy serves that no TCP service
// backs: the proxy resets every client of it (no_target), and only a line
// per rejected client said so, which reads like a failing server.
func (d *Daemon) warnUnserved() {
	if d.proxy == nil {
		return
	}
	for _, dest := range d.proxy.Services() {
		if !d.table.has(datapath.ServiceKey{Protocol: datapath.TCP, VIP: dest}) {
			d.log.Warn("the proxy serves a VIP:port that no TCP service defines: its clients are reset (no_target) until one is set",
				"vip", dest)
		}
	}
}
