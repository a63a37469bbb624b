// Package cni is the ctlb CNI plugin's logic: it parses the plugin config,
// locates the pod cgroup, and attaches, detaches, checks and
// garbage-collects ctlb's programs through pkg/datapath, leaving a pending
// record for ctlbd when the cgroup does not exist yet. The plugin binary
// (plugins/meta/ctlb) only wires these functions to skel.
//
// ADD, CHECK and STATUS parse strictly: a key that is neither ctlb's, nor
// one of the spec's well-known ones, nor a cni.dev/ key is an error (code 2)
// naming it. DEL and GC parse leniently: whatever is wrong beyond "type"
// is logged and skipped, because a teardown that fails leaves IPs and links
// behind and the runtime retries it forever.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ctlb/ctlb/internal/nri/annotation"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// Scopes of an attachment.
const (
	// ScopePod attaches to each pod's cgroup: the default.
	ScopePod = "pod"
	// ScopeHost attaches once at the cgroup v2 root: every socket of the
	// host. Only when asked for by name.
	ScopeHost = "host"
)

// DefaultPendingGrace is how long after ADD a CHECK accepts an attachment
// that is still pending: the runtime creates the pod cgroup right after ADD
// and ctlbd completes the attachment the moment it appears.
const DefaultPendingGrace = 10 * time.Second

// Conf is the plugin's network configuration.
type Conf struct {
	types.PluginConf

	// BPFFS is the directory of ctlb's pins (ctlbd's bpffs).
	BPFFS string `json:"bpffs,omitempty"`
	// Socket is ctlbd's control socket.
	Socket string `json:"socket,omitempty"`
	// StateDir holds pending records and attachment owners; it must be
	// ctlbd's stateDir.
	StateDir string `json:"stateDir,omitempty"`
	// Scope is "pod" (default) or "host".
	Scope string `json:"scope,omitempty"`
	// CgroupPath overrides where to attach, for every call of this network.
	CgroupPath string `json:"cgroupPath,omitempty"`
	// LogFile receives the plugin's logs (JSON lines); stderr without it,
	// or when it cannot be opened.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error; default info with a logFile,
	// warn on stderr.
	LogLevel string `json:"logLevel,omitempty"`
	// PendingGrace is how long after ADD a still-pending attachment passes
	// CHECK ("10s" by default, a Go duration).
	PendingGrace string `json:"pendingGrace,omitempty"`

	RuntimeConfig RuntimeConfig `json:"runtimeConfig"`

	// hasValidAttachments tells an empty GC list from none at all.
	hasValidAttachments bool
	// pendingGrace is PendingGrace parsed.
	pendingGrace time.Duration
	// unusable names the keys a lenient parse found wrong and reset: what
	// depends on them is skipped.
	unusable map[string]error
}

// RuntimeConfig is what the runtime passes for the declared capabilities.
type RuntimeConfig struct {
	// CgroupPath is the pod sandbox's cgroup (capability "cgroupPath",
	// containerd >= 1.7.0, CRI-O >= 1.28; podman never passes it).
	CgroupPath string
	// PodAnnotations are the pod's annotations (capability
	// "io.kubernetes.cri.pod-annotations"): ctlb.io/containers asks for
	// container scope through ctlbd's NRI plugin.
	PodAnnotations map[string]string
}

// UnmarshalJSON takes cgroupPath and ignores the runtime's other keys: the
// runtime owns runtimeConfig, and only passes what capabilities declare.
func (r *RuntimeConfig) UnmarshalJSON(b []byte) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("runtimeConfig: %w", err)
	}
	if v, ok := raw["cgroupPath"]; ok {
		if err := json.Unmarshal(v, &r.CgroupPath); err != nil {
			return fmt.Errorf("runtimeConfig.cgroupPath: want a string: %w", err)
		}
	}
	if v, ok := raw[annotation.CRIPodAnnotations]; ok {
		if err := json.Unmarshal(v, &r.PodAnnotations); err != nil {
			return fmt.Errorf("runtimeConfig[%q]: want an object of strings: %w", annotation.CRIPodAnnotations, err)
		}
	}
	return nil
}

