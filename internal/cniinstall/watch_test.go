package cniinstall

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

// waitLimit bounds every wait for Watch; it reacts within settle (150 ms)
// of an event, so the limit is only reached when it does not react at all.
const waitLimit = 10 * time.Second

// startWatch runs Watch on opts until the test ends and checks that it then
// returns nil promptly.
func startWatch(t *testing.T, opts Options) {
	t.Helper()
	opts.Logger = slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.Resync = time.Hour // events alone must do it
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch returned %v after cancel, want nil", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("Watch did not return within %v of cancel", waitLimit)
		}
	})
}

// TestWatchReinserts: Watch installs, then puts ctlb back after each kind
// of rewrite a primary CNI's installer does, leaves a half-written file
// alone until it is complete, restores a removed binary, follows a new
// first file, and does not rewrite anything once all is in place.
func TestWatchReinserts(t *testing.T) {
	in := snapshot(t, "testdata/calico/in")
	opts := newOpts(t, in)
	conf := filepath.Join(opts.ConfDir, "10-calico.conflist")
	orig := in["10-calico.conflist"]
	startWatch(t, opts)
	waitFor(t, "initial install", func() bool { return chained(conf) })

	// Settled: no feedback loop from Watch's own writes.
	fi1, _ := os.Stat(conf)
	time.Sleep(4 * settle)
	fi2, _ := os.Stat(conf)
	if !os.SameFile(fi1, fi2) || !fi1.ModTime().Equal(fi2.ModTime()) {
		t.Errorf("Watch rewrote %s with nothing to fix", conf)
	}

	// Another installer writes its file atomically, without ctlb.
	tmp := filepath.Join(opts.ConfDir, ".calico-install.tmp")
	if err := os.WriteFile(tmp, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, conf); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "re-insert after an atomic rewrite", func() bool { return chained(conf) })

	// ... or in place, truncating first.
	if err := os.WriteFile(conf, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "re-insert after an in-place rewrite", func() bool { return chained(conf) })

	// A half-written file is not ours to fix; once complete, it is.
	half := orig[:len(orig)/2]
	if err := os.WriteFile(conf, half, 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * settle)
	if got, _ := os.ReadFile(conf); string(got) != string(half) {
		t.Fatalf("Watch changed a half-written file:\n%s", got)
	}
	if err := os.WriteFile(conf, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "re-insert once the file is complete", func() bool { return chained(conf) })

	// The binary is deleted (a node cleanup script, another installer).
	bin := filepath.Join(opts.BinDir, PluginType)
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "binary restored", func() bool {
		_, err := os.Stat(bin)
		return err == nil
	})

	// A new config that sorts first becomes the runtime's: ctlb follows.
	first := filepath.Join(opts.ConfDir, "05-cilium.conflist")
	cilium, err := os.ReadFile("testdata/cilium-chaining/in/05-cilium.conflist")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(first, cilium, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "insert into the new first file", func() bool { return chained(first) })
}

// TestWatchWaitsForFirstConfig: started before the primary CNI has written
// its config (a fresh node), Watch installs as soon as it appears.
func TestWatchWaitsForFirstConfig(t *testing.T) {
	opts := newOpts(t, nil)
	startWatch(t, opts)
	time.Sleep(2 * settle)
	if _, err := os.Stat(filepath.Join(opts.BinDir, PluginType)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("binary installed with no network config to chain it into (err %v)", err)
	}
	flannel, err := os.ReadFile("testdata/flannel/in/10-flannel.conflist")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(opts.ConfDir, "10-flannel.conflist")
	if err := os.WriteFile(conf, flannel, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "install once the config appears", func() bool { return chained(conf) })
	checkBinary(t, opts)
}

func TestWatchRejectsBadOptions(t *testing.T) {
	opts := newOpts(t, nil)
	opts.ConfDir = filepath.Join(t.TempDir(), "missing")
	err := Watch(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Watch on a missing conf dir: %v, want an error naming it", err)
	}
	opts = newOpts(t, nil)
	opts.PluginConf = nil
	if err := Watch(context.Background(), opts); err == nil {
		t.Errorf("Watch accepted an empty PluginConf")
	}
}

// chained reports whether libcni loads file with ctlb in its chain.
func chained(file string) bool {
	list, err := libcni.ConfListFromFile(file)
	if err != nil {
		return false
	}
	for _, p := range list.Plugins {
		if p.Network.Type == PluginType {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, waitLimit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// The watcher keeps a ctlb entry someone edited after install-cni wrote
// it: it does not revert the edit, on events or on resync.
func TestWatchKeepsCustomisedEntry(t *testing.T) {
	in := snapshot(t, "testdata/flannel/in")
	opts := newOpts(t, in)
	conf := filepath.Join(opts.ConfDir, "10-flannel.conflist")
	startWatch(t, opts)
	waitFor(t, "initial install", func() bool { return chained(conf) })
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	edited := strings.Replace(string(b), `"/run/ctlb/ctlbd.sock"`, `"/run/ctlb/edited.sock"`, 1)
	if edited == string(b) {
		t.Fatalf("installed conflist has no socket to edit:\n%s", b)
	}
	if err := os.WriteFile(conf, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(6 * settle)
	if now, _ := os.ReadFile(conf); string(now) != edited {
		t.Fatalf("Watch reverted the edited entry:\n%s", now)
	}
}
