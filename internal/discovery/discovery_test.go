package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"
)

func aps(t testing.TB, ss ...string) []netip.AddrPort {
	t.Helper()
	var out []netip.AddrPort
	for _, s := range ss {
		out = append(out, netip.MustParseAddrPort(s))
	}
	return Normalize(out)
}

// collector runs a source and keeps what it emits.
type collector struct {
	mu      sync.Mutex
	results []Result
	notify  chan struct{}
}

func run(t *testing.T, s Source) *collector {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := &collector{notify: make(chan struct{}, 1)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx, func(r Result) {
			c.mu.Lock()
			c.results = append(c.results, r)
			c.mu.Unlock()
			select {
			case c.notify <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("source %s did not stop within 10 s of cancel", s.Name())
		}
	})
	return c
}

// waitFor waits until a result emitted at or after index from satisfies
// ok, and returns it and the index after it.
func (c *collector) waitFor(t *testing.T, from int, timeout time.Duration, what string, ok func(Result) bool) (Result, int) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		for i := from; i < len(c.results); i++ {
			if ok(c.results[i]) {
				r := c.results[i]
				c.mu.Unlock()
				return r, i + 1
			}
		}
		from = len(c.results)
		last := Result{}
		if n := len(c.results); n > 0 {
			last = c.results[n-1]
		}
		c.mu.Unlock()
		select {
		case <-c.notify:
		case <-deadline:
			t.Fatalf("no result with %s within %s; last: %v %v", what, timeout, last.Servers, last.Err)
		}
	}
}

func (c *collector) waitServers(t *testing.T, from int, timeout time.Duration, want []netip.AddrPort) int {
	t.Helper()
	_, next := c.waitFor(t, from, timeout, "servers "+Format(want), func(r Result) bool {
		return r.Err == nil && slices.Equal(Normalize(r.Servers), want)
	})
	return next
}

func (c *collector) waitErr(t *testing.T, from int, timeout time.Duration) (next int, err error) {
	t.Helper()
	r, next := c.waitFor(t, from, timeout, "an error", func(r Result) bool { return r.Err != nil })
	return next, r.Err
}

func TestParseServer(t *testing.T) {
	good := map[string]string{
		"198.18.0.1":       "198.18.0.1:8502",
		"198.18.0.1:9000":  "198.18.0.1:9000",
		" 127.0.0.1:53 \n": "127.0.0.1:53",
	}
	for in, want := range good {
		got, err := ParseServer(in, DefaultPort)
		if err != nil || got.String() != want {
			t.Errorf("ParseServer(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "host.example", "198.18.0.1:0", "198.18.0.1:99999", "[::1]:80", "::1", "198.18.0.256"} {
		if got, err := ParseServer(in, DefaultPort); err == nil {
			t.Errorf("ParseServer(%q) = %v, want an error", in, got)
		}
	}
}

func TestParseList(t *testing.T) {
	got, rej, err := ParseList("198.18.0.2:9000 198.18.0.1\n\t198.18.0.3\n198.18.0.1\n[2001:2::1]:80 ::ffff:198.18.0.4\n", 8502)
	if err != nil || len(rej) != 0 {
		t.Fatal(err, rej)
	}
	// The parser keeps duplicates and IPv6: the map's rules are the
	// tracker's, which reports them with reasons.
	var want []netip.AddrPort
	for _, s := range []string{"198.18.0.2:9000", "198.18.0.1:8502", "198.18.0.3:8502", "198.18.0.1:8502", "[2001:2::1]:80", "198.18.0.4:8502"} {
		want = append(want, netip.MustParseAddrPort(s))
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// One bad entry is rejected with its reason; the others stand.
	got, rej, err = ParseList("198.18.0.1 nonsense 198.18.0.1:0", 8502)
	if err != nil || !slices.Equal(got, aps(t, "198.18.0.1:8502")) || len(rej) != 2 || rej[0].Entry != "nonsense" {
		t.Fatalf("bad entries: got %v, rejected %v, err %v", got, rej, err)
	}
	t.Logf("rejected: %v", rej)
	if _, _, err := ParseList(" \n", 8502); !errors.Is(err, ErrEmpty) {
		t.Fatalf("empty output: err %v, want ErrEmpty", err)
	}
	if _, rej, err := ParseList("x y", 8502); !errors.Is(err, ErrEmpty) || len(rej) != 2 {
		t.Fatalf("only bad entries: err %v rejected %v, want ErrEmpty and both", err, rej)
	}
}

func TestStatic(t *testing.T) {
	want := aps(t, "198.18.0.1:8502", "198.18.0.2:8502")
	c := run(t, Static{Servers: []netip.AddrPort{want[1], want[0], want[1]}})
	c.waitServers(t, 0, 5*time.Second, want)

	e := run(t, Static{})
	if _, err := e.waitErr(t, 0, 5*time.Second); !errors.Is(err, ErrEmpty) {
		t.Fatalf("empty static list: %v, want ErrEmpty", err)
	}
}

// TestSameError: errors that differ only in the local end of a socket are
// the same failure; any other difference is not.
func TestSameError(t *testing.T) {
	e := func(s string) error { return errors.New(s) }
	same := [][2]string{
		{"read udp 127.0.0.1:44176->127.0.0.78:5353: i/o timeout", "read udp 127.0.0.1:50001->127.0.0.78:5353: i/o timeout"},
		{"read udp [::1]:44176->[::1]:53: connection refused", "read udp [::1]:1234->[::1]:53: connection refused"},
		{"read udp [fe80::1%eth0]:44176->[fe80::2%eth0]:53: x", "read udp [fe80::1%eth0]:9->[fe80::2%eth0]:53: x"},
	}
	for _, p := range same {
		if !SameError(e(p[0]), e(p[1])) {
			t.Errorf("SameError(%q, %q) = false", p[0], p[1])
		}
	}
	differ := [][2]string{
		{"read udp 127.0.0.1:44176->127.0.0.78:5353: i/o timeout", "read udp 127.0.0.1:44176->127.0.0.79:5353: i/o timeout"},
		{"query a at 127.0.0.1:53: rcode SERVFAIL", "query a at 127.0.0.1:53: rcode REFUSED"},
	}
	for _, p := range differ {
		if SameError(e(p[0]), e(p[1])) {
			t.Errorf("SameError(%q, %q) = true", p[0], p[1])
		}
	}
	if !SameError(nil, nil) || SameError(nil, e("x")) {
		t.Error("SameError with nil")
	}
}

// Empty: an empty answer, also wrapped; joined errors only when every one
// is empty (a search name's NXDOMAIN beside the real name's SERVFAIL is a
// failure: errors.Is alone would call it empty, and readiness would pass).
func TestEmpty(t *testing.T) {
	servfail := errors.New("query consul.service.consul. at 127.0.0.53:53: SERVFAIL")
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{ErrEmpty, true},
		{fmt.Errorf("dns x: %w", ErrEmpty), true},
		{errNoName, true},
		{fmt.Errorf("dns x: %w", errors.Join(errNoName, fmt.Errorf("no A records: %w", ErrEmpty))), true},
		{fmt.Errorf("dns x: %w", errors.Join(errNoName, servfail)), false},
		{servfail, false},
	} {
		if got := Empty(c.err); got != c.want {
			t.Errorf("Empty(%v) = %v, want %v (errors.Is says %v)", c.err, got, c.want, errors.Is(c.err, ErrEmpty))
		}
	}
}
