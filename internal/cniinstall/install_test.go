package cniinstall

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/cniinstall/cniinstalltest"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

var update = flag.Bool("update", false, "rewrite testdata/*/out from what Install writes")

// testPlugin is the entry Install writes: the config asked for, marked.
var testPlugin = mark(NewPluginConf(datapath.DefaultDir, api.DefaultSocket, api.DefaultStateDir))

// goldenActions is what Install must report for each case in testdata that
// installs; the others (malformed-*) hold an error.txt instead.
var goldenActions = map[string]Action{
	"calico":          Inserted,
	"flannel":         Inserted,
	"cilium-chaining": Inserted,
	"bridge":          Inserted,
	"has-ctlb":        Unchanged,
	"stale-ctlb":      Updated,
	"conf":            Inserted,
	"first-by-name":   Inserted,
	"raw-bytes":       Inserted,
}

// TestInstallGolden runs Install, Install again, Uninstall and Uninstall
// again on a copy of each testdata/<case>/in and checks the directory after
// each step: against testdata/<case>/out after Install, against in/ (plugin
// by plugin, byte for byte modulo whitespace) after Uninstall.
func TestInstallGolden(t *testing.T) {
	entries, err := os.ReadDir("testdata")
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		name := e.Name()
		seen++
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			caseDir := filepath.Join("testdata", name)
			in := cniinstalltest.Snapshot(t, filepath.Join(caseDir, "in"))
			opts := newOpts(t, in)
			if wantErr, err := os.ReadFile(filepath.Join(caseDir, "error.txt")); err == nil {
				checkRejected(t, opts, in, strings.TrimSpace(string(wantErr)))
				return
			}
			wantAction, ok := goldenActions[name]
			if !ok {
				t.Fatalf("testdata/%s has no error.txt and no entry in goldenActions", name)
			}
			checkInstall(t, opts, caseDir, wantAction)
			checkUninstall(t, opts, in)
		})
	}
	if seen < 14 {
		t.Fatalf("found %d golden cases in testdata, want at least 14", seen)
	}
}

func checkInstall(t *testing.T, opts Options, caseDir string, wantAction Action) {
	t.Helper()
	res, err := Install(opts)
	if err != nil {
		t.Fatalf("Install: %v", err)
	}
	if res.Action != wantAction {
		t.Errorf("Action = %q, want %q", res.Action, wantAction)
	}
	if !res.BinaryUpdated || res.Binary != filepath.Join(opts.BinDir, PluginType) {
		t.Errorf("binary: got %s updated=%v, want %s updated", res.Binary, res.BinaryUpdated, filepath.Join(opts.BinDir, PluginType))
	}
	checkBinary(t, opts)

	got := cniinstalltest.Snapshot(t, opts.ConfDir)
	outDir := filepath.Join(caseDir, "out")
	if *update {
		cniinstalltest.WriteSnapshot(t, outDir, got)
	}
	if want := cniinstalltest.Snapshot(t, outDir); !reflect.DeepEqual(got, want) {
		t.Errorf("conf dir after Install differs from %s:\n%s", outDir, cniinstalltest.DiffSnapshots(got, want))
	}

	// The runtime's view: libcni picks the same file, loads it, and finds
	// ctlb chained with our config.
	first, err := firstConfFile(opts.ConfDir)
	if err != nil {
		t.Fatal(err)
	}
	if first != res.ConfFile {
		t.Errorf("runtime would load %s, Install reported %s", first, res.ConfFile)
	}
	list, err := libcni.ConfListFromFile(first)
	if err != nil {
		t.Fatalf("libcni cannot load %s: %v", first, err)
	}
	var found int
	for _, p := range list.Plugins {
		if p.Network.Type == PluginType {
			found++
			if !sameJSON(p.Bytes, testPlugin) {
				t.Errorf("ctlb entry %s, want %s", p.Bytes, testPlugin)
			}
		}
	}
	if found != 1 {
		t.Errorf("%s chains ctlb %d times, want once", first, found)
	}

	// Idempotent: a second run writes nothing at all.
	before := modTimes(t, opts.ConfDir)
	res2, err := Install(opts)
	if err != nil {
		t.Fatalf("second Install: %v", err)
	}
	if res2.Action != Unchanged || res2.BinaryUpdated || res2.ConfFile != res.ConfFile {
		t.Errorf("second Install = %+v, want unchanged, binary not updated, same file", res2)
	}
	if after := modTimes(t, opts.ConfDir); !reflect.DeepEqual(before, after) {
		t.Errorf("second Install touched files: before %v after %v", before, after)
	}
	if again := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(again, got) {
		t.Errorf("second Install changed the conf dir:\n%s", cniinstalltest.DiffSnapshots(again, got))
	}
}

