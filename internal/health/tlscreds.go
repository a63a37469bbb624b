package health

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc/credentials"
)

// alpnTolerantTLS is gRPC client TLS that accepts a server which does not
// negotiate ALPN. grpc-go since 1.67 refuses such servers, and Consul's
// gRPC TLS port (1.20) is one: without this every TLS check of a Consul
// server would fail with "missing selected ALPN property". The certificate
// is verified exactly as crypto/tls does with the given config; only the
// ALPN requirement is dropped.
type alpnTolerantTLS struct {
	cfg *tls.Config
}

// TLSCredentials is gRPC client TLS with config c (cloned) that, unlike
// credentials.NewTLS, accepts a server that does not negotiate ALPN, such
// as Consul's gRPC TLS port. Test clients use it too.
func TLSCredentials(c *tls.Config) credentials.TransportCredentials {
	c = c.Clone()
	if len(c.NextProtos) == 0 {
		c.NextProtos = []string{"h2"}
	}
	return &alpnTolerantTLS{cfg: c}
}

func (a *alpnTolerantTLS) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cfg := a.cfg.Clone()
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(authority)
		if err != nil {
			host = authority
		}
		cfg.ServerName = host
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("tls handshake: %w", err)
	}
	info := credentials.TLSInfo{
		State:          conn.ConnectionState(),
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
	}
	return conn, info, nil
}

func (a *alpnTolerantTLS) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, fmt.Errorf("alpnTolerantTLS is client-side only")
}

func (a *alpnTolerantTLS) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (a *alpnTolerantTLS) Clone() credentials.TransportCredentials {
	return &alpnTolerantTLS{cfg: a.cfg.Clone()}
}

func (a *alpnTolerantTLS) OverrideServerName(name string) error {
	a.cfg.ServerName = name
	return nil
}

// TLSFiles is a client TLS config made from files and made again whenever
// one of them changes (a rotated certificate or CA is used from the next
// check on, without a reload). Build makes the config from the files.
type TLSFiles struct {
	Files []string
	Build func() (*tls.Config, error)

	mu    sync.Mutex
	stamp string
	cfg   *tls.Config
}

// Config gives the current config, rebuilt when a file's size or
// modification time moved since the last build.
func (f *TLSFiles) Config() (*tls.Config, error) {
	var b strings.Builder
	for _, p := range f.Files {
		if p == "" {
			continue
		}
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("tls file: %w", err)
		}
		fmt.Fprintf(&b, "%s:%d:%d;", p, st.Size(), st.ModTime().UnixNano())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cfg != nil && b.String() == f.stamp {
		return f.cfg, nil
	}
	cfg, err := f.Build()
	if err != nil {
		return nil, err
	}
	f.cfg, f.stamp = cfg, b.String()
	return cfg, nil
}

// clientTLS picks a check's TLS config: the files' current one, else the
// fixed one, else none (plaintext).
func clientTLS(files *TLSFiles, fixed *tls.Config) (*tls.Config, error) {
	if files != nil {
		return files.Config()
	}
	return fixed, nil
}
