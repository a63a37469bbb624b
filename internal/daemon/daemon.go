// Package daemon is ctlbd: the one writer of ctlb's service maps. It adopts
// or creates the pinned objects, keeps every configured VIP's servers in
// them, and serves the control API the CLI and the CNI plugin use.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf/rlimit"
	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/bpffs"
	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/nri"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/proxy"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Daemon is a running ctlbd.
type Daemon struct {
	log     *slog.Logger
	cfgPath string
	dp      *datapath.Datapath
	cgroups cgroupv2.Hierarchy
	lock    *os.File

	// mu serialises every change of the service maps and of cfg.
	mu    sync.Mutex
	cfg   *config.Config
	table serviceTable
	// trackers are the VIPs kept by sources and health checks, by VIP.
	trackers map[datapath.ServiceKey]*trackedService
	// runCtx bounds the trackers; set by Run.
	runCtx context.Context

	registry *prometheus.Registry
	m        *daemonMetrics
	proxy    *proxy.Proxy
	// stopProxy drains and shuts the proxy down (Run sets it).
	stopProxy func()
	// reloadMu makes reloads (the config watch, SIGHUP, ctlbd reload) one
	// at a time: two interleaved would apply parts of both, and one's
	// rollback could put back the other's proxy services.
	reloadMu sync.Mutex
	// pending completes attachments whose cgroup appeared after ADD.
	pending *pending.Watcher
	// ends ends the connections of servers that leave a set.
	ends *endings
	// reb moves connections onto servers that join a set (opt-in).
	reb *rebalancer
	// fail returns servers the kernel marked failing to rotation.
	fail *failWatch
	// ready is what /readyz reports.
	ready readiness

	// NoConfigWatch turns off applying the config file when it changes
	// (set before Run); SIGHUP and `ctlbd reload` still do.
	NoConfigWatch bool
	// Overrides, when set (before Run), applies to each reloaded config
	// what overrode the file at start (ctlbd run's flags).
	Overrides func(*config.Config)
	// nri is the NRI plugin (container scope) when the config asks for it.
	nri *nri.Plugin
}

// New prepares a daemon: it mounts bpffs where the pin directory needs one,
// takes the pin directory's writer lock, and adopts (or first creates) the
// pinned objects. cfgPath, when not empty, is re-read by Reload.
func New(cfg *config.Config, cfgPath string, log *slog.Logger) (*Daemon, error) {
	if err := ensureBPFFS(cfg.BPFFS, log); err != nil {
		return nil, err
	}
	lock, err := lockDir(cfg.BPFFS)
	if err != nil {
		return nil, err
	}
	dp, err := datapath.Create(cfg.BPFFS)
	if err != nil {
		lock.Close()
		return nil, err
	}
	if up := dp.Upgraded(); up != nil {
		log.Info("layout upgraded", "from", up.From, "to", datapath.Layout, "services", up.Services,
			"attachments", up.Attachments, "openSockets", up.OpenSockets, "removedPins", up.RemovedPins)
	}
	if n := dp.StraySlots(); n > 0 {
		log.Info("retired server slots that a crash during a set left given out", "slots", n)
	}
	h, err := cgroupv2.Default()
	if err != nil {
		log.Warn("no cgroup v2 hierarchy: attachments are unavailable, the fallback proxy is not", "error", err)
	}
	d := &Daemon{log: log, cfgPath: cfgPath, dp: dp, cgroups: h, lock: lock, cfg: cfg,
		trackers: map[datapath.ServiceKey]*trackedService{}, runCtx: context.Background()}
	d.ends = newEndings(dp, log.With("part", "endings"), d.serverGone, d.table.inSomeSet)
	d.reb = newRebalancer(d)
	d.fail = newFailWatch(d)
	d.m = newDaemonMetrics()
	d.registry = d.newRegistry()
	return d, nil
}

// Serving reports whether the daemon has applied its config and serves its
// control API.
func (d *Daemon) Serving() bool { return d.ready.serving.Load() }

// Datapath is the daemon's handle on the pinned objects.
func (d *Daemon) Datapath() *datapath.Datapath { return d.dp }

// Close releases the daemon's handles. Pinned objects and links stay:
// connections keep being balanced while no daemon runs (invariant 1).
func (d *Daemon) Close() error {
	d.ends.close()
	err := d.dp.Close()
	d.lock.Close()
	return err
}