func checkUninstall(t *testing.T, opts Options, in map[string][]byte) {
	t.Helper()
	for round := 1; round <= 2; round++ {
		if _, err := Uninstall(opts); err != nil {
			t.Fatalf("Uninstall round %d: %v", round, err)
		}
		got := cniinstalltest.Snapshot(t, opts.ConfDir)
		if !reflect.DeepEqual(cniinstalltest.Keys(got), cniinstalltest.Keys(in)) {
			t.Fatalf("round %d: conf dir has %v after Uninstall, want %v", round, cniinstalltest.Keys(got), cniinstalltest.Keys(in))
		}
		for name, want := range in {
			checkRestored(t, name, got[name], want)
		}
		if _, err := os.Stat(filepath.Join(opts.BinDir, PluginType)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("round %d: plugin binary still there after Uninstall (err %v)", round, err)
		}
		if left := cniinstalltest.Snapshot(t, opts.BinDir); len(left) != 0 {
			t.Errorf("round %d: bin dir not empty: %v", round, cniinstalltest.Keys(left))
		}
	}
}

// checkRestored compares a file after Uninstall with the original: equal
// bytes, or, for a rewritten conflist, equal bytes once whitespace is
// dropped; an original that chained ctlb itself must come back without it.
func checkRestored(t *testing.T, name string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if compact(t, got) == compact(t, want) {
		return
	}
	var g, w map[string]any
	if json.Unmarshal(got, &g) != nil || json.Unmarshal(want, &w) != nil {
		t.Errorf("%s after Uninstall:\n%s\nwant:\n%s", name, got, want)
		return
	}
	var kept []any
	for _, p := range w["plugins"].([]any) {
		if p.(map[string]any)["type"] != PluginType {
			kept = append(kept, p)
		}
	}
	w["plugins"] = kept
	if !reflect.DeepEqual(g, w) {
		t.Errorf("%s after Uninstall:\n%s\nwant the original less ctlb:\n%s", name, got, want)
	}
}

