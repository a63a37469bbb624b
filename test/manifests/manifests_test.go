// Package manifests checks the Helm chart charts/ctlb, rendered with Helm's
// own engine for the default values and for the Consul example, and the
// plain manifests in conf/kubernetes generated from it, the way an API
// server would start to: every document decodes strictly into its
// k8s.io/api type (an unknown or misspelled field, a duplicate key, a wrong
// type all fail), names are valid, and the objects fit together (mounts
// name volumes, the selector matches the pods, the ConfigMap holds a daemon
// config, read by ctlbd's own loader, that the DaemonSet's flags agree
// with). The security posture is checked too: only the bpffs init container
// is privileged; ctlbd drops every capability but the ones test/deploy
// found it needs.
package manifests

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/ctlb/ctlb/internal/chart"
	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/test/deploy"
)

const (
	manifestDir = "../../conf/kubernetes"
	chartDir    = "../../charts/ctlb"
)

// kinds maps each kind the manifests may use to its API version and type.
// A kind missing here is an error: add it with its real type.
var kinds = map[string]struct {
	apiVersion string
	new        func() any
}{
	"Namespace":          {"v1", func() any { return &corev1.Namespace{} }},
	"ServiceAccount":     {"v1", func() any { return &corev1.ServiceAccount{} }},
	"ConfigMap":          {"v1", func() any { return &corev1.ConfigMap{} }},
	"DaemonSet":          {"apps/v1", func() any { return &appsv1.DaemonSet{} }},
	"ClusterRole":        {"rbac.authorization.k8s.io/v1", func() any { return &rbacv1.ClusterRole{} }},
	"ClusterRoleBinding": {"rbac.authorization.k8s.io/v1", func() any { return &rbacv1.ClusterRoleBinding{} }},
	"Service":            {"v1", func() any { return &corev1.Service{} }},
	"ServiceMonitor":     {"monitoring.coreos.com/v1", func() any { return &serviceMonitor{} }},
}

// serviceMonitor is the part of prometheus-operator's ServiceMonitor the
// chart uses, decoded as strictly as the k8s.io/api types (the operator's
// Go module is not worth its weight here).
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// doc is one decoded YAML document and where it came from.
type doc struct {
	where string
	obj   any
}

