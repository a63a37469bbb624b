// Package podcgroup finds a pod's cgroup v2 directory from what a CNI call
// knows about the pod: the runtime's cgroupPath, the Kubernetes pod UID, or
// the sandbox's network namespace. The pod cgroup is the parent of every
// container of the pod, so programs attached there reach containers that
// start later.
//
// The directory often does not exist yet at CNI ADD (containerd and podman
// call ADD before `runc create`), so the answer says where the pod cgroup is
// expected as well as whether it is there; internal/pending waits for the rest.
package podcgroup

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/cgroups/v3"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/cgroupv2"
)

// Source says which hint located the pod cgroup.
type Source string

// The hints, in the order they are tried.
const (
	FromCgroupPath Source = "cgroupPath"
	FromPodUID     Source = "podUID"
	FromNetns      Source = "netns"
)

// Hints is what a CNI call tells about the pod. Any field may be empty.
type Hints struct {
	// CgroupPath is the runtime's cgroupPath capability (or the plugin
	// config's override): relative to the v2 mount or absolute inside it, or
	// a systemd slice name such as kubepods-besteffort-pod<uid>.slice.
	CgroupPath string
	// PodUID is K8S_POD_UID from CNI_ARGS.
	PodUID string
	// Netns is CNI_NETNS, the sandbox's network namespace.
	Netns string
}

// Found is a located pod cgroup.
type Found struct {
	Dir    string // absolute directory inside the v2 mount
	Source Source
	// Refused, when nothing was found, says why the processes in the
	// sandbox's netns gave no pod cgroup (they sit in shared cgroups).
	Refused error
}

// Resolver locates pod cgroups in one v2 hierarchy.
type Resolver struct {
	Cgroups cgroupv2.Hierarchy
	// ProcRoot is /proc; tests of the scanner may point it elsewhere.
	ProcRoot string
}

// NewResolver resolves in the host's v2 hierarchy.
func NewResolver(h cgroupv2.Hierarchy) *Resolver {
	return &Resolver{Cgroups: h, ProcRoot: "/proc"}
}

// ValidatePodUID accepts Kubernetes UIDs (UUIDs, and the hex hashes of
// static pods) and nothing that could act as a path.
func ValidatePodUID(uid string) error {
	if !cgroupv2.IsPlainName(uid) {
		return fmt.Errorf("K8S_POD_UID %q: want 1-128 characters of [A-Za-z0-9_-]", uid)
	}
	return nil
}

// CgroupDir turns a cgroupPath hint into an absolute directory inside the v2
// mount, never its root; it does not need to exist. A bare systemd slice name
// is expanded as systemd lays slices out. The systemd driver's OCI form
// "<slice>:<prefix>:<name>" (kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>,
// a container's cgroupsPath) names a container of the pod slice: it
// resolves to that pod slice, and is refused when the slice is not a pod's
// (attaching to a shared slice would reach other pods).
func (r *Resolver) CgroupDir(path string) (string, error) {
	if strings.Count(path, ":") == 2 && !strings.Contains(path, "/") {
		slice, _, _ := strings.Cut(path, ":")
		if !IsPodSlice(slice) {
			return "", fmt.Errorf("cgroup path %q: systemd form whose slice %q is not a pod's (want kubepods[-<qos>]-pod<uid>.slice)", path, slice)
		}
		path = slice
	}
	if !strings.Contains(path, "/") && strings.HasSuffix(path, ".slice") {
		expanded, err := ExpandSlice(path)
		if err != nil {
			return "", err
		}
		path = expanded
	}
	return r.Cgroups.Resolve(path, false)
}

// IsPodSlice reports whether a systemd slice name is a Kubernetes pod's:
// kubepods-pod<uid>.slice or kubepods-<qos>-pod<uid>.slice.
func IsPodSlice(slice string) bool {
	name, ok := strings.CutSuffix(slice, ".slice")
	if !ok {
		return false
	}
	parts := strings.Split(name, "-")
	last := parts[len(parts)-1]
	return parts[0] == "kubepods" && (len(parts) == 2 || len(parts) == 3 && (parts[1] == "besteffort" || parts[1] == "burstable")) &&
		strings.HasPrefix(last, "pod") && len(last) > 3
}

