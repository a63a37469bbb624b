package discovery

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// stubConsul is an HTTP server on 127.0.0.1 that plays a misbehaving
// Consul: it answers every request at once, whatever the index, and
// records what it was sent.
type stubConsul struct {
	srv *http.Server
	url string

	mu      sync.Mutex
	reqs    []time.Time
	tokens  []string
	handler http.HandlerFunc
}

func newStubConsul(t *testing.T, h http.HandlerFunc) *stubConsul {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &stubConsul{url: "http://" + ln.Addr().String(), handler: h}
	s.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.reqs = append(s.reqs, time.Now())
		s.tokens = append(s.tokens, r.Header.Get("X-Consul-Token"))
		h := s.handler
		s.mu.Unlock()
		h(w, r)
	})}
	go s.srv.Serve(ln)
	t.Cleanup(func() { s.srv.Close() })
	return s
}

func (s *stubConsul) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.reqs)
}

func (s *stubConsul) seenTokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.tokens...)
}

// instantAnswer is a passing "consul" service with one instance and an
// index that never moves: a blocking query that returns at once.
func instantAnswer(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("X-Consul-Index", "42")
	w.Header().Set("Content-Type", "application/json")
	w.Write([]byte(`[{"Node":{"Node":"s1","Address":"198.18.9.1"},"Service":{"ID":"consul","Service":"consul","Address":""}}]`))
}

// TestConsulQueriesBounded: against a server that answers every blocking
// query at once with the same index, and one that answers only errors, the
// source stays at a handful of requests per second; error text is cut
// short.
func TestConsulQueriesBounded(t *testing.T) {
	t.Parallel()
	const window = 4 * time.Second
	// At most 2/s by the minimum interval (500 ms plus jitter), plus the
	// first request; "a handful" leaves room for a slow machine's skew.
	const most = 2*4 + 2

	t.Run("instant", func(t *testing.T) {
		t.Parallel()
		stub := newStubConsul(t, instantAnswer)
		c := run(t, Consul{Address: stub.url})
		c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.9.1:8502"))
		start, counted := stub.count(), ConsulRequests()
		time.Sleep(window)
		n := stub.count() - start
		// The metric counts them too (other tests' requests as well).
		if got := ConsulRequests() - counted; got < uint64(n) {
			t.Errorf("ConsulRequests moved by %d, the stub saw %d", got, n)
		}
		t.Logf("instant answers: %d requests in %s (%.1f/s)", n, window, float64(n)/window.Seconds())
		if n > most {
			t.Fatalf("%d requests in %s: a tight loop (at most %d expected)", n, window, most)
		}
		if n == 0 {
			t.Fatal("no request at all: the source stopped watching")
		}
	})

	t.Run("errors", func(t *testing.T) {
		t.Parallel()
		big := strings.Repeat("<html>proxy error</html>", 10000)
		stub := newStubConsul(t, func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, big, http.StatusInternalServerError)
		})
		c := run(t, Consul{Address: stub.url})
		_, err := c.waitErr(t, 0, 5*time.Second)
		if len(err.Error()) > MaxErrorText+200 {
			t.Fatalf("error of %d bytes: the body was not cut short", len(err.Error()))
		}
		t.Logf("error: %.200s...", err)
		time.Sleep(window)
		n := stub.count()
		t.Logf("error answers: %d requests in %s", n, window+time.Second)
		// Back-off 1 s, 2 s, 4 s (+ jitter): about 3 in the window.
		if n > 5 {
			t.Fatalf("%d requests to a failing server in %s: no back-off", n, window)
		}
	})
}

// TestConsulTokenFile: the token file is read before every query (a
// rotated token is used at once), and a redirect to another host is
// refused, so the token never leaves for it.
func TestConsulTokenFile(t *testing.T) {
	t.Parallel()
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, []byte("first-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stub := newStubConsul(t, instantAnswer)
	c := run(t, Consul{Address: stub.url, TokenFile: tokFile, MinInterval: 100 * time.Millisecond})
	c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.9.1:8502"))
	if err := os.WriteFile(tokFile, []byte("second-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		toks := stub.seenTokens()
		if toks[0] != "first-token" {
			t.Fatalf("first token sent: %q", toks[0])
		}
		if toks[len(toks)-1] == "second-token" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotated token was not used within 5s; tokens sent: %q", toks[len(toks)-1])
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A redirect to another host (127.0.0.2) is refused: that host never
	// sees a request, let alone the token.
	other := newStubConsulOn(t, "127.0.0.2:0", instantAnswer)
	redirector := newStubConsul(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.url+r.URL.RequestURI(), http.StatusTemporaryRedirect)
	})
	rc := run(t, Consul{Address: redirector.url, TokenFile: tokFile})
	_, err := rc.waitErr(t, 0, 5*time.Second)
	t.Logf("redirect: %v", err)
	if !strings.Contains(err.Error(), "redirect") {
		t.Errorf("error %q does not say the redirect was refused", err)
	}
	if n := other.count(); n != 0 {
		t.Fatalf("the other host got %d requests (tokens %q)", n, other.seenTokens())
	}
}

func newStubConsulOn(t *testing.T, addr string, h http.HandlerFunc) *stubConsul {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &stubConsul{url: "http://" + ln.Addr().String(), handler: h}
	s.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.reqs = append(s.reqs, time.Now())
		s.tokens = append(s.tokens, r.Header.Get("X-Consul-Token"))
		s.mu.Unlock()
		h(w, r)
	})}
	go s.srv.Serve(ln)
	t.Cleanup(func() { s.srv.Close() })
	return s
}

