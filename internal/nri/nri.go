// Package nri is ctlbd's NRI plugin (github.com/containerd/nri): per-container
// scope. A pod annotated with ctlb.io/containers (a comma-separated list of
// container names, e.g. "envoy-sidecar,consul-dataplane") gets ctlb on those
// containers' own cgroups only, so the pod's other containers dial the VIP's
// address as they would without ctlb. The CNI plugin leaves such pods alone
// while this plugin is connected.
//
// When it attaches: at StartContainer. The runtime calls it after `runc
// create` made the container's cgroup and before `runc start` lets the
// process run its first instruction, so no connect() of the container can
// precede the attachment. At CreateContainer the cgroup does not exist yet.
// The attachment goes at StopContainer and RemoveContainer; a restarted
// container is a new container (a new ID) and is attached again.
//
// The runtime's NRI socket closes when the runtime stops or restarts: Run
// connects again, and the runtime's Synchronize on registration attaches
// what started meanwhile.
package nri

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/nri/annotation"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// AnnotationContainers is the pod annotation that restricts ctlb to the
// named containers of the pod.
const AnnotationContainers = annotation.Containers

// DefaultSocket is containerd's and CRI-O's default NRI socket.
const DefaultSocket = "/var/run/nri/nri.sock"

// PluginName and PluginIndex register ctlb with the runtime; the index
// orders plugins that adjust containers (ctlb adjusts nothing).
const (
	PluginName  = "ctlb"
	PluginIndex = "50"
)

// Attachment IDs this plugin makes start with this; it detaches no others.
const attachmentPrefix = "nri-"

// AttachmentID is the datapath attachment of one container: "nri-<ID>", or
// a hash of the ID when the ID cannot be a bpffs name.
func AttachmentID(containerID string) string {
	id := attachmentPrefix + containerID
	if datapath.ValidateAttachmentID(id) == nil {
		return id
	}
	sum := sha256.Sum256([]byte(containerID))
	return "nrih-" + hex.EncodeToString(sum[:20])
}

// Datapath is what the plugin needs of pkg/datapath.
type Datapath interface {
	Attach(id, cgroupDir string) (datapath.Attachment, error)
	Attachment(id string) (datapath.Attachment, error)
	Detach(id string) error
}

// Options configure the plugin.
type Options struct {
	// Socket is the runtime's NRI socket; DefaultSocket when empty.
	Socket string
	// Retry is the pause between connection attempts; 1 s when zero.
	Retry    time.Duration
	Datapath Datapath
	Cgroups  cgroupv2.Hierarchy
	Log      *slog.Logger
}

// Plugin is ctlbd's NRI plugin.
type Plugin struct {
	opts      Options
	log       *slog.Logger
	connected atomic.Bool

	mu sync.Mutex
	// created is when CreateContainer was seen, by container ID: the time
	// from it to the attachment is logged.
	created map[string]time.Time
}