// ExpandSlice turns a systemd slice name into its path below the hierarchy
// root: kubepods-besteffort-pod1.slice is
// /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice.
func ExpandSlice(slice string) (string, error) {
	name, ok := strings.CutSuffix(slice, ".slice")
	if !ok || name == "" || name == "-" || strings.Contains(slice, "/") {
		return "", fmt.Errorf("cgroup path %q: not a systemd slice name", slice)
	}
	if strings.HasPrefix(name, "-") || strings.HasSuffix(name, "-") || strings.Contains(name, "--") {
		return "", fmt.Errorf("cgroup path %q: malformed systemd slice name", slice)
	}
	var b strings.Builder
	prefix := ""
	for _, part := range strings.Split(name, "-") {
		b.WriteString("/" + prefix + part + ".slice")
		prefix += part + "-"
	}
	return b.String(), nil
}

// KubepodsRoots returns the directories that hold Kubernetes pod cgroups:
// kubepods (cgroupfs driver) and kubepods.slice (systemd driver), at the top
// of the hierarchy or a few levels down (kubelet's --cgroup-root, nested
// nodes, tests). The walk is bounded in depth and never enters a kubepods
// tree, so it reads a handful of directories however many pods there are.
func (r *Resolver) KubepodsRoots() []string {
	const maxDepth = 3
	var roots []string
	var walk func(dir string, depth int)
	walk = func(dir string, depth int) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return
		}
		for _, e := range entries {
			if !e.IsDir() {
				continue
			}
			p := filepath.Join(dir, e.Name())
			if e.Name() == "kubepods" || e.Name() == "kubepods.slice" {
				roots = append(roots, p)
				continue
			}
			if depth < maxDepth {
				walk(p, depth+1)
			}
		}
	}
	walk(r.Cgroups.Mount, 1)
	return roots
}

// qosClasses are the kubelet's QoS classes; guaranteed pods sit directly in
// the kubepods root.
var qosClasses = []string{"", "burstable", "besteffort"}

// QoSDirs returns the directories of a kubepods root that hold pod cgroups,
// the root itself first.
func QoSDirs(root string) []string {
	out := []string{root}
	systemd := strings.HasSuffix(root, ".slice")
	for _, q := range qosClasses[1:] {
		if systemd {
			out = append(out, filepath.Join(root, "kubepods-"+q+".slice"))
		} else {
			out = append(out, filepath.Join(root, q))
		}
	}
	return out
}

// PodDirs returns where the pod with uid may live below one kubepods root,
// in every QoS class: pod<uid> for the cgroupfs driver,
// kubepods-<qos>-pod<uid_with_underscores>.slice for systemd.
func PodDirs(root, uid string) []string {
	var out []string
	if strings.HasSuffix(root, ".slice") {
		u := strings.ReplaceAll(uid, "-", "_")
		for i, dir := range QoSDirs(root) {
			if q := qosClasses[i]; q == "" {
				out = append(out, filepath.Join(dir, "kubepods-pod"+u+".slice"))
			} else {
				out = append(out, filepath.Join(dir, "kubepods-"+q+"-pod"+u+".slice"))
			}
		}
		return out
	}
	for _, dir := range QoSDirs(root) {
		out = append(out, filepath.Join(dir, "pod"+uid))
	}
	return out
}

// FindPodUID looks for the pod's cgroup in every kubepods tree. ok is false
// when it does not exist (yet).
func (r *Resolver) FindPodUID(uid string) (dir string, ok bool, err error) {
	if err := ValidatePodUID(uid); err != nil {
		return "", false, err
	}
	// The usual places first: a few stats, no walk.
	usual := []string{filepath.Join(r.Cgroups.Mount, "kubepods"), filepath.Join(r.Cgroups.Mount, "kubepods.slice")}
	if p, ok := FindPodIn(usual, uid); ok {
		return p, true, nil
	}
	if p, ok := FindPodIn(r.KubepodsRoots(), uid); ok {
		return p, true, nil
	}
	return "", false, nil
}

