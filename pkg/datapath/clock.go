package datapath

import "golang.org/x/sys/unix"

// monotonicNow is bpf_ktime_get_ns()'s clock (CLOCK_MONOTONIC) in ns.
func monotonicNow() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return uint64(ts.Nano())
}
