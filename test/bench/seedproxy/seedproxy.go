// Package seedproxy is the benchmark's baseline: a minimal round-robin TCP
// proxy in the style of the seed project's proxify. Each accepted connection
// is dialed through to the next server in turn and copied with one goroutine
// per direction, each a plain 64 KiB read/write loop in user space. When
// either direction ends, both connections are closed.
//
// It copies through a buffer on purpose, not with io.Copy: on Linux io.Copy
// between two TCP connections splices in the kernel, which is what ctlb's
// fallback proxy does and the seed did not.
package seedproxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

const (
	bufSize     = 64 << 10
	dialTimeout = 2 * time.Second
)

// Proxy forwards the connections of one listener to its servers.
type Proxy struct {
	ln      net.Listener
	servers []string
	next    atomic.Uint64
	wg      sync.WaitGroup
}

// Serve starts forwarding ln's connections to servers ("IP:PORT"), in turn.
func Serve(ln net.Listener, servers []string) *Proxy {
	p := &Proxy{ln: ln, servers: servers}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.handle(c)
		}
	}()
	return p
}

// Close stops accepting; connections already forwarded run to their end.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) handle(client net.Conn) {
	server := p.servers[p.next.Add(1)%uint64(len(p.servers))]
	up, err := net.DialTimeout("tcp4", server, dialTimeout)
	if err != nil {
		client.Close()
		return
	}
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			up.Close()
		})
	}
	go pump(up, client, closeBoth)
	go pump(client, up, closeBoth)
}

// pump copies src to dst until either fails, then closes both.
func pump(dst, src net.Conn, closeBoth func()) {
	defer closeBoth()
	buf := make([]byte, bufSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
