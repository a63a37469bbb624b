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
//	DIR/ctlb_services_v2 ... maps, pinned by name
//	DIR/ctlb_connect4_v2 ... programs, so that short-lived callers (the CNI
//	                         plugin) attach the very programs that use DIR's maps
//	DIR/ctlb_release_link_v2 sock_release on the cgroup v2 root
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
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/crashpoint"
)

// DefaultDir is where ctlb pins its objects unless told otherwise.
const DefaultDir = "/sys/fs/bpf/ctlb"

// Layout is the version of the map and program layout this build speaks. It
// is part of every pinned name.
const Layout = 2

// MaxServers is the largest server set one VIP may have; the connect
// programs refuse to index beyond it.
const MaxServers = 1024

// ErrNotPinned means the directory holds no ctlb objects: ctlbd has not run
// on this bpffs yet.
var ErrNotPinned = errors.New("ctlb objects are not pinned")

// ErrLayout means the directory holds pins of a layout this build does not
// understand (invariant 6: refuse rather than misread).
var ErrLayout = errors.New("pinned ctlb objects have another layout")

var versionedName = regexp.MustCompile(`^ctlb_[a-z0-9_]+_v([0-9]+)$`)

type hook struct {
	name   string // pin name inside an attachment directory
	attach ebpf.AttachType
}

// hooks are the programs of one attachment, in attach order: accounting
// and translation back to the VIP first, redirect last, so that no socket
// is redirected before its state is understood. Detach runs in reverse.
var hooks = []hook{
	{"sock_ops", ebpf.AttachCGroupSockOps},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername},
	{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg},
	{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg},
	{"connect4", ebpf.AttachCGroupInet4Connect},
	{"connect6", ebpf.AttachCGroupInet6Connect},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg},
	{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg},
}

// AttachTypes are the hooks one attachment puts on its cgroup, one program
// each (tools and tests compare them with what the kernel lists).
func AttachTypes() []ebpf.AttachType {
	out := make([]ebpf.AttachType, 0, len(hooks))
	for _, h := range hooks {
		out = append(out, h.attach)
	}
	return out
}

// rootHook is attached once per node, at the cgroup v2 root: release must
// run for a socket even after its pod was detached, or open counts leak.
var rootHook = hook{"sock_release", ebpf.AttachCgroupInetSockRelease}

// rootLinkPin is the pin of the root release link.
var rootLinkPin = fmt.Sprintf("ctlb_release_link_v%d", Layout)

// allHooks are every program ctlb pins.
func allHooks() []hook { return append(append([]hook{}, hooks...), rootHook) }

// progSpecName is a hook's program name in the BPF object.
func progSpecName(hook string) string { return "ctlb_" + hook }

// mapNames are the pinned maps of layout v2.
var mapNames = []string{
	"ctlb_services_v2", "ctlb_svcstate_v2", "ctlb_counters_v2", "ctlb_open_v2",
	"ctlb_failing_v2", "ctlb_slots_v2", "ctlb_config_v2", "ctlb_socks_v2",
	"ctlb_socktab_v2",
}

// addedMaps joined layout 2 after its first release: pins made by an
// earlier ctlbd lack them, and that ctlbd's programs do not use them. Open
// takes such a directory as it is (the plugin is installed before the new
// ctlbd starts, docs/UPGRADE.md); Create adds them.
var addedMaps = map[string]bool{"ctlb_socktab_v2": true}

// dpMaps are the maps of layout v2.
type dpMaps struct {
	services *ebpf.Map
	svcstate *ebpf.Map
	counters *ebpf.Map
	open     *ebpf.Map
	failing  *ebpf.Map
	slots    *ebpf.Map
	config   *ebpf.Map
	socks    *ebpf.Map
	socktab  *ebpf.Map
}

func (m *dpMaps) byName() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		"ctlb_services_v2": &m.services, "ctlb_svcstate_v2": &m.svcstate,
		"ctlb_counters_v2": &m.counters, "ctlb_open_v2": &m.open,
		"ctlb_failing_v2": &m.failing, "ctlb_slots_v2": &m.slots,
		"ctlb_config_v2": &m.config, "ctlb_socks_v2": &m.socks,
		"ctlb_socktab_v2": &m.socktab,
	}
}

