package cniinstall

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/spf13/cobra"
)

// runCommand runs install-cni with args the way ctlbd's root command would
// and returns what it printed.
func runCommand(ctx context.Context, t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := NewCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

func TestCommandInstallUninstall(t *testing.T) {
	in := snapshot(t, "testdata/conf/in")
	o := newOpts(t, in)
	flags := []string{"--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.SourceBinary,
		"--bpffs", "/sys/fs/bpf/ctlb-test", "--socket", "/run/ctlb-test/ctlbd.sock"}

	out, err := runCommand(context.Background(), t, append(flags, "-o", "json")...)
	if err != nil {
		t.Fatalf("install-cni: %v\n%s", err, out)
	}
	var res Result
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&res); err != nil {
		t.Fatalf("-o json printed %q: %v", out, err)
	}
	want := Result{
		ConfFile:      filepath.Join(o.ConfDir, "10-mynet.conflist"),
		ConvertedFrom: filepath.Join(o.ConfDir, "10-mynet.conf"),
		Backup:        filepath.Join(o.ConfDir, "10-mynet.conf"+BackupSuffix),
		Action:        Inserted,
		Binary:        filepath.Join(o.BinDir, PluginType),
		BinaryUpdated: true,
	}
	if res != want {
		t.Errorf("result %+v, want %+v", res, want)
	}
	list, err := libcni.ConfListFromFile(res.ConfFile)
	if err != nil {
		t.Fatal(err)
	}
	last := list.Plugins[len(list.Plugins)-1]
	wantConf := `{"type":"ctlb","bpffs":"/sys/fs/bpf/ctlb-test","socket":"/run/ctlb-test/ctlbd.sock","capabilities":{"cgroupPath":true}}`
	if last.Network.Type != PluginType || !sameJSON(last.Bytes, mark([]byte(wantConf))) || kindOf(last.Bytes) != ours {
		t.Errorf("chained plugin %s, want %s", last.Bytes, wantConf)
	}

	out, err = runCommand(context.Background(), t, flags...)
	if err != nil || !strings.Contains(out, "ctlb unchanged") {
		t.Errorf("second install-cni: %v, printed %q, want it to say unchanged", err, out)
	}

	out, err = runCommand(context.Background(), t, append(flags, "--uninstall", "-o", "json")...)
	if err != nil {
		t.Fatalf("install-cni --uninstall: %v\n%s", err, out)
	}
	var un map[string]any
	if err := json.Unmarshal([]byte(out), &un); err != nil || un["uninstalled"] != true {
		t.Errorf("--uninstall -o json printed %q (%v)", out, err)
	}
	if got := snapshot(t, o.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("conf dir after --uninstall:\n%s", diffSnapshots(got, in))
	}
}

func TestCommandWatchUntilCancelled(t *testing.T) {
	in := snapshot(t, "testdata/flannel/in")
	o := newOpts(t, in)
	conf := filepath.Join(o.ConfDir, "10-flannel.conflist")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := runCommand(ctx, t, "--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.SourceBinary, "--watch")
		done <- err
	}()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("install-cni --watch returned %v after cancel", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("install-cni --watch still running %v after cancel", waitLimit)
		}
	}()
	waitFor(t, "--watch installs", func() bool { return chained(conf) })
	if err := os.WriteFile(conf, in["10-flannel.conflist"], 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "--watch re-inserts", func() bool { return chained(conf) })
}

func TestCommandRejectsBadFlags(t *testing.T) {
	o := newOpts(t, snapshot(t, "testdata/flannel/in"))
	base := []string{"--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.SourceBinary}
	for _, bad := range [][]string{
		{"--watch", "--uninstall"},
		{"-o", "yaml"},
		{"extra-arg"},
		{"--no-such-flag"},
	} {
		if out, err := runCommand(context.Background(), t, append(base, bad...)...); err == nil {
			t.Errorf("install-cni %v accepted; printed %q", bad, out)
		}
	}
	if left := snapshot(t, o.BinDir); len(left) != 0 {
		t.Errorf("rejected invocations installed %v", keys(left))
	}
}

// TestCommandUnderRoot runs install-cni as a subcommand of a root that has
// ctlbd's persistent --socket and -o flags: the subcommand's own flags of
// the same names must win, not clash.
func TestCommandUnderRoot(t *testing.T) {
	o := newOpts(t, snapshot(t, "testdata/bridge/in"))
	root := &cobra.Command{Use: "ctlbd", SilenceUsage: true, SilenceErrors: true}
	var rootSocket, rootOutput string
	root.PersistentFlags().StringVar(&rootSocket, "socket", "/run/ctlb/ctlbd.sock", "")
	root.PersistentFlags().StringVarP(&rootOutput, "output", "o", "table", "")
	root.AddCommand(NewCommand())
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"install-cni", "--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.SourceBinary,
		"--socket", "/run/other/ctlbd.sock", "-o", "json"})
	if err := root.Execute(); err != nil {
		t.Fatalf("ctlbd install-cni: %v", err)
	}
	var res Result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Action != Inserted {
		t.Fatalf("printed %q (%v), want a JSON result with action inserted", out.String(), err)
	}
	list, err := libcni.ConfListFromFile(res.ConfFile)
	if err != nil {
		t.Fatal(err)
	}
	last := list.Plugins[len(list.Plugins)-1]
	if !strings.Contains(string(last.Bytes), `"socket":"/run/other/ctlbd.sock"`) {
		t.Errorf("ctlb entry %s does not carry --socket", last.Bytes)
	}
}

