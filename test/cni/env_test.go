package cnitest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/cni"
	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/internal/testutil/ctlbdtest"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// The node's addresses: pods on 198.18.0.0/24 behind the bridge, Consul-like
// servers on /32s of the node's lo outside the pod subnet, and a server on
// the VIP itself, so that a connection that is not rewritten lands visibly
// on "the VIP" instead of failing.
const (
	podSubnet = "198.18.0.0/24"
	gateway   = "198.18.0.1"
	vip       = "198.19.255.1:8502"
)

// netName is the network of the tests' conflists.
const netName = "ctlbnet"

var servers = []string{"198.18.1.11:8502", "198.18.1.12:8502", "198.18.1.13:8502"}

// env is one test's node: a network namespace with the pod bridge, the
// servers, ctlbd on a private bpffs, and a cgroup parent for its pods.
type env struct {
	t        *testing.T
	node     ns.NetNS
	bpffs    string
	socket   string
	stateDir string
	dataDir  string // host-local's leases
	logFile  string // the plugin's log
	cgroups  string // the test's cgroup parent: <v2>/ctlb-test-XXXX
	cni      *libcni.CNIConfig
	services []config.Service
	daemon   *ctlbdtest.Daemon
	dp       *datapath.Datapath
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, []config.Service{{VIP: vip, Servers: servers}})
}

// newEnvWith is newEnv with other services in ctlbd's config.
func newEnvWith(t *testing.T, services []config.Service) *env {
	t.Helper()
	requirePlugins(t)
	tmp := t.TempDir()
	e := &env{
		t:        t,
		node:     testutil.NewNetNS(t),
		bpffs:    filepath.Join(testutil.MountBPFFS(t), "ctlb"),
		socket:   filepath.Join(tmp, "ctlbd.sock"),
		stateDir: filepath.Join(tmp, "state"),
		dataDir:  filepath.Join(tmp, "ipam"),
		logFile:  filepath.Join(tmp, "ctlb-plugin.log"),
		cgroups:  testutil.NewCgroup(t, ""),
		cni:      libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(tmp, "cache"), nil),
		services: services,
	}
	testutil.AddLoopbackAddrs(t, e.node, "198.18.1.11", "198.18.1.12", "198.18.1.13", "198.19.255.1")
	testutil.StartServers(t, e.node, append([]string{vip}, servers...)...)
	e.startDaemon()
	dp, err := datapath.Open(e.bpffs)
	if err != nil {
		t.Fatalf("open the daemon's pins: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	e.dp = dp
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
	})
	return e
}

// startDaemon runs ctlbd in-process with the env's services, on the
// env's bpffs, socket and state directory (the plugin config names them).
// The tests remove pins and cgroups on purpose: the daemon's repair loop
// must not race them (it runs once at start, which is enough here).
func (e *env) startDaemon() {
	e.t.Helper()
	e.startDaemonEvery(time.Hour)
}

// startDaemonEvery is startDaemon with the reconciler running every
// interval.
func (e *env) startDaemonEvery(every time.Duration) {
	e.t.Helper()
	e.daemon = ctlbdtest.Start(e.t, ctlbdtest.Options{
		BPFFS: e.bpffs, Socket: e.socket, StateDir: e.stateDir,
		Config: map[string]any{"reconcileInterval": every.String(), "services": e.services},
	})
}

func (e *env) dumpLogs() {
	e.t.Logf("--- ctlbd (last 6000 bytes):\n%s", e.daemon.LogTail(6000))
	for _, p := range []string{e.logFile} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 60 {
			lines = lines[len(lines)-60:]
		}
		e.t.Logf("--- %s (last %d lines):\n%s", p, len(lines), strings.Join(lines, "\n"))
	}
}

// status asks ctlbd for its status.
func (e *env) status() (api.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return api.NewClient(e.socket).Status(ctx)
}

// pendingList asks ctlbd for its pending attachments.
func (e *env) pendingList() []api.PendingAttachment {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	out, err := api.NewClient(e.socket).Pending(ctx)
	if err != nil {
		e.t.Fatalf("GET %s: %v", api.PathPending, err)
	}
	return out
}

// ctlbConf is the ctlb entry of a conflist, pointing at the test's daemon.
func (e *env) ctlbConf(extra map[string]any) map[string]any {
	c := map[string]any{
		"type":         "ctlb",
		"bpffs":        e.bpffs,
		"socket":       e.socket,
		"stateDir":     e.stateDir,
		"logFile":      e.logFile,
		"logLevel":     "debug",
		"capabilities": map[string]bool{"cgroupPath": true},
	}
	for k, v := range extra {
		c[k] = v
	}
	return c
}

