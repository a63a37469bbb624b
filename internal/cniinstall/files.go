package cniinstall

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// tempPattern names ctlb's temporary files. Its extension is none that
// libcni reads, so a runtime listing the conf dir mid-write never loads one.
const tempPattern = ".ctlb-*.tmp"

// writeAtomic replaces path with data: a temporary file in the same
// directory, fsync, rename, fsync of the directory. Readers see the old
// file or the new one, and after a crash the disk holds one of them.
func writeAtomic(path string, data []byte, mode os.FileMode, uid, gid int) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	if err := fillTemp(tmp, bytes.NewReader(data), mode, uid, gid); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return syncDir(dir)
}

// fillTemp writes a temporary file completely, with its final mode and
// owner, and closes it.
func fillTemp(f *os.File, r io.Reader, mode os.FileMode, uid, gid int) error {
	_, err := io.Copy(f, r)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil && (uid >= 0 || gid >= 0) {
		err = f.Chown(uid, gid)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// installBinary copies src to dst atomically unless dst already has the
// same bytes. The rename never disturbs a plugin process running the old
// binary: it keeps its inode. It reports whether dst was written.
func installBinary(src, dst string) (bool, error) {
	same, err := sameContent(src, dst)
	if err != nil {
		return false, err
	}
	if same {
		return false, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	defer in.Close()
	dir := filepath.Dir(dst)
	tmp, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return false, fmt.Errorf("install plugin binary into %s: %w", dir, err)
	}
	defer os.Remove(tmp.Name())
	if err := fillTemp(tmp, in, 0o755, -1, -1); err != nil {
		return false, fmt.Errorf("install plugin binary %s: %w", dst, err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return false, fmt.Errorf("install plugin binary %s: %w", dst, err)
	}
	return true, syncDir(dir)
}

// sameContent compares two files chunk by chunk; a missing dst differs, a
// missing or unreadable src is an error. An executable dst is required too:
// equal bytes without the x bit would not run.
func sameContent(src, dst string) (bool, error) {
	a, err := os.Open(src)
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	defer a.Close()
	sa, err := a.Stat()
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	if !sa.Mode().IsRegular() {
		return false, fmt.Errorf("plugin binary %s: not a regular file", src)
	}
	b, err := os.Open(dst)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("installed plugin binary: %w", err)
	}
	defer b.Close()
	sb, err := b.Stat()
	if err != nil || sa.Size() != sb.Size() || sb.Mode().Perm()&0o111 == 0 {
		return false, nil
	}
	bufA, bufB := make([]byte, 64<<10), make([]byte, 64<<10)
	for {
		na, ea := io.ReadFull(a, bufA)
		nb, eb := io.ReadFull(b, bufB)
		if na != nb || !bytes.Equal(bufA[:na], bufB[:nb]) {
			return false, nil
		}
		if ea != nil || eb != nil {
			if (ea == io.EOF || ea == io.ErrUnexpectedEOF) && (eb == io.EOF || eb == io.ErrUnexpectedEOF) {
				return true, nil
			}
			if ea != nil && ea != io.EOF && ea != io.ErrUnexpectedEOF {
				return false, fmt.Errorf("read plugin binary %s: %w", src, ea)
			}
			return false, nil
		}
	}
}

// removeStaleTemps deletes temporary files a killed run of ours left. It is
// called under the conf dir lock, so none of them is being written.
func removeStaleTemps(dir string) {
	stale, _ := filepath.Glob(filepath.Join(dir, tempPattern))
	for _, f := range stale {
		_ = os.Remove(f)
	}
}
