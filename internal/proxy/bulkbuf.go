package proxy

import (
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// bulkRcvBuf is the receive buffer a direction's source socket gets once the
// direction turns bulk (splice). Left to itself, the kernel's receive
// autotuning grows a fast stream's buffer towards tcp_rmem's maximum (32
// MiB on recent kernels): the bytes then wait in memory long enough to leave
// the CPU caches before the far side's receiver copies them, and every byte
// costs a cache miss more. A fixed buffer of this size (the kernel doubles
// it for its overhead) keeps them in cache and still covers the
// bandwidth-delay product of any path up to bulkMaxRTT at 64 Gbit/s.
// Measured with the bench's bulk rows (make bench, docs/BENCHMARKS.md): the
// splice proxy moved 15-20% more Gbit/s with 1 and with 4 streams.
const bulkRcvBuf = 4 << 20

// bulkMaxRTT bounds the paths that get bulkRcvBuf: on a longer one a fixed
// buffer would cap the stream below what autotuning reaches.
const bulkMaxRTT = time.Millisecond

// bulkRcvBufFor is bulkRcvBuf if the system lets a socket have it without
// privileges (net.core.rmem_max), else 0: a buffer clamped below it would
// stop autotuning and leave the stream with less than it would grow to.
func bulkRcvBufFor(rmemMax string) int {
	b, err := os.ReadFile(rmemMax)
	if err != nil {
		return 0
	}
	max, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || max < bulkRcvBuf {
		return 0
	}
	return bulkRcvBuf
}

// fixBulkBuffer gives the source socket of a direction that turned bulk its
// fixed receive buffer, when the path is short. Best effort: a socket that
// refuses keeps autotuning.
func (p *Proxy) fixBulkBuffer(fd int) {
	if p.bulkRcvBuf == 0 {
		return
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil || time.Duration(info.Rtt)*time.Microsecond > bulkMaxRTT {
		return
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, p.bulkRcvBuf)
}
