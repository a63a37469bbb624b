package discovery

import (
	"context"
	"net/netip"
)

// Static is a fixed server list (from the config or `ctlbd service set`).
type Static struct {
	Servers []netip.AddrPort
}

// Name implements Source.
func (Static) Name() string { return "static" }

// Run emits the list once and waits for ctx.
func (s Static) Run(ctx context.Context, emit func(Result)) {
	if len(s.Servers) == 0 {
		emit(Result{Err: ErrEmpty})
	} else {
		emit(Result{Servers: Normalize(s.Servers)})
	}
	<-ctx.Done()
}