// decodeStrict turns one YAML document into its typed object, refusing
// unknown fields and duplicate keys.
func decodeStrict(data []byte) (any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(data, &tm); err != nil {
		return nil, err
	}
	k, ok := kinds[tm.Kind]
	if !ok {
		return nil, fmt.Errorf("kind %q is not one this test knows", tm.Kind)
	}
	if tm.APIVersion != k.apiVersion {
		return nil, fmt.Errorf("%s: apiVersion %q, want %q", tm.Kind, tm.APIVersion, k.apiVersion)
	}
	obj := k.new()
	if err := yaml.UnmarshalStrict(data, obj); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

// loadAll decodes every document of every .yaml/.yml file in dir.
func loadAll(t *testing.T, dir string) []doc {
	t.Helper()
	var docs []doc
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if ext := filepath.Ext(path); ext != ".yaml" && ext != ".yml" {
			return fmt.Errorf("%s: not a .yaml file; only manifests belong in %s", path, dir)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		more, err := decodeStream(filepath.Base(path), data)
		docs = append(docs, more...)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return docs
}

// decodeStream decodes every document of a multi-document YAML stream.
func decodeStream(name string, data []byte) ([]doc, error) {
	var docs []doc
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 1; ; i++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return docs, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		if len(bytes.TrimSpace(stripComments(raw))) == 0 {
			continue
		}
		obj, err := decodeStrict(raw)
		if err != nil {
			return docs, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		docs = append(docs, doc{where: fmt.Sprintf("%s#%d", name, i), obj: obj})
	}
}

func stripComments(b []byte) []byte {
	var out [][]byte
	for _, line := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			out = append(out, line)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// TestStrictDecoderCatchesTypos makes sure the decoder really is strict, so
// that TestManifests passing means something.
func TestStrictDecoderCatchesTypos(t *testing.T) {
	good := "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  template:\n    spec:\n      hostNetwork: true\n"
	if _, err := decodeStrict([]byte(good)); err != nil {
		t.Fatalf("valid document rejected: %v", err)
	}
	for name, bad := range map[string]string{
		"misspelled field":    strings.Replace(good, "hostNetwork", "hostNetwrok", 1),
		"field one level off": strings.Replace(good, "    spec:\n      hostNetwork", "    hostNetwork: true\n    spec:\n      hostPID", 1),
		"wrong type":          strings.Replace(good, "hostNetwork: true", "hostNetwork: yes-please", 1),
		"duplicate key":       good + "metadata:\n  name: y\n",
		"wrong apiVersion":    strings.Replace(good, "apps/v1", "extensions/v1beta1", 1),
		"unknown kind":        strings.Replace(good, "DaemonSet", "DaemonSett", 1),
	} {
		if _, err := decodeStrict([]byte(bad)); err == nil {
			t.Errorf("%s: accepted:\n%s", name, bad)
		}
	}
}

// render renders the chart as `helm template` would, and decodes it.
func render(t *testing.T, valueFiles []string, set map[string]any) []doc {
	t.Helper()
	out, err := chart.Render(chartDir, chart.DefaultRelease, valueFiles, set)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := decodeStream("chart", out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return docs
}

// TestChartDefault: the chart with its default values (no VIPs yet).
func TestChartDefault(t *testing.T) {
	checkDocs(t, render(t, nil, nil), false, false)
}

// TestChartConsul: the documented Consul use case, with a ServiceMonitor
// (which needs the metrics on the node's address; TestChartSecretsAndScraping
// renders them on localhost).
func TestChartConsul(t *testing.T) {
	docs := render(t, []string{chartDir + "/examples/consul.yaml"}, map[string]any{
		"metrics": map[string]any{"serviceMonitor": map[string]any{"enabled": true}},
		"image":   map[string]any{"digest": "sha256:" + strings.Repeat("ab", 32)},
		"cni":     map[string]any{"uninstallOnExit": true},
	})
	checkDocs(t, docs, false, true)
	var monitors int
	for _, d := range docs {
		if sm, ok := d.obj.(*serviceMonitor); ok {
			monitors++
			if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" {
				t.Errorf("ServiceMonitor endpoints %+v, want the metrics port", sm.Spec.Endpoints)
			}
		}
		if ds, ok := d.obj.(*appsv1.DaemonSet); ok {
			for _, c := range ds.Spec.Template.Spec.Containers {
				if !strings.Contains(c.Image, "@sha256:") {
					t.Errorf("container %s: image %q, want the digest", c.Name, c.Image)
				}
			}
			for _, c := range ds.Spec.Template.Spec.Containers {
				if c.Name == "cni-watch" && !slices.Contains(c.Command, "--uninstall-on-exit") {
					t.Errorf("cni.uninstallOnExit: cni-watch runs %v", c.Command)
				}
			}
		}
	}
	if monitors != 1 {
		t.Errorf("%d ServiceMonitors, want 1", monitors)
	}
}

// TestChartRunDir: runDir moves ctlbd's socket and stateDir, and the
// installers write the same two into the plugin's entry.
func TestChartRunDir(t *testing.T) {
	const runDir = "/run/ctlb-b"
	var cfg *config.Config
	var ds *appsv1.DaemonSet
	for _, d := range render(t, nil, map[string]any{"runDir": runDir}) {
		switch o := d.obj.(type) {
		case *corev1.ConfigMap:
			c, err := config.Parse([]byte(o.Data["ctlbd.json"]))
			if err != nil {
				t.Fatalf("ConfigMap %s: %v", o.Name, err)
			}
			cfg = c
		case *appsv1.DaemonSet:
			ds = o
		}
	}
	if cfg == nil || ds == nil {
		t.Fatal("want the ConfigMap with ctlbd.json and the DaemonSet")
	}
	if cfg.StateDir != runDir || cfg.Socket != runDir+"/ctlbd.sock" {
		t.Errorf("ctlbd.json: stateDir %q socket %q, want them in runDir %s", cfg.StateDir, cfg.Socket, runDir)
	}
	spec := ds.Spec.Template.Spec
	installers := 0
	for _, c := range append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...) {
		if !slices.Contains(c.Command, "install-cni") {
			continue
		}
		installers++
		if got := flagValue(c.Command, "--state-dir"); got != cfg.StateDir {
			t.Errorf("container %s: --state-dir %q, ctlbd.json says stateDir %q", c.Name, got, cfg.StateDir)
		}
		if got := flagValue(c.Command, "--socket"); got != cfg.Socket {
			t.Errorf("container %s: --socket %q, ctlbd.json says %q", c.Name, got, cfg.Socket)
		}
	}
	if installers != 2 {
		t.Errorf("%d containers run install-cni, want 2 (init and watcher)", installers)
	}
	// The CLI in the ctlbd container (kubectl exec ... ctlbd status)
	// finds the socket of this runDir.
	for _, c := range spec.Containers {
		if c.Name != "ctlbd" {
			continue
		}
		found := false
		for _, e := range c.Env {
			if e.Name == "CTLB_SOCKET" {
				found = true
				if e.Value != cfg.Socket {
					t.Errorf("ctlbd container: CTLB_SOCKET %q, ctlbd.json says socket %q", e.Value, cfg.Socket)
				}
			}
		}
		if !found {
			t.Errorf("ctlbd container: no CTLB_SOCKET, so the CLI dials the default socket, not %s", cfg.Socket)
		}
	}
}

// TestChartSecretsAndScraping: a Secret reaches ctlbd through
// extraVolumes/extraVolumeMounts (and its path through extraEnv), for
// consul.tokenFile and TLS files; with metrics on 127.0.0.1 the pods
// carry no scrape annotations.
func TestChartSecretsAndScraping(t *testing.T) {
	set := map[string]any{
		"ctlbd": map[string]any{
			"extraVolumes":      []any{map[string]any{"name": "consul-secrets", "secret": map[string]any{"secretName": "ctlb-consul"}}},
			"extraVolumeMounts": []any{map[string]any{"name": "consul-secrets", "mountPath": "/etc/ctlb-secrets", "readOnly": true}},
			"extraEnv":          []any{map[string]any{"name": "CONSUL_HTTP_TOKEN_FILE", "value": "/etc/ctlb-secrets/consul-token"}},
		},
		"metrics": map[string]any{"bind": "localhost"},
	}
	var ds *appsv1.DaemonSet
	for _, d := range render(t, nil, set) {
		if o, ok := d.obj.(*appsv1.DaemonSet); ok {
			ds = o
		}
	}
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	spec := ds.Spec.Template.Spec
	if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == "consul-secrets" && v.Secret != nil && v.Secret.SecretName == "ctlb-consul"
	}) {
		var names []string
		for _, v := range spec.Volumes {
			names = append(names, v.Name)
		}
		t.Errorf("volumes %v: want the Secret volume consul-secrets", names)
	}
	for _, c := range spec.Containers {
		if c.Name != "ctlbd" {
			continue
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == "consul-secrets" && m.MountPath == "/etc/ctlb-secrets"
		}) {
			var paths []string
			for _, m := range c.VolumeMounts {
				paths = append(paths, m.MountPath)
			}
			t.Errorf("ctlbd mounts %v: want consul-secrets at /etc/ctlb-secrets", paths)
		}
		if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "CONSUL_HTTP_TOKEN_FILE" }) {
			t.Errorf("ctlbd env %v: want CONSUL_HTTP_TOKEN_FILE", c.Env)
		}
	}
	if v, ok := ds.Spec.Template.Annotations["prometheus.io/scrape"]; ok {
		t.Errorf("metrics.bind localhost: pods annotated prometheus.io/scrape=%q, which Prometheus cannot reach", v)
	}
}

