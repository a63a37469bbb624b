package deploy

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
)

// notifyDeadline bounds the wait for a notification from ctlbd.
const notifyDeadline = 10 * time.Second

// TestSystemdNotify: with $NOTIFY_SOCKET (systemd's Type=notify), ctlbd
// sends READY=1 once its control socket answers, and STOPPING=1 on
// SIGTERM. The notify socket is a unixgram socket the test owns.
func TestSystemdNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	d := ctlbdtest.New(t, ctlbdtest.Options{Bin: ctlbd, Wrap: func(argv []string) *exec.Cmd {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+path)
		return cmd
	}})
	d.Start()
	next := func(what string) string {
		t.Helper()
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed while waiting for %s", what)
			}
			return m
		case <-time.After(notifyDeadline):
			t.Fatalf("no %s on the notify socket after %v; ctlbd log:\n%s", what, notifyDeadline, d.LogTail(2000))
		}
		return ""
	}
	ready := next("READY=1")
	if !strings.Contains(ready, "READY=1") || !strings.Contains(ready, "STATUS=") {
		t.Errorf("first notification %q, want READY=1 and a STATUS", ready)
	}
	// READY=1 came after the control socket was serving: it answers.
	if err := call(unixClient(d.Socket), "GET", "/v1/status", "", nil); err != nil {
		t.Errorf("after READY=1 the control API does not answer: %v", err)
	}
	d.Stop()
	if m := next("STOPPING=1"); !strings.Contains(m, "STOPPING=1") {
		t.Errorf("on SIGTERM: %q, want STOPPING=1", m)
	}
}
