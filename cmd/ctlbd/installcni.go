package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ctlb/ctlb/internal/cniinstall"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// newInstallCNICommand returns `install-cni`, the subcommand the ctlbd
// binary runs in the DaemonSet's init container (once) and in its watcher
// (--watch); internal/cniinstall does the work.
func newInstallCNICommand() *cobra.Command {
	var (
		opts          cniinstall.Options
		bpffs         string
		socket        string
		stateDir      string
		uninstall     bool
		watch         bool
		output        string
		waitForConfig time.Duration
	)
	cmd := &cobra.Command{
		Use:   "install-cni",
		Short: "Install the ctlb CNI plugin and chain it into the node's network config",
		Long: `install-cni copies the ctlb plugin binary into the CNI bin dir and appends
ctlb to the plugin chain of the first network config in the CNI conf dir (the
one the runtime uses), turning a single-plugin .conf into a .conflist. It is
idempotent. The entry it writes is marked ("installedBy"): a ctlb entry written
by hand is left alone, and one edited by hand after install-cni wrote it is
kept, not reverted. With no network config yet it waits (--wait-for-config)
for the primary CNI to write one. --uninstall takes out exactly what it put in;
--watch keeps ctlb chained when another agent rewrites the config, and with
--uninstall-on-exit takes it out when stopped.

Paths: --bpffs, --socket and --state-dir go into the plugin's entry and must be
ctlbd's own (host paths): the plugin attaches with ctlbd's pins, tells ctlbd on
its socket, and leaves the attachments of pods whose cgroup does not exist yet
at ADD in <state-dir>/pending for ctlbd to complete; with another state
directory than ctlbd's they are never completed (the plugin warns). The entry
names stateDir only when it is not the default, /run/ctlb.

CNI versions: the conflist's cniVersion must be 0.3.0 or later; an older one is
refused and left untouched.`,
		Example: `  ctlbd install-cni
  ctlbd install-cni --dry-run -o json    # what it would change, writing nothing
  ctlbd install-cni --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin -o json
  ctlbd install-cni --socket /run/ctlb-b/ctlbd.sock --state-dir /run/ctlb-b   # ctlbd's own --socket and --state-dir
  ctlbd install-cni --watch --uninstall-on-exit
  ctlbd install-cni --uninstall --keep-binary`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if uninstall && watch {
				return errors.New("--uninstall and --watch cannot be combined")
			}
			if opts.DryRun && (uninstall || watch) {
				return errors.New("--dry-run checks an install only: it cannot be combined with --uninstall or --watch")
			}
			if opts.UninstallOnExit && !watch {
				return errors.New("--uninstall-on-exit needs --watch (it acts when the watcher is stopped)")
			}
			if waitForConfig < 0 {
				return fmt.Errorf("--wait-for-config %s: want a duration of 0 or more", waitForConfig)
			}
			if err := checkOutput(output); err != nil {
				return err
			}
			// The plugin refuses an entry with any other path, failing
			// every pod's ADD on the node: refuse it here instead.
			for _, p := range []struct{ flag, val string }{{"bpffs", bpffs}, {"socket", socket}, {"state-dir", stateDir}} {
				if !filepath.IsAbs(p.val) || filepath.Clean(p.val) != p.val {
					return fmt.Errorf("--%s %q: want a clean absolute path (the plugin reads it on the host)", p.flag, p.val)
				}
			}
			cmd.SilenceUsage = true // flags are fine: an error from here on is not a usage error
			opts.PluginConf = cniinstall.NewPluginConf(bpffs, socket, stateDir)
			switch {
			case uninstall:
				res, err := cniinstall.Uninstall(opts)
				if err != nil {
					return err
				}
				text := fmt.Sprintf("ctlb removed from the network configs in %s", opts.ConfDir)
				if res.BinaryKept != "" {
					text += fmt.Sprintf("; %s stays: %s still chain ctlb with an entry written by hand (not by install-cni)",
						res.BinaryKept, strings.Join(res.StillChainedBy, ", "))
				}
				return report(cmd, output, map[string]any{"uninstalled": true, "confDir": opts.ConfDir,
					"stillChainedBy": res.StillChainedBy, "binaryKept": res.BinaryKept}, text)
			case watch:
				ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
				defer stop()
				return cniinstall.Watch(ctx, opts)
			default:
				ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
				defer stop()
				res, err := cniinstall.InstallWhenReady(ctx, opts, waitForConfig, slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil)))
				if err != nil {
					return err
				}
				text := fmt.Sprintf("%s: ctlb %s; plugin binary %s", res.ConfFile, res.Action, res.Binary)
				if res.BinaryUpdated {
					text += " updated"
				}
				if res.ConvertedFrom != "" {
					text += fmt.Sprintf(" (converted from %s, original kept in %s)", res.ConvertedFrom, res.Backup)
				}
				if res.Note != "" {
					text += " (" + res.Note + ")"
				}
				if res.DryRun {
					text = "dry run, nothing written: " + text
				}
				return report(cmd, output, res, text)
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.BinDir, "bin-dir", cniinstall.DefaultBinDir, "CNI plugin binary directory of the host")
	f.StringVar(&opts.ConfDir, "conf-dir", cniinstall.DefaultConfDir, "CNI network config directory of the host")
	f.StringVar(&opts.SourceBinary, "plugin", defaultPluginBinary(), "ctlb CNI plugin binary to install")
	f.StringVar(&bpffs, "bpffs", datapath.DefaultDir, "bpffs directory of ctlb's pins, written into the plugin config")
	f.StringVar(&socket, "socket", api.DefaultSocket, "ctlbd control socket, written into the plugin config")
	f.StringVar(&stateDir, "state-dir", api.DefaultStateDir, "ctlbd's --state-dir, where the plugin leaves pending attachments for ctlbd; written into the plugin config when not the default")
	f.BoolVar(&uninstall, "uninstall", false, "remove ctlb from the network configs (and the binary, unless --keep-binary)")
	f.BoolVar(&opts.KeepBinary, "keep-binary", false, "with --uninstall: leave the plugin binary for pods whose runtime replays cached configs at DEL")
	f.BoolVar(&watch, "watch", false, "install, then re-install whenever another agent rewrites the config, until SIGTERM")
	f.BoolVar(&opts.UninstallOnExit, "uninstall-on-exit", false, "with --watch: take ctlb out of the network configs (keeping the binary) on SIGTERM, e.g. when the DaemonSet is deleted")
	f.BoolVar(&opts.DryRun, "dry-run", false, "report what an install would change (which file, inserted/updated/unchanged/kept, the binary) and write nothing: a safe check of a node's chain")
	f.DurationVar(&waitForConfig, "wait-for-config", 5*time.Minute, "without --watch: wait this long for the primary CNI to write its network config before failing (0: fail at once)")
	// --socket and -o share their names and meaning with ctlbd's persistent
	// flags; defined here, they shadow those when this runs under ctlbd.
	f.StringVarP(&output, "output", "o", "table", outputHelp)
	return cmd
}

// defaultPluginBinary is `ctlb` beside the running executable: the image
// ships both binaries in one directory.
func defaultPluginBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return cniinstall.PluginType
	}
	return filepath.Join(filepath.Dir(exe), cniinstall.PluginType)
}

func report(cmd *cobra.Command, output string, v any, text string) error {
	return printResult(cmd.OutOrStdout(), output, v, func(w *tabwriter.Writer) { fmt.Fprintln(w, text) })
}
