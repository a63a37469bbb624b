package daemon

import (
	"net/netip"
	"testing"

	"github.com/ctlb/ctlb/internal/servers"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// TestSourcesReady: the "sources" readiness check passes sources that
// answered (an empty answer included), names those never reached apart
// from those that answered only with errors, and shows the error.
func TestSourcesReady(t *testing.T) {
	key := func(s string) datapath.ServiceKey {
		return datapath.ServiceKey{Protocol: datapath.TCP, VIP: netip.MustParseAddrPort(s)}
	}
	snaps := map[datapath.ServiceKey]servers.Snapshot{
		key("198.18.255.4:80"): {Sources: []servers.SourceStatus{{Name: "consul", Answered: true, Reached: true, LastError: "consul ...: no passing instance"}}},
		key("198.18.255.5:80"): {Sources: []servers.SourceStatus{{Name: "consul", Reached: true, LastError: "Unexpected response code: 403 (ACL not found)"}}},
		key("198.18.255.6:80"): {Sources: []servers.SourceStatus{{Name: "dns", LastError: "read: connection refused"}}},
		key("198.18.255.7:80"): {Sources: []servers.SourceStatus{{Name: "static", Answered: true, Reached: true}}},
	}
	got := sourcesReady(snaps)
	want := "no answer yet from: 198.18.255.6:80 dns; failing: 198.18.255.5:80 consul: Unexpected response code: 403 (ACL not found)"
	if got != want {
		t.Errorf("sources check:\n got %q\nwant %q", got, want)
	}
	delete(snaps, key("198.18.255.5:80"))
	delete(snaps, key("198.18.255.6:80"))
	if got := sourcesReady(snaps); got != "ok" {
		t.Errorf("every source answered (one of them empty): %q, want ok", got)
	}
}
