package cniinstall

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
)

// MarkerKey marks the ctlb entry install-cni wrote. Its value names the
// writer and a digest of the rest of the entry, so that a later run tells
// the three kinds of ctlb entry apart: its own, as written (replaced when
// the wanted config changes); its own, since edited by hand (kept); and
// one written by hand (kept, and never removed by Uninstall).
const MarkerKey = "installedBy"

const markerPrefix = "ctlbd install-cni sha256:"

// entryKind is who wrote a ctlb entry found in a conflist.
type entryKind int

const (
	handWritten entryKind = iota // no marker
	ours                         // marker, digest matches: as install-cni wrote it
	customised                   // marker, digest differs: edited since
)

// digest is a short hash of an entry without its marker, independent of
// formatting and key order.
func digest(obj map[string]any) string {
	delete(obj, MarkerKey)
	b, _ := json.Marshal(obj) // maps marshal with sorted keys
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// mark returns the entry with a marker for its current content.
func mark(entry json.RawMessage) json.RawMessage {
	var obj map[string]any
	if json.Unmarshal(entry, &obj) != nil {
		return entry
	}
	d := digest(obj)
	// Re-render without the old marker, keeping the entry's key order.
	members, err := parseObject(entry)
	if err != nil {
		return entry
	}
	var b bytes.Buffer
	b.WriteByte('{')
	n := 0
	for _, m := range members {
		if m.key == MarkerKey {
			continue
		}
		if n > 0 {
			b.WriteByte(',')
		}
		k, _ := marshalNoEscape(m.key)
		b.Write(k)
		b.WriteByte(':')
		b.Write(m.value)
		n++
	}
	if n > 0 {
		b.WriteByte(',')
	}
	k, _ := marshalNoEscape(MarkerKey)
	v, _ := marshalNoEscape(markerPrefix + d)
	b.Write(k)
	b.WriteByte(':')
	b.Write(v)
	b.WriteByte('}')
	var out bytes.Buffer
	if json.Compact(&out, b.Bytes()) != nil {
		return entry
	}
	return out.Bytes()
}

// kindOf says who wrote a ctlb entry.
func kindOf(entry json.RawMessage) entryKind {
	var obj map[string]any
	if json.Unmarshal(entry, &obj) != nil {
		return handWritten
	}
	m, ok := obj[MarkerKey].(string)
	d, isOurs := strings.CutPrefix(m, markerPrefix)
	if !ok || !isOurs {
		return handWritten
	}
	if digest(obj) != d {
		return customised
	}
	return ours
}
