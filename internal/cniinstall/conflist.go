package cniinstall

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"

	"github.com/containernetworking/cni/libcni"
)

// member is one top-level key of a network config and its value exactly as
// it was written. Keeping raw values (rather than decoding into a map) is what
// lets every plugin and key ctlb does not own come back out byte for byte, in
// its original order, modulo whitespace.
type member struct {
	key   string
	value json.RawMessage
}

// parseObject splits a JSON object into its members in file order. It
// refuses duplicate keys: encoding/json and libcni silently keep the last
// one, and rewriting such a file would pick a side for its author.
func parseObject(data []byte) ([]member, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("invalid JSON: top level is %v, want an object", tok)
	}
	var members []member
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("invalid JSON at byte %d: %w", dec.InputOffset(), err)
		}
		key := tok.(string) // inside an object the decoder only yields string keys
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, fmt.Errorf("invalid JSON in value of %q: %w", key, err)
		}
		members = append(members, member{key: key, value: value})
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("invalid JSON at byte %d: %w", dec.InputOffset(), err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("invalid JSON: trailing data after the top-level object at byte %d", dec.InputOffset())
	}
	return members, nil
}

func lookup(members []member, key string) (json.RawMessage, bool) {
	for _, m := range members {
		if m.key == key {
			return m.value, true
		}
	}
	return nil, false
}

// conflist is a network configuration list being edited: its top-level
// members in order, with the plugin chain split out so one entry can be
// added, replaced or removed without touching the others.
type conflist struct {
	members []member          // "plugins" keeps its position; its value is rebuilt on render
	plugins []json.RawMessage // each plugin's object as written
}

// parseConflist reads a .conflist. libcni validates it first: a file the
// runtime itself would reject is not one to edit.
func parseConflist(data []byte) (*conflist, error) {
	if err := syntaxCheck(data); err != nil {
		return nil, err
	}
	if _, err := libcni.NetworkConfFromBytes(data); err != nil {
		return nil, err
	}
	members, err := parseObject(data)
	if err != nil {
		return nil, err
	}
	raw, ok := lookup(members, "plugins")
	if !ok {
		// CNI 1.1 allows plugins in a directory named after the network;
		// inserting ctlb there is not supported, so say so rather than guess.
		return nil, errors.New(`no "plugins" list (plugin configs loaded from a directory are not supported)`)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, fmt.Errorf(`"plugins": %w`, err)
	}
	return &conflist{members: members, plugins: plugins}, nil
}

// convertConf turns a single-plugin .conf into a conflist the way libcni's
// ConfListFromConf does: name and cniVersion move up to the list, and the
// whole original object, unchanged, becomes the first plugin.
func convertConf(data []byte) (*conflist, error) {
	if err := syntaxCheck(data); err != nil {
		return nil, err
	}
	if _, err := libcni.NetworkPluginConfFromBytes(data); err != nil {
		return nil, err
	}
	members, err := parseObject(data)
	if err != nil {
		return nil, err
	}
	var list []member
	if v, ok := lookup(members, "cniVersion"); ok {
		list = append(list, member{key: "cniVersion", value: v})
	}
	name, ok := lookup(members, "name")
	if !ok {
		return nil, errors.New(`no "name" (a conflist needs the network name)`)
	}
	list = append(list, member{key: "name", value: name}, member{key: "plugins"})
	return &conflist{members: list, plugins: []json.RawMessage{bytes.TrimSpace(data)}}, nil
}

// syntaxCheck reports a JSON syntax error with its line and column, which
// is what someone fixing the file by hand needs.
func syntaxCheck(data []byte) error {
	var v any
	err := json.Unmarshal(data, &v)
	var se *json.SyntaxError
	if !errors.As(err, &se) {
		return nil // valid JSON; structure is checked by libcni and parseObject
	}
	prefix := data[:min(int(se.Offset), len(data))]
	line := bytes.Count(prefix, []byte("\n")) + 1
	col := len(prefix) - bytes.LastIndexByte(prefix, '\n')
	return fmt.Errorf("invalid JSON at line %d, column %d: %w", line, col, err)
}

// indexOf returns the position of the first plugin of type typ, or -1.
func (c *conflist) indexOf(typ string) int {
	for i, p := range c.plugins {
		if typeOf(p) == typ {
			return i
		}
	}
	return -1
}

// indexOfOurs returns the position of the first plugin of type typ that
// install-cni wrote (marked, edited since or not), or -1; byHand says
// whether one without the mark is in the chain too, before or after it.
func (c *conflist) indexOfOurs(typ string) (i int, byHand bool) {
	i = -1
	for j, p := range c.plugins {
		if typeOf(p) != typ {
			continue
		}
		if kindOf(p) == handWritten {
			byHand = true
		} else if i < 0 {
			i = j
		}
	}
	return i, byHand
}

// typeOf is a plugin entry's type, or "" when it has none.
func typeOf(p json.RawMessage) string {
	var t struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(p, &t)
	return t.Type
}

// render writes the conflist back out, two-space indented with a final
// newline, and checks that libcni loads the result.
func (c *conflist) render() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range c.members {
		if i > 0 {
			b.WriteByte(',')
		}
		key, err := marshalNoEscape(m.key)
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteByte(':')
		if m.key == "plugins" {
			b.WriteByte('[')
			for j, p := range c.plugins {
				if j > 0 {
					b.WriteByte(',')
				}
				b.Write(p)
			}
			b.WriteByte(']')
			continue
		}
		b.Write(m.value)
	}
	b.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, b.Bytes(), "", "  "); err != nil {
		return nil, fmt.Errorf("render conflist: %w", err)
	}
	out.WriteByte('\n')
	if _, err := libcni.NetworkConfFromBytes(out.Bytes()); err != nil {
		return nil, fmt.Errorf("rendered conflist does not load: %w", err)
	}
	return out.Bytes(), nil
}

// marshalNoEscape encodes a string without encoding/json's HTML escaping,
// which would turn a key's '<' or '&' into \u003c or \u0026.
func marshalNoEscape(s string) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return nil, err
	}
	return bytes.TrimRight(b.Bytes(), "\n"), nil
}

// sameJSON reports whether a and b hold the same JSON value, whatever their
// formatting and key order.
func sameJSON(a, b []byte) bool {
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return false
	}
	return reflect.DeepEqual(va, vb)
}

// parsePluginConf checks the object to insert and returns it compacted with
// its type, which is also the plugin binary's name in the bin dir.
func parsePluginConf(raw json.RawMessage) (json.RawMessage, string, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return nil, "", errors.New("PluginConf is empty")
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, "", fmt.Errorf("PluginConf %s: want a JSON object: %w", raw, err)
	}
	typ, ok := obj["type"].(string)
	if !ok || typ == "" || typ == "." || typ == ".." || bytes.ContainsAny([]byte(typ), "/\\") {
		return nil, "", fmt.Errorf("PluginConf %s: \"type\" must name the plugin binary (a plain file name)", raw)
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return nil, "", fmt.Errorf("PluginConf: %w", err)
	}
	return b.Bytes(), typ, nil
}
