package cniinstall

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"
)

// settle is how long Watch lets a burst of events (a writer's create, write,
// chmod and rename) go quiet before it looks at the result, so it reads a
// finished file and re-inserts once per rewrite.
const settle = 150 * time.Millisecond

// Watch installs, then keeps ctlb chained: whenever another agent rewrites
// the network configs (a primary CNI's own installer that writes its file
// without ctlb, a new config that sorts first) or removes the plugin binary,
// it runs Install again. Install writes nothing when all is in place, so
// Watch's own writes do not feed back into it. A config that cannot be
// fixed yet (none written yet, a half-written file) is logged and retried
// on the next event and every Resync. Watch returns nil when ctx ends.
func Watch(ctx context.Context, opts Options) error {
	s, err := opts.validate(true)
	if err != nil {
		return fmt.Errorf("cni watch: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	resync := opts.Resync
	if resync <= 0 {
		resync = 30 * time.Second
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("cni watch: %w", err)
	}
	defer w.Close()
	// Directories, not files: agents replace files by rename, which a watch
	// on the old inode would miss.
	for _, dir := range []string{opts.ConfDir, opts.BinDir} {
		if err := w.Add(dir); err != nil {
			return fmt.Errorf("cni watch %s: %w", dir, err)
		}
	}

	var lastErr string
	var lastAction Action
	check := func(why string) {
		res, err := Install(opts)
		switch {
		case err != nil:
			// Quiet while the same thing stays wrong (say, no config yet).
			if err.Error() != lastErr {
				level := slog.LevelWarn
				if errors.Is(err, ErrNoNetworkConfig) {
					level = slog.LevelInfo
				}
				log.Log(ctx, level, "cni config not installed yet", "reason", why, "error", err)
			}
			lastErr = err.Error()
		case res.Action == Kept && lastAction == Kept && !res.BinaryUpdated && lastErr == "":
			log.Debug("cni config: ctlb entry kept as found", "reason", why, "conf", res.ConfFile)
		case res.Action != Unchanged || res.BinaryUpdated || lastErr != "":
			log.Info("cni config installed", "reason", why, "conf", res.ConfFile,
				"action", res.Action, "note", res.Note, "convertedFrom", res.ConvertedFrom, "binaryUpdated", res.BinaryUpdated)
			lastErr = ""
		default:
			log.Debug("cni config in place", "reason", why, "conf", res.ConfFile)
		}
		if err == nil {
			lastAction = res.Action
		}
	}
	check("start")

	timer := time.NewTimer(0)
	if !timer.Stop() {
		<-timer.C
	}
	defer timer.Stop()
	ticker := time.NewTicker(resync)
	defer ticker.Stop()
	why := ""
	for {
		select {
		case <-ctx.Done():
			if opts.UninstallOnExit {
				// The DaemonSet is going away: a node left with ctlb chained
				// and no ctlbd fails every ADD once a reboot wiped the pins.
				// The binary stays, for the DELs of pods set up with ctlb.
				u := opts
				u.KeepBinary = true
				if _, err := Uninstall(u); err != nil {
					return fmt.Errorf("cni watch: uninstall on exit: %w", err)
				}
				log.Info("ctlb removed from the network configs on exit (--uninstall-on-exit); plugin binary kept", "confDir", opts.ConfDir)
			}
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("cni watch: watcher closed")
			}
			if !relevant(ev, opts.ConfDir, opts.BinDir, s.pluginType) {
				continue
			}
			why = ev.String()
			timer.Reset(settle)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("cni watch: watcher closed")
			}
			// An overflow loses events: look at everything again.
			log.Warn("cni watch error, re-checking", "error", err)
			why = "watch error"
			timer.Reset(settle)
		case <-timer.C:
			check(why)
		case <-ticker.C:
			check("resync")
		}
	}
}

// relevant picks the events that can change what Install would do: any
// network config file in the conf dir, and the plugin binary in the bin dir.
// ctlb's own temporary files and backups are neither.
func relevant(ev fsnotify.Event, confDir, binDir, binName string) bool {
	dir, name := filepath.Dir(ev.Name), filepath.Base(ev.Name)
	if filepath.Clean(dir) == filepath.Clean(confDir) && slices.Contains(confExtensions, filepath.Ext(name)) {
		return true
	}
	return filepath.Clean(dir) == filepath.Clean(binDir) && name == binName &&
		ev.Has(fsnotify.Remove|fsnotify.Rename|fsnotify.Write|fsnotify.Chmod)
}
