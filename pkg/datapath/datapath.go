// Package datapath owns ctlb's BPF objects: it loads the embedded programs
// and maps or adopts the ones pinned under a bpffs directory, and gives the
// rest of ctlb typed operations on them: service sets, per-server counters
// and cgroup attachments. Every other part of ctlb goes through it.
//
// It is public API: a third-party agent may adopt a node's pins and read or
// drive them through this package (docs/ARCHITECTURE.md, "Parts"; the map
// formats are docs/MAPS.md).
//
// Pinned layout (docs/MAPS.md has the map formats):
//
//	DIR/ctlb_services_v1 ... maps, pinned by name
//	DIR/ctlb_connect4_v1 ... programs, so that short-lived callers (the CNI
//	                         plugin) attach the very programs that use DIR's maps
//	DIR/links/ID/connect4    one directory of bpf_link pins per attachment
package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/crashpoint"
)

// DefaultDir is where ctlb pins its objects unless told otherwise.
const DefaultDir = "/sys/fs/bpf/ctlb"

// Layout is the version of the map and program layout this build speaks. It
// is part of every pinned name.
const Layout = 1

// MaxServers is the largest server set one VIP may have; the connect4
// program refuses to index beyond it.
const MaxServers = 1024

// ErrNotPinned means the directory holds no ctlb objects: ctlbd has not run
// on this bpffs yet.
var ErrNotPinned = errors.New("ctlb objects are not pinned")

// ErrLayout means the directory holds pins of a layout this build does not
// understand (invariant 6: refuse rather than misread).
var ErrLayout = errors.New("pinned ctlb objects have another layout")

var versionedName = regexp.MustCompile(`^ctlb_[a-z0-9_]+_v([0-9]+)$`)

// hooks are the programs of one attachment, in attach order: accounting
// first, so that no socket is redirected without release being tracked.
var hooks = []struct {
	name   string // pin name inside an attachment directory
	attach ebpf.AttachType
}{
	{"sock_release", ebpf.AttachCgroupInetSockRelease},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername},
	{"connect4", ebpf.AttachCGroupInet4Connect},
}

// Datapath is an open handle on one pinned set of ctlb objects.
type Datapath struct {
	dir   string
	objs  ctlbObjects
	progs map[string]*ebpf.Program // by hook name
}

// Dir is the bpffs directory the objects are pinned in.
func (d *Datapath) Dir() string { return d.dir }

// Create opens the objects pinned in dir, loading and pinning the embedded
// ones first where they are missing. Only ctlbd creates: it is the writer
// that owns the maps (invariant 4). dir must be on a bpffs.
// Adopting, never rebuilding, is ARCHITECTURE.md I1; refusing other layouts is I6.
func Create(dir string) (*Datapath, error) {
	if err := checkBPFFS(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory %s: %w", dir, err)
	}
	if err := checkLayout(dir); err != nil {
		return nil, err
	}
	if _, err := recoverMapPins(dir); err != nil {
		return nil, err
	}
	spec, err := loadCtlb()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF spec: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
	}
	d := &Datapath{dir: dir}
	err = spec.LoadAndAssign(&d.objs.ctlbMaps, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if err != nil {
		return nil, fmt.Errorf("load maps pinned in %s: %w", dir, mapErr(err))
	}
	crashpoint.Hit(crashpoint.CreateMaps)
	if err := d.adoptOrLoadPrograms(spec); err != nil {
		d.objs.ctlbMaps.Close()
		return nil, err
	}
	return d, nil
}

