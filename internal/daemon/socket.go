package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/pending"
)

// socketRoles decides what a peer of the control socket may do, from its
// credentials as the kernel reports them (SO_PEERCRED, SO_PEERGROUPS):
// root everything; members of the write group everything; members of the
// read group (socketGroup) only GET requests (status, lists).
type socketRoles struct {
	readGID, writeGID int // -1: none
	readName          string
}

// Precheck refuses, before the daemon touches the pins or the maps, what
// would make it fail at the end of its start: a control socket it cannot
// take (a shared directory, something that is not a socket, another daemon
// listening, an unknown group) or a state directory it cannot make.
// Otherwise a daemon refused there had already created every pin, attached
// its release program, written the config's VIPs and ended the connections
// of servers the file removed.
func Precheck(cfg *config.Config) error {
	if _, _, err := socketGroups(cfg.SocketGroup, cfg.SocketWriteGroup); err != nil {
		return err
	}
	// The directory is only looked at: one ctlbd creates is made hers by
	// listenUnix (its mode and group), which a directory made here would
	// miss.
	if dir := filepath.Dir(cfg.Socket); exists(dir) {
		if _, err := socketDir(dir); err != nil {
			return err
		}
	}
	if err := socketFree(cfg.Socket); err != nil {
		return err
	}
	if err := pending.EnsureDir(cfg.StateDir); err != nil {
		return &config.FieldError{Field: "stateDir", Err: fmt.Errorf("%s: %w", cfg.StateDir, err)}
	}
	return nil
}

// listenUnix listens on a root-only unix socket, replacing a stale one. With
// a group, that group may connect too (0660), read-only unless it is the
// write group. The socket's directory is created 0700 when missing; its
// mode and owner are changed only when ctlbd created it, and a shared
// directory (sticky or world-writable, such as /tmp) is refused: anyone
// could put their own socket in its place.
func listenUnix(path, group, writeGroup string, log *slog.Logger) (net.Listener, *socketRoles, error) {
	readGID, writeGID, err := socketGroups(group, writeGroup)
	if err != nil {
		return nil, nil, err
	}
	roles := &socketRoles{readGID: readGID, writeGID: writeGID, readName: group}
	// The socket's group: the readers', else the writers'.
	gid := roles.readGID
	if gid < 0 {
		gid = roles.writeGID
	}
	dir := filepath.Dir(path)
	created, err := socketDir(dir)
	if err != nil {
		return nil, nil, err
	}
	if err := socketFree(path); err != nil {
		return nil, nil, err
	}
	// Bind in a private directory, fix the mode, then rename into place: the
	// socket is never reachable with a wider mode, and no process-wide umask
	// change races other goroutines creating files.
	tmpDir, err := os.MkdirTemp(dir, ".ctlbd-sock-")
	if err != nil {
		return nil, nil, fmt.Errorf("socket directory: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, nil, fmt.Errorf("listen %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, *socketRoles, error) {
		ln.Close()
		return nil, nil, err
	}
	mode := os.FileMode(0o600)
	if gid >= 0 {
		if err := os.Chown(tmp, 0, gid); err != nil {
			return fail(fmt.Errorf("socket %s: chown to group %d: %w", path, gid, err))
		}
		mode = 0o660
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(fmt.Errorf("socket %s: %w", path, err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("socket %s: %w", path, err))
	}
	if gid >= 0 {
		if created {
			// Ours: the group may traverse it, not list or change it.
			if err := os.Chown(dir, 0, gid); err != nil {
				return fail(fmt.Errorf("socket directory %s: %w", dir, err))
			}
			if err := os.Chmod(dir, 0o710); err != nil {
				return fail(fmt.Errorf("socket directory %s: %w", dir, err))
			}
		} else if !groupCanTraverse(dir, gid) {
			log.Warn("socket directory not changed (ctlbd did not create it): members of the socket group cannot reach the socket through it",
				"dir", dir, "gid", gid)
		}
	}
	return ln, roles, nil
}

// socketGroups looks up socketGroup and socketWriteGroup; -1 for none.
func socketGroups(group, writeGroup string) (readGID, writeGID int, err error) {
	readGID, writeGID = -1, -1
	for _, g := range []struct {
		field, name string
		gid         *int
	}{{"socketGroup", group, &readGID}, {"socketWriteGroup", writeGroup, &writeGID}} {
		if g.name == "" {
			continue
		}
		gid, err := lookupGroup(g.name)
		if err != nil {
			return -1, -1, fmt.Errorf("%s %q: %w", g.field, g.name, err)
		}
		*g.gid = gid
	}
	return readGID, writeGID, nil
}

// socketFree says whether ctlbd may take path for its socket: nothing is
// there, or a stale socket no daemon listens on.
func socketFree(path string) error {
	if err := notSocket(path); err != nil {
		return err
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("socket %s: another daemon is listening on it", path)
	}
	return nil
}

// notSocket refuses a path that holds anything but a socket: the rename
// into place would replace it, and the stop would delete it (a --socket
// that names a config file by mistake must not destroy the file). A
// symlink is refused too, whatever it points to. A socket is fine: one
// that a daemon listens on is refused by the caller, a stale one replaced.
func notSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return &config.FieldError{Field: "socket", Err: fmt.Errorf("%s: %w", path, err)}
	}
	var kind string
	switch m := fi.Mode(); {
	case m&fs.ModeSocket != 0:
		return nil
	case m.IsRegular():
		kind = "a regular file"
	case m.IsDir():
		kind = "a directory"
	case m&fs.ModeSymlink != 0:
		kind = "a symlink"
	case m&fs.ModeNamedPipe != 0:
		kind = "a named pipe"
	case m&fs.ModeDevice != 0:
		kind = "a device"
	default:
		kind = "mode " + m.String()
	}
	return &config.FieldError{Field: "socket",
		Err: fmt.Errorf("%s: exists and is not a socket (%s); remove it or choose another path", path, kind)}
}

