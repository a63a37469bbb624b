// Package cniinstall puts the ctlb CNI plugin on a node: it copies the plugin
// binary into the CNI bin dir and chains ctlb into the network config the
// container runtime uses (the first file of the CNI conf dir by name, as
// libcni-based runtimes pick it), and takes exactly that back out again.
//
// Everything it writes goes through a temporary file in the same directory,
// fsync and rename, so a runtime reading the directory at any moment sees the
// old file or the new one, never half of one. Every plugin and key it does not
// own is carried over as written, in its order.
package cniinstall

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/pkg/api"
)

// Defaults of a node where the runtime uses the standard CNI locations.
const (
	DefaultBinDir  = "/opt/cni/bin"
	DefaultConfDir = "/etc/cni/net.d"
	PluginType     = "ctlb"
)

// BackupSuffix names the copy of a single-plugin .conf that Install turned
// into a .conflist; Uninstall puts it back. Its extension is none that libcni
// reads, so runtimes ignore it.
const BackupSuffix = ".ctlb-orig"

// confExtensions are the files libcni-based runtimes (containerd, CRI-O,
// podman) consider, all sorted together by name.
var confExtensions = []string{".conf", ".conflist", ".json"}

// ErrNoNetworkConfig means the conf dir holds no network config yet: the
// primary CNI (Calico, Flannel, ...) has not written its file.
var ErrNoNetworkConfig = errors.New("no CNI network config (*.conflist, *.conf, *.json)")

// errChangedUnderUs means another writer replaced the file between our read
// and our rename; Install starts over rather than overwrite their change.
var errChangedUnderUs = errors.New("changed by another writer while being updated")

// Options says where the CNI files live and what to insert.
type Options struct {
	// BinDir receives the plugin binary, named after PluginConf's type.
	BinDir string
	// ConfDir holds the runtime's network configs.
	ConfDir string
	// SourceBinary is the ctlb plugin binary to copy (Install only).
	SourceBinary string
	// PluginConf is the JSON object chained into the conflist, at least
	// {"type":"ctlb"}; see NewPluginConf.
	PluginConf json.RawMessage
	// KeepBinary makes Uninstall leave the plugin binary in BinDir, for
	// runtimes that replay a pod's cached config (with ctlb in it) at DEL.
	KeepBinary bool
	// Logger is used by Watch; nil means slog.Default().
	Logger *slog.Logger
	// Resync is how often Watch re-checks without an event; 0 means 30s.
	Resync time.Duration
	// UninstallOnExit makes Watch take ctlb out of the network configs
	// (keeping the binary) when its context ends.
	UninstallOnExit bool
	// DryRun makes Install report what it would do, writing nothing: a
	// check of a node's chain that cannot change it.
	DryRun bool
}

