package health

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

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