// Open adopts the objects pinned in dir without creating anything: the CNI
// plugin and tools use it. It fails with ErrNotPinned when ctlbd has not
// pinned them yet.
func Open(dir string) (*Datapath, error) {
	if err := checkLayout(dir); err != nil {
		return nil, err
	}
	d := &Datapath{dir: dir, progs: map[string]*ebpf.Program{}}
	maps := []struct {
		name string
		dst  **ebpf.Map
	}{
		{ctlbMapCtlbServicesV1, &d.objs.CtlbServicesV1},
		{ctlbMapCtlbRrV1, &d.objs.CtlbRrV1},
		{ctlbMapCtlbConnectsV1, &d.objs.CtlbConnectsV1},
		{ctlbMapCtlbOpenV1, &d.objs.CtlbOpenV1},
		{ctlbMapCtlbSocksV1, &d.objs.CtlbSocksV1},
	}
	for _, m := range maps {
		p := filepath.Join(dir, m.name)
		mp, err := ebpf.LoadPinnedMap(p, nil)
		if err != nil {
			d.Close()
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("open %s: %w (is ctlbd running with this bpffs directory?)", p, ErrNotPinned)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", p, err)
		}
		*m.dst = mp
	}
	for _, h := range hooks {
		p := filepath.Join(dir, progPin(h.name))
		prog, err := ebpf.LoadPinnedProgram(p, nil)
		if err != nil {
			d.Close()
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("open %s: %w (is ctlbd running with this bpffs directory?)", p, ErrNotPinned)
			}
			return nil, fmt.Errorf("open pinned program %s: %w", p, err)
		}
		d.progs[h.name] = prog
	}
	return d, nil
}

// progPin is the pin name of a program, carrying the layout version.
func progPin(hook string) string { return fmt.Sprintf("ctlb_%s_v%d", hook, Layout) }

// adoptOrLoadPrograms loads the embedded programs against the pinned maps
// and, per hook, keeps the pinned program when it is the same code (same
// kernel tag) or else upgrades to the embedded one: every existing link of
// that hook is switched to the new program in place (BPF_LINK_UPDATE, atomic
// for the cgroup: no connect() runs without the hook), then the program pin
// is replaced. Attachments survive an upgrade; nothing is detached.
func (d *Datapath) adoptOrLoadPrograms(spec *ebpf.CollectionSpec) error {
	d.progs = map[string]*ebpf.Program{}
	specs := map[string]string{
		"connect4":     ctlbProgCtlbConnect4,
		"getpeername4": ctlbProgCtlbGetpeername4,
		"sock_release": ctlbProgCtlbSockRelease,
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: d.dir},
	})
	if err != nil {
		return fmt.Errorf("load BPF programs: %w", mapErr(err))
	}
	defer coll.Close()
	for _, h := range hooks {
		embedded := coll.Programs[specs[h.name]]
		p := filepath.Join(d.dir, progPin(h.name))
		pinned, err := ebpf.LoadPinnedProgram(p, nil)
		switch {
		case err == nil:
			same, err := sameTag(pinned, embedded)
			if err != nil {
				pinned.Close()
				d.closeProgs()
				return err
			}
			if same {
				d.progs[h.name] = pinned
				continue
			}
			pinned.Close()
			prog, err := d.upgradeProgram(h.name, embedded)
			if err != nil {
				d.closeProgs()
				return err
			}
			d.progs[h.name] = prog
		case errors.Is(err, fs.ErrNotExist):
			prog, err := embedded.Clone()
			if err != nil {
				d.closeProgs()
				return fmt.Errorf("clone program %s: %w", h.name, err)
			}
			if err := prog.Pin(p); err != nil {
				prog.Close()
				d.closeProgs()
				return fmt.Errorf("pin program %s: %w", p, err)
			}
			d.progs[h.name] = prog
			crashpoint.Hit(crashpoint.CreatePrograms)
		default:
			d.closeProgs()
			return fmt.Errorf("open pinned program %s: %w", p, err)
		}
	}
	return nil
}

// sameTag compares two programs by the kernel's tag of their instructions.
func sameTag(a, b *ebpf.Program) (bool, error) {
	ai, err := a.Info()
	if err != nil {
		return false, fmt.Errorf("program info: %w", err)
	}
	bi, err := b.Info()
	if err != nil {
		return false, fmt.Errorf("program info: %w", err)
	}
	return ai.Tag == bi.Tag, nil
}

