package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// configSettle is how long the watcher waits after the last event in the
// config's directory before it reads the file: an editor's save or the
// kubelet's update is several events in a row.
const configSettle = 200 * time.Millisecond

// configRecheck re-reads the file now and then even without an event, in
// case an event was missed (inotify queue overflow).
const configRecheck = time.Minute

// watchConfig applies the config file whenever its content changes, as
// Reload (SIGHUP, `ctlbd reload`) does. It watches the file's directory,
// not the file: a Kubernetes ConfigMap volume replaces the file by
// swapping the ..data symlink (a rename in the directory), editors save
// by renaming a new file over the old, and both leave a watch on the old
// inode behind. A content that fails to load is logged once and the old
// config stays, as with any reload.
func (d *Daemon) watchConfig(ctx context.Context) error {
	dir := filepath.Dir(d.cfgPath)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch config: %w", err)
	}
	if err := w.Add(dir); err != nil {
		w.Close()
		return fmt.Errorf("watch config directory %s: %w", dir, err)
	}
	last, _ := os.ReadFile(d.cfgPath) // what Run applied
	d.ready.configWatch.Store(true)
	go func() {
		defer w.Close()
		defer d.ready.configWatch.Store(false)
		settle := time.NewTimer(time.Hour)
		settle.Stop()
		recheck := time.NewTicker(configRecheck)
		defer recheck.Stop()
		check := func() {
			cur, err := os.ReadFile(d.cfgPath)
			if err != nil || bytes.Equal(cur, last) {
				return // mid-swap, or unchanged (a touch, another file)
			}
			last = cur
			d.log.Info("config file changed", "path", d.cfgPath)
			if err := d.Reload(); err != nil {
				d.log.Error("config file change not applied", "path", d.cfgPath, "error", err)
			}
		}
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-w.Events:
				if !ok {
					return
				}
				settle.Reset(configSettle)
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				d.log.Warn("config watch", "error", err)
				settle.Reset(configSettle)
			case <-settle.C:
				check()
			case <-recheck.C:
				check()
			}
		}
	}()
	d.log.Info("watching the config file", "path", d.cfgPath)
	return nil
}
