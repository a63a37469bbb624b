// Package chart renders the Helm chart charts/ctlb with Helm's own engine
// (helm.sh/helm/v4), as `helm template` would: for the plain manifests in
// conf/kubernetes (generated from the chart, one source) and for the tests
// that decode what the chart produces.
package chart

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	"sigs.k8s.io/yaml"
)

// Release names the release the chart is rendered for.
type Release struct {
	Name, Namespace string
}

// DefaultRelease is what the plain manifests are rendered for.
var DefaultRelease = Release{Name: "ctlb", Namespace: "ctlb-system"}

// Render renders the chart in dir with the value files (later ones win)
// and then set (top-level keys, winning over the files), and returns the
// manifests as one multi-document YAML stream, templates in name order,
// each document headed by its source, as `helm template` prints them.
func Render(dir string, rel Release, valueFiles []string, set map[string]any) ([]byte, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", dir, err)
	}
	vals := map[string]any{}
	for _, f := range valueFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("values: %w", err)
		}
		var v map[string]any
		if err := yaml.UnmarshalStrict(b, &v); err != nil {
			return nil, fmt.Errorf("values %s: %w", f, err)
		}
		vals = merge(vals, v)
	}
	vals = merge(vals, set)
	rv, err := util.ToRenderValues(ch, vals, common.ReleaseOptions{Name: rel.Name, Namespace: rel.Namespace, IsInstall: true, Revision: 1}, common.DefaultCapabilities)
	if err != nil {
		return nil, fmt.Errorf("chart %s values: %w", dir, err)
	}
	e := engine.Engine{Strict: true}
	out, err := e.RenderWithContext(context.Background(), ch, rv)
	if err != nil {
		return nil, fmt.Errorf("render chart %s: %w", dir, err)
	}
	names := make([]string, 0, len(out))
	for name := range out {
		if path.Ext(name) == ".yaml" {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	type doc struct {
		source, body string
		order        int
	}
	var docs []doc
	for _, name := range names {
		for _, body := range strings.Split(out[name], "\n---") {
			body = strings.TrimSpace(body)
			var meta struct {
				Kind string `json:"kind"`
			}
			if err := yaml.Unmarshal([]byte(body), &meta); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			if meta.Kind == "" {
				continue // only comments, or a template that rendered nothing
			}
			docs = append(docs, doc{name, body, kindOrder(meta.Kind)})
		}
	}
	// As `helm install` applies them: what others depend on first.
	slices.SortStableFunc(docs, func(a, b doc) int { return a.order - b.order })
	var buf bytes.Buffer
	for _, d := range docs {
		fmt.Fprintf(&buf, "---\n# Source: %s\n%s\n", d.source, d.body)
	}
	return buf.Bytes(), nil
}

// installOrder is the order of kinds in the output, after Helm's own.
var installOrder = []string{"Namespace", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet"}

func kindOrder(kind string) int {
	if i := slices.Index(installOrder, kind); i >= 0 {
		return i
	}
	return len(installOrder) // custom resources last
}

// merge is a deep merge of maps: src wins, nested maps merge.
func merge(dst, src map[string]any) map[string]any {
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			if dm, ok := dst[k].(map[string]any); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

// header heads the generated manifests.
const header = `# GENERATED from charts/ctlb by "make manifests": edit the chart, not this file.
#
#   kubectl apply -f conf/kubernetes/ctlb.yaml
#
# The Consul use case (charts/ctlb/examples/consul.yaml): Envoy sidecars dial
# 169.254.255.1:8502 and ctlb sends each connection to a healthy Consul
# server. Replace the image with the one you built and pushed
# (docs/DEPLOY.md, "The image").
`

// Manifests is the content of conf/kubernetes/ctlb.yaml: the chart at root
// rendered for DefaultRelease with the Consul example values and the
// namespace included.
func Manifests(root string) ([]byte, error) {
	b, err := Render(root, DefaultRelease, []string{root + "/examples/consul.yaml"},
		map[string]any{"namespace": map[string]any{"create": true}})
	if err != nil {
		return nil, err
	}
	return append([]byte(header), b...), nil
}
