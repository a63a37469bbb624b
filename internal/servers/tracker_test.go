package servers

import (
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/internal/testutil"
)

// TestHealthKillAndRise: three real servers at the default settings; one
// dies and leaves the set at its next check; it comes back and rejoins
// after Rise passing checks. Every change is reported exactly once.
func TestHealthKillAndRise(t *testing.T) {
	ss, addrs := servers(t, 21, 3)
	tr, rec := startTracker(t, "vip", Options{Sources: []discovery.Source{discovery.Static{Servers: addrs}}})
	_, next := rec.wait(t, 0, addrs, 5*time.Second)

	ss[1].stop()
	died := time.Now()
	c, next := rec.wait(t, next, without(addrs, addrs[1]), 5*time.Second)
	t.Logf("death -> removal %s: %s", c.at.Sub(died).Round(time.Millisecond), c.reason)
	if !strings.Contains(c.reason, addrs[1].String()) || !strings.Contains(c.reason, "unhealthy") {
		t.Errorf("reason %q does not name the dead server", c.reason)
	}

	ss[1].start()
	back := time.Now()
	c, _ = rec.wait(t, next, addrs, 10*time.Second)
	t.Logf("restart -> back %s: %s", c.at.Sub(back).Round(time.Millisecond), c.reason)
	if !strings.Contains(c.reason, "healthy after 2 passing") {
		t.Errorf("reason %q: want rise 2", c.reason)
	}
	if n := rec.len(); n != 3 {
		t.Errorf("%d OnChange calls, want 3: %s", n, rec)
	}
	rec.checkOncePerChange(t)

	snap := tr.Snapshot()
	if snap.Changes != 3 || !slices.Equal(snap.Published, addrs) || len(snap.Servers) != 3 || snap.Panic {
		t.Errorf("snapshot %+v", snap)
	}
	for _, s := range snap.Servers {
		if s.Health != health.Healthy || !s.Published || !slices.Equal(s.Sources, []string{"static"}) {
			t.Errorf("server status %+v", s)
		}
	}
}

// TestPanic: with panic on, a VIP whose servers are all down keeps all of
// them; with panic off it is emptied. Either way one server coming back is
// the whole set at once.
func TestPanic(t *testing.T) {
	fast := health.Params{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 2, Fall: 1}
	for _, panicOn := range []bool{true, false} {
		name := "off"
		x := byte(22)
		if panicOn {
			name, x = "on", 23
		}
		t.Run(name, func(t *testing.T) {
			ss, addrs := servers(t, x, 3)
			tr, rec := startTracker(t, "vip", Options{
				Sources: []discovery.Source{discovery.Static{Servers: addrs}}, Health: fast, Panic: panicOn,
			})
			_, next := rec.wait(t, 0, addrs, 5*time.Second)
			ss[0].stop()
			_, next = rec.wait(t, next, addrs[1:], 5*time.Second)
			ss[1].stop()
			ss[2].stop()
			want := []netip.AddrPort{}
			if panicOn {
				want = addrs
			}
			c, next := rec.wait(t, next, want, 5*time.Second)
			t.Logf("all down: [%s] %s", discovery.Format(c.set), c.reason)
			if panicOn != strings.HasPrefix(c.reason, "panic:") {
				t.Errorf("reason %q", c.reason)
			}
			if snap := tr.Snapshot(); snap.Panic != panicOn {
				t.Errorf("snapshot panic %v, want %v", snap.Panic, panicOn)
			}
			// Nothing else is published while all stay down.
			time.Sleep(500 * time.Millisecond)
			if n := rec.len(); n != next {
				t.Errorf("changes while all down: %s", rec)
			}
			ss[2].start()
			c, _ = rec.wait(t, next, addrs[2:], 5*time.Second)
			t.Logf("one back: [%s] %s", discovery.Format(c.set), c.reason)
			if panicOn && !strings.HasPrefix(c.reason, "panic over") {
				t.Errorf("reason %q", c.reason)
			}
			rec.checkOncePerChange(t)
		})
	}
}

