package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ctlb/ctlb/internal/proxy"
	"github.com/ctlb/ctlb/test/bench/seedproxy"
	"github.com/ctlb/ctlb/test/bench/sockmaprelay"
	"github.com/ctlb/ctlb/test/bench/workload"
)

// The benchmark's other processes are this program again, started with
// roleEnv naming what to be and argEnv holding its JSON arguments. Each is
// a process of its own so that it can live in its own cgroup (whose CPU
// time is then its own, and whose sockets connect4 sees as a pod's) and
// network namespace.
const (
	roleEnv = "CTLB_BENCH_ROLE"
	argEnv  = "CTLB_BENCH_ARG"
)

const (
	roleServer    = "server"
	roleClient    = "client"
	roleSeedProxy = "seedproxy"
	roleSockmap   = "sockmaprelay"
	roleCtlbProxy = "ctlbproxy"
	roleWarmer    = "warmer"
)

// serverArgs: one listener per entry, each in the namespace at NetNS.
type serverArgs struct {
	Listeners []serverListener `json:"listeners"`
}

type serverListener struct {
	NetNS string `json:"netns"`
	Addr  string `json:"addr"`
	Echo  bool   `json:"echo"` // else source
}

// forward is one listen address and the servers behind it.
type forward struct {
	Listen  string   `json:"listen"`
	Servers []string `json:"servers"`
}

type seedProxyArgs struct {
	Forwards []forward `json:"forwards"`
}

type ctlbProxyArgs struct {
	Mode     string    `json:"mode"`
	Forwards []forward `json:"forwards"`
	// Preconnect is proxy.Config.Preconnect (0: off).
	Preconnect int `json:"preconnect,omitempty"`
}

// ready is the first line every child prints.
type ready struct {
	Ready bool   `json:"ready"`
	Error string `json:"error,omitempty"`
}

// runChild runs this process as a child role and reports whether it was
// one; the caller exits then.
func runChild() bool {
	role := os.Getenv(roleEnv)
	if role == "" {
		return false
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("role", role))
	var err error
	switch role {
	case roleServer:
		err = childServer()
	case roleClient:
		err = childClient()
	case roleSeedProxy:
		err = childSeedProxy()
	case roleSockmap:
		err = childSockmapRelay()
	case roleCtlbProxy:
		err = childCtlbProxy()
	case roleWarmer:
		err = childWarmer()
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		say(ready{Error: err.Error()})
		slog.Error("child failed", "err", err)
		os.Exit(1)
	}
	return true
}

