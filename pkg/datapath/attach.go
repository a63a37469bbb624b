package datapath

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/ctlb/ctlb/internal/cgroupv2"
)

// ErrNoAttachment means no attachment with that ID is pinned.
var ErrNoAttachment = errors.New("no such attachment")

// Attachment is ctlb's programs attached to one cgroup, held by pinned
// bpf_links under DIR/links/ID. For pods the ID is the sandbox's container ID.
type Attachment struct {
	ID string `json:"id"`
	// CgroupID is the kernel's ID of the cgroup (the inode of its directory).
	// It reads 0 once the cgroup is gone and the kernel dropped its programs.
	CgroupID uint64 `json:"cgroupId"`
	// CgroupPath is the cgroup's directory, when it still exists.
	CgroupPath string `json:"cgroupPath,omitempty"`
	// Alive is false when the cgroup has died: the links do nothing any more
	// and the attachment should be garbage-collected.
	Alive bool `json:"alive"`
	// Missing names hooks whose pin is gone (someone removed it by hand).
	Missing []string `json:"missing,omitempty"`
}

// ValidateAttachmentID accepts IDs that are safe as one bpffs path element:
// bpffs refuses names with dots, and "_" starts ctlb's own temporary names.
func ValidateAttachmentID(id string) error {
	if !cgroupv2.IsPlainName(id) {
		return fmt.Errorf("attachment ID %q: want 1-128 characters of [A-Za-z0-9_-], starting with a letter or digit", id)
	}
	return nil
}

// CgroupAttachmentID names the attachment made for a cgroup by path (ctlbd
// attach --cgroup): one per cgroup, stable across calls.
func CgroupAttachmentID(cgroupID uint64) string { return fmt.Sprintf("cgroup-%d", cgroupID) }

// CgroupIDOf is the cgroup ID a CgroupAttachmentID names; ok is false for
// IDs of other forms (the CNI plugin's).
func CgroupIDOf(id string) (cgroupID uint64, ok bool) {
	n, found := strings.CutPrefix(id, "cgroup-")
	if !found {
		return 0, false
	}
	v, err := strconv.ParseUint(n, 10, 64)
	return v, err == nil
}

func (d *Datapath) linksDir() string { return filepath.Join(d.dir, "links") }

// InflightDir is the directory, under DIR/links, that holds the temporary
// directories of attaches and detaches under way (_tmp-ID-<hex>,
// _del-ID-<hex>) and what callers killed half-way left of them. Apart from
// the attachments, so that an ADD or DEL looks for what an interrupted one
// left by listing the few operations in flight, not every attachment on
// the node (issue 18: ADD at 1,000 attached pods). Its "_" keeps it out of
// listings of attachments.
const InflightDir = "_inflight"

func inflightDir(dir string) string { return filepath.Join(dir, "links", InflightDir) }

// temporaryPrefixes start the names of Attach's (_tmp-) and Detach's (_del-)
// temporary directories.
var temporaryPrefixes = []string{"_tmp-", "_del-"}

func isTemporary(name string) bool {
	return slices.ContainsFunc(temporaryPrefixes, func(p string) bool { return strings.HasPrefix(name, p) })
}

// temporary is one temporary directory, and the directory it is in.
type temporary struct {
	parent string
	entry  fs.DirEntry
}

func (t temporary) path() string { return filepath.Join(t.parent, t.entry.Name()) }

// temporaries lists the temporary directories in each of dirs; a missing
// directory holds none.
func temporaries(dirs ...string) ([]temporary, error) {
	var out []temporary
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", d, err)
		}
		for _, e := range entries {
			if isTemporary(e.Name()) {
				out = append(out, temporary{d, e})
			}
		}
	}
	return out, nil
}

