// Package cniinstalltest holds the conf-dir fixtures that the installer's
// tests (internal/cniinstall) and the install-cni command's tests
// (cmd/ctlbd) share: snapshots of a directory, their diffs, a fresh
// bin/conf/plugin layout, and whether libcni sees a plugin chained.
package cniinstalltest

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// Snapshot reads every file of dir (no subdirectories in these tests).
func Snapshot(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

// WriteSnapshot makes dir hold exactly files.
func WriteSnapshot(t testing.TB, dir string, files map[string][]byte) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// Keys are a snapshot's file names, sorted.
func Keys(m map[string][]byte) []string {
	var k []string
	for name := range m {
		k = append(k, name)
	}
	sort.Strings(k)
	return k
}

// DiffSnapshots says how got differs from want, file by file.
func DiffSnapshots(got, want map[string][]byte) string {
	var b strings.Builder
	for _, name := range Keys(got) {
		if w, ok := want[name]; !ok {
			b.WriteString("unexpected " + name + ":\n" + string(got[name]) + "\n")
		} else if !bytes.Equal(w, got[name]) {
			b.WriteString(name + " got:\n" + string(got[name]) + "\nwant:\n" + string(w) + "\n")
		}
	}
	for _, name := range Keys(want) {
		if _, ok := got[name]; !ok {
			b.WriteString("missing " + name + "\n")
		}
	}
	return b.String()
}

// Layout is a node's CNI directories in a test: the conf dir holding the
// given files, an empty bin dir, and a stand-in plugin binary to install.
type Layout struct {
	ConfDir, BinDir, Plugin string
}

// NewLayout makes a Layout under a temporary directory.
func NewLayout(t testing.TB, pluginType string, files map[string][]byte) Layout {
	t.Helper()
	root := t.TempDir()
	l := Layout{
		ConfDir: filepath.Join(root, "net.d"),
		BinDir:  filepath.Join(root, "bin"),
		Plugin:  filepath.Join(root, "image", pluginType),
	}
	for _, d := range []string{l.ConfDir, l.BinDir, filepath.Dir(l.Plugin)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	WriteSnapshot(t, l.ConfDir, files)
	if err := os.WriteFile(l.Plugin, []byte("#!/bin/sh\n# ctlb plugin stand-in\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return l
}

// Chained reports whether libcni loads file with a plugin of pluginType in
// its chain.
func Chained(file, pluginType string) bool {
	list, err := libcni.ConfListFromFile(file)
	if err != nil {
		return false
	}
	for _, p := range list.Plugins {
		if p.Network.Type == pluginType {
			return true
		}
	}
	return false
}
