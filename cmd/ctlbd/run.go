package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/daemon"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// flagOfField is the run flag that overrides each config field.
var flagOfField = map[string]string{"bpffs": "bpffs", "socket": "socket", "stateDir": "state-dir",
	"metrics": "metrics", "logLevel": "log-level", "nri.socket": "nri-socket"}

// fromFlag names the flag, not the config file, when the wrong value came
// from a flag.
func fromFlag(f *pflag.FlagSet, err error) error {
	var fe *config.FieldError
	if errors.As(err, &fe) {
		if name := flagOfField[fe.Field]; name != "" && f.Changed(name) {
			return fmt.Errorf("--%s: %w", name, fe.Err)
		}
	}
	return err
}

func newRunCommand(g *globals) *cobra.Command {
	var (
		cfgPath, bpffs, stateDir, logLevel, logFormat, metrics, nriSocket string
		hostCgroupNS                                                      string
		noWatch, hostScope                                                bool
	)
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the daemon",
		Long: `Run the daemon: mount bpffs if needed, adopt the pinned maps and programs (or
create them on first start), apply the config's VIPs, and serve the control
API on a 0600 unix socket. SIGTERM stops the daemon and leaves the data path
in place: attached pods keep being balanced while no daemon runs, and the next
daemon adopts the pins. A change of the config file is applied as soon as it
is written (the file's directory is watched, so a Kubernetes ConfigMap
update, which swaps a symlink, counts too); SIGHUP and "ctlbd reload" re-read
it as well. A bad config is rejected and logged, the old one keeps running.

An example config ships as conf/ctlbd.json (the systemd unit,
conf/systemd/ctlbd.service, reads it from /etc/ctlb/ctlbd.json; under
systemd the daemon reports readiness with sd_notify). Flags override the
config file. Two daemons can run side by side with different --bpffs,
--socket and --state-dir (in one state directory each would complete the
other's pending attachments). The fallback proxy (the config's "proxy" section) serves from one
event loop per CPU, or "loops" of them, and raises GOMAXPROCS by as many while
it runs; "preconnect": N keeps N connections per server established ahead of
clients (off by default; docs/DEPLOY.md, "Fallback proxy").`,
		Example: `  ctlbd run --config /etc/ctlb/ctlbd.json
  ctlbd run --bpffs /sys/fs/bpf/ctlb-test --socket /run/ctlb-test/ctlbd.sock --state-dir /run/ctlb-test`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg := config.Default()
			if cfgPath != "" {
				var err error
				if cfg, err = config.Load(cfgPath); err != nil {
					return err
				}
			}
			f := cmd.Flags()
			// The flags override the file, at start and at every reload.
			overrides := func(cfg *config.Config) {
				if f.Changed("bpffs") {
					cfg.BPFFS = bpffs
				}
				// The control socket: --socket, else the config's, else $CTLB_SOCKET.
				if f.Changed("socket") || (cfgPath == "" && os.Getenv("CTLB_SOCKET") != "") {
					cfg.Socket = g.socket
				}
				if f.Changed("state-dir") {
					cfg.StateDir = stateDir
				}
				if f.Changed("metrics") {
					cfg.Metrics = metrics
				}
				if f.Changed("log-level") {
					cfg.LogLevel = logLevel
				}
				if f.Changed("nri-socket") {
					cfg.NRI = &config.NRIConfig{Socket: nriSocket}
				}
				if f.Changed("host-scope") {
					cfg.HostScope = hostScope
				}
			}
			overrides(cfg)
			if err := cfg.Validate(); err != nil {
				return fromFlag(f, err)
			}
			log, err := newLogger(cfg.LogLevel, logFormat)
			if err != nil {
				return err
			}
			// Before any goroutine of ours: this may re-execute ctlbd.
			if note := joinHostCgroupNS(hostCgroupNS); note != "" {
				log.Info("cgroup namespace", "note", note)
			}
			// SIGHUP is caught from here on: its default action would end
			// a daemon still starting. One that comes before the daemon
			// serves is acted on once it does.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			if err := daemon.Precheck(cfg); err != nil {
				return fromFlag(f, err)
			}
			d, err := daemon.New(cfg, cfgPath, log)
			if err != nil {
				return err
			}
			defer d.Close()
			d.NoConfigWatch = noWatch
			d.Overrides = overrides
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			go func() {
				for {
					select {
					case <-ctx.Done():
						return
					case <-hup:
					}
					for !d.Serving() && ctx.Err() == nil {
						time.Sleep(50 * time.Millisecond)
					}
					if ctx.Err() != nil {
						return // stopping, or a start that failed: no reload
					}
					if err := d.Reload(); err != nil {
						log.Error("reload", "error", err)
					}
				}
			}()
			// A wrong --socket shows only once it is listened on.
			return fromFlag(f, d.Run(ctx))
		},
	}
	f := cmd.Flags()
	f.StringVarP(&cfgPath, "config", "c", "", "JSON config file (see conf/ctlbd.json)")
	f.StringVar(&bpffs, "bpffs", datapath.DefaultDir, "bpffs directory for ctlb's pins")
	f.StringVar(&stateDir, "state-dir", api.DefaultStateDir, "directory for pending attachments")
	f.StringVar(&metrics, "metrics", "", "IP:PORT for /metrics, /healthz and /readyz (e.g. 127.0.0.1:9464, or the node's address; \"\" turns them off)")
	f.StringVar(&hostCgroupNS, "host-cgroupns", "/proc/1/ns/cgroup", "cgroup namespace to move to when ctlbd runs in a private one (an unprivileged container; needs the host PID namespace); \"\" stays")
	f.BoolVar(&noWatch, "no-config-watch", false, "do not apply the config file when it changes (SIGHUP and \"ctlbd reload\" still do)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	f.StringVar(&nriSocket, "nri-socket", "", "run the NRI plugin on this runtime NRI socket (e.g. /var/run/nri/nri.sock): container scope for pods annotated ctlb.io/containers")
	f.BoolVar(&hostScope, "host-scope", false, "attach at the cgroup v2 root when starting: every process of the host (config hostScope)")
	return cmd
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}