// TestStartupPublishesCheckedSet: a starting tracker with dead and live
// candidates publishes the live ones in one change (never all candidates,
// even in panic mode, and never an empty set first).
func TestStartupPublishesCheckedSet(t *testing.T) {
	ss, addrs := servers(t, 24, 3)
	ss[0].stop()
	_, rec := startTracker(t, "vip", Options{Sources: []discovery.Source{discovery.Static{Servers: addrs}}, Panic: true})
	c, _ := rec.wait(t, 0, addrs[1:], 5*time.Second)
	if n := rec.len(); n != 1 {
		t.Fatalf("%d changes at start, want 1: %s", n, rec)
	}
	t.Logf("first set: %s", c.reason)
	// Why the dead one is out is said in the first set's reason: no later
	// line says it while it stays down.
	if want := addrs[0].String() + " unhealthy after 1 failed tcp check(s): "; !strings.Contains(c.reason, want) || !strings.Contains(c.reason, "refused") {
		t.Errorf("first set reason %q does not say why %s is out (want %q... refused)", c.reason, addrs[0], want)
	}
}

// TestFirstSetEmpty: a tracker whose servers are all dead (panic off)
// still announces its first set, empty, so its caller knows it has decided;
// nothing more until a server comes up.
func TestFirstSetEmpty(t *testing.T) {
	ss, addrs := servers(t, 27, 2)
	ss[0].stop()
	ss[1].stop()
	fast := health.Params{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond}
	_, rec := startTracker(t, "vip", Options{Sources: []discovery.Source{discovery.Static{Servers: addrs}}, Health: fast})
	c, next := rec.wait(t, 0, nil, 5*time.Second)
	if next != 1 || !strings.Contains(c.reason, "first set: 0 of 2") {
		t.Fatalf("first change %q: %s", c.reason, rec)
	}
	time.Sleep(300 * time.Millisecond)
	if rec.len() != 1 {
		t.Fatalf("changes while all stay down: %s", rec)
	}
	ss[0].start()
	rec.wait(t, next, addrs[:1], 5*time.Second)
	rec.checkOncePerChange(t)
}