// upgradeProgram switches every attachment's link of one hook to prog and
// then pins prog in place of the old program.
func (d *Datapath) upgradeProgram(hook string, embedded *ebpf.Program) (*ebpf.Program, error) {
	prog, err := embedded.Clone()
	if err != nil {
		return nil, fmt.Errorf("clone program %s: %w", hook, err)
	}
	entries, err := os.ReadDir(d.linksDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		prog.Close()
		return nil, fmt.Errorf("upgrade %s: %w", hook, err)
	}
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "_") {
			continue
		}
		lp := filepath.Join(d.linksDir(), e.Name(), hook)
		l, err := link.LoadPinnedLink(lp, nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			prog.Close()
			return nil, fmt.Errorf("upgrade %s: load %s: %w", hook, lp, err)
		}
		err = l.Update(prog)
		l.Close()
		if err != nil {
			prog.Close()
			return nil, fmt.Errorf("upgrade %s: update link %s: %w", hook, lp, err)
		}
		crashpoint.Hit(crashpoint.Upgrade)
	}
	// Pin beside the old pin, then rename over it: the pin never vanishes.
	p := filepath.Join(d.dir, progPin(hook))
	tmp := filepath.Join(d.dir, "_new_"+progPin(hook))
	_ = os.Remove(tmp)
	if err := prog.Pin(tmp); err != nil {
		prog.Close()
		return nil, fmt.Errorf("upgrade %s: pin: %w", hook, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		prog.Close()
		return nil, fmt.Errorf("upgrade %s: replace pin: %w", hook, err)
	}
	// The handle still names the temporary path as its pin; Repin copes.
	return prog, nil
}

func (d *Datapath) closeProgs() {
	for _, p := range d.progs {
		p.Close()
	}
	d.progs = map[string]*ebpf.Program{}
}

// Close releases this process's handles. Pinned objects stay: the data path
// never depends on a running process (invariant 1).
func (d *Datapath) Close() error {
	d.closeProgs()
	return d.objs.ctlbMaps.Close()
}

// Unpin removes every ctlb pin in the directory, links included; used by
// uninstall and tests. Attachments stop working once their links are gone.
func (d *Datapath) Unpin() error {
	if err := os.RemoveAll(filepath.Join(d.dir, "links")); err != nil {
		return fmt.Errorf("unpin links: %w", err)
	}
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", d.dir, err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "ctlb_") {
			if err := os.Remove(filepath.Join(d.dir, e.Name())); err != nil {
				return fmt.Errorf("unpin %s: %w", e.Name(), err)
			}
		}
	}
	return nil
}

// checkLayout refuses a directory holding ctlb pins of another layout.
func checkLayout(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read pin directory %s: %w", dir, err)
	}
	for _, e := range entries {
		m := versionedName.FindStringSubmatch(e.Name())
		if m != nil && m[1] != fmt.Sprint(Layout) {
			return fmt.Errorf("%s/%s: layout v%s, this ctlb speaks v%d: %w", dir, e.Name(), m[1], Layout, ErrLayout)
		}
	}
	return nil
}

// mapErr turns cilium/ebpf's incompatible-pin error into ErrLayout, so a pin
// with the right name but another format is refused as clearly.
func mapErr(err error) error {
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("%w: %w", ErrLayout, err)
	}
	return err
}

// checkBPFFS makes sure dir is (or will be created) on a bpffs: pins
// anywhere else fail with an obscure EPERM.
func checkBPFFS(dir string) error {
	p := dir
	for {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("pin directory %s: %s is not on a bpffs (mount -t bpf bpf %s)", dir, p, p)
			}
			return nil
		}
		if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("statfs %s: %w", p, err)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return fmt.Errorf("pin directory %s: no existing parent", dir)
		}
		p = parent
	}
}

// IsBPFFS reports whether path is on a bpffs.
func IsBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}
