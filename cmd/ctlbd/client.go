package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// client returns the typed API client and a context bounding one call.
func (g *globals) client() (*api.Client, context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	return api.NewClient(g.socket), ctx, cancel
}

// wide reports -o wide: tables print their extra columns.
func (g *globals) wide() bool { return g.output == "wide" }

// print writes v in the -o format.
func (g *globals) print(w io.Writer, v any, table func(*tabwriter.Writer)) error {
	return printResult(w, g.output, v, table)
}

func newServiceCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "service",
		Short: "Set, delete and list VIPs and their servers",
		// A mistyped subcommand is an error (exit 1), not a page of
		// help and exit 0: a script would take it for success.
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	var empty, protocol, balance, onRemoved string
	set := &cobra.Command{
		Use:   "set VIP:PORT SERVER:PORT [SERVER:PORT...]",
		Short: "Set a VIP's servers, replacing its set atomically",
		Long: `Set a VIP's servers. The new set replaces the old one in a single map update:
a concurrent connect() sees the old set or the new one, never a mix or a gap.
With no servers, connects to the VIP follow --empty: "reject" fails them at
once with ECONNREFUSED, "passthrough" lets them through to the VIP unchanged
(where the fallback proxy may answer).

A VIP is a protocol, an address and a port: --protocol udp makes a UDP VIP
(connected sockets are sent to a server at connect, unconnected ones at their
first datagram; a socket keeps its server for its life, and replies come from
the VIP). IPv6 VIPs are written [ADDR]:PORT; a VIP and its servers are of one
family. An IPv4 VIP also serves dual-stack sockets dialing ::ffff:VIP (Java,
.NET). MPTCP sockets use the TCP VIP.

--balance chooses how connects pick a server: "roundrobin" (default; each
node starts at a random point), "random", or "least-open" (the server with
the fewest open connections: every server compared in sets of up to 8, the
less loaded of two random ones in larger sets).

A server that leaves the set has its open connections ended at once
(--on-server-removed terminate, the default): the clients see the connection
aborted and reconnect through the VIP to a server still in the set. With
"keep" they stay open until the applications close them.`,
		Example: `  ctlbd service set 198.18.255.1:8502 198.18.0.11:8502 198.18.0.12:8502
  ctlbd service set 198.18.255.1:8502 --empty passthrough
  ctlbd service set 198.18.255.53:8600 198.18.0.11:8600 198.18.0.12:8600 --protocol udp
  ctlbd service set [2001:2::100]:8502 [2001:2::11]:9001 [2001:2::12]:9001 --balance least-open
  ctlbd service set 198.18.255.1:8502 198.18.0.12:8502 --on-server-removed keep`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.ServiceRequest{VIP: args[0], Servers: args[1:], Empty: empty, Protocol: protocol, Balance: balance, OnServerRemoved: onRemoved}
			// Refuse bad input here too, before the daemon is asked.
			if _, err := (config.Service{VIP: req.VIP, Servers: req.Servers, Empty: req.Empty, Protocol: req.Protocol, Balance: req.Balance, OnServerRemoved: req.OnServerRemoved}).Datapath(); err != nil {
				return err
			}
			c, ctx, cancel := g.client()
			defer cancel()
			svc, err := c.SetService(ctx, req)
			if err != nil {
				return err
			}
			if inConfig(ctx, c, svc.VIP.String(), svc.Protocol) {
				warnConfigured(cmd.ErrOrStderr(), svc.Key(), "set")
			}
			return g.print(cmd.OutOrStdout(), svc, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "set %s: %d servers, empty %s, balance %s, on server removed %s\n", svc.Key(), len(svc.Servers), svc.Empty, svc.Balance, svc.OnServerRemoved)
			})
		},
	}
	set.Flags().StringVar(&empty, "empty", "reject", `what a connect to the VIP does while no server is usable: "reject" or "passthrough"`)
	set.Flags().StringVar(&protocol, "protocol", "tcp", `the VIP's protocol: "tcp" or "udp"`)
	set.Flags().StringVar(&balance, "balance", "roundrobin", `how connects choose a server: "roundrobin", "random" or "least-open"`)
	set.Flags().StringVar(&onRemoved, "on-server-removed", "terminate", `what happens to the open connections of a server that leaves the set: "terminate" or "keep"`)
	var delProtocol string
	del := &cobra.Command{
		Use:     "delete VIP:PORT",
		Short:   "Delete a VIP: connects to it are no longer rewritten",
		Example: "  ctlbd service delete 198.18.255.1:8502\n  ctlbd service delete 198.18.255.53:8600 --protocol udp",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vip, err := datapath.ParseVIP(args[0])
			if err != nil {
				return err
			}
			proto, err := datapath.ParseProtocol(delProtocol)
			if err != nil {
				return err
			}
			c, ctx, cancel := g.client()
			defer cancel()
			configured := inConfig(ctx, c, vip.String(), string(proto))
			if err := c.DeleteServiceProtocol(ctx, args[0], string(proto)); err != nil {
				return err
			}
			if configured {
				warnConfigured(cmd.ErrOrStderr(), args[0], "delete")
			}
			out := struct {
				Deleted  string `json:"deleted"`
				Protocol string `json:"protocol"`
			}{args[0], string(proto)}
			return g.print(cmd.OutOrStdout(), out, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "deleted %s (%s): connects to it are no longer rewritten\n", args[0], proto)
			})
		},
	}
	del.Flags().StringVar(&delProtocol, "protocol", "tcp", `the VIP's protocol: "tcp" or "udp"`)
	list := &cobra.Command{
		Use:   "list",
		Short: "List VIPs and their servers as the maps hold them",
		Long: `List every VIP the kernel's maps hold, whoever set it (the config file, the
CLI, a DNS or Consul source), with its protocol, empty policy, balance mode
and servers. -o wide adds what happens to a leaving server's connections.`,
		Example: `  ctlbd service list
  ctlbd service list -o wide
  ctlbd service list -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel := g.client()
			defer cancel()
			svcs, err := c.Services(ctx)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), svcs, func(w *tabwriter.Writer) {
				// -o wide puts the removal policy before the servers.
				row := func(vip, proto, empty, balance, removed, servers string) {
					cells := []string{vip, proto, empty, balance}
					if g.wide() {
						cells = append(cells, removed)
					}
					fmt.Fprintln(w, strings.Join(append(cells, servers), "\t"))
				}
				row("VIP", "PROTOCOL", "EMPTY", "BALANCE", "ON SERVER REMOVED", "SERVERS")
				for _, s := range svcs {
					var ss []string
					for _, srv := range s.Servers {
						ss = append(ss, srv.String())
					}
					row(s.VIP.String(), s.Protocol, s.Empty, s.Balance, dash(s.OnServerRemoved), dash(strings.Join(ss, ",")))
				}
			})
		},
	}
	cmd.AddCommand(set, del, list)
	return cmd
}

// inConfig reports whether the daemon's config file defines the VIP. Best
// effort: a status that cannot be read says no.
func inConfig(ctx context.Context, c *api.Client, vip, proto string) bool {
	st, err := c.Status(ctx)
	if err != nil {
		return false
	}
	for _, s := range st.Services {
		if s.Config && s.VIP == vip && s.Protocol == proto {
			return true
		}
	}
	return false
}

// warnConfigured tells, on stderr, that a CLI change of a VIP the config
// file defines holds only until the next reload or edit of the file, which
// puts the file's version back.
func warnConfigured(w io.Writer, vip, verb string) {
	fmt.Fprintf(w, "warning: %s is defined in the config file: this %s lasts until the next reload or edit of the file, which puts the file's version back\n", vip, verb)
}

func newAttachCommand(g *globals) *cobra.Command {
	var tg target
	cmd := &cobra.Command{
		Use:   "attach (--cgroup PATH | --host)",
		Short: "Attach ctlb to a cgroup, or host-wide: its processes' connects to VIPs are balanced",
		Long: `Attach ctlb's programs (connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6,
sock_ops) to a cgroup v2 directory with pinned bpf_links (sock_release sits
once at the cgroup v2 root, attached by the daemon). Every process in the cgroup and its descendants is covered,
including ones started later. PATH is absolute or relative to the cgroup v2
mount; the v2 root itself is refused. Pods are attached by the CNI plugin;
this command is for everything else.