func TestCommandDefaults(t *testing.T) {
	f := NewCommand().Flags()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"bin-dir":  "/opt/cni/bin",
		"conf-dir": "/etc/cni/net.d",
		"plugin":   filepath.Join(filepath.Dir(exe), "ctlb"),
		"bpffs":    "/sys/fs/bpf/ctlb",
		"socket":   "/run/ctlb/ctlbd.sock",
	}
	for name, v := range want {
		fl := f.Lookup(name)
		if fl == nil || fl.DefValue != v {
			t.Errorf("--%s default %v, want %q", name, fl, v)
		}
	}
	if f.ShorthandLookup("o") == nil {
		t.Errorf("no -o shorthand for --output")
	}
}

// The init container starts before the primary CNI has written its config:
// install-cni waits for it (bounded), saying why, instead of failing into a
// CrashLoop; past the limit it fails naming the wait.
func TestCommandWaitsForPrimaryConfig(t *testing.T) {
	opts := newOpts(t, nil)
	flags := []string{"--bin-dir", opts.BinDir, "--conf-dir", opts.ConfDir, "--plugin", opts.SourceBinary}
	out, err := runCommand(context.Background(), t, append(flags, "--wait-for-config", "300ms")...)
	if err == nil || !strings.Contains(err.Error(), "after waiting 300ms") || !strings.Contains(out, "waiting for the primary CNI") {
		t.Fatalf("install-cni with no config and a 300ms wait: %v, printed %q; want a bounded wait, logged, then an error", err, out)
	}
	in := snapshot(t, "testdata/flannel/in")
	go func() {
		// As the primary CNI's installer does: atomically, a while later.
		time.Sleep(700 * time.Millisecond)
		tmp := filepath.Join(opts.ConfDir, ".flannel.tmp")
		if os.WriteFile(tmp, in["10-flannel.conflist"], 0o644) == nil {
			_ = os.Rename(tmp, filepath.Join(opts.ConfDir, "10-flannel.conflist"))
		}
	}()
	start := time.Now()
	out, err = runCommand(context.Background(), t, append(flags, "--wait-for-config", "20s")...)
	if err != nil || !strings.Contains(out, "ctlb inserted") {
		t.Fatalf("install-cni while the config appears: %v, printed %q", err, out)
	}
	t.Logf("install-cni waited %s for the primary config", time.Since(start).Round(10*time.Millisecond))
}

// --uninstall-on-exit: the watcher takes ctlb out when stopped, keeping the
// binary for the DELs of pods set up with ctlb; without it, ctlb stays.
func TestCommandUninstallOnExit(t *testing.T) {
	for _, onExit := range []bool{false, true} {
		in := snapshot(t, "testdata/flannel/in")
		opts := newOpts(t, in)
		conf := filepath.Join(opts.ConfDir, "10-flannel.conflist")
		flags := []string{"--bin-dir", opts.BinDir, "--conf-dir", opts.ConfDir, "--plugin", opts.SourceBinary, "--watch"}
		if onExit {
			flags = append(flags, "--uninstall-on-exit")
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := runCommand(ctx, t, flags...); done <- err }()
		waitFor(t, "install", func() bool { return chained(conf) })
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("install-cni --watch (uninstall-on-exit %v): %v", onExit, err)
			}
		case <-time.After(waitLimit):
			t.Fatalf("install-cni --watch did not stop within %v", waitLimit)
		}
		if chained(conf) == onExit {
			t.Fatalf("uninstall-on-exit %v: ctlb chained after exit: %v", onExit, chained(conf))
		}
		if _, err := os.Stat(filepath.Join(opts.BinDir, PluginType)); err != nil {
			t.Fatalf("plugin binary gone after exit: %v", err)
		}
	}
	if _, err := runCommand(context.Background(), t, "--uninstall-on-exit"); err == nil || !strings.Contains(err.Error(), "needs --watch") {
		t.Fatalf("--uninstall-on-exit without --watch: %v", err)
	}
}