// TestSourceFailureKeepsLastGood: a source that starts failing keeps its
// servers in the set, and the failure shows in the snapshot; a source that
// has never answered adds nothing; the union of sources is the candidates.
func TestSourceFailureKeepsLastGood(t *testing.T) {
	_, addrs := servers(t, 25, 3)
	dir := t.TempDir()
	list := filepath.Join(dir, "list")
	write := func(s string) {
		if err := os.WriteFile(list, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(addrs[1].String() + "\n" + addrs[2].String())
	cmd := filepath.Join(dir, "servers.sh")
	if err := os.WriteFile(cmd, []byte("#!/bin/sh\ngrep -q fail \"$1\" && { echo broken >&2; exit 1; }\ncat \"$1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	fast := health.Params{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond}
	tr, rec := startTracker(t, "vip", Options{
		Sources: []discovery.Source{
			discovery.Static{Servers: addrs[:2]},
			// A loaded machine may take more than the interval to run a script.
			discovery.Exec{Command: []string{cmd, list}, Interval: 100 * time.Millisecond, Timeout: 5 * time.Second},
		},
		Health: fast,
	})
	_, next := rec.wait(t, 0, addrs, 5*time.Second)
	snap := tr.Snapshot()
	if got := snap.Servers[1].Sources; !slices.Equal(got, []string{"static", "exec"}) {
		t.Errorf("%s sources %v, want static and exec", snap.Servers[1].Addr, got)
	}

	write("fail")
	deadline := time.Now().Add(5 * time.Second)
	for {
		snap = tr.Snapshot()
		if snap.Sources[1].Errors >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec source errors never counted: %+v", snap.Sources)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(snap.Sources[1].LastError, "broken") || snap.Sources[1].Servers != 2 {
		t.Errorf("exec source status %+v: want the error and its 2 last good servers", snap.Sources[1])
	}
	// How long the outage has lasted: since its first failure, not its last.
	if src := snap.Sources[1]; src.FailingSince.IsZero() || !src.FailingSince.Before(src.LastFailure) || !src.LastSuccess.Before(src.FailingSince) {
		t.Errorf("exec source failing: last success %v, failing since %v, last failure %v; want success < failing since < last failure",
			src.LastSuccess, src.FailingSince, src.LastFailure)
	}
	if !snap.Sources[0].FailingSince.IsZero() {
		t.Errorf("static source failing since %v", snap.Sources[0].FailingSince)
	}
	if !slices.Equal(tr.Healthy(), addrs) || rec.len() != next {
		t.Fatalf("a failing source changed the set: %s", rec)
	}

	// Recovery with a smaller list: only now does the exec-only server go.
	write(addrs[1].String())
	_, _ = rec.wait(t, next, addrs[:2], 5*time.Second)
	if snap := tr.Snapshot(); snap.Sources[1].LastError != "" || !snap.Sources[1].FailingSince.IsZero() {
		t.Errorf("recovered source still shows error %q, failing since %v", snap.Sources[1].LastError, snap.Sources[1].FailingSince)
	}
	rec.checkOncePerChange(t)
}

// TestDNSSource: a real DNS server's answers change and the healthy set
// follows, without a gap: a full replacement of the servers goes straight
// from the old set to the new one. When the DNS server dies the set stays.
func TestDNSSource(t *testing.T) {
	_, addrs := servers(t, 26, 3)
	ip := func(a netip.AddrPort) string { return a.Addr().String() }
	d := testutil.StartDNSMasq(t, map[string][]string{"servers.test": {ip(addrs[0]), ip(addrs[1])}}, 1)
	cfg := Config{
		DNS:    &DNSConfig{Name: "servers.test", Resolver: d.Addr.String(), Port: addrs[0].Port(), Interval: Duration(time.Second)},
		Health: HealthConfig{Interval: Duration(200 * time.Millisecond), Timeout: Duration(100 * time.Millisecond)},
	}
	o, err := cfg.Options(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, rec := startTracker(t, "vip", o)
	_, next := rec.wait(t, 0, addrs[:2], 5*time.Second)

	d.SetRecords(map[string][]string{"servers.test": {ip(addrs[2])}})
	changed := time.Now()
	c, next := rec.wait(t, next, addrs[2:], 5*time.Second)
	t.Logf("DNS change -> set change %s: %s", c.at.Sub(changed).Round(time.Millisecond), c.reason)
	if next != 2 {
		t.Fatalf("replacing every server went through other sets: %s", rec)
	}
	d.SetRecords(map[string][]string{"servers.test": {ip(addrs[1]), ip(addrs[2])}})
	_, next = rec.wait(t, next, addrs[1:], 5*time.Second)

	d.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for tr.Snapshot().Sources[0].Errors == 0 {
		if time.Now().After(deadline) {
			t.Fatal("dead DNS server: no source error")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if !slices.Equal(tr.Healthy(), addrs[1:]) || rec.len() != next {
		t.Fatalf("dead DNS server changed the set: %s", rec)
	}
	rec.checkOncePerChange(t)
	t.Logf("source status: %+v", tr.Snapshot().Sources[0])
}

// TestSourceReadiness: what readiness says of a source. A well-formed
// empty answer (NODATA, NXDOMAIN) is an answer; a server that answers only
// with an error code is "failing: ERROR"; a resolver nothing listens on
// was never reached: "no answer yet". Real dnsmasq; the closed port is on
// 127.0.0.1.
func TestSourceReadiness(t *testing.T) {
	d := testutil.StartDNSMasq(t, map[string][]string{
		"v6only.test": {"2001:2::5"}, // A query: NOERROR, no record (NODATA)
		"svc.test":    {"198.18.7.1"},
	}, 60)
	closed := freeAddr(t, "127.0.0.1") // nothing listens there any more
	fast := 100 * time.Millisecond
	srcs := []discovery.Source{
		discovery.DNS{Host: "v6only.test", Resolver: d.Addr.String(), Interval: fast},
		discovery.DNS{Host: "missing.test", Resolver: d.Addr.String(), Interval: fast},
		discovery.DNS{Host: "svc.test", Resolver: closed.String(), Interval: fast, Timeout: fast},
		// Outside the zone dnsmasq serves; it forwards nothing: REFUSED.
		discovery.DNS{Host: "svc.invalid", Resolver: d.Addr.String(), Interval: fast},
		discovery.DNS{Host: "svc.test", Resolver: d.Addr.String(), Interval: fast},
	}
	tr, _ := startTracker(t, "vip", Options{Sources: srcs})
	deadline := time.Now().Add(10 * time.Second)
	var snap Snapshot
	for {
		snap = tr.Snapshot()
		done := 0
		for _, s := range snap.Sources {
			if s.Errors > 0 || s.Servers > 0 {
				done++
			}
		}
		if done == len(srcs) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, s := range snap.Sources {
		t.Logf("%s: answered %v reached %v servers %d errors %d last %q -> %q", s.Name, s.Answered, s.Reached, s.Servers, s.Errors, s.LastError, s.NotReady())
	}
	want := []struct {
		answered, reached bool
		notReady          string
	}{
		{true, true, ""},
		{true, true, ""},
		{false, false, "no answer yet"},
		{false, true, "failing: dns svc.invalid: query svc.invalid. at " + d.Addr.String() + ": rcode REFUSED"},
		{true, true, ""},
	}
	for i, w := range want {
		s := snap.Sources[i]
		if s.Answered != w.answered || s.Reached != w.reached || !strings.HasPrefix(s.NotReady(), w.notReady) || (w.notReady == "") != (s.NotReady() == "") {
			t.Errorf("source %d %s: answered %v reached %v NotReady %q; want answered %v reached %v NotReady %q...",
				i, s.Name, s.Answered, s.Reached, s.NotReady(), w.answered, w.reached, w.notReady)
		}
	}
}

// TestUnreachableResolverLoggedOnce: a DNS resolver nothing listens on
// fails every retry with the same error but for the local port of the
// socket; the failure is logged once, not at every retry.
func TestUnreachableResolverLoggedOnce(t *testing.T) {
	closed := freeAddr(t, "127.0.0.1")
	var logs testutil.SyncBuffer
	log := slog.New(slog.NewTextHandler(io.MultiWriter(&logs, tlogWriter{t}), &slog.HandlerOptions{Level: slog.LevelInfo}))
	src := discovery.DNS{Host: "svc.test", Resolver: closed.String(), Interval: 50 * time.Millisecond, Timeout: 100 * time.Millisecond}
	tr, _ := startTracker(t, "vip", Options{Sources: []discovery.Source{src}, Logger: log})
	deadline := time.Now().Add(10 * time.Second)
	for tr.Snapshot().Sources[0].Errors < 6 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	snap := tr.Snapshot().Sources[0]
	warns := strings.Count(logs.String(), "server source failed")
	t.Logf("%d failures, %d logged; last: %s", snap.Errors, warns, snap.LastError)
	if snap.Errors < 6 {
		t.Fatalf("only %d failures within 10 s", snap.Errors)
	}
	if warns != 1 {
		t.Errorf("%d failures logged %d times, want once", snap.Errors, warns)
	}
}

// A set that loses a server is logged as a warning (with logLevel warn an
// operator still sees a VIP lose its servers); one that gains is info.
func TestShrinkingSetLoggedAsWarning(t *testing.T) {
	var logs testutil.SyncBuffer
	log := slog.New(slog.NewTextHandler(io.MultiWriter(&logs, tlogWriter{t}), &slog.HandlerOptions{Level: slog.LevelInfo}))
	ss, addrs := servers(t, 23, 2)
	_, rec := startTracker(t, "vip", Options{Sources: []discovery.Source{discovery.Static{Servers: addrs}}, Logger: log})
	_, next := rec.wait(t, 0, addrs, 5*time.Second)
	ss[1].stop()
	_, next = rec.wait(t, next, without(addrs, addrs[1]), 5*time.Second)
	ss[1].start()
	rec.wait(t, next, addrs, 10*time.Second)
	var levels []string
	for l := range strings.Lines(logs.String()) {
		if strings.Contains(l, `msg="server set changed"`) {
			f := strings.Fields(l)
			levels = append(levels, strings.TrimPrefix(f[1], "level="))
		}
	}
	if !slices.Equal(levels, []string{"INFO", "WARN", "INFO"}) {
		t.Errorf("levels of the set changes (first, a server lost, it back): %v, want [INFO WARN INFO]", levels)
	}
}
