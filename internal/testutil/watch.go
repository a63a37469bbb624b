package testutil

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// watch is the "watch" client mode: Count connections to Target, held open
// and read until they end; every end (and replacement, with Reconnect) is
// reported at once on its own line, so a test can time it.
func watch(ctx context.Context, spec ClientSpec, r ClientResult) {
	var mu, out sync.Mutex // mu guards conns, out the output
	emit := func(v ClientResult) {
		b, _ := json.Marshal(v)
		out.Lock()
		fmt.Println(string(b))
		out.Unlock()
	}
	dial := func() (net.Conn, string, error) {
		c, err := net.DialTimeout("tcp4", spec.Target, 3*time.Second)
		if err != nil {
			return nil, "", err
		}
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		name, err := ReadName(c)
		if err != nil {
			c.Close()
			return nil, "", err
		}
		_ = c.SetDeadline(time.Time{})
		return c, name, nil
	}
	type held struct {
		c    net.Conn
		name string
	}
	var conns []held
	for i := 0; i < spec.Count; i++ {
		r.Total++
		c, name, err := dial()
		if err != nil {
			r.Failed++
			r.Errors = append(r.Errors, err.Error())
			r.Landed = append(r.Landed, "")
			conns = append(conns, held{})
			continue
		}
		r.Landed = append(r.Landed, name)
		r.PerServer[name]++
		conns = append(conns, held{c, name})
	}
	emit(r)
	var wg sync.WaitGroup
	for i, h := range conns {
		if h.c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, name := h.c, h.name
			// Bounded: at most 20 replacements per connection.
			for range 20 {
				_, err := io.Copy(io.Discard, c) // the server never writes again
				c.Close()
				if ctx.Err() != nil {
					return
				}
				ended := "EOF"
				if err != nil {
					ended = err.Error()
				}
				ev := &ClientEvent{Index: i, Server: name, Ended: ended, At: time.Now().UnixNano()}
				if !spec.Reconnect {
					emit(ClientResult{Event: ev})
					return
				}
				nc, nname, derr := dial()
				if derr != nil {
					ev.ReconnectError = derr.Error()
					emit(ClientResult{Event: ev})
					return
				}
				ev.Reconnected = nname
				mu.Lock()
				if ctx.Err() != nil {
					mu.Unlock()
					nc.Close()
					return
				}
				conns[i].c = nc
				mu.Unlock()
				emit(ClientResult{Event: ev})
				c, name = nc, nname
			}
		}()
	}
	<-ctx.Done()
	mu.Lock()
	for _, h := range conns {
		if h.c != nil {
			h.c.Close()
		}
	}
	mu.Unlock()
	wg.Wait()
}

// udpWatch is the "udpwatch" client mode: Count connected UDP sockets to
// Target, each asking the server its name once, then waiting for a
// datagram that never comes; a socket ended under it reports an event.
func udpWatch(ctx context.Context, spec ClientSpec, r ClientResult) {
	var out sync.Mutex
	emit := func(v ClientResult) {
		b, _ := json.Marshal(v)
		out.Lock()
		fmt.Println(string(b))
		out.Unlock()
	}
	var conns []net.Conn
	for i := 0; i < spec.Count; i++ {
		r.Total++
		name, c, err := udpAsk(spec.Target)
		if err != nil {
			r.Failed++
			r.Errors = append(r.Errors, err.Error())
			r.Landed = append(r.Landed, "")
			conns = append(conns, nil)
			continue
		}
		r.Landed = append(r.Landed, name)
		r.PerServer[name]++
		conns = append(conns, c)
	}
	emit(r)
	var wg sync.WaitGroup
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 128)
			_, err := c.Read(buf)
			if ctx.Err() != nil {
				return
			}
			ended := "datagram"
			if err != nil {
				ended = err.Error()
			}
			emit(ClientResult{Event: &ClientEvent{Index: i, Server: r.Landed[i], Ended: ended, At: time.Now().UnixNano()}})
		}()
	}
	<-ctx.Done()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	wg.Wait()
}

// udpAsk opens a connected UDP socket and asks the server its name.
func udpAsk(target string) (string, net.Conn, error) {
	c, err := net.DialTimeout("udp4", target, time.Second)
	if err != nil {
		return "", nil, err
	}
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("?")); err != nil {
		c.Close()
		return "", nil, err
	}
	buf := make([]byte, 128)
	n, err := c.Read(buf)
	if err != nil {
		c.Close()
		return "", nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return string(buf[:n]), c, nil
}