// TestChartRejectsBadValues: a value the chart cannot honour fails the
// render with its name, rather than deploying something else.
func TestChartRejectsBadValues(t *testing.T) {
	for _, c := range []struct {
		name string
		set  map[string]any
		want string
	}{
		{"metrics.bind 0.0.0.0", map[string]any{"metrics": map[string]any{"bind": "0.0.0.0"}}, "metrics.bind"},
		// The chart mounts the host's bpffs at /sys/fs/bpf: pins elsewhere
		// would land in a bpffs of the init container's own.
		{"bpffs outside /sys/fs/bpf", map[string]any{"bpffs": "/var/lib/ctlb/bpf"}, "bpffs"},
		{"relative runDir", map[string]any{"runDir": "run/ctlb"}, "runDir"},
		{"ServiceMonitor with metrics on localhost", map[string]any{"metrics": map[string]any{"bind": "localhost",
			"serviceMonitor": map[string]any{"enabled": true}}}, "serviceMonitor"},
	} {
		_, err := chart.Render(chartDir, chart.DefaultRelease, nil, c.set)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %s", c.name, err, c.want)
		}
	}
}

// TestPlainManifests: conf/kubernetes is the chart rendered (make
// manifests), and it holds together on its own (namespace included).
func TestPlainManifests(t *testing.T) {
	want, err := chart.Manifests(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(manifestDir, "ctlb.yaml"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("conf/kubernetes/ctlb.yaml is not what charts/ctlb renders (%v): run make manifests and commit", err)
	}
	checkDocs(t, loadAll(t, manifestDir), true, true)
}

// checkDocs checks one set of objects: withNamespace when they must create
// their own namespace, withServices when the config must name VIPs.
func checkDocs(t *testing.T, docs []doc, withNamespace, withServices bool) {
	t.Helper()
	var (
		namespaces = map[string]bool{}
		accounts   = map[string]bool{}
		configMaps = map[string]*corev1.ConfigMap{}
		daemonSets []*appsv1.DaemonSet
	)
	for _, d := range docs {
		meta := objectMeta(d.obj)
		if errs := validation.IsDNS1123Subdomain(meta.Name); len(errs) > 0 {
			t.Errorf("%s: name %q: %v", d.where, meta.Name, errs)
		}
		checkLabels(t, d.where, meta.Labels)
		switch o := d.obj.(type) {
		case *corev1.Namespace:
			namespaces[o.Name] = true
			if o.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
				t.Errorf("%s: the bpffs init container is privileged: the namespace needs pod-security enforce=privileged", d.where)
			}
		case *corev1.ServiceAccount:
			accounts[o.Namespace+"/"+o.Name] = true
		case *corev1.ConfigMap:
			configMaps[o.Namespace+"/"+o.Name] = o
		case *appsv1.DaemonSet:
			daemonSets = append(daemonSets, o)
		}
	}
	if withNamespace {
		for _, d := range docs {
			if _, cluster := d.obj.(*corev1.Namespace); cluster {
				continue
			}
			if ns := objectMeta(d.obj).Namespace; !namespaces[ns] {
				t.Errorf("%s: namespace %q is not created by these manifests", d.where, ns)
			}
		}
	}
	if len(daemonSets) != 1 {
		t.Fatalf("%d DaemonSets, want 1", len(daemonSets))
	}
	checkDaemonSet(t, daemonSets[0], accounts, configMaps, withServices)
}

