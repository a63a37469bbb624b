package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NetlinkTerminator is the fallback for kernels without bpf_sock_destroy:
// the sock_diag SOCK_DESTROY request (CONFIG_INET_DIAG_DESTROY). It cannot
// read ctlb's socket storage, so it matches less exactly: a TCP socket is
// ended when its peer is a departed server and it is held by a process of
// an attached cgroup (by socket inode). A server that left one VIP but is
// still in another VIP's set is ambiguous; its sockets are kept. IPv4 TCP
// only.
type NetlinkTerminator struct {
	d *Datapath
}

// NewNetlinkTerminator returns the fallback terminator of d.
func (d *Datapath) NewNetlinkTerminator() *NetlinkTerminator { return &NetlinkTerminator{d: d} }

// Terminate ends the matching sockets in each namespace, as
// Terminator.Terminate does. keep lists servers that are still in some
// VIP's set: those are left alone (see the type's comment).
func (t *NetlinkTerminator) Terminate(netns []*os.File, departed []Departed, keep func(server string) bool) ([]Terminated, error) {
	inodes, err := t.d.attachedSocketInodes()
	if err != nil {
		return nil, err
	}
	out := make([]Terminated, len(departed))
	byServer := map[string][]int{}
	for i, dp := range departed {
		out[i].Departed = dp
		if keep != nil && keep(dp.Server.String()) {
			continue
		}
		byServer[dp.Server.String()] = append(byServer[dp.Server.String()], i)
	}
	if len(byServer) == 0 {
		return out, nil
	}
	var first error
	for _, ns := range netns {
		if err := inNetNS(ns, func() error {
			socks, err := netlink.SocketDiagTCP(unix.AF_INET)
			if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
				return fmt.Errorf("list TCP sockets: %w", err)
			}
			for _, s := range socks {
				peer := net.JoinHostPort(s.ID.Destination.String(), strconv.Itoa(int(s.ID.DestinationPort)))
				idx, ok := byServer[peer]
				if !ok || !inodes[uint64(s.INode)] || s.State == unix.BPF_TCP_LISTEN || s.State == unix.BPF_TCP_TIME_WAIT {
					continue
				}
				i := idx[0]
				if lim := out[i].Limit; lim != 0 && out[i].Destroyed >= lim {
					continue
				}
				local := &net.TCPAddr{IP: s.ID.Source, Port: int(s.ID.SourcePort)}
				remote := &net.TCPAddr{IP: s.ID.Destination, Port: int(s.ID.DestinationPort)}
				if err := netlink.SocketDestroy(local, remote); err != nil {
					out[i].Failed++
					continue
				}
				out[i].Destroyed++
			}
			return nil
		}); err != nil && first == nil {
			first = fmt.Errorf("terminate (netlink) in %s: %w", ns.Name(), err)
		}
	}
	return out, first
}

// InNetNS runs f on a locked OS thread inside the network namespace ns
// (sockets f creates belong to ns); the thread is thrown away if it cannot
// be put back into its own namespace.
func InNetNS(ns *os.File, f func() error) error { return inNetNS(ns, f) }

func inNetNS(ns *os.File, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("own network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("return from network namespace: %w", err)
			return // the thread stays locked and ends with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// attachedSocketInodes lists the inodes of every socket held by a process
// of an attached cgroup.
func (d *Datapath) attachedSocketInodes() (map[uint64]bool, error) {
	atts, err := d.Attachments()
	if err != nil {
		return nil, err
	}
	out := map[uint64]bool{}
	for _, a := range atts {
		if !a.Alive || a.CgroupPath == "" {
			continue
		}
		err := filepath.WalkDir(a.CgroupPath, func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			pids, err := readPIDs(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return err
			}
			for _, pid := range pids {
				fdDir := fmt.Sprintf("/proc/%d/fd", pid)
				fds, err := os.ReadDir(fdDir)
				if err != nil {
					continue // exited
				}
				for _, fd := range fds {
					target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
					if err != nil || !strings.HasPrefix(target, "socket:[") {
						continue
					}
					if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]"), 10, 64); err == nil {
						out[ino] = true
					}
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}
