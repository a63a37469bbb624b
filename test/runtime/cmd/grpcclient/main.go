// Command grpcclient runs inside a test container and makes real gRPC calls
// to Consul servers through a VIP, one call per fresh connection, printing
// one JSON line per call: which server really answered and what it said.
//
// The call is Consul's own ServerDiscoveryService.WatchServers (the first
// answer of the stream: the servers the answering server knows as ready),
// or, with -rpc features, DataplaneService.GetSupportedDataplaneFeatures.
// Consul 1.20 does not serve grpc.health.v1 on its gRPC port.
//
// Which server answered comes from the kernel's socket table
// (/proc/net/tcp, found by the socket's inode), not from getpeername: ctlb
// rewrites getpeername of a redirected socket back to the VIP, so the
// address gRPC reports as the peer is the VIP. Both are printed.
//
// It calls every -interval until -count calls, -deadline, or SIGTERM (a
// CRI StopContainer), whichever comes first: every loop is bounded.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ctlb/ctlb/internal/health"
	"github.com/hashicorp/consul/proto-public/pbdataplane"
	"github.com/hashicorp/consul/proto-public/pbserverdiscovery"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// Line is one call's report; the test decodes the same shape.
type Line struct {
	N int `json:"n"`
	// Start and End are the wall clock, in Unix nanoseconds, when the
	// call began (before the connection) and when it ended: the kernel
	// clock is shared with the test.
	Start int64 `json:"start"`
	End   int64 `json:"end"`
	// Server is the real remote address of the connection, from the
	// kernel's socket table; Peer is what getpeername (gRPC's peer) says.
	Server string `json:"server,omitempty"`
	Peer   string `json:"peer,omitempty"`
	// Answer is what the server said: the ready servers ("id@address")
	// for WatchServers, the feature names for GetSupportedDataplaneFeatures.
	Answer []string `json:"answer,omitempty"`
	Err    string   `json:"err,omitempty"`
	Done   bool     `json:"done,omitempty"`
}

func main() {
	target := flag.String("target", "", "address to call, IP:PORT (the VIP)")
	rpc := flag.String("rpc", "watchservers", `"watchservers" (ServerDiscoveryService.WatchServers) or "features" (DataplaneService.GetSupportedDataplaneFeatures)`)
	count := flag.Int("count", 1000, "calls to make at most (1-100000)")
	interval := flag.Duration("interval", 100*time.Millisecond, "pause between calls")
	timeout := flag.Duration("timeout", 10*time.Second, "bound of one call, connection included")
	deadline := flag.Duration("deadline", 2*time.Minute, "stop calling after this long")
	caPEM := flag.String("tls-ca-pem", "", "speak TLS, trusting this PEM CA (the text itself: a container has no files of the test)")
	serverName := flag.String("tls-server-name", "", "name expected in the server certificate (with -tls-ca-pem)")
	token := flag.String("token", "", "ACL token sent as x-consul-token (test clusters only)")
	flag.Parse()
	if *target == "" || *count < 1 || *count > 100000 || (*rpc != "watchservers" && *rpc != "features") || *interval < time.Millisecond {
		fmt.Fprintln(os.Stderr, "usage: grpcclient -target IP:PORT [-rpc watchservers|features] [-count N] [-interval D] [-timeout D] [-deadline D]")
		os.Exit(2)
	}
	creds := insecure.NewCredentials()
	if *caPEM != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(*caPEM)) {
			fmt.Fprintln(os.Stderr, "grpcclient: -tls-ca-pem holds no PEM certificate")
			os.Exit(2)
		}
		// Consul's gRPC TLS port negotiates no ALPN, which grpc-go's own
		// TLS refuses; ctlb's health check credentials accept it.
		creds = health.TLSCredentials(&tls.Config{RootCAs: pool, ServerName: *serverName})
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *deadline)
	defer cancel()
	enc := json.NewEncoder(os.Stdout)
	if *token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-consul-token", *token)
	}
	for n := 0; n < *count && ctx.Err() == nil; n++ {
		l := call(ctx, *target, *rpc, *timeout, creds)
		if l.Err != "" && ctx.Err() != nil {
			break // cut short by the stop signal or -deadline: no verdict on the server
		}
		l.N = n
		_ = enc.Encode(l)
		select {
		case <-ctx.Done():
		case <-time.After(*interval):
		}
	}
	_ = enc.Encode(Line{Done: true, End: time.Now().UnixNano()})
}

