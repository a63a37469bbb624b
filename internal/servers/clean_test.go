package servers

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// TestCleanCandidates: an exec source prints 0.0.0.0:18080, an IPv6
// server, a duplicate, a non-address and 1,100 more candidates. The bad
// entries are left out with their reasons (in the status), the candidates
// over the per-VIP limit are trimmed (the lowest addresses stay), every
// published set is one the map accepts, and the healthy set still follows
// health changes: a server that dies leaves, and comes back.
func TestCleanCandidates(t *testing.T) {
	t.Parallel()
	live, liveAddrs := servers(t, 31, 3) // 127.0.31.1-3, one port
	port := liveAddrs[0].Port()
	// 1,100 candidates: the 3 live servers and 1,097 that refuse
	// (127.0.32.x-127.0.36.x on the same port: nothing listens there, and
	// our 127.0.31.1 listener keeps anyone from a wildcard bind of it).
	var lines []string
	for _, a := range liveAddrs {
		lines = append(lines, a.String())
	}
	for i := 0; len(lines) < 1100; i++ {
		a := netip.AddrFrom4([4]byte{127, 0, byte(32 + i/250), byte(1 + i%250)})
		lines = append(lines, netip.AddrPortFrom(a, port).String())
	}
	bad := []string{"0.0.0.0:18080", "[2001:2::5]:8502", liveAddrs[0].String(), "not-an-address", "224.0.0.1:80"}
	list := filepath.Join(t.TempDir(), "list")
	if err := os.WriteFile(list, []byte(strings.Join(append(bad, lines...), "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fast := health.Params{Interval: 200 * time.Millisecond, Timeout: 150 * time.Millisecond}
	tr, rec := startTracker(t, "vip", Options{
		Sources: []discovery.Source{discovery.Exec{Command: []string{"/bin/cat", list}, Interval: 300 * time.Millisecond}},
		Health:  fast,
	})
	c, next := rec.wait(t, 0, liveAddrs, 10*time.Second)
	t.Logf("first set: %s", c.reason)

	snap := tr.Snapshot()
	if snap.Trimmed != 1100-datapath.MaxServers {
		t.Errorf("trimmed %d, want %d", snap.Trimmed, 1100-datapath.MaxServers)
	}
	if len(snap.Servers) != datapath.MaxServers {
		t.Errorf("%d servers checked, want %d", len(snap.Servers), datapath.MaxServers)
	}
	src := snap.Sources[0]
	if src.Rejected != len(bad) {
		t.Errorf("source status rejected %d, want %d: %+v", src.Rejected, len(bad), src.RejectedFirst)
	}
	reasons := map[string]string{}
	for _, r := range src.RejectedFirst {
		reasons[r.Entry] = r.Reason
	}
	t.Logf("rejected: %v", reasons)
	for entry, want := range map[string]string{
		"0.0.0.0:18080":       "not a unicast address",
		"[2001:2::5]:8502":    "wrong family",
		liveAddrs[0].String(): "listed twice",
		"not-an-address":      "not an address",
		"224.0.0.1:80":        "not a unicast address",
	} {
		if !strings.Contains(reasons[entry], want) {
			t.Errorf("entry %s: reason %q, want %q", entry, reasons[entry], want)
		}
	}

	// The set follows health: one server dies, leaves; comes back, returns.
	live[1].stop()
	_, next = rec.wait(t, next, without(liveAddrs, liveAddrs[1]), 5*time.Second)
	live[1].start()
	_, next = rec.wait(t, next, liveAddrs, 10*time.Second)

	// Every set published is one the map takes.
	for i, ch := range rec.all() {
		if err := (datapath.Service{VIP: netip.MustParseAddrPort("198.18.0.1:8502"), Servers: ch.set}).Validate(); err != nil {
			t.Errorf("published set %d would fail the write: %v", i, err)
		}
	}
	if !slices.Equal(tr.Healthy(), liveAddrs) {
		t.Fatalf("healthy %v", tr.Healthy())
	}
	rec.checkOncePerChange(t)
	_ = fmt.Sprint(next)
}
