// Package servers keeps the healthy server set of one VIP: it takes the
// union of the VIP's discovery sources as candidates, health-checks each
// candidate, and reports every change of the healthy set exactly once, with
// the reason, to the code that writes the service map.
package servers

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ctlb/ctlb/internal/discovery"
	"github.com/ctlb/ctlb/internal/health"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// OnChange receives the new healthy set (sorted, never shared with the
// tracker) and why it changed. It is called from the tracker's goroutine,
// one call at a time, in order; it should not block for long. The first
// call comes once the first candidates have been checked (even if the set
// is empty); after that, once per change.
type OnChange func(healthy []netip.AddrPort, reason string)

// Options build a Tracker from parts; Config.Options gives them from a
// config.
type Options struct {
	Sources []discovery.Source
	Checker health.Checker // nil: health.TCP
	Health  health.Params  // zero fields: health defaults
	Panic   bool
	// OnChange is told of every change of the published set.
	OnChange OnChange
	// Logger gets one line per set change and per source failure or
	// recovery; nil uses slog.Default.
	Logger *slog.Logger
}

// Options turns a validated config into tracker options.
func (c Config) Options(onChange OnChange, log *slog.Logger) (Options, error) {
	if err := c.Validate(); err != nil {
		return Options{}, err
	}
	if c.Consul != nil && c.Consul.Token != "" {
		l := log
		if l == nil {
			l = slog.Default()
		}
		l.Warn("consul.token is an inline ACL token in the config file; prefer consul.tokenFile (read again at every query)")
	}
	srcs, err := c.Sources()
	if err != nil {
		return Options{}, err
	}
	ck, err := c.Checker()
	if err != nil {
		return Options{}, err
	}
	return Options{
		Sources: srcs, Checker: ck, Health: c.HealthParams(),
		Panic: c.Panic, OnChange: onChange, Logger: log,
	}, nil
}

// Tracker keeps the healthy set of one VIP. Create it with New, run it with
// Run, read it with Snapshot.
type Tracker struct {
	name string
	o    Options
	log  *slog.Logger

	events chan event

	mu           sync.Mutex
	sources      []*sourceState
	servers      map[netip.AddrPort]*serverState
	published    []netip.AddrPort
	deferred     []string // reasons held while a candidate awaits its first check
	trimmed      int      // candidates left out over datapath.MaxServers
	firstTrimmed netip.AddrPort
	inPanic      bool
	changes      uint64
	lastChange   time.Time
	lastReason   string
	// baseChanges are the set changes of the trackers this one replaced
	// (Inherit): the count status shows goes on across a reload.
	baseChanges uint64
}

type sourceState struct {
	name     string
	servers  []netip.AddrPort
	rejected []discovery.Rejected // of the last answer
	// answered: a well-formed answer came, a list or an empty one.
	answered bool
	// reached: the source's server answered, if only with errors (not a
	// network failure: discovery.Unreachable).
	reached  bool
	lastErr  error
	errCount uint64
	lastOK   time.Time
	lastFail time.Time
	// failingSince is the first failure since the last success (zero
	// while the source succeeds): how long an outage has lasted.
	failingSince time.Time
}

type serverState struct {
	gen    uint64
	cancel context.CancelFunc
	health health.State
}

type event struct {
	source int // index into sources, or -1 for a health report
	result discovery.Result
	gen    uint64
	report health.Report
}

// New makes a tracker for the VIP called name (used in logs and status).
func New(name string, o Options) *Tracker {
	if o.Checker == nil {
		o.Checker = health.TCP{}
	}
	o.Health = o.Health.WithDefaults()
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	t := &Tracker{
		name:    name,
		o:       o,
		log:     o.Logger.With("vip", name),
		events:  make(chan event, 16),
		servers: map[netip.AddrPort]*serverState{},
	}
	seen := map[string]int{}
	for _, s := range o.Sources {
		n := s.Name()
		seen[n]++
		if seen[n] > 1 {
			n = fmt.Sprintf("%s#%d", n, seen[n])
		}
		t.sources = append(t.sources, &sourceState{name: n})
	}
	return t
}

