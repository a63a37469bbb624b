package proxy

import (
	"runtime"
	"sync"
)

// A loop spends most of its life blocked in epoll_wait on a thread of its
// own, and a goroutine in a system call keeps its P (the runtime's licence
// to run Go code) only while the runtime sees no better use for it: when no
// P is idle, sysmon takes the P of a thread that has been in a system call
// for more than 20 µs and hands it to another thread, which finds nothing
// to do and sleeps again, and the loop must win a P back when epoll_wait
// returns. With GOMAXPROCS loops that is every wake-up of every loop: a
// futex wake-up of another thread, sysmon ticking every 20 µs instead of
// sleeping, and now and then the locked goroutine handed from one thread to
// another, on the path of every byte the proxy forwards (perf stat of the
// proxy at one client: 0.13 futex and 0.11 nanosleep calls per round trip,
// against HAProxy's none). With one P more per loop there is always an idle
// P, so sysmon leaves a P in a system call alone (for up to 10 ms), the
// loop's thread keeps its P across epoll_wait, and the rest of the program
// keeps the Ps it had.
var procs struct {
	mu    sync.Mutex
	added int // by the proxies alive
}

// baseProcs is GOMAXPROCS without what proxies added.
func baseProcs() int {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	return max(1, runtime.GOMAXPROCS(0)-procs.added)
}

// reserveProcs adds n Ps for n loops.
func reserveProcs(n int) {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + n)
	procs.added += n
}

// releaseProcs gives back what reserveProcs(n) added.
func releaseProcs(n int) {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	n = min(n, procs.added)
	procs.added -= n
	runtime.GOMAXPROCS(max(1, runtime.GOMAXPROCS(0)-n))
}