// InstallWhenReady is Install that waits, up to wait, for the primary CNI to
// write its network config, logging why it waits every few seconds: the
// init container of a DaemonSet often starts before Calico's or Flannel's
// has written theirs, and failing would only CrashLoop it.
func InstallWhenReady(ctx context.Context, opts Options, wait time.Duration, log *slog.Logger) (Result, error) {
	if log == nil {
		log = slog.Default()
	}
	start := time.Now()
	lastLog := time.Time{}
	for {
		res, err := Install(opts)
		if !errors.Is(err, ErrNoNetworkConfig) {
			if err == nil && !lastLog.IsZero() {
				log.Info("primary network config appeared", "conf", res.ConfFile, "waited", time.Since(start).Round(time.Second))
			}
			return res, err
		}
		if time.Since(start) >= wait {
			return res, fmt.Errorf("%w after waiting %s for the primary CNI to write one in %s", err, wait, opts.ConfDir)
		}
		if time.Since(lastLog) >= 5*time.Second {
			log.Info("waiting for the primary CNI to write its network config", "confDir", opts.ConfDir,
				"waited", time.Since(start).Round(time.Second), "limit", wait)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return res, err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// NewPluginConf returns the ctlb entry for a conflist: the plugin type, the
// bpffs directory holding ctlb's pins, ctlbd's control socket and, when it
// is not the plugin's default (api.DefaultStateDir), the state directory
// where the plugin leaves pending attachments for ctlbd: it must be
// ctlbd's --state-dir, or ctlbd never sees them. Left out at the default,
// so entries of default installs stay as they were.
func NewPluginConf(bpffs, socket, stateDir string) json.RawMessage {
	if stateDir == api.DefaultStateDir {
		stateDir = ""
	}
	// The cgroupPath capability asks runtimes that have it (containerd
	// 1.7.0+, CRI-O 1.28+; podman never) to pass the pod's cgroup, the
	// first thing the plugin tries; the pod-annotations one gives it the
	// pod's ctlb.io/containers annotation (container scope through NRI).
	b, _ := json.Marshal(struct {
		Type         string          `json:"type"`
		BPFFS        string          `json:"bpffs"`
		Socket       string          `json:"socket"`
		StateDir     string          `json:"stateDir,omitempty"`
		Capabilities map[string]bool `json:"capabilities"`
	}{PluginType, bpffs, socket, stateDir, map[string]bool{"cgroupPath": true, "io.kubernetes.cri.pod-annotations": true}})
	return b
}

// Action says what Install did to the network config.
type Action string

const (
	Inserted  Action = "inserted"  // ctlb appended to the chain
	Updated   Action = "updated"   // ctlb was there with another config, replaced in place
	Unchanged Action = "unchanged" // ctlb was there as asked; the file was not written
	// Kept: a ctlb entry written or edited by hand is there; it is left as
	// is (Result.Note says which), and Uninstall will not remove a
	// hand-written one.
	Kept Action = "kept"
)

// Result tells what Install found and changed.
type Result struct {
	// ConfFile is the conflist that now chains ctlb.
	ConfFile string `json:"confFile"`
	// ConvertedFrom is the .conf (or .json) turned into ConfFile, if any.
	ConvertedFrom string `json:"convertedFrom,omitempty"`
	// Backup keeps ConvertedFrom's original bytes for Uninstall.
	Backup string `json:"backup,omitempty"`
	Action Action `json:"action"`
	// Note explains a Kept action.
	Note string `json:"note,omitempty"`
	// Binary is the installed plugin binary.
	Binary string `json:"binary"`
	// BinaryUpdated is false when Binary already had SourceBinary's bytes.
	BinaryUpdated bool `json:"binaryUpdated"`
	// DryRun: nothing was written; the fields say what Install would do.
	DryRun bool `json:"dryRun,omitempty"`
}

// settings are validated Options.
type settings struct {
	Options
	plugin     json.RawMessage // compacted PluginConf
	pluginType string
}

func (o Options) validate(needSource bool) (settings, error) {
	if o.BinDir == "" || o.ConfDir == "" {
		return settings{}, errors.New("BinDir and ConfDir are required")
	}
	if needSource && o.SourceBinary == "" {
		return settings{}, errors.New("SourceBinary is required")
	}
	plugin, typ, err := parsePluginConf(o.PluginConf)
	if err != nil {
		return settings{}, err
	}
	return settings{Options: o, plugin: mark(plugin), pluginType: typ}, nil
}

// Install copies the plugin binary and chains the plugin into the first
// network config of ConfDir. It is idempotent: when both are already as
// asked, nothing is written. A config that does not parse is an error and
// nothing is changed, the binary included.
func Install(opts Options) (Result, error) {
	s, err := opts.validate(true)
	if err != nil {
		return Result{}, fmt.Errorf("cni install: %w", err)
	}
	unlock, err := lockDir(s.ConfDir)
	if err != nil {
		return Result{}, fmt.Errorf("cni install: %w", err)
	}
	defer unlock()
	if !s.DryRun {
		removeStaleTemps(s.ConfDir)
		removeStaleTemps(s.BinDir)
	}
	for attempt := 1; ; attempt++ {
		res, err := install(s)
		if errors.Is(err, errChangedUnderUs) && attempt < 5 {
			continue
		}
		if err != nil {
			return res, fmt.Errorf("cni install: %w", err)
		}
		return res, nil
	}
}

func install(s settings) (Result, error) {
	file, err := firstConfFile(s.ConfDir)
	if err != nil {
		return Result{}, err
	}
	before, err := os.Lstat(file)
	if err != nil {
		return Result{}, err // names the file
	}
	if before.Mode()&os.ModeSymlink != 0 {
		// A write replaces the file by rename, which would replace the
		// link with a copy: the file it points to, which its owner keeps
		// up to date, would no longer be what the runtime reads.
		target, _ := os.Readlink(file)
		return Result{}, fmt.Errorf("%s is a symbolic link (to %s), left untouched: chain ctlb into the file it points to by hand, or make it a plain file", file, target)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return Result{}, fmt.Errorf("read %s: %w", file, err)
	}

	res := Result{ConfFile: file, Binary: filepath.Join(s.BinDir, s.pluginType)}
	var cl *conflist
	if filepath.Ext(file) == ".conflist" {
		if cl, err = parseConflist(data); err != nil {
			return Result{}, fmt.Errorf("%s is not a valid conflist, left untouched: %w", file, err)
		}
	} else {
		if cl, err = convertConf(data); err != nil {
			return Result{}, fmt.Errorf("%s is not a valid network config, left untouched: %w", file, err)
		}
		res.ConvertedFrom = file
		res.ConfFile = strings.TrimSuffix(file, filepath.Ext(file)) + ".conflist"
		res.Backup = file + BackupSuffix
		if err := checkConvertTarget(res, data, s.pluginType); err != nil {
			return Result{}, err
		}
	}

	if err := checkVersion(file, cl); err != nil {
		return Result{}, err
	}
	switch i := cl.indexOf(s.pluginType); {
	case i < 0:
		cl.plugins = append(cl.plugins, s.plugin)
		res.Action = Inserted
	case sameJSON(cl.plugins[i], s.plugin):
		res.Action = Unchanged
	case kindOf(cl.plugins[i]) == ours:
		// What an earlier install-cni wrote, untouched since: bring it to
		// the config asked for now.
		cl.plugins[i] = s.plugin
		res.Action = Updated
	case kindOf(cl.plugins[i]) == customised:
		res.Action, res.Note = Kept, "the ctlb entry install-cni wrote was edited by hand since: left as is (delete it to have it rewritten)"
	default:
		res.Action, res.Note = Kept, "a ctlb entry written by hand (no "+MarkerKey+" marker) is there: left as is"
	}
	var out []byte
	if (res.Action != Unchanged && res.Action != Kept) || res.ConvertedFrom != "" {
		if out, err = cl.render(); err != nil {
			return Result{}, fmt.Errorf("%s: %w", file, err)
		}
	}

	if s.DryRun {
		same, err := sameContent(s.SourceBinary, res.Binary)
		if err != nil {
			return Result{}, err
		}
		res.BinaryUpdated, res.DryRun = !same, true
		return res, nil
	}
	// The binary goes first: a conflist naming ctlb before the binary is
	// there would fail every pod's CNI ADD in between.
	if res.BinaryUpdated, err = installBinary(s.SourceBinary, res.Binary); err != nil {
		return Result{}, err
	}
	if out == nil {
		return res, nil
	}

	mode, uid, gid := ownership(before)
	if res.ConvertedFrom != "" {
		// Backup, then the conflist, then drop the .conf: if we stop half
		// way, the .conf still sorts first and the next run converts again.
		if err := writeAtomic(res.Backup, data, mode, uid, gid); err != nil {
			return Result{}, err
		}
	}
	if err := checkUnchanged(file, before); err != nil {
		return Result{}, err
	}
	if err := writeAtomic(res.ConfFile, out, mode, uid, gid); err != nil {
		return Result{}, err
	}
	if res.ConvertedFrom != "" {
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			return Result{}, fmt.Errorf("remove converted %s: %w", file, err)
		}
		if err := syncDir(s.ConfDir); err != nil {
			return Result{}, err
		}
	}
	return res, nil
}

// checkConvertTarget refuses to convert a .conf onto a .conflist of the same
// name that is another network config: the conversion would overwrite it,
// and an uninstall would then delete it. The ones it may replace are its
// own: a conversion stopped half way (the backup holds the .conf's very
// bytes), or an earlier conversion, whose .conf the primary CNI has written
// again since (the conflist chains ctlb with install-cni's marker).
func checkConvertTarget(res Result, conf []byte, pluginType string) error {
	existing, err := os.ReadFile(res.ConfFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", res.ConfFile, err)
	}
	if b, err := os.ReadFile(res.Backup); err == nil && bytes.Equal(b, conf) {
		return nil
	}
	if cl, err := parseConflist(existing); err == nil {
		if i, _ := cl.indexOfOurs(pluginType); i >= 0 {
			return nil
		}
	}
	return fmt.Errorf("%s would be converted to %s, which exists already (another network config): both left untouched; remove or rename one of them", res.ConvertedFrom, res.ConfFile)
}

// checkVersion refuses a network config whose cniVersion the plugin cannot
// serve: chained into it, ctlb would fail every pod's ADD and DEL with
// "incompatible CNI versions", which stops pods from starting and from being
// torn down.
func checkVersion(file string, cl *conflist) error {
	v := ""
	if raw, ok := lookup(cl.members, "cniVersion"); ok {
		if err := json.Unmarshal(raw, &v); err != nil {
			return fmt.Errorf("%s: cniVersion %s is not a string, left untouched", file, raw)
		}
	}
	if !cni.SupportsVersion(v) {
		shown := v
		if shown == "" {
			shown = "(none, which means 0.1.0)"
		}
		return fmt.Errorf("%s has cniVersion %s; the ctlb plugin serves %s: refusing to chain ctlb into it, left untouched (upgrade the primary CNI's config to 0.3.0 or later)",
			file, shown, strings.Join(cni.Versions.SupportedVersions(), ", "))
	}
	return nil
}

// Uninstall takes out what Install put in (the entry it marked, edited or
// not; never a hand-written one): the plugin from every conflist
// of ConfDir that chains it (Watch may have followed the first file from one
// name to another), a converted .conf back to its original bytes, the
// backups, and (unless KeepBinary) the plugin binary. Running it again is a
// no-op. A file that does not parse is reported after the others are done.
func Uninstall(opts Options) (Uninstalled, error) {
	var res Uninstalled
	s, err := opts.validate(false)
	if err != nil {
		return res, fmt.Errorf("cni uninstall: %w", err)
	}
	unlock, err := lockDir(s.ConfDir)
	if err != nil {
		return res, fmt.Errorf("cni uninstall: %w", err)
	}
	defer unlock()
	removeStaleTemps(s.ConfDir)
	removeStaleTemps(s.BinDir)

	files, err := confFiles(s.ConfDir)
	if err != nil {
		return res, fmt.Errorf("cni uninstall: %w", err)
	}
	var errs []error
	for _, file := range files {
		if filepath.Ext(file) != ".conflist" {
			continue // a single-plugin .conf cannot chain ctlb
		}
		kept, err := uninstallFrom(s, file)
		if err != nil {
			errs = append(errs, err)
		}
		if kept {
			res.StillChainedBy = append(res.StillChainedBy, file)
		}
	}
	// Backups that were not restored above belong to conflists someone else
	// has since rewritten; they are ours, so they go.
	backups, _ := filepath.Glob(filepath.Join(s.ConfDir, "*"+BackupSuffix))
	for _, b := range backups {
		if err := os.Remove(b); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove backup %s: %w", b, err))
		}
	}
	bin := filepath.Join(s.BinDir, s.pluginType)
	switch {
	case s.KeepBinary:
	case len(res.StillChainedBy) > 0:
		// A ctlb entry written by hand stays, and needs the binary: without
		// it every pod's ADD on the node would fail.
		res.BinaryKept = bin
	default:
		if err := os.Remove(bin); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove plugin binary %s: %w", bin, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("cni uninstall: %w", err)
	}
	return res, nil
}

// Uninstalled is what Uninstall left in place.
type Uninstalled struct {
	// StillChainedBy are the conflists whose ctlb entry was written by hand
	// (no install-cni marker): they keep it.
	StillChainedBy []string `json:"stillChainedBy,omitempty"`
	// BinaryKept is the plugin binary left for them.
	BinaryKept string `json:"binaryKept,omitempty"`
}

// uninstallFrom takes install-cni's ctlb entry out of file; kept reports a
// ctlb entry it leaves, written by hand.
func uninstallFrom(s settings, file string) (kept bool, err error) {
	before, err := os.Stat(file)
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", file, err)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", file, err)
	}
	cl, err := parseConflist(data)
	if err != nil {
		return false, fmt.Errorf("%s is not a valid conflist, left untouched: %w", file, err)
	}
	// install-cni's entry, wherever it is: a hand-written one (which
	// stays) may come before it.
	i, kept := cl.indexOfOurs(s.pluginType)
	if i < 0 {
		return kept, nil
	}
	cl.plugins = append(cl.plugins[:i], cl.plugins[i+1:]...)
	if len(cl.plugins) == 0 {
		return false, fmt.Errorf("%s chains nothing but %s; left untouched", file, s.pluginType)
	}

	stem := strings.TrimSuffix(file, ".conflist")
	for _, orig := range []string{stem + ".conf", stem + ".json"} {
		backup, err := os.ReadFile(orig + BackupSuffix)
		if err != nil || len(cl.plugins) != 1 || !sameJSON(cl.plugins[0], backup) {
			continue
		}
		// The conflist is still the converted .conf plus ctlb: restore the
		// original file byte for byte.
		bst, err := os.Stat(orig + BackupSuffix)
		if err != nil {
			return false, fmt.Errorf("stat %s: %w", orig+BackupSuffix, err)
		}
		mode, uid, gid := ownership(bst)
		if err := writeAtomic(orig, backup, mode, uid, gid); err != nil {
			return false, err
		}
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("remove %s: %w", file, err)
		}
		if err := os.Remove(orig + BackupSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("remove backup %s: %w", orig+BackupSuffix, err)
		}
		return kept, syncDir(filepath.Dir(file))
	}

	out, err := cl.render()
	if err != nil {
		return false, fmt.Errorf("%s: %w", file, err)
	}
	if err := checkUnchanged(file, before); err != nil {
		return false, fmt.Errorf("%s: %w", file, err)
	}
	mode, uid, gid := ownership(before)
	return kept, writeAtomic(file, out, mode, uid, gid)
}

