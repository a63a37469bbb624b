// Command vipclient runs inside a test container: it dials a target (a VIP)
// and prints, one JSON line each, which server answered. Test servers name
// themselves in their first line (internal/testutil.StartServers), so the line
// says where the connection really landed.
//
// It first retries until one connection succeeds (the pod's redirect may be
// completed a moment after the container starts, on the pending path), then
// makes -count connections one after another. Everything is bounded by
// -deadline, so a broken redirect ends the container instead of hanging.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Line is one connection's report; the harness decodes the same shape.
type Line struct {
	N      int    `json:"n"`
	Server string `json:"server,omitempty"`
	Peer   string `json:"peer,omitempty"`
	// At is the wall clock, in Unix nanoseconds, when the connection was
	// established: the kernel clock is shared with the test.
	At  int64  `json:"at"`
	Err string `json:"err,omitempty"`
	// Retries counts failed attempts before the first success; Failures
	// describes the first few of them.
	Retries  int      `json:"retries,omitempty"`
	Failures []string `json:"failures,omitempty"`
	Done     bool     `json:"done,omitempty"`
}

func main() {
	target := flag.String("target", "", "address to dial, IP:PORT")
	count := flag.Int("count", 6, "connections to make after the first success")
	deadline := flag.Duration("deadline", 30*time.Second, "give up after this long")
	linger := flag.Duration("linger", 0, "after the run, stay this long (or until SIGTERM) so the pod keeps running")
	flag.Parse()
	if *target == "" || *count < 1 || *count > 10000 {
		fmt.Fprintln(os.Stderr, "usage: vipclient -target IP:PORT [-count N (1-10000)] [-deadline D]")
		os.Exit(2)
	}
	end := time.Now().Add(*deadline)
	enc := json.NewEncoder(os.Stdout)

	// Wait for the first success, bounded in time (and so in count, at one
	// attempt per 5 ms at most).
	retries := 0
	var lastErr error
	var failures []string
	for {
		start := time.Now()
		// Short attempts while waiting: a SYN to the unrouted VIP gets no
		// answer once the node rate-limits its ICMP errors, and a long
		// attempt would hide the moment the redirect starts working.
		l, err := dial(*target, earliest(end, time.Now().Add(250*time.Millisecond)))
		if err == nil {
			l.Retries, l.Failures = retries, failures
			_ = enc.Encode(l)
			break
		}
		lastErr = err
		retries++
		if len(failures) < 10 {
			failures = append(failures, fmt.Sprintf("%s +%s: %v", start.Format("15:04:05.000"), time.Since(start).Round(time.Millisecond), err))
		}
		if time.Now().After(end) {
			_ = enc.Encode(Line{Err: fmt.Sprintf("no connection in %s after %d attempts: %v", *deadline, retries, lastErr), Done: true})
			os.Exit(1)
		}
		time.Sleep(5 * time.Millisecond)
	}
	failed := 0
	for i := 1; i < *count; i++ {
		l, err := dial(*target, earliest(end, time.Now().Add(3*time.Second)))
		l.N = i
		if err != nil {
			l.Err = err.Error()
			failed++
		}
		_ = enc.Encode(l)
	}
	_ = enc.Encode(Line{N: *count, Done: true})
	if failed > 0 {
		os.Exit(1)
	}
	if *linger > 0 {
		// A pod whose containers all exited is terminal, and kubelet tears
		// it down: lingering keeps it for the test to look at. SIGTERM (the
		// pod's deletion) ends it at once: as PID 1 the default action of a
		// signal does not apply.
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		select {
		case <-stop:
		case <-time.After(*linger):
		}
	}
}

// dial makes one connection, which must be established and name its server
// before end.
func dial(target string, end time.Time) (Line, error) {
	c, err := net.DialTimeout("tcp4", target, max(time.Until(end), 10*time.Millisecond))
	if err != nil {
		return Line{}, err
	}
	defer c.Close()
	l := Line{At: time.Now().UnixNano(), Peer: c.RemoteAddr().String()}
	_ = c.SetDeadline(time.Now().Add(3 * time.Second)) // reading the name
	name, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return l, fmt.Errorf("read server name from %s: %w", l.Peer, err)
	}
	l.Server = name[:len(name)-1]
	return l, nil
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