func say(v any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func childArgs(v any) error {
	if err := json.Unmarshal([]byte(os.Getenv(argEnv)), v); err != nil {
		return fmt.Errorf("arguments: %w", err)
	}
	return nil
}

// untilStdinCloses blocks until the parent closes our standard input, its
// way of saying stop.
func untilStdinCloses() { _, _ = io.Copy(io.Discard, os.Stdin) }

func childServer() error {
	var a serverArgs
	if err := childArgs(&a); err != nil {
		return err
	}
	for _, l := range a.Listeners {
		n, err := ns.GetNS(l.NetNS)
		if err != nil {
			return fmt.Errorf("server netns: %w", err)
		}
		err = n.Do(func(ns.NetNS) error {
			ln, err := workload.Listen(l.Addr)
			if err != nil {
				return err
			}
			if l.Echo {
				workload.ServeEcho(ln)
			} else {
				workload.ServeSource(ln)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("listen %s: %w", l.Addr, err)
		}
	}
	say(ready{Ready: true})
	untilStdinCloses()
	return nil
}

// childClient makes the measurements its parent asks for, one JSON request
// per line in, one result per line out.
func childClient() error {
	say(ready{Ready: true})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var q workload.Request
		if err := json.Unmarshal(in.Bytes(), &q); err != nil {
			say(workload.Result{Errors: 1, Err: fmt.Sprintf("request: %v", err)})
			continue
		}
		say(workload.Run(context.Background(), q))
	}
	return nil
}

func childSeedProxy() error {
	var a seedProxyArgs
	if err := childArgs(&a); err != nil {
		return err
	}
	for _, f := range a.Forwards {
		ln, err := workload.Listen(f.Listen)
		if err != nil {
			return fmt.Errorf("seed proxy: %w", err)
		}
		seedproxy.Serve(ln, f.Servers)
	}
	say(ready{Ready: true})
	untilStdinCloses()
	return nil
}

// childSockmapRelay is the sockmap relay (test/bench/sockmaprelay); it takes
// seedProxyArgs. At the end it reports on standard error how many pairs the
// kernel forwarded and how many fell back to user space.
func childSockmapRelay() error {
	var a seedProxyArgs
	if err := childArgs(&a); err != nil {
		return err
	}
	r, err := sockmaprelay.Load()
	if err != nil {
		return err
	}
	defer r.Close()
	for _, f := range a.Forwards {
		ln, err := workload.Listen(f.Listen)
		if err != nil {
			return fmt.Errorf("sockmap relay: %w", err)
		}
		if err := r.Serve(ln, f.Servers); err != nil {
			return fmt.Errorf("sockmap relay: %w", err)
		}
	}
	say(ready{Ready: true})
	untilStdinCloses()
	slog.Info("sockmap relay done", "pairsInKernel", r.Kernel.Load(), "pairsInUserSpace", r.User.Load())
	return nil
}

func childCtlbProxy() error {
	var a ctlbProxyArgs
	if err := childArgs(&a); err != nil {
		return err
	}
	targets := map[netip.AddrPort][]netip.AddrPort{}
	byVIP := map[string][]int{}
	var order []string
	for _, f := range a.Forwards {
		l, err := netip.ParseAddrPort(f.Listen)
		if err != nil {
			return err
		}
		for _, s := range f.Servers {
			ap, err := netip.ParseAddrPort(s)
			if err != nil {
				return err
			}
			targets[l] = append(targets[l], ap)
		}
		v := l.Addr().String()
		if byVIP[v] == nil {
			order = append(order, v)
		}
		byVIP[v] = append(byVIP[v], int(l.Port()))
	}
	cfg := proxy.Config{Mode: a.Mode, DrainTimeout: "1s", Preconnect: a.Preconnect}
	for _, v := range order {
		cfg.Services = append(cfg.Services, proxy.Service{VIP: v, Ports: byVIP[v]})
	}
	p, err := proxy.New(cfg, func(svc netip.AddrPort) []netip.AddrPort { return targets[svc] }, proxy.Options{})
	if err != nil {
		return fmt.Errorf("ctlb proxy: %w", err)
	}
	// CTLB_BENCH_PROXY_PROFILE=PREFIX writes a CPU profile of each ctlb
	// proxy to PREFIX.MODE.pprof, for looking into where its time goes.
	if prefix := os.Getenv("CTLB_BENCH_PROXY_PROFILE"); prefix != "" {
		name := a.Mode
		if a.Preconnect > 0 {
			name += fmt.Sprintf("-preconnect%d", a.Preconnect)
		}
		f, err := os.Create(prefix + "." + name + ".pprof")
		if err != nil {
			return fmt.Errorf("profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("profile: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	say(ready{Ready: true})
	untilStdinCloses()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return p.Shutdown(ctx)
}

// childWarmer keeps every CPU from going idle with one SCHED_IDLE spinner
// per CPU. On a virtual machine an idle vCPU halts, and waking it costs a
// trip through the hypervisor that dwarfs a round trip through the kernel's
// network stack; with the spinners a wake-up is a context switch. SCHED_IDLE
// runs only when nothing else wants the CPU, so the spinners take next to
// nothing from the measured processes.
func childWarmer() error {
	errc := make(chan error, runtime.NumCPU())
	for range runtime.NumCPU() {
		go func() {
			runtime.LockOSThread()
			if err := unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0); err != nil {
				errc <- fmt.Errorf("SCHED_IDLE: %w", err)
				return
			}
			errc <- nil
			for {
				spin()
			}
		}()
	}
	for range runtime.NumCPU() {
		if err := <-errc; err != nil {
			return err
		}
	}
	say(ready{Ready: true})
	untilStdinCloses()
	return nil
}

//go:noinline
func spin() {}
