package testutil

import (
	"testing"
	"time"
)

// Eventually polls cond until it reports done or limit passes, and returns
// how long it took. cond also says what it saw, so a test that times out
// fails with the last state it observed, never with a bare timeout. Every
// test that waits for an event waits through this one function.
func Eventually(t testing.TB, what string, limit time.Duration, cond func() (done bool, seen string)) time.Duration {
	t.Helper()
	took, seen, ok := Poll(limit, cond)
	if !ok {
		t.Fatalf("%s: not within %v; last seen: %s", what, limit, seen)
	}
	return took
}

// Poll is Eventually without a test: it reports whether cond was done
// within limit, how long that took and what cond saw last. The poll
// interval starts at 1 ms and doubles up to 20 ms, so short waits are
// measured finely and long ones do not spin.
func Poll(limit time.Duration, cond func() (bool, string)) (time.Duration, string, bool) {
	start := time.Now()
	deadline := start.Add(limit)
	sleep := time.Millisecond
	for {
		done, seen := cond()
		if done {
			return time.Since(start), seen, true
		}
		if time.Now().After(deadline) {
			return time.Since(start), seen, false
		}
		time.Sleep(sleep)
		sleep = min(2*sleep, 20*time.Millisecond)
	}
}
