package proxy

import (
	"context"
	"runtime"
	"testing"
)

// Each proxy adds one P per event loop while it runs (procs.go) and gives
// them back at Shutdown; a second proxy sizes its loops by GOMAXPROCS
// without the first one's Ps, and the proxies still serve.
func TestLoopsAddOnePEachAndGiveThemBack(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	loops := min(before, MaxLoops)

	a := newEnv(t, ModeListeners, nil)
	if got := len(a.p.loops); got != loops {
		t.Fatalf("first proxy: %d loops, want %d (GOMAXPROCS %d)", got, loops, before)
	}
	if got := runtime.GOMAXPROCS(0); got != before+loops {
		t.Fatalf("with one proxy: GOMAXPROCS %d, want %d + %d loops", got, before, loops)
	}
	b := newEnv(t, ModeSteering, nil)
	if got := len(b.p.loops); got != loops {
		t.Fatalf("second proxy: %d loops, want %d: it counted the first one's Ps", got, loops)
	}
	if got := runtime.GOMAXPROCS(0); got != before+2*loops {
		t.Fatalf("with two proxies: GOMAXPROCS %d, want %d + 2x%d loops", got, before, loops)
	}
	for _, e := range []*env{a, b} {
		e.startServers(t, 7000)
		if _, err := nameVia(e.node, vipPort(portA)); err != nil {
			t.Fatalf("through the proxy: %v", err)
		}
	}
	if err := a.p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := runtime.GOMAXPROCS(0); got != before+loops {
		t.Fatalf("after the first Shutdown: GOMAXPROCS %d, want %d", got, before+loops)
	}
	if err := b.p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := runtime.GOMAXPROCS(0); got != before {
		t.Fatalf("after both Shutdowns: GOMAXPROCS %d, want %d as before", got, before)
	}
}

// loops in the config sets the number of loops, and of Ps added.
func TestConfiguredLoops(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, func(c *Config) { c.Loops = 3 })
			if got := len(e.p.loops); got != 3 {
				t.Fatalf("%d loops, want the configured 3", got)
			}
			if got := runtime.GOMAXPROCS(0); got != before+3 {
				t.Fatalf("GOMAXPROCS %d, want %d + 3", got, before)
			}
			e.startServers(t, 7000)
			for range 6 { // reuseport spreads them over the loops
				if _, err := nameVia(e.node, vipPort(portA)); err != nil {
					t.Fatalf("through the proxy: %v", err)
				}
			}
			if err := e.p.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := runtime.GOMAXPROCS(0); got != before {
				t.Fatalf("after Shutdown: GOMAXPROCS %d, want %d", got, before)
			}
		})
	}
}