// Inherit carries into t, which has not run yet, what old knew: for each
// source of the same name whether it answered, since when it fails, its
// errors and its last success; and the set's changes. A reload that
// replaces a VIP's tracker (a new interval, another health check) must not
// make ctlbd NotReady because a source that answered before is down now,
// nor restart an outage's clock. The servers themselves are not carried:
// the new tracker checks its candidates anew (the maps keep the set
// meanwhile).
func (t *Tracker) Inherit(old *Tracker) {
	if old == nil || old == t {
		return
	}
	old.mu.Lock()
	prev := map[string]sourceState{}
	for _, s := range old.sources {
		prev[s.name] = *s
	}
	changes, lastChange, lastReason := old.baseChanges+old.changes, old.lastChange, old.lastReason
	old.mu.Unlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, s := range t.sources {
		if p, ok := prev[s.name]; ok {
			p.servers, p.rejected = nil, nil // the candidates are the new tracker's to find
			*s = p
		}
	}
	t.baseChanges, t.lastChange, t.lastReason = changes, lastChange, lastReason
}

// Run follows the sources and checks the servers until ctx is done, then
// stops everything it started and returns. Call it once. To change a VIP's
// config, run a new Tracker and stop the old one once the new one has
// published its first set.
func (t *Tracker) Run(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i, src := range t.o.Sources {
		wg.Go(func() {
			src.Run(ctx, func(r discovery.Result) {
				select {
				case t.events <- event{source: i, result: r}:
				case <-ctx.Done():
				}
			})
		})
	}
	var gen uint64
	start := func(addr netip.AddrPort) *serverState {
		gen++
		mctx, mcancel := context.WithCancel(ctx)
		st := &serverState{gen: gen, cancel: mcancel}
		g := gen
		wg.Go(func() {
			health.Monitor(mctx, addr, t.o.Checker, t.o.Health, func(r health.Report) {
				select {
				case t.events <- event{source: -1, gen: g, report: r}:
				case <-mctx.Done():
				}
			})
		})
		return st
	}
	for {
		select {
		case <-ctx.Done():
			t.mu.Lock()
			for _, s := range t.servers {
				s.cancel()
			}
			t.mu.Unlock()
			return
		case ev := <-t.events:
			var reason string
			if ev.source >= 0 {
				reason = t.onSource(ev.source, ev.result, start)
			} else {
				reason = t.onHealth(ev.gen, ev.report)
			}
			if reason != "" {
				t.publish(reason)
			}
		}
	}
}

// onSource records a source's answer and starts or stops checks for the
// candidates it added or dropped. It returns a reason when the candidates
// changed.
func (t *Tracker) onSource(i int, r discovery.Result, start func(netip.AddrPort) *serverState) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.sources[i]
	now := time.Now()
	if r.Err == nil || len(r.Rejected) > 0 {
		good, rejected := clean(r.Servers)
		rejected = append(slices.Clone(r.Rejected), rejected...)
		if !slices.Equal(rejected, s.rejected) && len(rejected) > 0 {
			t.log.Warn("server source listed entries that cannot be used; left out",
				"source", s.name, "rejected", len(rejected), "first", rejectedText(rejected, 5))
		}
		s.rejected = rejected
		r.Servers = good
		if r.Err == nil && len(good) == 0 {
			r.Err = fmt.Errorf("%w after leaving out %d unusable entries (%s)", discovery.ErrEmpty, len(rejected), rejectedText(rejected, 1))
		}
	}
	if r.Err != nil {
		switch {
		case discovery.Empty(r.Err):
			s.answered, s.reached = true, true
		case !discovery.Unreachable(r.Err):
			s.reached = true
		}
		s.errCount++
		s.lastFail = now
		if s.lastErr == nil {
			s.failingSince = now
		}
		// Log a failure when it starts or what it says changes, not every
		// retry (a socket's ephemeral local port is not a change).
		if s.lastErr == nil || !discovery.SameError(s.lastErr, r.Err) {
			if len(s.servers) > 0 {
				t.log.Warn("server source failed; keeping its last good list",
					"source", s.name, "error", r.Err, "kept", logList(s.servers))
			} else {
				// Nothing listed since this tracker started (a start, a
				// reload): the maps keep the set they held.
				t.log.Warn("server source failed; the VIP keeps the set the maps hold",
					"source", s.name, "error", r.Err)
			}
		}
		s.lastErr = r.Err
		return ""
	}
	if s.lastErr != nil {
		t.log.Info("server source recovered", "source", s.name, "servers", logList(r.Servers))
	}
	s.lastErr = nil
	s.lastOK = now
	s.failingSince = time.Time{}
	s.answered, s.reached = true, true
	next := discovery.Normalize(r.Servers)
	if slices.Equal(next, s.servers) {
		return ""
	}
	s.servers = next

	trimmedBefore := t.trimmed
	cands := t.candidatesLocked()
	if t.trimmed != trimmedBefore && t.trimmed > 0 {
		t.log.Warn("more candidates than a VIP may have; keeping the lowest addresses",
			"candidates", len(cands)+t.trimmed, "kept", len(cands), "limit", datapath.MaxServers,
			"first_left_out", t.firstTrimmed.String())
	}
	var added, removed []string
	for _, a := range cands {
		if _, ok := t.servers[a]; !ok {
			t.servers[a] = start(a)
			added = append(added, a.String())
		}
	}
	for a, st := range t.servers {
		if !slices.Contains(cands, a) {
			st.cancel()
			delete(t.servers, a)
			removed = append(removed, a.String())
		}
	}
	if len(added) == 0 && len(removed) == 0 {
		return "" // another source still lists what this one dropped
	}
	slices.Sort(added)
	slices.Sort(removed)
	var b strings.Builder
	fmt.Fprintf(&b, "source %s", s.name)
	if len(added) > 0 {
		fmt.Fprintf(&b, " added %s", strings.Join(added, ","))
	}
	if len(removed) > 0 {
		fmt.Fprintf(&b, " removed %s", strings.Join(removed, ","))
	}
	return b.String()
}

