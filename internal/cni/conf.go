// Package cni is the ctlb CNI plugin's logic: it parses the plugin config
// (strictly: an unknown key is an error), locates the pod cgroup, and
// attaches, detaches, checks and garbage-collects ctlb's programs through
// pkg/datapath, leaving a pending record for ctlbd when the cgroup does not
// exist yet. The plugin binary (plugins/meta/ctlb) only wires these
// functions to skel.
package cni

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

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

// Conf is the plugin's network configuration.
type Conf struct {
	types.PluginConf

	// BPFFS is the directory of ctlb's pins (ctlbd's bpffs).
	BPFFS string `json:"bpffs,omitempty"`
	// Socket is ctlbd's control socket.
	Socket string `json:"socket,omitempty"`
	// StateDir holds pending records; it must be ctlbd's stateDir.
	StateDir string `json:"stateDir,omitempty"`
	// Scope is "pod" (default) or "host".
	Scope string `json:"scope,omitempty"`
	// CgroupPath overrides where to attach, for every call of this network.
	CgroupPath string `json:"cgroupPath,omitempty"`
	// LogFile receives the plugin's logs (JSON lines); stderr without it.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error; default info with a logFile,
	// warn on stderr.
	LogLevel string `json:"logLevel,omitempty"`

	RuntimeConfig RuntimeConfig `json:"runtimeConfig"`

	// hasValidAttachments tells an empty GC list from none at all.
	hasValidAttachments bool
}

// RuntimeConfig is what the runtime passes for the declared capabilities.
type RuntimeConfig struct {
	// CgroupPath is the pod sandbox's cgroup (capability "cgroupPath",
	// containerd >= 1.7.1).
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

// knownKeys are the keys a ctlb plugin config may have: the spec's, the ones
// libcni injects, and ctlb's own.
var knownKeys = map[string]bool{
	"cniVersion": true, "name": true, "type": true, "capabilities": true,
	"prevResult": true, "runtimeConfig": true, "args": true,
	"cni.dev/valid-attachments": true, "cni.dev/attachments": true,
	"bpffs": true, "socket": true, "stateDir": true, "scope": true,
	"cgroupPath": true, "logFile": true, "logLevel": true,
}

// ParseConf decodes and validates the config on stdin. needPrev demands a
// prevResult (ADD and CHECK: ctlb is chained only). Errors are CNI errors
// with a code: 6 for JSON that does not decode, 7 for a config that is wrong.
func ParseConf(stdin []byte, needPrev bool) (*Conf, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ctlb: decode network config", err.Error())
	}
	var unknown []string
	for k := range raw {
		if !knownKeys[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("ctlb: unknown config key(s) %s", strings.Join(quoteAll(unknown), ", ")),
			"known keys: bpffs, socket, stateDir, scope, cgroupPath, logFile, logLevel, and the CNI standard ones")
	}
	c := &Conf{}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(c); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "ctlb: invalid network config", err.Error())
	}
	_, c.hasValidAttachments = raw["cni.dev/valid-attachments"]
	if err := c.defaultsAndValidate(); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "ctlb: invalid network config", err.Error())
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

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}

func (c *Conf) defaultsAndValidate() error {
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
	for _, p := range []struct{ name, val string }{{"bpffs", c.BPFFS}, {"socket", c.Socket}, {"stateDir", c.StateDir}, {"logFile", c.LogFile}} {
		if p.val == "" && p.name == "logFile" {
			continue
		}
		if !filepath.IsAbs(p.val) || filepath.Clean(p.val) != p.val {
			return fmt.Errorf("%s: %q is not a clean absolute path", p.name, p.val)
		}
	}
	switch c.Scope {
	case ScopePod:
	case ScopeHost:
		if c.CgroupPath != "" {
			return fmt.Errorf("scope %q attaches at the cgroup v2 root: cgroupPath %q contradicts it", c.Scope, c.CgroupPath)
		}
	default:
		return fmt.Errorf("scope: %q, want %q or %q", c.Scope, ScopePod, ScopeHost)
	}
	switch c.LogLevel {
	case "", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("logLevel: %q, want debug, info, warn or error", c.LogLevel)
	}
	return nil
}

// cgroupPath is the config's override, else the runtime's.
func (c *Conf) cgroupPath() string {
	if c.CgroupPath != "" {
		return c.CgroupPath
	}
	return c.RuntimeConfig.CgroupPath
}

// parseArgs reads CNI_ARGS ("K=V;K=V"); runtimes pass many keys, and ctlb
// reads only K8S_POD_UID, so unknown keys are fine.
func parseArgs(s string) (map[string]string, error) {
	out := map[string]string{}
	if s == "" {
		return out, nil
	}
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", kv)
		}
		out[k] = v
	}
	return out, nil
}
