package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/test/consul"
)

// Fleet size and shape: every node runs a ctlbd that watches the catalog.
const (
	fleetDaemons = 50
	// Half the daemons have 1 VIP, half have 6, all on the same Consul
	// query: the two halves' loads side by side show it flat in the VIPs.
	fleetFewVIPs  = 1
	fleetManyVIPs = 6
	// The rest window covers a whole blocking query (60 s wait plus
	// Consul's jitter of up to 1/16): every watch comes back once in it.
	fleetRestWindow  = 70 * time.Second
	fleetChurnWindow = 30 * time.Second
)

// countingProxy stands in front of one Consul server's HTTP API for one
// daemon and counts the requests it passes: what the server receives from
// that daemon.
type countingProxy struct {
	srv      *http.Server
	url      string
	requests atomic.Int64
	inFlight atomic.Int64 // requests the server holds now (blocking queries)
}

func newCountingProxy(b *testing.B, target string) *countingProxy {
	b.Helper()
	u, err := url.Parse(target)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	p := &countingProxy{url: "http://" + ln.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(u)
	// Blocking queries cut short at the end of the run are no news.
	rp.ErrorLog = log.New(io.Discard, "", 0)
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		p.inFlight.Add(1)
		defer p.inFlight.Add(-1)
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(ln)
	b.Cleanup(func() { p.srv.Close() })
	return p
}

// fleetDaemon is one ctlbd with a private bpffs, state dir and socket.
type fleetDaemon struct {
	vips   int
	cmd    *exec.Cmd
	exited chan struct{}
	proxy  *countingProxy
	log    string
}

func startFleetDaemon(b *testing.B, bin string, i, vips int, proxy *countingProxy) *fleetDaemon {
	b.Helper()
	bpffs := filepath.Join(testutil.MountBPFFS(b), "ctlb")
	dir, err := os.MkdirTemp("", "ctlb-fleet-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	var services []map[string]any
	for v := range vips {
		services = append(services, map[string]any{
			"vip":    fmt.Sprintf("198.18.200.%d:%d", 1+v, 8502),
			"consul": map[string]any{"address": proxy.url, "service": "consul", "port": consul.GRPCPort},
			"health": map[string]any{"interval": "2s", "timeout": "500ms"},
			"empty":  "reject",
		})
	}
	cfg := map[string]any{
		"bpffs": bpffs, "socket": filepath.Join(dir, "ctlbd.sock"), "stateDir": filepath.Join(dir, "state"),
		"logLevel": "warn", "services": services,
	}
	data, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	conf := filepath.Join(dir, "ctlbd.json")
	if err := os.WriteFile(conf, data, 0o600); err != nil {
		b.Fatal(err)
	}
	d := &fleetDaemon{vips: vips, proxy: proxy, log: filepath.Join(dir, "ctlbd.log"), exited: make(chan struct{})}
	logf, err := os.Create(d.log)
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	d.cmd = exec.Command(bin, "run", "--config", conf)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		b.Fatalf("start ctlbd %d: %v", i, err)
	}
	go func() { _ = d.cmd.Wait(); close(d.exited) }()
	b.Cleanup(func() {
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(10 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
	})
	return d
}

// fleetCounts is every daemon's request count now.
func fleetCounts(ds []*fleetDaemon) []int64 {
	out := make([]int64, len(ds))
	for i, d := range ds {
		out[i] = d.proxy.requests.Load()
	}
	return out
}

// fleetRate is the total requests per second between two counts, and the
// most one daemon made.
func fleetRate(before, after []int64, d time.Duration) (total float64, worst int64) {
	var sum int64
	for i := range before {
		n := after[i] - before[i]
		sum += n
		worst = max(worst, n)
	}
	return float64(sum) / d.Seconds(), worst
}

// BenchmarkFleetConsulLoad: 50 ctlbd daemons (each with a private bpffs,
// state dir and socket; half with 1 VIP, half with 6, all on the same
// Consul query) follow one
// real 3-server cluster. A counting proxy in front of the servers' HTTP API
// per daemon measures the requests per second the servers receive at rest
// and during catalog churn (a server killed, then a replacement). One
// watch per distinct query: the load does not grow with the VIPs per node,
// and each daemon's is bounded. make bench runs it (-bench FleetConsul
// -benchtime 1x).
func BenchmarkFleetConsulLoad(b *testing.B) {
	testutil.RequireRoot(b)
	cl := consul.StartCluster(b, 3)
	servers := cl.Servers()
	dir := b.TempDir()
	bins, err := testutil.BuildBinaries(dir, "./cmd/ctlbd")
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		// Daemons ask s1 or s2 (as each node's local agent would ask the
		// servers); s3 is the one that dies.
		var ds []*fleetDaemon
		for i := range fleetDaemons {
			p := newCountingProxy(b, servers[i%2].HTTPAddr())
			vips := fleetFewVIPs
			if i%4 >= 2 { // both halves ask both servers
				vips = fleetManyVIPs
			}
			ds = append(ds, startFleetDaemon(b, bins["ctlbd"], i, vips, p))
		}
		// Every daemon has its first answer when each proxy counted one
		// request and the next (blocking) one is out.
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		for {
			c := fleetCounts(ds)
			if !slices.ContainsFunc(c, func(n int64) bool { return n < 2 }) {
				break
			}
			if ctx.Err() != nil {
				cancel()
				b.Fatalf("daemons without their blocking query after 60s: counts %v", c)
			}
			time.Sleep(100 * time.Millisecond)
		}
		cancel()
		startup := fleetCounts(ds)
		// Each daemon's VIPs share one watch: one blocking query each is
		// held by the servers, however many VIPs the daemon has.
		time.Sleep(2 * time.Second)
		held := map[int]int64{}
		for _, d := range ds {
			held[d.vips] += d.proxy.inFlight.Load()
		}
		time.Sleep(fleetRestWindow - 2*time.Second)
		rest := fleetCounts(ds)

		// Churn: s3 dies; 5 s later a replacement starts on a new address.
		churnStart := time.Now()
		servers[2].Stop()
		time.Sleep(5 * time.Second)
		cl.AddServer()
		time.Sleep(fleetChurnWindow - time.Since(churnStart))
		churn := fleetCounts(ds)
		churnTook := time.Since(churnStart)

		restRate, restWorst := fleetRate(startup, rest, fleetRestWindow)
		churnRate, churnWorst := fleetRate(rest, churn, churnTook)
		var sum int64
		for _, n := range startup {
			sum += n
		}
		b.Logf("FLEET %d daemons (half with %d VIP, half with %d, one Consul query) on 3 Consul servers: start-up %d requests (%.1f per daemon)",
			fleetDaemons, fleetFewVIPs, fleetManyVIPs, sum, float64(sum)/fleetDaemons)
		b.Logf("FLEET at rest: %.2f requests/s to the servers (%.3f per daemon per s; most by one daemon in %s: %d)",
			restRate, restRate/fleetDaemons, fleetRestWindow, restWorst)
		b.Logf("FLEET churn (kill + replacement): %.2f requests/s (%.3f per daemon per s; most by one daemon in %s: %d)",
			churnRate, churnRate/fleetDaemons, fleetChurnWindow, churnWorst)
		// The two halves side by side.
		for _, vips := range []int{fleetFewVIPs, fleetManyVIPs} {
			var idx []int
			for i, d := range ds {
				if d.vips == vips {
					idx = append(idx, i)
				}
			}
			pick := func(c []int64) []int64 {
				out := make([]int64, len(idx))
				for j, i := range idx {
					out[j] = c[i]
				}
				return out
			}
			r, _ := fleetRate(pick(startup), pick(rest), fleetRestWindow)
			c, _ := fleetRate(pick(rest), pick(churn), churnTook)
			n := float64(len(idx))
			b.Logf("FLEET daemons with %d VIP(s): %d, blocking queries held %.1f per daemon, %.3f requests/s per daemon at rest, %.3f in churn",
				vips, len(idx), float64(held[vips])/n, r/n, c/n)
			b.ReportMetric(float64(held[vips])/n, fmt.Sprintf("queries-held/daemon-%dvips", vips))
			b.ReportMetric(c/n, fmt.Sprintf("req/s-churn/daemon-%dvips", vips))
		}
		b.ReportMetric(restRate, "req/s-rest")
		b.ReportMetric(churnRate, "req/s-churn")
		b.ReportMetric(float64(churnWorst)/fleetChurnWindow.Seconds(), "req/s-churn-worst-daemon")
		for _, d := range ds {
			select {
			case <-d.exited:
				out, _ := os.ReadFile(d.log)
				b.Fatalf("a ctlbd exited during the run:\n%s", out)
			default:
			}
		}
	}
}
