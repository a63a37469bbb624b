package datapath

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// ErrTerminationUnavailable means this kernel cannot end sockets from BPF
// (no bpf_sock_destroy kfunc, or no iter/tcp): sockets to departed servers
// stay open until their applications close them.
var ErrTerminationUnavailable = errors.New("socket termination is unavailable on this kernel")

// Departed is a server that left a VIP's set: the sockets ctlb directed to it
// through that VIP are to be ended.
type Departed struct {
	VIP    netip.AddrPort `json:"vip"`
	Server netip.AddrPort `json:"server"`
	// Limit, when not 0, ends at most that many of them (rebalancing).
	Limit uint64 `json:"limit,omitempty"`
}

// Terminated is what one pass did for one departed server.
type Terminated struct {
	Departed
	// Destroyed is how many sockets were ended.
	Destroyed uint64 `json:"destroyed"`
	// Failed is how many the kernel refused to end (a socket in TIME_WAIT
	// answers -EOPNOTSUPP: it has nothing to end).
	Failed uint64 `json:"failed"`
}

// Terminator ends the sockets that connect4 directed to departed servers.
// It matches sockets through ctlb's socket storage (the pinned map the
// connect hook fills), so a socket to the same address that ctlb did not
// direct (another process, another VIP) is never touched.
//
// The iterator programs walk the sockets of the network namespace the
// iterator is created in, so a pass enters each namespace that may hold
// ctlb-directed sockets, on a locked OS thread, and creates one there.
type Terminator struct {
	mu   sync.Mutex // one pass at a time: the departed map is per pass
	objs socktermObjects
	tcp  *link.Iter
	udp  *link.Iter
}

// NewTerminator loads the termination programs against this datapath's
// socket storage. It fails with ErrTerminationUnavailable (wrapping the
// kernel's reason) when the kernel lacks what they need.
func (d *Datapath) NewTerminator() (*Terminator, error) {
	spec, err := loadSockterm()
	if err != nil {
		return nil, fmt.Errorf("load embedded termination spec: %w", err)
	}
	t := &Terminator{}
	err = spec.LoadAndAssign(&t.objs, &ebpf.CollectionOptions{
		MapReplacements: map[string]*ebpf.Map{socktermMapCtlbSocksV1: d.objs.CtlbSocksV1},
	})
	if err != nil {
		return nil, fmt.Errorf("%w: load iterator programs: %w", ErrTerminationUnavailable, err)
	}
	if t.tcp, err = link.AttachIter(link.IterOptions{Program: t.objs.CtlbTermTcp}); err != nil {
		t.Close()
		return nil, fmt.Errorf("%w: attach iter/tcp: %w", ErrTerminationUnavailable, err)
	}
	if t.udp, err = link.AttachIter(link.IterOptions{Program: t.objs.CtlbTermUdp}); err != nil {
		t.Close()
		return nil, fmt.Errorf("%w: attach iter/udp: %w", ErrTerminationUnavailable, err)
	}
	return t, nil
}

// Close releases the programs and their links.
func (t *Terminator) Close() error {
	if t.tcp != nil {
		t.tcp.Close()
	}
	if t.udp != nil {
		t.udp.Close()
	}
	return t.objs.Close()
}

// maxDeparted is the size of the departed map (ctlb_term_v1 in sockterm.c).
const maxDeparted = 4096

// Terminate ends, in each of the given network namespaces, every TCP socket
// and connected UDP socket that ctlb directed to one of the departed servers,
// and says how many it ended per server. A namespace that cannot be entered
// (gone since it was listed) is skipped; the first such error is returned
// beside the results of the others.
func (t *Terminator) Terminate(netns []*os.File, departed []Departed) ([]Terminated, error) {
	if len(departed) == 0 {
		return nil, nil
	}
	if len(departed) > maxDeparted {
		return nil, fmt.Errorf("terminate: %d departed servers in one pass, at most %d", len(departed), maxDeparted)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	keys := make([]socktermBackendKey, len(departed))
	for i, dp := range departed {
		keys[i] = socktermBackendKey{Vip: ip4(dp.VIP.Addr()), Vport: port(dp.VIP.Port()),
			Addr: ip4(dp.Server.Addr()), Port: port(dp.Server.Port())}
		if err := t.objs.CtlbTermV1.Put(keys[i], socktermTermCount{Limit: dp.Limit}); err != nil {
			t.clear(keys)
			return nil, fmt.Errorf("terminate: mark %s of %s departed: %w", dp.Server, dp.VIP, err)
		}
	}
	defer t.clear(keys)
	var first error
	for _, ns := range netns {
		if err := t.runIn(ns); err != nil && first == nil {
			first = err
		}
	}
	out := make([]Terminated, 0, len(departed))
	for i, dp := range departed {
		var c socktermTermCount
		if err := t.objs.CtlbTermV1.Lookup(keys[i], &c); err != nil {
			return out, fmt.Errorf("terminate: read count of %s: %w", dp.Server, err)
		}
		out = append(out, Terminated{Departed: dp, Destroyed: c.Destroyed, Failed: c.Failed})
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].VIP.Compare(out[j].VIP); c != 0 {
			return c < 0
		}
		return out[i].Server.Compare(out[j].Server) < 0
	})
	return out, first
}

func (t *Terminator) clear(keys []socktermBackendKey) {
	for _, k := range keys {
		_ = t.objs.CtlbTermV1.Delete(k)
	}
}

// runIn creates the iterators inside ns and reads them to the end: reading
// is what runs the programs over every socket. Only the creation needs the
// namespace (the iterator keeps it); it happens on a thread of its own that
// is thrown away if it cannot be put back into its own namespace.
func (t *Terminator) runIn(ns *os.File) error {
	var (
		readers []io.ReadCloser
		err     error
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, oerr := os.Open("/proc/thread-self/ns/net")
		if oerr != nil {
			err = fmt.Errorf("terminate: own network namespace: %w", oerr)
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		if serr := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); serr != nil {
			err = fmt.Errorf("terminate: enter network namespace %s: %w", ns.Name(), serr)
			runtime.UnlockOSThread()
			return
		}
		for _, it := range []*link.Iter{t.tcp, t.udp} {
			r, oerr := it.Open()
			if oerr != nil {
				err = fmt.Errorf("terminate: open iterator in %s: %w", ns.Name(), oerr)
				break
			}
			readers = append(readers, r)
		}
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
			// Leave the thread locked: it ends with this goroutine rather
			// than run other goroutines in the wrong namespace.
			if err == nil {
				err = fmt.Errorf("terminate: return from network namespace %s: %w", ns.Name(), serr)
			}
			return
		}
		runtime.UnlockOSThread()
	}()
	<-done
	for _, r := range readers {
		if _, rerr := io.Copy(io.Discard, r); rerr != nil && err == nil {
			err = fmt.Errorf("terminate: run iterator in %s: %w", ns.Name(), rerr)
		}
		r.Close()
	}
	return err
}
