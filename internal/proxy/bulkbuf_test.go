package proxy

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// A direction that turns bulk (splice) gives its source socket the fixed
// receive buffer of bulkbuf.go when the system allows it, and a short
// exchange leaves the kernel's autotuning alone. The proxy runs in this
// process, so its server-side sockets are among this process's
// descriptors, told apart by their peer.
func TestBulkDirectionFixedReceiveBuffer(t *testing.T) {
	fixed := bulkRcvBufFor("/proc/sys/net/core/rmem_max")
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, mode, nil)
			srv := startStreamServer(t, e.node, ap(serverAddrs[0], 7200))
			e.setTargets(srv.addr)
			rcvbuf := func() []int {
				t.Helper()
				var out []int
				for _, fd := range socketFDs(t) {
					psa, err := unix.Getpeername(fd)
					if peer, ok := inet4AddrPort(psa); err != nil || !ok || peer != srv.addr {
						continue
					}
					v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
					if err != nil {
						t.Fatalf("SO_RCVBUF of socket %d: %v", fd, err)
					}
					out = append(out, v)
				}
				return out
			}

			// A short exchange: 100 bytes the server's way and back.
			short, err := dialIn(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			defer short.Close()
			fmt.Fprintf(short, "early %d %d\n", 100, 1)
			if _, err := io.ReadFull(short, make([]byte, 100)); err != nil {
				t.Fatal(err)
			}
			bufs := rcvbuf()
			if len(bufs) != 1 {
				t.Fatalf("proxy sockets to %s: %d, want 1", srv.addr, len(bufs))
			}
			if bufs[0] == 2*bulkRcvBuf {
				t.Errorf("a short exchange's server-side socket has the bulk receive buffer (%d)", bufs[0])
			}
			short.Close()

			// A bulk download: 8 MiB, of which the client reads 2.
			bulk, err := dialIn(e.node, vipPort(portA))
			if err != nil {
				t.Fatal(err)
			}
			defer bulk.Close()
			fmt.Fprintf(bulk, "stream %d %d\n", 8<<20, 2)
			if _, err := io.CopyN(io.Discard, bufio.NewReader(bulk), 2<<20); err != nil {
				t.Fatal(err)
			}
			found := false
			for _, v := range rcvbuf() {
				// The kernel reports twice what was set (its overhead).
				found = found || v == 2*fixed
			}
			if fixed != 0 && !found {
				t.Errorf("no server-side socket with the bulk receive buffer %d among %v", 2*fixed, rcvbuf())
			}
			if fixed == 0 && found {
				t.Errorf("net.core.rmem_max is below %d, yet a socket has the fixed buffer", bulkRcvBuf)
			}
		})
	}
}

// The fixed buffer is used only when net.core.rmem_max lets an
// unprivileged socket have all of it.
func TestBulkRcvBufFor(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]int{"4194304\n": bulkRcvBuf, "33554432\n": bulkRcvBuf, "212992\n": 0, "junk": 0} {
		p := filepath.Join(dir, "rmem_max")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := bulkRcvBufFor(p); got != want {
			t.Errorf("rmem_max %q: %d, want %d", content, got, want)
		}
	}
	if got := bulkRcvBufFor(filepath.Join(dir, "missing")); got != 0 {
		t.Errorf("no rmem_max: %d, want 0", got)
	}
}