// onHealth records a check result and returns a reason when a server's
// verdict changed.
func (t *Tracker) onHealth(gen uint64, r health.Report) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.servers[r.Addr]
	if !ok || st.gen != gen {
		return "" // a report from a check that was stopped
	}
	st.health = r.State
	if !r.Changed {
		return ""
	}
	switch r.State.Verdict {
	case health.Healthy:
		return fmt.Sprintf("%s healthy after %d passing %s check(s)", r.Addr, r.State.Passes, t.o.Checker.Kind())
	default:
		return fmt.Sprintf("%s unhealthy after %d failed %s check(s): %v", r.Addr, r.State.Failures, t.o.Checker.Kind(), r.State.LastErr)
	}
}

// candidatesLocked is the sorted union of the sources' lists, trimmed to
// the most a VIP may have (datapath.MaxServers). Trimming keeps the lowest
// addresses, so every daemon with the same sources keeps the same ones and
// a write never fails over the limit.
func (t *Tracker) candidatesLocked() []netip.AddrPort {
	var all []netip.AddrPort
	for _, s := range t.sources {
		all = append(all, s.servers...)
	}
	all = discovery.Normalize(all)
	t.trimmed = 0
	if len(all) > datapath.MaxServers {
		t.trimmed = len(all) - datapath.MaxServers
		t.firstTrimmed = all[datapath.MaxServers]
		all = all[:datapath.MaxServers]
	}
	return all
}

// clean applies the service map's own rules to a source's answer: an IPv4
// VIP takes unicast IPv4 servers with a port, each once. What breaks a rule
// is left out with the reason, before any health check sees it, so one bad
// entry can never make the map write fail and freeze the set.
func clean(in []netip.AddrPort) (good []netip.AddrPort, rejected []discovery.Rejected) {
	seen := make(map[netip.AddrPort]bool, len(in))
	for _, ap := range in {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		a := ap.Addr()
		why := ""
		switch {
		case !ap.IsValid():
			why = "no address"
		case !a.Is4():
			why = "wrong family: an IPv6 server for an IPv4 VIP"
		case a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			why = "not a unicast address"
		case ap.Port() == 0:
			why = "port 0"
		case seen[ap]:
			why = "listed twice"
		default:
			if err := datapath.ValidateServer(ap); err != nil {
				why = err.Error()
			}
		}
		if why != "" {
			rejected = append(rejected, discovery.Rejected{Entry: ap.String(), Reason: why})
			continue
		}
		seen[ap] = true
		good = append(good, ap)
	}
	return good, rejected
}

// rejectedText gives the first n rejected entries for a log line.
func rejectedText(r []discovery.Rejected, n int) string {
	var parts []string
	for _, x := range r[:min(n, len(r))] {
		parts = append(parts, x.Entry+": "+x.Reason)
	}
	if len(r) > n {
		parts = append(parts, fmt.Sprintf("and %d more", len(r)-n))
	}
	return strings.Join(parts, "; ")
}