// bridgeConf is the bridge plugin with host-local IPAM on the pod subnet.
func (e *env) bridgeConf() map[string]any {
	return map[string]any{
		"type":      "bridge",
		"bridge":    "ctlb0",
		"isGateway": true,
		"ipMasq":    false,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  [][]map[string]string{{{"subnet": podSubnet, "gateway": gateway}}},
			"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			"dataDir": e.dataDir,
		},
	}
}

// netList builds a conflist. Debian's reference plugins speak CNI up to
// 1.0.0; ctlb-only lists use 1.1.0 for GC and STATUS.
func (e *env) netList(version string, plugins ...map[string]any) *libcni.NetworkConfigList {
	e.t.Helper()
	raw, err := json.Marshal(map[string]any{"cniVersion": version, "name": netName, "plugins": plugins})
	if err != nil {
		e.t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		e.t.Fatalf("conflist %s: %v", raw, err)
	}
	return list
}

// chain is the runtime's view of a pod network with ctlb chained last.
func (e *env) chain(extra map[string]any) *libcni.NetworkConfigList {
	return e.netList("1.0.0", e.bridgeConf(), e.ctlbConf(extra))
}

// plainChain is the same network without ctlb.
func (e *env) plainChain() *libcni.NetworkConfigList {
	return e.netList("1.0.0", e.bridgeConf())
}

// loopbackConf is the loopback network runtimes add to every pod on its own.
func (e *env) loopbackConf() *libcni.PluginConfig {
	e.t.Helper()
	c, err := libcni.NetworkPluginConfFromBytes([]byte(`{"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}`))
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// pod is a sandbox: a network namespace, IDs, and where its cgroup is.
type pod struct {
	id     string // the sandbox's container ID
	uid    string // K8S_POD_UID; empty for runtimes without one
	netns  ns.NetNS
	cgroup string // the pod cgroup (may not exist yet)
	net    string // the network its attachment is looked up in
	rt     *libcni.RuntimeConf
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func newUID() string {
	h := randHex(16)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// newPod makes a pod's netns and runtime config; the cgroup is the
// caller's business (it may be made before or after ADD).
func (e *env) newPod(uid, cgroup string) *pod {
	e.t.Helper()
	p := &pod{id: randHex(32), uid: uid, netns: testutil.NewNetNS(e.t), cgroup: cgroup, net: netName}
	p.rt = &libcni.RuntimeConf{
		ContainerID: p.id,
		NetNS:       p.netns.Path(),
		IfName:      "eth0",
		Args:        [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "pod-" + p.id[:8]}, {"K8S_POD_INFRA_CONTAINER_ID", p.id}},
	}
	if uid != "" {
		p.rt.Args = append(p.rt.Args, [2]string{"K8S_POD_UID", uid})
	}
	return p
}

// cgroupfsPod is a pod of a QoS class in the cgroupfs layout, its cgroup
// made now: <parent>/kubepods[/<qos>]/pod<uid>.
func (e *env) cgroupfsPod(qos string, create bool) *pod {
	e.t.Helper()
	uid := newUID()
	dir := filepath.Join(e.cgroups, "kubepods", qos, "pod"+uid)
	mkdirAll(e.t, filepath.Dir(dir))
	if create {
		mkdirAll(e.t, dir)
	}
	return e.newPod(uid, dir)
}

func mkdirAll(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
}

// inNode runs fn on a thread in the node namespace: plugins that libcni
// starts there inherit it, as they do from a runtime running in the node.
func (e *env) inNode(fn func() error) error {
	return e.node.Do(func(ns.NetNS) error { return fn() })
}

func (e *env) add(list *libcni.NetworkConfigList, p *pod) (types.Result, error) {
	var res types.Result
	err := e.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var err error
		res, err = e.cni.AddNetworkList(ctx, list, p.rt)
		return err
	})
	return res, err
}

func (e *env) del(list *libcni.NetworkConfigList, p *pod) error {
	return e.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return e.cni.DelNetworkList(ctx, list, p.rt)
	})
}

func (e *env) check(list *libcni.NetworkConfigList, p *pod) error {
	return e.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return e.cni.CheckNetworkList(ctx, list, p.rt)
	})
}

