package daemon

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// The config ledger remembers, in the state directory, which VIPs the
// config file put in the maps. The maps outlive the daemon (invariant 1),
// so without it a VIP taken out of the file while ctlbd was down, or one a
// rejected reload had already written, stayed in the maps for good, still
// rewriting connects: at start the daemon knew only the new file. With it,
// applying a config removes every VIP the ledger holds that the config
// does not define. VIPs set through the CLI or API are never in it (a CLI
// set of a VIP the file no longer defines takes it out: forget). A daemon
// without a config file keeps none.
//
// The maps it speaks of are one bpffs's: two daemons side by side (their
// own --bpffs and --socket) may share a state directory, so the file is
// named after the pin directory, which it also records.
type ledger struct {
	BPFFS string                `json:"bpffs"`
	VIPs  []datapath.ServiceKey `json:"vips"`
}

func (d *Daemon) ledgerPath() string {
	sum := sha256.Sum256([]byte(filepath.Clean(d.cfg.BPFFS)))
	return filepath.Join(d.cfg.StateDir, "config-vips-"+hex.EncodeToString(sum[:4])+".json")
}

// readLedger returns the VIPs the config last put in the maps (none when
// no ledger was written yet).
func (d *Daemon) readLedger() ([]datapath.ServiceKey, error) {
	b, err := os.ReadFile(d.ledgerPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("config ledger: %w", err)
	}
	var l ledger
	if err := json.Unmarshal(b, &l); err != nil || filepath.Clean(l.BPFFS) != filepath.Clean(d.cfg.BPFFS) {
		if err == nil {
			err = fmt.Errorf("it is the ledger of bpffs %q", l.BPFFS)
		}
		// A torn or foreign file: the VIPs it named cannot be told apart,
		// so it is replaced by the next write and none is removed.
		d.log.Warn("config ledger unreadable; VIPs removed from the config while ctlbd was down stay in the maps", "path", d.ledgerPath(), "error", err)
		return nil, nil
	}
	keys := slices.DeleteFunc(l.VIPs, func(k datapath.ServiceKey) bool {
		return !k.VIP.IsValid() || k.Protocol != datapath.TCP && k.Protocol != datapath.UDP
	})
	return keys, nil
}

// writeLedger records keys, atomically (a crash leaves the old ledger or
// the new one).
func (d *Daemon) writeLedger(keys []datapath.ServiceKey) error {
	keys = slices.Clone(keys)
	slices.SortFunc(keys, func(a, b datapath.ServiceKey) int {
		if c := a.VIP.Compare(b.VIP); c != 0 {
			return c
		}
		return strings.Compare(string(a.Protocol), string(b.Protocol))
	})
	b, err := json.MarshalIndent(ledger{BPFFS: d.cfg.BPFFS, VIPs: keys}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("config ledger: state dir: %w", err)
	}
	tmp, err := os.CreateTemp(d.cfg.StateDir, ".config-vips-*")
	if err != nil {
		return fmt.Errorf("config ledger: %w", err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("config ledger: %w", err)
	}
	if err := os.Rename(tmp.Name(), d.ledgerPath()); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("config ledger: %w", err)
	}
	return nil
}

// forgetInLedger takes a VIP out of the ledger: the CLI or API set it, so
// it is no longer the file's to remove (a VIP a failed apply had written,
// or one the file dropped while its removal failed). A VIP the running
// config defines stays: the next apply puts the file's version back, as
// the CLI warns. Callers hold d.mu (applyServices writes the ledger under
// it too).
func (d *Daemon) forgetInLedger(key datapath.ServiceKey) {
	if d.cfgPath == "" {
		return
	}
	for _, s := range d.cfg.Services {
		if svc, err := s.Datapath(); err == nil && svc.Key() == key {
			return
		}
	}
	keys, err := d.readLedger()
	if err != nil || !slices.Contains(keys, key) {
		return
	}
	if err := d.writeLedger(slices.DeleteFunc(keys, func(k datapath.ServiceKey) bool { return k == key })); err != nil {
		d.log.Warn("config ledger: could not take out a VIP the CLI set", "vip", key, "error", err)
	}
}