func objectMeta(obj any) metav1.ObjectMeta {
	switch o := obj.(type) {
	case *corev1.Namespace:
		return o.ObjectMeta
	case *corev1.ServiceAccount:
		return o.ObjectMeta
	case *corev1.ConfigMap:
		return o.ObjectMeta
	case *appsv1.DaemonSet:
		return o.ObjectMeta
	case *rbacv1.ClusterRole:
		return o.ObjectMeta
	case *rbacv1.ClusterRoleBinding:
		return o.ObjectMeta
	case *corev1.Service:
		return o.ObjectMeta
	case *serviceMonitor:
		return o.ObjectMeta
	}
	panic(fmt.Sprintf("no metadata for %T", obj))
}

func checkLabels(t *testing.T, where string, l map[string]string) {
	t.Helper()
	for k, v := range l {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			t.Errorf("%s: label key %q: %v", where, k, errs)
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			t.Errorf("%s: label %s value %q: %v", where, k, v, errs)
		}
	}
}

func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet, accounts map[string]bool, configMaps map[string]*corev1.ConfigMap, withServices bool) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	where := "DaemonSet " + ds.Name

	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("%s: selector %v does not select its own pods %v (%v)", where, ds.Spec.Selector, ds.Spec.Template.Labels, err)
	}
	checkLabels(t, where+" pod template", ds.Spec.Template.Labels)
	if !accounts[ds.Namespace+"/"+spec.ServiceAccountName] {
		t.Errorf("%s: service account %q is not defined", where, spec.ServiceAccountName)
	}
	if !spec.HostNetwork || !spec.HostPID {
		t.Errorf("%s: hostNetwork=%v hostPID=%v, want both", where, spec.HostNetwork, spec.HostPID)
	}
	if spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("%s: dnsPolicy %q: with host networking only ClusterFirstWithHostNet resolves cluster names", where, spec.DNSPolicy)
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		if errs := validation.IsDNS1123Label(v.Name); len(errs) > 0 {
			t.Errorf("%s: volume name %q: %v", where, v.Name, errs)
		}
		if _, dup := volumes[v.Name]; dup {
			t.Errorf("%s: volume %q defined twice", where, v.Name)
		}
		volumes[v.Name] = v
		if v.ConfigMap != nil && configMaps[ds.Namespace+"/"+v.ConfigMap.Name] == nil {
			t.Errorf("%s: volume %q uses ConfigMap %q, which is not defined", where, v.Name, v.ConfigMap.Name)
		}
	}
	used := map[string]bool{}
	containers := map[string]corev1.Container{}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for _, c := range all {
		cw := where + " container " + c.Name
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 {
			t.Errorf("%s: name: %v", cw, errs)
		}
		if _, dup := containers[c.Name]; dup {
			t.Errorf("%s: name used twice", cw)
		}
		containers[c.Name] = c
		if c.Image == "" || len(c.Command) == 0 {
			t.Errorf("%s: image %q command %v, want both", cw, c.Image, c.Command)
		}
		for _, m := range c.VolumeMounts {
			if _, ok := volumes[m.Name]; !ok {
				t.Errorf("%s: mounts volume %q, which is not defined", cw, m.Name)
			}
			used[m.Name] = true
			if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional &&
				(c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged) {
				t.Errorf("%s: Bidirectional propagation on %s needs a privileged container", cw, m.MountPath)
			}
		}
		for _, p := range c.Ports {
			if errs := validation.IsValidPortName(p.Name); p.Name != "" && len(errs) > 0 {
				t.Errorf("%s: port name %q: %v", cw, p.Name, errs)
			}
			if spec.HostNetwork && p.HostPort != 0 && p.HostPort != p.ContainerPort {
				t.Errorf("%s: with host networking hostPort %d must equal containerPort %d", cw, p.HostPort, p.ContainerPort)
			}
		}
	}
	for name := range volumes {
		if !used[name] {
			t.Errorf("%s: volume %q is mounted nowhere", where, name)
		}
	}

	// The installer: an init container running install-cni on the host's
	// CNI directories, and the watcher doing the same with --watch.
	var install, watch *corev1.Container
	for i, c := range spec.InitContainers {
		if slices.Contains(c.Command, "install-cni") && !slices.Contains(c.Command, "--watch") {
			install = &spec.InitContainers[i]
		}
	}
	for i, c := range spec.Containers {
		if slices.Contains(c.Command, "install-cni") && slices.Contains(c.Command, "--watch") {
			watch = &spec.Containers[i]
		}
	}
	if install == nil || watch == nil {
		t.Fatalf("%s: want an init container running `ctlbd install-cni` and a container running `install-cni --watch`", where)
	}
	for _, c := range []*corev1.Container{install, watch} {
		for flag, hostPath := range map[string]string{"--bin-dir": "/opt/cni/bin", "--conf-dir": "/etc/cni/net.d"} {
			checkFlagOnHostPath(t, where+" container "+c.Name, *c, flag, hostPath, volumes)
		}
	}

	// Least privilege: the one privileged container is the init container
	// mounting bpffs; ctlbd drops every capability but the ones it needs.
	var bpffsInit *corev1.Container
	for i, c := range all {
		privileged := c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged
		isInit := i < len(spec.InitContainers)
		if privileged && (!isInit || len(c.Command) < 2 || c.Command[1] != "mount-bpffs") {
			t.Errorf("%s container %s: privileged; only the mount-bpffs init container may be", where, c.Name)
		}
		if privileged {
			bpffsInit = &spec.InitContainers[i]
		}
	}
	if bpffsInit == nil {
		t.Errorf("%s: no privileged init container running `ctlbd mount-bpffs`", where)
	} else {
		m := mountAt(*bpffsInit, "/sys/fs/bpf")
		if m == nil || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional ||
			volumes[m.Name].HostPath == nil || volumes[m.Name].HostPath.Path != "/sys/fs/bpf" {
			t.Errorf("%s container %s: want the host's /sys/fs/bpf at /sys/fs/bpf with Bidirectional propagation", where, bpffsInit.Name)
		}
	}

	ctlbd, ok := containers["ctlbd"]
	if !ok {
		t.Fatalf("%s: no container named ctlbd", where)
	}
	cw := where + " container ctlbd"
	checkLeastPrivilege(t, cw, ctlbd, spec.SecurityContext)
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range ctlbd.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for path, want := range map[string]struct {
		hostPath    string
		propagation corev1.MountPropagationMode
	}{
		"/sys/fs/bpf":    {"/sys/fs/bpf", corev1.MountPropagationHostToContainer},
		"/sys/fs/cgroup": {"/sys/fs/cgroup", corev1.MountPropagationHostToContainer},
		"/run/ctlb":      {"/run/ctlb", ""},
	} {
		m, ok := mounts[path]
		if !ok {
			t.Errorf("%s: nothing mounted at %s", cw, path)
			continue
		}
		v := volumes[m.Name]
		if v.HostPath == nil || v.HostPath.Path != want.hostPath {
			t.Errorf("%s: %s is volume %q, want hostPath %s", cw, path, m.Name, want.hostPath)
		}
		got := corev1.MountPropagationMode("")
		if m.MountPropagation != nil {
			got = *m.MountPropagation
		}
		if want.propagation != "" && got != want.propagation {
			t.Errorf("%s: %s propagation %q, want %q", cw, path, got, want.propagation)
		}
	}

	// The config: the file the command names is the ConfigMap key mounted
	// there, it decodes strictly, and the installer writes the same bpffs
	// and socket into the conflist.
	cfgPath := flagValue(ctlbd.Command, "--config")
	cm, key := configMapFile(t, cw, cfgPath, mounts, volumes, configMaps, ds.Namespace)
	if cm == nil {
		return
	}
	// ctlbd's own loader: strict keys and every value validated.
	cfg, err := config.Parse([]byte(cm.Data[key]))
	if err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", cm.Name, key, err)
	}
	if withServices && len(cfg.Services) == 0 {
		t.Errorf("ConfigMap %s key %s: no services", cm.Name, key)
	}
	for _, c := range []*corev1.Container{install, watch} {
		if got := flagValue(c.Command, "--bpffs"); got != cfg.BPFFS {
			t.Errorf("%s container %s: --bpffs %q, ctlbd.json says %q", where, c.Name, got, cfg.BPFFS)
		}
		if got := flagValue(c.Command, "--socket"); got != cfg.Socket {
			t.Errorf("%s container %s: --socket %q, ctlbd.json says %q", where, c.Name, got, cfg.Socket)
		}
		// The plugin leaves pending attachments in its stateDir: in any
		// other directory than ctlbd's, they are never completed.
		if got := flagValue(c.Command, "--state-dir"); got != cfg.StateDir {
			t.Errorf("%s container %s: --state-dir %q, ctlbd.json says stateDir %q", where, c.Name, got, cfg.StateDir)
		}
	}
	if bpffsInit != nil {
		if got := flagValue(bpffsInit.Command, "--bpffs"); got != cfg.BPFFS {
			t.Errorf("%s container %s: --bpffs %q, ctlbd.json says %q", where, bpffsInit.Name, got, cfg.BPFFS)
		}
	}
	if !strings.HasPrefix(cfg.Socket, "/run/ctlb/") || !strings.HasPrefix(cfg.BPFFS, "/sys/fs/bpf/") {
		t.Errorf("ctlbd.json: socket %q and bpffs %q must lie in the host mounts /run/ctlb and /sys/fs/bpf", cfg.Socket, cfg.BPFFS)
	}

	// Metrics and probes: one listener on the node's address (downward
	// API) or 127.0.0.1, never every interface; the probes reach it.
	metrics := flagValue(ctlbd.Command, "--metrics")
	host, port, err := net.SplitHostPort(metrics)
	if err != nil {
		t.Fatalf("%s: --metrics %q: %v", cw, metrics, err)
	}
	probeHost := ""
	switch host {
	case "127.0.0.1":
		probeHost = host
	case "$(CTLB_NODE_IP)":
		var fromHostIP bool
		for _, e := range ctlbd.Env {
			fromHostIP = fromHostIP || (e.Name == "CTLB_NODE_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP")
		}
		if !fromHostIP {
			t.Errorf("%s: --metrics uses $(CTLB_NODE_IP), which is not status.hostIP", cw)
		}
	default:
		t.Errorf("%s: --metrics %q: want the node's address or 127.0.0.1, not every interface", cw, metrics)
	}
	var declared bool
	for _, p := range ctlbd.Ports {
		declared = declared || (p.Name == "metrics" && strconv.Itoa(int(p.ContainerPort)) == port)
	}
	if !declared {
		t.Errorf("%s: no port named metrics at %s", cw, port)
	}
	for name, pr := range map[string]struct {
		probe *corev1.Probe
		path  string
	}{"startupProbe": {ctlbd.StartupProbe, "/healthz"}, "livenessProbe": {ctlbd.LivenessProbe, "/healthz"}, "readinessProbe": {ctlbd.ReadinessProbe, "/readyz"}} {
		if pr.probe == nil || pr.probe.HTTPGet == nil || pr.probe.HTTPGet.Path != pr.path || pr.probe.HTTPGet.Port.String() != "metrics" || pr.probe.HTTPGet.Host != probeHost {
			t.Errorf("%s: %s %+v, want httpGet %s on port metrics, host %q", cw, name, pr.probe, pr.path, probeHost)
		}
	}
	if ann := ds.Spec.Template.Annotations; ann["prometheus.io/scrape"] == "true" && ann["prometheus.io/port"] != port {
		t.Errorf("%s: prometheus.io/port %q, ctlbd listens on %q", where, ann["prometheus.io/port"], port)
	}
	if len(spec.Tolerations) == 0 || spec.PriorityClassName == "" {
		t.Errorf("%s: tolerations %v, priorityClassName %q: a node agent runs on every node, before others", where, spec.Tolerations, spec.PriorityClassName)
	}
	// Every node but EKS Fargate's, which run no DaemonSet pods: tolerating
	// every taint would leave ctlbd Pending there.
	fargate := false
	if a := spec.Affinity; a != nil && a.NodeAffinity != nil && a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
			for _, e := range term.MatchExpressions {
				fargate = fargate || (e.Key == "eks.amazonaws.com/compute-type" && e.Operator == corev1.NodeSelectorOpNotIn && slices.Contains(e.Values, "fargate"))
			}
		}
	}
	if !fargate {
		t.Errorf("%s: affinity %+v, want EKS Fargate nodes excluded", where, spec.Affinity)
	}
}