func (m *dpMaps) close() {
	for _, p := range m.byName() {
		if *p != nil {
			(*p).Close()
			*p = nil
		}
	}
}

// Datapath is an open handle on one pinned set of ctlb objects.
type Datapath struct {
	dir   string
	maps  dpMaps
	progs map[string]*ebpf.Program // by hook name

	allocOnce sync.Mutex
	alloc     *slotAllocator
	// writer: this handle came from Create, ctlbd's, the one process
	// that writes the service maps (invariant 4). Its allocator retires
	// the slots a crash left given out (retireStrays).
	writer bool

	batchMu sync.Mutex
	noBatch bool

	// Upgraded says what an upgrade from an older layout did at Create.
	upgraded *UpgradeReport

	// cgPaths caches attached cgroups' directories for AttachedNetNS.
	cgPaths cgroupPathCache
}

// Dir is the bpffs directory the objects are pinned in.
func (d *Datapath) Dir() string { return d.dir }

// Map returns one of the layout's maps by its pin name (e.g.
// "ctlb_socks_v2"), for BPF objects that share them (socket termination).
func (d *Datapath) Map(name string) (*ebpf.Map, bool) {
	p, ok := d.maps.byName()[name]
	if !ok || *p == nil {
		return nil, false
	}
	return *p, true
}

// mainSpec is the embedded collection without the upgrade-only objects.
func mainSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadCtlb()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF spec: %w", err)
	}
	delete(spec.Programs, "ctlb_release_v1")
	delete(spec.Programs, "ctlb_slot_adjust")
	delete(spec.Maps, "ctlb_socks_v1")
	delete(spec.Maps, "ctlb_v1slots_v2")
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
	}
	return spec, nil
}