// publish computes the set to publish and calls OnChange if it differs from
// the last one.
//
// A candidate awaiting its first check (at most one check timeout) holds
// back a set that would be empty without it, and the first set of all: a
// starting tracker must not announce a half-checked set (or, in panic mode,
// every candidate), and a source that replaces all its servers (DNS {A} ->
// {B}) must not empty the set between dropping A and checking B. A set
// with healthy servers in it goes out at once: a dead server's removal is
// never delayed. The reasons held go with the next change.
func (t *Tracker) publish(reason string) {
	t.mu.Lock()
	cands := t.candidatesLocked()
	var healthy []netip.AddrPort
	pending := false
	for _, a := range cands {
		switch t.servers[a].health.Verdict {
		case health.Healthy:
			healthy = append(healthy, a)
		case health.Unchecked:
			pending = true
		}
	}
	if pending && (t.changes == 0 || len(healthy) == 0) {
		t.deferred = append(t.deferred, reason)
		t.mu.Unlock()
		return
	}
	if len(t.deferred) > 0 {
		reason = strings.Join(append(t.deferred, reason), "; ")
		t.deferred = nil
	}
	if t.changes == 0 {
		// The reasons held are mostly "X healthy after ..." (one per
		// candidate, maybe a thousand); what the first set must say is why
		// a candidate stayed out, which no later line says while its
		// verdict holds.
		reason = fmt.Sprintf("first set: %d of %d candidates healthy", len(healthy), len(cands))
		if out := t.outLocked(cands); out != "" {
			reason += "; " + out
		}
	}
	set := healthy
	panicNow := false
	if len(healthy) == 0 && t.o.Panic && len(cands) > 0 {
		set, panicNow = cands, true
	}
	if panicNow {
		reason = fmt.Sprintf("panic: no healthy server, publishing all %d candidates; %s", len(cands), reason)
	} else if t.inPanic {
		reason = "panic over; " + reason
	}
	t.inPanic = panicNow
	// The first set is always published once the first candidates are
	// checked, even when empty, so a caller knows the tracker has decided.
	first := t.changes == 0 && len(cands) > 0
	if slices.Equal(set, t.published) && !first {
		t.mu.Unlock()
		return
	}
	shrank := len(set) < len(t.published)
	t.published = set
	t.changes++
	t.lastChange = time.Now()
	t.lastReason = reason
	out := slices.Clone(set)
	t.mu.Unlock()

	// A set that loses servers (or goes to panic) is a warning: with
	// logLevel warn an operator still sees a VIP lose its servers.
	level := slog.LevelInfo
	if shrank || panicNow {
		level = slog.LevelWarn
	}
	t.log.Log(context.Background(), level, "server set changed", "servers", logList(out), "count", len(out), "panic", panicNow, "reason", reason)
	if t.o.OnChange != nil {
		t.o.OnChange(out, reason)
	}
}

// outLocked says why the candidates not healthy are out (their last
// failed check), the first few of them.
func (t *Tracker) outLocked(cands []netip.AddrPort) string {
	const most = 5
	var parts []string
	n := 0
	for _, a := range cands {
		st := t.servers[a].health
		if st.Verdict != health.Unhealthy {
			continue
		}
		n++
		if n <= most {
			parts = append(parts, fmt.Sprintf("%s unhealthy after %d failed %s check(s): %v", a, st.Failures, t.o.Checker.Kind(), st.LastErr))
		}
	}
	if n > most {
		parts = append(parts, fmt.Sprintf("and %d more unhealthy", n-most))
	}
	return strings.Join(parts, "; ")
}

// Healthy returns the set last published.
func (t *Tracker) Healthy() []netip.AddrPort {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.published)
}

// Snapshot is the state of a tracker for status output and metrics.
type Snapshot struct {
	VIP       string           `json:"vip"`
	Published []netip.AddrPort `json:"published"`
	Panic     bool             `json:"panic"`
	Changes   uint64           `json:"changes"`
	// Trimmed is how many candidates were left out over the most a VIP
	// may have (the highest addresses).
	Trimmed    int            `json:"trimmed,omitempty"`
	LastChange time.Time      `json:"lastChange,omitzero"`
	LastReason string         `json:"lastReason,omitempty"`
	Servers    []ServerStatus `json:"servers"`
	Sources    []SourceStatus `json:"sources"`
}