// Attach attaches the per-pod hooks (sock_ops, getpeername4/6, recvmsg4/6,
// connect4/6, sendmsg4/6, in that order; sock_release sits once at the
// cgroup v2 root) to the cgroup directory with bpf_links (which always
// allow other programs beside them)
// and pins the links under DIR/links/ID. The pins are made in a temporary
// directory renamed into place, so an attachment is whole or absent, never
// half-made, even if the caller dies half-way. Attaching the same ID to the
// same cgroup again is a no-op; to another cgroup it is an error.
// The links are pinned before Attach returns, so they outlive the caller (ARCHITECTURE.md I1).
func (d *Datapath) Attach(id, cgroupDir string) (Attachment, error) {
	if err := ValidateAttachmentID(id); err != nil {
		return Attachment{}, err
	}
	cgID, err := cgroupv2.ID(cgroupDir)
	if err != nil {
		return Attachment{}, fmt.Errorf("attach %s: %w", id, err)
	}
	if a, err := d.Attachment(id); err == nil {
		if a.CgroupID != cgID {
			return Attachment{}, fmt.Errorf("attach %s to %s: already attached to cgroup %d", id, cgroupDir, a.CgroupID)
		}
		if len(a.Missing) == 0 {
			a.CgroupPath = cgroupDir
			return a, nil
		}
		// Pins were removed by hand: make the attachment whole again.
		if err := d.Detach(id); err != nil {
			return Attachment{}, err
		}
	} else if !errors.Is(err, ErrNoAttachment) {
		return Attachment{}, err
	}

	if err := os.MkdirAll(inflightDir(d.dir), 0o700); err != nil {
		return Attachment{}, fmt.Errorf("attach %s: %w", id, err)
	}
	tmp := filepath.Join(inflightDir(d.dir), "_tmp-"+id+"-"+randomSuffix())
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return Attachment{}, fmt.Errorf("attach %s: %w", id, err)
	}
	var links []link.Link
	fail := func(err error) (Attachment, error) {
		// Unpinning and closing detaches: nothing is left behind.
		for _, l := range links {
			l.Close()
		}
		os.RemoveAll(tmp)
		return Attachment{}, err
	}
	// One descriptor of the cgroup for every hook, and bpf_link_create
	// directly: link.AttachCgroup would open the directory and probe for
	// bpf_link support once per hook, on the pod's start-up path. Links
	// are what ctlb pins, so the probe's fallback to a bare attach would
	// be refused anyway.
	cg, err := os.Open(cgroupDir)
	if err != nil {
		return fail(fmt.Errorf("attach %s: %w", id, err))
	}
	defer cg.Close()
	for _, h := range hooks {
		l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(cg.Fd()), Program: d.progs[h.name], Attach: h.attach})
		if err != nil {
			return fail(fmt.Errorf("attach %s to %s: %w", h.name, cgroupDir, err))
		}
		links = append(links, l)
		if err := l.Pin(filepath.Join(tmp, h.name)); err != nil {
			return fail(fmt.Errorf("attach %s: pin %s link: %w", id, h.name, err))
		}
	}
	final := filepath.Join(d.linksDir(), id)
	if err := os.Rename(tmp, final); err != nil {
		if a, err2 := d.Attachment(id); err2 == nil && a.CgroupID == cgID {
			// A concurrent Attach of the same ID won the race.
			a.CgroupPath = cgroupDir
			fail(nil)
			return a, nil
		}
		return fail(fmt.Errorf("attach %s: rename into place: %w", id, err))
	}
	for _, l := range links {
		l.Close() // the pins hold the links now
	}
	return Attachment{ID: id, CgroupID: cgID, CgroupPath: cgroupDir, Alive: true}, nil
}

// Detach removes an attachment: the links are unpinned, which detaches the
// programs from the cgroup. A missing attachment is ErrNoAttachment, which
// CNI DEL treats as success.
func (d *Datapath) Detach(id string) error { return DetachPinned(d.dir, id) }

