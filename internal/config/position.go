package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// jsonNode is one key or value of a JSON document: where it starts, its
// path ("services[3].dns.interval") and, for a value that is not an object
// or array, its text.
type jsonNode struct {
	offset int
	path   string
	key    string // set for a key
	raw    string // set for a scalar value
}

// jsonNodes lists the keys and values of data in order, as far as data is
// valid JSON.
func jsonNodes(data []byte) []jsonNode {
	type frame struct {
		object    bool
		expectKey bool
		key       string
		index     int
	}
	var stack []frame
	path := func() string {
		var b strings.Builder
		for _, f := range stack {
			if f.object {
				if f.key != "" {
					if b.Len() > 0 {
						b.WriteByte('.')
					}
					b.WriteString(f.key)
				}
			} else {
				fmt.Fprintf(&b, "[%d]", f.index)
			}
		}
		return b.String()
	}
	// done is called when a value ends: its parent moves on.
	done := func() {
		if len(stack) == 0 {
			return
		}
		top := &stack[len(stack)-1]
		if top.object {
			top.expectKey = true
		} else {
			top.index++
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var out []jsonNode
	for {
		start := int(dec.InputOffset())
		for start < len(data) && strings.IndexByte(" \t\r\n:,", data[start]) >= 0 {
			start++
		}
		tok, err := dec.Token()
		if err != nil {
			return out
		}
		end := int(dec.InputOffset())
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{', '[':
				out = append(out, jsonNode{offset: start, path: path()})
				stack = append(stack, frame{object: t == '{', expectKey: t == '{'})
			default:
				stack = stack[:len(stack)-1]
				done()
			}
		default:
			if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].expectKey {
				stack[n-1].key, stack[n-1].expectKey = fmt.Sprint(t), false
				out = append(out, jsonNode{offset: start, path: path(), key: fmt.Sprint(t)})
				continue
			}
			out = append(out, jsonNode{offset: start, path: path(), raw: string(data[start:min(end, len(data))])})
			done()
		}
	}
}

// lineCol turns a byte offset into a 1-based line and column.
func lineCol(data []byte, offset int) (line, col int) {
	prefix := data[:max(0, min(offset, len(data)))]
	return bytes.Count(prefix, []byte("\n")) + 1, len(prefix) - bytes.LastIndexByte(prefix, '\n')
}

var (
	unknownField = regexp.MustCompile(`^json: unknown field "(.*)"$`)
	// badDuration matches the Duration types' errors, which quote the
	// value as the file has it.
	badDuration = regexp.MustCompile(`^duration (.+?): `)
)

// decodeError adds where in data a decoding error is: line, column and
// the path of the key or value (json's own errors name neither, or a path
// without the list indices).
func decodeError(data []byte, err error) error {
	offset, path := -1, ""
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	nodes := jsonNodes(data)
	// at is the node at offset or the last one before it.
	at := func(off int) {
		offset = off
		for _, n := range nodes {
			if n.offset > off {
				break
			}
			path = n.path
		}
	}
	switch {
	case errors.As(err, &se):
		at(int(se.Offset) - 1) // Offset is just after the bad byte
	case errors.Is(err, io.ErrUnexpectedEOF):
		at(len(data))
	case errors.As(err, &te):
		// Offset is where the decoder stood: just after the bad value.
		for _, n := range nodes {
			if n.offset >= int(te.Offset) {
				break
			}
			offset, path = n.offset, n.path
		}
	default:
		var key, raw string
		if m := unknownField.FindStringSubmatch(err.Error()); m != nil {
			key = m[1]
		} else if m := badDuration.FindStringSubmatch(err.Error()); m != nil {
			raw = m[1]
		}
		for _, n := range nodes {
			if (key != "" && n.key == key) || (raw != "" && n.raw != "" && sameJSON(n.raw, raw)) {
				offset, path = n.offset, n.path
				break
			}
		}
	}
	if offset < 0 {
		return err
	}
	line, col := lineCol(data, offset)
	where := fmt.Sprintf("line %d, column %d", line, col)
	if path != "" {
		where += " (" + path + ")"
	}
	return &positionError{where: where, err: err}
}

// sameJSON compares a value's JSON text with the text an error quoted it
// as (Go's %q, which reads back as a JSON string for plain text).
func sameJSON(raw, quoted string) bool {
	if raw == quoted {
		return true
	}
	a, errA := strconv.Unquote(raw)
	b, errB := strconv.Unquote(quoted)
	return errA == nil && errB == nil && a == b
}

// positionError is a decoding error with where it is.
type positionError struct {
	where string
	err   error
}

func (e *positionError) Error() string { return "at " + e.where + ": " + e.err.Error() }
func (e *positionError) Unwrap() error { return e.err }
