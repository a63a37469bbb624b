package proxy

import (
	"log/slog"
	"sync"
	"time"
)

// DefaultRejectLogInterval is how often, at most, the proxy logs one kind
// of rejected connection (by service and reason); the ones in between are
// counted and the count rides on the next line. A flood of refused clients
// then costs a line per interval, not a line per connection; the metrics
// count every one.
const DefaultRejectLogInterval = 10 * time.Second

// rateLog logs at most one line per key and interval.
type rateLog struct {
	log   *slog.Logger
	every time.Duration
	mu    sync.Mutex
	keys  map[string]*rateEntry
}

type rateEntry struct {
	last       time.Time
	suppressed int
}

// maxRateKeys bounds the memory a storm of distinct keys (clients dialing
// ever new addresses) can take; past it, stale keys are dropped.
const maxRateKeys = 4096

func newRateLog(log *slog.Logger, every time.Duration) *rateLog {
	return &rateLog{log: log, every: every, keys: map[string]*rateEntry{}}
}

// warn logs msg unless a line with the same key went out less than an
// interval ago; then it only counts it.
func (r *rateLog) warn(key, msg string, args ...any) {
	now := time.Now()
	r.mu.Lock()
	e := r.keys[key]
	if e == nil {
		if len(r.keys) >= maxRateKeys {
			for k, old := range r.keys {
				if now.Sub(old.last) >= r.every {
					delete(r.keys, k)
				}
			}
		}
		e = &rateEntry{}
		r.keys[key] = e
	}
	if !e.last.IsZero() && now.Sub(e.last) < r.every {
		e.suppressed++
		r.mu.Unlock()
		return
	}
	n := e.suppressed
	e.last, e.suppressed = now, 0
	r.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n, "over", r.every)
	}
	r.log.Warn(msg, args...)
}
