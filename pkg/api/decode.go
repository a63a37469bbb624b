package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Decode reads one request body strictly: at most MaxRequestBytes, exactly
// one JSON value, no unknown fields. The daemon decodes every request with
// it, so one function stands between the socket and the maps.
func Decode(body io.Reader, v any) error {
	data, err := io.ReadAll(io.LimitReader(body, MaxRequestBytes+1))
	if err != nil {
		return fmt.Errorf("read request: %w", err)
	}
	if len(data) > MaxRequestBytes {
		return ErrTooLarge
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode request: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("decode request: trailing data after the JSON object")
	}
	return nil
}
