package sockmaprelay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// TestRelayForwardsInKernel relays an echo exchange of 4 MiB and checks that
// every byte arrived, in order, and that none went through user space.
func TestRelayForwardsInKernel(t *testing.T) {
	testutil.RequireRoot(t)
	r, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Error(err)
		}
	})

	echo, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	relayAddr := ln.Addr().String()
	if err := r.Serve(ln, []string{echo.Addr().String()}); err != nil {
		t.Fatal(err)
	}

	c, err := net.DialTimeout("tcp4", relayAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	// Send only once the pair is in the maps, so that no byte is queued
	// before (those would be drained through user space).
	for deadline := time.Now().Add(5 * time.Second); r.Kernel.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the pair never entered the maps (in user space: %d)", r.User.Load())
		}
	}
	want := make([]byte, 4<<20)
	for i := range want {
		want[i] = byte(i * 7 / 5)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Write(want); errc <- err }()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read the echo back: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the echo came back different from what was sent")
	}
	if k, u, d := r.Kernel.Load(), r.User.Load(), r.Drained.Load(); k != 1 || u != 0 || d != 0 {
		t.Errorf("pairs in the kernel %d, in user space %d, bytes drained %d; want 1, 0, 0", k, u, d)
	}

	// Close ends the pair it forwards and stops accepting.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read after Close: %d bytes, %v; want the pair ended (EOF or reset)", n, err)
	}
	if c2, err := net.DialTimeout("tcp4", relayAddr, time.Second); err == nil {
		c2.Close()
		t.Error("the relay still accepts after Close")
	}
}
