package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ctlb/ctlb/internal/bpffs"
)

func newMountBPFFSCommand(g *globals) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "mount-bpffs",
		Short: "Make the pin directory exist on a bpffs, then exit",
		Long: `Make the pin directory exist on a BPF filesystem, as "ctlbd run" does at start,
and exit. When /sys/fs/bpf is plain sysfs (the host never mounted a bpffs),
the bpffs goes on /sys/fs/bpf itself and the pin directory is made inside it;
a pin directory elsewhere gets a bpffs of its own. A directory that holds
files and is not a bpffs is refused: the mount would hide them.

This is the one step that needs CAP_SYS_ADMIN and mount propagation to the
host: in Kubernetes it runs in a small privileged init container with
/sys/fs/bpf mounted Bidirectional, so the long-running ctlbd container runs
unprivileged (docs/DEPLOY.md).`,
		Example: `  ctlbd mount-bpffs --bpffs /sys/fs/bpf/ctlb`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			mounted, err := bpffs.Ensure(dir)
			if err != nil {
				return err
			}
			out := struct {
				Dir     string `json:"dir"`
				Mounted string `json:"mounted,omitempty"` // where a bpffs was mounted; empty: none was needed
			}{dir, mounted}
			return g.print(cmd.OutOrStdout(), out, func(w *tabwriter.Writer) {
				if mounted != "" {
					fmt.Fprintf(w, "mounted bpffs on %s\n", mounted)
				} else {
					fmt.Fprintf(w, "%s is on bpffs already\n", dir)
				}
			})
		},
	}
	cmd.Flags().StringVar(&dir, "bpffs", "/sys/fs/bpf/ctlb", "bpffs directory for ctlb's pins")
	return cmd
}