// ensureBPFFS puts the pin directory on a bpffs, mounting one where needed
// (internal/bpffs), and lifts the memlock limit on kernels that still charge
// BPF maps to it (before 5.11). Lifting it needs CAP_SYS_RESOURCE; a kernel
// that accounts BPF memory to the memory cgroup needs neither, so a failure
// is only logged.
func ensureBPFFS(dir string, log *slog.Logger) error {
	if err := rlimit.RemoveMemlock(); err != nil {
		log.Warn("could not lift RLIMIT_MEMLOCK; maps may fail to load on kernels before 5.11", "error", err)
	}
	mounted, err := bpffs.Ensure(dir)
	if err != nil {
		return err
	}
	if mounted != "" {
		log.Info("mounted bpffs", "dir", mounted)
	}
	return nil
}

// lockDir takes an exclusive flock on the pin directory: one writer owns the
// service maps at a time (invariant 4). The kernel drops it when the process
// dies, so a SIGKILLed daemon never blocks its successor.
// This is ARCHITECTURE.md I4.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another ctlbd owns %s (its maps have one writer)", dir)
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

// Run applies the config and serves the control API until ctx ends.
func (d *Daemon) Run(ctx context.Context) error {
	d.runCtx = ctx
	// Metrics and probes first: /readyz says what is not done yet.
	if d.cfg.Metrics != "" {
		if err := d.serveMetrics(ctx, d.cfg.Metrics); err != nil {
			return err
		}
	}
	if err := d.loadTable(); err != nil {
		return err
	}
	go d.ends.run(ctx)
	go d.reb.run(ctx)
	go d.fail.run(ctx)
	if err := d.applyServices(nil, d.cfg); err != nil {
		return err
	}
	d.ready.configApplied.Store(true)
	if d.cfg.Proxy != nil {
		p, err := proxy.New(*d.cfg.Proxy, d.table.targets, proxy.Options{Logger: d.log.With("part", "proxy"), Registerer: d.registry})
		if err != nil {
			return err
		}
		d.proxy = p
		d.ends.setProxy(func(dep datapath.Departed, limit uint64) uint64 { return endProxied(p, dep, limit) })
		stopProxy := func() {
			d.ends.setProxy(nil)
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_ = p.Shutdown(sctx) // once: later calls return at once
		}
		defer stopProxy()
		d.stopProxy = stopProxy
		d.log.Info("fallback proxy serving", "listening", p.Listening(), "destinations", p.Destinations())
		d.warnUnserved()
	}
	if err := d.startPending(ctx); err != nil {
		return err
	}
	if d.cfgPath != "" && !d.NoConfigWatch {
		if err := d.watchConfig(ctx); err != nil {
			return err
		}
	}
	if d.cfg.HostScope {
		if _, err := d.AttachHost(); err != nil {
			return fmt.Errorf("config hostScope: %w", err)
		}
	}
	d.startNRI(ctx)
	d.Reconcile()
	go d.reconcileLoop(ctx, time.Duration(d.cfg.ReconcileInterval))
	ln, roles, err := listenUnix(d.cfg.Socket, d.cfg.SocketGroup, d.cfg.SocketWriteGroup, d.log)
	if err != nil {
		return err
	}
	api := d.cfg.ControlAPI
	srv := &http.Server{
		Handler:     logRequests(d.log, roles.authorize(d.Handler())),
		ConnContext: peerContext,
		// A stalled or idle client cannot hold a connection forever.
		ReadHeaderTimeout: min(time.Duration(api.ReadTimeout), 10*time.Second),
		ReadTimeout:       time.Duration(api.ReadTimeout),
		WriteTimeout:      time.Duration(api.WriteTimeout),
		IdleTimeout:       time.Duration(api.IdleTimeout),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	d.ready.serving.Store(true)
	// What the maps hold, the config's and the CLI's VIPs alike: after a
	// restart that adopted the pins, the config may define none of them.
	d.mu.Lock()
	nConfig := len(d.cfg.Services)
	d.mu.Unlock()
	nServices := d.table.count()
	d.notify(readyState(nServices))
	// Serving, not necessarily ready for /readyz: sources may not have
	// answered yet, and the line says so.
	d.log.Info("ctlbd ready", "bpffs", d.cfg.BPFFS, "socket", d.cfg.Socket, "services", nServices, "fromConfig", nConfig,
		"attachments", d.attachmentCount(), "sources", sourcesReady(d.snapshots()))
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("control API: %w", err)
	}
	d.notify(sddaemon.SdNotifyStopping)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	os.Remove(d.cfg.Socket)
	if d.stopProxy != nil {
		d.stopProxy() // drains: the last line comes after it
	}
	d.log.Info("ctlbd stopped; the data path stays in place")
	return nil
}

