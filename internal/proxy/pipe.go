package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// copyChunk is how much one io.CopyN moves before the byte counters are
// updated. The copy between two *net.TCPConn goes through splice(2)
// (io.CopyN hands the kernel an io.LimitedReader over the socket, which
// net's splice path accepts), so the bytes never enter user space.
const copyChunk = 1 << 20

// errIdle ends a connection on which nothing moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// pipe joins a client and a server connection, full duplex, each direction
// on its own until its sender closes (half-close is passed on with
// CloseWrite), and aborts both when either fails or the pair goes idle.
//
// Idleness is read from the kernel (TCP_INFO's time since data was last
// received or sent on either socket) by one timer per connection, rather
// than from socket deadlines: the copy runs in the kernel in chunks, so user
// space cannot see a trickle inside a chunk, and a write deadline could
// strike with bytes still in splice's pipe. The kernel's clocks also catch a
// peer that stops reading, whose writes never complete.
type pipe struct {
	client, server *net.TCPConn
	idle           time.Duration
	idled          atomic.Bool
	abortOnce      sync.Once

	mu    sync.Mutex // guards the timer against the end of run
	timer *time.Timer
	done  bool
}

func newPipe(client, server *net.TCPConn, idle time.Duration) *pipe {
	return &pipe{client: client, server: server, idle: idle}
}

// run copies both ways until both are done, then closes both connections.
// It returns the error that ended the pair early, or nil.
func (p *pipe) run(up, down prometheus.Counter) error {
	p.mu.Lock()
	p.timer = time.AfterFunc(p.idle, p.checkIdle)
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.done = true
		p.timer.Stop()
		p.mu.Unlock()
	}()
	errc := make(chan error, 1)
	go func() { errc <- p.copy(p.server, p.client, up, "client to server") }()
	err := p.copy(p.client, p.server, down, "server to client")
	if err != nil {
		p.abort()
	}
	if err2 := <-errc; err2 != nil {
		p.abort()
		if err == nil {
			err = err2
		}
	}
	if p.idled.Load() {
		err = errIdle
	}
	p.client.Close()
	p.server.Close()
	return err
}

// checkIdle runs from the timer: it aborts the pair when neither socket has
// moved data for the idle timeout, and otherwise looks again when that
// timeout would next be reached.
func (p *pipe) checkIdle() {
	quiet := min(sinceData(p.client), sinceData(p.server))
	if quiet >= p.idle {
		p.idled.Store(true)
		p.abort()
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.done {
		p.timer.Reset(p.idle - quiet)
	}
}

// sinceData is how long ago the socket last received or sent data, by the
// kernel's account. A socket that cannot be asked counts as active (zero):
// it is closing anyway, and its copy will end on its own.
func sinceData(c *net.TCPConn) time.Duration {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var ms uint32
	_ = raw.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err == nil {
			ms = min(info.Last_data_recv, info.Last_data_sent)
		}
	})
	return time.Duration(ms) * time.Millisecond
}

// copy moves src to dst until src's sender closes (then passes the
// half-close on) or something fails.
//
// It starts with plain reads and writes through a pooled buffer and moves
// to splice for the rest of the connection once a read fills the buffer.
// For the short exchanges most connections are (a request, a reply, close)
// a read and a write cost less than splice's two calls through a pipe
// (taken from and given back to a pool, set up anew when the pool is
// empty); bulk transfers fill the buffer at once and so get splice, where
// bytes never enter user space. The buffer is taken only once data is
// there, so a connection waiting for its peer holds none.
func (p *pipe) copy(dst, src *net.TCPConn, bytes prometheus.Counter, dir string) error {
	raw, err := src.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	for {
		n, full, err := relayOnce(dst, raw)
		if n > 0 {
			bytes.Add(float64(n))
		}
		if err != nil {
			return p.ended(dst, err, dir)
		}
		if full {
			break
		}
	}
	for {
		n, err := io.CopyN(dst, src, copyChunk)
		if n > 0 {
			bytes.Add(float64(n))
		}
		if err != nil {
			return p.ended(dst, err, dir)
		}
	}
}

// ended handles the end of one direction: at the sender's orderly close it
// passes the half-close on; anything else is the error that ends the pair.
func (p *pipe) ended(dst *net.TCPConn, err error, dir string) error {
	if !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if err := dst.CloseWrite(); err != nil {
		return fmt.Errorf("%s: pass half-close on: %w", dir, err)
	}
	return nil
}

// relayBufSize is the buffer of the read-and-write phase; a read that fills
// it moves the direction to splice.
const relayBufSize = 16 << 10

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// relayOnce waits until src has data (or its end), reads what is there and
// writes it all to dst. It returns the bytes moved, whether the read filled
// the buffer, and io.EOF at the end of src's stream.
func relayOnce(dst *net.TCPConn, src syscall.RawConn) (int, bool, error) {
	var (
		buf  *[]byte
		n    int
		rerr error
	)
	err := src.Read(func(fd uintptr) bool {
		buf = relayBufs.Get().(*[]byte)
		for {
			n, rerr = unix.Read(int(fd), *buf)
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr == unix.EAGAIN {
			// Nothing yet: give the buffer back while the poller
			// waits.
			relayBufs.Put(buf)
			buf = nil
			return false
		}
		return true
	})
	if buf != nil {
		defer relayBufs.Put(buf)
	}
	switch {
	case err != nil:
		return 0, false, err
	case rerr != nil:
		return 0, false, os.NewSyscallError("read", rerr)
	case n == 0:
		return 0, false, io.EOF
	}
	if _, err := dst.Write((*buf)[:n]); err != nil {
		return 0, false, err
	}
	return n, n == len(*buf), nil
}

// abort closes both connections with a reset, so each peer learns at once
// that the other side is gone rather than seeing an orderly end of stream.
func (p *pipe) abort() {
	p.abortOnce.Do(func() {
		reset(p.client)
		reset(p.server)
	})
}

// reset closes c with an RST (SO_LINGER 0).
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}
