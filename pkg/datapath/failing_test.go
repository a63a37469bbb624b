package datapath_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// Fail marks set, listed, extended and cleared through the datapath, with
// few slots (one lookup each) and many (one batch read).
func TestFailMarks(t *testing.T) {
	for _, n := range []int{3, 300} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			dp := newDatapath(t)
			v := netip.MustParseAddrPort(vip)
			var srvs []netip.AddrPort
			for i := range n {
				srvs = append(srvs, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(1 + i/250), byte(1 + i%250)}), 9001))
			}
			if err := dp.SetService(datapath.Service{VIP: v, Servers: srvs}); err != nil {
				t.Fatal(err)
			}
			marks, err := dp.FailMarks()
			if err != nil || len(marks) != 0 {
				t.Fatalf("fresh set: marks %+v, %v; want none", marks, err)
			}
			victim := srvs[n/2]
			slot, ok, err := dp.SlotOf(datapath.ServiceKey{Protocol: datapath.TCP, VIP: v}, victim)
			if err != nil || !ok {
				t.Fatalf("slot of %s: %v, %v", victim, ok, err)
			}
			// Long enough to outlast a loaded machine's slowest Stats read.
			until := datapath.Monotonic() + time.Minute
			if err := dp.HoldFailMark(slot, until, 2); err != nil {
				t.Fatal(err)
			}
			marks, err = dp.FailMarks()
			if err != nil || len(marks) != 1 || marks[0].Server != victim || marks[0].VIP != v || marks[0].Until != until || marks[0].Strikes != 2 {
				t.Fatalf("marks = %+v, %v; want %s held until %v with 2 strikes", marks, err, victim, until)
			}
			st, err := dp.Stats()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range st {
				if (s.FailingFor > 0) != (s.Server == victim) {
					t.Errorf("stats of %s: failing for %v", s.Server, s.FailingFor)
				}
			}
			if err := dp.ClearFailMark(slot); err != nil {
				t.Fatal(err)
			}
			if marks, err = dp.FailMarks(); err != nil || len(marks) != 0 {
				t.Fatalf("after clear: %+v, %v", marks, err)
			}
		})
	}
}
