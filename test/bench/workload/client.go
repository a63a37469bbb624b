// Package workload is the benchmark's traffic: the client side (connection
// rate, request/response latency, bulk throughput) and the servers it talks
// to (echo and source). Every loop is bounded by a deadline and a count.
package workload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Kinds of measurement.
const (
	// KindRate opens a connection, sends one request, reads the reply
	// and closes, over and over, from Conns workers at once.
	KindRate = "rate"
	// KindLatency times request/reply round trips on one kept connection.
	KindLatency = "latency"
	// KindBulk reads from Conns source streams at once.
	KindBulk = "bulk"
)

// MessageSize is the size of a request and of its reply.
const MessageSize = 64

// Limits that hold whatever a request asks for.
const (
	MaxDuration = 30 * time.Second
	MaxOps      = 5_000_000
	maxConns    = 1024
	dialTimeout = 2 * time.Second
)

// Request is one measurement for a client to make.
type Request struct {
	Kind string `json:"kind"`
	// Targets are dialed in turn, one per connection ("IP:PORT").
	Targets  []string      `json:"targets"`
	Conns    int           `json:"conns"`
	Duration time.Duration `json:"duration"`
	// MaxOps bounds connections (rate) or round trips (latency); 0 means
	// MaxOps.
	MaxOps int `json:"maxOps"`
}

// Result is what a client measured.
type Result struct {
	Ops     int64         `json:"ops"`
	Errors  int64         `json:"errors"`
	Err     string        `json:"err,omitempty"` // the first error seen
	Elapsed time.Duration `json:"elapsed"`
	Bytes   int64         `json:"bytes"`
	P50     time.Duration `json:"p50"`
	P99     time.Duration `json:"p99"`
}

// PerSecond is operations per second of elapsed time.
func (r Result) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Ops) / r.Elapsed.Seconds()
}

// Gbps is the bulk throughput in Gbit/s.
func (r Result) Gbps() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Bytes) * 8 / r.Elapsed.Seconds() / 1e9
}

func (q Request) check() error {
	if len(q.Targets) == 0 {
		return errors.New("no targets")
	}
	if q.Duration <= 0 || q.Duration > MaxDuration {
		return fmt.Errorf("duration %s: want (0, %s]", q.Duration, MaxDuration)
	}
	if q.Conns < 0 || q.Conns > maxConns {
		return fmt.Errorf("conns %d: want [0, %d]", q.Conns, maxConns)
	}
	return nil
}

// Run makes one measurement.
func Run(ctx context.Context, q Request) Result {
	if err := q.check(); err != nil {
		return Result{Errors: 1, Err: err.Error()}
	}
	if q.MaxOps <= 0 || q.MaxOps > MaxOps {
		q.MaxOps = MaxOps
	}
	q.Conns = max(q.Conns, 1)
	ctx, cancel := context.WithTimeout(ctx, q.Duration+5*time.Second)
	defer cancel()
	switch q.Kind {
	case KindRate:
		return rate(ctx, q)
	case KindLatency:
		return latency(ctx, q)
	case KindBulk:
		return bulk(ctx, q)
	}
	return Result{Errors: 1, Err: fmt.Sprintf("unknown kind %q", q.Kind)}
}

// errs keeps a count and the first error.
type errs struct {
	n     atomic.Int64
	mu    sync.Mutex
	first error
}

func (e *errs) add(err error) {
	if e.n.Add(1) == 1 {
		e.mu.Lock()
		e.first = err
		e.mu.Unlock()
	}
}

func (e *errs) fill(r *Result) {
	r.Errors = e.n.Load()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.first != nil {
		r.Err = e.first.Error()
	}
}

func dial(ctx context.Context, target string) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, "tcp4", target)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// exchange sends one request and reads its whole reply.
func exchange(c net.Conn, req, resp []byte) error {
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, resp); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	return nil
}

func rate(ctx context.Context, q Request) Result {
	var (
		ops, next atomic.Int64
		e         errs
		wg        sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(q.Duration)
	for range q.Conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, resp := make([]byte, MessageSize), make([]byte, MessageSize)
			for ctx.Err() == nil && time.Now().Before(deadline) {
				n := next.Add(1)
				if n > int64(q.MaxOps) {
					return
				}
				target := q.Targets[int(n)%len(q.Targets)]
				c, err := dial(ctx, target)
				if err != nil {
					e.add(fmt.Errorf("dial %s: %w", target, err))
					continue
				}
				_ = c.SetDeadline(time.Now().Add(dialTimeout))
				err = exchange(c, req, resp)
				c.Close()
				if err != nil {
					e.add(fmt.Errorf("%s: %w", target, err))
					continue
				}
				ops.Add(1)
			}
		}()
	}
	wg.Wait()
	r := Result{Ops: ops.Load(), Elapsed: time.Since(start)}
	e.fill(&r)
	return r
}

func latency(ctx context.Context, q Request) Result {
	target := q.Targets[0]
	c, err := dial(ctx, target)
	if err != nil {
		return Result{Errors: 1, Err: fmt.Sprintf("dial %s: %v", target, err)}
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(q.Duration + dialTimeout))
	req, resp := make([]byte, MessageSize), make([]byte, MessageSize)
	// Warm up: the first round trips pay for page faults and slow paths.
	for range 200 {
		if err := exchange(c, req, resp); err != nil {
			return Result{Errors: 1, Err: fmt.Sprintf("%s: %v", target, err)}
		}
	}
	samples := make([]time.Duration, 0, 1<<16)
	start := time.Now()
	deadline := start.Add(q.Duration)
	var r Result
	for len(samples) < q.MaxOps && ctx.Err() == nil {
		t0 := time.Now()
		if !t0.Before(deadline) {
			break
		}
		if err := exchange(c, req, resp); err != nil {
			r.Errors, r.Err = 1, fmt.Sprintf("%s: %v", target, err)
			break
		}
		samples = append(samples, time.Since(t0))
	}
	r.Elapsed = time.Since(start)
	r.Ops = int64(len(samples))
	if len(samples) > 0 {
		slices.Sort(samples)
		r.P50 = samples[len(samples)/2]
		r.P99 = samples[len(samples)*99/100]
	}
	return r
}

func bulk(ctx context.Context, q Request) Result {
	var e errs
	conns := make([]*net.TCPConn, 0, q.Conns)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range q.Conns {
		target := q.Targets[i%len(q.Targets)]
		c, err := dial(ctx, target)
		if err != nil {
			return Result{Errors: 1, Err: fmt.Sprintf("dial %s: %v", target, err)}
		}
		conns = append(conns, c)
	}
	// Every stream has delivered its first bytes before the clock starts:
	// the figure is the streams' rate, not how soon a proxy dials out (a
	// loaded machine may take longer than a short measurement to get there).
	first := make([]byte, 256<<10)
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(dialTimeout))
		if _, err := c.Read(first); err != nil {
			return Result{Errors: 1, Err: fmt.Sprintf("%s: first read: %v", c.RemoteAddr(), err)}
		}
	}
	var (
		total atomic.Int64
		wg    sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(q.Duration)
	for _, c := range conns {
		_ = c.SetReadDeadline(deadline)
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 256<<10)
			for ctx.Err() == nil {
				n, err := c.Read(buf)
				total.Add(int64(n))
				if err != nil {
					if !errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(deadline) {
						e.add(fmt.Errorf("%s: read: %w", c.RemoteAddr(), err))
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	r := Result{Ops: int64(len(conns)), Bytes: total.Load(), Elapsed: time.Since(start)}
	e.fill(&r)
	return r
}
