package deploy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// closeDeadline bounds the wait for the daemon to end a stalled connection.
const closeDeadline = 10 * time.Second

// TestControlAPITimeouts: a client that never finishes its request, and a
// kept-alive connection left idle, are both closed by the daemon.
func TestControlAPITimeouts(t *testing.T) {
	d := startDaemon(t, map[string]any{"controlAPI": map[string]any{"readTimeout": "300ms", "idleTimeout": "300ms"}})

	// waitClosed reads until the daemon closes the connection.
	waitClosed := func(what string, c net.Conn, r io.Reader) {
		t.Helper()
		start := time.Now()
		_ = c.SetReadDeadline(time.Now().Add(closeDeadline))
		_, err := io.Copy(io.Discard, r)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: still open after %v", what, closeDeadline)
		}
		t.Logf("%s: closed by the daemon after %v (%v)", what, time.Since(start).Round(time.Millisecond), err)
	}

	slow, err := net.Dial("unix", d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	if _, err := io.WriteString(slow, "GET /v1/status HTTP/1.1\r\nHost: ctlbd\r\n"); err != nil {
		t.Fatal(err)
	}
	waitClosed("a request never finished", slow, slow)

	idle, err := net.Dial("unix", d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if _, err := io.WriteString(idle, "GET /v1/status HTTP/1.1\r\nHost: ctlbd\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(idle)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status: %s", resp.Status)
	}
	waitClosed("an idle kept-alive connection", idle, br)
}
