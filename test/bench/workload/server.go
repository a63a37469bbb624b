package workload

import (
	"context"
	"net"
	"time"
)

// connLifetime bounds every server connection: the benchmark's longest
// measurement is far shorter, so a client that vanished cannot keep a server
// sending forever.
const connLifetime = 2 * time.Minute

// Listen opens a plain TCP listener on addr. Go listens with MPTCP by
// default; the benchmark measures plain TCP everywhere, as HAProxy and the
// proxies speak it.
func Listen(addr string) (*net.TCPListener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", addr)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// Server serves connections of one listener until Close.
type Server struct {
	ln *net.TCPListener
}

// ServeEcho answers every read with the same bytes: the request/response
// server of the rate and latency measurements.
func ServeEcho(ln *net.TCPListener) *Server { return serve(ln, echo) }

// ServeSource writes to every connection as fast as it can, until the client
// closes it: the bulk server.
func ServeSource(ln *net.TCPListener) *Server { return serve(ln, source) }

func serve(ln *net.TCPListener, handle func(*net.TCPConn)) *Server {
	s := &Server{ln: ln}
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(connLifetime))
				handle(c)
			}()
		}
	}()
	return s
}

// Close stops accepting. Open connections end when their client closes
// them, at their lifetime bound, or when the process exits.
func (s *Server) Close() { s.ln.Close() }

func echo(c *net.TCPConn) {
	buf := make([]byte, 16<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func source(c *net.TCPConn) {
	buf := make([]byte, 256<<10)
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}