// Create opens the objects pinned in dir, loading and pinning the embedded
// ones first where they are missing, and upgrading pins of layout v1 in
// place. Only ctlbd creates: it is the writer that owns the maps (invariant
// 4). dir must be on a bpffs. Adopting, never rebuilding, is
// ARCHITECTURE.md I1; refusing unknown layouts and upgrading known ones, I6.
func Create(dir string) (*Datapath, error) {
	if err := checkBPFFS(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(inflightDir(dir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory %s: %w", dir, err)
	}
	if err := moveLegacyTemporaries(dir); err != nil {
		return nil, err
	}
	old, err := checkLayout(dir)
	if err != nil {
		return nil, err
	}
	if old == 0 {
		// Same layout: map pins lost while no daemon ran are taken back
		// from the programs that still use them.
		if _, err := recoverMapPins(dir); err != nil {
			return nil, err
		}
	}
	spec, err := mainSpec()
	if err != nil {
		return nil, err
	}
	d := &Datapath{dir: dir, writer: true}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if err != nil {
		return nil, fmt.Errorf("load BPF objects pinned in %s: %w", dir, mapErr(err))
	}
	defer coll.Close()
	crashpoint.Hit(crashpoint.CreateMaps)
	for name, dst := range d.maps.byName() {
		m, ok := coll.Maps[name]
		if !ok {
			d.maps.close()
			return nil, fmt.Errorf("embedded BPF object lacks map %s", name)
		}
		if *dst, err = m.Clone(); err != nil {
			d.maps.close()
			return nil, fmt.Errorf("map %s: %w", name, err)
		}
	}
	if err := d.adoptOrLoadPrograms(coll); err != nil {
		d.Close()
		return nil, err
	}
	if old == 1 {
		rep, err := d.upgradeV1()
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("upgrade layout v1 pins in %s to v%d: %w", dir, Layout, err)
		}
		d.upgraded = rep
	}
	// The allocation now, not at the first set: slots a crash left given
	// out are retired at start, and StraySlots can say so.
	if _, err := d.allocator(); err != nil {
		d.Close()
		return nil, fmt.Errorf("server slots in %s: %w", dir, err)
	}
	return d, nil
}

// StraySlots is how many server slots Create found given out but named by
// no VIP's current set, and retired: what a writer killed during a set
// leaves (its new VIP's slots, or the slots of servers that left a set).
// Each is given out again once no socket holds it.
func (d *Datapath) StraySlots() int {
	d.allocOnce.Lock()
	defer d.allocOnce.Unlock()
	if d.alloc == nil {
		return 0
	}
	return d.alloc.strays
}

// Upgraded reports what Create's in-place upgrade from layout v1 did, or
// nil when no upgrade ran.
func (d *Datapath) Upgraded() *UpgradeReport { return d.upgraded }

// Open adopts the objects pinned in dir without creating anything: the CNI
// plugin and tools use it. It fails with ErrNotPinned when ctlbd has not
// pinned them yet.
func Open(dir string) (*Datapath, error) { return open(dir, true) }

// OpenForAttach is Open for a caller that only attaches and detaches, as
// the CNI plugin's ADD, which runs once per pod on its start-up path: it
// opens the pinned programs and only checks that the map pins are there
// (ErrNotPinned as Open when one is not), without opening them. Only
// Attach, Attachment, Attachments, Detach and Close may be called on what
// it returns.
func OpenForAttach(dir string) (*Datapath, error) { return open(dir, false) }

func open(dir string, withMaps bool) (*Datapath, error) {
	old, err := checkLayout(dir)
	if err != nil {
		return nil, err
	}
	d, err := openPinned(dir, withMaps)
	if err != nil && old != 0 {
		// v1 pins and no whole v2 set: the upgrade has not run (or not
		// got this far). Once the v2 objects are pinned they serve, even
		// while the upgrade finishes with the v1 ones.
		return nil, fmt.Errorf("%s holds layout v%d pins not yet upgraded (start ctlbd of this version to upgrade them): %w", dir, old, ErrLayout)
	}
	return d, err
}

func openPinned(dir string, withMaps bool) (*Datapath, error) {
	d := &Datapath{dir: dir, progs: map[string]*ebpf.Program{}}
	for name, dst := range d.maps.byName() {
		p := filepath.Join(dir, name)
		var err error
		if withMaps {
			*dst, err = ebpf.LoadPinnedMap(p, nil)
		} else {
			_, err = os.Lstat(p) // present is enough: the programs hold their maps
		}
		if err != nil && addedMaps[name] && errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			d.Close()
			return nil, pinErr("map", p, err)
		}
	}
	for _, h := range hooks {
		p := filepath.Join(dir, progPin(h.name))
		prog, err := ebpf.LoadPinnedProgram(p, nil)
		if err != nil {
			d.Close()
			return nil, pinErr("program", p, err)
		}
		d.progs[h.name] = prog
	}
	return d, nil
}

// pinErr says why the pinned map or program at p could not be opened: not
// pinned (yet) is ErrNotPinned.
func pinErr(kind, p string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("open %s: %w (is ctlbd running with this bpffs directory?)", p, ErrNotPinned)
	}
	return fmt.Errorf("open pinned %s %s: %w", kind, p, err)
}

// progPin is the pin name of a program, carrying the layout version.
func progPin(hook string) string { return fmt.Sprintf("ctlb_%s_v%d", hook, Layout) }

// adoptOrLoadPrograms takes the programs loaded against the pinned maps
// and, per hook, keeps the pinned program when it is the same code (same
// kernel tag) or else upgrades to the embedded one: every existing link of
// that hook is switched to the new program in place (BPF_LINK_UPDATE, atomic
// for the cgroup: no connect() runs without the hook), then the program pin
// is replaced. Attachments survive an upgrade; nothing is detached.
//
// The root's sock_release goes first, its link updated before any pod's
// program changes: a release program always understands the socket state
// of every connect program in use (a new connect program may keep state
// where an older release would not look).
func (d *Datapath) adoptOrLoadPrograms(coll *ebpf.Collection) error {
	d.progs = map[string]*ebpf.Program{}
	err := d.adoptOrLoadProgram(coll, rootHook)
	if err == nil {
		err = d.ensureRootRelease()
	}
	for _, h := range hooks {
		if err != nil {
			break
		}
		err = d.adoptOrLoadProgram(coll, h)
	}
	if err != nil {
		d.closeProgs()
	}
	return err
}

