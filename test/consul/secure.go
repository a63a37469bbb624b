package consul

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink"
)

// Ports of a Secure cluster: HTTPS and gRPC over TLS; the plaintext ports
// are off.
const (
	HTTPSPort   = 8501
	GRPCTLSPort = 8503
)

// ServerName is the name in every server certificate, as Consul's own CA
// layout has it ("server.<datacenter>.<domain>"); clients that dial servers
// by address check this name.
const ServerName = "server.dc1.consul"

// pki is a test CA made with crypto/x509, whose files the servers and the
// code under test read.
type pki struct {
	dir    string
	caFile string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	pool   *x509.CertPool
}

func newPKI(dir string) (*pki, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ctlb test consul CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, caFile: filepath.Join(dir, "ca.pem"), caCert: cert, caKey: key, pool: x509.NewCertPool()}
	p.pool.AddCert(cert)
	if err := writePEM(p.caFile, "CERTIFICATE", der); err != nil {
		return nil, err
	}
	return p, nil
}

// serverCert writes a certificate for a server at addr (server and client
// auth: servers verify each other on internal RPC) and returns the files.
func (p *pki) serverCert(name string, addr netip.Addr, serial int64) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: ServerName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{ServerName, "localhost"},
		IPAddresses:  []net.IP{addr.AsSlice(), net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return "", "", fmt.Errorf("certificate for %s: %w", name, err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile = filepath.Join(p.dir, name+".pem")
	keyFile = filepath.Join(p.dir, name+"-key.pem")
	if err := writePEM(certFile, "CERTIFICATE", der); err != nil {
		return "", "", err
	}
	if err := writePEM(keyFile, "EC PRIVATE KEY", kb); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// newToken makes a random ACL token in Consul's UUID form.
func newToken() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// secureHTTPClient trusts the test CA (and checks ServerName).
func secureHTTPClient(p *pki) *http.Client {
	return &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: p.pool, ServerName: ServerName},
		},
	}
}

// secureConf adds TLS (HTTPS, gRPC TLS, verified internal RPC) and ACLs
// (default deny, the management token as the agents' token) to a server's
// config.
func (c *Cluster) secureConf(s *Server, conf map[string]any) error {
	c.mu.Lock()
	serial := int64(len(c.servers) + 10)
	c.mu.Unlock()
	cert, key, err := c.pki.serverCert(s.Name, s.Addr, serial)
	if err != nil {
		return err
	}
	conf["ports"] = map[string]any{"http": -1, "https": HTTPSPort, "grpc": -1, "grpc_tls": GRPCTLSPort, "dns": -1}
	conf["tls"] = map[string]any{
		"defaults": map[string]any{
			"ca_file": c.pki.caFile, "cert_file": cert, "key_file": key,
			"verify_incoming": false, "verify_outgoing": true,
		},
		"internal_rpc": map[string]any{"verify_incoming": true, "verify_server_hostname": true},
	}
	conf["acl"] = map[string]any{
		"enabled": true, "default_policy": "deny", "down_policy": "extend-cache",
		"enable_token_persistence": true,
		"tokens":                   map[string]any{"initial_management": c.Token, "agent": c.Token},
	}
	return nil
}

// setupSecure makes the CA and the bootstrap token before any server.
func (c *Cluster) setupSecure() {
	p, err := newPKI(c.dir)
	if err != nil {
		c.t.Fatalf("test CA: %v", err)
	}
	tok, err := newToken()
	if err != nil {
		c.t.Fatal(err)
	}
	c.secure, c.pki, c.CAFile, c.Token = true, p, p.caFile, tok
	c.TokenFile = filepath.Join(c.dir, "bootstrap-token")
	if err := os.WriteFile(c.TokenFile, []byte(tok+"\n"), 0o600); err != nil {
		c.t.Fatal(err)
	}
	c.http = secureHTTPClient(p)
}

// AddHostAddr puts one more address of the cluster's subnet (.host) on the
// host-side link, for test servers that the catalog names and that code in
// the test process must reach (a loopback address in the catalog is
// another host's loopback, which ctlbd rightly leaves out). It goes with
// the link.
func (c *Cluster) AddHostAddr(host byte) netip.Addr {
	c.t.Helper()
	a := c.ipAt(host)
	l, err := netlink.LinkByName(c.hostLink)
	if err != nil {
		c.t.Fatalf("host link %s: %v", c.hostLink, err)
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: prefixNet(a, 32)}); err != nil {
		c.t.Fatalf("address %s on %s: %v", a, c.hostLink, err)
	}
	return a
}
