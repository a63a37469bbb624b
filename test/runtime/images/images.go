// Package images builds the tiny container images the end-to-end tests run,
// from this module's source, with no registry: a pause binary for pod
// sandboxes and a client that dials a VIP. Each is a static Go binary packed
// as a single-layer OCI image-layout tar (what `ctr images import` and
// `podman load` read), and also laid out as a plain root filesystem directory
// (what `podman run --rootfs` runs).
package images

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// Image references, in the form CRI normalises them to (no registry is ever
// asked: the images only exist locally).
const (
	PauseRef  = "ctlb.test/e2e/pause:1"
	ClientRef = "ctlb.test/e2e/vipclient:1"
)

// Paths of the binaries inside the images.
const (
	PauseBinary  = "/pause"
	ClientBinary = "/vipclient"
)

// Set is the built images.
type Set struct {
	// PauseTar and ClientTar are OCI image-layout tars.
	PauseTar, ClientTar string
	// ClientRootfs is a root filesystem directory holding the client binary.
	ClientRootfs string
	// PauseBin and ClientBin are the static binaries themselves.
	PauseBin, ClientBin string
}

// Build compiles the pause and client binaries (CGO_ENABLED=0, so static)
// into dir and packs them. Call it once, from TestMain: it takes a few
// seconds.
func Build(dir string) (*Set, error) {
	bins, err := testutil.BuildBinaries(dir, "./test/runtime/cmd/pause", "./test/runtime/cmd/vipclient")
	if err != nil {
		return nil, fmt.Errorf("build image binaries: %w", err)
	}
	s := &Set{
		PauseBin:     bins["pause"],
		ClientBin:    bins["vipclient"],
		PauseTar:     filepath.Join(dir, "pause.oci.tar"),
		ClientTar:    filepath.Join(dir, "vipclient.oci.tar"),
		ClientRootfs: filepath.Join(dir, "vipclient-rootfs"),
	}
	if err := WriteOCIArchive(s.PauseTar, PauseRef, s.PauseBin, PauseBinary, nil); err != nil {
		return nil, err
	}
	if err := WriteOCIArchive(s.ClientTar, ClientRef, s.ClientBin, ClientBinary, nil); err != nil {
		return nil, err
	}
	if err := WriteRootfs(s.ClientRootfs, s.ClientBin, ClientBinary); err != nil {
		return nil, err
	}
	return s, nil
}

// skeleton is what a container runtime expects to find or mount over in a
// root filesystem.
var skeleton = []string{"dev", "proc", "sys", "etc", "tmp", "run"}

// WriteRootfs lays out a root filesystem directory at dir with the binary
// at path inside it.
func WriteRootfs(dir, binary, path string) error {
	for _, d := range skeleton {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return fmt.Errorf("rootfs %s: %w", dir, err)
		}
	}
	b, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("rootfs %s: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, path), b, 0o755); err != nil {
		return fmt.Errorf("rootfs %s: %w", dir, err)
	}
	return nil
}

// OCI media types (github.com/opencontainers/image-spec), spelled out to keep
// this package free of dependencies.
const (
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// WriteOCIArchive writes a single-layer OCI image-layout tar to tarPath: the
// layer holds binary at path (plus empty mount-point directories) and the
// image runs it with args. ref names the image on import, through the
// annotations containerd (io.containerd.image.name) and podman
// (org.opencontainers.image.ref.name) read.
func WriteOCIArchive(tarPath, ref, binary, path string, args []string) error {
	bin, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	layer, err := layerTar(bin, path)
	if err != nil {
		return fmt.Errorf("image %s: layer: %w", ref, err)
	}
	type blob struct {
		digest string
		data   []byte
	}
	var blobs []blob
	put := func(mediaType string, b []byte) descriptor {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs = append(blobs, blob{d, b})
		return descriptor{MediaType: mediaType, Digest: d, Size: int64(len(b))}
	}
	layerDesc := put(mediaLayer, layer)
	config, _ := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config": map[string]any{
			"Entrypoint": []string{path},
			"Cmd":        args,
			"Env":        []string{"PATH=/"},
		},
		// Uncompressed layer: its diff ID is its digest.
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
	})
	configDesc := put(mediaConfig, config)
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        configDesc,
		"layers":        []descriptor{layerDesc},
	})
	manifestDesc := put(mediaManifest, manifest)
	manifestDesc.Annotations = map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": ref,
	}
	manifestDesc.Platform = &platform{Architecture: runtime.GOARCH, OS: "linux"}
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests":     []descriptor{manifestDesc},
	})

	f, err := os.Create(tarPath)
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	tw := tar.NewWriter(f)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
	}
	for _, b := range blobs {
		files = append(files, struct {
			name string
			data []byte
		}{"blobs/sha256/" + b.digest[len("sha256:"):], b.data})
	}
	err = writeDir(tw, "blobs/")
	if err == nil {
		err = writeDir(tw, "blobs/sha256/")
	}
	for _, fl := range files {
		if err == nil {
			err = writeFile(tw, fl.name, fl.data, 0o644)
		}
	}
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("image %s: write %s: %w", ref, tarPath, err)
	}
	return nil
}

// layerTar is the image's only layer, with fixed timestamps so the same
// binary always gives the same digest.
func layerTar(bin []byte, path string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range skeleton {
		if err := writeDir(tw, d+"/"); err != nil {
			return nil, err
		}
	}
	if err := writeFile(tw, path[1:], bin, 0o755); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

var epoch = time.Unix(0, 0)

func writeDir(tw *tar.Writer, name string) error {
	return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
}

func writeFile(tw *tar.Writer, name string, data []byte, mode int64) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err := io.Copy(tw, bytes.NewReader(data))
	return err
}
