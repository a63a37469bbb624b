package api

import (
	"errors"
	"fmt"
	"net/http"
)

// Kinds of daemon answers a caller may act on. Match them with errors.Is:
// a *StatusError is each of these for its HTTP status.
var (
	// ErrUnreachable: the daemon could not be reached at all.
	ErrUnreachable = errors.New("ctlbd is not reachable")
	// ErrBadRequest (400): the request named a bad value; nothing changed.
	ErrBadRequest = errors.New("bad request")
	// ErrNotFound (404): the VIP or attachment is not there.
	ErrNotFound = errors.New("not found")
	// ErrConflict (409): the VIP is kept by config sources; the CLI may
	// not change it.
	ErrConflict = errors.New("conflict")
	// ErrTooLarge (413): the request was larger than MaxRequestBytes.
	ErrTooLarge = fmt.Errorf("request larger than %d bytes", MaxRequestBytes)
	// ErrUnavailable (503): the daemon cannot do it now (no cgroup v2,
	// the pending watcher stopped).
	ErrUnavailable = errors.New("unavailable")
)

// StatusError is a non-2xx answer: its HTTP status and the daemon's message.
type StatusError struct {
	Code    int
	Message string
}

func (e *StatusError) Error() string {
	if e.Message != "" {
		return e.Message
	}
	return fmt.Sprintf("ctlbd answered %d %s", e.Code, http.StatusText(e.Code))
}

// Is makes errors.Is(err, ErrNotFound) and friends true for the matching
// status.
func (e *StatusError) Is(target error) bool {
	switch target {
	case ErrBadRequest:
		return e.Code == http.StatusBadRequest
	case ErrNotFound:
		return e.Code == http.StatusNotFound
	case ErrConflict:
		return e.Code == http.StatusConflict
	case ErrTooLarge:
		return e.Code == http.StatusRequestEntityTooLarge
	case ErrUnavailable:
		return e.Code == http.StatusServiceUnavailable
	}
	return false
}
