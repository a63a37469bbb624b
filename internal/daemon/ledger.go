package daemon

import (
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
// does not define. VIPs set through the CLI or API are never in it.
const ledgerFile = "config-vips.json"

func (d *Daemon) ledgerPath() string { return filepath.Join(d.cfg.StateDir, ledgerFile) }

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
	var keys []datapath.ServiceKey
	if err := json.Unmarshal(b, &keys); err != nil {
		// A torn or foreign file: the VIPs it named cannot be told apart,
		// so it is replaced by the next write and none is removed.
		d.log.Warn("config ledger unreadable; VIPs removed from the config while ctlbd was down stay in the maps", "path", d.ledgerPath(), "error", err)
		return nil, nil
	}
	keys = slices.DeleteFunc(keys, func(k datapath.ServiceKey) bool {
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
	b, err := json.MarshalIndent(keys, "", "  ")
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
