// Command ctlbd is ctlb's node daemon and its CLI in one binary: `ctlbd run`
// is the daemon; every other command talks to it over its unix socket.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ctlb/ctlb/pkg/api"
)

// exitError carries the exit status of a failed command.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func main() {
	root := newRootCommand()
	if err := root.Execute(); err != nil {
		if e, ok := err.(exitError); ok {
			os.Exit(e.code)
		}
		socket := ""
		if f := root.PersistentFlags().Lookup("socket"); f != nil {
			socket = f.Value.String()
		}
		fmt.Fprintln(os.Stderr, "ctlbd:", oneLine(err, socket))
		os.Exit(1)
	}
}

// globals are the flags every client command shares.
type globals struct {
	socket string
	output string
}

func newRootCommand() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "ctlbd",
		Short: "ctlb's node daemon and CLI: connect-time load balancing for containers",
		Long: `ctlbd keeps ctlb's virtual IPs (VIP:port) and their servers in pinned BPF
maps. Programs attached to a pod's cgroup (connect4/6, sendmsg4/6 for UDP)
rewrite each connect() to a VIP into a connect() to one server, round-robin
by default: no NAT, no conntrack, no proxy on the data path. The socket
still sees the VIP as its peer (getpeername4/6, recvmsg4/6).

Run the daemon with "ctlbd run"; the other commands talk to it over its unix
socket (--socket, or $CTLB_SOCKET).`,
		Example: `  ctlbd run --config /etc/ctlb/ctlbd.json
  ctlbd service set 198.18.255.1:8502 198.18.0.11:8502 198.18.0.12:8502
  ctlbd attach --cgroup /kubepods/besteffort/pod1234
  ctlbd status -o json`,
		SilenceUsage:  true,
		SilenceErrors: true,
		// Before any command acts (install-cni checks its own -o).
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return checkOutput(g.output)
		},
	}
	socket := os.Getenv("CTLB_SOCKET")
	if socket == "" {
		socket = api.DefaultSocket
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", socket, "ctlbd's control socket (env CTLB_SOCKET)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", outputHelp)
	root.AddCommand(
		newRunCommand(g),
		newServiceCommand(g),
		newAttachCommand(g),
		newDetachCommand(g),
		newAttachmentsCommand(g),
		newPendingCommand(g),
		newStatusCommand(g),
		newReloadCommand(g),
		newVersionCommand(g),
		newInstallCNICommand(),
		newMountBPFFSCommand(g),
	)
	return root
}

// oneLine turns a failure to reach the daemon into one line that says what
// to do, instead of the Go error chain (dial unix ...: connect: ...).
func oneLine(err error, socket string) string {
	if !errors.Is(err, api.ErrUnreachable) {
		return err.Error()
	}
	why := "no answer"
	var errno syscall.Errno
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		why = "no answer in time (ctlbd is busy or stuck)"
	case errors.As(err, &errno) && errno == syscall.ENOENT:
		why = "no socket there: is ctlbd running? (--socket or $CTLB_SOCKET names another)"
	case errors.As(err, &errno) && errno == syscall.ECONNREFUSED && !isSocket(socket):
		// The kernel answers a connect to a file or directory with
		// ECONNREFUSED too.
		why = "not a socket: a file or directory is there (--socket or $CTLB_SOCKET names another?)"
	case errors.As(err, &errno) && errno == syscall.ECONNREFUSED:
		why = "connection refused: no ctlbd listens on the socket (it is starting, or one that died left the socket behind)"
	case errors.As(err, &errno) && (errno == syscall.EACCES || errno == syscall.EPERM):
		why = "permission denied: only root and the socketGroup may use it"
	case errors.As(err, &errno):
		why = errno.Error()
	}
	return fmt.Sprintf("ctlbd is not reachable at %s: %s", socket, why)
}

// isSocket reports whether path is a unix socket (or cannot be looked at:
// then the connect's own error stands).
func isSocket(path string) bool {
	fi, err := os.Stat(path)
	return err != nil || fi.Mode()&os.ModeSocket != 0
}
