package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/spf13/cobra"

	"github.com/ctlb/ctlb/internal/cniinstall"
	"github.com/ctlb/ctlb/internal/cniinstall/cniinstalltest"
	"github.com/ctlb/ctlb/internal/testutil"
)

// runCommand runs install-cni with args the way ctlbd's root command would
// and returns what it printed.
func runCommand(ctx context.Context, t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newInstallCNICommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

func TestCommandInstallUninstall(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/conf/in")
	o := newLayout(t, in)
	flags := []string{"--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.Plugin,
		"--bpffs", "/sys/fs/bpf/ctlb-test", "--socket", "/run/ctlb-test/ctlbd.sock"}

	out, err := runCommand(context.Background(), t, append(flags, "-o", "json")...)
	if err != nil {
		t.Fatalf("install-cni: %v\n%s", err, out)
	}
	var res cniinstall.Result
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&res); err != nil {
		t.Fatalf("-o json printed %q: %v", out, err)
	}
	want := cniinstall.Result{
		ConfFile:      filepath.Join(o.ConfDir, "10-mynet.conflist"),
		ConvertedFrom: filepath.Join(o.ConfDir, "10-mynet.conf"),
		Backup:        filepath.Join(o.ConfDir, "10-mynet.conf"+cniinstall.BackupSuffix),
		Action:        cniinstall.Inserted,
		Binary:        filepath.Join(o.BinDir, cniinstall.PluginType),
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
	wantConf := `{"type":"ctlb","bpffs":"/sys/fs/bpf/ctlb-test","socket":"/run/ctlb-test/ctlbd.sock","capabilities":{"cgroupPath":true,"io.kubernetes.cri.pod-annotations":true}}`
	var gotConf map[string]any
	if err := json.Unmarshal(last.Bytes, &gotConf); err != nil || gotConf["installedBy"] == nil {
		t.Fatalf("chained plugin %s (%v): want install-cni's installedBy mark", last.Bytes, err)
	}
	delete(gotConf, "installedBy")
	var wantMap map[string]any
	_ = json.Unmarshal([]byte(wantConf), &wantMap)
	if last.Network.Type != cniinstall.PluginType || !reflect.DeepEqual(gotConf, wantMap) {
		t.Errorf("chained plugin %s, want %s plus the mark", last.Bytes, wantConf)
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
	if got := cniinstalltest.Snapshot(t, o.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("conf dir after --uninstall:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
}

// --state-dir goes into the entry when it is not the plugin's default, in
// a dry run too (which writes nothing), and the entry stays install-cni's
// own: the same install again is unchanged, another state dir updates it.
func TestCommandStateDir(t *testing.T) {
	o := newLayout(t, cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/flannel/in"))
	conf := filepath.Join(o.ConfDir, "10-flannel.conflist")
	flags := []string{"--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.Plugin, "-o", "json"}
	install := func(stateDir string, extra ...string) cniinstall.Result {
		t.Helper()
		out, err := runCommand(context.Background(), t, append(append(flags, "--state-dir", stateDir), extra...)...)
		var res cniinstall.Result
		if err != nil || json.Unmarshal([]byte(out), &res) != nil {
			t.Fatalf("install-cni --state-dir %s %v: %v, printed %q", stateDir, extra, err, out)
		}
		return res
	}
	stateDirOf := func() (string, bool) {
		t.Helper()
		list, err := libcni.ConfListFromFile(conf)
		if err != nil {
			t.Fatal(err)
		}
		var entry map[string]any
		if err := json.Unmarshal(list.Plugins[len(list.Plugins)-1].Bytes, &entry); err != nil {
			t.Fatal(err)
		}
		v, ok := entry["stateDir"].(string)
		return v, ok
	}

	if res := install("/run/ctlb-b", "--dry-run"); !res.DryRun || res.Action != cniinstall.Inserted {
		t.Errorf("--dry-run: %+v, want a dry run that would insert", res)
	}
	if v, ok := stateDirOf(); ok {
		t.Fatalf("--dry-run wrote an entry with stateDir %q", v)
	}
	if res := install("/run/ctlb-b"); res.Action != cniinstall.Inserted {
		t.Errorf("install: %+v, want inserted", res)
	}
	if v, _ := stateDirOf(); v != "/run/ctlb-b" {
		t.Errorf("entry has stateDir %q, want /run/ctlb-b", v)
	}
	if res := install("/run/ctlb-b"); res.Action != cniinstall.Unchanged {
		t.Errorf("same install again: %+v, want unchanged", res)
	}
	if res := install("/run/ctlb-c", "--dry-run"); res.Action != cniinstall.Updated {
		t.Errorf("--dry-run with another state dir: %+v, want it to say updated", res)
	}
	if res := install("/run/ctlb-c"); res.Action != cniinstall.Updated {
		t.Errorf("another state dir: %+v, want updated (the entry is install-cni's own)", res)
	}
	if v, _ := stateDirOf(); v != "/run/ctlb-c" {
		t.Errorf("entry has stateDir %q, want /run/ctlb-c", v)
	}
	if res := install("/run/ctlb"); res.Action != cniinstall.Updated {
		t.Errorf("the default state dir: %+v, want updated", res)
	}
	if v, ok := stateDirOf(); ok {
		t.Errorf("entry names the default stateDir %q: a default install names none", v)
	}
}

func TestCommandWatchUntilCancelled(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/flannel/in")
	o := newLayout(t, in)
	conf := filepath.Join(o.ConfDir, "10-flannel.conflist")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := runCommand(ctx, t, "--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.Plugin, "--watch")
		done <- err
	}()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("install-cni --watch returned %v after cancel", err)
			}
		case <-time.After(installWait):
			t.Errorf("install-cni --watch still running %v after cancel", installWait)
		}
	}()
	waitFor(t, "--watch installs", chainedCond(conf))
	if err := os.WriteFile(conf, in["10-flannel.conflist"], 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "--watch re-inserts", chainedCond(conf))
}

func TestCommandRejectsBadFlags(t *testing.T) {
	o := newLayout(t, cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/flannel/in"))
	base := []string{"--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.Plugin}
	for _, bad := range [][]string{
		{"--watch", "--uninstall"},
		{"-o", "xml"},
		{"extra-arg"},
		{"--no-such-flag"},
		{"--state-dir", "run/ctlb"},
		{"--state-dir", "/run/ctlb/../x"},
		{"--bpffs", ""},
	} {
		if out, err := runCommand(context.Background(), t, append(base, bad...)...); err == nil {
			t.Errorf("install-cni %v accepted; printed %q", bad, out)
		}
	}
	if left := cniinstalltest.Snapshot(t, o.BinDir); len(left) != 0 {
		t.Errorf("rejected invocations installed %v", cniinstalltest.Keys(left))
	}
}

// TestCommandUnderRoot runs install-cni as a subcommand of a root that has
// ctlbd's persistent --socket and -o flags: the subcommand's own flags of
// the same names must win, not clash.
func TestCommandUnderRoot(t *testing.T) {
	o := newLayout(t, cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/bridge/in"))
	root := &cobra.Command{Use: "ctlbd", SilenceUsage: true, SilenceErrors: true}
	var rootSocket, rootOutput string
	root.PersistentFlags().StringVar(&rootSocket, "socket", "/run/ctlb/ctlbd.sock", "")
	root.PersistentFlags().StringVarP(&rootOutput, "output", "o", "table", "")
	root.AddCommand(newInstallCNICommand())
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"install-cni", "--conf-dir", o.ConfDir, "--bin-dir", o.BinDir, "--plugin", o.Plugin,
		"--socket", "/run/other/ctlbd.sock", "-o", "json"})
	if err := root.Execute(); err != nil {
		t.Fatalf("ctlbd install-cni: %v", err)
	}
	var res cniinstall.Result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Action != cniinstall.Inserted {
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
	f := newInstallCNICommand().Flags()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"bin-dir":   "/opt/cni/bin",
		"conf-dir":  "/etc/cni/net.d",
		"plugin":    filepath.Join(filepath.Dir(exe), "ctlb"),
		"bpffs":     "/sys/fs/bpf/ctlb",
		"socket":    "/run/ctlb/ctlbd.sock",
		"state-dir": "/run/ctlb",
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
	opts := newLayout(t, nil)
	flags := []string{"--bin-dir", opts.BinDir, "--conf-dir", opts.ConfDir, "--plugin", opts.Plugin}
	out, err := runCommand(context.Background(), t, append(flags, "--wait-for-config", "300ms")...)
	if err == nil || !strings.Contains(err.Error(), "after waiting 300ms") || !strings.Contains(out, "waiting for the primary CNI") {
		t.Fatalf("install-cni with no config and a 300ms wait: %v, printed %q; want a bounded wait, logged, then an error", err, out)
	}
	in := cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/flannel/in")
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
		in := cniinstalltest.Snapshot(t, "../../internal/cniinstall/testdata/flannel/in")
		opts := newLayout(t, in)
		conf := filepath.Join(opts.ConfDir, "10-flannel.conflist")
		flags := []string{"--bin-dir", opts.BinDir, "--conf-dir", opts.ConfDir, "--plugin", opts.Plugin, "--watch"}
		if onExit {
			flags = append(flags, "--uninstall-on-exit")
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := runCommand(ctx, t, flags...); done <- err }()
		waitFor(t, "install", chainedCond(conf))
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("install-cni --watch (uninstall-on-exit %v): %v", onExit, err)
			}
		case <-time.After(installWait):
			t.Fatalf("install-cni --watch did not stop within %v", installWait)
		}
		if chained(conf) == onExit {
			t.Fatalf("uninstall-on-exit %v: ctlb chained after exit: %v", onExit, chained(conf))
		}
		if _, err := os.Stat(filepath.Join(opts.BinDir, cniinstall.PluginType)); err != nil {
			t.Fatalf("plugin binary gone after exit: %v", err)
		}
	}
	if _, err := runCommand(context.Background(), t, "--uninstall-on-exit"); err == nil || !strings.Contains(err.Error(), "needs --watch") {
		t.Fatalf("--uninstall-on-exit without --watch: %v", err)
	}
}

// installWait bounds every wait of these tests.
const installWait = 10 * time.Second

// newLayout is a conf dir holding files, an empty bin dir and a stand-in
// plugin binary.
func newLayout(t *testing.T, files map[string][]byte) cniinstalltest.Layout {
	t.Helper()
	return cniinstalltest.NewLayout(t, cniinstall.PluginType, files)
}

// chainedCond is a wait condition: ctlb chained in file, whose content is
// what a timeout shows.
func chainedCond(file string) func() (bool, string) {
	return func() (bool, string) {
		b, err := os.ReadFile(file)
		return chained(file), fmt.Sprintf("%s holds %s (%v)", file, b, err)
	}
}

func chained(file string) bool { return cniinstalltest.Chained(file, cniinstall.PluginType) }

func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	testutil.Eventually(t, what, installWait, cond)
}