// TestConsulSharedWatch: sources with the same query share one watch, one
// blocking query, whatever their ports.
func TestConsulSharedWatch(t *testing.T) {
	t.Parallel()
	stub := newStubConsul(t, instantAnswer)
	var cs []*collector
	for i := range 5 {
		cs = append(cs, run(t, Consul{Address: stub.url, Port: uint16(7000 + i)}))
	}
	for i, c := range cs {
		c.waitServers(t, 0, 5*time.Second, aps(t, "198.18.9.1:"+[]string{"7000", "7001", "7002", "7003", "7004"}[i]))
	}
	start := stub.count()
	time.Sleep(2 * time.Second)
	n := stub.count() - start
	t.Logf("5 sources, one query: %d requests in 2s", n)
	if n > 6 {
		t.Fatalf("%d requests in 2s for 5 sources of one query: the watch is not shared", n)
	}
}

// TestConsulLoopbackOfAnotherHost: a catalog instance on a loopback address
// is kept only when it is the node of the agent asked over loopback; on
// any other node it is that host's own loopback, and is rejected with the
// reason.
func TestConsulLoopbackOfAnotherHost(t *testing.T) {
	t.Parallel()
	stub := newStubConsul(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/agent/self" {
			w.Write([]byte(`{"Config":{"NodeName":"local"}}`))
			return
		}
		w.Header().Set("X-Consul-Index", "7")
		w.Write([]byte(`[{"Node":{"Node":"local","Address":"127.0.0.1"},"Service":{"ID":"a"}},
			{"Node":{"Node":"remote","Address":"127.0.0.1"},"Service":{"ID":"b"}},
			{"Node":{"Node":"remote2","Address":"198.18.9.2"},"Service":{"ID":"c","Address":"::ffff:198.18.9.3"}},
			{"Node":{"Node":"bad","Address":"consul-2.example"},"Service":{"ID":"d"}}]`))
	})
	c := run(t, Consul{Address: stub.url, Port: 8503})
	r, _ := c.waitFor(t, 0, 5*time.Second, "a list", func(r Result) bool { return r.Err == nil })
	if want := aps(t, "127.0.0.1:8503", "198.18.9.3:8503"); !slices.Equal(Normalize(r.Servers), want) {
		t.Fatalf("servers %v, want %v", r.Servers, want)
	}
	if len(r.Rejected) != 2 || !strings.Contains(r.Rejected[0].Reason, "loopback address of another host") ||
		!strings.Contains(r.Rejected[1].Reason, "not an IP address") {
		t.Fatalf("rejected %+v", r.Rejected)
	}
	t.Logf("rejected: %+v", r.Rejected)
}

// TestConsulEnvironment: the standard CONSUL_* variables fill what the
// config leaves unset, and never override what it sets.
func TestConsulEnvironment(t *testing.T) {
	t.Setenv(EnvHTTPAddr, "198.18.9.1:8501")
	t.Setenv(EnvHTTPTokenFile, "/run/consul/token")
	t.Setenv(EnvCACert, "/run/consul/ca.pem")
	t.Setenv(EnvClientCert, "/run/consul/cert.pem")
	t.Setenv(EnvClientKey, "/run/consul/key.pem")
	t.Setenv(EnvTLSServerName, "server.dc1.consul")
	got := Consul{}.Resolved()
	want := TLS{CAFile: "/run/consul/ca.pem", CertFile: "/run/consul/cert.pem", KeyFile: "/run/consul/key.pem", ServerName: "server.dc1.consul"}
	if got.Address != "http://198.18.9.1:8501" || got.TokenFile != "/run/consul/token" || got.TLS != want {
		t.Fatalf("from the environment: %+v", got)
	}
	set := Consul{Address: "https://198.18.9.2:8501", Token: "inline", TLS: TLS{CAFile: "/etc/ca.pem", ServerName: "x"}}.Resolved()
	if set.Address != "https://198.18.9.2:8501" || set.TokenFile != "" || set.TLS.CAFile != "/etc/ca.pem" || set.TLS.ServerName != "x" || set.TLS.CertFile != "/run/consul/cert.pem" {
		t.Fatalf("config wins over the environment: %+v", set)
	}
}
