package daemon

import (
	"log/slog"
	"net/http"
	"time"
)

// logRequests logs every control API request at debug: method, path, the
// peer's uid, the status answered and how long it took. Neither bodies nor
// headers are logged: the path is all an operator needs to match a CLI
// call, and nothing else a client sends belongs in a log.
func logRequests(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if !log.Enabled(req.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, req)
			return
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, req)
		attrs := []any{"method", req.Method, "path", req.URL.Path}
		if p, _ := req.Context().Value(peerKey{}).(peer); p.err == nil {
			attrs = append(attrs, "uid", p.uid)
		} else {
			attrs = append(attrs, "peerError", p.err.Error())
		}
		status := sw.status
		if status == 0 {
			status = http.StatusOK // nothing written: net/http answers 200
		}
		attrs = append(attrs, "status", status, "duration", time.Since(start).Round(time.Microsecond))
		log.Debug("control API request", attrs...)
	})
}

// statusWriter remembers the status a handler answered with.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