// socketDir makes sure dir can hold the socket. created reports that
// ctlbd made it (and so may set its mode and owner).
func socketDir(dir string) (created bool, err error) {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return false, fmt.Errorf("socket directory: %w", err)
		}
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("socket directory: %w", err)
	}
	if !fi.IsDir() {
		return false, fmt.Errorf("socket directory %s: not a directory", dir)
	}
	if m := fi.Mode(); m&fs.ModeSticky != 0 || m.Perm()&0o002 != 0 {
		return false, fmt.Errorf("socket directory %s is shared (mode %v: sticky or world-writable): anyone could put a socket of their own in its place; give the socket a directory of its own, such as /run/ctlb/ctlbd.sock", dir, m)
	}
	return false, nil
}

// groupCanTraverse: members of gid may pass through dir.
func groupCanTraverse(dir string, gid int) bool {
	fi, err := os.Stat(dir)
	if err != nil {
		return false
	}
	st := fi.Sys().(*syscall.Stat_t)
	perm := fi.Mode().Perm()
	return perm&0o001 != 0 || (int(st.Gid) == gid && perm&0o010 != 0)
}

// lookupGroup takes a group name or a numeric GID.
func lookupGroup(group string) (int, error) {
	if gid, err := strconv.Atoi(group); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// peer is who is at the other end of a control connection.
type peer struct {
	uid    uint32
	groups []uint32 // primary and supplementary
	err    error
}

type peerKey struct{}

// peerContext records the connecting process's credentials, as the kernel
// saw them at connect(): they cannot be forged by the peer.
func peerContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return context.WithValue(ctx, peerKey{}, peer{err: errors.New("not a unix socket")})
	}
	return context.WithValue(ctx, peerKey{}, peerOf(uc))
}

func peerOf(c *net.UnixConn) peer {
	rc, err := c.SyscallConn()
	if err != nil {
		return peer{err: err}
	}
	var p peer
	cerr := rc.Control(func(fd uintptr) {
		cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			p.err = fmt.Errorf("SO_PEERCRED: %w", err)
			return
		}
		p.uid = cred.Uid
		p.groups = append(p.groups, cred.Gid)
		more, err := peerGroups(int(fd))
		if err != nil {
			p.err = fmt.Errorf("SO_PEERGROUPS: %w", err)
			return
		}
		p.groups = append(p.groups, more...)
	})
	if cerr != nil {
		return peer{err: cerr}
	}
	return p
}

// peerGroups reads SO_PEERGROUPS (Linux 4.13): the peer's supplementary
// groups at connect().
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 64)
	for {
		size := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		if errno == unix.ERANGE && int(size/4) > len(buf) {
			buf = make([]uint32, size/4)
			continue
		}
		if errno != 0 {
			return nil, errno
		}
		return buf[:size/4], nil
	}
}

// authorize lets each request through that the peer's role allows.
func (r *socketRoles) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p, _ := req.Context().Value(peerKey{}).(peer)
		write := req.Method != http.MethodGet && req.Method != http.MethodHead
		switch {
		case p.err != nil:
			deny(w, fmt.Sprintf("permission denied: the peer's credentials are unknown (%v)", p.err))
			return
		case p.uid == 0:
		case r.writeGID >= 0 && slices.Contains(p.groups, uint32(r.writeGID)):
		case r.readGID >= 0 && slices.Contains(p.groups, uint32(r.readGID)):
			if write {
				deny(w, fmt.Sprintf("permission denied: members of socketGroup %q may only read (status, lists); changes need root or socketWriteGroup", r.readName))
				return
			}
		default:
			deny(w, fmt.Sprintf("permission denied: uid %d is neither root nor in the socket's groups", p.uid))
			return
		}
		next.ServeHTTP(w, req)
	})
}

func deny(w http.ResponseWriter, msg string) {
	reply(w, nil, httpError{http.StatusForbidden, errors.New(msg)})
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