--host attaches once at the cgroup v2 root instead: every process of the host,
whatever its cgroup, for hosts and VMs that run no CNI at all (the config's
"hostScope": true does the same when ctlbd starts). It is idempotent, and stays
until "ctlbd detach --host".`,
		Example: `  ctlbd attach --cgroup /system.slice/myapp.service
  ctlbd attach --host`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := tg.request()
			if err != nil {
				return err
			}
			c, ctx, cancel := g.client()
			defer cancel()
			a, err := c.Attach(ctx, req)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), a, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "attached %s to %s\n", a.ID, a.CgroupPath)
			})
		},
	}
	tg.flags(cmd, "attach at the cgroup v2 root: every process of the host")
	return cmd
}

// target is what attach and detach act on: --cgroup PATH or --host.
type target struct {
	cgroup string
	host   bool
}

func (tg *target) flags(cmd *cobra.Command, hostHelp string) {
	cmd.Flags().StringVar(&tg.cgroup, "cgroup", "", "cgroup v2 directory")
	cmd.Flags().BoolVar(&tg.host, "host", false, hostHelp)
}

// request wants exactly one of --cgroup and --host.
func (tg *target) request() (api.AttachRequest, error) {
	switch {
	case tg.cgroup == "" && !tg.host:
		return api.AttachRequest{}, errors.New("need --cgroup PATH or --host")
	case tg.cgroup != "" && tg.host:
		return api.AttachRequest{}, fmt.Errorf("--cgroup %q and --host exclude each other: --host is the cgroup v2 root", tg.cgroup)
	}
	return api.AttachRequest{Cgroup: tg.cgroup, Host: tg.host}, nil
}

func newDetachCommand(g *globals) *cobra.Command {
	var tg target
	cmd := &cobra.Command{
		Use:   "detach (--cgroup PATH | --host)",
		Short: "Detach ctlb from a cgroup (every attachment on it), or the host-wide attachment",
		Long: `Remove every ctlb attachment on a cgroup v2 directory (its pinned bpf_links):