func checkRejected(t *testing.T, opts Options, in map[string][]byte, wantErr string) {
	t.Helper()
	_, err := Install(opts)
	if err == nil {
		t.Fatalf("Install accepted a config it must refuse")
	}
	t.Logf("Install: %v", err)
	for _, want := range []string{wantErr, "left untouched", cniinstalltest.Keys(in)[0]} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("conf dir changed by a failed Install:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
	if left := cniinstalltest.Snapshot(t, opts.BinDir); len(left) != 0 {
		t.Errorf("failed Install still wrote %v into the bin dir", cniinstalltest.Keys(left))
	}
	// Uninstall has nothing of ours to remove and must not touch the file;
	// a malformed conflist is reported, a malformed .conf is not ours to read.
	// A well-formed conflist of a version ctlb does not serve is simply
	// not ours.
	_, err = Uninstall(opts)
	malformed := !strings.Contains(wantErr, "cniVersion")
	if malformed && strings.HasSuffix(cniinstalltest.Keys(in)[0], ".conflist") && err == nil {
		t.Errorf("Uninstall did not report the malformed conflist")
	}
	if !malformed && err != nil {
		t.Errorf("Uninstall of a conflist without ctlb: %v", err)
	}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("conf dir changed by Uninstall:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
}

func TestInstallNoNetworkConfig(t *testing.T) {
	opts := newOpts(t, nil)
	_, err := Install(opts)
	if !errors.Is(err, ErrNoNetworkConfig) {
		t.Fatalf("Install on an empty conf dir: %v, want ErrNoNetworkConfig", err)
	}
	if left := cniinstalltest.Snapshot(t, opts.BinDir); len(left) != 0 {
		t.Errorf("Install without a config still installed %v", cniinstalltest.Keys(left))
	}
	opts.ConfDir = filepath.Join(t.TempDir(), "missing")
	if _, err := Install(opts); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Install with a missing conf dir: %v, want an error naming it", err)
	}
}

func TestInstallMissingSourceBinaryChangesNothing(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/calico/in")
	opts := newOpts(t, in)
	opts.SourceBinary = filepath.Join(t.TempDir(), "no-such-ctlb")
	_, err := Install(opts)
	if err == nil || !strings.Contains(err.Error(), "no-such-ctlb") {
		t.Fatalf("Install: %v, want an error naming the missing binary", err)
	}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("conf dir changed:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
}

func TestInstallRejectsBadPluginConf(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/flannel/in")
	for _, bad := range []string{``, `[]`, `null`, `{"bpffs": "/x"}`, `{"type": ""}`, `{"type": "../ctlb"}`, `{"type": 3}`, `{"type": "ctlb"`} {
		opts := newOpts(t, in)
		opts.PluginConf = json.RawMessage(bad)
		if _, err := Install(opts); err == nil || !strings.Contains(err.Error(), "PluginConf") {
			t.Errorf("PluginConf %q: err %v, want one naming PluginConf", bad, err)
		}
		if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
			t.Errorf("PluginConf %q changed the conf dir", bad)
		}
	}
}

// TestInstallKeepsModeAndOwner: a rewritten config keeps the permissions
// and owner its author gave it (Calico writes its files 0600 on some setups).
func TestInstallKeepsModeAndOwner(t *testing.T) {
	testutil.RequireRoot(t) // chown
	for _, c := range []string{"calico", "conf"} {
		in := cniinstalltest.Snapshot(t, filepath.Join("testdata", c, "in"))
		opts := newOpts(t, in)
		src, err := firstConfFile(opts.ConfDir)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(src, 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(src, 1234, 5678); err != nil {
			t.Fatal(err)
		}
		res, err := Install(opts)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(res.ConfFile)
		if err != nil {
			t.Fatal(err)
		}
		uid, gid := fileOwner(fi)
		if fi.Mode().Perm() != 0o640 || uid != 1234 || gid != 5678 {
			t.Errorf("%s: %s mode %o owner %d:%d, want 640 1234:5678", c, res.ConfFile, fi.Mode().Perm(), uid, gid)
		}
		if _, err := Uninstall(opts); err != nil {
			t.Fatal(err)
		}
		fi, err = os.Stat(src)
		if err != nil {
			t.Fatal(err)
		}
		uid, gid = fileOwner(fi)
		if fi.Mode().Perm() != 0o640 || uid != 1234 || gid != 5678 {
			t.Errorf("%s: restored %s mode %o owner %d:%d, want 640 1234:5678", c, src, fi.Mode().Perm(), uid, gid)
		}
	}
}

// TestInstallReconvertsRewrittenConf: the primary CNI writes its .conf
// again after ctlb converted it; the new .conf sorts first, so it is
// converted again and Uninstall restores the newest original.
func TestInstallReconvertsRewrittenConf(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/conf/in")
	opts := newOpts(t, in)
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(opts.ConfDir, "10-mynet.conf")
	newer := []byte(`{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni1", "ipam": {"type": "host-local", "subnet": "198.18.3.0/24"}}` + "\n")
	if err := os.WriteFile(conf, newer, 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.ConvertedFrom != conf || res.Action != Inserted {
		t.Errorf("Install after the rewrite = %+v, want %s converted and ctlb inserted", res, conf)
	}
	if _, err := Uninstall(opts); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"10-mynet.conf": newer}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, want) {
		t.Errorf("after Uninstall:\n%s", cniinstalltest.DiffSnapshots(got, want))
	}
}

// TestUninstallKeepsOthersLaterEdits: when someone changed the converted
// conflist after Install, Uninstall removes only ctlb and keeps their edit
// rather than restoring the stale .conf.
func TestUninstallKeepsOthersLaterEdits(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/conf/in")
	opts := newOpts(t, in)
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	var list map[string]any
	data, _ := os.ReadFile(res.ConfFile)
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatal(err)
	}
	list["plugins"] = append([]any{list["plugins"].([]any)[0], map[string]any{"type": "portmap", "capabilities": map[string]any{"portMappings": true}}}, list["plugins"].([]any)[1:]...)
	edited, _ := json.Marshal(list)
	if err := os.WriteFile(res.ConfFile, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Uninstall(opts); err != nil {
		t.Fatal(err)
	}
	got := cniinstalltest.Snapshot(t, opts.ConfDir)
	if !reflect.DeepEqual(cniinstalltest.Keys(got), []string{"10-mynet.conflist"}) {
		t.Fatalf("after Uninstall: %v, want only the edited conflist", cniinstalltest.Keys(got))
	}
	l, err := libcni.ConfListFromBytes(got["10-mynet.conflist"])
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range l.Plugins {
		types = append(types, p.Network.Type)
	}
	if !reflect.DeepEqual(types, []string{"bridge", "portmap"}) {
		t.Errorf("plugins after Uninstall %v, want [bridge portmap]", types)
	}
}

// TestUninstallEveryConflist: ctlb followed the first file from one name to
// another (a new primary CNI config appeared); Uninstall clears both.
func TestUninstallEveryConflist(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/flannel/in")
	opts := newOpts(t, in)
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	cilium, err := os.ReadFile("testdata/cilium-chaining/in/05-cilium.conflist")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(opts.ConfDir, "05-cilium.conflist"), cilium, 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(res.ConfFile) != "05-cilium.conflist" || res.Action != Inserted {
		t.Fatalf("Install with a new first file = %+v", res)
	}
	opts.KeepBinary = true
	if _, err := Uninstall(opts); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"05-cilium.conflist": cilium, "10-flannel.conflist": in["10-flannel.conflist"]}
	got := cniinstalltest.Snapshot(t, opts.ConfDir)
	for name := range want {
		checkRestored(t, name, got[name], want[name])
	}
	if len(got) != len(want) {
		t.Errorf("conf dir after Uninstall: %v", cniinstalltest.Keys(got))
	}
	if _, err := os.Stat(filepath.Join(opts.BinDir, PluginType)); err != nil {
		t.Errorf("KeepBinary: binary gone: %v", err)
	}
}