// mustAdd adds the pod to the list's network and the loopback network, and
// deletes both when the test ends.
func (e *env) mustAdd(list *libcni.NetworkConfigList, p *pod) types.Result {
	e.t.Helper()
	res, err := e.add(list, p)
	if err != nil {
		e.t.Fatalf("ADD %s: %v", p.id[:12], err)
	}
	lo := e.loopbackConf()
	if err := e.inNode(func() error {
		_, err := e.cni.AddNetwork(context.Background(), lo, p.rt)
		return err
	}); err != nil {
		e.t.Fatalf("ADD loopback %s: %v", p.id[:12], err)
	}
	e.t.Cleanup(func() {
		_ = e.del(list, p)
		_ = e.inNode(func() error { return e.cni.DelNetwork(context.Background(), lo, p.rt) })
	})
	return res
}

// cniCode returns the CNI error code of err, failing when it has none.
func cniCode(t *testing.T, err error) (uint, string) {
	t.Helper()
	var ce *types.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a CNI error", err, err)
	}
	return ce.Code, ce.Error()
}

// wantCode fails unless err is the CNI error code whose text has want.
func wantCode(t *testing.T, what string, err error, code uint, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want CNI error %d (%q)", what, code, want)
	}
	got, msg := cniCode(t, err)
	if got != code || !strings.Contains(msg, want) {
		t.Fatalf("%s: CNI error %d %q, want code %d with %q", what, got, msg, code, want)
	}
	t.Logf("%s: code %d: %s", what, got, msg)
}

// attachment reads the pod's attachment, if any.
func (e *env) attachment(p *pod) (datapath.Attachment, bool) {
	e.t.Helper()
	a, err := e.dp.Attachment(cni.AttachmentID(p.net, p.id))
	if errors.Is(err, datapath.ErrNoAttachment) {
		return a, false
	}
	if err != nil {
		e.t.Fatalf("attachment of %s: %v", p.id[:12], err)
	}
	return a, true
}

// wantAttached fails unless the pod is attached, whole, to its cgroup.
func (e *env) wantAttached(p *pod) {
	e.t.Helper()
	a, ok := e.attachment(p)
	if !ok {
		e.t.Fatalf("pod %s: no attachment", p.id[:12])
	}
	if !a.Alive || len(a.Missing) > 0 || a.CgroupPath != p.cgroup {
		e.t.Fatalf("pod %s: attachment %+v, want alive and whole on %s", p.id[:12], a, p.cgroup)
	}
}

// waitAttached waits, bounded, for ctlbd to complete a pending attachment
// and returns how long it took.
func (e *env) waitAttached(p *pod, limit time.Duration) time.Duration {
	e.t.Helper()
	start := time.Now()
	for {
		if a, ok := e.attachment(p); ok && a.Alive {
			return time.Since(start)
		}
		if time.Since(start) > limit {
			e.t.Fatalf("pod %s: not attached within %s (pending: %+v)", p.id[:12], limit, e.pendingList())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// leftovers lists attachment directories and pending records.
func (e *env) leftovers() (links, records []string) {
	e.t.Helper()
	list := func(dir string) []string {
		ents, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			e.t.Fatal(err)
		}
		var out []string
		for _, d := range ents {
			out = append(out, d.Name())
		}
		return out
	}
	// The attachments, and each temporary directory in flight as
	// "_inflight/NAME".
	for _, l := range list(filepath.Join(e.bpffs, "links")) {
		if l != datapath.InflightDir {
			links = append(links, l)
		}
	}
	for _, l := range list(filepath.Join(e.bpffs, "links", datapath.InflightDir)) {
		links = append(links, datapath.InflightDir+"/"+l)
	}
	return links, list(pending.Dir(e.stateDir))
}

// owners lists the attachments that have owner records.
func (e *env) owners() []string {
	e.t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.stateDir, "attachments"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		e.t.Fatal(err)
	}
	var out []string
	for _, d := range ents {
		out = append(out, d.Name())
	}
	return out
}

func (e *env) wantNothingLeft() {
	e.t.Helper()
	links, records := e.leftovers()
	if owners := e.owners(); len(links) > 0 || len(records) > 0 || len(owners) > 0 {
		e.t.Fatalf("left over: link pins %v, pending records %v, attachment owners %v", links, records, owners)
	}
}

// container makes a child cgroup of the pod, as runc makes for each
// container, and returns it.
func container(t *testing.T, p *pod, name string) string {
	t.Helper()
	dir := filepath.Join(p.cgroup, name)
	mkdirAll(t, dir)
	return dir
}

// wantRedirected runs a client in the pod's netns and cgroup dir and checks
// that every connection to the VIP landed on one of the servers.
func wantRedirected(t *testing.T, p *pod, cgroupDir string) {
	t.Helper()
	r := testutil.RunClient(t, p.netns, cgroupDir, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 6})
	if r.Failed != 0 {
		t.Fatalf("pod %s: %d of 6 connects failed: %v", p.id[:12], r.Failed, r.Errors)
	}
	for i, s := range r.Landed {
		if !isServer(s) {
			t.Fatalf("pod %s: connection %d landed on %q, want one of %v (all: %v)", p.id[:12], i, s, servers, r.Landed)
		}
	}
	if len(r.PerServer) < 2 {
		t.Fatalf("pod %s: all connections on %v, want them spread over the servers", p.id[:12], r.PerServer)
	}
}