// DetachPinned is Detach for a pin directory that may not be whole: it
// needs only the attachment's link pins, not the maps or programs, so CNI
// DEL detaches a pod even when someone removed other pins by hand.
func DetachPinned(dir, id string) error {
	if err := ValidateAttachmentID(id); err != nil {
		return err
	}
	links := filepath.Join(dir, "links")
	final := filepath.Join(links, id)
	// Rename first, so the attachment leaves listings in one step.
	gone := filepath.Join(inflightDir(dir), "_del-"+id+"-"+randomSuffix())
	if err := os.Mkdir(inflightDir(dir), 0o700); err != nil && !errors.Is(err, fs.ErrExist) && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	if err := os.Rename(final, gone); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("detach %s: %w", id, ErrNoAttachment)
		}
		return fmt.Errorf("detach %s: %w", id, err)
	}
	// Redirect stops before accounting does, the reverse of Attach.
	for i := len(hooks) - 1; i >= 0; i-- {
		if err := os.Remove(filepath.Join(gone, hooks[i].name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("detach %s: unpin %s: %w", id, hooks[i].name, err)
		}
	}
	if err := os.RemoveAll(gone); err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	return nil
}

// RemoveInterrupted removes what a caller killed half-way through Attach or
// Detach of attachment id left in dir: its _tmp-ID-<hex> and _del-ID-<hex>
// directories. They are no attachment (listings skip them), yet their
// pinned links keep the programs on the cgroup. Only the caller that owns
// id may call it (the runtime never runs two operations of one container at
// once); RemoveStale is the age-based sweep for everything else. It lists
// only InflightDir, so its cost does not grow with the attachments. What
// earlier versions left at the top of DIR/links ctlbd moves into
// InflightDir at start; GC (Interrupted, RemoveInterruptedAll) and
// RemoveStale look there too.
func RemoveInterrupted(dir, id string) (int, error) {
	return removeInterruptedIn(inflightDir(dir), id)
}

func removeInterruptedIn(dir, id string) (int, error) {
	tmps, err := temporaries(dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, t := range tmps {
		if got, ok := temporaryID(t.entry.Name()); !ok || got != id {
			continue
		}
		if err := os.RemoveAll(t.path()); err != nil {
			return n, fmt.Errorf("remove interrupted %s: %w", t.entry.Name(), err)
		}
		n++
	}
	return n, nil
}

// RemoveInterruptedAll is RemoveInterrupted that also looks where versions
// before InflightDir left their temporaries, at the top of DIR/links: for
// GC, which lists every attachment anyway.
func RemoveInterruptedAll(dir, id string) (int, error) {
	n, err := RemoveInterrupted(dir, id)
	if err != nil {
		return n, err
	}
	m, err := removeInterruptedIn(filepath.Join(dir, "links"), id)
	return n + m, err
}

// Interrupted lists the attachment IDs that have a temporary directory in
// dir left by a caller killed half-way through Attach or Detach (in
// InflightDir, or at the top of DIR/links where earlier versions made
// them). GC uses it to finish detaches it (or a DEL) started before it was
// killed.
func Interrupted(dir string) ([]string, error) {
	tmps, err := temporaries(inflightDir(dir), filepath.Join(dir, "links"))
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var ids []string
	for _, t := range tmps {
		if id, ok := temporaryID(t.entry.Name()); ok && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// moveLegacyTemporaries moves the temporary directories earlier versions
// made at the top of DIR/links into InflightDir, where a retried ADD or
// DEL of their ID finds them. ctlbd does it at start (Create). A call of an
// earlier plugin still running meanwhile loses its directory, fails, and is
// retried by the runtime, which then cleans up.
func moveLegacyTemporaries(dir string) error {
	tmps, err := temporaries(filepath.Join(dir, "links"))
	if err != nil {
		return err
	}
	for _, t := range tmps {
		if err := os.Rename(t.path(), filepath.Join(inflightDir(dir), t.entry.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("move %s into %s: %w", t.entry.Name(), InflightDir, err)
		}
	}
	return nil
}

// temporaryID is the attachment ID of a temporary directory's name: the
// prefix, the ID, then "-" and the 12-hex-digit suffix randomSuffix makes,
// so that the attachment "cni-a" never claims those of "cni-a-1".
func temporaryID(name string) (string, bool) {
	for _, prefix := range temporaryPrefixes {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok || len(rest) < 14 || rest[len(rest)-13] != '-' {
			continue
		}
		if suffix := rest[len(rest)-12:]; strings.Trim(suffix, "0123456789abcdef") == "" {
			return rest[:len(rest)-13], true
		}
	}
	return "", false
}

// Attachment reads one attachment's state from its pins.
func (d *Datapath) Attachment(id string) (Attachment, error) {
	if err := ValidateAttachmentID(id); err != nil {
		return Attachment{}, err
	}
	return d.readAttachment(id, nil)
}

func (d *Datapath) readAttachment(id string, index map[uint64]string) (Attachment, error) {
	dir := filepath.Join(d.linksDir(), id)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Attachment{}, fmt.Errorf("attachment %s: %w", id, ErrNoAttachment)
		}
		return Attachment{}, fmt.Errorf("attachment %s: %w", id, err)
	}
	a := Attachment{ID: id}
	for _, h := range hooks {
		l, err := link.LoadPinnedLink(filepath.Join(dir, h.name), nil)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				a.Missing = append(a.Missing, h.name)
				continue
			}
			return Attachment{}, fmt.Errorf("attachment %s: load %s link: %w", id, h.name, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return Attachment{}, fmt.Errorf("attachment %s: %s link info: %w", id, h.name, err)
		}
		if cg := info.Cgroup(); cg != nil && a.CgroupID == 0 {
			a.CgroupID = cg.CgroupId
		}
	}
	if a.CgroupID != 0 {
		if index != nil {
			a.CgroupPath = index[a.CgroupID]
		} else if h, err := cgroupv2.Default(); err == nil {
			if idx, err := h.IndexByID(); err == nil {
				a.CgroupPath = idx[a.CgroupID]
			}
		}
	}
	a.Alive = a.CgroupID != 0 && a.CgroupPath != ""
	return a, nil
}

// Attachments lists every attachment, sorted by ID.
func (d *Datapath) Attachments() ([]Attachment, error) {
	entries, err := os.ReadDir(d.linksDir())
	if errors.Is(err, fs.ErrNotExist) {
		return []Attachment{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	out := []Attachment{}
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "_") {
			continue
		}
		// An empty index: paths are filled in below, from an index taken
		// after every link was read, so a cgroup created just before its
		// attachment is never missing from it.
		a, err := d.readAttachment(e.Name(), map[uint64]string{})
		if errors.Is(err, ErrNoAttachment) {
			continue // detached while we listed
		}
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	index := map[uint64]string{}
	if h, err := cgroupv2.Default(); err == nil && len(out) > 0 {
		// Fail rather than report every attachment dead on a bad walk.
		if index, err = h.IndexByID(); err != nil {
			return nil, fmt.Errorf("list attachments: %w", err)
		}
	}
	for i := range out {
		out[i].CgroupPath = index[out[i].CgroupID]
		out[i].Alive = out[i].CgroupID != 0 && out[i].CgroupPath != ""
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// RemoveStale removes what a caller killed half-way through Attach or Detach
// left behind: temporary link directories (_tmp-*, _del-*) older than age. Their links were
// never visible as attachments; unpinning them detaches them.
func (d *Datapath) RemoveStale(age time.Duration) (int, error) {
	tmps, err := temporaries(inflightDir(d.dir), d.linksDir())
	if err != nil {
		return 0, err
	}
	n := 0
	for _, t := range tmps {
		info, err := t.entry.Info()
		if err != nil || time.Since(info.ModTime()) < age {
			continue
		}
		if err := os.RemoveAll(t.path()); err != nil {
			return n, fmt.Errorf("remove stale %s: %w", t.entry.Name(), err)
		}
		n++
	}
	return n, nil
}

func randomSuffix() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