connects of its processes are no longer rewritten from then on, while
connections already made stay where they are. PATH is written as for
"ctlbd attach". Pods are detached by the CNI plugin at DEL; this command is for
what "ctlbd attach" made. --host removes the host-wide attachment.`,
		Example: `  ctlbd detach --cgroup /system.slice/myapp.service
  ctlbd detach --host`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := tg.request()
			if err != nil {
				return err
			}
			c, ctx, cancel := g.client()
			defer cancel()
			removed, err := c.Detach(ctx, req)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), removed, func(w *tabwriter.Writer) {
				for _, a := range removed {
					fmt.Fprintf(w, "detached %s from %s\n", a.ID, a.CgroupPath)
				}
			})
		},
	}
	tg.flags(cmd, "remove the host-wide attachment (ctlbd attach --host, \"hostScope\": true)")
	return cmd
}

func newAttachmentsCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "attachments",
		Short: "List attachments; a dead one's cgroup is gone and GC removes it",
		Long: `List ctlb's attachments: one per attached cgroup (a pod's, or one made by
"ctlbd attach"), with the pod it was made for. STATE is "attached", "dead"
(the cgroup is gone; the CNI plugin's GC or the daemon's reconcile removes
it) or "broken" (some of its hooks are missing; -o wide names them, and the
daemon's reconcile puts them back).`,
		Example: `  ctlbd attachments
  ctlbd attachments -o wide
  ctlbd attachments -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel := g.client()
			defer cancel()
			list, err := c.Attachments(ctx)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), list, func(w *tabwriter.Writer) {
				if g.wide() {
					fmt.Fprintln(w, "ID\tSTATE\tPOD\tCGROUP ID\tCGROUP\tMISSING")
				} else {
					fmt.Fprintln(w, "ID\tSTATE\tPOD\tCGROUP")
				}
				for _, a := range list {
					state := "attached"
					if !a.Alive {
						state = "dead"
					}
					if len(a.Missing) > 0 {
						state = "broken"
					}
					pod := "-"
					if a.PodName != "" {
						pod = a.PodNamespace + "/" + a.PodName
					}
					if g.wide() {
						fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", a.ID, state, pod, a.CgroupID, a.CgroupPath, strings.Join(a.Missing, ","))
					} else {
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", a.ID, state, pod, a.CgroupPath)
					}
				}
			})
		},
	}
}

func newPendingCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "pending",
		Short: "List pending attachments: pods whose cgroup did not exist yet at CNI ADD",
		Long: `List the attachments the CNI plugin recorded because the pod's cgroup did not
exist yet at ADD (containerd and podman run CNI before the container), with
the pod (namespace/name, when the runtime passed them in CNI_ARGS; "-"
otherwise), their age, what ctlbd looks for (the runtime's cgroup path, the
pod UID, or a process in the sandbox's network namespace) and why it is
still waiting.
ctlbd completes each the moment its cgroup appears; one that stays here for
long names a cgroup that never came (docs/TROUBLESHOOTING.md).`,
		Example: `  ctlbd pending
  ctlbd pending -o wide`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel := g.client()
			defer cancel()
			list, err := c.Pending(ctx)
			if err != nil {
				return err
			}
			now := time.Now()
			return g.print(cmd.OutOrStdout(), list, func(w *tabwriter.Writer) {
				if g.wide() {
					fmt.Fprintln(w, "CONTAINER\tPOD\tAGE\tSTATE\tWAITING FOR\tREASON\tATTACHMENT\tNETNS\tBPFFS")
				} else {
					fmt.Fprintln(w, "CONTAINER\tPOD\tAGE\tSTATE\tWAITING FOR\tREASON")
				}
				for _, p := range list {
					age := now.Sub(p.Created).Round(time.Second)
					pod := "-"
					if p.PodName != "" {
						pod = p.PodNamespace + "/" + p.PodName
					}
					if g.wide() {
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.ContainerID, pod, age, p.State, waitingFor(p), pendingReason(p), p.AttachmentID, dash(p.Netns), p.BPFFS)
					} else {
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", shortID(p.ContainerID), pod, age, p.State, waitingFor(p), pendingReason(p))
					}
				}
			})
		},
	}
}

// waitingFor says where ctlbd looks for a pending attachment's cgroup.
func waitingFor(p api.PendingAttachment) string {
	switch {
	case p.CgroupDir != "":
		return "cgroup " + p.CgroupDir
	case p.PodUID != "":
		return "pod UID " + p.PodUID
	case p.Netns != "":
		return "a process in netns " + p.Netns
	}
	return "-"
}

// pendingReason is why a record still waits.
func pendingReason(p api.PendingAttachment) string {
	switch {
	case p.Error != "":
		return p.Error
	case p.State == "ignored":
		return "recorded for bpffs " + p.BPFFS + ", not this daemon's"
	case p.State == "pending":
		return "the pod cgroup does not exist yet"
	}
	return "-"
}

// shortID abbreviates a container ID as runtimes print them.
func shortID(id string) string {
	if len(id) > 13 {
		return id[:13]
	}
	return id
}

// ago says how long ago t was, with the time of day (UTC) so that it can
// be matched with logs: "3m12s ago (23:40:01Z)"; -o json has the full
// RFC 3339 time.
func ago(t time.Time) string {
	d := max(time.Since(t), 0)
	if d < 10*time.Second {
		d = d.Round(100 * time.Millisecond)
	} else {
		d = d.Round(time.Second)
	}
	return fmt.Sprintf("%s ago (%s)", d, t.UTC().Format("15:04:05Z"))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newStatusCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show each VIP's servers with connects and open connections",
		Long: `Show, per VIP and server, how many connects the kernel sent there, how many
of those sockets are open now, and how many ctlbd ended (ENDED) because the
server left the set, with each server's source and health. Exits
non-zero when the daemon is unreachable, so it serves as a readiness probe.

Columns: ATTEMPTS are connects sent to the server; ESTABLISHED and FAILED
split the TCP ones by outcome (handshake done; refused or timed out); OPEN
are its sockets open now; ENDED are connections ctlbd ended. SOURCE is
static, dns, consul or exec, or kept: a server the maps kept from before a
restart (or a reload) that no source of its VIP has listed yet, unchecked.
HEALTH says ",failing" while the kernel skips the server after a failed
connect. -o wide adds the failing marks seen, HEALTH SINCE (when the
server's health last changed) and the last health check error.

Below the table, each tracked VIP: its set changes, when and why the set
last changed ("last change 5m2s ago (23:40:01Z): ..."), and each source
with its servers, errors, "last success ... ago" and, while it fails,
"failing since ... ago" (the first failure since its last good answer)
and its last error. -o json gives these times in RFC 3339 (lastChange,
lastReason, lastSuccess, lastFailure, failingSince, healthSince,
lastCheck).`,
		Example: `  ctlbd status
  ctlbd status -o wide
  ctlbd status -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel := g.client()
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), st, func(w *tabwriter.Writer) {
				cols := []string{"VIP", "PROTO", "SERVER", "SOURCE", "HEALTH", "IN SET", "ATTEMPTS", "ESTABLISHED", "FAILED", "OPEN", "ENDED"}
				if g.wide() {
					cols = append(cols, "FAIL MARKS", "HEALTH SINCE", "LAST ERROR")
				}
				row := func(cells ...string) {
					// Every row as wide as the header, so that the
					// columns after a short row stay in line.
					for len(cells) < len(cols) {
						cells = append(cells, "")
					}
					fmt.Fprintln(w, strings.Join(cells, "\t"))
				}
				row(cols...)
				for _, s := range st.Services {
					if len(s.Servers) == 0 {
						row(s.VIP, s.Protocol, "(none: "+s.Empty+")")
					}
					for _, srv := range s.Servers {
						health := srv.Health
						if srv.Failing {
							health += ",failing"
						}
						cells := []string{s.VIP, s.Protocol, srv.Server, srv.Source, health, fmt.Sprint(srv.InSet),
							fmt.Sprint(srv.Attempts), fmt.Sprint(srv.Established), fmt.Sprint(srv.Failed), fmt.Sprint(srv.Open), fmt.Sprint(srv.Terminated)}
						if g.wide() {
							since := "-"
							if !srv.HealthSince.IsZero() {
								since = ago(srv.HealthSince)
							}
							cells = append(cells, fmt.Sprint(srv.FailMarks), since, dash(srv.LastError))
						}
						row(cells...)
					}
				}
				for _, s := range st.Services {
					if !s.Tracked {
						continue
					}
					mode := ""
					if s.Panic {
						mode = "   PANIC: no healthy server, every candidate kept"
					}
					fmt.Fprintf(w, "\n%s: %d set changes%s\n", s.VIP, s.Changes, mode)
					if !s.LastChange.IsZero() {
						fmt.Fprintf(w, "  last change %s: %s\n", ago(s.LastChange), s.LastReason)
					}
					for _, src := range s.Sources {
						line := fmt.Sprintf("  source %s: %d servers, %d errors", src.Name, src.Servers, src.Errors)
						switch {
						case !src.FailingSince.IsZero():
							line += ", failing since " + ago(src.FailingSince)
							if !src.LastSuccess.IsZero() {
								line += ", last success " + ago(src.LastSuccess)
							}
						case !src.LastSuccess.IsZero():
							line += ", last success " + ago(src.LastSuccess)
						}
						if src.LastError != "" {
							line += ", last: " + src.LastError
						}
						if src.Rejected > 0 && len(src.RejectedFirst) > 0 {
							line += fmt.Sprintf(", %d entries left out (first: %s: %s)", src.Rejected, src.RejectedFirst[0].Entry, src.RejectedFirst[0].Reason)
						}
						fmt.Fprintln(w, line)
					}
					if s.Trimmed > 0 {
						fmt.Fprintf(w, "  %d candidates left out over the limit of servers per VIP\n", s.Trimmed)
					}
				}
				fmt.Fprintf(w, "\nattachments: %d   pending: %d   bpffs: %s\n", st.Attachments, st.Pending, st.BPFFS)
				fmt.Fprintf(w, "connections of servers that leave a set are ended by: %s\n", st.Termination)
				if st.SocketTable != nil {
					fmt.Fprintf(w, "socket table: %d of %d entries held by open VIP sockets\n", st.SocketTable.Used, st.SocketTable.Size)
				}
				if st.HostScope {
					fmt.Fprintf(w, "host scope: attached at the cgroup v2 root (every process)\n")
				}
				if px := st.Proxy; px != nil {
					printProxy(w, px)
				}
				if st.NRI != "" {
					fmt.Fprintf(w, "NRI plugin: %s (%s)\n", st.NRI, st.NRISocket)
				}
			})
		},
	}
}

func newReloadCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Re-read the daemon's config file (as SIGHUP does); a bad one is rejected",
		Long: `Re-read the daemon's config file and apply it, as SIGHUP does. ctlbd also
applies the file by itself whenever it changes (unless run with
--no-config-watch), so this is for forcing it, or for seeing a rejection's
reason at once. A config that does not parse or validate is rejected with the
reason, and the running one stays.`,
		Example: `  ctlbd reload
  systemctl reload ctlbd    # the same, as SIGHUP (conf/systemd/ctlbd.service)`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel := g.client()
			defer cancel()
			if err := c.Reload(ctx); err != nil {
				return err
			}
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			out := struct {
				Reloaded bool `json:"reloaded"`
				Services int  `json:"services"`
			}{true, len(st.Services)}
			return g.print(cmd.OutOrStdout(), out, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "config reloaded: %d VIPs in the maps\n", len(st.Services))
			})
		},
	}
}

func newVersionCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary (and of the daemon, when it runs)",
		Long: `Print this binary's version, commit, BPF map layout and Go version, and the
running daemon's when its socket answers. A client and daemon of different
layouts should not be mixed; an unreachable daemon is no error here.`,
		Example: `  ctlbd version
  ctlbd version -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			local := localVersion()
			out := struct {
				Client api.Version  `json:"client"`
				Daemon *api.Version `json:"daemon,omitempty"`
			}{Client: local}
			c, ctx, cancel := g.client()
			defer cancel()
			d, err := c.Version(ctx)
			if err == nil {
				out.Daemon = &d
			}
			return g.print(cmd.OutOrStdout(), out, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "client:\t%s\t%s\tlayout v%d\t%s\n", local.Version, local.Commit, local.Layout, local.Go)
				if out.Daemon != nil {
					fmt.Fprintf(w, "daemon:\t%s\t%s\tlayout v%d\t%s\n", d.Version, d.Commit, d.Layout, d.Go)
				} else {
					fmt.Fprintf(w, "daemon:\tnot reachable at %s\n", g.socket)
				}
			})
		},
	}
}

// printProxy is the fallback proxy's part of `ctlbd status`: what it
// serves, and per service and target what it did (its clients are no
// attached pod's, so the table above does not count them).
func printProxy(w io.Writer, px *api.ProxyStatus) {
	join := func(as []netip.AddrPort) string {
		var ss []string
		for _, a := range as {
			ss = append(ss, a.String())
		}
		if len(ss) == 0 {
			return "nothing"
		}
		return strings.Join(ss, " ")
	}
	fmt.Fprintf(w, "\nfallback proxy (%s): serving %s; listening on %s\n", px.Mode, join(px.Destinations), join(px.Listening))
	fmt.Fprintln(w, "PROXIED\tTARGET\tCONNECTIONS\tDIAL FAILURES\tOPEN\tACCEPTED\tREJECTED\tRESET")
	counts := func(m map[string]uint64) string {
		if len(m) == 0 {
			return "0"
		}
		keys := slices.Sorted(maps.Keys(m))
		var ss []string
		for _, k := range keys {
			ss = append(ss, fmt.Sprintf("%d %s", m[k], k))
		}
		return strings.Join(ss, ", ")
	}
	for _, s := range px.Services {
		fmt.Fprintf(w, "%s\t%s\t\t\t%d\t%d\t%s\t%s\n", s.Service, "(all)", s.Open, s.Accepted, counts(s.Rejected), counts(s.Resets))
		for _, t := range s.Targets {
			fmt.Fprintf(w, "%s\t%s\t%d\t%d\t\t\t\t\n", s.Service, t.Target, t.Connections, t.DialFailures)
		}
	}
}