// FindPodIn looks for the pod's cgroup below the given kubepods roots.
func FindPodIn(roots []string, uid string) (string, bool) {
	for _, root := range roots {
		for _, p := range PodDirs(root, uid) {
			if isDir(p) {
				return p, true
			}
		}
	}
	return "", false
}

// NetnsID identifies a network namespace: the device and inode of its nsfs
// file, which every path to it (bind mount, /proc/PID/ns/net) shares.
type NetnsID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// StatNetns identifies the namespace at path.
func StatNetns(path string) (NetnsID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return NetnsID{}, fmt.Errorf("netns %s: %w", path, err)
	}
	return NetnsID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
}

// ScanLimit bounds one netns scan of /proc, so a host with a runaway number
// of processes cannot stall a CNI call or the daemon.
const ScanLimit = 100000

// FindByNetns scans the processes once for any whose network namespace is
// one of want, and returns, for each namespace found, the pod cgroup of the
// first such process with a usable one (see podDirOfProcess). refused holds,
// for namespaces whose processes all sit in shared cgroups, why.
func (r *Resolver) FindByNetns(want map[NetnsID]bool) (found map[NetnsID]string, refused map[NetnsID]error, err error) {
	found, refused = map[NetnsID]string{}, map[NetnsID]error{}
	if len(want) == 0 {
		return found, refused, nil
	}
	f, err := os.Open(r.ProcRoot)
	if err != nil {
		return nil, nil, fmt.Errorf("scan processes: %w", err)
	}
	defer f.Close()
	seen := 0
	for seen < ScanLimit && len(found) < len(want) {
		names, err := f.Readdirnames(512)
		if err != nil {
			break // io.EOF: all read
		}
		for _, name := range names {
			if name[0] < '0' || name[0] > '9' {
				continue
			}
			seen++
			var st unix.Stat_t
			if unix.Stat(filepath.Join(r.ProcRoot, name, "ns", "net"), &st) != nil {
				continue // exited, or a zombie
			}
			id := NetnsID{Dev: uint64(st.Dev), Ino: st.Ino}
			if !want[id] || found[id] != "" {
				continue
			}
			dir, ok, err := r.podDirOfProcess(name)
			switch {
			case err != nil:
				refused[id] = fmt.Errorf("pid %s: %w", name, err)
			case ok:
				found[id] = dir
				delete(refused, id)
			}
		}
	}
	return found, refused, nil
}

// podDirOfProcess returns the pod cgroup of a sandbox process: the parent
// of its v2 cgroup (the runtime puts each container in a cgroup below the
// pod's). /proc/PID/cgroup is read with containerd/cgroups. crun with the
// systemd driver puts processes in a "container" leaf below the scope,
// which is skipped. A process whose parent is a well-known shared cgroup is
// not in a pod and is refused, since attaching to the shared parent would
// reach every container below it. A libpod container (libpod-<id>) whose
// parent is not a libpod pod is a standalone `podman run`: it gets its own
// cgroup.
func (r *Resolver) podDirOfProcess(pid string) (string, bool, error) {
	_, rel, err := cgroups.ParseCgroupFileUnified(filepath.Join(r.ProcRoot, pid, "cgroup"))
	if err != nil || rel == "" {
		return "", false, nil // exited, or not in the v2 hierarchy
	}
	rel = strings.TrimSuffix(rel, " (deleted)")
	return r.podDirOf(rel)
}

// podDirOf is podDirOfProcess for a cgroup path as /proc/PID/cgroup shows it.
func (r *Resolver) podDirOf(rel string) (string, bool, error) {
	if filepath.Base(rel) == "container" {
		rel = filepath.Dir(rel)
	}
	if why := SharedCgroup(rel); why != "" {
		return "", false, fmt.Errorf("sandbox process is in the shared cgroup %s (%s): refusing to attach there", rel, why)
	}
	target := filepath.Dir(rel)
	if IsLibpodContainer(filepath.Base(rel)) && !IsLibpodPod(filepath.Base(target)) {
		// podman run without a pod: the parent is podman's cgroup parent of
		// every container (machine.slice, libpod_parent, or --cgroup-parent),
		// so the container's own cgroup is the one to attach.
		target = rel
	} else if why := SharedCgroup(target); why != "" {
		return "", false, fmt.Errorf("sandbox process is in %s, directly below the shared cgroup %s (%s): no pod cgroup to attach to", rel, target, why)
	}
	dir, err := r.Cgroups.Resolve(target, false)
	if err != nil {
		return "", false, err
	}
	return dir, isDir(dir), nil
}

// IsLibpodContainer reports whether a cgroup name is a podman container's:
// libpod-<id> (cgroupfs driver) or libpod-<id>.scope (systemd).
func IsLibpodContainer(name string) bool {
	id, ok := strings.CutPrefix(strings.TrimSuffix(name, ".scope"), "libpod-")
	return ok && id != "" && !strings.HasPrefix(id, "conmon-")
}

// IsLibpodPod reports whether a cgroup name is a podman pod's: the pod ID
// (64 hex digits, cgroupfs driver) or machine-libpod_pod_<id>.slice
// (systemd).
func IsLibpodPod(name string) bool {
	if strings.HasPrefix(name, "machine-libpod_pod_") && strings.HasSuffix(name, ".slice") {
		return true
	}
	if len(name) != 64 {
		return false
	}
	for _, c := range name {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// SharedCgroup says why a cgroup (as /proc/PID/cgroup shows it, relative to
// the mount) is shared by many pods or services, or returns "" when it is
// not one of the well-known shared ones.
func SharedCgroup(rel string) string {
	rel = filepath.Clean("/" + rel)
	base, parent := filepath.Base(rel), filepath.Base(filepath.Dir(rel))
	switch {
	case rel == "/":
		return "the cgroup v2 root"
	case base == "machine.slice", base == "libpod_parent":
		return "podman's parent of all containers and pods"
	case base == "system.slice", base == "user.slice", base == "init.scope":
		return "systemd's shared slice"
	case base == "kubepods", base == "kubepods.slice":
		return "the parent of every Kubernetes pod"
	case base == "kubepods-besteffort.slice", base == "kubepods-burstable.slice",
		(base == "besteffort" || base == "burstable") && parent == "kubepods":
		return "a Kubernetes QoS class's parent of pods"
	}
	return ""
}

// Resolve locates the pod cgroup from the hints in the documented order:
// cgroupPath, then pod UID, then the netns's processes. When the directory
// does not exist yet, ok is false and the caller records a pending
// attachment. An error means a hint is invalid (it escapes the hierarchy,
// names its root, or is malformed): nothing should be attached then.
func (r *Resolver) Resolve(h Hints) (found Found, ok bool, err error) {
	if h.CgroupPath != "" {
		dir, err := r.CgroupDir(h.CgroupPath)
		if err != nil {
			return Found{}, false, err
		}
		// A runtime that names the cgroup is authoritative: no fallback.
		return Found{Dir: dir, Source: FromCgroupPath}, isDir(dir), nil
	}
	if h.PodUID != "" {
		dir, ok, err := r.FindPodUID(h.PodUID)
		if err != nil {
			return Found{}, false, err
		}
		if ok {
			return Found{Dir: dir, Source: FromPodUID}, true, nil
		}
	}
	if h.Netns != "" {
		id, err := StatNetns(h.Netns)
		if err == nil {
			m, refused, err := r.FindByNetns(map[NetnsID]bool{id: true})
			if err != nil {
				return Found{}, false, err
			}
			if dir := m[id]; dir != "" {
				return Found{Dir: dir, Source: FromNetns}, true, nil
			}
			if err := refused[id]; err != nil {
				// Not an error: the sandbox's own process may not exist yet
				// (a runtime helper can be in the netns meanwhile); the
				// caller records a pending attachment and says why.
				return Found{Refused: fmt.Errorf("netns %s: %w", h.Netns, err)}, false, nil
			}
		}
	}
	return Found{}, false, nil
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