// readKeys are the keys ctlb reads, each decoded on its own so that a bad
// one is named (and, in a lenient parse, skipped alone).
var readKeys = []string{
	"cniVersion", "name", "type", "prevResult", "runtimeConfig", "cni.dev/valid-attachments",
	"bpffs", "socket", "stateDir", "scope", "cgroupPath", "logFile", "logLevel", "pendingGrace",
}

// toleratedKeys are keys a network config may carry that ctlb does not
// read: the spec's well-known ones (other plugins of the chain share the
// list's keys), and what runtimes and libcni inject. Any "cni.dev/" key is
// tolerated too: the spec reserves that prefix for itself.
var toleratedKeys = map[string]bool{
	"capabilities": true, "args": true, "ipam": true, "dns": true, "ipMasq": true,
	// install-cni's mark on the entry it wrote (internal/cniinstall).
	"installedBy": true,
	// Multus writes the device of an SR-IOV (resourceName) network into
	// every plugin of the delegate's chain.
	"deviceID": true, "pciBusID": true,
}

func knownKey(k string) bool {
	return toleratedKeys[k] || strings.HasPrefix(k, "cni.dev/") || contains(readKeys, k)
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// ParseConf decodes and validates the config on stdin strictly (ADD, CHECK,
// STATUS). needPrev demands a prevResult (ADD and CHECK: ctlb is chained
// only). Errors are CNI errors with a code: 2 for an unknown key, 6 for JSON
// that does not decode, 7 for a value that is wrong.
func ParseConf(stdin []byte, needPrev bool) (*Conf, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ctlb: decode network config", err.Error())
	}
	var unknown []string
	for k := range raw {
		if !knownKey(k) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		var kv []string
		for _, k := range unknown {
			kv = append(kv, fmt.Sprintf("%q: %s", k, shorten(raw[k])))
		}
		return nil, types.NewError(types.ErrUnsupportedField,
			fmt.Sprintf("ctlb: unsupported field %s", strings.Join(kv, ", ")),
			"ctlb's keys: bpffs, socket, stateDir, scope, cgroupPath, logFile, logLevel, pendingGrace; "+
				"also accepted: the spec's well-known keys (ipam, dns, ipMasq, capabilities, runtimeConfig, args), Multus's deviceID and pciBusID, and any cni.dev/ key")
	}
	c := &Conf{}
	if bad := c.decode(raw); len(bad) > 0 {
		k := firstKey(bad)
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("ctlb: invalid network config: %q: %s", k, shorten(raw[k])), bad[k].Error())
	}
	if bad := c.defaultsAndValidate(); len(bad) > 0 {
		k := firstKey(bad)
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "ctlb: invalid network config", bad[k].Error())
	}
	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "ctlb: decode prevResult", err.Error())
		}
	}
	if needPrev && c.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"ctlb is a chained plugin and got no prevResult",
			"list ctlb after the plugin that creates the pod's interface (e.g. bridge) in a conflist")
	}
	return c, nil
}

// ParseConfLenient decodes the config for DEL and GC: unknown keys are
// ignored, prevResult is not read, and a key that does not decode or
// validate is reset and named in the returned problems; the caller logs
// them and skips what needs that key. It fails only on stdin that is not a
// JSON object, which skel has already refused before calling the plugin.
func ParseConfLenient(stdin []byte) (*Conf, []error, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "ctlb: decode network config", err.Error())
	}
	delete(raw, "prevResult") // not needed to tear down; may be anything
	c := &Conf{unusable: map[string]error{}}
	var problems []error
	for k := range raw {
		if !knownKey(k) {
			problems = append(problems, fmt.Errorf("unsupported field %q ignored", k))
		}
	}
	for k, err := range c.decode(raw) {
		c.unusable[k] = err
	}
	for k, err := range c.defaultsAndValidate() {
		c.unusable[k] = err
	}
	for _, k := range sortedKeys(c.unusable) {
		problems = append(problems, fmt.Errorf("%q: %w", k, c.unusable[k]))
	}
	return c, problems, nil
}