// New returns a plugin; Run connects it.
func New(opts Options) *Plugin {
	if opts.Socket == "" {
		opts.Socket = DefaultSocket
	}
	if opts.Retry <= 0 {
		opts.Retry = time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	return &Plugin{opts: opts, log: opts.Log, created: map[string]time.Time{}}
}

// Connected reports whether the plugin is registered with a runtime now.
func (p *Plugin) Connected() bool { return p.connected.Load() }

// Socket is the NRI socket the plugin connects to.
func (p *Plugin) Socket() string { return p.opts.Socket }

// Run connects to the runtime and serves its events until ctx ends,
// connecting again (every Retry) whenever the connection closes or cannot
// be made: the runtime may start after ctlbd, or restart.
func (p *Plugin) Run(ctx context.Context) error {
	var lastErr string
	for ctx.Err() == nil {
		err := p.runOnce(ctx)
		p.connected.Store(false)
		if ctx.Err() != nil {
			break
		}
		msg := "closed"
		if err != nil {
			msg = err.Error()
		}
		if msg != lastErr {
			p.log.Warn("NRI: not connected; retrying", "socket", p.opts.Socket, "error", msg, "every", p.opts.Retry)
			lastErr = msg
		}
		select {
		case <-ctx.Done():
		case <-time.After(p.opts.Retry):
		}
	}
	return nil
}

func (p *Plugin) runOnce(ctx context.Context) error {
	if _, err := os.Stat(p.opts.Socket); err != nil {
		return fmt.Errorf("NRI socket: %w", err)
	}
	closed := make(chan struct{})
	var once sync.Once
	s, err := stub.New(p, stub.WithPluginName(PluginName), stub.WithPluginIdx(PluginIndex),
		stub.WithSocketPath(p.opts.Socket), stub.WithLogger(stubLogger{p.log}), stub.WithOnClose(func() { once.Do(func() { close(closed) }) }))
	if err != nil {
		return fmt.Errorf("NRI stub: %w", err)
	}
	if err := s.Start(ctx); err != nil {
		return fmt.Errorf("NRI register on %s: %w", p.opts.Socket, err)
	}
	p.connected.Store(true)
	p.log.Info("NRI: registered", "socket", p.opts.Socket, "runtime", s.RuntimeNRIVersion())
	select {
	case <-ctx.Done():
		s.Stop()
		return nil
	case <-closed:
		s.Stop()
		p.log.Info("NRI: connection closed (runtime stopped or restarted)", "socket", p.opts.Socket)
		return errors.New("connection closed")
	}
}

// Configure subscribes to the container events the plugin handles.
func (p *Plugin) Configure(_ context.Context, _, runtime, version string) (api.EventMask, error) {
	p.log.Info("NRI: configured", "runtime", runtime, "version", version)
	return api.MustParseEventMask("CreateContainer", "StartContainer", "StopContainer", "RemoveContainer"), nil
}

// Synchronize attaches the running named containers: after ctlbd or the
// runtime restarted, what started meanwhile gets ctlb too. Already attached
// ones are left as they are.
func (p *Plugin) Synchronize(_ context.Context, pods []*api.PodSandbox, containers []*api.Container) ([]*api.ContainerUpdate, error) {
	byID := map[string]*api.PodSandbox{}
	for _, pod := range pods {
		byID[pod.GetId()] = pod
	}
	n := 0
	for _, c := range containers {
		pod := byID[c.GetPodSandboxId()]
		if pod == nil || !p.named(pod, c) {
			continue
		}
		if c.GetState() != api.ContainerState_CONTAINER_RUNNING && c.GetState() != api.ContainerState_CONTAINER_CREATED {
			continue
		}
		if err := p.attach(pod, c, "synchronize"); err != nil {
			p.log.Error("NRI: attach at synchronize", "pod", pod.GetName(), "container", c.GetName(), "error", err)
			continue
		}
		n++
	}
	p.log.Info("NRI: synchronized", "pods", len(pods), "containers", len(containers), "attached", n)
	return nil, nil
}

// CreateContainer notes the time; the container's cgroup does not exist yet.
func (p *Plugin) CreateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	if p.named(pod, c) {
		p.mu.Lock()
		p.created[c.GetId()] = time.Now()
		p.mu.Unlock()
		p.log.Debug("NRI: named container created", "pod", pod.GetName(), "container", c.GetName(), "id", c.GetId())
	}
	return nil, nil, nil
}

// StartContainer attaches a named container's cgroup before its process
// runs. An error fails the container's start: a container that asked for
// ctlb does not run without it.
func (p *Plugin) StartContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	if !p.named(pod, c) {
		return nil
	}
	if err := p.attach(pod, c, "start"); err != nil {
		p.log.Error("NRI: attach at start", "pod", pod.GetName(), "container", c.GetName(), "error", err)
		return err
	}
	return nil
}

// StopContainer detaches: the container's process is gone.
func (p *Plugin) StopContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) ([]*api.ContainerUpdate, error) {
	p.detach(pod, c, "stop")
	return nil, nil
}

// RemoveContainer detaches what StopContainer did not (a container that
// exited by itself).
func (p *Plugin) RemoveContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.detach(pod, c, "remove")
	return nil
}

// named reports whether the pod restricts ctlb to containers and c is one.
func (p *Plugin) named(pod *api.PodSandbox, c *api.Container) bool {
	names, ok := annotation.ContainerNames(pod.GetAnnotations())
	return ok && slices.Contains(names, c.GetName())
}

// cgroupDir is the container's cgroup in the v2 tree. The cgroupfs driver
// gives a path ("/kubepods/.../pod<UID>/<ID>"); the systemd driver's
// "slice:prefix:name" form is turned into the slice path systemd makes.
func (p *Plugin) cgroupDir(c *api.Container) (string, error) {
	path := c.GetLinux().GetCgroupsPath()
	if path == "" {
		return "", errors.New("the runtime gave no cgroupsPath")
	}
	if !strings.HasPrefix(path, "/") {
		dir, err := systemdPath(path)
		if err != nil {
			return "", err
		}
		path = dir
	}
	return p.opts.Cgroups.Resolve(path, false)
}

// systemdPath turns runc's systemd cgroupsPath "parent.slice:prefix:name"
// into the directory systemd makes: the parent slice nested by its dashes,
// then "prefix-name.scope".
func systemdPath(s string) (string, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 || !strings.HasSuffix(parts[0], ".slice") {
		return "", fmt.Errorf("cgroupsPath %q: neither a path nor slice:prefix:name", s)
	}
	slice := strings.TrimSuffix(parts[0], ".slice")
	var dir strings.Builder
	prefix := ""
	for _, word := range strings.Split(slice, "-") {
		if prefix != "" {
			prefix += "-"
		}
		prefix += word
		dir.WriteString("/" + prefix + ".slice")
	}
	dir.WriteString("/" + parts[1] + "-" + parts[2] + ".scope")
	return dir.String(), nil
}

func (p *Plugin) attach(pod *api.PodSandbox, c *api.Container, at string) error {
	dir, err := p.cgroupDir(c)
	if err != nil {
		return fmt.Errorf("container %s of pod %s: %w", c.GetName(), pod.GetName(), err)
	}
	id := AttachmentID(c.GetId())
	if cur, err := p.opts.Datapath.Attachment(id); err == nil && cur.Alive && cur.CgroupPath == dir {
		return nil // attached before a reconnect
	}
	a, err := p.opts.Datapath.Attach(id, dir)
	if err != nil {
		return fmt.Errorf("attach container %s of pod %s to %s: %w", c.GetName(), pod.GetName(), dir, err)
	}
	p.mu.Lock()
	created, ok := p.created[c.GetId()]
	delete(p.created, c.GetId())
	p.mu.Unlock()
	attrs := []any{"at", at, "pod", pod.GetNamespace() + "/" + pod.GetName(), "container", c.GetName(), "attachment", a.ID, "cgroup", dir}
	if ok {
		attrs = append(attrs, "sinceCreate", time.Since(created).Round(time.Microsecond).String())
	}
	p.log.Info("NRI: attached container", attrs...)
	return nil
}

func (p *Plugin) detach(pod *api.PodSandbox, c *api.Container, at string) {
	p.mu.Lock()
	delete(p.created, c.GetId())
	p.mu.Unlock()
	id := AttachmentID(c.GetId())
	err := p.opts.Datapath.Detach(id)
	switch {
	case err == nil:
		p.log.Info("NRI: detached container", "at", at, "pod", pod.GetNamespace()+"/"+pod.GetName(), "container", c.GetName(), "attachment", id)
	case !errors.Is(err, datapath.ErrNoAttachment):
		p.log.Error("NRI: detach", "at", at, "pod", pod.GetName(), "container", c.GetName(), "attachment", id, "error", err)
	}
}

// stubLogger sends the NRI library's own log lines to the daemon's slog
// logger, so ctlbd's log stays in one format.
type stubLogger struct{ log *slog.Logger }

func (l stubLogger) Debugf(ctx context.Context, format string, args ...any) {
	l.log.DebugContext(ctx, "NRI library: "+fmt.Sprintf(format, args...))
}

func (l stubLogger) Infof(ctx context.Context, format string, args ...any) {
	// The library's info lines are per event and registration chatter.
	l.log.DebugContext(ctx, "NRI library: "+fmt.Sprintf(format, args...))
}

func (l stubLogger) Warnf(ctx context.Context, format string, args ...any) {
	l.log.WarnContext(ctx, "NRI library: "+fmt.Sprintf(format, args...))
}

func (l stubLogger) Errorf(ctx context.Context, format string, args ...any) {
	l.log.ErrorContext(ctx, "NRI library: "+fmt.Sprintf(format, args...))
}
