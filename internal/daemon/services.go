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
}

func (t *serviceTable) put(svcs ...datapath.Service) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sets == nil {
		t.sets = map[netip.AddrPort][]netip.AddrPort{}
	}
	for _, s := range svcs {
		if s.Key().Protocol == datapath.TCP { // the proxy serves TCP
			t.sets[s.VIP] = append([]netip.AddrPort(nil), s.Servers...)
		}
	}
}

func (t *serviceTable) remove(key datapath.ServiceKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if key.Protocol == datapath.TCP {
		delete(t.sets, key.VIP)
	}
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
	if err := d.dp.SetServices(svcs); err != nil {
		return err
	}
	d.table.put(svcs...)
	return nil
}

// setServices is writeSets with one log line per VIP. Callers hold d.mu.
func (d *Daemon) setServices(reason string, svcs ...datapath.Service) error {
	if err := d.writeSets(svcs...); err != nil {
		return err
	}
	for _, s := range svcs {
		d.log.Info("service set", "vip", s.VIP, "protocol", s.Key().Protocol, "servers", s.Servers, "empty", s.Empty, "balance", s.Balance, "reason", reason)
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
