// Package discovery finds the real servers behind one VIP. Each Source
// produces, again and again, the full list of servers it knows (never a
// delta); the caller takes the union of its sources. A source that fails
// reports the error and the caller keeps that source's last good list: a
// broken DNS server or Consul agent must never empty a VIP.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// DefaultPort is the server port used when a source or an entry names none:
// the Consul servers' gRPC/xDS port, ctlb's main use.
const DefaultPort = 8502

// Result is one answer of a source: the complete server list, or an error.
// When Err is set, Servers is meaningless and the caller keeps the source's
// previous list.
type Result struct {
	Servers []netip.AddrPort
	Err     error
	// Rejected lists the entries of the answer that the source could not
	// use (an entry that does not parse, a catalog address that is another
	// host's loopback), each with the reason; the rest of the answer
	// stands. The caller applies the service map's own rules to Servers on
	// top of this.
	Rejected []Rejected
}

// Rejected is one entry of a source's answer that was left out, and why.
type Rejected struct {
	Entry  string `json:"entry"`
	Reason string `json:"reason"`
}

// MaxErrorText bounds the text of an error a source reports: an error body
// from a server (an HTML page from a proxy, a stack trace) must not flood
// logs and status.
const MaxErrorText = 512

// Truncate shortens s to at most n bytes (on a rune boundary), marking the
// cut.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + fmt.Sprintf("... (%d bytes cut)", len(s)-cut)
}

// localAddr matches the local end of a socket in a network error's text,
// "read udp 127.0.0.1:44176->127.0.0.78:5353": an ephemeral port, new at
// every retry.
var localAddr = regexp.MustCompile(`(\d{1,3}(\.\d{1,3}){3}|\[[^]]+\]):\d+->`)

// SameError tells whether two errors of a source say the same thing, up to
// the local ports of the sockets they name: a source that fails the same
// way at every retry is logged once, not at every retry.
func SameError(a, b error) bool {
	if a == nil || b == nil {
		return a == b
	}
	return localAddr.ReplaceAllString(a.Error(), "") == localAddr.ReplaceAllString(b.Error(), "")
}

// truncated is an error whose text is cut to n bytes (Truncate) and whose
// chain stays whole, for errors.Is and Unreachable.
type truncated struct {
	err error
	n   int
}

func (e truncated) Error() string { return Truncate(e.err.Error(), e.n) }
func (e truncated) Unwrap() error { return e.err }

// Source produces the server list of one VIP from one place.
type Source interface {
	// Name says what kind of source this is ("static", "dns", "consul",
	// "exec"), for logs and status.
	Name() string
	// Run emits a Result whenever it has looked (a list that did not change
	// may be emitted again) until ctx is done. emit is never called
	// concurrently by one source and never after Run returns.
	Run(ctx context.Context, emit func(Result))
}

// ErrEmpty is reported when a source answers with no servers at all. It is
// treated as a failure, so a misconfigured name or a catalog in trouble
// cannot wipe the set; removing every server is a config change.
var ErrEmpty = errors.New("no servers in the answer")

// emptyError is an empty answer told in the source's own words
// (errors.Is ErrEmpty).
type emptyError string

func (e emptyError) Error() string      { return string(e) }
func (emptyError) Is(target error) bool { return target == ErrEmpty }

// Empty tells whether a source's error is an empty answer (errors.Is
// ErrEmpty). Errors joined with errors.Join (one per DNS name and server
// tried) are empty only when every one of them is: a search name's NXDOMAIN
// beside the real name's SERVFAIL is a failure, not an empty answer, as
// errors.Is would have it.
func Empty(err error) bool {
	return everyJoined(err, func(e error) bool {
		x, ok := e.(interface{ Is(error) bool })
		return e == ErrEmpty || ok && x.Is(ErrEmpty)
	})
}

// everyJoined walks err's chain until is holds for a link; errors joined
// with errors.Join (or fmt.Errorf with several %w) count only when it holds
// for every one of them.
func everyJoined(err error, is func(error) bool) bool {
	for err != nil {
		if multi, ok := err.(interface{ Unwrap() []error }); ok {
			errs := multi.Unwrap()
			for _, e := range errs {
				if !everyJoined(e, is) {
					return false
				}
			}
			return len(errs) > 0
		}
		if is(err) {
			return true
		}
		err = errors.Unwrap(err)
	}
	return false
}

// Unreachable tells an error of a source that never reached its server (a
// refused or reset connection, a timeout: the errors of the network) from
// one the server answered with (an HTTP error status, a DNS error code) or
// one of ctlbd's own (a token file it cannot read). Readiness tells "no
// answer yet" from "failing" by it. Errors joined with errors.Join (one per
// DNS server asked) are unreachable only when every one of them is.
func Unreachable(err error) bool {
	return everyJoined(err, func(e error) bool {
		if _, ok := e.(*net.OpError); ok || e == context.DeadlineExceeded || e == os.ErrDeadlineExceeded {
			return true
		}
		ne, ok := e.(net.Error)
		return ok && ne.Timeout() // an HTTP client's own timeout
	})
}

// ParseServer reads "a.b.c.d" or "a.b.c.d:port"; a bare address gets
// defPort. Only IPv4 is accepted: the servers it reads are candidates of
// a tracked VIP, and tracking (sources, health checks) serves IPv4 VIPs
// only; an IPv6 VIP takes static servers without health checks, which
// never come here.
func ParseServer(s string, defPort uint16) (netip.AddrPort, error) {
	s = strings.TrimSpace(s)
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if !ap.Addr().Is4() {
			return netip.AddrPort{}, fmt.Errorf("server %q: not an IPv4 address", s)
		}
		if ap.Port() == 0 {
			return netip.AddrPort{}, fmt.Errorf("server %q: port 0", s)
		}
		return ap, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("server %q: want IPv4 address or address:port", s)
	}
	if !a.Is4() {
		return netip.AddrPort{}, fmt.Errorf("server %q: not an IPv4 address", s)
	}
	if defPort == 0 {
		return netip.AddrPort{}, fmt.Errorf("server %q: no port", s)
	}
	return netip.AddrPortFrom(a, defPort), nil
}

// Normalize sorts a server list and removes duplicates, so lists compare
// with slices.Equal.
func Normalize(s []netip.AddrPort) []netip.AddrPort {
	out := slices.Clone(s)
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return slices.Compact(out)
}

// Format joins a server list for logs: "a:p,b:p".
func Format(s []netip.AddrPort) string {
	parts := make([]string, len(s))
	for i, ap := range s {
		parts[i] = ap.String()
	}
	return strings.Join(parts, ",")
}

func portOr(p uint16) uint16 {
	if p == 0 {
		return DefaultPort
	}
	return p
}

// sleep waits d or until ctx is done; it reports whether to go on.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// backoff doubles a retry delay from min up to max.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }
