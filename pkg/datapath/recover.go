package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// recoverMapPins puts back map pins that were removed while no daemon held
// the maps, taking the maps from the programs that still use them: a pinned
// program, or the program behind any pinned link. Without this, a restarted
// daemon would create fresh, empty maps while the attached programs kept
// reading the old ones: server sets written to one, read from the other.
// It returns the names it re-pinned.
func recoverMapPins(dir string) ([]string, error) {
	names := map[string]string{} // kernel (truncated) name -> pin name
	missing := 0
	for _, n := range mapNames {
		if _, err := os.Lstat(filepath.Join(dir, n)); errors.Is(err, fs.ErrNotExist) {
			names[kernelName(n)] = n
			missing++
		}
	}
	if missing == 0 || missing == len(mapNames) && !hasPrograms(dir) {
		return nil, nil // all there, or a first start
	}
	var fixed []string
	progs := programsInUse(dir)
	defer func() {
		for _, p := range progs {
			p.Close()
		}
	}()
	for _, prog := range progs {
		if len(names) == 0 {
			break
		}
		info, err := prog.Info()
		if err != nil {
			continue
		}
		ids, _ := info.MapIDs()
		for _, id := range ids {
			if err := repinByID(dir, id, names, &fixed); err != nil {
				return fixed, err
			}
		}
	}
	return fixed, nil
}

// repinByID pins the map with that ID if it is one of the missing ones.
func repinByID(dir string, id ebpf.MapID, missing map[string]string, fixed *[]string) error {
	m, err := ebpf.NewMapFromID(id)
	if err != nil {
		return nil // gone meanwhile
	}
	defer m.Close()
	mi, err := m.Info()
	if err != nil {
		return nil
	}
	pin := missing[mi.Name]
	if pin == "" {
		return nil
	}
	// Names are cut to 15 bytes by the kernel: check the format too.
	if spec, err := mainSpec(); err == nil {
		if ms := spec.Maps[pin]; ms != nil && (ms.Type != mi.Type || ms.KeySize != mi.KeySize || ms.ValueSize != mi.ValueSize) {
			return nil
		}
	}
	if err := m.Pin(filepath.Join(dir, pin)); err != nil {
		return fmt.Errorf("re-pin map %s: %w", pin, err)
	}
	delete(missing, mi.Name)
	*fixed = append(*fixed, pin)
	return nil
}

// kernelName is a map's name as the kernel keeps it: at most 15 bytes.
func kernelName(n string) string {
	if len(n) > 15 {
		return n[:15]
	}
	return n
}

func hasPrograms(dir string) bool {
	progs := programsInUse(dir)
	for _, p := range progs {
		p.Close()
	}
	return len(progs) > 0
}

// programsInUse opens ctlb's pinned programs and those behind pinned links.
func programsInUse(dir string) []*ebpf.Program {
	var out []*ebpf.Program
	for _, h := range allHooks() {
		if p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, progPin(h.name)), nil); err == nil {
			out = append(out, p)
		}
	}
	linkPins := []string{filepath.Join(dir, rootLinkPin)}
	for _, d := range []string{filepath.Join(dir, "links"), inflightDir(dir)} {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			for _, h := range hooks {
				linkPins = append(linkPins, filepath.Join(d, e.Name(), h.name))
			}
		}
	}
	for _, lp := range linkPins {
		l, err := link.LoadPinnedLink(lp, nil)
		if err != nil {
			continue
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			continue
		}
		if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
			out = append(out, p)
		}
	}
	return out
}
