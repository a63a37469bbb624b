package health

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/hashicorp/consul/proto-public/pbserverdiscovery"
	"google.golang.org/grpc/metadata"
)

// Consul checks a Consul server's gRPC port (8502 plaintext, 8503 TLS) the
// way a consul-dataplane or Envoy uses it: it opens
// ServerDiscoveryService.WatchServers and needs the first answer to list at
// least one ready server. A server only has that list once it has joined a
// cluster with a leader (autopilot publishes it), so a server that has just
// opened its port, or one cut off from the others, stays out of the set.
// Consul 1.20's gRPC port has no grpc.health.v1 service, so the plain grpc
// check cannot be used on it.
//
// With ACLs on, WatchServers needs a valid token (any token that resolves;
// anonymous is refused): TokenFile is read at every check, so a rotated
// token is used at once.
type Consul struct {
	// TLS, when set, makes the check speak TLS with this client config;
	// TLSFiles, when set, with the config of files it follows.
	TLS      *tls.Config
	TLSFiles *TLSFiles
	// TokenFile holds the ACL token; Token is an inline one.
	TokenFile string
	Token     string
}

// Kind implements Checker.
func (Consul) Kind() string { return "consul" }

func (c Consul) token() (string, error) {
	if c.TokenFile == "" {
		return c.Token, nil
	}
	b, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return "", fmt.Errorf("consul check token file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Check implements Checker.
func (c Consul) Check(ctx context.Context, addr netip.AddrPort) error {
	tok, err := c.token()
	if err != nil {
		return err
	}
	tc, err := clientTLS(c.TLSFiles, c.TLS)
	if err != nil {
		return fmt.Errorf("consul grpc %s: %w", addr, err)
	}
	conn, err := dialGRPC(addr, tc)
	if err != nil {
		return fmt.Errorf("consul grpc %s: %w", addr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream once the first answer is in
	if tok != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-consul-token", tok)
	}
	st, err := pbserverdiscovery.NewServerDiscoveryServiceClient(conn).WatchServers(ctx, &pbserverdiscovery.WatchServersRequest{})
	if err != nil {
		return fmt.Errorf("consul grpc %s WatchServers: %w", addr, err)
	}
	resp, err := st.Recv()
	if err != nil {
		return fmt.Errorf("consul grpc %s WatchServers: %w", addr, err)
	}
	if len(resp.GetServers()) == 0 {
		return errors.New("consul grpc " + addr.String() + " WatchServers: no ready server in the answer (not joined to a cluster with a leader)")
	}
	return nil
}