// Reload re-reads the config file and applies it. A config that does not
// parse or validate is rejected with the reason; the old one stays.
func (d *Daemon) Reload() error {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	if d.cfgPath == "" {
		return errors.New("reload: ctlbd runs without a config file")
	}
	next, err := config.Load(d.cfgPath)
	if err != nil {
		return fmt.Errorf("reload rejected, old config kept: %w", err)
	}
	d.mu.Lock()
	prev := d.cfg
	d.mu.Unlock()
	// The flags that overrode the file at start override it again, so that
	// only what the file changed counts as changed.
	if d.Overrides != nil {
		d.Overrides(next)
	}
	// The services (and the proxy's, below) apply now; the daemon's own
	// settings, where it lives and how it serves, only with a restart:
	// named while the file differs from what runs.
	if changed := restartOnlyChanges(*prev, *next, "", "Services", "Proxy"); len(changed) > 0 {
		d.log.Warn("reload: these settings change only with a restart and keep their running values; services apply now",
			"fields", changed)
	}
	running := *prev
	running.Services, running.Proxy = next.Services, next.Proxy
	next = &running
	// The proxy first: it can refuse (an address taken) and undoes itself
	// when it does, where the maps, once written, would already send
	// connect4 clients to a config that was rejected.
	if err := d.reloadProxy(prev, next); err != nil {
		return fmt.Errorf("reload rejected, old config kept: %w", err)
	}
	if err := d.applyServices(prev, next); err != nil {
		if d.proxy != nil && prev.Proxy != nil {
			if perr := d.proxy.SetServices(prev.Proxy.Services); perr != nil {
				d.log.Error("reload: put the proxy's services back", "error", perr)
			}
		}
		return fmt.Errorf("reload: %w", err)
	}
	d.mu.Lock()
	d.cfg = next
	d.mu.Unlock()
	d.warnUnserved()
	d.log.Info("config reloaded", "path", d.cfgPath, "services", len(next.Services))
	return nil
}

// applyServices writes next's VIPs and removes the VIPs prev had that next
// has not. A static VIP whose pinned set already matches is left alone, so a
// restarted daemon adopts the maps without rewriting them. A tracked VIP
// (sources, health checks) gets a tracker; its pinned set stays as it is
// until the tracker publishes, so a restart leaves no gap, and a new VIP
// starts empty with its policy. Trackers whose config did not change keep
// running across a reload.
func (d *Daemon) applyServices(prev, next *config.Config) (rerr error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	// What can still fail goes before anything changes: a config rejected
	// half-way would leave VIPs, policies, stopped trackers or rebalance
	// settings of its own behind.
	for i, s := range next.Services {
		svc, err := s.Datapath()
		if err != nil {
			return err // Validate ran already; this is a programming error
		}
		if !s.Tracked() || d.trackers[svc.Key()] != nil && d.trackers[svc.Key()].sameConfig(s) {
			continue
		}
		if _, err := s.Sources().Checker(); err != nil {
			return fmt.Errorf("services[%d] (VIP %s): %w", i, svc.Key(), err)
		}
		if _, err := s.Sources().Sources(); err != nil {
			return fmt.Errorf("services[%d] (VIP %s): %w", i, svc.Key(), err)
		}
	}
	want := map[datapath.ServiceKey]datapath.Service{}
	var changed []datapath.Service
	var untracked []datapath.ServiceKey
	for _, s := range next.Services {
		svc, _ := s.Datapath()
		want[svc.Key()] = svc
		cur, ok, err := d.dp.ServiceOf(svc.Key())
		if err != nil {
			return err
		}
		if s.Tracked() {
			if ts := d.trackers[svc.Key()]; ts != nil && ts.sameConfig(s) {
				continue
			}
			if !ok || cur.Empty != svc.Empty || cur.Balance != svc.Balance || cur.OnServerRemoved != svc.OnServerRemoved {
				keep := svc
				keep.Servers = []netip.AddrPort{}
				if ok {
					keep.Servers = cur.Servers
				}
				changed = append(changed, keep)
			}
			continue
		}
		untracked = append(untracked, svc.Key())
		if !ok || !sameService(cur, svc) {
			changed = append(changed, svc)
		}
	}
	// The ledger first names every VIP this config may write, so that a
	// crash or an error below leaves none the next config cannot remove.
	// A daemon without a config file keeps none: it is the file's ledger.
	ledger := d.cfgPath != ""
	var owned []datapath.ServiceKey
	wantKeys := slices.Collect(maps.Keys(want))
	if ledger {
		var err error
		if owned, err = d.readLedger(); err != nil {
			return err
		}
		if err := d.writeLedger(unionKeys(owned, wantKeys)); err != nil {
			return err
		}
		// On an error below, only what this config did write stays the
		// file's: a VIP it never wrote is not its to remove later.
		defer func() {
			if rerr == nil {
				return
			}
			written := slices.DeleteFunc(slices.Clone(wantKeys), func(k datapath.ServiceKey) bool { return !d.table.has(k) })
			if err := d.writeLedger(unionKeys(owned, written)); err != nil {
				d.log.Warn("config ledger after a failed apply", "error", err)
			}
		}()
	}
	d.reb.configure(next.Services)
	for _, k := range untracked {
		d.stopTracker(k)
	}
	if err := d.setServices("config", changed...); err != nil {
		return err
	}
	for _, s := range next.Services {
		if !s.Tracked() {
			continue
		}
		svc, _ := s.Datapath()
		svc = want[svc.Key()]
		if ts := d.trackers[svc.Key()]; ts != nil && ts.sameConfig(s) {
			continue
		}
		if err := d.startTracker(d.runCtx, s, svc); err != nil {
			return err
		}
	}
	// Gone from the config: what the ledger holds (VIPs of earlier
	// configs, this run's or a run before a restart) and prev's.
	gone := owned
	if prev != nil {
		for _, s := range prev.Services {
			if old, err := s.Datapath(); err == nil {
				gone = append(gone, old.Key())
			}
		}
	}
	for _, k := range unionKeys(gone, nil) {
		if want[k].VIP.IsValid() {
			continue
		}
		d.stopTracker(k)
		if _, err := d.deleteService("removed from config", k); err != nil {
			return err
		}
	}
	if !ledger {
		return nil
	}
	return d.writeLedger(wantKeys)
}