func TestInstallUpdatesChangedBinary(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/bridge/in")
	opts := newOpts(t, in)
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(opts.BinDir, PluginType)
	// A running plugin keeps its inode; the new binary is a new file.
	old, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	newer := []byte("#!/bin/sh\n# ctlb plugin v2 stand-in\nexit 0\n")
	if err := os.WriteFile(opts.SourceBinary, newer, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !res.BinaryUpdated || res.Action != Unchanged {
		t.Errorf("Install with a new binary = %+v, want binary updated, conf unchanged", res)
	}
	checkBinary(t, opts)
	oldStat, _ := old.Stat()
	newStat, _ := os.Stat(dst)
	if os.SameFile(oldStat, newStat) {
		t.Errorf("binary overwritten in place; want a rename so running plugins keep their file")
	}
}

func TestParseObjectKeepsOrderAndBytes(t *testing.T) {
	in := []byte(`{"z": 1.50, "a": "caf\u00e9", "m": {"y": [1e3, null]}}`)
	members, err := parseObject(in)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range members {
		got = append(got, m.key+"="+string(m.value))
	}
	want := []string{`z=1.50`, `a="caf\u00e9"`, `m={"y": [1e3, null]}`}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("members %q, want %q", got, want)
	}
	for _, bad := range []string{`[]`, `{"a":1,"a":2}`, `{"a":1} x`, `{"a":`, `"s"`} {
		if _, err := parseObject([]byte(bad)); err == nil {
			t.Errorf("parseObject(%s) accepted", bad)
		}
	}
}

// newOpts lays out a fresh conf dir holding files, an empty bin dir and a
// stand-in plugin binary (a small executable script).
func newOpts(t *testing.T, files map[string][]byte) Options {
	t.Helper()
	l := cniinstalltest.NewLayout(t, PluginType, files)
	return Options{ConfDir: l.ConfDir, BinDir: l.BinDir, SourceBinary: l.Plugin, PluginConf: testPlugin}
}

