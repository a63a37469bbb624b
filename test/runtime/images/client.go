package images

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// ClientArgs are the client container's arguments: dial target until a
// connection succeeds, then count connections in all, all within deadline.
func ClientArgs(target string, count int, deadline time.Duration) []string {
	return []string{"-target", target, "-count", strconv.Itoa(count), "-deadline", deadline.String()}
}

// LingeringClientArgs are ClientArgs for a container that stays after its
// run, at most linger or until SIGTERM, so that its pod keeps running.
func LingeringClientArgs(target string, count int, deadline, linger time.Duration) []string {
	return append(ClientArgs(target, count, deadline), "-linger", linger.String())
}

// clientLine is one line the client prints (cmd/vipclient's Line).
type clientLine struct {
	N        int      `json:"n"`
	Server   string   `json:"server"`
	Peer     string   `json:"peer"`
	At       int64    `json:"at"`
	Err      string   `json:"err"`
	Retries  int      `json:"retries"`
	Failures []string `json:"failures"`
	Done     bool     `json:"done"`
}

// ClientRun is what one client run saw.
type ClientRun struct {
	// Landed names the server of each connection, in order ("" for a
	// failed one).
	Landed    []string
	PerServer map[string]int
	// First is when the first connection was established; Retries counts
	// the failed attempts before it.
	First   time.Time
	Retries int
	// Failures describes the first few failed attempts before the first
	// success ("HH:MM:SS.mmm +DURATION: error").
	Failures []string
	Errors   []string
	// Done is false when the client did not finish its run.
	Done bool
}

// ParseClientOutput decodes the client's standard output.
func ParseClientOutput(lines []string) (ClientRun, error) {
	r := ClientRun{PerServer: map[string]int{}}
	for _, raw := range lines {
		var l clientLine
		if err := json.Unmarshal([]byte(raw), &l); err != nil {
			return r, fmt.Errorf("client output %q: %w", raw, err)
		}
		if l.Err != "" {
			r.Errors = append(r.Errors, l.Err)
		}
		if l.Done {
			r.Done = true
			continue
		}
		if l.Server != "" && r.First.IsZero() {
			r.First = time.Unix(0, l.At)
			r.Retries, r.Failures = l.Retries, l.Failures
		}
		r.Landed = append(r.Landed, l.Server)
		if l.Server != "" {
			r.PerServer[l.Server]++
		}
	}
	return r, nil
}