// call makes one call on a connection of its own and closes it.
func call(parent context.Context, target, rpc string, timeout time.Duration, creds credentials.TransportCredentials) (l Line) {
	l.Start = time.Now().UnixNano()
	defer func() { l.End = time.Now().UnixNano() }()
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	d := &recordingDialer{}
	conn, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(d.dial))
	if err != nil {
		l.Err = err.Error()
		return l
	}
	defer conn.Close()
	var p peer.Peer
	switch rpc {
	case "watchservers":
		l.Answer, err = watchServers(ctx, conn, &p)
	default:
		l.Answer, err = features(ctx, conn, &p)
	}
	if p.Addr != nil {
		l.Peer = p.Addr.String()
	}
	// Read the socket table while the connection is still open.
	if c := d.last(); c != nil {
		s, perr := realRemote(c)
		if perr != nil && err == nil {
			err = perr
		}
		l.Server = s
	}
	if err != nil {
		l.Err = err.Error()
		l.Answer = nil
	}
	if d.count() > 1 {
		l.Err = strings.TrimSpace(l.Err + fmt.Sprintf(" (%d connections for one call)", d.count()))
	}
	return l
}

func watchServers(ctx context.Context, conn *grpc.ClientConn, p *peer.Peer) ([]string, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream after its first answer
	st, err := pbserverdiscovery.NewServerDiscoveryServiceClient(conn).WatchServers(ctx, &pbserverdiscovery.WatchServersRequest{}, grpc.Peer(p))
	if err != nil {
		return nil, fmt.Errorf("WatchServers: %w", err)
	}
	resp, err := st.Recv()
	if err != nil {
		return nil, fmt.Errorf("WatchServers: %w", err)
	}
	if pr, ok := peer.FromContext(st.Context()); ok {
		*p = *pr
	}
	var out []string
	for _, s := range resp.GetServers() {
		out = append(out, s.GetId()+"@"+s.GetAddress())
	}
	return out, nil
}

func features(ctx context.Context, conn *grpc.ClientConn, p *peer.Peer) ([]string, error) {
	resp, err := pbdataplane.NewDataplaneServiceClient(conn).GetSupportedDataplaneFeatures(ctx, &pbdataplane.GetSupportedDataplaneFeaturesRequest{}, grpc.Peer(p))
	if err != nil {
		return nil, fmt.Errorf("GetSupportedDataplaneFeatures: %w", err)
	}
	var out []string
	for _, f := range resp.GetSupportedDataplaneFeatures() {
		out = append(out, f.GetFeatureName().String())
	}
	return out, nil
}

// recordingDialer dials TCP and keeps the connections it made, so the call
// can look up the real remote of its socket.
type recordingDialer struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (d *recordingDialer) dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.conns = append(d.conns, c)
	d.mu.Unlock()
	return c, nil
}

func (d *recordingDialer) last() net.Conn {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.conns) == 0 {
		return nil
	}
	return d.conns[len(d.conns)-1]
}

func (d *recordingDialer) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns)
}

// realRemote finds the connection's socket in /proc/net/tcp by its inode
// and returns the remote address the kernel connected it to.
func realRemote(c net.Conn) (string, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return "", fmt.Errorf("connection is a %T, not TCP", c)
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return "", err
	}
	var st syscall.Stat_t
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = syscall.Fstat(int(fd), &st) }); err != nil {
		return "", err
	}
	if serr != nil {
		return "", fmt.Errorf("fstat socket: %w", serr)
	}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return "", err
	}
	defer f.Close()
	ino := strconv.FormatUint(st.Ino, 10)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[9] != ino {
			continue
		}
		return parseProcAddr(fields[2])
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("socket inode %s not in /proc/net/tcp", ino)
}

// parseProcAddr reads "0B0013C6:2136": the address is the 32-bit value in
// the kernel's byte order, the port in host order.
func parseProcAddr(s string) (string, error) {
	hexIP, hexPort, ok := strings.Cut(s, ":")
	b, err := hex.DecodeString(hexIP)
	if !ok || err != nil || len(b) != 4 {
		return "", fmt.Errorf("/proc/net/tcp address %q", s)
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return "", fmt.Errorf("/proc/net/tcp port %q: %w", s, err)
	}
	var ip [4]byte
	binary.NativeEndian.PutUint32(ip[:], binary.BigEndian.Uint32(b))
	return netip.AddrPortFrom(netip.AddrFrom4(ip), uint16(port)).String(), nil
}