// ServerStatus is one candidate server.
type ServerStatus struct {
	Addr      netip.AddrPort `json:"addr"`
	Sources   []string       `json:"sources"`
	Health    health.Verdict `json:"health"`
	Published bool           `json:"published"`
	LastError string         `json:"lastError,omitempty"`
	LastCheck time.Time      `json:"lastCheck,omitzero"`
	Since     time.Time      `json:"since,omitzero"`
}

// SourceStatus is one source.
type SourceStatus struct {
	Name    string `json:"name"`
	Servers int    `json:"servers"`
	// Answered: the source gave a well-formed answer at least once, a
	// list or an empty one (a Consul service with no passing instance, a
	// DNS name with no A record or none at all).
	Answered bool `json:"answered"`
	// Reached: the source's server answered at least once, if only with
	// an error (an HTTP error status, a DNS error code); false while every
	// attempt failed in the network (refused, reset, timed out).
	Reached   bool   `json:"reached"`
	LastError string `json:"lastError,omitempty"`
	// Rejected counts the entries of the last answer left out (not an
	// address, another host's loopback, wrong family, not unicast, listed
	// twice); RejectedFirst shows the first few with the reason.
	Rejected      int                  `json:"rejected,omitempty"`
	RejectedFirst []discovery.Rejected `json:"rejectedFirst,omitempty"`
	Errors        uint64               `json:"errors"`
	LastSuccess   time.Time            `json:"lastSuccess,omitzero"`
	LastFailure   time.Time            `json:"lastFailure,omitzero"`
	// FailingSince is the first failure since the last success; zero
	// while the source succeeds.
	FailingSince time.Time `json:"failingSince,omitzero"`
}

// NotReady is what readiness says of the source: "" once it answered
// well formed, else why not.
//
// An empty answer counts as an answer: ctlbd knows what the source says
// (nothing to serve yet), and waiting cannot change it. One VIP of a
// service not deployed yet must not keep ctlbd NotReady on every node and
// stall a rolling update of ctlbd.
//
// A source that answered only with errors (403 for a token without
// service:read, SERVFAIL, a CA file that does not verify) or was never
// reached still holds readiness back. Such errors are usually the
// deployment's own making (its token, its CA, its resolver, its network
// policy), so a rolling update that brought them should stop on the first
// node, showing why, instead of rolling them out everywhere; and a node
// whose ctlbd cannot reach its sources does not know its servers. A source
// that answered once and fails later does not: readiness does not flap
// with an outage of Consul or DNS (the last good list is kept).
func (s SourceStatus) NotReady() string {
	switch {
	case s.Answered:
		return ""
	case s.Reached:
		return "failing: " + s.LastError
	default:
		return "no answer yet"
	}
}

// Snapshot copies the current state.
func (t *Tracker) Snapshot() Snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := Snapshot{
		VIP: t.name, Published: slices.Clone(t.published), Panic: t.inPanic,
		Changes: t.baseChanges + t.changes, LastChange: t.lastChange, LastReason: t.lastReason, Trimmed: t.trimmed,
	}
	for _, src := range t.sources {
		ss := SourceStatus{
			Name: src.name, Servers: len(src.servers), Answered: src.answered, Reached: src.reached,
			Errors: src.errCount, LastSuccess: src.lastOK, LastFailure: src.lastFail,
			FailingSince: src.failingSince,
			Rejected:     len(src.rejected), RejectedFirst: slices.Clone(src.rejected[:min(8, len(src.rejected))]),
		}
		if src.lastErr != nil {
			ss.LastError = discovery.Truncate(src.lastErr.Error(), 2*discovery.MaxErrorText)
		}
		s.Sources = append(s.Sources, ss)
	}
	for _, a := range slices.SortedFunc(maps.Keys(t.servers), netip.AddrPort.Compare) {
		st := t.servers[a]
		ss := ServerStatus{
			Addr: a, Health: st.health.Verdict, Published: slices.Contains(t.published, a),
			LastCheck: st.health.LastCheck, Since: st.health.Since,
		}
		if st.health.LastErr != nil {
			ss.LastError = st.health.LastErr.Error()
		}
		for _, src := range t.sources {
			if slices.Contains(src.servers, a) {
				ss.Sources = append(ss.Sources, src.name)
			}
		}
		s.Servers = append(s.Servers, ss)
	}
	return s
}

// logList formats a server list for a log line, cut short when long (a
// VIP may have a thousand servers; the count goes alongside).
func logList(s []netip.AddrPort) string {
	return discovery.Truncate(discovery.Format(s), 1024)
}