// usable reports whether a lenient parse kept key.
func (c *Conf) usable(key string) bool { return c.unusable[key] == nil }

// decode sets each key ctlb reads on its own and returns the ones that did
// not decode.
func (c *Conf) decode(raw map[string]json.RawMessage) map[string]error {
	bad := map[string]error{}
	for _, k := range readKeys {
		v, ok := raw[k]
		if !ok {
			continue
		}
		one, _ := json.Marshal(map[string]json.RawMessage{k: v})
		if err := json.Unmarshal(one, c); err != nil {
			bad[k] = err
		}
	}
	_, c.hasValidAttachments = raw["cni.dev/valid-attachments"]
	if bad["cni.dev/valid-attachments"] != nil {
		c.hasValidAttachments = false
	}
	return bad
}

func firstKey(m map[string]error) string { return sortedKeys(m)[0] }

func sortedKeys(m map[string]error) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// shorten is a value for an error message: whole if short.
func shorten(v json.RawMessage) string {
	const max = 120
	if len(v) > max {
		return string(v[:max]) + "..."
	}
	return string(v)
}

// defaultsAndValidate fills in defaults and returns the keys whose values
// are wrong; each of those is reset to its default or to empty.
func (c *Conf) defaultsAndValidate() map[string]error {
	bad := map[string]error{}
	if c.BPFFS == "" {
		c.BPFFS = datapath.DefaultDir
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = api.DefaultStateDir
	}
	if c.Scope == "" {
		c.Scope = ScopePod
	}
	for _, p := range []struct {
		name string
		val  *string
	}{{"bpffs", &c.BPFFS}, {"socket", &c.Socket}, {"stateDir", &c.StateDir}, {"logFile", &c.LogFile}} {
		if *p.val == "" && p.name == "logFile" {
			continue
		}
		if !filepath.IsAbs(*p.val) || filepath.Clean(*p.val) != *p.val {
			bad[p.name] = fmt.Errorf("%s: %q is not a clean absolute path", p.name, *p.val)
			*p.val = ""
		}
	}
	switch c.Scope {
	case ScopePod:
	case ScopeHost:
		if c.CgroupPath != "" {
			bad["scope"] = fmt.Errorf("scope %q attaches at the cgroup v2 root: cgroupPath %q contradicts it", c.Scope, c.CgroupPath)
		}
	default:
		bad["scope"] = fmt.Errorf("scope: %q, want %q or %q", c.Scope, ScopePod, ScopeHost)
		c.Scope = ScopePod
	}
	switch c.LogLevel {
	case "", "debug", "info", "warn", "error":
	default:
		bad["logLevel"] = fmt.Errorf("logLevel: %q, want debug, info, warn or error", c.LogLevel)
		c.LogLevel = ""
	}
	c.pendingGrace = DefaultPendingGrace
	if c.PendingGrace != "" {
		d, err := time.ParseDuration(c.PendingGrace)
		if err == nil && d < 0 {
			err = errors.New("negative")
		}
		if err != nil {
			bad["pendingGrace"] = fmt.Errorf("pendingGrace: %q, want a duration such as \"10s\": %w", c.PendingGrace, err)
		} else {
			c.pendingGrace = d
		}
	}
	return bad
}

// cgroupPath is the config's override, else the runtime's.
func (c *Conf) cgroupPath() string {
	if c.CgroupPath != "" {
		return c.CgroupPath
	}
	return c.RuntimeConfig.CgroupPath
}

// PodArgs are the CNI_ARGS ctlb reads (K8S_POD_UID) and the other keys
// Kubernetes runtimes pass; anything else needs IgnoreUnknown=1, the
// library's rule.
type PodArgs struct {
	types.CommonArgs
	K8S_POD_UID                types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
}

// parseArgs reads CNI_ARGS ("K=V;K=V") with the library's parser.
func parseArgs(s string) (PodArgs, error) {
	var a PodArgs
	if err := types.LoadArgs(s, &a); err != nil {
		return PodArgs{}, fmt.Errorf("CNI_ARGS %q: %w", s, err)
	}
	return a, nil
}