func checkBinary(t *testing.T, o Options) {
	t.Helper()
	want, err := os.ReadFile(o.SourceBinary)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(o.BinDir, PluginType)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatalf("plugin binary: %v", err)
	}
	fi, _ := os.Stat(dst)
	if !bytes.Equal(got, want) || fi.Mode().Perm() != 0o755 {
		t.Errorf("%s: %d bytes mode %o, want a 0755 copy of %s", dst, len(got), fi.Mode().Perm(), o.SourceBinary)
	}
}

func modTimes(t *testing.T, dir string) map[string]time.Time {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]time.Time{}
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = fi.ModTime()
	}
	return out
}

func compact(t *testing.T, b []byte) string {
	t.Helper()
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return "not JSON: " + string(b)
	}
	return out.String()
}

func fileOwner(fi os.FileInfo) (int, int) {
	_, uid, gid := ownership(fi)
	return uid, gid
}

// A ctlb entry written by hand (no marker) is never touched: Install keeps
// it (action kept), and Uninstall leaves it. An entry Install wrote and
// someone edited since is kept by Install (the watcher must not revert
// it), and removed by Uninstall, since it is still the one Install added.
func TestInstallKeepsHandWrittenAndCustomised(t *testing.T) {
	const name = "10-containerd-net.conflist"
	conflist := func(ctlb string) map[string][]byte {
		return map[string][]byte{name: []byte(`{"cniVersion": "0.3.1", "name": "containerd-net", "plugins": [
  {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.0.0/24"}]]}},
  ` + ctlb + `]}`)}
	}
	hand := `{"type": "ctlb", "bpffs": "/sys/fs/bpf/mine", "logLevel": "debug"}`
	edited := strings.Replace(string(testPlugin), `"/run/ctlb/ctlbd.sock"`, `"/run/ctlb/other.sock"`, 1)
	if edited == string(testPlugin) {
		t.Fatalf("test entry %s has no socket to edit", testPlugin)
	}
	for _, c := range []struct {
		what, entry  string
		removedByUni bool
	}{
		{"hand-written", hand, false},
		{"customised", edited, true},
	} {
		t.Run(c.what, func(t *testing.T) {
			in := conflist(c.entry)
			opts := newOpts(t, in)
			res, err := Install(opts)
			if err != nil || res.Action != Kept || res.Note == "" {
				t.Fatalf("Install = %+v, %v; want kept, with a note", res, err)
			}
			t.Logf("Install: %s", res.Note)
			if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
				t.Fatalf("Install changed the conf dir:\n%s", cniinstalltest.DiffSnapshots(got, in))
			}
			if _, err := Uninstall(opts); err != nil {
				t.Fatal(err)
			}
			got := cniinstalltest.Snapshot(t, opts.ConfDir)
			stillThere := strings.Contains(string(got[name]), `"ctlb"`)
			if stillThere == c.removedByUni {
				t.Fatalf("after Uninstall: %s", got[name])
			}
		})
	}
}