// unionKeys is a and b without duplicates.
func unionKeys(a, b []datapath.ServiceKey) []datapath.ServiceKey {
	seen := map[datapath.ServiceKey]bool{}
	var out []datapath.ServiceKey
	for _, k := range slices.Concat(a, b) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	return out
}

func sameService(a, b datapath.Service) bool {
	a, b = a.Normalized(), b.Normalized()
	if a.Key() != b.Key() || a.Empty != b.Empty || a.Balance != b.Balance || a.OnServerRemoved != b.OnServerRemoved || len(a.Servers) != len(b.Servers) {
		return false
	}
	for i := range a.Servers {
		if a.Servers[i] != b.Servers[i] {
			return false
		}
	}
	return true
}

// reloadProxy applies a new proxy section: its services change at runtime
// (in steering mode, without a new socket); turning the proxy on or off, or
// changing its mode or timeouts, waits for a restart.
func (d *Daemon) reloadProxy(prev, next *config.Config) error {
	switch {
	case d.proxy == nil && next.Proxy == nil:
		return nil
	case d.proxy == nil || next.Proxy == nil:
		d.log.Warn("reload: the proxy is turned on or off only with a restart")
		next.Proxy = prev.Proxy
		return nil
	}
	if changed := restartOnlyChanges(*prev.Proxy, *next.Proxy, "proxy.", "Services"); len(changed) > 0 {
		d.log.Warn("reload: these proxy settings change only with a restart and keep their running values; services apply now",
			"fields", changed)
	}
	if err := d.proxy.SetServices(next.Proxy.Services); err != nil {
		return err
	}
	// What runs is prev's settings with next's services: a later reload
	// compares against that, and warns again while the file differs.
	running := *prev.Proxy
	running.Services = next.Proxy.Services
	next.Proxy = &running
	d.log.Info("proxy services reloaded", "listening", d.proxy.Listening())
	return nil
}

// restartOnlyChanges names, as the config file spells them (after
// prefix), the fields of two structs of one type that differ, skip aside.
func restartOnlyChanges[T any](a, b T, prefix string, skip ...string) []string {
	var out []string
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	for i := range va.NumField() {
		f := va.Type().Field(i)
		if slices.Contains(skip, f.Name) || reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		out = append(out, prefix+name)
	}
	return out
}
