package api_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/ctlb/ctlb/internal/config"
	"github.com/ctlb/ctlb/pkg/api"
)

// FuzzDecodeServiceRequest: the control API's request decoding and the
// conversion to a map entry never panic, and reject with a message.
func FuzzDecodeServiceRequest(f *testing.F) {
	f.Add([]byte(`{"vip": "198.19.0.1:8502", "servers": ["127.0.0.1:8502"]}`))
	f.Add([]byte(`{"vip": "198.19.0.1:8502", "servers": [], "empty": "passthrough"}`))
	f.Add([]byte(`{"vip": "[::1]:80", "servers": ["127.0.0.1:1"]}`))
	f.Add([]byte(`{"cgroup": "/kubepods"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.ServiceRequest
		if err := api.Decode(bytes.NewReader(data), &req); err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		svc, err := config.Service{VIP: req.VIP, Servers: req.Servers, Empty: req.Empty}.Datapath()
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if err := svc.Validate(); err != nil {
			t.Fatalf("converted service fails validation: %v", err)
		}
		var att api.AttachRequest
		_ = api.Decode(bytes.NewReader(data), &att)
	})
}

func TestDecodeLimits(t *testing.T) {
	big := `{"vip": "198.19.0.1:80", "servers": ["` + strings.Repeat("1", api.MaxRequestBytes) + `"]}`
	var req api.ServiceRequest
	if err := api.Decode(strings.NewReader(big), &req); !errors.Is(err, api.ErrTooLarge) {
		t.Errorf("oversized request: %v, want ErrTooLarge", err)
	}
	if err := api.Decode(strings.NewReader(`{"vip": "x", "extra": 1}`), &req); err == nil || !strings.Contains(err.Error(), `"extra"`) {
		t.Errorf("unknown field: %v", err)
	}
	if err := api.Decode(strings.NewReader(`{"vip": "x"} {"vip": "y"}`), &req); err == nil {
		t.Error("two JSON values accepted")
	}
}