// wantUntouched checks that connections to the VIP land on the VIP itself.
func wantUntouched(t *testing.T, p *pod, cgroupDir string) {
	t.Helper()
	r := testutil.RunClient(t, p.netns, cgroupDir, testutil.ClientSpec{Mode: "dial", Target: vip, Count: 3})
	if r.Failed != 0 || r.PerServer[vip] != 3 {
		t.Fatalf("pod %s: landed %v (errors %v), want all 3 on the VIP itself", p.id[:12], r.PerServer, r.Errors)
	}
}

func isServer(s string) bool {
	for _, x := range servers {
		if s == x {
			return true
		}
	}
	return false
}

// execPlugin runs the ctlb binary directly, as a runtime does, and returns
// its stdout and exit error: for the raw error JSON and for timing.
func execPlugin(t *testing.T, cmd, containerID, netns, cniArgs string, stdin []byte) ([]byte, error) {
	t.Helper()
	c := exec.Command(ctlbBin)
	c.Env = append(os.Environ(),
		"CNI_COMMAND="+cmd, "CNI_CONTAINERID="+containerID, "CNI_NETNS="+netns,
		"CNI_IFNAME=eth0", "CNI_PATH="+binDir, "CNI_ARGS="+cniArgs)
	c.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil && stderr.Len() > 0 {
		t.Logf("plugin stderr: %s", stderr.String())
	}
	return out, err
}

// specError decodes the spec's error JSON from a failed plugin run.
func specError(t *testing.T, out []byte, err error) types.Error {
	t.Helper()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("plugin: want a non-zero exit, got %v (stdout %s)", err, out)
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); !ok || ws.ExitStatus() != 1 {
		t.Fatalf("plugin exit: %v, want status 1", err)
	}
	var te types.Error
	dec := json.NewDecoder(bytes.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&te); err != nil {
		t.Fatalf("plugin stdout %q is not the spec's error JSON: %v", out, err)
	}
	if te.Code == 0 || te.Msg == "" {
		t.Fatalf("plugin error JSON %s: want a code and a message", out)
	}
	return te
}

// prevResult is a minimal 1.0.0 result of an interface plugin.
func prevResult(ip string) map[string]any {
	return map[string]any{
		"cniVersion": "1.0.0",
		"interfaces": []map[string]any{{"name": "eth0", "sandbox": "/var/run/netns/x"}},
		"ips":        []map[string]any{{"address": ip + "/24", "gateway": gateway, "interface": 0}},
	}
}

// pluginStdin is a network config for running ctlb alone.
func (e *env) pluginStdin(version string, extra map[string]any, withPrev bool) []byte {
	e.t.Helper()
	c := e.ctlbConf(extra)
	delete(c, "capabilities")
	c["cniVersion"] = version
	c["name"] = netName
	if withPrev {
		c["prevResult"] = prevResult("198.18.0.9")
	}
	b, err := json.Marshal(c)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// addCtlbOnly runs ctlb's ADD alone for a pod already on the network, as
// a runtime retrying ADD would reach it.
func (e *env) addCtlbOnly(p *pod) {
	e.t.Helper()
	args := ""
	if p.uid != "" {
		args = "K8S_POD_UID=" + p.uid
	}
	out, err := execPlugin(e.t, "ADD", p.id, p.netns.Path(), args, e.pluginStdin("1.0.0", nil, true))
	if err != nil {
		e.t.Fatalf("ctlb ADD %s: %v: %s", p.id[:12], err, out)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
