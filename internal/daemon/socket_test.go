package daemon

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/config"
)

// TestListenUnixRefusesNonSocket: whatever is at the socket's path and is
// not a socket (a regular file, a directory, a symlink, to a file or to a
// socket) is refused with an error naming the path and what is there, and
// is left as it was: the rename into place would have replaced it, and the
// stop would have deleted it.
func TestListenUnixRefusesNonSocket(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir() // 0700: not a shared directory
	file := filepath.Join(dir, "ctlbd.json")
	if err := os.WriteFile(file, []byte("important\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "keep"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	linkToFile := filepath.Join(dir, "link-file")
	if err := os.Symlink(file, linkToFile); err != nil {
		t.Fatal(err)
	}
	stale := staleSocket(t, filepath.Join(dir, "stale.sock"))
	linkToSocket := filepath.Join(dir, "link-sock")
	if err := os.Symlink(stale, linkToSocket); err != nil {
		t.Fatal(err)
	}
	for path, kind := range map[string]string{
		file:         "a regular file",
		sub:          "a directory",
		linkToFile:   "a symlink",
		linkToSocket: "a symlink",
	} {
		before, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		ln, _, err := listenUnix(path, "", "", log)
		if err == nil {
			ln.Close()
			t.Errorf("%s (%s): listened; want a refusal", path, kind)
			continue
		}
		want := path + ": exists and is not a socket (" + kind + "); remove it or choose another path"
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q, want it to say %q", path, err, want)
		}
		var fe *config.FieldError
		if !errors.As(err, &fe) || fe.Field != "socket" {
			t.Errorf("%s: error %q is not a FieldError of socket (ctlbd run could not name --socket)", path, err)
		}
		after, err := os.Lstat(path)
		if err != nil || after.Mode() != before.Mode() || !os.SameFile(before, after) {
			t.Errorf("%s (%s) changed: %v, %v (before %v)", path, kind, after, err, before.Mode())
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "important\n" {
		t.Errorf("the file's content: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(sub, "keep")); err != nil {
		t.Errorf("the directory's file: %v", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 5 {
		t.Errorf("the socket's directory holds %d entries, want the 5 the test made (nothing left over)", len(ents))
	}
}

// TestListenUnixReplacesStaleSocket: a socket nobody listens on (a daemon
// that was killed) is replaced; one a daemon listens on is refused.
func TestListenUnixReplacesStaleSocket(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	path := staleSocket(t, filepath.Join(t.TempDir(), "ctlbd.sock"))
	ln, _, err := listenUnix(path, "", "", log)
	if err != nil {
		t.Fatalf("stale socket: %v; want it replaced", err)
	}
	defer ln.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dial the new socket: %v", err)
	}
	c.Close()
	if ln2, _, err := listenUnix(path, "", "", log); err == nil || !strings.Contains(err.Error(), "another daemon is listening") {
		if ln2 != nil {
			ln2.Close()
		}
		t.Errorf("live socket: %v; want a refusal", err)
	}
}

// staleSocket leaves a unix socket at path that nobody listens on.
func staleSocket(t *testing.T, path string) string {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("stale socket %s: %v, %v", path, fi, err)
	}
	return path
}
