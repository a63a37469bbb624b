package health

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// testCert makes a CA and a server certificate for name, and returns the
// server's certificate and a pool trusting the CA.
func testCert(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// TestGRPCTLS: the grpc check speaks TLS with the tls block's settings. It
// passes with the right CA and server name, and fails with another name,
// with no CA, or in plaintext. A server without ALPN (as Consul's gRPC TLS
// port) passes too.
func TestGRPCTLS(t *testing.T) {
	cert, pool := testCert(t, "server.dc1.consul")
	for _, alpn := range []bool{true, false} {
		sc := &tls.Config{Certificates: []tls.Certificate{cert}}
		if !alpn {
			// No ALPN: a raw TLS listener under a gRPC server that takes
			// the connections as they are.
			sc.NextProtos = nil
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var s *grpc.Server
		if alpn {
			s = grpc.NewServer(grpc.Creds(credentials.NewTLS(sc)))
		} else {
			s = grpc.NewServer()
			l = tls.NewListener(l, sc)
		}
		hs := grpchealth.NewServer()
		healthpb.RegisterHealthServer(s, hs)
		go func() { _ = s.Serve(l) }()
		t.Cleanup(s.Stop)
		addr := netip.MustParseAddrPort(l.Addr().String())
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		good := GRPC{TLS: &tls.Config{RootCAs: pool, ServerName: "server.dc1.consul"}}
		if err := good.Check(ctx, addr); err != nil {
			t.Errorf("alpn %v: right CA and name: %v", alpn, err)
		}
		if !alpn {
			// grpc-go's own TLS refuses this server: why TLSCredentials.
			conn, err := grpc.NewClient("passthrough:///"+addr.String(), grpc.WithTransportCredentials(credentials.NewTLS(good.TLS)))
			if err != nil {
				t.Fatal(err)
			}
			_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
			conn.Close()
			if err == nil || !strings.Contains(err.Error(), "ALPN") {
				t.Errorf("grpc-go's TLS against a server without ALPN: %v, want the ALPN refusal", err)
			}
		}
		for name, ck := range map[string]GRPC{
			"wrong name": {TLS: &tls.Config{RootCAs: pool, ServerName: "other.consul"}},
			"no CA":      {TLS: &tls.Config{ServerName: "server.dc1.consul"}},
			"plaintext":  {},
		} {
			err := ck.Check(ctx, addr)
			if err == nil {
				t.Errorf("alpn %v, %s: the check passed", alpn, name)
				continue
			}
			if name != "plaintext" && !strings.Contains(err.Error(), "certificate") {
				t.Errorf("alpn %v, %s: %v, want a certificate error", alpn, name, err)
			}
		}
		cancel()
	}
}

// TestTLSFilesFollowRotation: a check built on TLSFiles uses a rotated CA
// file from the next check on, with no new checker.
func TestTLSFilesFollowRotation(t *testing.T) {
	cert, pool := testCert(t, "server.dc1.consul")
	_, otherPool := testCert(t, "server.dc1.consul")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	hs := grpchealth.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	addr := netip.MustParseAddrPort(l.Addr().String())

	// The "file" holds which pool to trust; its content changes size so
	// the stamp moves even within one mtime tick.
	caFile := filepath.Join(t.TempDir(), "ca")
	write := func(s string) {
		if err := os.WriteFile(caFile, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("other")
	builds := 0
	tf := &TLSFiles{Files: []string{caFile}, Build: func() (*tls.Config, error) {
		builds++
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		p := otherPool
		if string(b) == "right-one" {
			p = pool
		}
		return &tls.Config{RootCAs: p, ServerName: "server.dc1.consul"}, nil
	}}
	ck := GRPC{TLSFiles: tf}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ck.Check(ctx, addr); err == nil {
		t.Fatal("the check passed with the wrong CA")
	}
	if err := ck.Check(ctx, addr); err == nil || builds != 1 {
		t.Fatalf("second check: %v, builds %d (want 1: unchanged files are not read again)", err, builds)
	}
	write("right-one")
	if err := ck.Check(ctx, addr); err != nil || builds != 2 {
		t.Fatalf("after the rotation: %v, builds %d", err, builds)
	}
}