// adoptOrLoadProgram does adoptOrLoadPrograms' work for one hook, into
// d.progs.
func (d *Datapath) adoptOrLoadProgram(coll *ebpf.Collection, h hook) error {
	embedded := coll.Programs[progSpecName(h.name)]
	if embedded == nil {
		return fmt.Errorf("embedded BPF object lacks program %s", progSpecName(h.name))
	}
	p := filepath.Join(d.dir, progPin(h.name))
	pinned, err := ebpf.LoadPinnedProgram(p, nil)
	switch {
	case err == nil:
		same, err := sameTag(pinned, embedded)
		if err != nil {
			pinned.Close()
			return err
		}
		if same {
			d.progs[h.name] = pinned
			return nil
		}
		pinned.Close()
		prog, err := d.upgradeProgram(h.name, embedded)
		if err != nil {
			return err
		}
		d.progs[h.name] = prog
	case errors.Is(err, fs.ErrNotExist):
		prog, err := embedded.Clone()
		if err != nil {
			return fmt.Errorf("clone program %s: %w", h.name, err)
		}
		if err := prog.Pin(p); err != nil {
			prog.Close()
			return fmt.Errorf("pin program %s: %w", p, err)
		}
		d.progs[h.name] = prog
		crashpoint.Hit(crashpoint.CreatePrograms)
	default:
		return fmt.Errorf("open pinned program %s: %w", p, err)
	}
	return nil
}

// ensureRootRelease attaches sock_release at the cgroup v2 root once per
// pin directory and keeps the link pinned (DIR/ctlb_release_link_v2).
func (d *Datapath) ensureRootRelease() error {
	p := filepath.Join(d.dir, rootLinkPin)
	l, err := link.LoadPinnedLink(p, nil)
	if err == nil {
		defer l.Close()
		info, err := l.Info()
		if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId != 0 {
			pi, err := d.progs[rootHook.name].Info()
			if id, ok := pi.ID(); err == nil && ok && id == info.Program {
				return nil
			}
			if err := l.Update(d.progs[rootHook.name]); err != nil {
				return fmt.Errorf("update root release link: %w", err)
			}
			return nil
		}
		_ = os.Remove(p) // a link whose cgroup is gone: attach again
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("load root release link %s: %w", p, err)
	}
	root, err := cgroupv2.Mountpoint()
	if err != nil {
		return fmt.Errorf("root release: %w", err)
	}
	nl, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: rootHook.attach, Program: d.progs[rootHook.name]})
	if err != nil {
		return fmt.Errorf("attach sock_release to the cgroup root %s: %w", root, err)
	}
	defer nl.Close()
	tmp := filepath.Join(d.dir, "_new_"+rootLinkPin)
	_ = os.Remove(tmp)
	if err := nl.Pin(tmp); err != nil {
		return fmt.Errorf("pin root release link: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin root release link: %w", err)
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
	d.maps.close()
	return nil
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

// checkLayout refuses a directory holding ctlb pins of a layout this build
// cannot read. It returns 1 when the directory holds layout v1 pins, which
// Create upgrades in place.
func checkLayout(dir string) (int, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read pin directory %s: %w", dir, err)
	}
	old := 0
	for _, e := range entries {
		m := versionedName.FindStringSubmatch(e.Name())
		if m == nil || m[1] == fmt.Sprint(Layout) {
			continue
		}
		if m[1] == "1" {
			old = 1
			continue
		}
		return 0, fmt.Errorf("%s/%s: layout v%s, this ctlb speaks v%d (and upgrades v1): %w", dir, e.Name(), m[1], Layout, ErrLayout)
	}
	return old, nil
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
