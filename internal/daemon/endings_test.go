package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// On a kernel that cannot end sockets (no bpf_sock_destroy, no netlink
// SOCK_DESTROY), the endings worker still serves the fallback proxy, whose
// part is set only after the worker started (Run starts it before the
// proxy): it ran no pass at all, and its queue only grew.
func TestEndingsServeProxyWithoutKernelTermination(t *testing.T) {
	e := &endings{log: slog.New(slog.NewTextHandler(io.Discard, nil)), stillGone: func(datapath.Departed) bool { return true },
		queue: map[datapath.Departed]*queued{}, counts: map[datapath.ServiceKey]map[netip.AddrPort]uint64{}, kick: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.run(ctx)
	time.Sleep(20 * time.Millisecond) // Run applies the config here
	var calls atomic.Int32
	e.setProxy(func(datapath.Departed, uint64) uint64 {
		calls.Add(1)
		return 1
	})
	dep := datapath.Departed{VIP: netip.MustParseAddrPort("198.19.0.1:8502"), Protocol: datapath.TCP, Server: netip.MustParseAddrPort("198.18.0.11:8502")}
	e.add(dep)
	testutil.Eventually(t, "the proxy's endings pass and follow-up", 5*time.Second, func() (bool, string) {
		e.mu.Lock()
		defer e.mu.Unlock()
		return calls.Load() >= 2 && len(e.queue) == 0, fmt.Sprintf("%d passes of the proxy's endings, %d departures queued", calls.Load(), len(e.queue))
	})
	if got := e.terminated(dep.Key())[dep.Server]; got < 1 {
		t.Errorf("ended connections counted for the departed server: %d, want the proxy's", got)
	}
}