// checkLeastPrivilege: not privileged, every capability dropped but the
// ones test/deploy found ctlbd needs, read-only root, RuntimeDefault
// seccomp, no privilege escalation.
func checkLeastPrivilege(t *testing.T, where string, c corev1.Container, pod *corev1.PodSecurityContext) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s: no securityContext", where)
		return
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: privileged", where)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation is not false", where)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem is not true", where)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil && pod != nil {
		seccomp = pod.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile %+v, want RuntimeDefault", where, seccomp)
	}
	var want []string
	for _, c := range deploy.Needed {
		want = append(want, strings.ToUpper(c))
	}
	var added []string
	if sc.Capabilities != nil {
		for _, c := range sc.Capabilities.Add {
			added = append(added, string(c))
		}
	}
	slices.Sort(added)
	slices.Sort(want)
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || !slices.Equal(added, want) {
		t.Errorf("%s: capabilities %+v, want drop [ALL] add exactly %v (test/deploy)", where, sc.Capabilities, want)
	}
}

func mountAt(c corev1.Container, path string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if m.MountPath == path {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// configMapFile finds the ConfigMap key behind a file path in the container.
func configMapFile(t *testing.T, where, path string, mounts map[string]corev1.VolumeMount, volumes map[string]corev1.Volume, cms map[string]*corev1.ConfigMap, ns string) (*corev1.ConfigMap, string) {
	t.Helper()
	m, ok := mounts[filepath.Dir(path)]
	if !ok {
		t.Errorf("%s: --config %q: its directory is not a mount", where, path)
		return nil, ""
	}
	v := volumes[m.Name]
	if v.ConfigMap == nil {
		t.Errorf("%s: --config %q is not in a ConfigMap volume", where, path)
		return nil, ""
	}
	cm := cms[ns+"/"+v.ConfigMap.Name]
	key := filepath.Base(path)
	if cm == nil || cm.Data[key] == "" {
		t.Errorf("%s: ConfigMap %q has no key %q", where, v.ConfigMap.Name, key)
		return nil, ""
	}
	return cm, key
}

// checkFlagOnHostPath: the directory a flag names is a mount of hostPath.
func checkFlagOnHostPath(t *testing.T, where string, c corev1.Container, flag, hostPath string, volumes map[string]corev1.Volume) {
	t.Helper()
	dir := flagValue(c.Command, flag)
	for _, m := range c.VolumeMounts {
		if m.MountPath == dir {
			if v := volumes[m.Name]; v.HostPath == nil || v.HostPath.Path != hostPath {
				t.Errorf("%s: %s %s is volume %q, want hostPath %s", where, flag, dir, m.Name, hostPath)
			}
			return
		}
	}
	t.Errorf("%s: %s %q is not a mounted host directory", where, flag, dir)
}

// flagValue reads --name=value or --name value from a command line.
func flagValue(cmd []string, name string) string {
	for i, a := range cmd {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
		if a == name && i+1 < len(cmd) {
			return cmd[i+1]
		}
	}
	return ""
}
