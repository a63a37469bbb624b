package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// HostAttachmentID names the one attachment of scope "host". It is not a
// container's, so DEL and GC leave it alone: host scope is removed with
// `ctlbd detach`.
const HostAttachmentID = "ctlb-host"

// An attachment belongs to (network name, container ID, interface name), as
// the CNI spec defines one. The programs go on the pod cgroup once per
// network and container: every interface of the container in that network
// shares the datapath attachment, and each interface is an owner of it,
// recorded under the state directory. The last DEL detaches.
//
// Datapath attachment IDs carry a tag of the network name, so GC of one
// network only ever looks at that network's attachments and pending
// records: "cni-<tag>-<containerID>", or, for a container ID that cannot be
// a bpffs name (CNI allows dots, bpffs does not; or too long),
// "cnih-<tag>-<hash>".
const (
	attachmentPrefix       = "cni-"
	hashedAttachmentPrefix = "cnih-"
)

// netTag is 8 hex digits of the network name's hash: names are up to 256
// characters of a wider alphabet than bpffs takes.
func netTag(network string) string {
	sum := sha256.Sum256([]byte(network))
	return hex.EncodeToString(sum[:4])
}

// AttachmentID is the datapath attachment of a container in a network.
func AttachmentID(network, containerID string) string {
	id := attachmentPrefix + netTag(network) + "-" + containerID
	if datapath.ValidateAttachmentID(id) == nil {
		return id
	}
	sum := sha256.Sum256([]byte(network + "\x00" + containerID))
	return hashedAttachmentPrefix + netTag(network) + "-" + hex.EncodeToString(sum[:20])
}

// staticAttachmentID is the one attachment of a network whose config names
// a static cgroupPath, shared by all its containers.
func staticAttachmentID(network, cgroupPath string) string {
	sum := sha256.Sum256([]byte(cgroupPath))
	return AttachmentID(network, "static-"+hex.EncodeToString(sum[:12]))
}

// ownedBy reports whether the attachment ID is one the plugin made for the
// network: ctlbd's own ("cgroup-N"), the host scope's and other networks'
// are never its business.
func ownedBy(network, id string) bool {
	tag := netTag(network) + "-"
	return strings.HasPrefix(id, attachmentPrefix+tag) || strings.HasPrefix(id, hashedAttachmentPrefix+tag)
}

// Owner is one (network, container, interface) holding an attachment.
type Owner struct {
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	// PodNamespace and PodName are the Kubernetes pod's, from CNI_ARGS,
	// for `ctlbd attachments`; empty outside Kubernetes.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
}

// same reports whether two owners are the same (network, container,
// interface), whatever pod names they recorded: a retried ADD may carry
// other CNI_ARGS than the first.
func (o Owner) same(p Owner) bool { return o.key() == p.key() }

// key is the owner without its display-only pod names.
func (o Owner) key() Owner {
	return Owner{Network: o.Network, ContainerID: o.ContainerID, IfName: o.IfName}
}

// PodOf names the Kubernetes pod an attachment was made for (namespace and
// name from the CNI ADD's CNI_ARGS), or "" when no owner recorded one.
func PodOf(stateDir, attID string) (namespace, name string) {
	owners, _ := listOwners(stateDir, attID)
	for _, o := range owners {
		if o.PodName != "" {
			return o.PodNamespace, o.PodName
		}
	}
	return "", ""
}

// OwnersOf names, for logs, whom an attachment was made for: the pods
// (namespace/name) its owners recorded and, for owners without a pod name
// (outside Kubernetes), their container IDs. Both are empty for an
// attachment the plugin did not make.
func OwnersOf(stateDir, attID string) (pods, containers []string) {
	owners, _ := listOwners(stateDir, attID)
	for _, o := range owners {
		if o.PodName != "" {
			if p := o.PodNamespace + "/" + o.PodName; !slices.Contains(pods, p) {
				pods = append(pods, p)
			}
		} else if !slices.Contains(containers, o.ContainerID) {
			containers = append(containers, o.ContainerID)
		}
	}
	return pods, containers
}

// podName keeps a namespace or pod name only when it is one Kubernetes
// could have made (a DNS subdomain): it is shown to operators as is.
func podName(s string) string {
	if len(s) == 0 || len(s) > 253 {
		return ""
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' && r != '.' {
			return ""
		}
	}
	return s
}

// ownersDir holds <attachmentID>/<hash>.json for every owner.
func ownersDir(stateDir string) string { return filepath.Join(stateDir, "attachments") }

// ownerFile is where an owner is recorded: named by a hash of container ID
// and interface, since a shared attachment (static cgroupPath) has many
// containers' interfaces of the same name.
func ownerFile(stateDir, attID string, o Owner) string {
	return filepath.Join(ownersDir(stateDir), attID, ownerName(o))
}

func ownerName(o Owner) string {
	sum := sha256.Sum256([]byte(o.ContainerID + "\x00" + o.IfName))
	return hex.EncodeToString(sum[:16]) + ".json"
}

// lockOwners serialises owner bookkeeping of a state directory: the ADD of
// one interface and the DEL of another of the same container must agree on
// which one is the last.
func lockOwners(stateDir string) (func(), error) {
	dir := ownersDir(stateDir)
	if err := pending.EnsureDir(stateDir); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("attachment owners: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// addOwner records o as an owner of attID; call it with the lock held.
func addOwner(stateDir, attID string, o Owner) error {
	dir := filepath.Join(ownersDir(stateDir), attID)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("attachment %s: create owners: %w", attID, err)
	}
	b, _ := json.Marshal(o)
	p := ownerFile(stateDir, attID, o)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("attachment %s: record owner %s: %w", attID, o.IfName, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("attachment %s: record owner %s: %w", attID, o.IfName, err)
	}
	return nil
}

// removeOwner drops one owner and returns how many remain; the owners
// directory goes with the last. Call it with the lock held.
func removeOwner(stateDir, attID string, o Owner) (int, error) {
	if err := os.Remove(ownerFile(stateDir, attID, o)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("attachment %s: remove owner %s/%s: %w", attID, o.ContainerID, o.IfName, err)
	}
	owners, err := listOwners(stateDir, attID)
	if err != nil {
		return 0, err
	}
	if len(owners) == 0 {
		if err := os.RemoveAll(filepath.Join(ownersDir(stateDir), attID)); err != nil {
			return 0, fmt.Errorf("attachment %s: remove owners: %w", attID, err)
		}
	}
	return len(owners), nil
}

// listOwners reads the owners of one attachment, sorted.
func listOwners(stateDir, attID string) ([]Owner, error) {
	dir := filepath.Join(ownersDir(stateDir), attID)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("attachment %s: list owners: %w", attID, err)
	}
	var out []Owner
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue // a .tmp an interrupted ADD left
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var o Owner
		if json.Unmarshal(b, &o) != nil || ownerName(o) != e.Name() {
			continue
		}
		out = append(out, o)
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].ContainerID < out[j].ContainerID || out[i].ContainerID == out[j].ContainerID && out[i].IfName < out[j].IfName
	})
	return out, nil
}

// ownedAttachments lists the attachment IDs of the network that have owner
// records.
func ownedAttachments(stateDir, network string) ([]string, error) {
	ents, err := os.ReadDir(ownersDir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list attachment owners: %w", err)
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && ownedBy(network, e.Name()) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