// A ctlb entry written by hand (no install-cni marker) stays at Uninstall,
// and so does the plugin binary it needs: without it every pod's ADD on the
// node would fail.
func TestUninstallKeepsBinaryForHandWrittenEntry(t *testing.T) {
	in := map[string][]byte{"10-flannel.conflist": []byte(`{"cniVersion": "0.3.1", "name": "cbr0", "plugins": [
		{"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
		{"type": "portmap", "capabilities": {"portMappings": true}},
		{"type": "ctlb", "bpffs": "/sys/fs/bpf/ctlb", "socket": "/run/ctlb/ctlbd.sock"}]}` + "\n")}
	opts := newOpts(t, in)
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Action != Kept {
		t.Fatalf("Install = %+v, want the hand-written entry kept", res)
	}
	u, err := Uninstall(opts)
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(opts.ConfDir, "10-flannel.conflist")
	if bin := filepath.Join(opts.BinDir, PluginType); u.BinaryKept != bin || !reflect.DeepEqual(u.StillChainedBy, []string{conf}) {
		t.Errorf("Uninstall = %+v, want %s kept for %s", u, bin, conf)
	}
	checkBinary(t, opts)
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("Uninstall changed a config whose ctlb entry is not install-cni's:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
}

// A network config that is a symbolic link is refused, not replaced by a
// copy: the file it points to would stop being what the runtime reads.
func TestInstallRefusesSymlinkedConfig(t *testing.T) {
	const name = "10-calico.conflist"
	in := map[string][]byte{name: cniinstalltest.Snapshot(t, "testdata/calico/in")[name]}
	opts := newOpts(t, nil)
	realDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(realDir, name), in[name], 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(opts.ConfDir, name)
	if err := os.Symlink(filepath.Join(realDir, name), link); err != nil {
		t.Fatal(err)
	}
	_, err := Install(opts)
	if err == nil || !strings.Contains(err.Error(), "symbolic link") || !strings.Contains(err.Error(), "left untouched") {
		t.Fatalf("Install on a symlinked config: %v, want it refused", err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link is no link any more: %v, %v", fi, err)
	}
	if got := cniinstalltest.Snapshot(t, realDir); !reflect.DeepEqual(got, in) {
		t.Errorf("the link's target changed:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
	if left := cniinstalltest.Snapshot(t, opts.BinDir); len(left) != 0 {
		t.Errorf("a refused Install still wrote %v into the bin dir", cniinstalltest.Keys(left))
	}
}

// A dry run reports what Install would do and writes nothing, so that an
// operator's check cannot change a node's chain (say, to other bpffs and
// socket paths than the DaemonSet's).
func TestInstallDryRun(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/calico/in")
	opts := newOpts(t, in)
	dry := opts
	dry.DryRun = true
	res, err := Install(dry)
	if err != nil {
		t.Fatal(err)
	}
	if !res.DryRun || res.Action != Inserted || !res.BinaryUpdated {
		t.Errorf("dry run on a fresh node = %+v, want inserted and the binary to come", res)
	}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, in) {
		t.Errorf("a dry run changed the conf dir:\n%s", cniinstalltest.DiffSnapshots(got, in))
	}
	if left := cniinstalltest.Snapshot(t, opts.BinDir); len(left) != 0 {
		t.Errorf("a dry run wrote %v into the bin dir", cniinstalltest.Keys(left))
	}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	installed := cniinstalltest.Snapshot(t, opts.ConfDir)
	if res, err := Install(dry); err != nil || res.Action != Unchanged || res.BinaryUpdated {
		t.Errorf("dry run after the install = %+v, %v; want unchanged", res, err)
	}
	other := dry
	other.PluginConf = NewPluginConf("/sys/fs/bpf/elsewhere", "/run/elsewhere.sock", api.DefaultStateDir)
	if res, err := Install(other); err != nil || res.Action != Updated {
		t.Errorf("dry run with other paths = %+v, %v; want it to say updated", res, err)
	}
	if got := cniinstalltest.Snapshot(t, opts.ConfDir); !reflect.DeepEqual(got, installed) {
		t.Errorf("a dry run with other paths changed the chain:\n%s", cniinstalltest.DiffSnapshots(got, installed))
	}
}

// install-cni's entry is taken out even when a hand-written ctlb entry
// comes before it in the chain; the hand-written one stays, with the binary.
func TestUninstallFindsOursAfterHandWritten(t *testing.T) {
	ours, err := json.Marshal(json.RawMessage(testPlugin))
	if err != nil {
		t.Fatal(err)
	}
	hand := `{"type": "ctlb", "bpffs": "/sys/fs/bpf/ctlb"}`
	in := map[string][]byte{"10-flannel.conflist": []byte(`{"cniVersion": "0.3.1", "name": "cbr0", "plugins": [
		{"type": "flannel", "delegate": {"isDefaultGateway": true}}, ` + hand + `, ` + string(ours) + `]}` + "\n")}
	opts := newOpts(t, in)
	if _, err := installBinary(opts.SourceBinary, filepath.Join(opts.BinDir, PluginType)); err != nil {
		t.Fatal(err)
	}
	u, err := Uninstall(opts)
	if err != nil {
		t.Fatal(err)
	}
	if u.BinaryKept == "" {
		t.Errorf("Uninstall = %+v, want the binary kept for the hand-written entry", u)
	}
	data, err := os.ReadFile(filepath.Join(opts.ConfDir, "10-flannel.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	cl, err := parseConflist(data)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []entryKind
	for _, p := range cl.plugins {
		if typeOf(p) == PluginType {
			kinds = append(kinds, kindOf(p))
		}
	}
	if !reflect.DeepEqual(kinds, []entryKind{handWritten}) {
		t.Errorf("ctlb entries after Uninstall: %v, want the hand-written one alone:\n%s", kinds, data)
	}
}

// A state directory other than the plugin's default is written into the
// entry (the plugin leaves pending attachments there for ctlbd, so it must
// be ctlbd's --state-dir); the entry stays install-cni's own: installing
// it again changes nothing, and going back to the default replaces it with
// the entry of a default install, which names no stateDir.
func TestInstallStateDir(t *testing.T) {
	in := cniinstalltest.Snapshot(t, "testdata/calico/in")
	opts := newOpts(t, in)
	const stateDir = "/run/ctlb-other"
	opts.PluginConf = NewPluginConf(datapath.DefaultDir, api.DefaultSocket, stateDir)
	conf := filepath.Join(opts.ConfDir, "10-calico.conflist")

	entry := func() (json.RawMessage, *cni.Conf) {
		t.Helper()
		data, err := os.ReadFile(conf)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := parseConflist(data)
		if err != nil {
			t.Fatal(err)
		}
		i := cl.indexOf(PluginType)
		if i < 0 {
			t.Fatalf("no ctlb entry in %s", data)
		}
		// What the plugin reads at ADD: the entry with the network's
		// name and version, as libcni passes it.
		var obj map[string]any
		if err := json.Unmarshal(cl.plugins[i], &obj); err != nil {
			t.Fatal(err)
		}
		obj["name"], obj["cniVersion"] = "k8s-pod-network", "0.3.1"
		stdin, _ := json.Marshal(obj)
		c, err := cni.ParseConf(stdin, false)
		if err != nil {
			t.Fatalf("the plugin refuses the entry %s: %v", cl.plugins[i], err)
		}
		return cl.plugins[i], c
	}

	if res, err := Install(opts); err != nil || res.Action != Inserted {
		t.Fatalf("Install = %+v, %v; want inserted", res, err)
	}
	raw, c := entry()
	if c.StateDir != stateDir || kindOf(raw) != ours {
		t.Errorf("entry %s: the plugin reads stateDir %q (want %q), kind %d (want install-cni's own)", raw, c.StateDir, stateDir, kindOf(raw))
	}
	if res, err := Install(opts); err != nil || res.Action != Unchanged {
		t.Errorf("Install again = %+v, %v; want unchanged", res, err)
	}

	def := opts
	def.PluginConf = NewPluginConf(datapath.DefaultDir, api.DefaultSocket, api.DefaultStateDir)
	if !bytes.Equal(def.PluginConf, NewPluginConf(datapath.DefaultDir, api.DefaultSocket, "")) || bytes.Contains(def.PluginConf, []byte("stateDir")) {
		t.Errorf("default entry %s names a stateDir", def.PluginConf)
	}
	if res, err := Install(def); err != nil || res.Action != Updated {
		t.Errorf("Install with the default stateDir = %+v, %v; want updated", res, err)
	}
	if raw, c := entry(); !sameJSON(raw, testPlugin) || c.StateDir != api.DefaultStateDir {
		t.Errorf("entry after going back to the default: %s (stateDir %q), want %s", raw, c.StateDir, testPlugin)
	}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	if u, err := Uninstall(opts); err != nil || u.BinaryKept != "" {
		t.Fatalf("Uninstall = %+v, %v", u, err)
	}
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if cl, err := parseConflist(data); err != nil || cl.indexOf(PluginType) >= 0 {
		t.Errorf("after Uninstall (%v), the entry with a stateDir is still there:\n%s", err, data)
	}
}