// confFiles lists ConfDir's network configs sorted by name, as libcni-based
// runtimes do before taking the first.
func confFiles(dir string) ([]string, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("conf dir: %w", err)
	}
	files, err := libcni.ConfFiles(dir, confExtensions)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", dir, err)
	}
	sort.Strings(files)
	return files, nil
}

func firstConfFile(dir string) (string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", fmt.Errorf("%s: %w", dir, ErrNoNetworkConfig)
	}
	return files[0], nil
}

// checkUnchanged returns errChangedUnderUs when path is no longer the file
// that was read: another agent renamed or wrote a new one in the meantime.
func checkUnchanged(path string, before os.FileInfo) error {
	now, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, errChangedUnderUs)
	}
	if !os.SameFile(before, now) || !now.ModTime().Equal(before.ModTime()) || now.Size() != before.Size() {
		return fmt.Errorf("%s: %w", path, errChangedUnderUs)
	}
	return nil
}

// ownership returns a file's permission bits and owner, which a rewrite keeps.
func ownership(fi os.FileInfo) (os.FileMode, int, int) {
	uid, gid := -1, -1
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		uid, gid = int(st.Uid), int(st.Gid)
	}
	return fi.Mode().Perm(), uid, gid
}

// lockDir serialises ctlb's own writers (the init container, the watcher, a
// hand-run install) on one conf dir with a flock on the directory itself, so
// no lock file appears among the runtime's configs.
func lockDir(dir string) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("conf dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}
